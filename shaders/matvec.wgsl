// Decode-time product y = W x of a GGUF weight matrix with one activation vector (CPU devices
// run prefill's m tokens through it too), optionally fused with the RMS norm of its input
// (NORM_IN) and with its output step (product_out.wgsl).
// W: [n_rows][k] as stored GGUF blocks (this dispatch sees one binding-sized chunk of rows);
// x: [m][k] f32; norm_w: [k] f32 (NORM_IN: the product reads x / rms(x) · norm_w);
// outputs as product_out.wgsl says, this chunk's rows starting at row_offset.
//
// TPR invocations share a group of RPI consecutive rows: they stride along the rows one unit
// (dot.wgsl: a block or block part sharing its scales) at a time, load that unit's x once for
// all RPI rows, and their partial dot products meet in shared memory. GPUs want many
// invocations per row (TPR 32) so that neighbours read neighbouring bytes. CPU implementations
// of WebGPU (lavapipe, SwiftShader) run a workgroup's invocations as SIMD lanes on one core,
// where every storage load is a per-lane scalar load and barriers cost more than anything
// else: they want TPR 1 (every invocation its own rows, no reduction at all) and several rows
// per invocation, so that each x load serves several rows. Under OUT_GLU an invocation's
// first RPI/2 rows are gate rows and the others the matching up rows.
// Float types (rows of any length) keep dequant.wgsl's dq4 / dq1 over u32 words and read x as
// f32; quantized types (X_VEC4) read both W and x as vec4s (their k is a multiple of 32).
// X_BROADCAST (TPR 1, subgroups of exactly WG = 8 lanes): every lane needs all of a unit's x,
// and llvmpipe pays a per-lane loop for each component of every storage load, uniform address
// or not; so each lane loads one vec4 in 8 and subgroupBroadcast hands it to the others.
// TOKEN_TILE (CPU devices' prefill and batched decode, quantized types, TPR 1): TILE tokens a
// pass (2 to 4) share each load of the weights (dot.wgsl's load_unit, then dot_loaded per
// token); every input and output mode.
// POST_NORM_ADD (with NORM_IN; Gemma 3, whose branches go back into the residual stream
// through a norm of their own): the input is h = resid + x / rms(x) · post_w, read as
// h / rms(h) · norm_w, with norm_w: [2][k] holding [norm_w; post_w]; workgroup 0 also stores h
// into sum: [m][k] for the layers after. That saves the separate norm-and-add dispatch.

struct Params {
    n_rows: u32,      // rows in this chunk
    k: u32,           // row length in elements
    row_bytes: u32,   // stored bytes of one row
    row_offset: u32,  // first row of this chunk in the whole matrix
    m: u32,           // tokens
    n_total: u32,     // rows of the whole matrix
    n0: u32,          // product_out.wgsl: rows to y (OUT_GLU: rows of each half)
    n1: u32,          // rows to y1
    eps: f32,         // NORM_IN
    // OUT_QKV_ROPE
    head_dim: u32,
    n_rot: u32,
    pos0: u32,
    log2_base: f32,
    freq_scale: f32,
    t_begin: u32,     // TOKEN_RANGE: the first token (llvmpipe's loop budget splits long rows)
    kv_row0: u32,     // OUT_QKV_ROPE: the cache row of position 0 (a sequence's slot of a shared cache)
    best0: u32,       // OUT_ARGMAX: this chunk's first slot
    kv_scales: u32,   // OUT_QKV_ROPE with KV_Q8: the word at which the caches' scales start
    // OUT_QKV_ROPE with SEQ_ROWS (a decode step of several sequences): token t's (position,
    // cache row of its position 0) in seqs[t / 2].xy (t even) or .zw (t odd)
    seqs: array<vec4<u32>, 8>,
}

