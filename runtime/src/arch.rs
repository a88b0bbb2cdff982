//! Every supported architecture as data: how its layer differs from the plain pre-norm
//! transformer (llama), and the hyperparameters its GGUF metadata gives. The forward pass
//! (`session.rs`) reads these enums; adding a family is an entry in `Family::spec` plus what
//! its metadata needs in `Config::from_gguf` (docs/architecture.md has the checklist).

use crate::error::ModelError;
use crate::gguf::{Gguf, MetadataValue};
use crate::ops::{supports, KvType, Op};

/// The architectures nomoat runs, by their GGUF `general.architecture` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `llama`: Llama 1 to 3.x and models that share its layer, such as SmolLM2.
    Llama,
    /// `qwen2`: Qwen2 and Qwen2.5.
    Qwen2,
    /// `qwen3`: Qwen3.
    Qwen3,
    /// `gemma3`: Gemma 3.
    Gemma3,
    /// `phi3`: Phi-3 (fused projections).
    Phi3,
    /// `smollm3`: SmolLM3 (no RoPE on every fourth layer).
    SmolLm3,
}

/// The families by name, for messages about unsupported ones.
pub const SUPPORTED: &str = "llama, qwen2, qwen3, gemma3, phi3 and smollm3";

impl Family {
    /// The family of a `general.architecture` name, or None when nomoat does not run it.
    pub fn from_name(name: &str) -> Option<Family> {
        Some(match name {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            "smollm3" => Family::SmolLm3,
            _ => return None,
        })
    }

    /// How a layer of this family is built (llama.cpp's `src/models/<arch>.cpp`).
    pub fn spec(self) -> Spec {
        let llama = Spec {
            projections: Projections::Separate,
            qk: QkPrep::Plain,
            branch_out: BranchOut::Add,
            activation: Activation::Silu,
            rope: RopeType::Pairs,
            rope_layers: RopeLayers::All,
            scaled_embeddings: false,
            window_pattern: 0,
        };
        match self {
            Family::Llama => llama,
            Family::Qwen2 => Spec { qk: QkPrep::Bias, rope: RopeType::Neox, ..llama },
            Family::Qwen3 => Spec { qk: QkPrep::HeadNorm, rope: RopeType::Neox, ..llama },
            Family::Gemma3 => Spec {
                qk: QkPrep::HeadNorm,
                branch_out: BranchOut::NormThenAdd,
                activation: Activation::GeluTanh,
                rope: RopeType::Neox,
                scaled_embeddings: true,
                window_pattern: 6,
                ..llama
            },
            Family::Phi3 => Spec { projections: Projections::Fused, rope: RopeType::Neox, ..llama },
            Family::SmolLm3 => Spec { rope_layers: RopeLayers::NoneEvery(4), ..llama },
        }
    }
}

/// What makes one family's layer differ from another's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    /// Which tensors hold the projections.
    pub projections: Projections,
    /// What q and k go through before RoPE.
    pub qk: QkPrep,
    /// How attention's and the feed-forward's outputs return to the residual stream.
    pub branch_out: BranchOut,
    /// The feed-forward's gated activation.
    pub activation: Activation,
    /// Which dimensions RoPE turns together.
    pub rope: RopeType,
    /// Which layers apply RoPE.
    pub rope_layers: RopeLayers,
    /// Embeddings scaled by sqrt(n_embd) (Gemma).
    pub scaled_embeddings: bool,
    /// With a sliding window and no pattern in the metadata: layer i slides unless
    /// (i + 1) % pattern == 0 (llama.cpp's default for the family; 0: every layer).
    pub window_pattern: u32,
}

/// Which tensors hold the projections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Projections {
    /// attn_q, attn_k, attn_v; ffn_gate, ffn_up.
    Separate,
    /// attn_qkv (rows q, k, v); ffn_up holding [gate; up] (Phi-3).
    Fused,
}

