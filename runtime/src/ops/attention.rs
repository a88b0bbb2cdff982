//! Causal attention over the KV cache: tiles of keys in workgroup memory shared by the query
//! heads and queries of a kv head (attention_tile.wgsl, GPUs' prefill), one workgroup per
//! (head, query) (attention_workgroup.wgsl, GPUs' decode) or one query per invocation
//! (attention_query.wgsl and its subgroup modes, CPU devices), chosen by [`attention_kernel`];
//! each split-K (flash-decoding: chunks of the keys in separate workgroups, merged by
//! attention_merge.wgsl) where [`attention_split`] says.

use super::pipeline::Bind::{self, *};
use super::rope_kv::{KvType, Places, MAX_SEQ_ROWS};
use super::support::{supports, Op, MAX_HEAD_DIM};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;
use crate::tuning::{Tuning, LLVMPIPE_LOOP_BUDGET};

/// Both attention kernels' bindings, in order: q, k, v, out, params.
pub const ATTENTION_LAYOUT: &[Bind] = &[Read, Read, Read, ReadWrite, Uniform];

/// attention_merge.wgsl's bindings: the partials, out, params.
pub const ATTENTION_MERGE_LAYOUT: &[Bind] = &[Read, ReadWrite, Uniform];

/// Invocations per workgroup of attention_merge.wgsl.
const MERGE_WG: u32 = 64;

/// The most chunks split-K cuts a query's keys into.
const MAX_SPLIT: u32 = 64;

/// The most f32s split-K's partial results take (16 MiB; a forced split of a long prompt
/// would otherwise take chunks x queries x heads of them).
const MAX_PARTIALS: u64 = 4 << 20;

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
        n_split: u32,
    }
}

/// The families of attention kernels a device chooses from (`NOMOAT_ATTENTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionFamily {
    /// One query per invocation and its subgroup modes (CPU devices).
    PerQuery,
    /// One workgroup per (head, query).
    PerWorkgroup,
    /// Tiles of keys in workgroup memory for blocks of rows (GPUs), one workgroup per (head,
    /// query) where too few rows would fill a block.
    Tile,
}

/// The attention kernels (see [`attention_kernel`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// One workgroup per (head, query), its invocations sharing the keys through shared memory.
    PerWorkgroup,
    /// Blocks of (query, head) rows of a kv head sharing each tile of keys in workgroup memory.
    Tile,
    /// One invocation per (head, query).
    PerQuery,
    /// KV_BROADCAST: 8 queries of a head, each K/V row loaded once for them.
    Broadcast,
    /// HEADS_SHARE_KV: the query heads of a kv head, each K/V row loaded once for them.
    HeadsShareKv,
    /// KEY_LANES: one query's keys split over 8 lanes.
    KeyLanes,
    /// DIM_LANES: all query heads of a kv head, each row's dimensions split over 8 lanes.
    DimLanes,
}

/// Invocations per workgroup of the one-query-per-invocation attention: one 256-bit register
/// of f32 lanes on lavapipe.
const QUERY_WG: u32 = 8;

/// DIM_LANES for heads of this size or more: for smaller ones its per-key subgroup reduction
/// costs more than the multiplications it spreads over the lanes (lavapipe, SmolLM2's 64: 20%
/// slower than HEADS_SHARE_KV; Gemma 3's 256: 1.5 to 3x faster than KEY_LANES).
const DIM_LANES_MIN_HEAD_DIM: u32 = 128;

/// Heads up to this size get per-query kernels built for their head_dim (attention_query.wgsl says
/// why); larger ones share one that reads it from the parameters.
const QUERY_FIXED_HEAD_DIM_MAX: u32 = 64;

/// attention_tile.wgsl's keys a tile and dimensions a chunk (its constants TILE_KEYS, CHUNK).
const TILE_KEYS: u32 = 16;
const TILE_CHUNK: u32 = 64;

