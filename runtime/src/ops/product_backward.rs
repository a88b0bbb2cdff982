//! The gradient of a product with respect to its input, dx = dy · W, for weights as GGUF
//! stores them (product_backward.wgsl): how gradients flow back through the frozen base.

use super::matrix::{type_define, GpuMatrix};
use super::pipeline::Bind::{self, *};
use super::{grid, Recorder};
use crate::device::{GpuError, PipelineKey};
use crate::ggml_type::GgmlType;
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
        dy_stride: u32,
        dy_first_row: u32,
        r_begin: u32,
        r_end: u32,
        _pad: [u32; 3],
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for ty in crate::ggml_type::KERNEL_TYPES {
        for accumulate in [false, true] {
            // (DY_QUADS, DY_BROADCAST)
            for (quads, broadcast) in [(false, false), (true, false), (true, true)] {
                for paired in [false, true].into_iter().filter(|&p| !p || pairs(ty)) {
                    keys.push(PipelineKey { file: "product_backward.wgsl", entry: "main", defines: defines(ty, accumulate, quads, broadcast, paired) });
                }
            }
        }
    }
    keys
}

/// Whether product_backward.wgsl has PAIRED for `ty`: the 4- and 5-bit types of 32-element
/// blocks, whose columns c and c + 16 share a quant word.
pub(crate) fn pairs(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1)
}

/// product_backward.wgsl's defines: weights of type `ty`, dx added to, dy read four rows a load
/// (and broadcast over a workgroup of one 8-lane subgroup), two column quads an invocation.
fn defines(ty: GgmlType, accumulate: bool, quads: bool, broadcast: bool, paired: bool) -> Defines {
    let mut d = Defines::new().flag(&type_define(ty)).value("WG", format!("{}u", wg(broadcast)));
    if accumulate {
        d = d.flag("ACCUMULATE");
    }
    if quads {
        d = d.flag("DY_QUADS");
    }
    if broadcast {
        d = d.flag("DY_BROADCAST");
    }
    if paired {
        d = d.flag("PAIRED");
    }
    d
}

/// Invocations a workgroup: one 8-lane subgroup for DY_BROADCAST, else 64.
fn wg(broadcast: bool) -> u32 {
    if broadcast {
        8
    } else {
        64
    }
}

/// Rows a dispatch needs before DY_BROADCAST's 8-lane workgroups pay for themselves: a LoRA
/// factor's A (rank rows) took twice as long with them on lavapipe, the base weights half.
const BROADCAST_MIN_ROWS: u32 = 64;

/// Tokens one invocation takes (product_backward.wgsl's TOKENS).
const TOKENS: u32 = 8;

/// Rows one invocation walks in a dispatch: llvmpipe stops an invocation after 65,535 loop
/// iterations (four a row in the tail of a row no multiple of 4 long), so a long column (the
/// output head's vocabulary) is split over dispatches.
const ROWS_PER_DISPATCH: u32 = 12_288;

impl Recorder<'_> {
    /// dx (+)= dy · W for dy: [m][w.n_rows], dx: [m][w.k]; `accumulate` adds to what dx holds.
    pub async fn product_backward(&mut self, w: &GpuMatrix, dy: &wgpu::Buffer, dx: &wgpu::Buffer, m: u32, accumulate: bool) -> Result<(), GpuError> {
        self.product_backward_rows(w, 0..w.n_rows, dy, dx, m, accumulate).await
    }

    /// The same through part `part` of a stacked matrix only (its rows, in `w.parts` order):
    /// dy: [m][that part's rows].
    pub async fn product_backward_part(&mut self, w: &GpuMatrix, part: usize, dy: &wgpu::Buffer, dx: &wgpu::Buffer, m: u32, accumulate: bool) -> Result<(), GpuError> {
        let first: u32 = w.parts[..part].iter().map(|p| p.1).sum();
        self.product_backward_rows(w, first..first + w.parts[part].1, dy, dx, m, accumulate).await
    }

    /// dx (+)= dy · W[rows] for dy: [m][rows.len()].
    async fn product_backward_rows(
        &mut self,
        w: &GpuMatrix,
        rows: std::ops::Range<u32>,
        dy: &wgpu::Buffer,
        dx: &wgpu::Buffer,
        m: u32,
        accumulate: bool,
    ) -> Result<(), GpuError> {
        let tuning = &self.gpu.tuning;
        // a workgroup of 8 lanes shares its tokens where the rows are whole blocks of 32
        let paired = pairs(w.ty) && self.backward_paired.unwrap_or(tuning.backward_paired);
        // (PAIRED: 8 columns an invocation, so rows of 64)
        let can_broadcast = tuning.subgroups_of_8 && w.k.is_multiple_of(if paired { 64 } else { 32 });
        let mut first = !accumulate;
        for c in &w.chunks {
            // this chunk's rows within `rows`, chunk-local
            let (start, end) = (rows.start.max(c.first_row), rows.end.min(c.first_row + c.n_rows));
            if start >= end {
                continue;
            }
            let (lo, hi) = (start - c.first_row, end - c.first_row);
            for r_begin in (lo..hi).step_by(ROWS_PER_DISPATCH as usize) {
                let r_end = (r_begin + ROWS_PER_DISPATCH).min(hi);
                let params = ProductBackwardParams {
                    n_rows: c.n_rows,
                    k: w.k,
                    row_bytes: w.kernel_row_bytes(),
                    row_offset: c.first_row,
                    m,
                    dy_stride: rows.len() as u32,
                    dy_first_row: rows.start,
                    r_begin,
                    r_end,
                    _pad: [0; 3],
                };
                // dy read four rows at a time where its rows and this range start on a quad
                let quads = rows.len().is_multiple_of(4) && (c.first_row + r_begin - rows.start).is_multiple_of(4);
                let broadcast = quads && can_broadcast && self.backward_broadcast.unwrap_or(tuning.backward_broadcast && r_end - r_begin >= BROADCAST_MIN_ROWS);
                let defines = defines(w.ty, !first, quads, broadcast, paired);
                first = false;
                let columns = if paired { 8 } else { 4 };
                let (gx, gy) = grid((m.div_ceil(TOKENS) * w.k.div_ceil(columns)).div_ceil(wg(broadcast)));
                self.dispatch(PipelineKey { file: "product_backward.wgsl", entry: "main", defines }, &[&c.buffer, dy, dx], &params, (gx, gy, 1)).await?;
            }
        }
        if first {
            return Err(GpuError::Unsupported(format!("product_backward over rows {rows:?} of '{}', which has {}", w.name, w.n_rows)));
        }
        Ok(())
    }
}
