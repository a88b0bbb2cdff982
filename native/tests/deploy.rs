//! docs/deploy.md, checked: nginx (Debian's package, on loopback, as the current user) in front
//! of two `nomoat serve` replicas with the documented configuration as written there; one
//! replica is killed while a stream and a non-streaming request run on each: the stream on it
//! must end at once without `[DONE]` (not hang), its non-streaming request be answered by the
//! other replica, the other's requests finish, and every later request be served by the other.
//! A control run
//! of the same set-up with `proxy_next_upstream off` must answer a request with a 502, so the
//! check sees the setting it is about. And the Kubernetes manifest there parses, with its probe
//! and ports agreeing (it is not run: there is no cluster here).

#[allow(dead_code)] // the other server tests use the rest
mod common;

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// docs/deploy.md.
fn deploy_md() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy.md");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The first fenced block of `lang` in `md`.
fn block(md: &str, lang: &str) -> String {
    let open = format!("```{lang}\n");
    let start = md.find(&open).unwrap_or_else(|| panic!("docs/deploy.md has no ```{lang} block")) + open.len();
    let len = md[start..].find("\n```").expect("an unclosed block");
    md[start..start + len + 1].to_string()
}

/// nginx, from PATH or Debian's /usr/sbin (not on a user's PATH).
fn nginx_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).map(|d| d.join("nginx"));
    on_path.chain([PathBuf::from("/usr/sbin/nginx")]).find(|p| p.is_file()).expect("nginx is not installed: run scripts/setup.sh (it installs Debian's nginx-light)")
}

