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

#include "lib/seq_place.wgsl"
