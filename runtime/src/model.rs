//! A model's weights on the GPU, read from GGUF one tensor at a time, in the layout the forward
//! pass (`session.rs`) multiplies them: projections that read the same input stacked into one
//! matrix where their types match, so that one dispatch computes them.

use crate::arch::{BranchOut, Config, Projections, QkPrep, RopeScaling};
use crate::device::{Gpu, GpuError};
use crate::error::{ByteSource, ModelError};
use crate::ggml_type::GgmlType;
use crate::gguf::{Gguf, TensorInfo};
use crate::ops::{supports, GpuMatrix, KvType, Op, Unsupported};
use crate::quant;

/// One transformer block's weights on the GPU (the `blk.N.*` tensors); vectors are f32.
pub struct Layer {
    /// RMS norm weight before attention.
    pub attn_norm: wgpu::Buffer, // [n_embd]
    /// q `[n_head * head_dim][n_embd]`, k and v `[n_kv_head * head_dim][n_embd]`, stacked into one
    /// matrix (parts q, k, v) when their types match, else consecutive runs of one type (a
    /// fused attn_qkv tensor is one matrix of those three parts).
    pub wqkv: Vec<GpuMatrix>,
    /// q bias (Qwen2).
    pub bq: Option<wgpu::Buffer>, // [n_head * head_dim]
    /// k bias (Qwen2).
    pub bk: Option<wgpu::Buffer>, // [n_kv_head * head_dim]
    /// v bias (Qwen2).
    pub bv: Option<wgpu::Buffer>, // [n_kv_head * head_dim]
    /// RMS norm weight over each head of q (Qwen3, Gemma 3).
    pub q_norm: Option<wgpu::Buffer>, // [head_dim]
    /// RMS norm weight over each head of k (Qwen3, Gemma 3).
    pub k_norm: Option<wgpu::Buffer>, // [head_dim]
    /// Attention's output projection.
    pub wo: GpuMatrix, // [n_embd][n_head * head_dim]
    /// RMS norm weight on attention's output before it is added (Gemma 3).
    pub post_attn_norm: Option<wgpu::Buffer>, // [n_embd]
    /// RMS norm weight before the feed-forward.
    pub ffn_norm: wgpu::Buffer, // [n_embd]
    /// gate and up `[n_ff][n_embd]`, stacked (parts gate, up) when their types match (a fused
    /// ffn_up tensor holds both, gate first).
    pub w_gate_up: Vec<GpuMatrix>,
    /// The feed-forward's down projection.
    pub w_down: GpuMatrix, // [n_embd][n_ff]
    /// RMS norm weight on the feed-forward's output before it is added (Gemma 3).
    pub post_ffn_norm: Option<wgpu::Buffer>, // [n_embd]
}

/// A model's weights on the GPU, as [`Model::load`] uploads them from a GGUF file; sessions
/// borrow it to run the forward pass.
pub struct Model {
    /// Its hyperparameters.
    pub config: Config,
    /// Token embeddings, one row a token.
    pub token_embd: GpuMatrix, // [n_vocab][n_embd]
    /// The transformer blocks, in order.
    pub layers: Vec<Layer>,
    /// RMS norm weight before the output head.
    pub output_norm: wgpu::Buffer, // [n_embd]
    /// None when the output head is tied to token_embd.
    pub output: Option<GpuMatrix>, // [n_vocab][n_embd]
    /// RoPE's per-dimension frequency divisors, [n_rot / 2] (RopeScaling::Factors).
    pub rope_factors: Option<wgpu::Buffer>,
    /// Gemma 3's post-norms paired with the pre-norms after them (`FoldedNorms`).
    pub folded_norms: Option<FoldedNorms>,
    /// Bytes of weights uploaded.
    pub weight_bytes: u64,
}

/// Where a branch goes back into the residual stream through a norm of its own (Gemma 3),
/// the next product can add it in itself (`ProductIn::PostNormAdd`); it reads both norms'
/// weights from one buffer, [the next block's pre-norm; the branch's post-norm], each `[2][n_embd]`.
pub struct FoldedNorms {
    /// Layer i + 1's attention input: [attn_norm of i + 1; post_ffn_norm of i].
    pub attn: Vec<wgpu::Buffer>,
    /// Layer i's feed-forward input: [ffn_norm; post_attn_norm].
    pub ffn: Vec<wgpu::Buffer>,
}

