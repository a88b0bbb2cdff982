// Where a product's results go, shared by matvec.wgsl and matmul.wgsl (which declare `p`, the
// outputs y, y1, y2 and include this file). Fusing the output step into the product saves a
// dispatch and a round trip through memory per fused op; on CPU devices a dispatch costs
// tens of microseconds whatever it does.
//
//   default       split: matrix rows 0..n0 → y [m][n0], n0..n0+n1 → y1 [m][n1], the rest → y2
//                 (one product for stacked q/k/v weights; n0 = all rows for a plain product)
//   OUT_RESIDUAL  y [m][n_total] += the product (an output projection into the residual stream)
//   OUT_GLU       the rows are [gate; up] halves of n0 each, y [m][n0] = act(gate) · up with
//                 act silu, or gelu_tanh under GLU_GELU (matvec only: the invocation holding
//                 gate row i also holds up row i)
//   OUT_QKV_ROPE  the rows are stacked q (n0), k (n1) and v projections of tokens at positions
//                 pos0.. (matvec only, rows in pairs (2i, 2i+1) held by one invocation): q and k
//                 turned by RoPE in adjacent-pair mode, q into y [m][n0], k and v straight into
//                 the KV cache at rows kv_row0 + pos (the rope_kv dispatch, fused away for
//                 decode); with SEQ_ROWS each token at its own sequence's position and rows.
//                 KV_Q8 (a q8_0 cache; TPR 1, RPI 8, every part a multiple of 64 rows, so that
//                 a workgroup's rows are whole blocks of one part): store_qkv_q8, four
//                 invocations to a block of 32, their largest magnitude met in workgroup memory
//   OUT_ARGMAX    split, one token (matvec only): also each row group's best row, or each
//                 workgroup's under X_BROADCAST (one subgroup), as its value into y1 and its
//                 row into y2 (as u32 bits) at slot best0 + that group's index: greedy
//                 decoding's argmax of the logits then starts from a few thousand candidates
//                 instead of the whole vocabulary (topk.wgsl takes it from there)
#include "lib/activation.wgsl"
#if OUT_QKV_ROPE
#include "lib/kv_write.wgsl"
#include "lib/rotary.wgsl"

#include "lib/seq_place.wgsl"

// rows i, i + 1 (i even) of q or k turned by RoPE for position pos
fn turn_pair(a: f32, b: f32, i: u32, pos: u32) -> vec2<f32> {
    let e = i % p.head_dim;
    if (e < p.n_rot) {
        return rotate(a, b, rope_sin_cos(pos, e / 2u, p.n_rot, p.log2_base, p.freq_scale));
    }
    return vec2<f32>(a, b);
}

#if KV_Q8
var<workgroup> block_amax: array<f32, WG>;

// the largest of the magnitudes invocations b.. b + 3 put in block_amax
fn block_max(b: u32) -> f32 {
    return max(max(block_amax[b], block_amax[b + 1u]), max(block_amax[b + 2u], block_amax[b + 3u]));
}

// rows r.. r + 7 (chunk-local; one invocation's) of token t: q turned into y, k turned and v
// quantized into the q8_0 cache as rope_kv.wgsl's store_q8_block does (d = amax / 127 over
// the block, round(x / d)), the invocation starting each 64 elements storing both blocks'
// scales. Called by every invocation (it has barriers).
fn store_qkv_q8(t: u32, r_local: u32, acc: array<f32, RPI>, lid: u32) {
    let place = seq_place(t);
    let pos = place.x;
    let row = place.y + pos;
    let r = p.row_offset + r_local;
    let is_q = r < p.n0;
    let is_v = r >= p.n0 + p.n1;
    let i = select(select(r - p.n0, r - p.n0 - p.n1, is_v), r, is_q);   // row within its part
    var lo = vec4<f32>(acc[0], acc[1], acc[2], acc[3]);
    var hi = vec4<f32>(acc[4], acc[5], acc[6], acc[7]);
    if (!is_v) {
        lo = vec4<f32>(turn_pair(lo.x, lo.y, i, pos), turn_pair(lo.z, lo.w, i + 2u, pos));
        hi = vec4<f32>(turn_pair(hi.x, hi.y, i + 4u, pos), turn_pair(hi.z, hi.w, i + 6u, pos));
    }
    let live = r_local < p.n_rows;
    if (is_q && live) {
        let o = t * p.n0 + i;
        y[o] = lo.x; y[o + 1u] = lo.y; y[o + 2u] = lo.z; y[o + 3u] = lo.w;
        y[o + 4u] = hi.x; y[o + 5u] = hi.y; y[o + 6u] = hi.z; y[o + 7u] = hi.w;
    }
    let m = max(abs(lo), abs(hi));
    block_amax[lid] = max(max(m.x, m.y), max(m.z, m.w));
    workgroupBarrier();
    let d = block_max(lid & ~3u) / 127.0;
    let d_next = block_max((lid | 4u) & ~3u) / 127.0;   // the odd block's, for the scales' word
    workgroupBarrier();   // block_amax is the next token's after this
    if (!is_q && live) {
        let id = select(0.0, 1.0 / d, d > 0.0);
        let e = row * select(p.n1, p.n_total - p.n0 - p.n1, is_v) + i;   // element of the cache
        put_q8_word(is_v, e / 4u, q8_pack(lo, id));
        put_q8_word(is_v, e / 4u + 1u, q8_pack(hi, id));
        if ((lid & 7u) == 0u) {
            put_q8_word(is_v, q8_scale_word(e), pack2x16float(vec2<f32>(d, d_next)));
        }
    }
}
#else
// rows r, r + 1 (r even, both of one part) of token t
fn store_qkv_pair(t: u32, r: u32, a: f32, b: f32) {
    let place = seq_place(t);
    let pos = place.x;
    let row = place.y + pos;
    let n2 = p.n_total - p.n0 - p.n1;
    if (r >= p.n0 + p.n1) {
        put_v(row * n2 + r - p.n0 - p.n1, a, b);
        return;
    }
    let i = select(r - p.n0, r, r < p.n0);   // row within q or k
    let turned = turn_pair(a, b, i, pos);
    if (r < p.n0) {
        y[t * p.n0 + i] = turned.x;
        y[t * p.n0 + i + 1u] = turned.y;
    } else {
        put_k(row * p.n1 + i, turned.x, turned.y);
    }
}
#endif
#endif

#if OUT_QKV_ROPE
#else
fn store_row(t: u32, r: u32, v: f32) {
#if OUT_RESIDUAL
    let i = t * p.n_total + r;
    y[i] = y[i] + v;
#else
    if (r < p.n0) {
        y[t * p.n0 + r] = v;
    } else if (r < p.n0 + p.n1) {
        y1[t * p.n1 + r - p.n0] = v;
    } else {
        let n2 = p.n_total - p.n0 - p.n1;
        y2[t * n2 + r - p.n0 - p.n1] = v;
    }
#endif
}
#endif

fn glu(gate: f32, up: f32) -> f32 {
#if GLU_GELU
    return gelu_tanh(gate) * up;
#else
    return silu(gate) * up;
#endif
}
