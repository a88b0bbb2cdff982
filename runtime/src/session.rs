//! A session: a model plus its KV cache, the state of one conversation, and the forward pass
//! that extends it (`eval_batch`: one dispatch list per batch of tokens, submitted once).
//!
//! One layer, as the papers write it (x: `[n_tokens][n_embd]`):
//!   h   = x + out(Wo · Attn(RoPE(Wq · norm(x)), RoPE(Wk · norm(x)), Wv · norm(x)))
//!   x'  = h + out(Wdown · (act(Wgate · norm(h)) ⊙ Wup · norm(h)))
//! where out() is nothing, or Gemma 3's norm of the branch's output. Decode (and prefill where
//! the recorder tiles tokens: `Recorder::fuses_block`) fuses each branch's RMS norm into the
//! product that reads it, the gated activation into the gate·up product and, for plain
//! adjacent-pair RoPE, RoPE and the KV write into the q/k/v product: five or six dispatches a
//! layer, because on CPU devices a dispatch costs tens of microseconds whatever it does.
//! Active adapters need the normalised input for their own products, so they take the
//! unfused path.

use crate::arch::{Activation, QkPrep, RopeType};
use crate::device::{Gpu, GpuError};
use crate::error::ModelError;
use crate::held::Held;
use crate::lookup::Lookup;
use crate::lora::{Lora, LoraAdapter};
use crate::model::{Layer, Model};
use crate::ops::{
    self, AttentionArgs, DispatchCache, GpuMatrix, KvType, Place, Places, ProductIn, ProductOut, QkNorm, Recorder, RopeArgs, TopKScratch, MAX_SEQ_ROWS, MAX_TOP_K,
};
use std::sync::Arc;

/// The choices made once for a batch: its size, where its tokens sit (consecutive positions
/// from pos0 of the current slot, or one token of each of several slots), and whether its
/// blocks fuse their norms and activations into the products.
struct Plan<'p> {
    n: u32,
    pos0: u32,
    /// The cache row of the current slot's position 0 (unused with `per_token`).
    kv_row0: u32,
    /// A step of several sequences: token t's place.
    per_token: Option<&'p [Place]>,
    fused: bool,
    /// Blocks leave their post-normed branch for the next product to add in (`Stream::Pending`).
    fold: bool,
}

/// Where a recorded argmax leaves the best logit's value and id (its first entry of each).
struct Best<'b> {
    values: &'b wgpu::Buffer,
    ids: &'b wgpu::Buffer,
}

/// The residual stream between blocks: in a buffer, or (Gemma 3 where the products fuse their
/// input's norm) a branch output the next product adds in: resid + rms_norm(branch) · post_norm,
/// stored into `sum` by that product (`ProductIn::PostNormAdd`).
#[derive(Clone, Copy)]
enum Stream<'b> {
    Ready(&'b wgpu::Buffer),
    Pending { branch: &'b wgpu::Buffer, post_norm: &'b wgpu::Buffer, resid: &'b wgpu::Buffer, sum: &'b wgpu::Buffer },
}

impl<'b> Stream<'b> {
    /// Where the stream is, or will be once its next product (or `materialize`) has run.
    fn buffer(&self) -> &'b wgpu::Buffer {
        match *self {
            Stream::Ready(x) => x,
            Stream::Pending { sum, .. } => sum,
        }
    }
}

impl Plan<'_> {
    fn places(&self) -> Places<'_> {
        match self.per_token {
            Some(p) => Places::PerToken(p),
            None => Places::Consecutive { kv_row0: self.kv_row0 },
        }
    }
}

/// One sequence's token in a step of several ([`Session::step_slots`]): the slot, the token fed
/// after what the slot holds, and what to read back of the logits after it.
#[derive(Clone, Copy, Debug)]
pub struct SlotStep {
    /// The slot (sequence) it extends.
    pub slot: usize,
    /// The token fed.
    pub token: u32,
    /// What to read back of the logits after it.
    pub want: Want,
}

/// What a sequence's step reads back: the k best (id, logit), selected on the GPU, or every
/// logit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// The k best (id, logit), best first.
    TopK(u32),
    /// Every logit.
    Logits,
}

/// A sequence's read-back after a step of several.
#[derive(Clone, Debug)]
pub enum RowOut {
    /// The k best (id, logit), best first.
    Best(Vec<(u32, f32)>),
    /// Every logit, in id order.
    Logits(Vec<f32>),
}

/// Tokens processed per prefill step; the activation buffers are sized for it.
pub const MAX_BATCH: usize = 64;

/// Dispatches a session records before it submits: more than one step of any model here takes
/// (about 5 to 10 a layer, more with adapters); a longer recording submits in parts.
const SESSION_PARAM_SLOTS: u32 = 1024;

/// What a step reads back of the last token's logits, copied out in the submission that
/// computes them: nothing, their k best (ids and values, selected on the GPU), or all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Readback {
    Nothing,
    TopK(u32),
    /// The k best among the ids the top-k scratch's mask allows.
    MaskedTopK(u32),
    Logits,
}

/// Scratch activations for up to MAX_BATCH tokens, allocated once per session.
struct Scratch {
    ids: wgpu::Buffer,     // [B] u32
    x: wgpu::Buffer,       // [B][n_embd] residual stream
    x2: wgpu::Buffer,      // [B][n_embd] residual after attention
    xn: wgpu::Buffer,      // [B][n_embd] normalised input of a branch
    t1: wgpu::Buffer,      // [B][n_embd] branch output
    q: wgpu::Buffer,       // [B][n_head][head_dim]
    q2: wgpu::Buffer,      // [B][n_head][head_dim] after q-norm / bias
    k: wgpu::Buffer,       // [B][n_kv_head][head_dim]
    k2: wgpu::Buffer,      // [B][n_kv_head][head_dim]
    v: wgpu::Buffer,       // [B][n_kv_head][head_dim]
    v2: wgpu::Buffer,      // [B][n_kv_head][head_dim]
    attn: wgpu::Buffer,    // [B][n_head][head_dim]
    gate: wgpu::Buffer,    // [B][n_ff]
    up: wgpu::Buffer,      // [B][n_ff]
    act: wgpu::Buffer,     // [B][n_ff]
    last: wgpu::Buffer,    // [n_embd] the last token's residual
    logits: wgpu::Buffer,  // [n_vocab]; [B][n_vocab] (all positions); [n][n_vocab] (n sequences' step)
    logits2: wgpu::Buffer, // same, soft-capped
    /// [n_vocab]: one sequence's logits, copied out of a step of several for its top-k
    logits_row: wgpu::Buffer,
    /// [argmax_slots] each: the output head's best rows, value and id, for greedy decoding
    best_values: wgpu::Buffer,
    best_ids: wgpu::Buffer,
}

