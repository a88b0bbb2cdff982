//! Whole-model LoRA gradients against automatic differentiation: the GPU trainer's gradients of
//! every factor (rank 8 on every projection of every layer, random nonzero A and B) against
//! PyPI autograd's over an independent numpy forward pass in float64
//! (tests/reference/lora_autograd.py, on tiny_forward.py's llama.cpp conventions): cosine ≥
//! 0.999 per tensor and the same loss, for the tiny llama (also with llama 3's RoPE factors), qwen2, qwen3, gemma3 (with sliding
//! windows) and smollm3 models and for SmolLM2 135M's real (Q4_1) weights. The default kernel
//! variant of the device (f16 and subgroups where it has them); train_gradients.rs covers every
//! variant against the CPU composition.

use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::model::Model;
use nomoat_runtime::train::step::{memory_needed, Trainer, TARGETS};
use nomoat_tests::gpu::variants;
use nomoat_tests::support::{cosine, model_path, Rng, SMOLLM2};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tiny(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/tiny").join(file)
}

fn check(model_file: &Path, n_tokens: usize) {
    let gpu = variants().last().unwrap();
    let bytes = std::fs::read(model_file).unwrap();
    let gguf = Gguf::parse(&bytes).unwrap();
    let model = pollster::block_on(Model::load(&gguf, gpu, &mut bytes.as_slice(), &mut |_, _| {})).unwrap();
    let targets: Vec<&str> = TARGETS.iter().map(|t| t.0).collect();
    let mut trainer = pollster::block_on(Trainer::new(&model, gpu, &targets, 8, 16.0, n_tokens as u32, 3)).unwrap();
    assert_eq!(memory_needed(&model.config, &targets, 8, n_tokens as u32), trainer.bytes, "memory_needed");
    let mut rng = Rng::new(21);
    for (name, p) in &trainer.pairs {
        // B at the size training reaches, so every A has a gradient and the adapter matters
        let a = rng.fill((p.a.n_rows * p.a.k) as usize, 1.0 / (p.a.k as f32).sqrt());
        let b = rng.fill((p.b.n_rows * p.b.k) as usize, 0.05);
        trainer.set_factors(name, &a, &b).unwrap();
    }
    let n_vocab = model.config.n_vocab as u64;
    let ids: Vec<u32> = (0..n_tokens).map(|_| (rng.next_u64() % (n_vocab - 10)) as u32 + 5).collect();
    let weights: Vec<f32> = (0..n_tokens).map(|i| if i < n_tokens / 4 { 0.0 } else { 1.0 }).collect();
    let loss = pollster::block_on(trainer.accumulate(&ids, &weights)).unwrap();
    let got = pollster::block_on(trainer.gradients()).unwrap();

    let dir = std::env::temp_dir().join(format!("nomoat-autograd-{}-{}", std::process::id(), model_file.file_stem().unwrap().to_string_lossy()));
    std::fs::create_dir_all(&dir).unwrap();
    let (adapter, case, out) = (dir.join("adapter.gguf"), dir.join("case.json"), dir.join("grads.gguf"));
    std::fs::write(&adapter, pollster::block_on(trainer.adapter_gguf("autograd")).unwrap()).unwrap();
    std::fs::write(&case, serde_json::json!({"ids": ids, "weights": weights}).to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("reference/lora_autograd.py");
    let run = Command::new("python3").arg(&script).args([model_file, &adapter, &case, &out]).output().expect("python3");
    assert!(run.status.success(), "lora_autograd.py: {}", String::from_utf8_lossy(&run.stderr));
    let refs_bytes = std::fs::read(&out).unwrap();
    let refs = Gguf::parse(&refs_bytes).unwrap();
    let want_loss = refs.metadata.iter().find(|(k, _)| k == "loss").and_then(|(_, v)| v.as_f64()).expect("loss");
    let label = format!("{} [{}]", model_file.file_name().unwrap().to_string_lossy(), gpu.variant.label());
    assert!((loss - want_loss).abs() <= 1e-3 * want_loss.abs(), "{label}: loss {loss}, autograd {want_loss}");
    assert_eq!(got.len(), model.config.n_layer * TARGETS.len(), "{label}: trained tensors");
    let mut worst = (1.0f64, String::new());
    for (name, (ga, gb)) in &got {
        for (what, g) in [("grad_a", ga), ("grad_b", gb)] {
            let t = refs.tensor(&format!("{name}.{what}")).unwrap_or_else(|| panic!("{label}: no reference {name}.{what}"));
            let r = refs.tensor_data_range(t);
            let want: Vec<f32> = bytemuck::pod_collect_to_vec(&refs_bytes[r.start as usize..r.end as usize]);
            let cos = cosine(g, &want);
            if cos.is_nan() || cos < worst.0 {
                worst = (cos, format!("{name}.{what}"));
            }
        }
    }
    eprintln!("{label}: loss {loss:.5} (autograd {want_loss:.5}), worst gradient cosine {:.6} ({})", worst.0, worst.1);
    assert!(worst.0 >= 0.999, "{label}: cosine {} for {}", worst.0, worst.1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tiny_models_gradients_match_autograd() {
    for file in [
        "llama-tiny.gguf",
        "llama-mixed-tiny.gguf",
        "llama3-tiny.gguf",
        "qwen2-tiny.gguf",
        "qwen3-tiny.gguf",
        "gemma3-tiny.gguf",
        "gemma3-swa-tiny.gguf",
        "smollm3-tiny.gguf",
    ] {
        check(&tiny(file), 40);
    }
}

#[test]
fn smollm2_real_weights_gradients_match_autograd() {
    check(&model_path(SMOLLM2), 32);
}
