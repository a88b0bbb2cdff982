//! The gradients of causal attention with respect to q, k and v (attention_backward.wgsl):
//! three passes, each split into ranges of keys or queries that fit the device's loop budget,
//! by blocks of queries (keys) that walk the keys (queries) together where the head size allows.

use super::attention::AttentionArgs;
use super::pipeline::Bind::{self, *};
use super::rope_kv::KvType;
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// attention_backward.wgsl's bindings, in order: q, k, v, dout, dq, dk, dv, stats, params.
pub const ATTENTION_BACKWARD_LAYOUT: &[Bind] = &[Read, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite, ReadWrite, Uniform];

params! {
    /// attention_backward.wgsl's `struct Params`.
    struct AttentionBackwardParams {
        n_q: u32,
        n_head: u32,
        n_kv_head: u32,
        head_dim: u32,
        pos0: u32,
        window: u32,
        scale: f32,
        first: u32,
        begin: u32,
        end: u32,
        _pad: [u32; 2],
    }
}

const ENTRIES: [&str; 3] = ["stats_pass", "dq_pass", "dkv_pass"];

/// The backward pass's kernels ([`Recorder::attention_backward_kernel`] picks one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionBackwardKernel {
    /// One invocation per (query, head) or (key, kv head), any head size.
    Scalar,
    /// BLOCKED: a workgroup per block of queries (keys), the rows it walks shared through
    /// workgroup memory a tile at a time.
    Tiled,
    /// BLOCKED with ROW_BROADCAST: 8-lane subgroups hand each walked row to all lanes.
    Broadcast,
}

/// BLOCKED for heads up to this size: it builds a kernel per head size with rows unrolled into
/// registers, and llvmpipe took minutes to compile one for 256.
const BLOCKED_MAX_HEAD_DIM: u32 = 64;

/// Lanes of a BLOCKED workgroup (queries or keys of a block): 8 on CPU devices (one 256-bit
/// register of lanes, and ROW_BROADCAST's subgroup), 32 on GPUs (not measured: no GPU here).
fn blocked_wg(cpu: bool) -> u32 {
    if cpu {
        8
    } else {
        32
    }
}

/// Rows of a Tiled walk held in workgroup memory at once: up to one per lane, two rows of
/// head_dim floats and a row's statistics each, within `storage` bytes.
fn blocked_tile(wg: u32, head_dim: u32, storage: u32) -> u32 {
    let per_row = 2 * head_dim * 4 + 8;
    let mut tile = wg;
    while tile > 1 && tile * per_row > storage {
        tile /= 2;
    }
    tile
}

fn blocked_defines(head_dim: u32, wg: u32, tile: u32, broadcast: bool) -> Defines {
    let d = Defines::new().flag("BLOCKED").value("HEAD_DIM", format!("{head_dim}u")).value("WG", format!("{wg}u")).value("TILE", format!("{tile}u"));
    if broadcast {
        d.flag("ROW_BROADCAST")
    } else {
        d
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    let mut defines = vec![Defines::new()];
    for head_dim in [32, BLOCKED_MAX_HEAD_DIM] {
        defines.push(blocked_defines(head_dim, 8, 8, false));
        defines.push(blocked_defines(head_dim, 8, 8, true));
        defines.push(blocked_defines(head_dim, 32, blocked_tile(32, head_dim, 16384), false));
    }
    defines.iter().flat_map(|d| ENTRIES.into_iter().map(|entry| PipelineKey { file: "attention_backward.wgsl", entry, defines: d.clone() })).collect()
}

/// The buffers of one attention's backward pass. q, dout, dq: [n_q][n_head][head_dim];
/// k, v, dk, dv: [pos0 + n_q][n_kv_head][head_dim] (f32); stats: [n_q][n_head][4] scratch.
pub struct AttentionGrads<'a> {
    pub q: &'a wgpu::Buffer,
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub dout: &'a wgpu::Buffer,
    pub dq: &'a wgpu::Buffer,
    pub dk: &'a wgpu::Buffer,
    pub dv: &'a wgpu::Buffer,
    pub stats: &'a wgpu::Buffer,
}

