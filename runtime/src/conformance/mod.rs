//! The kernel conformance suite: every GPU op on random data at awkward shapes (odd sizes,
//! sizes that are not multiples of the block or the workgroup) against `reference`. One body,
//! run on every device: natively per kernel variant (tests/tests/kernels.rs) and in the browser
//! (web's `Engine.run_conformance`), with the same data and the same bounds.
//!
//! Bounds, and why:
//! - matvec / matmul: NMSE ≤ 1e-10 (ggml's test-backend-ops measure). Same dequantized values,
//!   f32 accumulation in another order; with k ≤ 4096 random terms a dot product's relative
//!   error is ~1e-6 at worst.
//! - gather and kv_store: exact (dequantization is one or two f32 operations per element).
//! - norms, elementwise: max-abs ≤ 1e-5 on O(1) values; softmax 1e-6.
//! - RoPE: 1e-5 + 3e-7·position: the angle is an f32 product, as in llama.cpp.
//! - attention: max-abs ≤ 1e-5; the f16 cache is compared against a reference fed the same
//!   f16-rounded keys and values, the q8_0 cache against one fed the values its bytes hold.
//! - a q8_0 KV cache (kv_store, rope_kv): each value within 1.1 steps (its block's scale) of the
//!   reference quantization (a tie can round the other way), and an error against the exact
//!   values at most 1.05 times the reference quantization's (truncating would make it 4 times).
//!   Rows it does not take (heads of 48) are refused.
//! - top-k / argmax: exact ids and values, ties broken toward the lower id.
//! - fused products (input RMS norm, stacked parts, residual add, gated activation): the
//!   matmul bound against the unfused reference ops composed; rope_kv: RoPE's bound, plus half
//!   an f16 step (≤ 1e-3 on these values) for keys stored in an f16 cache.

use crate::device::{Gpu, GpuError};
use crate::ggml_type::GgmlType;
use crate::ops::{self, supports, AttentionArgs, AttentionFamily, GpuMatrix, KvType, Op, Place, Places, ProductIn, ProductOut, QkNorm, Recorder, RopeArgs};
use crate::tuning::MatvecShape;
use crate::{quant, reference};

mod training;

pub use crate::rng::Rng;

/// Normalised mean squared error Σ(a−b)² / Σb²; infinite when the lengths differ or a value is NaN.
pub fn nmse(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    for (g, w) in got.iter().zip(want) {
        err += (*g as f64 - *w as f64).powi(2);
        norm += (*w as f64).powi(2);
    }
    let e = if norm == 0.0 { err } else { err / norm };
    if e.is_nan() {
        f64::INFINITY
    } else {
        e
    }
}

/// Largest |a−b|; infinite when the lengths differ or either side holds a NaN.
pub fn max_abs_diff(got: &[f32], want: &[f32]) -> f32 {
    if got.len() != want.len() {
        return f32::INFINITY;
    }
    got.iter().zip(want).map(|(g, w)| if g.is_nan() || w.is_nan() { f32::INFINITY } else { (g - w).abs() }).fold(0.0, f32::max)
}

/// One comparison: `error` measured by `metric` must not exceed `bound`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub case: String,
    pub metric: &'static str,
    pub error: f64,
    pub bound: f64,
}

impl Check {
    pub fn ok(&self) -> bool {
        self.error <= self.bound
    }
    fn nmse(case: String, got: &[f32], want: &[f32], bound: f64) -> Check {
        Check { case, metric: "nmse", error: nmse(got, want), bound }
    }
    fn max_abs(case: String, got: &[f32], want: &[f32], bound: f64) -> Check {
        Check { case, metric: "max_abs", error: max_abs_diff(got, want) as f64, bound }
    }
}

/// One op of the suite: `op` is what a filter matches and the name of its native test
/// (`cargo test -p nomoat-tests --test conformance -- rope_kv`), `shader` the WGSL it checks,
/// `bound` what it is held to (the module's doc says why).
pub struct Case {
    pub op: &'static str,
    pub shader: &'static str,
    pub bound: &'static str,
    run: for<'a> fn(&'a Gpu, bool) -> CaseFuture<'a>,
}

type CaseFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Check>>> + 'a>>;

impl Case {
    /// The comparisons of this op on `gpu`. `large` adds the cases with tens of millions of
    /// elements (2-D dispatch folding); natively they run on one variant only, since they test
    /// the grid, not the arithmetic.
    pub async fn run(&self, gpu: &Gpu, large: bool) -> Result<Vec<Check>> {
        (self.run)(gpu, large).await
    }
}

macro_rules! case {
    ($op:literal, $shader:literal, $bound:literal, $f:path) => {
        Case { op: $op, shader: $shader, bound: $bound, run: |gpu, _| Box::pin($f(gpu)) }
    };
    ($op:literal, $shader:literal, $bound:literal, $f:ident, large) => {
        Case { op: $op, shader: $shader, bound: $bound, run: |gpu, large| Box::pin($f(gpu, large)) }
    };
}

/// The suite, one entry per op.
pub const CASES: &[Case] = &[
    case!("matvec", "matvec.wgsl", "nmse 1e-10", matvec),
    case!("matmul", "matvec.wgsl (token loop, token tiles), matmul.wgsl", "nmse 1e-10", matmul),
    case!("gather", "gather.wgsl", "exact", gather),
    case!("rms_norm", "norm.wgsl", "max-abs 1e-5", rms_norm),
    case!("layer_norm", "norm.wgsl", "max-abs 1e-5", layer_norm),
    case!("softmax", "softmax.wgsl", "max-abs 1e-6", softmax),
    case!("elementwise", "elementwise.wgsl", "max-abs 1e-5", elementwise, large),
    case!("copy", "copy.wgsl", "exact", copy),
    case!("rope", "rope_kv.wgsl", "max-abs 1e-5 + 3e-7·position", rope),
    case!("rope_kv", "rope_kv.wgsl", "RoPE's, plus half an f16 step for an f16 cache; q8_0 within a step of the reference's", rope_kv),
    case!("kv_store", "rope_kv.wgsl", "exact (after f16 rounding for an f16 cache); q8_0 within a step of the reference's", kv_store),
    case!(
        "attention",
        "attention_tile.wgsl, attention_workgroup.wgsl, attention_query.wgsl, attention_merge.wgsl",
        "max-abs 1e-5 (over the values the cache holds)",
        attention
    ),
    case!("top_k", "topk.wgsl", "exact ids and values", top_k),
    case!("fused_product", "matvec.wgsl, matmul.wgsl (lib/product_out.wgsl)", "nmse 1e-10 against the unfused ops", fused_product),
    case!("qkv_rope", "matvec.wgsl (lib/product_out.wgsl)", "nmse 1e-10; 1e-6 for an f16 cache; a q8_0 step", qkv_rope),
    case!("product_backward", "product_backward.wgsl", "nmse 1e-10", training::product_backward),
    case!("weight_gradient", "weight_gradient.wgsl", "nmse 1e-10", training::weight_gradient),
    case!("rms_norm_backward", "norm_backward.wgsl", "nmse 1e-10", training::rms_norm_backward),
    case!("glu_backward", "glu_backward.wgsl", "nmse 1e-10", training::glu_backward),
    case!("cross_entropy", "cross_entropy.wgsl", "nmse 1e-10 (gradient), relative 1e-5 (loss)", training::cross_entropy),
    case!("adamw", "adamw.wgsl", "max-abs 1e-6", training::adamw),
    case!("skinny_product", "skinny_product.wgsl", "nmse 1e-10", training::skinny_product),
    case!("attention_backward", "attention_backward.wgsl", "nmse 1e-10", training::attention_backward),
];

/// The cases whose op name contains `filter` (every case for an empty filter).
pub fn cases(filter: &str) -> impl Iterator<Item = &'static Case> + '_ {
    CASES.iter().filter(move |c| c.op.contains(filter))
}

/// The case of op `op`, by its exact name.
pub fn case(op: &str) -> Option<&'static Case> {
    CASES.iter().find(|c| c.op == op)
}

/// The weight types the suite multiplies: every GGML type the support gate admits on `gpu`, so
/// that a type admitted without a working kernel fails here.
pub fn weight_types(gpu: &Gpu) -> Vec<GgmlType> {
    (0..64).filter_map(GgmlType::from_id).filter(|&ty| supports(Op::Matrix { ty, k: ty.block_elems() as u64 * 16 }, Some(gpu)).is_ok()).collect()
}

/// Why a family could not run to its comparisons (the device refused something).
#[derive(Debug)]
pub struct SuiteError(pub String);

impl std::fmt::Display for SuiteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<GpuError> for SuiteError {
    fn from(e: GpuError) -> Self {
        SuiteError(e.to_string())
    }
}

impl From<quant::QuantError> for SuiteError {
    fn from(e: quant::QuantError) -> Self {
        SuiteError(e.to_string())
    }
}

type Result<T> = std::result::Result<T, SuiteError>;

pub const MATMUL_NMSE: f64 = 1e-10;

/// Random weights of type `ty`: random floats quantized by the CPU reference, so every type
/// sees realistic scales, plus the exact values the blocks decode to.
pub fn random_matrix(ty: GgmlType, n_rows: usize, k: usize, seed: u64) -> Result<(Vec<u8>, Vec<f32>)> {
    let mut rng = Rng::new(seed);
    let src = rng.fill(n_rows * k, 1.0);
    let mut bytes = Vec::new();
    for row in src.chunks(k) {
        bytes.extend(quant::quantize_row(ty, row)?);
    }
    let values = quant::dequantize(ty, &bytes, n_rows * k)?;
    Ok((bytes, values))
}

/// Random matrices of `rows` each, stacked into one GPU matrix (parts p0, p1, ...), with each
/// part's bytes and the values they decode to.
pub async fn random_stacked(gpu: &Gpu, ty: GgmlType, rows: &[usize], k: usize, seed: u64) -> Result<(GpuMatrix, Vec<(Vec<u8>, Vec<f32>)>)> {
    let mut parts = Vec::new();
    let mut upload = Vec::new();
    for (i, &r) in rows.iter().enumerate() {
        let (bytes, values) = random_matrix(ty, r, k, seed + i as u64)?;
        upload.push((format!("p{i}"), r as u64, bytes.clone()));
        parts.push((bytes, values));
    }
    Ok((GpuMatrix::upload_stacked(gpu, ty, k as u64, &upload).await?, parts))
}

/// Shapes (rows, k) per block size, with odd counts and non-multiples of the workgroup.
pub fn shapes(ty: GgmlType) -> Vec<(usize, usize)> {
    match ty.block_elems() {
        1 => vec![(1, 4), (3, 5), (17, 123), (65, 256), (130, 1000)],
        32 => vec![(1, 32), (7, 96), (33, 320), (65, 640), (130, 1056)],
        _ => vec![(1, 256), (5, 512), (33, 768), (70, 1280), (3, 4096)],
    }
}

pub async fn gpu_matvec(gpu: &Gpu, w: &GpuMatrix, x: &[f32]) -> Result<Vec<f32>> {
    gpu_matmul(gpu, w, x, 1).await
}

/// y[m][rows] = x[m][k] · Wᵀ: the one-token kernel for m = 1, the prompt kernel the device
/// uses otherwise.
pub async fn gpu_matmul(gpu: &Gpu, w: &GpuMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
    gpu_matmul_with(gpu, w, x, m, None, None).await
}

/// `gpu_matmul` with the prompt kernel chosen (see `Recorder::tiled_matmul` and
/// `Recorder::token_tile`).
pub async fn gpu_matmul_with(gpu: &Gpu, w: &GpuMatrix, x: &[f32], m: usize, tiled: Option<bool>, token_tile: Option<bool>) -> Result<Vec<f32>> {
    gpu_matmul_tile(gpu, w, x, m, tiled, token_tile, None).await
}

