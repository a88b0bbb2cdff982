//! The engine thread: owns the GPU, the model and one [`Session`], and runs queued requests one
//! at a time, first come first served. The same session serves every request, so a prompt that
//! shares a prefix with the previous one (the same system prompt, a conversation's earlier
//! turns) only evaluates what differs.

use crate::{kv_type, load, Loaded, ModelArgs};
use anyhow::{anyhow, Result};
use nomoat_runtime::chat::ChatTemplate;
use nomoat_runtime::generate::{FinishReason, GenerateOptions};
use nomoat_runtime::lora::LoraAdapter;
use nomoat_runtime::model::Session;
use nomoat_runtime::tokenizer::Tokenizer;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// One request for the engine.
pub struct Job {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
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
    pub finish: FinishReason,
}

/// What the HTTP side needs from the loaded model.
pub struct ModelInfo {
    pub tokenizer: Arc<Tokenizer>,
    /// Err: why chat requests cannot be served (no template, or one that does not compile).
    pub template: Result<ChatTemplate, String>,
    pub n_ctx: usize,
    pub n_ctx_train: usize,
    pub device: String,
    /// Adapters loaded at start: (name, default scale, rank of the first pair, bytes).
    pub adapters: Vec<(String, f32, u32, u64)>,
}

/// Counters /health reports.
#[derive(Default)]
pub struct Stats {
    pub busy: AtomicBool,
    pub served: AtomicU64,
}

/// Loads the model on a new thread and starts serving `jobs` there. Returns once the model is
/// loaded (or failed to load).
pub fn start(m: ModelArgs, jobs: mpsc::Receiver<Job>, stats: Arc<Stats>) -> Result<ModelInfo> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<ModelInfo>>();
    std::thread::Builder::new().name("nomoat-engine".into()).spawn(move || {
        let fail = |e: anyhow::Error| {
            let _ = ready_tx.send(Err(e));
        };
        let Loaded { tokenizer, gguf, gpu, model, adapters } = match load(&m, true) {
            Ok(l) => l,
            Err(e) => return fail(e),
        };
        let template = match ChatTemplate::from_gguf(&gguf) {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err("this model has no chat template (tokenizer.chat_template is missing from the GGUF; a base model?), so /v1/chat/completions cannot format messages; use /v1/completions with a raw prompt".to_string()),
            Err(e) => Err(format!("the model's chat template cannot be used: {e}")),
        };
        drop(gguf);
        let n_ctx = m.ctx_size.min(model.config.n_ctx_train);
        let mut session = match pollster::block_on(Session::new(&model, &gpu, n_ctx, kv_type(&m), false)) {
            Ok(s) => s,
            Err(e) => return fail(anyhow!(e)),
        };
        // Warm-up: builds every pipeline a request uses (prompt batch, single-token step, GPU
        // argmax, logits read-back) so that the first client does not wait for it.
        let t = std::time::Instant::now();
        let warm = pollster::block_on(async {
            session.eval(&[1, 2]).await?;
            session.eval(&[3]).await?;
            session.top_k(1).await?;
            session.logits().await.map(|_| ())
        });
        session.reset();
        if let Err(e) = warm {
            return fail(anyhow!(e).context("warming up the model"));
        }
        eprintln!("nomoat serve: warmed up in {:.1} s", t.elapsed().as_secs_f64());
        let tokenizer = Arc::new(tokenizer);
        let adapter_info = adapters
            .iter()
            .map(|(a, s)| (a.name.clone(), *s, a.pairs.values().next().map(|p| p.rank).unwrap_or(0), a.bytes))
            .collect();
        let info = ModelInfo { tokenizer: tokenizer.clone(), template, n_ctx, n_ctx_train: model.config.n_ctx_train, device: gpu.describe(), adapters: adapter_info };
        if ready_tx.send(Ok(info)).is_err() {
            return;
        }
        run(&mut session, &tokenizer, &adapters, jobs, &stats);
    })?;
    ready_rx.recv().map_err(|_| anyhow!("the engine thread stopped while loading the model"))?
}

fn run(session: &mut Session<'_>, tokenizer: &Tokenizer, loaded: &[(Arc<LoraAdapter>, f32)], mut jobs: mpsc::Receiver<Job>, stats: &Stats) {
    while let Some(job) = jobs.blocking_recv() {
        if job.cancel.load(Ordering::SeqCst) || job.events.is_closed() {
            eprintln!("[#{}] client left before its turn; skipped", job.id);
            continue;
        }
        stats.busy.store(true, Ordering::SeqCst);
        let wanted: Vec<(Arc<LoraAdapter>, f32)> = match &job.adapters {
            None => loaded.to_vec(),
            Some(list) => list.iter().map(|(i, s)| (loaded[*i].0.clone(), *s)).collect(),
        };
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            pollster::block_on(session.set_adapters(wanted))?;
            let mut on_text = |piece: &str| -> bool {
                !job.cancel.load(Ordering::SeqCst) && job.events.send(Event::Text(piece.to_string())).is_ok()
            };
            pollster::block_on(session.generate(tokenizer, &job.prompt, &job.opts, &mut on_text))
        }));
        stats.busy.store(false, Ordering::SeqCst);
        stats.served.fetch_add(1, Ordering::Relaxed);
        let event = match result {
            Ok(Ok(g)) => {
                eprintln!(
                    "[#{}] {} prompt tokens ({} reused) at {:.1} tok/s, {} generated at {:.1} tok/s, {}",
                    job.id,
                    g.prompt_tokens,
                    g.reused_tokens,
                    g.prompt_tps(),
                    g.tokens.len(),
                    g.gen_tps(),
                    g.finish.as_str()
                );
                Event::Done(Outcome { completion_tokens: g.tokens.len(), finish: g.finish })
            }
            Ok(Err(e)) => {
                eprintln!("[#{}] generation failed: {e}", job.id);
                session.reset();
                Event::Error(format!("generation failed: {e}"))
            }
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                eprintln!("[#{}] generation panicked: {msg}", job.id);
                session.reset();
                Event::Error(format!("internal error during generation: {msg}"))
            }
        };
        let _ = job.events.send(event);
    }
}
