//! nomoat runtime: everything shared by the native CLI and the browser build.
//!
//! - `gguf`: the file format (parse from bytes or in chunks, typed errors).
//! - `ggml_type`: block layouts of GGML tensor types.
//! - `quant`: plain CPU dequantization of every supported block type (the reference).
//! - `reference`: plain CPU versions of every GPU op, the yardstick tests compare against;
//!   `conformance`: the suite comparing the GPU ops with it, run natively and in the browser.
//! - `device`, `tuning`, `shaders`, `ops`: the GPU side (`tuning`: the device's kernel choices,
//!   made once; `ops`: the Rust side of every WGSL kernel, one file per op family).
//! - `tokenizer`, `sampler`, `chat`: text to tokens and back, sampling, chat templates.
//! - `arch`: each architecture as data; `model`: its weights on the GPU; `session`: the KV cache
//!   and the forward pass; `generate`, `lora`: generation and perplexity, LoRA adapters;
//!   `error`: what loading can fail with; `train`: fine-tuning LoRA adapters; `rng`: seeded
//!   random numbers.

pub mod arch;
pub mod chat;
pub mod conformance;
pub mod constrain;
pub mod device;
pub mod error;
pub mod generate;
pub mod ggml_type;
pub mod gguf;
pub mod lora;
pub mod model;
pub mod ops;
pub mod quant;
pub mod reference;
pub mod rng;
pub mod sampler;
pub mod session;
pub mod shaders;
pub mod tokenizer;
pub mod tools;
pub mod train;
pub mod tuning;
