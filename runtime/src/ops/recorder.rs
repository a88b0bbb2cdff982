//! Recording dispatches: the [`Recorder`] (one command encoder, consecutive dispatches in one
//! compute pass), its submission (with per-dispatch timestamps when profiling), and the
//! [`DispatchCache`] of parameter slots and bind groups it records against. The ops' own
//! `Recorder` methods live in their files and all end in `Recorder::dispatch`.

use super::AttentionFamily;
use crate::device::{Gpu, GpuError, PipelineKey};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Bytes of one dispatch's slot in a parameter buffer: a multiple of every device's uniform
/// offset alignment (WebGPU allows at most 256) and at least any kernel's parameters.
const PARAM_SLOT: u64 = 256;

/// Parameter slots of a recorder that brings no [`DispatchCache`] of its own: past them it
/// submits what it has and starts over.
const OWN_PARAM_SLOTS: u32 = 64;

/// Bind groups a cache keeps at most: past them it starts over (a guard against a caller that
/// records over new buffers every time; a session's decode meets a few hundred).
const MAX_CACHED_BIND_GROUPS: usize = 4096;

/// What the recordings of one sequence of work over the same buffers (a session's tokens) keep
/// between them, so that recording a dispatch creates no GPU object: a uniform buffer of
/// parameter slots, one per dispatch of a submission, that the kernels read at a dynamic
/// offset, and the bind group of every (layout, buffers) combination met so far. The bind
/// groups hold their buffers: `clear` lets go of them.
pub struct DispatchCache {
    params: wgpu::Buffer,
    slots: u32,
    bind_groups: Mutex<HashMap<BindKey, wgpu::BindGroup>>,
    /// Split-K attention's partial results (`Recorder::attention_partials`), grown on demand:
    /// one buffer for every layer, whose dispatches run in order.
    partials: Mutex<Option<wgpu::Buffer>>,
}

#[derive(PartialEq, Eq, Hash)]
struct BindKey {
    layout: wgpu::BindGroupLayout,
    buffers: Vec<wgpu::Buffer>,
}

impl DispatchCache {
    /// A cache whose recordings submit every `slots` dispatches at most.
    pub fn new(gpu: &Gpu, slots: u32) -> DispatchCache {
        let params = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dispatch params"),
            size: slots.max(1) as u64 * PARAM_SLOT,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        DispatchCache { params, slots: slots.max(1), bind_groups: Mutex::new(HashMap::new()), partials: Mutex::new(None) }
    }

    /// Forget the bind groups, and with them the buffers they hold.
    pub fn clear(&self) {
        self.bind_groups.lock().unwrap().clear();
    }

    /// The bind group of `buffers` (then the parameter slots) for `layout`, made on first use.
    fn bind_group(&self, gpu: &Gpu, layout: &wgpu::BindGroupLayout, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let key = BindKey { layout: layout.clone(), buffers: buffers.iter().map(|&b| b.clone()).collect() };
        let mut map = self.bind_groups.lock().unwrap();
        if let Some(bg) = map.get(&key) {
            return bg.clone();
        }
        if map.len() >= MAX_CACHED_BIND_GROUPS {
            map.clear();
        }
        let slot = wgpu::BufferBinding { buffer: &self.params, offset: 0, size: std::num::NonZeroU64::new(PARAM_SLOT) };
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() })
            .chain(std::iter::once(wgpu::BindGroupEntry { binding: buffers.len() as u32, resource: wgpu::BindingResource::Buffer(slot) }))
            .collect();
        let bg = gpu.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout, entries: &entries });
        map.insert(key, bg.clone());
        bg
    }
}