/// A model plus its KV cache: the state of one conversation, or of several (slots), each with
/// its own part of the cache, which `step_slots` extends together: one pass over the weights
/// for a token of each.
pub struct Session<'m> {
    /// The model it runs.
    pub model: Held<'m, Model>,
    /// The device the model and cache live on.
    pub gpu: Held<'m, Gpu>,
    /// Context size of each slot.
    pub n_ctx: usize,
    /// The element type of the KV cache.
    pub kv: KvType,
    /// Tokens whose keys and values are in the current slot's cache, in order.
    pub tokens: Vec<u32>,
    /// The slot `tokens`, `eval` and generation work on (`select_slot`).
    slot: usize,
    /// Every other slot's tokens (the current slot's entry is empty while it is current).
    slot_tokens: Vec<Vec<u32>>,
    k_cache: Vec<wgpu::Buffer>, // per layer [n_slots][n_ctx][n_kv_head][head_dim]
    v_cache: Vec<wgpu::Buffer>,
    s: Scratch,
    all_logits: bool,
    /// Active adapters and their user scales.
    adapters: Vec<(Arc<LoraAdapter>, f32)>,
    /// [B][max rank] and [B][max n_out] intermediates of B·(A·x), sized for the active adapters.
    lora_t: Option<wgpu::Buffer>,
    lora_u: Option<wgpu::Buffer>,
    /// Tokens in the most recent batch: the row of the last token's logits in all_logits mode.
    last_batch: usize,
    /// Parameter slots and bind groups of every step, so that a step creates no GPU object.
    dispatch: Arc<DispatchCache>,
    /// The GPU top-k's intermediates over the logits.
    top_k: TopKScratch,
    /// Where a step's read-back lands: [max(n_vocab, 2 · MAX_TOP_K)] of 4 bytes.
    readback: wgpu::Buffer,
    /// Prompt-lookup decoding in this session's greedy generations (`Lookup::OFF`: none).
    pub lookup: Lookup,
    /// Rows of logits the logits buffers hold outside all_logits mode (grown by
    /// `eval_each` on first use).
    logit_rows: usize,
}

/// The most draft tokens one [`Session::eval_each`] pass checks (after the token they
/// follow): prompt-lookup decoding's longest draft.
pub const MAX_DRAFT: usize = 15;

