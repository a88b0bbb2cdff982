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
    /// 4 bytes an element.
    F32,
    /// 2 bytes an element.
    F16,
    /// ggml's q8_0: blocks of 32 elements along a cache row, 32 int8s and an f16 scale each
    /// (34 bytes a block, 1.0625 an element). Rows of the cache must hold a multiple of 64
    /// elements (n_kv_head · head_dim; head_dim a multiple of 32): see lib/kv.wgsl.
    Q8_0,
}

impl KvType {
    /// The types, as `--kv` and the page's `kv` option name them (`name`).
    pub const ALL: [KvType; 3] = [KvType::F32, KvType::F16, KvType::Q8_0];

    /// The type's name: "f32", "f16" or "q8_0" (llama.cpp's `-ctk` names).
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
        }
    }

    /// The type named `name` ("f32", "f16", "q8_0"), or an error that lists them.
    pub fn parse(name: &str) -> Result<KvType, String> {
        KvType::ALL.into_iter().find(|t| t.name() == name).ok_or_else(|| format!("unknown KV cache type {name:?} (f32, f16 or q8_0)"))
    }

    pub(super) fn defines(self) -> Defines {
        match self {
            KvType::F32 => Defines::new(),
            KvType::F16 => Defines::new().flag("KV_F16"),
            KvType::Q8_0 => Defines::new().flag("KV_Q8"),
        }
    }

    /// Bytes one cache row of `elems` elements (n_kv_head · head_dim) takes; for q8_0 a row of
    /// a multiple of 64 elements (`check_row`).
    pub fn row_bytes(self, elems: u64) -> u64 {
        match self {
            KvType::F32 => elems.saturating_mul(4),
            KvType::F16 => elems.saturating_mul(2),
            KvType::Q8_0 => elems.saturating_add(elems / 32 * 2),
        }
    }

    /// Whether the cache takes rows of `n_kv_head` heads of `head_dim`: q8_0's blocks of 32
    /// must not straddle heads, and a row's scales must fill whole 4-byte words (two a word).
    pub fn check_row(self, n_kv_head: u32, head_dim: u32) -> Result<(), String> {
        if self == KvType::Q8_0 && (!head_dim.is_multiple_of(32) || !(n_kv_head as u64 * head_dim as u64).is_multiple_of(64)) {
            return Err(format!(
                "a q8_0 KV cache needs head_dim a multiple of 32 and n_kv_head · head_dim a multiple of 64 (this model: {n_kv_head} kv heads of {head_dim}); use --kv f16"
            ));
        }
        Ok(())
    }

    /// Whether kernels that store two elements at a time can write the cache (f32, f16; q8_0
    /// needs a whole block of 32 for its scale: only rope_kv.wgsl writes it).
    pub fn written_in_pairs(self) -> bool {
        self != KvType::Q8_0
    }

    /// q8_0: the 4-byte word at which `cache`'s scales start, after the int8s of all its rows
    /// of `row` elements (lib/kv.wgsl's `p.kv_scales`); 0 for the float types.
    pub(super) fn scales_word(self, cache: &wgpu::Buffer, row: u32) -> u32 {
        match self {
            KvType::Q8_0 => {
                let rows = cache.size() / self.row_bytes(row as u64).max(1);
                (rows * row as u64 / 4) as u32
            }
            _ => 0,
        }
    }
}

impl std::fmt::Display for KvType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Tokens of different sequences one dispatch takes at most (`Places::PerToken`): the
/// (position, cache row) pairs fill 128 bytes of its parameter slot.
pub const MAX_SEQ_ROWS: usize = 16;

/// Where one token of a multi-sequence step sits: its position in its sequence, and the cache
/// row of that sequence's position 0 (its slot of a cache shared by several sequences).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    pub pos: u32,
    pub kv_row0: u32,
}

/// Where a dispatch's tokens sit in the KV cache: consecutive positions (from the args' pos0)
/// of one sequence whose position 0 is at row `kv_row0`, or each token its own sequence's
/// (SEQ_ROWS: a decode step of several sequences, at most MAX_SEQ_ROWS).
#[derive(Clone, Copy, Debug)]
pub enum Places<'a> {
    Consecutive { kv_row0: u32 },
    PerToken(&'a [Place]),
}

