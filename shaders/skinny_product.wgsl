// y[t][r] (+)= scale · Σ_c W[r][c] · x[t][c] for an f32 matrix with few rows or short rows (a
// LoRA factor: A's rank rows, B's rank columns), one invocation per output element so that
// every token and row runs in parallel (the row-walking product kernels leave a rank-8 A's
// eight rows to one invocation). W: [n_rows][k], x: [m][k], y: [m][n_rows]; k a multiple of 4.
// With ACCUMULATE y is added to (an adapter's term into a projection's output).
// TILES (n_rows a multiple of 4): an invocation per 4 tokens x 4 rows, whose eight quad loads a
// step (four of x, four of W) serve 16 quad multiply-adds where one output's two serve one (on
// CPU devices every component of a load is a per-lane step); tokens past m repeat the last and
// write nothing.

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

fn store(t: u32, r: u32, s: vec4<f32>) {
    let i = t * p.n_rows + r;
    let v = p.scale * (s.x + s.y + s.z + s.w);
#if ACCUMULATE
    y[i] += v;
#else
    y[i] = v;
#endif
}

#if TILES
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    let row_tiles = p.n_rows / 4u;
    if (i >= (p.m + 3u) / 4u * row_tiles) {
        return;
    }
    let t0 = i / row_tiles * 4u;
    let r0 = i % row_tiles * 4u;
    let quads = p.k / 4u;
    // token rows of x (the last repeated past m) and rows of W, in quads
    let x0 = min(t0, p.m - 1u) * quads;
    let x1 = min(t0 + 1u, p.m - 1u) * quads;
    let x2 = min(t0 + 2u, p.m - 1u) * quads;
    let x3 = min(t0 + 3u, p.m - 1u) * quads;
    let w0 = r0 * quads;
    // s<token><row>
    var s00 = vec4<f32>(0.0); var s01 = vec4<f32>(0.0); var s02 = vec4<f32>(0.0); var s03 = vec4<f32>(0.0);
    var s10 = vec4<f32>(0.0); var s11 = vec4<f32>(0.0); var s12 = vec4<f32>(0.0); var s13 = vec4<f32>(0.0);
    var s20 = vec4<f32>(0.0); var s21 = vec4<f32>(0.0); var s22 = vec4<f32>(0.0); var s23 = vec4<f32>(0.0);
    var s30 = vec4<f32>(0.0); var s31 = vec4<f32>(0.0); var s32 = vec4<f32>(0.0); var s33 = vec4<f32>(0.0);
    for (var c = 0u; c < quads; c++) {
        let wa = w[w0 + c];
        let wb = w[w0 + quads + c];
        let wc = w[w0 + 2u * quads + c];
        let wd = w[w0 + 3u * quads + c];
        let xa = x[x0 + c];
        s00 = fma(wa, xa, s00); s01 = fma(wb, xa, s01); s02 = fma(wc, xa, s02); s03 = fma(wd, xa, s03);
        let xb = x[x1 + c];
        s10 = fma(wa, xb, s10); s11 = fma(wb, xb, s11); s12 = fma(wc, xb, s12); s13 = fma(wd, xb, s13);
        let xc = x[x2 + c];
        s20 = fma(wa, xc, s20); s21 = fma(wb, xc, s21); s22 = fma(wc, xc, s22); s23 = fma(wd, xc, s23);
        let xd = x[x3 + c];
        s30 = fma(wa, xd, s30); s31 = fma(wb, xd, s31); s32 = fma(wc, xd, s32); s33 = fma(wd, xd, s33);
    }
    store(t0, r0, s00); store(t0, r0 + 1u, s01); store(t0, r0 + 2u, s02); store(t0, r0 + 3u, s03);
    if (t0 + 1u < p.m) {
        store(t0 + 1u, r0, s10); store(t0 + 1u, r0 + 1u, s11); store(t0 + 1u, r0 + 2u, s12); store(t0 + 1u, r0 + 3u, s13);
    }
    if (t0 + 2u < p.m) {
        store(t0 + 2u, r0, s20); store(t0 + 2u, r0 + 1u, s21); store(t0 + 2u, r0 + 2u, s22); store(t0 + 2u, r0 + 3u, s23);
    }
    if (t0 + 3u < p.m) {
        store(t0 + 3u, r0, s30); store(t0 + 3u, r0 + 1u, s31); store(t0 + 3u, r0 + 2u, s32); store(t0 + 3u, r0 + 3u, s33);
    }
}
#else
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
    store(t, r, s);
}
#endif
