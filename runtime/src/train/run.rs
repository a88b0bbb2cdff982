//! A fine-tuning run, step by step: the same loop for `nomoat finetune` and the browser's
//! `engine.finetune`. Each step accumulates whole examples until `batch_tokens`, clips the
//! gradient of the mean loss to norm 1 and takes an AdamW step at the scheduled learning rate
//! (linear warm-up over a tenth of the steps, at most 100, then a cosine down to a tenth of the
//! peak). Examples come in a new seeded order each pass. Timing is the caller's: this module
//! has no clock, so it runs the same in a tab.

use crate::device::{Gpu, GpuError};
use crate::error::{ByteSource, ModelError};
use crate::gguf::{Gguf, GgufWriter};
use crate::held::Held;
use crate::model::Model;
use crate::reference::AdamW;
use crate::rng::Rng;
use crate::train::data::Example;
use crate::train::step::Trainer;

/// What a run trains and for how long (the names are `nomoat finetune`'s flags).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Which projections get adapters: names from q, k, v, o, gate, up, down.
    pub targets: Vec<String>,
    /// The adapters' rank.
    pub rank: u32,
    /// LoRA alpha (the adapters' output is scaled by alpha / rank).
    pub alpha: f32,
    /// Peak learning rate.
    pub lr: f32,
    /// Passes over the data (1 unless `steps` is given).
    pub epochs: Option<u32>,
    /// Optimizer steps, instead of epochs.
    pub steps: Option<u32>,
    /// Tokens a step's gradient is accumulated over (whole examples, at least one).
    pub batch_tokens: usize,
    /// Seeds the factors' initial values and the order of the examples.
    pub seed: u64,
    /// Validation loss every this many steps, and after the last (0: only after the last).
    pub valid_every: u32,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            targets: ["q", "k", "v", "o", "gate", "up", "down"].map(String::from).to_vec(),
            rank: 8,
            alpha: 16.0,
            lr: 2e-4,
            epochs: None,
            steps: None,
            batch_tokens: 2048,
            seed: 0,
            valid_every: 10,
        }
    }
}

/// One step's report.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Steps taken so far (1 after the first).
    pub step: u32,
    /// Steps in the whole run.
    pub steps: u32,
    /// The step's mean loss per trained token.
    pub loss: f64,
    /// The validation set's mean loss, on the steps it is measured.
    pub val_loss: Option<f64>,
    /// The learning rate this step used (warm-up, then cosine decay).
    pub lr: f32,
    /// The mean loss's gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens (trained or not) run through so far.
    pub tokens: usize,
}

impl Progress {
    /// The report as JSON with snake_case keys (`nomoat finetune --json` prints it, the browser
    /// engine sends it).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"step": self.step, "steps": self.steps, "loss": self.loss, "val_loss": self.val_loss, "lr": self.lr, "grad_norm": self.grad_norm, "tokens": self.tokens})
    }
}

/// A run in progress: the trainer, the data and where in it the run is.
pub struct Run<'m> {
    /// The model with the factors being trained.
    pub trainer: Trainer<'m>,
    train: Vec<Example>,
    valid: Vec<Example>,
    opts: RunOptions,
    /// Steps taken, and in all.
    pub step: u32,
    /// Steps in the whole run.
    pub total: u32,
    warmup: u32,
    order: Vec<usize>,
    next: usize,
    rng: Rng,
    tokens: usize,
    /// A step's tokens: `batch_tokens`, or one pass over a smaller data set (so an epoch of
    /// a few examples is one step, not many passes).
    batch: usize,
    /// AdamW steps the factors had taken before this run's first (a resumed optimizer state
    /// under a new schedule): the moments' bias correction counts them.
    adam_before: u32,
}

/// `general.type` of a run's state file.
pub const STATE_TYPE: &str = "nomoat.lora_training_state";

