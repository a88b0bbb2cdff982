//! Kernel conformance in the browser: each op on the engine's own device against
//! `nomoat_runtime::reference` on random data at odd shapes, as tests/ does natively.
//! `Engine.run_conformance()` returns the report as JSON: [{op, max_err, tol, ok, error?}].

use nomoat_runtime::device::{Gpu, GpuError};
use nomoat_runtime::ggml_type::GgmlType;
use nomoat_runtime::kernels::{self, AttentionArgs, GpuMatrix, KvType, Recorder, RopeArgs};
use nomoat_runtime::{quant, reference};

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter().zip(b).map(|(x, y)| if x.is_finite() { (x - y).abs() } else { f32::INFINITY }).fold(0.0, f32::max)
}

/// Relative to the largest reference magnitude.
fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    max_err(got, want) / scale
}

async fn matrix(gpu: &Gpu, rng: &mut Rng, ty: GgmlType, k: usize, rows: usize) -> Result<(GpuMatrix, Vec<f32>), String> {
    let w = rng.vec(k * rows);
    let mut bytes = Vec::new();
    for row in w.chunks(k) {
        bytes.extend(quant::quantize_row(ty, row).map_err(|e| e.to_string())?);
    }
    let deq = quant::dequantize(ty, &bytes, k * rows).map_err(|e| e.to_string())?;
    let m = GpuMatrix::upload(gpu, "w", ty, k as u64, rows as u64, &bytes).await.map_err(|e| e.to_string())?;
    Ok((m, deq))
}