/// Records dispatches into one command encoder, consecutive dispatches into one compute pass:
/// a pass costs lavapipe time of its own on top of its dispatches, and WebGPU makes each
/// dispatch its own usage scope, so one pass orders them just as well.
pub struct Recorder<'g> {
    pub gpu: &'g Gpu,
    // declared before the encoder so that it is dropped first
    pass: Option<wgpu::ComputePass<'static>>,
    encoder: wgpu::CommandEncoder,
    /// When profiling: a timestamp before and after every dispatch.
    timer: Option<DispatchTimer>,
    /// Parameter slots and bind groups, the recorder's own or a session's.
    cache: Arc<DispatchCache>,
    /// The parameters of the dispatches recorded since the last submission, slot by slot:
    /// written to the cache's buffer just before the submission that reads them (queue order
    /// keeps earlier submissions reading theirs).
    params: Vec<u8>,
    /// Products of several tokens: Some(true) runs the tiled matmul.wgsl, Some(false)
    /// matvec.wgsl's token loop, None what suits the device (tests run both everywhere).
    pub tiled_matmul: Option<bool>,
    /// matvec.wgsl's token loop: Some(true) several tokens a pass (TOKEN_TILE), Some(false)
    /// one, None what suits the device (tests run both everywhere).
    pub token_tile: Option<bool>,
    /// TOKEN_TILE's tokens a pass (2 to 4): Some forces it, None takes `Tuning::tile_for`.
    pub tile_tokens: Option<u32>,
    /// matvec.wgsl's shape: Some forces one (tests run GPUs' `MatvecShape::GPU` on CPU
    /// devices), None the device's.
    pub matvec_shape: Option<crate::tuning::MatvecShape>,
    /// Attention: Some forces a family of kernels (see `attention_kernel`), None what suits
    /// the device (tests run each everywhere).
    pub attention_family: Option<AttentionFamily>,
    /// Attention's split-K (flash-decoding): Some(n) cuts each query's keys into n chunks (at
    /// most one per 8 keys; Some(1): no split), None where it pays on the device (tests and
    /// benchmarks force both).
    pub split_k: Option<u32>,
    /// product_backward.wgsl: Some forces DY_BROADCAST on (where the device and shape allow
    /// it) or off, None leaves it to the device's `Tuning` and the rows.
    pub backward_broadcast: Option<bool>,
    /// product_backward.wgsl: Some forces PAIRED on (for the types that have it) or off, None
    /// leaves it to the device's `Tuning`.
    pub backward_paired: Option<bool>,
    /// attention_backward.wgsl: Some forces a kernel (Broadcast only where the device and head
    /// size allow it), None leaves it to the device's `Tuning`.
    pub attention_backward_mode: Option<super::AttentionBackwardKernel>,
    /// weight_gradient.wgsl and skinny_product.wgsl: Some(false) forces the scalar kernels,
    /// Some(true) or None TILES where the shapes allow (`Tuning::lora_tiles` aside).
    pub lora_tiles: Option<bool>,
}

/// Dispatches one query set times when profiling (two timestamps each; wgpu's query-set cap
/// is 4096): a submission of more goes on in a new set.
const MAX_TIMED_DISPATCHES: u32 = 2048;

/// The profiler's timestamps: the query set being written with the kernels of its dispatches,
/// and the full sets already resolved into read-back buffers, with theirs.
struct DispatchTimer {
    set: wgpu::QuerySet,
    kernels: Vec<String>,
    resolved: Vec<(wgpu::Buffer, Vec<String>)>,
}

impl DispatchTimer {
    fn new(gpu: &Gpu) -> DispatchTimer {
        let set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("dispatch timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2 * MAX_TIMED_DISPATCHES,
        });
        DispatchTimer { set, kernels: Vec::new(), resolved: Vec::new() }
    }

    /// Resolves the current set's timestamps into a read-back buffer (recorded in `encoder`,
    /// outside any pass) and starts a new set.
    fn resolve(&mut self, gpu: &Gpu, encoder: &mut wgpu::CommandEncoder) {
        let n = 2 * self.kernels.len() as u64;
        if n == 0 {
            return;
        }
        let usage = wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC;
        let resolved = gpu.device.create_buffer(&wgpu::BufferDescriptor { label: None, size: 8 * n, usage, mapped_at_creation: false });
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let readback = gpu.device.create_buffer(&wgpu::BufferDescriptor { label: None, size: 8 * n, usage, mapped_at_creation: false });
        encoder.resolve_query_set(&self.set, 0..n as u32, &resolved, 0);
        encoder.copy_buffer_to_buffer(&resolved, 0, &readback, 0, 8 * n);
        let full = std::mem::replace(self, DispatchTimer::new(gpu));
        self.resolved = full.resolved;
        self.resolved.push((readback, full.kernels));
    }
}

