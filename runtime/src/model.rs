//! Decoder-only transformer models, driven entirely by GGUF metadata: Llama (Llama 2/3, SmolLM,
//! Mistral-style), Qwen2 (biases on q/k/v), Qwen3 (per-head RMSNorm on q and k) and Gemma 3
//! (scaled embeddings, q/k norms, norms after attention and FFN, GELU, alternating sliding-window
//! layers).
//!
//! One layer, as the papers write it (x: [n_tokens][n_embd]):
//!   h   = x + Wo · Attn(RoPE(Wq · norm(x)), RoPE(Wk · norm(x)), Wv · norm(x))
//!   out = h + Wdown · (act(Wgate · norm(h)) ⊙ Wup · norm(h))
//! Gemma 3 also normalises each branch's output before adding it back.
//!
//! How it is dispatched, one token at a time (decode): Wq|Wk|Wv stacked, with norm(x) fused in
//! and (adjacent-pair RoPE, as Llama GGUFs use) RoPE and the KV-cache write too, else those in a
//! dispatch of their own; attention; Wo added into x; Wgate|Wup stacked, with norm(h) and
//! act(gate) ⊙ up fused in; Wdown added into x. Five or six dispatches a layer, because on CPU
//! devices a dispatch costs tens of microseconds whatever it does (`nomoat bench --profile`).

use crate::device::{Gpu, GpuError};
use crate::ggml_type::GgmlType;
use crate::gguf::{Gguf, GgufError, TensorInfo};
use crate::ops::{self, AttentionArgs, DispatchCache, GpuMatrix, KvType, ProductIn, ProductOut, QkNorm, Recorder, RopeArgs, TopKScratch, MAX_TOP_K};
use crate::lora::LoraAdapter;
use crate::quant;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture '{0}' (nomoat runs llama, qwen2, qwen3 and gemma3)")]
    UnsupportedArchitecture(String),
    #[error("{0}")]
    Metadata(#[from] GgufError),
    #[error("tensor '{0}' is missing from the model file")]
    MissingTensor(String),
    #[error("tensor '{name}' has shape {got:?}, expected {want:?}")]
    BadShape { name: String, got: Vec<u64>, want: Vec<u64> },
    #[error("tensor '{name}' has type {ty}, which nomoat cannot run")]
    UnsupportedType { name: String, ty: GgmlType },
    #[error("tensor '{name}' holds a non-finite value")]
    NonFinite { name: String },
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("reading the model file: {0}")]
    Io(String),
    #[error("out of GPU memory loading the model: it needs {needed} bytes ({} MiB) of weights, and {loaded} bytes were on the GPU when {cause}; everything was freed. Try a smaller model or quantization, or close other programs using the GPU", needed >> 20)]
    OutOfMemoryLoading { needed: u64, loaded: u64, cause: GpuError },
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("the context is full: {needed} tokens needed but the context holds {n_ctx} (use a larger --ctx-size, at most {max})")]
    ContextFull { needed: usize, n_ctx: usize, max: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub arch: Arch,
    pub arch_name: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub norm_eps: f32,
    pub rope_base: f32,
    /// RoPE base of the sliding-window layers (Gemma 3 uses 10,000 there).
    pub rope_base_local: f32,
    pub rope_freq_scale: f32,
    pub n_rot: usize,
    pub rope_neox: bool,
    pub attn_scale: f32,
    /// Some(window) for layers that attend only to the last `window` positions.
    pub sliding_window: Option<usize>,
    /// Layer i uses the sliding window unless (i + 1) % pattern == 0.
    pub sliding_pattern: usize,
    pub embed_scale: Option<f32>,
    pub final_softcap: Option<f32>,
    pub qk_norm: bool,
    pub post_norms: bool,
    pub qkv_bias: bool,
    pub gelu: bool,
}