/// `gpu_matmul_with`, TOKEN_TILE's tokens a pass forced too (`Recorder::tile_tokens`).
pub async fn gpu_matmul_tile(gpu: &Gpu, w: &GpuMatrix, x: &[f32], m: usize, tiled: Option<bool>, token_tile: Option<bool>, tile: Option<u32>) -> Result<Vec<f32>> {
    let xb = gpu.upload_f32("x", x).await?;
    let y = gpu.storage("y", (m * w.n_rows as usize) as u64 * 4).await?;
    let mut rec = Recorder::new(gpu);
    rec.tiled_matmul = tiled;
    rec.token_tile = token_tile;
    rec.tile_tokens = tile;
    if m == 1 {
        rec.matvec(w, &xb, &y).await?;
    } else {
        rec.matmul(w, &xb, &y, m as u32).await?;
    }
    rec.submit()?;
    Ok(gpu.read_f32(&y, 0, m * w.n_rows as usize).await?)
}

pub async fn gpu_gather(gpu: &Gpu, w: &GpuMatrix, ids: &[u32]) -> Result<Vec<f32>> {
    let idb = gpu.upload_u32("ids", ids).await?;
    let out = gpu.storage("out", (ids.len() * w.k as usize) as u64 * 4).await?;
    let mut rec = Recorder::new(gpu);
    rec.gather(w, &idb, &out, ids.len() as u32).await?;
    rec.submit()?;
    Ok(gpu.read_f32(&out, 0, ids.len() * w.k as usize).await?)
}

/// The device's matvec shape, then GPUs' (a row over 32 invocations) forced on it.
async fn matvec(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for ty in weight_types(gpu) {
        for (i, (n_rows, k)) in shapes(ty).into_iter().enumerate() {
            let (bytes, w) = random_matrix(ty, n_rows, k, 100 + i as u64)?;
            let x = Rng::new(7 + i as u64).fill(k, 1.0);
            let m = GpuMatrix::upload(gpu, "w", ty, k as u64, n_rows as u64, &bytes).await?;
            let want = reference::matmul(&w, &x, n_rows, k, 1);
            let got = gpu_matvec(gpu, &m, &x).await?;
            checks.push(Check::nmse(format!("matvec {ty} {n_rows}x{k}"), &got, &want, MATMUL_NMSE));
            let (xb, y) = (gpu.upload_f32("x", &x).await?, gpu.storage("y", n_rows as u64 * 4).await?);
            let mut rec = Recorder::new(gpu);
            rec.matvec_shape = Some(MatvecShape::GPU);
            rec.matvec(&m, &xb, &y).await?;
            rec.submit()?;
            let got = gpu.read_f32(&y, 0, n_rows).await?;
            checks.push(Check::nmse(format!("matvec (GPU shape) {ty} {n_rows}x{k}"), &got, &want, MATMUL_NMSE));
        }
    }
    Ok(checks)
}

async fn matmul(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for ty in weight_types(gpu) {
        for (i, (n_rows, k)) in shapes(ty).into_iter().enumerate().take(4) {
            let (bytes, w) = random_matrix(ty, n_rows, k, 200 + i as u64)?;
            let wm = GpuMatrix::upload(gpu, "w", ty, k as u64, n_rows as u64, &bytes).await?;
            // m = 5, 33, 70 end on a partial four-token pass of the CPU kernel, 8 on a whole one;
            // 2 and 3 take one pass of as many (a batched decode step), or a partial one of 4
            for m in [1usize, 2, 3, 5, 8, 33, 70] {
                let x = Rng::new(9 + m as u64).fill(m * k, 1.0);
                let want = reference::matmul(&w, &x, n_rows, k, m);
                // every prompt kernel, whichever this device would pick; token tiles as many
                // tokens a pass as the batch has (up to 4), and 4 for fewer
                let kernels =
                    [("tiled", true, false, None), ("token loop", false, false, None), ("token tiles", false, true, None), ("tiles of 4", false, true, Some(4))];
                for (kernel, tiled, token_tile, tile) in kernels {
                    if (m == 1 && (tiled || token_tile)) || (tile.is_some() && m >= 4) {
                        continue;
                    }
                    let got = gpu_matmul_tile(gpu, &wm, &x, m, Some(tiled), Some(token_tile), tile).await?;
                    checks.push(Check::nmse(format!("matmul ({kernel}) {ty} {n_rows}x{k} m={m}"), &got, &want, MATMUL_NMSE));
                }
            }
        }
        // rows long enough that one invocation's walk over a 64-token batch overruns llvmpipe's
        // 65,535-iteration loop budget (float weights take a vec4 a step: 2,048 a token here),
        // as a LoRA A of Qwen2.5 0.5B's ffn_down (k 4864) did; the recorder splits the tokens
        let (n_rows, k, m) = (8usize, 8192usize, 64usize);
        let (bytes, w) = random_matrix(ty, n_rows, k, 250)?;
        let wm = GpuMatrix::upload(gpu, "w", ty, k as u64, n_rows as u64, &bytes).await?;
        let x = Rng::new(251).fill(m * k, 1.0);
        let want = reference::matmul(&w, &x, n_rows, k, m);
        for (kernel, token_tile, tile) in [("token loop", false, None), ("token tiles", true, None), ("tiles of 2", true, Some(2)), ("tiles of 3", true, Some(3))] {
            let got = gpu_matmul_tile(gpu, &wm, &x, m, Some(false), Some(token_tile), tile).await?;
            checks.push(Check::nmse(format!("matmul ({kernel}) long rows {ty} {n_rows}x{k} m={m}"), &got, &want, MATMUL_NMSE));
        }
    }
    Ok(checks)
}

async fn gather(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for ty in weight_types(gpu) {
        let (n_rows, k) = shapes(ty)[2];
        let (bytes, w) = random_matrix(ty, n_rows, k, 300)?;
        let ids = [0u32, n_rows as u32 - 1, 3, 3, 1];
        let m = GpuMatrix::upload(gpu, "w", ty, k as u64, n_rows as u64, &bytes).await?;
        let got = gpu_gather(gpu, &m, &ids).await?;
        let want: Vec<f32> = ids.iter().flat_map(|&r| w[r as usize * k..][..k].to_vec()).collect();
        checks.push(Check::max_abs(format!("gather {ty}"), &got, &want, 0.0));
    }
    Ok(checks)
}

/// Rows of (rows, n) the norms run over: a model's widths, an odd one, a tiny one, and more
/// rows than one dispatch dimension holds.
const NORM_SHAPES: [(usize, usize); 5] = [(1, 576), (3, 640), (5, 1000), (2, 7), (70_000, 4)];

async fn rms_norm(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (i, (rows, n)) in NORM_SHAPES.into_iter().enumerate() {
        let mut rng = Rng::new(500 + i as u64);
        let (x, w, resid) = (rng.fill(rows * n, 2.0), rng.fill(n, 1.5), rng.fill(rows * n, 1.0));
        let (xb, wb, rb) = (gpu.upload_f32("x", &x).await?, gpu.upload_f32("w", &w).await?, gpu.upload_f32("resid", &resid).await?);
        let (normed, added) = (gpu.storage("normed", (rows * n * 4) as u64).await?, gpu.storage("added", (rows * n * 4) as u64).await?);
        let mut rec = Recorder::new(gpu);
        rec.rms_norm(&xb, &wb, &normed, n as u32, rows as u32, 1e-6).await?;
        rec.rms_norm_add(&xb, &wb, &rb, &added, n as u32, rows as u32, 1e-6).await?;
        rec.submit()?;
        let want = reference::rms_norm(&x, &w, n, 1e-6);
        checks.push(Check::max_abs(format!("rms_norm {rows}x{n}"), &gpu.read_f32(&normed, 0, rows * n).await?, &want, 1e-5));
        checks.push(Check::max_abs(format!("rms_norm_add {rows}x{n}"), &gpu.read_f32(&added, 0, rows * n).await?, &reference::add(&resid, &want), 1e-5));
    }
    Ok(checks)
}

async fn layer_norm(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (i, (rows, n)) in NORM_SHAPES.into_iter().enumerate() {
        let mut rng = Rng::new(550 + i as u64);
        let (x, w, b) = (rng.fill(rows * n, 2.0), rng.fill(n, 1.5), rng.fill(n, 0.5));
        let (xb, wb, bb) = (gpu.upload_f32("x", &x).await?, gpu.upload_f32("w", &w).await?, gpu.upload_f32("b", &b).await?);
        let out = gpu.storage("out", (rows * n * 4) as u64).await?;
        let mut rec = Recorder::new(gpu);
        rec.layer_norm(&xb, &wb, &bb, &out, n as u32, rows as u32, 1e-5).await?;
        rec.submit()?;
        let got = gpu.read_f32(&out, 0, rows * n).await?;
        checks.push(Check::max_abs(format!("layer_norm {rows}x{n}"), &got, &reference::layer_norm(&x, &w, &b, n, 1e-5), 1e-5));
    }
    Ok(checks)
}

async fn softmax(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (i, (rows, n)) in [(3usize, 1000usize), (2, 5), (1, 262_144), (4, 64)].into_iter().enumerate() {
        let x = Rng::new(600 + i as u64).fill(rows * n, 8.0);
        let xb = gpu.upload_f32("x", &x).await?;
        let o = gpu.storage("o", (rows * n * 4) as u64).await?;
        let mut rec = Recorder::new(gpu);
        rec.softmax(&xb, &o, n as u32, rows as u32).await?;
        rec.submit()?;
        let got = gpu.read_f32(&o, 0, rows * n).await?;
        checks.push(Check::max_abs(format!("softmax {rows}x{n}"), &got, &reference::softmax(&x, n), 1e-6));
    }
    Ok(checks)
}

async fn elementwise(gpu: &Gpu, large: bool) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    // 17 million elements folds the dispatch into two dimensions
    let sizes: &[usize] = if large { &[1, 1000, 65_537, 17_000_000] } else { &[1, 1000, 65_537] };
    for (i, &n) in sizes.iter().enumerate() {
        let mut rng = Rng::new(700 + i as u64);
        let a = rng.fill(n, 6.0);
        let b = rng.fill(n, 2.0);
        let ab = gpu.upload_f32("a", &a).await?;
        let bb = gpu.upload_f32("b", &b).await?;
        let mut outs = Vec::new();
        for _ in 0..6 {
            outs.push(gpu.storage("o", (n * 4) as u64).await?);
        }
        outs.push(gpu.upload_f32("accumulated", &a).await?);
        let bias_width = 7.min(n);
        let mut rec = Recorder::new(gpu);
        rec.add(&ab, &bb, &outs[0], n as u32).await?;
        rec.scale(&ab, &outs[1], n as u32, -0.37).await?;
        rec.softcap(&ab, &outs[2], n as u32, 5.0).await?;
        rec.silu_gate(&ab, &bb, &outs[3], n as u32).await?;
        rec.gelu_gate(&ab, &bb, &outs[4], n as u32).await?;
        rec.add_bias(&ab, &bb, &outs[5], n as u32, bias_width as u32).await?;
        rec.accumulate(&outs[6], &bb, n as u32, 0.75).await?;
        rec.submit()?;
        let wants = [
            reference::add(&a, &b),
            reference::scale(&a, -0.37),
            reference::softcap(&a, 5.0),
            reference::silu_gate(&a, &b),
            reference::gelu_gate(&a, &b),
            a.iter().enumerate().map(|(i, v)| v + b[i % bias_width]).collect(),
            a.iter().zip(&b).map(|(x, y)| x + 0.75 * y).collect(),
        ];
        let names = ["add", "scale", "softcap", "silu_gate", "gelu_gate", "add_bias", "accumulate"];
        for ((name, o), want) in names.iter().zip(&outs).zip(&wants) {
            let got = gpu.read_f32(o, 0, n).await?;
            checks.push(Check::max_abs(format!("{name} n={n}"), &got, want, 1e-5));
        }
    }
    // accumulate_rows: a fused tensor's term [tokens][b_width] into one part's rows
    for (tokens, width, b_width, offset) in [(1usize, 5usize, 17usize, 0usize), (3, 64, 128, 64), (70, 7, 20, 13)] {
        let mut rng = Rng::new(790 + tokens as u64);
        let y = rng.fill(tokens * width, 3.0);
        let b = rng.fill(tokens * b_width, 2.0);
        let (yb, bb) = (gpu.upload_f32("y", &y).await?, gpu.upload_f32("b", &b).await?);
        let mut rec = Recorder::new(gpu);
        rec.accumulate_rows(&yb, &bb, tokens as u32, width as u32, b_width as u32, offset as u32, -1.5).await?;
        rec.submit()?;
        let want: Vec<f32> = (0..tokens * width).map(|i| y[i] - 1.5 * b[i / width * b_width + offset + i % width]).collect();
        let got = gpu.read_f32(&yb, 0, tokens * width).await?;
        checks.push(Check::max_abs(format!("accumulate_rows {tokens}x{width} of {b_width} at {offset}"), &got, &want, 1e-5));
    }
    Ok(checks)
}

