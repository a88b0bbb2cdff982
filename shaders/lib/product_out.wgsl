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
//                 decode); with SEQ_ROWS each token at its own sequence's position and rows
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
    let e = i % p.head_dim;
    var turned = vec2<f32>(a, b);
    if (e < p.n_rot) {
        turned = rotate(a, b, rope_sin_cos(pos, e / 2u, p.n_rot, p.log2_base, p.freq_scale));
    }
    if (r < p.n0) {
        y[t * p.n0 + i] = turned.x;
        y[t * p.n0 + i + 1u] = turned.y;
    } else {
        put_k(row * p.n1 + i, turned.x, turned.y);
    }
}
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
