//! One training sequence's forward and backward pass on the GPU: the loss of predicting each
//! token from the ones before it, and the gradients of every trained LoRA factor, added to what
//! they hold (a batch accumulates sequences; the optimizer step reads and clears them).
//!
//! The base model is frozen and stays as stored (quantized). Every layer's forward activations
//! are kept for the backward pass where they take at most KEEP_BUDGET; beyond it only the
//! residual stream's input is kept (`[n_layer][T][n_embd]`) and the backward pass recomputes
//! each layer's forward from it, then walks back through it (gradient checkpointing per layer):
//!   ffn:       x' = h + out(W_down · (act(W_gate·n2) ⊙ W_up·n2)),  n2 = rms_norm(h)
//!   attention: h  = x + out(W_o · attention(RoPE(qn(W_q·n1)), RoPE(kn(W_k·n1)), W_v·n1)),
//!              n1 = rms_norm(x)
//! where act is SiLU or tanh-GELU (Gemma 3), qn and kn are per-head RMS norms (Qwen3, Gemma 3)
//! or nothing, and out() is nothing or the branch's own RMS norm (Gemma 3's post-norms);
//! Gemma 3's embeddings are scaled by sqrt(n_embd).
//! and each adapted projection y = W·x + s·B·(A·x) (s = alpha / rank) adds
//!   dB += s · dyᵀ·(A·x),  dA += (s · dy·B)ᵀ·x,  dx += (s · dy·B)·A.

use crate::arch::{Activation, Config, Projections, RopeType};
use crate::device::{Gpu, GpuError};
use crate::error::{ByteSource, ModelError};
use crate::ggml_type::GgmlType;
use crate::gguf::Gguf;
use crate::held::Held;
use crate::lora::read_tensor;
use crate::model::{Layer, Model};
use crate::ops::{AttentionArgs, AttentionGrads, GpuMatrix, KvType, ProductIn, ProductOut, Recorder, RopeArgs};
use std::collections::BTreeMap;

/// The projections an adapter can train, by the names `--targets` uses.
pub const TARGETS: [(&str, &str); 7] =
    [("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output"), ("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down")];

/// Rows of the output head's logits computed at a time (their gradient is as large).
const HEAD_ROWS: u32 = 64;

/// The names of a pair's moment tensors, in the order of `TrainPair::moments`.
const MOMENTS: [&str; 4] = ["adam_m_a", "adam_v_a", "adam_m_b", "adam_v_b"];

/// One trained factor pair of a projection W: `[n_out][k]`: A `[rank][k]`, B `[n_out][rank]` (f32,
/// each one GPU buffer, the matrix the forward pass multiplies), and their gradients.
pub struct TrainPair {
    /// A: `[rank][k]`.
    pub a: GpuMatrix,
    /// B: `[n_out][rank]`.
    pub b: GpuMatrix,
    /// The gradient of A, accumulated over a step's sequences.
    pub grad_a: wgpu::Buffer,
    /// The gradient of B, accumulated over a step's sequences.
    pub grad_b: wgpu::Buffer,
    /// AdamW's first and second moments of A and of B.
    moments: [wgpu::Buffer; 4],
    /// The rank.
    pub rank: u32,
}

/// Activations of one layer's forward pass, for T tokens, that its backward pass reads.
struct Acts {
    n1: wgpu::Buffer,          // [T][n_embd] rms_norm(x)
    q: wgpu::Buffer,           // [T][n_head][head_dim], turned by RoPE in place
    k: wgpu::Buffer,           // [T][n_kv_head][head_dim] before RoPE
    v: wgpu::Buffer,           // [T][n_kv_head][head_dim]
    k_rot: wgpu::Buffer,       // [T][n_kv_head][head_dim] after RoPE (attention's keys)
    v_att: wgpu::Buffer,       // [T][n_kv_head][head_dim] attention's values
    qkv_b: [wgpu::Buffer; 3],  // q, k, v with their biases (Qwen2)
    qn: wgpu::Buffer,          // [T][n_head][head_dim] per-head normed q (Qwen3, Gemma 3)
    kn: wgpu::Buffer,          // [T][n_kv_head][head_dim] per-head normed k
    branch: [wgpu::Buffer; 2], // [T][n_embd] W_o·attn and W_down·act before their post-norms (Gemma 3)
    attn: wgpu::Buffer,        // [T][n_head][head_dim]
    h: wgpu::Buffer,           // [T][n_embd] after attention
    n2: wgpu::Buffer,          // [T][n_embd] rms_norm(h)
    gate: wgpu::Buffer,        // [T][n_ff]
    up: wgpu::Buffer,          // [T][n_ff]
    act: wgpu::Buffer,         // [T][n_ff]
}

/// The backward pass's scratch, and what the output head works in.
struct Scratch {
    dq_in: wgpu::Buffer,     // [T][n_head][head_dim] the gradient before the q norm
    dk_in: wgpu::Buffer,     // [T][n_kv_head][head_dim] the gradient before the k norm
    d_branch: wgpu::Buffer,  // [T][n_embd] the gradient before a post-norm
    out: wgpu::Buffer,       // [T][n_embd] the layer's output; rms_norm of the last one (head)
    dx: wgpu::Buffer,        // [T][n_embd] the gradient of the residual stream
    dn: wgpu::Buffer,        // [T][n_embd] the gradient of a norm's output
    d_attn: wgpu::Buffer,    // [T][n_head][head_dim]
    dq: wgpu::Buffer,        // [T][n_head][head_dim]
    dk: wgpu::Buffer,        // [T][n_kv_head][head_dim]
    dv: wgpu::Buffer,        // [T][n_kv_head][head_dim]
    stats: wgpu::Buffer,     // [T][n_head][4]
    d_act: wgpu::Buffer,     // [T][n_ff]
    d_gate: wgpu::Buffer,    // [T][n_ff]
    d_up: wgpu::Buffer,      // [T][n_ff]
    lora_u: wgpu::Buffer,    // [T][rank] A·x
    lora_g: wgpu::Buffer,    // [T][rank] dy·B
    lora_gs: wgpu::Buffer,   // [T][rank] s · dy·B
    ids: wgpu::Buffer,       // [T] u32 inputs
    targets: wgpu::Buffer,   // [T] u32 next tokens
    weights: wgpu::Buffer,   // [T] f32 the loss's weight per position
    loss: wgpu::Buffer,      // [T] f32
    head_x: wgpu::Buffer,    // [HEAD_ROWS][n_embd]
    head_dx: wgpu::Buffer,   // [HEAD_ROWS][n_embd]
    logits: wgpu::Buffer,    // [HEAD_ROWS][n_vocab]
    d_logits: wgpu::Buffer,  // [HEAD_ROWS][n_vocab]
    head_t: wgpu::Buffer,    // [HEAD_ROWS] u32
    head_w: wgpu::Buffer,    // [HEAD_ROWS] f32
    head_loss: wgpu::Buffer, // [HEAD_ROWS] f32
}

