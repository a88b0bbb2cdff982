//! The GPU device: adapter choice, limits, optional features, errors, buffers and read-back,
//! the `NOMOAT_*` kernel overrides read when it opens, and its cache of compiled pipelines.
//!
//! nomoat asks for the adapter's own limits (browsers hand out the spec's 128 MiB storage binding
//! unless asked) and for shader-f16 and subgroups when present; the kernels take the matching
//! [`Variant`] and fall back to plain f32 / shared-memory code when a feature is missing.
//! Validation and out-of-memory errors are caught with error scopes around the operations that
//! can fail, and device loss is latched so every later call reports it instead of producing
//! garbage.
//!
//! This module uses no kernel code: the kernels' side builds on it (`Gpu::pipeline` compiles a
//! [`PipelineKey`] with the bind-group layout its op declares), never the other way round.

use crate::shaders::{Defines, Variant};
pub use crate::tuning::KernelOverrides;
use crate::tuning::Tuning;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What a GPU operation can fail with.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[allow(missing_docs)] // each variant's #[error] message says what it means and names its fields
pub enum GpuError {
    #[error("no GPU adapter found{0}")]
    NoAdapter(String),
    #[error("could not open the GPU device: {0}")]
    RequestDevice(String),
    #[error("out of GPU memory while {what} ({bytes} bytes requested)")]
    OutOfMemory { what: String, bytes: u64 },
    #[error("GPU device lost: {0}")]
    DeviceLost(String),
    #[error("GPU validation error while {what}: {message}")]
    Validation { what: String, message: String },
    #[error("reading back from the GPU failed: {0}")]
    Readback(String),
    #[error("{0}")]
    Unsupported(String),
}

/// Makes wgpu panic here, as a bug in this file would (a buffer sliced past its end): how the
/// server's tests put a panic inside the GPU layer (`NOMOAT_FAULT_GPU_PANIC_AT`).
#[doc(hidden)]
pub fn provoke_wgpu_panic(device: &wgpu::Device) {
    let buffer = device.create_buffer(&wgpu::BufferDescriptor { label: Some("fault"), size: 4, usage: wgpu::BufferUsages::COPY_DST, mapped_at_creation: false });
    let _ = buffer.slice(..8);
}

/// What the caller wants from the device. Tests turn features off to exercise every variant.
#[derive(Clone, Debug)]
pub struct GpuOptions {
    /// Use shader-f16 where the device has it (off: no kernel uses f16 arithmetic).
    pub allow_f16: bool,
    /// Use subgroup operations where the device has them (off: the kernels without them).
    pub allow_subgroups: bool,
    /// Substring of the adapter name to pick; `WGPU_ADAPTER_NAME` also works.
    pub adapter_name: Option<String>,
    /// Ask for a smaller storage-binding limit than the adapter offers: how tests (and anyone
    /// curious) see what a phone's 128 MiB or smaller limit does to tensor splitting.
    pub max_storage_binding: Option<u64>,
    /// Use at most this many bytes of GPU buffers (to leave room for other programs, or to see
    /// what a smaller GPU does); beyond it allocations fail as out-of-memory. Enforced where
    /// the driver's buffer counters are available (native builds).
    pub memory_budget: Option<u64>,
    /// Time every dispatch with GPU timestamps (where the adapter has timestamp queries inside
    /// passes: native Vulkan, Metal, DX12) and add it up per kernel; see [`Gpu::take_profile`].
    /// Each submission then waits for its timestamps, so this is for `nomoat bench --profile`.
    pub profile: bool,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions { allow_f16: true, allow_subgroups: true, adapter_name: None, max_storage_binding: None, memory_budget: None, profile: false }
    }
}

/// GPU time spent in one kernel (file, entry point and weight type) since the last take.
#[derive(Clone, Debug)]
pub struct KernelTime {
    /// The kernel: WGSL file, entry point unless `main`, weight type.
    pub kernel: String,
    /// Dispatches of it.
    pub calls: u64,
    /// GPU time they took, in seconds.
    pub seconds: f64,
}

/// A compute pipeline as the kernels ask for it: shader file, entry point and the defines the
/// file is generated with (on the device's [`Variant`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    /// The WGSL file under `shaders/`.
    pub file: &'static str,
    /// Its entry point.
    pub entry: &'static str,
    /// The flags and values the file is generated with.
    pub defines: Defines,
}

impl PipelineKey {
    /// How the profiler names this kernel: file, entry point unless main, and weight type.
    pub(crate) fn profile_name(&self) -> String {
        let mut name = self.file.trim_end_matches(".wgsl").to_string();
        if self.entry != "main" {
            name += &format!(":{}", self.entry);
        }
        for flag in self.defines.0.keys().filter_map(|k| k.strip_prefix("TYPE_")) {
            name += &format!(" {flag}");
        }
        name
    }
}

