//! LoRA adapters against llama.cpp (tests/reference/make_lora_refs.py: seeded random adapters
//! written with gguf-py in llama.cpp's format, logits from llama-cpp-python with the same
//! adapters and scales): one adapter at scales 0.5 and 1.0, another alone, two stacked.
//! Bounds as for the base models: cosine ≥ 0.99 over the vocabulary, the same top-1 wherever
//! llama.cpp's top-2 margin exceeds 0.5. Where llama.cpp's 8-bit activations put even a plain
//! f32 forward pass with the same adapters under 0.99 (one short SmolLM2 prompt with both
//! adapters stacked: 0.9799), the bound is that f32 pass's cosine minus 0.005. Exactness where it must hold: scale 0 gives the base
//! logits bit for bit, and removing an adapter restores them bit for bit. Swapping adapters 20
//! times returns GPU buffer memory to its baseline.

use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::lora::LoraAdapter;
use nomoat_runtime::model::Model;
use nomoat_runtime::ops::KvType;
use nomoat_runtime::session::Session;
use nomoat_tests::gpu::variants;
use nomoat_tests::support::{cosine, model_path, GEMMA3, QWEN2, SMOLLM2};
use serde::Deserialize;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Deserialize)]
struct Refs {
    cases: Vec<Case>,
    f32_vs_llamacpp: F32VsLlama,
}

/// How far a plain f32 forward pass with the same adapters (tests/reference/f32_forward.py) is
/// from llama.cpp, per case.
#[derive(Deserialize)]
struct F32VsLlama {
    per_case: Vec<F32Case>,
}

#[derive(Deserialize)]
struct F32Case {
    case: String,
    cosine: f64,
}

#[derive(Deserialize)]
struct Case {
    prompt_tokens: Vec<u32>,
    setting: Setting,
    logits_file: String,
    top2_margin: f64,
}

#[derive(Deserialize)]
struct Setting {
    adapters: Vec<AdapterUse>,
}

#[derive(Deserialize)]
struct AdapterUse {
    file: String,
    scale: f32,
}

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/lora")
}

fn open(path: &std::path::Path) -> (Gguf, std::fs::File) {
    let mut f = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = f.metadata().unwrap().len();
    (Gguf::read_from(&mut f, len).unwrap(), f)
}

fn read_logits(file: &str) -> Vec<f32> {
    nomoat_tests::support::read_logits(&dir().join(file))
}

fn argmax(v: &[f32]) -> usize {
    nomoat_runtime::reference::argmax(v)
}

fn logits(s: &mut Session, ids: &[u32]) -> Vec<f32> {
    s.reset();
    pollster::block_on(s.eval(ids)).unwrap();
    pollster::block_on(s.logits()).unwrap()
}

fn check(file: &str) {
    let stem = file.trim_end_matches(".gguf");
    let refs: Refs = serde_json::from_str(&std::fs::read_to_string(dir().join(format!("{stem}.json"))).unwrap()).unwrap();
    let gpu = &variants()[0];
    let (base, mut f) = open(&model_path(file));
    let model = pollster::block_on(Model::load(&base, gpu, &mut f, &mut |_, _| {})).unwrap();
    let load = |name: &str| {
        let (g, mut af) = open(&dir().join(name));
        Arc::new(pollster::block_on(LoraAdapter::load(name, &g, &mut af, gpu, &model.config, &base)).unwrap())
    };
    let mut cache: Vec<(String, Arc<LoraAdapter>)> = Vec::new();
    let mut s = pollster::block_on(Session::new(&model, gpu, 512, KvType::F16, false)).unwrap();
    let mut failures = Vec::new();
    for c in &refs.cases {
        let mut set = Vec::new();
        for u in &c.setting.adapters {
            if !cache.iter().any(|(n, _)| *n == u.file) {
                cache.push((u.file.clone(), load(&u.file)));
            }
            set.push((cache.iter().find(|(n, _)| *n == u.file).unwrap().1.clone(), u.scale));
        }
        pollster::block_on(s.set_adapters(set)).unwrap();
        let got = logits(&mut s, &c.prompt_tokens);
        let want = read_logits(&c.logits_file);
        let cos = cosine(&got, &want);
        // llama.cpp's 8-bit activations can put even an exact f32 computation under 0.99 on a
        // short prompt; there, being as close as the f32 reference is (within 0.005) is the bound
        let name = c.logits_file.trim_start_matches(&format!("{stem}.")).split(".logits").next().unwrap();
        let f32_cos = refs.f32_vs_llamacpp.per_case.iter().find(|f| f.case == name).map(|f| f.cosine);
        let bound = match f32_cos {
            Some(f) if f < 0.99 => f - 0.005,
            _ => 0.99,
        };
        eprintln!("{:<55} cos {cos:.5} (bound {bound:.4}) top1 {} vs {} (margin {:.2})", c.logits_file, argmax(&got), argmax(&want), c.top2_margin);
        if cos < bound {
            failures.push(format!("{}: cosine {cos:.5} < {bound:.4}", c.logits_file));
        }
        if c.top2_margin > 0.5 && argmax(&got) != argmax(&want) {
            failures.push(format!("{}: top-1 {} vs llama.cpp {}", c.logits_file, argmax(&got), argmax(&want)));
        }
    }
    assert!(failures.is_empty(), "{stem}:\n{}", failures.join("\n"));

    // scale 0 and removal are exact
    let ids = &refs.cases[0].prompt_tokens;
    let adapter = cache[0].1.clone();
    pollster::block_on(s.set_adapters(vec![])).unwrap();
    let base_logits = logits(&mut s, ids);
    pollster::block_on(s.set_adapters(vec![(adapter.clone(), 0.0)])).unwrap();
    assert_eq!(logits(&mut s, ids), base_logits, "{stem}: scale 0 must equal the base model");
    pollster::block_on(s.set_adapters(vec![(adapter.clone(), 1.0)])).unwrap();
    assert_ne!(logits(&mut s, ids), base_logits, "{stem}: the adapter changes nothing");
    pollster::block_on(s.set_adapters(vec![])).unwrap();
    assert_eq!(logits(&mut s, ids), base_logits, "{stem}: removing the adapter must restore the base model");
}

