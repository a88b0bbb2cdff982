//! The gradient of a product with respect to its input, dx = dy · W, for weights as GGUF
//! stores them (product_backward.wgsl): how gradients flow back through the frozen base.

use super::matrix::{type_define, GpuMatrix};
use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// product_backward.wgsl's bindings, in order: w, dy, dx, params.
pub const PRODUCT_BACKWARD_LAYOUT: &[Bind] = &[Read, Read, ReadWrite, Uniform];

params! {
    /// product_backward.wgsl's `struct Params`.
    struct ProductBackwardParams {
        n_rows: u32,
        k: u32,
        row_bytes: u32,
        row_offset: u32,
        m: u32,
        n_total: u32,
        r_begin: u32,
        r_end: u32,
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for ty in crate::ggml_type::KERNEL_TYPES {
        for accumulate in [false, true] {
            let d = Defines::new().flag(&type_define(ty));
            keys.push(PipelineKey { file: "product_backward.wgsl", entry: "main", defines: if accumulate { d.flag("ACCUMULATE") } else { d } });
        }
    }
    keys
}

/// Rows one invocation walks in a dispatch: llvmpipe stops an invocation after 65,535 loop
/// iterations (four a row in the tail of a row no multiple of 4 long), so a long column (the
/// output head's vocabulary) is split over dispatches.
const ROWS_PER_DISPATCH: u32 = 12_288;

impl Recorder<'_> {
    /// dx (+)= dy · W for dy: [m][w.n_rows], dx: [m][w.k]; `accumulate` adds to what dx holds.
    pub async fn product_backward(&mut self, w: &GpuMatrix, dy: &wgpu::Buffer, dx: &wgpu::Buffer, m: u32, accumulate: bool) -> Result<(), GpuError> {
        let (gx, gy) = grid((m * w.k.div_ceil(4)).div_ceil(64));
        let mut first = !accumulate;
        for c in &w.chunks {
            for r_begin in (0..c.n_rows).step_by(ROWS_PER_DISPATCH as usize) {
                let params = ProductBackwardParams {
                    n_rows: c.n_rows,
                    k: w.k,
                    row_bytes: w.kernel_row_bytes(),
                    row_offset: c.first_row,
                    m,
                    n_total: w.n_rows,
                    r_begin,
                    r_end: (r_begin + ROWS_PER_DISPATCH).min(c.n_rows),
                };
                let defines = if first { w.defines() } else { w.defines().flag("ACCUMULATE") };
                first = false;
                self.dispatch(PipelineKey { file: "product_backward.wgsl", entry: "main", defines }, &[&c.buffer, dy, dx], &params, (gx, gy, 1)).await?;
            }
        }
        Ok(())
    }
}