/// A model with LoRA factors being trained on it, and the buffers one sequence of up to `ctx`
/// tokens needs.
pub struct Trainer<'m> {
    /// The frozen base model.
    pub model: Held<'m, Model>,
    /// The device everything lives on.
    pub gpu: Held<'m, Gpu>,
    /// The factors' rank.
    pub rank: u32,
    /// LoRA alpha.
    pub alpha: f32,
    /// The longest sequence its buffers hold, in tokens.
    pub ctx: u32,
    /// Keyed by the base tensor's name, e.g. "blk.0.attn_q.weight".
    pub pairs: BTreeMap<String, TrainPair>,
    /// The residual stream's input to each layer, and the last layer's output: [T][n_embd].
    xs: Vec<wgpu::Buffer>,
    /// Each layer's forward activations (one shared set, recomputed layer by layer in the
    /// backward pass, where all of them would take more than KEEP_BUDGET).
    acts: Vec<Acts>,
    s: Scratch,
    /// GPU bytes allocated: (the factors with their gradients and AdamW moments, the
    /// activations and scratch); `memory_needed` computes the same from the configuration.
    pub bytes: (u64, u64),
}

/// GPU bytes a trainer of `rank` on `targets` for sequences of up to `ctx` tokens takes beside
/// the model's weights: (the factors with their gradients and AdamW moments, the activations
/// and scratch). What `Trainer::new` allocates, known before anything is.
pub fn memory_needed(c: &Config, targets: &[&str], rank: u32, ctx: u32) -> (u64, u64) {
    let (d, qd, kvd, ff) = (c.n_embd as u64, (c.n_head * c.head_dim) as u64, (c.n_kv_head * c.head_dim) as u64, c.n_ff as u64);
    let (r, t, hr, v) = (rank as u64, ctx as u64, HEAD_ROWS as u64, c.n_vocab as u64);
    // (n_out, k) of each target: factors, their gradients and two moments each, f32
    let shape = |name: &str| match name {
        "q" => (qd, d),
        "k" | "v" => (kvd, d),
        "o" => (d, qd),
        "gate" | "up" => (ff, d),
        _ => (d, ff),
    };
    let adapters: u64 = targets.iter().map(|n| shape(n)).map(|(n_out, k)| 6 * 4 * r * (k + n_out)).sum::<u64>() * c.n_layer as u64;
    let (acts, copies) = (layer_activations(c, ctx), activation_copies(c, ctx));
    let spec = c.spec();
    let (head_norm, post_norm) = (spec.qk == crate::arch::QkPrep::HeadNorm, spec.branch_out == crate::arch::BranchOut::NormThenAdd);
    let when = |yes: bool, n: u64| if yes { n } else { 0 };
    // per token, in f32 values: the residual stream per layer, then Scratch's [T][..] buffers
    let per_token = (c.n_layer as u64 + 1) * d + 3 * d + 2 * qd + 2 * kvd + 3 * ff + 3 * r + 4 * c.n_head as u64 + 4 + when(head_norm, qd + kvd) + when(post_norm, d);
    // scratch a model without head norms or post-norms allocates as one word each
    let placeholders = 4 * (when(!head_norm, 2) + when(!post_norm, 1));
    let head = 4 * hr * (2 * d + 2 * v + 3);
    (adapters, copies * acts + 4 * t * per_token + placeholders + head)
}

/// GPU bytes of every layer's forward activations kept (`Acts`) beyond which the backward pass
/// recomputes them layer by layer instead: each kept layer saves a second pass through its
/// products (SmolLM2 and Gemma 3 keep theirs up to 512-token sequences, ~480 MiB).
pub const KEEP_BUDGET: u64 = 512 << 20;

/// Bytes of one layer's `Acts` for sequences of up to `ctx` tokens.
fn layer_activations(c: &Config, ctx: u32) -> u64 {
    let (d, qd, kvd, ff, t) = (c.n_embd as u64, (c.n_head * c.head_dim) as u64, (c.n_kv_head * c.head_dim) as u64, c.n_ff as u64, ctx as u64);
    let spec = c.spec();
    let (bias, head_norm, post_norm) =
        (spec.qk == crate::arch::QkPrep::Bias, spec.qk == crate::arch::QkPrep::HeadNorm, spec.branch_out == crate::arch::BranchOut::NormThenAdd);
    let when = |yes: bool, n: u64| if yes { n } else { 0 };
    let per_token = 3 * d + 2 * qd + 4 * kvd + 3 * ff + when(bias, qd + 2 * kvd) + when(head_norm, qd + kvd) + when(post_norm, 2 * d);
    // buffers a model without them allocates as one word each
    4 * t * per_token + 4 * (when(!bias, 3) + when(!head_norm, 2) + when(!post_norm, 2))
}

/// How many layers' activations a trainer holds: all of them where they fit KEEP_BUDGET, else one.
fn activation_copies(c: &Config, ctx: u32) -> u64 {
    let all = c.n_layer as u64 * layer_activations(c, ctx);
    if all <= KEEP_BUDGET {
        c.n_layer as u64
    } else {
        1
    }
}

/// Why a model cannot be trained yet, or None.
pub fn unsupported(model: &Model) -> Option<String> {
    let (c, spec) = (&model.config, model.config.spec());
    let why = if spec.projections == Projections::Fused {
        "fused q/k/v and gate/up tensors"
    } else if c.final_softcap.is_some() {
        "soft-capped logits"
    } else if c.head_dim % 4 != 0 {
        "a head size that is no multiple of 4"
    } else {
        return None;
    };
    Some(format!("fine-tuning {} models is not supported yet ({why}); llama (3), qwen2, qwen3, smollm3 and gemma3 models are", c.arch_name))
}

