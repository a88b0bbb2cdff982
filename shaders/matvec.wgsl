// Decode-time product y = W x of a GGUF weight matrix with one activation vector.
// W: [n_rows][k] as stored GGUF blocks (this dispatch sees one binding-sized chunk of rows);
// x: [k] f32; y: [n_rows_total] f32, this chunk written at y[row_offset..].
// One workgroup per row: its invocations stride along the row four elements at a time and the
// partial dot products meet in a workgroup reduction.

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
#include "reduce.wgsl"

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32> SG_PARAMS) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.n_rows) {
        return;
    }
    let row = r * p.row_bytes;
    let k4 = p.k & ~3u;
    var acc = 0.0;
    for (var i = lid * 4u; i < k4; i += WG * 4u) {
        acc += dot(dq4(row, i), vec4<f32>(x[i], x[i + 1u], x[i + 2u], x[i + 3u]));
    }
    for (var i = k4 + lid; i < p.k; i += WG) {
        acc += dq1(row, i) * x[i];
    }
    let total = wg_sum(acc, Lane(lid, SG_SIZE, SG_LANE));
    if (lid == 0u) {
        y[p.row_offset + r] = total;
    }
}
