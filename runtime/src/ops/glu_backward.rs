//! The gradients of the gated activations silu(gate)·up and gelu(gate)·up (glu_backward.wgsl).

use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// glu_backward.wgsl's bindings, in order: gate, up, d_act, d_gate, d_up, params.
pub const GLU_BACKWARD_LAYOUT: &[Bind] = &[Read, Read, Read, ReadWrite, ReadWrite, Uniform];

params! {
    /// glu_backward.wgsl's `struct Params`.
    struct GluBackwardParams {
        n: u32,
        _pad: [u32; 3],
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    [Defines::new(), Defines::new().flag("GELU")].into_iter().map(|defines| PipelineKey { file: "glu_backward.wgsl", entry: "main", defines }).collect()
}

impl Recorder<'_> {
    /// d_gate, d_up of act = f(gate)·up (f: SiLU, or tanh-GELU with `gelu`), all [n].
    #[allow(clippy::too_many_arguments)]
    pub async fn glu_backward(
        &mut self,
        gate: &wgpu::Buffer,
        up: &wgpu::Buffer,
        d_act: &wgpu::Buffer,
        d_gate: &wgpu::Buffer,
        d_up: &wgpu::Buffer,
        n: u32,
        gelu: bool,
    ) -> Result<(), GpuError> {
        let (gx, gy) = grid(n.div_ceil(64));
        let defines = if gelu { Defines::new().flag("GELU") } else { Defines::new() };
        let params = GluBackwardParams { n, _pad: [0; 3] };
        self.dispatch(PipelineKey { file: "glu_backward.wgsl", entry: "main", defines }, &[gate, up, d_act, d_gate, d_up], &params, (gx, gy, 1)).await
    }
}
