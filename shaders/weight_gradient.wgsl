// The gradient of a (LoRA factor's) weight matrix W: [n_rows][k] in y = x · Wᵀ, summed over
// m tokens and added to dw (gradients accumulate over a batch's sequences):
//   dw[r][c] += scale · Σ_t dy[t][dy_offset + r] · x[t][c]
// dy: [m][dy_stride] f32 (a column range of a wider output, for fused tensors), x: [m][k] f32.
// One invocation per element of dw, walking the tokens.

struct Params {
    n_rows: u32,
    k: u32,
    m: u32,
    dy_stride: u32,
    dy_offset: u32,
    scale: f32,
}

@group(0) @binding(0) var<storage, read> dy: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> dw: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.n_rows * p.k) {
        return;
    }
    let r = i / p.k;
    let c = i % p.k;
    var s = 0.0;
    for (var t = 0u; t < p.m; t++) {
        s = fma(dy[t * p.dy_stride + p.dy_offset + r], x[t * p.k + c], s);
    }
    dw[i] += p.scale * s;
}