impl Config {
    pub fn from_gguf(g: &Gguf) -> Result<Config, ModelError> {
        let name = g.architecture()?.to_string();
        let arch = match name.as_str() {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma3" => Arch::Gemma3,
            _ => return Err(ModelError::UnsupportedArchitecture(name)),
        };
        let key = |k: &str| format!("{name}.{k}");
        let n_embd = g.get_u64(&key("embedding_length"))? as usize;
        let n_head = g.get_u64(&key("attention.head_count"))? as usize;
        let n_kv_head = g.get_u64_opt(&key("attention.head_count_kv"))?.map(|v| v as usize).unwrap_or(n_head);
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(ModelError::Invalid(format!("{n_head} query heads cannot share {n_kv_head} key/value heads")));
        }
        let head_dim = g.get_u64_opt(&key("attention.key_length"))?.map(|v| v as usize).unwrap_or(n_embd / n_head);
        let token_embd = g.tensor("token_embd.weight").ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let n_vocab = token_embd.n_rows() as usize;
        let rope_base = g.get_f32_opt(&key("rope.freq_base"))?.unwrap_or(10000.0);
        let rope_freq_scale = match (g.get_str_opt(&key("rope.scaling.type"))?, g.get_f32_opt(&key("rope.scaling.factor"))?) {
            (Some("linear"), Some(f)) if f > 0.0 => 1.0 / f,
            (Some(t), _) if t != "none" && t != "linear" => {
                return Err(ModelError::Invalid(format!("RoPE scaling '{t}' is not supported yet")));
            }
            _ => 1.0,
        };
        let gemma = arch == Arch::Gemma3;
        let sliding_window = if gemma { g.get_u64_opt(&key("attention.sliding_window"))?.map(|v| v as usize) } else { None };
        let attn_scale = if gemma {
            // llama.cpp: Gemma 3 scales queries by 1/sqrt(key_length), or by the query pre-attention scalar when given
            match g.get_f32_opt(&key("attention.query_pre_attn_scalar"))? {
                Some(s) if s > 0.0 => 1.0 / s.sqrt(),
                _ => 1.0 / (head_dim as f32).sqrt(),
            }
        } else {
            1.0 / (head_dim as f32).sqrt()
        };
        let c = Config {
            arch,
            n_layer: g.get_u64(&key("block_count"))? as usize,
            n_embd,
            n_ff: g.get_u64(&key("feed_forward_length"))? as usize,
            n_head,
            n_kv_head,
            head_dim,
            n_vocab,
            n_ctx_train: g.get_u64_opt(&key("context_length"))?.unwrap_or(2048) as usize,
            norm_eps: g.get_f32_opt(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_base,
            rope_base_local: if gemma { g.get_f32_opt(&key("rope.freq_base_swa"))?.unwrap_or(10000.0) } else { rope_base },
            rope_freq_scale,
            n_rot: g.get_u64_opt(&key("rope.dimension_count"))?.map(|v| v as usize).unwrap_or(head_dim),
            rope_neox: arch != Arch::Llama,
            attn_scale,
            sliding_window,
            sliding_pattern: 6,
            embed_scale: gemma.then(|| (n_embd as f32).sqrt()),
            final_softcap: g.get_f32_opt(&key("final_logit_softcapping"))?.filter(|v| *v > 0.0),
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Gemma3),
            post_norms: gemma,
            qkv_bias: arch == Arch::Qwen2,
            gelu: gemma,
            arch_name: name,
        };
        if c.head_dim > ops::MAX_HEAD_DIM as usize || c.head_dim % 2 != 0 || c.n_rot > c.head_dim {
            return Err(ModelError::Invalid(format!("head size {} (RoPE over {}) is not supported", c.head_dim, c.n_rot)));
        }
        Ok(c)
    }

    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && (layer + 1) % self.sliding_pattern != 0
    }

    /// KV cache bytes per token of context.
    pub fn kv_bytes_per_token(&self, kv: KvType) -> u64 {
        2 * self.n_layer as u64 * (self.n_kv_head * self.head_dim) as u64 * kv.bytes()
    }
}

/// Where model bytes come from: a file natively, a `File` or a download in the browser.
#[allow(async_fn_in_trait)]
pub trait ByteSource {
    async fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
}

#[cfg(not(target_arch = "wasm32"))]
impl ByteSource for std::fs::File {
    async fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        use std::io::{Read, Seek, SeekFrom};
        self.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
        self.read_exact(buf).map_err(|e| e.to_string())
    }
}

