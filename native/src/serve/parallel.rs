//! `nomoat serve --parallel N`: up to N requests decoded together, one forward pass a step for
//! all of them (`Session::step_slots`), each in its own slot of the KV cache. Between steps the
//! scheduler admits queued requests into free slots (the free slot whose cache shares the
//! longest prefix with the prompt, else the one used least recently), prefills one prompt
//! chunk (MAX_BATCH tokens) between decode steps so a long prompt does not stall the others,
//! and frees a slot as soon as its client leaves.
//!
//! Adapters apply to a whole forward pass, so requests are grouped by adapter set: one that
//! wants another set waits until the running ones finish, then the set changes (which clears
//! every slot's cache). Requests whose step is not a plain one-token sample (a grammar, logit
//! bias, log-probabilities, forced tokens) take their step alone on their slot, between the
//! batched ones.

use super::engine::{gpu_layer_panic_now, probe, Event, Faults, Job, Outcome, Stats};
use nomoat_runtime::device::GpuError;
use nomoat_runtime::error::ModelError;
use nomoat_runtime::generate::{Generation, Steps};
use nomoat_runtime::lora::LoraAdapter;
use nomoat_runtime::ops::MAX_SEQ_ROWS;
use nomoat_runtime::session::{RowOut, Session, SlotStep, Want, MAX_BATCH};
use nomoat_runtime::tokenizer::Tokenizer;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::{self, error::TryRecvError};

/// A request in a slot.
struct Seq {
    job: Job,
    slot: usize,
    /// The engine's count of this request (the fault hooks').
    nth: u64,
    start: Instant,
    /// Prompt tokens found in the slot's cache.
    reused: usize,
    /// Before the first token: the prompt is still being fed.
    prefill: Option<nomoat_runtime::sampler::Sampler>,
    /// After it: the generation, and what to feed next.
    steps: Option<Steps>,
    feed: Vec<u32>,
}

impl Seq {
    fn cancelled(&self) -> bool {
        self.job.cancel.load(Ordering::SeqCst) || self.job.events.is_closed()
    }
}

/// What ended a request's turn in a step.
enum Turn {
    Continue,
    Done(Generation),
    Failed(ModelError),
}

