//! Kernel checks only a native run can make: tensors split over several bindings under a 1 MiB
//! limit, real tensors of the test models, and random blocks of every type against PyPI gguf's
//! dequantization. The random-data suite of every op (conformance.rs, and the browser) is
//! `nomoat_runtime::conformance`.

use nomoat_runtime::conformance::{self, MATMUL_NMSE};
use nomoat_runtime::device::Gpu;
use nomoat_runtime::ggml_type::{GgmlType, KERNEL_TYPES};
use nomoat_runtime::ops::{self, AttentionArgs, GpuMatrix, KvType, Recorder};
use nomoat_runtime::quant;
use nomoat_runtime::reference;
use nomoat_tests::gpu::{max_abs_diff, nmse, small_binding, variants};
use nomoat_tests::refdata;
use nomoat_tests::support::Rng;

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    pollster::block_on(f)
}

fn random_matrix(ty: GgmlType, n_rows: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
    conformance::random_matrix(ty, n_rows, k, seed).unwrap()
}

fn gpu_matvec(gpu: &Gpu, w: &GpuMatrix, x: &[f32]) -> Vec<f32> {
    block_on(conformance::gpu_matvec(gpu, w, x)).unwrap()
}

fn gpu_matmul(gpu: &Gpu, w: &GpuMatrix, x: &[f32], m: usize) -> Vec<f32> {
    block_on(conformance::gpu_matmul(gpu, w, x, m)).unwrap()
}

fn gpu_gather(gpu: &Gpu, w: &GpuMatrix, ids: &[u32]) -> Vec<f32> {
    block_on(conformance::gpu_gather(gpu, w, ids)).unwrap()
}