impl ByteSource for &[u8] {
    async fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let end = offset as usize + buf.len();
        let src = self.get(offset as usize..end).ok_or_else(|| format!("read past the end at {end}"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

pub struct Layer {
    pub attn_norm: wgpu::Buffer,     // [n_embd]
    /// q [n_head * head_dim][n_embd], k and v [n_kv_head * head_dim][n_embd], stacked into one
    /// matrix (parts q, k, v) when their types match, else consecutive runs of one type.
    pub wqkv: Vec<GpuMatrix>,
    pub bq: Option<wgpu::Buffer>,    // [n_head * head_dim]
    pub bk: Option<wgpu::Buffer>,    // [n_kv_head * head_dim]
    pub bv: Option<wgpu::Buffer>,    // [n_kv_head * head_dim]
    pub q_norm: Option<wgpu::Buffer>, // [head_dim]
    pub k_norm: Option<wgpu::Buffer>, // [head_dim]
    pub wo: GpuMatrix,               // [n_embd][n_head * head_dim]
    pub post_attn_norm: Option<wgpu::Buffer>, // [n_embd]
    pub ffn_norm: wgpu::Buffer,      // [n_embd]
    /// gate and up [n_ff][n_embd], stacked (parts gate, up) when their types match.
    pub w_gate_up: Vec<GpuMatrix>,
    pub w_down: GpuMatrix,           // [n_embd][n_ff]
    pub post_ffn_norm: Option<wgpu::Buffer>, // [n_embd]
}

pub struct Model {
    pub config: Config,
    pub token_embd: GpuMatrix,       // [n_vocab][n_embd]
    pub layers: Vec<Layer>,
    pub output_norm: wgpu::Buffer,   // [n_embd]
    /// None when the output head is tied to token_embd.
    pub output: Option<GpuMatrix>,   // [n_vocab][n_embd]
    pub weight_bytes: u64,
}

/// Progress of a load: bytes read from the source and uploaded so far, of the total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

struct Loader<'a, S: ByteSource> {
    gguf: &'a Gguf,
    gpu: &'a Gpu,
    src: &'a mut S,
    done: u64,
    total: u64,
    progress: Progress<'a>,
}

impl<S: ByteSource> Loader<'_, S> {
    fn info(&self, name: &str) -> Result<TensorInfo, ModelError> {
        self.gguf.tensor(name).cloned().ok_or_else(|| ModelError::MissingTensor(name.into()))
    }

    async fn bytes(&mut self, t: &TensorInfo) -> Result<Vec<u8>, ModelError> {
        let range = self.gguf.tensor_data_range(t);
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.src.read_at(range.start, &mut buf).await.map_err(|e| ModelError::Io(format!("tensor '{}': {e}", t.name)))?;
        self.done += buf.len() as u64;
        (self.progress)(self.done, self.total);
        Ok(buf)
    }

    fn check_shape(t: &TensorInfo, want: &[u64]) -> Result<(), ModelError> {
        let mut got = t.dims.clone();
        while got.len() > want.len() && got.last() == Some(&1) {
            got.pop();
        }
        if got != want {
            return Err(ModelError::BadShape { name: t.name.clone(), got: t.dims.clone(), want: want.to_vec() });
        }
        Ok(())
    }

    /// A weight matrix [rows][k] as stored.
    async fn matrix(&mut self, name: &str, k: usize, rows: usize) -> Result<GpuMatrix, ModelError> {
        let t = self.info(name)?;
        Self::check_shape(&t, &[k as u64, rows as u64])?;
        if !t.ty.is_supported_by_kernels() {
            return Err(ModelError::UnsupportedType { name: name.into(), ty: t.ty });
        }
        let bytes = self.bytes(&t).await?;
        check_scales_finite(&t, &bytes)?;
        let m = GpuMatrix::upload(self.gpu, name, t.ty, k as u64, rows as u64, &bytes).await?;
        drop(bytes);
        // let the queue release its staging copy before the next tensor is read
        self.gpu.wait()?;
        Ok(m)
    }

    /// Matrices [rows][k] that the graph multiplies with the same input, stacked in the order
    /// given: each run of one type becomes one matrix (parts named as in the file), so that one
    /// dispatch computes the run. Usually the whole list is one run.
    async fn stacked(&mut self, names: &[(String, usize)], k: usize) -> Result<Vec<GpuMatrix>, ModelError> {
        let mut runs: Vec<(GgmlType, Vec<(String, u64, Vec<u8>)>)> = Vec::new();
        for (name, rows) in names {
            let t = self.info(name)?;
            Self::check_shape(&t, &[k as u64, *rows as u64])?;
            if !t.ty.is_supported_by_kernels() {
                return Err(ModelError::UnsupportedType { name: name.clone(), ty: t.ty });
            }
            let bytes = self.bytes(&t).await?;
            check_scales_finite(&t, &bytes)?;
            match runs.last_mut() {
                Some((ty, parts)) if *ty == t.ty => parts.push((name.clone(), *rows as u64, bytes)),
                _ => runs.push((t.ty, vec![(name.clone(), *rows as u64, bytes)])),
            }
        }
        let mut matrices = Vec::new();
        for (ty, parts) in runs {
            matrices.push(GpuMatrix::upload_stacked(self.gpu, ty, k as u64, &parts).await?);
            drop(parts);
            self.gpu.wait()?;
        }
        Ok(matrices)
    }

    /// A vector [n] (norm weights, biases) converted to f32.
    async fn vector(&mut self, name: &str, n: usize) -> Result<wgpu::Buffer, ModelError> {
        let t = self.info(name)?;
        Self::check_shape(&t, &[n as u64])?;
        let bytes = self.bytes(&t).await?;
        let v = quant::dequantize(t.ty, &bytes, n).map_err(|e| ModelError::Invalid(format!("tensor '{name}': {e}")))?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(ModelError::NonFinite { name: name.into() });
        }
        Ok(self.gpu.upload_f32(name, &v).await?)
    }

