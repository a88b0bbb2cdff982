//! LoRA adapters in llama.cpp's GGUF format, applied unmerged on the GPU:
//!
//!   y = W·x + Σᵢ sᵢ · (alphaᵢ / rᵢ) · Bᵢ·(Aᵢ·x)
//!
//! The base weights are never touched, so adapters can be stacked, rescaled, added and removed
//! between requests; each costs only its own A and B on the GPU.
//! File format: `general.type` = "adapter", `adapter.type` = "lora", `adapter.lora.alpha`, and
//! tensor pairs `<base>.lora_a` (GGUF dims [n_in, r], i.e. r rows of n_in) and `<base>.lora_b`
//! ([r, n_out]: n_out rows of r).

use crate::arch::Config;
use crate::device::{Gpu, GpuError};
use crate::error::{ByteSource, ModelError};
use crate::ggml_type::GgmlType;
use crate::gguf::Gguf;
use crate::ops::{GpuMatrix, ProductIn, ProductOut, Recorder};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One adapted projection: A `[rank][n_in]`, B `[n_out][rank]`.
pub struct LoraPair {
    /// A: `[rank][n_in]`.
    pub a: GpuMatrix,
    /// B: `[n_out][rank]`.
    pub b: GpuMatrix,
    /// The rank: rows of A, columns of B.
    pub rank: u32,
}

/// A LoRA adapter on the GPU (llama.cpp's GGUF adapter format), checked against its base
/// model's tensors; a session applies it unmerged, scaled.
pub struct LoraAdapter {
    /// Its name (the file's stem natively).
    pub name: String,
    /// LoRA alpha: a pair's output is scaled by alpha / rank (0: not scaled), see [`LoraAdapter::factor`].
    pub alpha: f32,
    /// Keyed by the base tensor's name, e.g. "blk.0.attn_q.weight".
    pub pairs: BTreeMap<String, LoraPair>,
    /// Bytes of its factors on the GPU.
    pub bytes: u64,
}

const ALLOWED: [GgmlType; 3] = [GgmlType::F32, GgmlType::F16, GgmlType::Q8_0];

/// The largest rank an adapter may have (fine-tuning here makes up to 256; PEFT adapters
/// rarely pass 256). It sizes the scratch of every session the adapter is active in.
pub const MAX_RANK: u64 = 1024;

impl LoraAdapter {
    /// Check the adapter against `model` (architecture, tensor names, shapes) before reading
    /// any tensor data, then upload its pairs.
    pub async fn load<S: ByteSource>(name: &str, gguf: &Gguf, src: &mut S, gpu: &Gpu, model: &Config, base: &Gguf) -> Result<LoraAdapter, ModelError> {
        let bad = |m: String| ModelError::Invalid(format!("adapter '{name}': {m}"));
        if gguf.get_str_opt("general.type")? != Some("adapter") || gguf.get_str_opt("adapter.type")? != Some("lora") {
            return Err(bad("not a LoRA adapter (general.type must be 'adapter' and adapter.type 'lora')".into()));
        }
        let arch = gguf.get_str_opt("general.architecture")?.unwrap_or("");
        if arch != model.arch_name {
            return Err(bad(format!("made for architecture '{arch}', but the model is '{}'", model.arch_name)));
        }
        let alpha = gguf.get_f32_opt("adapter.lora.alpha")?.unwrap_or(0.0);
        if !alpha.is_finite() {
            return Err(bad(format!("adapter.lora.alpha is {alpha}, not a finite number")));
        }
        // pair up and check every tensor first, so a mismatch is refused before any upload
        let mut plan = Vec::new();
        for t in &gguf.tensors {
            let Some(base_name) = t.name.strip_suffix(".lora_a") else {
                if t.name.ends_with(".lora_b") {
                    continue;
                }
                return Err(bad(format!("unexpected tensor '{}' (only .lora_a / .lora_b pairs)", t.name)));
            };
            let b = gguf.tensor(&format!("{base_name}.lora_b")).ok_or_else(|| bad(format!("tensor '{base_name}.lora_a' has no .lora_b")))?;
            let w = base.tensor(base_name).ok_or_else(|| bad(format!("tensor '{}' adapts '{base_name}', which the model does not have", t.name)))?;
            let (n_in, n_out) = (w.dims[0], w.n_rows());
            if t.dims.len() != 2 || b.dims.len() != 2 || t.dims[0] != n_in || b.dims[1] != n_out || t.dims[1] != b.dims[0] || t.dims[1] == 0 {
                return Err(bad(format!(
                    "tensor '{}' has shape {:?} and '{}' {:?}, but '{base_name}' is {:?} (expected [{n_in}, r] and [r, {n_out}])",
                    t.name, t.dims, b.name, b.dims, w.dims
                )));
            }
            if t.dims[1] > MAX_RANK {
                return Err(bad(format!("tensor '{}' has rank {}, over the {MAX_RANK} allowed", t.name, t.dims[1])));
            }
            for x in [t, b] {
                if !ALLOWED.contains(&x.ty) {
                    return Err(bad(format!("tensor '{}' has type {}, adapters may use F32, F16 or Q8_0", x.name, x.ty)));
                }
            }
            plan.push((base_name.to_string(), t.clone(), b.clone(), n_in, n_out));
        }
        if plan.is_empty() {
            return Err(bad("no .lora_a / .lora_b tensor pairs".into()));
        }
        let mut pairs = BTreeMap::new();
        let mut bytes = 0;
        for (base_name, ta, tb, n_in, n_out) in plan {
            let rank = ta.dims[1];
            let buf_a = read_tensor(gguf, src, &ta).await.map_err(&bad)?;
            let buf_b = read_tensor(gguf, src, &tb).await.map_err(&bad)?;
            for (t, buf) in [(&ta, &buf_a), (&tb, &buf_b)] {
                if let Some(i) = first_non_finite(t.ty, buf) {
                    return Err(bad(format!("tensor '{}' holds a NaN or infinite value (element {i})", t.name)));
                }
            }
            let a = GpuMatrix::upload(gpu, &ta.name, ta.ty, n_in, rank, &buf_a).await?;
            let b = GpuMatrix::upload(gpu, &tb.name, tb.ty, rank, n_out, &buf_b).await?;
            bytes += a.bytes() + b.bytes();
            pairs.insert(base_name, LoraPair { a, b, rank: rank as u32 });
        }
        Ok(LoraAdapter { name: name.to_string(), alpha, pairs, bytes })
    }

