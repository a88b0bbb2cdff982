// Flash attention with the keys and values in workgroup memory, for GPUs: each tile of keys is
// loaded once for ROWS query rows of one kv head (attention_workgroup.wgsl loads it once per
// row), the rows being (query t, query head h) pairs of that kv head's GROUP = n_head /
// n_kv_head heads, row r = t · GROUP + h mod GROUP, ROWS consecutive rows a workgroup.
// The queries are consecutive positions pos0 + t of one sequence (no SEQ_ROWS), so a
// workgroup's rows see one range of keys: from the first row's first key to the last row's
// position; each row masks the keys outside its own causal / sliding-window range.
// q: [n_q][n_head][head_dim] f32; k_cache, v_cache: [ctx][n_kv_head][head_dim] (f32, f16 or
// q8_0, see lib/kv.wgsl), holding positions 0..pos0+n_q at rows kv_row0..;
// out: [n_q][n_head][head_dim] f32, or with SPLIT_K the partials buffer (workgroup_id.z takes
// one chunk of the keys; attention_merge.wgsl turns them into the output).
// Dispatch: (row blocks ceil(n_q · GROUP / ROWS), n_kv_head, chunks); WG = CHUNK = 64
// invocations. The head is walked in HEAD_CHUNKS chunks of 64 dimensions, so that a tile of
// keys fits WebGPU's 16 KiB of workgroup memory for heads up to 256 (ROWS · HEAD_CHUNKS ≤ 32).

@group(0) @binding(0) var<storage, read> q: array<f32>;
@group(0) @binding(1) var<storage, read> k_cache: array<KvStore>;
@group(0) @binding(2) var<storage, read> v_cache: array<KvStore>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> p: Params;

#include "lib/kv.wgsl"
#include "lib/attention.wgsl"

const CHUNK: u32 = 64u;
const TILE_KEYS: u32 = 16u;
const Q_STRIDE: u32 = HEAD_CHUNKS * CHUNK;
// one column of padding: the lanes reading one dimension of 16 keys (or 16 keys of a row) hit
// 16 different banks
const KV_STRIDE: u32 = CHUNK + 1u;
const W_STRIDE: u32 = TILE_KEYS + 1u;
// the (row, key) scores of a tile, ROWS · TILE_KEYS of them, over WG invocations
const SCORES_PER_LANE: u32 = (ROWS * TILE_KEYS + WG - 1u) / WG;

// the rows' queries times the scale, zero past head_dim and for rows past the last: [ROWS][Q_STRIDE]
var<workgroup> q_sh: array<f32, ROWS * Q_STRIDE>;
// 64 dimensions of a tile's keys, then of its values, zero past head_dim and the keys' end: [TILE_KEYS][KV_STRIDE]
var<workgroup> kv_sh: array<f32, TILE_KEYS * KV_STRIDE>;
// the tile's scores (NEG_BIG where masked), then its softmax weights: [ROWS][W_STRIDE]
var<workgroup> w_sh: array<f32, ROWS * W_STRIDE>;
// what each row's output is scaled by before the tile's weighted values join it, then its sum of weights
var<workgroup> row_rescale: array<f32, ROWS>;
var<workgroup> row_sum: array<f32, ROWS>;

fn k_elem(i: u32) -> f32 {
#if KV_Q8
    return kv_value(k_cache[kv_word(i)], i) * q8_scale(k_cache[q8_scale_word(i)], i);
#else
    return kv_value(k_cache[kv_word(i)], i);
#endif
}

fn v_elem(i: u32) -> f32 {
#if KV_Q8
    return kv_value(v_cache[kv_word(i)], i) * q8_scale(v_cache[q8_scale_word(i)], i);
#else
    return kv_value(v_cache[kv_word(i)], i);
#endif
}

