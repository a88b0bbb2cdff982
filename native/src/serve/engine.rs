//! The engine thread: owns the GPU, the model and one [`Session`], and runs queued requests one
//! at a time, first come first served. The same session serves every request, so a prompt that
//! shares a prefix with the previous one (the same system prompt, a conversation's earlier
//! turns) only evaluates what differs.

use crate::{kv_type, load, Loaded, ModelArgs};
use anyhow::{anyhow, Result};
use nomoat_runtime::chat::ChatTemplate;
use nomoat_runtime::constrain::{Guide, TokenLogprob};
use nomoat_runtime::device::GpuError;
use nomoat_runtime::error::ModelError;
use nomoat_runtime::generate::{FinishReason, GenerateOptions};
use nomoat_runtime::lora::LoraAdapter;
use nomoat_runtime::sampler::SamplerConfig;
use nomoat_runtime::session::{Session, SlotStep, Want};
use nomoat_runtime::tokenizer::Tokenizer;
use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// One request for the engine.
pub struct Job {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    /// The request's grammar (`response_format`) and `logit_bias`.
    pub guide: Guide,
    /// Indices into the loaded adapters with their scales; None: all at their default scales.
    pub adapters: Option<Vec<(usize, f32)>>,
    /// Set when the client has gone: the engine skips the job, or stops generating it.
    pub cancel: Arc<AtomicBool>,
    pub events: mpsc::UnboundedSender<Event>,
}

/// What the engine reports about a job, in order: text pieces, then `Done` or `Error`.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Outcome),
    Error(String),
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub completion_tokens: usize,
    /// Prompt tokens found in the KV cache (a shared prefix), not evaluated again.
    pub cached_tokens: usize,
    pub finish: FinishReason,
    /// Each generated token's log-probability, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
}

/// What the HTTP side needs from the loaded model.
pub struct ModelInfo {
    pub tokenizer: Arc<Tokenizer>,
    /// Err: why chat requests cannot be served (no template, or one that does not compile).
    pub template: Result<ChatTemplate, String>,
    pub n_ctx: usize,
    pub n_ctx_train: usize,
    /// Logits per token (the largest useful top_k).
    pub n_vocab: usize,
    pub device: String,
    /// Adapters loaded at start: (name, default scale, rank of the first pair, bytes).
    pub adapters: Vec<(String, f32, u32, u64)>,
    /// What a request that sets no sampling option gets: llama.cpp's defaults under the
    /// model's own `general.sampling.*` values.
    pub sampling: SamplerConfig,
    /// Requests decoded together, and why that many when it was not given.
    pub slots: usize,
    pub slots_why: Option<String>,
}

/// Counters /health reports.
#[derive(Default)]
pub struct Stats {
    pub busy: AtomicBool,
    pub served: AtomicU64,
    /// Bytes of GPU buffers alive after the last request (-1 where the driver does not say).
    pub gpu_bytes: AtomicI64,
    /// What /metrics reports besides.
    pub counters: super::metrics::Counters,
}

impl Stats {
    /// A finished generation's tokens into the counters.
    pub(super) fn count(&self, g: &nomoat_runtime::generate::Generation) {
        let c = &self.counters;
        c.prompt_tokens.fetch_add(g.prompt_tokens as u64, Ordering::Relaxed);
        c.cached_tokens.fetch_add(g.reused_tokens as u64, Ordering::Relaxed);
        c.generated_tokens.fetch_add(g.tokens.len() as u64, Ordering::Relaxed);
    }
}

/// Faults the tests inject, from hidden environment variables.
#[derive(Clone, Copy, Default)]
pub(super) struct Faults {
    /// `NOMOAT_FAULT_LOSE_DEVICE_AT=N`: destroy the device before the N-th request.
    lose_device_at: Option<u64>,
    /// `NOMOAT_FAULT_PANIC_AT=N`: panic (outside the GPU layer) in the N-th request's second
    /// decoding step.
    panic_at: Option<u64>,
    /// `NOMOAT_FAULT_GPU_PANIC_AT=N`: make wgpu panic in the N-th request's second step.
    gpu_panic_at: Option<u64>,
}

impl Faults {
    /// The panics asked for, in the `nth` request's decoding `step`.
    pub(super) fn in_step(&self, device: &wgpu::Device, nth: u64, step: usize) {
        if step != 2 {
            return;
        }
        if self.panic_at == Some(nth) {
            panic!("NOMOAT_FAULT_PANIC_AT={nth}: a panic outside the GPU layer, on purpose");
        }
        if self.gpu_panic_at == Some(nth) {
            nomoat_runtime::device::provoke_wgpu_panic(device);
        }
    }
}

