// RoPE's rotation angles (no buffer access) for rope_kv.wgsl: pair i of a
// head at position pos turns by θ_i = pos · freq_scale · base^(−2i/n_rot).

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

// (sin θ_i, cos θ_i) for pair i at position pos
fn rope_sin_cos(pos: u32, i: u32, n_rot: u32, log2_base: f32, freq_scale: f32) -> vec2<f32> {
    let inv_freq = exp2(-2.0 * f32(i) / f32(n_rot) * log2_base);
    return sin_cos(f32(pos) * freq_scale * inv_freq);
}

// the two elements pair i of the head starting at base turns: (2i, 2i+1), or (i, i + n_rot/2)
// in NeoX mode
fn rope_pair(base: u32, i: u32, n_rot: u32, neox: bool) -> vec2<u32> {
    if (neox) {
        return vec2<u32>(base + i, base + i + n_rot / 2u);
    }
    return vec2<u32>(base + 2u * i, base + 2u * i + 1u);
}

// (a, b) turned by the angle whose (sin, cos) is sc
fn rotate(a: f32, b: f32, sc: vec2<f32>) -> vec2<f32> {
    return vec2<f32>(a * sc.y - b * sc.x, a * sc.x + b * sc.y);
}
