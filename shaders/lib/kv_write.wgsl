// Writing pairs of elements into the KV cache (see kv.wgsl for its element types), for the
// kernels that declare read-write `k_cache` and `v_cache` (rope_kv.wgsl, and matvec.wgsl when it
// writes the cache itself). put_k(d, a, b) stores elements d, d + 1 (d even): a packed f16
// word is written whole by one invocation.
#include "lib/kv.wgsl"

// One function per cache: WGSL passes no storage pointers to functions (without an extension
// browsers do not all have), so the packing is written out for each.
fn put_k(d: u32, a: f32, b: f32) {
#if KV_F16
#if F16
    k_cache[d] = f16(a);
    k_cache[d + 1u] = f16(b);
#else
    k_cache[d >> 1u] = pack2x16float(vec2<f32>(a, b));
#endif
#else
    k_cache[d] = a;
    k_cache[d + 1u] = b;
#endif
}

fn put_v(d: u32, a: f32, b: f32) {
#if KV_F16
#if F16
    v_cache[d] = f16(a);
    v_cache[d + 1u] = f16(b);
#else
    v_cache[d >> 1u] = pack2x16float(vec2<f32>(a, b));
#endif
#else
    v_cache[d] = a;
    v_cache[d + 1u] = b;
#endif
}

