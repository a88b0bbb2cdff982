// Dot products of whole quantization units with x, for matvec. A unit is UNIT elements of a row
// that share their scale data: one block of 32 for the legacy types, a 64-element group (two
// sub-blocks sharing one run of nibbles) for Q4_K / Q5_K, a 128-element half block for Q6_K.
//
//   dot_unit(row, u) -> f32: Σ of elements u*UNIT.. (u+1)*UNIT-1 of the row starting at byte
//   `row` times xv[0..UNIT/4], the matching x values the caller has loaded into `xv`; that is
//   dot_loaded(load_unit(row, u)), where load_unit returns the unit's stored words (a Unit) so
//   that prefill can load them once for several tokens (Q6_K's Unit only names the unit).
//   prepare_x(): called once after loading xv, before the unit's dot_unit calls: puts into
//   `x_sums` (of the type's XSums) the sums of x that the format's offsets (q − 8, min m)
//   multiply, shared by all rows; prefill saves xv and x_sums per token, so that each token's
//   unit is prepared once, not once per row.
//
// The weights are read as aligned vec4<u32> (`src_v`, declared by the including kernel): a CPU
// device pays per load instruction and lane, so the fewer and wider the better. Q4_K and Q5_K
// blocks (144, 176 bytes) sit 16-byte aligned and their fields are whole vec4s; Q8_0, Q4_0/1 and
// Q5_0/1 are uploaded split (quants, then high bits and scales: GpuMatrix::upload) so that their
// quants are too; Q6_K's 210-byte blocks sit at even byte offsets, so `vwords` loads the vec4s
// covering them and shifts their bytes into place (word offset 0..3 by selects, then 0 or 16
// bits by `funnel`).
#include "lib/unpack.wgsl"

// bits s.. s+31 of the 64-bit value hi:lo, for s = 0 or 16 (WGSL takes shift counts mod 32, so
// the high part is shifted in two steps to come out zero at s = 0)
fn funnel(lo: u32, hi: u32, s: u32) -> u32 {
    return (lo >> s) | ((hi << 16u) << (16u - s));
}

// up to 20 words of the bytes b.. as words (b even), from the n vec4s covering them: word j is
// whole for 4j + 4 <= 16n - 14 and its low half is good for 4j + 2 <= 16n - 14
fn vwords(b: u32, n: u32) -> array<u32, 20> {
    var r: array<u32, 24>;
    for (var i = 0u; i < n; i++) {
        let v = src_v[(b >> 4u) + i];
        r[4u * i] = v.x;
        r[4u * i + 1u] = v.y;
        r[4u * i + 2u] = v.z;
        r[4u * i + 3u] = v.w;
    }
    let o = (b >> 2u) & 3u;
    let s = (b & 2u) * 8u;
    var w: array<u32, 20>;
    for (var j = 0u; j < 4u * n - 3u; j++) {
        let lo = select(select(r[j], r[j + 1u], o == 1u), select(r[j + 2u], r[j + 3u], o == 3u), o >= 2u);
        let hi = select(select(r[j + 1u], r[j + 2u], o == 1u), select(r[j + 3u], r[j + 4u], o == 3u), o >= 2u);
        w[j] = funnel(lo, hi, s);
    }
    return w;
}

fn f16lo(w: u32) -> f32 {
    return unpack2x16float(w).x;
}

fn f16hi(w: u32) -> f32 {
    return unpack2x16float(w).y;
}

// bits 0..3 of b spread to bit 0 of each byte (the four partial products never overlap)
fn spread4(b: u32) -> u32 {
    return ((b & 0xFu) * 0x204081u) & 0x01010101u;
}

fn lo_nib(w: u32) -> vec4<f32> {
    return vec4<f32>(u8x4(w & 0x0F0F0F0Fu));
}

fn hi_nib(w: u32) -> vec4<f32> {
    return vec4<f32>(u8x4((w >> 4u) & 0x0F0F0F0Fu));
}

fn hsum(v: vec4<f32>) -> f32 {
    return v.x + v.y + v.z + v.w;
}

// Σ q_j · x_j over a 32-element unit of nibbles, four bytes per word: element j in the low
// nibble of byte j, element j + 16 in its high nibble (Q4_0 / Q4_1 quants), as a vec4 to sum
fn nibble_dot(q: vec4<u32>) -> vec4<f32> {
    return lo_nib(q.x) * xv[0] + lo_nib(q.y) * xv[1] + lo_nib(q.z) * xv[2] + lo_nib(q.w) * xv[3]
         + hi_nib(q.x) * xv[4] + hi_nib(q.y) * xv[5] + hi_nib(q.z) * xv[6] + hi_nib(q.w) * xv[7];
}

