// How the KV cache stores its elements, shared by the kernels that write and read it.
// KV_F16 selects a half-precision cache. With shader-f16 (the F16 variant) it is a plain
// array<f16>; without it, pairs of halves are packed into u32 words, which every WebGPU device
// can read and write. Element i of a cache array c reads as kv_value(c[kv_word(i)], i).
// Readers that take four elements at a time (i a multiple of 4) may bind the cache as
// array<KvQuad> instead: elements i.. i + 3 read as quad_value(c4[i / 4]), one load for four.

#if KV_F16
#if F16
alias KvStore = f16;
alias KvQuad = vec4<f16>;
fn kv_word(i: u32) -> u32 { return i; }
fn kv_value(w: KvStore, i: u32) -> f32 { return f32(w); }
fn quad_value(w: KvQuad) -> vec4<f32> { return vec4<f32>(w); }
#else
alias KvStore = u32;
alias KvQuad = vec2<u32>;
fn kv_word(i: u32) -> u32 { return i >> 1u; }
fn kv_value(w: KvStore, i: u32) -> f32 { return unpack2x16float(w)[i & 1u]; }
fn quad_value(w: KvQuad) -> vec4<f32> { return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }
#endif
#else
alias KvStore = f32;
alias KvQuad = vec4<f32>;
fn kv_word(i: u32) -> u32 { return i; }
fn kv_value(w: KvStore, i: u32) -> f32 { return w; }
fn quad_value(w: KvQuad) -> vec4<f32> { return w; }
#endif
