//! `nomoat finetune` end to end on the tiny llama model (tests/data/tiny): it learns a
//! sentence the base model does not continue, writes an adapter that `nomoat run --lora`
//! loads, resumes from it, and refuses bad input with clear messages.

#[allow(dead_code)] // the server tests use the rest
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn nomoat(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nomoat")).args(args).env("XDG_RUNTIME_DIR", "/tmp").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn tiny(file: &str) -> String {
    format!("{}/../tests/data/tiny/{file}", env!("CARGO_MANIFEST_DIR"))
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nomoat-finetune-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// The greedy continuation of `prompt`, with the adapter at `lora` if given.
fn continuation(model: &str, prompt: &str, lora: Option<&str>) -> String {
    let mut args = vec!["run", "-m", model, "-p", prompt, "-n", "12", "--temp", "0", "--json"];
    if let Some(l) = lora {
        args.extend(["--lora", l]);
    }
    let (ok, out, err) = nomoat(&args);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["text"].as_str().unwrap().to_string()
}

#[test]
fn finetune_learns_a_completion_and_the_adapter_loads() {
    let dir = scratch("learns");
    let model = tiny("llama-tiny.gguf");
    let data = write(&dir, "train.jsonl", &"{\"prompt\": \"The secret word is\", \"completion\": \" pineapple pineapple\"}\n".repeat(4));
    let before = continuation(&model, "The secret word is", None);
    let out = dir.join("secret.gguf");
    let out_s = out.to_str().unwrap();
    let (ok, stdout, err) =
        nomoat(&["finetune", "-m", &model, "--data", &data, "--valid", &data, "-o", out_s, "--steps", "30", "--lr", "1e-2", "--batch-tokens", "16", "--json"]);
    assert!(ok, "{err}");
    let steps: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(steps.len(), 30);
    let (first, last) = (steps[0]["loss"].as_f64().unwrap(), steps[29]["loss"].as_f64().unwrap());
    assert!(last < 0.2 * first, "the loss should fall: {first} → {last}");
    // validation every 10 steps and at the end, here on the training data itself
    let val: Vec<f64> = steps.iter().filter_map(|s| s["val_loss"].as_f64()).collect();
    assert_eq!(val.len(), 3, "{stdout}");
    assert!(val[2] < 0.2 * first, "validation loss {val:?} against a first training loss of {first}");
    let after = continuation(&model, "The secret word is", Some(out_s));
    assert!(after.contains("pineapple") && !before.contains("pineapple"), "before: {before:?}, after: {after:?}");
    // resuming starts from the adapter: its first loss is the trained one, not the base model's
    let (ok, stdout, err) =
        nomoat(&["finetune", "-m", &model, "--data", &data, "-o", dir.join("again.gguf").to_str().unwrap(), "--steps", "1", "--resume", out_s, "--json"]);
    assert!(ok, "{err}");
    let resumed: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    assert!(resumed["loss"].as_f64().unwrap() < 0.5 * first, "resumed at {resumed}, started at {first}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn finetune_refuses_bad_input_clearly() {
    let dir = scratch("refuses");
    let model = tiny("llama-tiny.gguf");
    let out = dir.join("x.gguf");
    let out_s = out.to_str().unwrap();
    let bad = write(&dir, "bad.jsonl", "{\"text\": \"fine\"}\n{\"text\": oops}\n");
    let (ok, _, err) = nomoat(&["finetune", "-m", &model, "--data", &bad, "-o", out_s, "--steps", "1"]);
    assert!(!ok && err.contains("line 2: not valid JSON"), "{err}");
    let empty = write(&dir, "empty.jsonl", "\n");
    let (ok, _, err) = nomoat(&["finetune", "-m", &model, "--data", &empty, "-o", out_s, "--steps", "1"]);
    assert!(!ok && err.contains("no examples"), "{err}");
    let good = write(&dir, "good.jsonl", "{\"text\": \"fine words\"}\n");
    let (ok, _, err) = nomoat(&["finetune", "-m", &model, "--data", &good, "-o", out_s, "--steps", "1", "--targets", "q,wq"]);
    assert!(!ok && err.contains("unknown target 'wq'"), "{err}");
    let (ok, _, err) = nomoat(&["finetune", "-m", &model, "--data", &good, "-o", out_s, "--steps", "1", "--rank", "6"]);
    assert!(!ok && err.contains("multiple of 4"), "{err}");
    let (ok, _, err) = nomoat(&["finetune", "-m", &tiny("phi3-tiny.gguf"), "--data", &good, "-o", out_s, "--steps", "1"]);
    assert!(!ok && err.contains("phi3") && err.contains("not supported yet"), "{err}");
    // an adapter of another model (qwen2) to resume from
    let (ok, _, err) = nomoat(&["finetune", "-m", &tiny("qwen2-tiny.gguf"), "--data", &good, "-o", out_s, "--steps", "1"]);
    assert!(ok, "{err}");
    let (ok, _, err) = nomoat(&["finetune", "-m", &model, "--data", &good, "-o", dir.join("y.gguf").to_str().unwrap(), "--steps", "1", "--resume", out_s]);
    assert!(!ok && err.contains("not a LoRA adapter for a llama model"), "{err}");
    assert!(!dir.join("y.gguf").exists(), "nothing written after a refusal");
    std::fs::remove_dir_all(&dir).ok();
}

/// An adapter `nomoat finetune` wrote (tests/data/finetune/llama-tiny.secret.gguf, see
/// tests/reference/make_finetune_refs.py) gives llama.cpp's logits in nomoat: the same top-1
/// with and without it, and its top-10 logits within 1e-3 (the tiny models' LoRA bound).
#[test]
fn a_trained_adapter_gives_llama_cpp_logits() {
    let data = format!("{}/../tests/data/finetune", env!("CARGO_MANIFEST_DIR"));
    let refs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(format!("{data}/llama-tiny.secret.refs.json")).unwrap()).unwrap();
    let model = tiny("llama-tiny.gguf");
    let adapter = format!("{data}/llama-tiny.secret.gguf");
    let mut changed = 0;
    for case in refs["cases"].as_array().unwrap() {
        let ids: Vec<String> = case["ids"].as_array().unwrap().iter().map(|v| v.to_string()).collect();
        let ids = ids.join(",");
        let mut tops = Vec::new();
        for (which, lora) in [("base", None), ("adapted", Some(adapter.as_str()))] {
            let want: Vec<f64> = case[which].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let mut args = vec!["logits", "-m", &model, "--ids", &ids, "--top", "10"];
            if let Some(l) = lora {
                args.extend(["--lora", l]);
            }
            let (ok, out, err) = nomoat(&args);
            assert!(ok, "{err}");
            let got: serde_json::Value = serde_json::from_str(&out).unwrap();
            let top = got["top"].as_array().unwrap();
            let want_top = (0..want.len()).max_by(|&a, &b| want[a].total_cmp(&want[b])).unwrap();
            assert_eq!(top[0]["id"].as_u64(), Some(want_top as u64), "{which} {}: top-1", case["text"]);
            for t in top {
                let (id, logit) = (t["id"].as_u64().unwrap() as usize, t["logit"].as_f64().unwrap());
                assert!((logit - want[id]).abs() <= 1e-3, "{which} {}: logit of {id} {logit} against llama.cpp's {}", case["text"], want[id]);
            }
            tops.push(want_top);
        }
        changed += (tops[0] != tops[1]) as usize;
    }
    assert!(changed > 0, "the adapter should change some top-1");
}

/// `nomoat bench --train` adds a trainN row beside ppN and tgN, from the same run.
#[test]
fn bench_measures_training_beside_prefill() {
    let (ok, out, err) = nomoat(&["bench", "-m", &tiny("llama-tiny.gguf"), "-c", "64", "-p", "16", "-n", "4", "-r", "1", "--train", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tests: Vec<&str> = v["tests"].as_array().unwrap().iter().map(|t| t["test"].as_str().unwrap()).collect();
    assert_eq!(tests, ["pp16", "tg4", "train16"]);
    assert!(v["tests"][2]["tok_s_mean"].as_f64().unwrap() > 0.0, "{out}");
}

/// What does not fit is refused before the model loads, with what it needs; the amount it says
/// is enough (the estimate is what the trainer allocates, tested in train_gradients.rs).
#[test]
fn finetune_refuses_what_does_not_fit_before_starting() {
    let dir = scratch("memory");
    let model = common::smollm2();
    let model = model.to_str().unwrap();
    let data = write(&dir, "train.jsonl", "{\"prompt\": \"The secret word is\", \"completion\": \" pineapple\"}\n");
    let out = dir.join("x.gguf");
    let out_s = out.to_str().unwrap();
    let started = std::time::Instant::now();
    let (ok, _, err) = nomoat(&["finetune", "-m", model, "--data", &data, "-o", out_s, "--steps", "1", "--max-gpu-memory", "64"]);
    assert!(!ok && err.contains("over the 64 MiB allowed"), "{err}");
    assert!(!out.exists());
    let needs: u64 = err.split("training needs ").nth(1).and_then(|s| s.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{err}"));
    // 93 MiB of weights; rank-8 factors on every projection of 30 layers with their gradients
    // and moments, 56 MiB; 30 MiB of activations, most of it the output head's 64 rows of
    // logits and their gradient
    assert!((150..220).contains(&needs), "{err}");
    eprintln!("refused in {:.2} s: {err}", started.elapsed().as_secs_f64());
    let (ok, _, err) = nomoat(&["finetune", "-m", model, "--data", &data, "-o", out_s, "--steps", "1", "--max-gpu-memory", &needs.to_string()]);
    assert!(ok && out.exists(), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A loss that stops being finite ends the run with a clear error, and the adapter saved at the
/// last checkpoint before it is kept, whole and usable.
#[test]
fn finetune_stops_on_a_non_finite_loss_and_keeps_the_last_checkpoint() {
    let dir = scratch("nan");
    let model = tiny("llama-tiny.gguf");
    let data = write(&dir, "train.jsonl", &"{\"text\": \"The capital of Zorbia is Quxville.\"}\n".repeat(2));
    let out = dir.join("nan.gguf");
    let out_s = out.to_str().unwrap();
    // a learning rate of 1e30 sends the factors to infinity in one step
    let (ok, stdout, err) =
        nomoat(&["finetune", "-m", &model, "--data", &data, "-o", out_s, "--steps", "5", "--lr", "1e30", "--batch-tokens", "8", "--save-every", "1", "--json"]);
    assert!(!ok && err.contains("the loss became NaN at step 2") && err.contains("last saved adapter"), "{err}");
    assert!(!err.contains("invalid model"), "{err}");
    assert_eq!(stdout.lines().count(), 1, "one step reported before the stop: {stdout}");
    // step 1's checkpoint: its loss was finite, and the adapter loads
    assert!(out.exists());
    continuation(&model, "The capital of Zorbia is", Some(out_s));
    std::fs::remove_dir_all(&dir).ok();
}

/// Ctrl-C saves a checkpoint with the run's state (AdamW's moments, the step) beside the
/// adapter; `--resume` goes on from it with the losses and the final adapter of the run that
/// was never stopped. Without the state (or with another checkpoint's) it says so and starts
/// a new schedule from the factors.
#[test]
fn an_interrupted_run_resumes_exactly_where_it_stopped() {
    use std::io::{BufRead, BufReader};
    let dir = scratch("resume");
    let model = tiny("llama-tiny.gguf");
    let data = write(
        &dir,
        "train.jsonl",
        &"{\"prompt\": \"The secret word is\", \"completion\": \" pineapple pineapple\"}\n{\"prompt\": \"Zorbia's capital is\", \"completion\": \" Quxville.\"}\n"
            .repeat(3),
    );
    let args = |out: &Path| -> Vec<String> {
        ["finetune", "-m", &model, "--data", &data, "-o", out.to_str().unwrap(), "--steps", "14", "--lr", "5e-3", "--batch-tokens", "24", "--seed", "3", "--json"]
            .map(String::from)
            .to_vec()
    };
    let losses = |stdout: &str| -> Vec<(u64, f64)> {
        stdout.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()).map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())).collect()
    };
    // the run never stopped
    let whole = dir.join("whole.gguf");
    let (ok, stdout, err) = nomoat(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{err}");
    let straight = losses(&stdout);
    assert_eq!(straight.len(), 14);
    // the same run, Ctrl-C after step 5 is reported (it stops after the step in flight)
    let cut = dir.join("cut.gguf");
    let mut child = Command::new(env!("CARGO_BIN_EXE_nomoat"))
        .args(args(&cut))
        .env("XDG_RUNTIME_DIR", "/tmp")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut before = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        before.push(line.clone());
        if before.len() == 5 {
            Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("interrupted: saving"), "{err}");
    let stopped = losses(&before.join("\n"));
    let at = stopped.len();
    assert!((5..14).contains(&at), "stopped after {at} steps");
    assert_eq!(stopped, straight[..at], "the same seed, the same first steps");
    assert!(dir.join("cut.state.gguf").exists());
    // --resume: the steps after the cut are the uninterrupted run's
    let resumed_out = dir.join("resumed.gguf");
    let mut resume = args(&resumed_out);
    resume.extend(["--resume".into(), cut.to_str().unwrap().into()]);
    let (ok, stdout, err) = nomoat(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok && err.contains(&format!("resuming at step {at} of 14 with the optimizer's state")), "{err}");
    let rest = losses(&stdout);
    assert_eq!(rest.iter().map(|r| r.0).collect::<Vec<_>>(), (at as u64 + 1..=14).collect::<Vec<_>>());
    for ((step, got), (_, want)) in rest.iter().zip(&straight[at..]) {
        assert!((got - want).abs() <= 1e-5 * want.abs(), "step {step}: {got} resumed, {want} uninterrupted");
    }
    let tensors = |p: &Path| {
        let bytes = std::fs::read(p).unwrap();
        let g = nomoat_runtime::gguf::Gguf::parse(&bytes).unwrap();
        g.tensors
            .iter()
            .map(|t| {
                let r = g.tensor_data_range(t);
                (t.name.clone(), bytes[r.start as usize..r.end as usize].to_vec())
            })
            .collect::<Vec<_>>()
    };
    let (a, b) = (tensors(&whole), tensors(&resumed_out));
    assert_eq!(a.len(), b.len());
    for ((name, x), (_, y)) in a.iter().zip(&b) {
        let f32s = |b: &[u8]| b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect::<Vec<f32>>();
        let (x, y) = (f32s(x), f32s(y));
        let worst = x.iter().zip(&y).map(|(p, q)| (p - q).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-5, "{name}: the resumed adapter differs by {worst}");
    }
    // another checkpoint's state is not used; no state: a new optimizer state
    std::fs::copy(dir.join("whole.state.gguf"), dir.join("cut.state.gguf")).unwrap();
    let (ok, _, err) = nomoat(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok && err.contains("is not used") && err.contains("another checkpoint"), "{err}");
    std::fs::remove_file(dir.join("cut.state.gguf")).unwrap();
    let (ok, stdout, err) = nomoat(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok && err.contains("no ") && err.contains("new optimizer state"), "{err}");
    assert_eq!(losses(&stdout).len(), 14, "a new schedule: all its steps");
    std::fs::remove_dir_all(&dir).ok();
}
