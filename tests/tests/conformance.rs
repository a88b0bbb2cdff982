//! Kernel conformance: every op of the shared suite (`nomoat_runtime::conformance::CASES`, the
//! same cases and bounds the browser runs) on every kernel variant the test device offers,
//! against the plain CPU reference, one test per op named after it:
//! `cargo test -p nomoat-tests --test conformance -- rope_kv`.
//! What only a native run can do (binding limits, real tensors, PyPI gguf's dequantization) is
//! in kernels.rs.

use nomoat_runtime::conformance;
use nomoat_tests::gpu::variants;

/// One op on every variant; a failure lists every case out of bounds.
fn suite(op: &str) {
    let case = conformance::case(op).unwrap_or_else(|| panic!("no conformance case named {op}"));
    for (i, gpu) in variants().iter().enumerate() {
        let checks = pollster::block_on(case.run(gpu, i == 0)).unwrap_or_else(|e| panic!("{op} [{}]: {e}", gpu.variant.label()));
        assert!(!checks.is_empty(), "{op}: no checks");
        let failed: Vec<String> = checks.iter().filter(|c| !c.ok()).map(|c| format!("{}: {} {:e} > {:e}", c.case, c.metric, c.error, c.bound)).collect();
        assert!(failed.is_empty(), "{op} [{}]:\n{}", gpu.variant.label(), failed.join("\n"));
    }
}

macro_rules! ops {
    ($($op:ident),* $(,)?) => {
        $(#[test] fn $op() { suite(stringify!($op)) })*

        /// Every op of the suite has its test here, and every test here an op.
        #[test]
        fn every_op_has_a_test() {
            let tests: Vec<&str> = vec![$(stringify!($op)),*];
            let ops: Vec<&str> = conformance::CASES.iter().map(|c| c.op).collect();
            assert_eq!(tests, ops);
        }
    };
}

ops!(
    matvec,
    matmul,
    gather,
    rms_norm,
    layer_norm,
    softmax,
    elementwise,
    copy,
    rope,
    rope_kv,
    kv_store,
    attention,
    top_k,
    fused_product,
    qkv_rope,
    product_backward,
    weight_gradient,
    rms_norm_backward,
    glu_backward,
    cross_entropy,
    adamw,
    skinny_product,
    attention_backward
);
