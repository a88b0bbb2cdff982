//! The one place WGSL sources become per-target shader modules.
//!
//! Files in `shaders/` use a tiny preprocessor: `#include "file.wgsl"` (each file once),
//! `#if NAME` / `#else` / `#endif` on flags, and whole-word substitution of defines such as `WG`.
//! The [`Variant`] of the device decides the rest:
//! - `F16`: the device has shader-f16; the source starts with `enable f16;`.
//! - `SUBGROUPS`: the device has subgroups; browsers also require `enable subgroups;`, which
//!   naga (wgpu's native front end) rejects, so only the web target gets that line.
//!   `SG_PARAMS`, `SG_SIZE` and `SG_LANE` expand to the subgroup builtins or to nothing / `0u`.

use std::collections::BTreeMap;

/// Which code paths a device gets. Every combination must be valid WGSL; tests check them all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    pub f16: bool,
    pub subgroups: bool,
    /// Browser WebGPU (Chromium, Firefox, Safari) rather than wgpu's own WGSL front end.
    pub web: bool,
}

impl Variant {
    pub const PORTABLE: Variant = Variant { f16: false, subgroups: false, web: false };

    pub fn all(web: bool) -> impl Iterator<Item = Variant> {
        [(false, false), (false, true), (true, false), (true, true)].into_iter().map(move |(f16, subgroups)| Variant { f16, subgroups, web })
    }

    pub fn label(&self) -> String {
        format!("{}{}{}", if self.f16 { "f16" } else { "f32" }, if self.subgroups { "+subgroups" } else { "" }, if self.web { "@web" } else { "" })
    }
}

/// Every WGSL file by its name under `shaders/`, compiled in. `runtime/shaders` is a link to the
/// workspace's `shaders/` so the paths stay inside this crate and `cargo package` ships them.
pub const FILES: &[(&str, &str)] = &[
    ("lib/unpack.wgsl", include_str!("../shaders/lib/unpack.wgsl")),
    ("lib/bytes.wgsl", include_str!("../shaders/lib/bytes.wgsl")),
    ("lib/dequant.wgsl", include_str!("../shaders/lib/dequant.wgsl")),
    ("lib/dot.wgsl", include_str!("../shaders/lib/dot.wgsl")),
    ("lib/reduce.wgsl", include_str!("../shaders/lib/reduce.wgsl")),
    ("lib/kv.wgsl", include_str!("../shaders/lib/kv.wgsl")),
    ("matvec.wgsl", include_str!("../shaders/matvec.wgsl")),
    ("matmul.wgsl", include_str!("../shaders/matmul.wgsl")),
    ("gather.wgsl", include_str!("../shaders/gather.wgsl")),
    ("norm.wgsl", include_str!("../shaders/norm.wgsl")),
    ("softmax.wgsl", include_str!("../shaders/softmax.wgsl")),
    ("elementwise.wgsl", include_str!("../shaders/elementwise.wgsl")),
    ("rope_kv.wgsl", include_str!("../shaders/rope_kv.wgsl")),
    ("lib/kv_write.wgsl", include_str!("../shaders/lib/kv_write.wgsl")),
    ("lib/rotary.wgsl", include_str!("../shaders/lib/rotary.wgsl")),
    ("lib/seq_place.wgsl", include_str!("../shaders/lib/seq_place.wgsl")),
    ("lib/activation.wgsl", include_str!("../shaders/lib/activation.wgsl")),
    ("lib/product_out.wgsl", include_str!("../shaders/lib/product_out.wgsl")),
    ("lib/attention.wgsl", include_str!("../shaders/lib/attention.wgsl")),
    ("attention_workgroup.wgsl", include_str!("../shaders/attention_workgroup.wgsl")),
    ("attention_query.wgsl", include_str!("../shaders/attention_query.wgsl")),
    ("attention_tile.wgsl", include_str!("../shaders/attention_tile.wgsl")),
    ("attention_merge.wgsl", include_str!("../shaders/attention_merge.wgsl")),
    ("topk.wgsl", include_str!("../shaders/topk.wgsl")),
    ("copy.wgsl", include_str!("../shaders/copy.wgsl")),
    ("product_backward.wgsl", include_str!("../shaders/product_backward.wgsl")),
    ("weight_gradient.wgsl", include_str!("../shaders/weight_gradient.wgsl")),
    ("norm_backward.wgsl", include_str!("../shaders/norm_backward.wgsl")),
    ("glu_backward.wgsl", include_str!("../shaders/glu_backward.wgsl")),
    ("cross_entropy.wgsl", include_str!("../shaders/cross_entropy.wgsl")),
    ("adamw.wgsl", include_str!("../shaders/adamw.wgsl")),
    ("skinny_product.wgsl", include_str!("../shaders/skinny_product.wgsl")),
    ("attention_backward.wgsl", include_str!("../shaders/attention_backward.wgsl")),
];

fn file(name: &str) -> Result<&'static str, String> {
    FILES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s).ok_or_else(|| format!("no shader file {name}"))
}

/// Flags and values a pipeline is built with, beyond what the variant implies.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Defines(pub BTreeMap<String, String>);

