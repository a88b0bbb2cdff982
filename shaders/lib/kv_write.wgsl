// Writing pairs of elements into the KV cache (see kv.wgsl for its element types), for the
// kernels that declare read-write `k_cache` and `v_cache` (rope_kv.wgsl, and matvec.wgsl when it
// writes the cache itself). put_k(d, a, b) stores elements d, d + 1 (d even): a packed f16
// word is written whole by one invocation. KV_Q8 (rope_kv.wgsl alone): put_k_q8 / put_v_q8
// store two whole q8_0 blocks, quantized by q8_block, with their scale word.
#include "lib/kv.wgsl"

#if KV_Q8
// a block of 32 values quantized as ggml's quantize_row_q8_0: scale d = amax / 127, each value
// round(x / d) (ties to even; ggml's rounds them away from zero), the int8s four to a word;
// d is stored as f16
struct Q8Block { q: array<u32, 8>, d: f32 }

fn q8_block(x: array<f32, 32>) -> Q8Block {
    var amax = 0.0;
    for (var i = 0u; i < 32u; i++) {
        amax = max(amax, abs(x[i]));
    }
    let d = amax / 127.0;
    let id = select(0.0, 1.0 / d, d > 0.0);
    var b: Q8Block;
    b.d = d;
    for (var w = 0u; w < 8u; w++) {
        let q = vec4<i32>(round(vec4<f32>(x[4u * w], x[4u * w + 1u], x[4u * w + 2u], x[4u * w + 3u]) * id));
        let u = vec4<u32>(bitcast<vec4<u32>>(q) & vec4<u32>(0xffu)) << vec4<u32>(0u, 8u, 16u, 24u);
        b.q[w] = u.x | u.y | u.z | u.w;
    }
    return b;
}

// blocks a and b at elements e.. e + 63 of the cache (e a multiple of 64)
fn put_k_q8(e: u32, a: Q8Block, b: Q8Block) {
    for (var w = 0u; w < 8u; w++) {
        k_cache[e / 4u + w] = a.q[w];
        k_cache[e / 4u + 8u + w] = b.q[w];
    }
    k_cache[q8_scale_word(e)] = pack2x16float(vec2<f32>(a.d, b.d));
}

fn put_v_q8(e: u32, a: Q8Block, b: Q8Block) {
    for (var w = 0u; w < 8u; w++) {
        v_cache[e / 4u + w] = a.q[w];
        v_cache[e / 4u + 8u + w] = b.q[w];
    }
    v_cache[q8_scale_word(e)] = pack2x16float(vec2<f32>(a.d, b.d));
}
#else

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
#endif
