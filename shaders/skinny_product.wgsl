// y[t][r] (+)= scale · Σ_c W[r][c] · x[t][c] for an f32 matrix with few rows or short rows (a
// LoRA factor: A's rank rows, B's rank columns), one invocation per output element so that
// every token and row runs in parallel (the row-walking product kernels leave a rank-8 A's
// eight rows to one invocation). W: [n_rows][k], x: [m][k], y: [m][n_rows]; k a multiple of 4.
// With ACCUMULATE y is added to (an adapter's term into a projection's output).

struct Params {
    n_rows: u32,
    k: u32,
    m: u32,
    scale: f32,
}

@group(0) @binding(0) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.m * p.n_rows) {
        return;
    }
    let t = i / p.n_rows;
    let r = i % p.n_rows;
    let quads = p.k / 4u;
    var s = vec4<f32>(0.0);
    for (var c = 0u; c < quads; c++) {
        s = fma(w[r * quads + c], x[t * quads + c], s);
    }
    let v = p.scale * (s.x + s.y + s.z + s.w);
#if ACCUMULATE
    y[i] += v;
#else
    y[i] = v;
#endif
}
