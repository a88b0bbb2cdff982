// Softmax over each row of x: [n_rows][n] f32 → out, one workgroup per row.

struct Params {
    n: u32,
    n_rows: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

#include "lib/reduce.wgsl"

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32> SG_PARAMS) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.n_rows) {
        return;
    }
    let base = r * p.n;
    let lane = Lane(lid, SG_SIZE, SG_LANE);
    var m = -3.4e38;
    for (var i = lid; i < p.n; i += WG) {
        m = max(m, x[base + i]);
    }
    let row_max = wg_max(m, lane);
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        s += exp(x[base + i] - row_max);
    }
    let inv = 1.0 / wg_sum(s, lane);
    for (var i = lid; i < p.n; i += WG) {
        out[base + i] = exp(x[base + i] - row_max) * inv;
    }
}
