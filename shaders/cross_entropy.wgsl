// Softmax cross-entropy of each row of logits against its target, weighted per row (0 for a
// position not trained on), and its gradient:
//   loss[t] = weight[t] · (logsumexp(z_t) − z_t[target_t])
//   grad[t] = weight[t] · (softmax(z_t) − onehot(target_t))
// logits, grad: [n_rows][n_vocab] f32 (grad may not be logits); targets: [n_rows] u32;
// weights, loss: [n_rows] f32. One workgroup per row, three passes over it (max, sum, write).

struct Params {
    n_vocab: u32,
    n_rows: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read> targets: array<u32>;
@group(0) @binding(2) var<storage, read> weights: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad: array<f32>;
@group(0) @binding(4) var<storage, read_write> loss: array<f32>;
@group(0) @binding(5) var<uniform> p: Params;

#include "lib/reduce.wgsl"

@compute @workgroup_size(WG)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>,
        @builtin(num_workgroups) nwg: vec3<u32> SG_PARAMS) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= p.n_rows) {
        return;
    }
    let lane = Lane(lid, SG_SIZE, SG_LANE);
    let base = row * p.n_vocab;
    var m = -3.0e38;
    for (var i = lid; i < p.n_vocab; i += WG) {
        m = max(m, logits[base + i]);
    }
    m = wg_max(m, lane);
    var s = 0.0;
    for (var i = lid; i < p.n_vocab; i += WG) {
        s += exp(logits[base + i] - m);
    }
    let lse = m + log(wg_sum(s, lane));
    let w = weights[row];
    let tgt = targets[row];
    for (var i = lid; i < p.n_vocab; i += WG) {
        let onehot = select(0.0, 1.0, i == tgt);
        grad[base + i] = w * (exp(logits[base + i] - lse) - onehot);
    }
    if (lid == 0u) {
        loss[row] = select(0.0, w * (lse - logits[base + tgt]), w != 0.0);
    }
}
