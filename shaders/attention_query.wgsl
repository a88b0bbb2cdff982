// Causal attention with an online softmax, one query per invocation, for CPU implementations
// of WebGPU (and its subgroup modes: KEY_LANES, KV_BROADCAST, HEADS_SHARE_KV).
// q: [n_q][n_head][head_dim] f32, query t at position pos0 + t;
// k_cache, v_cache: [ctx][n_kv_head][head_dim] (f32, f16 or q8_0, see lib/kv.wgsl), holding positions
// 0..pos0+n_q at rows kv_row0..; out: [n_q][n_head][head_dim] f32. SEQ_ROWS: each query its
// own sequence's position and cache rows (lib/seq_place.wgsl; never with
// KV_BROADCAST's shared keys, HEADS_SHARE_KV aside). SPLIT_K (every mode): workgroup_id.z
// takes one chunk of the keys (lib/attention.wgsl's split_keys) and out is the partials
// buffer, which attention_merge.wgsl turns into the output.
// Query head h reads kv head h / (n_head / n_kv_head) (grouped-query attention). Query position
// p sees keys j ≤ p, and with a sliding window only those with p − j < window.

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k_cache4: array<KvQuad>;
@group(0) @binding(2) var<storage, read> v_cache4: array<KvQuad>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

#include "lib/kv.wgsl"
#include "lib/attention.wgsl"

// CPU implementations of WebGPU run a workgroup as SIMD lanes on one core, where barriers and
// shared memory cost a per-lane loop each: here every invocation walks its own keys with its
// query and running output in registers, and no invocation waits for another. Invocation i
// takes head i / n_q and query i % n_q, so neighbouring lanes are neighbouring queries of one
// head and read the same K and V addresses at each step (without a window).
// HEAD_DIM is the head size, fixed per pipeline for small heads so that the loops over it have
// constant bounds and unroll into registers (indexing qv and acc by a loop variable costs a
// per-lane loop on llvmpipe: SmolLM2's prefill attention took 4x as long with head_dim 64 a
// parameter), p.head_dim for larger ones (Gemma's 256 decoded slower unrolled); HEAD_QUADS is
// the capacity of qv and acc.
// head_dim must be a multiple of 16, which the inner loops take at a time: llvmpipe ends any
// invocation after 65535 loop iterations in all (its guard against endless loops), so
// keys · (1 + head_dim / 16) must stay below that (`Recorder::attention_kernel` checks).

// elements i.. i + 3 (i a multiple of 4) of the caches, in one load (a load costs a per-lane
// loop on CPU devices)
fn k_quad(i: u32) -> vec4<f32> {
    return quad_value(k_cache4[i / 4u]);
}
fn v_quad(i: u32) -> vec4<f32> {
    return quad_value(v_cache4[i / 4u]);
}

// the scale of the q8_0 block holding element i, by which k_quad's (v_quad's) values are to be
// multiplied (a block is 32 elements from a multiple of 32: the loops below take it once per 16
// or 32 elements); 1 for the float caches
fn k_scale(i: u32) -> f32 {
#if KV_Q8
    return q8_scale(k_cache4[q8_scale_word(i)], i);
#else
    return 1.0;
#endif
}
fn v_scale(i: u32) -> f32 {
#if KV_Q8
    return q8_scale(v_cache4[q8_scale_word(i)], i);
#else
    return 1.0;
#endif
}

// this invocation's query (scaled), and its online softmax: run_max the largest score so far,
// run_sum Σ exp(score − run_max), acc Σ exp(score − run_max) · v
var<private> qv: array<vec4<f32>, HEAD_QUADS>;
var<private> acc: array<vec4<f32>, HEAD_QUADS>;
var<private> run_max: f32 = NEG_BIG;
var<private> run_sum: f32 = 0.0;

// where query t of head h sits: its position, its offset in q and out, and where its kv head
// starts in the cache row of its sequence's position 0 (key j's row starts kv_stride · j
// further on)
struct QueryAt { pos: u32, base: u32, kv_offset: u32, kv_stride: u32 }

