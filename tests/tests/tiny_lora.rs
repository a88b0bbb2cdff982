//! LoRA adapters on every projection kind of the tiny models, one kind at a time and all at
//! once, against llama.cpp with the same adapters (tests/data/tiny/lora_refs.json, made by
//! tests/reference/make_tiny_lora_refs.py): q, k, v, o, gate, up, down and the output head on
//! llama, qwen2, qwen3 and gemma3 (tied heads take no output adapter in llama.cpp either), the
//! fused attn_qkv and ffn_up of phi3, and a model whose stacked projections mix F32, F16, Q8_0
//! and Q4_0 within a layer under two stacked adapters (one F16).
//!
//! Bounds as tiny_models.rs: where llama.cpp is f32 throughout (F32 weights and adapters) its
//! logits within 1e-3 max-abs; where it is not (Gemma's GELU table, the mixed model's 8-bit
//! activations) a numpy float32 pass with the same adapters within 1e-3 (2e-3 for the mixed
//! model, whose F16 weights some variants multiply in f16), and llama.cpp's argmax wherever
//! its top-2 margin exceeds 0.05.

use nomoat_runtime::ggml_type::GgmlType;
use nomoat_runtime::gguf::{Gguf, GgufWriter, MetadataValue};
use nomoat_runtime::lora::{self, LoraAdapter};
use nomoat_runtime::model::Model;
use nomoat_runtime::ops::KvType;
use nomoat_runtime::session::Session;
use nomoat_tests::gpu::variants;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Deserialize)]
struct Refs {
    sequences: BTreeMap<String, Vec<u32>>,
    models: Vec<ModelRefs>,
}

#[derive(Deserialize)]
struct ModelRefs {
    file: String,
    settings: Vec<Setting>,
}

#[derive(Deserialize)]
struct Setting {
    name: String,
    adapters: Vec<AdapterUse>,
    llama_cpp: BTreeMap<String, Vec<f32>>,
    f32: Option<BTreeMap<String, Vec<f32>>>,
}

#[derive(Deserialize)]
struct AdapterUse {
    file: String,
    scale: f32,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/tiny")
}

fn open(path: &std::path::Path) -> (Gguf, std::fs::File) {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = f.metadata().unwrap().len();
    (Gguf::read_from(&mut f, len).unwrap(), f)
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max)
}

fn top2_margin(v: &[f32]) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    s[0] - s[1]
}

