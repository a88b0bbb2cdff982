//! Causal attention over the KV cache (attention.wgsl): one workgroup per (head, query), or one
//! of the per-query kernels, chosen by `Recorder::attention_kernel`.

use super::pipeline::Bind::{self, *};
use super::rope_kv::KvType;
use super::tuning::{loop_budget, subgroups_of_8, LLVMPIPE_LOOP_BUDGET};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// attention.wgsl's bindings, in order: q, k, v, out, params.
pub const ATTENTION_LAYOUT: &[Bind] = &[Read, Read, Read, ReadWrite, Uniform];

/// Attention of `n_q` queries at positions `pos0..` in `n_head` heads over the cache's
/// `n_kv_head` heads (of type `kv`), `head_dim` each; `window` 0 for no sliding window.
#[derive(Clone, Copy, Debug)]
pub struct AttentionArgs {
    pub n_q: u32,
    pub n_head: u32,
    pub n_kv_head: u32,
    pub head_dim: u32,
    pub pos0: u32,
    pub window: u32,
    pub scale: f32,
    pub kv: KvType,
}

/// The largest head_dim `attention` takes (the per-query kernels' registers hold that much).
pub const MAX_HEAD_DIM: u32 = 256;

params! {
    /// attention.wgsl's `struct Params`.
    struct AttentionParams {
        n_q: u32,
        n_head: u32,
        n_kv_head: u32,
        head_dim: u32,
        pos0: u32,
        window: u32,
        scale: f32,
        _pad: u32,
    }
}

/// attention.wgsl's kernels (see `Recorder::attention_kernel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// One workgroup per (head, query), its invocations sharing the keys through shared memory.
    PerWorkgroup,
    /// One invocation per (head, query).
    PerQuery,
    /// KV_BROADCAST: 8 queries of a head, each K/V row loaded once for them.
    Broadcast,
    /// HEADS_SHARE_KV: the query heads of a kv head, each K/V row loaded once for them.
    HeadsShareKv,
    /// KEY_LANES: one query's keys split over 8 lanes.
    KeyLanes,
}

/// Invocations per workgroup of the one-query-per-invocation attention: one 256-bit register
/// of f32 lanes on lavapipe.
const QUERY_WG: u32 = 8;

/// Heads up to this size get per-query kernels built for their head_dim (attention.wgsl says
/// why); larger ones share one that reads it from the parameters.
const QUERY_FIXED_HEAD_DIM_MAX: u32 = 64;

fn query_attention_defines(kv: KvType, head_dim: u32) -> Defines {
    let d = kv.defines().flag("QUERY_PER_INVOCATION").value("WG", format!("{QUERY_WG}u"));
    if head_dim <= QUERY_FIXED_HEAD_DIM_MAX {
        d.value("HEAD_DIM", format!("{head_dim}u")).value("HEAD_QUADS", format!("{}u", head_dim / 4))
    } else {
        d.value("HEAD_DIM", "p.head_dim").value("HEAD_QUADS", format!("{}u", MAX_HEAD_DIM / 4))
    }
}

/// attention.wgsl for both cache types: the per-workgroup kernel and every per-query one.
pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for kv in [KvType::F32, KvType::F16] {
        keys.push(PipelineKey { file: "attention.wgsl", entry: "main", defines: kv.defines() });
        // a fixed head size (any multiple of 16, 32 with the broadcast, builds the same way)
        // and the one kernel for larger heads
        for head_dim in [64, 256] {
            keys.push(PipelineKey { file: "attention.wgsl", entry: "main", defines: query_attention_defines(kv, head_dim) });
            keys.push(PipelineKey { file: "attention.wgsl", entry: "main", defines: query_attention_defines(kv, head_dim).flag("KV_BROADCAST") });
            keys.push(PipelineKey { file: "attention.wgsl", entry: "main", defines: query_attention_defines(kv, head_dim).flag("KEY_LANES") });
            keys.push(PipelineKey { file: "attention.wgsl", entry: "main", defines: query_attention_defines(kv, head_dim).flag("KV_BROADCAST").flag("HEADS_SHARE_KV") });
        }
    }
    keys
}