async fn case(gpu: &Gpu, rng: &mut Rng, op: &str) -> Result<(f32, f32), String> {
    let e = |e: GpuError| e.to_string();
    match op.split(':').collect::<Vec<_>>().as_slice() {
        ["matvec", ty] | ["matmul", ty] => {
            let ty: GgmlType = match *ty {
                "F32" => GgmlType::F32,
                "F16" => GgmlType::F16,
                "Q8_0" => GgmlType::Q8_0,
                "Q4_0" => GgmlType::Q4_0,
                "Q4_1" => GgmlType::Q4_1,
                "Q5_0" => GgmlType::Q5_0,
                "Q5_1" => GgmlType::Q5_1,
                "Q4_K" => GgmlType::Q4K,
                "Q5_K" => GgmlType::Q5K,
                "Q6_K" => GgmlType::Q6K,
                _ => return Err(format!("unknown type {ty}")),
            };
            let k = if ty.block_layout().0 == 256 { 512 } else { 576 };
            let rows = 77;
            let m = if op.starts_with("matvec") { 1 } else { 5 };
            let (w, wf) = matrix(gpu, rng, ty, k, rows).await?;
            let x = rng.vec(m * k);
            let xb = gpu.upload_f32("x", &x).await.map_err(e)?;
            let yb = gpu.storage("y", (m * rows * 4) as u64).await.map_err(e)?;
            let mut r = Recorder::new(gpu);
            if m == 1 {
                r.matvec(&w, &xb, &yb).await.map_err(e)?;
            } else {
                r.matmul(&w, &xb, &yb, m as u32).await.map_err(e)?;
            }
            r.submit().map_err(e)?;
            let got = gpu.read_f32(&yb, 0, m * rows).await.map_err(e)?;
            let want = reference::matmul(&wf, &x, rows, k, m);
            let err = rel_err(&got, &want);
            if err > 1e-3 {
                // per token, which tokens' rows are wrong, and whether they hold another token's
                let per: Vec<String> = (0..m)
                    .map(|t| {
                        let g = &got[t * rows..(t + 1) * rows];
                        let like = (0..m).find(|&u| rel_err(g, &want[u * rows..(u + 1) * rows]) < 1e-3);
                        format!("t{t}: err {:.2e}{}", rel_err(g, &want[t * rows..(t + 1) * rows]), like.map_or(String::new(), |u| format!(" (= token {u})")))
                    })
                    .collect();
                return Err(format!("max rel err {err:.2e}; {}", per.join(", ")));
            }
            Ok((err, 1e-3))
        }
        ["gather"] => {
            let (k, rows) = (96, 50);
            let (w, wf) = matrix(gpu, rng, GgmlType::Q4_1, k, rows).await?;
            let ids = [3u32, 0, 49, 17];
            let idb = gpu.upload_u32("ids", &ids).await.map_err(e)?;
            let out = gpu.storage("out", (ids.len() * k * 4) as u64).await.map_err(e)?;
            let mut r = Recorder::new(gpu);
            r.gather(&w, &idb, &out, ids.len() as u32).await.map_err(e)?;
            r.submit().map_err(e)?;
            let got = gpu.read_f32(&out, 0, ids.len() * k).await.map_err(e)?;
            let want: Vec<f32> = ids.iter().flat_map(|&i| wf[i as usize * k..(i as usize + 1) * k].to_vec()).collect();
            Ok((max_err(&got, &want), 1e-6))
        }
        ["rms_norm"] => {
            let (n, rows) = (576, 3);
            let x = rng.vec(n * rows);
            let w = rng.vec(n);
            let (xb, wb) = (gpu.upload_f32("x", &x).await.map_err(e)?, gpu.upload_f32("w", &w).await.map_err(e)?);
            let out = gpu.storage("out", (n * rows * 4) as u64).await.map_err(e)?;
            let mut r = Recorder::new(gpu);
            r.rms_norm(&xb, &wb, &out, n as u32, rows as u32, 1e-5).await.map_err(e)?;
            r.submit().map_err(e)?;
            let got = gpu.read_f32(&out, 0, n * rows).await.map_err(e)?;
            Ok((rel_err(&got, &reference::rms_norm(&x, &w, n, 1e-5)), 1e-4))
        }
        ["silu_gate"] | ["add"] => {
            let n = 1537;
            let (a, b) = (rng.vec(n), rng.vec(n));
            let (ab, bb) = (gpu.upload_f32("a", &a).await.map_err(e)?, gpu.upload_f32("b", &b).await.map_err(e)?);
            let out = gpu.storage("out", (n * 4) as u64).await.map_err(e)?;
            let mut r = Recorder::new(gpu);
            let want = if op == "add" {
                r.add(&ab, &bb, &out, n as u32).await.map_err(e)?;
                reference::add(&a, &b)
            } else {
                r.silu_gate(&ab, &bb, &out, n as u32).await.map_err(e)?;
                reference::silu_gate(&a, &b)
            };
            r.submit().map_err(e)?;
            Ok((max_err(&gpu.read_f32(&out, 0, n).await.map_err(e)?, &want), 1e-5))
        }
        ["rope", mode] => {
            let (n_tokens, heads, hd) = (3usize, 5usize, 64usize);
            let neox = *mode == "neox";
            let mut x = rng.vec(n_tokens * heads * hd);
            let xb = gpu.upload_f32("x", &x).await.map_err(e)?;
            let mut r = Recorder::new(gpu);
            let a = RopeArgs { n_tokens: n_tokens as u32, n_heads: heads as u32, head_dim: hd as u32, n_rot: hd as u32, pos0: 7, neox, freq_base: 10000.0, freq_scale: 1.0 };
            r.rope(&xb, a).await.map_err(e)?;
            r.submit().map_err(e)?;
            let got = gpu.read_f32(&xb, 0, x.len()).await.map_err(e)?;
            let mode = if neox { reference::RopeMode::Neox } else { reference::RopeMode::Normal };
            reference::rope(&mut x, heads, hd, 7, reference::RopeParams { mode, n_rot: hd, freq_base: 10000.0, freq_scale: 1.0 });
            Ok((max_err(&got, &x), 1e-3)) // native bound 1.3e-5; Chromium's sin/cos on SwiftShader give ~2e-4
        }
        ["attention"] => {
            // fill the cache with kv_store (f32), then attend with 3 queries after 9 cached
            let (n_head, n_kv, hd, n_ctx) = (6usize, 2usize, 64usize, 32usize);
            let (n_past, n_q) = (9usize, 3usize);
            let total = n_past + n_q;
            let k = rng.vec(total * n_kv * hd);
            let v = rng.vec(total * n_kv * hd);
            let q = rng.vec(n_q * n_head * hd);
            let kv_dim = (n_kv * hd) as u32;
            let (kc, vc) = (gpu.storage("k", (n_ctx * n_kv * hd * 4) as u64).await.map_err(e)?, gpu.storage("v", (n_ctx * n_kv * hd * 4) as u64).await.map_err(e)?);
            let (kb, vb, qb) = (gpu.upload_f32("k", &k).await.map_err(e)?, gpu.upload_f32("v", &v).await.map_err(e)?, gpu.upload_f32("q", &q).await.map_err(e)?);
            let out = gpu.storage("out", (q.len() * 4) as u64).await.map_err(e)?;
            let mut r = Recorder::new(gpu);
            r.kv_store(&kb, &kc, KvType::F32, kv_dim, total as u32, 0).await.map_err(e)?;
            r.kv_store(&vb, &vc, KvType::F32, kv_dim, total as u32, 0).await.map_err(e)?;
            let scale = 1.0 / (hd as f32).sqrt();
            let a = AttentionArgs { n_q: n_q as u32, n_head: n_head as u32, n_kv_head: n_kv as u32, head_dim: hd as u32, pos0: n_past as u32, window: 0, scale, kv: KvType::F32 };
            r.attention(&qb, &kc, &vc, &out, a).await.map_err(e)?;
            r.submit().map_err(e)?;
            let got = gpu.read_f32(&out, 0, q.len()).await.map_err(e)?;
            let want = reference::attention(&q, &k, &v, reference::AttentionShape { n_head, n_kv_head: n_kv, head_dim: hd, pos0: n_past, window: None, scale });
            Ok((max_err(&got, &want), 1e-4))
        }
        ["top_k"] => {
            let n = 49152;
            let x = rng.vec(n);
            let xb = gpu.upload_f32("x", &x).await.map_err(e)?;
            let got = kernels::top_k(gpu, &xb, n as u32, 8).await.map_err(e)?;
            let want = reference::top_k(&x, 8);
            let bad = got.iter().zip(&want).filter(|(g, w)| g.0 as usize != w.0).count() + want.len().abs_diff(got.len());
            Ok((bad as f32, 0.0))
        }
        _ => Err(format!("unknown op {op}")),
    }
}

pub const OPS: &[&str] = &[
    "matvec:F32", "matvec:F16", "matvec:Q8_0", "matvec:Q4_0", "matvec:Q4_1", "matvec:Q5_0", "matvec:Q5_1", "matvec:Q4_K", "matvec:Q5_K", "matvec:Q6_K",
    "matmul:F32", "matmul:Q8_0", "matmul:Q4_1", "matmul:Q4_K", "matmul:Q6_K",
    "gather", "rms_norm", "add", "silu_gate", "rope:normal", "rope:neox", "attention", "top_k",
];

pub async fn run(gpu: &Gpu) -> serde_json::Value {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut out = Vec::new();
    for op in OPS {
        let v = match case(gpu, &mut rng, op).await {
            Ok((err, tol)) => serde_json::json!({"op": op, "max_err": err, "tol": tol, "ok": err <= tol}),
            Err(msg) => serde_json::json!({"op": op, "ok": false, "error": msg}),
        };
        out.push(v);
    }
    serde_json::json!({"device": gpu.describe(), "results": out})
}