/// How [`Run::resume_state`] went on from a saved state.
#[derive(Clone, Debug, PartialEq)]
pub enum Resumed {
    /// At this step of the same schedule and data order with the optimizer's moments: the
    /// steps that follow are those the run would have taken had it not stopped.
    Exactly {
        /// Steps already taken.
        step: u32,
    },
    /// The optimizer's moments kept, a new schedule from step 0: the run's steps, seed, data
    /// or step size differ from the saved one's (which, said here).
    NewSchedule {
        /// What differs.
        why: String,
    },
}

impl<'m> Run<'m> {
    /// The trainer's context is the longest example's length.
    /// The model and device are borrowed or shared ([`Held`]).
    pub async fn new(
        model: impl Into<Held<'m, Model>>,
        gpu: impl Into<Held<'m, Gpu>>,
        train: Vec<Example>,
        valid: Vec<Example>,
        opts: RunOptions,
    ) -> Result<Run<'m>, ModelError> {
        if train.is_empty() {
            return Err(ModelError::Training("the training data has no examples".into()));
        }
        if opts.lr.is_nan() || opts.lr <= 0.0 || !opts.alpha.is_finite() {
            return Err(ModelError::Training(format!("learning rate {} and alpha {}: both must be finite, the rate above 0", opts.lr, opts.alpha)));
        }
        if opts.epochs == Some(0) || opts.steps == Some(0) {
            return Err(ModelError::Training("a run of 0 epochs or 0 steps".into()));
        }
        let targets: Vec<&str> = opts.targets.iter().map(|s| s.as_str()).collect();
        let ctx = context_of(&train, &valid);
        let trainer = Trainer::new(model, gpu, &targets, opts.rank, opts.alpha, ctx, opts.seed).await?;
        let train_tokens: usize = train.iter().map(|e| e.ids.len()).sum();
        let steps_per_epoch = train_tokens.div_ceil(opts.batch_tokens.max(1)).max(1) as u32;
        let total = opts.steps.unwrap_or(steps_per_epoch.saturating_mul(opts.epochs.unwrap_or(1))).max(1);
        let order = (0..train.len()).collect::<Vec<_>>();
        let batch = opts.batch_tokens.min(train_tokens).max(1);
        Ok(Run {
            trainer,
            next: order.len(),
            order,
            train,
            valid,
            rng: Rng::new(opts.seed ^ 0x5eed),
            warmup: (total / 10).clamp(1, 100),
            step: 0,
            total,
            opts,
            tokens: 0,
            batch,
            adam_before: 0,
        })
    }

    /// What identifies the run's schedule and data order: its steps, seed, examples, their
    /// tokens and a step's tokens.
    fn schedule_keys(&self) -> [(&'static str, u64); 5] {
        [
            ("training.total", self.total as u64),
            ("training.seed", self.opts.seed),
            ("training.examples", self.train.len() as u64),
            ("training.example_tokens", self.train.iter().map(|e| e.ids.len() as u64).sum()),
            ("training.batch_tokens", self.batch as u64),
        ]
    }

    /// A digest of the factors as they are on the GPU (FNV-1a over their f32 bytes, pairs in
    /// name order): tells a state file from another checkpoint's.
    async fn factors_digest(&self) -> Result<u64, GpuError> {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for p in self.trainer.pairs.values() {
            for m in [&p.a, &p.b] {
                for x in self.trainer.gpu.read_f32(&m.chunks[0].buffer, 0, (m.n_rows * m.k) as usize).await? {
                    for b in x.to_le_bytes() {
                        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
                    }
                }
            }
        }
        Ok(h)
    }

    /// The run's state, kept beside its adapter so that [`Run::resume_state`] can go on where
    /// it stopped: a GGUF (`general.type` [`STATE_TYPE`]) with the step, what identifies the
    /// schedule and data order, a digest of the factors it belongs with, and AdamW's moments.
    /// (llama.cpp refuses unknown tensors in an adapter, hence a file of its own.)
    pub async fn state_gguf(&self) -> Result<Vec<u8>, GpuError> {
        let mut w = GgufWriter::new();
        w.add_metadata("general.type", STATE_TYPE);
        w.add_metadata("general.architecture", self.trainer.model.config.arch_name.as_str());
        w.add_metadata("training.step", self.step);
        w.add_metadata("training.adam_step", self.adam_before + self.step);
        w.add_metadata("training.rank", self.opts.rank);
        w.add_metadata("training.factors_digest", self.factors_digest().await?);
        for (k, v) in self.schedule_keys() {
            w.add_metadata(k, v);
        }
        self.trainer.write_moments(&mut w).await?;
        Ok(w.to_bytes())
    }

    /// Goes on from a state [`Run::state_gguf`] wrote, after the factors it belongs with were
    /// loaded (`Trainer::load_factors`). The same schedule and data: exactly where it stopped;
    /// otherwise the moments under a new schedule. A state of another model, rank or targets,
    /// or of other factors (another checkpoint's), is an error and changes nothing.
    pub async fn resume_state<S: ByteSource>(&mut self, g: &Gguf, src: &mut S) -> Result<Resumed, ModelError> {
        let arch = self.trainer.model.config.arch_name.as_str();
        if g.get_str_opt("general.type")? != Some(STATE_TYPE) || g.get_str_opt("general.architecture")? != Some(arch) {
            return Err(ModelError::Invalid(format!("not the training state of a LoRA run on a {arch} model")));
        }
        let rank = g.get_u32("training.rank")?;
        if rank != self.opts.rank {
            return Err(ModelError::Invalid(format!("a state of rank {rank}, not {}", self.opts.rank)));
        }
        if g.get_u64("training.factors_digest")? != self.factors_digest().await? {
            return Err(ModelError::Invalid("a state saved with other factors than the adapter's (another checkpoint's)".into()));
        }
        let (step, adam_step) = (g.get_u32("training.step")?, g.get_u32("training.adam_step")?);
        if step > adam_step {
            return Err(ModelError::Invalid(format!("a state at step {step} of {adam_step} optimizer steps")));
        }
        self.trainer.load_moments(g, src).await?;
        let mut differ = Vec::new();
        for (k, v) in self.schedule_keys() {
            let saved = g.get_u64(k)?;
            if saved != v {
                differ.push(format!("{} {saved} → {v}", k.trim_start_matches("training.")));
            }
        }
        if step > self.total {
            differ.push(format!("step {step} is past the run's {}", self.total));
        }
        if !differ.is_empty() {
            self.adam_before = adam_step;
            return Ok(Resumed::NewSchedule { why: differ.join(", ") });
        }
        // the data order and token count of the steps taken, replayed without running them
        for _ in 0..step {
            let mut tokens = 0;
            while tokens < self.batch {
                let i = self.next_example();
                tokens += self.train[i].ids.len();
            }
            self.tokens += tokens;
        }
        self.step = step;
        self.adam_before = adam_step - step;
        Ok(Resumed::Exactly { step })
    }

    /// Tokens a step accumulates its gradient over (about: whole examples).
    pub fn batch_tokens(&self) -> usize {
        self.batch
    }

    /// Whether every step has been taken.
    pub fn done(&self) -> bool {
        self.step >= self.total
    }

    /// The next example in this pass's order, starting a new shuffled pass when one ends.
    fn next_example(&mut self) -> usize {
        if self.next == self.order.len() {
            for i in (1..self.order.len()).rev() {
                self.order.swap(i, (self.rng.next_u64() % (i as u64 + 1)) as usize);
            }
            self.next = 0;
        }
        self.next += 1;
        self.order[self.next - 1]
    }

    /// One optimizer step. A loss that is not finite stops the run with an error before the
    /// factors change (what was saved before stays good).
    pub async fn step(&mut self) -> Result<Progress, ModelError> {
        if self.done() {
            return Err(ModelError::Training(format!("the run has taken all its {} steps", self.total)));
        }
        let (mut loss, mut trained, mut tokens) = (0.0f64, 0usize, 0usize);
        while tokens < self.batch {
            let i = self.next_example();
            let e = &self.train[i];
            loss += self.trainer.accumulate(&e.ids, &weights(e)).await?;
            trained += e.n_trained();
            tokens += e.ids.len();
        }
        let per_token = 1.0 / trained.max(1) as f64;
        let mean_loss = loss * per_token;
        if !mean_loss.is_finite() {
            self.trainer.zero_grads()?;
            return Err(ModelError::NonFiniteLoss { step: self.step + 1, loss: mean_loss });
        }
        let norm = self.trainer.grad_norm().await? * per_token;
        let clip = if norm > 1.0 { 1.0 / norm } else { 1.0 };
        let lr = learning_rate(self.step, self.total, self.warmup, self.opts.lr);
        self.step += 1;
        let h = AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: self.adam_before + self.step };
        self.trainer.optimizer_step(h, (clip * per_token) as f32).await?;
        self.tokens += tokens;
        let every = self.opts.valid_every;
        let val_loss = if !self.valid.is_empty() && ((every > 0 && self.step.is_multiple_of(every)) || self.done()) { Some(self.validation_loss().await?) } else { None };
        Ok(Progress { step: self.step, steps: self.total, loss: mean_loss, val_loss, lr, grad_norm: norm, tokens: self.tokens })
    }

    /// The validation set's mean loss per trained token (gradients untouched).
    pub async fn validation_loss(&mut self) -> Result<f64, ModelError> {
        let (mut l, mut n) = (0.0, 0usize);
        for e in &self.valid {
            l += self.trainer.loss(&e.ids, &weights(e)).await?;
            n += e.n_trained();
        }
        Ok(l / n.max(1) as f64)
    }
}

