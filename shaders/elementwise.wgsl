// Elementwise ops over n f32 values, one invocation per element:
//   add:       out = a + b, b repeating every b_len elements (a bias added to every token)
//   accumulate: out += s · b               (adds a LoRA term into a projection's output)
//   scale:     out = a · s
//   softcap:   out = s · tanh(a / s)         (logit soft-capping)
//   silu_gate: out = silu(a) · b             (SwiGLU, a = gate, b = up)
//   gelu_gate: out = gelu_tanh(a) · b        (GeGLU)

struct Params {
    n: u32,
    s: f32,
    b_len: u32,
}

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

fn index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * nwg.x * 256u;
}

@compute @workgroup_size(256)
fn add(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { out[i] = a[i] + b[i % p.b_len]; }
}

@compute @workgroup_size(256)
fn accumulate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { out[i] = out[i] + p.s * b[i]; }
}

@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { out[i] = a[i] * p.s; }
}

// tanh written out with exp of a non-positive argument: some drivers' tanh overflows to NaN for
// large inputs instead of saturating at ±1
fn stable_tanh(v: f32) -> f32 {
    let e = exp(-2.0 * abs(v));
    return sign(v) * (1.0 - e) / (1.0 + e);
}

@compute @workgroup_size(256)
fn softcap(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { out[i] = p.s * stable_tanh(a[i] / p.s); }
}

@compute @workgroup_size(256)
fn silu_gate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) {
        let g = a[i];
        out[i] = g / (1.0 + exp(-g)) * b[i];
    }
}

@compute @workgroup_size(256)
fn gelu_gate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) {
        let g = a[i];
        let inner = 0.7978845608028654 * (g + 0.044715 * g * g * g);
        out[i] = 0.5 * g * (1.0 + stable_tanh(inner)) * b[i];
    }
}
