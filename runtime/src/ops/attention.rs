//! Causal attention over the KV cache: one workgroup per (head, query) (attention_workgroup.wgsl,
//! GPUs) or one query per invocation (attention_query.wgsl and its subgroup modes, CPU devices),
//! chosen by [`attention_kernel`].

use super::pipeline::Bind::{self, *};
use super::rope_kv::{KvType, Places, MAX_SEQ_ROWS};
use super::support::{supports, Op, MAX_HEAD_DIM};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;
use crate::tuning::{Tuning, LLVMPIPE_LOOP_BUDGET};

/// Both attention kernels' bindings, in order: q, k, v, out, params.
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

params! {
    /// lib/attention.wgsl's `struct Params`.
    struct AttentionParams {
        n_q: u32,
        n_head: u32,
        n_kv_head: u32,
        head_dim: u32,
        pos0: u32,
        window: u32,
        scale: f32,
        kv_row0: u32,
        seqs: [u32; 2 * MAX_SEQ_ROWS],
        kv_scales: u32,
    }
}

/// The attention kernels (see [`attention_kernel`]).
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

/// Heads up to this size get per-query kernels built for their head_dim (attention_query.wgsl says
/// why); larger ones share one that reads it from the parameters.
const QUERY_FIXED_HEAD_DIM_MAX: u32 = 64;

fn query_attention_defines(kv: KvType, head_dim: u32) -> Defines {
    let d = kv.defines().value("WG", format!("{QUERY_WG}u"));
    if head_dim <= QUERY_FIXED_HEAD_DIM_MAX {
        d.value("HEAD_DIM", format!("{head_dim}u")).value("HEAD_QUADS", format!("{}u", head_dim / 4))
    } else {
        d.value("HEAD_DIM", "p.head_dim").value("HEAD_QUADS", format!("{}u", MAX_HEAD_DIM / 4))
    }
}

/// Both attention kernels for every cache type: the per-workgroup kernel and every per-query mode.
pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for kv in KvType::ALL {
        keys.push(PipelineKey { file: "attention_workgroup.wgsl", entry: "main", defines: kv.defines() });
        // a fixed head size (any multiple of 16, 32 with the broadcast, builds the same way)
        // and the one kernel for larger heads
        keys.push(PipelineKey { file: "attention_workgroup.wgsl", entry: "main", defines: kv.defines().flag("SEQ_ROWS") });
        for head_dim in [64, 256] {
            keys.push(PipelineKey { file: "attention_query.wgsl", entry: "main", defines: query_attention_defines(kv, head_dim).flag("KV_BROADCAST") });
            // every kernel but the broadcast also takes a step of several sequences (SEQ_ROWS)
            for seq_rows in [false, true] {
                let d = if seq_rows { query_attention_defines(kv, head_dim).flag("SEQ_ROWS") } else { query_attention_defines(kv, head_dim) };
                keys.push(PipelineKey { file: "attention_query.wgsl", entry: "main", defines: d.clone() });
                keys.push(PipelineKey { file: "attention_query.wgsl", entry: "main", defines: d.clone().flag("KEY_LANES") });
                keys.push(PipelineKey { file: "attention_query.wgsl", entry: "main", defines: d.flag("KV_BROADCAST").flag("HEADS_SHARE_KV") });
            }
        }
    }
    keys
}

/// The attention kernel for `a` on a device tuned as `t` (`per_query` forces the choice
/// between the per-query kernels and the per-workgroup one). The per-query ones on CPU devices,
/// where the head fits their loops and the keys a lane walks fit llvmpipe's loop budget; among
/// them, on subgroups of exactly the workgroup's 8 lanes, the broadcast for 8 queries or more
/// (prefill), for fewer (decode) the query heads of a kv head sharing its rows where that
/// leaves two workgroups or more, otherwise the keys split over lanes (on lavapipe sharing is
/// the faster of the two with several workgroups, the slower with one).
pub(super) fn attention_kernel(t: &Tuning, a: &AttentionArgs, per_query: Option<bool>) -> AttentionKernel {
    attention_kernel_for(t, a, per_query, true)
}

/// `attention_kernel`, where `shared_keys` says whether the queries are consecutive positions
/// of one sequence (the broadcast shares their keys; a step of several sequences cannot).
fn attention_kernel_for(t: &Tuning, a: &AttentionArgs, per_query: Option<bool>, shared_keys: bool) -> AttentionKernel {
    if !per_query.unwrap_or(t.attention_per_query) || !a.head_dim.is_multiple_of(16) {
        return AttentionKernel::PerWorkgroup;
    }
    let quads_of_8 = t.subgroups_of_8 && a.head_dim.is_multiple_of(32);
    let per_kv = a.n_head / a.n_kv_head;
    let fits = |kernel| per_query_fits(a, kernel, LLVMPIPE_LOOP_BUDGET);
    [
        (AttentionKernel::Broadcast, quads_of_8 && shared_keys && a.n_q >= QUERY_WG && t.attention_broadcast),
        (AttentionKernel::HeadsShareKv, quads_of_8 && a.n_q < QUERY_WG && (2..=QUERY_WG).contains(&per_kv) && a.n_kv_head * a.n_q >= 2 && t.attention_heads_share_kv),
        (AttentionKernel::KeyLanes, t.subgroups_of_8 && a.n_q < QUERY_WG && t.attention_key_lanes),
        (AttentionKernel::PerQuery, true),
    ]
    .into_iter()
    .find_map(|(kernel, usable)| (usable && fits(kernel)).then_some(kernel))
    .unwrap_or(AttentionKernel::PerWorkgroup)
}

