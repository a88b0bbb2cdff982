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
#include "activation.wgsl"

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

fn glu(gate: f32, up: f32) -> f32 {
#if GLU_GELU
    return gelu_tanh(gate) * up;
#else
    return silu(gate) * up;
#endif
}
