//! The K-quants: 256-element super-blocks of Q4_K, Q5_K and Q6_K.

use super::{inverse_or_zero, min_max, read_f16, round_f16, write_f16};

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

pub(super) fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
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

pub(super) fn quant_q4_k(x: &[f32], b: &mut [u8]) {
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

pub(super) fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
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

pub(super) fn quant_q5_k(x: &[f32], b: &mut [u8]) {
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

pub(super) fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
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
pub(super) fn quant_q6_k(x: &[f32], b: &mut [u8]) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml_type::GgmlType;
    use crate::quant::dequantize;
    use crate::quant::tests::f16b;

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
}