/// What happens to q and k between their projection and RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QkPrep {
    /// Straight from the projection.
    Plain,
    /// q, k and v biases (Qwen2).
    Bias,
    /// An RMS norm over each head of q and of k (Qwen3, Gemma 3).
    HeadNorm,
}

/// How a branch's output returns to the residual stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchOut {
    /// Added as it is.
    Add,
    /// RMS-normalised first (Gemma 3's post-attention and post-FFN norms).
    NormThenAdd,
}

/// The gated activation of the feed-forward branch: act(gate) · up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (x · sigmoid(x)): Llama, Qwen, Phi-3, SmolLM3.
    Silu,
    /// GELU, tanh approximation: Gemma 3.
    GeluTanh,
}

/// Which dimensions RoPE turns together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeType {
    /// Adjacent pairs (2i, 2i + 1): GGML's "normal" mode, as Llama GGUFs store q and k.
    Pairs,
    /// Halves (i, i + n_rot / 2): GPT-NeoX's.
    Neox,
}

/// Which layers apply RoPE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeLayers {
    /// Every layer.
    All,
    /// Layer i has no positional encoding where (i + 1) % n == 0 (SmolLM3: NoPE every 4th).
    NoneEvery(u32),
}

/// How RoPE's frequencies are scaled for contexts longer than training's.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Trained positions only: no scaling.
    None,
    /// Positions multiplied by this factor (1 / the `linear` scaling factor).
    Linear(f32),
    /// Per-dimension divisors of the frequencies from a tensor [n_rot / 2] (Llama 3.1
    /// `rope_freqs.weight`, Phi-3 `rope_factors_short.weight`).
    Factors(String),
}

/// Which layers attend only to a window of recent positions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlidingWindow {
    /// Every layer attends to all positions.
    None,
    /// The last `window` positions (a query at p sees keys p - window + 1 ..= p) on the layers
    /// marked true.
    Layers {
        /// Positions a query sees, its own included.
        window: u32,
        /// Per layer: whether it slides.
        sliding: Vec<bool>,
    },
}

/// The largest size metadata may give (embedding, feed-forward and head sizes, heads times head
/// size, vocabulary, training context; larger contexts are read as this): far beyond real
/// models, small enough that products of two sizes fit in a u64 and one size in wasm32's usize.
pub const MAX_DIM: u64 = 1 << 24;
/// The most layers a model may have (the largest models have about 130).
pub const MAX_LAYERS: u64 = 1 << 12;

/// A model's hyperparameters, from its GGUF metadata (`<arch>.*` keys), checked against
/// [`MAX_DIM`] and [`MAX_LAYERS`].
#[derive(Clone, Debug)]
pub struct Config {
    /// Its family.
    pub family: Family,
    /// `general.architecture` as the file has it.
    pub arch_name: String,
    /// Transformer blocks.
    pub n_layer: usize,
    /// Width of the residual stream.
    pub n_embd: usize,
    /// Width of the feed-forward's hidden layer.
    pub n_ff: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key and value heads (fewer than n_head with grouped-query attention).
    pub n_kv_head: usize,
    /// Size of one head (`attention.key_length`, else n_embd / n_head).
    pub head_dim: usize,
    /// Vocabulary size: rows of the embedding and output matrices.
    pub n_vocab: usize,
    /// The context length the model was trained with.
    pub n_ctx_train: usize,
    /// RMS norm epsilon.
    pub norm_eps: f32,
    /// RoPE frequency base.
    pub rope_base: f32,
    /// RoPE base of the sliding-window layers (Gemma 3 uses 10,000 there).
    pub rope_base_local: f32,
    /// How RoPE's frequencies are scaled.
    pub rope_scaling: RopeScaling,
    /// Dimensions of each head RoPE turns (the rest pass through).
    pub n_rot: usize,
    /// What q·k is multiplied by before softmax (1/sqrt(head_dim) unless the model says).
    pub attn_scale: f32,
    /// Which layers use a sliding window, and its size.
    pub window: SlidingWindow,
    /// Logits capped softly at ± this (tanh), when the model asks for it.
    pub final_softcap: Option<f32>,
}

