// The step between the q/k/v projections and attention, in one dispatch: RoPE on q in place,
// and k (rotated the same way) and v appended to the KV cache.
// q: [n_tokens][n_head][head_dim] f32; k, v: [n_tokens][n_kv_head][head_dim] f32 (read only);
// k_cache, v_cache: [ctx][n_kv_head][head_dim] (f32 or f16, see kv.wgsl), written at positions
// pos0..pos0+n_tokens, position 0 at row kv_row0 (a sequence's slot of a shared cache). Token t
// sits at position pos0 + t, or under SEQ_ROWS (a decode step of several sequences) at its own
// sequence's position and rows (seq_place); the first n_rot dimensions of each
// head turn in adjacent pairs (2i, 2i+1), or halves (i, i + n_rot/2) in NeoX mode; n_rot = 0
// stores k as it is.
// Invocations: one per rotated pair of q (in place, so a pair's two elements are read before
// either is written), then one per two consecutive elements of k, then of v (a packed f16 word
// is written whole by one invocation; each k element is rotated from the unrotated source).
// QK_NORM (Qwen3, Gemma 3): each head of q and k is first RMS-normalised with its weight
// (q_norm_w, k_norm_w: [head_dim]), which needs the whole head: one invocation per q head and
// per k head then takes the place of those per pair (a head is a few hundred elements, and
// this spares the two norm dispatches a layer that cost more than the work on CPU devices).
// ROPE_FACTORS (Llama 3.1, Phi-3): pair i's frequency divided by rope_factors[i] ([n_rot/2]).
// KV_Q8 (a q8_0 cache, lib/kv.wgsl): after q's invocations, one per two blocks (64 elements)
// of k, then of v, each quantizing its blocks whole (a block's scale needs all 32 values).

struct Params {
    n_tokens: u32,
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    n_rot: u32,
    pos0: u32,
    neox: u32,
    log2_base: f32,
    freq_scale: f32,
    eps: f32,   // QK_NORM
    kv_row0: u32,
    // SEQ_ROWS: (position, cache row of its position 0) of token t in seqs[t / 2].xy (t even)
    // or .zw (t odd)
    seqs: array<vec4<u32>, 8>,
    kv_scales: u32,  // KV_Q8: the word at which the caches' scales start (lib/kv.wgsl)
}

@group(0) @binding(0) var<storage, read_write> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<KvStore>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<KvStore>;
@group(0) @binding(5) var<storage, read> q_norm_w: array<f32>;
@group(0) @binding(6) var<storage, read> k_norm_w: array<f32>;
@group(0) @binding(7) var<storage, read> rope_factors: array<f32>;
@group(0) @binding(8) var<uniform> p: Params;

#include "lib/kv_write.wgsl"
#include "lib/rotary.wgsl"

// (sin, cos) of pair i's angle at position pos
fn pair_sin_cos(pos: u32, i: u32) -> vec2<f32> {
#if ROPE_FACTORS
    return rope_sin_cos(pos, i, p.n_rot, p.log2_base, p.freq_scale / rope_factors[i]);
#else
    return rope_sin_cos(pos, i, p.n_rot, p.log2_base, p.freq_scale);
#endif
}

#include "lib/seq_place.wgsl"

// where element e0 of token t's k (or v) row, [n_tokens][kv_row], goes in the cache
fn cache_index(t: u32, e0: u32, kv_row: u32) -> u32 {
    let place = seq_place(t);
    return (place.y + place.x) * kv_row + e0 - t * kv_row;
}

