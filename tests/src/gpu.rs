//! The GPU devices tests run on: one per kernel variant the adapter supports (shader-f16 on or
//! off, subgroups on or off), so one test body covers every code path the device can take.

use nomoat_runtime::device::{Gpu, GpuOptions};
use std::sync::OnceLock;

static VARIANTS: OnceLock<Vec<Gpu>> = OnceLock::new();
static SMALL_BINDING: OnceLock<Gpu> = OnceLock::new();

fn open(opts: GpuOptions) -> Gpu {
    pollster::block_on(Gpu::new(opts))
        .unwrap_or_else(|e| panic!("no GPU for tests ({e}); on a machine without one install lavapipe: apt-get install mesa-vulkan-drivers"))
}

/// One device per distinct variant, the portable one (no f16, no subgroups) first.
pub fn variants() -> &'static [Gpu] {
    VARIANTS.get_or_init(|| {
        let mut out: Vec<Gpu> = Vec::new();
        for (allow_f16, allow_subgroups) in [(false, false), (false, true), (true, false), (true, true)] {
            let gpu = open(GpuOptions { allow_f16, allow_subgroups, ..Default::default() });
            if !out.iter().any(|g| g.variant == gpu.variant) {
                eprintln!("test device: {}", gpu.describe());
                out.push(gpu);
            }
        }
        out
    })
}

/// The portable variant with a 1 MiB storage-binding limit: small tensors then split into
/// several chunks, as large ones do on phones.
pub fn small_binding() -> &'static Gpu {
    SMALL_BINDING.get_or_init(|| open(GpuOptions { allow_f16: false, allow_subgroups: false, max_storage_binding: Some(1 << 20), ..Default::default() }))
}

/// NMSE (ggml test-backend-ops' measure) and max-abs difference, as the shared suite measures.
pub use nomoat_runtime::conformance::{max_abs_diff, nmse};