/// The copy kernel moves vec4s: it covers the largest multiple of 4 of what it is given.
async fn copy(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (i, n) in [4usize, 1000, 65_537, 17].into_iter().enumerate() {
        let a = Rng::new(770 + i as u64).fill(n, 6.0);
        let n_copy = n / 4 * 4;
        let (ab, copied) = (gpu.upload_f32("a", &a).await?, gpu.storage("copy", (n * 4) as u64).await?);
        let mut rec = Recorder::new(gpu);
        rec.copy(&ab, &copied, n_copy as u32).await?;
        rec.submit()?;
        checks.push(Check::max_abs(format!("copy n={n_copy}"), &gpu.read_f32(&copied, 0, n_copy).await?, &a[..n_copy], 0.0));
    }
    Ok(checks)
}

async fn rope(gpu: &Gpu) -> Result<Vec<Check>> {
    use reference::{RopeMode, RopeParams};
    let mut checks = Vec::new();
    for (i, (mode, n_tokens, n_heads, head_dim, n_rot, pos0, base, fscale)) in [
        (RopeMode::Normal, 5u32, 9u32, 64u32, 64u32, 0u32, 10000.0f32, 1.0f32),
        (RopeMode::Neox, 7, 4, 256, 256, 1000, 1e6, 1.0),
        (RopeMode::Neox, 3, 2, 128, 64, 37, 1e5, 0.25),
        (RopeMode::Normal, 1, 3, 96, 32, 4999, 500000.0, 1.0),
    ]
    .into_iter()
    .enumerate()
    {
        let n = (n_tokens * n_heads * head_dim) as usize;
        let x = Rng::new(800 + i as u64).fill(n, 1.0);
        let xb = gpu.upload_f32("x", &x).await?;
        let mut rec = Recorder::new(gpu);
        let args = RopeArgs { n_tokens, n_heads, head_dim, n_rot, pos0, neox: mode == RopeMode::Neox, freq_base: base, freq_scale: fscale };
        rec.rope(&xb, args, None).await?;
        rec.submit()?;
        let got = gpu.read_f32(&xb, 0, n).await?;
        let mut want = x;
        reference::rope(&mut want, n_heads as usize, head_dim as usize, pos0, RopeParams { mode, n_rot: n_rot as usize, freq_base: base, freq_scale: fscale });
        // the GPU's angle is an f32 product, rounded to ~2^-24 of the angle itself
        let bound = 1e-5 + (pos0 + n_tokens) as f64 * 3e-7;
        checks.push(Check::max_abs(format!("rope {mode:?} pos0={pos0} rot={n_rot}/{head_dim}"), &got, &want, bound));
    }
    Ok(checks)
}

/// The fused forms of the products (decode's one-token kernel, and m tokens where it applies)
/// and rope_kv, against the reference ops they stand for.
async fn fused_product(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (ti, ty) in weight_types(gpu).into_iter().enumerate() {
        let (_, k) = shapes(ty)[2];
        // a vocabulary of rows over many workgroups, the last one partly filled, for the types
        // output heads come in (the best-of step is the same for every type)
        if [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q6K, GgmlType::Q4_0].contains(&ty) {
            checks.extend(head_argmax(gpu, ty, 1000 + 3 * ti, k, 3900 + 10 * ti as u64).await?);
        }
        // q/k/v-like parts with odd row counts; gate/up-like equal parts
        let rows = [13usize, 5, 7];
        let (stacked, parts) = random_stacked(gpu, ty, &rows, k, 3000 + 10 * ti as u64).await?;
        let values: Vec<&Vec<f32>> = parts.iter().map(|p| &p.1).collect();
        let (gate_up, gate_up_parts) = random_stacked(gpu, ty, &[13, 13], k, 3500 + 10 * ti as u64).await?;
        let (gate_values, up_values) = (&gate_up_parts[0].1, &gate_up_parts[1].1);
        let mut rng = Rng::new(4000 + ti as u64);
        let norm_w = rng.fill(k, 1.0);
        let nwb = gpu.upload_f32("norm w", &norm_w).await?;
        // (tokens, GPU tiled matmul, matvec's TOKEN_TILE). The input norm and the gated
        // activation fuse where a model fuses them (Recorder::fuses_block): one token, or a
        // block where prefill tiles tokens, which quantized weights then do and float weights
        // (no tiles) run through the token loop.
        let quantized = ty.block_elems() > 1;
        // and one token in GPUs' matvec shape (a row over 32 invocations), forced for Q4_K (its
        // outputs are every type's; the matvec case takes every type in it, plain; each type
        // here would build its pipelines again, ~1 s each on lavapipe)
        for (m, tiled, token_tile, shape) in [
            (1usize, None, None, None),
            (1, None, None, Some(MatvecShape::GPU)),
            (5, Some(true), None, None),
            (5, Some(false), Some(false), None),
            (6, Some(false), Some(true), None),
            (3, Some(false), Some(true), None),
        ] {
            if shape.is_some() && ty != GgmlType::Q4K {
                continue;
            }
            let mut rec = Recorder::new(gpu);
            rec.tiled_matmul = tiled;
            rec.token_tile = token_tile;
            rec.matvec_shape = shape;
            let rec_modes = (tiled, token_tile, shape);
            let fuse = rec.fuses_block(m as u32);
            let x = rng.fill(m * k, 2.0);
            let xb = gpu.upload_f32("x", &x).await?;
            let xn = reference::rms_norm(&x, &norm_w, k, 1e-5);
            let outs = [gpu.storage("y0", (m * 13 * 4) as u64).await?, gpu.storage("y1", (m * 5 * 4) as u64).await?, gpu.storage("y2", (m * 7 * 4) as u64).await?];
            let resid = rng.fill(m * 13, 1.0);
            let rb = gpu.upload_f32("resid", &resid).await?;
            let act = gpu.storage("act", (m * 13 * 4) as u64).await?;
            let gelu_act = gpu.storage("gelu act", (m * 13 * 4) as u64).await?;
            let input = if fuse { ProductIn::RmsNorm { x: &xb, weight: &nwb, eps: 1e-5 } } else { ProductIn::X(&xb) };
            rec.product(&stacked, input, ProductOut::Split(&[&outs[0], &outs[1], &outs[2]]), m as u32).await?;
            let w0 = GpuMatrix::upload(gpu, "p0", ty, k as u64, 13, &parts[0].0).await?;
            rec.product(&w0, ProductIn::X(&xb), ProductOut::Residual(&rb), m as u32).await?;
            if fuse {
                rec.product(&gate_up, input, ProductOut::Glu { out: &act, gelu: false }, m as u32).await?;
                rec.product(&gate_up, input, ProductOut::Glu { out: &gelu_act, gelu: true }, m as u32).await?;
            }
            rec.submit()?;
            let product_in = if fuse { &xn } else { &x };
            let label = match (m, tiled, token_tile, fuse) {
                (1, _, _, _) if shape.is_some() => "(GPU shape) rms_norm → ",
                (1, _, _, _) => "rms_norm → ",
                (_, Some(true), _, _) => "(tiled) ",
                (_, _, Some(true), _) if quantized => "(token tiles) rms_norm → ",
                (_, _, _, true) => "(token loop) rms_norm → ",
                _ => "(token loop) ",
            };
            for (pi, &r) in rows.iter().enumerate() {
                let got = gpu.read_f32(&outs[pi], 0, m * r).await?;
                let want = reference::matmul(values[pi], product_in, r, k, m);
                checks.push(Check::nmse(format!("{label}stacked part {pi} {ty} {r}x{k} m={m}"), &got, &want, MATMUL_NMSE));
            }
            let got = gpu.read_f32(&rb, 0, m * 13).await?;
            let want = reference::add(&resid, &reference::matmul(values[0], &x, 13, k, m));
            let plain_label = label.trim_end_matches("rms_norm → ");
            checks.push(Check::nmse(format!("{plain_label}residual += {ty} 13x{k} m={m}"), &got, &want, MATMUL_NMSE));
            if fuse {
                let (g, u) = (reference::matmul(gate_values, &xn, 13, k, m), reference::matmul(up_values, &xn, 13, k, m));
                let got = gpu.read_f32(&act, 0, m * 13).await?;
                checks.push(Check::nmse(format!("{label}silu(gate)·up {ty} 13x{k} m={m}"), &got, &reference::silu_gate(&g, &u), MATMUL_NMSE));
                let got = gpu.read_f32(&gelu_act, 0, m * 13).await?;
                checks.push(Check::nmse(format!("{label}gelu(gate)·up {ty} 13x{k} m={m}"), &got, &reference::gelu_gate(&g, &u), MATMUL_NMSE));
                // the fold reads x the same way for every quantized type: one token (decode, where
                // sessions fold) for Gemma 3's types and a float one, token tiles for one
                if (m == 1 && [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4K].contains(&ty)) || (m == 6 && ty == GgmlType::Q4K) {
                    checks.extend(
                        post_norm_add(gpu, &mut rng, rec_modes, &stacked, &values, &gate_up, (gate_values, up_values), &norm_w, m, &format!("{label}{ty}")).await?,
                    );
                }
            }
        }
    }
    Ok(checks)
}

