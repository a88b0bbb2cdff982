//! The device-dependent kernel choices: the matvec shape, and the device tests the ops' own
//! choices ask (llvmpipe, subgroups of 8). `NOMOAT_*` overrides come from the device's
//! `KernelOverrides`, read when it was opened.

use crate::device::Gpu;

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
pub(super) fn is_llvmpipe(gpu: &Gpu) -> bool {
    gpu.info.name.contains("llvmpipe")
}

/// Loop iterations a kernel may take in one invocation on llvmpipe, which stops it after 65535
/// in all (its guard against endless loops) and leaves the rest of its output unwritten; some
/// are kept for the loops the estimates leave out. None: no such limit.
pub(super) fn loop_budget(gpu: &Gpu) -> Option<u64> {
    is_llvmpipe(gpu).then_some(LLVMPIPE_LOOP_BUDGET)
}

pub(super) const LLVMPIPE_LOOP_BUDGET: u64 = 60_000;

/// Whether the kernels have subgroups of exactly 8 invocations (lavapipe: one 256-bit register
/// of f32 lanes), which the broadcast modes (matvec's X_BROADCAST, attention's KV_BROADCAST)
/// build their 8-lane workgroups on.
pub(super) fn subgroups_of_8(gpu: &Gpu) -> bool {
    gpu.variant.subgroups && gpu.info.subgroup_min_size == 8 && gpu.info.subgroup_max_size == 8
}

/// The matvec shape with an even number of rows per invocation, for outputs that need rows in
/// pairs in one invocation (gate with up, RoPE's adjacent pairs).
pub(super) fn paired_matvec_shape(gpu: &Gpu) -> MatvecShape {
    let mut s = matvec_shape(gpu);
    s.rpi = (s.rpi + 1) & !1;
    s
}
