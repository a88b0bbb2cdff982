//! Weight matrices on the GPU as GGUF stores them (some block types with their fields split
//! apart), in chunks that each fit one storage binding, and which types and shapes the
//! quantized kernels (matvec, matmul, gather) read (`supports(Op::Matrix ..)`).

use super::support::{supports, Op};
use crate::device::{Gpu, GpuError};
use crate::ggml_type::GgmlType;
use crate::shaders::Defines;

/// Bytes kept spare after every weight chunk: `ld_u32` reads one word past a row's last byte,
/// and matvec's vec4 reads of an unaligned block can reach up to 24 bytes past its end.
pub const WEIGHT_PAD: usize = 32;

pub(super) fn type_define(ty: GgmlType) -> String {
    format!("TYPE_{}", ty.name())
}

/// A weight matrix on the GPU exactly as GGUF stores it, split into chunks of whole rows that
/// each fit one storage binding. W: [n_rows][k].
pub struct GpuMatrix {
    pub name: String,
    pub ty: GgmlType,
    pub n_rows: u32,
    pub k: u32,
    pub row_bytes: u32,
    pub chunks: Vec<MatrixChunk>,
    /// The GGUF tensors stacked in this matrix, in row order: (name, rows). One for a plain
    /// matrix; q/k/v or gate/up projections of one layer are stacked so that one dispatch
    /// multiplies them all (`Recorder::product` sends each part to its own output).
    pub parts: Vec<(String, u32)>,
}

pub struct MatrixChunk {
    pub first_row: u32,
    pub n_rows: u32,
    pub buffer: wgpu::Buffer,
}

impl GpuMatrix {
    /// Rows per chunk so that a chunk (plus padding) fits the device's binding limit.
    pub fn rows_per_chunk(gpu: &Gpu, row_bytes: u64) -> u64 {
        ((gpu.max_binding() - WEIGHT_PAD as u64 - 256) / row_bytes).max(1)
    }

    /// Upload `n_rows` rows of `k` elements of type `ty` from `bytes` (as stored in the file).
    pub async fn upload(gpu: &Gpu, name: &str, ty: GgmlType, k: u64, n_rows: u64, bytes: &[u8]) -> Result<GpuMatrix, GpuError> {
        supports(Op::Matrix { ty, k }, Some(gpu)).map_err(|m| GpuError::Unsupported(format!("tensor '{name}': {m}")))?;
        let row_bytes = ty.row_bytes(k).unwrap();
        if bytes.len() as u64 != row_bytes * n_rows {
            return Err(GpuError::Unsupported(format!("tensor '{name}': {} bytes given for {n_rows} rows of {row_bytes}", bytes.len())));
        }
        let per = GpuMatrix::rows_per_chunk(gpu, row_bytes);
        let mut chunks = Vec::new();
        let mut first = 0u64;
        while first < n_rows {
            let n = per.min(n_rows - first);
            let data = &bytes[(first * row_bytes) as usize..((first + n) * row_bytes) as usize];
            let buffer = match split_fields(ty) {
                Some(fields) => gpu.upload(name, &split_blocks(data, ty.block_layout().1, fields), WEIGHT_PAD).await?,
                None => gpu.upload(name, data, WEIGHT_PAD).await?,
            };
            chunks.push(MatrixChunk { first_row: first as u32, n_rows: n as u32, buffer });
            first += n;
        }
        let parts = vec![(name.to_string(), n_rows as u32)];
        Ok(GpuMatrix { name: name.to_string(), ty, n_rows: n_rows as u32, k: k as u32, row_bytes: row_bytes as u32, chunks, parts })
    }

    /// Stack matrices of one type and row length into one, rows in the order given: parts
    /// (name, rows, bytes as stored). Its name is the parts' names joined by '+'.
    pub async fn upload_stacked(gpu: &Gpu, ty: GgmlType, k: u64, parts: &[(String, u64, Vec<u8>)]) -> Result<GpuMatrix, GpuError> {
        let name = parts.iter().map(|p| p.0.as_str()).collect::<Vec<_>>().join("+");
        let n_rows = parts.iter().map(|p| p.1).sum();
        let bytes: Vec<u8> = parts.iter().flat_map(|p| p.2.iter().copied()).collect();
        let mut m = GpuMatrix::upload(gpu, &name, ty, k, n_rows, &bytes).await?;
        m.parts = parts.iter().map(|p| (p.0.clone(), p.1 as u32)).collect();
        Ok(m)
    }

    pub fn bytes(&self) -> u64 {
        self.row_bytes as u64 * self.n_rows as u64
    }

    /// Bytes between rows as the kernels address them: the stored row, or for split types
    /// (`split_blocks`) a row's quants, which come first in the chunk.
    pub(super) fn kernel_row_bytes(&self) -> u32 {
        match split_fields(self.ty) {
            Some(fields) => self.k / self.ty.block_elems() as u32 * fields[0].1 as u32,
            None => self.row_bytes,
        }
    }

    pub(super) fn defines(&self) -> Defines {
        Defines::new().flag(&type_define(self.ty))
    }
}

/// Blocks rearranged for the kernels into one region per field, in the order `fields` (byte
/// offset, length within a block) lists them: the quants first, then scales and high bits.
/// Same size; the 34-, 18-, 20-, 22- and 24-byte blocks of Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1
/// mostly sit at unaligned offsets, their quants split out are whole aligned vec4s, which the
/// kernels load faster.
fn split_blocks(blocks: &[u8], block_bytes: usize, fields: &[(usize, usize)]) -> Vec<u8> {
    let n = blocks.len() / block_bytes;
    let mut out = Vec::with_capacity(blocks.len());
    for &(offset, len) in fields {
        for block in blocks.chunks_exact(block_bytes) {
            out.extend_from_slice(&block[offset..offset + len]);
        }
    }
    debug_assert_eq!(out.len(), n * block_bytes);
    out
}

/// The fields of the types uploaded split (`split_blocks`), None for types kept as stored.
fn split_fields(ty: GgmlType) -> Option<&'static [(usize, usize)]> {
    match ty {
        GgmlType::Q8_0 => Some(&[(2, 32), (0, 2)]),
        GgmlType::Q4_0 => Some(&[(2, 16), (0, 2)]),
        GgmlType::Q4_1 => Some(&[(4, 16), (0, 4)]),
        GgmlType::Q5_0 => Some(&[(6, 16), (2, 4), (0, 2)]),
        GgmlType::Q5_1 => Some(&[(8, 16), (4, 4), (0, 4)]),
        _ => None,
    }
}
