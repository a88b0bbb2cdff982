//! nomoat runtime: open LLMs from GGUF files on the GPU through wgpu (Vulkan, Metal, DX12 or the
//! browser's WebGPU), with WGSL kernels; everything shared by the `nomoat` CLI and server and the
//! browser engine.
//!
//! Loading a model and generating, in order (`examples/generate.rs` does exactly this):
//! [`gguf::Gguf::read_from`] reads a file's header; [`tokenizer::Tokenizer::from_gguf`] and
//! [`chat::ChatTemplate::from_gguf`] build the text side from it; [`device::Gpu::new`] opens a
//! device; [`model::Model::load`] uploads the weights; [`session::Session::new`] makes a KV
//! cache; [`session::Session::generate`] streams text. Structured output: [`constrain`]; LoRA
//! adapters: [`lora`]; fine-tuning: [`train`].
//!
//! The modules:
//! - `gguf`: the file format (parse from bytes or in chunks, typed errors).
//! - `ggml_type`: block layouts of GGML tensor types.
//! - `device`: the GPU, its buffers and limits.
//! - `tokenizer`, `sampler`, `chat`: text to tokens and back, sampling, chat templates;
//!   `prompt`: chat requests (OpenAI's messages) to prompt tokens, message text never control
//!   tokens; `tools`: tool calling; `constrain`: structured output.
//! - `arch`: each architecture as data; `model`: its weights on the GPU; `session`: the KV cache
//!   and the forward pass; `generate`, `lora`: generation and perplexity, LoRA adapters;
//!   `lookup`: prompt-lookup (speculative) decoding;
//!   `error`: what loading can fail with; `train`: fine-tuning LoRA adapters; `rng`: seeded
//!   random numbers; `catalog`: the models known by name.
//!
//! Hidden from these docs, public only for nomoat's own crates and tests, and not a stable API:
//! `ops` (the Rust side of every WGSL kernel), `shaders` (WGSL sources and their preprocessor),
//! `tuning` (the device's kernel choices, made once), `quant` and `reference` (plain CPU
//! dequantization and ops, the yardstick the kernels are tested against) and `conformance`
//! (that test suite, run natively and in the browser).

#![warn(missing_docs)]

pub mod arch;
pub mod catalog;
pub mod chat;
#[doc(hidden)]
#[allow(rustdoc::broken_intra_doc_links, rustdoc::private_intra_doc_links)] // internals: shapes like [rows][cols], private links
pub mod conformance;
pub mod constrain;
pub mod device;
pub mod error;
pub mod generate;
pub mod ggml_type;
pub mod gguf;
pub mod held;
pub mod lookup;
pub mod lora;
pub mod model;
#[doc(hidden)]
#[allow(rustdoc::broken_intra_doc_links, rustdoc::private_intra_doc_links)] // internals: shapes like [rows][cols], private links
pub mod ops;
pub mod prompt;
#[doc(hidden)]
#[allow(rustdoc::broken_intra_doc_links, rustdoc::private_intra_doc_links)] // internals: shapes like [rows][cols], private links
pub mod quant;
#[doc(hidden)]
#[allow(rustdoc::broken_intra_doc_links, rustdoc::private_intra_doc_links)] // internals: shapes like [rows][cols], private links
pub mod reference;
pub mod rng;
pub mod sampler;
pub mod session;
#[doc(hidden)]
#[allow(rustdoc::broken_intra_doc_links, rustdoc::private_intra_doc_links)] // internals: shapes like [rows][cols], private links
pub mod shaders;
pub mod tokenizer;
pub mod tools;
pub mod train;
#[doc(hidden)]
#[allow(rustdoc::broken_intra_doc_links, rustdoc::private_intra_doc_links)] // internals: shapes like [rows][cols], private links
pub mod tuning;

/// The element type of a session's KV cache.
pub use ops::KvType;
