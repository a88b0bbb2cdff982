//! What the server tests share: starting `nomoat serve` and learning its address from its log.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// SmolLM2 135M Instruct Q4_1 in `$NOMOAT_CACHE/models` (default `~/.cache/nomoat/models`),
/// fetched by set-up; a missing model fails the test with the command to run.
pub fn smollm2() -> PathBuf {
    let cache = std::env::var_os("NOMOAT_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/nomoat"));
    let p = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "test model {} missing: run scripts/fetch-models.sh", p.display());
    p
}

/// A running `nomoat serve` (each test file adds the requests it makes); killed when dropped.
pub struct Server {
    pub child: Child,
    /// host:port to connect to
    pub addr: String,
    /// Its stderr so far.
    pub log: Arc<Mutex<String>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `cmd` (a `nomoat serve` with stderr piped) and waits up to 5 minutes for it to say
/// where it listens; its stderr is collected in the returned log. Panics with the log if it
/// never does.
pub fn spawn_listening(mut cmd: Command) -> (Child, String, Arc<Mutex<String>>) {
    let mut child = cmd.spawn().expect("starting nomoat serve");
    let log = Arc::new(Mutex::new(String::new()));
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("stderr piped");
    let log2 = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
            }
            let mut l = log2.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    match rx.recv_timeout(Duration::from_secs(300)) {
        Ok(addr) => (child, addr, log),
        Err(_) => {
            let _ = child.kill();
            panic!("nomoat serve did not start listening; its log:\n{}", log.lock().unwrap());
        }
    }
}

/// One raw HTTP/1.1 exchange on a fresh connection: what the server sent until it closed the
/// connection or `wait` passed.
pub fn raw_http(addr: &str, request: &[u8], wait: Duration) -> String {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(wait)).unwrap();
    // a server that closes at once (connections over the limit) may refuse the bytes
    let _ = sock.write_all(request);
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).to_string()
}

/// The status code of a raw HTTP response (0 for none).
pub fn status_of(response: &str) -> u16 {
    response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}
