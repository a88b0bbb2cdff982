// Fused causal attention with an online softmax (flash-attention style), for a block of prompt
// tokens or a single new token alike: one workgroup per (head, query), for GPUs.
// q: [n_q][n_head][head_dim] f32, query t at position pos0 + t;
// k_cache, v_cache: [ctx][n_kv_head][head_dim] (f32, f16 or q8_0, see lib/kv.wgsl), holding positions
// 0..pos0+n_q at rows kv_row0..; out: [n_q][n_head][head_dim] f32. SEQ_ROWS: each query its
// own sequence's position and cache rows (lib/seq_place.wgsl).
// Query head h reads kv head h / (n_head / n_kv_head) (grouped-query attention). Query position
// p sees keys j ≤ p, and with a sliding window only those with p − j < window.
// Invocation j scores key k0 + j of each tile of WG keys, the tile's softmax weights go through
// shared memory, and each invocation keeps the running output for head dimensions lid,
// lid + WG, ... rescaled whenever the running maximum grows. SPLIT_K: workgroup_id.z takes one
// chunk of the keys (lib/attention.wgsl's split_keys) and out is the partials buffer, which
// attention_merge.wgsl turns into the output (flash-decoding, for few (head, query) pairs over
// a long cache).

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k_cache: array<KvStore>;
@group(0) @binding(2) var<storage, read> v_cache: array<KvStore>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

#include "lib/kv.wgsl"
#include "lib/attention.wgsl"
#include "lib/reduce.wgsl"

const DIMS_PER_LANE: u32 = MAX_HEAD_DIM / WG;

// element i of the v cache (times its q8_0 block's scale)
fn v_value(i: u32) -> f32 {
#if KV_Q8
    return kv_value(v_cache[kv_word(i)], i) * q8_scale(v_cache[q8_scale_word(i)], i);
#else
    return kv_value(v_cache[kv_word(i)], i);
#endif
}

var<workgroup> q_sh: array<f32, MAX_HEAD_DIM>;
var<workgroup> w_sh: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32> SG_PARAMS) {
    let h = wid.x;
    let t = wid.y;
    let lane = Lane(lid, SG_SIZE, SG_LANE);
    let hd = p.head_dim;
    let place = seq_place(t);
    let pos = place.x;
    let kvh = h / (p.n_head / p.n_kv_head);
    let kv_stride = p.n_kv_head * hd;
    // where this query's kv head starts in the cache row of its sequence's position 0
    let kv_base = place.y * kv_stride + kvh * hd;
    let q_base = (t * p.n_head + h) * hd;
    for (var d = lid; d < hd; d += WG) {
        q_sh[d] = q[q_base + d] * p.scale;
    }
    workgroupBarrier();

    let keys = split_keys(first_key(pos), pos + 1u, wid.z);
    let k_start = keys.x;
    let k_end = keys.y;
    var run_max = NEG_BIG;
    var run_sum = 0.0;
    var acc = array<f32, DIMS_PER_LANE>();

    for (var k0 = k_start; k0 < k_end; k0 += WG) {
        let j = k0 + lid;
        var score = NEG_BIG;
        if (j < k_end) {
            let kb = kv_base + j * kv_stride;
            var s = 0.0;
#if KV_Q8
            // a q8_0 block at a time: its int8s' sum, then times its scale
            for (var d0 = 0u; d0 < hd; d0 += 32u) {
                var sb = 0.0;
                for (var d = d0; d < d0 + 32u; d += 4u) {
                    sb += dot(vec4<f32>(q_sh[d], q_sh[d + 1u], q_sh[d + 2u], q_sh[d + 3u]), quad_value(k_cache[kv_word(kb + d)]));
                }
                s += sb * q8_scale(k_cache[q8_scale_word(kb + d0)], kb + d0);
            }
#else
            for (var d = 0u; d < hd; d++) {
                s += q_sh[d] * kv_value(k_cache[kv_word(kb + d)], kb + d);
            }
#endif
            score = s;
        }
        let new_max = max(run_max, wg_max(score, lane));
        var w = 0.0;
        if (j < k_end) {
            w = exp(score - new_max);
        }
        let rescale = exp(run_max - new_max);
        run_sum = run_sum * rescale + wg_sum(w, lane);
        run_max = new_max;
        w_sh[lid] = w;
        workgroupBarrier();
        let n_keys = min(WG, k_end - k0);
        for (var c = 0u; c < DIMS_PER_LANE; c++) {
            let d = lid + c * WG;
            if (d < hd) {
                var a = acc[c] * rescale;
                for (var jj = 0u; jj < n_keys; jj++) {
                    let vi = kv_base + (k0 + jj) * kv_stride + d;
                    a += w_sh[jj] * v_value(vi);
                }
                acc[c] = a;
            }
        }
        workgroupBarrier();
    }
#if SPLIT_K
    let row = t * p.n_head + h;
    let o_base = partial_out(wid.z, row, hd);
    if (lid == 0u) {
        let stats = partial_stats(wid.z, row, hd);
        out[stats] = run_max;
        out[stats + 1u] = run_sum;
    }
#endif
    for (var c = 0u; c < DIMS_PER_LANE; c++) {
        let d = lid + c * WG;
        if (d < hd) {
#if SPLIT_K
            out[o_base + d] = acc[c];
#else
            out[q_base + d] = acc[c] / run_sum;
#endif
        }
    }
}
