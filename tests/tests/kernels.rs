//! Kernel conformance: every WGSL kernel, on every variant the test device offers, against the
//! plain CPU reference in `nomoat_runtime::reference`, on random data at awkward shapes (odd
//! sizes, sizes that are not multiples of the block or the workgroup, tensors split over several
//! bindings) and on real tensors of the two test models against PyPI gguf's dequantization.
//!
//! Bounds, and why:
//! - matvec / matmul: NMSE ≤ 1e-10. Same dequantized values, f32 accumulation in another order;
//!   with k ≤ 4096 random terms the relative error of a dot product is ~1e-6 at worst.
//! - gather: exact (dequantization is one or two f32 operations per element in both).
//! - norms, softmax, elementwise: max-abs error ≤ 1e-5 on O(1) values; RoPE 1e-5 + 3e-7·position
//!   (its angle is an f32 product on the GPU, as in llama.cpp).
//! - attention: max-abs ≤ 1e-5 for an f32 cache; the f16 cache is compared against a reference fed
//!   the same f16-rounded keys and values.
//! - top-k / argmax: exact ids and values, ties broken toward the lower id.

use nomoat_runtime::device::Gpu;
use nomoat_runtime::ggml_type::{GgmlType, KERNEL_TYPES};
use nomoat_runtime::kernels::{self, AttentionArgs, GpuMatrix, KvType, Recorder, RopeArgs};
use nomoat_runtime::{quant, reference};
use nomoat_tests::gpu::{max_abs_diff, nmse, small_binding, variants};
use nomoat_tests::refdata;
use nomoat_tests::support::Rng;

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    pollster::block_on(f)
}

/// Random weights of type `ty`: random floats quantized by the CPU reference, so every type
/// sees realistic scales, plus the exact values the blocks decode to.
fn random_matrix(ty: GgmlType, n_rows: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    let mut rng = Rng::new(seed);
    let src = rng.fill(n_rows * k, 1.0);
    let mut bytes = Vec::new();
    for row in src.chunks(k) {
        bytes.extend(quant::quantize_row(ty, row).unwrap());
    }
    let values = quant::dequantize(ty, &bytes, n_rows * k).unwrap();
    (bytes, values)
}

/// Shapes per block size: (rows, k), with odd counts and non-multiples of the workgroup.
fn shapes(ty: GgmlType) -> Vec<(usize, usize)> {
    match ty.block_elems() {
        1 => vec![(1, 4), (3, 5), (17, 123), (65, 256), (130, 1000)],
        32 => vec![(1, 32), (7, 96), (33, 320), (65, 640), (130, 1056)],
        _ => vec![(1, 256), (5, 512), (33, 768), (70, 1280), (3, 4096)],
    }
}

fn gpu_matvec(gpu: &Gpu, w: &GpuMatrix, x: &[f32]) -> Vec<f32> {
    block_on(async {
        let xb = gpu.upload_f32("x", x).await.unwrap();
        let y = gpu.storage("y", w.n_rows as u64 * 4).await.unwrap();
        let mut rec = Recorder::new(gpu);
        rec.matvec(w, &xb, &y).await.unwrap();
        rec.submit().unwrap();
        gpu.read_f32(&y, 0, w.n_rows as usize).await.unwrap()
    })
}

fn gpu_matmul(gpu: &Gpu, w: &GpuMatrix, x: &[f32], m: usize) -> Vec<f32> {
    block_on(async {
        let xb = gpu.upload_f32("x", x).await.unwrap();
        let y = gpu.storage("y", (m * w.n_rows as usize) as u64 * 4).await.unwrap();
        let mut rec = Recorder::new(gpu);
        rec.matmul(w, &xb, &y, m as u32).await.unwrap();
        rec.submit().unwrap();
        gpu.read_f32(&y, 0, m * w.n_rows as usize).await.unwrap()
    })
}