/// attention_tile.wgsl's chunks of 64 dimensions a head takes, and the rows a workgroup
/// holds: its queries (rows x chunks x 64 floats) stay within 8 KiB of workgroup memory, and
/// each invocation's outputs (rows x chunks) within 32 registers.
fn tile_shape(head_dim: u32) -> (u32, u32) {
    let chunks = head_dim.div_ceil(TILE_CHUNK).max(1);
    (chunks, 32 / chunks)
}

/// attention_tile.wgsl's workgroups along the rows: blocks of its rows over a kv head's
/// queries times query heads.
fn tile_blocks(a: &AttentionArgs) -> u32 {
    (a.n_q * (a.n_head / a.n_kv_head.max(1))).div_ceil(tile_shape(a.head_dim).1)
}

fn tile_defines(kv: KvType, head_dim: u32) -> Defines {
    let (chunks, rows) = tile_shape(head_dim);
    kv.defines().value("WG", format!("{TILE_CHUNK}u")).value("HEAD_CHUNKS", format!("{chunks}u")).value("ROWS", format!("{rows}u"))
}

/// DIM_LANES's kernel: built for the head size and the query heads a kv head has (`group`).
fn dim_lanes_defines(kv: KvType, head_dim: u32, group: u32) -> Defines {
    kv.defines()
        .value("WG", format!("{QUERY_WG}u"))
        .value("HEAD_DIM", format!("{head_dim}u"))
        .value("HEAD_QUADS", format!("{}u", head_dim / 4))
        .value("GROUP", format!("{group}u"))
        .flag("DIM_LANES")
}

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
    let mut keys = vec![PipelineKey { file: "attention_merge.wgsl", entry: "main", defines: Defines::default().value("WG", format!("{MERGE_WG}u")) }];
    for kv in KvType::ALL {
        keys.push(PipelineKey { file: "attention_workgroup.wgsl", entry: "main", defines: kv.defines() });
        // a fixed head size (any multiple of 16, 32 with the broadcast, builds the same way)
        // and the one kernel for larger heads
        keys.push(PipelineKey { file: "attention_workgroup.wgsl", entry: "main", defines: kv.defines().flag("SEQ_ROWS") });
        for head_dim in [64, 128, 192, 256] {
            keys.push(PipelineKey { file: "attention_tile.wgsl", entry: "main", defines: tile_defines(kv, head_dim) });
        }
        for head_dim in [64, 256] {
            keys.push(PipelineKey { file: "attention_query.wgsl", entry: "main", defines: query_attention_defines(kv, head_dim).flag("KV_BROADCAST") });
            // every kernel but the broadcast also takes a step of several sequences (SEQ_ROWS)
            for seq_rows in [false, true] {
                let d = if seq_rows { query_attention_defines(kv, head_dim).flag("SEQ_ROWS") } else { query_attention_defines(kv, head_dim) };
                keys.push(PipelineKey { file: "attention_query.wgsl", entry: "main", defines: d.clone() });
                keys.push(PipelineKey { file: "attention_query.wgsl", entry: "main", defines: d.clone().flag("KEY_LANES") });
                keys.push(PipelineKey { file: "attention_query.wgsl", entry: "main", defines: d.flag("KV_BROADCAST").flag("HEADS_SHARE_KV") });
                for group in [1, 3, 4, 8] {
                    let d = dim_lanes_defines(kv, head_dim, group);
                    keys.push(PipelineKey { file: "attention_query.wgsl", entry: "main", defines: if seq_rows { d.flag("SEQ_ROWS") } else { d } });
                }
            }
        }
    }
    // each of them split-K too
    let split: Vec<PipelineKey> = keys.iter().skip(1).map(|k| PipelineKey { defines: k.defines.clone().flag("SPLIT_K"), ..k.clone() }).collect();
    keys.extend(split);
    keys
}

