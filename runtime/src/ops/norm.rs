//! Row norms: RMSNorm (optionally added to a residual) and LayerNorm (norm.wgsl).

use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// norm.wgsl's bindings, in order: x, w, b, out, params.
pub const NORM_LAYOUT: &[Bind] = &[Read, Read, Read, ReadWrite, Uniform];

params! {
    /// norm.wgsl's `struct Params`.
    struct NormParams {
        n: u32,
        n_rows: u32,
        eps: f32,
        _pad: u32,
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for entry in ["rms_norm", "layer_norm"] {
        keys.push(PipelineKey { file: "norm.wgsl", entry, defines: Defines::new() });
    }
    keys.push(PipelineKey { file: "norm.wgsl", entry: "rms_norm", defines: Defines::new().flag("ADD_RESIDUAL") });
    keys
}

impl Recorder<'_> {
    /// RMSNorm of each row of x: [n_rows][n] into out.
    pub async fn rms_norm(&mut self, x: &wgpu::Buffer, w: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, n_rows: u32, eps: f32) -> Result<(), GpuError> {
        self.norm_rows("rms_norm", Defines::new(), &[x, w, w, out], n, n_rows, eps).await
    }

    /// norm.wgsl's `entry` over rows of n with its buffers x, w, b, out: one workgroup a row.
    async fn norm_rows(&mut self, entry: &'static str, defines: Defines, buffers: &[&wgpu::Buffer; 4], n: u32, n_rows: u32, eps: f32) -> Result<(), GpuError> {
        let (gx, gy) = grid(n_rows);
        let params = NormParams { n, n_rows, eps, _pad: 0 };
        self.dispatch(PipelineKey { file: "norm.wgsl", entry, defines }, buffers, &params, (gx, gy, 1)).await
    }

    /// out = resid + rms_norm(x)·w over rows x, resid, out: [n_rows][n].
    #[allow(clippy::too_many_arguments)]
    pub async fn rms_norm_add(
        &mut self,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        resid: &wgpu::Buffer,
        out: &wgpu::Buffer,
        n: u32,
        n_rows: u32,
        eps: f32,
    ) -> Result<(), GpuError> {
        self.norm_rows("rms_norm", Defines::new().flag("ADD_RESIDUAL"), &[x, w, resid, out], n, n_rows, eps).await
    }

    /// LayerNorm of each row of x: [n_rows][n] with weight and bias [n] into out.
    #[allow(clippy::too_many_arguments)]
    pub async fn layer_norm(&mut self, x: &wgpu::Buffer, w: &wgpu::Buffer, b: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, n_rows: u32, eps: f32) -> Result<(), GpuError> {
        self.norm_rows("layer_norm", Defines::new(), &[x, w, b, out], n, n_rows, eps).await
    }
}
