//! Text generation and perplexity on top of a [`Session`]: prompt in blocks, then one token per
//! submission, sampled on the GPU (greedy) or on the CPU from read-back logits; text streamed
//! in whole UTF-8 pieces, stopped by end-of-generation tokens, stop strings or the token budget.

use crate::chat::StopMatcher;
use crate::constrain::{Guide, TokenLogprob};
use crate::error::ModelError;
use crate::lookup::LookupStats;
use crate::sampler::{Sampler, SamplerConfig};
use crate::session::{Session, MAX_BATCH};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use web_time::Instant;

/// How a generation samples and when it ends.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// The most tokens to generate (the context's end also stops it).
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampler: SamplerConfig,
    /// Strings that end the reply where they appear (left out of the text).
    pub stop: Vec<String>,
    /// Stop at the model's end-of-generation tokens (EOS, end of turn).
    pub stop_at_eog: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { max_tokens: 256, sampler: SamplerConfig::default(), stop: Vec::new(), stop_at_eog: true }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// The token budget or the context ran out.
    Length,
    /// The caller's callback asked to stop.
    Cancelled,
}

impl FinishReason {
    /// OpenAI's name for it: `stop`, `length` or `cancelled`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

/// A finished generation: its tokens, text, why it ended, and timings.
#[derive(Clone, Debug)]
pub struct Generation {
    /// The generated token ids (the prompt's not included).
    pub tokens: Vec<u32>,
    /// Their text, stop string left out.
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Prompt tokens found already in the KV cache (shared prefix), not evaluated again.
    pub reused_tokens: usize,
    /// Time spent on the prompt, in seconds.
    pub prompt_seconds: f64,
    /// Time spent generating after the prompt, in seconds.
    pub gen_seconds: f64,
    /// Of gen_seconds, the time spent computing constraint masks.
    pub mask_seconds: f64,
    /// Prompt-lookup decoding's passes, drafted and accepted tokens (all 0 where it was off).
    pub lookup: LookupStats,
}

impl Generation {
    /// Prompt tokens evaluated (reused ones left out) per second.
    pub fn prompt_tps(&self) -> f64 {
        (self.prompt_tokens - self.reused_tokens) as f64 / self.prompt_seconds.max(1e-9)
    }
    /// Generated tokens per second.
    pub fn gen_tps(&self) -> f64 {
        self.tokens.len() as f64 / self.gen_seconds.max(1e-9)
    }
}

impl Session<'_> {
    /// Make the cache hold exactly `prompt`, evaluating only what differs from what it holds,
    /// and sample the token after it (eval_sample: in the prompt's last submission), in the
    /// batches of MAX_BATCH eval_sample takes, asking `cancelled` before each. Returns how many
    /// tokens were reused, and that token (none when `cancelled` said stop), sampled under
    /// `guide` where it constrains. At least one token is always evaluated, so the logits
    /// belong to the prompt's last token.
    pub async fn feed_prompt(
        &mut self,
        prompt: &[u32],
        sampler: &mut Sampler,
        guide: &mut Guide,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(usize, Option<u32>), ModelError> {
        if prompt.is_empty() {
            return Err(ModelError::Invalid("the prompt has no tokens".into()));
        }
        let shared = self.keep_prefix_of(prompt);
        let rest = &prompt[shared..];
        let last = (rest.len() - 1) / MAX_BATCH * MAX_BATCH;
        for batch in rest[..last].chunks(MAX_BATCH) {
            if cancelled() {
                return Ok((shared, None));
            }
            self.eval(batch).await?;
        }
        if cancelled() {
            return Ok((shared, None));
        }
        let id = if guide.is_empty() { self.eval_sample(&rest[last..], sampler).await? } else { self.eval_sample_guided(&rest[last..], sampler, guide).await? };
        Ok((shared, Some(id)))
    }

    /// Generate after `prompt`, calling `on_text` with each piece of text as it decodes; it
    /// returns false to stop.
    pub async fn generate(
        &mut self,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, ModelError> {
        self.generate_until(tokenizer, prompt, opts, on_text, &|| false, &mut |_| {}).await
    }

    /// `generate`, asking `cancelled` between prompt batches and before every decoding step (a
    /// client that leaves while text is held back, by a stop string that may be starting or a
    /// character not yet complete, is noticed at once), and calling `on_step` with each step's
    /// number. A cancelled generation emits nothing more.
    pub async fn generate_until(
        &mut self,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: &mut dyn FnMut(&str) -> bool,
        cancelled: &dyn Fn() -> bool,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Generation, ModelError> {
        self.generate_guided(tokenizer, prompt, opts, &mut Guide::default(), on_text, cancelled, on_step).await
    }

    /// `generate_until` steered by `guide`: each token is sampled from those its constraint
    /// allows (logit bias added first), the tokens the grammar forces are fed without sampling
    /// (several in one batch), and the reply ends where the grammar is complete or the model
    /// takes the end token the grammar allows there.
    #[allow(clippy::too_many_arguments)]
    pub async fn generate_guided(
        &mut self,
        tokenizer: &Tokenizer,
        prompt: &[u32],
        opts: &GenerateOptions,
        guide: &mut Guide,
        on_text: &mut dyn FnMut(&str) -> bool,
        cancelled: &dyn Fn() -> bool,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Generation, ModelError> {
        let start = Instant::now();
        let mut sampler = self.prompt_sampler(prompt, opts, guide)?;
        // the first sample comes with the prompt's GPU work, so it belongs to the prompt's time
        let (reused, first) = self.feed_prompt(prompt, &mut sampler, guide, cancelled).await?;
        let mut steps = Steps::new(tokenizer, opts, sampler, prompt.len(), reused, start.elapsed().as_secs_f64());
        let Some(mut next) = first else { return Ok(steps.cancelled()) };
        // prompt-lookup drafts: unguided only, greedy or sampled (see crate::lookup)
        let lookup = self.lookup.is_on() && guide.is_empty();
        let mut history = if lookup { prompt.to_vec() } else { Vec::new() };
        // after a pass that keeps under half its draft, no drafts for 2, 4, .. 32 steps (the
        // reply is not copying: a pass costs several steps on devices without spare compute)
        let (mut misses, mut cooldown) = (0u32, 0usize);
        'steps: while let Some(feed) = steps.advance(tokenizer, next, guide, self.tokens.len(), self.n_ctx, on_text, cancelled, on_step)? {
            if lookup {
                history.extend_from_slice(&feed);
            }
            if lookup && cooldown > 0 {
                cooldown -= 1;
            } else if lookup {
                // no draft past the context or the token budget
                let room = self.n_ctx.saturating_sub(self.tokens.len() + feed.len());
                let budget = steps.opts.max_tokens.saturating_sub(steps.out.tokens.len());
                let draft = self.lookup.draft(&history, room.min(budget));
                if !draft.is_empty() {
                    let base = self.tokens.len() + feed.len();
                    let ids = [feed.as_slice(), &draft].concat();
                    let want = crate::lookup::want(&steps.sampler, &draft, self.gpu.tuning.sample_top_k_max as usize);
                    let rows = self.eval_each(&ids, want).await?;
                    let (n_ok, pick) = crate::lookup::accept(&mut steps.sampler, &draft, &rows[feed.len() - 1..]);
                    steps.out.lookup.passes += 1;
                    steps.out.lookup.drafted += draft.len();
                    steps.out.lookup.accepted += n_ok;
                    if 2 * n_ok < draft.len() {
                        misses = (misses + 1).min(5);
                        cooldown = 1 << misses;
                    } else {
                        misses = 0;
                    }
                    self.truncate(base + n_ok);
                    for (j, &d) in draft[..n_ok].iter().enumerate() {
                        // each accepted token as plain decoding takes it, the cache then
                        // holding what it held there
                        match steps.advance(tokenizer, d, guide, base + j, self.n_ctx, on_text, cancelled, on_step)? {
                            Some(f) => history.extend_from_slice(&f),
                            None => {
                                self.truncate(base + j);
                                break 'steps;
                            }
                        }
                    }
                    next = pick;
                    continue;
                }
            }
            next = self.eval_sample_guided(&feed, &mut steps.sampler, guide).await?;
        }
        Ok(steps.finish(guide, on_text))
    }

    /// The sampler of a generation after `prompt` (which its penalties remember), once the
    /// options and the guide's logit bias are checked.
    pub fn prompt_sampler(&self, prompt: &[u32], opts: &GenerateOptions, guide: &Guide) -> Result<Sampler, ModelError> {
        opts.sampler.validate().map_err(ModelError::Invalid)?;
        let n_vocab = self.model.config.n_vocab;
        if let Some(&(id, _)) = guide.logit_bias.iter().find(|(id, _)| *id as usize >= n_vocab) {
            return Err(ModelError::Invalid(format!("logit_bias names token {id}, outside the vocabulary of {n_vocab}")));
        }
        let mut sampler = Sampler::new(opts.sampler.clone());
        for &t in prompt {
            sampler.accept(t);
        }
        Ok(sampler)
    }
}

/// A generation after its prompt, a step at a time: `generate_guided` runs one alone, the
/// server's scheduler several together (each step's forward pass then shared). Each step
/// takes the token sampled after the last and says what to feed next, or that the reply ended.
pub struct Steps {
    /// Samples each token; it has seen the prompt and every token so far (penalties).
    pub sampler: Sampler,
    emitter: Emitter,
    out: Generation,
    gen_start: Instant,
    by_stop_string: bool,
    step: usize,
    eog: Vec<u32>,
    opts: GenerateOptions,
}

impl Steps {
    /// A generation about to start, the prompt (`prompt_tokens` of them, `reused_tokens` found
    /// in the cache) done in `prompt_seconds`.
    pub fn new(tokenizer: &Tokenizer, opts: &GenerateOptions, sampler: Sampler, prompt_tokens: usize, reused_tokens: usize, prompt_seconds: f64) -> Steps {
        Steps {
            sampler,
            emitter: Emitter { decoder: StreamDecoder::new(true), stops: StopMatcher::new(opts.stop.clone()) },
            out: Generation {
                tokens: Vec::new(),
                text: String::new(),
                finish: FinishReason::Length,
                prompt_tokens,
                reused_tokens,
                prompt_seconds,
                gen_seconds: 0.0,
                mask_seconds: 0.0,
                lookup: LookupStats::default(),
            },
            gen_start: Instant::now(),
            by_stop_string: false,
            step: 0,
            eog: tokenizer.eot_ids(),
            opts: opts.clone(),
        }
    }

    /// The generation, cancelled before its first token.
    pub fn cancelled(mut self) -> Generation {
        self.out.finish = FinishReason::Cancelled;
        self.out
    }

    /// Take `next`, the token sampled after the last feed (under `guide`): emit its text and
    /// return what to feed next (it, and the tokens the grammar forces after it), or None when
    /// the reply has ended (`finish` then gives it). `cache_len` is what the sequence's cache
    /// holds, `n_ctx` what it can.
    #[allow(clippy::too_many_arguments)]
    pub fn advance(
        &mut self,
        tokenizer: &Tokenizer,
        next: u32,
        guide: &mut Guide,
        cache_len: usize,
        n_ctx: usize,
        on_text: &mut dyn FnMut(&str) -> bool,
        cancelled: &dyn Fn() -> bool,
        on_step: &mut dyn FnMut(usize),
    ) -> Result<Option<Vec<u32>>, ModelError> {
        self.step += 1;
        on_step(self.step);
        let out = &mut self.out;
        let ends_reply = guide.constraint.as_ref().is_some_and(|c| c.is_end(next));
        if (self.opts.stop_at_eog && self.eog.contains(&next)) || ends_reply {
            out.finish = FinishReason::Stop;
            return Ok(None);
        }
        let mut feed = vec![next];
        if let Some(c) = guide.constraint.as_mut() {
            c.accept(next).map_err(|e| ModelError::Invalid(format!("constrained generation: {e}")))?;
            // with log-probabilities, forced tokens are stepped (each needs its logits)
            if guide.top_logprobs.is_none() {
                feed.extend(c.forced());
            }
        }
        for &id in &feed {
            self.sampler.accept(id);
            if let Some(finish) = self.emitter.push(tokenizer, id, out, on_text) {
                out.finish = finish;
                self.by_stop_string = finish == FinishReason::Stop;
                return Ok(None);
            }
            if out.tokens.len() >= self.opts.max_tokens {
                out.finish = FinishReason::Length;
                return Ok(None);
            }
        }
        if guide.constraint.as_ref().is_some_and(|c| c.is_done()) {
            out.finish = FinishReason::Stop;
            return Ok(None);
        }
        if cache_len + feed.len() > n_ctx {
            out.finish = FinishReason::Length;
            return Ok(None);
        }
        if cancelled() {
            out.finish = FinishReason::Cancelled;
            return Ok(None);
        }
        Ok(Some(feed))
    }

    /// The finished generation: text still held back where the reply ended by length or by its
    /// grammar, the time taken, the guide's log-probabilities cut to the reply.
    pub fn finish(mut self, guide: &mut Guide, on_text: &mut dyn FnMut(&str) -> bool) -> Generation {
        let out = &mut self.out;
        if out.finish == FinishReason::Length || (out.finish == FinishReason::Stop && guide.constraint.is_some() && !self.by_stop_string) {
            // a constrained reply's last characters may still be held back (as the start of a
            // stop string that never came): they belong to the reply
            let (tail, _) = self.emitter.stops.push(&self.emitter.decoder.finish());
            let rest = tail + &self.emitter.stops.finish();
            if !rest.is_empty() {
                out.text.push_str(&rest);
                on_text(&rest);
            }
        }
        out.gen_seconds = self.gen_start.elapsed().as_secs_f64();
        out.mask_seconds = guide.mask_seconds;
        // the end token's entry (not part of the reply) goes
        guide.logprobs.truncate(out.tokens.len());
        self.out
    }
}

impl Session<'_> {
    /// Feed `ids` and sample the token after them, reading back only what the sampler needs
    /// (the GPU's argmax or top-k where that is enough, Sampler::best_logits_needed; the
    /// whole logits otherwise) in the same submission as the forward pass (one submission a
    /// generated token).
    pub async fn eval_sample(&mut self, ids: &[u32], sampler: &mut Sampler) -> Result<u32, ModelError> {
        match sampler.best_logits_needed(self.gpu.tuning.sample_top_k_max as usize) {
            Some(k) => Ok(sampler.sample_top(&self.eval_top_k(ids, k as u32).await?)),
            None => Ok(sampler.sample(&self.eval_logits(ids).await?)),
        }
    }

    /// `eval_sample` under `guide`: the logit bias added, then every token the constraint does
    /// not allow set to -inf, before the sampler's chain.
    pub async fn eval_sample_guided(&mut self, ids: &[u32], sampler: &mut Sampler, guide: &mut Guide) -> Result<u32, ModelError> {
        if guide.is_empty() {
            return self.eval_sample(ids, sampler).await;
        }
        let mask = match guide.constraint.as_mut() {
            Some(c) => {
                let t = Instant::now();
                let m = c.mask().map_err(|e| ModelError::Invalid(format!("constrained generation: {e}")))?;
                guide.mask_seconds += t.elapsed().as_secs_f64();
                Some(m)
            }
            None => None,
        };
        let plain = guide.logit_bias.is_empty() && guide.top_logprobs.is_none();
        if let (Some(mask), true, Some(k)) = (&mask, plain, sampler.best_logits_needed(self.gpu.tuning.sample_top_k_max as usize)) {
            // the GPU selects the k best among the allowed tokens: k values read back
            let best = self.eval_top_k_masked(ids, k as u32, &mask.words).await?;
            if best.is_empty() {
                return Err(ModelError::Invalid("constrained generation: the GPU's selection found no allowed token".into()));
            }
            let id = sampler.sample_top(&best);
            return Ok(if mask.allows(id) { id } else { best[0].0 });
        }
        let mut logits = self.eval_logits(ids).await?;
        for &(id, bias) in &guide.logit_bias {
            if let Some(l) = logits.get_mut(id as usize) {
                *l += bias;
            }
        }
        // the model's distribution (bias included), taken before the mask: the chosen token is
        // one the mask keeps, so its logit is the same after
        let record = guide.top_logprobs.map(|n| {
            let lse = TokenLogprob::log_sum_exp(&logits);
            (lse, TokenLogprob::top(&logits, n, lse))
        });
        let id = match &mask {
            None => sampler.sample(&logits),
            Some(mask) => {
                mask.apply(&mut logits);
                let id = sampler.sample(&logits);
                // every allowed logit NaN or -inf: the sampler's fallback is token 0, which the
                // grammar may not allow; the lowest allowed id keeps the reply inside the grammar
                if mask.allows(id) {
                    id
                } else {
                    mask.ids().next().unwrap_or(id)
                }
            }
        };
        if let Some((lse, top)) = record {
            let logprob = logits.get(id as usize).map_or(f32::NEG_INFINITY, |&l| (l as f64 - lse) as f32);
            guide.logprobs.push(TokenLogprob { id, logprob, top });
        }
        Ok(id)
    }
}

/// Turns accepted tokens into text: whole UTF-8 characters, held back while a stop string may
/// be starting.
struct Emitter {
    decoder: StreamDecoder,
    stops: StopMatcher,
}

impl Emitter {
    /// Adds `id` to the reply; Some(why) when the generation ends here (a stop string, or
    /// `on_text` asking to stop).
    fn push(&mut self, tokenizer: &Tokenizer, id: u32, out: &mut Generation, on_text: &mut dyn FnMut(&str) -> bool) -> Option<FinishReason> {
        out.tokens.push(id);
        let piece = self.decoder.push(tokenizer, id);
        let (emit, stopped) = self.stops.push(&piece);
        if !emit.is_empty() {
            out.text.push_str(&emit);
            if !on_text(&emit) {
                return Some(FinishReason::Cancelled);
            }
        }
        stopped.then_some(FinishReason::Stop)
    }
}

/// The result of [`perplexity`].
#[derive(Clone, Debug)]
pub struct Perplexity {
    /// exp of the mean negative log-likelihood of the scored tokens.
    pub value: f64,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens scored: the second half of each window.
    pub scored_tokens: usize,
}

/// llama.cpp-style perplexity: non-overlapping windows of `n_ctx` tokens, each started afresh
/// (its first token replaced by BOS when the model adds one), scoring only the second half:
/// the logits at position j predict token j + 1 for j in n_ctx/2 .. n_ctx − 1.
/// The session must have been created with all_logits.
pub async fn perplexity(s: &mut Session<'_>, tokens: &[u32], n_ctx: usize, bos: Option<u32>) -> Result<Perplexity, ModelError> {
    if n_ctx < 4 || n_ctx > s.n_ctx {
        return Err(ModelError::Invalid(format!("perplexity window {n_ctx} must be between 4 and the context size {}", s.n_ctx)));
    }
    let windows = tokens.len() / n_ctx;
    if windows == 0 {
        return Err(ModelError::Invalid(format!("the text has {} tokens, fewer than one window of {n_ctx}", tokens.len())));
    }
    let first = n_ctx / 2;
    let vocab = s.model.config.n_vocab;
    let mut nll = 0.0f64;
    let mut count = 0usize;
    for w in 0..windows {
        let mut win = tokens[w * n_ctx..(w + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            win[0] = b;
        }
        s.reset();
        for (bi, batch) in win.chunks(MAX_BATCH).enumerate() {
            let b0 = bi * MAX_BATCH;
            s.eval(batch).await?;
            let lo = first.max(b0);
            let hi = (b0 + batch.len()).min(n_ctx - 1);
            if lo >= hi {
                continue;
            }
            let logits = s.batch_logits(batch.len()).await?;
            for j in lo..hi {
                let row = &logits[(j - b0) * vocab..][..vocab];
                let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = max + row.iter().map(|v| (*v as f64 - max).exp()).sum::<f64>().ln();
                nll += lse - row[win[j + 1] as usize] as f64;
                count += 1;
            }
        }
    }
    Ok(Perplexity { value: (nll / count as f64).exp(), windows, scored_tokens: count })
}

/// Throughput of one benchmark repetition, in tokens per second.
#[derive(Clone, Copy, Debug, Default)]
pub struct BenchRun {
    /// `n_prompt` tokens after the depth's to the last token's argmax read back.
    pub prompt_tps: f64,
    /// `n_gen` tokens one at a time after the depth's, each argmax read back as greedy
    /// decoding does.
    pub gen_tps: f64,
}

/// The token ids a benchmark feeds: a fixed pseudo-random sequence (the content does not
/// change the work), the same natively and in the browser.
pub fn bench_ids(n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n.max(1) as u64).map(|i| ((i * 2654435761 + 12345) % n_vocab as u64) as u32).collect()
}

/// Compiles every pipeline both phases use, so the timed runs measure only the work.
pub async fn bench_warm_up(s: &mut Session<'_>, ids: &[u32]) -> Result<(), ModelError> {
    s.reset();
    s.eval(&ids[..ids.len().min(8)]).await?;
    s.eval_top_k(&[1], 1).await.map(|_| ())
}

/// Feed the depth's tokens and wait for them: `eval` returns once the work is submitted, and a
/// timer started then would count the depth's tail.
pub async fn fill_depth(s: &mut Session<'_>, depth: &[u32]) -> Result<(), ModelError> {
    if !depth.is_empty() {
        s.eval_top_k(depth, 1).await?;
    }
    Ok(())
}

/// One llama-bench style repetition (pp then tg, each on a cache holding just the `depth`
/// tokens, evaluated untimed: llama-bench's -d), shared by `nomoat bench` and the browser
/// engine so both sides time the same work. `on_ready` runs when a timed part starts.
pub async fn bench_once(s: &mut Session<'_>, prompt: &[u32], n_gen: usize, depth: &[u32], on_ready: &mut dyn FnMut()) -> Result<BenchRun, ModelError> {
    let mut run = BenchRun::default();
    if !prompt.is_empty() {
        s.reset();
        fill_depth(s, depth).await?;
        on_ready();
        let t = Instant::now();
        s.eval_top_k(prompt, 1).await?;
        run.prompt_tps = prompt.len() as f64 / t.elapsed().as_secs_f64();
    }
    if n_gen > 0 {
        s.reset();
        fill_depth(s, depth).await?;
        on_ready();
        let t = Instant::now();
        let mut next = 1u32;
        for _ in 0..n_gen {
            next = s.eval_top_k(&[next], 1).await?[0].0;
        }
        run.gen_tps = n_gen as f64 / t.elapsed().as_secs_f64();
    }
    Ok(run)
}