/// The attention kernel for `a` on a device tuned as `t` (`family` forces the family, and a
/// forced Tile takes even the rows that fill a fraction of its blocks). On GPUs, the tiles
/// where the queries are consecutive positions of one sequence and fill half a block or more
/// (prefill), else one workgroup per (head, query), each also where the loop budget stops the
/// other. The per-query ones on CPU devices,
/// where the head fits their loops and the keys a lane walks fit llvmpipe's loop budget; among
/// them, on subgroups of exactly the workgroup's 8 lanes, the broadcast for 8 queries or more
/// (prefill), for fewer (decode) with heads of 128 or more the dimensions split over lanes
/// (DIM_LANES), else the query heads of a kv head sharing its rows where that leaves two
/// workgroups or more (split-K's chunks counted, `split` forcing them as in
/// [`attention_split`]), otherwise the keys split over lanes (on lavapipe sharing is the
/// faster of the two with several workgroups, the slower with one).
pub(super) fn attention_kernel(t: &Tuning, a: &AttentionArgs, family: Option<AttentionFamily>, split: Option<u32>) -> AttentionKernel {
    attention_kernel_for(t, a, family, split, true)
}

/// `attention_kernel`, where `shared_keys` says whether the queries are consecutive positions
/// of one sequence (the broadcast shares their keys; a step of several sequences cannot).
fn attention_kernel_for(t: &Tuning, a: &AttentionArgs, family: Option<AttentionFamily>, split: Option<u32>, shared_keys: bool) -> AttentionKernel {
    match family.unwrap_or(t.attention) {
        AttentionFamily::PerWorkgroup => return AttentionKernel::PerWorkgroup,
        AttentionFamily::Tile => {
            let kernel = AttentionKernel::Tile;
            let fills = family.is_some() || 2 * a.n_q * (a.n_head / a.n_kv_head.max(1)) >= tile_shape(a.head_dim).1;
            let fits = attention_within_loop_budget(t, a, kernel, attention_split(t, a, kernel, split)) && tile_blocks(a) <= u16::MAX as u32;
            return if shared_keys && fills && fits { kernel } else { AttentionKernel::PerWorkgroup };
        }
        AttentionFamily::PerQuery if !a.head_dim.is_multiple_of(16) => return AttentionKernel::PerWorkgroup,
        AttentionFamily::PerQuery => {}
    }
    let quads_of_8 = t.subgroups_of_8 && a.head_dim.is_multiple_of(32);
    let per_kv = a.n_head / a.n_kv_head;
    let fits = |kernel| per_query_fits(a, kernel, attention_split(t, a, kernel, split), LLVMPIPE_LOOP_BUDGET);
    let share_groups = a.n_kv_head * a.n_q * attention_split(t, a, AttentionKernel::HeadsShareKv, split);
    [
        (AttentionKernel::Broadcast, quads_of_8 && shared_keys && a.n_q >= QUERY_WG && t.attention_broadcast),
        (AttentionKernel::DimLanes, quads_of_8 && a.n_q < QUERY_WG && a.head_dim >= DIM_LANES_MIN_HEAD_DIM && (1..=QUERY_WG).contains(&per_kv) && t.attention_dim_lanes),
        (AttentionKernel::HeadsShareKv, quads_of_8 && a.n_q < QUERY_WG && (2..=QUERY_WG).contains(&per_kv) && share_groups >= 2 && t.attention_heads_share_kv),
        (AttentionKernel::KeyLanes, t.subgroups_of_8 && a.n_q < QUERY_WG && t.attention_key_lanes),
        (AttentionKernel::PerQuery, true),
    ]
    .into_iter()
    .find_map(|(kernel, usable)| (usable && fits(kernel)).then_some(kernel))
    .unwrap_or(AttentionKernel::PerWorkgroup)
}

