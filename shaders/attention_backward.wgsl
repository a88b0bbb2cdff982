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
// Without BLOCKED (any head size): one invocation per (query, head) or (key, kv head), which
// loads both rows of every pair it takes.

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

#if BLOCKED
// BLOCKED: a workgroup of WG lanes takes WG queries of one head (stats, dq) or WG keys of one kv
// head (dkv), each lane its own rows and gradients in registers (HEAD_DIM fixed per pipeline so
// that the loops over a row unroll: indexing a row by a loop variable is a per-lane gather on
// CPU devices), and the lanes walk the other side's rows together, a row loaded once for all:
// ROW_BROADCAST (subgroups of exactly the WG = 8 lanes) has lane l load quads l, l + 8, ... of
// a row and subgroupBroadcast hand them to the others; otherwise TILE rows at a time go through
// workgroup memory. Lanes past the last query (key) repeat it and write nothing. HEAD_DIM a
// multiple of 16 (the row loops take 4 quads a step), of 32 with ROW_BROADCAST.
const HQ: u32 = HEAD_DIM / 4u;
alias Row = array<vec4<f32>, HQ>;

// quad i of q, k, v, dout, dq, dk or dv (which: 0 to 6, a constant wherever it is called)
fn quad(which: u32, i: u32) -> vec4<f32> {
    switch which {
        case 0u: { return q[i]; }
        case 1u: { return k[i]; }
        case 2u: { return v[i]; }
        case 3u: { return dout[i]; }
        case 4u: { return dq[i]; }
        case 5u: { return dk[i]; }
        default: { return dv[i]; }
    }
}

// this lane's own row at quad offset base (zeros for `zero`)
fn own_row(which: u32, base: u32, zero: bool) -> Row {
    var r: Row;
    for (var d = 0u; d < HQ; d++) {
        r[d] = select(quad(which, base + d), vec4<f32>(0.0), zero);
    }
    return r;
}

fn row_dot(a: Row, b: Row) -> f32 {
    var s = vec4<f32>(0.0);
    for (var d = 0u; d < HQ; d += 4u) {
        s = fma(a[d], b[d], s);
        s = fma(a[d + 1u], b[d + 1u], s);
        s = fma(a[d + 2u], b[d + 2u], s);
        s = fma(a[d + 3u], b[d + 3u], s);
    }
    return s.x + s.y + s.z + s.w;
}

// *acc += w · b, in steps of 4 quads (loops that unroll keep acc in registers on llvmpipe)
fn row_axpy(acc: ptr<function, Row>, w: f32, b: Row) {
    let w4 = vec4<f32>(w);
    for (var d = 0u; d < HQ; d += 4u) {
        (*acc)[d] = fma(w4, b[d], (*acc)[d]);
        (*acc)[d + 1u] = fma(w4, b[d + 1u], (*acc)[d + 1u]);
        (*acc)[d + 2u] = fma(w4, b[d + 2u], (*acc)[d + 2u]);
        (*acc)[d + 3u] = fma(w4, b[d + 3u], (*acc)[d + 3u]);
    }
}

fn store_row(which: u32, base: u32, r: Row) {
    for (var d = 0u; d < HQ; d++) {
        switch which {
            case 4u: { dq[base + d] = r[d]; }
            case 5u: { dk[base + d] = r[d]; }
            default: { dv[base + d] = r[d]; }
        }
    }
}

// the quad offset of the walk's row r: key r of kv head kvh (stats, dq), or (dkv) the pair of
// query r / group and query head kvh · group + r % group
fn row_base(dkv: bool, kvh: u32, r: u32) -> u32 {
    if (dkv) {
        let group = p.n_head / p.n_kv_head;
        return ((r / group) * p.n_head + kvh * group + r % group) * HQ;
    }
    return (r * p.n_kv_head + kvh) * HQ;
}

// a query row's (lse, D) from its stats (m, s, d)
fn lse_d(st: vec4<f32>) -> vec2<f32> {
    return vec2<f32>(st.x + log(st.y), st.z / st.y);
}

#if ROW_BROADCAST
// x of each of the 8 lanes
fn spread(x: vec4<f32>) -> array<vec4<f32>, 8> {
    return array<vec4<f32>, 8>(subgroupBroadcast(x, 0u), subgroupBroadcast(x, 1u), subgroupBroadcast(x, 2u), subgroupBroadcast(x, 3u),
                               subgroupBroadcast(x, 4u), subgroupBroadcast(x, 5u), subgroupBroadcast(x, 6u), subgroupBroadcast(x, 7u));
}