fn gpu_gather(gpu: &Gpu, w: &GpuMatrix, ids: &[u32]) -> Vec<f32> {
    block_on(async {
        let idb = gpu.upload_u32("ids", ids).await.unwrap();
        let out = gpu.storage("out", (ids.len() * w.k as usize) as u64 * 4).await.unwrap();
        let mut rec = Recorder::new(gpu);
        rec.gather(w, &idb, &out, ids.len() as u32).await.unwrap();
        rec.submit().unwrap();
        gpu.read_f32(&out, 0, ids.len() * w.k as usize).await.unwrap()
    })
}

fn upload_matrix(gpu: &Gpu, ty: GgmlType, n_rows: usize, k: usize, bytes: &[u8]) -> GpuMatrix {
    block_on(GpuMatrix::upload(gpu, "w", ty, k as u64, n_rows as u64, bytes)).unwrap()
}

const MATMUL_NMSE: f64 = 1e-10;

#[test]
fn matvec_every_type_and_shape() {
    for gpu in variants() {
        for ty in KERNEL_TYPES {
            for (i, (n_rows, k)) in shapes(ty).into_iter().enumerate() {
                let (bytes, w) = random_matrix(ty, n_rows, k, 100 + i as u64);
                let x = Rng::new(7 + i as u64).fill(k, 1.0);
                let want = reference::matmul(&w, &x, n_rows, k, 1);
                let got = gpu_matvec(gpu, &upload_matrix(gpu, ty, n_rows, k, &bytes), &x);
                let e = nmse(&got, &want);
                assert!(e <= MATMUL_NMSE, "matvec {ty} {n_rows}x{k} [{}]: NMSE {e:e}", gpu.variant.label());
            }
        }
    }
}

#[test]
fn matmul_every_type_and_shape() {
    for gpu in variants() {
        for ty in KERNEL_TYPES {
            for (i, (n_rows, k)) in shapes(ty).into_iter().enumerate().take(4) {
                for m in [1usize, 5, 33, 70] {
                    let (bytes, w) = random_matrix(ty, n_rows, k, 200 + i as u64);
                    let x = Rng::new(9 + m as u64).fill(m * k, 1.0);
                    let want = reference::matmul(&w, &x, n_rows, k, m);
                    let got = gpu_matmul(gpu, &upload_matrix(gpu, ty, n_rows, k, &bytes), &x, m);
                    let e = nmse(&got, &want);
                    assert!(e <= MATMUL_NMSE, "matmul {ty} {n_rows}x{k} m={m} [{}]: NMSE {e:e}", gpu.variant.label());
                }
            }
        }
    }
}

#[test]
fn gather_every_type() {
    for gpu in variants() {
        for ty in KERNEL_TYPES {
            let (n_rows, k) = shapes(ty)[2];
            let (bytes, w) = random_matrix(ty, n_rows, k, 300);
            let ids = [0u32, n_rows as u32 - 1, 3, 3, 1];
            let got = gpu_gather(gpu, &upload_matrix(gpu, ty, n_rows, k, &bytes), &ids);
            let want: Vec<f32> = ids.iter().flat_map(|&r| w[r as usize * k..][..k].to_vec()).collect();
            assert_eq!(max_abs_diff(&got, &want), 0.0, "gather {ty} [{}]", gpu.variant.label());
        }
    }
}

