//! Every pipeline the runtime can build, generated for every device variant on both targets,
//! parses and validates with naga. The browser's `enable subgroups;` line is one naga does not
//! implement, so it is checked for and removed before validation of the rest.

use nomoat_runtime::ops::all_pipeline_keys;
use nomoat_runtime::shaders::{generate, Variant};

fn validate(source: &str, entry: &str) -> Result<(), String> {
    let module = naga::front::wgsl::parse_str(source).map_err(|e| e.emit_to_string(source))?;
    let caps = naga::valid::Capabilities::SHADER_FLOAT16 | naga::valid::Capabilities::SHADER_FLOAT16_IN_FLOAT32 | naga::valid::Capabilities::SUBGROUP;
    naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
        .subgroup_operations(naga::valid::SubgroupOperationSet::all())
        .validate(&module)
        .map_err(|e| e.emit_to_string(source))?;
    if !module.entry_points.iter().any(|e| e.name == entry) {
        return Err(format!("no entry point {entry}"));
    }
    Ok(())
}

#[test]
fn every_generated_variant_validates() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for web in [false, true] {
        for variant in Variant::all(web) {
            for key in all_pipeline_keys() {
                let src = generate(key.file, variant, &key.defines).unwrap();
                let subgroup_line = src.contains("enable subgroups;");
                assert_eq!(subgroup_line, variant.web && variant.subgroups, "{} {}", key.file, variant.label());
                assert_eq!(src.contains("enable f16;"), variant.f16, "{} {}", key.file, variant.label());
                let body = src.replace("enable subgroups;\n", "");
                if let Err(e) = validate(&body, key.entry) {
                    failures.push(format!("{}:{} {:?} [{}]\n{e}", key.file, key.entry, key.defines.0, variant.label()));
                }
                checked += 1;
            }
        }
    }
    assert!(failures.is_empty(), "{} of {checked} variants failed:\n{}", failures.len(), failures.join("\n"));
    assert!(checked >= 8 * 40, "only {checked} variants generated");
}

#[test]
fn portable_variant_uses_no_optional_feature() {
    for key in all_pipeline_keys() {
        let src = generate(key.file, Variant::PORTABLE, &key.defines).unwrap();
        let code: String = src.lines().map(|l| l.split("//").next().unwrap()).collect::<Vec<_>>().join("\n");
        let src = code;
        assert!(!src.contains("subgroup") && !src.contains("f16>") && !src.contains("enable"), "{}", key.file);
    }
}

/// Rust's parameter structs and the shaders' `struct Params` cannot drift apart: every member
/// of the uniform struct a shader reads sits at the offset of the Rust field of the same name,
/// and every Rust field but padding is read (matmul.wgsl reads a prefix of the product's).
#[test]
fn parameter_structs_match_their_wgsl() {
    let mut failures = Vec::new();
    let layouts = nomoat_runtime::ops::params_layouts();
    let keys = all_pipeline_keys();
    for (file, fields, size) in &layouts {
        let key = keys.iter().find(|k| k.file == *file).unwrap_or_else(|| panic!("no pipeline of {file}"));
        let src = generate(key.file, Variant::PORTABLE, &key.defines).unwrap();
        let module = naga::front::wgsl::parse_str(&src).unwrap();
        let uniform = module.global_variables.iter().map(|(_, g)| g).find(|g| g.space == naga::AddressSpace::Uniform).unwrap_or_else(|| panic!("{file}: no uniform"));
        let naga::TypeInner::Struct { members, span } = &module.types[uniform.ty].inner else { panic!("{file}: the uniform is not a struct") };
        assert!(*span as usize <= 256, "{file}: its parameters outgrow a 256-byte slot");
        for m in members {
            let name = m.name.as_deref().unwrap_or("");
            match fields.iter().find(|(f, _)| *f == name) {
                Some((_, offset)) if *offset == m.offset as usize => {}
                Some((_, offset)) => failures.push(format!("{file}: {name} at byte {} in WGSL, {offset} in Rust", m.offset)),
                None => failures.push(format!("{file}: WGSL reads {name}, which Rust does not write")),
            }
        }
        let read: Vec<&str> = members.iter().filter_map(|m| m.name.as_deref()).collect();
        let prefix = *file == "matmul.wgsl";
        for (f, _) in fields.iter().filter(|(f, _)| !f.starts_with('_')) {
            if !read.contains(f) && !prefix {
                failures.push(format!("{file}: Rust writes {f}, which the WGSL does not declare"));
            }
        }
        assert!(*size <= 256, "{file}: Rust parameters of {size} bytes outgrow a slot");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(layouts.len(), 21);
}
