//! What the fuzz targets run, kept apart from libFuzzer so that the regression test
//! (tests/tests/fuzz_regressions.rs) can include these same files with `#[path]`.
//! Both modules use only std and nomoat-runtime.

pub mod gguf_reader;
pub mod tokenizer_spec;