/// Whether a per-query kernel's lanes stay within `budget` loop iterations: each walks all the
/// keys (an eighth of them with KEY_LANES), 1 + head_dim / 16 iterations a key.
fn per_query_fits(a: &AttentionArgs, kernel: AttentionKernel, budget: u64) -> bool {
    let lanes_per_query = if kernel == AttentionKernel::KeyLanes { QUERY_WG } else { 1 };
    (a.pos0 + a.n_q).div_ceil(lanes_per_query) as u64 * (1 + a.head_dim as u64 / 16) <= budget
}

/// Whether `kernel` runs `a` within the device's loop budget (llvmpipe ends an invocation
/// after 65,535 loop iterations and leaves the rest of its output unwritten). The
/// one-workgroup-per-query kernel takes about (head_dim + 4·64 + 16) / 64 of them a key (its
/// score loop, its 4 x 64 weighted-sum loop and its reductions, per tile of 64 keys; head_dim
/// 256 gave wrong outputs at 16,000 keys and right ones at 4,000).
pub(super) fn attention_within_loop_budget(t: &Tuning, a: &AttentionArgs, kernel: AttentionKernel) -> bool {
    let Some(budget) = t.loop_budget else { return true };
    match kernel {
        AttentionKernel::PerWorkgroup => (a.pos0 + a.n_q) as u64 * (a.head_dim as u64 + 4 * 64 + 16) / 64 <= budget,
        _ => per_query_fits(a, kernel, budget),
    }
}

impl Recorder<'_> {
    /// The attention kernel `attention` runs for `a` (see [`attention_kernel`]);
    /// `NOMOAT_ATTENTION=query` / `workgroup`, `NOMOAT_ATTENTION_BROADCAST=0`,
    /// `_HEADS_SHARE_KV=0`, `_KEY_LANES=0` steer it through the device's tuning.
    pub fn attention_kernel(&self, a: &AttentionArgs) -> AttentionKernel {
        attention_kernel(&self.gpu.tuning, a, self.query_per_invocation)
    }

    /// Causal attention of q: [n_q][n_head][head_dim] over the cache into out.
    pub async fn attention(&mut self, q: &wgpu::Buffer, k: &wgpu::Buffer, v: &wgpu::Buffer, out: &wgpu::Buffer, a: AttentionArgs) -> Result<(), GpuError> {
        self.attention_at(q, k, v, out, a, Places::Consecutive { kv_row0: 0 }).await
    }

    /// `attention` with the queries at `places` in the cache (a.pos0 is read only for
    /// `Places::Consecutive`; `PerToken` takes a.n_q places).
    pub async fn attention_at(
        &mut self,
        q: &wgpu::Buffer,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        out: &wgpu::Buffer,
        a: AttentionArgs,
        places: Places<'_>,
    ) -> Result<(), GpuError> {
        let (kv_row0, seqs, per_token) = places.params()?;
        // the kernel's choice and the loop budget go by the most keys a query sees
        let a_keys = match places {
            Places::Consecutive { .. } => a,
            Places::PerToken(p) => {
                if p.len() != a.n_q as usize {
                    return Err(GpuError::Unsupported(format!("{} places for {} queries", p.len(), a.n_q)));
                }
                let most = p.iter().map(|p| p.pos + 1).max().unwrap_or(1);
                AttentionArgs { pos0: most.saturating_sub(a.n_q), ..a }
            }
        };
        let kernel = attention_kernel_for(&self.gpu.tuning, &a_keys, self.query_per_invocation, !per_token);
        let keys = a_keys.pos0 + a_keys.n_q;
        let op = Op::Attention { kv: a.kv, head_dim: a.head_dim, n_head: a.n_head, n_kv_head: a.n_kv_head, keys, kernel: Some(kernel) };
        supports(op, Some(self.gpu))?;
        let params = AttentionParams {
            n_q: a.n_q,
            n_head: a.n_head,
            n_kv_head: a.n_kv_head,
            head_dim: a.head_dim,
            pos0: a.pos0,
            window: a.window,
            scale: a.scale,
            kv_row0,
            seqs,
            kv_scales: a.kv.scales_word(k, a.n_kv_head * a.head_dim),
        };
        let seq_rows = |d: Defines| if per_token { d.flag("SEQ_ROWS") } else { d };
        let per_query = seq_rows(query_attention_defines(a.kv, a.head_dim));
        let (defines, groups) = match kernel {
            AttentionKernel::PerWorkgroup => (seq_rows(a.kv.defines()), (a.n_head, a.n_q, 1)),
            AttentionKernel::PerQuery => {
                let (gx, gy) = grid((a.n_head * a.n_q).div_ceil(QUERY_WG));
                (per_query, (gx, gy, 1))
            }
            AttentionKernel::Broadcast => {
                // each head's queries padded to whole workgroups of 8 (see attention_query.wgsl)
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
        let file = if kernel == AttentionKernel::PerWorkgroup { "attention_workgroup.wgsl" } else { "attention_query.wgsl" };
        self.dispatch(PipelineKey { file, entry: "main", defines }, &[q, k, v, out], &params, groups).await
    }
}
