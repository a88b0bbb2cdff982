// Prefill-time product Y = X Wᵀ of a GGUF weight matrix with a block of activations.
// W: [n_rows][k] as stored GGUF blocks (one binding-sized chunk of rows per dispatch);
// X: [m][k] f32; outputs as product_out.wgsl says (split or OUT_RESIDUAL), this chunk's rows
// starting at row_offset.
// Each workgroup computes a 64-row by 32-token tile. Every step dequantizes a 64x16 slice of W
// and loads a 32x16 slice of X into shared memory once, and every invocation accumulates a
// 4-row by 2-token patch of the tile from it, so each weight is dequantized once per 32 tokens.

// matvec.wgsl's parameters and bindings (norm_w, resid and sum are unused here)
struct Params {
    n_rows: u32,
    k: u32,
    row_bytes: u32,
    row_offset: u32,
    m: u32,           // tokens
    n_total: u32,     // rows of the whole matrix
    n0: u32,
    n1: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> src_q: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read_write> y1: array<f32>;
@group(0) @binding(5) var<storage, read_write> y2: array<f32>;
@group(0) @binding(8) var<uniform> p: Params;

#include "lib/dequant.wgsl"
#include "lib/product_out.wgsl"

const TILE_R: u32 = 64u;
const TILE_T: u32 = 32u;
const TILE_K: u32 = 16u;

var<workgroup> w_tile: array<array<f32, 17>, 64>;  // [row][k], padded against bank conflicts
var<workgroup> x_tile: array<array<f32, 17>, 32>;  // [token][k]

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32,
        @builtin(workgroup_id) wid: vec3<u32>) {
    let r0 = wid.x * TILE_R;
    let t0 = wid.y * TILE_T;
    let tr = (lid % 16u) * 4u;   // this invocation's rows in the tile: tr..tr+3
    let tt = (lid / 16u) * 2u;   // and tokens: tt, tt+1
    var acc = array<array<f32, 2>, 4>();

    for (var k0 = 0u; k0 < p.k; k0 += TILE_K) {
        // W slice: 64 rows x 16 = 256 groups of 4 elements, one per invocation
        {
            let r = lid / 4u;
            let kk = (lid % 4u) * 4u;
            let gr = r0 + r;
            let gk = k0 + kk;
            var v = vec4<f32>(0.0);
            if (gr < p.n_rows) {
                if (gk + 4u <= p.k) {
                    v = dq4(gr * p.row_bytes, gk);
                } else {
                    for (var j = 0u; j < 4u; j++) {
                        if (gk + j < p.k) { v[j] = dq1(gr * p.row_bytes, gk + j); }
                    }
                }
            }
            w_tile[r][kk] = v.x;
            w_tile[r][kk + 1u] = v.y;
            w_tile[r][kk + 2u] = v.z;
            w_tile[r][kk + 3u] = v.w;
        }
        // X slice: 32 tokens x 16 = 512 elements, two per invocation
        for (var e = lid; e < TILE_T * TILE_K; e += 256u) {
            let t = e / TILE_K;
            let kk = e % TILE_K;
            var v = 0.0;
            if (t0 + t < p.m && k0 + kk < p.k) {
                v = x[(t0 + t) * p.k + k0 + kk];
            }
            x_tile[t][kk] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TILE_K; kk++) {
            let xa = x_tile[tt][kk];
            let xb = x_tile[tt + 1u][kk];
            for (var i = 0u; i < 4u; i++) {
                let w = w_tile[tr + i][kk];
                acc[i][0] += w * xa;
                acc[i][1] += w * xb;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 2u; j++) {
            let r = r0 + tr + i;
            let t = t0 + tt + j;
            if (r < p.n_rows && t < p.m) {
                store_row(t, p.row_offset + r, acc[i][j]);
            }
        }
    }
}