/// `ProductOut::Argmax` (greedy decoding's output head) over n_rows x k weights of type ty:
/// its rows against the reference product, and the argmax taken from its best-of slots
/// (`ops::record_argmax_of`) against the argmax of the rows it wrote, value and id exactly.
/// The best row's bytes are copied to a row halfway round, so that two rows tie for the top,
/// in different workgroups: the lower one must win, as topk.wgsl ranks equal values.
pub async fn head_argmax(gpu: &Gpu, ty: GgmlType, n_rows: usize, k: usize, seed: u64) -> Result<Vec<Check>> {
    let (mut bytes, w) = random_matrix(ty, n_rows, k, seed)?;
    let mut rng = Rng::new(seed + 1);
    let (x, norm_w) = (rng.fill(k, 1.0), rng.fill(k, 1.0));
    let xn = reference::rms_norm(&x, &norm_w, k, 1e-5);
    let best = reference::top_k(&reference::matmul(&w, &xn, n_rows, k, 1), 1)[0].0;
    let row_bytes = bytes.len() / n_rows;
    let twin = (best + n_rows / 2) % n_rows;
    bytes.copy_within(best * row_bytes..(best + 1) * row_bytes, twin * row_bytes);
    let w = quant::dequantize(ty, &bytes, n_rows * k)?;
    let m = GpuMatrix::upload(gpu, "head", ty, k as u64, n_rows as u64, &bytes).await?;
    let (xb, nwb) = (gpu.upload_f32("x", &x).await?, gpu.upload_f32("norm w", &norm_w).await?);
    let mut checks = Vec::new();
    // the device's matvec shape, then GPUs' (a slot per row) forced on it for Q8_0 (the test
    // models' heads; other types build pipelines for the same code)
    let gpu_shape = (ty == GgmlType::Q8_0).then_some(MatvecShape::GPU);
    for shape in [None].into_iter().chain(gpu_shape.map(Some)) {
        let mut rec = Recorder::new(gpu);
        rec.matvec_shape = shape;
        let slots = rec.argmax_slots(&m);
        let (y, best_values, best_ids) =
            (gpu.storage("y", n_rows as u64 * 4).await?, gpu.storage("best values", slots as u64 * 4).await?, gpu.storage("best ids", slots as u64 * 4).await?);
        let scratch = ops::TopKScratch::new(gpu, slots).await?;
        rec.product(&m, ProductIn::RmsNorm { x: &xb, weight: &nwb, eps: 1e-5 }, ProductOut::Argmax { y: &y, best_values: &best_values, best_ids: &best_ids }, 1).await?;
        let (value, id) = ops::record_argmax_of(&mut rec, &scratch, &best_values, &best_ids, slots).await?;
        rec.submit()?;
        let rows = gpu.read_f32(&y, 0, n_rows).await?;
        let shape = if shape.is_some() { "(GPU shape) " } else { "" };
        let label = format!("head argmax {shape}{ty} {n_rows}x{k} ({} chunk(s), {slots} slots)", m.chunks.len());
        checks.push(Check::nmse(format!("{label}: rows"), &rows, &reference::matmul(&w, &xn, n_rows, k, 1), MATMUL_NMSE));
        // the first of the highest rows the product wrote (the twins tie there exactly)
        let want = rows.iter().enumerate().fold(0, |b, (i, &v)| if v > rows[b] { i } else { b });
        let got_id = gpu.read_u32(id, 0, 1).await?[0];
        let got_value = gpu.read_f32(value, 0, 1).await?[0];
        checks.push(Check::max_abs(format!("{label}: id (the twins {} and {})", best.min(twin), best.max(twin)), &[got_id as f32], &[want as f32], 0.0));
        checks.push(Check::max_abs(format!("{label}: value"), &[got_value], &[rows[want]], 0.0));
    }
    Ok(checks)
}

/// `ProductIn::PostNormAdd` (Gemma 3's post-norm-and-add folded into the next products): h =
/// resid + rms_norm(branch)·post_w stored into sum, the stacked parts and gelu(gate)·up read
/// rms_norm(h)·norm_w; against the reference ops composed.
#[allow(clippy::too_many_arguments)]
async fn post_norm_add(
    gpu: &Gpu,
    rng: &mut Rng,
    (tiled, token_tile, shape): (Option<bool>, Option<bool>, Option<MatvecShape>),
    stacked: &GpuMatrix,
    values: &[&Vec<f32>],
    gate_up: &GpuMatrix,
    (gate_values, up_values): (&[f32], &[f32]),
    norm_w: &[f32],
    m: usize,
    label: &str,
) -> Result<Vec<Check>> {
    let k = stacked.k as usize;
    let rows: Vec<usize> = stacked.parts.iter().map(|p| p.1 as usize).collect();
    let (branch, resid, post_w) = (rng.fill(m * k, 2.0), rng.fill(m * k, 1.0), rng.fill(k, 1.0));
    let h = reference::add(&resid, &reference::rms_norm(&branch, &post_w, k, 1e-5));
    let hn = reference::rms_norm(&h, norm_w, k, 1e-5);
    let weights = gpu.upload_f32("folded norms", &[norm_w, &post_w].concat()).await?;
    let (bb, rb, sum) = (gpu.upload_f32("branch", &branch).await?, gpu.upload_f32("resid", &resid).await?, gpu.storage("sum", (m * k * 4) as u64).await?);
    let mut outs = Vec::new();
    for r in &rows {
        outs.push(gpu.storage("y", (m * r * 4) as u64).await?);
    }
    let act = gpu.storage("act", (m * gate_values.len() / k * 4) as u64).await?;
    let mut rec = Recorder::new(gpu);
    rec.tiled_matmul = tiled;
    rec.token_tile = token_tile;
    rec.matvec_shape = shape;
    let input = ProductIn::PostNormAdd { branch: &bb, resid: &rb, sum: &sum, weights: &weights, eps: 1e-5 };
    let out_refs: Vec<&wgpu::Buffer> = outs.iter().collect();
    rec.product(stacked, input, ProductOut::Split(&out_refs), m as u32).await?;
    rec.product(gate_up, input, ProductOut::Glu { out: &act, gelu: true }, m as u32).await?;
    rec.submit()?;
    let mut checks = vec![Check::max_abs(format!("{label} post-norm-add: h m={m}"), &gpu.read_f32(&sum, 0, m * k).await?, &h, 1e-5)];
    for (pi, &r) in rows.iter().enumerate() {
        let got = gpu.read_f32(&outs[pi], 0, m * r).await?;
        checks.push(Check::nmse(format!("{label} post-norm-add: stacked part {pi} {r}x{k} m={m}"), &got, &reference::matmul(values[pi], &hn, r, k, m), MATMUL_NMSE));
    }
    let n_ff = gate_values.len() / k;
    let want = reference::gelu_gate(&reference::matmul(gate_values, &hn, n_ff, k, m), &reference::matmul(up_values, &hn, n_ff, k, m));
    checks.push(Check::nmse(format!("{label} post-norm-add: gelu(gate)·up {n_ff}x{k} m={m}"), &gpu.read_f32(&act, 0, m * n_ff).await?, &want, MATMUL_NMSE));
    Ok(checks)
}

/// Stacked q/k/v with the input norm, RoPE (adjacent pairs, part of each head) and the cache
/// write fused into one product, against the reference ops composed. A cache in f16 is held to
/// f16's precision (NMSE ≤ 1e-6), everything else to the matmul bound.
async fn qkv_rope(gpu: &Gpu) -> Result<Vec<Check>> {
    use reference::{RopeMode, RopeParams};
    let mut checks = Vec::new();
    let (n_head, n_kv_head, head_dim, n_rot, pos0) = (2usize, 1usize, 16usize, 12usize, 7u32);
    let rows = [n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim];
    for (ti, ty) in [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q4K, GgmlType::Q6K].into_iter().enumerate() {
        let (_, k) = shapes(ty)[2];
        let (w, parts) = random_stacked(gpu, ty, &rows, k, 7000 + 10 * ti as u64).await?;
        let values: Vec<&Vec<f32>> = parts.iter().map(|p| &p.1).collect();
        let mut rng = Rng::new(7500 + ti as u64);
        // (tokens, matvec's TOKEN_TILE): decode, and a prefill block as fuses_block runs it
        // (tiles for quantized weights, the token loop for float ones)
        let block = if ty.block_elems() > 1 { (6, Some(true), None) } else { (3, Some(false), None) };
        // and decode in GPUs' matvec shape for Q4_K (forced; the fused_product case says why one type)
        let gpu_shape = (ty == GgmlType::Q4K).then_some((1, None, Some(MatvecShape::GPU)));
        for (m, token_tile, shape) in [(1usize, None, None), block].into_iter().chain(gpu_shape) {
            let (x, norm_w) = (rng.fill(m * k, 2.0), rng.fill(k, 1.0));
            let (xb, nwb) = (gpu.upload_f32("x", &x).await?, gpu.upload_f32("norm w", &norm_w).await?);
            let xn = reference::rms_norm(&x, &norm_w, k, 1e-5);
            let rope = RopeArgs {
                n_tokens: m as u32,
                n_heads: n_head as u32,
                head_dim: head_dim as u32,
                n_rot: n_rot as u32,
                pos0,
                neox: false,
                freq_base: 10000.0,
                freq_scale: 1.0,
            };
            let params = RopeParams { mode: RopeMode::Normal, n_rot, freq_base: 10000.0, freq_scale: 1.0 };
            let mut q_want = reference::matmul(values[0], &xn, rows[0], k, m);
            let mut k_want = reference::matmul(values[1], &xn, rows[1], k, m);
            let v_want = reference::matmul(values[2], &xn, rows[2], k, m);
            reference::rope(&mut q_want, n_head, head_dim, pos0, params);
            reference::rope(&mut k_want, n_kv_head, head_dim, pos0, params);
            let mode = match (token_tile, shape) {
                (_, Some(_)) => " (GPU shape)",
                (Some(true), _) => " (token tiles)",
                _ => "",
            };
            for kv in [KvType::F32, KvType::F16] {
                let row = rows[1];
                let cache_bytes = (pos0 as u64 + m as u64) * kv.row_bytes(row as u64);
                let (qb, kc, vc) =
                    (gpu.storage("q", (m * rows[0]) as u64 * 4).await?, gpu.storage("k cache", cache_bytes).await?, gpu.storage("v cache", cache_bytes).await?);
                let mut rec = Recorder::new(gpu);
                rec.tiled_matmul = Some(false);
                rec.token_tile = token_tile;
                rec.matvec_shape = shape;
                if !rec.fuses_qkv_rope(&w, &rope, m as u32, kv) {
                    return Err(SuiteError(format!("{ty}: the fused q/k/v + RoPE product does not apply to its own test shape")));
                }
                let out = ProductOut::QkvRope { q: &qb, k_cache: &kc, v_cache: &vc, kv, rope, places: Places::Consecutive { kv_row0: 0 } };
                rec.product(&w, ProductIn::RmsNorm { x: &xb, weight: &nwb, eps: 1e-5 }, out, m as u32).await?;
                rec.submit()?;
                let at = pos0 as u64 * kv.row_bytes(row as u64);
                let cache_bound = if kv == KvType::F16 { 1e-6 } else { MATMUL_NMSE };
                let name = format!("rms_norm → q/k/v + RoPE + {kv:?} cache {ty} m={m}{mode}");
                checks.push(Check::nmse(format!("{name}: q"), &gpu.read_f32(&qb, 0, m * rows[0]).await?, &q_want, MATMUL_NMSE));
                checks.push(Check::nmse(format!("{name}: k"), &cache_values(kv, gpu.read(&kc, at, cache_bytes - at).await?, row), &k_want, cache_bound));
                checks.push(Check::nmse(format!("{name}: v"), &cache_values(kv, gpu.read(&vc, at, cache_bytes - at).await?, row), &v_want, cache_bound));
            }
            // a q8_0 cache takes whole blocks of 64 rows a part: this shape's are not
            let (qb, kc) = (gpu.storage("q", (m * rows[0]) as u64 * 4).await?, gpu.storage("k cache", KvType::Q8_0.row_bytes(64) * 64).await?);
            let out = ProductOut::QkvRope { q: &qb, k_cache: &kc, v_cache: &kc, kv: KvType::Q8_0, rope, places: Places::Consecutive { kv_row0: 0 } };
            let mut rec = Recorder::new(gpu);
            rec.token_tile = token_tile;
            rec.matvec_shape = shape;
            let refusal = rec.product(&w, ProductIn::RmsNorm { x: &xb, weight: &nwb, eps: 1e-5 }, out, m as u32).await;
            checks.push(refused(format!("rms_norm → q/k/v + RoPE + Q8_0 cache {ty} m={m}{mode}"), refusal));
        }
        // SEQ_ROWS: one token of each of five sequences, each turned for its own position and
        // written at its own slot's row
        let n = SEQ_POSITIONS.len();
        let x = rng.fill(n * k, 2.0);
        let (xb, nwb) = (gpu.upload_f32("x", &x).await?, gpu.upload_f32("norm w", &vec![1.0; k]).await?);
        let xn = reference::rms_norm(&x, &vec![1.0; k], k, 1e-5);
        let places: Vec<Place> = SEQ_POSITIONS.iter().enumerate().map(|(i, &pos)| Place { pos, kv_row0: i as u32 * SEQ_CTX }).collect();
        let rope = RopeArgs {
            n_tokens: n as u32,
            n_heads: n_head as u32,
            head_dim: head_dim as u32,
            n_rot: n_rot as u32,
            pos0: 0,
            neox: false,
            freq_base: 10000.0,
            freq_scale: 1.0,
        };
        let params = RopeParams { mode: RopeMode::Normal, n_rot, freq_base: 10000.0, freq_scale: 1.0 };
        let [q_want, k_want, v_want] = qkv_turned(&values, &xn, rows, k, n, &places, (n_head, n_kv_head, head_dim), params);
        let token_tile = if ty.block_elems() > 1 { Some(true) } else { Some(false) };
        for kv in [KvType::F32, KvType::F16] {
            let row = rows[1];
            let cache_bytes = (n as u64 * SEQ_CTX as u64) * kv.row_bytes(row as u64);
            let (qb, kc, vc) =
                (gpu.storage("q", (n * rows[0]) as u64 * 4).await?, gpu.storage("k cache", cache_bytes).await?, gpu.storage("v cache", cache_bytes).await?);
            let mut rec = Recorder::new(gpu);
            rec.tiled_matmul = Some(false);
            rec.token_tile = token_tile;
            let out = ProductOut::QkvRope { q: &qb, k_cache: &kc, v_cache: &vc, kv, rope, places: Places::PerToken(&places) };
            rec.product(&w, ProductIn::RmsNorm { x: &xb, weight: &nwb, eps: 1e-5 }, out, n as u32).await?;
            rec.submit()?;
            let (got_k, got_v) = cached_rows(gpu, kv, (&kc, &vc), cache_bytes, row, &places).await?;
            let cache_bound = if kv == KvType::F16 { 1e-6 } else { MATMUL_NMSE };
            let name = format!("rms_norm → q/k/v + RoPE + {kv:?} cache {ty} SEQ_ROWS m={n}");
            checks.push(Check::nmse(format!("{name}: q"), &gpu.read_f32(&qb, 0, n * rows[0]).await?, &q_want, MATMUL_NMSE));
            checks.push(Check::nmse(format!("{name}: k"), &got_k, &k_want, cache_bound));
            checks.push(Check::nmse(format!("{name}: v"), &got_v, &v_want, cache_bound));
        }
    }
    checks.extend(qkv_rope_q8(gpu).await?);
    Ok(checks)
}

