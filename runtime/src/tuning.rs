//! Every device-dependent kernel choice, made once when a device opens ([`Tuning::for_device`],
//! kept as `Gpu::tuning`) from the adapter's capabilities and the `NOMOAT_*` overrides. The ops
//! read these fields and ask nothing else about the device. An adapter's name is consulted only
//! for a named driver defect: llvmpipe's loop limit ([`Tuning::loop_budget`]).
//!
//! Measurements behind the choices are in bench/README.md.

use crate::ops::AttentionFamily;
use crate::shaders::Variant;

fn env_u32(name: &str) -> Option<u32> {
    std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok())
}

/// Kernel choices forced from the environment for tuning and A/B measurements, read once when
/// a device is opened (a token's hundred-odd dispatches then look up nothing). None: the
/// device's own choice. (In a browser there is no environment: all None.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelOverrides {
    /// `NOMOAT_MATVEC_TPR` (a power of two up to 64), `_RPI` (1..=16), `_WG` (a power of two,
    /// 8..=256): the matvec shape.
    pub matvec_tpr: Option<u32>,
    pub matvec_rpi: Option<u32>,
    pub matvec_wg: Option<u32>,
    /// `NOMOAT_MATVEC_XB=0`: no X_BROADCAST.
    pub matvec_x_broadcast: Option<bool>,
    /// `NOMOAT_MATVEC_TILE=0` / `1`: TOKEN_TILE off / on.
    pub token_tile: Option<bool>,
    /// `NOMOAT_MATVEC_TILE_TOKENS=2` .. `4`: TOKEN_TILE's tokens a pass, whatever the batch.
    pub tile_tokens: Option<u32>,
    /// `NOMOAT_MATMUL=tiled` / `rows`: prefill through matmul.wgsl's tiles or matvec.wgsl.
    pub tiled_matmul: Option<bool>,
    /// `NOMOAT_ATTENTION=query` / `workgroup` / `tile`: the per-query kernels, the
    /// per-workgroup one, or the tiles (where they fill, else the per-workgroup one).
    pub attention: Option<AttentionFamily>,
    /// `NOMOAT_ATTENTION_BROADCAST=0`: no KV_BROADCAST.
    pub attention_broadcast: Option<bool>,
    /// `NOMOAT_ATTENTION_KEY_LANES=0`: no KEY_LANES.
    pub attention_key_lanes: Option<bool>,
    /// `NOMOAT_ATTENTION_HEADS_SHARE_KV=0`: no HEADS_SHARE_KV.
    pub attention_heads_share_kv: Option<bool>,
    /// `NOMOAT_ATTENTION_DIM_LANES=0`: no DIM_LANES.
    pub attention_dim_lanes: Option<bool>,
    /// `NOMOAT_ATTENTION_SPLIT=0` / `1`: split-K attention never / wherever it can.
    pub attention_split: Option<bool>,
    /// `NOMOAT_SAMPLE_TOPK=gpu` / `readback`: sampling reads the GPU's top-k, or every logit.
    pub sample_top_k: Option<bool>,
    /// `NOMOAT_BACKWARD_BROADCAST=0`: no DY_BROADCAST in product_backward.wgsl.
    pub backward_broadcast: Option<bool>,
    /// `NOMOAT_ATTENTION_BACKWARD=scalar` / `blocked`: attention_backward.wgsl without or with
    /// BLOCKED.
    pub attention_backward_blocked: Option<bool>,
    /// `NOMOAT_ATTENTION_BACKWARD_BROADCAST=0`: no ROW_BROADCAST in attention_backward.wgsl.
    pub attention_backward_broadcast: Option<bool>,
    /// `NOMOAT_BACKWARD_PAIRED=0`: no PAIRED in product_backward.wgsl.
    pub backward_paired: Option<bool>,
    /// `NOMOAT_LORA_TILES=0`: weight_gradient.wgsl and skinny_product.wgsl without TILES.
    pub lora_tiles: Option<bool>,
    /// `NOMOAT_POST_NORM_FOLD=0`: Gemma 3's post-norm-and-add as a dispatch of its own.
    pub post_norm_fold: Option<bool>,
    /// `NOMOAT_HEAD_ARGMAX=0`: greedy decoding's argmax over the whole of the logits.
    pub head_argmax: Option<bool>,
}

