// The second pass of split-K attention (SPLIT_K in attention_query.wgsl and
// attention_workgroup.wgsl, flash-decoding): each chunk of a query's keys left its unnormalised
// output and its softmax's (maximum, sum) in part (lib/attention.wgsl's partial_out,
// partial_stats); their sum, each rescaled to the largest maximum, over the sum of weights is
// the output. out: [n_q][n_head][head_dim] f32, one element per invocation.

@group(0) @binding(0) var<storage, read> part: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: Params;

#include "lib/attention.wgsl"

@compute @workgroup_size(WG)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * WG;
    let hd = p.head_dim;
    if (i >= p.n_q * p.n_head * hd) {
        return;
    }
    let row = i / hd;
    let d = i % hd;
    // every query sees its own key, so some chunk's maximum is a score; an empty chunk's
    // (NEG_BIG) scales to 0
    var m = NEG_BIG;
    for (var c = 0u; c < p.n_split; c++) {
        m = max(m, part[partial_stats(c, row, hd)]);
    }
    var sum = 0.0;
    var o = 0.0;
    for (var c = 0u; c < p.n_split; c++) {
        let s = partial_stats(c, row, hd);
        let w = exp(part[s] - m);
        sum += w * part[s + 1u];
        o += w * part[partial_out(c, row, hd) + d];
    }
    out[i] = o / sum;
}
