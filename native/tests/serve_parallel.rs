//! `nomoat serve --parallel N`: requests decoded together give the replies they get one at a
//! time, and a client that leaves mid-stream frees its slot while the others go on.

#[allow(dead_code)] // the other server tests use the rest
mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn start(parallel: usize) -> common::Server {
    start_with(parallel, &[])
}

fn start_with(parallel: usize, args: &[&str]) -> common::Server {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nomoat"));
    cmd.args(["serve", "--port", "0", "-c", "512", "--parallel", &parallel.to_string(), "-m"])
        .arg(common::smollm2())
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::var_os("XDG_RUNTIME_DIR").unwrap_or_else(|| "/tmp".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let (child, addr, log) = common::spawn_listening(cmd);
    common::Server { child, addr, log }
}

/// A greedy completion: its text.
fn complete(addr: &str, prompt: &str, max_tokens: usize) -> String {
    complete_json(addr, prompt, max_tokens)["choices"][0]["text"].as_str().unwrap().to_string()
}

/// A greedy completion: the whole response.
fn complete_json(addr: &str, prompt: &str, max_tokens: usize) -> Value {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0});
    let resp = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(600))
        .build()
        .post(&format!("http://{addr}/v1/completions"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap_or_else(|e| panic!("{prompt:?}: {e}"));
    serde_json::from_str(&resp.into_string().unwrap()).unwrap()
}

/// `/metrics`' samples, by name.
fn metrics(addr: &str) -> std::collections::HashMap<String, f64> {
    let text = ureq::get(&format!("http://{addr}/metrics")).call().unwrap().into_string().unwrap();
    text.lines().filter(|l| !l.starts_with('#')).map(|l| l.split_once(' ').map(|(n, v)| (n.to_string(), v.parse().unwrap())).unwrap()).collect()
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

fn usage_of(v: &Value, field: &str) -> u64 {
    match field {
        "cached_tokens" => v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap(),
        f => v["usage"][f].as_u64().unwrap(),
    }
}

/// Eight prompts: different lengths (two over a 64-token prefill chunk, so fed in chunks between
/// the others' steps), two sharing a long prefix, one repeated.
fn prompts() -> Vec<String> {
    let long = "The history of the printing press begins with movable type in East Asia, then Gutenberg's press in Mainz around 1440, which spread across Europe within decades and changed how books, pamphlets and newspapers were made and read. Printers became publishers, cities competed for presses, and the cost of a book fell so far that reading spread beyond the clergy and the rich to merchants, craftsmen and their children. In summary,".to_string();
    vec![
        "Once upon a time".into(),
        "The capital of France is".into(),
        long.clone(),
        format!("{long} the most important consequence was"),
        "def fibonacci(n):".into(),
        "1, 2, 3, 4, 5,".into(),
        "Water boils at".into(),
        "Once upon a time".into(),
    ]
}

#[test]
fn eight_requests_together_reply_as_one_at_a_time() {
    let server = start(4);
    let prompts = prompts();
    let max_tokens = [12, 8, 10, 12, 6, 12, 9, 12];
    // one at a time: each request alone in the engine
    let alone: Vec<Value> = prompts.iter().zip(max_tokens).map(|(p, n)| complete_json(&server.addr, p, n)).collect();
    // all at once: up to 4 decoded together, the rest joining as slots free
    let t = Instant::now();
    let addr = server.addr.as_str();
    let together: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts.iter().zip(max_tokens).map(|(p, n)| s.spawn(move || complete_json(addr, p, n))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("8 concurrent requests in {:.1} s", t.elapsed().as_secs_f64());
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        let (a, b) = (text_of(a), text_of(b));
        assert_eq!(a, b, "request {i} ({:?}): alone {a:?}, together {b:?}", prompts[i]);
        assert!(!a.is_empty(), "request {i} generated nothing");
    }
    // prefix reuse: the first request found nothing cached; the one continuing the long prompt,
    // sent after it, was given its slot and evaluated only the rest
    assert_eq!(usage_of(&alone[0], "cached_tokens"), 0);
    let (cached, prompt) = (usage_of(&alone[3], "cached_tokens"), usage_of(&alone[3], "prompt_tokens"));
    assert!(cached >= 80 && cached < prompt, "the long prompt's continuation: {cached} of {prompt} prompt tokens cached");
    assert!(usage_of(&alone[2], "prompt_tokens") > 64, "the long prompt fits one chunk");
    // /metrics adds up what the responses said
    let m = metrics(&server.addr);
    let all: Vec<&Value> = alone.iter().chain(&together).collect();
    let sum = |f: &str| all.iter().map(|v| usage_of(v, f)).sum::<u64>() as f64;
    assert_eq!(m["nomoat_requests_total"], 16.0);
    assert_eq!(m["nomoat_generated_tokens_total"], sum("completion_tokens"));
    assert_eq!(m["nomoat_prompt_tokens_total"], sum("prompt_tokens"));
    assert_eq!(m["nomoat_prompt_tokens_cached_total"], sum("cached_tokens"));
    assert_eq!((m["nomoat_slots"], m["nomoat_kv_cache_capacity_tokens"], m["nomoat_requests_running"]), (4.0, 4.0 * 512.0, 0.0));
    assert!(m["nomoat_kv_cache_tokens"] > 0.0 && m["nomoat_generation_tokens_per_second"] > 0.0, "{m:?}");
    // they did run together: some step decoded several
    let log = server.log.lock().unwrap().clone();
    assert!(log.contains("slot 3:"), "four slots in use:\n{log}");
}

/// A streaming client that disconnects mid-reply frees its slot at once: the request is logged
/// as cancelled long before its token budget, and the other finishes with the reply it gets
/// alone.
#[test]
fn a_client_leaving_mid_stream_frees_its_slot() {
    let server = start(2);
    let addr = server.addr.clone();
    let other = std::thread::spawn(move || complete(&addr, "The capital of France is", 24));
    let body = json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": true}).to_string();
    let mut sock = TcpStream::connect(&server.addr).unwrap();
    write!(sock, "POST /v1/completions HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", server.addr, body.len()).unwrap();
    let mut reader = BufReader::new(sock.try_clone().unwrap());
    let mut chunks = 0;
    let mut line = String::new();
    while chunks < 3 {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended early");
        if line.starts_with("data: {") {
            chunks += 1;
        }
    }
    drop(reader);
    sock.shutdown(std::net::Shutdown::Both).unwrap();
    drop(sock);
    let text = other.join().unwrap();
    assert!(!text.is_empty());
    // the request decoded beside the one cancelled replies as it does alone
    assert_eq!(text, complete(&server.addr, "The capital of France is", 24));
    // the next request is served in its slot
    let t = Instant::now();
    let again = complete(&server.addr, "Water boils at", 4);
    assert!(!again.is_empty());
    let log = server.log.lock().unwrap().clone();
    let cancelled = log.lines().find(|l| l.contains("cancelled")).unwrap_or_else(|| panic!("no cancelled request in the log:\n{log}"));
    let generated: usize = cancelled.split(" generated").next().unwrap().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(generated < 100, "the cancelled request went on for {generated} tokens:\n{log}");
    eprintln!("cancelled after {generated} tokens; the next request took {:.1} s", t.elapsed().as_secs_f64());
}

/// The official openai Python client's checks (tests/server/openai_client_test.py: chat and
/// completions, streamed or not, errors) against a server of 4 slots.
#[test]
fn openai_client_with_four_slots() {
    let server = start_with(4, &["--api-key", "k-123"]);
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/server/openai_client_test.py");
    let url = format!("http://{}/v1", server.addr);
    let out = Command::new("python3").arg(&script).arg(&url).arg("k-123").arg("SmolLM2-135M-Instruct.Q4_1").output().expect("running python3");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openai client test failed\nstdout:\n{stdout}\nstderr:\n{stderr}\nserver log:\n{}", server.log.lock().unwrap());
}

#[test]
fn parallel_out_of_range_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_nomoat")).args(["serve", "--parallel", "17", "-m"]).arg(common::smollm2()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--parallel 17"), "{err}");
}

