//! `nomoat finetune`: train a LoRA adapter on the GPU from a JSONL data set and write it in
//! llama.cpp's GGUF adapter format (see runtime/src/train).

use crate::open_gguf;
use anyhow::{bail, Context, Result};
use clap::Args;
use nomoat_runtime::chat::ChatTemplate;
use nomoat_runtime::conformance::Rng;
use nomoat_runtime::device::{Gpu, GpuOptions};
use nomoat_runtime::model::Model;
use nomoat_runtime::reference::AdamW;
use nomoat_runtime::tokenizer::Tokenizer;
use nomoat_runtime::train::data::{read_jsonl, DataOptions, Example};
use nomoat_runtime::train::step::{Trainer, TARGETS};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args, Clone, Debug)]
pub struct FinetuneArgs {
    /// GGUF model file (default: the SmolLM2 135M Instruct test model fetched by set-up)
    #[arg(short, long)]
    pub model: Option<PathBuf>,
    /// Training data: JSONL, one {"messages"}, {"prompt", "completion"} or {"text"} a line
    #[arg(long)]
    pub data: PathBuf,
    /// Validation data, same formats: its loss is reported as training goes
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// Where the adapter goes (llama.cpp's GGUF LoRA format)
    #[arg(short, long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 8)]
    pub rank: u32,
    /// The adapter's alpha: its term is scaled by alpha / rank
    #[arg(long, default_value_t = 16.0)]
    pub alpha: f32,
    /// Projections to adapt, of q, k, v, o, gate, up, down
    #[arg(long, value_delimiter = ',', default_value = "q,k,v,o,gate,up,down")]
    pub targets: Vec<String>,
    /// Peak learning rate (AdamW; linear warm-up, then a cosine decay to a tenth of it)
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f32,
    /// Passes over the data [default: 1 unless --steps is given]
    #[arg(long, conflicts_with = "steps")]
    pub epochs: Option<u32>,
    /// Optimizer steps to take
    #[arg(long)]
    pub steps: Option<u32>,
    /// Tokens a step's gradient is accumulated over (whole examples, at least one)
    #[arg(long, default_value_t = 2048)]
    pub batch_tokens: usize,
    /// Longest example in tokens; longer ones are skipped (counted) unless --strict
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Refuse examples longer than --ctx instead of skipping them
    #[arg(long)]
    pub strict: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also write the adapter every N steps (to the output path)
    #[arg(long)]
    pub save_every: Option<u32>,
    /// Start from this adapter's factors (same model, rank and targets)
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// One JSON object per step on stdout instead of the progress line
    #[arg(long)]
    pub json: bool,
    /// Disable shader-f16 and subgroups
    #[arg(long)]
    pub portable: bool,
    /// Time every kernel (GPU timestamps) and print where the time went at the end
    #[arg(long)]
    pub profile: bool,
}

fn read_data(path: &Path, tok: &Tokenizer, template: Option<&ChatTemplate>, opts: DataOptions, what: &str) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the {what} data {}", path.display()))?;
    let set = read_jsonl(&text, tok, template, opts).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if set.skipped_too_long > 0 {
        eprintln!("{what} data: skipped {} examples longer than --ctx {}", set.skipped_too_long, opts.ctx);
    }
    eprintln!("{what} data: {} examples ({}), {} tokens, {} trained on", set.examples.len(), set.format.name(), set.n_tokens(), set.n_trained());
    Ok(set.examples)
}

/// Per-position loss weights of an example (1 where trained).
fn weights(e: &Example) -> Vec<f32> {
    e.trained.iter().map(|t| if *t { 1.0 } else { 0.0 }).collect()
}

/// Linear warm-up over `warmup` steps, then cosine from `peak` down to a tenth of it.
fn learning_rate(step: u32, total: u32, warmup: u32, peak: f32) -> f32 {
    if step < warmup {
        return peak * (step + 1) as f32 / warmup as f32;
    }
    let progress = (step - warmup) as f32 / (total - warmup).max(1) as f32;
    let floor = 0.1 * peak;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f32::consts::PI * progress.min(1.0)).cos())
}