#if QK_NORM
// 1 / rms of the q (k) head starting at base; its element e is then scaled by that and the
// norm weight's w[e]. One function per buffer (WGSL passes no storage pointers).
fn q_inv_rms(base: u32) -> f32 {
    var ss = 0.0;
    for (var e = 0u; e < p.head_dim; e++) {
        ss += q[base + e] * q[base + e];
    }
    return inverseSqrt(ss / f32(p.head_dim) + p.eps);
}
fn k_inv_rms(base: u32) -> f32 {
    var ss = 0.0;
    for (var e = 0u; e < p.head_dim; e++) {
        ss += k[base + e] * k[base + e];
    }
    return inverseSqrt(ss / f32(p.head_dim) + p.eps);
}
// QK_NORM: q head idx (token * n_head + head) normalised and turned in place
fn turn_q_head(idx: u32) {
    let half = p.n_rot / 2u;
    let base = idx * p.head_dim;
    let pos = seq_place(idx / p.n_head).x;
    let inv = q_inv_rms(base);
    for (var i = 0u; i < half; i++) {
        let ab = rope_pair(base, i, p.n_rot, p.neox != 0u);
        let sc = pair_sin_cos(pos, i);
        let turned = rotate(q[ab.x] * inv * q_norm_w[ab.x - base], q[ab.y] * inv * q_norm_w[ab.y - base], sc);
        q[ab.x] = turned.x;
        q[ab.y] = turned.y;
    }
    for (var e = p.n_rot; e < p.head_dim; e++) {
        q[base + e] *= inv * q_norm_w[e];
    }
}
#endif

// element e of the k head starting at `base`, before rotation
fn k_in(base: u32, e: u32, inv: f32) -> f32 {
#if QK_NORM
    return k[base + e] * inv * k_norm_w[e];
#else
    return k[base + e];
#endif
}

// element e of the k head starting at `base`, rotated for position pos (inv: QK_NORM's factor)
fn rotated_k(base: u32, e: u32, pos: u32, inv: f32) -> f32 {
    if (e >= p.n_rot) {
        return k_in(base, e, inv);
    }
    // the pair holding e, and which of its two elements e is
    let neox = p.neox != 0u;
    let i = select(e / 2u, e % (p.n_rot / 2u), neox);
    let ab = rope_pair(base, i, p.n_rot, neox);
    let turned = rotate(k_in(base, ab.x - base, inv), k_in(base, ab.y - base, inv), pair_sin_cos(pos, i));
    return select(turned.x, turned.y, base + e == ab.y);
}

// rotated pair idx (of n_rot / 2 a head) of q turned in place
fn turn_q_pair(idx: u32) {
    let half = p.n_rot / 2u;
    let i = idx % half;
    let head = idx / half;            // token * n_head + head
    let pos = seq_place(head / p.n_head).x;
    let base = head * p.head_dim;
    let sc = pair_sin_cos(pos, i);
    let ab = rope_pair(base, i, p.n_rot, p.neox != 0u);
    let turned = rotate(q[ab.x], q[ab.y], sc);
    q[ab.x] = turned.x;
    q[ab.y] = turned.y;
}

#if KV_Q8
// element e of k (rotated for pos, inv: QK_NORM's factor) or of v, [n_tokens][kv_row], in the
// head starting at base
fn kv_source(is_v: bool, base: u32, e: u32, pos: u32, inv: f32) -> f32 {
    if (is_v) {
        return v[e];
    }
    return rotated_k(base, e - base, pos, inv);
}

fn kv_source4(is_v: bool, base: u32, e: u32, pos: u32, inv: f32) -> vec4<f32> {
    return vec4<f32>(kv_source(is_v, base, e, pos, inv), kv_source(is_v, base, e + 1u, pos, inv), kv_source(is_v, base, e + 2u, pos, inv),
                     kv_source(is_v, base, e + 3u, pos, inv));
}