// the (lse, D) of the dkv walk's row r0 + lane (of n rows), which walk_stats hands round
var<private> lane_st: vec2<f32>;

fn load_tile(which_a: u32, which_b: u32, dkv: bool, kvh: u32, r0: u32, n: u32, lid: u32) {
    if (dkv) {
        lane_st = lse_d(stats[row_base(true, kvh, r0 + min(lid, n - 1u)) / HQ]);
    }
}
fn tile_done() {}

// the walk's row at quad offset base of buffer `which` (the tile's `half` and `slot` in the
// workgroup-memory form)
fn walk_row(which: u32, half: u32, slot: u32, base: u32, lid: u32) -> Row {
    var r: Row;
    for (var c = 0u; c < HQ; c += 8u) {
        let s = spread(quad(which, base + c + lid));
        for (var i = 0u; i < 8u; i++) {
            r[c + i] = s[i];
        }
    }
    return r;
}

// (lse, D) of the dkv walk's row in the tile's `slot`, query row qrow
fn walk_stats(slot: u32, qrow: u32) -> vec2<f32> {
    return subgroupShuffle(lane_st, slot);
}
#else
var<workgroup> tile_a: array<vec4<f32>, TILE * HQ>;
var<workgroup> tile_b: array<vec4<f32>, TILE * HQ>;
var<workgroup> tile_st: array<vec2<f32>, TILE>;

// rows r0.. r0 + n − 1 (n ≤ TILE) of the walk into workgroup memory: their quads of buffers
// which_a and which_b, and for dkv their query rows' (lse, D)
fn load_tile(which_a: u32, which_b: u32, dkv: bool, kvh: u32, r0: u32, n: u32, lid: u32) {
    for (var i = lid; i < n * HQ; i += WG) {
        let base = row_base(dkv, kvh, r0 + i / HQ) + i % HQ;
        tile_a[i] = quad(which_a, base);
        tile_b[i] = quad(which_b, base);
    }
    if (dkv) {
        for (var s = lid; s < n; s += WG) {
            tile_st[s] = lse_d(stats[row_base(true, kvh, r0 + s) / HQ]);
        }
    }
    workgroupBarrier();
}

fn tile_done() {
    workgroupBarrier();
}

fn walk_row(which: u32, half: u32, slot: u32, base: u32, lid: u32) -> Row {
    var r: Row;
    for (var d = 0u; d < HQ; d++) {
        if (half == 0u) {
            r[d] = tile_a[slot * HQ + d];
        } else {
            r[d] = tile_b[slot * HQ + d];
        }
    }
    return r;
}

fn walk_stats(slot: u32, qrow: u32) -> vec2<f32> {
    return tile_st[slot];
}
#endif

// the query block of workgroup wid: head h's queries t0.. t0 + WG − 1 (uniform: the walks'
// bounds and barriers depend on it)
struct Block { h: u32, kvh: u32, t0: u32, valid: bool }

fn query_block(wid: vec3<u32>, nwg: vec3<u32>) -> Block {
    let w = wid.x + wid.y * nwg.x;
    let blocks = (p.n_q + WG - 1u) / WG;
    let h = w / blocks;
    return Block(h, h / (p.n_head / p.n_kv_head), w % blocks * WG, h < p.n_head);
}

@compute @workgroup_size(WG)
fn stats_pass(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = query_block(wid, nwg);
    if (!b.valid) {
        return;
    }
    let t = min(b.t0 + lid, p.n_q - 1u);
    let row = t * p.n_head + b.h;
    let qv = own_row(0u, row * HQ, false);
    let ov = own_row(3u, row * HQ, false);
    let pos = p.pos0 + t;
    let k_first = first_key(pos);
    var st = vec4<f32>(NEG_BIG, 0.0, 0.0, 0.0);
    if (p.first == 0u) {
        st = stats[row];
    }
    // the keys any of the block's queries sees
    let lo = max(p.begin, first_key(p.pos0 + b.t0));
    let hi = min(p.end, p.pos0 + min(b.t0 + WG, p.n_q));
    for (var j0 = lo; j0 < hi; j0 += TILE) {
        let n = min(TILE, hi - j0);
        load_tile(1u, 2u, false, b.kvh, j0, n, lid);
        for (var i = 0u; i < n; i++) {
            let j = j0 + i;
            let kb = row_base(false, b.kvh, j);
            let score = row_dot(qv, walk_row(1u, 0u, i, kb, lid)) * p.scale;
            let dov = row_dot(ov, walk_row(2u, 1u, i, kb, lid));
            let new_m = max(st.x, score);
            let r = exp(st.x - new_m);
            let w = exp(score - new_m);
            let next = vec4<f32>(new_m, st.y * r + w, st.z * r + w * dov, 0.0);
            st = select(st, next, j >= k_first && j <= pos);
        }
        tile_done();
    }
    if (b.t0 + lid < p.n_q) {
        stats[row] = st;
    }
}