/// Under a 1 MiB binding limit, matrices of a few MiB split into chunks of whole rows; every
/// product and lookup must still see the whole matrix.
#[test]
fn tensors_over_the_binding_limit_are_split() {
    let gpu = small_binding();
    assert_eq!(gpu.max_binding(), 1 << 20);
    for (ty, n_rows, k) in [(GgmlType::Q8_0, 2000, 1024), (GgmlType::Q4K, 900, 4096), (GgmlType::F32, 700, 1000)] {
        let (bytes, w) = random_matrix(ty, n_rows, k, 400);
        let m = upload_matrix(gpu, ty, n_rows, k, &bytes);
        assert!(m.chunks.len() >= 2, "{ty}: {} chunk(s) for {} bytes", m.chunks.len(), bytes.len());
        let x = Rng::new(11).fill(k, 1.0);
        let got = gpu_matvec(gpu, &m, &x);
        assert!(nmse(&got, &reference::matmul(&w, &x, n_rows, k, 1)) <= MATMUL_NMSE, "split matvec {ty}");
        let xs = Rng::new(12).fill(3 * k, 1.0);
        let got = gpu_matmul(gpu, &m, &xs, 3);
        assert!(nmse(&got, &reference::matmul(&w, &xs, n_rows, k, 3)) <= MATMUL_NMSE, "split matmul {ty}");
        let ids = [0u32, n_rows as u32 - 1, (n_rows / 2) as u32];
        let got = gpu_gather(gpu, &m, &ids);
        let want: Vec<f32> = ids.iter().flat_map(|&r| w[r as usize * k..][..k].to_vec()).collect();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "split gather {ty}");
    }
}

/// Real tensors of both test models: GPU matvec over the whole tensor against gguf-py's
/// dequantization dotted with the same x, and GPU lookups of the reference rows.
#[test]
fn real_tensors_match_gguf_py() {
    let refs = refdata::load_real();
    for gpu in variants() {
        for t in &refs.tensors {
            let ty = t.ggml_type();
            let bytes = t.read_rows(0, t.n_rows);
            let m = upload_matrix(gpu, ty, t.n_rows, t.ne0, &bytes);
            let x: Vec<f32> = t.matvec_x().iter().map(|v| *v as f32).collect();
            let got = gpu_matvec(gpu, &m, &x);
            let want: Vec<f32> = t.y.iter().map(|v| *v as f32).collect();
            let e = nmse(&got[..t.y_rows], &want);
            assert!(e <= MATMUL_NMSE, "{} {} ({ty}) [{}]: NMSE {e:e}", t.model, t.tensor, gpu.variant.label());
            let ids: Vec<u32> = t.rows.iter().map(|r| r.index as u32).collect();
            let got = gpu_gather(gpu, &m, &ids);
            let want: Vec<f32> = t.rows.iter().flat_map(|r| r.values_f32()).collect();
            assert_eq!(max_abs_diff(&got, &want), 0.0, "{} {} gather [{}]", t.model, t.tensor, gpu.variant.label());
        }
    }
}

#[test]
fn rms_norm_and_layer_norm() {
    for gpu in variants() {
        for (i, (rows, n)) in [(1usize, 576usize), (3, 640), (5, 1000), (2, 7), (70_000, 4)].into_iter().enumerate() {
            let mut rng = Rng::new(500 + i as u64);
            let x = rng.fill(rows * n, 2.0);
            let w = rng.fill(n, 1.5);
            let b = rng.fill(n, 0.5);
            let (got_rms, got_ln) = block_on(async {
                let xb = gpu.upload_f32("x", &x).await.unwrap();
                let wb = gpu.upload_f32("w", &w).await.unwrap();
                let bb = gpu.upload_f32("b", &b).await.unwrap();
                let o1 = gpu.storage("o1", (rows * n * 4) as u64).await.unwrap();
                let o2 = gpu.storage("o2", (rows * n * 4) as u64).await.unwrap();
                let mut rec = Recorder::new(gpu);
                rec.rms_norm(&xb, &wb, &o1, n as u32, rows as u32, 1e-6).await.unwrap();
                rec.layer_norm(&xb, &wb, &bb, &o2, n as u32, rows as u32, 1e-5).await.unwrap();
                rec.submit().unwrap();
                (gpu.read_f32(&o1, 0, rows * n).await.unwrap(), gpu.read_f32(&o2, 0, rows * n).await.unwrap())
            });
            let e1 = max_abs_diff(&got_rms, &reference::rms_norm(&x, &w, n, 1e-6));
            let e2 = max_abs_diff(&got_ln, &reference::layer_norm(&x, &w, &b, n, 1e-5));
            assert!(e1 <= 1e-5 && e2 <= 1e-5, "norms {rows}x{n} [{}]: rms {e1:e}, layer {e2:e}", gpu.variant.label());
        }
    }
}

