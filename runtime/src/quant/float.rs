//! F32, F16 and BF16: one element per "block".

use half::bf16;

use super::{read_f16, write_f16};

pub(super) fn dequant_f32(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

pub(super) fn dequant_f16(b: &[u8], y: &mut [f32]) {
    y[0] = read_f16(b, 0);
}

/// bf16 is the high 16 bits of an f32.
pub(super) fn dequant_bf16(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
}

pub(super) fn quant_f32(x: &[f32], b: &mut [u8]) {
    b.copy_from_slice(&x[0].to_le_bytes());
}

/// Round to nearest even (what numpy's `astype(float16)` and ggml do).
pub(super) fn quant_f16(x: &[f32], b: &mut [u8]) {
    write_f16(b, 0, x[0]);
}

/// ggml's `ggml_compute_fp32_to_bf16`: NaNs are made quiet, everything else rounds to
/// nearest even.
pub(super) fn quant_bf16(x: &[f32], b: &mut [u8]) {
    let u = x[0].to_bits();
    let h = if (u & 0x7fff_ffff) > 0x7f80_0000 { ((u >> 16) | 64) as u16 } else { ((u as u64 + 0x7fff + ((u as u64 >> 16) & 1)) >> 16) as u16 };
    // `bf16` is only used to document intent; the bit pattern above is the contract.
    b.copy_from_slice(&bf16::from_bits(h).to_bits().to_le_bytes());
}

#[cfg(test)]
mod tests {
    use crate::ggml_type::GgmlType;
    use crate::quant::{dequantize, quantize_row};

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
}