/// The reference's q, k (both turned by RoPE at each token's position) and v of `m` tokens
/// from the stacked parts' values and the normed input xn: [m][k].
#[allow(clippy::too_many_arguments)]
fn qkv_turned(
    values: &[&Vec<f32>],
    xn: &[f32],
    rows: [usize; 3],
    k: usize,
    m: usize,
    places: &[Place],
    heads: (usize, usize, usize),
    params: reference::RopeParams,
) -> [Vec<f32>; 3] {
    let (n_head, n_kv_head, head_dim) = heads;
    let (mut q, mut kk) = (reference::matmul(values[0], xn, rows[0], k, m), reference::matmul(values[1], xn, rows[1], k, m));
    for (t, p) in places.iter().enumerate() {
        reference::rope(&mut q[t * rows[0]..(t + 1) * rows[0]], n_head, head_dim, p.pos, params);
        reference::rope(&mut kk[t * rows[1]..(t + 1) * rows[1]], n_kv_head, head_dim, p.pos, params);
    }
    [q, kk, reference::matmul(values[2], xn, rows[2], k, m)]
}

/// The k and v rows the cache holds at `places`, read back whole and decoded.
async fn cached_rows(gpu: &Gpu, kv: KvType, caches: (&wgpu::Buffer, &wgpu::Buffer), bytes: u64, row: usize, places: &[Place]) -> Result<(Vec<f32>, Vec<f32>)> {
    let (k_all, v_all) = (cache_values(kv, gpu.read(caches.0, 0, bytes).await?, row), cache_values(kv, gpu.read(caches.1, 0, bytes).await?, row));
    let (mut got_k, mut got_v) = (Vec::new(), Vec::new());
    for p in places {
        let r = (p.kv_row0 + p.pos) as usize * row;
        got_k.extend_from_slice(&k_all[r..r + row]);
        got_v.extend_from_slice(&v_all[r..r + row]);
    }
    Ok((got_k, got_v))
}

/// The fused q/k/v + RoPE product into a q8_0 cache (lib/product_out.wgsl's store_qkv_q8),
/// where the device's product shape allows it, else its refusal: parts of whole 64-row blocks
/// (heads of 64, RoPE on 48 of each), decode, a prefill block in tiles and a step of five
/// sequences (SEQ_ROWS). q against the reference to the matmul bound; the cache against the
/// reference's own q8_0 quantization of its k and v (a step apart at most, where the product's
/// rounding moves a value across a quantization boundary).
async fn qkv_rope_q8(gpu: &Gpu) -> Result<Vec<Check>> {
    use reference::{RopeMode, RopeParams};
    let mut checks = Vec::new();
    let (n_head, n_kv_head, head_dim, n_rot) = (2usize, 1usize, 64usize, 48usize);
    let rows = [n_head * head_dim, n_kv_head * head_dim, n_kv_head * head_dim];
    let kv = KvType::Q8_0;
    let row = rows[1];
    for (ti, ty) in [GgmlType::F32, GgmlType::Q4_1, GgmlType::Q4K].into_iter().enumerate() {
        let (_, k) = shapes(ty)[2];
        let (w, parts) = random_stacked(gpu, ty, &rows, k, 7700 + 10 * ti as u64).await?;
        let values: Vec<&Vec<f32>> = parts.iter().map(|p| &p.1).collect();
        let mut rng = Rng::new(7800 + ti as u64);
        let tile = if ty.block_elems() > 1 { Some(true) } else { Some(false) };
        // (tokens, TOKEN_TILE, the tokens' places: consecutive after 5 cached, or one a sequence)
        for (m, token_tile, per_sequence) in [(1usize, None, false), (6, tile, false), (SEQ_POSITIONS.len(), tile, true)] {
            let (x, norm_w) = (rng.fill(m * k, 2.0), rng.fill(k, 1.0));
            let (xb, nwb) = (gpu.upload_f32("x", &x).await?, gpu.upload_f32("norm w", &norm_w).await?);
            let xn = reference::rms_norm(&x, &norm_w, k, 1e-5);
            let pos0 = 5u32;
            let places: Vec<Place> = if per_sequence {
                SEQ_POSITIONS.iter().enumerate().map(|(i, &pos)| Place { pos, kv_row0: i as u32 * SEQ_CTX }).collect()
            } else {
                (0..m as u32).map(|t| Place { pos: pos0 + t, kv_row0: 0 }).collect()
            };
            let rope = RopeArgs {
                n_tokens: m as u32,
                n_heads: n_head as u32,
                head_dim: head_dim as u32,
                n_rot: n_rot as u32,
                pos0: if per_sequence { 0 } else { pos0 },
                neox: false,
                freq_base: 10000.0,
                freq_scale: 1.0,
            };
            let params = RopeParams { mode: RopeMode::Normal, n_rot, freq_base: 10000.0, freq_scale: 1.0 };
            let [q_want, k_want, v_want] = qkv_turned(&values, &xn, rows, k, m, &places, (n_head, n_kv_head, head_dim), params);
            let cache_rows = if per_sequence { places.len() as u64 * SEQ_CTX as u64 } else { pos0 as u64 + m as u64 };
            let cache_bytes = cache_rows * kv.row_bytes(row as u64);
            let (qb, kc, vc) =
                (gpu.storage("q", (m * rows[0]) as u64 * 4).await?, gpu.storage("k cache", cache_bytes).await?, gpu.storage("v cache", cache_bytes).await?);
            let mut rec = Recorder::new(gpu);
            rec.tiled_matmul = Some(false);
            rec.token_tile = token_tile;
            let to = if per_sequence { Places::PerToken(&places) } else { Places::Consecutive { kv_row0: 0 } };
            let out = ProductOut::QkvRope { q: &qb, k_cache: &kc, v_cache: &vc, kv, rope, places: to };
            let tiles = if token_tile == Some(true) { " (token tiles)" } else { "" };
            let name = format!("rms_norm → q/k/v + RoPE + Q8_0 cache {ty} {}m={m}{tiles}", if per_sequence { "SEQ_ROWS " } else { "" });
            if !rec.fuses_qkv_rope(&w, &rope, m as u32, kv) {
                let refusal = rec.product(&w, ProductIn::RmsNorm { x: &xb, weight: &nwb, eps: 1e-5 }, out, m as u32).await;
                checks.push(refused(name, refusal));
                continue;
            }
            rec.product(&w, ProductIn::RmsNorm { x: &xb, weight: &nwb, eps: 1e-5 }, out, m as u32).await?;
            rec.submit()?;
            let (got_k, got_v) = cached_rows(gpu, kv, (&kc, &vc), cache_bytes, row, &places).await?;
            let slack = |v: &[f32]| 1e-5 * v.iter().fold(1.0f64, |m, x| m.max(x.abs() as f64));
            checks.push(Check::nmse(format!("{name}: q"), &gpu.read_f32(&qb, 0, m * rows[0]).await?, &q_want, MATMUL_NMSE));
            checks.extend(q8_checks(&format!("{name}: k"), &got_k, &k_want, slack(&k_want)));
            checks.extend(q8_checks(&format!("{name}: v"), &got_v, &v_want, slack(&v_want)));
        }
    }
    Ok(checks)
}