/// Without --parallel (or NOMOAT_PARALLEL) the server chooses: as many slots as pay on the
/// device (4 on lavapipe, where these tests run), fewer when their KV caches do not fit a
/// quarter of what --max-gpu-memory leaves; it says so at start, and /metrics agrees.
#[test]
fn the_default_slot_count_is_chosen_from_the_device_and_memory() {
    let start = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nomoat"));
        cmd.args(["serve", "--port", "0", "-c", "512", "--no-www", "-m"])
            .arg(common::smollm2())
            .args(args)
            .env_remove("NOMOAT_PARALLEL")
            .env("XDG_RUNTIME_DIR", std::env::var_os("XDG_RUNTIME_DIR").unwrap_or_else(|| "/tmp".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (child, addr, log) = common::spawn_listening(cmd);
        common::Server { child, addr, log }
    };
    // the line before "listening on", which spawn_listening waited for
    let chosen = |s: &common::Server| {
        let log = s.log.lock().unwrap().clone();
        let line = log.lines().find(|l| l.contains(" together")).unwrap_or_else(|| panic!("no slot count at start:\n{log}")).to_string();
        let n: usize = line.split("decoding up to ").nth(1).and_then(|r| r.split(' ').next()).and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"));
        (n, line)
    };
    let server = start(&[]);
    let (n, line) = chosen(&server);
    let device = server.log.lock().unwrap().clone();
    if device.contains("llvmpipe") {
        assert_eq!(n, 4, "{line}");
    }
    assert!(line.contains("what pays on this device"), "{line}");
    assert_eq!(metrics(&server.addr)["nomoat_slots"], n as f64);
    drop(server);
    // SmolLM2's 512-token cache is 12 MiB a slot; 160 MiB leaves about 70 MiB after the weights
    let server = start(&["--max-gpu-memory", "160"]);
    let (n, line) = chosen(&server);
    assert!(n == 1 && line.contains("--max-gpu-memory"), "{line}");
    assert_eq!(metrics(&server.addr)["nomoat_slots"], 1.0);
}
