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
    let w0 = dq4(r * p.row_bytes, c);
    let w1 = dq4((r + 1u) * p.row_bytes, c);
    let w2 = dq4((r + 2u) * p.row_bytes, c);
    let w3 = dq4((r + 3u) * p.row_bytes, c);
    let d = dy[dy_index(t0, lane, r) / 4u];
    acc[0] = add4(subgroupBroadcast(d, 0u), w0, w1, w2, w3, acc[0]);
    acc[1] = add4(subgroupBroadcast(d, 1u), w0, w1, w2, w3, acc[1]);
    acc[2] = add4(subgroupBroadcast(d, 2u), w0, w1, w2, w3, acc[2]);
    acc[3] = add4(subgroupBroadcast(d, 3u), w0, w1, w2, w3, acc[3]);
    acc[4] = add4(subgroupBroadcast(d, 4u), w0, w1, w2, w3, acc[4]);
    acc[5] = add4(subgroupBroadcast(d, 5u), w0, w1, w2, w3, acc[5]);
    acc[6] = add4(subgroupBroadcast(d, 6u), w0, w1, w2, w3, acc[6]);
    acc[7] = add4(subgroupBroadcast(d, 7u), w0, w1, w2, w3, acc[7]);
}
#else
fn add_quad(t0: u32, r: u32, c: u32, lane: u32) {
    let w0 = dq4(r * p.row_bytes, c);
    let w1 = dq4((r + 1u) * p.row_bytes, c);
    let w2 = dq4((r + 2u) * p.row_bytes, c);
    let w3 = dq4((r + 3u) * p.row_bytes, c);
    acc[0] = add4(dy[dy_index(t0, 0u, r) / 4u], w0, w1, w2, w3, acc[0]);
    acc[1] = add4(dy[dy_index(t0, 1u, r) / 4u], w0, w1, w2, w3, acc[1]);
    acc[2] = add4(dy[dy_index(t0, 2u, r) / 4u], w0, w1, w2, w3, acc[2]);
    acc[3] = add4(dy[dy_index(t0, 3u, r) / 4u], w0, w1, w2, w3, acc[3]);
    acc[4] = add4(dy[dy_index(t0, 4u, r) / 4u], w0, w1, w2, w3, acc[4]);
    acc[5] = add4(dy[dy_index(t0, 5u, r) / 4u], w0, w1, w2, w3, acc[5]);
    acc[6] = add4(dy[dy_index(t0, 6u, r) / 4u], w0, w1, w2, w3, acc[6]);
    acc[7] = add4(dy[dy_index(t0, 7u, r) / 4u], w0, w1, w2, w3, acc[7]);
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
    let quads = (p.k + 3u) / 4u;
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
    let c = (i % quads) * 4u;
    if (c + 4u <= p.k) {
        var r = p.r_begin;
#if DY_QUADS
        for (; r + 4u <= p.r_end; r += 4u) {
            add_quad(t0, r, c, lid);
        }
#endif
        for (; r < p.r_end; r++) {
            add_row(t0, r, dq4(r * p.row_bytes, c));
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
    }
}
