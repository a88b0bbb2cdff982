//! What the fuzz targets run, kept apart from libFuzzer so that the tests can include these
//! same files with `#[path]` (tests/tests/fuzz_regressions.rs; tests/tests/chat_template.rs
//! replays `corpus/chat_template`).
//! They use only std, nomoat-runtime and (chat_template) serde_json.

pub mod chat_template;
pub mod gguf_reader;
pub mod tokenizer_spec;
