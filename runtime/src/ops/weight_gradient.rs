//! The gradient of a LoRA factor: dW += scale · dyᵀ · x summed over tokens
//! (weight_gradient.wgsl).

use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// weight_gradient.wgsl's bindings, in order: dy, x, dw, params.
pub const WEIGHT_GRADIENT_LAYOUT: &[Bind] = &[Read, Read, ReadWrite, Uniform];

params! {
    /// weight_gradient.wgsl's `struct Params`.
    struct WeightGradientParams {
        n_rows: u32,
        k: u32,
        m: u32,
        dy_stride: u32,
        dy_offset: u32,
        scale: f32,
        _pad: [u32; 2],
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    let mut keys = vec![PipelineKey { file: "weight_gradient.wgsl", entry: "main", defines: Defines::new() }];
    keys.push(PipelineKey { file: "weight_gradient.wgsl", entry: "main", defines: Defines::new().flag("TILES") });
    keys
}

impl Recorder<'_> {
    /// dw[r][c] += scale · Σ_t dy[t][dy_offset + r] · x[t][c] for dw: [n_rows][k],
    /// dy: [m][dy_stride], x: [m][k].
    #[allow(clippy::too_many_arguments)]
    pub async fn weight_gradient(
        &mut self,
        dy: &wgpu::Buffer,
        x: &wgpu::Buffer,
        dw: &wgpu::Buffer,
        n_rows: u32,
        k: u32,
        m: u32,
        dy_stride: u32,
        dy_offset: u32,
        scale: f32,
    ) -> Result<(), GpuError> {
        let tiles = self.lora_tiles.unwrap_or(self.gpu.tuning.lora_tiles) && [n_rows, k, dy_stride, dy_offset].iter().all(|v| v.is_multiple_of(4));
        let (defines, invocations) = if tiles { (Defines::new().flag("TILES"), n_rows / 4 * (k / 4)) } else { (Defines::new(), n_rows * k) };
        let (gx, gy) = grid(invocations.div_ceil(64));
        let params = WeightGradientParams { n_rows, k, m, dy_stride, dy_offset, scale, _pad: [0; 2] };
        self.dispatch(PipelineKey { file: "weight_gradient.wgsl", entry: "main", defines }, &[dy, x, dw], &params, (gx, gy, 1)).await
    }
}