    /// The factor on B·(A·x) for a user scale: scale · alpha / rank (alpha 0 means no alpha
    /// scaling, as llama.cpp reads it).
    pub fn factor(&self, pair: &LoraPair, scale: f32) -> f32 {
        if self.alpha == 0.0 {
            scale
        } else {
            scale * self.alpha / pair.rank as f32
        }
    }
}

/// The index of the first value (F32, F16) or block scale (Q8_0: the block's index) that is
/// NaN or infinite, which would turn every output of the adapted projection into NaN.
fn first_non_finite(ty: GgmlType, bytes: &[u8]) -> Option<usize> {
    match ty {
        GgmlType::F32 => bytes.chunks_exact(4).position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
        GgmlType::F16 => bytes.chunks_exact(2).position(|b| !half::f16::from_le_bytes([b[0], b[1]]).is_finite()),
        GgmlType::Q8_0 => bytes.chunks_exact(ty.block_layout().1).position(|b| !half::f16::from_le_bytes([b[0], b[1]]).is_finite()),
        _ => None,
    }
}

pub(crate) async fn read_tensor<S: ByteSource>(gguf: &Gguf, src: &mut S, t: &crate::gguf::TensorInfo) -> Result<Vec<u8>, String> {
    let r = gguf.tensor_data_range(t);
    let len = usize::try_from(r.end - r.start).map_err(|_| format!("tensor '{}' has {} bytes, more than this machine can address", t.name, r.end - r.start))?;
    let mut buf = vec![0u8; len];
    src.read_at(r.start, &mut buf).await.map_err(|e| format!("reading '{}': {e}", t.name))?;
    Ok(buf)
}

/// The active adapters and their scratch: y = W·x, then y += s·(alpha/r)·B·(A·x) for each
/// adapter that covers W (a part of a stacked W).
pub(crate) struct Lora<'a> {
    pub adapters: &'a [(Arc<LoraAdapter>, f32)],
    /// [B][max rank] and [B][max n_out]: A·x and B·(A·x).
    pub t: Option<&'a wgpu::Buffer>,
    pub u: Option<&'a wgpu::Buffer>,
}

impl Lora<'_> {
    /// The parts of `matrices`, in order, into `outs`: one output per part. `lora_x` is the
    /// input as the adapters read it (the normalised x: with adapters active the caller does
    /// not fuse the norm).
    pub async fn project(
        &self,
        r: &mut Recorder<'_>,
        matrices: &[GpuMatrix],
        input: ProductIn<'_>,
        lora_x: &wgpu::Buffer,
        outs: &[&wgpu::Buffer],
        n: u32,
    ) -> Result<(), GpuError> {
        let mut rest = outs;
        for w in matrices {
            let (mine, others) = rest.split_at(w.parts.len());
            rest = others;
            r.product(w, input, ProductOut::Split(mine), n).await?;
            if self.adapters.is_empty() {
                continue;
            }
            // consecutive parts of one name are one fused tensor (phi3's attn_qkv): its term is
            // computed once and each part takes its rows
            let mut i = 0;
            while i < w.parts.len() {
                let name = &w.parts[i].0;
                let end = i + w.parts[i..].iter().take_while(|(n, _)| n == name).count();
                let rows: Vec<u32> = w.parts[i..end].iter().map(|(_, rows)| *rows).collect();
                self.add_terms(r, name, &rows, lora_x, &mine[i..end], n).await?;
                i = end;
            }
        }
        Ok(())
    }

    /// y += W·x (W one plain matrix), adapters' terms included.
    pub async fn project_residual(&self, r: &mut Recorder<'_>, w: &GpuMatrix, x: &wgpu::Buffer, y: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        r.product(w, ProductIn::X(x), ProductOut::Residual(y), n).await?;
        self.add_terms(r, &w.name, &[w.n_rows], x, &[y], n).await
    }

    /// The parts of one tensor `name` (their rows, in order) into their outputs ys, for each
    /// active adapter covering it: ys[i] [n][rows_i] += s·(alpha/r)·(B·(A·x))[n][part i's rows].
    async fn add_terms(&self, r: &mut Recorder<'_>, name: &str, rows: &[u32], x: &wgpu::Buffer, ys: &[&wgpu::Buffer], n: u32) -> Result<(), GpuError> {
        let total: u32 = rows.iter().sum();
        for (adapter, scale) in self.adapters {
            let Some(pair) = adapter.pairs.get(name) else { continue };
            let (t, u) = (self.t.unwrap(), self.u.unwrap());
            r.matmul(&pair.a, x, t, n).await?; //   [n][rank]
            r.matmul(&pair.b, t, u, n).await?; //   [n][total]
            let factor = adapter.factor(pair, *scale);
            if let [y] = ys {
                r.accumulate(y, u, n * total, factor).await?;
                continue;
            }
            let mut offset = 0;
            for (part_rows, y) in rows.iter().zip(ys) {
                r.accumulate_rows(y, u, n, *part_rows, total, offset, factor).await?;
                offset += part_rows;
            }
        }
        Ok(())
    }
}
