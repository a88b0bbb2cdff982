// Elementwise ops over n f32 values, one invocation per element:
//   add:       out = a + b, b repeating every b_len elements (a bias added to every token)
//   accumulate: out += s · b               (adds a LoRA term into a projection's output)
//   accumulate_rows: out[t][e] += s · b[t][offset + e], out rows of `width`, b rows of b_len
//              (a LoRA term of a fused tensor into the output of one of its parts)
//   scale:     out = a · s
//   softcap:   out = s · tanh(a / s)         (logit soft-capping)
//   silu_gate: out = silu(a) · b             (SwiGLU, a = gate, b = up)
//   gelu_gate: out = gelu_tanh(a) · b        (GeGLU)

struct Params {
    n: u32,
    s: f32,
    b_len: u32,
    offset: u32,   // accumulate_rows
    width: u32,    // accumulate_rows
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
fn accumulate_rows(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) {
        let t = i / p.width;
        out[i] = out[i] + p.s * b[t * p.b_len + p.offset + i % p.width];
    }
}

@compute @workgroup_size(256)
fn scale(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { out[i] = a[i] * p.s; }
}

#include "lib/activation.wgsl"

@compute @workgroup_size(256)
fn softcap(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) { out[i] = p.s * stable_tanh(a[i] / p.s); }
}

@compute @workgroup_size(256)
fn silu_gate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) {
        out[i] = silu(a[i]) * b[i];
    }
}

@compute @workgroup_size(256)
fn gelu_gate(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = index(gid, nwg);
    if (i < p.n) {
        out[i] = gelu_tanh(a[i]) * b[i];
    }
}
