//! Plain CPU dequantization (and simple quantization) of GGML block types.
//!
//! This is the yardstick the GPU kernels are measured against, so it is written to be read,
//! not to be fast: one function per type, each with its block layout spelled out. The
//! dequantizers match ggml (`ggml-quants.c`) and the PyPI `gguf` package (`gguf/quants.py`)
//! bit for bit: every product is formed in f32 in the same order they use (for example
//! Q4_K's `(d * sc) * q - (dmin * m)`), and Rust never contracts `a * b + c` into an FMA on
//! its own, so the results are identical, not merely close.
//!
//! All multi-byte fields are little-endian. "f16" is IEEE half precision; "bf16" is the top
//! half of an f32.
//!
//! Quantizers: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 follow ggml's reference
//! quantizers (`quantize_row_*_ref`), which pick the scale from the block's extreme values
//! and round to nearest. The K-quant quantizers (Q4_K, Q5_K, Q6_K) are simple min/max
//! quantizers that produce valid blocks with reasonable error; they do NOT reproduce
//! llama.cpp's search-based `make_qkx2_quants` / `make_qx_quants` choices.

use crate::ggml_type::GgmlType;
use half::{bf16, f16};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantError {
    #[error("{0} is not supported by the CPU (de)quantizer")]
    Unsupported(GgmlType),
    #[error("{ty}: {elements} elements is not a whole number of {block_elems}-element blocks")]
    NotWholeBlocks { ty: GgmlType, elements: usize, block_elems: usize },
    #[error("{ty}: {elements} elements need {expected} bytes, got {got}")]
    SizeMismatch { ty: GgmlType, elements: usize, expected: usize, got: usize },
}

/// Types this module can dequantize (and quantize): the same set the kernels implement.
pub const SUPPORTED: [GgmlType; 11] = crate::ggml_type::KERNEL_TYPES;

pub fn supports(ty: GgmlType) -> bool {
    SUPPORTED.contains(&ty)
}

/// Number of blocks in `n` elements of `ty`, or an error when `ty` is unsupported or `n` is not
/// a whole number of blocks.
fn block_count(ty: GgmlType, n: usize) -> Result<usize, QuantError> {
    if !supports(ty) {
        return Err(QuantError::Unsupported(ty));
    }
    let be = ty.block_elems();
    if !n.is_multiple_of(be) {
        return Err(QuantError::NotWholeBlocks { ty, elements: n, block_elems: be });
    }
    Ok(n / be)
}

/// Dequantize `out.len()` elements of type `ty` from `bytes`, which must hold exactly
/// `out.len() / block_elems` blocks.
pub fn dequantize_row(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), QuantError> {
    let nb = block_count(ty, out.len())?;
    let bb = ty.block_bytes();
    let expected = nb * bb;
    if bytes.len() != expected {
        return Err(QuantError::SizeMismatch { ty, elements: out.len(), expected, got: bytes.len() });
    }
    let be = ty.block_elems();
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => dequant_f32,
        GgmlType::F16 => dequant_f16,
        GgmlType::Bf16 => dequant_bf16,
        GgmlType::Q8_0 => dequant_q8_0,
        GgmlType::Q4_0 => dequant_q4_0,
        GgmlType::Q4_1 => dequant_q4_1,
        GgmlType::Q5_0 => dequant_q5_0,
        GgmlType::Q5_1 => dequant_q5_1,
        GgmlType::Q4K => dequant_q4_k,
        GgmlType::Q5K => dequant_q5_k,
        GgmlType::Q6K => dequant_q6_k,
        _ => return Err(QuantError::Unsupported(ty)),
    };
    for (block, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        block_fn(block, y);
    }
    Ok(())
}

/// Dequantize `n_elements` elements of type `ty` into a new vector.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n_elements: usize) -> Result<Vec<f32>, QuantError> {
    let mut out = vec![0.0f32; n_elements];
    dequantize_row(ty, bytes, &mut out)?;
    Ok(out)
}