// Σ q_j · x_j over a 32-element unit of 5-bit values: nibbles as for nibble_dot, and the fifth
// bit of element j at bit j of qh (Q5_0 / Q5_1)
fn fifth_bit_dot(q: vec4<u32>, qh: u32) -> vec4<f32> {
    let qa = array<u32, 4>(q.x, q.y, q.z, q.w);
    var acc = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        let lo = vec4<f32>(u8x4((qa[i] & 0x0F0F0F0Fu) | (spread4(qh >> (4u * i)) << 4u)));
        let hi = vec4<f32>(u8x4(((qa[i] >> 4u) & 0x0F0F0F0Fu) | (spread4(qh >> (16u + 4u * i)) << 4u)));
        acc += lo * xv[i] + hi * xv[i + 4u];
    }
    return acc;
}

// word w of the weights
fn word(w: u32) -> u32 {
    return src_v[w >> 2u][w & 3u];
}

// Σ xv[first..first+n]
fn xv_sum(first: u32, n: u32) -> f32 {
    var s = vec4<f32>(0.0);
    for (var i = first; i < first + n; i++) {
        s += xv[i];
    }
    return hsum(s);
}

#if TYPE_Q8_0
// split as dequant.wgsl says: the unit's 32 quants are two aligned vec4s at byte row + 32u, its
// d the f16 number row / 32 + u of the scales after the chunk's n_rows · k quant bytes
const UNIT: u32 = 32u;
var<private> xv: array<vec4<f32>, 8>;
alias XSums = f32;   // unused: no offsets
var<private> x_sums: XSums;
fn prepare_x() {}
struct Unit { qa: vec4<u32>, qb: vec4<u32>, d: f32 }
fn load_unit(row: u32, u: u32) -> Unit {
    let q = (row >> 4u) + 2u * u;
    let e = (row >> 5u) + u;
    return Unit(src_v[q], src_v[q + 1u], unpack2x16float(word((p.n_rows * p.k) / 4u + e / 2u))[e & 1u]);
}
fn dot_loaded(w: Unit) -> f32 {
    let acc = i8x4(w.qa.x) * xv[0] + i8x4(w.qa.y) * xv[1] + i8x4(w.qa.z) * xv[2] + i8x4(w.qa.w) * xv[3]
            + i8x4(w.qb.x) * xv[4] + i8x4(w.qb.y) * xv[5] + i8x4(w.qb.z) * xv[6] + i8x4(w.qb.w) * xv[7];
    return w.d * hsum(acc);
}
#endif

#if TYPE_Q4_0
// split as dequant.wgsl says: the unit's 16 bytes of nibbles are one aligned vec4 (element j low
// nibble of byte j, j + 16 high), its f16 d the number row / 16 + u after the n_rows · k / 2
// nibble bytes; x = (q - 8) d
const UNIT: u32 = 32u;
var<private> xv: array<vec4<f32>, 8>;
alias XSums = f32;   // the unit's Σ x
var<private> x_sums: XSums;
fn prepare_x() {
    x_sums = xv_sum(0u, 8u);
}
struct Unit { q: vec4<u32>, d: f32 }
fn load_unit(row: u32, u: u32) -> Unit {
    let b = (row >> 4u) + u;
    return Unit(src_v[b], unpack2x16float(word(p.n_rows * p.k / 8u + b / 2u))[b & 1u]);
}
fn dot_loaded(w: Unit) -> f32 {
    return w.d * (hsum(nibble_dot(w.q)) - 8.0 * x_sums);
}
#endif

#if TYPE_Q4_1
// split like Q4_0, with a d, m word per block after the nibbles; x = q d + m
const UNIT: u32 = 32u;
var<private> xv: array<vec4<f32>, 8>;
alias XSums = f32;   // the unit's Σ x
var<private> x_sums: XSums;
fn prepare_x() {
    x_sums = xv_sum(0u, 8u);
}
struct Unit { q: vec4<u32>, dm: vec2<f32> }
fn load_unit(row: u32, u: u32) -> Unit {
    let b = (row >> 4u) + u;
    return Unit(src_v[b], unpack2x16float(word(p.n_rows * p.k / 8u + b)));
}
fn dot_loaded(w: Unit) -> f32 {
    return w.dm.x * hsum(nibble_dot(w.q)) + w.dm.y * x_sums;
}
#endif