impl KernelOverrides {
    pub fn from_env() -> KernelOverrides {
        let off = |name: &str| (env_u32(name) == Some(0)).then_some(false);
        let choice = |name: &str, yes: &str, no: &str| match std::env::var(name).ok().as_deref() {
            Some(v) if v == yes => Some(true),
            Some(v) if v == no => Some(false),
            _ => None,
        };
        KernelOverrides {
            matvec_tpr: env_u32("NOMOAT_MATVEC_TPR").filter(|v| v.is_power_of_two() && *v <= 64),
            matvec_rpi: env_u32("NOMOAT_MATVEC_RPI").filter(|v| (1..=16).contains(v)),
            matvec_wg: env_u32("NOMOAT_MATVEC_WG").filter(|v| v.is_power_of_two() && (8..=256).contains(v)),
            matvec_x_broadcast: off("NOMOAT_MATVEC_XB"),
            token_tile: choice("NOMOAT_MATVEC_TILE", "1", "0"),
            tile_tokens: env_u32("NOMOAT_MATVEC_TILE_TOKENS").filter(|v| (2..=4).contains(v)),
            tiled_matmul: choice("NOMOAT_MATMUL", "tiled", "rows"),
            attention: match std::env::var("NOMOAT_ATTENTION").ok().as_deref() {
                Some("query") => Some(AttentionFamily::PerQuery),
                Some("workgroup") => Some(AttentionFamily::PerWorkgroup),
                Some("tile") => Some(AttentionFamily::Tile),
                _ => None,
            },
            attention_broadcast: off("NOMOAT_ATTENTION_BROADCAST"),
            attention_key_lanes: off("NOMOAT_ATTENTION_KEY_LANES"),
            attention_heads_share_kv: off("NOMOAT_ATTENTION_HEADS_SHARE_KV"),
            attention_dim_lanes: off("NOMOAT_ATTENTION_DIM_LANES"),
            attention_split: choice("NOMOAT_ATTENTION_SPLIT", "1", "0"),
            sample_top_k: choice("NOMOAT_SAMPLE_TOPK", "gpu", "readback"),
            backward_broadcast: off("NOMOAT_BACKWARD_BROADCAST"),
            attention_backward_blocked: choice("NOMOAT_ATTENTION_BACKWARD", "blocked", "scalar"),
            attention_backward_broadcast: off("NOMOAT_ATTENTION_BACKWARD_BROADCAST"),
            backward_paired: off("NOMOAT_BACKWARD_PAIRED"),
            lora_tiles: off("NOMOAT_LORA_TILES"),
            post_norm_fold: off("NOMOAT_POST_NORM_FOLD"),
            head_argmax: off("NOMOAT_HEAD_ARGMAX"),
        }
    }
}

/// How a matvec dispatch is shaped: `tpr` invocations share a group of `rpi` consecutive rows,
/// `wg` invocations per workgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatvecShape {
    pub tpr: u32,
    pub rpi: u32,
    pub wg: u32,
    /// Quantized types load x once per subgroup and broadcast it (matvec.wgsl's X_BROADCAST).
    pub x_broadcast: bool,
}

impl MatvecShape {
    pub fn rows_per_workgroup(&self) -> u32 {
        self.wg / self.tpr * self.rpi
    }

    /// GPUs' shape ([`Tuning::for_device`]), which tests force on CPU devices.
    pub const GPU: MatvecShape = MatvecShape { tpr: 32, rpi: 1, wg: 64, x_broadcast: false };

    /// This shape with an even number of rows an invocation, for outputs that need rows in
    /// pairs in one invocation (gate with up, RoPE's adjacent pairs).
    pub fn paired(self) -> MatvecShape {
        MatvecShape { rpi: (self.rpi + 1) & !1, ..self }
    }
}

/// Loop iterations a kernel may take in one invocation on llvmpipe, which stops it after 65,535
/// in all (its guard against endless loops) and leaves the rest of its output unwritten; some
/// are kept for the loops the estimates leave out.
pub const LLVMPIPE_LOOP_BUDGET: u64 = 60_000;

