//! Element-wise ops: adds (with a broadcast bias), accumulate, scale, softcap and the gated
//! activations (elementwise.wgsl).

use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// elementwise.wgsl's bindings, in order: a, b, out, params.
pub const ELEMENTWISE_LAYOUT: &[Bind] = &[Read, Read, ReadWrite, Uniform];

params! {
    /// elementwise.wgsl's `struct Params`.
    struct ElementwiseParams {
        n: u32,
        s: f32,
        b_len: u32,
        offset: u32,
        width: u32,
        _pad: [u32; 3],
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    ["add", "accumulate", "accumulate_rows", "scale", "softcap", "silu_gate", "gelu_gate"]
        .into_iter()
        .map(|entry| PipelineKey { file: "elementwise.wgsl", entry, defines: Defines::new() })
        .collect()
}

impl Recorder<'_> {
    async fn elementwise(&mut self, entry: &'static str, a: &wgpu::Buffer, b: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, s: f32) -> Result<(), GpuError> {
        self.elementwise_b(entry, a, b, out, n, s, n).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn elementwise_b(&mut self, entry: &'static str, a: &wgpu::Buffer, b: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, s: f32, b_len: u32) -> Result<(), GpuError> {
        let (gx, gy) = grid(n.div_ceil(256));
        let params = ElementwiseParams { n, s, b_len: b_len.max(1), offset: 0, width: 1, _pad: [0; 3] };
        self.dispatch(PipelineKey { file: "elementwise.wgsl", entry, defines: Defines::new() }, &[a, b, out], &params, (gx, gy, 1)).await
    }

    pub async fn add(&mut self, a: &wgpu::Buffer, b: &wgpu::Buffer, out: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        self.elementwise("add", a, b, out, n, 0.0).await
    }
    /// out[t][i] = a[t][i] + bias[i] for rows of width `width`.
    pub async fn add_bias(&mut self, a: &wgpu::Buffer, bias: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, width: u32) -> Result<(), GpuError> {
        self.elementwise_b("add", a, bias, out, n, 0.0, width).await
    }
    /// y[i] += s · b[i], in place on y.
    pub async fn accumulate(&mut self, y: &wgpu::Buffer, b: &wgpu::Buffer, n: u32, s: f32) -> Result<(), GpuError> {
        self.elementwise("accumulate", b, b, y, n, s).await
    }
    /// y[t][e] += s · b[t][offset + e] for y: [n_tokens][width], b: [n_tokens][b_width]: a
    /// fused tensor's LoRA term into the output of one of its parts.
    #[allow(clippy::too_many_arguments)]
    pub async fn accumulate_rows(&mut self, y: &wgpu::Buffer, b: &wgpu::Buffer, n_tokens: u32, width: u32, b_width: u32, offset: u32, s: f32) -> Result<(), GpuError> {
        let n = n_tokens * width;
        let (gx, gy) = grid(n.div_ceil(256));
        let params = ElementwiseParams { n, s, b_len: b_width, offset, width: width.max(1), _pad: [0; 3] };
        self.dispatch(PipelineKey { file: "elementwise.wgsl", entry: "accumulate_rows", defines: Defines::new() }, &[b, b, y], &params, (gx, gy, 1)).await
    }
    pub async fn scale(&mut self, a: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, s: f32) -> Result<(), GpuError> {
        self.elementwise("scale", a, a, out, n, s).await
    }
    pub async fn softcap(&mut self, a: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, cap: f32) -> Result<(), GpuError> {
        self.elementwise("softcap", a, a, out, n, cap).await
    }
    pub async fn silu_gate(&mut self, gate: &wgpu::Buffer, up: &wgpu::Buffer, out: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        self.elementwise("silu_gate", gate, up, out, n, 0.0).await
    }
    pub async fn gelu_gate(&mut self, gate: &wgpu::Buffer, up: &wgpu::Buffer, out: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        self.elementwise("gelu_gate", gate, up, out, n, 0.0).await
    }
}
