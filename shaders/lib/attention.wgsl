// What both attention kernels share (attention_workgroup.wgsl, attention_query.wgsl): their
// parameters and the causal / sliding-window rule. The includer declares `p: Params`.

struct Params {
    n_q: u32,
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    pos0: u32,
    window: u32,   // 0: no window
    scale: f32,
    kv_row0: u32,  // the cache row of position 0 (a sequence's slot of a shared cache)
    // SEQ_ROWS: each query its own sequence's, two a vector: (position, cache row of its
    // position 0) of query t in seqs[t / 2].xy (t even) or .zw (t odd)
    seqs: array<vec4<u32>, 8>,
    kv_scales: u32,  // KV_Q8: the word at which the caches' scales start (lib/kv.wgsl)
    n_split: u32,    // SPLIT_K: the chunks each query's keys are cut into (workgroup_id.z)
}

const MAX_HEAD_DIM: u32 = 256u;
const NEG_BIG: f32 = -3.0e38;

// the first key a query at position pos sees (0, or the start of its sliding window)
fn first_key(pos: u32) -> u32 {
    if (p.window > 0u && pos + 1u > p.window) {
        return pos + 1u - p.window;
    }
    return 0u;
}

// SPLIT_K (flash-decoding): the keys lo..hi (hi excluded) cut into p.n_split chunks of a
// multiple of 8 keys, so that a few (head, query) workgroups become many; chunk c's keys (the
// last chunks may be empty). Without SPLIT_K, all of them.
fn split_keys(lo: u32, hi: u32, c: u32) -> vec2<u32> {
#if SPLIT_K
    let len = ((hi - lo + p.n_split - 1u) / p.n_split + 7u) / 8u * 8u;
    let b = min(lo + c * len, hi);
    return vec2<u32>(b, min(b + len, hi));
#else
    return vec2<u32>(lo, hi);
#endif
}

// SPLIT_K: where a chunk's partial result goes in the partials buffer (bound as the output):
// the output of (chunk c, row r = query · n_head + head), unnormalised, at element
// (c · rows + r) · head_dim + d, rows = n_q · n_head; after all n_split · rows of them, its
// (running maximum, sum of weights) at (c · rows + r) · 2 (attention_merge.wgsl reads them).
fn partial_out(c: u32, row: u32, head_dim: u32) -> u32 {
    return (c * p.n_q * p.n_head + row) * head_dim;
}
fn partial_stats(c: u32, row: u32, head_dim: u32) -> u32 {
    return p.n_split * p.n_q * p.n_head * head_dim + (c * p.n_q * p.n_head + row) * 2u;
}

#include "lib/seq_place.wgsl"
