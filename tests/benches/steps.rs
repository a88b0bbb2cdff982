//! Batched decode step benchmark (not a test): the time of one `Session::step_slots` step of n
//! sequences (one token each, each its argmax read back), for n = 1, 2, 4, 8, on a real model.
//! What `nomoat serve --parallel` does each step, without the server around it.
//!
//!   cargo bench -p nomoat-tests --bench steps -- [--model FILE] [--seqs 1,2,4,8] [--reps 3]
//!       [--steps 8] [--profile] [--b NOMOAT_X=v,NOMOAT_Y=w]
//!
//! `--b` opens a second device with those environment overrides set (read when a device opens)
//! and loads the model on it too; each repetition then times every n on A and on B one after the
//! other, so that a loaded machine's drift falls on both alike, and the B / A ratio of each pair
//! is printed beside the medians. Wall time and the process's CPU time are both reported: on a
//! CPU device (lavapipe) the CPU time is the kernels' work, which other processes' load
//! stretches in wall time but hardly changes. `--profile` adds GPU time per kernel over the
//! timed steps of each n (profiling waits at every submission, so its times are not the plain
//! ones).

use nomoat_runtime::device::{Gpu, GpuOptions};
use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::model::Model;
use nomoat_runtime::ops::KvType;
use nomoat_runtime::session::{RowOut, Session, SlotStep, Want};
use nomoat_tests::support::{model_path, SMOLLM2};
use std::time::Instant;

fn arg<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).map(String::as_str)
}

fn load(path: &std::path::Path, gpu: &Gpu) -> Model {
    let mut f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let gguf = Gguf::read_from(&mut f, len).unwrap();
    pollster::block_on(Model::load(&gguf, gpu, &mut f, &mut |_, _| {})).unwrap()
}

/// CPU seconds this process has used, all threads (user + system, from /proc/self/stat): on a
/// CPU device the kernels' work, which other processes' load slows in wall time but hardly
/// changes. 0 where there is no /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // the fields after the command name (which may hold spaces) in parentheses
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are the 14th and 15th fields, 12th and 13th after the name; 100 ticks a second
    (ticks(11) + ticks(12)) / 100.0
}

