//! The gradient of RMSNorm with respect to its input, its weight frozen (norm_backward.wgsl).

use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// norm_backward.wgsl's bindings, in order: x, w, dy, dx, params.
pub const NORM_BACKWARD_LAYOUT: &[Bind] = &[Read, Read, Read, ReadWrite, Uniform];

params! {
    /// norm_backward.wgsl's `struct Params`.
    struct NormBackwardParams {
        n: u32,
        n_rows: u32,
        eps: f32,
        _pad: u32,
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    [Defines::new(), Defines::new().flag("ACCUMULATE")].into_iter().map(|defines| PipelineKey { file: "norm_backward.wgsl", entry: "main", defines }).collect()
}

impl Recorder<'_> {
    /// dx (+)= d rms_norm(x)·w / dx · dy over rows x, dy, dx: [n_rows][n]; `accumulate` adds to
    /// what dx holds (the residual stream's own gradient).
    #[allow(clippy::too_many_arguments)]
    pub async fn rms_norm_backward(
        &mut self,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
        n: u32,
        n_rows: u32,
        eps: f32,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let (gx, gy) = grid(n_rows);
        let defines = if accumulate { Defines::new().flag("ACCUMULATE") } else { Defines::new() };
        let params = NormBackwardParams { n, n_rows, eps, _pad: 0 };
        self.dispatch(PipelineKey { file: "norm_backward.wgsl", entry: "main", defines }, &[x, w, dy, dx], &params, (gx, gy, 1)).await
    }
}
