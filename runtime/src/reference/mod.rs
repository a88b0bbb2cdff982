//! Plain CPU versions of every GPU op: slow, obvious, and the yardstick the conformance tests
//! compare the WGSL kernels against. Sums accumulate in f64 so the reference's own rounding is
//! far below the bounds the tests allow the GPU.
//!
//! Layouts follow ggml: a matrix is `[rows][cols]` row-major with `cols` innermost, activations
//! are `[tokens][width]`, and per-head tensors are `[tokens][heads][head_dim]`.
//!
//! `backward`: the gradients of the ops training uses, each checked against finite
//! differences.

mod backward;
pub use backward::*;

/// y[t][r] = Σ_k w[r][k] · x[t][k]
/// w: [n_rows][k], x: [m][k] → y: [m][n_rows]
pub fn matmul(w: &[f32], x: &[f32], n_rows: usize, k: usize, m: usize) -> Vec<f32> {
    assert_eq!(w.len(), n_rows * k);
    assert_eq!(x.len(), m * k);
    let mut y = vec![0.0; m * n_rows];
    for t in 0..m {
        let xt = &x[t * k..(t + 1) * k];
        for r in 0..n_rows {
            let wr = &w[r * k..(r + 1) * k];
            y[t * n_rows + r] = wr.iter().zip(xt).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
        }
    }
    y
}

/// RMSNorm over each row of width `n`: x / sqrt(mean(x²) + eps) · weight.
pub fn rms_norm(x: &[f32], weight: &[f32], n: usize, eps: f32) -> Vec<f32> {
    assert_eq!(weight.len(), n);
    x.chunks(n)
        .flat_map(|row| {
            let mean_sq = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (mean_sq + eps as f64).sqrt();
            row.iter().zip(weight).map(move |(v, w)| (*v as f64 * inv) as f32 * w).collect::<Vec<_>>()
        })
        .collect()
}

/// LayerNorm over each row of width `n`: (x − mean) / sqrt(var + eps) · weight + bias.
pub fn layer_norm(x: &[f32], weight: &[f32], bias: &[f32], n: usize, eps: f32) -> Vec<f32> {
    x.chunks(n)
        .flat_map(|row| {
            let mean = row.iter().map(|v| *v as f64).sum::<f64>() / n as f64;
            let var = row.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            (0..n).map(|i| ((row[i] as f64 - mean) * inv) as f32 * weight[i] + bias[i]).collect::<Vec<_>>()
        })
        .collect()
}

/// How RoPE pairs the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// Adjacent pairs (2i, 2i+1): Llama as converted by llama.cpp.
    Normal,
    /// Halves (i, i + n_rot/2): GPT-NeoX, Qwen, Gemma.
    Neox,
}

#[derive(Clone, Copy, Debug)]
pub struct RopeParams {
    pub mode: RopeMode,
    /// Rotated dimensions per head (≤ head_dim); the rest pass through.
    pub n_rot: usize,
    pub freq_base: f32,
    /// Linear position scaling: θ uses pos · freq_scale.
    pub freq_scale: f32,
}

/// Rotary position embedding in place. x: [n_tokens][n_heads][head_dim]; token t sits at
/// position `pos0 + t`. θ_i = pos · freq_scale · base^(−2i / n_rot).
pub fn rope(x: &mut [f32], n_heads: usize, head_dim: usize, pos0: u32, p: RopeParams) {
    rope_with_factors(x, n_heads, head_dim, pos0, p, &[]);
}

/// `rope` with pair i's frequency divided by factors[i] (none given: 1).
pub fn rope_with_factors(x: &mut [f32], n_heads: usize, head_dim: usize, pos0: u32, p: RopeParams, factors: &[f32]) {
    let half = p.n_rot / 2;
    for (t, token) in x.chunks_mut(n_heads * head_dim).enumerate() {
        let pos = (pos0 as usize + t) as f64 * p.freq_scale as f64;
        for head in token.chunks_mut(head_dim) {
            for i in 0..half {
                let factor = factors.get(i).map_or(1.0, |f| *f as f64);
                let theta = pos * (p.freq_base as f64).powf(-2.0 * i as f64 / p.n_rot as f64) / factor;
                let (s, c) = theta.sin_cos();
                let (ia, ib) = match p.mode {
                    RopeMode::Normal => (2 * i, 2 * i + 1),
                    RopeMode::Neox => (i, i + half),
                };
                let (a, b) = (head[ia] as f64, head[ib] as f64);
                head[ia] = (a * c - b * s) as f32;
                head[ib] = (a * s + b * c) as f32;
            }
        }
    }
}

/// Softmax over each row of width `n`.
pub fn softmax(x: &[f32], n: usize) -> Vec<f32> {
    x.chunks(n)
        .flat_map(|row| {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = row.iter().map(|v| (*v as f64 - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(move |v| (v / sum) as f32).collect::<Vec<_>>()
        })
        .collect()
}

pub fn silu(x: f32) -> f32 {
    let x = x as f64;
    (x / (1.0 + (-x).exp())) as f32
}

/// GELU with the tanh approximation, as Gemma's FFN uses.
pub fn gelu_tanh(x: f32) -> f32 {
    let x = x as f64;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    (0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh())) as f32
}

/// SwiGLU's gated product: silu(gate) · up.
pub fn silu_gate(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(g, u)| silu(*g) * u).collect()
}

