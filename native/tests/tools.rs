//! Tool calling through `nomoat serve` (issue #18) on Qwen2.5-Coder 0.5B Instruct, whose chat
//! template renders tools: the prompt equals Hugging Face's rendering (jinja2) of the same
//! request, then the official `openai` client drives calls, streaming, named and single calls,
//! a round trip with the tool's result, and a 400 (tests/server/tools_test.py).

#[allow(dead_code)] // the other server tests use the rest
mod common;

use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn qwen() -> PathBuf {
    let cache = std::env::var_os("NOMOAT_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/nomoat"));
    let p = cache.join("models/qwen2.5-coder-0.5b-instruct.gguf");
    assert!(p.exists(), "test model {} missing: run scripts/fetch-models.sh", p.display());
    p
}

#[test]
fn tool_calls_through_the_server() {
    let t = Instant::now();
    let model = qwen();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nomoat"));
    cmd.args(["serve", "--port", "0", "-c", "2048", "--no-www", "-m"])
        .arg(&model)
        .env("XDG_RUNTIME_DIR", std::env::var_os("XDG_RUNTIME_DIR").unwrap_or_else(|| "/tmp".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let (mut child, addr, log) = common::spawn_listening(cmd);
    let fail = |what: String| -> ! {
        panic!("{what}\nserver log:\n{}", log.lock().unwrap());
    };

    // the prompt of a request with tools and a tool round trip is the template's own
    // rendering, as jinja2 gives it
    let weather = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    let body = json!({
        "model": "m", "max_tokens": 1, "temperature": 0,
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now>", "parameters": weather}}],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"celsius\": -3}"}
        ]
    });
    let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(300)).build();
    let r: Value = match agent.post(&format!("http://{addr}/v1/chat/completions")).set("Content-Type", "application/json").send_string(&body.to_string()) {
        Ok(r) => serde_json::from_str(&r.into_string().unwrap()).unwrap(),
        Err(e) => fail(format!("{e}")),
    };
    let len = std::fs::metadata(&model).unwrap().len();
    let gguf = Gguf::read_from(std::fs::File::open(&model).unwrap(), len).unwrap();
    let template = gguf.get_str("tokenizer.chat_template").unwrap().to_string();
    let script =
        "import json, sys, jinja2\nt, req = json.load(sys.stdin)\nenv = jinja2.Environment()\nenv.filters['tojson'] = lambda x, **k: json.dumps(x, ensure_ascii=False)\n\
for m in req['messages']:\n    for c in m.get('tool_calls') or []:\n        c['function']['arguments'] = json.loads(c['function']['arguments'])\n\
sys.stdout.write(env.from_string(t).render(messages=req['messages'], tools=req['tools'], add_generation_prompt=True))";
    let mut py = Command::new("python3").args(["-c", script]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    use std::io::Write;
    py.stdin.take().unwrap().write_all(json!([template, body]).to_string().as_bytes()).unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(out.status.success(), "jinja2 rendering failed");
    let rendered = String::from_utf8(out.stdout).unwrap();
    assert!(rendered.contains("<tool_response>") && rendered.contains("Weather <now>"), "{rendered}");
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let want = tok.encode(&rendered, false, true).unwrap().len();
    assert_eq!(r["usage"]["prompt_tokens"], want, "the server's prompt differs from jinja2's rendering:\n{rendered}\n{r}");
    eprintln!("[tools] prompt with a tool round trip: {want} tokens, as jinja2 renders it ({:.1} s)", t.elapsed().as_secs_f64());

    let t = Instant::now();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/server/tools_test.py");
    let out = Command::new("python3").arg(&script).arg(format!("http://{addr}/v1")).arg("m").output().expect("running python3");
    if !out.status.success() {
        fail(format!("tools_test.py failed\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
    }
    eprint!("[tools] {}", String::from_utf8_lossy(&out.stdout));
    eprintln!("[tools] openai client: {:.1} s", t.elapsed().as_secs_f64());
    let _ = child.kill();
    let _ = child.wait();
}