impl<'g> Recorder<'g> {
    pub fn new(gpu: &'g Gpu) -> Recorder<'g> {
        Recorder::with_cache(gpu, Arc::new(DispatchCache::new(gpu, OWN_PARAM_SLOTS)))
    }

    /// A recorder that takes its parameter slots and bind groups from `cache`.
    pub fn with_cache(gpu: &'g Gpu, cache: Arc<DispatchCache>) -> Recorder<'g> {
        let timer = gpu.profiling().then(|| DispatchTimer::new(gpu));
        Recorder {
            gpu,
            encoder: gpu.device.create_command_encoder(&Default::default()),
            pass: None,
            timer,
            cache,
            params: Vec::new(),
            tiled_matmul: None,
            token_tile: None,
            tile_tokens: None,
            attention_family: None,
            matvec_shape: None,
            split_k: None,
            backward_broadcast: None,
            backward_paired: None,
            attention_backward_mode: None,
            lora_tiles: None,
        }
    }

    /// The recorded parameters into the cache's slots, for the submission that follows.
    fn write_params(&mut self) {
        if !self.params.is_empty() {
            self.gpu.queue.write_buffer(&self.cache.params, 0, &self.params);
            self.params.clear();
        }
    }

    /// Submit what is recorded so far and go on recording (the parameter slots are full).
    fn flush(&mut self) -> Result<(), GpuError> {
        self.gpu.check_lost()?;
        self.pass = None;
        let done = std::mem::replace(&mut self.encoder, self.gpu.device.create_command_encoder(&Default::default()));
        self.write_params();
        self.gpu.queue.submit([done.finish()]);
        Ok(())
    }

    pub fn submit(mut self) -> Result<(), GpuError> {
        self.gpu.check_lost()?;
        self.pass = None;
        self.write_params();
        let Some(mut timer) = self.timer.take() else {
            self.gpu.queue.submit([self.encoder.finish()]);
            return Ok(());
        };
        // profiling: resolve the timestamps, wait for them and add them to the device's totals
        timer.resolve(self.gpu, &mut self.encoder);
        self.gpu.queue.submit([self.encoder.finish()]);
        for (readback, _) in &timer.resolved {
            readback.slice(..).map_async(wgpu::MapMode::Read, |_| ());
        }
        self.gpu.wait()?;
        let period = self.gpu.queue.get_timestamp_period() as f64 * 1e-9;
        let mut totals = self.gpu.profile.as_ref().unwrap().lock().unwrap();
        for (readback, kernels) in timer.resolved {
            let view = readback.slice(..).get_mapped_range().map_err(|e| GpuError::Readback(e.to_string()))?;
            let ticks: Vec<u64> = bytemuck::cast_slice(&view).to_vec();
            for (i, k) in kernels.into_iter().enumerate() {
                let t = totals.entry(k).or_default();
                t.0 += 1;
                t.1 += ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period;
            }
        }
        Ok(())
    }

    /// A buffer of at least `bytes` for split-K attention's partial results, the cache's own
    /// (kept for the next dispatches and recordings, replaced by a larger one when short).
    pub(super) async fn attention_partials(&mut self, bytes: u64) -> Result<wgpu::Buffer, GpuError> {
        if let Some(b) = self.cache.partials.lock().unwrap().as_ref().filter(|b| b.size() >= bytes) {
            return Ok(b.clone());
        }
        let b = self.gpu.storage("attention partials", bytes.next_power_of_two()).await?;
        *self.cache.partials.lock().unwrap() = Some(b.clone());
        Ok(b)
    }

    /// The encoder, for copies between dispatches (ends the open compute pass).
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        &mut self.encoder
    }

    pub(super) async fn dispatch<P: bytemuck::Pod>(&mut self, key: PipelineKey, buffers: &[&wgpu::Buffer], params: &P, groups: (u32, u32, u32)) -> Result<(), GpuError> {
        // wgpu panics on buffers created on a lost device: report the loss instead
        self.gpu.check_lost()?;
        const { assert!(std::mem::size_of::<P>() as u64 <= PARAM_SLOT) };
        let kernel = self.timer.is_some().then(|| key.profile_name());
        let p = self.gpu.pipeline(key).await?;
        if self.params.len() as u64 == self.cache.slots as u64 * PARAM_SLOT {
            self.flush()?;
        }
        let offset = self.params.len();
        self.params.extend_from_slice(bytemuck::bytes_of(params));
        self.params.resize(offset + PARAM_SLOT as usize, 0);
        let bg = self.cache.bind_group(self.gpu, &p.layout, buffers);
        if let Some(timer) = self.timer.as_mut().filter(|t| t.kernels.len() == MAX_TIMED_DISPATCHES as usize) {
            // a full query set: resolved between passes, and the next dispatches time into a new one
            self.pass = None;
            timer.resolve(self.gpu, &mut self.encoder);
        }
        let encoder = &mut self.encoder;
        let pass = self.pass.get_or_insert_with(|| encoder.begin_compute_pass(&Default::default()).forget_lifetime());
        let timed = self.timer.as_mut().map(|t| {
            let i = t.kernels.len() as u32;
            t.kernels.push(kernel.unwrap_or_default());
            pass.write_timestamp(&t.set, 2 * i);
            (&t.set, 2 * i + 1)
        });
        pass.set_pipeline(&p.pipeline);
        pass.set_bind_group(0, &bg, &[offset as u32]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        if let Some((set, i)) = timed {
            pass.write_timestamp(set, i);
        }
        Ok(())
    }
}