thread_local! {
    /// Where the engine thread's last panic happened (source file), set by the panic hook.
    static PANIC_FILE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Notes the source file of every panic (for [`gpu_layer_panic`]), then reports it as before.
fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let file = info.location().map(|l| l.file().to_string());
            let _ = PANIC_FILE.try_with(|f| *f.borrow_mut() = file);
            previous(info);
        }));
    });
}

/// Whether a panic at this source file came from the GPU layer (wgpu, or nomoat's device and
/// kernel code), which may leave the device in a state nothing else can clear.
fn gpu_layer_panic(file: &str) -> bool {
    let file = file.replace('\\', "/");
    file.contains("/wgpu") || file.starts_with("wgpu") || file.contains("src/device.rs") || file.contains("src/ops/")
}

/// Loads the model on a new thread and starts serving `jobs` there. Returns once the model is
/// loaded (or failed to load). A lost GPU device (driver reset, GPU unplugged, or
/// `NOMOAT_FAULT_LOSE_DEVICE_AT=N`, which destroys it before the N-th request to test this) ends
/// the request that met it with an error; the engine then opens the device again, reloads the
/// model and goes on with the queue. A panic elsewhere ends its request with an error and
/// only resets the conversation state (`NOMOAT_FAULT_PANIC_AT=N` panics in the N-th request).
/// With `parallel` over 1, up to that many requests are decoded together (`parallel.rs`); None:
/// as many as pay on the device and fit its memory (`slots.rs`), chosen at the first load.
pub fn start(m: ModelArgs, mut jobs: mpsc::Receiver<Job>, stats: Arc<Stats>, mut parallel: Option<usize>) -> Result<ModelInfo> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<ModelInfo>>();
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse().ok());
    let fault_at = Faults { lose_device_at: env("NOMOAT_FAULT_LOSE_DEVICE_AT"), panic_at: env("NOMOAT_FAULT_PANIC_AT"), gpu_panic_at: env("NOMOAT_FAULT_GPU_PANIC_AT") };
    install_panic_hook();
    std::thread::Builder::new().name("nomoat-engine".into()).spawn(move || {
        let mut ready = Some(ready_tx);
        loop {
            match load_and_serve(&m, &mut jobs, &stats, &mut ready, fault_at, &mut parallel) {
                Ended::Stopped => return,
                Ended::DeviceLost(e) => eprintln!("nomoat serve: {e}; opening the device again and reloading the model"),
                Ended::LoadFailed(e) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    // after a device loss: answer the next request with the reason, then retry
                    eprintln!("nomoat serve: reloading failed: {e:#}");
                    match jobs.blocking_recv() {
                        Some(job) => {
                            let _ = job.events.send(Event::Error(format!("the GPU is unavailable: {e:#}")));
                        }
                        None => return,
                    }
                }
            }
        }
    })?;
    ready_rx.recv().map_err(|_| anyhow!("the engine thread stopped while loading the model"))?
}

enum Ended {
    /// Every sender is gone: the server is shutting down.
    Stopped,
    DeviceLost(String),
    LoadFailed(anyhow::Error),
}