fn upload_matrix(gpu: &Gpu, ty: GgmlType, n_rows: usize, k: usize, bytes: &[u8]) -> GpuMatrix {
    block_on(GpuMatrix::upload(gpu, "w", ty, k as u64, n_rows as u64, bytes)).unwrap()
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

/// Greedy decoding's head over several bindings: each chunk's best-of slots follow the
/// previous chunk's, and the argmax over them all is the whole matrix's.
#[test]
fn head_argmax_over_the_binding_limit() {
    let gpu = small_binding();
    for (ty, n_rows, k) in [(GgmlType::Q8_0, 2000, 1024), (GgmlType::F32, 700, 1000)] {
        assert!(ty.row_bytes(k as u64).unwrap() * n_rows as u64 > gpu.max_binding(), "{ty}: fits one binding");
        let checks = block_on(conformance::head_argmax(gpu, ty, n_rows, k, 450)).unwrap();
        for c in &checks {
            assert!(c.ok(), "{}: {} {:e} > {:e}", c.case, c.metric, c.error, c.bound);
        }
    }
}

/// Stacked matrices (q/k/v-like parts) over several bindings: each part's rows still reach its
/// own output, whichever chunk holds them, for decode, both prompt kernels and the residual add.
#[test]
fn stacked_parts_over_the_binding_limit() {
    use nomoat_runtime::ops::{ProductIn, ProductOut};
    let gpu = small_binding();
    for ty in [GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::F16] {
        let k = 1024;
        let rows = [1100usize, 300, 301];
        let (m, parts) = block_on(conformance::random_stacked(gpu, ty, &rows, k, 600)).unwrap();
        assert!(m.chunks.len() >= 2, "{ty}: {} chunk(s)", m.chunks.len());
        for (n, tiled) in [(1usize, None), (3, Some(true)), (3, Some(false))] {
            let x = Rng::new(13).fill(n * k, 1.0);
            let xb = block_on(gpu.upload_f32("x", &x)).unwrap();
            let outs: Vec<_> = rows.iter().map(|&r| block_on(gpu.storage("y", (n * r * 4) as u64)).unwrap()).collect();
            let resid = Rng::new(14).fill(n * rows[0], 1.0);
            let rb = block_on(gpu.upload_f32("resid", &resid)).unwrap();
            let first = block_on(GpuMatrix::upload(gpu, "p0", ty, k as u64, rows[0] as u64, &parts[0].0)).unwrap();
            let mut rec = Recorder::new(gpu);
            rec.tiled_matmul = tiled;
            block_on(rec.product(&m, ProductIn::X(&xb), ProductOut::Split(&[&outs[0], &outs[1], &outs[2]]), n as u32)).unwrap();
            block_on(rec.product(&first, ProductIn::X(&xb), ProductOut::Residual(&rb), n as u32)).unwrap();
            rec.submit().unwrap();
            for (i, &r) in rows.iter().enumerate() {
                let got = block_on(gpu.read_f32(&outs[i], 0, n * r)).unwrap();
                let e = nmse(&got, &reference::matmul(&parts[i].1, &x, r, k, n));
                assert!(e <= MATMUL_NMSE, "{ty} part {i} n={n} {tiled:?}: NMSE {e:e}");
            }
            let got = block_on(gpu.read_f32(&rb, 0, n * rows[0])).unwrap();
            let want = reference::add(&resid, &reference::matmul(&parts[0].1, &x, rows[0], k, n));
            assert!(nmse(&got, &want) <= MATMUL_NMSE, "{ty} residual n={n} {tiled:?}");
        }
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
fn unsupported_inputs_are_refused_not_run() {
    let gpu = &variants()[0];
    let e = block_on(GpuMatrix::upload(gpu, "t", GgmlType::Q2K, 256, 1, &[0u8; 84])).err().unwrap();
    assert!(e.to_string().contains("Q2_K"), "{e}");
    let e = block_on(GpuMatrix::upload(gpu, "t", GgmlType::Q4K, 100, 1, &[0u8; 144])).err().unwrap();
    assert!(e.to_string().contains("multiple"), "{e}");
    let e = block_on(ops::top_k(gpu, &block_on(gpu.upload_f32("x", &[1.0; 10])).unwrap(), 10, 0)).err().unwrap();
    assert!(e.to_string().contains("k = 0"), "{e}");
    // llvmpipe stops a shader after 65535 loop iterations: attention past that is refused there
    if gpu.info.name.contains("llvmpipe") {
        let b = block_on(gpu.storage("b", 1024)).unwrap();
        let a = AttentionArgs { n_q: 1, n_head: 4, n_kv_head: 1, head_dim: 256, pos0: 16_000, window: 0, scale: 0.0625, kv: KvType::F16 };
        let mut rec = Recorder::new(gpu);
        let e = block_on(rec.attention(&b, &b, &b, &b, a)).err().unwrap();
        assert!(e.to_string().contains("context size"), "{e}");
    }
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
    let e = block_on(gpu.storage("huge", too_big)).expect_err("allocation over the device's limit must fail");
    assert!(e.to_string().contains("huge"), "{e}");
    // the device stays usable afterwards
    let x = block_on(gpu.upload_f32("x", &[1.0, 2.0])).unwrap();
    assert_eq!(block_on(gpu.read_f32(&x, 0, 2)).unwrap(), vec![1.0, 2.0]);
}

/// The profiler times every dispatch of a submission, past the 2,048 one query set holds (a
/// training step of SmolLM2 records about 3,000 in one), and the timed work is still right.
#[test]
fn profiling_times_every_dispatch_of_a_long_submission() {
    use nomoat_runtime::device::GpuOptions;
    let gpu = block_on(Gpu::new(GpuOptions { profile: true, ..Default::default() })).expect("no GPU");
    if !gpu.profiling() {
        eprintln!("{} has no timestamps inside passes: nothing to check", gpu.info.name);
        return;
    }
    let n = 64usize;
    let a = block_on(gpu.upload_f32("a", &vec![1.0; n])).unwrap();
    let b = block_on(gpu.storage("b", 4 * n as u64)).unwrap();
    let mut rec = Recorder::new(&gpu);
    // 5,000 dispatches in one submission: a scaled into b, b copied back into a, 2,500 times
    for i in 0..5000 {
        let (src, dst, s) = if i % 2 == 0 { (&a, &b, 1.0001) } else { (&b, &a, 1.0) };
        block_on(rec.scale(src, dst, n as u32, s)).unwrap();
    }
    rec.submit().unwrap();
    let profile = gpu.take_profile();
    let calls: u64 = profile.iter().map(|k| k.calls).sum();
    assert_eq!(calls, 5000, "{profile:?}");
    assert!(profile.iter().all(|k| k.seconds > 0.0), "{profile:?}");
    let got = block_on(gpu.read_f32(&a, 0, n)).unwrap();
    let want = 1.0001f32.powi(2500);
    assert!(got.iter().all(|v| (v / want - 1.0).abs() < 1e-3), "{} against {want}", got[0]);
}
