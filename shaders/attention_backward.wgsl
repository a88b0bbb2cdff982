// The gradients of causal attention (attention_query.wgsl's shapes, f32 K and V: training
// recomputes them) with respect to q, k and v, in three entry points the recorder runs in
// order, each over a range of keys or queries so that an invocation's loops stay within
// llvmpipe's budget (ranges after the first add to what the previous ones wrote):
//   stats: per (query, head), over keys k_begin..k_end: the softmax's running maximum m, its
//          sum s = Σ exp(score − m) and Σ exp(score − m) · (dout · v_j), as (m, s, d, 0).
//   dq:    per (query, head), over keys: dq = scale · Σ_j P_j (dout · v_j − D) k_j, with
//          P_j = exp(score_j − lse), lse = m + log(s), D = d / s (= dout · out).
//   dkv:   per (kv head, key), over queries t_begin..t_end of every query head reading it:
//          dv_j = Σ P_j dout, dk_j = scale · Σ P_j (dout · v_j − D) q.
// q, dout, dq: [n_q][n_head][head_dim]; k, v, dk, dv: [pos0 + n_q][n_kv_head][head_dim];
// stats: [n_q][n_head][4]. head_dim a multiple of 4, at most 256.

struct Params {
    n_q: u32,
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    pos0: u32,
    window: u32,
    scale: f32,
    first: u32,
    begin: u32,
    end: u32,
}

@group(0) @binding(0) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> k: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> v: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> dout: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read_write> dq: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> dk: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> dv: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> stats: array<vec4<f32>>;
@group(0) @binding(8) var<uniform> p: Params;

const NEG_BIG: f32 = -3.0e38;
const MAX_QUADS: u32 = 64u;

// the first key a query at position pos sees (0, or the start of its sliding window)
fn first_key(pos: u32) -> u32 {
    if (p.window > 0u && pos + 1u > p.window) {
        return pos + 1u - p.window;
    }
    return 0u;
}

// a · b over one head, both given as quad offsets
fn dot_qk(qa: u32, kb: u32) -> f32 {
    var s = vec4<f32>(0.0);
    for (var d = 0u; d < p.head_dim / 4u; d++) {
        s = fma(q[qa + d], k[kb + d], s);
    }
    return s.x + s.y + s.z + s.w;
}

fn dot_ov(oa: u32, vb: u32) -> f32 {
    var s = vec4<f32>(0.0);
    for (var d = 0u; d < p.head_dim / 4u; d++) {
        s = fma(dout[oa + d], v[vb + d], s);
    }
    return s.x + s.y + s.z + s.w;
}

// where invocation i's query t of head h sits: its position, its quads' offset in q, dout and
// dq, and its kv head; `valid` false past the end
struct QueryAt { t: u32, h: u32, pos: u32, qa: u32, kvh: u32, valid: bool }

fn query_at(gid: vec3<u32>, nwg: vec3<u32>) -> QueryAt {
    let i = gid.x + gid.y * nwg.x * 64u;
    let t = i / p.n_head;
    let h = i % p.n_head;
    return QueryAt(t, h, p.pos0 + t, (t * p.n_head + h) * (p.head_dim / 4u), h / (p.n_head / p.n_kv_head), i < p.n_q * p.n_head);
}

@compute @workgroup_size(64)
fn stats_pass(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let a = query_at(gid, nwg);
    if (!a.valid) {
        return;
    }
    let quads = p.head_dim / 4u;
    var st = vec4<f32>(NEG_BIG, 0.0, 0.0, 0.0);
    if (p.first == 0u) {
        st = stats[a.t * p.n_head + a.h];
    }
    for (var j = max(p.begin, first_key(a.pos)); j < min(p.end, a.pos + 1u); j++) {
        let kb = (j * p.n_kv_head + a.kvh) * quads;
        let score = dot_qk(a.qa, kb) * p.scale;
        let new_m = max(st.x, score);
        let r = exp(st.x - new_m);
        let w = exp(score - new_m);
        st = vec4<f32>(new_m, st.y * r + w, st.z * r + w * dot_ov(a.qa, kb), 0.0);
    }
    stats[a.t * p.n_head + a.h] = st;
}

@compute @workgroup_size(64)
fn dq_pass(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let a = query_at(gid, nwg);
    if (!a.valid) {
        return;
    }
    let quads = p.head_dim / 4u;
    let st = stats[a.t * p.n_head + a.h];
    let lse = st.x + log(st.y);
    let big_d = st.z / st.y;
    var acc: array<vec4<f32>, MAX_QUADS>;
    for (var d = 0u; d < quads; d++) {
        acc[d] = select(dq[a.qa + d], vec4<f32>(0.0), p.first != 0u);
    }
    for (var j = max(p.begin, first_key(a.pos)); j < min(p.end, a.pos + 1u); j++) {
        let kb = (j * p.n_kv_head + a.kvh) * quads;
        let pj = exp(dot_qk(a.qa, kb) * p.scale - lse);
        let ds = pj * (dot_ov(a.qa, kb) - big_d) * p.scale;
        for (var d = 0u; d < quads; d++) {
            acc[d] = fma(vec4<f32>(ds), k[kb + d], acc[d]);
        }
    }
    for (var d = 0u; d < quads; d++) {
        dq[a.qa + d] = acc[d];
    }
}

@compute @workgroup_size(64)
fn dkv_pass(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * nwg.x * 64u;
    let n_kv = p.pos0 + p.n_q;
    if (i >= n_kv * p.n_kv_head) {
        return;
    }
    let j = i / p.n_kv_head;
    let kvh = i % p.n_kv_head;
    let quads = p.head_dim / 4u;
    let kb = i * quads;
    let group = p.n_head / p.n_kv_head;
    var gk: array<vec4<f32>, MAX_QUADS>;
    var gv: array<vec4<f32>, MAX_QUADS>;
    for (var d = 0u; d < quads; d++) {
        gk[d] = select(dk[kb + d], vec4<f32>(0.0), p.first != 0u);
        gv[d] = select(dv[kb + d], vec4<f32>(0.0), p.first != 0u);
    }
    // the queries that see key j: positions j.. (and within the window)
    let t_lo = max(p.begin, select(0u, j - p.pos0, j > p.pos0));
    for (var t = t_lo; t < p.end; t++) {
        let pos = p.pos0 + t;
        if (first_key(pos) > j) {
            break;
        }
        for (var g = 0u; g < group; g++) {
            let h = kvh * group + g;
            let qa = (t * p.n_head + h) * quads;
            let st = stats[t * p.n_head + h];
            let pj = exp(dot_qk(qa, kb) * p.scale - (st.x + log(st.y)));
            let ds = pj * (dot_ov(qa, kb) - st.z / st.y) * p.scale;
            for (var d = 0u; d < quads; d++) {
                gv[d] = fma(vec4<f32>(pj), dout[qa + d], gv[d]);
                gk[d] = fma(vec4<f32>(ds), q[qa + d], gk[d]);
            }
        }
    }
    for (var d = 0u; d < quads; d++) {
        dk[kb + d] = gk[d];
        dv[kb + d] = gv[d];
    }
}
