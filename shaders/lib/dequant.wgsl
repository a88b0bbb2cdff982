// Dequantization of GGUF tensor rows, one implementation per GGML type, selected at pipeline
// build time by a TYPE_* define. The single entry point every kernel uses:
//
//   dq4(row, i) -> vec4<f32>: elements i..i+3 of the row starting at byte `row` (i % 4 == 0).
//
// Four consecutive elements always share one scale in every block layout below, so a dq4 costs
// one scale lookup and one or two word reads. Layouts are ggml's (ggml-quants.c).
#include "lib/bytes.wgsl"

#if TYPE_F32
const BLOCK_ELEMS: u32 = 1u;
fn dq4(row: u32, i: u32) -> vec4<f32> {
    let w = (row >> 2u) + i;
    return vec4<f32>(bitcast<f32>(src_q[w]), bitcast<f32>(src_q[w + 1u]), bitcast<f32>(src_q[w + 2u]), bitcast<f32>(src_q[w + 3u]));
}
#endif

#if TYPE_F16
const BLOCK_ELEMS: u32 = 1u;
fn dq4(row: u32, i: u32) -> vec4<f32> {
    let b = row + 2u * i;
    return vec4<f32>(unpack2x16float(ld_u32(b)), unpack2x16float(ld_u32(b + 4u)));
}
#endif

#if TYPE_BF16
const BLOCK_ELEMS: u32 = 1u;
fn dq4(row: u32, i: u32) -> vec4<f32> {
    let b = row + 2u * i;
    let lo = ld_u32(b);
    let hi = ld_u32(b + 4u);
    return vec4<f32>(bitcast<f32>(lo << 16u), bitcast<f32>(lo & 0xFFFF0000u), bitcast<f32>(hi << 16u), bitcast<f32>(hi & 0xFFFF0000u));
}
#endif

#if TYPE_Q8_0
// Blocks of 32 x i8 and an f16 d, uploaded split (GpuMatrix::upload): a chunk's quants first,
// one byte per element ([n_rows][k], so `row` = r · k), then the d of every block in order at
// byte n_rows · k. Every quant word is then aligned, where GGUF's 34-byte blocks are not.
const BLOCK_ELEMS: u32 = 32u;
fn dq4(row: u32, i: u32) -> vec4<f32> {
    return ld_f16(p.n_rows * p.k + 2u * ((row + i) / 32u)) * i8x4(src_q[(row + i) >> 2u]);
}
#endif

// Q4_0 / Q4_1 / Q5_0 / Q5_1 store element j (< 16) in the low nibble of qs[j] and element j + 16
// in its high nibble; Q5 types keep element j's fifth bit at bit j of the 32-bit qh.
fn nibbles4(qs: u32, j: u32) -> vec4<u32> {
    return u8x4((ld_u32(qs + (j & 15u)) >> select(0u, 4u, j >= 16u)) & 0x0F0F0F0Fu);
}

fn fifth_bits4(qh: u32, j: u32) -> vec4<u32> {
    return ((vec4<u32>(qh) >> (vec4<u32>(j) + vec4<u32>(0u, 1u, 2u, 3u))) & vec4<u32>(1u)) << vec4<u32>(4u);
}

#if TYPE_Q4_0
// 18-byte blocks (f16 d, 16 bytes of nibbles; x = (q - 8) d) uploaded split like Q8_0's: the
// chunk's nibbles first (`row` = r · k / 2), then every block's d at byte n_rows · k / 2
const BLOCK_ELEMS: u32 = 32u;
fn dq4(row: u32, i: u32) -> vec4<f32> {
    let b = row / 16u + i / 32u;
    return ld_f16(p.n_rows * p.k / 2u + 2u * b) * (vec4<f32>(nibbles4(16u * b, i % 32u)) - 8.0);
}
#endif

#if TYPE_Q4_1
// 20-byte blocks (f16 d, f16 m, 16 bytes of nibbles; x = q d + m) uploaded split: the chunk's
// nibbles first (`row` = r · k / 2), then every block's d, m word at byte n_rows · k / 2
const BLOCK_ELEMS: u32 = 32u;
fn dq4(row: u32, i: u32) -> vec4<f32> {
    let b = row / 16u + i / 32u;
    let dm = unpack2x16float(src_q[p.n_rows * p.k / 8u + b]);
    return dm.x * vec4<f32>(nibbles4(16u * b, i % 32u)) + dm.y;
}
#endif

#if TYPE_Q5_0
// 22-byte blocks (f16 d, u32 qh, 16 bytes of nibbles; x = (q - 16) d) uploaded split: the
// chunk's nibbles (`row` = r · k / 2), then every block's qh, then every block's d
const BLOCK_ELEMS: u32 = 32u;
fn dq4(row: u32, i: u32) -> vec4<f32> {
    let b = row / 16u + i / 32u;
    let qs_bytes = p.n_rows * p.k / 2u;
    let q = nibbles4(16u * b, i % 32u) | fifth_bits4(src_q[qs_bytes / 4u + b], i % 32u);
    return ld_f16(qs_bytes + p.n_rows * p.k / 8u + 2u * b) * (vec4<f32>(q) - 16.0);
}
#endif