/// Serves jobs with up to `session.n_slots()` of them decoded together, until the channel
/// closes (None) or the device is lost (Some(why)).
pub(super) fn run(
    session: &mut Session<'_>,
    tokenizer: &Tokenizer,
    loaded: &[(Arc<LoraAdapter>, f32)],
    jobs: &mut mpsc::Receiver<Job>,
    stats: &Stats,
    fault: &dyn Fn(u64),
    faults: Faults,
) -> Option<String> {
    let mut active: Vec<Seq> = Vec::new();
    // a request waiting for the running ones to finish, to change the adapter set
    let mut waiting: Option<Job> = None;
    // when each slot was last given out, for least-recently-used reuse
    let mut last_used = vec![0u64; session.n_slots()];
    let mut clock = 0u64;
    let mut closed = false;
    loop {
        // admit requests into free slots
        while active.len() < session.n_slots() {
            let job = match waiting.take() {
                Some(j) if active.is_empty() => j,
                Some(j) => {
                    waiting = Some(j);
                    break;
                }
                None if closed => break,
                None if active.is_empty() => jobs.blocking_recv()?,
                None => match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                },
            };
            if job.cancel.load(Ordering::SeqCst) || job.events.is_closed() {
                eprintln!("[#{}] client left before its turn; skipped", job.id);
                continue;
            }
            let wanted: Vec<(Arc<LoraAdapter>, f32)> = match &job.adapters {
                None => loaded.to_vec(),
                Some(list) => list.iter().map(|(i, s)| (loaded[*i].0.clone(), *s)).collect(),
            };
            let same = wanted.len() == session.adapters().len() && wanted.iter().zip(session.adapters()).all(|((a, s), (b, t))| Arc::ptr_eq(a, b) && s == t);
            if !same && !active.is_empty() {
                waiting = Some(job);
                break;
            }
            let nth = stats.served.load(Ordering::SeqCst) + active.len() as u64 + 1;
            fault(nth - 1);
            if let Err(e) = pollster::block_on(session.set_adapters(wanted)) {
                if let Some(lost) = lost_device(session, &e) {
                    let _ = job.events.send(Event::Error(format!("{lost}; the server is opening the device again: retry the request")));
                    return Some(lost);
                }
                let _ = job.events.send(Event::Error(format!("generation failed: {e}")));
                continue;
            }
            let slot = pick_slot(session, &active, &last_used, &job.prompt);
            clock += 1;
            last_used[slot] = clock;
            active.push(Seq { job, slot, nth, start: Instant::now(), reused: 0, prefill: None, steps: None, feed: Vec::new() });
        }
        if active.is_empty() {
            if closed && waiting.is_none() {
                return None;
            }
            continue;
        }
        stats.busy.store(true, Ordering::SeqCst);
        stats.counters.running.store(active.len(), Ordering::Relaxed);
        let mut sampled = 0;
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| step(session, tokenizer, &mut active, faults, &mut sampled)));
        stats.counters.rate.add(sampled);
        let turns = match result {
            Ok(turns) => turns,
            Err(panic) => {
                let msg =
                    panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown panic".into());
                let in_gpu_layer = gpu_layer_panic_now();
                eprintln!("generation panicked: {msg}; the requests in progress end, their slots are reset");
                let lost = if in_gpu_layer.is_some() || session.gpu.check_lost().is_err() {
                    Some(format!("the GPU layer panicked (at {})", in_gpu_layer.unwrap_or_default()))
                } else {
                    probe(session).err().map(|why| format!("the GPU no longer answers after a panic ({why})"))
                };
                // as one request at a time says it (engine.rs): a retry is served once reloaded
                let error = match &lost {
                    Some(why) => format!("{why}; the server is opening the device again: retry the request"),
                    None => format!("internal error during generation: {msg}"),
                };
                for seq in active.drain(..) {
                    session.select_slot(seq.slot);
                    session.reset();
                    ended(stats, 0);
                    let _ = seq.job.events.send(Event::Error(error.clone()));
                }
                if lost.is_some() {
                    return lost;
                }
                continue;
            }
        };
        // report what ended, free those slots
        let mut lost = None;
        let mut i = 0;
        for turn in turns {
            match turn {
                Turn::Continue => {
                    i += 1;
                    continue;
                }
                Turn::Done(g) => {
                    let mut seq = active.remove(i);
                    eprintln!(
                        "[#{}] slot {}: {} prompt tokens ({} reused) at {:.1} tok/s, {} generated at {:.1} tok/s, {}",
                        seq.job.id,
                        seq.slot,
                        g.prompt_tokens,
                        g.reused_tokens,
                        g.prompt_tps(),
                        g.tokens.len(),
                        g.gen_tps(),
                        g.finish.as_str()
                    );
                    let logprobs = std::mem::take(&mut seq.job.guide.logprobs);
                    stats.count(&g);
                    ended(stats, active.len());
                    let outcome = Outcome { completion_tokens: g.tokens.len(), cached_tokens: g.reused_tokens, finish: g.finish, logprobs };
                    let _ = seq.job.events.send(Event::Done(outcome));
                }
                Turn::Failed(e) => {
                    let seq = active.remove(i);
                    ended(stats, active.len());
                    let why = lost_device(session, &e);
                    eprintln!("[#{}] generation failed: {e}", seq.job.id);
                    session.select_slot(seq.slot);
                    session.reset();
                    let msg = match &why {
                        Some(w) => format!("{w}; the server is opening the device again: retry the request"),
                        None => format!("generation failed: {e}"),
                    };
                    let _ = seq.job.events.send(Event::Error(msg));
                    lost = lost.or(why);
                }
            }
        }
        if let Some(why) = lost {
            for seq in active.drain(..) {
                let _ = seq.job.events.send(Event::Error(format!("{why}; the server is opening the device again: retry the request")));
            }
            return Some(why);
        }
        let counters = &stats.counters;
        counters.running.store(active.len(), Ordering::Relaxed);
        counters.kv_tokens.store((0..session.n_slots()).map(|s| session.slot_tokens(s).len()).sum(), Ordering::Relaxed);
        if active.is_empty() {
            stats.busy.store(false, Ordering::SeqCst);
            stats.gpu_bytes.store(session.gpu.buffer_memory().unwrap_or(-1), Ordering::Relaxed);
        }
    }
}