#if X_VEC4
@group(0) @binding(0) var<storage, read> src_v: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> norm_w4: array<vec4<f32>>;
#else
@group(0) @binding(0) var<storage, read> src_q: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read> norm_w: array<f32>;
#endif
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
#if OUT_QKV_ROPE
@group(0) @binding(4) var<storage, read_write> k_cache: array<KvStore>;
@group(0) @binding(5) var<storage, read_write> v_cache: array<KvStore>;
#else
@group(0) @binding(4) var<storage, read_write> y1: array<f32>;
@group(0) @binding(5) var<storage, read_write> y2: array<f32>;
#endif
#if POST_NORM_ADD
#if X_VEC4
@group(0) @binding(6) var<storage, read> resid4: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> sum4: array<vec4<f32>>;
#else
@group(0) @binding(6) var<storage, read> resid: array<f32>;
@group(0) @binding(7) var<storage, read_write> sum: array<f32>;
#endif
#endif
@group(0) @binding(8) var<uniform> p: Params;

#if X_VEC4
#include "lib/dot.wgsl"
#else
#include "lib/dequant.wgsl"
#endif
#include "lib/product_out.wgsl"

#if POST_NORM_ADD
// 1 / rms(x) of tokens branch_t0.. (up to a tile of them)
var<private> branch_inv: vec4<f32>;
var<private> branch_t0: u32;

// Σ x² of token t's branch output over elements first, first + stride, ...
fn branch_ss_from(t: u32, first: u32, stride: u32) -> f32 {
    var ss = 0.0;
#if X_VEC4
    for (var i = first; i < p.k / 4u; i += stride) {
        let v = x4[t * (p.k / 4u) + i];
        ss += dot(v, v);
    }
#else
    for (var i = first; i < p.k; i += stride) {
        ss += x[t * p.k + i] * x[t * p.k + i];
    }
#endif
    return ss;
}

#if ROW_PER_INVOCATION
#if X_BROADCAST
// the workgroup is one subgroup: its lanes share the loads
fn branch_ss(t: u32, lid: u32) -> f32 {
    return subgroupAdd(branch_ss_from(t, lid, WG));
}
#else
// every invocation sums the whole row itself, with no barrier for llvmpipe to pay
fn branch_ss(t: u32, lid: u32) -> f32 {
    return branch_ss_from(t, 0u, 1u);
}
#endif
#else
// GPUs: over the workgroup through shared memory (uniform control flow)
fn branch_ss(t: u32, lid: u32) -> f32 {
    workgroupBarrier();
    partial[lid] = branch_ss_from(t, lid, WG);
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        workgroupBarrier();
        if (lid < stride) {
            partial[lid] += partial[lid + stride];
        }
    }
    workgroupBarrier();
    let total = partial[0];
    workgroupBarrier();
    return total;
}
#endif

// branch_inv for tokens t0..t0+n (the last one repeated past m)
fn prepare_branches(t0: u32, n: u32, lid: u32) {
    branch_t0 = t0;
    for (var j = 0u; j < n; j++) {
        branch_inv[j] = inverseSqrt(branch_ss(min(t0 + j, p.m - 1u), lid) / f32(p.k) + p.eps);
    }
}

// h = resid + x / rms(x) · post_w of token t (prepared by prepare_branches), element e4 (a
// vec4) or e
#if X_VEC4
fn h4(t: u32, e4: u32) -> vec4<f32> {
    let i = t * (p.k / 4u) + e4;
    return resid4[i] + x4[i] * branch_inv[t - branch_t0] * norm_w4[p.k / 4u + e4];
}
#else
fn h1(t: u32, e: u32) -> f32 {
    let i = t * p.k + e;
    return resid[i] + x[i] * branch_inv[t - branch_t0] * norm_w[p.k + e];
}
#endif

// h of tokens t0..t0+n into sum, by workgroup 0's invocations
fn store_sums(t0: u32, n: u32, lid: u32) {
    for (var t = t0; t < t0 + n && t < p.m; t++) {
#if X_VEC4
        for (var e4 = lid; e4 < p.k / 4u; e4 += WG) {
            sum4[t * (p.k / 4u) + e4] = h4(t, e4);
        }
#else
        for (var e = lid; e < p.k; e += WG) {
            sum[t * p.k + e] = h1(t, e);
        }
#endif
    }
}
#endif

const ROWS_PER_WG: u32 = WG / TPR * RPI;
#if OUT_GLU
// an invocation's first HALF rows are gate rows, the others the matching up rows
const HALF: u32 = RPI / 2u;
#endif