// query t of head h's place, its query loaded into qv
fn start_query(h: u32, t: u32) -> QueryAt {
    let place = seq_place(t);
    let kv_stride = p.n_kv_head * HEAD_DIM;
    let at = QueryAt(place.x, (t * p.n_head + h) * HEAD_DIM, place.y * kv_stride + h / (p.n_head / p.n_kv_head) * HEAD_DIM, kv_stride);
    for (var d = 0u; d < HEAD_DIM / 4u; d++) {
        let e = at.base + 4u * d;
        qv[d] = vec4<f32>(q[e], q[e + 1u], q[e + 2u], q[e + 3u]) * p.scale;
    }
    return at;
}

// a key's score into the softmax (or nothing where the query does not see it): the factor acc
// is to be scaled by and the key's weight
fn take_key(score: f32, seen: bool) -> vec2<f32> {
    let new_max = select(run_max, max(run_max, score), seen);
    let rescale = exp(run_max - new_max);
    let w = select(0.0, exp(score - new_max), seen);
    run_sum = run_sum * rescale + w;
    run_max = new_max;
    return vec2<f32>(rescale, w);
}

// the output of the query at q_base in q; SPLIT_K: chunk c's partial (acc unnormalised, then
// the softmax's maximum and sum)
fn store_output(q_base: u32, c: u32) {
#if SPLIT_K
    let row = q_base / HEAD_DIM;
    let stats = partial_stats(c, row, HEAD_DIM);
    out[stats] = run_max;
    out[stats + 1u] = run_sum;
    let o_base = partial_out(c, row, HEAD_DIM);
#else
    let o_base = q_base;
#endif
    for (var d = 0u; d < HEAD_DIM / 4u; d++) {
#if SPLIT_K
        let o = acc[d];
#else
        let o = acc[d] / run_sum;
#endif
        let e = o_base + 4u * d;
        out[e] = o.x;
        out[e + 1u] = o.y;
        out[e + 2u] = o.z;
        out[e + 3u] = o.w;
    }
}

#if DIM_LANES
// DIM_LANES (decode; subgroups of exactly the workgroup's 8 lanes, HEAD_DIM a fixed multiple
// of 32): one workgroup per (kv head, query) takes all GROUP query heads of the kv head, and its
// 8 lanes split each row's dimensions: lane l holds quads l, l + 8, ... of every head's query
// and output, so that a K or V row is one load per lane for all GROUP heads (a q8_0 block per
// step of 8 quads), a score is a subgroupAdd of the lanes' partial dot products, and every
// lane does useful multiplications (the query heads or keys of the other modes leave lanes idle
// or load a row per lane). The softmax is the same on every lane.
const LANE_QUADS: u32 = HEAD_DIM / 32u;
var<private> q_lane: array<vec4<f32>, GROUP * LANE_QUADS>;
var<private> acc_lane: array<vec4<f32>, GROUP * LANE_QUADS>;
var<private> max_h: array<f32, GROUP>;
var<private> sum_h: array<f32, GROUP>;

