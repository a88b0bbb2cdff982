//! The `nomoat` binary end to end on both test models: run (greedy text equal to llama.cpp's up
//! to its first near-tie, from tests/data/models), logits, tokenize, and clear errors for bad
//! input.

use serde_json::Value;
use std::process::Command;

fn models_dir() -> std::path::PathBuf {
    let cache = std::env::var_os("NOMOAT_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/nomoat"));
    cache.join("models")
}

/// SmolLM2's path: the tests name the model (the default is the larger chat model).
fn smollm2() -> String {
    models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf").to_string_lossy().into_owned()
}

fn nomoat(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nomoat")).args(args).env("XDG_RUNTIME_DIR", "/tmp").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `nomoat chat ARGS` with `input` typed in.
fn chat(args: &[&str], input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_nomoat"))
        .arg("chat")
        .args(args)
        .env("XDG_RUNTIME_DIR", "/tmp")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn reference(stem: &str) -> Value {
    let p = format!("{}/../tests/data/models/{stem}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn check_run(file: &str) {
    let stem = file.trim_end_matches(".gguf");
    let refs = reference(stem);
    let case = refs["cases"].as_array().unwrap().iter().find(|c| c["name"] == "short_en").unwrap();
    let model = models_dir().join(file);
    let model = model.to_str().unwrap();
    let prompt = case["prompt"].as_str().unwrap();
    let (ok, out, err) = nomoat(&["run", "-m", model, "-p", prompt, "-n", "8", "--temp", "0", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["prompt_tokens"], case["prompt_tokens"], "{stem}");
    let got: Vec<u64> = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    assert!(!got.is_empty());
    for (i, step) in case["greedy"].as_array().unwrap().iter().take(got.len()).enumerate() {
        if got[i] != step["id"].as_u64().unwrap() {
            assert!(step["margin"].as_f64().unwrap() < 0.5, "{stem}: token {i} is {} but llama.cpp's is {}", got[i], step["id"]);
            break;
        }
    }
    assert!(!v["text"].as_str().unwrap().is_empty());

    let (ok, out, err) = nomoat(&["logits", "-m", model, "-p", prompt, "--top", "3"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["prompt_tokens"], case["prompt_tokens"]);
    assert_eq!(v["top"][0]["id"], case["top10"][0]["id"], "{stem}: top logit");
    assert_eq!(v["top"].as_array().unwrap().len(), 3);

    let (ok, out, _) = nomoat(&["tokenize", "-m", model, "-p", prompt]);
    assert!(ok);
    assert_eq!(serde_json::from_str::<Value>(out.trim()).unwrap(), case["prompt_tokens"]);
}

#[test]
fn run_logits_tokenize_smollm2() {
    check_run("SmolLM2-135M-Instruct.Q4_1.gguf");
}

#[test]
fn run_logits_tokenize_gemma3() {
    check_run("gemma-3-270m-q4_k_m.gguf");
}

#[test]
fn bad_input_gives_clear_errors() {
    let smol = &smollm2();
    let (ok, _, err) = nomoat(&["run", "-m", "/nonexistent/model.gguf", "-p", "hi"]);
    assert!(!ok && err.contains("not found"), "{err}");
    let dir = std::env::temp_dir().join(format!("nomoat-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"this is not a GGUF file at all").unwrap();
    let (ok, _, err) = nomoat(&["run", "-m", junk.to_str().unwrap(), "-p", "hi"]);
    assert!(!ok && err.contains("magic"), "{err}");
    // a truncated copy of a real model: the header parses, the tensor data is cut off
    let real = std::fs::read(models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf")).unwrap();
    let cut = dir.join("cut.gguf");
    std::fs::write(&cut, &real[..real.len() / 2]).unwrap();
    let (ok, _, err) = nomoat(&["run", "-m", cut.to_str().unwrap(), "-p", "hi"]);
    assert!(!ok && err.contains("file is"), "{err}");
    let (ok, _, err) = nomoat(&["run", "-m", smol, "-p", "hi", "--temp=-1"]);
    assert!(!ok && err.to_lowercase().contains("temperature"), "{err}");
    let (ok, _, err) = nomoat(&["logits", "-m", smol, "--ids", "999999"]);
    assert!(!ok && err.contains("vocabulary"), "{err}");
    let (ok, _, err) = nomoat(&["run", "-m", smol, "-p", "hi", "-c", "0"]);
    assert!(!ok && err.contains("context"), "{err}");
    // a GPU too small for the model: refused part-way with what the model needs
    let (ok, _, err) = nomoat(&["run", "-m", smol, "-p", "hi", "--max-gpu-memory", "40"]);
    assert!(!ok && err.contains("out of GPU memory loading the model: it needs") && err.contains("(92 MiB)") && err.contains("freed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The tiny llama test model re-written with `general.sampling.temp` = 0 added.
fn tiny_llama_with_greedy_hint(dir: &std::path::Path) -> std::path::PathBuf {
    use nomoat_runtime::gguf::{Gguf, GgufWriter};
    let src = format!("{}/../tests/data/tiny/llama-tiny.gguf", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(src).unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in &g.metadata {
        w.add_metadata(k.clone(), v.clone());
    }
    w.add_metadata("general.sampling.temp", 0.0f32);
    for t in &g.tensors {
        let r = g.tensor_data_range(t);
        w.add_tensor(t.name.clone(), &t.dims, t.ty, bytes[r.start as usize..r.end as usize].to_vec());
    }
    let out = dir.join("llama-tiny-greedy-hint.gguf");
    std::fs::write(&out, w.to_bytes()).unwrap();
    out
}

#[test]
fn the_models_own_sampling_values_are_defaults_that_flags_override() {
    let dir = std::env::temp_dir().join(format!("nomoat-cli-sampling-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let hinted = tiny_llama_with_greedy_hint(&dir);
    let hinted = hinted.to_str().unwrap();
    let plain = format!("{}/../tests/data/tiny/llama-tiny.gguf", env!("CARGO_MANIFEST_DIR"));
    let tokens = |model: &str, extra: &[&str]| -> (Vec<u64>, String) {
        let mut args = vec!["run", "-m", model, "-p", "Once upon a time", "-n", "12", "--json"];
        args.extend_from_slice(extra);
        let (ok, out, err) = nomoat(&args);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        (v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect(), err)
    };
    let (greedy, _) = tokens(&plain, &["--temp", "0"]);
    let (sampled, _) = tokens(&plain, &[]);
    // the tiny model's random weights give flat distributions: sampling at the default 0.8
    // differs from greedy, so the comparisons below tell which temperature was used
    assert_ne!(greedy, sampled, "the check needs sampled and greedy output to differ");
    let (hinted_default, _) = tokens(hinted, &[]);
    assert_eq!(hinted_default, greedy, "the model's general.sampling.temp = 0 is not the default");
    let (hinted_flag, _) = tokens(hinted, &["--temp", "0.8"]);
    assert_eq!(hinted_flag, sampled, "--temp does not override the model's value");
    // without --json the status line says where the temperature came from
    let (ok, _, err) = nomoat(&["run", "-m", hinted, "-p", "Once", "-n", "2"]);
    assert!(ok && err.contains("model's recommended temp 0"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn context_size_defaults_to_what_the_model_was_trained_for() {
    // the tiny model's training context is 256, below the 2048 default: the default shrinks to
    // it, and an explicit larger -c is lowered to it with a note naming both numbers (as
    // `nomoat serve` and the page lower theirs), giving the same text
    let tiny = format!("{}/../tests/data/tiny/llama-tiny.gguf", env!("CARGO_MANIFEST_DIR"));
    let (ok, plain, err) = nomoat(&["run", "-m", &tiny, "-p", "Once", "-n", "2", "--temp", "0"]);
    assert!(ok && !err.contains("note: -c"), "{err}");
    let (ok, lowered, err) = nomoat(&["run", "-m", &tiny, "-p", "Once", "-n", "2", "--temp", "0", "-c", "4096"]);
    assert!(ok && err.contains("-c 4096 is over the model's training context; using 256"), "{err}");
    assert_eq!(lowered, plain);
}

#[test]
fn bench_prints_its_table_and_measures_at_a_depth() {
    let tiny = format!("{}/../tests/data/tiny/llama-tiny.gguf", env!("CARGO_MANIFEST_DIR"));
    let (ok, out, err) = nomoat(&["bench", "-m", &tiny, "-p", "16", "-n", "8", "-d", "100", "-r", "1", "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let tests = v["tests"].as_array().unwrap();
    let names: Vec<&str> = tests.iter().map(|t| t["test"].as_str().unwrap()).collect();
    assert_eq!(names, ["pp16 @ d100", "tg8 @ d100"]);
    assert!(tests.iter().all(|t| t["tok_s_mean"].as_f64().unwrap() > 0.0), "{out}");
    assert!(v["ttft32_ms"].as_f64().unwrap() > 0.0 && v["decode_ceiling_tok_s"].as_f64().unwrap() > 0.0, "{out}");
    // the ceiling is six samples, three before and three after the timed runs, with their spread
    let samples = v["matvec_f32_gbs_samples"].as_array().unwrap();
    assert!(samples.len() == 6 && samples.iter().all(|g| g.as_f64().unwrap() > 0.0), "{out}");
    assert!(v["decode_ceiling_tok_s_std"].as_f64().unwrap() >= 0.0, "{out}");
    // the tiny model was trained on 256 tokens: a depth past that is refused, naming both
    let (ok, _, err) = nomoat(&["bench", "-m", &tiny, "-p", "16", "-n", "8", "-d", "300", "-r", "1"]);
    assert!(!ok && err.contains("300") && err.contains("256"), "{err}");
    // under a grammar: a constrained row, the mask time and the compile time
    let schema = format!("{}/../bench/schemas/nested.json", env!("CARGO_MANIFEST_DIR"));
    let (ok, out, err) = nomoat(&["bench", "-m", &tiny, "-p", "4", "-n", "12", "-r", "1", "--json-schema", &schema, "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
    let names: Vec<&str> = v["tests"].as_array().unwrap().iter().map(|t| t["test"].as_str().unwrap()).collect();
    assert_eq!(names, ["pp4", "tg12", "tg12 constrained"]);
    let c = &v["constrained"];
    assert!(c["mask_ms_per_token"].as_f64().unwrap() > 0.0 && c["compile_ms"].as_f64().unwrap() > 0.0 && c["forced_share"].as_f64().unwrap() > 0.0, "{out}");
}

/// `--json-schema`, `--regex` and `--grammar` (issue #18) on run and chat: sampled replies fit,
/// a grammar that cannot be used is refused with the reason, two at once are refused.
#[test]
fn run_and_chat_follow_a_grammar() {
    let smol = &smollm2();
    let dir = std::env::temp_dir().join(format!("nomoat-cli-grammar-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let schema = dir.join("person.json");
    std::fs::write(&schema, r#"{"type": "object", "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": false}"#).unwrap();
    let schema = schema.to_str().unwrap();
    for seed in ["1", "2"] {
        let (ok, out, err) = nomoat(&["run", "-m", smol, "-p", "A person as JSON:", "--json-schema", schema, "-n", "60", "--temp", "1", "--seed", seed, "--json"]);
        assert!(ok, "{err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["finish_reason"], "stop", "{out}");
        let person: Value = serde_json::from_str(v["text"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {out}"));
        let o = person.as_object().unwrap();
        assert!(o.len() == 2 && o["name"].as_str().is_some_and(|n| n.chars().count() <= 16) && o["age"].as_u64().is_some_and(|a| a <= 120), "{person}");
    }
    let (ok, out, err) = nomoat(&["run", "-m", smol, "-p", "Today's date is", "--regex", " [0-9]{4}-[0-9]{2}-[0-9]{2}", "-n", "20", "--temp", "1", "--json"]);
    assert!(ok, "{err}");
    let text = serde_json::from_str::<Value>(&out).unwrap()["text"].as_str().unwrap().to_string();
    let b = text.as_bytes();
    assert!(b.len() == 11 && b[5] == b'-' && b[8] == b'-' && text[1..].replace('-', "").bytes().all(|c| c.is_ascii_digit()), "{text:?}");
    // llama.cpp's GBNF too
    let gbnf = dir.join("answer.gbnf");
    std::fs::write(&gbnf, "root ::= (\"yes\" | \"no\") \".\"\n").unwrap();
    let (ok, out, err) = nomoat(&["run", "-m", smol, "-p", "Is water wet?", "--grammar", gbnf.to_str().unwrap(), "-n", "8", "--json"]);
    assert!(ok, "{err}");
    let text = serde_json::from_str::<Value>(&out).unwrap()["text"].as_str().unwrap().to_string();
    assert!(text == "yes." || text == "no.", "{text:?}");
    let lark = dir.join("answer.lark");
    std::fs::write(&lark, "start: \"yes\" | \"no\"\n").unwrap();
    let out = chat(&["-m", smol, "--grammar", lark.to_str().unwrap(), "-n", "8"], b"Is the sky blue?\nIs fire cold?\n/exit\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let replies: Vec<&str> = stdout.split("> ").skip(1).map(str::trim).filter(|r| !r.is_empty()).collect();
    assert!(out.status.success() && replies.len() == 2 && replies.iter().all(|r| *r == "yes" || *r == "no"), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let (ok, _, err) = nomoat(&["run", "-m", smol, "-p", "x", "--regex", "("]);
    assert!(!ok && err.contains("cannot be used") && err.contains("unclosed group"), "{err}");
    let (ok, _, err) = nomoat(&["run", "-m", smol, "-p", "x", "--regex", "a", "--json-schema", schema]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    let (ok, _, err) = nomoat(&["run", "-m", smol, "-p", "x", "--json-schema", "/nonexistent/schema.json"]);
    assert!(!ok && err.contains("/nonexistent/schema.json"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A chat reply that runs to `-n` says so (a loop would otherwise fill the limit unnoticed).
#[test]
fn a_chat_reply_cut_at_the_limit_says_so() {
    let out = chat(&["-m", &smollm2(), "-n", "3", "--temp", "0"], b"Tell me a long story about a dragon.\n");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("3 generated") && err.contains("cut at the 3-token limit (-n)"), "{err}");
}
