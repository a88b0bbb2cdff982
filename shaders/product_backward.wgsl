// The gradient of y = x · Wᵀ with respect to x, for weights as GGUF stores them (W frozen):
//   dx[t][c] (+)= Σ_r dy[t][row_offset + r − dy_first_row] · W[r][c]
// over the rows r_begin..r_end of one binding-sized chunk of W (rows row_offset.. of the whole
// matrix); dy: [m][dy_stride], its column 0 the gradient of row dy_first_row (a stacked
// matrix's part); dx: [m][k] f32, added to with ACCUMULATE (the recorder adds every chunk and
// row range after the first).
// One invocation per (8 tokens, 4 columns), walking the rows: each dq4 decodes four columns
// of a row once for eight tokens (written out: a loop over the tokens would count against
// llvmpipe's loop budget once per row and token; 16 tokens measured slower on lavapipe).
// DY_BROADCAST (with DY_QUADS; subgroups of exactly 8 lanes, workgroups of 8, k a multiple of
// 32 so that a workgroup's lanes share their tokens): CPU devices pay a per-lane load for every
// component of dy, the same for all lanes; instead lane j loads token j's four gradients and
// subgroupBroadcast hands them to the others.
// PAIRED (Q4_0, Q4_1, Q5_0, Q5_1): an invocation takes columns c..c+3 and c+16..c+19 of a
// block, the low and high nibbles of the same quant word, so each word and scale loaded (and
// each broadcast gradient) serves twice the multiply-adds (with DY_BROADCAST, k a multiple of
// 64 for the lanes to share their tokens).

struct Params {
    n_rows: u32,
    k: u32,
    row_bytes: u32,
    row_offset: u32,
    m: u32,
    dy_stride: u32,
    dy_first_row: u32,
    r_begin: u32,
    r_end: u32,
}

@group(0) @binding(0) var<storage, read> src_q: array<u32>;
#if DY_QUADS
@group(0) @binding(1) var<storage, read> dy: array<vec4<f32>>;
#else
@group(0) @binding(1) var<storage, read> dy: array<f32>;
#endif
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

#include "lib/dequant.wgsl"

const TOKENS: u32 = 8u;

var<private> acc: array<vec4<f32>, 8>;

#if PAIRED
// columns c..c+3 and c+16..c+19 (c % 32 < 16) of a row, from one quant word and one scale
struct Cols {
    lo: vec4<f32>,
    hi: vec4<f32>,
}
var<private> acc_hi: array<vec4<f32>, 8>;
const COLUMNS: u32 = 8u;
const LOW_NIBBLES: u32 = 0x0F0F0F0Fu;
#if TYPE_Q4_0
fn dq_cols(row: u32, c: u32) -> Cols {
    let b = row / 16u + c / 32u;
    let d = ld_f16(p.n_rows * p.k / 2u + 2u * b);
    let w = ld_u32(16u * b + c % 16u);
    return Cols(d * (vec4<f32>(u8x4(w & LOW_NIBBLES)) - 8.0), d * (vec4<f32>(u8x4((w >> 4u) & LOW_NIBBLES)) - 8.0));
}
#endif
#if TYPE_Q4_1
fn dq_cols(row: u32, c: u32) -> Cols {
    let b = row / 16u + c / 32u;
    let dm = unpack2x16float(src_q[p.n_rows * p.k / 8u + b]);
    let w = ld_u32(16u * b + c % 16u);
    return Cols(dm.x * vec4<f32>(u8x4(w & LOW_NIBBLES)) + dm.y, dm.x * vec4<f32>(u8x4((w >> 4u) & LOW_NIBBLES)) + dm.y);
}
#endif
#if TYPE_Q5_0
fn dq_cols(row: u32, c: u32) -> Cols {
    let b = row / 16u + c / 32u;
    let qs_bytes = p.n_rows * p.k / 2u;
    let qh = src_q[qs_bytes / 4u + b];
    let w = ld_u32(16u * b + c % 16u);
    let d = ld_f16(qs_bytes + p.n_rows * p.k / 8u + 2u * b);
    let lo = u8x4(w & LOW_NIBBLES) | fifth_bits4(qh, c % 32u);
    let hi = u8x4((w >> 4u) & LOW_NIBBLES) | fifth_bits4(qh, c % 32u + 16u);
    return Cols(d * (vec4<f32>(lo) - 16.0), d * (vec4<f32>(hi) - 16.0));
}
#endif
#if TYPE_Q5_1
fn dq_cols(row: u32, c: u32) -> Cols {
    let b = row / 16u + c / 32u;
    let qs_words = p.n_rows * p.k / 8u;
    let qh = src_q[qs_words + b];
    let dm = unpack2x16float(src_q[qs_words + p.n_rows * p.k / 32u + b]);
    let w = ld_u32(16u * b + c % 16u);
    let lo = u8x4(w & LOW_NIBBLES) | fifth_bits4(qh, c % 32u);
    let hi = u8x4((w >> 4u) & LOW_NIBBLES) | fifth_bits4(qh, c % 32u + 16u);
    return Cols(dm.x * vec4<f32>(lo) + dm.y, dm.x * vec4<f32>(hi) + dm.y);
}
#endif