impl FoldedNorms {
    async fn pair(gpu: &Gpu, layers: &[Layer]) -> Result<Option<FoldedNorms>, GpuError> {
        let posts: Option<Vec<(&wgpu::Buffer, &wgpu::Buffer)>> = layers.iter().map(|l| Some((l.post_attn_norm.as_ref()?, l.post_ffn_norm.as_ref()?))).collect();
        let Some(posts) = posts else {
            return Ok(None);
        };
        let (mut attn, mut ffn) = (Vec::new(), Vec::new());
        for (i, (l, (post_attn, post_ffn))) in layers.iter().zip(&posts).enumerate() {
            ffn.push(gpu.concat("folded norms", &[&l.ffn_norm, post_attn]).await?);
            if let Some(next) = layers.get(i + 1) {
                attn.push(gpu.concat("folded norms", &[&next.attn_norm, post_ffn]).await?);
            }
        }
        Ok(Some(FoldedNorms { attn, ffn }))
    }
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

/// Layer indices in the order their tensors sit in the file. Reading in that order lets a
/// streamed download be consumed as it arrives: converters often store blk.10 to blk.19 before
/// blk.2, and reading by index would hold those ten layers in memory meanwhile.
fn layers_in_file_order(gguf: &Gguf, n_layer: usize) -> Vec<usize> {
    let mut first = vec![u64::MAX; n_layer];
    for t in &gguf.tensors {
        let layer = t.name.strip_prefix("blk.").and_then(|rest| rest.split('.').next()).and_then(|n| n.parse::<usize>().ok());
        if let Some(i) = layer.filter(|&i| i < n_layer) {
            first[i] = first[i].min(gguf.tensor_data_range(t).start);
        }
    }
    let mut order: Vec<usize> = (0..n_layer).collect();
    order.sort_by_key(|&i| (first[i], i));
    order
}

impl<S: ByteSource> Loader<'_, S> {
    fn info(&self, name: &str) -> Result<TensorInfo, ModelError> {
        self.gguf.tensor(name).cloned().ok_or_else(|| ModelError::MissingTensor(name.into()))
    }

