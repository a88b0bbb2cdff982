//! Kernel benchmark (not a test): decode matvec throughput per GGML type on a 4096 x 4096 (or `--shape`)
//! matrix, as GB/s of weight bytes read, beside a plain f32 copy kernel's GB/s measured in the
//! same run on the same device (bytes read + bytes written). The ratio says how close each
//! dequantizing matvec comes to streaming memory as fast as the device can. The last column is
//! prefill: a 64-token matmul's time per token, as a fraction of one matvec's (lower is better;
//! 1.0 means prefill gains nothing from batching). `NOMOAT_MATVEC_*` and `NOMOAT_MATMUL`
//! (see runtime/src/kernels.rs) choose the kernels' shapes.
//!
//!   cargo bench -p nomoat-tests --bench kernels [-- --iters N] [--portable] [--types Q4_1,Q8_0]
//!       [--shape ROWSxK] [--copies N]
//!
//! Timing is wall clock around N dispatches recorded into one submission, after a warm-up
//! submission, so pipeline compilation and upload stay out of the numbers.

use nomoat_runtime::device::{Gpu, GpuOptions};
use nomoat_runtime::ggml_type::KERNEL_TYPES;
use nomoat_runtime::ops::{GpuMatrix, Recorder};
use nomoat_runtime::quant;
use nomoat_tests::support::Rng;
use std::time::Instant;

fn time_submission(gpu: &Gpu, iters: usize, record: &dyn Fn(&mut Recorder)) -> f64 {
    // warm-up: builds the pipeline and touches every page once
    let mut rec = Recorder::new(gpu);
    record(&mut rec);
    rec.submit().unwrap();
    gpu.wait().unwrap();
    let start = Instant::now();
    let mut rec = Recorder::new(gpu);
    for _ in 0..iters {
        record(&mut rec);
    }
    rec.submit().unwrap();
    gpu.wait().unwrap();
    start.elapsed().as_secs_f64() / iters as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iters = args.iter().position(|a| a == "--iters").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(5);
    let portable = args.iter().any(|a| a == "--portable");
    // `--shape 576x1536`: rows x k of the matrix (k a multiple of every chosen type's block: 32,
    // or 256 for the K types)
    let (rows, k) = args
        .iter()
        .position(|a| a == "--shape")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.split_once('x'))
        .and_then(|(r, k)| Some((r.parse::<usize>().ok()?, k.parse::<usize>().ok()?)))
        .unwrap_or((4096, 4096));
    // `--copies 30`: that many copies of the matrix, multiplied in turn, so that each is cold in
    // the caches as the layers of a model are (the numbers are per matrix)
    let n_copies = args.iter().position(|a| a == "--copies").and_then(|i| args.get(i + 1)).and_then(|v| v.parse::<usize>().ok()).unwrap_or(1).max(1);
    // `--types Q4_1,Q5_1`: only these
    let only: Option<Vec<String>> = args.iter().position(|a| a == "--types").and_then(|i| args.get(i + 1)).map(|v| v.split(',').map(str::to_owned).collect());
    let opts = GpuOptions { allow_f16: !portable, allow_subgroups: !portable, ..Default::default() };
    let gpu = pollster::block_on(Gpu::new(opts)).expect("no GPU");
    println!("device: {}", gpu.describe());
    println!("matvec {rows}x{k}, {iters} iterations per measurement, wall clock per dispatch\n");

    let copy_elems = 64usize << 20 >> 2; // 64 MiB of f32
    let (src, dst) =
        pollster::block_on(async { (gpu.upload_f32("src", &vec![1.0f32; copy_elems]).await.unwrap(), gpu.storage("dst", (copy_elems * 4) as u64).await.unwrap()) });
    let copy_s = time_submission(&gpu, iters, &|rec| pollster::block_on(rec.copy(&src, &dst, copy_elems as u32)).unwrap());
    let copy_gbs = 2.0 * (copy_elems * 4) as f64 / copy_s / 1e9;
    println!("{:<8} {:>12} {:>10} {:>10} {:>9} {:>12}", "type", "weight MiB", "ms", "GB/s", "vs copy", "mm64/tok");
    println!("{:<8} {:>12.1} {:>10.3} {:>10.2} {:>9}", "copy f32", (2 * copy_elems * 4) as f64 / (1 << 20) as f64, copy_s * 1e3, copy_gbs, "1.00");

    // fixed cost of one dispatch: a 16-byte copy, 200 times in one submission
    let tiny = time_submission(&gpu, 200, &|rec| pollster::block_on(rec.copy(&src, &dst, 4)).unwrap());
    println!("{:<8} {:>12} {:>10.3} {:>10} {:>9}   (per dispatch, fixed cost)", "dispatch", "-", tiny * 1e3, "-", "-");

    let x = Rng::new(1).fill(k, 1.0);
    let xb = pollster::block_on(gpu.upload_f32("x", &x)).unwrap();
    let y = pollster::block_on(gpu.storage("y", (rows * 4) as u64)).unwrap();
    const M: usize = 64;
    let xm = pollster::block_on(gpu.upload_f32("xm", &Rng::new(3).fill(M * k, 1.0))).unwrap();
    let ym = pollster::block_on(gpu.storage("ym", (M * rows * 4) as u64)).unwrap();
    let mut rng = Rng::new(2);
    let src_rows = rng.fill(k * 64, 1.0); // 64 distinct rows, repeated: quantizing 16M floats is slow
    for ty in KERNEL_TYPES.into_iter().filter(|t| only.as_ref().is_none_or(|o| o.iter().any(|n| n == t.name()))) {
        let block: Vec<u8> = src_rows.chunks(k).flat_map(|r| quant::quantize_row(ty, r).unwrap()).collect();
        let bytes: Vec<u8> = block.iter().copied().cycle().take(block.len() / 64 * rows).collect();
        let copies: Vec<GpuMatrix> = (0..n_copies).map(|_| pollster::block_on(GpuMatrix::upload(&gpu, "w", ty, k as u64, rows as u64, &bytes)).unwrap()).collect();
        let w = &copies[0];
        let s = time_submission(&gpu, iters, &|rec| {
            for w in &copies {
                pollster::block_on(rec.matvec(w, &xb, &y)).unwrap()
            }
        }) / n_copies as f64;
        let gbs = w.bytes() as f64 / s / 1e9;
        let mm = time_submission(&gpu, 1.max(iters / 4), &|rec| {
            for w in &copies {
                pollster::block_on(rec.matmul(w, &xm, &ym, M as u32)).unwrap()
            }
        }) / n_copies as f64;
        println!("{:<8} {:>12.1} {:>10.3} {:>10.2} {:>9.2} {:>12.2}", ty.name(), w.bytes() as f64 / (1 << 20) as f64, s * 1e3, gbs, gbs / copy_gbs, mm / M as f64 / s,);
    }
}
