//! The k best values and their ids, selected on the GPU in passes (topk.wgsl); argmax is k = 1.

use super::pipeline::Bind::{self, *};
use super::support::{supports, Op};
use super::Recorder;
use crate::device::{Gpu, GpuError, PipelineKey};
use crate::shaders::Defines;

/// topk.wgsl's bindings, in order: values, ids, mask, out_values, out_ids, params.
pub const TOPK_LAYOUT: &[Bind] = &[Read, Read, Read, ReadWrite, ReadWrite, Uniform];

/// The id a selection writes where fewer than k candidates were allowed.
pub const NO_ID: u32 = u32::MAX;

/// The largest k a selection takes.
pub const MAX_TOP_K: u32 = 128;
/// Candidates one workgroup takes per pass, keeping its k best (topk.wgsl's CHUNK).
const TOPK_CHUNK: u32 = 1024;
/// The same for k = 1, the `argmax` entry point (its ARG_CHUNK).
const ARGMAX_CHUNK: u32 = 4096;

params! {
    /// topk.wgsl's `struct Params`.
    struct TopKParams {
        n: u32,
        k: u32,
        first_pass: u32,
        masked: u32,
    }
}

pub(super) fn pipeline_keys() -> Vec<PipelineKey> {
    ["main", "argmax"].into_iter().map(|entry| PipelineKey { file: "topk.wgsl", entry, defines: Defines::new() }).collect()
}

/// The k best (id, value) pairs of values: [n], highest first, computed on the GPU in passes of
/// per-workgroup selections until one workgroup remains. Argmax is `top_k(.., 1)`.
pub async fn top_k(gpu: &Gpu, values: &wgpu::Buffer, n: u32, k: u32) -> Result<Vec<(u32, f32)>, GpuError> {
    top_k_masked(gpu, values, n, k, None).await
}

/// `top_k` among the ids `mask` allows (bit i % 32 of word i / 32); fewer than k pairs when
/// fewer are allowed.
pub async fn top_k_masked(gpu: &Gpu, values: &wgpu::Buffer, n: u32, k: u32, mask: Option<&[u32]>) -> Result<Vec<(u32, f32)>, GpuError> {
    let scratch = TopKScratch::new(gpu, n).await?;
    if let Some(m) = mask {
        scratch.set_mask(gpu, m);
    }
    let mut rec = Recorder::new(gpu);
    let (v, ids) = record_top_k_masked(&mut rec, &scratch, values, n, k, mask.is_some()).await?;
    rec.submit()?;
    let vals = gpu.read_f32(v, 0, k as usize).await?;
    let ids = gpu.read_u32(ids, 0, k as usize).await?;
    Ok(ids.into_iter().zip(vals).filter(|(id, _)| *id != NO_ID).collect())
}

/// The buffers a top-k selection over up to n values passes its candidates through, made once
/// for all the selections of a session: two (values, ids) pairs that the passes alternate
/// between, each large enough for the first pass's output (every later pass writes less).
pub struct TopKScratch {
    n: u32,
    values: [wgpu::Buffer; 2],
    ids: [wgpu::Buffer; 2],
    /// The allowed ids of a masked selection, a bit each: [n / 32 + 1] words.
    mask: wgpu::Buffer,
}

impl TopKScratch {
    pub async fn new(gpu: &Gpu, n: u32) -> Result<TopKScratch, GpuError> {
        let most = n.div_ceil(ARGMAX_CHUNK).max(n.div_ceil(TOPK_CHUNK) * MAX_TOP_K) as u64 * 4;
        Ok(TopKScratch {
            n,
            values: [gpu.storage("topk values", most).await?, gpu.storage("topk values", most).await?],
            ids: [gpu.storage("topk ids", most).await?, gpu.storage("topk ids", most).await?],
            mask: gpu.storage("topk mask", (n / 32 + 1) as u64 * 4).await?,
        })
    }

    /// Uploads the mask the next masked selection reads (queued before any later submission);
    /// words past `words` are cleared, words past the scratch's n ignored.
    pub fn set_mask(&self, gpu: &Gpu, words: &[u32]) {
        let len = (self.n / 32 + 1) as usize;
        let mut all = words[..words.len().min(len)].to_vec();
        all.resize(len, 0);
        gpu.queue.write_buffer(&self.mask, 0, bytemuck::cast_slice(&all));
    }
}

/// Record the top-k passes over values: [n]; the k best values and their ids, highest first,
/// are then at the start of the returned buffers of `scratch`.
pub async fn record_top_k<'s>(
    rec: &mut Recorder<'_>,
    scratch: &'s TopKScratch,
    values: &wgpu::Buffer,
    n: u32,
    k: u32,
) -> Result<(&'s wgpu::Buffer, &'s wgpu::Buffer), GpuError> {
    record_top_k_masked(rec, scratch, values, n, k, false).await
}

/// `record_top_k`, with `masked`: among the ids the scratch's mask allows
/// ([`TopKScratch::set_mask`]); ids NO_ID fill the places of candidates that were not allowed.
pub async fn record_top_k_masked<'s>(
    rec: &mut Recorder<'_>,
    scratch: &'s TopKScratch,
    values: &wgpu::Buffer,
    n: u32,
    k: u32,
    masked: bool,
) -> Result<(&'s wgpu::Buffer, &'s wgpu::Buffer), GpuError> {
    record_passes(rec, scratch, values, None, n, k, masked).await
}

/// The argmax of n (value, id) candidates (values: [n] f32, ids: [n] u32), such as a product's
/// best rows (`ProductOut::Argmax`); where `record_top_k` leaves it.
pub async fn record_argmax_of<'s>(
    rec: &mut Recorder<'_>,
    scratch: &'s TopKScratch,
    values: &wgpu::Buffer,
    ids: &wgpu::Buffer,
    n: u32,
) -> Result<(&'s wgpu::Buffer, &'s wgpu::Buffer), GpuError> {
    record_passes(rec, scratch, values, Some(ids), n, 1, false).await
}

/// The passes of a selection over values with their `ids` (None: the index is the id).
async fn record_passes<'s>(
    rec: &mut Recorder<'_>,
    scratch: &'s TopKScratch,
    values: &wgpu::Buffer,
    ids: Option<&wgpu::Buffer>,
    n: u32,
    k: u32,
    masked: bool,
) -> Result<(&'s wgpu::Buffer, &'s wgpu::Buffer), GpuError> {
    supports(Op::TopK { n, k }, None)?;
    if n > scratch.n {
        return Err(GpuError::Unsupported(format!("top-k over {n} values with scratch for {}", scratch.n)));
    }
    let mut count = n;
    // k = 1 takes the argmax entry point, with its larger chunks
    let (entry, chunk) = if k == 1 { ("argmax", ARGMAX_CHUNK) } else { ("main", TOPK_CHUNK) };
    let mut pass = 0;
    loop {
        let groups = count.div_ceil(chunk);
        let out = pass % 2;
        let (in_v, in_id) = if pass == 0 { (values, ids.unwrap_or(values)) } else { (&scratch.values[1 - out], &scratch.ids[1 - out]) };
        rec.dispatch(
            PipelineKey { file: "topk.wgsl", entry, defines: Defines::new() },
            &[in_v, in_id, &scratch.mask, &scratch.values[out], &scratch.ids[out]],
            &TopKParams { n: count, k, first_pass: (pass == 0 && ids.is_none()) as u32, masked: masked as u32 },
            (groups, 1, 1),
        )
        .await?;
        count = groups * k;
        if groups == 1 {
            return Ok((&scratch.values[out], &scratch.ids[out]));
        }
        pass += 1;
    }
}
