// Activation functions (no buffer access), shared by the elementwise kernels and the products
// that apply a gated activation to their output (product_out.wgsl).

// tanh written out with exp of a non-positive argument: some drivers' tanh overflows to NaN for
// large inputs instead of saturating at ±1
fn stable_tanh(v: f32) -> f32 {
    let e = exp(-2.0 * abs(v));
    return sign(v) * (1.0 - e) / (1.0 + e);
}

fn silu(g: f32) -> f32 {
    return g / (1.0 + exp(-g));
}

fn gelu_tanh(g: f32) -> f32 {
    let inner = 0.7978845608028654 * (g + 0.044715 * g * g * g);
    return 0.5 * g * (1.0 + stable_tanh(inner));
}
