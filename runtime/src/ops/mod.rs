//! The Rust side of every WGSL kernel, one file per op family. Each op file holds its
//! parameters (the `#[repr(C)]` struct its shader's `struct Params` mirrors), its bind-group
//! layout (named next to the shader it describes), the pipelines it can build
//! (`pipeline_keys`, gathered by [`all_pipeline_keys`]), which (op, type, size) it supports,
//! and how it is dispatched (its [`Recorder`] methods).
//!
//! Work is recorded into a [`Recorder`] (one command encoder) and submitted once, so a whole
//! token's worth of dispatches costs one submission (a recording longer than its parameter
//! slots, see [`DispatchCache`], submits in parts).
//!
//! Op → file (shader):
//! - `product`, `matvec`, `matmul`, `fuses_block`, `fuses_glu`, `fuses_qkv_rope` →
//!   `product.rs` (matvec.wgsl, matmul.wgsl, both writing through lib/product_out.wgsl)
//! - `gather` → `gather.rs` (gather.wgsl)
//! - `rms_norm`, `rms_norm_add`, `layer_norm` → `norm.rs` (norm.wgsl)
//! - `softmax` → `softmax.rs` (softmax.wgsl)
//! - `add`, `add_bias`, `accumulate`, `scale`, `softcap`, `silu_gate`, `gelu_gate` →
//!   `elementwise.rs` (elementwise.wgsl)
//! - `copy` → `copy.rs` (copy.wgsl)
//! - `rope`, `rope_kv`, `rope_kv_normed`, `kv_store` → `rope_kv.rs` (rope_kv.wgsl)
//! - `attention`, `attention_kernel` → `attention.rs` (attention_workgroup.wgsl,
//!   attention_query.wgsl, both with lib/attention.wgsl)
//! - [`top_k`], [`record_top_k`] → `top_k.rs` (topk.wgsl)
//!
//! Training's backward ops (gradients flow through the frozen base to the LoRA factors):
//! - `product_backward` (dx = dy · W, any weight type) → `product_backward.rs`
//!   (product_backward.wgsl)
//! - `skinny_product` (a LoRA factor's product, an invocation per output) →
//!   `skinny_product.rs` (skinny_product.wgsl)
//! - `weight_gradient` (a LoRA factor's dW += dyᵀ · x) → `weight_gradient.rs`
//!   (weight_gradient.wgsl)
//! - `attention_backward` (dq, dk, dv) → `attention_backward.rs` (attention_backward.wgsl)
//! - `rms_norm_backward` → `norm_backward.rs` (norm_backward.wgsl)
//! - `glu_backward` (SiLU and GELU gates) → `glu_backward.rs` (glu_backward.wgsl)
//! - `cross_entropy` (loss and its gradient over the vocabulary) → `cross_entropy.rs`
//!   (cross_entropy.wgsl)
//! - `adamw` (the optimizer step) → `adamw.rs` (adamw.wgsl)
//!
//! And what they share:
//! - `support.rs`: [`supports`], which (op, type, shape, device) the kernels run, consulted by
//!   the loader, the recorder and the conformance suite.
//! - `pipeline.rs`: [`Bind`], [`layout_of`], [`all_pipeline_keys`] and `Gpu::pipeline`, which
//!   compiles a [`PipelineKey`](crate::device::PipelineKey) (the key, the compiled pipeline and
//!   the cache live in `device.rs`, next to `Gpu`).
//! - `recorder.rs`: [`Recorder`] and [`DispatchCache`], the recording and submission.
//! - `Gpu::tuning` (`crate::tuning`): every device-dependent choice, made once when the device
//!   opens; the ops read it and ask nothing else about the device.
//! - `matrix.rs`: [`GpuMatrix`], weights as GGUF stores them, uploaded in binding-sized chunks.

/// A kernel's parameters: the `#[repr(C)]` struct its shader's `struct Params` mirrors, and
/// its fields' names and byte offsets (`FIELDS`), which a test compares with the WGSL's.
macro_rules! params {
    ($(#[$m:meta])* struct $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
        pub(crate) struct $name {
            $($(#[$fm])* pub(crate) $field: $ty),*
        }
        impl $name {
            pub(crate) const FIELDS: &'static [(&'static str, usize)] = &[$((stringify!($field), std::mem::offset_of!($name, $field))),*];
        }
    };
}

mod adamw;
mod attention;
mod attention_backward;
mod copy;
mod cross_entropy;
mod elementwise;
mod gather;
mod glu_backward;
mod matrix;
mod norm;
mod norm_backward;
mod pipeline;
mod product;
mod product_backward;
mod recorder;
mod rope_kv;
mod skinny_product;
mod softmax;
mod support;
mod top_k;
mod weight_gradient;

pub use adamw::ADAMW_LAYOUT;
pub use attention::{AttentionArgs, AttentionFamily, AttentionKernel, ATTENTION_LAYOUT, ATTENTION_MERGE_LAYOUT};
pub use attention_backward::{AttentionBackwardKernel, AttentionGrads, ATTENTION_BACKWARD_LAYOUT};
pub use copy::COPY_LAYOUT;
pub use cross_entropy::CROSS_ENTROPY_LAYOUT;
pub use elementwise::ELEMENTWISE_LAYOUT;
pub use gather::GATHER_LAYOUT;
pub use glu_backward::GLU_BACKWARD_LAYOUT;
pub use matrix::{GpuMatrix, MatrixChunk, WEIGHT_PAD};
pub use norm::NORM_LAYOUT;
pub use norm_backward::NORM_BACKWARD_LAYOUT;
pub use pipeline::{all_pipeline_keys, layout_of, params_layouts, Bind, ParamsLayout};
pub use product::{argmax_slots, ProductIn, ProductOut, MATMUL_LAYOUT, MATVEC_LAYOUT};
pub(crate) use product_backward::pairs as product_backward_pairs;
pub use product_backward::PRODUCT_BACKWARD_LAYOUT;
pub use recorder::{DispatchCache, Recorder};
pub use rope_kv::{KvType, Place, Places, QkNorm, RopeArgs, MAX_SEQ_ROWS, ROPE_KV_LAYOUT};
pub use skinny_product::SKINNY_PRODUCT_LAYOUT;
pub use softmax::SOFTMAX_LAYOUT;
pub use support::{supports, Op, Unsupported, MAX_HEAD_DIM};
pub use top_k::{record_argmax_of, record_top_k, record_top_k_masked, top_k, top_k_masked, TopKScratch, MAX_TOP_K, NO_ID, TOPK_LAYOUT};
pub use weight_gradient::WEIGHT_GRADIENT_LAYOUT;

/// The largest workgroup count per dimension WebGPU guarantees.
const MAX_GROUPS: u32 = 65535;

/// Workgroup counts for `n` groups, folded into a second dimension past 65535; kernels rebuild
/// the linear index and skip the overshoot.
pub fn grid(n: u32) -> (u32, u32) {
    if n <= MAX_GROUPS {
        (n.max(1), 1)
    } else {
        (MAX_GROUPS, n.div_ceil(MAX_GROUPS))
    }
}