fn check(file: &str) {
    let refs: Refs = serde_json::from_str(&std::fs::read_to_string(dir().join("lora_refs.json")).unwrap()).unwrap();
    let m = refs.models.iter().find(|m| m.file == file).unwrap_or_else(|| panic!("{file} not in lora_refs.json"));
    let bound = if file.contains("mixed") { 2e-3 } else { 1e-3 };
    let mut failures = Vec::new();
    for gpu in variants() {
        let (base, mut f) = open(&dir().join(file));
        let model = pollster::block_on(Model::load(&base, gpu, &mut f, &mut |_, _| {})).unwrap();
        let mut loaded: BTreeMap<String, Arc<LoraAdapter>> = BTreeMap::new();
        let mut s = pollster::block_on(Session::new(&model, gpu, 256, KvType::F32, false)).unwrap();
        for setting in &m.settings {
            let mut set = Vec::new();
            for u in &setting.adapters {
                let a = loaded.entry(u.file.clone()).or_insert_with(|| {
                    let (g, mut af) = open(&dir().join("lora").join(&u.file));
                    Arc::new(pollster::block_on(LoraAdapter::load(&u.file, &g, &mut af, gpu, &model.config, &base)).unwrap())
                });
                set.push((a.clone(), u.scale));
            }
            pollster::block_on(s.set_adapters(set)).unwrap();
            for (seq, ids) in &refs.sequences {
                s.reset();
                pollster::block_on(s.eval(ids)).unwrap();
                let got = pollster::block_on(s.logits()).unwrap();
                let llama = &setting.llama_cpp[seq];
                let tight = setting.f32.as_ref().map_or(llama, |f| &f[seq]);
                let d = max_abs(&got, tight);
                let (ours, theirs) = (nomoat_runtime::reference::argmax(&got), nomoat_runtime::reference::argmax(llama));
                eprintln!("{file} [{:?}] {:<18} {seq}: max abs {d:.2e}, argmax {ours} vs {theirs}", gpu.variant, setting.name);
                if d.is_nan() || d > bound {
                    failures.push(format!("[{:?}] {} {seq}: max abs {d:e} > {bound:e}", gpu.variant, setting.name));
                }
                if ours != theirs && top2_margin(llama) > 0.05 {
                    failures.push(format!("[{:?}] {} {seq}: argmax {ours} but llama.cpp {theirs}", gpu.variant, setting.name));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{file} with adapters against llama.cpp:\n{}", failures.join("\n"));
}

#[test]
fn llama_tiny_adapters_match_llama_cpp() {
    check("llama-tiny.gguf");
}

#[test]
fn qwen2_tiny_adapters_match_llama_cpp() {
    check("qwen2-tiny.gguf");
}

#[test]
fn qwen3_tiny_adapters_match_llama_cpp() {
    check("qwen3-tiny.gguf");
}

#[test]
fn gemma3_tiny_adapters_match_llama_cpp() {
    check("gemma3-tiny.gguf");
}

#[test]
fn phi3_tiny_fused_adapters_match_llama_cpp() {
    check("phi3-tiny.gguf");
}

#[test]
fn mixed_types_stacked_adapters_match_llama_cpp() {
    check("llama-mixed-tiny.gguf");
}

/// Adapters are checked like the model's own weights: a NaN or infinite value in A or B (F32,
/// F16, a Q8_0 block scale), an alpha that is NaN or infinite (1e300 written as an F64 is
/// infinite in f32), or a rank over `lora::MAX_RANK` is refused, naming what is wrong, before
/// any of the adapter is used.
#[test]
fn adapters_with_non_finite_values_or_a_huge_rank_are_refused() {
    let gpu = &variants()[0];
    let (base, mut f) = open(&dir().join("llama-tiny.gguf"));
    let model = pollster::block_on(Model::load(&base, gpu, &mut f, &mut |_, _| {})).unwrap();
    let bytes = std::fs::read(dir().join("lora/llama-tiny.attn_q.gguf")).unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    let a_name = "blk.0.attn_q.weight.lora_a";
    let b_name = "blk.0.attn_q.weight.lora_b";
    let (a_dims, b_dims) = (g.tensor(a_name).unwrap().dims.clone(), g.tensor(b_name).unwrap().dims.clone());
    assert_eq!((a_dims[1], b_dims[0]), (4, 4), "a rank-4 adapter");
    // the adapter with its alpha and some tensors replaced
    let rewrite = |alpha: MetadataValue, replaced: &[(&str, Vec<u64>, GgmlType, Vec<u8>)]| -> Vec<u8> {
        let mut w = GgufWriter::new();
        for (k, v) in g.metadata.iter().filter(|(k, _)| k != "adapter.lora.alpha") {
            w.add_metadata(k.clone(), v.clone());
        }
        w.add_metadata("adapter.lora.alpha", alpha);
        for t in &g.tensors {
            match replaced.iter().find(|(n, ..)| *n == t.name) {
                Some((n, dims, ty, data)) => w.add_tensor(*n, dims, *ty, data.clone()),
                None => {
                    let r = g.tensor_data_range(t);
                    w.add_tensor(t.name.clone(), &t.dims, t.ty, bytes[r.start as usize..r.end as usize].to_vec())
                }
            };
        }
        w.to_bytes()
    };
    let load = |file: Vec<u8>| {
        let ag = Gguf::parse(&file).unwrap();
        pollster::block_on(LoraAdapter::load("hostile", &ag, &mut file.as_slice(), gpu, &model.config, &base)).map(|_| ())
    };
    let f32s = |n: u64, bad_at: usize, bad: f32| -> Vec<u8> { (0..n as usize).flat_map(|i| if i == bad_at { bad } else { 0.01 }.to_le_bytes()).collect() };
    let f16s =
        |n: u64, bad_at: usize, bad: f32| -> Vec<u8> { (0..n as usize).flat_map(|i| half::f16::from_f32(if i == bad_at { bad } else { 0.01 }).to_le_bytes()).collect() };
    let n_a = a_dims[0] * a_dims[1];
    let n_b = b_dims[0] * b_dims[1];
    // Q8_0 A: 34-byte blocks of 32 values, scale first; the last block's scale NaN
    let q8_blocks = n_a / 32;
    let q8: Vec<u8> = (0..q8_blocks)
        .flat_map(|i| {
            let scale = half::f16::from_f32(if i == q8_blocks - 1 { f32::NAN } else { 0.001 });
            scale.to_le_bytes().into_iter().chain([1u8; 32])
        })
        .collect();
    let alpha = MetadataValue::F32(8.0);
    assert!(load(rewrite(alpha.clone(), &[])).is_ok(), "the adapter as it is loads");
    let big = lora::MAX_RANK + 1;
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("NaN alpha", rewrite(MetadataValue::F32(f32::NAN), &[]), "alpha"),
        ("infinite alpha", rewrite(MetadataValue::F32(f32::INFINITY), &[]), "alpha"),
        ("alpha 1e300 as F64", rewrite(MetadataValue::F64(1e300), &[]), "alpha"),
        ("NaN in A", rewrite(alpha.clone(), &[(a_name, a_dims.clone(), GgmlType::F32, f32s(n_a, 5, f32::NAN))]), a_name),
        ("infinity in B", rewrite(alpha.clone(), &[(b_name, b_dims.clone(), GgmlType::F32, f32s(n_b, n_b as usize - 1, f32::INFINITY))]), b_name),
        ("F16 infinity in B", rewrite(alpha.clone(), &[(b_name, b_dims.clone(), GgmlType::F16, f16s(n_b, 0, f32::NEG_INFINITY))]), b_name),
        ("Q8_0 NaN scale in A", rewrite(alpha.clone(), &[(a_name, a_dims.clone(), GgmlType::Q8_0, q8)]), a_name),
        (
            "rank over the cap",
            rewrite(
                alpha.clone(),
                &[
                    (a_name, vec![a_dims[0], big], GgmlType::F16, vec![0; (a_dims[0] * big * 2) as usize]),
                    (b_name, vec![big, b_dims[1]], GgmlType::F16, vec![0; (big * b_dims[1] * 2) as usize]),
                ],
            ),
            "rank",
        ),
    ];
    for (what, file, named) in cases {
        match load(file) {
            Err(e) => assert!(e.to_string().contains(named), "{what}: {e}"),
            Ok(()) => panic!("{what}: loaded"),
        }
    }
}