/// Whether a per-query kernel's lanes stay within `budget` loop iterations: each walks all the
/// keys of its chunk (one of `n_split`; an eighth of them with KEY_LANES), 1 + head_dim / 16
/// iterations a key where the head size is fixed (its loops unroll), and where it is a
/// parameter (heads over 64) those of its two loops over the head, of 16 elements a step (32
/// with the 8-lane broadcast): 1 + head_dim / 8 (head_dim 256 gave wrong outputs at 3,401 keys
/// by the first count).
fn per_query_fits(a: &AttentionArgs, kernel: AttentionKernel, n_split: u32, budget: u64) -> bool {
    let lanes_per_query = if kernel == AttentionKernel::KeyLanes { QUERY_WG } else { 1 };
    let per_key = match kernel {
        _ if a.head_dim <= QUERY_FIXED_HEAD_DIM_MAX || kernel == AttentionKernel::DimLanes => 1 + a.head_dim / 16,
        AttentionKernel::Broadcast | AttentionKernel::HeadsShareKv => 1 + a.head_dim / 16,
        _ => 1 + a.head_dim / 8,
    };
    chunk_keys(a.pos0 + a.n_q, n_split).div_ceil(lanes_per_query) as u64 * per_key as u64 <= budget
}

/// The most keys one of `n_split` chunks of `keys` holds (lib/attention.wgsl's split_keys:
/// equal chunks, rounded up to a multiple of 8).
fn chunk_keys(keys: u32, n_split: u32) -> u32 {
    if n_split <= 1 {
        keys
    } else {
        keys.div_ceil(n_split).next_multiple_of(8).min(keys)
    }
}

/// Workgroups `kernel` dispatches for `a` without a split.
fn kernel_groups(a: &AttentionArgs, kernel: AttentionKernel) -> u32 {
    match kernel {
        AttentionKernel::PerWorkgroup | AttentionKernel::KeyLanes => a.n_head * a.n_q,
        AttentionKernel::Tile => a.n_kv_head * tile_blocks(a),
        AttentionKernel::PerQuery => (a.n_head * a.n_q).div_ceil(QUERY_WG),
        AttentionKernel::Broadcast => a.n_head * a.n_q.div_ceil(QUERY_WG),
        AttentionKernel::HeadsShareKv | AttentionKernel::DimLanes => a.n_kv_head * a.n_q,
    }
}

/// The chunks split-K cuts each query's keys into for `kernel` on a device tuned as `t`
/// (`force`: Some(n) n chunks, None the device's choice): 1 (no split) where the dispatch has
/// `t.attention_split.groups` workgroups or more, else enough chunks to have them, each of
/// `t.attention_split.keys` keys at least (of the keys a query sees: its window's at most);
/// never more than one per 8 keys, MAX_SPLIT, or what keeps the partials within MAX_PARTIALS.
pub(super) fn attention_split(t: &Tuning, a: &AttentionArgs, kernel: AttentionKernel, force: Option<u32>) -> u32 {
    let mut keys = a.pos0 + a.n_q;
    if a.window > 0 {
        // a query's window, and for several queries of a workgroup (the broadcast) theirs
        keys = keys.min(a.window + a.n_q.min(QUERY_WG));
    }
    // and the partials within MAX_PARTIALS floats
    let partial_rows = (a.n_q * a.n_head) as u64 * (a.head_dim as u64 + 2);
    let most = (keys / 8).min((MAX_PARTIALS / partial_rows.max(1)) as u32).clamp(1, MAX_SPLIT);
    if let Some(n) = force {
        return n.clamp(1, most);
    }
    let s = t.attention_split;
    let groups = kernel_groups(a, kernel).max(1);
    if groups >= s.groups || s.keys == 0 {
        return 1;
    }
    s.groups.div_ceil(groups).min(keys / s.keys).clamp(1, most)
}