fn save(trainer: &Trainer, path: &Path) -> Result<()> {
    let name = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
    let bytes = pollster::block_on(trainer.adapter_gguf(&name))?;
    // written beside and renamed, so an interrupted write never leaves a broken adapter
    let tmp = path.with_extension("gguf.partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Loads `path`'s factors into the trainer's pairs (same tensors and rank).
fn resume(trainer: &Trainer, path: &Path) -> Result<()> {
    let (g, mut f) = open_gguf(path)?;
    if g.get_str_opt("adapter.type")? != Some("lora") || g.get_str_opt("general.architecture")? != Some(trainer.model.config.arch_name.as_str()) {
        bail!("{}: not a LoRA adapter for a {} model", path.display(), trainer.model.config.arch_name);
    }
    for (name, p) in &trainer.pairs {
        let read = |suffix: &str, n: usize, f: &mut std::fs::File| -> Result<Vec<f32>> {
            use std::io::{Read, Seek, SeekFrom};
            let t = g.tensor(&format!("{name}.{suffix}")).with_context(|| format!("{}: no tensor {name}.{suffix} (other targets or model?)", path.display()))?;
            if t.ty != nomoat_runtime::ggml_type::GgmlType::F32 || t.dims.iter().product::<u64>() as usize != n {
                bail!("{}: {name}.{suffix} is {} {:?}, not {n} f32 values (another rank?)", path.display(), t.ty, t.dims);
            }
            let r = g.tensor_data_range(t);
            let mut bytes = vec![0u8; (r.end - r.start) as usize];
            f.seek(SeekFrom::Start(r.start))?;
            f.read_exact(&mut bytes)?;
            Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        };
        let a = read("lora_a", (p.a.n_rows * p.a.k) as usize, &mut f)?;
        let b = read("lora_b", (p.b.n_rows * p.b.k) as usize, &mut f)?;
        trainer.set_factors(name, &a, &b)?;
    }
    Ok(())
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    let path = a.model.clone().unwrap_or_else(crate::default_model);
    let (gguf, mut file) = open_gguf(&path)?;
    let tok = Tokenizer::from_gguf(&gguf).context("building the tokenizer")?;
    let template = ChatTemplate::from_gguf(&gguf).ok().flatten();
    let opts = DataOptions { ctx: a.ctx, strict: a.strict };
    let train = read_data(&a.data, &tok, template.as_ref(), opts, "training")?;
    let valid = match &a.valid {
        Some(p) => read_data(p, &tok, template.as_ref(), opts, "validation")?,
        None => Vec::new(),
    };
    for t in &a.targets {
        if !TARGETS.iter().any(|(name, _)| name == t) {
            bail!("unknown target '{t}': use some of q, k, v, o, gate, up, down");
        }
    }
    let gpu = pollster::block_on(Gpu::new(GpuOptions { allow_f16: !a.portable, allow_subgroups: !a.portable, profile: a.profile, ..Default::default() }))?;
    let model = pollster::block_on(Model::load(&gguf, &gpu, &mut file, &mut |_, _| {}))?;
    let targets: Vec<&str> = a.targets.iter().map(|s| s.as_str()).collect();
    let ctx = train.iter().chain(&valid).map(|e| e.ids.len()).max().unwrap_or(2).max(2) as u32;
    let mut trainer = pollster::block_on(Trainer::new(&model, &gpu, &targets, a.rank, a.alpha, ctx, a.seed))?;
    if let Some(r) = &a.resume {
        resume(&trainer, r)?;
    }
    let train_tokens: usize = train.iter().map(|e| e.ids.len()).sum();
    let steps_per_epoch = train_tokens.div_ceil(a.batch_tokens.max(1)).max(1) as u32;
    let total = a.steps.unwrap_or(steps_per_epoch * a.epochs.unwrap_or(1)).max(1);
    let warmup = (total / 10).clamp(1, 100);
    eprintln!(
        "training {} adapters of rank {} (alpha {}) on {}: {total} steps of ~{} tokens",
        trainer.pairs.len(),
        a.rank,
        a.alpha,
        path.file_name().unwrap_or_default().to_string_lossy(),
        a.batch_tokens
    );
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = Rng::new(a.seed ^ 0x5eed);
    let mut next = order.len();
    let started = Instant::now();
    let mut tokens_done = 0usize;
    for step in 0..total {
        if stop.load(Ordering::SeqCst) {
            eprintln!("\ninterrupted: saving the adapter after {step} steps");
            break;
        }
        let (mut loss, mut trained, mut tokens) = (0.0f64, 0usize, 0usize);
        while tokens < a.batch_tokens.max(1) {
            if next == order.len() {
                // a new pass over the data, in a new order
                for i in (1..order.len()).rev() {
                    order.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
                next = 0;
            }
            let e = &train[order[next]];
            next += 1;
            loss += pollster::block_on(trainer.accumulate(&e.ids, &weights(e)))?;
            trained += e.n_trained();
            tokens += e.ids.len();
        }
        let mean_loss = loss / trained.max(1) as f64;
        if !mean_loss.is_finite() {
            bail!("the loss became {mean_loss} at step {}: stopping (the last saved adapter, if any, is kept); try a lower --lr", step + 1);
        }
        // the gradient of the mean loss, clipped to norm 1
        let norm = pollster::block_on(trainer.grad_norm())? / trained.max(1) as f64;
        let clip = if norm > 1.0 { 1.0 / norm } else { 1.0 };
        let lr = learning_rate(step, total, warmup, a.lr);
        let h = AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: step + 1 };
        pollster::block_on(trainer.optimizer_step(h, (clip / trained.max(1) as f64) as f32))?;
        tokens_done += tokens;
        let val_loss = if !valid.is_empty() && ((step + 1) % 10 == 0 || step + 1 == total) {
            let (mut l, mut n) = (0.0, 0usize);
            for e in &valid {
                l += pollster::block_on(trainer.loss(&e.ids, &weights(e)))?;
                n += e.n_trained();
            }
            Some(l / n.max(1) as f64)
        } else {
            None
        };
        let secs = started.elapsed().as_secs_f64();
        let tps = tokens_done as f64 / secs;
        let eta = secs / (step + 1) as f64 * (total - step - 1) as f64;
        if a.json {
            println!(
                "{}",
                serde_json::json!({"step": step + 1, "steps": total, "loss": mean_loss, "val_loss": val_loss, "lr": lr, "grad_norm": norm, "tokens": tokens_done, "tok_s": tps, "eta_s": eta})
            );
        } else {
            let val = val_loss.map(|v| format!("  val {v:.4}")).unwrap_or_default();
            let line = format!("step {}/{total}  loss {mean_loss:.4}{val}  lr {lr:.2e}  {tps:.0} tok/s  ETA {eta:.0} s", step + 1);
            // one line rewritten in a terminal, a line a step in a log
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
            }
        }
        if a.save_every.is_some_and(|n| n > 0 && (step + 1) % n == 0) {
            save(&trainer, &a.output)?;
        }
    }
    if !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    save(&trainer, &a.output)?;
    for k in gpu.take_profile().iter().take(15) {
        eprintln!("{:>8.3} s {:>7} calls  {}", k.seconds, k.calls, k.kernel);
    }
    eprintln!("wrote {} ({} projections, rank {}): use it with --lora {}", a.output.display(), trainer.pairs.len(), a.rank, a.output.display());
    Ok(())
}