impl Recorder<'_> {
    /// The attention kernel `attention` runs for `a`. The per-query ones on CPU devices (or as
    /// `NOMOAT_ATTENTION=query` / `workgroup` says), where the head fits their loops and the
    /// keys a lane walks fit llvmpipe's loop budget; among them, on subgroups of exactly the
    /// workgroup's 8 lanes, the broadcast for 8 queries or more (prefill), for fewer (decode)
    /// the query heads of a kv head sharing its rows where that leaves two workgroups or
    /// more, otherwise the keys split over lanes (on lavapipe sharing is the faster of the two
    /// with several workgroups, the slower with one). `NOMOAT_ATTENTION_BROADCAST=0`,
    /// `_HEADS_SHARE_KV=0`, `_KEY_LANES=0` turn one off.
    pub fn attention_kernel(&self, a: &AttentionArgs) -> AttentionKernel {
        let o = &self.gpu.overrides;
        let wanted = self.query_per_invocation.or(o.attention_per_query).unwrap_or(self.gpu.info.device_type == wgpu::DeviceType::Cpu);
        if !wanted || !a.head_dim.is_multiple_of(16) {
            return AttentionKernel::PerWorkgroup;
        }
        let sg8 = subgroups_of_8(self.gpu);
        let quads_of_8 = sg8 && a.head_dim.is_multiple_of(32);
        let per_kv = a.n_head / a.n_kv_head;
        // each lane of the key-splitting kernel walks an eighth of the keys, the others all
        let fits = |lanes_per_query: u32| (a.pos0 + a.n_q).div_ceil(lanes_per_query) as u64 * (1 + a.head_dim as u64 / 16) <= LLVMPIPE_LOOP_BUDGET;
        [
            (AttentionKernel::Broadcast, quads_of_8 && a.n_q >= QUERY_WG && o.attention_broadcast != Some(false) && fits(1)),
            (
                AttentionKernel::HeadsShareKv,
                quads_of_8 && a.n_q < QUERY_WG && (2..=QUERY_WG).contains(&per_kv) && a.n_kv_head * a.n_q >= 2 && o.attention_heads_share_kv != Some(false) && fits(1),
            ),
            (AttentionKernel::KeyLanes, sg8 && a.n_q < QUERY_WG && o.attention_key_lanes != Some(false) && fits(QUERY_WG)),
            (AttentionKernel::PerQuery, fits(1)),
        ]
        .into_iter()
        .find_map(|(kernel, usable)| usable.then_some(kernel))
        .unwrap_or(AttentionKernel::PerWorkgroup)
    }

    /// llvmpipe (lavapipe) ends a shader invocation after 65535 loop iterations in all, its
    /// guard against endless loops, and leaves the rest of the output unwritten. The
    /// one-workgroup-per-query attention takes about (head_dim + 4·64 + 16) / 64 of them a key
    /// (its score loop, its 4 x 64 weighted-sum loop and its reductions, per tile of 64 keys;
    /// head_dim 256 gave wrong outputs at 16000 keys and right ones at 4000): past that, on
    /// llvmpipe, attention is refused rather than run.
    fn attention_fits_llvmpipe(&self, a: &AttentionArgs) -> bool {
        let keys = (a.pos0 + a.n_q) as u64;
        keys * (a.head_dim as u64 + 4 * 64 + 16) / 64 <= loop_budget(self.gpu).unwrap_or(u64::MAX)
    }

    /// Causal attention of q: [n_q][n_head][head_dim] over the cache into out.
    pub async fn attention(&mut self, q: &wgpu::Buffer, k: &wgpu::Buffer, v: &wgpu::Buffer, out: &wgpu::Buffer, a: AttentionArgs) -> Result<(), GpuError> {
        if a.head_dim > MAX_HEAD_DIM || !a.head_dim.is_multiple_of(2) || a.n_kv_head == 0 || !a.n_head.is_multiple_of(a.n_kv_head) {
            return Err(GpuError::Unsupported(format!("attention with head_dim {} and {}/{} heads", a.head_dim, a.n_head, a.n_kv_head)));
        }
        let params =
            AttentionParams { n_q: a.n_q, n_head: a.n_head, n_kv_head: a.n_kv_head, head_dim: a.head_dim, pos0: a.pos0, window: a.window, scale: a.scale, _pad: 0 };
        let kernel = self.attention_kernel(&a);
        if kernel == AttentionKernel::PerWorkgroup && !self.attention_fits_llvmpipe(&a) {
            return Err(GpuError::Unsupported(format!(
                "attention over {} keys with head_dim {} on llvmpipe (its shaders stop after 65535 loop iterations): use a smaller context size",
                a.pos0 + a.n_q,
                a.head_dim
            )));
        }
        let per_query = query_attention_defines(a.kv, a.head_dim);
        let (defines, groups) = match kernel {
            AttentionKernel::PerWorkgroup => (a.kv.defines(), (a.n_head, a.n_q, 1)),
            AttentionKernel::PerQuery => {
                let (gx, gy) = grid((a.n_head * a.n_q).div_ceil(QUERY_WG));
                (per_query, (gx, gy, 1))
            }
            AttentionKernel::Broadcast => {
                // each head's queries padded to whole workgroups of 8 (see attention.wgsl)
                let (gx, gy) = grid(a.n_head * a.n_q.div_ceil(QUERY_WG));
                (per_query.flag("KV_BROADCAST"), (gx, gy, 1))
            }
            AttentionKernel::HeadsShareKv => {
                let (gx, gy) = grid(a.n_kv_head * a.n_q);
                (per_query.flag("KV_BROADCAST").flag("HEADS_SHARE_KV"), (gx, gy, 1))
            }
            AttentionKernel::KeyLanes => {
                let (gx, gy) = grid(a.n_head * a.n_q);
                (per_query.flag("KEY_LANES"), (gx, gy, 1))
            }
        };
        self.dispatch(PipelineKey { file: "attention.wgsl", entry: "main", defines }, &[q, k, v, out], &params, groups).await
    }
}