#if DY_QUADS
// token j's gradients d of four rows into the columns' sums
fn add_cols4(j: u32, d: vec4<f32>, w0: Cols, w1: Cols, w2: Cols, w3: Cols) {
    acc[j] = add4(d, w0.lo, w1.lo, w2.lo, w3.lo, acc[j]);
    acc_hi[j] = add4(d, w0.hi, w1.hi, w2.hi, w3.hi, acc_hi[j]);
}
#endif

fn add_cols_row(t0: u32, r: u32, w: Cols) {
    add_row(t0, r, w.lo);
    let h = acc;
    acc = acc_hi;
    add_row(t0, r, w.hi);
    acc_hi = acc;
    acc = h;
}
#else
// four columns c..c+3 of a row
const COLUMNS: u32 = 4u;
fn dq_cols(row: u32, c: u32) -> vec4<f32> {
    return dq4(row, c);
}
#if DY_QUADS
fn add_cols4(j: u32, d: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>) {
    acc[j] = add4(d, w0, w1, w2, w3, acc[j]);
}
#endif
fn add_cols_row(t0: u32, r: u32, w: vec4<f32>) {
    add_row(t0, r, w);
}
#endif

// this tile's token j (the last token again past the end: read, never written)
fn dy_index(t0: u32, j: u32, r: u32) -> u32 {
    return min(t0 + j, p.m - 1u) * p.dy_stride + p.row_offset + r - p.dy_first_row;
}

#if DY_QUADS
// DY_QUADS (dy's rows and this range start on multiples of 4): four rows at a time, each
// token's four gradients in one load
fn dy_at(t0: u32, j: u32, r: u32) -> f32 {
    let e = dy_index(t0, j, r);
    return dy[e / 4u][e % 4u];
}

#if DY_BROADCAST
fn add_quad(t0: u32, r: u32, c: u32, lane: u32) {
    let w0 = dq_cols(r * p.row_bytes, c);
    let w1 = dq_cols((r + 1u) * p.row_bytes, c);
    let w2 = dq_cols((r + 2u) * p.row_bytes, c);
    let w3 = dq_cols((r + 3u) * p.row_bytes, c);
    let d = dy[dy_index(t0, lane, r) / 4u];
    add_cols4(0u, subgroupBroadcast(d, 0u), w0, w1, w2, w3);
    add_cols4(1u, subgroupBroadcast(d, 1u), w0, w1, w2, w3);
    add_cols4(2u, subgroupBroadcast(d, 2u), w0, w1, w2, w3);
    add_cols4(3u, subgroupBroadcast(d, 3u), w0, w1, w2, w3);
    add_cols4(4u, subgroupBroadcast(d, 4u), w0, w1, w2, w3);
    add_cols4(5u, subgroupBroadcast(d, 5u), w0, w1, w2, w3);
    add_cols4(6u, subgroupBroadcast(d, 6u), w0, w1, w2, w3);
    add_cols4(7u, subgroupBroadcast(d, 7u), w0, w1, w2, w3);
}
#else
fn add_quad(t0: u32, r: u32, c: u32, lane: u32) {
    let w0 = dq_cols(r * p.row_bytes, c);
    let w1 = dq_cols((r + 1u) * p.row_bytes, c);
    let w2 = dq_cols((r + 2u) * p.row_bytes, c);
    let w3 = dq_cols((r + 3u) * p.row_bytes, c);
    add_cols4(0u, dy[dy_index(t0, 0u, r) / 4u], w0, w1, w2, w3);
    add_cols4(1u, dy[dy_index(t0, 1u, r) / 4u], w0, w1, w2, w3);
    add_cols4(2u, dy[dy_index(t0, 2u, r) / 4u], w0, w1, w2, w3);
    add_cols4(3u, dy[dy_index(t0, 3u, r) / 4u], w0, w1, w2, w3);
    add_cols4(4u, dy[dy_index(t0, 4u, r) / 4u], w0, w1, w2, w3);
    add_cols4(5u, dy[dy_index(t0, 5u, r) / 4u], w0, w1, w2, w3);
    add_cols4(6u, dy[dy_index(t0, 6u, r) / 4u], w0, w1, w2, w3);
    add_cols4(7u, dy[dy_index(t0, 7u, r) / 4u], w0, w1, w2, w3);
}
#endif

