// The gradient of y = rms_norm(x) · w with respect to x (w is frozen: no dw), per row:
//   dx = r · w ⊙ dy − x · r³ / n · Σ_i w_i dy_i x_i,   r = 1 / sqrt(mean(x²) + eps)
// x, dy: [n_rows][n] f32, w: [n] → dx: [n_rows][n], added to what dx holds with ACCUMULATE
// (the residual stream's own gradient). One workgroup per row.

struct Params {
    n: u32,
    n_rows: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

#include "lib/reduce.wgsl"

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32> SG_PARAMS) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.n_rows) {
        return;
    }
    let lane = Lane(lid, SG_SIZE, SG_LANE);
    let base = row * p.n;
    var ss = 0.0;
    var dot = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        let v = x[base + i];
        ss += v * v;
        dot += w[i] * dy[base + i] * v;
    }
    let r = inverseSqrt(wg_sum(ss, lane) / f32(p.n) + p.eps);
    let c = r * r * r * wg_sum(dot, lane) / f32(p.n);
    for (var i = lid; i < p.n; i += WG) {
        let g = r * w[i] * dy[base + i] - x[base + i] * c;
#if ACCUMULATE
        dx[base + i] += g;
#else
        dx[base + i] = g;
#endif
    }
}
