// The gradients of act = f(gate) · up (f: SiLU, or tanh-GELU with GELU) with respect to gate
// and up: d_gate = d_act · up · f'(gate), d_up = d_act · f(gate). All [n] f32.

struct Params {
    n: u32,
}

@group(0) @binding(0) var<storage, read> gate: array<f32>;
@group(0) @binding(1) var<storage, read> up: array<f32>;
@group(0) @binding(2) var<storage, read> d_act: array<f32>;
@group(0) @binding(3) var<storage, read_write> d_gate: array<f32>;
@group(0) @binding(4) var<storage, read_write> d_up: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

#include "lib/activation.wgsl"

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.n) {
        return;
    }
    let g = gate[i];
    let d = d_act[i];
#if GELU
    let c = 0.7978845608028654;
    let t = stable_tanh(c * (g + 0.044715 * g * g * g));
    let f = 0.5 * g * (1.0 + t);
    let df = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g);
#else
    let s = 1.0 / (1.0 + exp(-g));
    let f = g * s;
    let df = s * (1.0 + g * (1.0 - s));
#endif
    d_gate[i] = d * up[i] * df;
    d_up[i] = d * f;
}
