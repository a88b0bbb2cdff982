//! Attention benchmark (not a test): the time of one attention dispatch (and its split-K merge)
//! over a KV cache of a given depth, for SmolLM2's and Gemma 3's head shapes, decode (1 query)
//! and prefill (32), for each split-K chunk count asked for beside the device's own choice.
//! What deep-context decode and prefill spend per layer on attention, without the model around it.
//!
//!   cargo bench -p nomoat-tests --bench attention -- [--depths 1024,2048] [--splits 1,4,16]
//!       [--queries 1,32] [--reps 5] [--kv f16] [--shapes SmolLM2,global] [--b NOMOAT_X=v,NOMOAT_Y=w]
//!
//! Every configuration is timed once per repetition, in turn (so that a loaded machine's drift
//! falls on all alike), as wall clock around 30 dispatches in one submission (a model's
//! layers); the medians are printed with the spread. `--b` adds a second device opened with
//! those environment overrides (read when a device opens), timed in the same rounds.

use nomoat_runtime::device::{Gpu, GpuOptions};
use nomoat_runtime::ops::{AttentionArgs, KvType, Recorder};
use nomoat_tests::support::Rng;
use std::time::Instant;

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn list(args: &[String], name: &str, default: &[u32]) -> Vec<u32> {
    arg(args, name).map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect()).unwrap_or_else(|| default.to_vec())
}

/// One shape's buffers on one device: q, the caches, out.
struct Bufs {
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    out: wgpu::Buffer,
}

const LAYERS: usize = 30;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let depths = list(&args, "--depths", &[1024, 2048]);
    let splits = list(&args, "--splits", &[1, 2, 4, 8, 16]);
    let queries = list(&args, "--queries", &[1, 32]);
    let reps: usize = arg(&args, "--reps").and_then(|v| v.parse().ok()).unwrap_or(5);
    let kv = match arg(&args, "--kv") {
        Some("f32") => KvType::F32,
        Some("q8_0") => KvType::Q8_0,
        _ => KvType::F16,
    };
    let mut devices = vec![("A".to_string(), pollster::block_on(Gpu::new(GpuOptions::default())).expect("no GPU"))];
    if let Some(b) = arg(&args, "--b") {
        let saved: Vec<(String, Option<String>)> = b.split(',').filter_map(|kv| kv.split_once('=')).map(|(k, _)| (k.to_string(), std::env::var(k).ok())).collect();
        for (k, v) in b.split(',').filter_map(|kv| kv.split_once('=')) {
            std::env::set_var(k, v);
        }
        devices.push((format!("B ({b})"), pollster::block_on(Gpu::new(GpuOptions::default())).expect("no GPU")));
        for (k, v) in saved {
            match v {
                Some(v) => std::env::set_var(k, v),
                None => std::env::remove_var(k),
            }
        }
    }
    for (name, gpu) in &devices {
        println!("device {name}: {}", gpu.describe());
    }
    // (name, heads, kv heads, head_dim, window)
    let shapes = [("SmolLM2", 9u32, 3u32, 64u32, 0u32), ("Gemma 3 global", 4, 1, 256, 0), ("Gemma 3 local", 4, 1, 256, 512)];
    let max_depth = *depths.iter().max().unwrap();
    let max_q = *queries.iter().max().unwrap();
    // (label, device, shape, args, split or None for the device's choice)
    let mut configs: Vec<(String, usize, usize, AttentionArgs, Option<u32>)> = Vec::new();
    let only: Option<Vec<String>> = arg(&args, "--shapes").map(|v| v.split(',').map(str::to_owned).collect());
    for (si, &(sname, n_head, n_kv_head, head_dim, window)) in shapes.iter().enumerate() {
        if only.as_ref().is_some_and(|o| !o.iter().any(|w| sname.contains(w.as_str()))) {
            continue;
        }
        for &n_q in &queries {
            for &depth in &depths {
                let a = AttentionArgs { n_q, n_head, n_kv_head, head_dim, pos0: depth, window, scale: 1.0 / (head_dim as f32).sqrt(), kv };
                for (di, (dname, _)) in devices.iter().enumerate() {
                    let mut add = |split: Option<u32>| {
                        let s = split.map_or("auto".to_string(), |s| format!("split {s}"));
                        configs.push((format!("{sname} q={n_q} d={depth} {dname} {s}"), di, si, a, split));
                    };
                    add(None);
                    for &s in &splits {
                        add(Some(s));
                    }
                }
            }
        }
    }
    // per device and shape: buffers for the deepest cache and most queries
    let mut bufs: Vec<Vec<Bufs>> = Vec::new();
    for (_, gpu) in &devices {
        let mut per_shape = Vec::new();
        for &(_, n_head, n_kv_head, head_dim, _) in &shapes {
            let mut rng = Rng::new(7);
            let rows = (max_depth + max_q) as usize;
            let row = (n_kv_head * head_dim) as usize;
            let bytes = rows as u64 * kv.row_bytes(row as u64);
            let (k, v) = (pollster::block_on(gpu.storage("k", bytes)).unwrap(), pollster::block_on(gpu.storage("v", bytes)).unwrap());
            let (kf, vf) = (rng.fill(rows * row, 1.0), rng.fill(rows * row, 1.0));
            let (kb, vb) = (pollster::block_on(gpu.upload_f32("k", &kf)).unwrap(), pollster::block_on(gpu.upload_f32("v", &vf)).unwrap());
            let mut rec = Recorder::new(gpu);
            pollster::block_on(rec.kv_store(&kb, &vb, &k, &v, n_kv_head, head_dim, kv, rows as u32, 0)).unwrap();
            rec.submit().unwrap();
            let qn = (max_q * n_head * head_dim) as usize;
            let q = pollster::block_on(gpu.upload_f32("q", &rng.fill(qn, 1.0))).unwrap();
            let out = pollster::block_on(gpu.storage("out", qn as u64 * 4)).unwrap();
            per_shape.push(Bufs { q, k, v, out });
        }
        bufs.push(per_shape);
    }
    let time = |di: usize, si: usize, a: AttentionArgs, split: Option<u32>| -> (f64, String) {
        let gpu = &devices[di].1;
        let b = &bufs[di][si];
        let record = || {
            let mut rec = Recorder::new(gpu);
            rec.split_k = split;
            let what = format!("{:?} x{}", rec.attention_kernel(&a), rec.attention_split(&a));
            for _ in 0..LAYERS {
                pollster::block_on(rec.attention(&b.q, &b.k, &b.v, &b.out, a)).unwrap();
            }
            (rec, what)
        };
        let (rec, _) = record();
        rec.submit().unwrap();
        gpu.wait().unwrap();
        let (rec, what) = record();
        let start = Instant::now();
        rec.submit().unwrap();
        gpu.wait().unwrap();
        (start.elapsed().as_secs_f64() * 1e3, what)
    };
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); configs.len()];
    let mut whats = vec![String::new(); configs.len()];
    for _ in 0..reps {
        for (i, &(_, di, si, a, split)) in configs.iter().enumerate() {
            let (t, what) = time(di, si, a, split);
            times[i].push(t);
            whats[i] = what;
        }
    }
    println!("\n{LAYERS} dispatches (a model's layers), ms: median [min, max] over {reps} rounds; kv {kv:?}");
    for (i, (label, ..)) in configs.iter().enumerate() {
        let mut t = times[i].clone();
        t.sort_by(f64::total_cmp);
        println!("{label:<48} {:<20} {:>8.2} [{:.2}, {:.2}]", whats[i], t[t.len() / 2], t[0], t[t.len() - 1]);
    }
}