@compute @workgroup_size(WG)
fn dq_pass(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let b = query_block(wid, nwg);
    if (!b.valid) {
        return;
    }
    let t = min(b.t0 + lid, p.n_q - 1u);
    let row = t * p.n_head + b.h;
    let qv = own_row(0u, row * HQ, false);
    let ov = own_row(3u, row * HQ, false);
    let ld = lse_d(stats[row]);
    var acc = own_row(4u, row * HQ, p.first != 0u);
    let pos = p.pos0 + t;
    let k_first = first_key(pos);
    let lo = max(p.begin, first_key(p.pos0 + b.t0));
    let hi = min(p.end, p.pos0 + min(b.t0 + WG, p.n_q));
    for (var j0 = lo; j0 < hi; j0 += TILE) {
        let n = min(TILE, hi - j0);
        load_tile(1u, 2u, false, b.kvh, j0, n, lid);
        for (var i = 0u; i < n; i++) {
            let j = j0 + i;
            let kb = row_base(false, b.kvh, j);
            let kr = walk_row(1u, 0u, i, kb, lid);
            let pj = exp(row_dot(qv, kr) * p.scale - ld.x);
            let ds = pj * (row_dot(ov, walk_row(2u, 1u, i, kb, lid)) - ld.y) * p.scale;
            row_axpy(&acc, select(0.0, ds, j >= k_first && j <= pos), kr);
        }
        tile_done();
    }
    if (b.t0 + lid < p.n_q) {
        store_row(4u, row * HQ, acc);
    }
}

@compute @workgroup_size(WG)
fn dkv_pass(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = wid.x + wid.y * nwg.x;
    let n_kv = p.pos0 + p.n_q;
    let blocks = (n_kv + WG - 1u) / WG;
    let kvh = w / blocks;
    if (kvh >= p.n_kv_head) {
        return;
    }
    let j0 = w % blocks * WG;
    let j = min(j0 + lid, n_kv - 1u);
    let j_last = min(j0 + WG, n_kv) - 1u;
    let group = p.n_head / p.n_kv_head;
    let kb = row_base(false, kvh, j);
    let kr = own_row(1u, kb, false);
    let vr = own_row(2u, kb, false);
    var gk = own_row(5u, kb, p.first != 0u);
    var gv = own_row(6u, kb, p.first != 0u);
    // the queries that see one of the block's keys: from the first key's position on, up to
    // the last whose window still holds the last key
    let t_lo = max(p.begin, select(0u, j0 - p.pos0, j0 > p.pos0));
    var t_hi = p.end;
    if (p.window > 0u) {
        t_hi = min(t_hi, select(0u, j_last + p.window - p.pos0, j_last + p.window > p.pos0));
    }
    let lo = t_lo * group;
    let hi = max(t_hi, t_lo) * group;
    for (var r0 = lo; r0 < hi; r0 += TILE) {
        let n = min(TILE, hi - r0);
        load_tile(0u, 3u, true, kvh, r0, n, lid);
        for (var i = 0u; i < n; i++) {
            let r = r0 + i;
            let qa = row_base(true, kvh, r);
            let qr = walk_row(0u, 0u, i, qa, lid);
            let dr = walk_row(3u, 1u, i, qa, lid);
            let ld = walk_stats(i, qa / HQ);
            let pos = p.pos0 + r / group;
            let seen = j <= pos && first_key(pos) <= j;
            let pj = select(0.0, exp(row_dot(qr, kr) * p.scale - ld.x), seen);
            let ds = pj * (row_dot(dr, vr) - ld.y) * p.scale;
            row_axpy(&gv, pj, dr);
            row_axpy(&gk, ds, qr);
        }
        tile_done();
    }
    if (j0 + lid < n_kv) {
        store_row(5u, kb, gk);
        store_row(6u, kb, gv);
    }
}
#else

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
#endif