#if ROW_PER_INVOCATION
#else
var<workgroup> partial: array<f32, WG>;

// the sum of v over the TPR invocations sharing this invocation's rows, for lane 0
fn row_sum(v: f32, lid: u32, lane: u32) -> f32 {
    partial[lid] = v;
    for (var stride = TPR / 2u; stride > 0u; stride >>= 1u) {
        workgroupBarrier();
        if (lane < stride) {
            partial[lid] += partial[lid + stride];
        }
    }
    let total = partial[lid];
    workgroupBarrier();
    return total;
}
#endif

// Token t's input as the product reads it: x, or x · norm_w under NORM_IN, whose 1 / rms(x)
// scales the finished dot products instead. Σ x² is summed on the way (over the elements this
// invocation reads; invocations sharing a row add theirs up with the dot products), so the
// norm costs no pass of its own over x.
#if X_VEC4
fn x_in4(t: u32, e4: u32, ss: ptr<function, f32>) -> vec4<f32> {
#if POST_NORM_ADD
    let v = h4(t, e4);
#else
    let v = x4[t * (p.k / 4u) + e4];
#endif
#if NORM_IN
    *ss += dot(v, v);
    return v * norm_w4[e4];
#else
    return v;
#endif
}

// Unit u of token t's input into xv; Σ x² of what this invocation loaded into ss, and
// row_group_ss(ss) its total over the unit's loads
#if X_BROADCAST
fn load_unit_x(t: u32, u: u32, lid: u32, ss: ptr<function, f32>) {
    for (var c = 0u; c < UNIT / 4u; c += 8u) {
        let mine = x_in4(t, u * (UNIT / 4u) + c + lid, ss);
        xv[c] = subgroupBroadcast(mine, 0u);
        xv[c + 1u] = subgroupBroadcast(mine, 1u);
        xv[c + 2u] = subgroupBroadcast(mine, 2u);
        xv[c + 3u] = subgroupBroadcast(mine, 3u);
        xv[c + 4u] = subgroupBroadcast(mine, 4u);
        xv[c + 5u] = subgroupBroadcast(mine, 5u);
        xv[c + 6u] = subgroupBroadcast(mine, 6u);
        xv[c + 7u] = subgroupBroadcast(mine, 7u);
    }
}
fn row_group_ss(ss: f32) -> f32 {
    return subgroupAdd(ss);
}
#else
fn load_unit_x(t: u32, u: u32, lid: u32, ss: ptr<function, f32>) {
    for (var c = 0u; c < UNIT / 4u; c++) { xv[c] = x_in4(t, u * (UNIT / 4u) + c, ss); }
}
fn row_group_ss(ss: f32) -> f32 { return ss; }
#endif

#if TOKEN_TILE
// TOKEN_TILE keeps each of its tokens' unit of x (load_unit_x's xv), prepared once (its
// x_sums), and makes a product from it and a loaded unit of weights for each of RPI rows
struct UnitX { xv: array<vec4<f32>, UNIT / 4u>, sums: XSums }
fn unit_x(t: u32, u: u32, lid: u32, ss: ptr<function, f32>) -> UnitX {
    load_unit_x(t, u, lid, ss);
    prepare_x();
    return UnitX(xv, x_sums);
}
fn dot_with(x: UnitX, w: Unit) -> f32 {
    xv = x.xv;
    x_sums = x.sums;
    return dot_loaded(w);
}
#endif
#else
fn x_in(t: u32, e: u32, ss: ptr<function, f32>) -> f32 {
#if POST_NORM_ADD
    let v = h1(t, e);
#else
    let v = x[t * p.k + e];
#endif
#if NORM_IN
    *ss += v * v;
    return v * norm_w[e];
#else
    return v;
#endif
}
#endif