#if TYPE_Q5_0
// split as dequant.wgsl says: the unit's nibbles one aligned vec4, its qh (fifth bit of element
// j at bit j) the word after the n_rows · k / 2 nibble bytes, its f16 d after every qh;
// x = (q - 16) d
const UNIT: u32 = 32u;
var<private> xv: array<vec4<f32>, 8>;
alias XSums = f32;   // the unit's Σ x
var<private> x_sums: XSums;
fn prepare_x() {
    x_sums = xv_sum(0u, 8u);
}
struct Unit { q: vec4<u32>, qh: u32, d: f32 }
fn load_unit(row: u32, u: u32) -> Unit {
    let b = (row >> 4u) + u;
    let qs_words = p.n_rows * p.k / 8u;
    let dw = qs_words + p.n_rows * p.k / 32u + b / 2u;
    return Unit(src_v[b], word(qs_words + b), unpack2x16float(word(dw))[b & 1u]);
}
fn dot_loaded(w: Unit) -> f32 {
    return w.d * (hsum(fifth_bit_dot(w.q, w.qh)) - 16.0 * x_sums);
}
#endif

#if TYPE_Q5_1
// split like Q5_0, with a d, m word per block after the qh words; x = q d + m
const UNIT: u32 = 32u;
var<private> xv: array<vec4<f32>, 8>;
alias XSums = f32;   // the unit's Σ x
var<private> x_sums: XSums;
fn prepare_x() {
    x_sums = xv_sum(0u, 8u);
}
struct Unit { q: vec4<u32>, qh: u32, dm: vec2<f32> }
fn load_unit(row: u32, u: u32) -> Unit {
    let b = (row >> 4u) + u;
    let qs_words = p.n_rows * p.k / 8u;
    return Unit(src_v[b], word(qs_words + b), unpack2x16float(word(qs_words + p.n_rows * p.k / 32u + b)));
}
fn dot_loaded(w: Unit) -> f32 {
    return w.dm.x * hsum(fifth_bit_dot(w.q, w.qh)) + w.dm.y * x_sums;
}
#endif

// Q4_K / Q5_K: the 6-bit scale and min of sub-blocks 2g and 2g+1 from the 12 scale bytes in
// words s0..s2 (ggml's get_scale_min_k4), as (sc0, m0, sc1, m1).
fn k4_group_scales(s0: u32, s1: u32, s2: u32, g: u32) -> vec4<f32> {
    var r: array<f32, 4>;
    for (var t = 0u; t < 2u; t++) {
        let sh = ((2u * g + t) & 3u) * 8u;
        let b0 = (s0 >> sh) & 0xFFu;
        let b1 = (s1 >> sh) & 0xFFu;
        let b2 = (s2 >> sh) & 0xFFu;
        let high = g >= 2u;
        r[2u * t] = f32(select(b0 & 63u, (b2 & 0xFu) | ((b0 >> 6u) << 4u), high));
        r[2u * t + 1u] = f32(select(b1 & 63u, (b2 >> 4u) | ((b1 >> 6u) << 4u), high));
    }
    return vec4<f32>(r[0], r[1], r[2], r[3]);
}

#if TYPE_Q4_K
// 144 bytes (9 vec4s): f16 d, f16 dmin, 12 bytes of scales | 128 bytes of nibbles, 32 per group
const UNIT: u32 = 64u;
var<private> xv: array<vec4<f32>, 16>;
alias XSums = vec2<f32>;   // Σ x over the unit's two 32-element halves
var<private> x_sums: XSums;
fn prepare_x() {
    x_sums = vec2<f32>(xv_sum(0u, 8u), xv_sum(8u, 8u));
}
struct Unit { head: vec4<u32>, qa: vec4<u32>, qb: vec4<u32>, g: u32 }
fn load_unit(row: u32, u: u32) -> Unit {
    let v = (row + (u / 4u) * 144u) >> 4u;
    let g = u % 4u;
    return Unit(src_v[v], src_v[v + 1u + 2u * g], src_v[v + 2u + 2u * g], g);
}
fn dot_loaded(w: Unit) -> f32 {
    let head = w.head;
    let sm = k4_group_scales(head.y, head.z, head.w, w.g);
    let q = array<u32, 8>(w.qa.x, w.qa.y, w.qa.z, w.qa.w, w.qb.x, w.qb.y, w.qb.z, w.qb.w);
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    for (var i = 0u; i < 8u; i++) {
        lo += lo_nib(q[i]) * xv[i];
        hi += hi_nib(q[i]) * xv[i + 8u];
    }
    return f16lo(head.x) * (sm.x * hsum(lo) + sm.z * hsum(hi)) - f16hi(head.x) * (sm.y * x_sums.x + sm.w * x_sums.y);
}
#endif