/// Quantize `src` (a whole number of blocks) to type `ty`.
pub fn quantize_row(ty: GgmlType, src: &[f32]) -> Result<Vec<u8>, QuantError> {
    let nb = block_count(ty, src.len())?;
    let (be, bb) = ty.block_layout();
    let block_fn: fn(&[f32], &mut [u8]) = match ty {
        GgmlType::F32 => quant_f32,
        GgmlType::F16 => quant_f16,
        GgmlType::Bf16 => quant_bf16,
        GgmlType::Q8_0 => quant_q8_0,
        GgmlType::Q4_0 => quant_q4_0,
        GgmlType::Q4_1 => quant_q4_1,
        GgmlType::Q5_0 => quant_q5_0,
        GgmlType::Q5_1 => quant_q5_1,
        GgmlType::Q4K => quant_q4_k,
        GgmlType::Q5K => quant_q5_k,
        GgmlType::Q6K => quant_q6_k,
        _ => return Err(QuantError::Unsupported(ty)),
    };
    let mut out = vec![0u8; nb * bb];
    for (x, block) in src.chunks_exact(be).zip(out.chunks_exact_mut(bb)) {
        block_fn(x, block);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

fn read_f16(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

fn write_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
}

/// f32 -> f16 -> f32: the value a stored f16 field will actually have.
fn round_f16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// `1/d`, or 0 when `d` is 0 (ggml's `id = d ? 1.0f/d : 0.0f`).
fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// The value in `x` with the largest magnitude, sign kept (first one on ties, as ggml).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut best = 0.0f32;
    for &v in x {
        if v.abs() > best.abs() {
            best = v;
        }
    }
    best
}

fn min_max(x: &[f32]) -> (f32, f32) {
    x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

// ---------------------------------------------------------------------------------------------
// F32, F16, BF16: one element per "block".
// ---------------------------------------------------------------------------------------------

fn dequant_f32(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn dequant_f16(b: &[u8], y: &mut [f32]) {
    y[0] = read_f16(b, 0);
}

/// bf16 is the high 16 bits of an f32.
fn dequant_bf16(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
}

fn quant_f32(x: &[f32], b: &mut [u8]) {
    b.copy_from_slice(&x[0].to_le_bytes());
}

/// Round to nearest even (what numpy's `astype(float16)` and ggml do).
fn quant_f16(x: &[f32], b: &mut [u8]) {
    write_f16(b, 0, x[0]);
}

/// ggml's `ggml_compute_fp32_to_bf16`: NaNs are made quiet, everything else rounds to
/// nearest even.
fn quant_bf16(x: &[f32], b: &mut [u8]) {
    let u = x[0].to_bits();
    let h = if (u & 0x7fff_ffff) > 0x7f80_0000 { ((u >> 16) | 64) as u16 } else { ((u as u64 + 0x7fff + ((u as u64 >> 16) & 1)) >> 16) as u16 };
    // `bf16` is only used to document intent; the bit pattern above is the contract.
    b.copy_from_slice(&bf16::from_bits(h).to_bits().to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Q8_0: 32 elements, 34 bytes.
//   [0..2)   f16 d
//   [2..34)  i8 q[32]           value = q * d
// ---------------------------------------------------------------------------------------------

fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// ggml: d = amax / 127, q = round(x / d) (round half away from zero).
fn quant_q8_0(x: &[f32], b: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    for j in 0..32 {
        b[2 + j] = ((x[j] * id).round() as i8) as u8;
    }
}

// ---------------------------------------------------------------------------------------------
// Q4_0: 32 elements, 18 bytes.
//   [0..2)   f16 d
//   [2..18)  qs[16]: element j (0..16) is the LOW nibble of qs[j],
//                    element j + 16 is the HIGH nibble of qs[j]
//   value = (q - 8) * d
// ---------------------------------------------------------------------------------------------

fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as i32 - 8;
        let hi = (qs[j] >> 4) as i32 - 8;
        y[j] = d * lo as f32;
        y[j + 16] = d * hi as f32;
    }
}

/// ggml: `max` is the element of largest magnitude (sign kept), d = max / -8, so that element
/// maps to q = 0 exactly; q = min(15, trunc(x / d + 8.5)).
fn quant_q4_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -8.0;
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    for j in 0..16 {
        let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
        let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
        b[2 + j] = q0 | (q1 << 4);
    }
}

// ---------------------------------------------------------------------------------------------
// Q4_1: 32 elements, 20 bytes.
//   [0..2)   f16 d
//   [2..4)   f16 m
//   [4..20)  qs[16], nibbles as in Q4_0
//   value = q * d + m
// ---------------------------------------------------------------------------------------------

fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let m = read_f16(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 0x0F) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

/// ggml: d = (max - min) / 15, m = min, q = min(15, trunc((x - min) / d + 0.5)).
fn quant_q4_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 15.0;
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    write_f16(b, 2, min);
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
        b[4 + j] = q0 | (q1 << 4);
    }
}