/// (wall, CPU) seconds per step of n sequences, over `steps` steps after two untimed ones: a fresh session
/// of 8 slots, each of the n prefilled with its own 8-token prompt.
fn time_steps(model: &Model, gpu: &Gpu, n: usize, steps: usize) -> (f64, f64) {
    let mut s = pollster::block_on(Session::with_slots(model, gpu, 256, KvType::F16, 8)).unwrap();
    let mut next = Vec::new();
    for i in 0..n {
        s.select_slot(i);
        let prompt: Vec<u32> = (0..8).map(|j| (1 + 37 * i + 101 * j) as u32 % model.config.n_vocab as u32).collect();
        next.push(pollster::block_on(s.eval_top_k(&prompt, 1)).unwrap()[0].0);
    }
    let (mut start, mut cpu) = (Instant::now(), 0.0);
    for step in 0..steps + 2 {
        if step == 2 {
            // the profile, if any, of the timed steps only
            gpu.take_profile();
            start = Instant::now();
            cpu = cpu_seconds();
        }
        let batch: Vec<SlotStep> = next.iter().enumerate().map(|(slot, &token)| SlotStep { slot, token, want: Want::TopK(1) }).collect();
        let rows = pollster::block_on(s.step_slots(&batch)).unwrap();
        for (t, row) in next.iter_mut().zip(rows) {
            let RowOut::Best(best) = row else { panic!("asked for the argmax") };
            *t = best[0].0;
        }
    }
    (start.elapsed().as_secs_f64() / steps as f64, (cpu_seconds() - cpu) / steps as f64)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let file = arg(&args, "--model").unwrap_or(SMOLLM2);
    let path = if std::path::Path::new(file).exists() { file.into() } else { model_path(file) };
    let seqs: Vec<usize> = arg(&args, "--seqs").unwrap_or("1,2,4,8").split(',').map(|v| v.parse().expect("--seqs 1,2,4,8")).collect();
    let reps: usize = arg(&args, "--reps").map_or(3, |v| v.parse().expect("--reps N"));
    let steps: usize = arg(&args, "--steps").map_or(8, |v| v.parse().expect("--steps N"));
    let profile = args.iter().any(|a| a == "--profile");
    let opts = GpuOptions { profile, ..Default::default() };
    let a = pollster::block_on(Gpu::new(opts.clone())).expect("no GPU");
    println!("device: {}\nmodel: {}", a.describe(), path.display());
    let b = arg(&args, "--b").map(|set| {
        for kv in set.split(',') {
            let (k, v) = kv.split_once('=').expect("--b NAME=VALUE,..");
            // SAFETY: single-threaded here; the variables are read by Gpu::new just below
            unsafe { std::env::set_var(k, v) };
        }
        println!("B: {set}");
        pollster::block_on(Gpu::new(opts.clone())).expect("no GPU")
    });
    let devices: Vec<(&str, &Gpu)> = std::iter::once(("A", &a)).chain(b.as_ref().map(|b| ("B", b))).collect();
    let models: Vec<Model> = devices.iter().map(|(_, g)| load(&path, g)).collect();
    // pipelines built and pages touched before anything is timed
    for ((_, g), m) in devices.iter().zip(&models) {
        for &n in &seqs {
            time_steps(m, g, n, 1);
        }
        g.take_profile();
    }
    // [device][seqs] (wall, CPU) per repetition
    let mut times = vec![vec![Vec::new(); seqs.len()]; devices.len()];
    for rep in 0..reps {
        for (si, &n) in seqs.iter().enumerate() {
            for (di, ((_, g), m)) in devices.iter().zip(&models).enumerate() {
                times[di][si].push(time_steps(m, g, n, steps));
            }
        }
        eprintln!("rep {} of {reps} done", rep + 1);
    }
    // wall-clock and CPU-time tables alike: medians, the × of one sequence's tok/s, B / A
    for (what, pick) in [("wall", 0usize), ("CPU", 1)] {
        let t = |di: usize, si: usize| -> Vec<f64> { times[di][si].iter().map(|p: &(f64, f64)| if pick == 0 { p.0 } else { p.1 }).collect() };
        println!("\n{what} time\n{:<4} {:>4} {:>10} {:>14} {:>8} {:>6}  per-rep ms", "dev", "seqs", "ms/step", "tok/s (all)", "x 1 seq", "B/A");
        for (di, (name, _)) in devices.iter().enumerate() {
            let one = seqs.iter().position(|&n| n == 1).map(|si| median(&mut t(di, si)));
            for (si, &n) in seqs.iter().enumerate() {
                let med = median(&mut t(di, si));
                let x1 = one.map_or("-".into(), |o| format!("{:.2}", (n as f64 / med) / (1.0 / o)));
                let ratio = if di == 1 { format!("{:.3}", median(&mut t(1, si).iter().zip(t(0, si)).map(|(b, a)| b / a).collect::<Vec<_>>())) } else { "-".into() };
                let each: Vec<String> = t(di, si).iter().map(|s| format!("{:.1}", s * 1e3)).collect();
                println!("{name:<4} {n:>4} {:>10.1} {:>14.1} {x1:>8} {ratio:>6}  {}", med * 1e3, n as f64 / med, each.join(" "));
            }
        }
    }
    if profile {
        for ((name, g), m) in devices.iter().zip(&models) {
            for &n in &seqs {
                time_steps(m, g, n, steps);
                let kernels = g.take_profile();
                let per_step = |s: f64| s * 1e3 / steps as f64;
                let total: f64 = kernels.iter().map(|k| k.seconds).sum();
                println!("\n{name} {n} seqs: GPU {:.1} ms a step", per_step(total));
                for k in kernels.iter().take(8) {
                    println!("  {:<40} {:>8.2} ms {:>6} calls", k.kernel, per_step(k.seconds), k.calls);
                }
            }
        }
    }
}
