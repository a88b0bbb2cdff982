//! The legacy 32-element block types: Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1.

use super::{inverse_or_zero, min_max, read_f16, signed_absmax, write_f16};

// ---------------------------------------------------------------------------------------------
// Q8_0: 32 elements, 34 bytes.
//   [0..2)   f16 d
//   [2..34)  i8 q[32]           value = q * d
// ---------------------------------------------------------------------------------------------

pub(super) fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// ggml: d = amax / 127, q = round(x / d) (round half away from zero).
pub(super) fn quant_q8_0(x: &[f32], b: &mut [u8]) {
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

pub(super) fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
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
pub(super) fn quant_q4_0(x: &[f32], b: &mut [u8]) {
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

pub(super) fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let m = read_f16(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 0x0F) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

/// ggml: d = (max - min) / 15, m = min, q = min(15, trunc((x - min) / d + 0.5)).
pub(super) fn quant_q4_1(x: &[f32], b: &mut [u8]) {
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

pub(super) fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
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
pub(super) fn quant_q5_0(x: &[f32], b: &mut [u8]) {
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

pub(super) fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
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
pub(super) fn quant_q5_1(x: &[f32], b: &mut [u8]) {
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

#[cfg(test)]
mod tests {
    use crate::ggml_type::GgmlType;
    use crate::quant::tests::f16b;
    use crate::quant::{dequantize, quantize_row};

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
}
