//! The README's first command, as a new user runs it: `nomoat` chats with the default model at
//! its recommended sampling. Asked "What is the capital of France?" under 10 seeds, every reply
//! is English and names Paris (the old default, SmolLM2 135M, answered in French about half the
//! time).

use std::io::Write;
use std::process::{Command, Stdio};

#[test]
fn the_default_model_answers_the_first_question_in_english() {
    for seed in 1..=10 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_nomoat"))
            .args(["chat", "--seed", &seed.to_string()])
            .env("XDG_RUNTIME_DIR", std::env::var_os("XDG_RUNTIME_DIR").unwrap_or_else(|| "/tmp".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"What is the capital of France?\n").unwrap();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "seed {seed}: {stderr}");
        assert!(stderr.contains("qwen2.5-coder-0.5b-instruct"), "seed {seed}: not the default model: {stderr}");
        let reply = stdout.split("> ").nth(1).unwrap_or("").trim();
        eprintln!("seed {seed}: {reply}");
        let words: Vec<String> = reply.split(|c: char| !c.is_alphabetic()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect();
        let has = |w: &str| words.iter().any(|x| x == w);
        assert!(has("paris"), "seed {seed}: no Paris in {reply:?}");
        assert!((has("the") || has("is")) && !has("est") && !has("la") && !has("le"), "seed {seed}: not English: {reply:?}");
    }
}
