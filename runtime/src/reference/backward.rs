//! Gradients of the forward ops, as fine-tuning needs them: given the op's inputs and dL/dy,
//! dL/d(each input that a LoRA adapter's gradient flows through). Frozen weights get none.
//! Each is checked against central finite differences of its forward op below.

use super::{gelu_tanh, AttentionShape};

/// dx of y = rms_norm(x) · weight, per row of n: dx = r·w⊙dy − x·r³/n · Σ w⊙dy⊙x, with
/// r = 1 / sqrt(mean(x²) + eps).
pub fn rms_norm_backward(x: &[f32], weight: &[f32], dy: &[f32], n: usize, eps: f32) -> Vec<f32> {
    let mut dx = Vec::with_capacity(x.len());
    for (row, drow) in x.chunks(n).zip(dy.chunks(n)) {
        let mean_sq = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / n as f64;
        let r = 1.0 / (mean_sq + eps as f64).sqrt();
        let dot: f64 = row.iter().zip(weight).zip(drow).map(|((x, w), d)| *x as f64 * *w as f64 * *d as f64).sum();
        dx.extend(row.iter().zip(weight).zip(drow).map(|((x, w), d)| (r * *w as f64 * *d as f64 - *x as f64 * r * r * r * dot / n as f64) as f32));
    }
    dx
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// (d_gate, d_up) of act = silu(gate) · up.
pub fn silu_gate_backward(gate: &[f32], up: &[f32], d_act: &[f32]) -> (Vec<f32>, Vec<f32>) {
    gate.iter()
        .zip(up)
        .zip(d_act)
        .map(|((g, u), d)| {
            let (g, u, d) = (*g as f64, *u as f64, *d as f64);
            let s = sigmoid(g);
            ((d * u * s * (1.0 + g * (1.0 - s))) as f32, (d * g * s) as f32)
        })
        .unzip()
}

/// d gelu_tanh(x) / dx.
pub fn gelu_tanh_derivative(x: f32) -> f32 {
    let x = x as f64;
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let t = (c * (x + 0.044715 * x * x * x)).tanh();
    (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)) as f32
}

/// (d_gate, d_up) of act = gelu_tanh(gate) · up.
pub fn gelu_gate_backward(gate: &[f32], up: &[f32], d_act: &[f32]) -> (Vec<f32>, Vec<f32>) {
    gate.iter().zip(up).zip(d_act).map(|((g, u), d)| (d * u * gelu_tanh_derivative(*g), d * gelu_tanh(*g))).unzip()
}

/// dx of y = x · Wᵀ: dx[t][k] = Σ_r dy[t][r] · w[r][k].
/// w: [n_rows][k], dy: [m][n_rows] → dx: [m][k]
pub fn matmul_backward(w: &[f32], dy: &[f32], n_rows: usize, k: usize, m: usize) -> Vec<f32> {
    let mut dx = vec![0.0f64; m * k];
    for t in 0..m {
        for r in 0..n_rows {
            let d = dy[t * n_rows + r] as f64;
            for (o, wv) in dx[t * k..][..k].iter_mut().zip(&w[r * k..][..k]) {
                *o += d * *wv as f64;
            }
        }
    }
    dx.into_iter().map(|v| v as f32).collect()
}

/// The gradient of a weight matrix W: [n_rows][k] in y = x · Wᵀ, as a LoRA factor's:
/// dW[r][c] = Σ_t dy[t][r] · x[t][c]. dy: [m][n_rows], x: [m][k].
pub fn weight_gradient(dy: &[f32], x: &[f32], n_rows: usize, k: usize, m: usize) -> Vec<f32> {
    let mut dw = vec![0.0f64; n_rows * k];
    for t in 0..m {
        for r in 0..n_rows {
            let d = dy[t * n_rows + r] as f64;
            for (o, xv) in dw[r * k..][..k].iter_mut().zip(&x[t * k..][..k]) {
                *o += d * *xv as f64;
            }
        }
    }
    dw.into_iter().map(|v| v as f32).collect()
}

