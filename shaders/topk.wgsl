// One pass of a top-k selection over (value, id) candidates, highest value first and the lower
// id first among equal values. Each workgroup takes CHUNK consecutive candidates and writes its
// own k best, sorted, to out[wid * k ..]; the host repeats passes over those until one workgroup
// remains. Argmax is the k = 1 case.
// values: [n] f32; ids: [n] u32 (ignored when first_pass: the id is the index);
// mask: the allowed ids when `masked` (bit i % 32 of word i / 32; ids past its words are not
// allowed), read in the first pass only: constrained decoding selects among the tokens a
// grammar allows and still reads back k values; out_values, out_ids: [n_workgroups * k].
// Fewer than k allowed candidates leave the rest of a workgroup's output with id NO_ID.

struct Params {
    n: u32,
    k: u32,
    first_pass: u32,
    masked: u32,
}

@group(0) @binding(0) var<storage, read> values: array<f32>;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> out_values: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_ids: array<u32>;
@group(0) @binding(5) var<uniform> p: Params;

const WGS: u32 = 256u;
const PER_LANE: u32 = 4u;
const CHUNK: u32 = 1024u;
const NO_ID: u32 = 0xFFFFFFFFu;

var<workgroup> cand_v: array<f32, CHUNK>;
var<workgroup> cand_id: array<u32, CHUNK>;
var<workgroup> best_slot: array<u32, WGS>;

// is candidate g of the first pass one the mask allows?
fn allowed(g: u32) -> bool {
    if (p.masked == 0u || p.first_pass == 0u) { return true; }
    let w = g / 32u;
    return w < arrayLength(&mask) && ((mask[w] >> (g % 32u)) & 1u) == 1u;
}

// does candidate (va, ia) rank above (vb, ib)? a taken or empty slot (NO_ID) ranks below all
fn better(va: f32, ia: u32, vb: f32, ib: u32) -> bool {
    if (ia == NO_ID) { return false; }
    if (ib == NO_ID) { return true; }
    return va > vb || (va == vb && ia < ib);
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let start = wid.x * CHUNK;
    for (var e = lid; e < CHUNK; e += WGS) {
        let g = start + e;
        var v = 0.0;
        var id = NO_ID;
        if (g < p.n && allowed(g)) {
            v = values[g];
            id = select(ids[g], g, p.first_pass != 0u);
        }
        cand_v[e] = v;
        cand_id[e] = id;
    }
    workgroupBarrier();
    for (var s = 0u; s < p.k; s++) {
        // each lane's best of its slots, then a tree over lanes
        var bv = 0.0;
        var bslot = lid;
        var bid = NO_ID;
        for (var c = 0u; c < PER_LANE; c++) {
            let slot = lid + c * WGS;
            if (better(cand_v[slot], cand_id[slot], bv, bid)) {
                bv = cand_v[slot];
                bid = cand_id[slot];
                bslot = slot;
            }
        }
        best_slot[lid] = bslot;
        for (var stride = WGS / 2u; stride > 0u; stride >>= 1u) {
            workgroupBarrier();
            if (lid < stride) {
                let o = best_slot[lid + stride];
                let m = best_slot[lid];
                if (better(cand_v[o], cand_id[o], cand_v[m], cand_id[m])) {
                    best_slot[lid] = o;
                }
            }
        }
        workgroupBarrier();
        if (lid == 0u) {
            let w = best_slot[0];
            out_values[wid.x * p.k + s] = cand_v[w];
            out_ids[wid.x * p.k + s] = cand_id[w];
            cand_id[w] = NO_ID;
        }
        workgroupBarrier();
    }
}

// k = 1 (greedy decoding): every invocation keeps the best of its strided share of ARG_CHUNK
// candidates in registers, and one tree over the workgroup picks the winner. Far fewer
// barriers per candidate than `main`'s selection rounds, which matters on CPU devices, where
// each barrier switches through every invocation.
const ARG_WG: u32 = 64u;
const ARG_CHUNK: u32 = 4096u;

var<workgroup> arg_v: array<f32, ARG_WG>;
var<workgroup> arg_id: array<u32, ARG_WG>;

@compute @workgroup_size(64)
fn argmax(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let start = wid.x * ARG_CHUNK;
    var bv = 0.0;
    var bid = NO_ID;
    for (var e = lid; e < ARG_CHUNK; e += ARG_WG) {
        let g = start + e;
        if (g < p.n && allowed(g)) {
            let v = values[g];
            let id = select(ids[g], g, p.first_pass != 0u);
            if (better(v, id, bv, bid)) {
                bv = v;
                bid = id;
            }
        }
    }
    arg_v[lid] = bv;
    arg_id[lid] = bid;
    for (var stride = ARG_WG / 2u; stride > 0u; stride >>= 1u) {
        workgroupBarrier();
        if (lid < stride && better(arg_v[lid + stride], arg_id[lid + stride], arg_v[lid], arg_id[lid])) {
            arg_v[lid] = arg_v[lid + stride];
            arg_id[lid] = arg_id[lid + stride];
        }
    }
    if (lid == 0u) {
        out_values[wid.x] = arg_v[0];
        out_ids[wid.x] = arg_id[0];
    }
}
