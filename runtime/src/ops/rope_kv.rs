//! RoPE and the KV-cache write (rope_kv.wgsl): q rotated in place, k rotated and v appended to
//! the cache, optionally after per-head RMS norms of q and k; also the KV cache's element type.

use super::pipeline::Bind::{self, *};
use super::support::{supports, Op};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// rope_kv.wgsl's bindings, in order: q, k, v, k_cache, v_cache, q_norm_w, k_norm_w,
/// rope_factors, params.
pub const ROPE_KV_LAYOUT: &[Bind] = &[ReadWrite, Read, Read, ReadWrite, ReadWrite, Read, Read, Read, Uniform];

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F32,
    F16,
}

impl KvType {
    pub(super) fn defines(self) -> Defines {
        match self {
            KvType::F32 => Defines::new(),
            KvType::F16 => Defines::new().flag("KV_F16"),
        }
    }
    pub fn bytes(self) -> u64 {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }
}

/// RoPE over `n_tokens` tokens of `n_heads` heads of `head_dim` at positions `pos0..`: the first
/// `n_rot` dimensions of each head turn, in adjacent pairs or (`neox`) in pairs n_rot / 2 apart.
#[derive(Clone, Copy, Debug)]
pub struct RopeArgs {
    pub n_tokens: u32,
    pub n_heads: u32,
    pub head_dim: u32,
    pub n_rot: u32,
    pub pos0: u32,
    pub neox: bool,
    pub freq_base: f32,
    pub freq_scale: f32,
}

/// The per-head RMS norms of q and k before RoPE (Qwen3, Gemma 3), which rope_kv applies
/// itself: weights [head_dim] each.
#[derive(Clone, Copy, Debug)]
pub struct QkNorm<'a> {
    pub q_weight: &'a wgpu::Buffer,
    pub k_weight: &'a wgpu::Buffer,
    pub eps: f32,
}

params! {
    /// rope_kv.wgsl's `struct Params`.
    struct RopeKvParams {
        n_tokens: u32,
        n_head: u32,
        n_kv_head: u32,
        head_dim: u32,
        n_rot: u32,
        pos0: u32,
        neox: u32,
        log2_base: f32,
        freq_scale: f32,
        eps: f32,
        _pad: [u32; 2],
    }
}

/// rope_kv.wgsl for both cache types, with and without the q/k norms.
pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for kv in [KvType::F32, KvType::F16] {
        for d in [kv.defines(), kv.defines().flag("ROPE_FACTORS")] {
            keys.push(PipelineKey { file: "rope_kv.wgsl", entry: "main", defines: d.clone() });
            keys.push(PipelineKey { file: "rope_kv.wgsl", entry: "main", defines: d.flag("QK_NORM") });
        }
    }
    keys
}

impl Recorder<'_> {
    /// RoPE in place on x: [n_tokens][n_heads][head_dim] (rope_kv with no keys to store), with
    /// the model's frequency factors where it has them.
    pub async fn rope(&mut self, x: &wgpu::Buffer, a: RopeArgs, factors: Option<&wgpu::Buffer>) -> Result<(), GpuError> {
        let [none, cache_k, cache_v] = &self.gpu.unused_buffers;
        self.rope_kv_normed(x, none, none, cache_k, cache_v, 0, KvType::F32, a, None, factors).await
    }

    /// RoPE on q in place, and k (rotated the same way) and v appended to the KV cache at
    /// positions a.pos0..: rope_kv.wgsl. q: [n_tokens][a.n_heads][head_dim]; k, v:
    /// [n_tokens][n_kv_head][head_dim]. With a.n_rot = 0 (and a.n_heads = 0) it only stores.
    #[allow(clippy::too_many_arguments)]
    pub async fn rope_kv(
        &mut self,
        q: &wgpu::Buffer,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        n_kv_head: u32,
        kv: KvType,
        a: RopeArgs,
    ) -> Result<(), GpuError> {
        self.rope_kv_normed(q, k, v, k_cache, v_cache, n_kv_head, kv, a, None, None).await
    }

    /// rope_kv, with q's and k's heads first RMS-normalised where `norm` is given, and pair i's
    /// frequency divided by `factors[i]` where they are given ([n_rot / 2]: Llama 3.1, Phi-3).
    #[allow(clippy::too_many_arguments)]
    pub async fn rope_kv_normed(
        &mut self,
        q: &wgpu::Buffer,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        n_kv_head: u32,
        kv: KvType,
        a: RopeArgs,
        norm: Option<QkNorm<'_>>,
        factors: Option<&wgpu::Buffer>,
    ) -> Result<(), GpuError> {
        supports(Op::Rope { head_dim: a.head_dim, n_rot: a.n_rot }, None)?;
        let v_pairs = a.n_tokens * n_kv_head * a.head_dim / 2;
        let work = match norm {
            // an invocation per q head and per k head, then per pair of v
            Some(_) => a.n_tokens * (a.n_heads + n_kv_head) + v_pairs,
            None => a.n_tokens * a.n_heads * (a.n_rot / 2) + 2 * v_pairs,
        };
        let (gx, gy) = grid(work.div_ceil(256));
        let params = RopeKvParams {
            n_tokens: a.n_tokens,
            n_head: a.n_heads,
            n_kv_head,
            head_dim: a.head_dim,
            n_rot: a.n_rot,
            pos0: a.pos0,
            neox: a.neox as u32,
            log2_base: a.freq_base.log2(),
            freq_scale: a.freq_scale,
            eps: norm.map_or(0.0, |n| n.eps),
            _pad: [0; 2],
        };
        let (defines, qw, kw) = match norm {
            Some(n) => (kv.defines().flag("QK_NORM"), n.q_weight, n.k_weight),
            // the weight slots unread: k and v, bound read-only anyway
            None => (kv.defines(), k, v),
        };
        // likewise the factors' slot: v when there are none
        let (defines, fw) = match factors {
            Some(f) => (defines.flag("ROPE_FACTORS"), f),
            None => (defines, v),
        };
        let key = PipelineKey { file: "rope_kv.wgsl", entry: "main", defines };
        self.dispatch(key, &[q, k, v, k_cache, v_cache, qw, kw, fw], &params, (gx, gy, 1)).await
    }

    /// Append k and v: [n_tokens][n_kv_head][head_dim] to the KV cache at positions pos0.. as
    /// they are (rope_kv without rotation).
    #[allow(clippy::too_many_arguments)]
    pub async fn kv_store(
        &mut self,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        n_kv_head: u32,
        head_dim: u32,
        kv: KvType,
        n_tokens: u32,
        pos0: u32,
    ) -> Result<(), GpuError> {
        let a = RopeArgs { n_tokens, n_heads: 0, head_dim, n_rot: 0, pos0, neox: false, freq_base: 1.0, freq_scale: 1.0 };
        let q = &self.gpu.unused_buffers[0];
        self.rope_kv(q, k, v, k_cache, v_cache, n_kv_head, kv, a).await
    }
}
