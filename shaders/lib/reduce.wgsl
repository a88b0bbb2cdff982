// Workgroup-wide sum and max of one f32 per invocation, every invocation gets the result.
// The including kernel defines WG (its workgroup size, a power of two) and passes the
// invocation's local index plus, in the SUBGROUPS variant, its subgroup builtins. The subgroup
// path reduces inside each subgroup first and then across subgroups through shared memory,
// taking subgroup i to hold invocations i*size.. (i+1)*size-1 of a one-dimensional workgroup,
// as every driver we test lays them out; the shared-memory tree is the portable fallback.

var<workgroup> red_buf: array<f32, WG>;

struct Lane {
    local: u32,
    sg_size: u32,
    sg_lane: u32,
}

#if SUBGROUPS
fn wg_reduce(v: f32, lane: Lane, is_max: bool) -> f32 {
    var s: f32;
    if (is_max) { s = subgroupMax(v); } else { s = subgroupAdd(v); }
    let n_sg = (WG + lane.sg_size - 1u) / lane.sg_size;
    workgroupBarrier();
    if (lane.sg_lane == 0u) {
        red_buf[lane.local / lane.sg_size] = s;
    }
    workgroupBarrier();
    var t = red_buf[0];
    for (var i = 1u; i < n_sg; i++) {
        if (is_max) { t = max(t, red_buf[i]); } else { t += red_buf[i]; }
    }
    return t;
}
#else
fn wg_reduce(v: f32, lane: Lane, is_max: bool) -> f32 {
    workgroupBarrier();
    red_buf[lane.local] = v;
    for (var stride = WG / 2u; stride > 0u; stride >>= 1u) {
        workgroupBarrier();
        if (lane.local < stride) {
            let o = red_buf[lane.local + stride];
            if (is_max) {
                red_buf[lane.local] = max(red_buf[lane.local], o);
            } else {
                red_buf[lane.local] += o;
            }
        }
    }
    workgroupBarrier();
    return red_buf[0];
}
#endif

fn wg_sum(v: f32, lane: Lane) -> f32 {
    return wg_reduce(v, lane, false);
}

fn wg_max(v: f32, lane: Lane) -> f32 {
    return wg_reduce(v, lane, true);
}
