//! Kernel conformance in the browser: the runtime's shared suite (`nomoat_runtime::conformance`,
//! the same cases and bounds tests/tests/kernels.rs runs natively) on the engine's own device.
//! `Engine.run_conformance()` returns the report as JSON:
//! {device, variant, families: [{family, checks: [{case, metric, error, bound}], error?}]}.

use nomoat_runtime::conformance::{self, FAMILIES};
use nomoat_runtime::device::Gpu;

pub async fn run(gpu: &Gpu) -> serde_json::Value {
    let mut families = Vec::new();
    for family in FAMILIES {
        let v = match conformance::run(gpu, family, true).await {
            Ok(checks) => serde_json::json!({"family": family.name(), "checks": checks}),
            Err(e) => serde_json::json!({"family": family.name(), "checks": [], "error": e.to_string()}),
        };
        families.push(v);
    }
    serde_json::json!({"device": gpu.describe(), "variant": gpu.variant.label(), "families": families})
}