/// RoPE on q in place and k (rotated) and v into the cache after `pos0` cached positions, with
/// and without the per-head RMS norms of q and k first (QK_NORM), and with per-pair frequency
/// factors (ROPE_FACTORS).
async fn rope_kv(gpu: &Gpu) -> Result<Vec<Check>> {
    use reference::{RopeMode, RopeParams};
    let mut checks = Vec::new();
    let kinds = [
        (KvType::F32, false, false),
        (KvType::F16, false, false),
        (KvType::F32, true, false),
        (KvType::F16, true, false),
        (KvType::F32, false, true),
        (KvType::F16, true, true),
        (KvType::Q8_0, false, false),
        (KvType::Q8_0, true, false),
        (KvType::Q8_0, true, true),
    ];
    for (kv, with_norm, with_factors) in kinds {
        for (i, (mode, n_tokens, n_head, n_kv_head, head_dim, n_rot, pos0)) in [
            (RopeMode::Normal, 1u32, 9u32, 3u32, 64u32, 64u32, 37u32),
            (RopeMode::Neox, 5, 4, 1, 256, 256, 600),
            (RopeMode::Neox, 3, 2, 2, 128, 64, 0),
            (RopeMode::Normal, 2, 3, 3, 6, 4, 9),
        ]
        .into_iter()
        .enumerate()
        {
            let (base, fscale) = (10000.0f32, 1.0f32);
            let row = (n_kv_head * head_dim) as usize;
            let mut rng = Rng::new(5000 + i as u64);
            let q = rng.fill((n_tokens * n_head * head_dim) as usize, 1.0);
            let k = rng.fill(n_tokens as usize * row, 1.0);
            let v = rng.fill(n_tokens as usize * row, 1.0);
            let (qb, kb, vb) = (gpu.upload_f32("q", &q).await?, gpu.upload_f32("k", &k).await?, gpu.upload_f32("v", &v).await?);
            let cache_bytes = (pos0 + n_tokens) as u64 * kv.row_bytes(row as u64);
            let (kc, vc) = (gpu.storage("k cache", cache_bytes).await?, gpu.storage("v cache", cache_bytes).await?);
            let args = RopeArgs { n_tokens, n_heads: n_head, head_dim, n_rot, pos0, neox: mode == RopeMode::Neox, freq_base: base, freq_scale: fscale };
            // norm weights around 1, as trained ones are
            let (qw, kw): (Vec<f32>, Vec<f32>) = ((0..head_dim).map(|_| 1.0 + 0.5 * rng.uniform()).collect(), (0..head_dim).map(|_| 1.0 + 0.5 * rng.uniform()).collect());
            let (qwb, kwb) = (gpu.upload_f32("q norm", &qw).await?, gpu.upload_f32("k norm", &kw).await?);
            let eps = 1e-6;
            let norm = with_norm.then_some(QkNorm { q_weight: &qwb, k_weight: &kwb, eps });
            // Llama 3.1-like divisors, 1 to 8 across the pairs
            let factors: Vec<f32> = if with_factors { (0..n_rot / 2).map(|i| 1.0 + 7.0 * i as f32 / (n_rot / 2) as f32).collect() } else { Vec::new() };
            let fb = if with_factors { Some(gpu.upload_f32("rope factors", &factors).await?) } else { None };
            let mut rec = Recorder::new(gpu);
            let written = rec.rope_kv_normed(&qb, &kb, &vb, &kc, &vc, n_kv_head, kv, args, norm, fb.as_ref()).await;
            let name = format!(
                "rope_kv{}{} {mode:?} {kv:?} pos0={pos0} rot={n_rot}/{head_dim}",
                if with_norm { " qk-norm" } else { "" },
                if with_factors { " factors" } else { "" }
            );
            if kv.check_row(n_kv_head, head_dim).is_err() {
                checks.push(refused(format!("{name} ({n_kv_head} kv heads of {head_dim})"), written));
                continue;
            }
            written?;
            rec.submit()?;
            let params = RopeParams { mode, n_rot: n_rot as usize, freq_base: base, freq_scale: fscale };
            let hd = head_dim as usize;
            let (mut q_want, mut k_want) =
                if with_norm { (reference::rms_norm(&q, &qw, hd, eps), reference::rms_norm(&k, &kw, hd, eps)) } else { (q.clone(), k.clone()) };
            reference::rope_with_factors(&mut q_want, n_head as usize, hd, pos0, params, &factors);
            reference::rope_with_factors(&mut k_want, n_kv_head as usize, hd, pos0, params, &factors);
            // normalised values reach ~1.5 · (unit-variance values), rounded ~2^-24 on the way
            let bound = (1e-5 + (pos0 + n_tokens) as f64 * 3e-7) * if with_norm { 2.0 } else { 1.0 };
            checks.push(Check::max_abs(format!("{name} q"), &gpu.read_f32(&qb, 0, q.len()).await?, &q_want, bound));
            let at = pos0 as usize * row;
            let got_k = cache_values(kv, gpu.read(&kc, 0, cache_bytes).await?, row).split_off(at);
            let got_v = cache_values(kv, gpu.read(&vc, 0, cache_bytes).await?, row).split_off(at);
            checks.extend(cache_checks(&name, kv, &got_k, &got_v, &k_want, &v, bound));
        }
    }
    checks.extend(rope_kv_seq_rows(gpu).await?);
    Ok(checks)
}

/// Slots of SEQ_CTX rows in a cache shared by several sequences (`Places`), and the positions
/// the SEQ_ROWS cases put one token of each at: 0, a slot's last row, and between.
const SEQ_CTX: u32 = 64;
const SEQ_POSITIONS: [u32; 5] = [37, 0, 12, 63, 5];

/// SEQ_ROWS (a decode step of several sequences): token t turned for its own position and
/// written at its own slot's row; and a block of consecutive tokens into a slot past row 0.
async fn rope_kv_seq_rows(gpu: &Gpu) -> Result<Vec<Check>> {
    use reference::{RopeMode, RopeParams};
    let mut checks = Vec::new();
    for (kv, with_norm, mode) in
        [(KvType::F32, false, RopeMode::Normal), (KvType::F16, true, RopeMode::Neox), (KvType::Q8_0, false, RopeMode::Normal), (KvType::Q8_0, true, RopeMode::Neox)]
    {
        let (n_head, n_kv_head, head_dim, n_rot) = (4u32, 2u32, 32u32, 32u32);
        let row = (n_kv_head * head_dim) as usize;
        let qd = (n_head * head_dim) as usize;
        // one token of each of five slots (slot i at position SEQ_POSITIONS[i]), or four
        // consecutive tokens at positions 9.. of slot 3
        let per_token: Vec<Place> = SEQ_POSITIONS.iter().enumerate().map(|(i, &pos)| Place { pos, kv_row0: i as u32 * SEQ_CTX }).collect();
        let consecutive: Vec<Place> = (0..4).map(|t| Place { pos: 9 + t, kv_row0: 3 * SEQ_CTX }).collect();
        for (label, places) in [("SEQ_ROWS", &per_token), ("slot 3", &consecutive)] {
            let n = places.len();
            let mut rng = Rng::new(5600 + n as u64);
            let (q, k, v) = (rng.fill(n * qd, 1.0), rng.fill(n * row, 1.0), rng.fill(n * row, 1.0));
            let (qb, kb, vb) = (gpu.upload_f32("q", &q).await?, gpu.upload_f32("k", &k).await?, gpu.upload_f32("v", &v).await?);
            let cache_bytes = (SEQ_POSITIONS.len() as u32 * SEQ_CTX) as u64 * kv.row_bytes(row as u64);
            let (kc, vc) = (gpu.storage("k cache", cache_bytes).await?, gpu.storage("v cache", cache_bytes).await?);
            let qw: Vec<f32> = (0..head_dim).map(|_| 1.0 + 0.5 * rng.uniform()).collect();
            let kw: Vec<f32> = (0..head_dim).map(|_| 1.0 + 0.5 * rng.uniform()).collect();
            let (qwb, kwb) = (gpu.upload_f32("q norm", &qw).await?, gpu.upload_f32("k norm", &kw).await?);
            let norm = with_norm.then_some(QkNorm { q_weight: &qwb, k_weight: &kwb, eps: 1e-6 });
            let args =
                RopeArgs { n_tokens: n as u32, n_heads: n_head, head_dim, n_rot, pos0: places[0].pos, neox: mode == RopeMode::Neox, freq_base: 10000.0, freq_scale: 1.0 };
            let at = if label == "SEQ_ROWS" { Places::PerToken(places) } else { Places::Consecutive { kv_row0: places[0].kv_row0 } };
            let mut rec = Recorder::new(gpu);
            rec.rope_kv_at(&qb, &kb, &vb, &kc, &vc, n_kv_head, kv, args, norm, None, at).await?;
            rec.submit()?;
            let params = RopeParams { mode, n_rot: n_rot as usize, freq_base: 10000.0, freq_scale: 1.0 };
            let hd = head_dim as usize;
            let (mut q_want, mut k_want) =
                if with_norm { (reference::rms_norm(&q, &qw, hd, 1e-6), reference::rms_norm(&k, &kw, hd, 1e-6)) } else { (q.clone(), k.clone()) };
            let (got_q, k_all, v_all) = (
                gpu.read_f32(&qb, 0, q.len()).await?,
                cache_values(kv, gpu.read(&kc, 0, cache_bytes).await?, row),
                cache_values(kv, gpu.read(&vc, 0, cache_bytes).await?, row),
            );
            let (mut got_k, mut got_v) = (Vec::new(), Vec::new());
            for (t, p) in places.iter().enumerate() {
                reference::rope(&mut q_want[t * qd..(t + 1) * qd], n_head as usize, hd, p.pos, params);
                reference::rope(&mut k_want[t * row..(t + 1) * row], n_kv_head as usize, hd, p.pos, params);
                let r = (p.kv_row0 + p.pos) as usize * row;
                got_k.extend_from_slice(&k_all[r..r + row]);
                got_v.extend_from_slice(&v_all[r..r + row]);
            }
            let bound = 1e-5 * if with_norm { 2.0 } else { 1.0 };
            let name = format!("rope_kv {label}{} {mode:?} {kv:?}", if with_norm { " qk-norm" } else { "" });
            checks.push(Check::max_abs(format!("{name} q"), &got_q, &q_want, bound));
            checks.extend(cache_checks(&name, kv, &got_k, &got_v, &k_want, &v, bound));
        }
    }
    Ok(checks)
}