// The end of token t's products: this invocation's dot products for its RPI rows (acc) and,
// under NORM_IN, its Σ x² (ss) summed over the invocations sharing the rows, scaled by
// 1 / rms(x), and stored as product_out.wgsl says by the rows' first invocation, which gets
// them back. r0: the group's first row (OUT_GLU: its first gate row).
fn finish_token(t: u32, acc_in: array<f32, RPI>, ss_in: f32, r0: u32, lid: u32, lane: u32) -> array<f32, RPI> {
    var acc = acc_in;
    var ss = ss_in;
#if ROW_PER_INVOCATION
#if X_VEC4
#if NORM_IN
    ss = row_group_ss(ss);
#endif
#endif
#else
    for (var j = 0u; j < RPI; j++) {
        acc[j] = row_sum(acc[j], lid, lane);
    }
#if NORM_IN
    ss = row_sum(ss, lid, lane);
#endif
#endif
#if NORM_IN
    let inv_rms = inverseSqrt(ss / f32(p.k) + p.eps);
    for (var j = 0u; j < RPI; j++) {
        acc[j] *= inv_rms;
    }
#endif
#if OUT_QKV_ROPE
#if KV_Q8
    // every invocation (TPR 1): the q8_0 blocks are shared through workgroup memory
    store_qkv_q8(t, r0, acc, lid);
#endif
#endif
    if (lane == 0u) {
#if OUT_GLU
        for (var j = 0u; j < HALF; j++) {
            if (r0 + j < p.n0) {
                y[t * p.n0 + r0 + j] = glu(acc[j], acc[j + HALF]);
            }
        }
#else
#if OUT_QKV_ROPE
#if KV_Q8
#else
        for (var j = 0u; j < RPI; j += 2u) {
            if (r0 + j < p.n_rows) {
                store_qkv_pair(t, p.row_offset + r0 + j, acc[j], acc[j + 1u]);
            }
        }
#endif
#else
        for (var j = 0u; j < RPI; j++) {
            if (r0 + j < p.n_rows) {
                store_row(t, p.row_offset + r0 + j, acc[j]);
            }
        }
#endif
#endif
    }
    return acc;
}

#if OUT_ARGMAX
// token 0's best of this invocation's rows (r0.. of the chunk), or its subgroup's, into slot
// best0 + the group's index (lib/product_out.wgsl); uniform control flow
fn store_best(acc: array<f32, RPI>, r0: u32, lid: u32) {
    var best = -3.4e38;
    var row = 0xFFFFFFFFu;
    for (var j = 0u; j < RPI; j++) {
        // strictly greater: the lowest row among equal values, as topk.wgsl ranks them
        if (r0 + j < p.n_rows && acc[j] > best) {
            best = acc[j];
            row = p.row_offset + r0 + j;
        }
    }
#if X_BROADCAST
    let top = subgroupMax(best);
    let top_row = subgroupMin(select(0xFFFFFFFFu, row, best == top));
    if (lid == 0u && r0 < p.n_rows) {
        y1[p.best0 + r0 / ROWS_PER_WG] = top;
        y2[p.best0 + r0 / ROWS_PER_WG] = bitcast<f32>(top_row);
    }
#else
    if (lid % TPR == 0u && r0 < p.n_rows) {
        y1[p.best0 + r0 / RPI] = best;
        y2[p.best0 + r0 / RPI] = bitcast<f32>(row);
    }
#endif
}
#endif

