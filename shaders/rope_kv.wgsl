// The step between the q/k/v projections and attention, in one dispatch: RoPE on q in place,
// and k (rotated the same way) and v appended to the KV cache.
// q: [n_tokens][n_head][head_dim] f32; k, v: [n_tokens][n_kv_head][head_dim] f32 (read only);
// k_cache, v_cache: [ctx][n_kv_head][head_dim] (f32 or f16, see kv.wgsl), written at positions
// pos0..pos0+n_tokens. Token t sits at position pos0 + t; the first n_rot dimensions of each
// head turn in adjacent pairs (2i, 2i+1), or halves (i, i + n_rot/2) in NeoX mode; n_rot = 0
// stores k as it is.
// Invocations: one per rotated pair of q (in place, so a pair's two elements are read before
// either is written), then one per two consecutive elements of k, then of v (a packed f16 word
// is written whole by one invocation; each k element is rotated from the unrotated source).

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
}

@group(0) @binding(0) var<storage, read_write> q: array<f32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read_write> k_cache: array<KvStore>;
@group(0) @binding(4) var<storage, read_write> v_cache: array<KvStore>;
@group(0) @binding(5) var<uniform> p: Params;

#include "kv_write.wgsl"
#include "rotary.wgsl"

// element e of the k head starting at `base`, rotated for position pos
fn rotated_k(base: u32, e: u32, pos: u32) -> f32 {
    if (e >= p.n_rot) {
        return k[base + e];
    }
    // the pair holding e, and which of its two elements e is
    let neox = p.neox != 0u;
    let i = select(e / 2u, e % (p.n_rot / 2u), neox);
    let ab = rope_pair(base, i, p.n_rot, neox);
    let turned = rotate(k[ab.x], k[ab.y], rope_sin_cos(pos, i, p.n_rot, p.log2_base, p.freq_scale));
    return select(turned.x, turned.y, base + e == ab.y);
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let idx = gid.x + gid.y * nwg.x * 256u;
    let half = p.n_rot / 2u;
    let n_q_pairs = p.n_tokens * p.n_head * half;
    let kv_row = p.n_kv_head * p.head_dim;
    let n_kv_pairs = p.n_tokens * kv_row / 2u;
    if (idx < n_q_pairs) {
        let i = idx % half;
        let head = idx / half;            // token * n_head + head
        let pos = p.pos0 + head / p.n_head;
        let base = head * p.head_dim;
        let sc = rope_sin_cos(pos, i, p.n_rot, p.log2_base, p.freq_scale);
        let ab = rope_pair(base, i, p.n_rot, p.neox != 0u);
        let turned = rotate(q[ab.x], q[ab.y], sc);
        q[ab.x] = turned.x;
        q[ab.y] = turned.y;
    } else if (idx < n_q_pairs + n_kv_pairs) {
        let e0 = 2u * (idx - n_q_pairs);  // first of the two elements in [n_tokens][kv_row]
        let t = e0 / kv_row;
        let base = t * kv_row + ((e0 % kv_row) / p.head_dim) * p.head_dim;
        let pos = p.pos0 + t;
        put_k(p.pos0 * kv_row + e0, rotated_k(base, e0 - base, pos), rotated_k(base, e0 + 1u - base, pos));
    } else if (idx < n_q_pairs + 2u * n_kv_pairs) {
        let e0 = 2u * (idx - n_q_pairs - n_kv_pairs);
        put_v(p.pos0 * kv_row + e0, v[e0], v[e0 + 1u]);
    }
}