/// Softmax cross-entropy of each row of logits [m][n_vocab] against its target, weighted by
/// `weights[t]` (0 for a position not trained on): the weighted sum of −log softmax(z)[target]
/// and its gradient, weights[t] · (softmax(z) − onehot(target)).
pub fn cross_entropy(logits: &[f32], targets: &[u32], weights: &[f32], n_vocab: usize) -> (f64, Vec<f32>) {
    let mut loss = 0.0;
    let mut grad = Vec::with_capacity(logits.len());
    for ((row, &target), &w) in logits.chunks(n_vocab).zip(targets).zip(weights) {
        let max = row.iter().map(|v| *v as f64).fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|v| (*v as f64 - max).exp()).sum();
        let lse = max + sum.ln();
        loss += w as f64 * (lse - row[target as usize] as f64);
        grad.extend(row.iter().enumerate().map(|(i, v)| (w as f64 * ((*v as f64 - lse).exp() - if i == target as usize { 1.0 } else { 0.0 })) as f32));
    }
    (loss, grad)
}

/// dx of y = cap · tanh(x / cap) (Gemma's final logit soft-capping).
pub fn softcap_backward(x: &[f32], dy: &[f32], cap: f32) -> Vec<f32> {
    x.iter().zip(dy).map(|(x, d)| (*d as f64 * (1.0 - (*x as f64 / cap as f64).tanh().powi(2))) as f32).collect()
}

