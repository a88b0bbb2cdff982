//! nomoat runtime: everything shared by the native CLI and the browser build.
//!
//! - `gguf`: the file format (parse from bytes or in chunks, typed errors).
//! - `ggml_type`: block layouts of GGML tensor types.
//! - `quant`: plain CPU dequantization of every supported block type (the reference).
//! - `reference`: plain CPU versions of every GPU op, the yardstick tests compare against;
//!   `conformance`: the suite comparing the GPU ops with it, run natively and in the browser.
//! - `device`, `shaders`, `kernels`: the GPU side.

pub mod ggml_type;
pub mod gguf;
pub mod tokenizer;
pub mod quant;
pub mod reference;
pub mod conformance;
pub mod device;
pub mod kernels;
pub mod shaders;
pub mod sampler;
pub mod chat;
pub mod arch;
pub mod error;
pub mod model;
pub mod session;
pub mod generate;
pub mod lora;