@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let group = wid.x + wid.y * nwg.x;
    if (group >= p.n_kv_head * p.n_q) {
        return;
    }
    let t = group % p.n_q;
    let kvh = group / p.n_q;
    let place = seq_place(t);
    let kv_stride = p.n_kv_head * HEAD_DIM;
    let kv_offset = place.y * kv_stride + kvh * HEAD_DIM;
    // row (query t, head kvh · GROUP + g) of q and out
    let row0 = t * p.n_head + kvh * GROUP;
    for (var g = 0u; g < GROUP; g++) {
        for (var d = 0u; d < LANE_QUADS; d++) {
            let e = (row0 + g) * HEAD_DIM + 4u * (8u * d + lid);
            q_lane[g * LANE_QUADS + d] = vec4<f32>(q[e], q[e + 1u], q[e + 2u], q[e + 3u]) * p.scale;
            acc_lane[g * LANE_QUADS + d] = vec4<f32>(0.0);
        }
        max_h[g] = NEG_BIG;
        sum_h[g] = 0.0;
    }
    let keys = split_keys(first_key(place.x), place.x + 1u, wid.z);
    for (var j = keys.x; j < keys.y; j++) {
        let kb = j * kv_stride + kv_offset;
        var kq: array<vec4<f32>, LANE_QUADS>;
        for (var d = 0u; d < LANE_QUADS; d++) {
            kq[d] = k_quad(kb + 4u * (8u * d + lid)) * k_scale(kb + 32u * d);
        }
        // the lanes' partial dot products, four heads to a vector: one subgroupAdd for four
        var part: array<vec4<f32>, (GROUP + 3u) / 4u>;
        for (var g = 0u; g < GROUP; g++) {
            var s4 = vec4<f32>(0.0);
            for (var d = 0u; d < LANE_QUADS; d++) {
                s4 = fma(q_lane[g * LANE_QUADS + d], kq[d], s4);
            }
            part[g / 4u][g % 4u] = s4.x + s4.y + s4.z + s4.w;
        }
        for (var i = 0u; i < (GROUP + 3u) / 4u; i++) {
            part[i] = subgroupAdd(part[i]);
        }
        var rescale: array<f32, GROUP>;
        var w: array<f32, GROUP>;
        for (var g = 0u; g < GROUP; g++) {
            let score = part[g / 4u][g % 4u];
            let new_max = max(max_h[g], score);
            rescale[g] = exp(max_h[g] - new_max);
            w[g] = exp(score - new_max);
            sum_h[g] = sum_h[g] * rescale[g] + w[g];
            max_h[g] = new_max;
        }
        for (var d = 0u; d < LANE_QUADS; d++) {
            let vq = v_quad(kb + 4u * (8u * d + lid)) * v_scale(kb + 32u * d);
            for (var g = 0u; g < GROUP; g++) {
                acc_lane[g * LANE_QUADS + d] = fma(acc_lane[g * LANE_QUADS + d], vec4<f32>(rescale[g]), w[g] * vq);
            }
        }
    }
    for (var g = 0u; g < GROUP; g++) {
#if SPLIT_K
        let o_base = partial_out(wid.z, row0 + g, HEAD_DIM);
        if (lid == 0u) {
            let stats = partial_stats(wid.z, row0 + g, HEAD_DIM);
            out[stats] = max_h[g];
            out[stats + 1u] = sum_h[g];
        }
        let norm = 1.0;
#else
        let o_base = (row0 + g) * HEAD_DIM;
        let norm = 1.0 / sum_h[g];
#endif
        for (var d = 0u; d < LANE_QUADS; d++) {
            let o = acc_lane[g * LANE_QUADS + d] * norm;
            let e = o_base + 4u * (8u * d + lid);
            out[e] = o.x;
            out[e + 1u] = o.y;
            out[e + 2u] = o.z;
            out[e + 3u] = o.w;
        }
    }
}
#else
#if KEY_LANES
// KEY_LANES (decode; subgroups of exactly the workgroup's 8 lanes): one workgroup per (head,
// query), whose lanes split the keys (lane l takes keys l, l + 8, ...), each lane with its own
// online softmax; the eight merge through subgroup operations at the end. A decode step has
// one query per head: one invocation per (head, query) would walk all of a long context's
// keys alone, in as few workgroups as the heads fill.
@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let group = wid.x + wid.y * nwg.x;
    if (group >= p.n_head * p.n_q) {
        return;
    }
    let at = start_query(group / p.n_q, group % p.n_q);
    let keys = split_keys(first_key(at.pos), at.pos + 1u, wid.z);
    walk_keys(at, keys.x + lid, keys.y, 8u);
    // every query sees at least its own key, so some lane's maximum is a score; a lane that
    // took no key (run_max NEG_BIG) scales to 0
    let m = subgroupMax(run_max);
    let scale = exp(run_max - m);
    run_max = m;
    run_sum = subgroupAdd(run_sum * scale);
    for (var d = 0u; d < HEAD_DIM / 4u; d++) {
        acc[d] = subgroupAdd(acc[d] * scale);
    }
    if (lid == 0u) {
        store_output(at.base, wid.z);
    }
}
#else
#if KV_BROADCAST
// this lane's query against the row at kb, each lane loading one quad in 8 of it and
// subgroupBroadcast handing them round
fn broadcast_score(kb: u32, lid: u32) -> f32 {
    var s4 = vec4<f32>(0.0);
    for (var d = 0u; d < HEAD_DIM / 4u; d += 8u) {
        let mine = k_quad(kb + 4u * (d + lid));
#if KV_Q8
        // the 8 quads are one q8_0 block: its sum, then times its scale
        var t4 = qv[d] * subgroupBroadcast(mine, 0u);
#else
        var t4 = fma(qv[d], subgroupBroadcast(mine, 0u), s4);
#endif
        t4 = fma(qv[d + 1u], subgroupBroadcast(mine, 1u), t4);
        t4 = fma(qv[d + 2u], subgroupBroadcast(mine, 2u), t4);
        t4 = fma(qv[d + 3u], subgroupBroadcast(mine, 3u), t4);
        t4 = fma(qv[d + 4u], subgroupBroadcast(mine, 4u), t4);
        t4 = fma(qv[d + 5u], subgroupBroadcast(mine, 5u), t4);
        t4 = fma(qv[d + 6u], subgroupBroadcast(mine, 6u), t4);
        t4 = fma(qv[d + 7u], subgroupBroadcast(mine, 7u), t4);
#if KV_Q8
        s4 = fma(t4, vec4<f32>(k_scale(kb + 4u * d)), s4);
#else
        s4 = t4;
#endif
    }
    return s4.x + s4.y + s4.z + s4.w;
}