impl Recorder<'_> {
    /// The kernel the backward pass of `a` takes: `self.attention_backward_mode` where set (and
    /// possible), else BLOCKED for heads up to BLOCKED_MAX_HEAD_DIM (multiples of 16),
    /// broadcast on 8-lane subgroups for heads of a multiple of 32.
    pub fn attention_backward_kernel(&self, a: &AttentionArgs) -> AttentionBackwardKernel {
        let t = &self.gpu.tuning;
        let broadcast = t.subgroups_of_8 && a.head_dim.is_multiple_of(32);
        let default = match (t.attention_backward_blocked, broadcast && t.attention_backward_broadcast) {
            (false, _) => AttentionBackwardKernel::Scalar,
            (true, true) => AttentionBackwardKernel::Broadcast,
            (true, false) => AttentionBackwardKernel::Tiled,
        };
        match self.attention_backward_mode.unwrap_or(default) {
            // BLOCKED's row loops take 4 quads a step
            _ if a.head_dim > BLOCKED_MAX_HEAD_DIM || !a.head_dim.is_multiple_of(16) => AttentionBackwardKernel::Scalar,
            AttentionBackwardKernel::Broadcast if !broadcast => AttentionBackwardKernel::Tiled,
            kernel => kernel,
        }
    }

    /// dq, dk, dv of out = attention(q, k, v) as `a` describes it (an f32 cache).
    pub async fn attention_backward(&mut self, b: &AttentionGrads<'_>, a: AttentionArgs) -> Result<(), GpuError> {
        if a.kv != KvType::F32 || !a.head_dim.is_multiple_of(4) || a.head_dim > super::MAX_HEAD_DIM || a.n_kv_head == 0 || !a.n_head.is_multiple_of(a.n_kv_head) {
            return Err(GpuError::Unsupported(format!("attention's backward pass with head size {} ({:?} keys and values)", a.head_dim, a.kv)));
        }
        let quads = (a.head_dim / 4) as u64;
        let group = (a.n_head / a.n_kv_head) as u64;
        let n_kv = a.pos0 + a.n_q;
        let budget = self.gpu.tuning.loop_budget.unwrap_or(u64::MAX);
        let kernel = self.attention_backward_kernel(&a);
        let (defines, wg, per_item) = match kernel {
            // loop iterations a key (stats, dq) or a query (dkv) costs one invocation
            AttentionBackwardKernel::Scalar => (Defines::new(), 64, [1 + 2 * quads, 1 + 3 * quads, 1 + group * (1 + 3 * quads)]),
            _ => {
                let wg = blocked_wg(self.gpu.tuning.cpu);
                let tile = blocked_tile(wg, a.head_dim, self.gpu.limits.max_compute_workgroup_storage_size);
                // a walked row's loops (its loads, two dot products, up to two updates, and a
                // tile's loads) as if none unrolled
                let per_row = 1 + 5 * quads;
                (blocked_defines(a.head_dim, wg, tile, kernel == AttentionBackwardKernel::Broadcast), wg, [per_row, per_row, group * per_row])
            }
        };
        let buffers = [b.q, b.k, b.v, b.dout, b.dq, b.dk, b.dv, b.stats];
        for (entry, cost) in ENTRIES.into_iter().zip(per_item) {
            let (items, groups) = match (kernel, entry) {
                (AttentionBackwardKernel::Scalar, "dkv_pass") => (a.n_q, (n_kv * a.n_kv_head).div_ceil(wg)),
                (AttentionBackwardKernel::Scalar, _) => (n_kv, (a.n_q * a.n_head).div_ceil(wg)),
                // a workgroup per block of wg keys of a kv head, or of wg queries of a head
                (_, "dkv_pass") => (a.n_q, n_kv.div_ceil(wg) * a.n_kv_head),
                _ => (n_kv, a.n_q.div_ceil(wg) * a.n_head),
            };
            let step = (budget / cost).clamp(1, u32::MAX as u64) as u32;
            let (gx, gy) = grid(groups);
            let mut begin = 0;
            while begin < items.max(1) {
                let end = begin.saturating_add(step).min(items);
                let params = AttentionBackwardParams {
                    n_q: a.n_q,
                    n_head: a.n_head,
                    n_kv_head: a.n_kv_head,
                    head_dim: a.head_dim,
                    pos0: a.pos0,
                    window: a.window,
                    scale: a.scale,
                    first: (begin == 0) as u32,
                    begin,
                    end,
                    _pad: [0; 2],
                };
                self.dispatch(PipelineKey { file: "attention_backward.wgsl", entry, defines: defines.clone() }, &buffers, &params, (gx, gy, 1)).await?;
                begin = end.max(begin + 1);
            }
        }
        Ok(())
    }
}