    async fn optional_vector(&mut self, name: &str, n: usize) -> Result<Option<wgpu::Buffer>, ModelError> {
        if self.gguf.tensor(name).is_some() {
            Ok(Some(self.vector(name, n).await?))
        } else {
            Ok(None)
        }
    }
}

/// Blocks whose f16 scale is NaN or infinite turn a whole row into garbage; refuse them up front.
fn check_scales_finite(t: &TensorInfo, bytes: &[u8]) -> Result<(), ModelError> {
    let (_, block_bytes) = t.ty.block_layout();
    let scale_offsets: &[usize] = match t.ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        _ => &[],
    };
    for block in bytes.chunks_exact(block_bytes) {
        for &o in scale_offsets {
            if !half::f16::from_le_bytes([block[o], block[o + 1]]).is_finite() {
                return Err(ModelError::NonFinite { name: t.name.clone() });
            }
        }
    }
    Ok(())
}

impl Model {
    /// Read every tensor the graph needs from `src` and upload it, one tensor at a time.
    /// GPU bytes a model and its `n_ctx`-token KV cache take: (weights, KV cache). Known from
    /// the header alone, so a load that cannot fit is refused before any upload.
    pub fn memory_needed(gguf: &Gguf, c: &Config, n_ctx: usize, kv: KvType) -> (u64, u64) {
        let weights = gguf.tensors.iter().map(|t| t.size_bytes()).sum();
        (weights, c.kv_bytes_per_token(kv) * n_ctx as u64)
    }

    /// Out of memory part-way, everything uploaded so far is dropped (freed) and the error says
    /// how many bytes the whole model needs.
    pub async fn load<S: ByteSource>(gguf: &Gguf, gpu: &Gpu, src: &mut S, progress: Progress<'_>) -> Result<Model, ModelError> {
        let needed: u64 = gguf.tensors.iter().map(|t| t.size_bytes()).sum();
        let mut loaded = 0;
        let mut track = |done: u64, total: u64| {
            loaded = done;
            progress(done, total)
        };
        match Self::load_tensors(gguf, gpu, src, &mut track).await {
            Err(ModelError::Gpu(cause @ GpuError::OutOfMemory { .. })) => {
                // the uploaded tensors are dropped by now; let the device release them (and the
                // upload staging) before saying so
                let _ = gpu.wait();
                Err(ModelError::OutOfMemoryLoading { needed, loaded, cause })
            }
            r => r,
        }
    }

    async fn load_tensors<S: ByteSource>(gguf: &Gguf, gpu: &Gpu, src: &mut S, progress: Progress<'_>) -> Result<Model, ModelError> {
        let c = Config::from_gguf(gguf)?;
        let total = gguf.tensors.iter().map(|t| t.size_bytes()).sum();
        let mut l = Loader { gguf, gpu, src, done: 0, total, progress };
        let (d, hd) = (c.n_embd, c.head_dim);
        let q_dim = c.n_head * hd;
        let kv_dim = c.n_kv_head * hd;
        let token_embd = l.matrix("token_embd.weight", d, c.n_vocab).await?;
        let mut layers = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}");
            let layer = Layer {
                attn_norm: l.vector(&n("attn_norm.weight"), d).await?,
                wqkv: l.stacked(&[(n("attn_q.weight"), q_dim), (n("attn_k.weight"), kv_dim), (n("attn_v.weight"), kv_dim)], d).await?,
                bq: if c.qkv_bias { l.optional_vector(&n("attn_q.bias"), q_dim).await? } else { None },
                bk: if c.qkv_bias { l.optional_vector(&n("attn_k.bias"), kv_dim).await? } else { None },
                bv: if c.qkv_bias { l.optional_vector(&n("attn_v.bias"), kv_dim).await? } else { None },
                q_norm: if c.qk_norm { Some(l.vector(&n("attn_q_norm.weight"), hd).await?) } else { None },
                k_norm: if c.qk_norm { Some(l.vector(&n("attn_k_norm.weight"), hd).await?) } else { None },
                wo: l.matrix(&n("attn_output.weight"), q_dim, d).await?,
                post_attn_norm: if c.post_norms { Some(l.vector(&n("post_attention_norm.weight"), d).await?) } else { None },
                ffn_norm: l.vector(&n("ffn_norm.weight"), d).await?,
                w_gate_up: l.stacked(&[(n("ffn_gate.weight"), c.n_ff), (n("ffn_up.weight"), c.n_ff)], d).await?,
                w_down: l.matrix(&n("ffn_down.weight"), c.n_ff, d).await?,
                post_ffn_norm: if c.post_norms { Some(l.vector(&n("post_ffw_norm.weight"), d).await?) } else { None },
            };
            layers.push(layer);
        }
        let output_norm = l.vector("output_norm.weight", d).await?;
        let output = if gguf.tensor("output.weight").is_some() { Some(l.matrix("output.weight", d, c.n_vocab).await?) } else { None };
        let weight_bytes = l.done;
        Ok(Model { config: c, token_embd, layers, output_norm, output, weight_bytes })
    }

    pub fn output_head(&self) -> &GpuMatrix {
        self.output.as_ref().unwrap_or(&self.token_embd)
    }

    /// Weight bytes one decoded token reads: every projection of every layer and the output
    /// head once, plus one row of the token embedding (norm weights are negligible).
    pub fn decode_bytes_per_token(&self) -> u64 {
        let layers: u64 = self.layers.iter().flat_map(|l| l.wqkv.iter().chain(&l.w_gate_up).chain([&l.wo, &l.w_down])).map(|m| m.bytes()).sum();
        layers + self.output_head().bytes() + self.token_embd.bytes() / self.token_embd.n_rows.max(1) as u64
    }
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
    logits: wgpu::Buffer,  // [n_vocab] (or [B][n_vocab] when all positions are asked for)
    logits2: wgpu::Buffer, // same, soft-capped
}

