// Decode-time product y = W x of a GGUF weight matrix with one activation vector.
// W: [n_rows][k] as stored GGUF blocks (this dispatch sees one binding-sized chunk of rows);
// x: [k] f32; y: [n_rows_total] f32, this chunk written at y[row_offset..].
// TPR invocations share a row: they stride along it four elements at a time and their partial
// dot products meet in shared memory. GPUs want many invocations per row (TPR 32 or 64) so that
// neighbours read neighbouring bytes; CPU implementations of WebGPU (lavapipe, SwiftShader) run
// a workgroup's invocations as SIMD lanes on one core, where barriers cost more than anything
// else, and want TPR 1: every invocation its own row, no reduction at all.

struct Params {
    n_rows: u32,      // rows in this chunk
    k: u32,           // row length in elements
    row_bytes: u32,   // stored bytes of one row
    row_offset: u32,  // first output row of this chunk
}

@group(0) @binding(0) var<storage, read> src_q: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

#include "dequant.wgsl"

const ROWS_PER_WG: u32 = WG / TPR;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = (wid.x + wid.y * nwg.x) * ROWS_PER_WG + lid / TPR;
    let lane = lid % TPR;
    var acc = 0.0;
    if (r < p.n_rows) {
        let row = r * p.row_bytes;
        let k4 = p.k & ~3u;
        for (var i = lane * 4u; i < k4; i += TPR * 4u) {
            acc += dot(dq4(row, i), vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]));
        }
        for (var i = k4 + lane; i < p.k; i += TPR) {
            acc += dq1(row, i) * x[i];
        }
    }
#if ROW_PER_INVOCATION
    if (r < p.n_rows) {
        y[p.row_offset + r] = acc;
    }
#else
    partial[lid] = acc;
    for (var stride = TPR / 2u; stride > 0u; stride >>= 1u) {
        workgroupBarrier();
        if (lane < stride) {
            partial[lid] += partial[lid + stride];
        }
    }
    if (lane == 0u && r < p.n_rows) {
        y[p.row_offset + r] = partial[lid];
    }
#endif
}