// take_key for two keys at once: the factor acc is to be scaled by and the two keys' weights
fn take_two_keys(s0: f32, seen0: bool, s1: f32, seen1: bool) -> vec3<f32> {
    let new_max = max(run_max, max(select(NEG_BIG, s0, seen0), select(NEG_BIG, s1, seen1)));
    let rescale = exp(run_max - new_max);
    let w0 = select(0.0, exp(s0 - new_max), seen0);
    let w1 = select(0.0, exp(s1 - new_max), seen1);
    run_sum = run_sum * rescale + w0 + w1;
    run_max = new_max;
    return vec3<f32>(rescale, w0, w1);
}

// KV_BROADCAST (subgroups of exactly the workgroup's 8 lanes, head_dim a multiple of 32): the
// queries of each head are padded to a multiple of 8, so a workgroup holds 8 queries of one
// head (the padding repeats the last query and writes nothing); they walk the keys of all 8
// together, each lane loading one quad in 8 of a K or V row and subgroupBroadcast handing it
// to the others, and a lane takes a key into its softmax only where its own query sees it.
// HEADS_SHARE_KV (decode with grouped-query attention): the lanes are instead the query heads
// that read one kv head, for one query (a workgroup per (kv head, query); lanes past the
// group's heads repeat its last and write nothing), so that each K and V row is loaded once
// for all of them.
@compute @workgroup_size(8)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let group = wid.x + wid.y * nwg.x;
#if HEADS_SHARE_KV
    let per_kv = p.n_head / p.n_kv_head;
    if (group >= p.n_kv_head * p.n_q) {
        return;
    }
    let t = group % p.n_q;
    let at = start_query(group / p.n_q * per_kv + min(lid, per_kv - 1u), t);
    let writes = lid < per_kv;
    // this lane's keys, and the workgroup's (the same for all lanes)
    let k_start = first_key(at.pos);
    let k_lo = k_start;
    let k_hi = at.pos;
#else
    let n_q_pad = (p.n_q + 7u) / 8u * 8u;
    if (group * 8u >= p.n_head * n_q_pad) {
        return;
    }
    let h = group * 8u / n_q_pad;
    let t_first = group * 8u % n_q_pad;
    let at = start_query(h, min(t_first + lid, p.n_q - 1u));
    let writes = t_first + lid < p.n_q;
    // this lane's keys, and the workgroup's (the same for all lanes)
    let k_start = first_key(at.pos);
    let k_lo = first_key(p.pos0 + t_first);
    let k_hi = p.pos0 + min(t_first + 7u, p.n_q - 1u);