/// A compiled pipeline and its bind-group layout.
pub struct Pipeline {
    /// The compiled pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Its bind-group layout, for making bind groups.
    pub layout: wgpu::BindGroupLayout,
}

/// The pipelines a device has compiled (see `Gpu::pipeline`), built once each.
#[derive(Default)]
pub(crate) struct PipelineCache {
    map: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
}

impl PipelineCache {
    pub(crate) fn get(&self, key: &PipelineKey) -> Option<Arc<Pipeline>> {
        self.map.lock().unwrap().get(key).cloned()
    }

    pub(crate) fn insert(&self, key: PipelineKey, p: Arc<Pipeline>) {
        self.map.lock().unwrap().insert(key, p);
    }
}

/// An open GPU device: its queue, limits and kernel choices, the pipelines compiled on it, and
/// how its memory is accounted. Every model, session and adapter lives on one.
pub struct Gpu {
    /// The wgpu device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// What the adapter says about itself (name, backend, driver).
    pub info: wgpu::AdapterInfo,
    /// The limits the device was opened with.
    pub limits: wgpu::Limits,
    /// Which kernel code paths it runs (f16, subgroups, browser).
    pub variant: Variant,
    lost: Arc<Mutex<Option<String>>>,
    memory_budget: Option<u64>,
    pub(crate) pipelines: PipelineCache,
    /// Small buffers bound where a dispatch uses no buffer (WebGPU wants every binding of the
    /// layout filled, and one buffer bound twice with one binding writable is an error).
    pub(crate) unused_buffers: [wgpu::Buffer; 3],
    /// Per-kernel (calls, seconds) when profiling; None otherwise.
    pub(crate) profile: Option<Mutex<std::collections::BTreeMap<String, (u64, f64)>>>,
    /// NOMOAT_* kernel choices, read from the environment when the device was opened.
    pub overrides: KernelOverrides,
    /// The kernel choices for this device, made once from its capabilities and `overrides`.
    pub tuning: Tuning,
}