// the q8_0 block of k or v at elements eb.. eb + 31 of [n_tokens][kv_row] (token t's, at
// position pos) quantized into cache words w0.. w0 + 7; its scale. The 32 values are held in
// eight named vectors, not an array (see q8_pack), and computed once.
fn store_q8_block(is_v: bool, t: u32, pos: u32, eb: u32, kv_row: u32, w0: u32) -> f32 {
    let base = t * kv_row + ((eb % kv_row) / p.head_dim) * p.head_dim;
    var inv = 1.0;
#if QK_NORM
    if (!is_v) {
        inv = k_inv_rms(base);
    }
#endif
    let x0 = kv_source4(is_v, base, eb, pos, inv);
    let x1 = kv_source4(is_v, base, eb + 4u, pos, inv);
    let x2 = kv_source4(is_v, base, eb + 8u, pos, inv);
    let x3 = kv_source4(is_v, base, eb + 12u, pos, inv);
    let x4 = kv_source4(is_v, base, eb + 16u, pos, inv);
    let x5 = kv_source4(is_v, base, eb + 20u, pos, inv);
    let x6 = kv_source4(is_v, base, eb + 24u, pos, inv);
    let x7 = kv_source4(is_v, base, eb + 28u, pos, inv);
    let m = max(max(max(abs(x0), abs(x1)), max(abs(x2), abs(x3))), max(max(abs(x4), abs(x5)), max(abs(x6), abs(x7))));
    let d = max(max(m.x, m.y), max(m.z, m.w)) / 127.0;
    let id = select(0.0, 1.0 / d, d > 0.0);
    put_q8_word(is_v, w0, q8_pack(x0, id));
    put_q8_word(is_v, w0 + 1u, q8_pack(x1, id));
    put_q8_word(is_v, w0 + 2u, q8_pack(x2, id));
    put_q8_word(is_v, w0 + 3u, q8_pack(x3, id));
    put_q8_word(is_v, w0 + 4u, q8_pack(x4, id));
    put_q8_word(is_v, w0 + 5u, q8_pack(x5, id));
    put_q8_word(is_v, w0 + 6u, q8_pack(x6, id));
    put_q8_word(is_v, w0 + 7u, q8_pack(x7, id));
    return d;
}

// the two q8_0 blocks of k or v at elements e0.. e0 + 63 of [n_tokens][kv_row] (e0 a multiple
// of 64) into the cache, and their scales' word
fn store_q8_blocks(is_v: bool, e0: u32, kv_row: u32) {
    let t = e0 / kv_row;
    let pos = seq_place(t).x;
    let at = cache_index(t, e0, kv_row);
    let da = store_q8_block(is_v, t, pos, e0, kv_row, at / 4u);
    let db = store_q8_block(is_v, t, pos, e0 + 32u, kv_row, at / 4u + 8u);
    put_q8_word(is_v, q8_scale_word(at), pack2x16float(vec2<f32>(da, db)));
}
#endif

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    let kv_row = p.n_kv_head * p.head_dim;
#if QK_NORM
    let n_q_work = p.n_tokens * p.n_head;
#else
    let n_q_work = p.n_tokens * p.n_head * (p.n_rot / 2u);
#endif
    if (idx < n_q_work) {
#if QK_NORM
        turn_q_head(idx);
#else
        turn_q_pair(idx);
#endif
        return;
    }
    let i = idx - n_q_work;
#if KV_Q8
    let n_units = p.n_tokens * kv_row / 64u;
    if (i < 2u * n_units) {
        let is_v = i >= n_units;
        store_q8_blocks(is_v, 64u * select(i, i - n_units, is_v), kv_row);
    }
#else
    let n_kv_pairs = p.n_tokens * kv_row / 2u;
#if QK_NORM
    // one invocation per k head, then per pair of v elements
    let n_k_heads = p.n_tokens * p.n_kv_head;
    if (i < n_k_heads) {
        let base = i * p.head_dim;    // token * n_kv_head + kv head, times head_dim
        let t = i / p.n_kv_head;
        let pos = seq_place(t).x;
        let inv = k_inv_rms(base);
        for (var e = 0u; e < p.head_dim; e += 2u) {
            put_k(cache_index(t, base + e, kv_row), rotated_k(base, e, pos, inv), rotated_k(base, e + 1u, pos, inv));
        }
    } else if (i < n_k_heads + n_kv_pairs) {
        let e0 = 2u * (i - n_k_heads);
        put_v(cache_index(e0 / kv_row, e0, kv_row), v[e0], v[e0 + 1u]);
    }
#else
    // one invocation per pair of k elements, then of v
    if (i < n_kv_pairs) {
        let e0 = 2u * i;  // first of the two elements in [n_tokens][kv_row]
        let t = e0 / kv_row;
        let base = t * kv_row + ((e0 % kv_row) / p.head_dim) * p.head_dim;
        let pos = seq_place(t).x;
        put_k(cache_index(t, e0, kv_row), rotated_k(base, e0 - base, pos, 1.0), rotated_k(base, e0 + 1u - base, pos, 1.0));
    } else if (i < 2u * n_kv_pairs) {
        let e0 = 2u * (i - n_kv_pairs);
        put_v(cache_index(e0 / kv_row, e0, kv_row), v[e0], v[e0 + 1u]);
    }
#endif
#endif
}