/// A replica: `nomoat serve` on SmolLM2, reporting `alias` as its model so that each reply says
/// which replica produced it.
fn replica(alias: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nomoat"));
    cmd.args(["serve", "--port", "0", "-c", "256", "--parallel", "2", "--no-www", "--alias", alias, "-m"])
        .arg(common::smollm2())
        .env("XDG_RUNTIME_DIR", std::env::var_os("XDG_RUNTIME_DIR").unwrap_or_else(|| "/tmp".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// nginx running in the foreground from a temporary prefix; stopped and its folder removed when
/// dropped. One process (`master_process off`), so it runs as the current user and a kill
/// leaves no workers behind.
struct Nginx {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Nginx {
    /// Starts nginx with the documented site configuration, its ports replaced by `replicas`'
    /// addresses and a free one of its own, and `edit` applied; returns once it accepts
    /// connections.
    fn start(name: &str, replicas: [&str; 2], edit: impl Fn(String) -> String) -> Nginx {
        let site = block(&deploy_md(), "nginx");
        for documented in ["127.0.0.1:8081", "127.0.0.1:8082", "listen 127.0.0.1:8080;"] {
            assert!(site.contains(documented), "docs/deploy.md's nginx block no longer has {documented:?}: update this test");
        }
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let site =
            site.replace("127.0.0.1:8081", replicas[0]).replace("127.0.0.1:8082", replicas[1]).replace("listen 127.0.0.1:8080;", &format!("listen 127.0.0.1:{port};"));
        let site = edit(site);
        let dir = std::env::temp_dir().join(format!("nomoat-deploy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        // what a packaged nginx.conf has around the site, with every path in the temp folder
        let conf = format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\nevents {{ worker_connections 64; }}\nhttp {{\n\
             access_log {d}/access.log;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\nfastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n{site}}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), &conf).unwrap();
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nginx");
        let mut n = Nginx { child, dir, port };
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if n.child.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(10) {
                panic!("nginx did not start; its log:\n{}\nits configuration:\n{conf}", n.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&mut self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

/// What one request through the balancer got.
#[derive(Debug, Default)]
struct Reply {
    status: u16,
    /// The replica that answered (the `model` of its first chunk or of its JSON).
    model: Option<String>,
    /// Text chunks received.
    chunks: usize,
    /// The stream's `data: [DONE]` arrived (or a whole non-streaming reply).
    done: bool,
    /// The connection was still open, silent, after the read timeout.
    hung: bool,
    ended: Option<Instant>,
}

/// A greedy completion of `max_tokens` through `addr` on a raw connection; `first` is told the
/// replica's name at the first text chunk (streams only).
fn complete(addr: &str, prompt: &str, max_tokens: usize, stream: bool, first: Option<mpsc::Sender<String>>) -> Reply {
    let body = json!({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "repeat_penalty": 1, "stream": stream}).to_string();
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(sock, "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
        .unwrap();
    let mut reader = BufReader::new(sock);
    let mut r = Reply::default();
    let mut line = String::new();
    let mut json_body = String::new();
    let mut in_body = false;
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                r.hung = true;
                break;
            }
            // a reset is an ending too
            Err(_) => break,
        }
        if r.status == 0 {
            r.status = common::status_of(&line);
            continue;
        }
        if !in_body {
            in_body = line == "\r\n";
            continue;
        }
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            if data == "[DONE]" {
                r.done = true;
            } else if let Ok(v) = serde_json::from_str::<Value>(data) {
                if r.model.is_none() {
                    r.model = v["model"].as_str().map(String::from);
                    if let (Some(tx), Some(m)) = (&first, &r.model) {
                        let _ = tx.send(m.clone());
                    }
                }
                r.chunks += v["choices"][0]["text"].as_str().is_some_and(|t| !t.is_empty()) as usize;
            }
        } else if !stream {
            json_body.push_str(&line);
        }
    }
    r.ended = Some(Instant::now());
    if !stream {
        // the body may be chunked: its JSON is the line that parses
        if let Some(v) = json_body.lines().find_map(|l| serde_json::from_str::<Value>(l).ok()) {
            r.model = v["model"].as_str().map(String::from);
            r.done = v["choices"][0]["finish_reason"].is_string();
            r.chunks = 1;
        }
    }
    r
}

/// Requests a replica is decoding (its /metrics).
fn running(addr: &str) -> f64 {
    let resp = common::raw_http(addr, format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(), Duration::from_secs(10));
    let line = resp.lines().find(|l| l.starts_with("nomoat_requests_running ")).unwrap_or_else(|| panic!("no nomoat_requests_running in {resp}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The `model` /health reports through `addr`.
fn health_model(addr: &str) -> String {
    let resp = common::raw_http(addr, format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(), Duration::from_secs(10));
    assert_eq!(common::status_of(&resp), 200, "{resp}");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    let json = body.lines().find_map(|l| serde_json::from_str::<Value>(l).ok()).unwrap_or_else(|| panic!("no JSON in {resp}"));
    json["model"].as_str().unwrap().to_string()
}

#[test]
fn a_replica_stopping_mid_stream_leaves_the_other_serving() {
    let t0 = Instant::now();
    let nginx_bin = nginx_bin(); // fail early when missing
                                 // both replicas load at once
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| common::spawn_listening(replica("replica-a")));
        let b = s.spawn(|| common::spawn_listening(replica("replica-b")));
        (a.join().unwrap(), b.join().unwrap())
    });
    let mut a = Some(common::Server { child: a.0, addr: a.1, log: a.2 });
    let b = common::Server { child: b.0, addr: b.1, log: b.2 };
    let a_addr = a.as_ref().unwrap().addr.clone();
    eprintln!("replicas up in {:.1} s ({nginx_bin:?})", t0.elapsed().as_secs_f64());
    let mut lb = Nginx::start("lb", [&a_addr, &b.addr], |s| s);
    let addr = lb.addr();

    // round robin: both replicas answer
    let seen: std::collections::BTreeSet<String> = (0..4).map(|_| health_model(&addr)).collect();
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["replica-a", "replica-b"], "/health through nginx reached both replicas");
    // nginx passes the client's Host on, so the replicas still refuse a name that is not theirs
    // (DNS rebinding); two requests, one to each
    for _ in 0..2 {
        let resp = common::raw_http(&addr, b"GET /health HTTP/1.1\r\nHost: rebound.example\r\nConnection: close\r\n\r\n", Duration::from_secs(10));
        assert_eq!(common::status_of(&resp), 403, "{resp}");
    }

    // Round robin alternates, and the four /health requests left replica A next: a stream on
    // A, one on B (each sent once the one before has its first token), then a non-streaming
    // request on each. Once A runs both of its requests, it is killed.
    let prompts = ["Once upon a time", "The capital of France is", "Water boils at", "def fibonacci(n):"];
    let (killed_at, replies) = std::thread::scope(|s| {
        let mut handles = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let addr = addr.clone();
            if i < 2 {
                let (tx, rx) = mpsc::channel();
                handles.push(s.spawn(move || complete(&addr, p, 48, true, Some(tx))));
                let m = rx.recv_timeout(Duration::from_secs(60)).expect("no first token within 60 s");
                assert_eq!(m, ["replica-a", "replica-b"][i], "round robin sent stream {i} to {m}");
            } else {
                handles.push(s.spawn(move || complete(&addr, p, 32, false, None)));
            }
        }
        let t = Instant::now();
        while running(&a_addr) < 2.0 {
            assert!(t.elapsed() < Duration::from_secs(30), "replica A never ran two requests");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(a.take()); // SIGKILL, as a crash or an OOM kill would
        let killed_at = Instant::now();
        (killed_at, handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<Reply>>())
    });
    eprintln!("replica A killed at {:.1} s; replies: {replies:?}", (killed_at - t0).as_secs_f64());
    for (i, r) in replies.iter().enumerate() {
        assert!(!r.hung, "request {i} hung after replica A was killed: {r:?}");
    }
    // the stream on A is cut short: the client can tell (no [DONE]), at once
    let cut = &replies[0];
    assert!(cut.status == 200 && cut.chunks > 0 && !cut.done, "the stream on the killed replica: {cut:?}");
    let after = cut.ended.unwrap().saturating_duration_since(killed_at);
    assert!(after < Duration::from_secs(5), "the stream on the killed replica ended {after:?} after the kill");
    // the one on B finishes
    assert!(replies[1].status == 200 && replies[1].done && replies[1].model.as_deref() == Some("replica-b"), "the stream on replica B: {:?}", replies[1]);
    // both non-streaming requests are answered by B: the one A was running had no response
    // header yet, so nginx sent it again to B (proxy_next_upstream's non_idempotent)
    for (i, r) in replies.iter().enumerate().skip(2) {
        assert!(r.status == 200 && r.done && r.model.as_deref() == Some("replica-b"), "request {i}: {r:?}\nnginx's log:\n{}", lb.log());
    }

    // after the kill: every request is served, by B
    let later: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let addr = addr.clone();
                s.spawn(move || complete(&addr, prompts[i], 8, i % 2 == 0, None))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, r) in later.iter().enumerate() {
        assert!(r.status == 200 && r.done && r.model.as_deref() == Some("replica-b"), "request {i} after the kill: {r:?}\nnginx's log:\n{}", lb.log());
    }
    for _ in 0..2 {
        assert_eq!(health_model(&addr), "replica-b");
    }
    // (nginx left A out after the non-streaming request failed there.) A fresh nginx, which
    // does not know A is gone: the first request it sends there is refused and goes on to B
    let mut fresh = Nginx::start("fresh", [&a_addr, &b.addr], |s| s);
    for (i, p) in prompts.iter().take(2).enumerate() {
        let r = complete(&fresh.addr(), p, 4, false, None);
        assert!(r.status == 200 && r.model.as_deref() == Some("replica-b"), "request {i} through a fresh nginx: {r:?}\n{}", fresh.log());
    }
    assert!(fresh.log().contains("Connection refused"), "the fresh nginx never tried the dead replica:\n{}", fresh.log());

    // the control: the same, but nginx passes no request on to the next replica; the first one
    // it sends to the dead replica fails
    let mut bare = Nginx::start("no-retry", [&a_addr, &b.addr], |s| {
        let out =
            s.lines().map(|l| if l.trim_start().starts_with("proxy_next_upstream ") { "        proxy_next_upstream off;" } else { l }).collect::<Vec<_>>().join("\n");
        assert_ne!(out.trim_end(), s.trim_end(), "no proxy_next_upstream line in the documented configuration");
        out + "\n"
    });
    let statuses: Vec<u16> = (0..2).map(|i| complete(&bare.addr(), prompts[i], 4, false, None).status).collect();
    assert!(statuses.contains(&502), "without proxy_next_upstream a request should have failed on the dead replica: {statuses:?}\n{}", bare.log());

    // SIGTERM (what Kubernetes sends): replica B refuses new connections at once, finishes the
    // stream it is running, and exits by itself
    let mut b = b;
    let (tx, rx) = mpsc::channel();
    let b_addr = b.addr.clone();
    let stream = std::thread::spawn(move || complete(&b_addr, "Once upon a time", 24, true, Some(tx)));
    rx.recv_timeout(Duration::from_secs(60)).expect("no first token from replica B within 60 s");
    let term = Command::new("kill").args(["-TERM", &b.child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let t = Instant::now();
    while TcpStream::connect(&b.addr).is_ok() {
        assert!(t.elapsed() < Duration::from_secs(5), "replica B still accepts connections 5 s after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = stream.join().unwrap();
    assert!(r.status == 200 && r.done && !r.hung, "the stream replica B was running at SIGTERM: {r:?}\n{}", b.log.lock().unwrap());
    let exit = loop {
        if let Some(status) = b.child.try_wait().unwrap() {
            break status;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "replica B did not exit after SIGTERM:\n{}", b.log.lock().unwrap());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "replica B exited with {exit:?}:\n{}", b.log.lock().unwrap());
    eprintln!("done in {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn the_kubernetes_manifest_parses_and_agrees() {
    let yaml = block(&deploy_md(), "yaml");
    // python3's yaml (set-up installs PyYAML); a Deployment and a Service whose selector,
    // ports and probes agree with the container's
    let check = r#"
import sys, yaml
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
kinds = {d["kind"]: d for d in docs}
assert sorted(kinds) == ["Deployment", "Service"], sorted(kinds)
dep, svc = kinds["Deployment"], kinds["Service"]
assert dep["apiVersion"] == "apps/v1" and svc["apiVersion"] == "v1"
tmpl = dep["spec"]["template"]
labels = tmpl["metadata"]["labels"]
assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the selector misses the pods"
assert svc["spec"]["selector"].items() <= labels.items(), "the Service misses the pods"
[c] = tmpl["spec"]["containers"]
args = c["args"]
assert args[0] == "serve", args
port = int(args[args.index("--port") + 1])
assert args[args.index("--host") + 1] == "0.0.0.0", "a pod must listen beyond loopback"
names = {p["name"]: p["containerPort"] for p in c["ports"]}
for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
    g = c[probe]["httpGet"]
    assert g["path"] == "/health", (probe, g)
    assert names.get(g["port"], g["port"]) == port, (probe, g, names, port)
for p in svc["spec"]["ports"]:
    assert names.get(p["targetPort"], p["targetPort"]) == port, (p, names, port)
vols = {v["name"] for v in tmpl["spec"]["volumes"]}
assert all(m["name"] in vols for m in c["volumeMounts"]), "a mount without a volume"
print("ok")
"#;
    let mut child = Command::new("python3")
        .args(["-c", check])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed: run scripts/setup.sh");
    child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && out.stdout.starts_with(b"ok"),
        "docs/deploy.md's Kubernetes manifest:\n{stderr}{}",
        if stderr.contains("No module named 'yaml'") { "(run scripts/setup.sh: it installs PyYAML)" } else { "" }
    );
}
