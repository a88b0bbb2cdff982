//! `nomoat finetune`: train a LoRA adapter on the GPU from a JSONL data set and write it in
//! llama.cpp's GGUF adapter format (see runtime/src/train).

use crate::open_gguf;
use anyhow::{bail, Context, Result};
use clap::Args;
use nomoat_runtime::arch::Config;
use nomoat_runtime::chat::ChatTemplate;
use nomoat_runtime::device::{Gpu, GpuOptions};
use nomoat_runtime::model::Model;
use nomoat_runtime::tokenizer::Tokenizer;
use nomoat_runtime::train::data::{read_jsonl, DataOptions, Example};
use nomoat_runtime::train::run::{context_of, memory_needed, Resumed, Run, RunOptions};
use nomoat_runtime::train::step::TARGETS;
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
    /// Refuse to start when training would take more than this many MiB of GPU memory
    /// (weights, adapters with their optimizer state, activations); it says what it needs
    #[arg(long, value_name = "MIB")]
    pub max_gpu_memory: Option<u64>,
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

/// Where a checkpoint's training state goes: beside the adapter, `NAME.state.gguf`.
fn state_path(adapter: &Path) -> PathBuf {
    adapter.with_extension("state.gguf")
}

/// Writes `bytes` to `path` through a file beside it, renamed: an interrupted write never
/// leaves a broken file.
fn write_whole(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// A checkpoint: the adapter, and beside it the run's state (the optimizer's moments, the
/// step) for `--resume` to go on exactly; the state names the factors it belongs with.
fn save(run: &Run, path: &Path) -> Result<()> {
    let name = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
    write_whole(path, &pollster::block_on(run.trainer.adapter_gguf(&name))?)?;
    write_whole(&state_path(path), &pollster::block_on(run.state_gguf())?)
}

pub fn run(a: FinetuneArgs) -> Result<()> {
    let path = crate::pull::resolve(a.model.as_deref(), false)?;
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
    let opts = RunOptions {
        targets: a.targets.clone(),
        rank: a.rank,
        alpha: a.alpha,
        lr: a.lr,
        epochs: a.epochs,
        steps: a.steps,
        batch_tokens: a.batch_tokens,
        seed: a.seed,
        valid_every: 10,
    };
    let config = Config::from_gguf(&gguf)?;
    let ctx = context_of(&train, &valid);
    let (weights, adapters, activations) = memory_needed(&gguf, &config, &opts, ctx);
    let total = weights + adapters + activations;
    let mib = |b: u64| b.div_ceil(1 << 20);
    let needs = format!(
        "training needs {} MiB of GPU memory: {} MiB of weights, {} MiB of adapters and optimizer state, {} MiB of activations for sequences of up to {} tokens",
        mib(total),
        mib(weights),
        mib(adapters),
        mib(activations),
        ctx
    );
    if let Some(limit) = a.max_gpu_memory.filter(|l| total > l << 20) {
        bail!("{needs}, over the {limit} MiB allowed (--max-gpu-memory): use a smaller model, --rank or --targets, or shorter examples (--ctx)");
    }
    eprintln!("{needs}");
    let gpu = pollster::block_on(Gpu::new(GpuOptions {
        allow_f16: !a.portable,
        allow_subgroups: !a.portable,
        profile: a.profile,
        // allocations past the limit fail as out of memory, should the estimate fall short
        memory_budget: a.max_gpu_memory.map(|m| m << 20),
        ..Default::default()
    }))?;
    let model = pollster::block_on(Model::load(&gguf, &gpu, &mut file, &mut |_, _| {}))?;
    let mut run = pollster::block_on(Run::new(&model, &gpu, train, valid, opts))?;
    if let Some(r) = &a.resume {
        let (g, mut f) = open_gguf(r)?;
        pollster::block_on(run.trainer.load_factors(&g, &mut f)).with_context(|| format!("resuming from {}", r.display()))?;
        let state = state_path(r);
        if state.exists() {
            let (g, mut f) = open_gguf(&state)?;
            match pollster::block_on(run.resume_state(&g, &mut f)) {
                Ok(Resumed::Exactly { step }) => eprintln!("resuming at step {step} of {} with the optimizer's state ({})", run.total, state.display()),
                Ok(Resumed::NewSchedule { why }) => eprintln!("resuming with the optimizer's state on a new schedule from step 0 ({why})"),
                Err(e) => eprintln!("note: {} is not used ({e}): resuming from the adapter's factors alone", state.display()),
            }
        } else {
            eprintln!("note: no {} beside the adapter: resuming from its factors with a new optimizer state", state.display());
        }
    }
    eprintln!(
        "training {} adapters of rank {} (alpha {}) on {}: {} steps of ~{} tokens",
        run.trainer.pairs.len(),
        a.rank,
        a.alpha,
        path.file_name().unwrap_or_default().to_string_lossy(),
        run.total,
        run.batch_tokens()
    );
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let started = Instant::now();
    while !run.done() {
        if stop.load(Ordering::SeqCst) {
            eprintln!("\ninterrupted: saving the adapter after {} steps", run.step);
            break;
        }
        let p = match pollster::block_on(run.step()) {
            Ok(p) => p,
            Err(e) => bail!("{e} (the last saved adapter, if any, is kept)"),
        };
        let secs = started.elapsed().as_secs_f64();
        let tps = p.tokens as f64 / secs;
        let eta = secs / p.step as f64 * (p.steps - p.step) as f64;
        if a.json {
            let mut j = p.to_json();
            j["tok_s"] = tps.into();
            j["eta_s"] = eta.into();
            println!("{j}");
        } else {
            let val = p.val_loss.map(|v| format!("  val {v:.4}")).unwrap_or_default();
            let line = format!("step {}/{}  loss {:.4}{val}  lr {:.2e}  {tps:.0} tok/s  ETA {eta:.0} s", p.step, p.steps, p.loss, p.lr);
            // one line rewritten in a terminal, a line a step in a log
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                eprint!("\r{line}   ");
            } else {
                eprintln!("{line}");
            }
        }
        if a.save_every.is_some_and(|n| n > 0 && p.step.is_multiple_of(n)) {
            save(&run, &a.output)?;
        }
    }
    if !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!();
    }
    save(&run, &a.output)?;
    for k in gpu.take_profile().iter().take(15) {
        eprintln!("{:>8.3} s {:>7} calls  {}", k.seconds, k.calls, k.kernel);
    }
    eprintln!("wrote {} ({} projections, rank {}): use it with --lora {}", a.output.display(), run.trainer.pairs.len(), a.rank, a.output.display());
    Ok(())
}
