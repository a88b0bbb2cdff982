// Writing pairs of elements into the KV cache (see kv.wgsl for its element types), for the
// kernels that declare read-write `k_cache` and `v_cache` (rope_kv.wgsl, and matvec.wgsl when it
// writes the cache itself). put_k(d, a, b) stores elements d, d + 1 (d even): a packed f16
// word is written whole by one invocation. KV_Q8 (rope_kv.wgsl, and matvec.wgsl through
// lib/product_out.wgsl's store_qkv_q8): q8_pack quantizes four values of a q8_0 block,
// put_q8_word stores a word of int8s or scales.
#include "lib/kv.wgsl"

#if KV_Q8
// ggml's quantize_row_q8_0, four values at a time: with a block's scale d = amax / 127 and
// id = 1 / d (0 for an all-zero block), each value becomes round(x · id) (ties to even; ggml's
// rounds them away from zero), the four int8s packed into a word, the first in its low byte;
// d is stored as f16. No arrays: llvmpipe indexes a private array by a loop variable through
// a per-lane loop, which made the q8_0 rope_kv cost more than the products of its layer.
fn q8_pack(x: vec4<f32>, id: f32) -> u32 {
    let q = bitcast<vec4<u32>>(vec4<i32>(round(x * id))) & vec4<u32>(0xffu);
    return q.x | (q.y << 8u) | (q.z << 16u) | (q.w << 24u);
}

// word w of the k (is_v false) or v cache
fn put_q8_word(is_v: bool, w: u32, value: u32) {
    if (is_v) {
        v_cache[w] = value;
    } else {
        k_cache[w] = value;
    }
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
