//! The Rust side of every WGSL kernel: its bind-group layout (named next to the shader it
//! describes), its parameters, which (op, type, size) it supports, and how it is dispatched.
//!
//! Work is recorded into a [`Recorder`] (one command encoder) and submitted once, so a whole
//! token's worth of dispatches costs one submission (a recording longer than its parameter
//! slots, see [`DispatchCache`], submits in parts).

use crate::device::{Gpu, GpuError, Pipeline, PipelineKey};
use crate::ggml_type::GgmlType;
use crate::shaders::{self, Defines};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How a kernel uses each binding, in binding order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bind {
    Read,
    ReadWrite,
    Uniform,
}
use Bind::*;

// Bind-group layouts, one per shader file (see the shader's header comment for the shapes).
pub const MATVEC_LAYOUT: &[Bind] = &[Read, Read, ReadWrite, Read, ReadWrite, ReadWrite, Uniform]; // matvec.wgsl: w, x, y, norm_w, y1, y2, params
pub const MATMUL_LAYOUT: &[Bind] = MATVEC_LAYOUT; // matmul.wgsl: the same (norm_w unused)
pub const GATHER_LAYOUT: &[Bind] = &[Read, Read, ReadWrite, Uniform]; // gather.wgsl: table, ids, out, params
pub const NORM_LAYOUT: &[Bind] = &[Read, Read, Read, ReadWrite, Uniform]; // norm.wgsl: x, w, b, out, params
pub const SOFTMAX_LAYOUT: &[Bind] = &[Read, ReadWrite, Uniform]; // softmax.wgsl: x, out, params
pub const ELEMENTWISE_LAYOUT: &[Bind] = &[Read, Read, ReadWrite, Uniform]; // elementwise.wgsl: a, b, out, params
pub const ROPE_KV_LAYOUT: &[Bind] = &[ReadWrite, Read, Read, ReadWrite, ReadWrite, Read, Read, Uniform]; // rope_kv.wgsl: q, k, v, k_cache, v_cache, q_norm_w, k_norm_w, params
pub const ATTENTION_LAYOUT: &[Bind] = &[Read, Read, Read, ReadWrite, Uniform]; // attention.wgsl: q, k, v, out, params
pub const TOPK_LAYOUT: &[Bind] = &[Read, Read, ReadWrite, ReadWrite, Uniform]; // topk.wgsl: values, ids, out_values, out_ids, params
pub const COPY_LAYOUT: &[Bind] = &[Read, ReadWrite, Uniform]; // copy.wgsl: src, dst, params

/// Bytes kept spare after every weight chunk: `ld_u32` reads one word past a row's last byte,
/// and matvec's vec4 reads of an unaligned block can reach up to 24 bytes past its end.
pub const WEIGHT_PAD: usize = 32;

/// The largest workgroup count per dimension WebGPU guarantees.
const MAX_GROUPS: u32 = 65535;

/// Workgroup counts for `n` groups, folded into a second dimension past 65535; kernels rebuild
/// the linear index and skip the overshoot.
pub fn grid(n: u32) -> (u32, u32) {
    if n <= MAX_GROUPS {
        (n.max(1), 1)
    } else {
        (MAX_GROUPS, n.div_ceil(MAX_GROUPS))
    }
}

/// How a matvec dispatch is shaped: `tpr` invocations share a group of `rpi` consecutive rows,
/// `wg` invocations per workgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatvecShape {
    pub tpr: u32,
    pub rpi: u32,
    pub wg: u32,
    /// Quantized types load x once per subgroup and broadcast it (matvec.wgsl's X_BROADCAST):
    /// for TPR 1 on devices whose subgroups are exactly the workgroup's 8 lanes.
    pub x_broadcast: bool,
}

impl MatvecShape {
    pub fn rows_per_workgroup(&self) -> u32 {
        self.wg / self.tpr * self.rpi
    }
}

/// The matvec shape for this device. CPU devices: every invocation its own 8 rows (one x load
/// serves 8 rows), 8 invocations per workgroup (one 256-bit SIMD register of lanes), which on
/// lavapipe beat 4 rows x 16 invocations in decode and prefill. 16 rows per invocation gave
/// wrong F16 products for 70 tokens on lavapipe (the conformance suite caught it; not
/// root-caused), so it is not used. GPUs: 32 invocations per row, one row each, 64 per
/// workgroup. `NOMOAT_MATVEC_TPR`, `NOMOAT_MATVEC_RPI` and `NOMOAT_MATVEC_WG` override it for
/// tuning.
pub fn matvec_shape(gpu: &Gpu) -> MatvecShape {
    let cpu = gpu.info.device_type == wgpu::DeviceType::Cpu;
    let mut s = if cpu { MatvecShape { tpr: 1, rpi: 8, wg: 8, x_broadcast: false } } else { MatvecShape { tpr: 32, rpi: 1, wg: 64, x_broadcast: false } };
    let o = &gpu.overrides;
    s.tpr = o.matvec_tpr.unwrap_or(s.tpr);
    s.rpi = o.matvec_rpi.unwrap_or(s.rpi);
    s.wg = o.matvec_wg.unwrap_or(s.wg).max(s.tpr);
    // one x load per subgroup instead of one per lane: faster on lavapipe, decode and prefill
    s.x_broadcast = subgroups_of_8(gpu) && s.tpr == 1 && s.wg == 8 && o.matvec_x_broadcast != Some(false);
    s
}

/// Whether the device is Mesa's llvmpipe (lavapipe), whose storage loads are a per-lane loop
/// each and whose shaders stop after 65535 loop iterations.
fn is_llvmpipe(gpu: &Gpu) -> bool {
    gpu.info.name.contains("llvmpipe")
}

/// Whether the kernels have subgroups of exactly 8 invocations (lavapipe: one 256-bit register
/// of f32 lanes), which the broadcast modes (matvec's X_BROADCAST, attention's KV_BROADCAST)
/// build their 8-lane workgroups on.
fn subgroups_of_8(gpu: &Gpu) -> bool {
    gpu.variant.subgroups && gpu.info.subgroup_min_size == 8 && gpu.info.subgroup_max_size == 8
}

/// The matvec shape with an even number of rows per invocation, for outputs that need rows in
/// pairs in one invocation (gate with up, RoPE's adjacent pairs).
fn paired_matvec_shape(gpu: &Gpu) -> MatvecShape {
    let mut s = matvec_shape(gpu);
    s.rpi = (s.rpi + 1) & !1;
    s
}

fn matvec_defines(ty: GgmlType, s: MatvecShape) -> Defines {
    let mut d = Defines::new()
        .flag(&type_define(ty))
        .value("TPR", format!("{}u", s.tpr))
        .value("RPI", format!("{}u", s.rpi))
        .value("WG", format!("{}u", s.wg));
    if ty.block_elems() > 1 {
        d = d.flag("X_VEC4");
    }
    if s.tpr == 1 {
        d = d.flag("ROW_PER_INVOCATION");
    }
    if s.x_broadcast && ty.block_elems() > 1 {
        d = d.flag("X_BROADCAST");
    }
    d
}

