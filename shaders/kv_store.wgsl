// Append new keys or values to the KV cache.
// src: [n_tokens][n_kv_head][head_dim] f32 → cache: [ctx][n_kv_head][head_dim] (f32 or f16,
// see kv.wgsl) at positions pos0..pos0+n_tokens. One invocation per pair of elements, so a packed
// f16 word is written whole by one invocation.

struct Params {
    n_pairs: u32,     // n_tokens * n_kv_head * head_dim / 2
    dst_offset: u32,  // pos0 * n_kv_head * head_dim
}

@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> cache: array<KvStore>;
@group(0) @binding(2) var<uniform> p: Params;

#include "kv.wgsl"

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 256u;
    if (i >= p.n_pairs) {
        return;
    }
    let a = src[2u * i];
    let b = src[2u * i + 1u];
    let d = p.dst_offset + 2u * i;
#if KV_F16
#if F16
    cache[d] = f16(a);
    cache[d + 1u] = f16(b);
#else
    cache[d >> 1u] = pack2x16float(vec2<f32>(a, b));
#endif
#else
    cache[d] = a;
    cache[d + 1u] = b;
#endif
}