// Tokens first_token()..m: a constant 0 unless this dispatch takes a later range of them
// (TOKEN_RANGE; reading it from the parameters always cost Gemma 3's decode ~5% on lavapipe).
fn first_token() -> u32 {
#if TOKEN_RANGE
    return p.t_begin;
#else
    return 0u;
#endif
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let group = (wid.x + wid.y * nwg.x) * (WG / TPR) + lid / TPR;
    let lane = lid % TPR;
#if POST_NORM_ADD
    let writes_sum = wid.x + wid.y == 0u;
#endif
    // rows past the end repeat the last row (a few wasted loads, no divergent branch) and are
    // not written
    var rows: array<u32, RPI>;
#if OUT_GLU
    let r0 = group * HALF;   // gate rows r0.., up rows n0 + r0..
    for (var j = 0u; j < RPI; j++) {
        let g = min(r0 + j % HALF, p.n0 - 1u);
        rows[j] = (g + select(0u, p.n0, j >= HALF)) * p.row_bytes;
    }
#else
    let r0 = group * RPI;
    for (var j = 0u; j < RPI; j++) {
        rows[j] = min(r0 + j, p.n_rows - 1u) * p.row_bytes;
    }
#endif
#if TOKEN_TILE
    // CPU devices, several tokens (quantized types, TPR 1): TILE (2 to 4) tokens a pass, each
    // unit's weights loaded once for them all, since on CPU devices a load costs more than
    // the arithmetic; tokens past the end repeat the last one and are not written. The
    // constant `TILE > n` conditions leave a smaller tile without the work of tokens it lacks
    // (every token's multiply-adds cost about as much again as the loads: bench/README.md).
    for (var t0 = first_token(); t0 < p.m; t0 += TILE) {
#if POST_NORM_ADD
        prepare_branches(t0, TILE, lid);
        if (writes_sum) { store_sums(t0, TILE, lid); }
#endif
        var acc0 = array<f32, RPI>();
        var acc1 = array<f32, RPI>();
        var acc2 = array<f32, RPI>();
        var acc3 = array<f32, RPI>();
        // each token's Σx² (NORM_IN)
        var ss0 = 0.0;
        var ss1 = 0.0;
        var ss2 = 0.0;
        var ss3 = 0.0;
        let n_units = p.k / UNIT;
        for (var u = 0u; u < n_units; u++) {
            let x0 = unit_x(t0, u, lid, &ss0);
            let x1 = unit_x(min(t0 + 1u, p.m - 1u), u, lid, &ss1);
            var x2 = x1;
            var x3 = x1;
            if (TILE > 2u) { x2 = unit_x(min(t0 + 2u, p.m - 1u), u, lid, &ss2); }
            if (TILE > 3u) { x3 = unit_x(min(t0 + 3u, p.m - 1u), u, lid, &ss3); }
            for (var j = 0u; j < RPI; j++) {
                let w = load_unit(rows[j], u);
                acc0[j] += dot_with(x0, w);
                acc1[j] += dot_with(x1, w);
                if (TILE > 2u) { acc2[j] += dot_with(x2, w); }
                if (TILE > 3u) { acc3[j] += dot_with(x3, w); }
            }
        }
        _ = finish_token(t0, acc0, ss0, r0, lid, lane);
        if (t0 + 1u < p.m) { _ = finish_token(t0 + 1u, acc1, ss1, r0, lid, lane); }
        if (TILE > 2u && t0 + 2u < p.m) { _ = finish_token(t0 + 2u, acc2, ss2, r0, lid, lane); }
        if (TILE > 3u && t0 + 3u < p.m) { _ = finish_token(t0 + 3u, acc3, ss3, r0, lid, lane); }
    }
#else
    // tokens one after another, so that the rows' blocks stay in cache between tokens
    for (var t = first_token(); t < p.m; t++) {
#if POST_NORM_ADD
        prepare_branches(t, 1u, lid);
        if (writes_sum) { store_sums(t, 1u, lid); }
#endif
        var ss = 0.0;
        var acc = array<f32, RPI>();
#if X_VEC4
        let n_units = p.k / UNIT;
        for (var u = lane; u < n_units; u += TPR) {
            load_unit_x(t, u, lid, &ss);
            prepare_x();
            for (var j = 0u; j < RPI; j++) {
                acc[j] += dot_unit(rows[j], u);
            }
        }
#else
        let k4 = p.k & ~3u;
        for (var i = lane * 4u; i < k4; i += TPR * 4u) {
            let xq = vec4<f32>(x_in(t, i, &ss), x_in(t, i + 1u, &ss), x_in(t, i + 2u, &ss), x_in(t, i + 3u, &ss));
            for (var j = 0u; j < RPI; j++) {
                acc[j] += dot(dq4(rows[j], i), xq);
            }
        }
        for (var i = k4 + lane; i < p.k; i += TPR) {
            let xs = x_in(t, i, &ss);
            for (var j = 0u; j < RPI; j++) {
                acc[j] += dq1(rows[j], i) * xs;
            }
        }
#endif
        let done = finish_token(t, acc, ss, r0, lid, lane);
#if OUT_ARGMAX
        store_best(done, r0, lid);
#endif
    }
#endif
}
