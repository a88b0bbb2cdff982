//! Which ops the kernels run, for which types and shapes, on which device: the one gate the
//! loader (`arch::Config`, `model`, `session`), the recorder and the conformance suite consult
//! (as ggml backends' `supports_op`). `device` None asks about any device (the rules of the
//! kernels themselves); a device adds its binding limit and its loop budget.

use super::attention::{attention_kernel, attention_split, attention_within_loop_budget, AttentionArgs, AttentionKernel};
use super::rope_kv::KvType;
use super::top_k::MAX_TOP_K;
use super::WEIGHT_PAD;
use crate::device::{Gpu, GpuError};
use crate::ggml_type::{GgmlType, KERNEL_TYPES};

/// The largest head_dim attention takes (the per-query kernels' registers hold that much).
pub const MAX_HEAD_DIM: u32 = 256;

/// An op with the type and shape that decide whether it runs.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// A weight matrix of rows of `k` elements of type `ty`, read by matvec, matmul and gather.
    Matrix { ty: GgmlType, k: u64 },
    /// Attention of `n_head` query heads over `n_kv_head` cached heads of `head_dim`, with up
    /// to `keys` keys a query, through `kernel` cutting them into that many chunks (split-K; 1:
    /// none) (None: what the device would pick).
    Attention { kv: KvType, head_dim: u32, n_head: u32, n_kv_head: u32, keys: u32, kernel: Option<(AttentionKernel, u32)> },
    /// RoPE over the first `n_rot` of each head's `head_dim` dimensions (rope, rope_kv, the
    /// fused q/k/v product).
    Rope { head_dim: u32, n_rot: u32 },
    /// The `k` largest of `n` values (argmax for k = 1).
    TopK { n: u32, k: u32 },
}

/// Why an op does not run.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Unsupported {
    #[error("tensor type {0} is not supported by nomoat's kernels")]
    Type(GgmlType),
    #[error("{0}")]
    Shape(String),
    #[error("{0}")]
    Device(String),
}

impl From<Unsupported> for GpuError {
    fn from(e: Unsupported) -> GpuError {
        GpuError::Unsupported(e.to_string())
    }
}

/// Whether `op` runs (on `device`, or on any device for None), and if not, why.
pub fn supports(op: Op, device: Option<&Gpu>) -> Result<(), Unsupported> {
    let shape = |m: String| Err(Unsupported::Shape(m));
    match op {
        Op::Matrix { ty, k } => {
            if !KERNEL_TYPES.contains(&ty) {
                return Err(Unsupported::Type(ty));
            }
            if !k.is_multiple_of(ty.block_elems() as u64) {
                return shape(format!("row length {k} is not a multiple of {ty}'s block of {}", ty.block_elems()));
            }
            if k == 0 || k > u32::MAX as u64 / 8 {
                return shape(format!("row length {k} is out of range"));
            }
            let row_bytes = ty.row_bytes(k).unwrap_or(u64::MAX);
            if let Some(gpu) = device {
                if row_bytes.saturating_add(WEIGHT_PAD as u64 + 256) > gpu.max_binding() {
                    return Err(Unsupported::Device(format!("one row ({row_bytes} bytes) exceeds the device's binding limit")));
                }
            }
        }
        Op::Attention { kv, head_dim, n_head, n_kv_head, keys, kernel } => {
            if head_dim > MAX_HEAD_DIM || head_dim == 0 || !head_dim.is_multiple_of(2) || n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
                return shape(format!("attention with head size {head_dim} and {n_head} query heads over {n_kv_head} kv heads"));
            }
            kv.check_row(n_kv_head, head_dim).map_err(Unsupported::Shape)?;
            if let Some(gpu) = device {
                let a = AttentionArgs { n_q: 1, n_head, n_kv_head, head_dim, pos0: keys.saturating_sub(1), window: 0, scale: 1.0, kv };
                let (kernel, n_split) = kernel.unwrap_or_else(|| {
                    let kernel = attention_kernel(&gpu.tuning, &a, None, None);
                    (kernel, attention_split(&gpu.tuning, &a, kernel, None))
                });
                if !attention_within_loop_budget(&gpu.tuning, &a, kernel, n_split) {
                    return Err(Unsupported::Device(format!(
                        "attention over {keys} keys with head size {head_dim} on llvmpipe (its shaders stop after 65,535 loop iterations): use a smaller context size"
                    )));
                }
            }
        }
        Op::Rope { head_dim, n_rot } => {
            if !n_rot.is_multiple_of(2) || n_rot > head_dim || !head_dim.is_multiple_of(2) {
                return shape(format!("RoPE over {n_rot} of {head_dim} dimensions"));
            }
        }
        Op::TopK { n, k } => {
            if k == 0 || k > MAX_TOP_K || k > n {
                return shape(format!("top-k with k = {k} over {n} values (k must be 1..={MAX_TOP_K})"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_of_the_kernels() {
        assert_eq!(supports(Op::Matrix { ty: GgmlType::Q2K, k: 256 }, None), Err(Unsupported::Type(GgmlType::Q2K)));
        assert!(matches!(supports(Op::Matrix { ty: GgmlType::Q4K, k: 300 }, None), Err(Unsupported::Shape(_))));
        assert!(matches!(supports(Op::Matrix { ty: GgmlType::F32, k: 0 }, None), Err(Unsupported::Shape(_))));
        for ty in KERNEL_TYPES {
            assert_eq!(supports(Op::Matrix { ty, k: 4096 }, None), Ok(()), "{ty}");
        }
        let attention = |head_dim, n_head, n_kv_head| Op::Attention { kv: KvType::F16, head_dim, n_head, n_kv_head, keys: 100, kernel: None };
        assert_eq!(supports(attention(64, 9, 3), None), Ok(()));
        assert_eq!(supports(attention(256, 4, 1), None), Ok(()));
        for (hd, h, kv) in [(512, 4, 1), (63, 4, 1), (64, 9, 2), (64, 4, 0), (0, 4, 1)] {
            assert!(supports(attention(hd, h, kv), None).is_err(), "head {hd}, {h}/{kv}");
        }
        assert_eq!(supports(Op::Rope { head_dim: 128, n_rot: 64 }, None), Ok(()));
        assert!(supports(Op::Rope { head_dim: 64, n_rot: 65 }, None).is_err() && supports(Op::Rope { head_dim: 64, n_rot: 128 }, None).is_err());
        assert_eq!(supports(Op::TopK { n: 1000, k: 128 }, None), Ok(()));
        for (n, k) in [(1000, 0), (1000, 129), (5, 6)] {
            assert!(supports(Op::TopK { n, k }, None).is_err(), "top-{k} of {n}");
        }
    }
}