// a + d.x·w0 + d.y·w1 + d.z·w2 + d.w·w3: four rows' columns weighted by one token's gradients
fn add4(d: vec4<f32>, w0: vec4<f32>, w1: vec4<f32>, w2: vec4<f32>, w3: vec4<f32>, a: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(d.x), w0, fma(vec4<f32>(d.y), w1, fma(vec4<f32>(d.z), w2, fma(vec4<f32>(d.w), w3, a))));
}
#else
fn dy_at(t0: u32, j: u32, r: u32) -> f32 {
    return dy[dy_index(t0, j, r)];
}
#endif

fn add_row(t0: u32, r: u32, w: vec4<f32>) {
    acc[0] = fma(vec4<f32>(dy_at(t0, 0u, r)), w, acc[0]);
    acc[1] = fma(vec4<f32>(dy_at(t0, 1u, r)), w, acc[1]);
    acc[2] = fma(vec4<f32>(dy_at(t0, 2u, r)), w, acc[2]);
    acc[3] = fma(vec4<f32>(dy_at(t0, 3u, r)), w, acc[3]);
    acc[4] = fma(vec4<f32>(dy_at(t0, 4u, r)), w, acc[4]);
    acc[5] = fma(vec4<f32>(dy_at(t0, 5u, r)), w, acc[5]);
    acc[6] = fma(vec4<f32>(dy_at(t0, 6u, r)), w, acc[6]);
    acc[7] = fma(vec4<f32>(dy_at(t0, 7u, r)), w, acc[7]);
}

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    // invocations a tile of tokens takes along a row
    let quads = (p.k + COLUMNS - 1u) / COLUMNS;
    let tiles = (p.m + TOKENS - 1u) / TOKENS;
    // whole workgroups past the end leave (a uniform branch: DY_BROADCAST's lanes all reach
    // the broadcasts); a partial one's extra lanes work on repeats and write nothing
    let first = (wid.x + wid.y * nwg.x) * WG;
    if (first >= tiles * quads) {
        return;
    }
    let live = first + lid < tiles * quads;
    let i = min(first + lid, tiles * quads - 1u);
    let t0 = (i / quads) * TOKENS;
#if PAIRED
    // the low quad's first column (c % 32 < 16); the high quad is 16 further
    let c = (i % quads) / 4u * 32u + (i % quads) % 4u * 4u;
    let whole = true;
#else
    let c = (i % quads) * 4u;
    let whole = c + 4u <= p.k;
#endif
    if (whole) {
        var r = p.r_begin;
#if DY_QUADS
        for (; r + 4u <= p.r_end; r += 4u) {
            add_quad(t0, r, c, lid);
        }
#endif
        for (; r < p.r_end; r++) {
            add_cols_row(t0, r, dq_cols(r * p.row_bytes, c));
        }
    } else {
        // the last columns of a row whose length is no multiple of 4 (a LoRA factor's rank)
        for (var r = p.r_begin; r < p.r_end; r++) {
            var w = vec4<f32>(0.0);
            for (var j = 0u; j < p.k - c; j++) {
                w[j] = dq1(r * p.row_bytes, c + j);
            }
            add_row(t0, r, w);
        }
    }
    for (var j = 0u; j < TOKENS; j++) {
        let t = t0 + j;
        if (t >= p.m || !live) {
            break;
        }
        let out = t * p.k + c;
        for (var e = 0u; e < min(4u, p.k - c); e++) {
#if ACCUMULATE
            dx[out + e] += acc[j][e];
#else
            dx[out + e] = acc[j][e];
#endif
        }
#if PAIRED
        for (var e = 0u; e < 4u; e++) {
#if ACCUMULATE
            dx[out + 16u + e] += acc_hi[j][e];
#else
            dx[out + 16u + e] = acc_hi[j][e];
#endif
        }
#endif
    }
}