/// A model plus its KV cache: the state of one conversation.
pub struct Session<'m> {
    pub model: &'m Model,
    pub gpu: &'m Gpu,
    pub n_ctx: usize,
    pub kv: KvType,
    /// Tokens whose keys and values are in the cache, in order.
    pub tokens: Vec<u32>,
    k_cache: Vec<wgpu::Buffer>, // per layer [n_ctx][n_kv_head][head_dim]
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
}

impl<'m> Session<'m> {
    /// `all_logits` keeps logits of every position of the last batch (perplexity needs them).
    pub async fn new(model: &'m Model, gpu: &'m Gpu, n_ctx: usize, kv: KvType, all_logits: bool) -> Result<Session<'m>, ModelError> {
        let c = &model.config;
        if n_ctx == 0 || n_ctx > c.n_ctx_train.max(1) {
            return Err(ModelError::Invalid(format!("context size {n_ctx} must be between 1 and the model's {}", c.n_ctx_train)));
        }
        let per_layer = n_ctx as u64 * (c.n_kv_head * c.head_dim) as u64 * kv.bytes();
        if per_layer > gpu.max_binding() {
            return Err(ModelError::Invalid(format!(
                "a {n_ctx}-token KV cache needs {per_layer} bytes per layer, over this device's {}-byte binding limit",
                gpu.max_binding()
            )));
        }
        let mut k_cache = Vec::new();
        let mut v_cache = Vec::new();
        for _ in 0..c.n_layer {
            k_cache.push(gpu.storage("k cache", per_layer).await?);
            v_cache.push(gpu.storage("v cache", per_layer).await?);
        }
        let b = MAX_BATCH as u64;
        let f = |n: usize| b * n as u64 * 4;
        let logits_len = if all_logits { b * c.n_vocab as u64 * 4 } else { c.n_vocab as u64 * 4 };
        let q_dim = c.n_head * c.head_dim;
        let kv_dim = c.n_kv_head * c.head_dim;
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
        };
        Ok(Session {
            model,
            gpu,
            n_ctx,
            kv,
            tokens: Vec::new(),
            k_cache,
            v_cache,
            s,
            all_logits,
            last_batch: 0,
            adapters: Vec::new(),
            lora_t: None,
            lora_u: None,
            dispatch: Arc::new(DispatchCache::new(gpu, SESSION_PARAM_SLOTS)),
            top_k: TopKScratch::new(gpu, c.n_vocab as u32).await?,
            readback: gpu.readback_buffer(c.n_vocab.max(2 * MAX_TOP_K as usize) as u64 * 4),
        })
    }

    /// Forget the cache from position `n` on (keep a shared prefix for the next prompt).
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
    }

    pub fn reset(&mut self) {
        self.tokens.clear();
    }

    /// Use these adapters (with their user scales) from now on. The KV cache was computed with
    /// the previous set, so it is cleared unless the set is unchanged.
    pub async fn set_adapters(&mut self, adapters: Vec<(Arc<LoraAdapter>, f32)>) -> Result<(), ModelError> {
        let same = adapters.len() == self.adapters.len()
            && adapters.iter().zip(&self.adapters).all(|((a, s), (b, t))| Arc::ptr_eq(a, b) && s == t);
        if same {
            return Ok(());
        }
        self.tokens.clear();
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

    /// Feed `ids` (there must be some) and return the last token's logits, [n_vocab], read
    /// back in the same submission.
    pub async fn eval_logits(&mut self, ids: &[u32]) -> Result<Vec<f32>, ModelError> {
        let bytes = self.eval_then(ids, Readback::Logits).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
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

    async fn eval_batch(&mut self, ids: &[u32], then: Readback) -> Result<Vec<u8>, ModelError> {
        let m = self.model;
        let c = &m.config;
        let gpu = self.gpu;
        let s = &self.s;
        let n = ids.len() as u32;
        let pos0 = self.tokens.len() as u32;
        let d = c.n_embd as u32;
        let hd = c.head_dim as u32;
        let q_dim = c.n_head as u32 * hd;
        let kv_dim = c.n_kv_head as u32 * hd;
        gpu.queue.write_buffer(&s.ids, 0, bytemuck::cast_slice(ids));
        let mut r = Recorder::with_cache(gpu, self.dispatch.clone());
        // an adapter at scale 0 adds nothing: leaving it out keeps the fused path (and the base
        // model's logits bit for bit)
        let active: Vec<(Arc<LoraAdapter>, f32)> = self.adapters.iter().filter(|(_, scale)| *scale != 0.0).cloned().collect();
        let lora = Lora { adapters: &active, t: self.lora_t.as_ref(), u: self.lora_u.as_ref() };
        // x = embed(ids) (· sqrt(n_embd) for Gemma)
        if let Some(scale) = c.embed_scale {
            r.gather(&m.token_embd, &s.ids, &s.t1, n).await?;
            r.scale(&s.t1, &s.x, n * d, scale).await?;
        } else {
            r.gather(&m.token_embd, &s.ids, &s.x, n).await?;
        }
        // Decode (and prefill where the recorder tiles tokens: Recorder::fuses_block) fuses each
        // branch's RMS norm into the product that reads it, the gated activation into the
        // gate·up product and RoPE and the KV write into the q/k/v product (the output
        // projections add into the residual stream in every phase). Active adapters need the
        // normalised input for their own products, so they take the unfused path.
        let fused = r.fuses_block(n) && active.is_empty();
        let eps = c.norm_eps;
        for (i, l) in m.layers.iter().enumerate() {
            // attention branch: q, k, v = W_qkv · rms_norm(x), RoPE on q and k, k and v cached
            let sliding = c.is_sliding(i);
            let rope = RopeArgs {
                n_tokens: n,
                n_heads: c.n_head as u32,
                head_dim: hd,
                n_rot: c.n_rot as u32,
                pos0,
                neox: c.rope_neox,
                freq_base: if sliding { c.rope_base_local } else { c.rope_base },
                freq_scale: c.rope_freq_scale,
            };
            let input = if fused {
                ProductIn::RmsNorm { x: &s.x, weight: &l.attn_norm, eps }
            } else {
                r.rms_norm(&s.x, &l.attn_norm, &s.xn, d, n, eps).await?;
                ProductIn::X(&s.xn)
            };
            let (k_cache, v_cache) = (&self.k_cache[i], &self.v_cache[i]);
            let plain_qk = l.bq.is_none() && l.q_norm.is_none();
            let q = if fused && plain_qk && l.wqkv.len() == 1 && r.fuses_qkv_rope(&l.wqkv[0], &rope, n) {
                // the product turns q and k and writes k and v to the cache itself
                let out = ProductOut::QkvRope { q: &s.q, k_cache, v_cache, kv: self.kv, rope };
                r.product(&l.wqkv[0], input, out, n).await?;
                &s.q
            } else {
                lora.project(&mut r, &l.wqkv, input, &s.xn, &[&s.q, &s.k, &s.v], n).await?;
                let (mut q, mut k, mut v) = (&s.q, &s.k, &s.v);
                if let (Some(bq), Some(bk), Some(bv)) = (&l.bq, &l.bk, &l.bv) {
                    r.add_bias(q, bq, &s.q2, n * q_dim, q_dim).await?;
                    r.add_bias(k, bk, &s.k2, n * kv_dim, kv_dim).await?;
                    r.add_bias(v, bv, &s.v2, n * kv_dim, kv_dim).await?;
                    (q, k, v) = (&s.q2, &s.k2, &s.v2);
                }
                // per-head RMS norms of q and k (Qwen3, Gemma 3); q rotated in place, k rotated
                // into the cache, v copied there
                let norm = match (&l.q_norm, &l.k_norm) {
                    (Some(q_weight), Some(k_weight)) => Some(QkNorm { q_weight, k_weight, eps }),
                    _ => None,
                };
                r.rope_kv_normed(q, k, v, k_cache, v_cache, c.n_kv_head as u32, self.kv, rope, norm).await?;
                q
            };
            let args = AttentionArgs {
                n_q: n,
                n_head: c.n_head as u32,
                n_kv_head: c.n_kv_head as u32,
                head_dim: hd,
                pos0,
                window: if sliding { c.sliding_window.unwrap_or(0) as u32 } else { 0 },
                scale: c.attn_scale,
                kv: self.kv,
            };
            r.attention(q, k_cache, v_cache, &s.attn, args).await?;
            // x2 = x + (post_norm)(W_o · attn); without a post-norm the sum is made in place
            let resid = if let Some(pn) = &l.post_attn_norm {
                lora.project(&mut r, std::slice::from_ref(&l.wo), ProductIn::X(&s.attn), &s.attn, &[&s.t1], n).await?;
                r.rms_norm_add(&s.t1, pn, &s.x, &s.x2, d, n, eps).await?;
                &s.x2
            } else {
                lora.project_residual(&mut r, &l.wo, &s.attn, &s.x, n).await?;
                &s.x
            };
            // feed-forward branch: act(gate) · up with gate, up = W_gate_up · rms_norm(resid)
            let input = if fused {
                ProductIn::RmsNorm { x: resid, weight: &l.ffn_norm, eps }
            } else {
                r.rms_norm(resid, &l.ffn_norm, &s.xn, d, n, eps).await?;
                ProductIn::X(&s.xn)
            };
            if fused && l.w_gate_up.len() == 1 && r.fuses_glu(&l.w_gate_up[0], n) {
                r.product(&l.w_gate_up[0], input, ProductOut::Glu { out: &s.act, gelu: c.gelu }, n).await?;
            } else {
                lora.project(&mut r, &l.w_gate_up, input, &s.xn, &[&s.gate, &s.up], n).await?;
                if c.gelu {
                    r.gelu_gate(&s.gate, &s.up, &s.act, n * c.n_ff as u32).await?;
                } else {
                    r.silu_gate(&s.gate, &s.up, &s.act, n * c.n_ff as u32).await?;
                }
            }
            // x = resid + (post_norm)(W_down · act)
            if let Some(pn) = &l.post_ffn_norm {
                lora.project(&mut r, std::slice::from_ref(&l.w_down), ProductIn::X(&s.act), &s.act, &[&s.t1], n).await?;
                r.rms_norm_add(&s.t1, pn, resid, &s.x, d, n, eps).await?;
            } else {
                lora.project_residual(&mut r, &l.w_down, &s.act, &s.x, n).await?;
            }
        }
        let head = std::slice::from_ref(m.output_head());
        let vocab = c.n_vocab as u32;
        // logits = W_out · rms_norm(x) for every token, or for the last one only
        let (x_out, n_out) = if self.all_logits {
            (&s.x, n)
        } else {
            r.encoder().copy_buffer_to_buffer(&s.x, (n as u64 - 1) * d as u64 * 4, &s.last, 0, d as u64 * 4);
            (&s.last, 1)
        };
        let input = if n_out == 1 && active.is_empty() {
            ProductIn::RmsNorm { x: x_out, weight: &m.output_norm, eps }
        } else {
            r.rms_norm(x_out, &m.output_norm, &s.xn, d, n_out, eps).await?;
            ProductIn::X(&s.xn)
        };
        lora.project(&mut r, head, input, &s.xn, &[&s.logits], n_out).await?;
        if let Some(cap) = c.final_softcap {
            r.softcap(&s.logits, &s.logits2, n_out * vocab, cap).await?;
            copy(&mut r, &s.logits2, &s.logits, n_out * vocab);
        }
        let n_last = if self.all_logits { ids.len() - 1 } else { 0 };
        self.finish(r, n_last, then).await
    }

    /// Record the read-back `then` of row n_last of the logits after what `r` holds, submit,
    /// and return the bytes read.
    async fn finish(&self, mut r: Recorder<'_>, n_last: usize, then: Readback) -> Result<Vec<u8>, ModelError> {
        let v = self.model.config.n_vocab as u64;
        let row = n_last as u64 * v * 4;
        let bytes = match then {
            Readback::Nothing => 0,
            Readback::TopK(k) if !self.all_logits => {
                let (values, ids) = ops::record_top_k(&mut r, &self.top_k, &self.s.logits, v as u32, k).await?;
                let half = k as u64 * 4;
                r.encoder().copy_buffer_to_buffer(ids, 0, &self.readback, 0, half);
                r.encoder().copy_buffer_to_buffer(values, 0, &self.readback, half, half);
                2 * half
            }
            // with every position's logits kept, top-k is taken on the CPU (top_k_of)
            Readback::TopK(_) | Readback::Logits => {
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
        let (ids, values) = bytes.split_at(k as usize * 4);
        let ids: Vec<u32> = bytemuck::pod_collect_to_vec(ids);
        let values: Vec<f32> = bytemuck::pod_collect_to_vec(values);
        ids.into_iter().zip(values).collect()
    }

    /// Row n_last of the logits, for reading them again after the step that computed them.
    fn last_row(&self) -> usize {
        if self.all_logits { self.last_batch.saturating_sub(1) } else { 0 }
    }

    /// Logits of the last evaluated token, [n_vocab].
    pub async fn logits(&self) -> Result<Vec<f32>, ModelError> {
        let r = Recorder::with_cache(self.gpu, self.dispatch.clone());
        let bytes = self.finish(r, self.last_row(), Readback::Logits).await?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Logits of every token of the last batch, [n][n_vocab] (needs all_logits).
    pub async fn batch_logits(&self, n: usize) -> Result<Vec<f32>, ModelError> {
        assert!(self.all_logits && n <= MAX_BATCH);
        Ok(self.gpu.read_f32(&self.s.logits, 0, n * self.model.config.n_vocab).await?)
    }

    /// The k best (id, logit) of the last token, selected on the GPU (k ≤ MAX_TOP_K).
    pub async fn top_k(&self, k: u32) -> Result<Vec<(u32, f32)>, ModelError> {
        let r = Recorder::with_cache(self.gpu, self.dispatch.clone());
        let bytes = self.finish(r, self.last_row(), Readback::TopK(k)).await?;
        Ok(self.top_k_of(&bytes, k))
    }
}

fn copy(r: &mut Recorder<'_>, src: &wgpu::Buffer, dst: &wgpu::Buffer, n_f32: u32) {
    r.encoder().copy_buffer_to_buffer(src, 0, dst, 0, n_f32 as u64 * 4);
}

/// The active adapters and their scratch: y = W·x, then y += s·(alpha/r)·B·(A·x) for each
/// adapter that covers W (a part of a stacked W).
struct Lora<'a> {
    adapters: &'a [(Arc<LoraAdapter>, f32)],
    t: Option<&'a wgpu::Buffer>,
    u: Option<&'a wgpu::Buffer>,
}

impl Lora<'_> {
    /// The parts of `matrices`, in order, into `outs`: one output per part. `lora_x` is the
    /// input as the adapters read it (the normalised x: with adapters active the caller does
    /// not fuse the norm).
    async fn project(&self, r: &mut Recorder<'_>, matrices: &[GpuMatrix], input: ProductIn<'_>, lora_x: &wgpu::Buffer, outs: &[&wgpu::Buffer], n: u32) -> Result<(), GpuError> {
        let mut rest = outs;
        for w in matrices {
            let (mine, others) = rest.split_at(w.parts.len());
            rest = others;
            r.product(w, input, ProductOut::Split(mine), n).await?;
            for ((name, rows), y) in w.parts.iter().zip(mine) {
                self.add_terms(r, name, *rows, lora_x, y, n).await?;
            }
        }
        Ok(())
    }

    /// y += W·x (W one plain matrix), adapters' terms included.
    async fn project_residual(&self, r: &mut Recorder<'_>, w: &GpuMatrix, x: &wgpu::Buffer, y: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        r.product(w, ProductIn::X(x), ProductOut::Residual(y), n).await?;
        self.add_terms(r, &w.name, w.n_rows, x, y, n).await
    }

    /// y [n][rows] += s·(alpha/r)·B·(A·x) for each active adapter covering the tensor `name`.
    async fn add_terms(&self, r: &mut Recorder<'_>, name: &str, rows: u32, x: &wgpu::Buffer, y: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        for (adapter, scale) in self.adapters {
            let Some(pair) = adapter.pairs.get(name) else { continue };
            let (t, u) = (self.t.unwrap(), self.u.unwrap());
            r.matmul(&pair.a, x, t, n).await?;
            r.matmul(&pair.b, t, u, n).await?;
            r.accumulate(y, u, n * rows, adapter.factor(pair, *scale)).await?;
        }
        Ok(())
    }
}