/// A request ended, `running` remain: counted before its client hears, so that what the client
/// reads from /metrics next includes it.
fn ended(stats: &Stats, running: usize) {
    stats.served.fetch_add(1, Ordering::Relaxed);
    stats.counters.running.store(running, Ordering::Relaxed);
}

/// Why the device is gone, where it is.
fn lost_device(session: &Session<'_>, e: &ModelError) -> Option<String> {
    match (e, session.gpu.check_lost()) {
        (_, Err(lost)) => Some(lost.to_string()),
        (ModelError::Gpu(lost @ GpuError::DeviceLost(_)), Ok(())) => Some(lost.to_string()),
        _ => None,
    }
}

/// The free slot whose cache shares the longest prefix with `prompt`, else the one given out
/// least recently.
fn pick_slot(session: &Session<'_>, active: &[Seq], last_used: &[u64], prompt: &[u32]) -> usize {
    let shared = |slot: usize| session.slot_tokens(slot).iter().zip(prompt).take_while(|(a, b)| a == b).count();
    (0..session.n_slots())
        .filter(|s| active.iter().all(|a| a.slot != *s))
        .max_by_key(|&s| (shared(s), std::cmp::Reverse(last_used[s])))
        .expect("a free slot when admitting")
}

/// One round: a prompt chunk of one request still prefilling, then a step of every request
/// decoding (the plain one-token ones together, the others alone). Returns each request's turn,
/// in order; `sampled` counts the tokens sampled.
fn step(session: &mut Session<'_>, tokenizer: &Tokenizer, active: &mut [Seq], faults: Faults, sampled: &mut u32) -> Vec<Turn> {
    let mut turns: Vec<Turn> = active.iter().map(|_| Turn::Continue).collect();
    // cancelled requests end at once, freeing their slots
    for (seq, turn) in active.iter_mut().zip(turns.iter_mut()) {
        if seq.cancelled() {
            *turn = Turn::Done(cancelled(seq, tokenizer));
        }
    }
    // one prompt chunk, for the request that has waited longest
    if let Some(i) = (0..active.len()).filter(|&i| matches!(turns[i], Turn::Continue) && active[i].steps.is_none()).min_by_key(|&i| active[i].start) {
        if let Err(e) = pollster::block_on(prefill_chunk(session, tokenizer, &mut active[i], &mut turns[i], sampled)) {
            turns[i] = Turn::Failed(e);
        }
    }
    // the decode step
    let decoding: Vec<usize> = (0..active.len()).filter(|&i| matches!(turns[i], Turn::Continue) && active[i].steps.is_some() && !active[i].feed.is_empty()).collect();
    let (plain, alone): (Vec<usize>, Vec<usize>) = decoding.into_iter().partition(|&i| active[i].feed.len() == 1 && active[i].job.guide.is_empty());
    let top_k_max = session.gpu.tuning.sample_top_k_max as usize;
    for group in plain.chunks(MAX_SEQ_ROWS) {
        let steps: Vec<SlotStep> = group
            .iter()
            .map(|&i| {
                let s = &active[i];
                let want = match s.steps.as_ref().unwrap().sampler.best_logits_needed(top_k_max) {
                    Some(k) => Want::TopK(k as u32),
                    None => Want::Logits,
                };
                SlotStep { slot: s.slot, token: s.feed[0], want }
            })
            .collect();
        match pollster::block_on(session.step_slots(&steps)) {
            Ok(rows) => {
                for (&i, row) in group.iter().zip(rows) {
                    let sampler = &mut active[i].steps.as_mut().unwrap().sampler;
                    let next = match row {
                        RowOut::Best(best) => sampler.sample_top(&best),
                        RowOut::Logits(logits) => sampler.sample(&logits),
                    };
                    turns[i] = take(session, tokenizer, &mut active[i], next, faults, sampled);
                }
            }
            Err(e) => {
                let why = e.to_string();
                turns[group[0]] = Turn::Failed(e);
                for &i in &group[1..] {
                    turns[i] = Turn::Failed(ModelError::Invalid(why.clone()));
                }
            }
        }
    }
    for i in alone {
        let seq = &mut active[i];
        session.select_slot(seq.slot);
        let feed = std::mem::take(&mut seq.feed);
        let steps = seq.steps.as_mut().unwrap();
        turns[i] = match pollster::block_on(session.eval_sample_guided(&feed, &mut steps.sampler, &mut seq.job.guide)) {
            Ok(next) => take(session, tokenizer, seq, next, faults, sampled),
            Err(e) => Turn::Failed(e),
        };
    }
    turns
}

