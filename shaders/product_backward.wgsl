// The gradient of y = x · Wᵀ with respect to x, for weights as GGUF stores them (W frozen):
//   dx[t][c] (+)= Σ_r dy[t][row_offset + r − dy_first_row] · W[r][c]
// over the rows r_begin..r_end of one binding-sized chunk of W (rows row_offset.. of the whole
// matrix); dy: [m][dy_stride], its column 0 the gradient of row dy_first_row (a stacked
// matrix's part); dx: [m][k] f32, added to with ACCUMULATE (the recorder adds every chunk and
// row range after the first). One invocation per (token, four columns), walking the
// rows: each dq4 decodes four columns of a row at once.

struct Params {
    n_rows: u32,
    k: u32,
    row_bytes: u32,
    row_offset: u32,
    m: u32,
    dy_stride: u32,
    dy_first_row: u32,
    r_begin: u32,
    r_end: u32,
}

@group(0) @binding(0) var<storage, read> src_q: array<u32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

#include "lib/dequant.wgsl"

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let quads = (p.k + 3u) / 4u;
    let i = gid.x + gid.y * nwg.x * 64u;
    if (i >= p.m * quads) {
        return;
    }
    let t = i / quads;
    let c = (i % quads) * 4u;
    let dy_row = t * p.dy_stride + p.row_offset - p.dy_first_row;
    var acc = vec4<f32>(0.0);
    if (c + 4u <= p.k) {
        for (var r = p.r_begin; r < p.r_end; r++) {
            acc = fma(vec4<f32>(dy[dy_row + r]), dq4(r * p.row_bytes, c), acc);
        }
    } else {
        // the last columns of a row whose length is no multiple of 4 (a LoRA factor's rank)
        for (var r = p.r_begin; r < p.r_end; r++) {
            let d = dy[dy_row + r];
            for (var j = 0u; j < p.k - c; j++) {
                acc[j] = fma(d, dq1(r * p.row_bytes, c + j), acc[j]);
            }
        }
    }
    let out = t * p.k + c;
    for (var j = 0u; j < min(4u, p.k - c); j++) {
#if ACCUMULATE
        dx[out + j] += acc[j];
#else
        dx[out + j] = acc[j];
#endif
    }
}
