// Row normalisations over x: [n_rows][n] f32 with weight (and bias): [n] f32 → out: [n_rows][n].
// One workgroup per row. out may alias nothing; in-place use passes a separate buffer.
//   rms_norm:   x / sqrt(mean(x²) + eps) · w; with ADD_RESIDUAL b + that, b: [n_rows][n] (a
//               post-norm branch added into the residual stream b, as Gemma does after
//               attention and the FFN)
//   layer_norm: (x − mean) / sqrt(var + eps) · w + b

struct Params {
    n: u32,
    n_rows: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

#include "lib/reduce.wgsl"

// 1 / sqrt(mean(x²) + eps) of the row starting at base (every invocation of the workgroup)
fn inv_rms(base: u32, lane: Lane) -> f32 {
    var ss = 0.0;
    for (var i = lane.local; i < p.n; i += WG) {
        ss += x[base + i] * x[base + i];
    }
    return inverseSqrt(wg_sum(ss, lane) / f32(p.n) + p.eps);
}

@compute @workgroup_size(WG)
fn rms_norm(@builtin(local_invocation_index) lid: u32,
            @builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32> SG_PARAMS) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.n_rows) {
        return;
    }
    let base = r * p.n;
    let inv = inv_rms(base, Lane(lid, SG_SIZE, SG_LANE));
    for (var i = lid; i < p.n; i += WG) {
#if ADD_RESIDUAL
        out[base + i] = b[base + i] + x[base + i] * inv * w[i];
#else
        out[base + i] = x[base + i] * inv * w[i];
#endif
    }
}

@compute @workgroup_size(WG)
fn layer_norm(@builtin(local_invocation_index) lid: u32,
              @builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32> SG_PARAMS) {
    let r = wid.x + wid.y * nwg.x;
    if (r >= p.n_rows) {
        return;
    }
    let base = r * p.n;
    let lane = Lane(lid, SG_SIZE, SG_LANE);
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        s += x[base + i];
    }
    let mean = wg_sum(s, lane) / f32(p.n);
    // second pass over the row for the variance: exact where E[x²] − mean² would cancel
    var v = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        let d = x[base + i] - mean;
        v += d * d;
    }
    let inv = inverseSqrt(wg_sum(v, lane) / f32(p.n) + p.eps);
    for (var i = lid; i < p.n; i += WG) {
        out[base + i] = (x[base + i] - mean) * inv * w[i] + b[i];
    }
}
