// Decode-time product y = W x of a GGUF weight matrix with one activation vector.
// W: [n_rows][k] as stored GGUF blocks (this dispatch sees one binding-sized chunk of rows);
// x: [k] f32; y: [n_rows_total] f32, this chunk written at y[row_offset..].
//
// TPR invocations share a group of RPI consecutive rows: they stride along the rows one unit
// (dot.wgsl: a block or block part sharing its scales) at a time, load that unit's x once for
// all RPI rows, and their partial dot products meet in shared memory. GPUs want many
// invocations per row (TPR 32) so that neighbours read neighbouring bytes. CPU implementations
// of WebGPU (lavapipe, SwiftShader) run a workgroup's invocations as SIMD lanes on one core,
// where every storage load is a per-lane scalar load and barriers cost more than anything
// else: they want TPR 1 (every invocation its own rows, no reduction at all) and several rows
// per invocation, so that each x load serves several rows.
// Float types (rows of any length) keep dequant.wgsl's dq4 / dq1 over u32 words and read x as
// f32; quantized types (X_VEC4) read both W and x as vec4s (their k is a multiple of 32).

struct Params {
    n_rows: u32,      // rows in this chunk
    k: u32,           // row length in elements
    row_bytes: u32,   // stored bytes of one row
    row_offset: u32,  // first output row of this chunk
    m: u32,           // tokens: 1 for decode; CPU devices run prefill's matmul here too
    y_stride: u32,    // elements between tokens in y (= all rows of the matrix)
}

#if X_VEC4
@group(0) @binding(0) var<storage, read> src_v: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read> x4: array<vec4<f32>>;
#else
@group(0) @binding(0) var<storage, read> src_q: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
#endif
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

#if X_VEC4
#include "dot.wgsl"
#else
#include "dequant.wgsl"
#endif

const ROWS_PER_WG: u32 = WG / TPR * RPI;

#if ROW_PER_INVOCATION
#else
var<workgroup> partial: array<f32, WG>;
#endif

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let r0 = (wid.x + wid.y * nwg.x) * ROWS_PER_WG + (lid / TPR) * RPI;
    let lane = lid % TPR;
    // rows past the end repeat the last row (a few wasted loads, no divergent branch) and are
    // not written
    var rows: array<u32, RPI>;
    for (var j = 0u; j < RPI; j++) {
        rows[j] = min(r0 + j, p.n_rows - 1u) * p.row_bytes;
    }
    // tokens one after another, so that the rows' blocks stay in cache between tokens
    for (var t = 0u; t < p.m; t++) {
        var acc = array<f32, RPI>();
        let xt = t * p.k;
        let xt4 = xt / 4u;
#if X_VEC4
        let n_units = p.k / UNIT;
        for (var u = lane; u < n_units; u += TPR) {
            for (var c = 0u; c < UNIT / 4u; c++) {
                xv[c] = x4[xt4 + u * (UNIT / 4u) + c];
            }
            for (var j = 0u; j < RPI; j++) {
                acc[j] += dot_unit(rows[j], u);
            }
        }
#else
        let k4 = p.k & ~3u;
        for (var i = lane * 4u; i < k4; i += TPR * 4u) {
            let xq = vec4<f32>(x[xt + i], x[xt + i + 1u], x[xt + i + 2u], x[xt + i + 3u]);
            for (var j = 0u; j < RPI; j++) {
                acc[j] += dot(dq4(rows[j], i), xq);
            }
        }
        for (var i = k4 + lane; i < p.k; i += TPR) {
            let xs = x[xt + i];
            for (var j = 0u; j < RPI; j++) {
                acc[j] += dq1(rows[j], i) * xs;
            }
        }
#endif
#if ROW_PER_INVOCATION
        for (var j = 0u; j < RPI; j++) {
            if (r0 + j < p.n_rows) {
                y[t * p.y_stride + p.row_offset + r0 + j] = acc[j];
            }
        }
#else
        for (var j = 0u; j < RPI; j++) {
            partial[lid] = acc[j];
            for (var stride = TPR / 2u; stride > 0u; stride >>= 1u) {
                workgroupBarrier();
                if (lane < stride) {
                    partial[lid] += partial[lid + stride];
                }
            }
            if (lane == 0u && r0 + j < p.n_rows) {
                y[t * p.y_stride + p.row_offset + r0 + j] = partial[lid];
            }
            workgroupBarrier();
        }
#endif
    }
}