impl<'m> Session<'m> {
    /// `all_logits` keeps logits of every position of the last batch (perplexity needs them).
    /// The model and device are borrowed (`&model`) or shared (an `Arc`, for a session kept
    /// beside them).
    pub async fn new(model: impl Into<Held<'m, Model>>, gpu: impl Into<Held<'m, Gpu>>, n_ctx: usize, kv: KvType, all_logits: bool) -> Result<Session<'m>, ModelError> {
        Self::build(model.into(), gpu.into(), n_ctx, kv, all_logits, 1).await
    }

    /// A session of `n_slots` sequences of up to `n_ctx` tokens each, which `step_slots` decodes
    /// together (slot 0 is current).
    pub async fn with_slots(
        model: impl Into<Held<'m, Model>>,
        gpu: impl Into<Held<'m, Gpu>>,
        n_ctx: usize,
        kv: KvType,
        n_slots: usize,
    ) -> Result<Session<'m>, ModelError> {
        Self::build(model.into(), gpu.into(), n_ctx, kv, false, n_slots).await
    }

    async fn build(model: Held<'m, Model>, gpu: Held<'m, Gpu>, n_ctx: usize, kv: KvType, all_logits: bool, n_slots: usize) -> Result<Session<'m>, ModelError> {
        let c = &model.config;
        if n_ctx == 0 || n_ctx > c.n_ctx_train.max(1) {
            return Err(ModelError::Invalid(format!("context size {n_ctx} must be between 1 and the model's {}", c.n_ctx_train)));
        }
        if n_slots == 0 || n_slots > u32::MAX as usize / n_ctx {
            return Err(ModelError::Invalid(format!("{n_slots} sequences of {n_ctx} tokens: the count must be at least 1")));
        }
        kv.check_row(c.n_kv_head as u32, c.head_dim as u32).map_err(ModelError::Invalid)?;
        let per_layer = (n_slots * n_ctx) as u64 * kv.row_bytes((c.n_kv_head * c.head_dim) as u64);
        if per_layer > gpu.max_binding() {
            let what = if n_slots > 1 { format!("{n_slots} sequences of {n_ctx} tokens") } else { format!("a {n_ctx}-token KV cache") };
            return Err(ModelError::Invalid(format!("{what} needs {per_layer} bytes per layer, over this device's {}-byte binding limit", gpu.max_binding())));
        }
        let mut k_cache = Vec::new();
        let mut v_cache = Vec::new();
        for _ in 0..c.n_layer {
            k_cache.push(gpu.storage("k cache", per_layer).await?);
            v_cache.push(gpu.storage("v cache", per_layer).await?);
        }
        let b = MAX_BATCH as u64;
        let f = |n: usize| b * n as u64 * 4;
        // rows of logits a submission computes: a batch's (all_logits), one per sequence of a
        // step of several, or the last token's
        let step_rows = n_slots.min(MAX_SEQ_ROWS) as u64;
        let logits_len = if all_logits { b } else { step_rows } * c.n_vocab as u64 * 4;
        let q_dim = c.n_head * c.head_dim;
        let kv_dim = c.n_kv_head * c.head_dim;
        let head_slots = ops::argmax_slots(&gpu, model.output_head()) as u64;
        let s = Scratch {
            ids: gpu.storage("ids", b * 4).await?,
            x: gpu.storage("x", f(c.n_embd)).await?,
            x2: gpu.storage("x2", f(c.n_embd)).await?,
            xn: gpu.storage("xn", f(c.n_embd)).await?,
            t1: gpu.storage("t1", f(c.n_embd)).await?,
            q: gpu.storage("q", f(q_dim)).await?,
            q2: gpu.storage("q2", f(q_dim)).await?,
            k: gpu.storage("k", f(kv_dim)).await?,
            k2: gpu.storage("k2", f(kv_dim)).await?,
            v: gpu.storage("v", f(kv_dim)).await?,
            v2: gpu.storage("v2", f(kv_dim)).await?,
            attn: gpu.storage("attn", f(q_dim)).await?,
            gate: gpu.storage("gate", f(c.n_ff)).await?,
            up: gpu.storage("up", f(c.n_ff)).await?,
            act: gpu.storage("act", f(c.n_ff)).await?,
            last: gpu.storage("last", c.n_embd as u64 * 4).await?,
            logits: gpu.storage("logits", logits_len).await?,
            logits2: gpu.storage("logits2", logits_len).await?,
            logits_row: gpu.storage("logits row", if n_slots > 1 { c.n_vocab as u64 * 4 } else { 4 }).await?,
            best_values: gpu.storage("head's best values", head_slots * 4).await?,
            best_ids: gpu.storage("head's best ids", head_slots * 4).await?,
        };
        let dispatch = Arc::new(DispatchCache::new(&gpu, SESSION_PARAM_SLOTS));
        let top_k = TopKScratch::new(&gpu, c.n_vocab as u32).await?;
        let readback = gpu.readback_buffer(step_rows * c.n_vocab.max(2 * MAX_TOP_K as usize) as u64 * 4);
        Ok(Session {
            model,
            gpu,
            n_ctx,
            kv,
            tokens: Vec::new(),
            slot: 0,
            slot_tokens: vec![Vec::new(); n_slots],
            k_cache,
            v_cache,
            s,
            all_logits,
            last_batch: 0,
            adapters: Vec::new(),
            lora_t: None,
            lora_u: None,
            dispatch,
            top_k,
            readback,
            lookup: Lookup::OFF,
            logit_rows: if all_logits { MAX_BATCH } else { step_rows as usize },
        })
    }

    /// How many sequences the session holds.
    pub fn n_slots(&self) -> usize {
        self.slot_tokens.len()
    }

    /// The slot `tokens`, `eval` and generation work on.
    pub fn slot(&self) -> usize {
        self.slot
    }

    /// Work on slot `i` from now on (its tokens become `tokens`).
    pub fn select_slot(&mut self, i: usize) {
        assert!(i < self.n_slots(), "slot {i} of {}", self.n_slots());
        if i != self.slot {
            std::mem::swap(&mut self.tokens, &mut self.slot_tokens[self.slot]);
            std::mem::swap(&mut self.tokens, &mut self.slot_tokens[i]);
            self.slot = i;
        }
    }

    /// The tokens slot `i`'s cache holds.
    pub fn slot_tokens(&self, i: usize) -> &[u32] {
        if i == self.slot {
            &self.tokens
        } else {
            &self.slot_tokens[i]
        }
    }

    fn slot_tokens_mut(&mut self, i: usize) -> &mut Vec<u32> {
        if i == self.slot {
            &mut self.tokens
        } else {
            &mut self.slot_tokens[i]
        }
    }

    /// The cache row of slot i's position 0.
    fn kv_row0(&self, slot: usize) -> u32 {
        (slot * self.n_ctx) as u32
    }

    /// Forget the cache from position `n` on (keep a shared prefix for the next prompt).
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
    }

    /// Keep the longest prefix of `ids` the cache already holds, short of the last id (so that
    /// evaluating the rest yields the last id's logits); returns how many ids were kept.
    pub fn keep_prefix_of(&mut self, ids: &[u32]) -> usize {
        let shared = self.tokens.iter().zip(ids).take_while(|(a, b)| a == b).count().min(ids.len().saturating_sub(1));
        self.truncate(shared);
        shared
    }

    /// Forgets the current slot's cache (the next prompt is evaluated whole).
    pub fn reset(&mut self) {
        self.tokens.clear();
    }

    /// Use these adapters (with their user scales) from now on. The KV cache was computed with
    /// the previous set, so it is cleared unless the set is unchanged.
    pub async fn set_adapters(&mut self, adapters: Vec<(Arc<LoraAdapter>, f32)>) -> Result<(), ModelError> {
        let same = adapters.len() == self.adapters.len() && adapters.iter().zip(&self.adapters).all(|((a, s), (b, t))| Arc::ptr_eq(a, b) && s == t);
        if same {
            return Ok(());
        }
        // every slot's cache was computed with the old set
        self.tokens.clear();
        self.slot_tokens.iter_mut().for_each(Vec::clear);
        let pairs = || adapters.iter().flat_map(|(a, _)| a.pairs.values());
        let max_rank = pairs().map(|p| p.rank).max().unwrap_or(0) as u64;
        let max_out = pairs().map(|p| p.b.n_rows).max().unwrap_or(0) as u64;
        let b = MAX_BATCH as u64 * 4;
        self.lora_t = None;
        self.lora_u = None;
        // the cached bind groups hold the old adapters' buffers
        self.dispatch.clear();
        if max_rank > 0 {
            self.lora_t = Some(self.gpu.storage("lora t", b * max_rank).await?);
            self.lora_u = Some(self.gpu.storage("lora u", b * max_out).await?);
        }
        self.adapters = adapters;
        Ok(())
    }

    /// The active adapters with their scales.
    pub fn adapters(&self) -> &[(Arc<LoraAdapter>, f32)] {
        &self.adapters
    }

    /// Feed `ids` after what the cache holds. Afterwards the logits buffer holds the last
    /// token's logits (or, with all_logits, every token's of the last batch).
    pub async fn eval(&mut self, ids: &[u32]) -> Result<(), ModelError> {
        self.eval_then(ids, Readback::Nothing).await.map(|_| ())
    }

    /// Feed `ids` (there must be some) and return the k best (id, logit) of the last token,
    /// selected on the GPU in the same submission (k ≤ MAX_TOP_K).
    pub async fn eval_top_k(&mut self, ids: &[u32], k: u32) -> Result<Vec<(u32, f32)>, ModelError> {
        let bytes = self.eval_then(ids, Readback::TopK(k)).await?;
        Ok(self.top_k_of(&bytes, k))
    }

    /// `eval_top_k` among the ids `mask` allows (bit id % 32 of word id / 32): constrained
    /// decoding reads back k values, not the vocabulary. Fewer than k pairs where fewer ids are
    /// allowed.
    pub async fn eval_top_k_masked(&mut self, ids: &[u32], k: u32, mask: &[u32]) -> Result<Vec<(u32, f32)>, ModelError> {
        if self.all_logits {
            let mut logits = self.eval_logits(ids).await?;
            let allows = |i: usize| mask.get(i / 32).is_some_and(|w| w >> (i % 32) & 1 == 1);
            logits.iter_mut().enumerate().filter(|(i, _)| !allows(*i)).for_each(|(_, l)| *l = f32::NEG_INFINITY);
            let best = crate::reference::top_k(&logits, k as usize);
            return Ok(best.into_iter().filter(|(i, _)| allows(*i)).map(|(i, v)| (i as u32, v)).collect());
        }
        self.top_k.set_mask(&self.gpu, mask);
        let bytes = self.eval_then(ids, Readback::MaskedTopK(k)).await?;
        Ok(self.top_k_of(&bytes, k))
    }

    /// Feed `ids` (there must be some) and return the last token's logits, `[n_vocab]`, read
    /// back in the same submission.
    pub async fn eval_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let bytes = self.eval_then(ids, Readback::Logits).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Feed one token to each of several slots in one forward pass (the products read the
    /// weights once for all of them; RoPE, the cache write and attention take each at its own
    /// position in its own slot) and read back what each wants of its logits. At most
    /// MAX_SEQ_ROWS steps, each of a different slot. One step alone runs as `eval_top_k` /
    /// `eval_logits` on its slot (the same work as a lone sequence).
    pub async fn step_slots(&mut self, steps: &[SlotStep]) -> Result<Vec<RowOut>, ModelError> {
        let c = &self.model.config;
        if steps.is_empty() || steps.len() > MAX_SEQ_ROWS.min(self.n_slots()) {
            return Err(ModelError::Invalid(format!("{} sequences in one step (1..={})", steps.len(), MAX_SEQ_ROWS.min(self.n_slots()))));
        }
        if self.all_logits {
            return Err(ModelError::Invalid("a step of several sequences in a session that keeps every position's logits".into()));
        }
        for (i, st) in steps.iter().enumerate() {
            if st.slot >= self.n_slots() || steps[..i].iter().any(|o| o.slot == st.slot) {
                return Err(ModelError::Invalid(format!("slot {} is not a distinct slot of the {}", st.slot, self.n_slots())));
            }
            if st.token as usize >= c.n_vocab {
                return Err(ModelError::Invalid(format!("token id {} is outside the vocabulary of {}", st.token, c.n_vocab)));
            }
            let needed = self.slot_tokens(st.slot).len() + 1;
            if needed > self.n_ctx {
                return Err(ModelError::ContextFull { needed, n_ctx: self.n_ctx, max: c.n_ctx_train });
            }
            if let Want::TopK(k) = st.want {
                if k == 0 || k > MAX_TOP_K {
                    return Err(ModelError::Invalid(format!("top-k with k = {k} (1..={MAX_TOP_K})")));
                }
            }
        }
        if let [one] = steps {
            let current = self.slot;
            self.select_slot(one.slot);
            let out = match one.want {
                Want::TopK(k) => self.eval_top_k(&[one.token], k).await.map(RowOut::Best),
                Want::Logits => self.eval_logits(&[one.token]).await.map(RowOut::Logits),
            };
            self.select_slot(current);
            return out.map(|row| vec![row]);
        }
        let places: Vec<Place> = steps.iter().map(|st| Place { pos: self.slot_tokens(st.slot).len() as u32, kv_row0: self.kv_row0(st.slot) }).collect();
        let ids: Vec<u32> = steps.iter().map(|st| st.token).collect();
        let (mut r, _) = self.forward(&ids, Some(&places), true, false).await?;
        // each row's read-back after the last: the k best ids then values, or the logits
        let v = c.n_vocab as u64;
        let mut at = 0u64;
        let mut spans = Vec::new();
        for (j, st) in steps.iter().enumerate() {
            match st.want {
                Want::TopK(k) => {
                    r.encoder().copy_buffer_to_buffer(&self.s.logits, j as u64 * v * 4, &self.s.logits_row, 0, v * 4);
                    let (values, ids) = ops::record_top_k(&mut r, &self.top_k, &self.s.logits_row, v as u32, k).await?;
                    let half = k as u64 * 4;
                    r.encoder().copy_buffer_to_buffer(ids, 0, &self.readback, at, half);
                    r.encoder().copy_buffer_to_buffer(values, 0, &self.readback, at + half, half);
                    spans.push((at, 2 * half));
                    at += 2 * half;
                }
                Want::Logits => {
                    r.encoder().copy_buffer_to_buffer(&self.s.logits, j as u64 * v * 4, &self.readback, at, v * 4);
                    spans.push((at, v * 4));
                    at += v * 4;
                }
            }
        }
        r.submit()?;
        let bytes = self.gpu.read_mapped(&self.readback, at).await?;
        for st in steps {
            self.slot_tokens_mut(st.slot).push(st.token);
        }
        Ok(steps
            .iter()
            .zip(spans)
            .map(|(st, (at, len))| {
                let row = &bytes[at as usize..(at + len) as usize];
                match st.want {
                    Want::TopK(k) => RowOut::Best(Self::best_of(row, k)),
                    Want::Logits => RowOut::Logits(bytemuck::pod_collect_to_vec(row)),
                }
            })
            .collect())
    }

    /// Feed `ids` (1 to MAX_DRAFT + 1 tokens) in one forward pass and return, for each of
    /// them, what `want` asks of the logits after it: the k best (id, logit), best first,
    /// selected on the GPU (k ≤ MAX_TOP_K), or every logit; read back in the same submission.
    /// The verification of a speculative draft, where `ids` is the last accepted token then the
    /// draft. The cache then holds all of `ids`; `truncate` drops the rows of rejected tokens.
    /// The logits `logits()` reads afterwards are not the last token's.
    pub async fn eval_each(&mut self, ids: &[u32], want: Want) -> Result<Vec<RowOut>, ModelError> {
        let c = &self.model.config;
        let n = ids.len();
        if n == 0 || n > MAX_DRAFT + 1 {
            return Err(ModelError::Invalid(format!("{n} tokens in one verification (1..={})", MAX_DRAFT + 1)));
        }
        if let Want::TopK(k) = want {
            if k == 0 || k > MAX_TOP_K {
                return Err(ModelError::Invalid(format!("top-k with k = {k} (1..={MAX_TOP_K})")));
            }
        }
        let needed = self.tokens.len() + n;
        if needed > self.n_ctx {
            return Err(ModelError::ContextFull { needed, n_ctx: self.n_ctx, max: c.n_ctx_train });
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(ModelError::Invalid(format!("token id {bad} is outside the vocabulary of {}", c.n_vocab)));
        }
        let v = c.n_vocab as u64;
        if self.all_logits {
            self.eval(ids).await?;
            let logits = self.batch_logits(n).await?;
            return Ok(logits
                .chunks(v as usize)
                .map(|row| match want {
                    Want::TopK(k) => RowOut::Best(crate::reference::top_k(row, k as usize).into_iter().map(|(i, x)| (i as u32, x)).collect()),
                    Want::Logits => RowOut::Logits(row.to_vec()),
                })
                .collect());
        }
        let row_bytes = match want {
            Want::TopK(k) => 2 * k as u64 * 4,
            Want::Logits => v * 4,
        };
        self.grow_logit_rows(n, n as u64 * row_bytes).await?;
        let (mut r, _) = self.forward(ids, None, true, false).await?;
        match want {
            Want::TopK(k) => {
                let half = k as u64 * 4;
                for j in 0..n as u64 {
                    r.encoder().copy_buffer_to_buffer(&self.s.logits, j * v * 4, &self.s.logits_row, 0, v * 4);
                    let (values, best) = ops::record_top_k(&mut r, &self.top_k, &self.s.logits_row, v as u32, k).await?;
                    r.encoder().copy_buffer_to_buffer(best, 0, &self.readback, j * row_bytes, half);
                    r.encoder().copy_buffer_to_buffer(values, 0, &self.readback, j * row_bytes + half, half);
                }
            }
            Want::Logits => r.encoder().copy_buffer_to_buffer(&self.s.logits, 0, &self.readback, 0, n as u64 * row_bytes),
        }
        r.submit()?;
        let bytes = self.gpu.read_mapped(&self.readback, n as u64 * row_bytes).await?;
        self.tokens.extend_from_slice(ids);
        self.last_batch = n;
        Ok(bytes
            .chunks(row_bytes as usize)
            .map(|row| match want {
                Want::TopK(k) => RowOut::Best(Self::best_of(row, k)),
                Want::Logits => RowOut::Logits(bytemuck::pod_collect_to_vec(row)),
            })
            .collect())
    }

    /// Makes the logits buffers hold `rows` rows, the row copy the vocabulary and the read-back
    /// `readback` bytes, reallocating them (and so forgetting the cached bind groups) where
    /// they are smaller: on first need only.
    async fn grow_logit_rows(&mut self, rows: usize, readback: u64) -> Result<(), ModelError> {
        let v = self.model.config.n_vocab as u64 * 4;
        if readback > self.readback.size() {
            self.readback = self.gpu.readback_buffer(readback.max((MAX_DRAFT as u64 + 1) * 2 * MAX_TOP_K as u64 * 4));
        }
        if rows <= self.logit_rows && self.s.logits_row.size() >= v {
            return Ok(());
        }
        let rows = rows.max(MAX_DRAFT + 1).max(self.logit_rows);
        self.s.logits = self.gpu.storage("logits", rows as u64 * v).await?;
        self.s.logits2 = self.gpu.storage("logits2", rows as u64 * v).await?;
        self.s.logits_row = self.gpu.storage("logits row", v).await?;
        self.logit_rows = rows;
        self.dispatch.clear();
        Ok(())
    }

    /// Feed `ids`; the last batch's submission also reads back `then`, whose bytes it returns.
    async fn eval_then(&mut self, ids: &[u32], then: Readback) -> Result<Vec<u8>, ModelError> {
        let c = &self.model.config;
        let needed = self.tokens.len() + ids.len();
        if needed > self.n_ctx {
            return Err(ModelError::ContextFull { needed, n_ctx: self.n_ctx, max: c.n_ctx_train });
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(ModelError::Invalid(format!("token id {bad} is outside the vocabulary of {}", c.n_vocab)));
        }
        if ids.is_empty() && then != Readback::Nothing {
            return Err(ModelError::Invalid("nothing to evaluate".into()));
        }
        let n_batches = ids.len().div_ceil(MAX_BATCH);
        let mut bytes = Vec::new();
        for (i, chunk) in ids.chunks(MAX_BATCH).enumerate() {
            bytes = self.eval_batch(chunk, if i + 1 == n_batches { then } else { Readback::Nothing }).await?;
            self.tokens.extend_from_slice(chunk);
            self.last_batch = chunk.len();
        }
        Ok(bytes)
    }

    /// The forward pass over one batch of at most MAX_BATCH tokens, as llama2.c's forward():
    /// embed, each layer's attention and feed-forward blocks, the output head.
    async fn eval_batch(&mut self, ids: &[u32], then: Readback) -> Result<Vec<u8>, ModelError> {
        let greedy = then == Readback::TopK(1) && !self.all_logits;
        let (r, best) = self.forward(ids, None, false, greedy).await?;
        let n_last = if self.all_logits { ids.len() - 1 } else { 0 };
        self.finish(r, n_last, then, best).await
    }

    /// Record the forward pass over `ids`: consecutive tokens of the current slot, or with
    /// `per_token` one token of each of several slots; with `every_row` the logits of every
    /// token in rows 0..n (else only the last token's, or every one with all_logits); with
    /// `greedy` (one row) also the argmax passes where the head keeps its best rows, returning
    /// where the best id and value will be.
    async fn forward(&self, ids: &[u32], per_token: Option<&[Place]>, every_row: bool, greedy: bool) -> Result<(Recorder<'_>, Option<Best<'_>>), ModelError> {
        let (m, s) = (&*self.model, &self.s);
        let c = &m.config;
        let n = ids.len() as u32;
        self.gpu.queue.write_buffer(&s.ids, 0, bytemuck::cast_slice(ids));
        let mut r = Recorder::with_cache(&self.gpu, self.dispatch.clone());
        // an adapter at scale 0 adds nothing: leaving it out keeps the fused path (and the base
        // model's logits bit for bit)
        let active: Vec<(Arc<LoraAdapter>, f32)> = self.adapters.iter().filter(|(_, scale)| *scale != 0.0).cloned().collect();
        let lora = Lora { adapters: &active, t: self.lora_t.as_ref(), u: self.lora_u.as_ref() };
        let fused = r.fuses_block(n) && active.is_empty();
        // one token: a prefill or batch's every token repeats the fold's loads in every
        // workgroup, which cost more than the dispatch it saves (bench/README.md)
        let fold = fused && n == 1 && m.folded_norms.is_some() && self.gpu.tuning.post_norm_fold;
        let plan = Plan { n, pos0: self.tokens.len() as u32, kv_row0: self.kv_row0(self.slot), per_token, fused, fold };
        // x = embed(ids) (· sqrt(n_embd) for Gemma)                         [n][n_embd]
        match c.embed_scale() {
            Some(scale) => {
                r.gather(&m.token_embd, &s.ids, &s.t1, n).await?;
                r.scale(&s.t1, &s.x, n * c.n_embd as u32, scale).await?;
            }
            None => r.gather(&m.token_embd, &s.ids, &s.x, n).await?,
        }
        let mut x = Stream::Ready(&s.x);
        for (i, layer) in m.layers.iter().enumerate() {
            let h = self.attention_block(&mut r, &plan, &lora, i, layer, x).await?; // h = x + attention
            x = self.ffn_block(&mut r, &plan, &lora, i, layer, h).await?; //           x = h + ffn(h)
        }
        let best = self.output_head(&mut r, &lora, n, every_row, x, greedy).await?; // [n_out][n_vocab]
        Ok((r, best))
    }

    /// h = x + out(W_o · attention(RoPE(q), RoPE(k), v)), [q; k; v] = W_qkv · rms_norm(x), with
    /// k and v appended to layer i's cache; returns h (in x itself where the branch adds in
    /// place).
    async fn attention_block<'b>(&'b self, r: &mut Recorder<'_>, p: &Plan<'_>, lora: &Lora<'_>, i: usize, l: &'b Layer, x: Stream<'b>) -> Result<Stream<'b>, GpuError> {
        let (c, s) = (&self.model.config, &self.s);
        let folded = self.model.folded_norms.as_ref().and_then(|f| i.checked_sub(1).and_then(|before| f.attn.get(before)));
        let input = self.branch_input(r, p, x, &l.attn_norm, folded).await?; // [n][n_embd]
        let rope = self.rope_args(p, i);
        let (k_cache, v_cache) = (&self.k_cache[i], &self.v_cache[i]);
        // the fused product turns q and k without frequency factors
        let plain_qk = c.spec().qk == QkPrep::Plain && self.model.rope_factors.is_none();
        let q = if p.fused && plain_qk && l.wqkv.len() == 1 && r.fuses_qkv_rope(&l.wqkv[0], &rope, p.n, self.kv) {
            // the product turns q and k and writes k and v to the cache itself
            let out = ProductOut::QkvRope { q: &s.q, k_cache, v_cache, kv: self.kv, rope, places: p.places() };
            r.product(&l.wqkv[0], input, out, p.n).await?;
            &s.q
        } else {
            lora.project(r, &l.wqkv, input, &s.xn, &[&s.q, &s.k, &s.v], p.n).await?; // q [n][q_dim], k, v [n][kv_dim]
            let (q, k, v) = self.add_qkv_bias(r, l, p.n).await?; //                    Qwen2
            let norm = match (&l.q_norm, &l.k_norm) {
                (Some(q_weight), Some(k_weight)) => Some(QkNorm { q_weight, k_weight, eps: c.norm_eps }),
                _ => None,
            };
            // (per-head norms,) RoPE: q turned in place, k turned into the cache, v copied there
            let factors = self.model.rope_factors.as_ref();
            r.rope_kv_at(q, k, v, k_cache, v_cache, c.n_kv_head as u32, self.kv, rope, norm, factors, p.places()).await?;
            q
        };
        r.attention_at(q, k_cache, v_cache, &s.attn, self.attention_args(p, i), p.places()).await?; // [n][q_dim]
        self.branch_out(r, p, lora, &l.wo, &s.attn, l.post_attn_norm.as_ref(), x.buffer(), &s.x2).await
    }

    /// x = h + out(W_down · act(gate) ⊙ up), [gate; up] = W_gate_up · rms_norm(h).
    async fn ffn_block<'b>(&'b self, r: &mut Recorder<'_>, p: &Plan<'_>, lora: &Lora<'_>, i: usize, l: &'b Layer, h: Stream<'b>) -> Result<Stream<'b>, GpuError> {
        let (c, s) = (&self.model.config, &self.s);
        let gelu = c.spec().activation == Activation::GeluTanh;
        let folded = self.model.folded_norms.as_ref().map(|f| &f.ffn[i]);
        let input = self.branch_input(r, p, h, &l.ffn_norm, folded).await?; //  [n][n_embd]
        if p.fused && l.w_gate_up.len() == 1 && r.fuses_glu(&l.w_gate_up[0], p.n) {
            // act = act(gate) ⊙ up in the product                              [n][n_ff]
            r.product(&l.w_gate_up[0], input, ProductOut::Glu { out: &s.act, gelu }, p.n).await?;
        } else {
            lora.project(r, &l.w_gate_up, input, &s.xn, &[&s.gate, &s.up], p.n).await?; // [n][n_ff] each
            let len = p.n * c.n_ff as u32;
            if gelu {
                r.gelu_gate(&s.gate, &s.up, &s.act, len).await?
            } else {
                r.silu_gate(&s.gate, &s.up, &s.act, len).await?
            }
        }
        self.branch_out(r, p, lora, &l.w_down, &s.act, l.post_ffn_norm.as_ref(), h.buffer(), &s.x).await
    }

    /// What a block's product reads: rms_norm(x) · weight, fused into the product where the
    /// plan says so (with a pending branch added in first: `folded` holds [weight; its
    /// post-norm]), else normalised into xn first.
    async fn branch_input<'b>(
        &'b self,
        r: &mut Recorder<'_>,
        p: &Plan<'_>,
        x: Stream<'b>,
        weight: &'b wgpu::Buffer,
        folded: Option<&'b wgpu::Buffer>,
    ) -> Result<ProductIn<'b>, GpuError> {
        let c = &self.model.config;
        let eps = c.norm_eps;
        match (x, folded) {
            (Stream::Pending { branch, resid, sum, .. }, Some(weights)) if p.fused => return Ok(ProductIn::PostNormAdd { branch, resid, sum, weights, eps }),
            _ => {}
        }
        let x = self.materialize(r, x, p.n).await?;
        if p.fused {
            return Ok(ProductIn::RmsNorm { x, weight, eps });
        }
        r.rms_norm(x, weight, &self.s.xn, c.n_embd as u32, p.n, eps).await?;
        Ok(ProductIn::X(&self.s.xn))
    }

    /// The stream in its buffer: a pending branch added in by a dispatch of its own.
    async fn materialize<'b>(&self, r: &mut Recorder<'_>, x: Stream<'b>, n: u32) -> Result<&'b wgpu::Buffer, GpuError> {
        let c = &self.model.config;
        if let Stream::Pending { branch, post_norm, resid, sum } = x {
            r.rms_norm_add(branch, post_norm, resid, sum, c.n_embd as u32, n, c.norm_eps).await?;
        }
        Ok(x.buffer())
    }

    /// A branch's way back into the residual stream: resid + W · x, through the branch's own
    /// RMS norm where it has one (Gemma 3: into `sum`, or left for the next product to add in
    /// where the plan folds); otherwise added into resid in place.
    #[allow(clippy::too_many_arguments)]
    async fn branch_out<'b>(
        &'b self,
        r: &mut Recorder<'_>,
        p: &Plan<'_>,
        lora: &Lora<'_>,
        w: &GpuMatrix,
        x: &wgpu::Buffer,
        post_norm: Option<&'b wgpu::Buffer>,
        resid: &'b wgpu::Buffer,
        sum: &'b wgpu::Buffer,
    ) -> Result<Stream<'b>, GpuError> {
        let Some(post_norm) = post_norm else {
            lora.project_residual(r, w, x, resid, p.n).await?;
            return Ok(Stream::Ready(resid));
        };
        let branch = &self.s.t1;
        lora.project(r, std::slice::from_ref(w), ProductIn::X(x), x, &[branch], p.n).await?;
        let pending = Stream::Pending { branch, post_norm, resid, sum };
        if p.fold {
            return Ok(pending);
        }
        Ok(Stream::Ready(self.materialize(r, pending, p.n).await?))
    }

    /// q, k, v with their biases added where the layer has them (Qwen2).
    async fn add_qkv_bias(&self, r: &mut Recorder<'_>, l: &Layer, n: u32) -> Result<(&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer), GpuError> {
        let (c, s) = (&self.model.config, &self.s);
        let (Some(bq), Some(bk), Some(bv)) = (&l.bq, &l.bk, &l.bv) else {
            return Ok((&s.q, &s.k, &s.v));
        };
        let (q_dim, kv_dim) = ((c.n_head * c.head_dim) as u32, (c.n_kv_head * c.head_dim) as u32);
        r.add_bias(&s.q, bq, &s.q2, n * q_dim, q_dim).await?;
        r.add_bias(&s.k, bk, &s.k2, n * kv_dim, kv_dim).await?;
        r.add_bias(&s.v, bv, &s.v2, n * kv_dim, kv_dim).await?;
        Ok((&s.q2, &s.k2, &s.v2))
    }

    /// logits = W_out · rms_norm(x) for every token, or for the last one only, soft-capped
    /// where the model says so.
    async fn output_head(&self, r: &mut Recorder<'_>, lora: &Lora<'_>, n: u32, every_row: bool, x: Stream<'_>, greedy: bool) -> Result<Option<Best<'_>>, GpuError> {
        let (m, s) = (&*self.model, &self.s);
        let c = &m.config;
        let (d, vocab, eps) = (c.n_embd as u32, c.n_vocab as u32, c.norm_eps);
        let all_rows = self.all_logits || every_row;
        let n_out = if all_rows { n } else { 1 };
        // fused for one token, and for a step of several sequences where the block fuses
        let fuse = (n_out == 1 || (every_row && r.fuses_block(n_out))) && lora.adapters.is_empty();
        // a pending branch is added in by a dispatch of its own: folded into the head, each of
        // its thousands of workgroups would repeat that work (Gemma 3 decode: 5 ms against 0.1)
        let x = self.materialize(r, x, n).await?;
        let x_out = if all_rows || n == 1 {
            x
        } else {
            r.encoder().copy_buffer_to_buffer(x, (n as u64 - 1) * d as u64 * 4, &s.last, 0, d as u64 * 4);
            &s.last
        };
        let input = if fuse {
            ProductIn::RmsNorm { x: x_out, weight: &m.output_norm, eps }
        } else {
            r.rms_norm(x_out, &m.output_norm, &s.xn, d, n_out, eps).await?;
            ProductIn::X(&s.xn)
        };
        let head = m.output_head();
        // where a slot keeps the best of 8 rows or more (CPU devices' shapes; a GPU's row group
        // is one row, and its best-of list would be the logits again)
        let slots = ops::argmax_slots(&self.gpu, head);
        if greedy && n_out == 1 && fuse && c.final_softcap.is_none() && self.gpu.tuning.head_argmax && slots * 8 <= head.n_rows {
            r.product(head, input, ProductOut::Argmax { y: &s.logits, best_values: &s.best_values, best_ids: &s.best_ids }, 1).await?;
            let (values, ids) = ops::record_argmax_of(r, &self.top_k, &s.best_values, &s.best_ids, slots).await?;
            return Ok(Some(Best { values, ids }));
        }
        lora.project(r, std::slice::from_ref(head), input, &s.xn, &[&s.logits], n_out).await?;
        if let Some(cap) = c.final_softcap {
            r.softcap(&s.logits, &s.logits2, n_out * vocab, cap).await?;
            r.encoder().copy_buffer_to_buffer(&s.logits2, 0, &s.logits, 0, (n_out * vocab) as u64 * 4);
        }
        Ok(None)
    }

    /// RoPE of layer i for this batch: its base, and no rotation on layers without it.
    fn rope_args(&self, p: &Plan<'_>, i: usize) -> RopeArgs {
        let c = &self.model.config;
        RopeArgs {
            n_tokens: p.n,
            n_heads: c.n_head as u32,
            head_dim: c.head_dim as u32,
            n_rot: if c.has_rope(i) { c.n_rot as u32 } else { 0 },
            pos0: p.pos0,
            neox: c.spec().rope == RopeType::Neox,
            freq_base: c.rope_base_of(i),
            freq_scale: c.rope_freq_scale(),
        }
    }

    fn attention_args(&self, p: &Plan<'_>, i: usize) -> AttentionArgs {
        let c = &self.model.config;
        AttentionArgs {
            n_q: p.n,
            n_head: c.n_head as u32,
            n_kv_head: c.n_kv_head as u32,
            head_dim: c.head_dim as u32,
            pos0: p.pos0,
            window: c.window_of(i),
            scale: c.attn_scale,
            kv: self.kv,
        }
    }

    /// Record the read-back `then` of row n_last of the logits after what `r` holds, submit,
    /// and return the bytes read.
    async fn finish(&self, mut r: Recorder<'_>, n_last: usize, then: Readback, best: Option<Best<'_>>) -> Result<Vec<u8>, ModelError> {
        let v = self.model.config.n_vocab as u64;
        let row = n_last as u64 * v * 4;
        let bytes = match then {
            Readback::Nothing => 0,
            Readback::TopK(k) | Readback::MaskedTopK(k) if !self.all_logits => {
                let masked = matches!(then, Readback::MaskedTopK(_));
                let (values, ids) = match best {
                    Some(b) if then == Readback::TopK(1) => (b.values, b.ids),
                    _ => ops::record_top_k_masked(&mut r, &self.top_k, &self.s.logits, v as u32, k, masked).await?,
                };
                let half = k as u64 * 4;
                r.encoder().copy_buffer_to_buffer(ids, 0, &self.readback, 0, half);
                r.encoder().copy_buffer_to_buffer(values, 0, &self.readback, half, half);
                2 * half
            }
            // with every position's logits kept, top-k is taken on the CPU (top_k_of)
            Readback::TopK(_) | Readback::MaskedTopK(_) | Readback::Logits => {
                r.encoder().copy_buffer_to_buffer(&self.s.logits, row, &self.readback, 0, v * 4);
                v * 4
            }
        };
        r.submit()?;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        Ok(self.gpu.read_mapped(&self.readback, bytes).await?)
    }

    /// The k best (id, logit) from a TopK read-back.
    fn top_k_of(&self, bytes: &[u8], k: u32) -> Vec<(u32, f32)> {
        if self.all_logits {
            let logits: Vec<f32> = bytemuck::pod_collect_to_vec(bytes);
            return crate::reference::top_k(&logits, k as usize).into_iter().map(|(i, v)| (i as u32, v)).collect();
        }
        Self::best_of(bytes, k)
    }

    /// The (id, value) pairs of a GPU selection read back as k ids then k values.
    fn best_of(bytes: &[u8], k: u32) -> Vec<(u32, f32)> {
        let (ids, values) = bytes.split_at(k as usize * 4);
        let ids: Vec<u32> = bytemuck::pod_collect_to_vec(ids);
        let values: Vec<f32> = bytemuck::pod_collect_to_vec(values);
        // a masked selection with fewer than k allowed ids fills the rest with NO_ID
        ids.into_iter().zip(values).filter(|(id, _)| *id != ops::NO_ID).collect()
    }

    /// Row n_last of the logits, for reading them again after the step that computed them.
    fn last_row(&self) -> usize {
        if self.all_logits {
            self.last_batch.saturating_sub(1)
        } else {
            0
        }
    }

    /// Logits of the last evaluated token, `[n_vocab]`.
    pub async fn logits(&self) -> Result<Vec<f32>, ModelError> {
        let r = Recorder::with_cache(&self.gpu, self.dispatch.clone());
        let bytes = self.finish(r, self.last_row(), Readback::Logits, None).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Logits of every token of the last batch, `[n][n_vocab]` (needs all_logits).
    pub async fn batch_logits(&self, n: usize) -> Result<Vec<f32>, ModelError> {
        assert!(self.all_logits && n <= MAX_BATCH);
        Ok(self.gpu.read_f32(&self.s.logits, 0, n * self.model.config.n_vocab).await?)
    }

    /// The k best (id, logit) of the last token, selected on the GPU (k ≤ MAX_TOP_K).
    pub async fn top_k(&self, k: u32) -> Result<Vec<(u32, f32)>, ModelError> {
        let r = Recorder::with_cache(&self.gpu, self.dispatch.clone());
        let bytes = self.finish(r, self.last_row(), Readback::TopK(k), None).await?;
        Ok(self.top_k_of(&bytes, k))
    }
}