// dimensions c · CHUNK.. of keys k0.. (their values with `values`) into kv_sh: invocation lid
// loads dimension lid of every key of the tile
fn load_tile(values: bool, kv_base: u32, kv_stride: u32, k0: u32, k_end: u32, c: u32, lid: u32) {
    let d = c * CHUNK + lid;
    for (var j = 0u; j < TILE_KEYS; j++) {
        var x = 0.0;
        if (d < p.head_dim && k0 + j < k_end) {
            let i = kv_base + (k0 + j) * kv_stride + d;
            if (values) {
                x = v_elem(i);
            } else {
                x = k_elem(i);
            }
        }
        kv_sh[j * KV_STRIDE + lid] = x;
    }
}

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let hd = p.head_dim;
    let group = p.n_head / p.n_kv_head;
    let n_rows = p.n_q * group;
    let kvh = wid.y;
    let row0 = wid.x * ROWS;
    let rows_here = min(ROWS, n_rows - row0);
    let kv_stride = p.n_kv_head * hd;
    let kv_base = p.kv_row0 * kv_stride + kvh * hd;

    for (var e = lid; e < ROWS * Q_STRIDE; e += WG) {
        let r = e / Q_STRIDE;
        let d = e % Q_STRIDE;
        var x = 0.0;
        if (r < rows_here && d < hd) {
            let rg = row0 + r;
            x = q[((rg / group) * p.n_head + kvh * group + rg % group) * hd + d] * p.scale;
        }
        q_sh[e] = x;
    }

    // the workgroup's keys: from its first query's first key to its last query's own
    let keys = split_keys(first_key(p.pos0 + row0 / group), p.pos0 + (row0 + rows_here - 1u) / group + 1u, wid.z);
    let k_start = keys.x;
    let k_end = keys.y;
    // invocation r < ROWS: row r's running maximum and sum of weights
    var run_max = NEG_BIG;
    var run_sum = 0.0;
    // acc[c · ROWS + r]: row r's output at dimension c · CHUNK + lid
    var acc = array<f32, ROWS * HEAD_CHUNKS>();

    for (var k0 = k_start; k0 < k_end; k0 += TILE_KEYS) {
        // scores: this invocation's (row, key) pairs e = lid + j · WG, row e / TILE_KEYS
        var s = array<f32, SCORES_PER_LANE>();
        for (var c = 0u; c < HEAD_CHUNKS; c++) {
            workgroupBarrier(); // kv_sh's last readers are done
            load_tile(false, kv_base, kv_stride, k0, k_end, c, lid);
            workgroupBarrier();
            for (var j = 0u; j < SCORES_PER_LANE; j++) {
                let e = lid + j * WG;
                if (e < ROWS * TILE_KEYS) {
                    let qo = (e / TILE_KEYS) * Q_STRIDE + c * CHUNK;
                    let ko = (e % TILE_KEYS) * KV_STRIDE;
                    var a = s[j];
                    for (var d = 0u; d < CHUNK; d++) {
                        a += q_sh[qo + d] * kv_sh[ko + d];
                    }
                    s[j] = a;
                }
            }
        }
        for (var j = 0u; j < SCORES_PER_LANE; j++) {
            let e = lid + j * WG;
            if (e < ROWS * TILE_KEYS) {
                let r = e / TILE_KEYS;
                let key = k0 + e % TILE_KEYS;
                let pos = p.pos0 + (row0 + r) / group;
                let seen = r < rows_here && key < k_end && key <= pos && key >= first_key(pos);
                w_sh[r * W_STRIDE + e % TILE_KEYS] = select(NEG_BIG, s[j], seen);
            }
        }
        workgroupBarrier();
        // each row's online softmax: its new maximum, its weights, its output's rescale
        if (lid < ROWS) {
            let wo = lid * W_STRIDE;
            var m = run_max;
            for (var j = 0u; j < TILE_KEYS; j++) {
                m = max(m, w_sh[wo + j]);
            }
            var sum = 0.0;
            for (var j = 0u; j < TILE_KEYS; j++) {
                let x = w_sh[wo + j];
                let w = select(0.0, exp(x - m), x > NEG_BIG);
                w_sh[wo + j] = w;
                sum += w;
            }
            let rescale = exp(run_max - m);
            run_sum = run_sum * rescale + sum;
            run_max = m;
            row_rescale[lid] = rescale;
        }
        // the weighted values, 64 dimensions at a time
        for (var c = 0u; c < HEAD_CHUNKS; c++) {
            workgroupBarrier(); // the weights are written; kv_sh's last readers are done
            load_tile(true, kv_base, kv_stride, k0, k_end, c, lid);
            workgroupBarrier();
            for (var r = 0u; r < ROWS; r++) {
                var a = acc[c * ROWS + r] * row_rescale[r];
                for (var j = 0u; j < TILE_KEYS; j++) {
                    a += w_sh[r * W_STRIDE + j] * kv_sh[j * KV_STRIDE + lid];
                }
                acc[c * ROWS + r] = a;
            }
        }
    }

    if (lid < ROWS) {
        row_sum[lid] = run_sum;
#if SPLIT_K
        // (running maximum, sum of weights) of the rows there are; an empty chunk's scales to 0
        if (lid < rows_here) {
            let rg = row0 + lid;
            let stats = partial_stats(wid.z, (rg / group) * p.n_head + kvh * group + rg % group, hd);
            out[stats] = run_max;
            out[stats + 1u] = run_sum;
        }
#endif
    }
    workgroupBarrier();
    for (var c = 0u; c < HEAD_CHUNKS; c++) {
        let d = c * CHUNK + lid;
        if (d < hd) {
            for (var r = 0u; r < rows_here; r++) {
                let rg = row0 + r;
                let row = (rg / group) * p.n_head + kvh * group + rg % group;
#if SPLIT_K
                out[partial_out(wid.z, row, hd) + d] = acc[c * ROWS + r];
#else
                out[row * hd + d] = acc[c * ROWS + r] / row_sum[r];
#endif
            }
        }
    }
}