fn load_and_serve(
    m: &ModelArgs,
    jobs: &mut mpsc::Receiver<Job>,
    stats: &Stats,
    ready: &mut Option<std::sync::mpsc::Sender<Result<ModelInfo>>>,
    fault_at: Faults,
    parallel: &mut Option<usize>,
) -> Ended {
    let Loaded { tokenizer, gguf, gpu, model, adapters, sampling: model_sampling, .. } = match load(m, true) {
        Ok(l) => l,
        Err(e) => return Ended::LoadFailed(e),
    };
    let n_ctx = m.n_ctx_for(model.config.n_ctx_train);
    // the first load chooses; a reload after a device loss keeps the count
    let chosen = parallel.is_none().then(|| super::slots::choose_for(&gpu, &model.config, n_ctx, kv_type(m), m.max_gpu_memory.map(|m| m << 20)));
    let n_slots = *parallel.get_or_insert_with(|| chosen.as_ref().map_or(1, |c| c.n));
    let mut session = match pollster::block_on(Session::with_slots(&model, &gpu, n_ctx, kv_type(m), n_slots.max(1))) {
        Ok(s) => s,
        Err(e) => return Ended::LoadFailed(anyhow!(e)),
    };
    // prompt lookup on the one-sequence path (generate_guided); steps of several never draft
    session.lookup = m.lookup(&gpu);
    // Warm-up: builds every pipeline a request uses (prompt batch, single-token step, GPU
    // argmax, logits read-back) so that the first client does not wait for it.
    let t = std::time::Instant::now();
    let warm = pollster::block_on(async {
        session.eval(&[1, 2]).await?;
        session.eval(&[3]).await?;
        session.top_k(1).await?;
        session.logits().await?;
        if session.n_slots() > 1 {
            // a step of two sequences: the SEQ_ROWS kernels
            session.select_slot(1);
            session.eval(&[1]).await?;
            session.step_slots(&[SlotStep { slot: 0, token: 4, want: Want::TopK(1) }, SlotStep { slot: 1, token: 2, want: Want::Logits }]).await?;
            session.reset();
            session.select_slot(0);
        }
        Ok::<(), ModelError>(())
    });
    session.reset();
    if let Err(e) = warm {
        return Ended::LoadFailed(anyhow!(e).context("warming up the model"));
    }
    eprintln!("nomoat serve: warmed up in {:.1} s", t.elapsed().as_secs_f64());
    stats.counters.slots.store(session.n_slots(), Ordering::Relaxed);
    stats.counters.kv_capacity.store(session.n_slots() * n_ctx, Ordering::Relaxed);
    stats.counters.kv_tokens.store(0, Ordering::Relaxed);
    stats.gpu_bytes.store(gpu.buffer_memory().unwrap_or(-1), Ordering::Relaxed);
    let tokenizer = Arc::new(tokenizer);
    // the HTTP side keeps what the first load told it; a reload after a device loss only
    // rebuilds the GPU state
    if let Some(tx) = ready.take() {
        let template = match ChatTemplate::from_gguf(&gguf) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err("this model has no chat template (tokenizer.chat_template is missing from the GGUF; a base model?), so /v1/chat/completions cannot format messages; use /v1/completions with a raw prompt".to_string()),
            Err(e) => Err(format!("the model's chat template cannot be used: {e}")),
        };
        let adapter_info = adapters.iter().map(|(a, s)| (a.name.clone(), *s, a.pairs.values().next().map(|p| p.rank).unwrap_or(0), a.bytes)).collect();
        for note in &model_sampling.ignored {
            eprintln!("nomoat serve: warning: {note}");
        }
        if let Some(used) = model_sampling.describe() {
            eprintln!("nomoat serve: requests default to the model's recommended {used}");
        }
        let sampling = model_sampling.defaults();
        let info = ModelInfo {
            tokenizer: tokenizer.clone(),
            template,
            n_ctx,
            n_ctx_train: model.config.n_ctx_train,
            n_vocab: model.config.n_vocab,
            device: gpu.describe(),
            adapters: adapter_info,
            sampling,
            slots: session.n_slots(),
            slots_why: chosen.map(|c| c.why),
        };
        if tx.send(Ok(info)).is_err() {
            return Ended::Stopped;
        }
    }
    let fault = |served: u64| {
        if fault_at.lose_device_at == Some(served + 1) {
            eprintln!("nomoat serve: NOMOAT_FAULT_LOSE_DEVICE_AT={}: destroying the GPU device", served + 1);
            gpu.device.destroy();
            // the loss is reported from the device's next poll, as a driver's would be
            let _ = gpu.device.poll(wgpu::PollType::Poll);
        }
    };
    let ended = if session.n_slots() > 1 {
        super::parallel::run(&mut session, &tokenizer, &adapters, jobs, stats, &fault, fault_at)
    } else {
        run(&mut session, &tokenizer, &adapters, jobs, stats, &fault, fault_at)
    };
    match ended {
        None => Ended::Stopped,
        Some(e) => Ended::DeviceLost(e),
    }
}