/// The trainer's context for these examples: the longest one's length.
pub fn context_of(train: &[Example], valid: &[Example]) -> u32 {
    train.iter().chain(valid).map(|e| e.ids.len()).max().unwrap_or(2).max(2) as u32
}

/// GPU bytes a run needs: (the model's weights, the adapters with their gradients and AdamW
/// moments, activations and scratch), from the header and the data alone.
pub fn memory_needed(gguf: &crate::gguf::Gguf, c: &crate::arch::Config, opts: &RunOptions, ctx: u32) -> (u64, u64, u64) {
    let (weights, _) = Model::memory_needed(gguf, c, 0, crate::ops::KvType::F32);
    let targets: Vec<&str> = opts.targets.iter().map(|s| s.as_str()).collect();
    let (adapters, activations) = crate::train::step::memory_needed(c, &targets, opts.rank, ctx);
    (weights, adapters, activations)
}

/// Per-position loss weights of an example (1 where trained).
pub fn weights(e: &Example) -> Vec<f32> {
    e.trained.iter().map(|t| if *t { 1.0 } else { 0.0 }).collect()
}

/// The learning rate of step `step` (from 0) of `total`: a linear warm-up over `warmup` steps
/// to `peak`, then a cosine down to a tenth of it.
pub fn learning_rate(step: u32, total: u32, warmup: u32, peak: f32) -> f32 {
    if step < warmup {
        return peak * (step + 1) as f32 / warmup as f32;
    }
    let progress = (step - warmup) as f32 / (total - warmup).max(1) as f32;
    let floor = 0.1 * peak;
    floor + (peak - floor) * 0.5 * (1.0 + (std::f32::consts::PI * progress.min(1.0)).cos())
}

#[cfg(test)]
mod tests {
    use super::learning_rate;

    #[test]
    fn learning_rate_warms_up_then_decays_to_a_tenth() {
        let lr = |step| learning_rate(step, 100, 10, 1e-3);
        assert!((lr(0) - 1e-4).abs() < 1e-9, "{}", lr(0));
        assert!((lr(9) - 1e-3).abs() < 1e-9 && (lr(10) - 1e-3).abs() < 1e-9);
        assert!((1..100).all(|s| s == 10 || s < 10 && lr(s) > lr(s - 1) || s > 10 && lr(s) < lr(s - 1)));
        assert!((lr(100) - 1e-4).abs() < 1e-9 && (lr(500) - 1e-4).abs() < 1e-9);
        // one step in all: warm-up is that step, at the peak
        assert!((learning_rate(0, 1, 1, 1e-3) - 1e-3).abs() < 1e-9);
    }
}