impl Places<'_> {
    /// The kernels' (kv_row0, seqs) parameters and defines.
    pub(super) fn params(&self) -> Result<(u32, [u32; 2 * MAX_SEQ_ROWS], bool), GpuError> {
        let mut seqs = [0u32; 2 * MAX_SEQ_ROWS];
        match self {
            Places::Consecutive { kv_row0 } => Ok((*kv_row0, seqs, false)),
            Places::PerToken(places) => {
                if places.is_empty() || places.len() > MAX_SEQ_ROWS {
                    return Err(GpuError::Unsupported(format!("{} sequences in one step (1..={MAX_SEQ_ROWS})", places.len())));
                }
                for (i, p) in places.iter().enumerate() {
                    seqs[2 * i] = p.pos;
                    seqs[2 * i + 1] = p.kv_row0;
                }
                Ok((0, seqs, true))
            }
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
        kv_row0: u32,
        _pad: u32,
        seqs: [u32; 2 * MAX_SEQ_ROWS],
        /// KV_Q8: the word at which the caches' scales start (`KvType::scales_word`).
        kv_scales: u32,
    }
}

/// rope_kv.wgsl for every cache type, with and without the q/k norms.
pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for kv in KvType::ALL {
        for d in [kv.defines(), kv.defines().flag("ROPE_FACTORS")] {
            for d in [d.clone(), d.flag("SEQ_ROWS")] {
                keys.push(PipelineKey { file: "rope_kv.wgsl", entry: "main", defines: d.clone() });
                keys.push(PipelineKey { file: "rope_kv.wgsl", entry: "main", defines: d.flag("QK_NORM") });
            }
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
        self.rope_kv_at(q, k, v, k_cache, v_cache, n_kv_head, kv, a, norm, factors, Places::Consecutive { kv_row0: 0 }).await
    }

    /// rope_kv_normed with the tokens at `places` in the cache (a.pos0 is read only for
    /// `Places::Consecutive`; `PerToken` takes a.n_tokens places).
    #[allow(clippy::too_many_arguments)]
    pub async fn rope_kv_at(
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
        places: Places<'_>,
    ) -> Result<(), GpuError> {
        let (kv_row0, seqs, per_token) = places.params()?;
        if let Places::PerToken(p) = places {
            if p.len() != a.n_tokens as usize {
                return Err(GpuError::Unsupported(format!("{} places for {} tokens", p.len(), a.n_tokens)));
            }
        }
        supports(Op::Rope { head_dim: a.head_dim, n_rot: a.n_rot }, None)?;
        kv.check_row(n_kv_head, a.head_dim).map_err(GpuError::Unsupported)?;
        let v_pairs = a.n_tokens * n_kv_head * a.head_dim / 2;
        let q_work = match norm {
            // an invocation per q head, or per rotated pair of q
            Some(_) => a.n_tokens * a.n_heads,
            None => a.n_tokens * a.n_heads * (a.n_rot / 2),
        };
        let work = match (kv, norm) {
            // q8_0: then per two blocks (64 elements) of k, then of v
            (KvType::Q8_0, _) => q_work + 2 * (v_pairs / 32),
            // per k head, then per pair of v
            (_, Some(_)) => q_work + a.n_tokens * n_kv_head + v_pairs,
            // per pair of k, then of v
            (_, None) => q_work + 2 * v_pairs,
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
            kv_row0,
            _pad: 0,
            seqs,
            kv_scales: kv.scales_word(k_cache, n_kv_head * a.head_dim),
        };
        let base = if per_token { kv.defines().flag("SEQ_ROWS") } else { kv.defines() };
        let (defines, qw, kw) = match norm {
            Some(n) => (base.flag("QK_NORM"), n.q_weight, n.k_weight),
            // the weight slots unread: k and v, bound read-only anyway
            None => (base, k, v),
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

#[cfg(test)]
mod tests {
    use super::KvType;

    #[test]
    fn kv_types_by_name_size_and_rows() {
        for t in KvType::ALL {
            assert_eq!(KvType::parse(t.name()), Ok(t));
        }
        let err = KvType::parse("q8").unwrap_err();
        assert!(err.contains("\"q8\"") && err.contains("q8_0"), "{err}");
        // SmolLM2's row (3 kv heads of 64): q8_0 is 34 bytes a block of 32, 53% of f16
        assert_eq!((KvType::F32.row_bytes(192), KvType::F16.row_bytes(192), KvType::Q8_0.row_bytes(192)), (768, 384, 204));
        assert!(KvType::Q8_0.check_row(3, 64).is_ok() && KvType::Q8_0.check_row(1, 256).is_ok() && KvType::Q8_0.check_row(2, 32).is_ok());
        // a block straddling heads (48), a scale word shared by two rows (one head of 32)
        assert!(KvType::Q8_0.check_row(4, 48).is_err() && KvType::Q8_0.check_row(1, 32).is_err());
        assert!(KvType::F16.check_row(3, 6).is_ok());
    }
}