/// Which GGML types the quantized kernels (matvec, matmul, gather) read, and whether a matrix
/// of that shape fits them; the gate callers consult before building a pipeline.
pub fn supports_quant_op(ty: GgmlType, k: u64) -> Result<(), String> {
    if !ty.is_supported_by_kernels() {
        return Err(format!("tensor type {ty} is not supported by nomoat's kernels"));
    }
    if k % ty.block_elems() as u64 != 0 {
        return Err(format!("row length {k} is not a multiple of {ty}'s block of {}", ty.block_elems()));
    }
    if k > u32::MAX as u64 / 8 {
        return Err(format!("row length {k} is too long"));
    }
    Ok(())
}

fn type_define(ty: GgmlType) -> String {
    format!("TYPE_{}", ty.name())
}

/// Every pipeline the runtime can build for some input, for validating all generated WGSL.
pub fn all_pipeline_keys() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for ty in crate::ggml_type::KERNEL_TYPES {
        let d = Defines::new().flag(&type_define(ty));
        for file in ["matmul.wgsl", "gather.wgsl"] {
            keys.push(PipelineKey { file, entry: "main", defines: d.clone() });
        }
        for (tpr, rpi, wg, x_broadcast) in [(1, 1, 64, false), (1, 4, 16, false), (1, 8, 8, false), (1, 8, 8, true), (4, 2, 64, false), (32, 1, 64, false), (64, 2, 256, false)] {
            keys.push(PipelineKey { file: "matvec.wgsl", entry: "main", defines: matvec_defines(ty, MatvecShape { tpr, rpi, wg, x_broadcast }) });
        }
        // the fused modes, on the CPU and GPU shapes; CPU prefill's four-token tiles (quantized
        // types) take every mode, the plain one too
        let fused: [&[&str]; 6] = [&["NORM_IN"], &["OUT_RESIDUAL"], &["NORM_IN", "OUT_GLU"], &["NORM_IN", "OUT_GLU", "GLU_GELU"], &["NORM_IN", "OUT_QKV_ROPE"], &["NORM_IN", "OUT_QKV_ROPE", "KV_F16"]];
        for (tpr, rpi, wg, x_broadcast) in [(1, 8, 8, false), (1, 8, 8, true), (32, 2, 64, false)] {
            let d = matvec_defines(ty, MatvecShape { tpr, rpi, wg, x_broadcast });
            let mut with_modes = |d: &Defines, modes: &[&[&str]]| {
                for flags in modes {
                    let defines = flags.iter().fold(d.clone(), |d, f| d.flag(f));
                    keys.push(PipelineKey { file: "matvec.wgsl", entry: "main", defines });
                }
            };
            with_modes(&d, &fused);
            if tpr == 1 && ty.block_elems() > 1 {
                let tile = d.flag("TOKEN_TILE");
                with_modes(&tile, &[&[]]);
                with_modes(&tile, &fused);
            }
        }
        keys.push(PipelineKey { file: "matmul.wgsl", entry: "main", defines: d.clone().flag("OUT_RESIDUAL") });
    }
    for entry in ["rms_norm", "layer_norm"] {
        keys.push(PipelineKey { file: "norm.wgsl", entry, defines: Defines::new() });
    }
    keys.push(PipelineKey { file: "norm.wgsl", entry: "rms_norm", defines: Defines::new().flag("ADD_RESIDUAL") });
    keys.push(PipelineKey { file: "softmax.wgsl", entry: "main", defines: Defines::new() });
    for entry in ["add", "accumulate", "scale", "softcap", "silu_gate", "gelu_gate"] {
        keys.push(PipelineKey { file: "elementwise.wgsl", entry, defines: Defines::new() });
    }
    for kv in [KvType::F32, KvType::F16] {
        keys.push(PipelineKey { file: "rope_kv.wgsl", entry: "main", defines: kv.defines() });
        keys.push(PipelineKey { file: "rope_kv.wgsl", entry: "main", defines: kv.defines().flag("QK_NORM") });
        keys.push(PipelineKey { file: "attention.wgsl", entry: "main", defines: kv.defines() });
        // a fixed head size (any multiple of 16, 32 with the broadcast, builds the same way)
        // and the one kernel for larger heads
        for head_dim in [64, 256] {
            keys.push(PipelineKey { file: "attention.wgsl", entry: "main", defines: query_attention_defines(kv, head_dim) });
            keys.push(PipelineKey { file: "attention.wgsl", entry: "main", defines: query_attention_defines(kv, head_dim).flag("KV_BROADCAST") });
            keys.push(PipelineKey { file: "attention.wgsl", entry: "main", defines: query_attention_defines(kv, head_dim).flag("KEY_LANES") });
            keys.push(PipelineKey { file: "attention.wgsl", entry: "main", defines: query_attention_defines(kv, head_dim).flag("KV_BROADCAST").flag("HEADS_SHARE_KV") });
        }
    }
    for entry in ["main", "argmax"] {
        keys.push(PipelineKey { file: "topk.wgsl", entry, defines: Defines::new() });
    }
    keys.push(PipelineKey { file: "copy.wgsl", entry: "main", defines: Defines::new() });
    keys
}

/// The layout a pipeline key uses.
pub fn layout_of(file: &str) -> &'static [Bind] {
    match file {
        "matvec.wgsl" => MATVEC_LAYOUT,
        "matmul.wgsl" => MATMUL_LAYOUT,
        "gather.wgsl" => GATHER_LAYOUT,
        "norm.wgsl" => NORM_LAYOUT,
        "softmax.wgsl" => SOFTMAX_LAYOUT,
        "elementwise.wgsl" => ELEMENTWISE_LAYOUT,
        "rope_kv.wgsl" => ROPE_KV_LAYOUT,
        "attention.wgsl" => ATTENTION_LAYOUT,
        "topk.wgsl" => TOPK_LAYOUT,
        "copy.wgsl" => COPY_LAYOUT,
        other => panic!("no layout for {other}"),
    }
}

impl Gpu {
    /// The compiled pipeline for `key` on this device's variant, built on first use.
    pub async fn pipeline(&self, key: PipelineKey) -> Result<Arc<Pipeline>, GpuError> {
        if let Some(p) = self.pipelines.get(&key) {
            return Ok(p);
        }
        let source = shaders::generate(key.file, self.variant, &key.defines)
            .map_err(|e| GpuError::Validation { what: "generating WGSL".into(), message: e })?;
        let bind = layout_of(key.file);
        let what = format!("building {}:{} {:?}", key.file, key.entry, key.defines.0.keys().collect::<Vec<_>>());
        let p = self
            .scoped(&what, 0, || {
                let entries: Vec<wgpu::BindGroupLayoutEntry> = bind
                    .iter()
                    .enumerate()
                    .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                        binding: i as u32,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: match b {
                            Read | ReadWrite => wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Storage { read_only: *b == Read },
                                has_dynamic_offset: false,
                                min_binding_size: None,
                            },
                            // each dispatch's slot of its recorder's parameter buffer
                            Uniform => wgpu::BindingType::Buffer {
                                ty: wgpu::BufferBindingType::Uniform,
                                has_dynamic_offset: true,
                                min_binding_size: None,
                            },
                        },
                        count: None,
                    })
                    .collect();
                let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                    label: Some(key.file),
                    entries: &entries,
                });
                let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(key.file),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: 0,
                });
                let desc = wgpu::ShaderModuleDescriptor { label: Some(key.file), source: wgpu::ShaderSource::Wgsl(source.into()) };
                let module = match std::env::var("NOMOAT_SHADER_CHECKS").ok().as_deref() {
                    Some("none") => unsafe { self.device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) },
                    Some("bounds") => unsafe {
                        let mut c = wgpu::ShaderRuntimeChecks::unchecked();
                        c.bounds_checks = true;
                        self.device.create_shader_module_trusted(desc, c)
                    },
                    _ => self.device.create_shader_module(desc),
                };
                let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(key.entry),
                    layout: Some(&pl),
                    module: &module,
                    entry_point: Some(key.entry),
                    compilation_options: Default::default(),
                    cache: None,
                });
                Pipeline { pipeline, layout }
            })
            .await?;
        let p = Arc::new(p);
        self.pipelines.insert(key, p.clone());
        Ok(p)
    }
}

