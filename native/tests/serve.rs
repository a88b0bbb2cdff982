//! `nomoat serve` end to end: starts the server on a free loopback port with the default test
//! model and drives it over HTTP (ureq and raw sockets), then with the official `openai`
//! Python client (tests/server/openai_client_test.py).
//!
//! One server serves every step, in order, so that the steps share its KV cache (on lavapipe a
//! fresh prompt costs seconds, a prompt sharing all but its last token with the previous one
//! almost nothing) and so that timing checks are not disturbed by other tests. Generations are
//! short: the model decodes a handful of tokens per second on a CPU Vulkan device.

mod common;

use common::Server;

use common::{raw_http, status_of};

use nomoat_runtime::chat::{ChatTemplate, Message};
use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const KEY: &str = "test-key-123";

/// The tests take turns: each starts its own server, and two models decoding at once on a
/// 2-core CPU device would make the timing checks meaningless.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
const N_CTX: usize = 1024;

impl Server {
    /// Starts `nomoat serve --port 0 ARGS` and waits for it to listen and answer /health.
    fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let t = Instant::now();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nomoat"));
        cmd.args(["serve", "--port", "0", "-c", &N_CTX.to_string()]);
        // SmolLM2 unless a test names its model (the default model is the larger chat model)
        if !args.contains(&"-m") {
            cmd.arg("-m").arg(common::smollm2());
        }
        cmd.args(args)
            .envs(env.iter().copied())
            .env("XDG_RUNTIME_DIR", std::env::var_os("XDG_RUNTIME_DIR").unwrap_or_else(|| "/tmp".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (child, addr, log) = common::spawn_listening(cmd);
        let s = Server { child, addr, log };
        let (status, body) = s.get("/health", None);
        assert_eq!(status, 200, "{body}");
        eprintln!("[serve test] server up at {} in {:.1} s", s.addr, t.elapsed().as_secs_f64());
        s
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new().timeout(Duration::from_secs(240)).build()
    }

    fn finish(r: Result<ureq::Response, ureq::Error>) -> (u16, String) {
        match r {
            Ok(resp) => (resp.status(), resp.into_string().unwrap()),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
            Err(e) => panic!("request failed: {e}"),
        }
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, String) {
        let mut r = Self::agent().get(&self.url(path));
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        Self::finish(r.call())
    }

    fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
        let mut r = Self::agent().post(&self.url(path)).set("Content-Type", "application/json");
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        Self::finish(r.send_string(body))
    }

    /// POST with the key; a 200 JSON answer.
    fn post(&self, path: &str, body: &Value) -> Value {
        let (status, text) = self.post_raw(path, &body.to_string(), Some(KEY));
        assert_eq!(status, 200, "{path} {body}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
    }

    /// A streamed POST: the `data:` payloads before `[DONE]` (which must come last).
    fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let resp = Self::agent()
            .post(&self.url(path))
            .set("Authorization", &format!("Bearer {KEY}"))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap_or_else(|e| panic!("{path} {body}: {e}"));
        assert_eq!(resp.status(), 200);
        assert!(resp.header("content-type").unwrap_or("").starts_with("text/event-stream"), "{:?}", resp.header("content-type"));
        read_sse(BufReader::new(resp.into_reader()))
    }
}

/// Reads SSE `data:` lines up to `[DONE]`, ignoring comments (keep-alives) and blank lines.
fn read_sse(r: impl BufRead) -> Vec<Value> {
    let mut out = Vec::new();
    for line in r.lines() {
        let line = line.unwrap();
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let data = line.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data line: {line:?}"));
        if data == "[DONE]" {
            return out;
        }
        out.push(serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}")));
    }
    panic!("stream ended without data: [DONE] after {out:?}");
}

/// Checks the chat chunk sequence (role first, content pieces, finish last) and returns the
/// text and the finish reason.
fn chat_chunks(chunks: &[Value]) -> (String, String) {
    assert!(chunks.len() >= 2, "{chunks:?}");
    let id = &chunks[0]["id"];
    assert!(id.as_str().unwrap().starts_with("chatcmpl-"));
    for c in chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert_eq!(&c["id"], id);
        assert!(c["created"].is_u64());
    }
    let with_choices: Vec<&Value> = chunks.iter().filter(|c| !c["choices"].as_array().unwrap().is_empty()).collect();
    assert_eq!(with_choices[0]["choices"][0]["delta"]["role"], "assistant", "{}", with_choices[0]);
    let last = with_choices.last().unwrap();
    let finish = last["choices"][0]["finish_reason"].as_str().unwrap_or_else(|| panic!("no finish_reason in {last}")).to_string();
    assert_eq!(last["choices"][0]["delta"], json!({}));
    let mut text = String::new();
    for c in &with_choices[..with_choices.len() - 1] {
        assert!(c["choices"][0]["finish_reason"].is_null(), "{c}");
        assert_eq!(c["choices"][0]["index"], 0);
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
    }
    (text, finish)
}