// ---------------------------------------------------------------------------------------------
// Q5_0: 32 elements, 22 bytes.
//   [0..2)   f16 d
//   [2..6)   u32 qh: bit j is the 5th bit (value 16) of element j, for j in 0..32
//   [6..22)  qs[16], low 4 bits, nibbles as in Q4_0
//   value = (q - 16) * d
// ---------------------------------------------------------------------------------------------

fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
        let hi = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (lo as i32 - 16) as f32;
        y[j + 16] = d * (hi as i32 - 16) as f32;
    }
}

/// ggml: d = max / -16 (max = largest-magnitude element), q = min(31, trunc(x / d + 16.5)).
fn quant_q5_0(x: &[f32], b: &mut [u8]) {
    let d = signed_absmax(x) / -16.0;
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = ((x[j] * id + 16.5) as i8).min(31) as u8;
        let q1 = ((x[j + 16] * id + 16.5) as i8).min(31) as u8;
        b[6 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= ((q0 >> 4) as u32 & 1) << j;
        qh |= ((q1 >> 4) as u32 & 1) << (j + 16);
    }
    b[2..6].copy_from_slice(&qh.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Q5_1: 32 elements, 24 bytes.
//   [0..2)   f16 d
//   [2..4)   f16 m
//   [4..8)   u32 qh, as in Q5_0
//   [8..24)  qs[16], as in Q5_0
//   value = q * d + m
// ---------------------------------------------------------------------------------------------

fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let m = read_f16(b, 2);
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
        let hi = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * lo as f32 + m;
        y[j + 16] = d * hi as f32 + m;
    }
}