/// Whether `kernel` runs `a` within the device's loop budget (llvmpipe ends an invocation
/// after 65,535 loop iterations and leaves the rest of its output unwritten). The
/// one-workgroup-per-query kernel takes about (head_dim + 4·64 + 16) / 64 of them a key (its
/// score loop, its 4 x 64 weighted-sum loop and its reductions, per tile of 64 keys; head_dim
/// 256 gave wrong outputs at 16,000 keys and right ones at 4,000).
/// The tiled kernel, per tile of 16 keys: for each chunk of the head, 16 loads and its scores'
/// 64-long loops, then the rows' softmax (3 x 16) and for each chunk 16 loads and each row's
/// 16-long loop (counted from the shader as if no loop unrolled: an over-count, checked
/// against lavapipe's real limit in docs/architecture.md).
/// `n_split`: the chunks of a split-K dispatch, each walking its own part of the keys.
pub(super) fn attention_within_loop_budget(t: &Tuning, a: &AttentionArgs, kernel: AttentionKernel, n_split: u32) -> bool {
    let Some(budget) = t.loop_budget else { return true };
    match kernel {
        AttentionKernel::PerWorkgroup => chunk_keys(a.pos0 + a.n_q, n_split) as u64 * (a.head_dim as u64 + 4 * 64 + 16) / 64 <= budget,
        AttentionKernel::Tile => {
            let (chunks, rows) = tile_shape(a.head_dim);
            let scores = (rows * TILE_KEYS).div_ceil(TILE_CHUNK);
            let per_tile = chunks * (TILE_KEYS + scores * (TILE_CHUNK + 1)) + 2 * scores + 3 * TILE_KEYS + chunks * (TILE_KEYS + rows * (TILE_KEYS + 1)) + 1;
            chunk_keys(a.pos0 + a.n_q, n_split).div_ceil(TILE_KEYS) as u64 * per_tile as u64 <= budget
        }
        _ => per_query_fits(a, kernel, n_split, budget),
    }
}

