//! Kernel conformance in the browser: the runtime's shared suite (`nomoat_runtime::conformance`,
//! the same cases and bounds tests/tests/conformance.rs runs natively) on the engine's own
//! device. `Engine.run_conformance(filter?)` runs the ops whose names contain `filter` (all for
//! none) and returns the report as JSON:
//! {device, variant, ops: [{op, shader, bound, checks: [{case, metric, error, bound}], error?}]}.

use nomoat_runtime::conformance;
use nomoat_runtime::device::Gpu;

pub async fn run(gpu: &Gpu, filter: &str) -> serde_json::Value {
    let mut ops = Vec::new();
    for case in conformance::cases(filter) {
        let (checks, error) = match case.run(gpu, true).await {
            Ok(checks) => (checks, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        ops.push(serde_json::json!({"op": case.op, "shader": case.shader, "bound": case.bound, "checks": checks, "error": error}));
    }
    serde_json::json!({"device": gpu.describe(), "variant": gpu.variant.label(), "ops": ops})
}