impl Defines {
    pub fn new() -> Defines {
        Defines::default()
    }
    pub fn flag(mut self, name: &str) -> Defines {
        self.0.insert(name.to_string(), "1".to_string());
        self
    }
    pub fn value(mut self, name: &str, v: impl ToString) -> Defines {
        self.0.insert(name.to_string(), v.to_string());
        self
    }
}

/// Flags of kernel modes that need subgroups (matvec.wgsl's X_BROADCAST, attention_query.wgsl's
/// KV_BROADCAST, HEADS_SHARE_KV, KEY_LANES and DIM_LANES, product_backward.wgsl's
/// DY_BROADCAST, attention_backward.wgsl's ROW_BROADCAST): dropped for variants without them,
/// so every key builds on every variant.
const SUBGROUP_MODES: &[&str] = &["X_BROADCAST", "KV_BROADCAST", "HEADS_SHARE_KV", "KEY_LANES", "DIM_LANES", "DY_BROADCAST", "ROW_BROADCAST"];

/// The full WGSL text of `file` for `variant`.
pub fn generate(file_name: &str, variant: Variant, defines: &Defines) -> Result<String, String> {
    let mut d = defines.0.clone();
    if variant.f16 {
        d.insert("F16".into(), "1".into());
    }
    if variant.subgroups {
        d.insert("SUBGROUPS".into(), "1".into());
        d.insert("SG_PARAMS".into(), ", @builtin(subgroup_size) sg_size: u32, @builtin(subgroup_invocation_id) sg_lane: u32".into());
        d.insert("SG_SIZE".into(), "sg_size".into());
        d.insert("SG_LANE".into(), "sg_lane".into());
    } else {
        d.insert("SG_PARAMS".into(), String::new());
        d.insert("SG_SIZE".into(), "0u".into());
        d.insert("SG_LANE".into(), "0u".into());
    }
    d.entry("WG".into()).or_insert_with(|| "64u".into());
    if !variant.subgroups {
        // kernel modes built on subgroup operations fall back to their plain form
        for flag in SUBGROUP_MODES {
            d.remove(*flag);
        }
    }

    let mut out = String::new();
    if variant.f16 {
        out.push_str("enable f16;\n");
    }
    if variant.subgroups && variant.web {
        out.push_str("enable subgroups;\n");
    }
    let mut included = Vec::new();
    expand(file_name, &d, &mut included, &mut out)?;
    Ok(out)
}

fn expand(name: &str, defines: &BTreeMap<String, String>, included: &mut Vec<String>, out: &mut String) -> Result<(), String> {
    if included.iter().any(|n| n == name) {
        return Ok(());
    }
    included.push(name.to_string());
    // stack of (this branch is live, some branch of this #if was live)
    let mut stack: Vec<(bool, bool)> = Vec::new();
    let live = |stack: &Vec<(bool, bool)>| stack.iter().all(|(l, _)| *l);
    for (n, line) in file(name)?.lines().enumerate() {
        let t = line.trim();
        let at = || format!("{name}:{}", n + 1);
        if let Some(flag) = t.strip_prefix("#if ") {
            let on = defines.get(flag.trim()).is_some_and(|v| v != "0");
            stack.push((on, on));
        } else if t == "#else" {
            let top = stack.last_mut().ok_or_else(|| format!("{}: #else without #if", at()))?;
            *top = (!top.1, true);
        } else if t == "#endif" {
            stack.pop().ok_or_else(|| format!("{}: #endif without #if", at()))?;
        } else if !live(&stack) {
            continue;
        } else if let Some(inc) = t.strip_prefix("#include ") {
            expand(inc.trim().trim_matches('"'), defines, included, out)?;
        } else if t.starts_with('#') {
            return Err(format!("{}: unknown directive {t}", at()));
        } else {
            out.push_str(&substitute(line, defines));
            out.push('\n');
        }
    }
    if !stack.is_empty() {
        return Err(format!("{name}: unterminated #if"));
    }
    Ok(())
}

/// Replace whole identifiers that name a define with its value.
fn substitute(line: &str, defines: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(line.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        match defines.get(word.as_str()) {
            Some(v) if word.chars().next().is_some_and(|c| c.is_ascii_uppercase()) => out.push_str(v),
            _ => out.push_str(word),
        }
        word.clear();
    };
    for c in line.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_differ_by_target() {
        let native = generate("copy.wgsl", Variant { f16: true, subgroups: true, web: false }, &Defines::new()).unwrap();
        assert!(native.starts_with("enable f16;\n") && !native.contains("enable subgroups"));
        let web = generate("copy.wgsl", Variant { f16: false, subgroups: true, web: true }, &Defines::new()).unwrap();
        assert!(web.starts_with("enable subgroups;\n") && !web.contains("enable f16"));
    }

    #[test]
    fn if_else_and_substitution() {
        let d = BTreeMap::from([("WG".to_string(), "64u".to_string())]);
        assert_eq!(substitute("a(WG, WGX)", &d), "a(64u, WGX)");
    }
}