impl Recorder<'_> {
    /// The attention kernel `attention` runs for `a` (see [`attention_kernel`]);
    /// `NOMOAT_ATTENTION=query` / `workgroup` / `tile`, `NOMOAT_ATTENTION_BROADCAST=0`,
    /// `_HEADS_SHARE_KV=0`, `_KEY_LANES=0` steer it through the device's tuning.
    pub fn attention_kernel(&self, a: &AttentionArgs) -> AttentionKernel {
        attention_kernel(&self.gpu.tuning, a, self.attention_family, self.split_k)
    }

    /// The chunks `attention` cuts each query's keys into for `a` (1: no split; see
    /// [`attention_split`]); `NOMOAT_ATTENTION_SPLIT=0` / `1` or `split_k` steer it.
    pub fn attention_split(&self, a: &AttentionArgs) -> u32 {
        attention_split(&self.gpu.tuning, a, self.attention_kernel(a), self.split_k)
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
        let kernel = attention_kernel_for(&self.gpu.tuning, &a_keys, self.attention_family, self.split_k, !per_token);
        let n_split = attention_split(&self.gpu.tuning, &a_keys, kernel, self.split_k);
        let keys = a_keys.pos0 + a_keys.n_q;
        let op = Op::Attention { kv: a.kv, head_dim: a.head_dim, n_head: a.n_head, n_kv_head: a.n_kv_head, keys, kernel: Some((kernel, n_split)) };
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
            n_split,
        };
        let seq_rows = |d: Defines| {
            let d = if per_token { d.flag("SEQ_ROWS") } else { d };
            if n_split > 1 {
                d.flag("SPLIT_K")
            } else {
                d
            }
        };
        let per_query = seq_rows(query_attention_defines(a.kv, a.head_dim));
        let (defines, groups) = match kernel {
            AttentionKernel::PerWorkgroup => (seq_rows(a.kv.defines()), (a.n_head, a.n_q, 1)),
            // consecutive places only (attention_kernel_for)
            AttentionKernel::Tile => (seq_rows(tile_defines(a.kv, a.head_dim)), (tile_blocks(&a), a.n_kv_head, 1)),
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
            AttentionKernel::DimLanes => {
                let (gx, gy) = grid(a.n_kv_head * a.n_q);
                (seq_rows(dim_lanes_defines(a.kv, a.head_dim, a.n_head / a.n_kv_head)), (gx, gy, 1))
            }
        };
        let file = match kernel {
            AttentionKernel::PerWorkgroup => "attention_workgroup.wgsl",
            AttentionKernel::Tile => "attention_tile.wgsl",
            _ => "attention_query.wgsl",
        };
        if n_split <= 1 {
            return self.dispatch(PipelineKey { file, entry: "main", defines }, &[q, k, v, out], &params, groups).await;
        }
        // split-K: each chunk's partial into the partials buffer, then their merge into out
        let rows = (a.n_q * a.n_head) as u64;
        let partials = self.attention_partials(4 * n_split as u64 * rows * (a.head_dim as u64 + 2)).await?;
        self.dispatch(PipelineKey { file, entry: "main", defines }, &[q, k, v, &partials], &params, (groups.0, groups.1, n_split)).await?;
        let (gx, gy) = grid((rows as u32 * a.head_dim).div_ceil(MERGE_WG));
        let merge = PipelineKey { file: "attention_merge.wgsl", entry: "main", defines: Defines::default().value("WG", format!("{MERGE_WG}u")) };
        self.dispatch(merge, &[&partials, out], &params, (gx, gy, 1)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shaders::Variant;
    use crate::tuning::{tests::adapter, KernelOverrides};

    /// GPUs: the tiles for a prompt's block of queries, one workgroup per (head, query) for a
    /// decode step, a step of several sequences and rows too few to fill half a block unless
    /// forced; lavapipe: a forced tile past the loop budget falls back.
    #[test]
    fn tiles_for_prefill_on_gpus() {
        let sg = Variant { f16: true, subgroups: true, web: false };
        let gpu = Tuning::for_device(&adapter("NVIDIA H100", wgpu::DeviceType::DiscreteGpu, 32), sg, &KernelOverrides::default());
        let smol = |n_q, pos0| AttentionArgs { n_q, n_head: 9, n_kv_head: 3, head_dim: 64, pos0, window: 0, scale: 0.125, kv: KvType::F16 };
        assert_eq!(attention_kernel(&gpu, &smol(32, 0), None, None), AttentionKernel::Tile);
        assert_eq!(tile_blocks(&smol(32, 0)), 3);
        assert_eq!(attention_kernel(&gpu, &smol(1, 4000), None, None), AttentionKernel::PerWorkgroup);
        assert_eq!(attention_kernel(&gpu, &smol(1, 4000), Some(AttentionFamily::Tile), None), AttentionKernel::Tile);
        assert_eq!(attention_kernel_for(&gpu, &smol(32, 0), None, None, false), AttentionKernel::PerWorkgroup);
        // Gemma 3's heads of 256: 8 rows a block, 4 query heads a kv head
        let gemma = |n_q| AttentionArgs { n_q, n_head: 4, n_kv_head: 1, head_dim: 256, pos0: 0, window: 0, scale: 0.0625, kv: KvType::F32 };
        assert_eq!(tile_shape(256), (4, 8));
        assert_eq!(attention_kernel(&gpu, &gemma(1), None, None), AttentionKernel::Tile);
        assert_eq!(tile_blocks(&gemma(5)), 3);
        let lavapipe = Tuning::for_device(&adapter("llvmpipe (LLVM 15.0.6, 256 bits)", wgpu::DeviceType::Cpu, 8), sg, &KernelOverrides::default());
        assert_eq!(attention_kernel(&lavapipe, &smol(32, 0), None, None), AttentionKernel::Broadcast);
        assert_eq!(attention_kernel(&lavapipe, &smol(32, 0), Some(AttentionFamily::Tile), Some(1)), AttentionKernel::Tile);
        assert_eq!(attention_kernel(&lavapipe, &smol(32, 4000), Some(AttentionFamily::Tile), Some(1)), AttentionKernel::PerWorkgroup);
    }
}
