// The gradient of a (LoRA factor's) weight matrix W: [n_rows][k] in y = x · Wᵀ, summed over
// m tokens and added to dw (gradients accumulate over a batch's sequences):
//   dw[r][c] += scale · Σ_t dy[t][dy_offset + r] · x[t][c]
// dy: [m][dy_stride] f32 (a column range of a wider output, for fused tensors), x: [m][k] f32.
// One invocation per element of dw, walking the tokens; with TILES (n_rows, k, dy_stride and
// dy_offset multiples of 4) one per 4 x 4 block of dw, whose two quad loads a token (of dy
// and of x) serve 16 multiply-adds where the scalar kernel's two loads serve one (on CPU
// devices every component of a load is a per-lane step).

struct Params {
    n_rows: u32,
    k: u32,
    m: u32,
    dy_stride: u32,
    dy_offset: u32,
    scale: f32,
}

#if TILES
@group(0) @binding(0) var<storage, read> dy: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dw: array<vec4<f32>>;
#else
@group(0) @binding(0) var<storage, read> dy: array<f32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> dw: array<f32>;
#endif
@group(0) @binding(3) var<uniform> p: Params;

#if TILES
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    let quads = p.k / 4u;
    if (i >= p.n_rows / 4u * quads) {
        return;
    }
    // rows r0..r0+3, columns 4·c..4·c+3
    let r0 = i / quads * 4u;
    let c = i % quads;
    let dy_quads = p.dy_stride / 4u;
    let dy_col = (p.dy_offset + r0) / 4u;
    var a0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    for (var t = 0u; t < p.m; t++) {
        let d = dy[t * dy_quads + dy_col];
        let xv = x[t * quads + c];
        a0 = fma(vec4<f32>(d.x), xv, a0);
        a1 = fma(vec4<f32>(d.y), xv, a1);
        a2 = fma(vec4<f32>(d.z), xv, a2);
        a3 = fma(vec4<f32>(d.w), xv, a3);
    }
    dw[r0 * quads + c] += p.scale * a0;
    dw[(r0 + 1u) * quads + c] += p.scale * a1;
    dw[(r0 + 2u) * quads + c] += p.scale * a2;
    dw[(r0 + 3u) * quads + c] += p.scale * a3;
}
#else
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
#endif
