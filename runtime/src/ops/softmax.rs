//! Softmax over rows (softmax.wgsl).

use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// softmax.wgsl's bindings, in order: x, out, params.
pub const SOFTMAX_LAYOUT: &[Bind] = &[Read, ReadWrite, Uniform];

params! {
    /// softmax.wgsl's `struct Params`.
    struct SoftmaxParams {
        n: u32,
        n_rows: u32,
        _pad: [u32; 2],
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    vec![PipelineKey { file: "softmax.wgsl", entry: "main", defines: Defines::new() }]
}

impl Recorder<'_> {
    /// Softmax of each row of x: [n_rows][n] into out.
    pub async fn softmax(&mut self, x: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, n_rows: u32) -> Result<(), GpuError> {
        let (gx, gy) = grid(n_rows);
        self.dispatch(PipelineKey { file: "softmax.wgsl", entry: "main", defines: Defines::new() }, &[x, out], &SoftmaxParams { n, n_rows, _pad: [0; 2] }, (gx, gy, 1))
            .await
    }
}
