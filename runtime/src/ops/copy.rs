//! A plain copy, the bandwidth yardstick (copy.wgsl).

use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// copy.wgsl's bindings, in order: src, dst, params.
pub const COPY_LAYOUT: &[Bind] = &[Read, ReadWrite, Uniform];

params! {
    /// copy.wgsl's `struct Params`: vec4s to copy.
    struct CopyParams {
        n4: u32,
        _pad: [u32; 3],
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    vec![PipelineKey { file: "copy.wgsl", entry: "main", defines: Defines::new() }]
}

impl Recorder<'_> {
    /// dst[..n] = src[..n] (n a multiple of 4): the bandwidth yardstick.
    pub async fn copy(&mut self, src: &wgpu::Buffer, dst: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        let n4 = n / 4;
        let (gx, gy) = grid(n4.div_ceil(256));
        self.dispatch(PipelineKey { file: "copy.wgsl", entry: "main", defines: Defines::new() }, &[src, dst], &CopyParams { n4, _pad: [0; 3] }, (gx, gy, 1)).await
    }
}