    async fn bytes(&mut self, t: &TensorInfo) -> Result<Vec<u8>, ModelError> {
        let range = self.gguf.tensor_data_range(t);
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| ModelError::Invalid(format!("tensor '{}' has {} bytes, more than this machine can address", t.name, range.end - range.start)))?;
        let mut buf = vec![0u8; len];
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
        supported(name, t.ty, k, self.gpu)?;
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
        // runs of one type: (type, [(name, rows, bytes as stored)])
        type Run = (GgmlType, Vec<(String, u64, Vec<u8>)>);
        let mut runs: Vec<Run> = Vec::new();
        for (name, rows) in names {
            let t = self.info(name)?;
            Self::check_shape(&t, &[k as u64, *rows as u64])?;
            supported(name, t.ty, k, self.gpu)?;
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

    /// One tensor [sum of rows][k] that holds several projections, as parts of one matrix: rows
    /// in the order given (Phi-3's attn_qkv, its ffn_up holding gate and up).
    async fn fused(&mut self, name: &str, rows: &[usize], k: usize) -> Result<Vec<GpuMatrix>, ModelError> {
        let mut m = self.matrix(name, k, rows.iter().sum()).await?;
        m.parts = rows.iter().map(|r| (name.to_string(), *r as u32)).collect();
        Ok(vec![m])
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
    /// Sums and products saturate: values beyond u64 read as u64::MAX, which no device has.
    pub fn memory_needed(gguf: &Gguf, c: &Config, n_ctx: usize, kv: KvType) -> (u64, u64) {
        let weights = gguf.tensors.iter().fold(0u64, |sum, t| sum.saturating_add(t.size_bytes()));
        (weights, c.kv_bytes_per_token(kv).saturating_mul(n_ctx as u64))
    }

    /// Out of memory part-way, everything uploaded so far is dropped (freed) and the error says
    /// how many bytes the whole model needs.
    pub async fn load<S: ByteSource>(gguf: &Gguf, gpu: &Gpu, src: &mut S, progress: Progress<'_>) -> Result<Model, ModelError> {
        let needed = gguf.tensors.iter().fold(0u64, |sum, t| sum.saturating_add(t.size_bytes()));
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
        let total = gguf.tensors.iter().fold(0u64, |sum, t| sum.saturating_add(t.size_bytes()));
        let mut l = Loader { gguf, gpu, src, done: 0, total, progress };
        let (d, hd) = (c.n_embd, c.head_dim);
        let q_dim = c.n_head * hd;
        let kv_dim = c.n_kv_head * hd;
        let spec = c.spec();
        let norms_after = spec.branch_out == BranchOut::NormThenAdd;
        let token_embd = l.matrix("token_embd.weight", d, c.n_vocab).await?;
        let mut layers: Vec<Option<Layer>> = (0..c.n_layer).map(|_| None).collect();
        for i in layers_in_file_order(gguf, c.n_layer) {
            let n = |s: &str| format!("blk.{i}.{s}");
            let fused = spec.projections == Projections::Fused;
            let attn_norm = l.vector(&n("attn_norm.weight"), d).await?;
            let wqkv = if fused {
                l.fused(&n("attn_qkv.weight"), &[q_dim, kv_dim, kv_dim], d).await?
            } else {
                l.stacked(&[(n("attn_q.weight"), q_dim), (n("attn_k.weight"), kv_dim), (n("attn_v.weight"), kv_dim)], d).await?
            };
            let bias = spec.qk == QkPrep::Bias;
            let head_norm = spec.qk == QkPrep::HeadNorm;
            let layer = Layer {
                attn_norm,
                wqkv,
                bq: if bias { l.optional_vector(&n("attn_q.bias"), q_dim).await? } else { None },
                bk: if bias { l.optional_vector(&n("attn_k.bias"), kv_dim).await? } else { None },
                bv: if bias { l.optional_vector(&n("attn_v.bias"), kv_dim).await? } else { None },
                q_norm: if head_norm { Some(l.vector(&n("attn_q_norm.weight"), hd).await?) } else { None },
                k_norm: if head_norm { Some(l.vector(&n("attn_k_norm.weight"), hd).await?) } else { None },
                wo: l.matrix(&n("attn_output.weight"), q_dim, d).await?,
                post_attn_norm: if norms_after { Some(l.vector(&n("post_attention_norm.weight"), d).await?) } else { None },
                ffn_norm: l.vector(&n("ffn_norm.weight"), d).await?,
                w_gate_up: if fused {
                    l.fused(&n("ffn_up.weight"), &[c.n_ff, c.n_ff], d).await?
                } else {
                    l.stacked(&[(n("ffn_gate.weight"), c.n_ff), (n("ffn_up.weight"), c.n_ff)], d).await?
                },
                w_down: l.matrix(&n("ffn_down.weight"), c.n_ff, d).await?,
                post_ffn_norm: if norms_after { Some(l.vector(&n("post_ffw_norm.weight"), d).await?) } else { None },
            };
            layers[i] = Some(layer);
        }
        let layers: Vec<Layer> = layers.into_iter().flatten().collect();
        let output_norm = l.vector("output_norm.weight", d).await?;
        let output = if gguf.tensor("output.weight").is_some() { Some(l.matrix("output.weight", d, c.n_vocab).await?) } else { None };
        let rope_factors = match &c.rope_scaling {
            RopeScaling::Factors(name) => Some(l.vector(name, c.n_rot / 2).await?),
            _ => None,
        };
        let weight_bytes = l.done;
        let folded_norms = FoldedNorms::pair(gpu, &layers).await?;
        Ok(Model { config: c, token_embd, layers, output_norm, output, rope_factors, folded_norms, weight_bytes })
    }

    /// The matrix that turns the last hidden state into logits (`output`, or the tied embeddings).
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

/// Whether the kernels read tensor `name` (rows of `k` elements of type `ty`) on `gpu`.
fn supported(name: &str, ty: GgmlType, k: usize, gpu: &Gpu) -> Result<(), ModelError> {
    match supports(Op::Matrix { ty, k: k as u64 }, Some(gpu)) {
        Ok(()) => Ok(()),
        Err(Unsupported::Type(ty)) => Err(ModelError::UnsupportedType { name: name.into(), ty }),
        Err(e) => Err(ModelError::Invalid(format!("tensor '{name}': {e}"))),
    }
}