fn chat_body(messages: &Value, extra: Value) -> Value {
    let mut b = json!({"model": "whatever", "messages": messages});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn content(r: &Value) -> String {
    assert_eq!(r["object"], "chat.completion", "{r}");
    assert_eq!(r["choices"][0]["message"]["role"], "assistant", "{r}");
    r["choices"][0]["message"]["content"].as_str().unwrap().to_string()
}

fn check_error(status: u16, body: &str, want_status: u16, what: &str) -> Value {
    assert_eq!(status, want_status, "{what}: {body}");
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: error body is not JSON ({e}): {body}"));
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {v}");
    assert!(e["type"].is_string(), "{what}: {v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{what}: {v}");
    e.clone()
}

/// The rendered prompt's token count, computed here from the GGUF as the server should.
fn rendered_tokens(messages: &[Message]) -> usize {
    let path = common::smollm2();
    let mut f = std::fs::File::open(&path).unwrap();
    let len = f.metadata().unwrap().len();
    let g = Gguf::read_from(&mut f, len).unwrap();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let tmpl = ChatTemplate::from_gguf(&g).unwrap().unwrap();
    tok.encode(&tmpl.render(messages, true).unwrap(), false, true).unwrap().len()
}

fn step(name: &str, t: Instant) {
    eprintln!("[serve test] {name}: {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn serve_end_to_end() {
    let _serial = serial();
    let _ = common::smollm2();
    let all = Instant::now();
    let s = Server::start(&["--api-key", KEY]);

    // ---- models
    let t = Instant::now();
    let (status, body) = s.get("/v1/models", Some(KEY));
    assert_eq!(status, 200, "{body}");
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "SmolLM2-135M-Instruct.Q4_1", "{models}");
    assert_eq!(models["data"][0]["object"], "model");
    let (status, _) = s.get("/health", None);
    assert_eq!(status, 200, "/health needs no key");
    step("health and models", t);

    // ---- non-streaming chat (greedy) and its usage
    let t = Instant::now();
    let q1 = json!([{"role": "user", "content": "What is the capital of France?"}]);
    let r = s.post("/v1/chat/completions", &chat_body(&q1, json!({"max_tokens": 10, "temperature": 0})));
    let greedy = content(&r);
    assert!(!greedy.trim().is_empty(), "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(r["model"], "SmolLM2-135M-Instruct.Q4_1");
    let finish = r["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length", "{r}");
    let u = &r["usage"];
    let want_prompt = rendered_tokens(&[Message::user("What is the capital of France?")]);
    assert_eq!(u["prompt_tokens"], want_prompt, "{r}");
    let completion = u["completion_tokens"].as_u64().unwrap();
    assert!((1..=10).contains(&completion), "{r}");
    assert_eq!(u["total_tokens"].as_u64().unwrap(), want_prompt as u64 + completion);
    if finish == "length" {
        assert_eq!(completion, 10);
    }
    step("chat, not streamed", t);

    // ---- the same, streamed: the same text (greedy), chunk shapes
    let t = Instant::now();
    let chunks = s.stream("/v1/chat/completions", &chat_body(&q1, json!({"max_tokens": 10, "temperature": 0, "stream": true})));
    let (text, sfinish) = chat_chunks(&chunks);
    assert_eq!(text, greedy);
    assert_eq!(sfinish, finish);
    assert!(chunks.iter().all(|c| c.get("usage").is_none()), "usage only with stream_options.include_usage");
    // with include_usage: a last chunk without choices, holding the usage
    let chunks =
        s.stream("/v1/chat/completions", &chat_body(&q1, json!({"max_tokens": 10, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"]["prompt_tokens"], want_prompt);
    assert_eq!(last["usage"]["completion_tokens"], completion);
    assert_eq!(chat_chunks(&chunks).0, greedy);
    step("chat, streamed (twice)", t);

    // ---- stop strings: cut the greedy answer at its third word
    let t = Instant::now();
    let cut = greedy.match_indices(' ').nth(1).map(|(i, _)| i).expect("the greedy answer has three words");
    let stop_word = greedy[cut..].split_whitespace().next().unwrap();
    let stop = format!(" {stop_word}");
    let pos = greedy.find(&stop).unwrap();
    let r = s.post("/v1/chat/completions", &chat_body(&q1, json!({"max_tokens": 10, "temperature": 0, "stop": stop})));
    assert_eq!(content(&r), greedy[..pos], "stop {stop:?} in {greedy:?}");
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    let chunks = s.stream("/v1/chat/completions", &chat_body(&q1, json!({"max_tokens": 10, "temperature": 0, "stop": ["never seen", stop], "stream": true})));
    let (text, sfinish) = chat_chunks(&chunks);
    assert_eq!(text, greedy[..pos]);
    assert_eq!(sfinish, "stop");
    step("stop strings", t);

    // ---- seeds: same seed, same text; other seeds differ
    let t = Instant::now();
    let q2 = json!([{"role": "system", "content": "You are a creative writer."}, {"role": "user", "content": "Write one sentence about a cat."}]);
    let sampled = |seed: u64| content(&s.post("/v1/chat/completions", &chat_body(&q2, json!({"max_tokens": 8, "temperature": 0.8, "seed": seed}))));
    let a = sampled(42);
    let b = sampled(42);
    assert_eq!(a, b, "the same seed must give the same text");
    let others = [sampled(7), sampled(12345)];
    assert!(others.iter().any(|o| *o != a), "three seeds gave the same text {a:?}");
    step("seeds", t);

    // ---- completions (raw prompt)
    let t = Instant::now();
    let r = s.post("/v1/completions", &json!({"model": "x", "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0}));
    assert_eq!(r["object"], "text_completion", "{r}");
    assert!(r["id"].as_str().unwrap().starts_with("cmpl-"));
    let ctext = r["choices"][0]["text"].as_str().unwrap().to_string();
    assert!(r["usage"]["completion_tokens"].as_u64().unwrap() <= 6);
    let chunks = s.stream("/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "stream": true}));
    assert!(chunks.iter().all(|c| c["object"] == "text_completion"));
    let streamed: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(streamed, ctext);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], r["choices"][0]["finish_reason"]);
    step("completions", t);

    // ---- 8 concurrent streaming clients (queued one after another by the engine)
    let t = Instant::now();
    let results: Vec<(String, String)> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..8u64)
            .map(|i| {
                let s = &s;
                let q2 = &q2;
                sc.spawn(move || {
                    chat_chunks(&s.stream("/v1/chat/completions", &chat_body(q2, json!({"max_tokens": 8, "temperature": 0.8, "seed": 1000 + i, "stream": true}))))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a concurrent client failed")).collect()
    });
    for (text, finish) in &results {
        assert!(finish == "stop" || finish == "length");
        assert!(!text.is_empty() || finish == "stop");
    }
    step("8 concurrent streams", t);

    // ---- a streaming client that leaves mid-stream frees the engine at once
    let t = Instant::now();
    {
        let body = chat_body(&q1, json!({"max_tokens": 400, "temperature": 0.9, "seed": 5, "stream": true, "stop": []})).to_string();
        let mut sock = TcpStream::connect(&s.addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(
            sock,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            s.addr,
            body.len()
        )
        .unwrap();
        // read until a few content chunks have come
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while seen.matches("\"content\"").count() < 4 {
            let n = sock.read(&mut buf).unwrap();
            assert!(n > 0, "server closed the stream early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    } // dropped: the connection closes
    let t2 = Instant::now();
    let r = s.post("/v1/chat/completions", &chat_body(&q1, json!({"max_tokens": 4, "temperature": 0})));
    assert!(!content(&r).is_empty());
    let waited = t2.elapsed();
    // 400 tokens would take a minute or more here; the next request must not wait for them
    assert!(waited < Duration::from_secs(40), "the request after a disconnect took {waited:?}");
    let mut log = s.log.lock().unwrap().clone();
    for _ in 0..20 {
        if log.lines().any(|l| l.ends_with("cancelled")) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        log = s.log.lock().unwrap().clone();
    }
    let cancelled: Vec<&str> = log.lines().filter(|l| l.ends_with("cancelled")).collect();
    assert_eq!(cancelled.len(), 1, "one job cancelled, in the server log:\n{log}");
    let generated: usize = cancelled[0].split(", ").nth(1).and_then(|p| p.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap();
    assert!(generated < 100, "the abandoned job went on for {generated} tokens: {}", cancelled[0]);
    step(&format!("disconnect mid-stream (next request took {:.1} s)", waited.as_secs_f64()), t);

    // ---- malformed requests: each a 4xx with an error object, and the server keeps serving
    let t = Instant::now();
    let chat = "/v1/chat/completions";
    let ok_msgs = r#""messages": [{"role": "user", "content": "hi"}]"#;
    let cases: Vec<(&str, &str, String, u16, Option<&str>)> = vec![
        ("invalid JSON", chat, r#"{"messages": ["#.into(), 400, None),
        ("not an object", chat, "[1, 2]".into(), 400, None),
        ("empty body", chat, "".into(), 400, None),
        ("temperature a string", chat, format!(r#"{{{ok_msgs}, "temperature": "hot"}}"#), 400, Some("temperature")),
        ("messages not a list", chat, r#"{"messages": "hi"}"#.into(), 400, Some("messages")),
        ("messages missing", chat, r#"{"max_tokens": 3}"#.into(), 400, Some("messages")),
        ("message content a number", chat, r#"{"messages": [{"role": "user", "content": 5}]}"#.into(), 400, Some("messages[0].content")),
        ("max_tokens negative", chat, format!(r#"{{{ok_msgs}, "max_tokens": -1}}"#), 400, Some("max_tokens")),
        ("max_tokens a string", chat, format!(r#"{{{ok_msgs}, "max_tokens": "8"}}"#), 400, Some("max_tokens")),
        ("n = 2", chat, format!(r#"{{{ok_msgs}, "n": 2}}"#), 400, Some("n")),
        ("top_p 0", chat, format!(r#"{{{ok_msgs}, "top_p": 0}}"#), 400, Some("top_p")),
        ("temperature negative", chat, format!(r#"{{{ok_msgs}, "temperature": -0.5}}"#), 400, Some("temperature")),
        ("stop a number", chat, format!(r#"{{{ok_msgs}, "stop": 3}}"#), 400, Some("stop")),
        ("stream a string", chat, format!(r#"{{{ok_msgs}, "stream": "yes"}}"#), 400, Some("stream")),
        ("completions without prompt", "/v1/completions", r#"{"max_tokens": 3}"#.into(), 400, Some("prompt")),
        ("prompt token out of range", "/v1/completions", r#"{"prompt": [99999999]}"#.into(), 400, Some("prompt")),
        ("unknown route", "/v1/nothing/here", "{}".into(), 404, None),
    ];
    assert!(cases.len() >= 10);
    for (what, path, body, want, param) in &cases {
        let (status, text) = s.post_raw(path, body, Some(KEY));
        let e = check_error(status, &text, *want, what);
        if let Some(p) = param {
            assert_eq!(e["param"], *p, "{what}: {e}");
        }
    }
    // the prompt longer than the context: 400 with the numbers
    let long = "hello ".repeat(N_CTX + 200);
    let (status, text) = s.post_raw("/v1/completions", &json!({"prompt": long, "max_tokens": 2}).to_string(), Some(KEY));
    let e = check_error(status, &text, 400, "prompt too long");
    assert!(e["message"].as_str().unwrap().contains(&N_CTX.to_string()), "{e}");
    assert_eq!(e["code"], "context_length_exceeded");
    // authentication
    let (status, text) = s.post_raw(chat, &format!("{{{ok_msgs}}}"), None);
    check_error(status, &text, 401, "no key");
    let (status, text) = s.post_raw(chat, &format!("{{{ok_msgs}}}"), Some("wrong-key"));
    check_error(status, &text, 401, "wrong key");
    let (status, text) = s.get("/v1/models", Some("test-key-12"));
    check_error(status, &text, 401, "key prefix");
    // wrong method, unknown model
    let (status, text) = s.get(chat, Some(KEY));
    check_error(status, &text, 405, "GET on a POST route");
    let (status, text) = s.get("/v1/models/gpt-4", Some(KEY));
    check_error(status, &text, 404, "unknown model");
    // a body over the 1 MiB limit: 413 from the Content-Length alone
    {
        let mut sock = TcpStream::connect(&s.addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            sock,
            "POST {chat} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            2 << 20
        )
        .unwrap();
        let mut resp = String::new();
        let _ = sock.read_to_string(&mut resp);
        assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
        let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
        assert!(body.contains("\"error\""), "{resp}");
    }
    // and a plain request afterwards still works
    let r = s.post(chat, &chat_body(&q1, json!({"max_tokens": 3, "temperature": 0})));
    assert!(r["choices"][0]["message"]["content"].is_string());
    let (status, _) = s.get("/health", None);
    assert_eq!(status, 200);
    step(&format!("{} malformed requests, then a good one", cases.len() + 8), t);

    // ---- the official openai Python client
    let t = Instant::now();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/server/openai_client_test.py");
    let has_openai = Command::new("python3").args(["-c", "import openai"]).status().is_ok_and(|st| st.success());
    assert!(has_openai, "the openai Python package is missing: pip install openai (scripts/setup.sh does)");
    let out = Command::new("python3").arg(&script).arg(s.url("/v1")).arg(KEY).arg("SmolLM2-135M-Instruct.Q4_1").output().expect("running python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai client test failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}", s.log.lock().unwrap());
    eprint!("[serve test] {stdout}");
    step("openai Python client", t);

    eprintln!("[serve test] all steps: {:.1} s", all.elapsed().as_secs_f64());
}

/// A copy of the test model whose chat template is hidden: the key renamed in place (same
/// length, so the file stays valid), as a base model without a template would be.
fn model_without_template(dir: &std::path::Path) -> PathBuf {
    let mut bytes = std::fs::read(common::smollm2()).unwrap();
    let key = b"tokenizer.chat_template";
    let head = bytes.len().min(16 << 20);
    let pos = bytes[..head].windows(key.len()).position(|w| w == key).expect("the test model has a chat template");
    assert_eq!(u64::from_le_bytes(bytes[pos - 8..pos].try_into().unwrap()), key.len() as u64, "a GGUF key");
    bytes[pos..pos + key.len()].copy_from_slice(b"tokenizer.chat_templatX");
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("no-template.gguf");
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A second server, on a copy of the model without a chat template, without an API key, with
/// --max-queue 1: chat requests are a 400 that says why; with one request running and one
/// waiting, the next is a 503; abandoned requests free the engine.
#[test]
fn serve_no_template_and_queue_full() {
    let _serial = serial();
    let t = Instant::now();
    let dir = std::env::temp_dir().join(format!("nomoat-serve-test-{}", std::process::id()));
    let model = model_without_template(&dir);
    let s = Server::start(&["-m", model.to_str().unwrap(), "--max-queue", "1", "--max-tokens-limit", "300"]);
    let _ = std::fs::remove_dir_all(&dir); // the server has read it
    let (_, models) = s.get("/v1/models", None);
    assert!(models.contains("\"no-template\""), "{models}");
    let (status, text) = s.post_raw("/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "hi"}]}"#, None);
    let e = check_error(status, &text, 400, "chat without a template");
    assert_eq!(e["code"], "no_chat_template");
    assert!(e["message"].as_str().unwrap().contains("/v1/completions"), "{e}");
    step("chat without a template", t);

    let t = Instant::now();
    let body = json!({"prompt": "One, two, three, four,", "max_tokens": 1000, "temperature": 0.9, "seed": 1, "stream": true}).to_string();
    let open = |body: &str| {
        let mut sock = TcpStream::connect(&s.addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        write!(sock, "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        sock
    };
    let read_until = |sock: &mut TcpStream, what: &str| {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while !seen.contains(what) {
            let n = sock.read(&mut buf).unwrap();
            assert!(n > 0, "closed before {what:?}: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        seen
    };
    // the first is running once its text arrives; the second then waits in the queue
    let mut first = open(&body);
    read_until(&mut first, "\"text\":\"");
    let mut second = open(&body);
    read_until(&mut second, "HTTP/1.1 200");
    let (status, text) = s.post_raw("/v1/completions", &body, None);
    let e = check_error(status, &text, 503, "queue full");
    assert_eq!(e["code"], "queue_full");
    drop(first);
    drop(second);
    // both abandoned jobs go away quickly (the running one stops, the waiting one is skipped),
    // and the next request is served
    let freed = Instant::now();
    loop {
        let (_, h) = s.get("/health", None);
        let h: Value = serde_json::from_str(&h).unwrap();
        if h["queued"] == 0 && h["busy"] == false {
            break;
        }
        assert!(freed.elapsed() < Duration::from_secs(30), "the abandoned requests still hold the engine: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("[serve test] engine free {:.1} s after the clients left", freed.elapsed().as_secs_f64());
    let r = s.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0}));
    assert_eq!(r["object"], "text_completion");
    step("queue full", t);
}

/// Adapters loaded at start are listed by GET /v1/adapters and chosen per request: with the
/// adapter at scale 0 the completion equals the base model's; with it at a large scale the
/// text changes; an unknown adapter name is a 400; requests without the field use all of them.
#[test]
fn serve_lora_adapters_per_request() {
    let _lock = serial();
    let lora = format!("{}/../tests/data/lora/SmolLM2-135M-Instruct.Q4_1.attn_r8.gguf", env!("CARGO_MANIFEST_DIR"));
    let s = Server::start(&["--api-key", KEY, "--lora", &format!("{lora}:1")]);
    let (status, body) = s.get("/v1/adapters", Some(KEY));
    assert_eq!(status, 200, "{body}");
    let list: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list["data"][0]["name"], "SmolLM2-135M-Instruct.Q4_1.attn_r8");
    assert_eq!(list["data"][0]["rank"], 8);
    let body = |adapters: Value| {
        let mut b = json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0});
        if !adapters.is_null() {
            b["adapters"] = adapters;
        }
        b
    };
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let base = text(&s.post("/v1/completions", &body(json!([]))));
    let zero = text(&s.post("/v1/completions", &body(json!([{"name": "SmolLM2-135M-Instruct.Q4_1.attn_r8", "scale": 0.0}]))));
    assert_eq!(zero, base, "scale 0 must equal the base model");
    let strong = text(&s.post("/v1/completions", &body(json!([{"name": "SmolLM2-135M-Instruct.Q4_1.attn_r8", "scale": 4.0}]))));
    assert_ne!(strong, base, "a strong adapter should change the continuation");
    let default = text(&s.post("/v1/completions", &body(Value::Null)));
    let one = text(&s.post("/v1/completions", &body(json!([{"name": "SmolLM2-135M-Instruct.Q4_1.attn_r8", "scale": 1.0}]))));
    assert_eq!(default, one, "no 'adapters' field means every loaded adapter at its start-up scale");
    let (status, err) = s.post_raw("/v1/completions", &body(json!([{"name": "nope"}])).to_string(), Some(KEY));
    check_error(status, &err, 400, "unknown adapter");
    let (status, err) = s.post_raw("/v1/completions", &body(json!("x")).to_string(), Some(KEY));
    check_error(status, &err, 400, "adapters not a list");
    assert_eq!(text(&s.post("/v1/completions", &body(json!([])))), base, "the server still serves the base model");
}

/// Every architecture, served: a server on each tiny model of tests/data/tiny answers a greedy
/// completion, streamed and not, with the CLI's text for the same prompt (tests/tests/
/// tiny_models.rs holds the runtime to llama.cpp's logits on these models).
#[test]
fn serve_every_architecture() {
    let _lock = serial();
    let tiny = |f: &str| format!("{}/../tests/data/tiny/{f}", env!("CARGO_MANIFEST_DIR"));
    for file in
        ["llama-tiny.gguf", "qwen2-tiny.gguf", "qwen3-tiny.gguf", "phi3-tiny.gguf", "llama3-tiny.gguf", "gemma3-tiny.gguf", "gemma3-swa-tiny.gguf", "smollm3-tiny.gguf"]
    {
        let model = tiny(file);
        let prompt = "Once upon a time, far away";
        let out = Command::new(env!("CARGO_BIN_EXE_nomoat"))
            .args(["run", "-m", &model, "-p", prompt, "-n", "8", "--temp", "0", "--json"])
            .env("XDG_RUNTIME_DIR", "/tmp")
            .output()
            .unwrap();
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
        let s = Server::start(&["-m", &model, "--api-key", KEY]);
        let body = json!({"prompt": prompt, "max_tokens": 8, "temperature": 0});
        let r = s.post("/v1/completions", &body);
        let text = r["choices"][0]["text"].as_str().unwrap().to_string();
        assert_eq!(text, cli["text"].as_str().unwrap(), "{file}: server and CLI differ");
        assert_eq!(r["usage"]["completion_tokens"].as_u64(), Some(cli["tokens"].as_array().unwrap().len() as u64), "{file}: {r}");
        let mut streamed_body = body.clone();
        streamed_body["stream"] = json!(true);
        let chunks = s.stream("/v1/completions", &streamed_body);
        let streamed: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
        assert_eq!(streamed, text, "{file}: streamed and returned completions differ");
    }
}

/// The resident memory of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse().ok()).unwrap();
    kb * 1024
}

/// The page and the model file are served, nothing else on disk; no CORS headers for origins
/// not named; slow clients are cut off; max_tokens is capped.
#[test]
fn serve_static_files_cors_timeouts_and_limits() {
    let _serial = serial();
    let www = format!("{}/../www", env!("CARGO_MANIFEST_DIR"));
    let s = Server::start(&[
        "--api-key",
        KEY,
        "--www",
        &www,
        "--cors-origin",
        "http://allowed.example",
        "--header-timeout",
        "2",
        "--body-timeout",
        "2",
        "--max-tokens-limit",
        "3",
    ]);
    let model = common::smollm2();
    let model_name = model.file_name().unwrap().to_str().unwrap().to_string();

    let page = raw_http(&s.addr, b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", Duration::from_secs(10));
    assert_eq!(status_of(&page), 200, "{page}");
    assert!(page.contains("<title>nomoat"), "the chat page: {page}");
    // the loaded model, with Range support (the page streams it)
    let head = raw_http(
        &s.addr,
        format!("GET /models/{model_name} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\nRange: bytes=0-3\r\nConnection: close\r\n\r\n").as_bytes(),
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&head), 206, "{head}");
    assert!(head.ends_with("GGUF"), "{head}");
    // a catalog model in the cache (set-up fetched Gemma), for the page's model list: behind the
    // key like the loaded one
    let gemma = "/models/gemma-3-270m-q4_k_m.gguf";
    let ask = |key: &str| {
        raw_http(&s.addr, format!("GET {gemma} HTTP/1.1\r\nHost: localhost\r\n{key}Range: bytes=0-3\r\nConnection: close\r\n\r\n").as_bytes(), Duration::from_secs(10))
    };
    let r = ask(&format!("Authorization: Bearer {KEY}\r\n"));
    assert!(status_of(&r) == 206 && r.ends_with("GGUF"), "{r}");
    assert_eq!(status_of(&ask("")), 401);
    // nothing outside www/ and those files, however the path is spelled
    for path in [
        "/../Cargo.toml",
        "/%2e%2e/Cargo.toml",
        "/%2E%2E/%2E%2E/Cargo.toml",
        "/pkg/../../Cargo.toml",
        "/..%2fCargo.toml",
        "/%2e%2e%2f%2e%2e%2fCargo.toml",
        "//etc/passwd",
        "/..\\Cargo.toml",
        "/models/../../Cargo.toml",
        "/models/%2e%2e%2fCargo.toml",
        "/models/other.gguf",
        "/.git/config",
        "/%00/etc/passwd",
    ] {
        let r = raw_http(&s.addr, format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(), Duration::from_secs(10));
        let status = status_of(&r);
        assert!((400..500).contains(&status), "{path}: {status}\n{r}");
        assert!(!r.contains("[package]") && !r.contains("root:") && !r.contains("[core]"), "{path} leaked a file: {r}");
    }

    // CORS: only the named origin gets the headers (preflight and the request itself)
    for (origin, allowed) in [("http://allowed.example", true), ("http://evil.example", false)] {
        let pre = raw_http(
            &s.addr,
            format!("OPTIONS /v1/completions HTTP/1.1\r\nHost: localhost\r\nOrigin: {origin}\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, content-type\r\nConnection: close\r\n\r\n").as_bytes(),
            Duration::from_secs(10),
        );
        let get =
            raw_http(&s.addr, format!("GET /health HTTP/1.1\r\nHost: localhost\r\nOrigin: {origin}\r\nConnection: close\r\n\r\n").as_bytes(), Duration::from_secs(10));
        for r in [&pre, &get] {
            let has = r.to_ascii_lowercase().contains(&format!("access-control-allow-origin: {origin}"));
            assert_eq!(has, allowed, "{origin}: {r}");
            assert!(!r.to_ascii_lowercase().contains("access-control-allow-origin: *"), "{r}");
        }
    }

    // a client that never finishes its headers, or sends nothing, is disconnected
    for (what, req) in [("partial headers", &b"GET /health HTTP/1.1\r\nHost: localhost\r\n"[..]), ("idle", &b""[..])] {
        let t = Instant::now();
        let r = raw_http(&s.addr, req, Duration::from_secs(20));
        let took = t.elapsed();
        assert!(took < Duration::from_secs(10), "{what}: connection held {took:?}: {r}");
        assert!(r.is_empty() || status_of(&r) == 408, "{what}: {r}");
    }
    // a body slower than --body-timeout is a 408
    let t = Instant::now();
    let r = raw_http(
        &s.addr,
        format!("POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"prompt\":")
            .as_bytes(),
        Duration::from_secs(20),
    );
    assert!(t.elapsed() < Duration::from_secs(10), "slow body held {:?}: {r}", t.elapsed());
    assert_eq!(status_of(&r), 408, "{r}");

    // max_tokens is lowered to --max-tokens-limit
    let v = s.post("/v1/completions", &json!({"prompt": "One, two, three, four,", "max_tokens": 100, "temperature": 0}));
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    // the server still answers normally
    let (status, _) = s.get("/health", None);
    assert_eq!(status, 200);
}

/// 200 requests from 16 clients against a queue of 4: every answer is a completion or the
/// queue's 503, the queue drains, and GPU buffers and process memory come back to where they were.
#[test]
fn serve_bounded_load() {
    let _serial = serial();
    let s = Server::start(&["--api-key", KEY, "--max-queue", "4"]);
    let pid = s.child.id();
    let health = || -> Value { serde_json::from_str(&s.get("/health", None).1).unwrap() };
    let body = json!({"prompt": "Hello there", "max_tokens": 2, "temperature": 0}).to_string();
    let round = |n_clients: usize, per_client: usize| -> (usize, usize, Vec<String>) {
        let results: Vec<(u16, String)> = std::thread::scope(|sc| {
            let handles: Vec<_> =
                (0..n_clients).map(|_| sc.spawn(|| (0..per_client).map(|_| s.post_raw("/v1/completions", &body, Some(KEY))).collect::<Vec<_>>())).collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let ok = results.iter().filter(|r| r.0 == 200).count();
        let busy = results.iter().filter(|r| r.0 == 503 && r.1.contains("queue_full")).count();
        let other = results.iter().filter(|r| r.0 != 200 && !(r.0 == 503 && r.1.contains("queue_full"))).map(|r| format!("{} {}", r.0, r.1)).collect();
        (ok, busy, other)
    };
    let wait_idle = || {
        let t = Instant::now();
        loop {
            let h = health();
            if h["queued"] == 0 && h["busy"] == false {
                return h;
            }
            assert!(t.elapsed() < Duration::from_secs(60), "the queue did not drain: {h}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // a first round warms every allocation up; the second must not grow anything
    let (ok, _, other) = round(16, 3);
    assert!(ok > 0 && other.is_empty(), "warm-up round: {ok} ok, others {other:?}");
    let before = wait_idle();
    let rss_before = rss_bytes(pid);
    let t = Instant::now();
    let (ok, busy, other) = round(16, 200 / 16 + 1);
    eprintln!("[serve test] load: {ok} completed, {busy} queue-full, {} other, in {:.1} s", other.len(), t.elapsed().as_secs_f64());
    assert!(other.is_empty(), "unexpected answers: {other:?}");
    assert!(ok >= 4 && ok + busy >= 200, "{ok} ok, {busy} busy");
    let after = wait_idle();
    let rss_after = rss_bytes(pid);
    eprintln!("[serve test] gpu buffers {} → {} bytes, rss {} → {} MiB", before["gpu_buffer_bytes"], after["gpu_buffer_bytes"], rss_before >> 20, rss_after >> 20);
    assert_eq!(after["gpu_buffer_bytes"], before["gpu_buffer_bytes"], "GPU buffers leaked");
    assert!(rss_after < rss_before + (32 << 20), "process memory grew by {} MiB", (rss_after - rss_before) >> 20);
}

/// A device lost mid-service (destroyed on purpose before the 2nd request) fails that request
/// with a clear error; the engine opens the device again, and the next request is answered as
/// before the loss.
#[test]
fn serve_recovers_from_device_loss() {
    let _serial = serial();
    let s = Server::start_with_env(&["--api-key", KEY], &[("NOMOAT_FAULT_LOSE_DEVICE_AT", "2")]);
    let body = json!({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0});
    let text = |v: &Value| v["choices"][0]["text"].as_str().unwrap().to_string();
    let first = text(&s.post("/v1/completions", &body));
    let (status, err) = s.post_raw("/v1/completions", &body.to_string(), Some(KEY));
    let e = check_error(status, &err, 500, "request on a lost device");
    assert!(e["message"].as_str().unwrap().contains("device lost"), "{e}");
    let again = text(&s.post("/v1/completions", &body));
    assert_eq!(again, first, "after the device came back");
    assert!(s.log.lock().unwrap().contains("opening the device again"), "{}", s.log.lock().unwrap());
}