/// The kernel choices for one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// A CPU implementation of WebGPU (lavapipe, SwiftShader): shared memory and barriers cost a
    /// per-lane loop each, so kernels that keep everything in registers win.
    pub cpu: bool,
    /// The kernels have subgroups of exactly 8 invocations (lavapipe: one 256-bit register of
    /// f32 lanes), which the broadcast modes build their 8-lane workgroups on.
    pub subgroups_of_8: bool,
    /// Driver defect, llvmpipe: invocations stop after 65,535 loop iterations, leaving their
    /// output unwritten. Kernels split or refuse work beyond this many. None: no such limit.
    pub loop_budget: Option<u64>,
    /// The matvec shape (see [`MatvecShape::paired`] for outputs that need row pairs).
    pub matvec: MatvecShape,
    /// Prefill's products through the shared-memory tiled matmul.wgsl (GPUs) rather than
    /// matvec.wgsl's token loop (CPU devices).
    pub tiled_matmul: bool,
    /// Prefill's quantized products in matvec.wgsl's passes of four tokens (TOKEN_TILE): on
    /// CPU devices with 8-lane subgroups (faster on lavapipe, slower on SwiftShader).
    pub token_tile: bool,
    /// TOKEN_TILE's tokens a pass: Some(n) always n (an override), None as many as the batch
    /// has, up to 4 ([`Tuning::tile_for`]).
    pub tile_tokens: Option<u32>,
    /// The attention kernels' family: the one-query-per-invocation kernels on CPU devices,
    /// the tiles (prefill) or one workgroup per (head, query) (decode) on GPUs.
    pub attention: AttentionFamily,
    /// Which of the subgroup attention modes may be used (all, unless an override says not).
    pub attention_broadcast: bool,
    pub attention_key_lanes: bool,
    pub attention_heads_share_kv: bool,
    pub attention_dim_lanes: bool,
    /// Split-K attention (flash-decoding): a dispatch of fewer workgroups than
    /// `attention_split.groups` cuts each query's keys into chunks of at least
    /// `attention_split.keys`, one workgroup each, merged by a second pass.
    pub attention_split: AttentionSplit,
    /// The most best logits sampling takes from the GPU's top-k kernel instead of reading every
    /// logit back: MAX_TOP_K on GPUs; 1 (the argmax only) on CPU devices, where the kernel for
    /// k > 1 costs more than the read-back (bench/README.md, "Sampling's read-back").
    pub sample_top_k_max: u32,
    /// Sequences worth decoding together in one step (`nomoat serve`'s default `--parallel`,
    /// before memory limits). lavapipe (CPU, TOKEN_TILE): a step of 4 sequences gave 2.3 to
    /// 2.4x one sequence's tok/s, 8 (two passes over the weights) 2.6 to 2.7x for steps
    /// nearly twice as long as 4's, each sequence's tokens that much slower; 4. Other CPU
    /// devices share no weight loads between a step's sequences (no TOKEN_TILE): 1. GPUs: 8,
    /// since a step's products read the weights once for all rows (not measured: no GPU here).
    /// bench/README.md has the numbers.
    pub decode_slots: usize,
    /// product_backward.wgsl loads dy once per 8-lane subgroup and broadcasts it (DY_BROADCAST;
    /// on lavapipe the base weights' transposed products took half the time).
    pub backward_broadcast: bool,
    /// attention_backward.wgsl by blocks of queries or keys that walk the other side's rows
    /// together (BLOCKED), rather than one invocation per pair loading both rows.
    pub attention_backward_blocked: bool,
    /// BLOCKED hands the walked rows over 8-lane subgroups (ROW_BROADCAST) where it can.
    pub attention_backward_broadcast: bool,
    /// product_backward.wgsl takes a 4- or 5-bit block's columns c and c + 16 together
    /// (PAIRED), so each quant word and scale loaded serves both.
    pub backward_paired: bool,
    /// A LoRA factor's products and gradients (skinny_product.wgsl, weight_gradient.wgsl) by
    /// 4 x 4 blocks (TILES) where the shapes are multiples of 4.
    pub lora_tiles: bool,
    /// A branch that goes back into the residual stream through its own norm (Gemma 3) is
    /// added in by the next product where that product fuses its input's norm
    /// (`ProductIn::PostNormAdd`), not by a dispatch of its own.
    pub post_norm_fold: bool,
    /// Greedy decoding's output head also keeps the best of each group of its rows
    /// (`ProductOut::Argmax`), so the argmax starts from those instead of every logit.
    pub head_argmax: bool,
}

/// When attention splits its keys (see [`Tuning::attention_split`]); groups 0: never.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionSplit {
    pub groups: u32,
    pub keys: u32,
}

