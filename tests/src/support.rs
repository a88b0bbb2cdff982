//! Where the test models live and small deterministic random numbers.

use std::path::PathBuf;

/// `$NOMOAT_CACHE/models` (default `~/.cache/nomoat/models`), filled by `scripts/fetch-models.sh`.
pub fn models_dir() -> PathBuf {
    let cache = std::env::var_os("NOMOAT_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/nomoat"));
    cache.join("models")
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GEMMA3: &str = "gemma-3-270m-q4_k_m.gguf";
pub const QWEN2: &str = "qwen2.5-coder-0.5b-instruct.gguf";

/// Path of a test model; panics with the set-up command to run when it is missing, because
/// a silently skipped test is a test that cannot fail.
pub fn model_path(file: &str) -> PathBuf {
    let p = models_dir().join(file);
    assert!(p.exists(), "test model {} missing: run scripts/fetch-models.sh", p.display());
    p
}

/// The suite's seedable generator, so native and browser runs draw the same numbers.
pub use nomoat_runtime::conformance::Rng;

/// Raw little-endian logits as the reference scripts store them: `.f16` files as half floats,
/// anything else as f32.
pub fn read_logits(path: &std::path::Path) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if path.extension().is_some_and(|e| e == "f16") {
        bytes.chunks(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
    } else {
        bytes.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }
}

/// Cosine similarity of two logit vectors, accumulated in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        ab += *x as f64 * *y as f64;
        aa += (*x as f64).powi(2);
        bb += (*y as f64).powi(2);
    }
    ab / (aa.sqrt() * bb.sqrt())
}
