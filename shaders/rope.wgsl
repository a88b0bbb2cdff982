// Rotary position embedding, in place on x: [n_tokens][n_heads][head_dim] f32. Token t sits at
// position pos0 + t; the first n_rot dimensions of each head turn in pairs by
// θ_i = pos · freq_scale · base^(−2i/n_rot): adjacent pairs (2i, 2i+1) in normal mode, halves
// (i, i + n_rot/2) in NeoX mode. One invocation per pair.

struct Params {
    n_tokens: u32,
    n_heads: u32,
    head_dim: u32,
    n_rot: u32,
    pos0: u32,
    neox: u32,
    log2_base: f32,
    freq_scale: f32,
}

@group(0) @binding(0) var<storage, read_write> x: array<f32>;
@group(0) @binding(1) var<uniform> p: Params;

// π/2 in three parts (Cody–Waite): q · PIO2_A is exact for the quadrant counts RoPE meets
// (the first part has 8 significant bits), so the reduced angle keeps f32 precision.
const TWO_OVER_PI: f32 = 0.6366197723675814;
const PIO2_A: f32 = 1.5703125;
const PIO2_B: f32 = 4.837512969970703125e-4;
const PIO2_C: f32 = 7.54978995489188216e-8;

// (sin θ, cos θ) to about an ulp. The builtins are only promised to 2^-11 absolute error on
// [-π, π] (SwiftShader, Chromium's CPU device, is that coarse), which would turn every
// rotation by ~1e-4; a polynomial on [-π/4, π/4] gives every device llama.cpp's answer.
fn sin_cos(theta: f32) -> vec2<f32> {
    let q = round(theta * TWO_OVER_PI);
    let r = ((theta - q * PIO2_A) - q * PIO2_B) - q * PIO2_C;
    let r2 = r * r;
    // Taylor terms to r⁹ / r⁸: the remainders are below 3e-8 for |r| ≤ π/4
    let s = r + r * r2 * (-1.6666667e-1 + r2 * (8.3333333e-3 + r2 * (-1.9841270e-4 + r2 * 2.7557319e-6)));
    let c = 1.0 - 0.5 * r2 + r2 * r2 * (4.1666667e-2 + r2 * (-1.3888889e-3 + r2 * 2.4801587e-5));
    switch (i32(q) & 3) {
        case 0: { return vec2<f32>(s, c); }
        case 1: { return vec2<f32>(c, -s); }
        case 2: { return vec2<f32>(-s, -c); }
        default: { return vec2<f32>(-c, s); }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let half = p.n_rot / 2u;
    let idx = gid.x + gid.y * nwg.x * 256u;
    if (idx >= p.n_tokens * p.n_heads * half) {
        return;
    }
    let i = idx % half;
    let head = idx / half;            // token * n_heads + head
    let t = head / p.n_heads;
    let base = head * p.head_dim;
    let inv_freq = exp2(-2.0 * f32(i) / f32(p.n_rot) * p.log2_base);
    let theta = f32(p.pos0 + t) * p.freq_scale * inv_freq;
    let sc = sin_cos(theta);
    let s = sc.x;
    let c = sc.y;
    var ia = base + 2u * i;
    var ib = ia + 1u;
    if (p.neox != 0u) {
        ia = base + i;
        ib = ia + half;
    }
    let a = x[ia];
    let b = x[ib];
    x[ia] = a * c - b * s;
    x[ib] = a * s + b * c;
}
