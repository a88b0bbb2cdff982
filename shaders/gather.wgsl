// Embedding lookup: out[t] = dequantized row ids[t] of a GGUF table.
// table: [n_rows][k] as stored (one binding-sized chunk: rows row_offset..row_offset+n_rows);
// ids: [m] u32; out: [m][k] f32. Tokens whose row lives in another chunk are left to that
// chunk's dispatch.

struct Params {
    n_rows: u32,
    k: u32,
    row_bytes: u32,
    row_offset: u32,
    m: u32,
}

@group(0) @binding(0) var<storage, read> src_q: array<u32>;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

#include "lib/dequant.wgsl"

@compute @workgroup_size(64)
fn main(@builtin(local_invocation_index) lid: u32, @builtin(workgroup_id) wid: vec3<u32>) {
    let t = wid.x;
    let id = ids[t];
    if (t >= p.m || id < p.row_offset || id >= p.row_offset + p.n_rows) {
        return;
    }
    let row = (id - p.row_offset) * p.row_bytes;
    let k4 = p.k & ~3u;
    for (var i = lid * 4u; i < k4; i += 256u) {
        let v = dq4(row, i);
        out[t * p.k + i] = v.x;
        out[t * p.k + i + 1u] = v.y;
        out[t * p.k + i + 2u] = v.z;
        out[t * p.k + i + 3u] = v.w;
    }
    for (var i = k4 + lid; i < p.k; i += 64u) {
        out[t * p.k + i] = dq1(row, i);
    }
}