#[test]
fn softmax_rows() {
    for gpu in variants() {
        for (i, (rows, n)) in [(3usize, 1000usize), (2, 5), (1, 262_144), (4, 64)].into_iter().enumerate() {
            let x = Rng::new(600 + i as u64).fill(rows * n, 8.0);
            let got = block_on(async {
                let xb = gpu.upload_f32("x", &x).await.unwrap();
                let o = gpu.storage("o", (rows * n * 4) as u64).await.unwrap();
                let mut rec = Recorder::new(gpu);
                rec.softmax(&xb, &o, n as u32, rows as u32).await.unwrap();
                rec.submit().unwrap();
                gpu.read_f32(&o, 0, rows * n).await.unwrap()
            });
            let want = reference::softmax(&x, n);
            let e = max_abs_diff(&got, &want);
            assert!(e <= 1e-6, "softmax {rows}x{n} [{}]: {e:e}", gpu.variant.label());
        }
    }
}

#[test]
fn elementwise_ops() {
    for gpu in variants() {
        // 17 million elements folds the dispatch into two dimensions
        for (i, n) in [1usize, 1000, 65_537, 17_000_000].into_iter().enumerate() {
            if n > 100_000 && gpu.variant != variants()[0].variant {
                continue;
            }
            let mut rng = Rng::new(700 + i as u64);
            let a = rng.fill(n, 6.0);
            let b = rng.fill(n, 2.0);
            let outs = block_on(async {
                let ab = gpu.upload_f32("a", &a).await.unwrap();
                let bb = gpu.upload_f32("b", &b).await.unwrap();
                let mut outs = Vec::new();
                for _ in 0..6 {
                    outs.push(gpu.storage("o", (n * 4) as u64).await.unwrap());
                }
                let mut rec = Recorder::new(gpu);
                rec.add(&ab, &bb, &outs[0], n as u32).await.unwrap();
                rec.scale(&ab, &outs[1], n as u32, -0.37).await.unwrap();
                rec.softcap(&ab, &outs[2], n as u32, 5.0).await.unwrap();
                rec.silu_gate(&ab, &bb, &outs[3], n as u32).await.unwrap();
                rec.gelu_gate(&ab, &bb, &outs[4], n as u32).await.unwrap();
                rec.add_bias(&ab, &bb, &outs[5], n as u32, 7.min(n as u32)).await.unwrap();
                rec.submit().unwrap();
                let mut r = Vec::new();
                for o in &outs {
                    r.push(gpu.read_f32(o, 0, n).await.unwrap());
                }
                r
            });
            let wants = [
                reference::add(&a, &b),
                reference::scale(&a, -0.37),
                reference::softcap(&a, 5.0),
                reference::silu_gate(&a, &b),
                reference::gelu_gate(&a, &b),
                a.iter().enumerate().map(|(i, v)| v + b[i % 7.min(n)]).collect(),
            ];
            for (name, (got, want)) in ["add", "scale", "softcap", "silu_gate", "gelu_gate", "add_bias"].iter().zip(outs.iter().zip(&wants)) {
                let e = max_abs_diff(got, want);
                assert!(e <= 1e-5, "{name} n={n} [{}]: {e:e}", gpu.variant.label());
            }
        }
    }
}