/// ggml: d = (max - min) / 31, m = min, q = min(31, trunc((x - min) / d + 0.5)).
fn quant_q5_1(x: &[f32], b: &mut [u8]) {
    let (min, max) = min_max(x);
    let d = (max - min) / 31.0;
    let id = inverse_or_zero(d);
    write_f16(b, 0, d);
    write_f16(b, 2, min);
    let mut qh = 0u32;
    for j in 0..16 {
        let q0 = (((x[j] - min) * id + 0.5) as i8).min(31) as u8;
        let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(31) as u8;
        b[8 + j] = (q0 & 0x0F) | ((q1 & 0x0F) << 4);
        qh |= ((q0 >> 4) as u32 & 1) << j;
        qh |= ((q1 >> 4) as u32 & 1) << (j + 16);
    }
    b[4..8].copy_from_slice(&qh.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// K-quant 6-bit scale/min packing, shared by Q4_K and Q5_K (ggml's `get_scale_min_k4`).
//
// A super-block has 8 sub-blocks of 32 elements; sub-block j has a 6-bit scale sc[j] and a
// 6-bit min m[j], packed into 12 bytes q[0..12]:
//   for j < 4:  sc[j] = q[j]     & 63          m[j] = q[j + 4] & 63
//   for j >= 4: sc[j] = (q[j+4] & 0xF) | ((q[j-4] >> 6) << 4)
//               m[j]  = (q[j+4] >> 4)  | ((q[j]   >> 6) << 4)
// i.e. bytes 0..4 hold sc[0..4] plus the top 2 bits of sc[4..8], bytes 4..8 hold m[0..4] plus
// the top 2 bits of m[4..8], and bytes 8..12 hold the low nibbles of sc[4..8] | m[4..8] << 4.
// ---------------------------------------------------------------------------------------------

/// (scale, min) of sub-block `j` (0..8) from the 12 packed scale bytes.
pub fn k4_scale_min(q: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Inverse of `k4_scale_min`: pack 8 six-bit scales and mins into 12 bytes.
fn pack_k4_scales(sc: &[u8; 8], m: &[u8; 8], q: &mut [u8]) {
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (m[j] & 63) | ((m[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
}

/// Simple min/max choice of per-sub-block scales and mins for Q4_K / Q5_K (`nmax` = 15 or 31).
/// Returns the f16-rounded (d, dmin), the 6-bit scales and mins, and per element the
/// quantized level 0..=nmax.
fn choose_k4_scales(x: &[f32], nmax: f32) -> (f32, f32, [u8; 8], [u8; 8], [u8; 256]) {
    // Per sub-block: value = scale * q - min, with min >= 0 (ggml clamps the block minimum to
    // at most 0, so the stored min is never negative).
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    for j in 0..8 {
        let (lo, hi) = min_max(&x[32 * j..32 * j + 32]);
        let lo = lo.min(0.0);
        scales[j] = (hi - lo) / nmax;
        mins[j] = -lo;
    }
    let max_scale = scales.iter().fold(0.0f32, |a, &b| a.max(b));
    let max_min = mins.iter().fold(0.0f32, |a, &b| a.max(b));
    // Super-block scales: the 6-bit sub-block scale 63 reaches the largest sub-block scale.
    let d = round_f16(max_scale / 63.0);
    let dmin = round_f16(max_min / 63.0);
    let (id, idmin) = (inverse_or_zero(d), inverse_or_zero(dmin));
    let mut sc = [0u8; 8];
    let mut m = [0u8; 8];
    let mut q = [0u8; 256];
    for j in 0..8 {
        sc[j] = (scales[j] * id).round().clamp(0.0, 63.0) as u8;
        m[j] = (mins[j] * idmin).round().clamp(0.0, 63.0) as u8;
        // Quantize against the scale and min the decoder will actually use.
        let dl = d * sc[j] as f32;
        let ml = dmin * m[j] as f32;
        let idl = inverse_or_zero(dl);
        for l in 0..32 {
            let i = 32 * j + l;
            q[i] = ((x[i] + ml) * idl).round().clamp(0.0, nmax) as u8;
        }
    }
    (d, dmin, sc, m, q)
}

// ---------------------------------------------------------------------------------------------
// Q4_K: 256 elements (8 sub-blocks of 32), 144 bytes.
//   [0..2)     f16 d
//   [2..4)     f16 dmin
//   [4..16)    12 bytes of packed 6-bit scales and mins (see `k4_scale_min`)
//   [16..144)  qs[128]: four 32-byte chunks; chunk i holds sub-block 2i in the LOW nibbles and
//              sub-block 2i+1 in the HIGH nibbles: element 64i + l      = qs[32i + l] & 0xF,
//                                                  element 64i + 32 + l = qs[32i + l] >> 4
//   value = (d * sc[j]) * q - (dmin * m[j])    for an element of sub-block j
// ---------------------------------------------------------------------------------------------

fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let dmin = read_f16(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for j in 0..8 {
        let (sc, m) = k4_scale_min(scales, j);
        let dl = d * sc as f32;
        let ml = dmin * m as f32;
        let chunk = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        for l in 0..32 {
            let q = (chunk[l] >> shift) & 0x0F;
            y[32 * j + l] = dl * q as f32 - ml;
        }
    }
}

fn quant_q4_k(x: &[f32], b: &mut [u8]) {
    let (d, dmin, sc, m, q) = choose_k4_scales(x, 15.0);
    write_f16(b, 0, d);
    write_f16(b, 2, dmin);
    pack_k4_scales(&sc, &m, &mut b[4..16]);
    for i in 0..4 {
        for l in 0..32 {
            b[16 + 32 * i + l] = q[64 * i + l] | (q[64 * i + 32 + l] << 4);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q5_K: 256 elements (8 sub-blocks of 32), 176 bytes.
//   [0..2)     f16 d
//   [2..4)     f16 dmin
//   [4..16)    12 bytes of packed 6-bit scales and mins (see `k4_scale_min`)
//   [16..48)   qh[32]: the 5th bit (value 16) of element 32j + l is bit j of qh[l]
//   [48..176)  qs[128]: the low 4 bits, laid out exactly as Q4_K's qs
//   value = (d * sc[j]) * q - (dmin * m[j])
// ---------------------------------------------------------------------------------------------

fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let dmin = read_f16(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for j in 0..8 {
        let (sc, m) = k4_scale_min(scales, j);
        let dl = d * sc as f32;
        let ml = dmin * m as f32;
        let chunk = &qs[32 * (j / 2)..32 * (j / 2) + 32];
        let shift = 4 * (j % 2);
        for l in 0..32 {
            let q = ((chunk[l] >> shift) & 0x0F) | (((qh[l] >> j) & 1) << 4);
            y[32 * j + l] = dl * q as f32 - ml;
        }
    }
}

fn quant_q5_k(x: &[f32], b: &mut [u8]) {
    let (d, dmin, sc, m, q) = choose_k4_scales(x, 31.0);
    write_f16(b, 0, d);
    write_f16(b, 2, dmin);
    pack_k4_scales(&sc, &m, &mut b[4..16]);
    for l in 0..32 {
        let mut h = 0u8;
        for j in 0..8 {
            h |= (q[32 * j + l] >> 4) << j;
        }
        b[16 + l] = h;
    }
    for i in 0..4 {
        for l in 0..32 {
            b[48 + 32 * i + l] = (q[64 * i + l] & 0x0F) | ((q[64 * i + 32 + l] & 0x0F) << 4);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q6_K: 256 elements (16 sub-blocks of 16), 210 bytes. Note d comes LAST.
//   [0..128)    ql[128]: low 4 bits
//   [128..192)  qh[64]:  high 2 bits
//   [192..208)  i8 scales[16], one per 16 elements (element i uses scales[i / 16])
//   [208..210)  f16 d
// The block is two halves of 128 elements; half h uses ql[64h..64h+64] and qh[32h..32h+32].
// Within a half, for l in 0..32:
//   element l      : ql[l]      & 0xF | ((qh[l] >> 0) & 3) << 4
//   element l + 32 : ql[l + 32] & 0xF | ((qh[l] >> 2) & 3) << 4
//   element l + 64 : ql[l]      >> 4  | ((qh[l] >> 4) & 3) << 4
//   element l + 96 : ql[l + 32] >> 4  | ((qh[l] >> 6) & 3) << 4
//   value = (d * scales[i / 16]) * (q - 32)
// ---------------------------------------------------------------------------------------------

fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let ql_all = &b[0..128];
    let qh_all = &b[128..192];
    let scales = &b[192..208];
    let d = read_f16(b, 208);
    for h in 0..2 {
        let ql = &ql_all[64 * h..64 * h + 64];
        let qh = &qh_all[32 * h..32 * h + 32];
        for l in 0..32 {
            let q = [
                (ql[l] & 0x0F) | ((qh[l] & 3) << 4),
                (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4),
                (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
            ];
            for (k, &qk) in q.iter().enumerate() {
                let i = 128 * h + 32 * k + l;
                let dl = d * (scales[i / 16] as i8) as f32;
                y[i] = dl * (qk as i32 - 32) as f32;
            }
        }
    }
}

/// Simple symmetric quantizer: each 16-element sub-block gets scale amax/31 (so its largest
/// element maps to +-31), the 8-bit sub-block scales are relative to d = max scale / 127.
fn quant_q6_k(x: &[f32], b: &mut [u8]) {
    let mut sub = [0.0f32; 16];
    for (s, xs) in sub.iter_mut().zip(x.chunks_exact(16)) {
        *s = xs.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 31.0;
    }
    let max_scale = sub.iter().fold(0.0f32, |a, &v| a.max(v));
    let d = round_f16(max_scale / 127.0);
    let id = inverse_or_zero(d);
    let mut q = [0u8; 256];
    for s in 0..16 {
        let sc = (sub[s] * id).round().clamp(-128.0, 127.0) as i8;
        b[192 + s] = sc as u8;
        let idl = inverse_or_zero(d * sc as f32);
        for l in 0..16 {
            let i = 16 * s + l;
            q[i] = ((x[i] * idl).round().clamp(-32.0, 31.0) as i32 + 32) as u8;
        }
    }
    for h in 0..2 {
        for l in 0..32 {
            let base = 128 * h + l;
            let (q0, q1, q2, q3) = (q[base], q[base + 32], q[base + 64], q[base + 96]);
            b[64 * h + l] = (q0 & 0x0F) | ((q2 & 0x0F) << 4);
            b[64 * h + l + 32] = (q1 & 0x0F) | ((q3 & 0x0F) << 4);
            b[128 + 32 * h + l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6);
        }
    }
    write_f16(b, 208, d);
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64-based uniform floats in [-1, 1), deterministic.
    fn random_floats(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E3779B97F4A7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn f16b(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_bits().to_le_bytes()
    }

    /// Max abs error of quantize -> dequantize, relative to the input's max magnitude.
    fn round_trip_error(ty: GgmlType, x: &[f32]) -> f32 {
        let bytes = quantize_row(ty, x).unwrap();
        assert_eq!(bytes.len(), ty.row_bytes(x.len() as u64).unwrap() as usize);
        let y = dequantize(ty, &bytes, x.len()).unwrap();
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max) / amax
    }

    #[test]
    fn round_trip_error_bounds() {
        // Bounds are relative to max |x| (inputs uniform in [-1, 1)). Half a quantization step
        // for most types; Q4_0 and Q5_0 map the largest-magnitude element to level -8 / -16,
        // so an element of the opposite sign near +max is clipped to level 7 / 15: up to one
        // whole step. The K-quants also lose precision in their 6/8-bit sub-block scales and
        // f16 super-block scales.
        let bounds = [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1.0 / 2048.0),
            (GgmlType::Bf16, 1.0 / 256.0),
            (GgmlType::Q8_0, 0.5 / 127.0 + 1e-3),
            (GgmlType::Q4_0, 1.0 / 8.0 + 1e-3),
            (GgmlType::Q4_1, 0.5 * 2.0 / 15.0 + 1e-3),
            (GgmlType::Q5_0, 1.0 / 16.0 + 1e-3),
            (GgmlType::Q5_1, 0.5 * 2.0 / 31.0 + 1e-3),
            (GgmlType::Q4K, 0.08),
            (GgmlType::Q5K, 0.04),
            (GgmlType::Q6K, 0.02),
        ];
        for (ty, bound) in bounds {
            let mut worst = 0.0f32;
            for seed in 0..20 {
                let x = random_floats(seed, 1024);
                worst = worst.max(round_trip_error(ty, &x));
            }
            eprintln!("{ty}: worst relative round-trip error {worst}");
            assert!(worst <= bound, "{ty}: round-trip error {worst} > {bound}");
        }
    }

    #[test]
    fn round_trip_handles_zero_and_constant_blocks() {
        for ty in SUPPORTED {
            let zeros = vec![0.0f32; 256];
            let y = dequantize(ty, &quantize_row(ty, &zeros).unwrap(), 256).unwrap();
            assert!(y.iter().all(|&v| v == 0.0), "{ty}: zeros");
            // A positive constant is exactly representable by every type (the asymmetric
            // types via their min, the symmetric ones via the largest-magnitude level).
            let c = vec![0.75f32; 256];
            let y = dequantize(ty, &quantize_row(ty, &c).unwrap(), 256).unwrap();
            for v in y {
                assert!((v - 0.75).abs() <= 0.75 / 100.0, "{ty}: constant -> {v}");
            }
        }
    }

    #[test]
    fn q8_0_quantizer_matches_ggml_exactly() {
        // amax 1.27 -> d = 0.01; q = round(x / 0.01).
        let mut x = [0.0f32; 32];
        x[0] = 1.27;
        x[1] = -0.5;
        x[2] = 0.004;
        let b = quantize_row(GgmlType::Q8_0, &x).unwrap();
        assert_eq!(&b[0..2], &f16b(1.27f32 / 127.0));
        assert_eq!(b[2] as i8, 127);
        assert_eq!(b[3] as i8, -50);
        assert_eq!(b[4] as i8, 0);
    }

    #[test]
    fn exact_q4_0_block() {
        let mut b = vec![0u8; 18];
        b[0..2].copy_from_slice(&f16b(0.5));
        for j in 0..16 {
            b[2 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let y = dequantize(GgmlType::Q4_0, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
            assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
        }
        // And the quantizer inverts it: the largest magnitude (-4.0) sets d = -4 / -8 = 0.5.
        assert_eq!(quantize_row(GgmlType::Q4_0, &y).unwrap(), b);
    }

    #[test]
    fn exact_q4_1_block() {
        let mut b = vec![0u8; 20];
        b[0..2].copy_from_slice(&f16b(0.25));
        b[2..4].copy_from_slice(&f16b(-1.0));
        for j in 0..16 {
            b[4 + j] = (j as u8) | ((15 - j as u8) << 4);
        }
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        for j in 0..16 {
            assert_eq!(y[j], j as f32 * 0.25 - 1.0);
            assert_eq!(y[j + 16], (15 - j) as f32 * 0.25 - 1.0);
        }
        assert_eq!(quantize_row(GgmlType::Q4_1, &y).unwrap(), b);
    }

    #[test]
    fn exact_q5_0_block() {
        let mut b = vec![0u8; 22];
        b[0..2].copy_from_slice(&f16b(0.125));
        // Element j gets q = j (0..32): low nibble in qs, bit 4 in qh bit j.
        let mut qh = 0u32;
        for j in 0..16 {
            let (q0, q1) = (j as u32, j as u32 + 16);
            b[6 + j] = (q0 & 15) as u8 | (((q1 & 15) as u8) << 4);
            qh |= ((q0 >> 4) & 1) << j | ((q1 >> 4) & 1) << (j + 16);
        }
        b[2..6].copy_from_slice(&qh.to_le_bytes());
        assert_eq!(qh, 0xFFFF_0000);
        let y = dequantize(GgmlType::Q5_0, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 - 16.0) * 0.125);
        }
        assert_eq!(quantize_row(GgmlType::Q5_0, &y).unwrap(), b);
    }

    #[test]
    fn exact_q5_1_block() {
        let mut b = vec![0u8; 24];
        b[0..2].copy_from_slice(&f16b(0.5));
        b[2..4].copy_from_slice(&f16b(2.0));
        // Only element 3 has its 5th bit set and low nibble 1: q = 17.
        b[4..8].copy_from_slice(&(1u32 << 3).to_le_bytes());
        b[8 + 3] = 0x01;
        let y = dequantize(GgmlType::Q5_1, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            let expect = if j == 3 { 17.0 * 0.5 + 2.0 } else { 2.0 };
            assert_eq!(*v, expect, "element {j}");
        }
    }

    #[test]
    fn exact_q8_0_block() {
        let mut b = vec![0u8; 34];
        b[0..2].copy_from_slice(&f16b(0.25));
        for j in 0..32 {
            b[2 + j] = (j as i8 * 4 - 64) as u8;
        }
        let y = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, (j as f32 * 4.0 - 64.0) * 0.25);
        }
    }

    #[test]
    fn exact_f16_bf16_f32() {
        let x = [1.0f32, -2.5, 0.0, 65504.0];
        let b = quantize_row(GgmlType::F16, &x).unwrap();
        assert_eq!(dequantize(GgmlType::F16, &b, 4).unwrap(), x);
        let b = quantize_row(GgmlType::Bf16, &x[..3]).unwrap();
        assert_eq!(b, [0x80, 0x3f, 0x20, 0xc0, 0x00, 0x00]);
        assert_eq!(dequantize(GgmlType::Bf16, &b, 3).unwrap(), &x[..3]);
        // bf16 rounds to nearest even: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 -> 1.
        let b = quantize_row(GgmlType::Bf16, &[1.0 + 1.0 / 256.0, 1.0 + 3.0 / 256.0]).unwrap();
        assert_eq!(dequantize(GgmlType::Bf16, &b, 2).unwrap(), [1.0, 1.0 + 4.0 / 256.0]);
        let b = quantize_row(GgmlType::F32, &x).unwrap();
        assert_eq!(dequantize(GgmlType::F32, &b, 4).unwrap(), x);
    }

    #[test]
    fn k4_scale_packing_round_trips() {
        let sc = [0u8, 1, 62, 63, 17, 32, 48, 63];
        let m = [63u8, 5, 0, 33, 16, 1, 63, 40];
        let mut q = [0u8; 12];
        pack_k4_scales(&sc, &m, &mut q);
        for j in 0..8 {
            assert_eq!(k4_scale_min(&q, j), (sc[j], m[j]), "sub-block {j}");
        }
    }

    #[test]
    fn exact_q4_k_block() {
        // d = 0.5, dmin = 0.25; sub-block j has scale j + 1 and min 2j (j >= 4 exercises the
        // split 6-bit packing); q for element 32j + l is l % 16.
        let sc: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 60];
        let m: [u8; 8] = [0, 2, 4, 6, 8, 10, 12, 50];
        let mut b = vec![0u8; 144];
        b[0..2].copy_from_slice(&f16b(0.5));
        b[2..4].copy_from_slice(&f16b(0.25));
        pack_k4_scales(&sc, &m, &mut b[4..16]);
        for i in 0..4 {
            for l in 0..32 {
                b[16 + 32 * i + l] = (l % 16) as u8 | (((15 - l % 16) as u8) << 4);
            }
        }
        let y = dequantize(GgmlType::Q4K, &b, 256).unwrap();
        for j in 0..8 {
            for l in 0..32 {
                let q = if j % 2 == 0 { l % 16 } else { 15 - l % 16 };
                let expect = 0.5 * sc[j] as f32 * q as f32 - 0.25 * m[j] as f32;
                assert_eq!(y[32 * j + l], expect, "element {}", 32 * j + l);
            }
        }
    }

    #[test]
    fn exact_q5_k_block() {
        let sc: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
        let m: [u8; 8] = [8, 7, 6, 5, 4, 3, 2, 1];
        let mut b = vec![0u8; 176];
        b[0..2].copy_from_slice(&f16b(0.125));
        b[2..4].copy_from_slice(&f16b(1.0));
        pack_k4_scales(&sc, &m, &mut b[4..16]);
        // q for element 32j + l is (l + j) % 32.
        let q = |i: usize| ((i % 32 + i / 32) % 32) as u8;
        for l in 0..32 {
            b[16 + l] = (0..8).fold(0u8, |h, j| h | ((q(32 * j + l) >> 4) << j));
        }
        for i in 0..4 {
            for l in 0..32 {
                b[48 + 32 * i + l] = (q(64 * i + l) & 15) | ((q(64 * i + 32 + l) & 15) << 4);
            }
        }
        let y = dequantize(GgmlType::Q5K, &b, 256).unwrap();
        for (i, &v) in y.iter().enumerate() {
            let j = i / 32;
            let expect = 0.125 * sc[j] as f32 * q(i) as f32 - m[j] as f32;
            assert_eq!(v, expect, "element {i}");
        }
    }

    #[test]
    fn exact_q6_k_block() {
        // q (0..64) for element i is i % 64; scales alternate sign; d = 0.5 stored at the end.
        let mut b = vec![0u8; 210];
        let q = |i: usize| (i % 64) as u8;
        for h in 0..2 {
            for l in 0..32 {
                let base = 128 * h + l;
                let (q0, q1, q2, q3) = (q(base), q(base + 32), q(base + 64), q(base + 96));
                b[64 * h + l] = (q0 & 15) | ((q2 & 15) << 4);
                b[64 * h + l + 32] = (q1 & 15) | ((q3 & 15) << 4);
                b[128 + 32 * h + l] = (q0 >> 4) | ((q1 >> 4) << 2) | ((q2 >> 4) << 4) | ((q3 >> 4) << 6);
            }
        }
        let scales: Vec<i8> = (0..16).map(|s| if s % 2 == 0 { s as i8 + 1 } else { -(s as i8) * 8 }).collect();
        for s in 0..16 {
            b[192 + s] = scales[s] as u8;
        }
        b[208..210].copy_from_slice(&f16b(0.5));
        let y = dequantize(GgmlType::Q6K, &b, 256).unwrap();
        for i in 0..256 {
            let expect = 0.5 * scales[i / 16] as f32 * (q(i) as f32 - 32.0);
            assert_eq!(y[i], expect, "element {i}");
        }
    }

    #[test]
    fn errors_instead_of_panics() {
        let mut out = [0.0f32; 32];
        assert_eq!(dequantize_row(GgmlType::Q2K, &[0; 84], &mut out[..]), Err(QuantError::Unsupported(GgmlType::Q2K)));
        assert!(matches!(dequantize_row(GgmlType::Q4_0, &[0; 17], &mut out), Err(QuantError::SizeMismatch { expected: 18, got: 17, .. })));
        assert!(matches!(dequantize_row(GgmlType::Q4_0, &[0; 18], &mut out[..31]), Err(QuantError::NotWholeBlocks { .. })));
        assert!(matches!(quantize_row(GgmlType::Q4K, &[0.0; 255]), Err(QuantError::NotWholeBlocks { .. })));
        assert_eq!(quantize_row(GgmlType::Iq2Xs, &[0.0; 256]), Err(QuantError::Unsupported(GgmlType::Iq2Xs)));
        // Zero elements is a valid, empty row.
        assert_eq!(dequantize(GgmlType::Q6K, &[], 0).unwrap(), Vec::<f32>::new());
    }
}