#if TYPE_Q5_K
// 176 bytes (11 vec4s): f16 d, f16 dmin, 12 bytes of scales | 32 bytes qh | 128 bytes of nibbles;
// element l of sub-block s takes bit s of qh[l]
const UNIT: u32 = 64u;
var<private> xv: array<vec4<f32>, 16>;
alias XSums = vec2<f32>;   // Σ x over the unit's two 32-element halves
var<private> x_sums: XSums;
fn prepare_x() {
    x_sums = vec2<f32>(xv_sum(0u, 8u), xv_sum(8u, 8u));
}
struct Unit { head: vec4<u32>, ha: vec4<u32>, hb: vec4<u32>, qa: vec4<u32>, qb: vec4<u32>, g: u32 }
fn load_unit(row: u32, u: u32) -> Unit {
    let v = (row + (u / 4u) * 176u) >> 4u;
    let g = u % 4u;
    return Unit(src_v[v], src_v[v + 1u], src_v[v + 2u], src_v[v + 3u + 2u * g], src_v[v + 4u + 2u * g], g);
}
fn dot_loaded(w: Unit) -> f32 {
    let head = w.head;
    let g = w.g;
    let sm = k4_group_scales(head.y, head.z, head.w, g);
    let q = array<u32, 8>(w.qa.x, w.qa.y, w.qa.z, w.qa.w, w.qb.x, w.qb.y, w.qb.z, w.qb.w);
    let h = array<u32, 8>(w.ha.x, w.ha.y, w.ha.z, w.ha.w, w.hb.x, w.hb.y, w.hb.z, w.hb.w);
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    for (var i = 0u; i < 8u; i++) {
        let hh = h[i] >> (2u * g);
        lo += vec4<f32>(u8x4((q[i] & 0x0F0F0F0Fu) | ((hh & 0x01010101u) << 4u))) * xv[i];
        hi += vec4<f32>(u8x4(((q[i] >> 4u) & 0x0F0F0F0Fu) | (((hh >> 1u) & 0x01010101u) << 4u))) * xv[i + 8u];
    }
    return f16lo(head.x) * (sm.x * hsum(lo) + sm.z * hsum(hi)) - f16hi(head.x) * (sm.y * x_sums.x + sm.w * x_sums.y);
}
#endif

#if TYPE_Q6_K
// 210 bytes: 128 bytes ql (low 4 bits), 64 bytes qh (high 2 bits), 16 x i8 scales, f16 d last.
// Unit = half h: ql bytes 64h.., qh bytes 128 + 32h.., scales 192 + 8h.. Its quarter q (32
// elements) takes ql's low (q < 2) or high nibbles of bytes 32 (q & 1) + l, bits 2q, 2q+1 of
// qh[l], and scale 2q + l / 16.
const UNIT: u32 = 128u;
var<private> xv: array<vec4<f32>, 32>;
alias XSums = f32;   // unused: no offsets
var<private> x_sums: XSums;
fn prepare_x() {}
fn q6_quarter(ql: array<u32, 20>, qh: array<u32, 20>, q: u32, sw: u32) -> f32 {
    var part0 = vec4<f32>(0.0);
    var part1 = vec4<f32>(0.0);
    for (var i = 0u; i < 8u; i++) {
        let low4 = (ql[(q & 1u) * 8u + i] >> (4u * (q >> 1u))) & 0x0F0F0F0Fu;
        let high2 = (qh[i] >> (2u * q)) & 0x03030303u;
        let v = (vec4<f32>(u8x4(low4 | (high2 << 4u))) - 32.0) * xv[8u * q + i];
        if (i < 4u) { part0 += v; } else { part1 += v; }
    }
    // scales 2q (l < 16) and 2q + 1 as signed bytes, at bits 16 (q & 1) of sw
    let sc = vec2<i32>(i32(sw << (24u - 16u * (q & 1u))), i32(sw << (16u - 16u * (q & 1u)))) >> vec2<u32>(24u);
    return f32(sc.x) * hsum(part0) + f32(sc.y) * hsum(part1);
}

struct Unit { row: u32, u: u32 }
fn load_unit(row: u32, u: u32) -> Unit {
    return Unit(row, u);
}
fn dot_loaded(w: Unit) -> f32 {
    let b = w.row + (w.u / 2u) * 210u;
    let h = w.u % 2u;
    let ql = vwords(b + 64u * h, 5u);
    let qh = vwords(b + 128u + 32u * h, 3u);
    let tail = vwords(b + 192u, 2u);   // scales of both halves, then d
    let sc_lo = select(tail[0], tail[2], h == 1u);
    let sc_hi = select(tail[1], tail[3], h == 1u);
    let acc = q6_quarter(ql, qh, 0u, sc_lo) + q6_quarter(ql, qh, 1u, sc_lo)
            + q6_quarter(ql, qh, 2u, sc_hi) + q6_quarter(ql, qh, 3u, sc_hi);
    return f16lo(tail[4]) * acc;
}
#endif

// every type's unit product, loaded and made in one go
fn dot_unit(row: u32, u: u32) -> f32 {
    return dot_loaded(load_unit(row, u));
}