/// A weight matrix on the GPU exactly as GGUF stores it, split into chunks of whole rows that
/// each fit one storage binding. W: [n_rows][k].
pub struct GpuMatrix {
    pub name: String,
    pub ty: GgmlType,
    pub n_rows: u32,
    pub k: u32,
    pub row_bytes: u32,
    pub chunks: Vec<MatrixChunk>,
    /// The GGUF tensors stacked in this matrix, in row order: (name, rows). One for a plain
    /// matrix; q/k/v or gate/up projections of one layer are stacked so that one dispatch
    /// multiplies them all (`Recorder::product` sends each part to its own output).
    pub parts: Vec<(String, u32)>,
}

pub struct MatrixChunk {
    pub first_row: u32,
    pub n_rows: u32,
    pub buffer: wgpu::Buffer,
}

impl GpuMatrix {
    /// Rows per chunk so that a chunk (plus padding) fits the device's binding limit.
    pub fn rows_per_chunk(gpu: &Gpu, row_bytes: u64) -> u64 {
        ((gpu.max_binding() - WEIGHT_PAD as u64 - 256) / row_bytes).max(1)
    }

    /// Upload `n_rows` rows of `k` elements of type `ty` from `bytes` (as stored in the file).
    pub async fn upload(gpu: &Gpu, name: &str, ty: GgmlType, k: u64, n_rows: u64, bytes: &[u8]) -> Result<GpuMatrix, GpuError> {
        supports_quant_op(ty, k).map_err(|m| GpuError::Unsupported(format!("tensor '{name}': {m}")))?;
        let row_bytes = ty.row_bytes(k).unwrap();
        if bytes.len() as u64 != row_bytes * n_rows {
            return Err(GpuError::Unsupported(format!(
                "tensor '{name}': {} bytes given for {n_rows} rows of {row_bytes}",
                bytes.len()
            )));
        }
        if row_bytes + WEIGHT_PAD as u64 + 256 > gpu.max_binding() {
            return Err(GpuError::Unsupported(format!("tensor '{name}': one row ({row_bytes} bytes) exceeds the device's binding limit")));
        }
        let per = GpuMatrix::rows_per_chunk(gpu, row_bytes);
        let mut chunks = Vec::new();
        let mut first = 0u64;
        while first < n_rows {
            let n = per.min(n_rows - first);
            let data = &bytes[(first * row_bytes) as usize..((first + n) * row_bytes) as usize];
            let buffer = match split_fields(ty) {
                Some(fields) => gpu.upload(name, &split_blocks(data, ty.block_layout().1, fields), WEIGHT_PAD).await?,
                None => gpu.upload(name, data, WEIGHT_PAD).await?,
            };
            chunks.push(MatrixChunk { first_row: first as u32, n_rows: n as u32, buffer });
            first += n;
        }
        let parts = vec![(name.to_string(), n_rows as u32)];
        Ok(GpuMatrix { name: name.to_string(), ty, n_rows: n_rows as u32, k: k as u32, row_bytes: row_bytes as u32, chunks, parts })
    }

    /// Stack matrices of one type and row length into one, rows in the order given: parts
    /// (name, rows, bytes as stored). Its name is the parts' names joined by '+'.
    pub async fn upload_stacked(gpu: &Gpu, ty: GgmlType, k: u64, parts: &[(String, u64, Vec<u8>)]) -> Result<GpuMatrix, GpuError> {
        let name = parts.iter().map(|p| p.0.as_str()).collect::<Vec<_>>().join("+");
        let n_rows = parts.iter().map(|p| p.1).sum();
        let bytes: Vec<u8> = parts.iter().flat_map(|p| p.2.iter().copied()).collect();
        let mut m = GpuMatrix::upload(gpu, &name, ty, k, n_rows, &bytes).await?;
        m.parts = parts.iter().map(|p| (p.0.clone(), p.1 as u32)).collect();
        Ok(m)
    }

    pub fn bytes(&self) -> u64 {
        self.row_bytes as u64 * self.n_rows as u64
    }

    /// Bytes between rows as the kernels address them: the stored row, or for split types
    /// (`split_blocks`) a row's quants, which come first in the chunk.
    fn kernel_row_bytes(&self) -> u32 {
        match split_fields(self.ty) {
            Some(fields) => self.k / self.ty.block_elems() as u32 * fields[0].1 as u32,
            None => self.row_bytes,
        }
    }

    fn defines(&self) -> Defines {
        Defines::new().flag(&type_define(self.ty))
    }
}

/// Blocks rearranged for the kernels into one region per field, in the order `fields` (byte
/// offset, length within a block) lists them: the quants first, then scales and high bits.
/// Same size; the 34-, 18-, 20-, 22- and 24-byte blocks of Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1
/// mostly sit at unaligned offsets, their quants split out are whole aligned vec4s, which the
/// kernels load faster.
fn split_blocks(blocks: &[u8], block_bytes: usize, fields: &[(usize, usize)]) -> Vec<u8> {
    let n = blocks.len() / block_bytes;
    let mut out = Vec::with_capacity(blocks.len());
    for &(offset, len) in fields {
        for block in blocks.chunks_exact(block_bytes) {
            out.extend_from_slice(&block[offset..offset + len]);
        }
    }
    debug_assert_eq!(out.len(), n * block_bytes);
    out
}

/// The fields of the types uploaded split (`split_blocks`), None for types kept as stored.
fn split_fields(ty: GgmlType) -> Option<&'static [(usize, usize)]> {
    match ty {
        GgmlType::Q8_0 => Some(&[(2, 32), (0, 2)]),
        GgmlType::Q4_0 => Some(&[(2, 16), (0, 2)]),
        GgmlType::Q4_1 => Some(&[(4, 16), (0, 4)]),
        GgmlType::Q5_0 => Some(&[(6, 16), (2, 4), (0, 2)]),
        GgmlType::Q5_1 => Some(&[(8, 16), (4, 4), (0, 4)]),
        _ => None,
    }
}

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvType {
    F32,
    F16,
}