#[test]
fn smollm2_adapters_match_llama_cpp() {
    check(SMOLLM2);
}

#[test]
fn gemma3_adapters_match_llama_cpp() {
    check(GEMMA3);
}

/// Qwen2.5-Coder 0.5B: an adapter on ffn_down (k = n_ff = 4864) over prompts of 64 and 96
/// tokens, where a 64-token batch's LoRA A product once overran llvmpipe's loop budget and left
/// its last tokens without their LoRA terms; and one on every projection kind.
#[test]
fn qwen2_adapters_match_llama_cpp() {
    check(QWEN2);
}

/// Load, apply and drop an adapter 20 times: GPU buffer memory comes back to where it was.
#[test]
fn swapping_adapters_frees_their_memory() {
    let gpu = &variants()[0];
    let (base, mut f) = open(&model_path(SMOLLM2));
    let model = pollster::block_on(Model::load(&base, gpu, &mut f, &mut |_, _| {})).unwrap();
    let mut s = pollster::block_on(Session::new(&model, gpu, 256, KvType::F16, false)).unwrap();
    let ids = [504u32, 2365, 6354];
    let file = format!("{}.attn_r8.gguf", SMOLLM2.trim_end_matches(".gguf"));
    let cycle = |s: &mut Session| {
        let (g, mut af) = open(&dir().join(&file));
        let a = Arc::new(pollster::block_on(LoraAdapter::load("a", &g, &mut af, gpu, &model.config, &base)).unwrap());
        pollster::block_on(s.set_adapters(vec![(a, 1.0)])).unwrap();
        logits(s, &ids);
        pollster::block_on(s.set_adapters(vec![])).unwrap();
        logits(s, &ids);
        gpu.wait().unwrap();
        a_bytes(&g)
    };
    // one cycle first, so every pipeline and lazily made buffer exists before the baseline
    let adapter_bytes = cycle(&mut s);
    let baseline = gpu.buffer_memory().expect("wgpu counts buffer memory natively");
    for _ in 0..20 {
        cycle(&mut s);
    }
    let after = gpu.buffer_memory().unwrap();
    eprintln!("buffer memory: baseline {baseline}, after 20 swaps {after}, one adapter {adapter_bytes}");
    assert!(after - baseline < adapter_bytes as i64 / 2, "GPU memory grew by {} bytes over 20 swaps", after - baseline);
}

fn a_bytes(g: &Gguf) -> u64 {
    g.tensors.iter().map(|t| t.size_bytes()).sum()
}

#[test]
fn mismatched_adapter_is_refused_naming_the_tensor() {
    let gpu = &variants()[0];
    let (base, mut f) = open(&model_path(SMOLLM2));
    let model = pollster::block_on(Model::load(&base, gpu, &mut f, &mut |_, _| {})).unwrap();
    let (g, mut af) = open(&dir().join(format!("{}.wrong_shape.gguf", SMOLLM2.trim_end_matches(".gguf"))));
    let e = pollster::block_on(LoraAdapter::load("w", &g, &mut af, gpu, &model.config, &base)).err().expect("must be refused");
    assert!(e.to_string().contains("blk.0.attn_q.weight"), "{e}");
    // an adapter for the other model is refused by architecture
    let (g, mut af) = open(&dir().join(format!("{}.attn_r8.gguf", GEMMA3.trim_end_matches(".gguf"))));
    let e = pollster::block_on(LoraAdapter::load("g", &g, &mut af, gpu, &model.config, &base)).err().expect("must be refused");
    assert!(e.to_string().contains("gemma3"), "{e}");
}