#[test]
fn rope_normal_and_neox() {
    use reference::{RopeMode, RopeParams};
    for gpu in variants() {
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
            let got = block_on(async {
                let xb = gpu.upload_f32("x", &x).await.unwrap();
                let mut rec = Recorder::new(gpu);
                let args = RopeArgs { n_tokens, n_heads, head_dim, n_rot, pos0, neox: mode == RopeMode::Neox, freq_base: base, freq_scale: fscale };
                rec.rope(&xb, args).await.unwrap();
                rec.submit().unwrap();
                gpu.read_f32(&xb, 0, n).await.unwrap()
            });
            let mut want = x.clone();
            let p = RopeParams { mode, n_rot: n_rot as usize, freq_base: base, freq_scale: fscale };
            reference::rope(&mut want, n_heads as usize, head_dim as usize, pos0, p);
            let e = max_abs_diff(&got, &want);
            // the GPU's angle is an f32 product, rounded to ~2^-24 of the angle itself
            let bound = 1e-5 + (pos0 + n_tokens) as f32 * 3e-7;
            assert!(e <= bound, "rope {mode:?} pos0={pos0} [{}]: {e:e} > {bound:e}", gpu.variant.label());
        }
    }
}

fn to_f16_and_back(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
}

#[test]
fn kv_store_and_attention() {
    struct Case {
        n_q: u32,
        n_head: u32,
        n_kv_head: u32,
        head_dim: u32,
        pos0: u32,
        window: u32,
    }
    let cases = [
        Case { n_q: 1, n_head: 9, n_kv_head: 3, head_dim: 64, pos0: 37, window: 0 },    // decode, GQA
        Case { n_q: 20, n_head: 4, n_kv_head: 1, head_dim: 256, pos0: 0, window: 0 },   // prefill
        Case { n_q: 7, n_head: 4, n_kv_head: 2, head_dim: 128, pos0: 130, window: 0 },  // block after a cache
        Case { n_q: 9, n_head: 2, n_kv_head: 2, head_dim: 64, pos0: 100, window: 16 },  // sliding window
        Case { n_q: 1, n_head: 4, n_kv_head: 1, head_dim: 256, pos0: 600, window: 512 }, // Gemma-like local layer
        Case { n_q: 3, n_head: 3, n_kv_head: 3, head_dim: 6, pos0: 2, window: 0 },       // tiny head
    ];
    for gpu in variants() {
        for kv in [KvType::F32, KvType::F16] {
            for (ci, c) in cases.iter().enumerate() {
                let n_kv = (c.pos0 + c.n_q) as usize;
                let row = (c.n_kv_head * c.head_dim) as usize;
                let mut rng = Rng::new(900 + ci as u64);
                let q = rng.fill(c.n_q as usize * (c.n_head * c.head_dim) as usize, 1.0);
                let k = rng.fill(n_kv * row, 1.0);
                let v = rng.fill(n_kv * row, 1.0);
                let scale = 1.0 / (c.head_dim as f32).sqrt();
                let (got, cache_k) = block_on(async {
                    let cache_bytes = n_kv as u64 * row as u64 * kv.bytes();
                    let kc = gpu.storage("k cache", cache_bytes).await.unwrap();
                    let vc = gpu.storage("v cache", cache_bytes).await.unwrap();
                    let qb = gpu.upload_f32("q", &q).await.unwrap();
                    let kb = gpu.upload_f32("k", &k).await.unwrap();
                    let vb = gpu.upload_f32("v", &v).await.unwrap();
                    let out = gpu.storage("out", (q.len() * 4) as u64).await.unwrap();
                    let mut rec = Recorder::new(gpu);
                    // the cache is filled in two appends, as a prompt and then new tokens would
                    let split = c.pos0.max(1).min(n_kv as u32);
                    let kb2 = gpu.upload_f32("k2", &k[split as usize * row..]).await.unwrap();
                    let vb2 = gpu.upload_f32("v2", &v[split as usize * row..]).await.unwrap();
                    rec.kv_store(&kb, &kc, kv, row as u32, split, 0).await.unwrap();
                    rec.kv_store(&vb, &vc, kv, row as u32, split, 0).await.unwrap();
                    rec.kv_store(&kb2, &kc, kv, row as u32, n_kv as u32 - split, split).await.unwrap();
                    rec.kv_store(&vb2, &vc, kv, row as u32, n_kv as u32 - split, split).await.unwrap();
                    let args = AttentionArgs {
                        n_q: c.n_q,
                        n_head: c.n_head,
                        n_kv_head: c.n_kv_head,
                        head_dim: c.head_dim,
                        pos0: c.pos0,
                        window: c.window,
                        scale,
                        kv,
                    };
                    rec.attention(&qb, &kc, &vc, &out, args).await.unwrap();
                    rec.submit().unwrap();
                    let raw = gpu.read(&kc, 0, cache_bytes).await.unwrap();
                    (gpu.read_f32(&out, 0, q.len()).await.unwrap(), raw)
                });
                let (kr, vr) = match kv {
                    KvType::F32 => (k.clone(), v.clone()),
                    KvType::F16 => (to_f16_and_back(&k), to_f16_and_back(&v)),
                };
                let stored: Vec<f32> = match kv {
                    KvType::F32 => bytemuck::cast_slice(&cache_k).to_vec(),
                    KvType::F16 => cache_k.chunks(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                };
                assert_eq!(stored, kr, "kv_store {kv:?} case {ci} [{}]", gpu.variant.label());
                let shape = reference::AttentionShape {
                    n_head: c.n_head as usize,
                    n_kv_head: c.n_kv_head as usize,
                    head_dim: c.head_dim as usize,
                    pos0: c.pos0 as usize,
                    window: (c.window > 0).then_some(c.window as usize),
                    scale,
                };
                let want = reference::attention(&q, &kr, &vr, shape);
                let e = max_abs_diff(&got, &want);
                assert!(e <= 1e-5, "attention {kv:?} case {ci} [{}]: {e:e}", gpu.variant.label());
            }
        }
    }
}

#[test]
fn argmax_and_top_k() {
    for gpu in variants() {
        for (i, (n, k)) in [(262_144usize, 1u32), (262_144, 40), (49_152, 128), (1000, 5), (7, 7), (3000, 1)].into_iter().enumerate() {
            let mut rng = Rng::new(1000 + i as u64);
            // coarse values so that ties occur and the tie-break is exercised
            let mut x: Vec<f32> = (0..n).map(|_| (rng.uniform() * 50.0).round()).collect();
            x[n / 3] = 1000.0;
            x[n - 1] = 1000.0;
            let got = block_on(async {
                let xb = gpu.upload_f32("logits", &x).await.unwrap();
                kernels::top_k(gpu, &xb, n as u32, k).await.unwrap()
            });
            let want: Vec<(u32, f32)> = reference::top_k(&x, k as usize).into_iter().map(|(i, v)| (i as u32, v)).collect();
            assert_eq!(got, want, "top-{k} of {n} [{}]", gpu.variant.label());
        }
    }
}

#[test]
fn unsupported_inputs_are_refused_not_run() {
    let gpu = &variants()[0];
    let e = block_on(GpuMatrix::upload(gpu, "t", GgmlType::Q2K, 256, 1, &[0u8; 84])).err().unwrap();
    assert!(e.to_string().contains("Q2_K"), "{e}");
    let e = block_on(GpuMatrix::upload(gpu, "t", GgmlType::Q4K, 100, 1, &[0u8; 144])).err().unwrap();
    assert!(e.to_string().contains("multiple"), "{e}");
    let e = block_on(kernels::top_k(gpu, &block_on(gpu.upload_f32("x", &[1.0; 10])).unwrap(), 10, 0)).err().unwrap();
    assert!(e.to_string().contains("k = 0"), "{e}");
}

/// Gemma 3's Q8_0 token embedding (640 x 262144, 178 MB) is larger than lavapipe's 128 MiB
/// binding limit, and is also the model's output head: it must split on a real device too.
#[test]
fn gemma_embedding_over_the_binding_limit() {
    use nomoat_runtime::gguf::Gguf;
    use std::io::{Read, Seek, SeekFrom};
    let path = nomoat_tests::support::model_path(nomoat_tests::support::GEMMA3);
    let mut f = std::fs::File::open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    let g = Gguf::read_from(&mut f, len).unwrap();
    let t = g.tensor("token_embd.weight").unwrap().clone();
    let range = g.tensor_data_range(&t);
    let mut bytes = vec![0u8; (range.end - range.start) as usize];
    f.seek(SeekFrom::Start(range.start)).unwrap();
    f.read_exact(&mut bytes).unwrap();
    let (k, n_rows) = (t.row_len() as usize, t.n_rows() as usize);

    let gpu = &variants()[0];
    let m = upload_matrix(gpu, t.ty, n_rows, k, &bytes);
    assert_eq!(m.chunks.len() >= 2, bytes.len() as u64 > gpu.max_binding(), "{} chunks", m.chunks.len());
    let x: Vec<f32> = refdata::matvec_x(k).iter().map(|v| *v as f32).collect();
    let got = gpu_matvec(gpu, &m, &x);
    let row_bytes = t.ty.row_bytes(k as u64).unwrap() as usize;
    let mut row = vec![0f32; k];
    let want: Vec<f32> = bytes
        .chunks(row_bytes)
        .map(|b| {
            quant::dequantize_row(t.ty, b, &mut row).unwrap();
            row.iter().zip(&x).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32
        })
        .collect();
    let e = nmse(&got, &want);
    assert!(e <= MATMUL_NMSE, "gemma token_embd matvec over {} chunks: NMSE {e:e}", m.chunks.len());
    let ids = [0u32, 1, m.chunks[0].n_rows.saturating_sub(1), m.chunks.last().unwrap().first_row, n_rows as u32 - 1];
    let got = gpu_gather(gpu, &m, &ids);
    for (i, id) in ids.iter().enumerate() {
        quant::dequantize_row(t.ty, &bytes[*id as usize * row_bytes..][..row_bytes], &mut row).unwrap();
        assert_eq!(&got[i * k..(i + 1) * k], &row[..], "gemma token_embd row {id}");
    }
}

/// gguf-py's dequantization of random blocks of every kernel type (including the five types
/// neither test model uses, and blocks with extreme f16 scales): each block read through the
/// GPU's row lookup must give gguf-py's values exactly.
#[test]
fn random_blocks_match_gguf_py() {
    let refs = refdata::load_random();
    assert_eq!(refs.types.len(), KERNEL_TYPES.len());
    for gpu in variants() {
        for t in &refs.types {
            let ty = t.ggml_type();
            for (bi, b) in t.blocks.iter().enumerate() {
                let bytes = b.bytes();
                let m = upload_matrix(gpu, ty, 1, b.n_elements, &bytes);
                let got = gpu_gather(gpu, &m, &[0]);
                let want = b.values_f32();
                let same = got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits() || (g == w));
                assert!(same, "{ty} block {bi} [{}]: max diff {:e}", gpu.variant.label(), max_abs_diff(&got, &want));
            }
        }
    }
}

#[test]
fn impossible_allocations_are_errors() {
    let gpu = &variants()[0];
    let too_big = gpu.limits.max_buffer_size + 4;
    let e = block_on(gpu.storage("huge", too_big)).err().expect("allocation over the device's limit must fail");
    assert!(e.to_string().contains("huge"), "{e}");
    // the device stays usable afterwards
    let x = block_on(gpu.upload_f32("x", &[1.0, 2.0])).unwrap();
    assert_eq!(block_on(gpu.read_f32(&x, 0, 2)).unwrap(), vec![1.0, 2.0]);
}
