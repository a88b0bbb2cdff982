//! The gradients of causal attention with respect to q, k and v (attention_backward.wgsl):
//! three passes, each split into ranges of keys or queries that fit the device's loop budget.

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

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    ENTRIES.into_iter().map(|entry| PipelineKey { file: "attention_backward.wgsl", entry, defines: Defines::new() }).collect()
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
    /// dq, dk, dv of out = attention(q, k, v) as `a` describes it (an f32 cache).
    pub async fn attention_backward(&mut self, b: &AttentionGrads<'_>, a: AttentionArgs) -> Result<(), GpuError> {
        if a.kv != KvType::F32 || !a.head_dim.is_multiple_of(4) || a.head_dim > super::MAX_HEAD_DIM || a.n_kv_head == 0 || !a.n_head.is_multiple_of(a.n_kv_head) {
            return Err(GpuError::Unsupported(format!("attention's backward pass with head size {} ({:?} keys and values)", a.head_dim, a.kv)));
        }
        let quads = (a.head_dim / 4) as u64;
        let group = (a.n_head / a.n_kv_head) as u64;
        let n_kv = a.pos0 + a.n_q;
        let budget = self.gpu.tuning.loop_budget.unwrap_or(u64::MAX);
        // loop iterations a key (stats, dq) or a query (dkv) costs one invocation
        let per_item = [1 + 2 * quads, 1 + 3 * quads, 1 + group * (1 + 3 * quads)];
        let buffers = [b.q, b.k, b.v, b.dout, b.dq, b.dk, b.dv, b.stats];
        for (entry, cost) in ENTRIES.into_iter().zip(per_item) {
            let (items, invocations) = if entry == "dkv_pass" { (a.n_q, n_kv * a.n_kv_head) } else { (n_kv, a.n_q * a.n_head) };
            let step = (budget / cost).clamp(1, u32::MAX as u64) as u32;
            let (gx, gy) = grid(invocations.div_ceil(64));
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
                self.dispatch(PipelineKey { file: "attention_backward.wgsl", entry, defines: Defines::new() }, &buffers, &params, (gx, gy, 1)).await?;
                begin = end.max(begin + 1);
            }
        }
        Ok(())
    }
}