impl Gpu {
    /// Opens a device: the adapter named like `opts.adapter_name` or `WGPU_ADAPTER_NAME`, else the
    /// high-performance one wgpu offers (`WGPU_BACKEND` picks the backends; OpenGL is left out
    /// otherwise), with the features it has and `opts` allow.
    pub async fn new(opts: GpuOptions) -> Result<Gpu, GpuError> {
        let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        // WGPU_BACKEND picks a backend; otherwise leave out OpenGL, whose compute support is
        // too thin for these kernels (and on Linux it would offer llvmpipe beside lavapipe)
        if std::env::var_os("WGPU_BACKEND").is_none() {
            desc.backends = wgpu::Backends::PRIMARY;
        }
        let instance = wgpu::Instance::new(desc);
        let wanted = opts.adapter_name.clone().or_else(|| std::env::var("WGPU_ADAPTER_NAME").ok());
        let adapter = match &wanted {
            #[cfg(not(target_arch = "wasm32"))]
            Some(name) => {
                let adapters = instance.enumerate_adapters(wgpu::Backends::all()).await;
                let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
                adapters
                    .into_iter()
                    .find(|a| a.get_info().name.to_lowercase().contains(&name.to_lowercase()))
                    .ok_or_else(|| GpuError::NoAdapter(format!(" named like '{name}' (have: {})", names.join(", "))))?
            }
            _ => instance
                .request_adapter(&wgpu::RequestAdapterOptions { power_preference: wgpu::PowerPreference::HighPerformance, ..Default::default() })
                .await
                .map_err(|e| GpuError::NoAdapter(format!(": {e}")))?,
        };
        let info = adapter.get_info();
        let available = adapter.features();
        let f16 = opts.allow_f16 && available.contains(wgpu::Features::SHADER_F16);
        let subgroups = opts.allow_subgroups && available.contains(wgpu::Features::SUBGROUP);
        let mut features = wgpu::Features::empty();
        if f16 {
            features |= wgpu::Features::SHADER_F16;
        }
        if subgroups {
            features |= wgpu::Features::SUBGROUP;
        }
        let timestamps = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        let profile = opts.profile && available.contains(timestamps);
        if profile {
            features |= timestamps;
        }
        let mut limits = adapter.limits();
        if let Some(cap) = opts.max_storage_binding {
            limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(cap);
        }
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor { label: Some("nomoat"), required_features: features, required_limits: limits.clone(), ..Default::default() })
            .await
            .map_err(|e| GpuError::RequestDevice(e.to_string()))?;
        let lost = Arc::new(Mutex::new(None));
        let lost_flag = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            *lost_flag.lock().unwrap() = Some(format!("{reason:?}: {message}"));
        });
        // Errors outside an explicit scope would otherwise abort the process in wgpu's default
        // handler; record them as a loss of the device so the caller gets an error instead.
        let uncaptured = lost.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            let mut slot = uncaptured.lock().unwrap();
            if slot.is_none() {
                *slot = Some(format!("uncaptured GPU error: {e}"));
            }
        }));
        let variant = Variant { f16, subgroups, web: cfg!(target_arch = "wasm32") };
        let profile = profile.then(Default::default);
        let unused =
            || device.create_buffer(&wgpu::BufferDescriptor { label: Some("unused binding"), size: 16, usage: wgpu::BufferUsages::STORAGE, mapped_at_creation: false });
        let unused_buffers = [unused(), unused(), unused()];
        let overrides = KernelOverrides::from_env();
        let tuning = Tuning::for_device(&info, variant, &overrides);
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            variant,
            lost,
            memory_budget: opts.memory_budget,
            pipelines: Default::default(),
            unused_buffers,
            profile,
            overrides,
            tuning,
        })
    }

    /// Replace what the adapter said about itself (the browser backend leaves the name empty
    /// and calls software adapters GPUs) and make the kernel choices again from it.
    pub fn set_adapter_info(&mut self, info: wgpu::AdapterInfo) {
        self.tuning = Tuning::for_device(&info, self.variant, &self.overrides);
        self.info = info;
    }

    /// Whether dispatches are being timed (profiling was asked for and the adapter can).
    pub fn profiling(&self) -> bool {
        self.profile.is_some()
    }

    /// GPU time per kernel since the last call, largest first (empty when not profiling).
    pub fn take_profile(&self) -> Vec<KernelTime> {
        let Some(p) = &self.profile else { return Vec::new() };
        let map = std::mem::take(&mut *p.lock().unwrap());
        let mut v: Vec<KernelTime> = map.into_iter().map(|(kernel, (calls, seconds))| KernelTime { kernel, calls, seconds }).collect();
        v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        v
    }

    /// Largest byte size one tensor chunk may have: a storage binding and a buffer both cap it.
    pub fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size.min(self.limits.max_buffer_size)
    }

    /// Bytes of GPU buffers alive on this device, where wgpu counts them (native builds with
    /// wgpu's `counters` feature); None elsewhere.
    pub fn buffer_memory(&self) -> Option<i64> {
        let c = self.device.get_internal_counters();
        let v = c.hal.buffer_memory.read();
        (v > 0).then_some(v as i64)
    }

    /// `GpuError::DeviceLost` once the device is lost (a driver reset, or the browser took it
    /// back).
    pub fn check_lost(&self) -> Result<(), GpuError> {
        match self.lost.lock().unwrap().as_ref() {
            Some(m) => Err(GpuError::DeviceLost(m.clone())),
            None => Ok(()),
        }
    }

    /// Adapter name, backend, driver, kernel variant and largest storage binding, in one line.
    pub fn describe(&self) -> String {
        format!("{} ({:?}, {}), kernels {}, max binding {} MiB", self.info.name, self.info.backend, self.info.driver, self.variant.label(), self.max_binding() >> 20)
    }

    /// Run `f` inside out-of-memory and validation error scopes and report what they caught.
    pub async fn scoped<T>(&self, what: &str, bytes: u64, f: impl FnOnce() -> T) -> Result<T, GpuError> {
        self.check_lost()?;
        if let Some(budget) = self.memory_budget {
            if self.buffer_memory().is_some_and(|used| used as u64 + bytes > budget) {
                return Err(GpuError::OutOfMemory { what: format!("{what} (over the {budget}-byte GPU memory budget)"), bytes });
            }
        }
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let v = validation.pop().await;
        let o = oom.pop().await;
        if let Some(e) = o {
            let _ = e;
            return Err(GpuError::OutOfMemory { what: what.to_string(), bytes });
        }
        if let Some(e) = v {
            return Err(GpuError::Validation { what: what.to_string(), message: e.to_string() });
        }
        self.check_lost()?;
        Ok(value)
    }

    /// A storage buffer holding `data`, padded with zeros to `data.len() + pad` rounded up to 4
    /// bytes (the kernels that read GGUF blocks word by word read a little past a row's end).
    pub async fn upload(&self, label: &str, data: &[u8], pad: usize) -> Result<wgpu::Buffer, GpuError> {
        let size = ((data.len() + pad).max(4) + 3) & !3;
        let buf = self
            .scoped(&format!("uploading {label}"), size as u64, || {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: size as u64,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                })
            })
            .await?;
        let aligned = data.len() & !3;
        if aligned > 0 {
            self.queue.write_buffer(&buf, 0, &data[..aligned]);
        }
        if aligned < data.len() {
            let mut tail = data[aligned..].to_vec();
            tail.resize(4, 0);
            self.queue.write_buffer(&buf, aligned as u64, &tail);
        }
        Ok(buf)
    }

    /// A storage buffer holding `data` (see [`Gpu::upload`]).
    pub async fn upload_f32(&self, label: &str, data: &[f32]) -> Result<wgpu::Buffer, GpuError> {
        self.upload(label, bytemuck::cast_slice(data), 0).await
    }

    /// A storage buffer holding `data` (see [`Gpu::upload`]).
    pub async fn upload_u32(&self, label: &str, data: &[u32]) -> Result<wgpu::Buffer, GpuError> {
        self.upload(label, bytemuck::cast_slice(data), 0).await
    }

    /// An uninitialised storage buffer of `bytes` (rounded up to 4).
    pub async fn storage(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer, GpuError> {
        let size = (bytes.max(4) + 3) & !3;
        self.scoped(&format!("allocating {label}"), size, || {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            })
        })
        .await
    }

    /// A storage buffer holding `parts`' whole contents one after another.
    pub async fn concat(&self, label: &str, parts: &[&wgpu::Buffer]) -> Result<wgpu::Buffer, GpuError> {
        self.check_lost()?;
        let out = self.storage(label, parts.iter().map(|b| b.size()).sum()).await?;
        let mut enc = self.device.create_command_encoder(&Default::default());
        let mut offset = 0;
        for b in parts {
            enc.copy_buffer_to_buffer(b, 0, &out, offset, b.size());
            offset += b.size();
        }
        self.queue.submit([enc.finish()]);
        Ok(out)
    }

    /// Copy `bytes` bytes from `src` at `offset` back to the host.
    pub async fn read(&self, src: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u8>, GpuError> {
        self.check_lost()?;
        let size = (bytes + 3) & !3;
        let staging = self.readback_buffer(size);
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(src, offset, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        let mut data = self.read_mapped(&staging, size).await?;
        data.truncate(bytes as usize);
        Ok(data)
    }

    /// A buffer to copy `bytes` into for reading back (`read_mapped`).
    pub fn readback_buffer(&self, bytes: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("readback"),
            size: bytes.max(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// The first `bytes` (a multiple of 4) of a readback buffer, once the submitted work that
    /// fills it is done; the buffer is unmapped again for the next use.
    pub async fn read_mapped(&self, staging: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>, GpuError> {
        let slice = staging.slice(..bytes.max(4));
        let (tx, rx) = futures::channel::oneshot::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None }).map_err(|e| GpuError::Readback(e.to_string()))?;
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.check_lost()?;
                return Err(GpuError::Readback(e.to_string()));
            }
            Err(_) => return Err(GpuError::Readback("map callback dropped".into())),
        }
        let data = slice.get_mapped_range().map_err(|e| GpuError::Readback(e.to_string()))?[..bytes as usize].to_vec();
        staging.unmap();
        self.check_lost()?;
        Ok(data)
    }

    /// `n` f32 values of `src` from element `offset_elems` on.
    pub async fn read_f32(&self, src: &wgpu::Buffer, offset_elems: u64, n: usize) -> Result<Vec<f32>, GpuError> {
        let b = self.read(src, offset_elems * 4, n as u64 * 4).await?;
        Ok(bytemuck::cast_slice(&b).to_vec())
    }

    /// `n` u32 values of `src` from element `offset_elems` on.
    pub async fn read_u32(&self, src: &wgpu::Buffer, offset_elems: u64, n: usize) -> Result<Vec<u32>, GpuError> {
        let b = self.read(src, offset_elems * 4, n as u64 * 4).await?;
        Ok(bytemuck::cast_slice(&b).to_vec())
    }

    /// Wait until all submitted work is done, so dropped buffers are released (native; a no-op
    /// in the browser, where read-back awaits instead). Written data waits in staging memory
    /// until the next submission, so pending writes are submitted first: a model load waits
    /// after each tensor and never holds a second copy of its weights.
    pub fn wait(&self) -> Result<(), GpuError> {
        self.check_lost()?;
        self.queue.submit([]);
        #[cfg(not(target_arch = "wasm32"))]
        self.device.poll(wgpu::PollType::Wait { submission_index: None, timeout: None }).map_err(|e| GpuError::DeviceLost(e.to_string()))?;
        self.check_lost()
    }
}
