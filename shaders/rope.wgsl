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

#include "rotary.wgsl"

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
    let sc = rope_sin_cos(p.pos0 + t, i, p.n_rot, p.log2_base, p.freq_scale);
    let ab = rope_pair(base, i, p.n_rot, p.neox != 0u);
    let turned = rotate(x[ab.x], x[ab.y], sc);
    x[ab.x] = turned.x;
    x[ab.y] = turned.y;
}