/// The elements of KV-cache bytes read back, rows of `row` elements: any run of rows of a float
/// cache; a q8_0 cache read whole (its int8s, then its scales: lib/kv.wgsl), dequantized.
fn cache_values(kv: KvType, raw: Vec<u8>, row: usize) -> Vec<f32> {
    match kv {
        KvType::F32 => raw.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        KvType::F16 => raw.chunks(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        KvType::Q8_0 => {
            let n = raw.len() / kv.row_bytes(row as u64).max(1) as usize * row;
            let (q, scales) = raw.split_at(n);
            (0..n).map(|i| q[i] as i8 as f32 * half::f16::from_le_bytes([scales[i / 32 * 2], scales[i / 32 * 2 + 1]]).to_f32()).collect()
        }
    }
}

/// A cache's keys and values (`got_k`, `got_v`) against the keys the reference computed
/// (`k_want`, within `bound` of the kernel's before storing) and the values written (`v`):
/// f32 to `bound` and exactly; f16 with half an f16 step more for the keys (1e-3 of the largest,
/// at least 1, is twice that) and exactly after f16 rounding; q8_0 by `q8_checks`.
fn cache_checks(name: &str, kv: KvType, got_k: &[f32], got_v: &[f32], k_want: &[f32], v: &[f32], bound: f64) -> Vec<Check> {
    match kv {
        KvType::F32 => vec![Check::max_abs(format!("{name} k cache"), got_k, k_want, bound), Check::max_abs(format!("{name} v cache"), got_v, v, 0.0)],
        KvType::F16 => vec![
            Check::max_abs(format!("{name} k cache"), got_k, k_want, bound + 1e-3 * k_want.iter().fold(1.0f64, |m, x| m.max(x.abs() as f64))),
            Check::max_abs(format!("{name} v cache"), got_v, &to_f16_and_back(v), 0.0),
        ],
        KvType::Q8_0 => [q8_checks(&format!("{name} k cache"), got_k, k_want, bound), q8_checks(&format!("{name} v cache"), got_v, v, 0.0)].concat(),
    }
}

/// A q8_0 cache's values `got` against `exact`, what was written (within `slack` of what the
/// kernel quantized): each within 1.1 steps (its block's scale) of the reference's quantization
/// of `exact` — a rounding that falls the other way (f32 division, or the kernel's input off by
/// `slack`) moves a value one step (SwiftShader in Chromium reached 1.00 of a 1-step bound),
/// a scale one f16 step apart moves an int8 of 127 by 0.06 steps; a wrong scale or int8 moves
/// it further unless the block is tiny — and its error against `exact` (NMSE) at most 1.05
/// times the reference quantization's, which a rounding bias (truncation makes it 4 times,
/// measured) or a misplaced block would exceed.
fn q8_checks(name: &str, got: &[f32], exact: &[f32], slack: f64) -> Vec<Check> {
    let (want, scales) = reference::kv_q8_0(exact);
    let steps = if got.len() != want.len() {
        f64::INFINITY
    } else {
        got.iter()
            .zip(&want)
            .enumerate()
            .map(|(i, (g, w))| if g.is_nan() { f64::INFINITY } else { ((*g as f64 - *w as f64).abs() - slack).max(0.0) / (scales[i / 32] as f64).max(1e-30) })
            .fold(0.0, f64::max)
    };
    let ratio = nmse(got, exact) / nmse(&want, exact).max(1e-30);
    vec![
        Check { case: format!("{name}: q8_0 steps from the reference's quantization"), metric: "max steps", error: steps, bound: 1.1 },
        Check { case: format!("{name}: q8_0 error against the reference's"), metric: "nmse ratio", error: ratio, bound: 1.05 },
    ]
}

/// A check that `result` is an Unsupported error (an op that refuses a case it does not run).
fn refused<T>(case: String, result: std::result::Result<T, GpuError>) -> Check {
    let ok = matches!(result, Err(GpuError::Unsupported(_)));
    Check { case: format!("{case}: refused"), metric: "not refused", error: if ok { 0.0 } else { 1.0 }, bound: 0.0 }
}

fn to_f16_and_back(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
}

/// Attention cases: (queries, heads, kv heads, head_dim, position of the first query, sliding
/// window).
const ATTENTION_CASES: [(u32, u32, u32, u32, u32, u32); 12] = [
    (1, 9, 3, 64, 37, 0),     // decode, GQA
    (20, 4, 1, 256, 0, 0),    // prefill
    (12, 4, 2, 32, 5, 0),     // prefill, a small head: per-query kernels built for it
    (5, 2, 1, 48, 20, 0),     // a fixed head size that is no multiple of 32
    (7, 4, 2, 128, 130, 0),   // block after a cache
    (9, 2, 2, 64, 100, 16),   // sliding window
    (1, 4, 1, 256, 600, 512), // Gemma-like local layer
    (3, 3, 3, 6, 2, 0),       // tiny head
    (2, 4, 1, 256, 4000, 0),  // past the per-query kernel's loop budget (llvmpipe)
    (1, 8, 2, 64, 300, 128),  // decode, GQA, sliding window
    (1, 16, 2, 32, 50, 0),    // decode, 8 query heads to a kv head
    (1, 4, 1, 256, 3400, 0),  // decode deep, unsplit just within the loop budget (llvmpipe)
];

/// One attention case's inputs: its arguments, q, k and v, and the caches filled by kv_store
/// in two appends (as a prompt and then new tokens would), with the values they should hold.
struct FilledCache {
    args: AttentionArgs,
    q: Vec<f32>,
    k_cache: wgpu::Buffer,
    v_cache: wgpu::Buffer,
    /// k and v as the cache should hold them (rounded through f16 for an f16 cache), or for a
    /// q8_0 cache as it holds them (its bytes dequantized: `kv_store` checks its quantization)
    k_want: Vec<f32>,
    v_want: Vec<f32>,
    /// k and v as written
    k: Vec<f32>,
    v: Vec<f32>,
}

async fn fill_cache(gpu: &Gpu, ci: usize, kv: KvType) -> Result<FilledCache> {
    let (n_q, n_head, n_kv_head, head_dim, pos0, window) = ATTENTION_CASES[ci];
    let args = AttentionArgs { n_q, n_head, n_kv_head, head_dim, pos0, window, scale: 1.0 / (head_dim as f32).sqrt(), kv };
    let n_kv = (pos0 + n_q) as usize;
    let row = (n_kv_head * head_dim) as usize;
    let mut rng = Rng::new(900 + ci as u64);
    let q = rng.fill(n_q as usize * (n_head * head_dim) as usize, 1.0);
    let k = rng.fill(n_kv * row, 1.0);
    let v = rng.fill(n_kv * row, 1.0);
    let cache_bytes = n_kv as u64 * kv.row_bytes(row as u64);
    let (k_cache, v_cache) = (gpu.storage("k cache", cache_bytes).await?, gpu.storage("v cache", cache_bytes).await?);
    let split = pos0.max(1).min(n_kv as u32) as usize;
    let (k1, k2) = (gpu.upload_f32("k", &k[..split * row]).await?, gpu.upload_f32("k2", &k[split * row..]).await?);
    let (v1, v2) = (gpu.upload_f32("v", &v[..split * row]).await?, gpu.upload_f32("v2", &v[split * row..]).await?);
    let mut rec = Recorder::new(gpu);
    rec.kv_store(&k1, &v1, &k_cache, &v_cache, n_kv_head, head_dim, kv, split as u32, 0).await?;
    if split < n_kv {
        rec.kv_store(&k2, &v2, &k_cache, &v_cache, n_kv_head, head_dim, kv, (n_kv - split) as u32, split as u32).await?;
    }
    rec.submit()?;
    let (k_want, v_want) = match kv {
        KvType::F32 => (k.clone(), v.clone()),
        KvType::F16 => (to_f16_and_back(&k), to_f16_and_back(&v)),
        KvType::Q8_0 => (cache_values(kv, gpu.read(&k_cache, 0, cache_bytes).await?, row), cache_values(kv, gpu.read(&v_cache, 0, cache_bytes).await?, row)),
    };
    Ok(FilledCache { args, q, k_cache, v_cache, k_want, v_want, k, v })
}

/// Whether the q8_0 cache takes ATTENTION_CASES[ci]'s rows.
fn q8_takes(ci: usize) -> bool {
    let (_, _, n_kv_head, head_dim, _, _) = ATTENTION_CASES[ci];
    KvType::Q8_0.check_row(n_kv_head, head_dim).is_ok()
}

async fn kv_store(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for kv in KvType::ALL {
        for (ci, &(_, _, n_kv_head, head_dim, _, _)) in ATTENTION_CASES.iter().enumerate() {
            if kv == KvType::Q8_0 && !q8_takes(ci) {
                // rows the q8_0 cache does not take (heads of 48 or 6): refused, not written
                let (x, cache) = (gpu.upload_f32("k", &vec![0.5; (n_kv_head * head_dim) as usize]).await?, gpu.storage("cache", 4096).await?);
                let mut rec = Recorder::new(gpu);
                let r = rec.kv_store(&x, &x, &cache, &cache, n_kv_head, head_dim, kv, 1, 0).await;
                checks.push(refused(format!("kv_store {kv:?} case {ci} ({n_kv_head} kv heads of {head_dim})"), r));
                continue;
            }
            let c = fill_cache(gpu, ci, kv).await?;
            let name = format!("kv_store {kv:?} case {ci}");
            if kv == KvType::Q8_0 {
                checks.extend(q8_checks(&format!("{name}: k"), &c.k_want, &c.k, 0.0));
                checks.extend(q8_checks(&format!("{name}: v"), &c.v_want, &c.v, 0.0));
                continue;
            }
            let bytes = c.k_want.len() as u64 / c.args.n_kv_head as u64 / c.args.head_dim as u64 * kv.row_bytes((c.args.n_kv_head * c.args.head_dim) as u64);
            let row = (c.args.n_kv_head * c.args.head_dim) as usize;
            let (k, v) = (cache_values(kv, gpu.read(&c.k_cache, 0, bytes).await?, row), cache_values(kv, gpu.read(&c.v_cache, 0, bytes).await?, row));
            checks.push(Check::max_abs(format!("{name}: k"), &k, &c.k_want, 0.0));
            checks.push(Check::max_abs(format!("{name}: v"), &v, &c.v_want, 0.0));
        }
    }
    checks.extend(kv_store_outliers(gpu).await?);
    Ok(checks)
}

/// Keys as real models' are: a few channels of each head tens of times larger than the rest
/// (the blocks holding them get coarse steps), values of mixed scale from block to block, and
/// a row of zeros (scale 0); stored as q8_0 and read by attention, against the reference over
/// the values the cache holds and within q8_0's error of the reference over the exact ones.
async fn kv_store_outliers(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    let (n_head, n_kv_head, head_dim, n_kv) = (9u32, 3u32, 64u32, 40usize);
    let row = (n_kv_head * head_dim) as usize;
    let mut rng = Rng::new(4242);
    let mut k = rng.fill(n_kv * row, 1.0);
    let mut v = rng.fill(n_kv * row, 1.0);
    for (i, x) in k.iter_mut().enumerate() {
        let d = i % head_dim as usize;
        if d == 3 || d == 37 {
            *x *= 40.0;
        }
    }
    for (b, block) in v.chunks_mut(32).enumerate() {
        let s = [0.01f32, 1.0, 8.0][b % 3];
        block.iter_mut().for_each(|x| *x *= s);
    }
    k[5 * row..6 * row].fill(0.0);
    v[5 * row..6 * row].fill(0.0);
    let kv = KvType::Q8_0;
    let cache_bytes = n_kv as u64 * kv.row_bytes(row as u64);
    let (k_cache, v_cache) = (gpu.storage("k cache", cache_bytes).await?, gpu.storage("v cache", cache_bytes).await?);
    let (kb, vb) = (gpu.upload_f32("k", &k).await?, gpu.upload_f32("v", &v).await?);
    let mut rec = Recorder::new(gpu);
    rec.kv_store(&kb, &vb, &k_cache, &v_cache, n_kv_head, head_dim, kv, n_kv as u32, 0).await?;
    rec.submit()?;
    let (k_held, v_held) = (cache_values(kv, gpu.read(&k_cache, 0, cache_bytes).await?, row), cache_values(kv, gpu.read(&v_cache, 0, cache_bytes).await?, row));
    checks.extend(q8_checks("kv_store Q8_0 outlier channels: k", &k_held, &k, 0.0));
    checks.extend(q8_checks("kv_store Q8_0 mixed scales: v", &v_held, &v, 0.0));
    let n_q = 4u32;
    let q = rng.fill((n_q * n_head * head_dim) as usize, 1.0);
    let qb = gpu.upload_f32("q", &q).await?;
    let out = gpu.storage("out", (q.len() * 4) as u64).await?;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let pos0 = (n_kv - n_q as usize) as u32;
    let a = AttentionArgs { n_q, n_head, n_kv_head, head_dim, pos0, window: 0, scale, kv };
    let shape = reference_shape(&a);
    let (want_held, want_exact) = (reference::attention(&q, &k_held, &v_held, shape), reference::attention(&q, &k, &v, shape));
    for (family, split_k) in attention_runs() {
        let mut rec = Recorder::new(gpu);
        rec.attention_family = Some(family);
        rec.split_k = Some(if split_k { u32::MAX } else { 1 });
        let kernel = attention_name(&rec, &a);
        rec.attention(&qb, &k_cache, &v_cache, &out, a).await?;
        rec.submit()?;
        let got = gpu.read_f32(&out, 0, q.len()).await?;
        checks.push(Check::max_abs(format!("attention {kernel} Q8_0 outlier keys"), &got, &want_held, 1e-5));
        // against exact keys and values, q8_0's own error: the outputs' NMSE measured 7.9e-4 on
        // lavapipe (the outlier channels' blocks have steps of 0.3)
        checks.push(Check::nmse(format!("attention {kernel} Q8_0 outlier keys, against exact k and v"), &got, &want_exact, 2e-3));
    }
    Ok(checks)
}

/// The reference's attention shape for `a` (its queries from position a.pos0).
fn reference_shape(a: &AttentionArgs) -> reference::AttentionShape {
    reference::AttentionShape {
        n_head: a.n_head as usize,
        n_kv_head: a.n_kv_head as usize,
        head_dim: a.head_dim as usize,
        pos0: a.pos0 as usize,
        window: (a.window > 0).then_some(a.window as usize),
        scale: a.scale,
    }
}

/// Each family of attention kernels, unsplit and split-K (forced: a chunk every 8 keys).
fn attention_runs() -> impl Iterator<Item = (AttentionFamily, bool)> {
    [AttentionFamily::PerWorkgroup, AttentionFamily::PerQuery, AttentionFamily::Tile].into_iter().flat_map(|f| [(f, false), (f, true)])
}

/// The attention kernel a recorder runs for `a`, and its split-K chunks where it splits.
fn attention_name(rec: &Recorder, a: &AttentionArgs) -> String {
    match rec.attention_split(a) {
        1 => format!("{:?}", rec.attention_kernel(a)),
        n => format!("{:?} split {n}", rec.attention_kernel(a)),
    }
}

/// Every attention kernel the device has for each case, each also split-K (forced: a chunk
/// every 8 keys, up to MAX_SPLIT), against the reference over the values the cache holds.
async fn attention(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    for kv in KvType::ALL {
        for (ci, &(n_q, n_head, n_kv_head, head_dim, pos0, window)) in ATTENTION_CASES.iter().enumerate() {
            if kv == KvType::Q8_0 && !q8_takes(ci) {
                let a = AttentionArgs { n_q, n_head, n_kv_head, head_dim, pos0, window, scale: 1.0, kv };
                let (x, cache) = (gpu.storage("q", 4096).await?, gpu.storage("cache", 4096).await?);
                let r = Recorder::new(gpu).attention(&x, &cache, &cache, &x, a).await;
                checks.push(refused(format!("attention {kv:?} case {ci} ({n_kv_head} kv heads of {head_dim})"), r));
                continue;
            }
            let FilledCache { args: c, q, k_cache, v_cache, k_want, v_want, .. } = fill_cache(gpu, ci, kv).await?;
            let qb = gpu.upload_f32("q", &q).await?;
            let out = gpu.storage("out", (q.len() * 4) as u64).await?;
            let want = reference::attention(&q, &k_want, &v_want, reference_shape(&c));
            let mut run = Vec::new();
            for (family, split_k) in attention_runs() {
                let mut rec = Recorder::new(gpu);
                rec.attention_family = Some(family);
                rec.split_k = Some(if split_k { u32::MAX } else { 1 });
                let kernel = attention_name(&rec, &c);
                if (split_k && rec.attention_split(&c) == 1) || run.contains(&kernel) {
                    continue; // too few keys to split, or a family's fallback already run
                }
                run.push(kernel.clone());
                rec.attention(&qb, &k_cache, &v_cache, &out, c).await?;
                rec.submit()?;
                let got = gpu.read_f32(&out, 0, q.len()).await?;
                checks.push(Check::max_abs(format!("attention {kernel} {kv:?} case {ci} q={} pos0={} window={}", c.n_q, c.pos0, c.window), &got, &want, 1e-5));
            }
        }
    }
    checks.extend(attention_seq_rows(gpu).await?);
    Ok(checks)
}

/// SEQ_ROWS: one query of each of several sequences, each over its own slot of a shared cache
/// up to its own position (0, a slot's last row, between), against the reference per sequence;
/// on both kernel families that take it, and for 5 queries (key lanes / shared heads) and 8
/// (per query). Then a block of consecutive queries in one slot, on every family.
async fn attention_seq_rows(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    // (heads, kv heads, head_dim, window): shared heads, a window, 8 heads a kv head, key lanes
    for (ci, (n_head, n_kv_head, head_dim, window)) in [(9u32, 3u32, 64u32, 0u32), (4, 1, 256, 16), (16, 2, 32, 0), (4, 4, 64, 0)].into_iter().enumerate() {
        for kv in KvType::ALL {
            let row = (n_kv_head * head_dim) as usize;
            let n_rows = SEQ_CTX as usize * 8;
            let mut rng = Rng::new(9700 + ci as u64);
            let (k, v) = (rng.fill(n_rows * row, 1.0), rng.fill(n_rows * row, 1.0));
            let cache_bytes = n_rows as u64 * kv.row_bytes(row as u64);
            let (k_cache, v_cache) = (gpu.storage("k cache", cache_bytes).await?, gpu.storage("v cache", cache_bytes).await?);
            let (kb, vb) = (gpu.upload_f32("k", &k).await?, gpu.upload_f32("v", &v).await?);
            let mut rec = Recorder::new(gpu);
            rec.kv_store(&kb, &vb, &k_cache, &v_cache, n_kv_head, head_dim, kv, n_rows as u32, 0).await?;
            rec.submit()?;
            let (k, v) = match kv {
                KvType::F32 => (k, v),
                KvType::F16 => (to_f16_and_back(&k), to_f16_and_back(&v)),
                // the values the cache holds (kv_store checks its quantization)
                KvType::Q8_0 => (cache_values(kv, gpu.read(&k_cache, 0, cache_bytes).await?, row), cache_values(kv, gpu.read(&v_cache, 0, cache_bytes).await?, row)),
            };
            for n_seqs in [5usize, 8] {
                // sequence i in slot (3 i) mod 8 (not in slot order), at SEQ_POSITIONS or further ones
                let places: Vec<Place> =
                    (0..n_seqs).map(|i| Place { pos: SEQ_POSITIONS.get(i).copied().unwrap_or(20 + 7 * i as u32), kv_row0: (3 * i as u32 % 8) * SEQ_CTX }).collect();
                let qd = (n_head * head_dim) as usize;
                let q = rng.fill(n_seqs * qd, 1.0);
                let qb = gpu.upload_f32("q", &q).await?;
                let out = gpu.storage("out", (q.len() * 4) as u64).await?;
                let scale = 1.0 / (head_dim as f32).sqrt();
                let args = AttentionArgs { n_q: n_seqs as u32, n_head, n_kv_head, head_dim, pos0: 0, window, scale, kv };
                let mut want = Vec::new();
                for (i, p) in places.iter().enumerate() {
                    let (r0, r1) = (p.kv_row0 as usize * row, (p.kv_row0 + p.pos + 1) as usize * row);
                    let shape = reference_shape(&AttentionArgs { n_q: 1, pos0: p.pos, ..args });
                    want.extend(reference::attention(&q[i * qd..(i + 1) * qd], &k[r0..r1], &v[r0..r1], shape));
                }
                // (the tiles take consecutive places only: theirs is the per-workgroup kernel)
                for (per_query, split_k) in [(false, false), (true, false), (false, true), (true, true)] {
                    let mut rec = Recorder::new(gpu);
                    rec.attention_family = Some(if per_query { AttentionFamily::PerQuery } else { AttentionFamily::PerWorkgroup });
                    rec.split_k = Some(if split_k { u32::MAX } else { 1 });
                    rec.attention_at(&qb, &k_cache, &v_cache, &out, args, Places::PerToken(&places)).await?;
                    rec.submit()?;
                    let got = gpu.read_f32(&out, 0, q.len()).await?;
                    let family = if per_query { "per query" } else { "PerWorkgroup" };
                    let split = if split_k { " split-K" } else { "" };
                    checks.push(Check::max_abs(
                        format!("attention SEQ_ROWS {family}{split} {kv:?} {n_seqs} sequences {n_head}/{n_kv_head}x{head_dim} window={window}"),
                        &got,
                        &want,
                        1e-5,
                    ));
                }
            }
            // a prompt block of consecutive positions in slot 3 (a sequence's prefill in a shared
            // cache): every family, which reads no row outside the slot
            let (n_q, pos0, kv_row0) = (12u32, 20u32, 3 * SEQ_CTX);
            let q = rng.fill((n_q * n_head * head_dim) as usize, 1.0);
            let qb = gpu.upload_f32("q", &q).await?;
            let out = gpu.storage("out", (q.len() * 4) as u64).await?;
            let scale = 1.0 / (head_dim as f32).sqrt();
            let (r0, r1) = (kv_row0 as usize * row, (kv_row0 + pos0 + n_q) as usize * row);
            let args = AttentionArgs { n_q, n_head, n_kv_head, head_dim, pos0, window, scale, kv };
            let want = reference::attention(&q, &k[r0..r1], &v[r0..r1], reference_shape(&args));
            for (family, split_k) in attention_runs() {
                let mut rec = Recorder::new(gpu);
                rec.attention_family = Some(family);
                rec.split_k = Some(if split_k { u32::MAX } else { 1 });
                let kernel = attention_name(&rec, &args);
                rec.attention_at(&qb, &k_cache, &v_cache, &out, args, Places::Consecutive { kv_row0 }).await?;
                rec.submit()?;
                let got = gpu.read_f32(&out, 0, q.len()).await?;
                checks.push(Check::max_abs(format!("attention slot 3 {kernel} {kv:?} {n_head}/{n_kv_head}x{head_dim} window={window}"), &got, &want, 1e-5));
            }
        }
    }
    Ok(checks)
}

async fn top_k(gpu: &Gpu) -> Result<Vec<Check>> {
    let mut checks = Vec::new();
    // (n, k, offset): all-negative values (offset) catch a selection that starts from 0
    for (i, (n, k, offset)) in
        [(262_144usize, 1u32, 0.0f32), (262_144, 40, 0.0), (49_152, 128, 0.0), (1000, 5, 0.0), (7, 7, 0.0), (3000, 1, 0.0), (10_000, 1, -5000.0)].into_iter().enumerate()
    {
        let mut rng = Rng::new(1000 + i as u64);
        // coarse values so that ties occur and the tie-break is exercised
        let mut x: Vec<f32> = (0..n).map(|_| (rng.uniform() * 50.0).round() + offset).collect();
        x[n / 3] = 1000.0 + offset;
        x[n - 1] = 1000.0 + offset;
        let xb = gpu.upload_f32("logits", &x).await?;
        let got = ops::top_k(gpu, &xb, n as u32, k).await?;
        let want = reference::top_k(&x, k as usize);
        let mismatches = got.iter().zip(&want).filter(|(g, w)| g.0 as usize != w.0 || g.1 != w.1).count() + got.len().abs_diff(want.len());
        checks.push(Check { case: format!("top-{k} of {n}"), metric: "mismatches", error: mismatches as f64, bound: 0.0 });
    }
    // masked (constrained decoding): a grammar's allowed tokens, dense or a handful, fewer than
    // k, none of the largest values; a mask shorter than the values allows none past its end
    for (i, (n, k, every, words)) in
        [(49_152usize, 40u32, 3usize, 1537usize), (151_936, 1, 7, 4748), (49_152, 40, 4001, 1537), (10_000, 128, 1, 100), (5000, 5, 2, 157)].into_iter().enumerate()
    {
        let mut rng = Rng::new(2000 + i as u64);
        let mut x: Vec<f32> = (0..n).map(|_| (rng.uniform() * 50.0).round()).collect();
        x[0] = 1000.0; // the best value, never allowed below
        let mut mask = vec![0u32; words];
        for id in (every..n).step_by(every) {
            if id / 32 < words {
                mask[id / 32] |= 1 << (id % 32);
            }
        }
        let xb = gpu.upload_f32("logits", &x).await?;
        let got = ops::top_k_masked(gpu, &xb, n as u32, k, Some(&mask)).await?;
        let want = reference::top_k_masked(&x, &mask, k as usize);
        let mismatches = got.iter().zip(&want).filter(|(g, w)| g.0 as usize != w.0 || g.1 != w.1).count() + got.len().abs_diff(want.len());
        checks.push(Check { case: format!("top-{k} of {n}, 1 in {every} allowed ({words} mask words)"), metric: "mismatches", error: mismatches as f64, bound: 0.0 });
    }
    Ok(checks)
}