impl AttentionSplit {
    pub const NEVER: AttentionSplit = AttentionSplit { groups: 0, keys: u32::MAX };
    /// CPU devices: dispatches of fewer than 4 workgroups, in chunks of 256 keys or more.
    pub const CPU: AttentionSplit = AttentionSplit { groups: 4, keys: 256 };
    /// Wherever there are two chunks of 8 keys (what tests force).
    pub const ALWAYS: AttentionSplit = AttentionSplit { groups: u32::MAX, keys: 8 };
}

impl Tuning {
    /// The choices for an adapter with this `info` and kernel `variant`, with `o` applied.
    pub fn for_device(info: &wgpu::AdapterInfo, variant: Variant, o: &KernelOverrides) -> Tuning {
        let cpu = info.device_type == wgpu::DeviceType::Cpu;
        let subgroups_of_8 = variant.subgroups && info.subgroup_min_size == 8 && info.subgroup_max_size == 8;
        // CPU devices: every invocation its own 8 rows (one x load serves 8 rows), 8 invocations
        // a workgroup (one 256-bit register of lanes). 16 rows per invocation gave wrong F16
        // products for 70 tokens on lavapipe (not root-caused), so it is not used. GPUs: 32
        // invocations per row, one row each, 64 per workgroup.
        let mut matvec = if cpu { MatvecShape { tpr: 1, rpi: 8, wg: 8, x_broadcast: false } } else { MatvecShape::GPU };
        matvec.tpr = o.matvec_tpr.unwrap_or(matvec.tpr);
        matvec.rpi = o.matvec_rpi.unwrap_or(matvec.rpi);
        matvec.wg = o.matvec_wg.unwrap_or(matvec.wg).max(matvec.tpr);
        // one x load per subgroup instead of one per lane where the workgroup is one subgroup
        matvec.x_broadcast = subgroups_of_8 && matvec.tpr == 1 && matvec.wg == 8 && o.matvec_x_broadcast != Some(false);
        let token_tile = o.token_tile.unwrap_or(cpu && subgroups_of_8);
        Tuning {
            cpu,
            subgroups_of_8,
            loop_budget: info.name.contains("llvmpipe").then_some(LLVMPIPE_LOOP_BUDGET),
            matvec,
            tiled_matmul: o.tiled_matmul.unwrap_or(!cpu),
            token_tile,
            tile_tokens: o.tile_tokens,
            attention: o.attention.unwrap_or(if cpu { AttentionFamily::PerQuery } else { AttentionFamily::Tile }),
            attention_broadcast: o.attention_broadcast != Some(false),
            attention_key_lanes: o.attention_key_lanes != Some(false),
            attention_heads_share_kv: o.attention_heads_share_kv != Some(false),
            attention_dim_lanes: o.attention_dim_lanes != Some(false),
            attention_split: match o.attention_split {
                Some(true) => AttentionSplit::ALWAYS,
                Some(false) => AttentionSplit::NEVER,
                // CPU devices: a decode step's one to three workgroups (one per kv head) left
                // one of lavapipe's threads idle or waiting; in chunks of 256 keys or more, at
                // least 4 workgroups keep both busy (bench/README.md, "Split-K on CPU
                // devices"); GPUs: a few workgroups per compute unit (not measured: no GPU here)
                None if cpu => AttentionSplit::CPU,
                None => AttentionSplit { groups: 256, keys: 256 },
            },
            sample_top_k_max: if o.sample_top_k.unwrap_or(!cpu) { crate::ops::MAX_TOP_K } else { 1 },
            decode_slots: match (cpu, token_tile) {
                (false, _) => 8,
                (true, true) => 4,
                (true, false) => 1,
            },
            backward_broadcast: subgroups_of_8 && o.backward_broadcast != Some(false),
            attention_backward_blocked: o.attention_backward_blocked != Some(false),
            attention_backward_broadcast: o.attention_backward_broadcast != Some(false),
            backward_paired: o.backward_paired != Some(false),
            lora_tiles: o.lora_tiles != Some(false),
            post_norm_fold: o.post_norm_fold != Some(false),
            head_argmax: o.head_argmax != Some(false),
        }
    }