impl<'m> Trainer<'m> {
    /// LoRA factors of `rank` on the projections named in `targets` (see [`TARGETS`]) of every
    /// layer: A uniform in ±1/sqrt(k) from `seed`, B zero (so training starts at the base model).
    /// The model and device are borrowed or shared, as a session's ([`Held`]).
    pub async fn new(
        model: impl Into<Held<'m, Model>>,
        gpu: impl Into<Held<'m, Gpu>>,
        targets: &[&str],
        rank: u32,
        alpha: f32,
        ctx: u32,
        seed: u64,
    ) -> Result<Trainer<'m>, ModelError> {
        let (held_model, held_gpu) = (model.into(), gpu.into());
        let (model, gpu): (&Model, &Gpu) = (&held_model, &held_gpu);
        if let Some(why) = unsupported(model) {
            return Err(ModelError::Training(why));
        }
        if rank == 0 || !rank.is_multiple_of(4) || rank > 256 || ctx < 2 {
            return Err(ModelError::Training(format!("rank {rank} and context {ctx}: the rank must be a multiple of 4 up to 256, the context at least 2")));
        }
        let c = &model.config;
        let mut pairs = BTreeMap::new();
        let mut rng = crate::rng::Rng::new(seed);
        for (l, layer) in model.layers.iter().enumerate() {
            for &t in targets {
                let Some((_, tensor)) = TARGETS.iter().find(|(name, _)| *name == t) else {
                    return Err(ModelError::Training(format!("unknown target '{t}': use some of q, k, v, o, gate, up, down")));
                };
                let name = format!("blk.{l}.{tensor}.weight");
                let (n_out, k) = projection_shape(layer, &name).ok_or_else(|| ModelError::Training(format!("the model has no tensor '{name}'")))?;
                let bound = 1.0 / (k as f32).sqrt();
                let a: Vec<f32> = (0..rank * k).map(|_| rng.uniform() * bound).collect();
                let a = GpuMatrix::upload(gpu, &format!("{name}.lora_a"), GgmlType::F32, k as u64, rank as u64, bytemuck::cast_slice(&a)).await?;
                let b = GpuMatrix::upload(gpu, &format!("{name}.lora_b"), GgmlType::F32, rank as u64, n_out as u64, &vec![0u8; (n_out * rank * 4) as usize]).await?;
                if a.chunks.len() != 1 || b.chunks.len() != 1 {
                    return Err(ModelError::Invalid(format!("{name}: a LoRA factor larger than one storage binding")));
                }
                let grad_a = gpu.storage("lora grad a", (rank * k) as u64 * 4).await?;
                let grad_b = gpu.storage("lora grad b", (n_out * rank) as u64 * 4).await?;
                let moments = [
                    gpu.storage("adam m a", (rank * k) as u64 * 4).await?,
                    gpu.storage("adam v a", (rank * k) as u64 * 4).await?,
                    gpu.storage("adam m b", (n_out * rank) as u64 * 4).await?,
                    gpu.storage("adam v b", (n_out * rank) as u64 * 4).await?,
                ];
                pairs.insert(name, TrainPair { a, b, grad_a, grad_b, moments, rank });
            }
        }
        let t = ctx as u64;
        let f = |n: usize| t * n as u64 * 4;
        let (d, qd, kvd, ff) = (c.n_embd, c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_ff);
        let activations = std::cell::Cell::new(0u64);
        let st = |label: &'static str, bytes: u64| {
            activations.set(activations.get() + bytes.max(4));
            gpu.storage(label, bytes.max(4))
        };
        let mut xs = Vec::new();
        for _ in 0..=c.n_layer {
            xs.push(st("residual", f(d)).await?);
        }
        let hr = HEAD_ROWS as u64;
        let spec = c.spec();
        let (head_norm, post_norm) = (spec.qk == crate::arch::QkPrep::HeadNorm, spec.branch_out == crate::arch::BranchOut::NormThenAdd);
        let bias = spec.qk == crate::arch::QkPrep::Bias;
        let or_word = |yes: bool, bytes: u64| if yes { bytes } else { 4 };
        let mut acts = Vec::new();
        for _ in 0..activation_copies(c, ctx) {
            acts.push(Acts {
                n1: st("n1", f(d)).await?,
                q: st("q", f(qd)).await?,
                k: st("k", f(kvd)).await?,
                v: st("v", f(kvd)).await?,
                k_rot: st("k rot", f(kvd)).await?,
                v_att: st("v att", f(kvd)).await?,
                qkv_b: [st("q b", or_word(bias, f(qd))).await?, st("k b", or_word(bias, f(kvd))).await?, st("v b", or_word(bias, f(kvd))).await?],
                qn: st("qn", or_word(head_norm, f(qd))).await?,
                kn: st("kn", or_word(head_norm, f(kvd))).await?,
                branch: [st("attn branch", or_word(post_norm, f(d))).await?, st("ffn branch", or_word(post_norm, f(d))).await?],
                attn: st("attn", f(qd)).await?,
                h: st("h", f(d)).await?,
                n2: st("n2", f(d)).await?,
                gate: st("gate", f(ff)).await?,
                up: st("up", f(ff)).await?,
                act: st("act", f(ff)).await?,
            });
        }
        let s = Scratch {
            dq_in: st("dq in", or_word(head_norm, f(qd))).await?,
            dk_in: st("dk in", or_word(head_norm, f(kvd))).await?,
            d_branch: st("d branch", or_word(post_norm, f(d))).await?,
            out: st("out", f(d)).await?,
            dx: st("dx", f(d)).await?,
            dn: st("dn", f(d)).await?,
            d_attn: st("d attn", f(qd)).await?,
            dq: st("dq", f(qd)).await?,
            dk: st("dk", f(kvd)).await?,
            dv: st("dv", f(kvd)).await?,
            stats: st("stats", f(c.n_head * 4)).await?,
            d_act: st("d act", f(ff)).await?,
            d_gate: st("d gate", f(ff)).await?,
            d_up: st("d up", f(ff)).await?,
            lora_u: st("lora u", f(rank as usize)).await?,
            lora_g: st("lora g", f(rank as usize)).await?,
            lora_gs: st("lora gs", f(rank as usize)).await?,
            ids: st("ids", t * 4).await?,
            targets: st("targets", t * 4).await?,
            weights: st("weights", t * 4).await?,
            loss: st("loss", t * 4).await?,
            head_x: st("head x", hr * d as u64 * 4).await?,
            head_dx: st("head dx", hr * d as u64 * 4).await?,
            logits: st("logits", hr * c.n_vocab as u64 * 4).await?,
            d_logits: st("d logits", hr * c.n_vocab as u64 * 4).await?,
            head_t: st("head targets", hr * 4).await?,
            head_w: st("head weights", hr * 4).await?,
            head_loss: st("head loss", hr * 4).await?,
        };
        let adapters = pairs.values().map(|p| 6 * 4 * p.rank as u64 * (p.a.k as u64 + p.b.n_rows as u64)).sum();
        let bytes = (adapters, activations.get());
        let trainer = Trainer { model: held_model, gpu: held_gpu, rank, alpha, ctx, pairs, xs, acts, s, bytes };
        trainer.zero_grads()?;
        Ok(trainer)
    }

    /// Layer l's forward activations: its own, or the one set all layers share.
    fn acts(&self, l: usize) -> &Acts {
        &self.acts[l.min(self.acts.len() - 1)]
    }

    /// alpha / rank: the factor each adapter's term B·(A·x) is scaled by.
    pub fn factor(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Clears every gradient.
    pub fn zero_grads(&self) -> Result<(), GpuError> {
        let mut enc = self.gpu.device.create_command_encoder(&Default::default());
        for p in self.pairs.values() {
            enc.clear_buffer(&p.grad_a, 0, None);
            enc.clear_buffer(&p.grad_b, 0, None);
        }
        self.gpu.queue.submit([enc.finish()]);
        self.gpu.check_lost()
    }

    /// Forward and backward over `ids` (at most ctx): the loss of predicting ids[t + 1] from
    /// ids[..=t], weighted by `weights[t + 1]` (0: not trained on), summed; the gradients of
    /// that sum are added to the pairs'. Returns the weighted loss sum.
    pub async fn accumulate(&mut self, ids: &[u32], weights: &[f32]) -> Result<f64, ModelError> {
        self.run(ids, weights, true).await
    }

    /// The same loss without the backward pass (validation): the gradients are left as they are.
    pub async fn loss(&mut self, ids: &[u32], weights: &[f32]) -> Result<f64, ModelError> {
        self.run(ids, weights, false).await
    }

    async fn run(&mut self, ids: &[u32], weights: &[f32], backward: bool) -> Result<f64, ModelError> {
        let c = &self.model.config;
        if ids.len() < 2 || ids.len() > self.ctx as usize || weights.len() != ids.len() {
            return Err(ModelError::Invalid(format!("a training sequence of {} tokens ({} weights) for a context of {}", ids.len(), weights.len(), self.ctx)));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(ModelError::Invalid(format!("token id {bad} is outside the vocabulary of {}", c.n_vocab)));
        }
        let n = ids.len() as u32 - 1;
        // only the positions with a loss go through the output head, their targets and
        // weights packed in order: runs of (first position, length)
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for t in (0..n).filter(|&t| weights[t as usize + 1] != 0.0) {
            match runs.last_mut() {
                Some((first, len)) if *first + *len == t => *len += 1,
                _ => runs.push((t, 1)),
            }
        }
        let packed = |v: &[u32]| -> Vec<u32> { runs.iter().flat_map(|&(t, len)| v[t as usize + 1..][..len as usize].to_vec()).collect() };
        let (targets, loss_weights) = (packed(ids), packed(bytemuck::cast_slice(weights)));
        let q = &self.gpu.queue;
        q.write_buffer(&self.s.ids, 0, bytemuck::cast_slice(&ids[..n as usize]));
        if !targets.is_empty() {
            q.write_buffer(&self.s.targets, 0, bytemuck::cast_slice(&targets));
            q.write_buffer(&self.s.weights, 0, bytemuck::cast_slice(&loss_weights));
        }
        let mut r = Recorder::new(&self.gpu);
        let m = &*self.model;
        match c.embed_scale() {
            Some(scale) => {
                r.gather(&m.token_embd, &self.s.ids, &self.s.out, n).await?;
                r.scale(&self.s.out, &self.xs[0], n * c.n_embd as u32, scale).await?;
            }
            None => r.gather(&m.token_embd, &self.s.ids, &self.xs[0], n).await?,
        }
        for l in 0..c.n_layer {
            self.layer_forward(&mut r, l, n).await?;
            let bytes = n as u64 * c.n_embd as u64 * 4;
            r.encoder().copy_buffer_to_buffer(&self.s.out, 0, &self.xs[l + 1], 0, bytes);
        }
        self.head(&mut r, n, &runs, backward).await?;
        for l in (0..c.n_layer).rev().filter(|_| backward) {
            if self.acts.len() < c.n_layer {
                self.layer_forward(&mut r, l, n).await?;
            }
            self.layer_backward(&mut r, l, n).await?;
        }
        r.submit()?;
        if targets.is_empty() {
            return Ok(0.0);
        }
        let losses = self.gpu.read_f32(&self.s.loss, 0, targets.len()).await?;
        Ok(losses.iter().map(|v| *v as f64).sum())
    }

    /// The gradients as they stand: base tensor name → (dA `[rank][k]`, dB `[n_out][rank]`).
    pub async fn gradients(&self) -> Result<BTreeMap<String, (Vec<f32>, Vec<f32>)>, GpuError> {
        let mut out = BTreeMap::new();
        for (name, p) in &self.pairs {
            let ga = self.gpu.read_f32(&p.grad_a, 0, (p.a.n_rows * p.a.k) as usize).await?;
            let gb = self.gpu.read_f32(&p.grad_b, 0, (p.b.n_rows * p.b.k) as usize).await?;
            out.insert(name.clone(), (ga, gb));
        }
        Ok(out)
    }

    /// The L2 norm of all gradients together (for clipping).
    pub async fn grad_norm(&self) -> Result<f64, GpuError> {
        let mut sum = 0.0f64;
        for (ga, gb) in self.gradients().await?.values() {
            sum += ga.iter().chain(gb).map(|v| (*v as f64).powi(2)).sum::<f64>();
        }
        Ok(sum.sqrt())
    }

    /// One AdamW step `h` on every factor from its gradient times `grad_scale` (1 / the
    /// batch's trained tokens, times the clipping factor), then the gradients cleared.
    pub async fn optimizer_step(&mut self, h: crate::reference::AdamW, grad_scale: f32) -> Result<(), GpuError> {
        let mut r = Recorder::new(&self.gpu);
        for p in self.pairs.values() {
            let [ma, va, mb, vb] = &p.moments;
            r.adamw(&p.a.chunks[0].buffer, &p.grad_a, ma, va, p.a.n_rows * p.a.k, h, grad_scale).await?;
            r.adamw(&p.b.chunks[0].buffer, &p.grad_b, mb, vb, p.b.n_rows * p.b.k, h, grad_scale).await?;
        }
        r.submit()?;
        self.zero_grads()
    }

    /// The factors as llama.cpp's GGUF LoRA adapter: `general.type` adapter, `adapter.type`
    /// lora, `adapter.lora.alpha`, and per projection `<base>.lora_a` (GGUF dims [k, rank]) and
    /// `<base>.lora_b` ([rank, n_out]), f32.
    pub async fn adapter_gguf(&self, name: &str) -> Result<Vec<u8>, GpuError> {
        let mut w = crate::gguf::GgufWriter::new();
        w.add_metadata("general.type", "adapter");
        w.add_metadata("general.architecture", self.model.config.arch_name.as_str());
        w.add_metadata("general.name", name);
        w.add_metadata("adapter.type", "lora");
        w.add_metadata("adapter.lora.alpha", self.alpha);
        for (base, p) in &self.pairs {
            let a = self.gpu.read_f32(&p.a.chunks[0].buffer, 0, (p.a.n_rows * p.a.k) as usize).await?;
            let b = self.gpu.read_f32(&p.b.chunks[0].buffer, 0, (p.b.n_rows * p.b.k) as usize).await?;
            w.add_tensor(format!("{base}.lora_a"), &[p.a.k as u64, p.rank as u64], GgmlType::F32, bytemuck::cast_slice(&a).to_vec());
            w.add_tensor(format!("{base}.lora_b"), &[p.rank as u64, p.b.n_rows as u64], GgmlType::F32, bytemuck::cast_slice(&b).to_vec());
        }
        Ok(w.to_bytes())
    }

    /// AdamW's moments of every pair as f32 tensors `<base>.adam_m_a`, `.adam_v_a`,
    /// `.adam_m_b` and `.adam_v_b` (A's shape, then B's), added to `w`.
    pub async fn write_moments(&self, w: &mut crate::gguf::GgufWriter) -> Result<(), GpuError> {
        for (base, p) in &self.pairs {
            let sizes = [p.a.n_rows * p.a.k, p.a.n_rows * p.a.k, p.b.n_rows * p.b.k, p.b.n_rows * p.b.k];
            for ((buffer, n), suffix) in p.moments.iter().zip(sizes).zip(MOMENTS) {
                let values = self.gpu.read_f32(buffer, 0, n as usize).await?;
                w.add_tensor(format!("{base}.{suffix}"), &[n as u64], GgmlType::F32, bytemuck::cast_slice(&values).to_vec());
            }
        }
        Ok(())
    }

    /// Takes AdamW's moments back from what [`Trainer::write_moments`] wrote for a run of the
    /// same targets and rank; a tensor missing or of another size is an error naming it.
    pub async fn load_moments<S: ByteSource>(&self, g: &Gguf, src: &mut S) -> Result<(), ModelError> {
        let mut values = Vec::with_capacity(4 * self.pairs.len());
        for (base, p) in &self.pairs {
            let sizes = [p.a.n_rows * p.a.k, p.a.n_rows * p.a.k, p.b.n_rows * p.b.k, p.b.n_rows * p.b.k];
            for (n, suffix) in sizes.into_iter().zip(MOMENTS) {
                let name = format!("{base}.{suffix}");
                let t = g.tensor(&name).ok_or_else(|| ModelError::Invalid(format!("no tensor {name} (other targets?)")))?;
                if t.ty != GgmlType::F32 || t.dims.iter().product::<u64>() != n as u64 {
                    return Err(ModelError::Invalid(format!("{name} is {} {:?}, not {n} f32 values (another rank?)", t.ty, t.dims)));
                }
                let bytes = read_tensor(g, src, t).await.map_err(ModelError::Io)?;
                let v: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes);
                if v.iter().any(|x| !x.is_finite()) {
                    return Err(ModelError::Invalid(format!("{name} holds values that are not finite")));
                }
                values.push(v);
            }
        }
        // only once every tensor is read and checked: an error changes nothing
        for (buffer, v) in self.pairs.values().flat_map(|p| &p.moments).zip(&values) {
            self.gpu.queue.write_buffer(buffer, 0, bytemuck::cast_slice(v));
        }
        Ok(())
    }

    /// Sets a pair's factors (tests start from nonzero B), A: `[rank][k]`, B: `[n_out][rank]`.
    pub fn set_factors(&self, name: &str, a: &[f32], b: &[f32]) -> Result<(), ModelError> {
        let p = self.pairs.get(name).ok_or_else(|| ModelError::Invalid(format!("no trained pair for '{name}'")))?;
        if a.len() != (p.a.n_rows * p.a.k) as usize || b.len() != (p.b.n_rows * p.b.k) as usize {
            return Err(ModelError::Invalid(format!("'{name}': factors of {} and {} values", a.len(), b.len())));
        }
        self.gpu.queue.write_buffer(&p.a.chunks[0].buffer, 0, bytemuck::cast_slice(a));
        self.gpu.queue.write_buffer(&p.b.chunks[0].buffer, 0, bytemuck::cast_slice(b));
        Ok(())
    }

    /// Starts from an adapter's factors (`--resume`): one of llama.cpp's GGUF LoRA adapters for
    /// this model with this run's targets and rank, f32 (as `adapter_gguf` writes them).
    pub async fn load_factors<S: ByteSource>(&self, g: &Gguf, src: &mut S) -> Result<(), ModelError> {
        let arch = self.model.config.arch_name.as_str();
        if g.get_str_opt("adapter.type")? != Some("lora") || g.get_str_opt("general.architecture")? != Some(arch) {
            return Err(ModelError::Invalid(format!("not a LoRA adapter for a {arch} model")));
        }
        for (name, p) in &self.pairs {
            let factor = |suffix: &str, n: u64| {
                let t =
                    g.tensor(&format!("{name}.{suffix}")).ok_or_else(|| ModelError::Invalid(format!("no tensor {name}.{suffix} (other targets, or another model?)")))?;
                if t.ty != GgmlType::F32 || t.dims.iter().product::<u64>() != n {
                    return Err(ModelError::Invalid(format!("{name}.{suffix} is {} {:?}, not {n} f32 values (another rank?)", t.ty, t.dims)));
                }
                Ok(t)
            };
            let (ta, tb) = (factor("lora_a", p.a.n_rows as u64 * p.a.k as u64)?, factor("lora_b", p.b.n_rows as u64 * p.b.k as u64)?);
            let a = read_tensor(g, src, ta).await.map_err(ModelError::Io)?;
            let b = read_tensor(g, src, tb).await.map_err(ModelError::Io)?;
            // the bytes of a read need not be aligned for f32: copied
            self.set_factors(name, &bytemuck::pod_collect_to_vec(&a), &bytemuck::pod_collect_to_vec(&b))?;
        }
        Ok(())
    }

    /// Layer l's forward pass from xs[l] into s.out, keeping its activations in the scratch.
    async fn layer_forward(&self, r: &mut Recorder<'_>, l: usize, n: u32) -> Result<(), GpuError> {
        let (c, s, a, ly) = (&self.model.config, &self.s, self.acts(l), &self.model.layers[l]);
        let (d, eps) = (c.n_embd as u32, c.norm_eps);
        let x = &self.xs[l];
        r.rms_norm(x, &ly.attn_norm, &a.n1, d, n, eps).await?; //                        n1 [n][d]
        self.project(r, &ly.wqkv, &a.n1, &[&a.q, &a.k, &a.v], n).await?; //              q, k, v
        let (q, k, v) = self.qkv_bias(r, a, ly, n).await?;
        let (q, k) = self.head_norms(r, a, ly, q, k, n).await?;
        let rope = self.rope_args(l, n, c.n_head as u32, 1.0);
        // q turned in place; k turned and v copied into the attention's keys and values
        let factors = self.model.rope_factors.as_ref();
        r.rope_kv_normed(q, k, v, &a.k_rot, &a.v_att, c.n_kv_head as u32, KvType::F32, rope, None, factors).await?;
        r.attention(q, &a.k_rot, &a.v_att, &a.attn, self.attention_args(l, n)).await?; //   [n][q_dim]
        self.branch_out(r, &ly.wo, &a.attn, ly.post_attn_norm.as_ref(), &a.branch[0], x, &a.h, n).await?; // h = x + out(W_o·attn)
        r.rms_norm(&a.h, &ly.ffn_norm, &a.n2, d, n, eps).await?; //                       n2 [n][d]
        self.project(r, &ly.w_gate_up, &a.n2, &[&a.gate, &a.up], n).await?; //            gate, up [n][n_ff]
        if c.spec().activation == Activation::GeluTanh {
            r.gelu_gate(&a.gate, &a.up, &a.act, n * c.n_ff as u32).await?; //            act [n][n_ff]
        } else {
            r.silu_gate(&a.gate, &a.up, &a.act, n * c.n_ff as u32).await?;
        }
        self.branch_out(r, &ly.w_down, &a.act, ly.post_ffn_norm.as_ref(), &a.branch[1], &a.h, &s.out, n).await
        // out = h + out(W_down·act)
    }

    /// sum = resid + W·x, through the branch's own RMS norm where it has one (Gemma 3:
    /// resid + rms_norm(W·x), W·x kept in `pre` for the backward pass).
    #[allow(clippy::too_many_arguments)]
    async fn branch_out(
        &self,
        r: &mut Recorder<'_>,
        w: &GpuMatrix,
        x: &wgpu::Buffer,
        post_norm: Option<&wgpu::Buffer>,
        pre: &wgpu::Buffer,
        resid: &wgpu::Buffer,
        sum: &wgpu::Buffer,
        n: u32,
    ) -> Result<(), GpuError> {
        let c = &self.model.config;
        let Some(norm) = post_norm else {
            r.encoder().copy_buffer_to_buffer(resid, 0, sum, 0, n as u64 * c.n_embd as u64 * 4);
            return self.project_residual(r, w, x, sum, n).await;
        };
        self.project(r, std::slice::from_ref(w), x, &[pre], n).await?;
        r.rms_norm_add(pre, norm, resid, sum, c.n_embd as u32, n, c.norm_eps).await
    }

    /// The per-head RMS norms of q and k where the layer has them (Qwen3, Gemma 3): the
    /// buffers RoPE and attention then read.
    async fn head_norms<'b>(
        &'b self,
        r: &mut Recorder<'_>,
        a: &'b Acts,
        ly: &Layer,
        q: &'b wgpu::Buffer,
        k: &'b wgpu::Buffer,
        n: u32,
    ) -> Result<(&'b wgpu::Buffer, &'b wgpu::Buffer), GpuError> {
        let c = &self.model.config;
        let (Some(qn), Some(kn)) = (&ly.q_norm, &ly.k_norm) else { return Ok((q, k)) };
        let hd = c.head_dim as u32;
        r.rms_norm(q, qn, &a.qn, hd, n * c.n_head as u32, c.norm_eps).await?;
        r.rms_norm(k, kn, &a.kn, hd, n * c.n_kv_head as u32, c.norm_eps).await?;
        Ok((&a.qn, &a.kn))
    }

    /// Layer l's backward pass: s.dx holds dL/d(its output) and afterwards dL/d(its input);
    /// the layer's adapters' gradients are added to.
    async fn layer_backward(&self, r: &mut Recorder<'_>, l: usize, n: u32) -> Result<(), GpuError> {
        let (c, s, a, ly) = (&self.model.config, &self.s, self.acts(l), &self.model.layers[l]);
        let (d, eps, ff) = (c.n_embd as u32, c.norm_eps, c.n_ff as u32);
        // out = h + out(W_down·act)
        let dy = self.branch_out_backward(r, ly.post_ffn_norm.as_ref(), &a.branch[1], n).await?;
        r.product_backward(&ly.w_down, dy, &s.d_act, n, false).await?;
        self.lora_backward(r, &ly.w_down.name, &a.act, dy, &s.d_act, n).await?;
        let gelu = c.spec().activation == Activation::GeluTanh;
        r.glu_backward(&a.gate, &a.up, &s.d_act, &s.d_gate, &s.d_up, n * ff, gelu).await?;
        self.project_backward(r, &ly.w_gate_up, &a.n2, &[&s.d_gate, &s.d_up], &s.dn, n).await?;
        r.rms_norm_backward(&a.h, &ly.ffn_norm, &s.dn, &s.dx, d, n, eps, true).await?; // dx = dL/dh
                                                                                       // h = x + out(W_o·attn)
        let dy = self.branch_out_backward(r, ly.post_attn_norm.as_ref(), &a.branch[0], n).await?;
        r.product_backward(&ly.wo, dy, &s.d_attn, n, false).await?;
        self.lora_backward(r, &ly.wo.name, &a.attn, dy, &s.d_attn, n).await?;
        // the q attention read: normed per head, or with its bias, or as projected; turned by
        // RoPE in place
        let (q_in, k_in) = if ly.bq.is_some() { (&a.qkv_b[0], &a.qkv_b[1]) } else { (&a.q, &a.k) };
        let q = if ly.q_norm.is_some() { &a.qn } else { q_in };
        let grads = AttentionGrads { q, k: &a.k_rot, v: &a.v_att, dout: &s.d_attn, dq: &s.dq, dk: &s.dk, dv: &s.dv, stats: &s.stats };
        r.attention_backward(&grads, self.attention_args(l, n)).await?;
        // RoPE is a rotation: its gradient turns back by the same angle
        if c.has_rope(l) {
            let factors = self.model.rope_factors.as_ref();
            r.rope(&s.dq, self.rope_args(l, n, c.n_head as u32, -1.0), factors).await?;
            r.rope(&s.dk, self.rope_args(l, n, c.n_kv_head as u32, -1.0), factors).await?;
        }
        let (dq, dk) = match (&ly.q_norm, &ly.k_norm) {
            (Some(qn), Some(kn)) => {
                let hd = c.head_dim as u32;
                r.rms_norm_backward(q_in, qn, &s.dq, &s.dq_in, hd, n * c.n_head as u32, eps, false).await?;
                r.rms_norm_backward(k_in, kn, &s.dk, &s.dk_in, hd, n * c.n_kv_head as u32, eps, false).await?;
                (&s.dq_in, &s.dk_in)
            }
            _ => (&s.dq, &s.dk),
        };
        self.project_backward(r, &ly.wqkv, &a.n1, &[dq, dk, &s.dv], &s.dn, n).await?;
        r.rms_norm_backward(&self.xs[l], &ly.attn_norm, &s.dn, &s.dx, d, n, eps, true).await
        // dx = dL/dx
    }

    /// The gradient of a branch's W·x from s.dx (dL/d(its sum)): s.dx itself, or through the
    /// branch's post-norm (whose input was kept in `pre`).
    async fn branch_out_backward<'b>(&'b self, r: &mut Recorder<'_>, post_norm: Option<&wgpu::Buffer>, pre: &wgpu::Buffer, n: u32) -> Result<&'b wgpu::Buffer, GpuError> {
        let (c, s) = (&self.model.config, &self.s);
        let Some(norm) = post_norm else { return Ok(&s.dx) };
        r.rms_norm_backward(pre, norm, &s.dx, &s.d_branch, c.n_embd as u32, n, c.norm_eps, false).await?;
        Ok(&s.d_branch)
    }

    /// The output head and the loss at the positions of `runs` ((first, length) in order;
    /// positions without a loss need no logits), in blocks of HEAD_ROWS packed positions:
    /// logits = W_out · rms_norm(x), their cross-entropy's gradient back to s.dx (dL/d(last
    /// output), zero elsewhere). s.targets and s.weights hold the packed positions'.
    async fn head(&self, r: &mut Recorder<'_>, n: u32, runs: &[(u32, u32)], backward: bool) -> Result<(), GpuError> {
        let (m, s) = (&*self.model, &self.s);
        let c = &m.config;
        let (d, v) = (c.n_embd as u32, c.n_vocab as u32);
        let x = &self.xs[c.n_layer];
        r.rms_norm(x, &m.output_norm, &s.out, d, n, c.norm_eps).await?;
        if backward {
            r.encoder().clear_buffer(&s.dn, 0, Some(n as u64 * d as u64 * 4));
        }
        let row = d as u64 * 4;
        let total: u32 = runs.iter().map(|r| r.1).sum();
        // (position, packed index, rows) of each piece of a run inside a block
        let pieces = |first: u32, rows: u32| {
            let mut out = Vec::new();
            let mut at = 0;
            for &(t, len) in runs {
                let (lo, hi) = (at.max(first), (at + len).min(first + rows));
                if lo < hi {
                    out.push((t + lo - at, lo - first, hi - lo));
                }
                at += len;
            }
            out
        };
        for first in (0..total).step_by(HEAD_ROWS as usize) {
            let rows = HEAD_ROWS.min(total - first);
            let enc = r.encoder();
            for &(t, i, len) in &pieces(first, rows) {
                enc.copy_buffer_to_buffer(&s.out, t as u64 * row, &s.head_x, i as u64 * row, len as u64 * row);
            }
            enc.copy_buffer_to_buffer(&s.targets, first as u64 * 4, &s.head_t, 0, rows as u64 * 4);
            enc.copy_buffer_to_buffer(&s.weights, first as u64 * 4, &s.head_w, 0, rows as u64 * 4);
            r.product(m.output_head(), ProductIn::X(&s.head_x), ProductOut::Split(&[&s.logits]), rows).await?;
            r.cross_entropy(&s.logits, &s.head_t, &s.head_w, &s.d_logits, &s.head_loss, v, rows).await?;
            r.encoder().copy_buffer_to_buffer(&s.head_loss, 0, &s.loss, first as u64 * 4, rows as u64 * 4);
            if backward {
                r.product_backward(m.output_head(), &s.d_logits, &s.head_dx, rows, false).await?;
                let enc = r.encoder();
                for &(t, i, len) in &pieces(first, rows) {
                    enc.copy_buffer_to_buffer(&s.head_dx, i as u64 * row, &s.dn, t as u64 * row, len as u64 * row);
                }
            }
        }
        if !backward {
            return Ok(());
        }
        r.rms_norm_backward(x, &m.output_norm, &s.dn, &s.dx, d, n, c.norm_eps, false).await
    }

    /// The parts of `matrices`, in order, into `outs` (one per part), with the trained terms.
    async fn project(&self, r: &mut Recorder<'_>, matrices: &[GpuMatrix], x: &wgpu::Buffer, outs: &[&wgpu::Buffer], n: u32) -> Result<(), GpuError> {
        let mut rest = outs;
        for w in matrices {
            let (mine, others) = rest.split_at(w.parts.len());
            rest = others;
            r.product(w, ProductIn::X(x), ProductOut::Split(mine), n).await?;
            for ((name, _), y) in w.parts.iter().zip(mine) {
                self.lora_forward(r, name, x, y, n).await?;
            }
        }
        Ok(())
    }

    /// y += W·x for one plain matrix, its trained term included.
    async fn project_residual(&self, r: &mut Recorder<'_>, w: &GpuMatrix, x: &wgpu::Buffer, y: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        r.product(w, ProductIn::X(x), ProductOut::Residual(y), n).await?;
        self.lora_forward(r, &w.name, x, y, n).await
    }

    /// y [n][n_out] += s·B·(A·x) where `name` is trained.
    async fn lora_forward(&self, r: &mut Recorder<'_>, name: &str, x: &wgpu::Buffer, y: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        let Some(p) = self.pairs.get(name) else { return Ok(()) };
        r.skinny_product(&p.a, x, &self.s.lora_u, n, 1.0, false).await?; //                 u = A·x [n][rank]
        r.skinny_product(&p.b, &self.s.lora_u, y, n, self.factor(), true).await //            y += s·B·u
    }

    /// dx = Σ over the parts of `matrices` of dy_part · W_part, and the trained terms' share;
    /// their gradients added to. dys: one per part, in order.
    async fn project_backward(
        &self,
        r: &mut Recorder<'_>,
        matrices: &[GpuMatrix],
        x: &wgpu::Buffer,
        dys: &[&wgpu::Buffer],
        dx: &wgpu::Buffer,
        n: u32,
    ) -> Result<(), GpuError> {
        let mut first = true;
        let mut rest = dys;
        for w in matrices {
            let (mine, others) = rest.split_at(w.parts.len());
            rest = others;
            for (i, dy) in mine.iter().enumerate() {
                r.product_backward_part(w, i, dy, dx, n, !first).await?;
                first = false;
                self.lora_backward(r, &w.parts[i].0, x, dy, dx, n).await?;
            }
        }
        Ok(())
    }

    /// For a trained `name` with input x [n][k] and output gradient dy [n][n_out]: its
    /// factors' gradients, and dx += s·(dy·B)·A.
    async fn lora_backward(&self, r: &mut Recorder<'_>, name: &str, x: &wgpu::Buffer, dy: &wgpu::Buffer, dx: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        let Some(p) = self.pairs.get(name) else { return Ok(()) };
        let s = &self.s;
        let (rank, k, n_out, f) = (p.rank, p.a.k, p.b.n_rows, self.factor());
        r.skinny_product(&p.a, x, &s.lora_u, n, 1.0, false).await?; //                      u = A·x [n][rank]
        r.weight_gradient(dy, &s.lora_u, &p.grad_b, n_out, rank, n, n_out, 0, f).await?; // dB += s·dyᵀ·u
        r.product_backward(&p.b, dy, &s.lora_g, n, false).await?; //                      g = dy·B [n][rank]
        r.scale(&s.lora_g, &s.lora_gs, n * rank, f).await?;
        r.weight_gradient(&s.lora_gs, x, &p.grad_a, rank, k, n, rank, 0, 1.0).await?; //   dA += (s·g)ᵀ·x
        r.product_backward(&p.a, &s.lora_gs, dx, n, true).await //                          dx += (s·g)·A
    }

    /// q, k, v with their biases added where the layer has them (Qwen2).
    async fn qkv_bias<'b>(&self, r: &mut Recorder<'_>, s: &'b Acts, ly: &Layer, n: u32) -> Result<(&'b wgpu::Buffer, &'b wgpu::Buffer, &'b wgpu::Buffer), GpuError> {
        let c = &self.model.config;
        let (Some(bq), Some(bk), Some(bv)) = (&ly.bq, &ly.bk, &ly.bv) else { return Ok((&s.q, &s.k, &s.v)) };
        let (qd, kvd) = ((c.n_head * c.head_dim) as u32, (c.n_kv_head * c.head_dim) as u32);
        r.add_bias(&s.q, bq, &s.qkv_b[0], n * qd, qd).await?;
        r.add_bias(&s.k, bk, &s.qkv_b[1], n * kvd, kvd).await?;
        r.add_bias(&s.v, bv, &s.qkv_b[2], n * kvd, kvd).await?;
        Ok((&s.qkv_b[0], &s.qkv_b[1], &s.qkv_b[2]))
    }

    /// Layer l's RoPE over n tokens of `heads` heads from position 0; `sign` -1 turns back.
    fn rope_args(&self, l: usize, n: u32, heads: u32, sign: f32) -> RopeArgs {
        let c = &self.model.config;
        RopeArgs {
            n_tokens: n,
            n_heads: heads,
            head_dim: c.head_dim as u32,
            n_rot: if c.has_rope(l) { c.n_rot as u32 } else { 0 },
            pos0: 0,
            neox: c.spec().rope == RopeType::Neox,
            freq_base: c.rope_base_of(l),
            freq_scale: sign * c.rope_freq_scale(),
        }
    }

    fn attention_args(&self, l: usize, n: u32) -> AttentionArgs {
        let c = &self.model.config;
        AttentionArgs {
            n_q: n,
            n_head: c.n_head as u32,
            n_kv_head: c.n_kv_head as u32,
            head_dim: c.head_dim as u32,
            pos0: 0,
            window: c.window_of(l),
            scale: c.attn_scale,
            kv: KvType::F32,
        }
    }
}

/// (n_out, k) of the projection `name` in layer `l`.
fn projection_shape(l: &Layer, name: &str) -> Option<(u32, u32)> {
    let all = l.wqkv.iter().chain(&l.w_gate_up).chain([&l.wo, &l.w_down]);
    for w in all {
        if let Some((_, rows)) = w.parts.iter().find(|(n, _)| n == name) {
            return Some((*rows, w.k));
        }
    }
    None
}
