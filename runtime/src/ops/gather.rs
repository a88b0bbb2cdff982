//! Embedding lookup: rows of a (quantized) table by token id, dequantized (gather.wgsl).

use super::matrix::{type_define, GpuMatrix};
use super::pipeline::Bind::{self, *};
use super::Recorder;
use crate::device::{GpuError, PipelineKey};
use crate::shaders::Defines;

/// gather.wgsl's bindings, in order: table, ids, out, params.
pub const GATHER_LAYOUT: &[Bind] = &[Read, Read, ReadWrite, Uniform];

params! {
    /// gather.wgsl's `struct Params`.
    struct GatherParams {
        n_rows: u32,
        k: u32,
        row_bytes: u32,
        row_offset: u32,
        m: u32,
        _pad: [u32; 3],
    }
}

/// gather.wgsl for every weight type.
pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    crate::ggml_type::KERNEL_TYPES.into_iter().map(|ty| PipelineKey { file: "gather.wgsl", entry: "main", defines: Defines::new().flag(&type_define(ty)) }).collect()
}

impl Recorder<'_> {
    /// out[t] = table row ids[t]. ids: [m] u32, out: [m][k].
    pub async fn gather(&mut self, table: &GpuMatrix, ids: &wgpu::Buffer, out: &wgpu::Buffer, m: u32) -> Result<(), GpuError> {
        for c in &table.chunks {
            let params = GatherParams { n_rows: c.n_rows, k: table.k, row_bytes: table.kernel_row_bytes(), row_offset: c.first_row, m, _pad: [0; 3] };
            self.dispatch(PipelineKey { file: "gather.wgsl", entry: "main", defines: table.defines() }, &[&c.buffer, ids, out], &params, (m, 1, 1)).await?;
        }
        Ok(())
    }
}