impl KvType {
    fn defines(self) -> Defines {
        match self {
            KvType::F32 => Defines::new(),
            KvType::F16 => Defines::new().flag("KV_F16"),
        }
    }
    pub fn bytes(self) -> u64 {
        match self {
            KvType::F32 => 4,
            KvType::F16 => 2,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct RopeArgs {
    pub n_tokens: u32,
    pub n_heads: u32,
    pub head_dim: u32,
    pub n_rot: u32,
    pub pos0: u32,
    pub neox: bool,
    pub freq_base: f32,
    pub freq_scale: f32,
}

/// The per-head RMS norms of q and k before RoPE (Qwen3, Gemma 3), which rope_kv applies
/// itself: weights [head_dim] each.
#[derive(Clone, Copy, Debug)]
pub struct QkNorm<'a> {
    pub q_weight: &'a wgpu::Buffer,
    pub k_weight: &'a wgpu::Buffer,
    pub eps: f32,
}

#[derive(Clone, Copy, Debug)]
pub struct AttentionArgs {
    pub n_q: u32,
    pub n_head: u32,
    pub n_kv_head: u32,
    pub head_dim: u32,
    pub pos0: u32,
    pub window: u32,
    pub scale: f32,
    pub kv: KvType,
}

pub const MAX_HEAD_DIM: u32 = 256;
pub const MAX_TOP_K: u32 = 128;
const TOPK_CHUNK: u32 = 1024;
const ARGMAX_CHUNK: u32 = 4096;

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
        DispatchCache { params, slots: slots.max(1), bind_groups: Mutex::new(HashMap::new()) }
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
    /// When profiling: a timestamp before and after every dispatch, and the dispatches' kernels.
    timer: Option<(wgpu::QuerySet, Vec<String>)>,
    /// Parameter slots and bind groups, the recorder's own or a session's.
    cache: Arc<DispatchCache>,
    /// The parameters of the dispatches recorded since the last submission, slot by slot:
    /// written to the cache's buffer just before the submission that reads them (queue order
    /// keeps earlier submissions reading theirs).
    params: Vec<u8>,
    /// Products of several tokens: Some(true) runs the tiled matmul.wgsl, Some(false)
    /// matvec.wgsl's token loop, None what suits the device (tests run both everywhere).
    pub tiled_matmul: Option<bool>,
    /// matvec.wgsl's token loop: Some(true) four tokens a pass (TOKEN_TILE), Some(false) one,
    /// None what suits the device (tests run both everywhere).
    pub token_tile: Option<bool>,
    /// Attention: Some(true) runs one invocation per (head, query), Some(false) one workgroup
    /// per (head, query), None what suits the device (tests run both everywhere).
    pub query_per_invocation: Option<bool>,
}

/// attention.wgsl's kernels (see `Recorder::attention_kernel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// One workgroup per (head, query), its invocations sharing the keys through shared memory.
    PerWorkgroup,
    /// One invocation per (head, query).
    PerQuery,
    /// KV_BROADCAST: 8 queries of a head, each K/V row loaded once for them.
    Broadcast,
    /// HEADS_SHARE_KV: the query heads of a kv head, each K/V row loaded once for them.
    HeadsShareKv,
    /// KEY_LANES: one query's keys split over 8 lanes.
    KeyLanes,
}

/// Invocations per workgroup of the one-query-per-invocation attention: one 256-bit register
/// of f32 lanes on lavapipe.
const QUERY_WG: u32 = 8;

/// Heads up to this size get per-query kernels built for their head_dim (attention.wgsl says
/// why); larger ones share one that reads it from the parameters.
const QUERY_FIXED_HEAD_DIM_MAX: u32 = 64;

fn query_attention_defines(kv: KvType, head_dim: u32) -> Defines {
    let d = kv.defines().flag("QUERY_PER_INVOCATION").value("WG", format!("{QUERY_WG}u"));
    if head_dim <= QUERY_FIXED_HEAD_DIM_MAX {
        d.value("HEAD_DIM", format!("{head_dim}u")).value("HEAD_QUADS", format!("{}u", head_dim / 4))
    } else {
        d.value("HEAD_DIM", "p.head_dim").value("HEAD_QUADS", format!("{}u", MAX_HEAD_DIM / 4))
    }
}

/// Loop iterations a kernel may take in one invocation on llvmpipe, which stops it after 65535
/// (see `Recorder::attention_fits_llvmpipe`), with some kept for the loops outside the keys.
const LLVMPIPE_LOOP_BUDGET: u64 = 60_000;

/// Dispatches timed per submission when profiling (two timestamps each; wgpu's query-set cap
/// is 4096); later ones in the same submission go untimed.
const MAX_TIMED_DISPATCHES: u32 = 2048;