/// Serves jobs until the channel closes (None) or the device is lost (Some(why)).
fn run(
    session: &mut Session<'_>,
    tokenizer: &Tokenizer,
    loaded: &[(Arc<LoraAdapter>, f32)],
    jobs: &mut mpsc::Receiver<Job>,
    stats: &Stats,
    fault: &dyn Fn(u64),
    faults: Faults,
) -> Option<String> {
    while let Some(mut job) = jobs.blocking_recv() {
        if job.cancel.load(Ordering::SeqCst) || job.events.is_closed() {
            eprintln!("[#{}] client left before its turn; skipped", job.id);
            continue;
        }
        stats.busy.store(true, Ordering::SeqCst);
        let nth = stats.served.load(Ordering::SeqCst) + 1;
        fault(nth - 1);
        let wanted: Vec<(Arc<LoraAdapter>, f32)> = match &job.adapters {
            None => loaded.to_vec(),
            Some(list) => list.iter().map(|(i, s)| (loaded[*i].0.clone(), *s)).collect(),
        };
        PANIC_FILE.with(|f| f.borrow_mut().take());
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pollster::block_on(session.set_adapters(wanted))?;
            let cancelled = || job.cancel.load(Ordering::SeqCst) || job.events.is_closed();
            let mut on_text = |piece: &str| -> bool { !cancelled() && job.events.send(Event::Text(piece.to_string())).is_ok() };
            let device = session.gpu.device.clone();
            let mut on_step = |step: usize| {
                stats.counters.rate.add(1);
                faults.in_step(&device, nth, step);
            };
            pollster::block_on(session.generate_guided(tokenizer, &job.prompt, &job.opts, &mut job.guide, &mut on_text, &cancelled, &mut on_step))
        }));
        stats.busy.store(false, Ordering::SeqCst);
        stats.served.fetch_add(1, Ordering::Relaxed);
        let panic_file = PANIC_FILE.with(|f| f.borrow_mut().take());
        // A lost device, or a panic inside the GPU layer (which leaves it in an unknown state),
        // ends this request, and the caller then opens the device again. Any other failure ends
        // only this request: the conversation state is dropped and the engine goes on.
        let mut lost = match (&result, session.gpu.check_lost()) {
            (_, Err(e)) => Some(e.to_string()),
            (Ok(Err(ModelError::Gpu(e @ GpuError::DeviceLost(_)))), Ok(())) => Some(e.to_string()),
            (Err(_), Ok(())) if panic_file.as_deref().is_some_and(gpu_layer_panic) => {
                Some(format!("the GPU layer panicked (at {})", panic_file.as_deref().unwrap_or("?")))
            }
            _ => None,
        };
        let event = match result {
            _ if lost.is_some() => {
                let why = lost.clone().unwrap_or_default();
                eprintln!("[#{}] failed: {why}", job.id);
                Event::Error(format!("{why}; the server is opening the device again: retry the request"))
            }
            Ok(Ok(g)) => {
                let masks = if g.mask_seconds > 0.0 { format!(" ({:.1} ms computing masks)", g.mask_seconds * 1e3) } else { String::new() };
                eprintln!(
                    "[#{}] {} prompt tokens ({} reused) at {:.1} tok/s, {} generated at {:.1} tok/s{masks}, {}",
                    job.id,
                    g.prompt_tokens,
                    g.reused_tokens,
                    g.prompt_tps(),
                    g.tokens.len(),
                    g.gen_tps(),
                    g.finish.as_str()
                );
                stats.count(&g);
                Event::Done(Outcome {
                    completion_tokens: g.tokens.len(),
                    cached_tokens: g.reused_tokens,
                    finish: g.finish,
                    logprobs: std::mem::take(&mut job.guide.logprobs),
                })
            }
            Ok(Err(e)) => {
                eprintln!("[#{}] generation failed: {e}", job.id);
                session.reset();
                Event::Error(format!("generation failed: {e}"))
            }
            Err(panic) => {
                let msg =
                    panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown panic".into());
                eprintln!("[#{}] generation panicked at {}: {msg}; the conversation state is reset", job.id, panic_file.as_deref().unwrap_or("?"));
                session.reset();
                // the GPU state should be untouched; make sure before the next request
                if let Err(why) = probe(session) {
                    lost = Some(format!("the GPU no longer answers after a panic ({why})"));
                }
                Event::Error(format!("internal error during generation: {msg}"))
            }
        };
        let _ = job.events.send(event);
        if lost.is_some() {
            return lost;
        }
        stats.gpu_bytes.store(session.gpu.buffer_memory().unwrap_or(-1), Ordering::Relaxed);
        stats.counters.kv_tokens.store(session.tokens.len(), Ordering::Relaxed);
    }
    None
}

/// Whether the engine thread's last panic came from the GPU layer: Some(where) if so.
pub(super) fn gpu_layer_panic_now() -> Option<String> {
    PANIC_FILE.with(|f| f.borrow_mut().take()).filter(|file| gpu_layer_panic(file))
}

/// One token through the model, to tell whether the GPU state still works.
pub(super) fn probe(session: &mut Session<'_>) -> Result<(), String> {
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| pollster::block_on(session.eval_top_k(&[0], 1))));
    session.reset();
    match r {
        Ok(Ok(_)) => session.gpu.check_lost().map_err(|e| e.to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("it panicked".to_string()),
    }
}
