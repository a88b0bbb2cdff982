//! The optimizer step: AdamW on a parameter buffer in place (adamw.wgsl).

use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::reference::AdamW;
use crate::shaders::Defines;

/// adamw.wgsl's bindings, in order: param, grad, m, v, params.
pub const ADAMW_LAYOUT: &[Bind] = &[ReadWrite, Read, ReadWrite, ReadWrite, Uniform];

params! {
    /// adamw.wgsl's `struct Params`.
    struct AdamWParams {
        n: u32,
        lr: f32,
        beta1: f32,
        beta2: f32,
        eps: f32,
        weight_decay: f32,
        c1: f32,
        c2: f32,
        grad_scale: f32,
        _pad: [u32; 3],
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    vec![PipelineKey { file: "adamw.wgsl", entry: "main", defines: Defines::new() }]
}

impl Recorder<'_> {
    /// One AdamW step `h` on param: [n] with its moments m and v, from grad · grad_scale.
    #[allow(clippy::too_many_arguments)]
    pub async fn adamw(
        &mut self,
        param: &wgpu::Buffer,
        grad: &wgpu::Buffer,
        m: &wgpu::Buffer,
        v: &wgpu::Buffer,
        n: u32,
        h: AdamW,
        grad_scale: f32,
    ) -> Result<(), GpuError> {
        let (gx, gy) = grid(n.div_ceil(64));
        let (c1, c2) = (1.0 - (h.beta1 as f64).powi(h.step as i32), 1.0 - (h.beta2 as f64).powi(h.step as i32));
        let params =
            AdamWParams { n, lr: h.lr, beta1: h.beta1, beta2: h.beta2, eps: h.eps, weight_decay: h.weight_decay, c1: c1 as f32, c2: c2 as f32, grad_scale, _pad: [0; 3] };
        self.dispatch(PipelineKey { file: "adamw.wgsl", entry: "main", defines: Defines::new() }, &[param, grad, m, v], &params, (gx, gy, 1)).await
    }
}