impl<'g> Recorder<'g> {
    pub fn new(gpu: &'g Gpu) -> Recorder<'g> {
        Recorder::with_cache(gpu, Arc::new(DispatchCache::new(gpu, OWN_PARAM_SLOTS)))
    }

    /// A recorder that takes its parameter slots and bind groups from `cache`.
    pub fn with_cache(gpu: &'g Gpu, cache: Arc<DispatchCache>) -> Recorder<'g> {
        let timer = gpu.profiling().then(|| {
            let set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("dispatch timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * MAX_TIMED_DISPATCHES,
            });
            (set, Vec::new())
        });
        Recorder {
            gpu,
            encoder: gpu.device.create_command_encoder(&Default::default()),
            pass: None,
            timer,
            cache,
            params: Vec::new(),
            tiled_matmul: None,
            token_tile: None,
            query_per_invocation: None,
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
        let Some((set, kernels)) = self.timer.take() else {
            self.gpu.queue.submit([self.encoder.finish()]);
            return Ok(());
        };
        // profiling: resolve the timestamps, wait for them and add them to the device's totals
        let n = 2 * kernels.len() as u64;
        let usage = wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC;
        let resolved = self.gpu.device.create_buffer(&wgpu::BufferDescriptor { label: None, size: 8 * n.max(1), usage, mapped_at_creation: false });
        let usage = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let readback = self.gpu.device.create_buffer(&wgpu::BufferDescriptor { label: None, size: 8 * n.max(1), usage, mapped_at_creation: false });
        if n > 0 {
            self.encoder.resolve_query_set(&set, 0..n as u32, &resolved, 0);
            self.encoder.copy_buffer_to_buffer(&resolved, 0, &readback, 0, 8 * n);
        }
        self.gpu.queue.submit([self.encoder.finish()]);
        readback.slice(..).map_async(wgpu::MapMode::Read, |_| ());
        self.gpu.wait()?;
        let view = readback.slice(..).get_mapped_range().map_err(|e| GpuError::Readback(e.to_string()))?;
        let ticks: Vec<u64> = bytemuck::cast_slice(&view).to_vec();
        let period = self.gpu.queue.get_timestamp_period() as f64 * 1e-9;
        let mut totals = self.gpu.profile.as_ref().unwrap().lock().unwrap();
        for (i, k) in kernels.into_iter().enumerate() {
            let t = totals.entry(k).or_default();
            t.0 += 1;
            t.1 += ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period;
        }
        Ok(())
    }

    /// The encoder, for copies between dispatches (ends the open compute pass).
    pub fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.pass = None;
        &mut self.encoder
    }

    async fn dispatch<P: bytemuck::Pod>(
        &mut self,
        key: PipelineKey,
        buffers: &[&wgpu::Buffer],
        params: &P,
        groups: (u32, u32, u32),
    ) -> Result<(), GpuError> {
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
        let encoder = &mut self.encoder;
        let pass = self.pass.get_or_insert_with(|| encoder.begin_compute_pass(&Default::default()).forget_lifetime());
        let timed = match &mut self.timer {
            Some((set, kernels)) if kernels.len() < MAX_TIMED_DISPATCHES as usize => {
                let i = kernels.len() as u32;
                kernels.push(kernel.unwrap_or_default());
                pass.write_timestamp(set, 2 * i);
                Some((set, 2 * i + 1))
            }
            _ => None,
        };
        pass.set_pipeline(&p.pipeline);
        pass.set_bind_group(0, &bg, &[offset as u32]);
        pass.dispatch_workgroups(groups.0, groups.1, groups.2);
        if let Some((set, i)) = timed {
            pass.write_timestamp(set, i);
        }
        Ok(())
    }

    /// y[row] = W[row] · x for one token. x: [k], y: [n_rows].
    pub async fn matvec(&mut self, w: &GpuMatrix, x: &wgpu::Buffer, y: &wgpu::Buffer) -> Result<(), GpuError> {
        self.product(w, ProductIn::X(x), ProductOut::Split(&[y]), 1).await
    }

    /// Y[t][row] = W[row] · X[t] for m tokens. X: [m][k], Y: [m][n_rows].
    pub async fn matmul(&mut self, w: &GpuMatrix, x: &wgpu::Buffer, y: &wgpu::Buffer, m: u32) -> Result<(), GpuError> {
        self.product(w, ProductIn::X(x), ProductOut::Split(&[y]), m).await
    }

    /// Whether `product` runs matvec.wgsl for m tokens (which alone can fuse the input's RMS
    /// norm and the gated activation): always for one token. For more, GPUs run the
    /// shared-memory tiled matmul.wgsl; CPU devices, where shared-memory reads and barriers cost
    /// a per-lane loop and a coroutine switch each, run matvec.wgsl with its token loop instead
    /// (`NOMOAT_MATMUL=tiled` / `rows` overrides the choice).
    fn product_runs_matvec(&self, m: u32) -> bool {
        if m == 1 {
            return true;
        }
        match self.tiled_matmul.or(self.gpu.overrides.tiled_matmul) {
            Some(tiled) => !tiled,
            None => self.gpu.info.device_type == wgpu::DeviceType::Cpu,
        }
    }

    /// Whether `ProductOut::QkvRope` applies: stacked q, k, v in one binding, RoPE in
    /// adjacent-pair mode on whole heads, every part a whole number of the invocations' row
    /// groups, and the matvec path.
    pub fn fuses_qkv_rope(&self, w: &GpuMatrix, rope: &RopeArgs, m: u32) -> bool {
        let rpi = paired_matvec_shape(self.gpu).rpi;
        self.product_runs_matvec(m)
            && w.chunks.len() == 1
            && w.parts.len() == 3
            && !rope.neox
            && rope.head_dim % 2 == 0
            && rope.n_rot % 2 == 0
            && rope.n_rot <= rope.head_dim
            && w.parts.iter().all(|(_, rows)| rows % rpi == 0 && rows % rope.head_dim == 0)
    }

    /// Whether prefill's products run matvec.wgsl's TOKEN_TILE (quantized weights): llvmpipe
    /// only, where it speeds prefill up (on SwiftShader it slows it down).
    fn tiles_tokens(&self) -> bool {
        self.token_tile.or(self.gpu.overrides.token_tile).unwrap_or_else(|| is_llvmpipe(self.gpu))
    }

    /// Whether a forward pass over m tokens should fuse each RMS norm into the product that
    /// reads it and the activation and RoPE into the products that feed them: always for one
    /// token; for a block only where prefill tiles its tokens, since untiled every invocation
    /// pays the norm work again, which made fused prefill slower than unfused.
    pub fn fuses_block(&self, m: u32) -> bool {
        m == 1 || (self.product_runs_matvec(m) && self.tiles_tokens())
    }

    /// Whether `ProductOut::Glu` applies: gate and up stacked as two equal parts in one binding,
    /// and the matvec path.
    pub fn fuses_glu(&self, w: &GpuMatrix, m: u32) -> bool {
        self.product_runs_matvec(m) && w.chunks.len() == 1 && w.parts.len() == 2 && w.parts[0].1 == w.parts[1].1
    }

    /// W · input for m tokens, written as `out` says (see product_out.wgsl). X: [m][k].
    /// `ProductIn::RmsNorm` and `ProductOut::Glu` are for one token (or CPU devices), and Glu
    /// needs a one-chunk matrix of two equal parts [gate; up].
    pub async fn product(&mut self, w: &GpuMatrix, input: ProductIn<'_>, out: ProductOut<'_>, m: u32) -> Result<(), GpuError> {
        let runs_matvec = self.product_runs_matvec(m);
        let (x, norm, eps) = match input {
            ProductIn::X(x) => (x, None, 0.0),
            ProductIn::RmsNorm { x, weight, eps } => (x, Some(weight), eps),
        };
        let unsupported = |what: &str| Err(GpuError::Unsupported(format!("{what} for '{}'", w.name)));
        if norm.is_some() && !runs_matvec {
            return unsupported("a fused input norm on this device's prefill path");
        }
        let spare = &self.gpu.unused_buffers;
        let (rope, kv_defines) = match out {
            ProductOut::QkvRope { rope, kv, .. } => (Some(rope), kv.defines()),
            _ => (None, Defines::new()),
        };
        // outputs y, y1, y2, rows to y and to y1, and the product_out.wgsl mode flags
        let (ys, n0, n1, flags): ([&wgpu::Buffer; 3], u32, u32, &[&str]) = match out {
            ProductOut::Split([y]) => ([*y, &spare[0], &spare[1]], w.n_rows, 0, &[]),
            ProductOut::Split(ys) if ys.len() == w.parts.len() && ys.len() <= 3 => {
                let n = |i: usize| w.parts.get(i).map_or(0, |p| p.1);
                ([ys[0], ys[1], ys.get(2).copied().unwrap_or(&spare[1])], n(0), n(1), &[])
            }
            ProductOut::Split(ys) => return unsupported(&format!("{} outputs for {} stacked parts", ys.len(), w.parts.len())),
            ProductOut::Residual(y) => ([y, &spare[0], &spare[1]], w.n_rows, 0, &["OUT_RESIDUAL"]),
            ProductOut::Glu { out, gelu } => {
                if !self.fuses_glu(w, m) {
                    return unsupported("a fused gated activation");
                }
                ([out, &spare[0], &spare[1]], w.parts[0].1, 0, if gelu { &["OUT_GLU", "GLU_GELU"] } else { &["OUT_GLU"] })
            }
            ProductOut::QkvRope { q, k_cache, v_cache, rope, .. } => {
                if !self.fuses_qkv_rope(w, &rope, m) {
                    return unsupported("RoPE and the KV-cache write fused");
                }
                ([q, k_cache, v_cache], w.parts[0].1, w.parts[1].1, &["OUT_QKV_ROPE"])
            }
        };
        let add_mode = |d: Defines| {
            let d = kv_defines.0.iter().fold(d, |d, (k, v)| d.value(k, v));
            let d = flags.iter().fold(d, |d, f| d.flag(f));
            if norm.is_some() { d.flag("NORM_IN") } else { d }
        };
        let glu = flags.contains(&"OUT_GLU");
        let pairs = glu || rope.is_some();
        let r = rope.unwrap_or(RopeArgs { n_tokens: m, n_heads: 0, head_dim: 1, n_rot: 0, pos0: 0, neox: false, freq_base: 1.0, freq_scale: 1.0 });
        for c in &w.chunks {
            let params = ProductParams {
                n_rows: c.n_rows,
                k: w.k,
                row_bytes: w.kernel_row_bytes(),
                row_offset: c.first_row,
                m,
                n_total: w.n_rows,
                n0,
                n1,
                eps,
                head_dim: r.head_dim,
                n_rot: r.n_rot,
                pos0: r.pos0,
                log2_base: r.freq_base.log2(),
                freq_scale: r.freq_scale,
                _pad: [0; 2],
            };
            let buffers = [&c.buffer, x, ys[0], norm.unwrap_or(x), ys[1], ys[2]];
            if runs_matvec {
                let shape = if pairs { paired_matvec_shape(self.gpu) } else { matvec_shape(self.gpu) };
                let rows = if glu { n0 * 2 } else { c.n_rows };
                let (gx, gy) = grid(rows.div_ceil(shape.rows_per_workgroup()));
                let mut defines = add_mode(matvec_defines(w.ty, shape));
                if m > 1 && self.tiles_tokens() && shape.tpr == 1 && w.ty.block_elems() > 1 {
                    defines = defines.flag("TOKEN_TILE");
                }
                let key = PipelineKey { file: "matvec.wgsl", entry: "main", defines };
                self.dispatch(key, &buffers, &params, (gx, gy, 1)).await?;
            } else {
                let key = PipelineKey { file: "matmul.wgsl", entry: "main", defines: add_mode(w.defines()) };
                self.dispatch(key, &buffers, &params, (c.n_rows.div_ceil(64), m.div_ceil(32), 1)).await?;
            }
        }
        Ok(())
    }

    /// out[t] = table row ids[t]. ids: [m] u32, out: [m][k].
    pub async fn gather(&mut self, table: &GpuMatrix, ids: &wgpu::Buffer, out: &wgpu::Buffer, m: u32) -> Result<(), GpuError> {
        for c in &table.chunks {
            let params = [c.n_rows, table.k, table.kernel_row_bytes(), c.first_row, m, 0, 0, 0];
            self.dispatch(PipelineKey { file: "gather.wgsl", entry: "main", defines: table.defines() }, &[&c.buffer, ids, out], &params, (m, 1, 1))
                .await?;
        }
        Ok(())
    }

    /// RMSNorm of each row of x: [n_rows][n] into out.
    pub async fn rms_norm(&mut self, x: &wgpu::Buffer, w: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, n_rows: u32, eps: f32) -> Result<(), GpuError> {
        self.norm_rows("rms_norm", Defines::new(), &[x, w, w, out], n, n_rows, eps).await
    }

    /// norm.wgsl's `entry` over rows of n with its buffers x, w, b, out: one workgroup a row.
    async fn norm_rows(&mut self, entry: &'static str, defines: Defines, buffers: &[&wgpu::Buffer; 4], n: u32, n_rows: u32, eps: f32) -> Result<(), GpuError> {
        let (gx, gy) = grid(n_rows);
        let params = NormParams { n, n_rows, eps, _pad: 0 };
        self.dispatch(PipelineKey { file: "norm.wgsl", entry, defines }, buffers, &params, (gx, gy, 1)).await
    }

    /// out = resid + rms_norm(x)·w over rows x, resid, out: [n_rows][n].
    #[allow(clippy::too_many_arguments)]
    pub async fn rms_norm_add(&mut self, x: &wgpu::Buffer, w: &wgpu::Buffer, resid: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, n_rows: u32, eps: f32) -> Result<(), GpuError> {
        self.norm_rows("rms_norm", Defines::new().flag("ADD_RESIDUAL"), &[x, w, resid, out], n, n_rows, eps).await
    }

    /// LayerNorm of each row of x: [n_rows][n] with weight and bias [n] into out.
    #[allow(clippy::too_many_arguments)]
    pub async fn layer_norm(&mut self, x: &wgpu::Buffer, w: &wgpu::Buffer, b: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, n_rows: u32, eps: f32) -> Result<(), GpuError> {
        self.norm_rows("layer_norm", Defines::new(), &[x, w, b, out], n, n_rows, eps).await
    }

    /// Softmax of each row of x: [n_rows][n] into out.
    pub async fn softmax(&mut self, x: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, n_rows: u32) -> Result<(), GpuError> {
        let (gx, gy) = grid(n_rows);
        self.dispatch(PipelineKey { file: "softmax.wgsl", entry: "main", defines: Defines::new() }, &[x, out], &[n, n_rows, 0, 0], (gx, gy, 1))
            .await
    }

    async fn elementwise(&mut self, entry: &'static str, a: &wgpu::Buffer, b: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, s: f32) -> Result<(), GpuError> {
        self.elementwise_b(entry, a, b, out, n, s, n).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn elementwise_b(&mut self, entry: &'static str, a: &wgpu::Buffer, b: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, s: f32, b_len: u32) -> Result<(), GpuError> {
        let (gx, gy) = grid(n.div_ceil(256));
        let params = ElementwiseParams { n, s, b_len: b_len.max(1), _pad: 0 };
        self.dispatch(PipelineKey { file: "elementwise.wgsl", entry, defines: Defines::new() }, &[a, b, out], &params, (gx, gy, 1))
            .await
    }

    pub async fn add(&mut self, a: &wgpu::Buffer, b: &wgpu::Buffer, out: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        self.elementwise("add", a, b, out, n, 0.0).await
    }
    /// out[t][i] = a[t][i] + bias[i] for rows of width `width`.
    pub async fn add_bias(&mut self, a: &wgpu::Buffer, bias: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, width: u32) -> Result<(), GpuError> {
        self.elementwise_b("add", a, bias, out, n, 0.0, width).await
    }
    /// y[i] += s · b[i], in place on y.
    pub async fn accumulate(&mut self, y: &wgpu::Buffer, b: &wgpu::Buffer, n: u32, s: f32) -> Result<(), GpuError> {
        self.elementwise("accumulate", b, b, y, n, s).await
    }
    pub async fn scale(&mut self, a: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, s: f32) -> Result<(), GpuError> {
        self.elementwise("scale", a, a, out, n, s).await
    }
    pub async fn softcap(&mut self, a: &wgpu::Buffer, out: &wgpu::Buffer, n: u32, cap: f32) -> Result<(), GpuError> {
        self.elementwise("softcap", a, a, out, n, cap).await
    }
    pub async fn silu_gate(&mut self, gate: &wgpu::Buffer, up: &wgpu::Buffer, out: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        self.elementwise("silu_gate", gate, up, out, n, 0.0).await
    }
    pub async fn gelu_gate(&mut self, gate: &wgpu::Buffer, up: &wgpu::Buffer, out: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        self.elementwise("gelu_gate", gate, up, out, n, 0.0).await
    }

    /// RoPE in place on x: [n_tokens][n_heads][head_dim] (rope_kv with no keys to store).
    pub async fn rope(&mut self, x: &wgpu::Buffer, a: RopeArgs) -> Result<(), GpuError> {
        let [none, cache_k, cache_v] = &self.gpu.unused_buffers;
        self.rope_kv(x, none, none, cache_k, cache_v, 0, KvType::F32, a).await
    }

    /// RoPE on q in place, and k (rotated the same way) and v appended to the KV cache at
    /// positions a.pos0..: rope_kv.wgsl. q: [n_tokens][a.n_heads][head_dim]; k, v:
    /// [n_tokens][n_kv_head][head_dim]. With a.n_rot = 0 (and a.n_heads = 0) it only stores.
    #[allow(clippy::too_many_arguments)]
    pub async fn rope_kv(&mut self, q: &wgpu::Buffer, k: &wgpu::Buffer, v: &wgpu::Buffer, k_cache: &wgpu::Buffer, v_cache: &wgpu::Buffer, n_kv_head: u32, kv: KvType, a: RopeArgs) -> Result<(), GpuError> {
        self.rope_kv_normed(q, k, v, k_cache, v_cache, n_kv_head, kv, a, None).await
    }

    /// rope_kv, with q's and k's heads first RMS-normalised where `norm` is given.
    #[allow(clippy::too_many_arguments)]
    pub async fn rope_kv_normed(
        &mut self,
        q: &wgpu::Buffer,
        k: &wgpu::Buffer,
        v: &wgpu::Buffer,
        k_cache: &wgpu::Buffer,
        v_cache: &wgpu::Buffer,
        n_kv_head: u32,
        kv: KvType,
        a: RopeArgs,
        norm: Option<QkNorm<'_>>,
    ) -> Result<(), GpuError> {
        if a.n_rot % 2 != 0 || a.n_rot > a.head_dim || a.head_dim % 2 != 0 {
            return Err(GpuError::Unsupported(format!("RoPE over {} of {} dimensions", a.n_rot, a.head_dim)));
        }
        let v_pairs = a.n_tokens * n_kv_head * a.head_dim / 2;
        let work = match norm {
            // an invocation per q head and per k head, then per pair of v
            Some(_) => a.n_tokens * (a.n_heads + n_kv_head) + v_pairs,
            None => a.n_tokens * a.n_heads * (a.n_rot / 2) + 2 * v_pairs,
        };
        let (gx, gy) = grid(work.div_ceil(256));
        let params = RopeKvParams {
            n_tokens: a.n_tokens,
            n_head: a.n_heads,
            n_kv_head,
            head_dim: a.head_dim,
            n_rot: a.n_rot,
            pos0: a.pos0,
            neox: a.neox as u32,
            log2_base: a.freq_base.log2(),
            freq_scale: a.freq_scale,
            eps: norm.map_or(0.0, |n| n.eps),
            _pad: [0; 2],
        };
        let (defines, qw, kw) = match norm {
            Some(n) => (kv.defines().flag("QK_NORM"), n.q_weight, n.k_weight),
            // the weight slots unread: k and v, bound read-only anyway
            None => (kv.defines(), k, v),
        };
        let key = PipelineKey { file: "rope_kv.wgsl", entry: "main", defines };
        self.dispatch(key, &[q, k, v, k_cache, v_cache, qw, kw], &params, (gx, gy, 1)).await
    }

    /// Append k and v: [n_tokens][n_kv_head][head_dim] to the KV cache at positions pos0.. as
    /// they are (rope_kv without rotation).
    #[allow(clippy::too_many_arguments)]
    pub async fn kv_store(&mut self, k: &wgpu::Buffer, v: &wgpu::Buffer, k_cache: &wgpu::Buffer, v_cache: &wgpu::Buffer, n_kv_head: u32, head_dim: u32, kv: KvType, n_tokens: u32, pos0: u32) -> Result<(), GpuError> {
        let a = RopeArgs { n_tokens, n_heads: 0, head_dim, n_rot: 0, pos0, neox: false, freq_base: 1.0, freq_scale: 1.0 };
        let q = &self.gpu.unused_buffers[0];
        self.rope_kv(q, k, v, k_cache, v_cache, n_kv_head, kv, a).await
    }

    /// The attention kernel `attention` runs for `a`. The per-query ones on CPU devices (or as
    /// `NOMOAT_ATTENTION=query` / `workgroup` says), where the head fits their loops and the
    /// keys a lane walks fit llvmpipe's loop budget; among them, on subgroups of exactly the
    /// workgroup's 8 lanes, the broadcast for 8 queries or more (prefill), for fewer (decode)
    /// the query heads of a kv head sharing its rows where that leaves two workgroups or
    /// more, otherwise the keys split over lanes (on lavapipe sharing is the faster of the two
    /// with several workgroups, the slower with one). `NOMOAT_ATTENTION_BROADCAST=0`,
    /// `_HEADS_SHARE_KV=0`, `_KEY_LANES=0` turn one off.
    pub fn attention_kernel(&self, a: &AttentionArgs) -> AttentionKernel {
        let o = &self.gpu.overrides;
        let wanted = self.query_per_invocation.or(o.attention_per_query).unwrap_or(self.gpu.info.device_type == wgpu::DeviceType::Cpu);
        if !wanted || a.head_dim % 16 != 0 {
            return AttentionKernel::PerWorkgroup;
        }
        let sg8 = subgroups_of_8(self.gpu);
        let quads_of_8 = sg8 && a.head_dim % 32 == 0;
        let per_kv = a.n_head / a.n_kv_head;
        // each lane of the key-splitting kernel walks an eighth of the keys, the others all
        let fits = |lanes_per_query: u32| {
            (a.pos0 + a.n_q).div_ceil(lanes_per_query) as u64 * (1 + a.head_dim as u64 / 16) <= LLVMPIPE_LOOP_BUDGET
        };
        [
            (AttentionKernel::Broadcast, quads_of_8 && a.n_q >= QUERY_WG && o.attention_broadcast != Some(false) && fits(1)),
            (
                AttentionKernel::HeadsShareKv,
                quads_of_8 && a.n_q < QUERY_WG && (2..=QUERY_WG).contains(&per_kv) && a.n_kv_head * a.n_q >= 2 && o.attention_heads_share_kv != Some(false) && fits(1),
            ),
            (AttentionKernel::KeyLanes, sg8 && a.n_q < QUERY_WG && o.attention_key_lanes != Some(false) && fits(QUERY_WG)),
            (AttentionKernel::PerQuery, fits(1)),
        ]
        .into_iter()
        .find_map(|(kernel, usable)| usable.then_some(kernel))
        .unwrap_or(AttentionKernel::PerWorkgroup)
    }

    /// llvmpipe (lavapipe) ends a shader invocation after 65535 loop iterations in all, its
    /// guard against endless loops, and leaves the rest of the output unwritten. The
    /// one-workgroup-per-query attention takes about (head_dim + 4·64 + 16) / 64 of them a key
    /// (its score loop, its 4 x 64 weighted-sum loop and its reductions, per tile of 64 keys;
    /// head_dim 256 gave wrong outputs at 16000 keys and right ones at 4000): past that, on
    /// llvmpipe, attention is refused rather than run.
    fn attention_fits_llvmpipe(&self, a: &AttentionArgs) -> bool {
        let keys = (a.pos0 + a.n_q) as u64;
        !is_llvmpipe(self.gpu) || keys * (a.head_dim as u64 + 4 * 64 + 16) / 64 <= LLVMPIPE_LOOP_BUDGET
    }

    /// Causal attention of q: [n_q][n_head][head_dim] over the cache into out.
    pub async fn attention(&mut self, q: &wgpu::Buffer, k: &wgpu::Buffer, v: &wgpu::Buffer, out: &wgpu::Buffer, a: AttentionArgs) -> Result<(), GpuError> {
        if a.head_dim > MAX_HEAD_DIM || a.head_dim % 2 != 0 || a.n_kv_head == 0 || a.n_head % a.n_kv_head != 0 {
            return Err(GpuError::Unsupported(format!(
                "attention with head_dim {} and {}/{} heads",
                a.head_dim, a.n_head, a.n_kv_head
            )));
        }
        let params = AttentionParams {
            n_q: a.n_q,
            n_head: a.n_head,
            n_kv_head: a.n_kv_head,
            head_dim: a.head_dim,
            pos0: a.pos0,
            window: a.window,
            scale: a.scale,
            _pad: 0,
        };
        let kernel = self.attention_kernel(&a);
        if kernel == AttentionKernel::PerWorkgroup && !self.attention_fits_llvmpipe(&a) {
            return Err(GpuError::Unsupported(format!(
                "attention over {} keys with head_dim {} on llvmpipe (its shaders stop after 65535 loop iterations): use a smaller context size",
                a.pos0 + a.n_q,
                a.head_dim
            )));
        }
        let per_query = query_attention_defines(a.kv, a.head_dim);
        let (defines, groups) = match kernel {
            AttentionKernel::PerWorkgroup => (a.kv.defines(), (a.n_head, a.n_q, 1)),
            AttentionKernel::PerQuery => {
                let (gx, gy) = grid((a.n_head * a.n_q).div_ceil(QUERY_WG));
                (per_query, (gx, gy, 1))
            }
            AttentionKernel::Broadcast => {
                // each head's queries padded to whole workgroups of 8 (see attention.wgsl)
                let (gx, gy) = grid(a.n_head * a.n_q.div_ceil(QUERY_WG));
                (per_query.flag("KV_BROADCAST"), (gx, gy, 1))
            }
            AttentionKernel::HeadsShareKv => {
                let (gx, gy) = grid(a.n_kv_head * a.n_q);
                (per_query.flag("KV_BROADCAST").flag("HEADS_SHARE_KV"), (gx, gy, 1))
            }
            AttentionKernel::KeyLanes => {
                let (gx, gy) = grid(a.n_head * a.n_q);
                (per_query.flag("KEY_LANES"), (gx, gy, 1))
            }
        };
        self.dispatch(PipelineKey { file: "attention.wgsl", entry: "main", defines }, &[q, k, v, out], &params, groups).await
    }

    /// dst[..n] = src[..n] (n a multiple of 4): the bandwidth yardstick.
    pub async fn copy(&mut self, src: &wgpu::Buffer, dst: &wgpu::Buffer, n: u32) -> Result<(), GpuError> {
        let n4 = n / 4;
        let (gx, gy) = grid(n4.div_ceil(256));
        self.dispatch(PipelineKey { file: "copy.wgsl", entry: "main", defines: Defines::new() }, &[src, dst], &[n4, 0, 0, 0], (gx, gy, 1)).await
    }
}

/// What a product reads: x as it is, or x / rms(x) · weight per token (the RMS norm fused in).
#[derive(Clone, Copy)]
pub enum ProductIn<'a> {
    X(&'a wgpu::Buffer),
    RmsNorm { x: &'a wgpu::Buffer, weight: &'a wgpu::Buffer, eps: f32 },
}

/// Where a product's rows go (product_out.wgsl): one output per stacked part of the matrix (or
/// one for all of it), added into a residual stream, or through a gated activation.
#[derive(Clone, Copy)]
pub enum ProductOut<'a> {
    Split(&'a [&'a wgpu::Buffer]),
    Residual(&'a wgpu::Buffer),
    Glu { out: &'a wgpu::Buffer, gelu: bool },
    /// Stacked q, k, v projections: q turned by RoPE into `q`, k turned and v appended to the
    /// KV cache (see `Recorder::fuses_qkv_rope`).
    QkvRope { q: &'a wgpu::Buffer, k_cache: &'a wgpu::Buffer, v_cache: &'a wgpu::Buffer, kv: KvType, rope: RopeArgs },
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ProductParams {
    n_rows: u32,
    k: u32,
    row_bytes: u32,
    row_offset: u32,
    m: u32,
    n_total: u32,
    n0: u32,
    n1: u32,
    eps: f32,
    // OUT_QKV_ROPE
    head_dim: u32,
    n_rot: u32,
    pos0: u32,
    log2_base: f32,
    freq_scale: f32,
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct NormParams {
    n: u32,
    n_rows: u32,
    eps: f32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ElementwiseParams {
    n: u32,
    s: f32,
    b_len: u32,
    _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeKvParams {
    n_tokens: u32,
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    n_rot: u32,
    pos0: u32,
    neox: u32,
    log2_base: f32,
    freq_scale: f32,
    eps: f32,
    _pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttentionParams {
    n_q: u32,
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    pos0: u32,
    window: u32,
    scale: f32,
    _pad: u32,
}

/// The k best (id, value) pairs of values: [n], highest first, computed on the GPU in passes of
/// per-workgroup selections until one workgroup remains. Argmax is `top_k(.., 1)`.
pub async fn top_k(gpu: &Gpu, values: &wgpu::Buffer, n: u32, k: u32) -> Result<Vec<(u32, f32)>, GpuError> {
    let scratch = TopKScratch::new(gpu, n).await?;
    let mut rec = Recorder::new(gpu);
    let (v, ids) = record_top_k(&mut rec, &scratch, values, n, k).await?;
    rec.submit()?;
    let vals = gpu.read_f32(v, 0, k as usize).await?;
    let ids = gpu.read_u32(ids, 0, k as usize).await?;
    Ok(ids.into_iter().zip(vals).collect())
}

/// The buffers a top-k selection over up to n values passes its candidates through, made once
/// for all the selections of a session: two (values, ids) pairs that the passes alternate
/// between, each large enough for the first pass's output (every later pass writes less).
pub struct TopKScratch {
    n: u32,
    values: [wgpu::Buffer; 2],
    ids: [wgpu::Buffer; 2],
}

impl TopKScratch {
    pub async fn new(gpu: &Gpu, n: u32) -> Result<TopKScratch, GpuError> {
        let most = n.div_ceil(ARGMAX_CHUNK).max(n.div_ceil(TOPK_CHUNK) * MAX_TOP_K) as u64 * 4;
        Ok(TopKScratch {
            n,
            values: [gpu.storage("topk values", most).await?, gpu.storage("topk values", most).await?],
            ids: [gpu.storage("topk ids", most).await?, gpu.storage("topk ids", most).await?],
        })
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
    if k == 0 || k > MAX_TOP_K || k > n || n > scratch.n {
        return Err(GpuError::Unsupported(format!("top-k with k = {k} over {n} values (k must be 1..={MAX_TOP_K})")));
    }
    let mut count = n;
    // k = 1 takes the argmax entry point, with its larger chunks
    let (entry, chunk) = if k == 1 { ("argmax", ARGMAX_CHUNK) } else { ("main", TOPK_CHUNK) };
    let mut pass = 0;
    loop {
        let groups = count.div_ceil(chunk);
        let out = pass % 2;
        let (in_v, in_id) = if pass == 0 { (values, values) } else { (&scratch.values[1 - out], &scratch.ids[1 - out]) };
        rec.dispatch(
            PipelineKey { file: "topk.wgsl", entry, defines: Defines::new() },
            &[in_v, in_id, &scratch.values[out], &scratch.ids[out]],
            &[count, k, (pass == 0) as u32, 0],
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