/// GeGLU's gated product: gelu_tanh(gate) · up.
pub fn gelu_gate(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(g, u)| gelu_tanh(*g) * u).collect()
}

pub fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

pub fn scale(x: &[f32], s: f32) -> Vec<f32> {
    x.iter().map(|v| v * s).collect()
}

/// Logit soft-capping: cap · tanh(x / cap).
pub fn softcap(x: &[f32], cap: f32) -> Vec<f32> {
    x.iter().map(|v| (cap as f64 * (*v as f64 / cap as f64).tanh()) as f32).collect()
}

#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Position of the first query row; query t attends keys 0..=pos0+t.
    pub pos0: usize,
    /// Sliding window: key j is visible from position p only when p − j < window.
    pub window: Option<usize>,
    pub scale: f32,
}

/// Causal grouped-query attention.
/// q: [n_q][n_head][head_dim]; k, v: [n_kv][n_kv_head][head_dim] (the cache, positions 0..n_kv)
/// → out: [n_q][n_head][head_dim]. Query head h reads kv head h / (n_head / n_kv_head).
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: AttentionShape) -> Vec<f32> {
    let hd = s.head_dim;
    let n_q = q.len() / (s.n_head * hd);
    let group = s.n_head / s.n_kv_head;
    let mut out = vec![0.0; q.len()];
    for t in 0..n_q {
        let p = s.pos0 + t;
        for h in 0..s.n_head {
            let kvh = h / group;
            let qv = &q[(t * s.n_head + h) * hd..][..hd];
            let visible: Vec<usize> = (0..=p).filter(|j| s.window.is_none_or(|w| p - j < w)).collect();
            let scores: Vec<f64> = visible
                .iter()
                .map(|&j| {
                    let kv = &k[(j * s.n_kv_head + kvh) * hd..][..hd];
                    qv.iter().zip(kv).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * s.scale as f64
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = w.iter().sum();
            let o = &mut out[(t * s.n_head + h) * hd..][..hd];
            for d in 0..hd {
                let acc: f64 = visible.iter().zip(&w).map(|(&j, wj)| wj * v[(j * s.n_kv_head + kvh) * hd + d] as f64).sum();
                o[d] = (acc / sum) as f32;
            }
        }
    }
    out
}

/// A q8_0 KV cache's quantization (ggml's quantize_row_q8_0, as rope_kv.wgsl stores it): each
/// block of 32 values from the start of `x` becomes int8s q = round(x / d) (ties to even, as
/// WGSL's round; ggml rounds them away from zero) with d = amax / 127 computed in f32 and stored
/// as f16. Returns the values the cache then holds, q · f16(d), and each block's f16(d).
pub fn kv_q8_0(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut values, mut scales) = (Vec::with_capacity(x.len()), Vec::new());
    for block in x.chunks(32) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let stored = half::f16::from_f32(d).to_f32();
        values.extend(block.iter().map(|v| (v * id).round_ties_even() * stored));
        scales.push(stored);
    }
    (values, scales)
}

/// Index of the largest value; the lowest index wins a tie (the GPU kernel breaks ties the same way).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// The k largest values as (index, value), highest first, lower index first among equals.
pub fn top_k(x: &[f32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i, x[i])).collect()
}

/// `top_k` among the indices `mask` allows (bit i % 32 of word i / 32; past its words, none).
pub fn top_k_masked(x: &[f32], mask: &[u32], k: usize) -> Vec<(usize, f32)> {
    let mut idx: Vec<usize> = (0..x.len()).filter(|&i| mask.get(i / 32).is_some_and(|w| w >> (i % 32) & 1 == 1)).collect();
    idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    idx.into_iter().take(k).map(|i| (i, x[i])).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let y = rms_norm(&[3.0; 4], &[1.0, 2.0, 3.0, 4.0], 4, 0.0);
        for (a, b) in y.iter().zip([1.0, 2.0, 3.0, 4.0]) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let p = RopeParams { mode: RopeMode::Neox, n_rot: 8, freq_base: 10000.0, freq_scale: 1.0 };
        let x: Vec<f32> = (0..16).map(|i| i as f32 * 0.1).collect();
        let mut y = x.clone();
        rope(&mut y, 1, 8, 0, p);
        assert_eq!(&y[..8], &x[..8]);
        let n0: f32 = x[8..].iter().map(|v| v * v).sum();
        let n1: f32 = y[8..].iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        assert_ne!(&y[8..], &x[8..]);
    }

    #[test]
    fn attention_with_one_key_returns_its_value() {
        let s = AttentionShape { n_head: 2, n_kv_head: 1, head_dim: 2, pos0: 0, window: None, scale: 1.0 };
        let out = attention(&[1.0, 0.0, 0.0, 1.0], &[0.5, 0.5], &[7.0, -3.0], s);
        assert_eq!(out, vec![7.0, -3.0, 7.0, -3.0]);
    }

    #[test]
    fn top_k_breaks_ties_by_index() {
        assert_eq!(top_k(&[1.0, 3.0, 3.0, 2.0], 3), vec![(1, 3.0), (2, 3.0), (3, 2.0)]);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