#if TYPE_Q5_1
// 24-byte blocks (f16 d, f16 m, u32 qh, 16 bytes of nibbles; x = q d + m) uploaded split: the
// chunk's nibbles (`row` = r · k / 2), then every block's qh, then every block's d, m word
const BLOCK_ELEMS: u32 = 32u;
fn dq4(row: u32, i: u32) -> vec4<f32> {
    let b = row / 16u + i / 32u;
    let qs_words = p.n_rows * p.k / 8u;
    let q = nibbles4(16u * b, i % 32u) | fifth_bits4(src_q[qs_words + b], i % 32u);
    let dm = unpack2x16float(src_q[qs_words + p.n_rows * p.k / 32u + b]);
    return dm.x * vec4<f32>(q) + dm.y;
}
#endif

// Q4_K and Q5_K: 256 elements in 8 sub-blocks of 32, each with a 6-bit scale and min packed into
// 12 bytes at byte 4 of the block (ggml's get_scale_min_k4). Returns (scale, min).
fn k4_scale_min(scales: u32, sub: u32) -> vec2<f32> {
    if (sub < 4u) {
        return vec2<f32>(f32(ld_u8(scales + sub) & 63u), f32(ld_u8(scales + sub + 4u) & 63u));
    }
    let hi = ld_u8(scales + sub + 4u);
    let sc = (hi & 0xFu) | ((ld_u8(scales + sub - 4u) >> 6u) << 4u);
    let mn = (hi >> 4u) | ((ld_u8(scales + sub) >> 6u) << 4u);
    return vec2<f32>(f32(sc), f32(mn));
}

#if TYPE_Q4_K
// 144 bytes: f16 d, f16 dmin, 12 bytes of scales, 128 bytes of nibbles. Each 64 elements share
// 32 bytes of qs: the first 32 elements are the low nibbles, the next 32 the high ones.
const BLOCK_ELEMS: u32 = 256u;
fn dq4(row: u32, i: u32) -> vec4<f32> {
    let base = row + (i / 256u) * 144u;
    let e = i % 256u;
    let group = e / 64u;
    let high = (e % 64u) >= 32u;
    let l = e % 32u;
    let sm = k4_scale_min(base + 4u, 2u * group + select(0u, 1u, high));
    let q = u8x4((ld_u32(base + 16u + 32u * group + l) >> select(0u, 4u, high)) & 0x0F0F0F0Fu);
    return ld_f16(base) * sm.x * vec4<f32>(q) - ld_f16(base + 2u) * sm.y;
}
#endif

#if TYPE_Q5_K
// 176 bytes: f16 d, f16 dmin, 12 bytes of scales, 32 bytes qh, 128 bytes of nibbles; as Q4_K
// plus a fifth bit: element l of sub-block s takes bit s of qh[l].
const BLOCK_ELEMS: u32 = 256u;
fn dq4(row: u32, i: u32) -> vec4<f32> {
    let base = row + (i / 256u) * 176u;
    let e = i % 256u;
    let group = e / 64u;
    let high = (e % 64u) >= 32u;
    let l = e % 32u;
    let sub = 2u * group + select(0u, 1u, high);
    let sm = k4_scale_min(base + 4u, sub);
    let low4 = u8x4((ld_u32(base + 48u + 32u * group + l) >> select(0u, 4u, high)) & 0x0F0F0F0Fu);
    let bit5 = u8x4((ld_u32(base + 16u + l) >> sub) & 0x01010101u) << vec4<u32>(4u);
    return ld_f16(base) * sm.x * vec4<f32>(low4 | bit5) - ld_f16(base + 2u) * sm.y;
}
#endif

#if TYPE_Q6_K
// 210 bytes: 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 x i8 scales, f16 d last.
// Each half of 128 elements uses 64 bytes of ql and 32 of qh; its quarter q (32 elements) takes
// ql's low (q < 2) or high nibbles of bytes 32 (q & 1) + l, and bits 2q..2q+1 of qh[l].
const BLOCK_ELEMS: u32 = 256u;
fn dq4(row: u32, i: u32) -> vec4<f32> {
    let base = row + (i / 256u) * 210u;
    let e = i % 256u;
    let half = e / 128u;
    let quarter = (e % 128u) / 32u;
    let l = e % 32u;
    let low4 = (ld_u32(base + 64u * half + 32u * (quarter & 1u) + l) >> (4u * (quarter >> 1u))) & 0x0F0F0F0Fu;
    let high2 = (ld_u32(base + 128u + 32u * half + l) >> (2u * quarter)) & 0x03030303u;
    let q = vec4<f32>(u8x4(low4 | (high2 << 4u))) - 32.0;
    let sc = f32(i32(ld_u8(base + 192u + 8u * half + l / 16u + 2u * quarter) << 24u) >> 24u);
    return ld_f16(base + 208u) * sc * q;
}
#endif

// one element, for the ragged end of float rows whose length is not a multiple of 4
fn dq1(row: u32, i: u32) -> f32 {
    let v = dq4(row, i & ~3u);
    return v[i & 3u];
}
