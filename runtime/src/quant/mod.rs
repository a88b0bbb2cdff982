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
use half::f16;

mod float;
mod kquants;
mod legacy;

pub use kquants::k4_scale_min;

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
        GgmlType::F32 => float::dequant_f32,
        GgmlType::F16 => float::dequant_f16,
        GgmlType::Bf16 => float::dequant_bf16,
        GgmlType::Q8_0 => legacy::dequant_q8_0,
        GgmlType::Q4_0 => legacy::dequant_q4_0,
        GgmlType::Q4_1 => legacy::dequant_q4_1,
        GgmlType::Q5_0 => legacy::dequant_q5_0,
        GgmlType::Q5_1 => legacy::dequant_q5_1,
        GgmlType::Q4K => kquants::dequant_q4_k,
        GgmlType::Q5K => kquants::dequant_q5_k,
        GgmlType::Q6K => kquants::dequant_q6_k,
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
        GgmlType::F32 => float::quant_f32,
        GgmlType::F16 => float::quant_f16,
        GgmlType::Bf16 => float::quant_bf16,
        GgmlType::Q8_0 => legacy::quant_q8_0,
        GgmlType::Q4_0 => legacy::quant_q4_0,
        GgmlType::Q4_1 => legacy::quant_q4_1,
        GgmlType::Q5_0 => legacy::quant_q5_0,
        GgmlType::Q5_1 => legacy::quant_q5_1,
        GgmlType::Q4K => kquants::quant_q4_k,
        GgmlType::Q5K => kquants::quant_q5_k,
        GgmlType::Q6K => kquants::quant_q6_k,
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

    pub(super) fn f16b(v: f32) -> [u8; 2] {
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