    /// TOKEN_TILE's tokens a pass for a batch of m tokens: m, 2 to 4 (a pass of 4 for 2 tokens
    /// would multiply 2 repeats, which cost as much as real tokens).
    pub fn tile_for(&self, m: u32) -> u32 {
        self.tile_tokens.unwrap_or(m.clamp(2, 4))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An adapter of this name, type and subgroup size, for choices made from capabilities.
    pub(crate) fn adapter(name: &str, device_type: wgpu::DeviceType, subgroup: u32) -> wgpu::AdapterInfo {
        wgpu::AdapterInfo {
            name: name.into(),
            vendor: 0,
            device: 0,
            device_type,
            device_pci_bus_id: String::new(),
            driver: String::new(),
            driver_info: String::new(),
            backend: wgpu::Backend::Vulkan,
            subgroup_min_size: subgroup,
            subgroup_max_size: subgroup,
            transient_saves_memory: Some(false),
            limit_bucket: None,
        }
    }

    #[test]
    fn choices_follow_capabilities_and_overrides() {
        let sg = Variant { f16: true, subgroups: true, web: false };
        let lavapipe = Tuning::for_device(&adapter("llvmpipe (LLVM 15.0.6, 256 bits)", wgpu::DeviceType::Cpu, 8), sg, &KernelOverrides::default());
        assert!(lavapipe.cpu && lavapipe.subgroups_of_8 && lavapipe.token_tile && lavapipe.attention == AttentionFamily::PerQuery && !lavapipe.tiled_matmul);
        assert_eq!(lavapipe.sample_top_k_max, 1);
        assert_eq!(lavapipe.decode_slots, 4);
        assert_eq!([2, 3, 4, 5, 64].map(|m| lavapipe.tile_for(m)), [2, 3, 4, 4, 4]);
        let four = Tuning::for_device(&adapter("llvmpipe", wgpu::DeviceType::Cpu, 8), sg, &KernelOverrides { tile_tokens: Some(4), ..Default::default() });
        assert_eq!(four.tile_for(2), 4);
        let forced = Tuning::for_device(&adapter("llvmpipe", wgpu::DeviceType::Cpu, 8), sg, &KernelOverrides { sample_top_k: Some(true), ..Default::default() });
        assert_eq!(forced.sample_top_k_max, crate::ops::MAX_TOP_K);
        let gpu = Tuning::for_device(&adapter("NVIDIA H100", wgpu::DeviceType::DiscreteGpu, 32), sg, &KernelOverrides::default());
        assert_eq!(gpu.sample_top_k_max, crate::ops::MAX_TOP_K);
        assert_eq!(lavapipe.loop_budget, Some(LLVMPIPE_LOOP_BUDGET));
        assert!(lavapipe.matvec.x_broadcast && lavapipe.matvec.paired().rpi == 8);
        let swiftshader =
            Tuning::for_device(&adapter("google swiftshader", wgpu::DeviceType::Cpu, 4), Variant { f16: false, subgroups: false, web: true }, &Default::default());
        assert!(swiftshader.cpu && !swiftshader.token_tile && swiftshader.loop_budget.is_none() && !swiftshader.matvec.x_broadcast);
        assert_eq!(swiftshader.decode_slots, 1);
        let gpu = Tuning::for_device(&adapter("NVIDIA H200", wgpu::DeviceType::DiscreteGpu, 32), sg, &Default::default());
        assert!(!gpu.cpu && gpu.tiled_matmul && gpu.attention == AttentionFamily::Tile && !gpu.token_tile && gpu.loop_budget.is_none());
        assert_eq!((gpu.matvec.tpr, gpu.matvec.rpi, gpu.matvec.wg), (32, 1, 64));
        assert_eq!(gpu.decode_slots, 8);
        assert!(gpu.attention_split.groups > 0 && lavapipe.attention_split == AttentionSplit::CPU && lavapipe.attention_dim_lanes);
        let forced = Tuning::for_device(&adapter("llvmpipe", wgpu::DeviceType::Cpu, 8), sg, &KernelOverrides { attention_split: Some(true), ..Default::default() });
        assert_eq!(forced.attention_split, AttentionSplit::ALWAYS);
        let o = KernelOverrides { matvec_tpr: Some(4), matvec_rpi: Some(3), matvec_wg: Some(2), tiled_matmul: Some(true), token_tile: Some(false), ..Default::default() };
        let forced = Tuning::for_device(&adapter("llvmpipe", wgpu::DeviceType::Cpu, 8), sg, &o);
        assert_eq!((forced.matvec.tpr, forced.matvec.rpi, forced.matvec.wg), (4, 3, 4));
        assert!(forced.tiled_matmul && !forced.token_tile && !forced.matvec.x_broadcast && forced.matvec.paired().rpi == 4);
    }
}