/// (dq, dk, dv) of out = attention(q, k, v) (`super::attention`'s shapes, pos0 keys before the
/// first query): with P the softmax weights, dv = Pᵀ·dout, dS = P ⊙ (dout·vᵀ − rowsum(dout ⊙
/// out)), dq = scale · dS·k, dk = scale · dSᵀ·q, each kv head summing over its query heads.
pub fn attention_backward(q: &[f32], k: &[f32], v: &[f32], d_out: &[f32], s: AttentionShape) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let hd = s.head_dim;
    let n_q = q.len() / (s.n_head * hd);
    let group = s.n_head / s.n_kv_head;
    let (mut dq, mut dk, mut dv) = (vec![0.0f64; q.len()], vec![0.0f64; k.len()], vec![0.0f64; v.len()]);
    for t in 0..n_q {
        let p = s.pos0 + t;
        for h in 0..s.n_head {
            let kvh = h / group;
            let at = (t * s.n_head + h) * hd;
            let (qv, dov) = (&q[at..][..hd], &d_out[at..][..hd]);
            let visible: Vec<usize> = (0..=p).filter(|j| s.window.is_none_or(|w| p - j < w)).collect();
            let row = |j: usize| (j * s.n_kv_head + kvh) * hd;
            let scores: Vec<f64> = visible.iter().map(|&j| qv.iter().zip(&k[row(j)..][..hd]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * s.scale as f64).collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            let pw: Vec<f64> = e.iter().map(|x| x / sum).collect();
            // dP_j = dout · v_j; D = Σ_j P_j dP_j (= dout · out)
            let dp: Vec<f64> = visible.iter().map(|&j| dov.iter().zip(&v[row(j)..][..hd]).map(|(a, b)| *a as f64 * *b as f64).sum()).collect();
            let big_d: f64 = pw.iter().zip(&dp).map(|(a, b)| a * b).sum();
            for (i, &j) in visible.iter().enumerate() {
                let ds = pw[i] * (dp[i] - big_d) * s.scale as f64;
                for d in 0..hd {
                    dq[at + d] += ds * k[row(j) + d] as f64;
                    dk[row(j) + d] += ds * qv[d] as f64;
                    dv[row(j) + d] += pw[i] * dov[d] as f64;
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    (f(dq), f(dk), f(dv))
}

/// AdamW's hyper-parameters for one step (`step` counts from 1).
#[derive(Clone, Copy, Debug)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u32,
}

/// One AdamW step (decoupled weight decay, bias-corrected moments) on `param` in place, its
/// moments `m` and `v` updated with `grad`.
pub fn adamw(param: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], h: AdamW) {
    let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
    let (c1, c2) = (1.0 - b1.powi(h.step as i32), 1.0 - b2.powi(h.step as i32));
    for i in 0..param.len() {
        let g = grad[i] as f64;
        let mi = b1 * m[i] as f64 + (1.0 - b1) * g;
        let vi = b2 * v[i] as f64 + (1.0 - b2) * g * g;
        m[i] = mi as f32;
        v[i] = vi as f32;
        let p = param[i] as f64 * (1.0 - h.lr as f64 * h.weight_decay as f64);
        param[i] = (p - h.lr as f64 * (mi / c1) / ((vi / c2).sqrt() + h.eps as f64)) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use super::*;
    use crate::rng::Rng;

    /// Σ_i f(x)_i · r_i differentiated by central differences at every element of x.
    fn numeric(x: &[f32], r: &[f32], f: impl Fn(&[f32]) -> Vec<f32>) -> Vec<f32> {
        let loss = |x: &[f32]| f(x).iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
        (0..x.len())
            .map(|i| {
                let h = 1e-2 * (1.0 + x[i].abs());
                let (mut a, mut b) = (x.to_vec(), x.to_vec());
                a[i] += h;
                b[i] -= h;
                ((loss(&a) - loss(&b)) / (2.0 * h as f64)) as f32
            })
            .collect()
    }

    /// Agreement of an analytic gradient with the numeric one: f32 finite differences with a
    /// step of 1e-2 carry O(h²) and rounding error, so a relative bound of 1e-2 on the norm.
    fn assert_close(what: &str, got: &[f32], want: &[f32]) {
        let err: f64 = got.iter().zip(want).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
        assert!(got.len() == want.len() && err <= 1e-2 * norm.max(1e-3), "{what}: error {err:e} against norm {norm:e}\n{got:?}\n{want:?}");
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() {
        let mut rng = Rng::new(1);
        let (n, rows) = (7, 3);
        let (x, w, dy) = (rng.fill(rows * n, 2.0), rng.fill(n, 1.5), rng.fill(rows * n, 1.0));
        assert_close("rms_norm", &rms_norm_backward(&x, &w, &dy, n, 1e-5), &numeric(&x, &dy, |x| rms_norm(x, &w, n, 1e-5)));
    }

    #[test]
    fn gated_activations_backward_match_finite_differences() {
        let mut rng = Rng::new(2);
        let (g, u, d) = (rng.fill(11, 3.0), rng.fill(11, 2.0), rng.fill(11, 1.0));
        let (dg, du) = silu_gate_backward(&g, &u, &d);
        assert_close("silu d_gate", &dg, &numeric(&g, &d, |g| silu_gate(g, &u)));
        assert_close("silu d_up", &du, &numeric(&u, &d, |u| silu_gate(&g, u)));
        let (dg, du) = gelu_gate_backward(&g, &u, &d);
        assert_close("gelu d_gate", &dg, &numeric(&g, &d, |g| gelu_gate(g, &u)));
        assert_close("gelu d_up", &du, &numeric(&u, &d, |u| gelu_gate(&g, u)));
    }

    #[test]
    fn products_backward_match_finite_differences() {
        let mut rng = Rng::new(3);
        let (n_rows, k, m) = (5, 6, 3);
        let (w, x, dy) = (rng.fill(n_rows * k, 1.0), rng.fill(m * k, 1.0), rng.fill(m * n_rows, 1.0));
        assert_close("dx", &matmul_backward(&w, &dy, n_rows, k, m), &numeric(&x, &dy, |x| matmul(&w, x, n_rows, k, m)));
        assert_close("dw", &weight_gradient(&dy, &x, n_rows, k, m), &numeric(&w, &dy, |w| matmul(w, &x, n_rows, k, m)));
    }

    #[test]
    fn cross_entropy_and_softcap_match_finite_differences() {
        let mut rng = Rng::new(4);
        let (m, n_vocab) = (3, 9);
        let z = rng.fill(m * n_vocab, 4.0);
        let (targets, weights) = ([2u32, 8, 0], [1.0f32, 0.0, 0.5]);
        let (_, grad) = cross_entropy(&z, &targets, &weights, n_vocab);
        // the loss is a scalar: differentiate it with r = 1
        let numeric_grad: Vec<f32> = (0..z.len())
            .map(|i| {
                let h = 1e-2f32;
                let (mut a, mut b) = (z.clone(), z.clone());
                a[i] += h;
                b[i] -= h;
                ((cross_entropy(&a, &targets, &weights, n_vocab).0 - cross_entropy(&b, &targets, &weights, n_vocab).0) / (2.0 * h as f64)) as f32
            })
            .collect();
        assert_close("cross_entropy", &grad, &numeric_grad);
        assert!(grad[n_vocab..2 * n_vocab].iter().all(|g| *g == 0.0), "a position not trained on has no gradient");
        let dy = rng.fill(z.len(), 1.0);
        assert_close("softcap", &softcap_backward(&z, &dy, 5.0), &numeric(&z, &dy, |x| softcap(x, 5.0)));
    }

    #[test]
    fn attention_backward_matches_finite_differences() {
        let mut rng = Rng::new(5);
        for (pos0, window) in [(0usize, None), (2, Some(3))] {
            let s = AttentionShape { n_head: 4, n_kv_head: 2, head_dim: 4, pos0, window, scale: 0.5 };
            let (n_q, n_kv) = (3, pos0 + 3);
            let q = rng.fill(n_q * 4 * 4, 1.0);
            let (k, v) = (rng.fill(n_kv * 2 * 4, 1.0), rng.fill(n_kv * 2 * 4, 1.0));
            let d = rng.fill(q.len(), 1.0);
            let (dq, dk, dv) = attention_backward(&q, &k, &v, &d, s);
            assert_close("dq", &dq, &numeric(&q, &d, |q| attention(q, &k, &v, s)));
            assert_close("dk", &dk, &numeric(&k, &d, |k| attention(&q, k, &v, s)));
            assert_close("dv", &dv, &numeric(&v, &d, |v| attention(&q, &k, v, s)));
        }
    }

    #[test]
    fn rope_backward_is_rope_turned_back() {
        // RoPE is a rotation: its gradient is the inverse rotation, RoPE with the angle negated
        let mut rng = Rng::new(6);
        let p = RopeParams { mode: RopeMode::Neox, n_rot: 6, freq_base: 10000.0, freq_scale: 1.0 };
        let (x, dy) = (rng.fill(2 * 3 * 8, 1.0), rng.fill(2 * 3 * 8, 1.0));
        let mut back = dy.clone();
        rope(&mut back, 3, 8, 5, RopeParams { freq_scale: -1.0, ..p });
        let forward = |x: &[f32]| {
            let mut y = x.to_vec();
            rope(&mut y, 3, 8, 5, p);
            y
        };
        assert_close("rope", &back, &numeric(&x, &dy, forward));
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr() {
        // after one step m̂ = g and v̂ = g², so each weight moves by lr · sign(g) (eps aside)
        let (mut p, mut m, mut v) = (vec![1.0f32, -2.0, 0.5], vec![0.0; 3], vec![0.0; 3]);
        let h = AdamW { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1 };
        adamw(&mut p, &[0.3, -4.0, 1e-3], &mut m, &mut v, h);
        for (got, want) in p.iter().zip([0.9f32, -1.9, 0.4]) {
            assert!((got - want).abs() < 1e-4, "{p:?}");
        }
        let mut q = vec![1.0f32];
        adamw(&mut q, &[0.0], &mut [0.0], &mut [0.0], AdamW { weight_decay: 0.5, ..h });
        assert!((q[0] - 0.95).abs() < 1e-6, "decoupled weight decay: {q:?}");
    }
}
