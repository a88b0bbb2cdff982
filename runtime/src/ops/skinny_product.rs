//! Products with an f32 matrix of few or short rows (LoRA factors), one invocation per output
//! element (skinny_product.wgsl).

use super::matrix::GpuMatrix;
use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::ggml_type::GgmlType;
use crate::shaders::Defines;

/// skinny_product.wgsl's bindings, in order: w, x, y, params.
pub const SKINNY_PRODUCT_LAYOUT: &[Bind] = &[Read, Read, ReadWrite, Uniform];

params! {
    /// skinny_product.wgsl's `struct Params`.
    struct SkinnyProductParams {
        n_rows: u32,
        k: u32,
        m: u32,
        scale: f32,
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for accumulate in [false, true] {
        for tiles in [false, true] {
            keys.push(PipelineKey { file: "skinny_product.wgsl", entry: "main", defines: defines(accumulate, tiles) });
        }
    }
    keys
}

fn defines(accumulate: bool, tiles: bool) -> Defines {
    let d = if accumulate { Defines::new().flag("ACCUMULATE") } else { Defines::new() };
    if tiles {
        d.flag("TILES")
    } else {
        d
    }
}

impl Recorder<'_> {
    /// y (+)= scale · W·x over m tokens for an f32 W: [n_rows][k] in one chunk, k a multiple
    /// of 4; x: [m][k], y: [m][n_rows]. `accumulate` adds to what y holds.
    #[allow(clippy::too_many_arguments)]
    pub async fn skinny_product(&mut self, w: &GpuMatrix, x: &wgpu::Buffer, y: &wgpu::Buffer, m: u32, scale: f32, accumulate: bool) -> Result<(), GpuError> {
        if w.ty != GgmlType::F32 || w.chunks.len() != 1 || !w.k.is_multiple_of(4) {
            return Err(GpuError::Unsupported(format!("skinny_product of '{}' ({}, {} chunks, rows of {})", w.name, w.ty, w.chunks.len(), w.k)));
        }
        let tiles = self.lora_tiles.unwrap_or(self.gpu.tuning.lora_tiles) && w.n_rows.is_multiple_of(4);
        let invocations = if tiles { m.div_ceil(4) * (w.n_rows / 4) } else { m * w.n_rows };
        let (gx, gy) = grid(invocations.div_ceil(64));
        let defines = defines(accumulate, tiles);
        let params = SkinnyProductParams { n_rows: w.n_rows, k: w.k, m, scale };
        self.dispatch(PipelineKey { file: "skinny_product.wgsl", entry: "main", defines }, &[&w.chunks[0].buffer, x, y], &params, (gx, gy, 1)).await
    }
}
