// How the KV cache stores its elements, shared by the kernels that write and read it.
// KV_F16 selects a half-precision cache. With shader-f16 (the F16 variant) it is a plain
// array<f16>; without it, pairs of halves are packed into u32 words, which every WebGPU device
// can read and write. Element i of a cache array c reads as kv_value(c[kv_word(i)], i).
// Readers that take four elements at a time (i a multiple of 4) may bind the cache as
// array<KvQuad> instead: elements i.. i + 3 read as quad_value(c4[i / 4]), one load for four.
// KV_Q8 selects ggml's q8_0 (see below), whose values read as these give times their block's
// scale, which the readers apply per block.

#if KV_Q8
// q8_0: blocks of 32 elements along a cache row, each 32 int8s and an f16 scale (element =
// int8 · scale, as ggml's). A layer's cache is one array<u32>: the int8s four to a word, rows
// laid out as the float caches', then from word p.kv_scales the scales two to a word (block b
// of the cache, elements 32b.., in word kv_scales + b / 2, its low half for b even).
// Scales apart, not in ggml's 34-byte blocks: each head's int8s then start 16-byte aligned.
// A row holds a multiple of 64 elements, so that no scale word is shared by two rows (written
// by two invocations); head_dim is a multiple of 32, so that no block straddles two heads.
// kv_value and quad_value give the int8s unscaled; q8_scale gives the scale.
alias KvStore = u32;
alias KvQuad = u32;
fn kv_word(i: u32) -> u32 { return i >> 2u; }
fn kv_value(w: KvStore, i: u32) -> f32 { return f32(extractBits(bitcast<i32>(w), 8u * (i & 3u), 8u)); }
fn quad_value(w: KvQuad) -> vec4<f32> {
    return vec4<f32>(bitcast<vec4<i32>>(vec4<u32>(w) << vec4<u32>(24u, 16u, 8u, 0u)) >> vec4<u32>(24u));
}
// the word holding element i's block scale, and that scale in it
fn q8_scale_word(i: u32) -> u32 { return p.kv_scales + (i >> 6u); }
fn q8_scale(w: u32, i: u32) -> f32 { return unpack2x16float(w)[(i >> 5u) & 1u]; }
#else
#if KV_F16
#if F16
alias KvStore = f16;
fn kv_word(i: u32) -> u32 { return i; }
fn kv_value(w: KvStore, i: u32) -> f32 { return f32(w); }
#else
alias KvStore = u32;
fn kv_word(i: u32) -> u32 { return i >> 1u; }
fn kv_value(w: KvStore, i: u32) -> f32 { return unpack2x16float(w)[i & 1u]; }
#endif
// four halves as two u32 words even with shader-f16: llvmpipe loads storage one component per
// lane at a time, so a vec4<f16> costs twice the loads (bench/README.md, "The f16 cache read as
// words")
alias KvQuad = vec2<u32>;
fn quad_value(w: KvQuad) -> vec4<f32> { return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }
#else
alias KvStore = f32;
alias KvQuad = vec4<f32>;
fn kv_word(i: u32) -> u32 { return i; }
fn kv_value(w: KvStore, i: u32) -> f32 { return w; }
fn quad_value(w: KvQuad) -> vec4<f32> { return w; }
#endif
#endif