#endif
    let n_quads = HEAD_DIM / 4u;
    let keys = split_keys(k_lo, k_hi + 1u, wid.z);
    // two keys a step, so one rescale of acc (and one exp) serves both
    for (var j = keys.x; j < keys.y; j += 2u) {
        let kb0 = j * at.kv_stride + at.kv_offset;
        let kb1 = min(j + 1u, keys.y - 1u) * at.kv_stride + at.kv_offset;
        let rw = take_two_keys(broadcast_score(kb0, lid), j >= k_start && j <= at.pos,
                               broadcast_score(kb1, lid), j + 1u < keys.y && j + 1u >= k_start && j + 1u <= at.pos);
        let rescale = vec4<f32>(rw.x);
        for (var d = 0u; d < n_quads; d += 8u) {
            let v0 = v_quad(kb0 + 4u * (d + lid));
            let v1 = v_quad(kb1 + 4u * (d + lid));
            let w0 = vec4<f32>(rw.y * v_scale(kb0 + 4u * d));
            let w1 = vec4<f32>(rw.z * v_scale(kb1 + 4u * d));
            acc[d] = fma(acc[d], rescale, fma(w0, subgroupBroadcast(v0, 0u), w1 * subgroupBroadcast(v1, 0u)));
            acc[d + 1u] = fma(acc[d + 1u], rescale, fma(w0, subgroupBroadcast(v0, 1u), w1 * subgroupBroadcast(v1, 1u)));
            acc[d + 2u] = fma(acc[d + 2u], rescale, fma(w0, subgroupBroadcast(v0, 2u), w1 * subgroupBroadcast(v1, 2u)));
            acc[d + 3u] = fma(acc[d + 3u], rescale, fma(w0, subgroupBroadcast(v0, 3u), w1 * subgroupBroadcast(v1, 3u)));
            acc[d + 4u] = fma(acc[d + 4u], rescale, fma(w0, subgroupBroadcast(v0, 4u), w1 * subgroupBroadcast(v1, 4u)));
            acc[d + 5u] = fma(acc[d + 5u], rescale, fma(w0, subgroupBroadcast(v0, 5u), w1 * subgroupBroadcast(v1, 5u)));
            acc[d + 6u] = fma(acc[d + 6u], rescale, fma(w0, subgroupBroadcast(v0, 6u), w1 * subgroupBroadcast(v1, 6u)));
            acc[d + 7u] = fma(acc[d + 7u], rescale, fma(w0, subgroupBroadcast(v0, 7u), w1 * subgroupBroadcast(v1, 7u)));
        }
    }
    if (writes) {
        store_output(at.base, wid.z);
    }
}
#else
@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(workgroup_id) wid: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= p.n_head * p.n_q) {
        return;
    }
    let at = start_query(i / p.n_q, i % p.n_q);
    let keys = split_keys(first_key(at.pos), at.pos + 1u, wid.z);
    walk_keys(at, keys.x, keys.y, 1u);
    store_output(at.base, wid.z);
}
#endif
#endif
#endif

// keys first, first + step, ... before end into this invocation's softmax
fn walk_keys(at: QueryAt, first: u32, end: u32, step: u32) {
    let n_quads = HEAD_DIM / 4u;
    for (var j = first; j < end; j += step) {
        let kb = j * at.kv_stride + at.kv_offset;
        var s4 = vec4<f32>(0.0);
        for (var d = 0u; d < n_quads; d += 4u) {
#if KV_Q8
            // 16 elements of one q8_0 block: their sum, then times its scale
            var t4 = qv[d] * k_quad(kb + 4u * d);
#else
            var t4 = fma(qv[d], k_quad(kb + 4u * d), s4);
#endif
            t4 = fma(qv[d + 1u], k_quad(kb + 4u * d + 4u), t4);
            t4 = fma(qv[d + 2u], k_quad(kb + 4u * d + 8u), t4);
            t4 = fma(qv[d + 3u], k_quad(kb + 4u * d + 12u), t4);
#if KV_Q8
            s4 = fma(t4, vec4<f32>(k_scale(kb + 4u * d)), s4);
#else
            s4 = t4;
#endif
        }
        let rw = take_key(s4.x + s4.y + s4.z + s4.w, true);
        let rescale = vec4<f32>(rw.x);
        for (var d = 0u; d < n_quads; d += 4u) {
            let w = rw.y * v_scale(kb + 4u * d);
            acc[d] = fma(acc[d], rescale, w * v_quad(kb + 4u * d));
            acc[d + 1u] = fma(acc[d + 1u], rescale, w * v_quad(kb + 4u * d + 4u));
            acc[d + 2u] = fma(acc[d + 2u], rescale, w * v_quad(kb + 4u * d + 8u));
            acc[d + 3u] = fma(acc[d + 3u], rescale, w * v_quad(kb + 4u * d + 12u));
        }
    }
}