impl Config {
    /// Reads and checks the hyperparameters of a model file's header; an architecture nomoat does
    /// not run is `ModelError::UnsupportedArchitecture`.
    pub fn from_gguf(g: &Gguf) -> Result<Config, ModelError> {
        let name = g.architecture()?.to_string();
        let family = Family::from_name(&name).ok_or_else(|| ModelError::UnsupportedArchitecture(name.clone()))?;
        let spec = family.spec();
        let key = |k: &str| format!("{name}.{k}");
        let size = |k: &str, v: u64| {
            usize::try_from(v).ok().filter(|v| *v as u64 <= MAX_DIM).ok_or_else(|| ModelError::Invalid(format!("{} = {v} is out of range (at most {MAX_DIM})", key(k))))
        };
        let n_embd = size("embedding_length", g.get_u64(&key("embedding_length"))?)?;
        let n_head = size("attention.head_count", g.get_u64(&key("attention.head_count"))?)?;
        let n_kv_head = match g.get_u64_opt(&key("attention.head_count_kv"))? {
            Some(v) => size("attention.head_count_kv", v)?,
            None => n_head,
        };
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(ModelError::Invalid(format!("{n_head} query heads cannot share {n_kv_head} key/value heads")));
        }
        let head_dim = match g.get_u64_opt(&key("attention.key_length"))? {
            Some(v) => size("attention.key_length", v)?,
            None => n_embd / n_head,
        };
        for (what, heads) in [("attention.head_count", n_head), ("attention.head_count_kv", n_kv_head)] {
            if (heads as u64).saturating_mul(head_dim as u64) > MAX_DIM {
                return Err(ModelError::Invalid(format!("{} = {heads} heads of {head_dim} is over {MAX_DIM} values", key(what))));
            }
        }
        let token_embd = g.tensor("token_embd.weight").ok_or_else(|| ModelError::MissingTensor("token_embd.weight".into()))?;
        let n_vocab = usize::try_from(token_embd.n_rows())
            .ok()
            .filter(|v| *v as u64 <= MAX_DIM)
            .ok_or_else(|| ModelError::Invalid(format!("token_embd.weight has {} rows (the vocabulary), over {MAX_DIM}", token_embd.n_rows())))?;
        let rope_base = g.get_f32_opt(&key("rope.freq_base"))?.unwrap_or(10000.0);
        let n_rot = match g.get_u64_opt(&key("rope.dimension_count"))? {
            Some(v) => size("rope.dimension_count", v)?,
            None => head_dim,
        };
        let rope_scaling = match (g.get_str_opt(&key("rope.scaling.type"))?, g.get_f32_opt(&key("rope.scaling.factor"))?) {
            (Some("linear"), Some(f)) if f > 0.0 && f.is_finite() => RopeScaling::Linear(1.0 / f),
            (Some(t), _) if t != "none" && t != "linear" => {
                return Err(ModelError::Invalid(format!("RoPE scaling '{t}' is not supported yet")));
            }
            // Llama 3.1's frequency factors, or Phi-3's for contexts up to its original one
            _ => match ["rope_freqs.weight", "rope_factors_short.weight"].into_iter().find(|t| g.tensor(t).is_some()) {
                Some(t) => RopeScaling::Factors(t.to_string()),
                None => RopeScaling::None,
            },
        };
        let n_layer = size("block_count", g.get_u64(&key("block_count"))?)?;
        if n_layer as u64 > MAX_LAYERS {
            return Err(ModelError::Invalid(format!("{} = {n_layer} is out of range (at most {MAX_LAYERS})", key("block_count"))));
        }
        let window = match g.get_u64_opt(&key("attention.sliding_window"))? {
            // phi3 GGUFs carry a window that llama.cpp ignores (its converter sets it wrongly)
            Some(w) if w > 0 && family != Family::Phi3 => {
                let window = u32::try_from(w).unwrap_or(u32::MAX);
                SlidingWindow::Layers { window, sliding: sliding_layers(g, &key("attention.sliding_window_pattern"), spec.window_pattern, n_layer)? }
            }
            _ => SlidingWindow::None,
        };
        let attn_scale = match g.get_f32_opt(&key("attention.query_pre_attn_scalar"))? {
            // Gemma 3 scales queries by the query pre-attention scalar when given
            Some(s) if family == Family::Gemma3 && s > 0.0 => 1.0 / s.sqrt(),
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        let c = Config {
            family,
            n_layer,
            n_embd,
            n_ff: size("feed_forward_length", g.get_u64(&key("feed_forward_length"))?)?,
            n_head,
            n_kv_head,
            head_dim,
            n_vocab,
            n_ctx_train: g.get_u64_opt(&key("context_length"))?.unwrap_or(2048).min(MAX_DIM) as usize,
            norm_eps: g.get_f32_opt(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_base,
            rope_base_local: if family == Family::Gemma3 { g.get_f32_opt(&key("rope.freq_base_swa"))?.unwrap_or(10000.0) } else { rope_base },
            rope_scaling,
            n_rot,
            attn_scale,
            window,
            final_softcap: g.get_f32_opt(&key("final_logit_softcapping"))?.filter(|v| *v > 0.0),
            arch_name: name,
        };
        let (head_dim, n_rot) = (c.head_dim.min(u32::MAX as usize) as u32, c.n_rot.min(u32::MAX as usize) as u32);
        let attention = Op::Attention { kv: KvType::F32, head_dim, n_head: c.n_head as u32, n_kv_head: c.n_kv_head as u32, keys: 1, kernel: None };
        for op in [attention, Op::Rope { head_dim, n_rot }] {
            supports(op, None).map_err(|e| ModelError::Invalid(format!("{e} is not supported")))?;
        }
        Ok(c)
    }

    /// How this family's layer is built.
    pub fn spec(&self) -> Spec {
        self.family.spec()
    }

    /// The window layer `layer` attends within, 0 for all of the context.
    pub fn window_of(&self, layer: usize) -> u32 {
        match &self.window {
            SlidingWindow::Layers { window, sliding } if sliding[layer] => *window,
            _ => 0,
        }
    }

    /// RoPE's base for layer `layer`.
    pub fn rope_base_of(&self, layer: usize) -> f32 {
        if self.window_of(layer) > 0 {
            self.rope_base_local
        } else {
            self.rope_base
        }
    }

    /// Whether layer `layer` turns q and k by their positions.
    pub fn has_rope(&self, layer: usize) -> bool {
        match self.spec().rope_layers {
            RopeLayers::All => true,
            RopeLayers::NoneEvery(n) => !(layer as u32 + 1).is_multiple_of(n),
        }
    }

    /// Positions are multiplied by this before RoPE.
    pub fn rope_freq_scale(&self) -> f32 {
        match self.rope_scaling {
            RopeScaling::Linear(s) => s,
            _ => 1.0,
        }
    }

    /// Embeddings are multiplied by this, where the family scales them.
    pub fn embed_scale(&self) -> Option<f32> {
        self.spec().scaled_embeddings.then(|| (self.n_embd as f32).sqrt())
    }

    /// KV cache bytes per token of context (saturating: u64::MAX when it does not fit).
    pub fn kv_bytes_per_token(&self, kv: KvType) -> u64 {
        let row = (self.n_kv_head as u64).saturating_mul(self.head_dim as u64);
        kv.row_bytes(row).saturating_mul(self.n_layer as u64).saturating_mul(2)
    }
}

/// Which layers slide, as llama.cpp reads it: a bool per layer under `key`, or a period there
/// (or the family's `default` one): layer i slides unless (i + 1) % period == 0; 0 means all.
fn sliding_layers(g: &Gguf, key: &str, default: u32, n_layer: usize) -> Result<Vec<bool>, ModelError> {
    let period = match g.get(key) {
        Some(MetadataValue::Array { items, .. }) => {
            let flags: Option<Vec<bool>> = items.iter().map(|v| if let MetadataValue::Bool(b) = v { Some(*b) } else { None }).collect();
            return match flags {
                Some(f) if f.len() == n_layer => Ok(f),
                _ => Err(ModelError::Invalid(format!("{key} must hold one bool per layer ({n_layer})"))),
            };
        }
        Some(_) => g.get_u32(key)?,
        None => default,
    };
    Ok((0..n_layer).map(|i| period == 0 || !(i as u32 + 1).is_multiple_of(period)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml_type::GgmlType;
    use crate::gguf::{GgufWriter, Parse};
    use crate::model::Model;

    /// A llama header: small sizes, with `keys` (u64s) replacing or adding to them, and
    /// token_embd.weight declared [64, vocab] with no data behind it (only the header is read).
    fn header(keys: &[(&str, u64)], vocab: u64) -> Gguf {
        let mut all: Vec<(&str, u64)> =
            vec![("embedding_length", 64), ("attention.head_count", 4), ("block_count", 2), ("feed_forward_length", 128), ("context_length", 256)];
        for &(k, v) in keys {
            match all.iter_mut().find(|(name, _)| *name == k) {
                Some(entry) => entry.1 = v,
                None => all.push((k, v)),
            }
        }
        let mut w = GgufWriter::new();
        w.add_metadata("general.architecture", "llama");
        for (k, v) in all {
            w.add_metadata(format!("llama.{k}"), v);
        }
        w.add_tensor("token_embd.weight", &[64, vocab], GgmlType::F32, Vec::new());
        match Gguf::parse_prefix(&w.to_bytes()).unwrap() {
            Parse::Complete(g) => g,
            Parse::NeedMore { .. } => unreachable!("the whole header is there"),
        }
    }

    /// Sizes whose products overflow (a panic in debug builds, a wrap in release builds and on
    /// wasm32 that made the browser's memory check pass) are refused, naming the key.
    #[test]
    fn hostile_sizes_are_refused_and_memory_needed_saturates() {
        assert!(Config::from_gguf(&header(&[], 300)).is_ok());
        let refused = [
            (header(&[("block_count", 1 << 24)], 300), "block_count"),
            (header(&[("block_count", u64::MAX)], 300), "block_count"),
            (header(&[("attention.head_count", 1 << 20), ("attention.key_length", 128)], 300), "head_count"),
            (header(&[("attention.head_count", 8), ("attention.head_count_kv", 8), ("attention.key_length", 1 << 22)], 300), "head_count"),
            (header(&[("embedding_length", 1 << 40)], 300), "embedding_length"),
            (header(&[], 1 << 40), "token_embd.weight"),
        ];
        for (g, key) in refused {
            match Config::from_gguf(&g) {
                Err(ModelError::Invalid(msg)) => assert!(msg.contains(key), "{key}: {msg}"),
                other => panic!("{key}: {other:?}"),
            }
        }
        // the largest header accepted: its KV cache size is a number, not an overflow
        let g = header(&[("block_count", MAX_LAYERS), ("attention.head_count", 1 << 17), ("attention.key_length", 128), ("context_length", u64::MAX)], 1 << 24);
        let c = Config::from_gguf(&g).unwrap();
        assert_eq!(c.n_ctx_train as u64, MAX_DIM);
        let (_, kv) = Model::memory_needed(&g, &c, c.n_ctx_train, KvType::F32);
        assert_eq!(kv, 2 * MAX_LAYERS * (1 << 24) * 4 * MAX_DIM);
        // and sizes past every check (a hand-made Config) saturate
        let huge = Config { n_layer: usize::MAX, n_kv_head: usize::MAX, head_dim: usize::MAX, ..c };
        assert_eq!(Model::memory_needed(&g, &huge, usize::MAX, KvType::F32).1, u64::MAX);
    }
}