/// The next MAX_BATCH tokens of `seq`'s prompt into its slot, or the last ones with the first
/// token sampled after them.
async fn prefill_chunk(session: &mut Session<'_>, tokenizer: &Tokenizer, seq: &mut Seq, turn: &mut Turn, sampled: &mut u32) -> Result<(), ModelError> {
    session.select_slot(seq.slot);
    let prompt = &seq.job.prompt;
    if seq.prefill.is_none() {
        seq.prefill = Some(session.prompt_sampler(prompt, &seq.job.opts, &seq.job.guide)?);
        if prompt.is_empty() {
            return Err(ModelError::Invalid("the prompt has no tokens".into()));
        }
        seq.reused = session.keep_prefix_of(prompt);
    }
    let rest = prompt.len() - session.tokens.len();
    if rest > MAX_BATCH {
        let at = session.tokens.len();
        return session.eval(&prompt[at..at + MAX_BATCH]).await;
    }
    let mut sampler = seq.prefill.take().unwrap();
    let cancel = seq.job.cancel.clone();
    let events = seq.job.events.clone();
    let client_left = move || cancel.load(Ordering::SeqCst) || events.is_closed();
    let (_, first) = session.feed_prompt(prompt, &mut sampler, &mut seq.job.guide, &client_left).await?;
    let steps = Steps::new(tokenizer, &seq.job.opts, sampler, prompt.len(), seq.reused, seq.start.elapsed().as_secs_f64());
    seq.steps = Some(steps);
    *turn = match first {
        Some(next) => take(session, tokenizer, seq, next, Faults::default(), sampled),
        None => Turn::Done(cancelled(seq, tokenizer)),
    };
    Ok(())
}

/// `next`, sampled after `seq`'s last feed, into its generation (counted in `sampled`): streams
/// its text and sets the next feed, or ends the request.
fn take(session: &Session<'_>, tokenizer: &Tokenizer, seq: &mut Seq, next: u32, faults: Faults, sampled: &mut u32) -> Turn {
    *sampled += 1;
    let job = &mut seq.job;
    let steps = seq.steps.as_mut().unwrap();
    let (cancel, events) = (job.cancel.clone(), job.events.clone());
    let cancelled = || cancel.load(Ordering::SeqCst) || events.is_closed();
    let mut on_text = |piece: &str| -> bool { !cancelled() && events.send(Event::Text(piece.to_string())).is_ok() };
    let nth = seq.nth;
    let mut on_step = |step: usize| faults.in_step(&session.gpu.device, nth, step);
    let cache_len = session.slot_tokens(seq.slot).len();
    match steps.advance(tokenizer, next, &mut job.guide, cache_len, session.n_ctx, &mut on_text, &cancelled, &mut on_step) {
        Ok(Some(feed)) => {
            seq.feed = feed;
            Turn::Continue
        }
        Ok(None) => Turn::Done(end(seq, tokenizer)),
        Err(e) => Turn::Failed(e),
    }
}

/// The finished request's generation.
fn end(seq: &mut Seq, tokenizer: &Tokenizer) -> Generation {
    let job = &mut seq.job;
    let events = job.events.clone();
    let mut on_text = |piece: &str| -> bool { events.send(Event::Text(piece.to_string())).is_ok() };
    match seq.steps.take() {
        Some(steps) => steps.finish(&mut job.guide, &mut on_text),
        None => cancelled(seq, tokenizer),
    }
}

/// The generation of a request whose client left: what it had, nothing more emitted.
fn cancelled(seq: &mut Seq, tokenizer: &Tokenizer) -> Generation {
    match seq.steps.take() {
        Some(steps) => steps.cancelled(),
        None => {
            let job = &seq.job;
            Steps::new(tokenizer, &job.opts, nomoat_runtime::sampler::Sampler::new(job.opts.sampler.clone()), job.prompt.len(), seq.reused, 0.0).cancelled()
        }
    }
}
