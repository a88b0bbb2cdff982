//! `nomoat serve`: an OpenAI-compatible HTTP server (axum on tokio).
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`
//! (messages through the model's chat template) and `POST /v1/completions` (a raw prompt), each
//! streaming (server-sent events, OpenAI's chunk shapes, then `data: [DONE]`) or not. The paths
//! also answer without the `/v1` prefix.
//!
//! The model runs on one engine thread ([`engine`]); HTTP handlers check and tokenize a request,
//! then queue it on a bounded channel (first come, first served). A full queue is a 503. A
//! client that goes away (a streaming response whose connection fails, or a dropped request)
//! sets its request's cancel flag, and the engine stops generating for it at the next token.
//! Every error is an OpenAI-style `{"error": {"message", "type", "param", "code"}}`.
//!
//! The chat page (www/) is served at `/` and the loaded model file at `/models/<its name>` (the
//! catalog's models in the cache too, for the page's model list), so
//! the page can run the same model in the browser; `--no-www` turns both off. Connections are
//! capped, headers must arrive within `--header-timeout`, whole bodies within `--body-timeout`;
//! cross-origin requests get no CORS headers unless `--cors-origin` names the origin; request
//! bodies must be `application/json`; on a loopback address, requests must name a loopback
//! host (or an `--allowed-host`), against DNS rebinding. See SECURITY.md for the threat model.

mod api;
mod engine;
mod metrics;
mod parallel;
mod slots;

use crate::ModelArgs;
use anyhow::{Context, Result};
use api::{ApiError, Common, Kind, Meta, Prompt};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use engine::{Event, Job, ModelInfo, Outcome, Stats};
use nomoat_runtime::constrain::{Constrainer, Guide};
use nomoat_runtime::generate::{FinishReason, GenerateOptions};
use nomoat_runtime::prompt;
use nomoat_runtime::tokenizer::Tokenizer;
use nomoat_runtime::tools::{self, ToolCall};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;

#[derive(Args, Clone, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub m: ModelArgs,
    /// Address to listen on (loopback by default; 0.0.0.0 opens the server to the network). On
    /// a loopback address, requests whose Host header is not localhost, 127.0.0.1 or [::1] (any
    /// port), nor an --allowed-host, are refused (403) so that a web page cannot reach the
    /// server through DNS rebinding; on other addresses the Host is not checked unless
    /// --allowed-host is given
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Also accept requests whose Host header names NAME (repeatable): NAME matches with any
    /// port, NAME:PORT with that port only. Given with a non-loopback --host, it turns the Host
    /// check on there too (the loopback names are always accepted)
    #[arg(long = "allowed-host", value_name = "NAME")]
    pub allowed_hosts: Vec<String>,
    /// Port to listen on (0 = any free port; the address is printed once listening)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require this key as a Bearer token (Authorization: Bearer KEY) on every API route and on
    /// the model file (not on /health or the chat page, which then cannot load the model from
    /// here). Other users of the machine can read a command line (ps): prefer the environment
    /// variable NOMOAT_API_KEY or --api-key-file
    #[arg(long)]
    pub api_key: Option<String>,
    /// Read the API key from the first line of this file
    #[arg(long, value_name = "PATH", conflicts_with = "api_key")]
    pub api_key_file: Option<PathBuf>,
    /// Requests that may wait for the model at once (beyond the one it is working on); more
    /// are answered 503
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Requests decoded together, each in its own slot of the KV cache (1..=16; each slot
    /// holds --ctx-size tokens); more wait in the queue. Default: $NOMOAT_PARALLEL, else as
    /// many as pay on the device (4 on lavapipe, 8 on a GPU) whose KV caches fit the memory
    /// (printed at start)
    #[arg(long)]
    pub parallel: Option<usize>,
    /// Most tokens one request may generate (0 = until the context is full); a larger
    /// max_tokens is lowered to this
    #[arg(long, default_value_t = 0)]
    pub max_tokens_limit: usize,
    /// Model id to report (default: the GGUF file's name without .gguf)
    #[arg(long)]
    pub alias: Option<String>,
    /// Folder of the chat page to serve at / (default: the www/ folder of this source tree)
    #[arg(long)]
    pub www: Option<PathBuf>,
    /// Serve only the API: no chat page, no model file
    #[arg(long)]
    pub no_www: bool,
    /// Allow cross-origin requests from this origin (repeatable; e.g. http://localhost:3000; not
    /// `*`). Without it browsers on other origins cannot read the API's answers
    #[arg(long = "cors-origin")]
    pub cors_origins: Vec<String>,
    /// Open connections at once; more are closed on accept
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (also how long an idle keep-alive
    /// connection stays open)
    #[arg(long, default_value_t = 15)]
    pub header_timeout: u64,
    /// Seconds a client has to send a request's whole body, from the end of its headers (408
    /// after)
    #[arg(long, default_value_t = 30)]
    pub body_timeout: u64,
    /// On SIGTERM, stop accepting connections and give the requests in progress up to this many
    /// seconds to finish (0: stop at once, as Ctrl-C and a second signal do)
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    pub drain_timeout: u64,
}

/// Largest request body accepted (413 beyond).
const MAX_BODY: usize = 1 << 20;

struct AppState {
    info: ModelInfo,
    /// What the chat prompts' messages are marked with (see [`prompt`]).
    guard: prompt::Guard,
    /// Compiles `response_format` grammars; Err: why this tokenizer cannot have them.
    constrainer: Result<Constrainer, String>,
    /// Whether the chat template shows tools itself (else the generic tool prompt is used).
    template_tools: bool,
    jobs: mpsc::Sender<Job>,
    body_timeout: Duration,
    max_queue: usize,
    max_tokens_limit: usize,
    api_key: Option<String>,
    model_id: String,
    model_created: u64,
    stats: Arc<Stats>,
    next_id: AtomicU64,
    started: u64,
}

type Shared = Arc<AppState>;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// SplitMix64 step: request ids and default seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^ (z >> 31)
}

/// The API key: `--api-key`, else the first line of `--api-key-file`, else NOMOAT_API_KEY. An
/// empty one is no key.
fn api_key(a: &ServeArgs) -> Result<Option<String>> {
    if let Some(k) = &a.api_key {
        if !k.is_empty() {
            eprintln!("nomoat serve: warning: --api-key can be read by other users of this machine (ps); prefer NOMOAT_API_KEY or --api-key-file");
        }
        return Ok(Some(k.clone()).filter(|k| !k.is_empty()));
    }
    if let Some(p) = &a.api_key_file {
        let text = std::fs::read_to_string(p).with_context(|| format!("--api-key-file {}", p.display()))?;
        let key = text.lines().next().unwrap_or("").trim();
        anyhow::ensure!(!key.is_empty(), "--api-key-file {}: the first line is empty", p.display());
        return Ok(Some(key.to_string()));
    }
    Ok(std::env::var("NOMOAT_API_KEY").ok().map(|k| k.trim().to_string()).filter(|k| !k.is_empty()))
}

/// The flags checked before anything is bound or loaded.
fn check_args(a: &ServeArgs) -> Result<()> {
    for o in &a.cors_origins {
        anyhow::ensure!(
            o.trim() != "*",
            "--cors-origin '*' would let every web site read this server's answers; name each origin allowed (e.g. --cors-origin http://localhost:3000)"
        );
        o.parse::<header::HeaderValue>().map_err(|_| anyhow::anyhow!("--cors-origin {o:?} is not a valid origin"))?;
    }
    for h in &a.allowed_hosts {
        anyhow::ensure!(!h.is_empty() && !h.contains(['/', ' ', '*']), "--allowed-host {h:?}: give a host name, or NAME:PORT");
    }
    let most = nomoat_runtime::ops::MAX_SEQ_ROWS;
    if let Some(n) = parallel(a)? {
        anyhow::ensure!((1..=most).contains(&n), "--parallel {n}: give 1 to {most} requests decoded together");
    }
    Ok(())
}

/// Requests decoded together: --parallel, else $NOMOAT_PARALLEL (which lets the server test
/// suites run with a given number of slots), else None: the engine chooses from the device.
fn parallel(a: &ServeArgs) -> Result<Option<usize>> {
    match (a.parallel, std::env::var("NOMOAT_PARALLEL")) {
        (Some(n), _) => Ok(Some(n)),
        (None, Ok(v)) => v.trim().parse().map(Some).map_err(|_| anyhow::anyhow!("NOMOAT_PARALLEL={v:?} is not a number")),
        (None, Err(_)) => Ok(None),
    }
}

pub fn run(mut a: ServeArgs) -> Result<()> {
    check_args(&a)?;
    let api_key = api_key(&a)?;
    // a catalog name or URL is fetched once, before the port is bound
    let path = a.m.path(false)?;
    a.m.model = Some(path.clone());
    let model_id = a.alias.clone().unwrap_or_else(|| path.file_stem().unwrap_or_default().to_string_lossy().to_string());
    let model_created =
        std::fs::metadata(&path).and_then(|m| m.modified()).ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()).unwrap_or_else(unix_now);
    // Bind first: a port in use fails before the model loads. Connections made while it loads
    // wait in the backlog.
    let listener = std::net::TcpListener::bind((a.host.as_str(), a.port)).with_context(|| format!("listening on {}:{}", a.host, a.port))?;
    listener.set_nonblocking(true)?;
    let max_queue = a.max_queue.max(1);
    let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(max_queue);
    let stats = Arc::new(Stats::default());
    let info = engine::start(a.m.clone(), jobs_rx, stats.clone(), parallel(&a)?)?;
    let n_ctx = info.n_ctx;
    let device = info.device.clone();
    if let Err(e) = &info.template {
        eprintln!("note: {e}");
    }
    let guard = prompt::Guard::new(&info.tokenizer);
    let constrainer = Constrainer::new(info.tokenizer.clone()).map_err(|e| format!("structured output is unavailable for this model: {e}"));
    if let Err(e) = &constrainer {
        eprintln!("note: {e}");
    }
    let template_tools = info.template.as_ref().is_ok_and(|t| t.supports_tools());
    let state = Arc::new(AppState {
        info,
        guard,
        constrainer,
        template_tools,
        jobs: jobs_tx,
        body_timeout: Duration::from_secs(a.body_timeout.max(1)),
        max_queue,
        max_tokens_limit: a.max_tokens_limit,
        api_key,
        model_id: model_id.clone(),
        model_created,
        stats,
        next_id: AtomicU64::new(1),
        started: unix_now(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        eprintln!("nomoat serve: {model_id} on {device}, context {n_ctx} tokens");
        let n = state.info.slots;
        let (s, why) = (if n == 1 { "" } else { "s" }, state.info.slots_why.as_ref().map(|w| format!(" (--parallel {n}: {w})")).unwrap_or_default());
        eprintln!("nomoat serve: decoding up to {n} request{s} together{why}");
        eprintln!("nomoat serve: listening on http://{addr}{}", if state.api_key.is_some() { " (API key required)" } else { "" });
        let www = if a.no_www { None } else { www_dir(a.www.clone())? };
        match &www {
            Some(d) => eprintln!("nomoat serve: chat page at http://{addr}/ (from {})", d.display()),
            None if !a.no_www => eprintln!("nomoat serve: no chat page (www/pkg is not built: scripts/build-web.sh)"),
            None => {}
        }
        // a loopback address checks every request's Host; another only when names are given
        let hosts = (addr.ip().is_loopback() || !a.allowed_hosts.is_empty()).then(|| HostPolicy::new(&a.allowed_hosts));
        if !addr.ip().is_loopback() && hosts.is_none() {
            eprintln!("nomoat serve: note: requests are not checked for their Host header on {addr} (--allowed-host NAME checks them)");
        }
        let opts = RouterOptions { www, model_file: path.clone(), cors_origins: a.cors_origins.clone(), hosts };
        let app = router(state, &opts)?;
        // Ctrl-C stops at once; SIGTERM (a service manager's, Kubernetes') drains first
        #[cfg(unix)]
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let signal = async {
            #[cfg(unix)]
            {
                tokio::select! { _ = tokio::signal::ctrl_c() => false, _ = term.recv() => true }
            }
            #[cfg(not(unix))]
            {
                tokio::signal::ctrl_c().await.ok();
                false
            }
        };
        let connections = hyper_util::server::graceful::GracefulShutdown::new();
        let drain = tokio::select! {
            _ = accept_loop(listener, app, a.max_connections.max(1), Duration::from_secs(a.header_timeout.max(1)), &connections) => false,
            term = signal => term && a.drain_timeout > 0,
        };
        // the listener is closed: new connections are refused (a balancer tries another replica)
        if drain {
            let n = connections.count();
            eprintln!(
                "nomoat serve: SIGTERM: no new connections; {n} open connection{} may finish their requests (up to {} s)",
                if n == 1 { "" } else { "s" },
                a.drain_timeout
            );
            let t = std::time::Instant::now();
            let again = async {
                #[cfg(unix)]
                tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
                #[cfg(not(unix))]
                tokio::signal::ctrl_c().await.ok();
            };
            tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(a.drain_timeout), connections.shutdown()) => match r {
                    Ok(()) => eprintln!("nomoat serve: every connection finished in {:.1} s; shutting down", t.elapsed().as_secs_f64()),
                    Err(_) => eprintln!("nomoat serve: --drain-timeout passed; shutting down with requests in progress"),
                },
                _ = again => eprintln!("nomoat serve: shutting down with requests in progress"),
            }
        } else {
            eprintln!("nomoat serve: shutting down");
        }
        Ok::<_, anyhow::Error>(())
    })?;
    // The engine thread may be mid-generation; it ends with the process.
    rt.shutdown_timeout(Duration::from_millis(100));
    Ok(())
}

/// The chat page's folder: `--www`, else the source tree's www/ when its wasm is built.
fn www_dir(given: Option<PathBuf>) -> Result<Option<PathBuf>> {
    if let Some(d) = given {
        anyhow::ensure!(d.join("index.html").is_file(), "--www {}: no index.html there", d.display());
        return Ok(Some(d.canonicalize()?));
    }
    let d = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../www"));
    Ok(d.join("pkg/nomoat_web_bg.wasm").is_file().then(|| d.canonicalize()).transpose()?)
}

/// Serves connections until the task is dropped: HTTP/1.1 through hyper with a header-read
/// timeout (slow or idle clients cannot hold a connection open), at most `max_connections`
/// at once (the rest are closed on accept rather than queued in memory).
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    max_connections: usize,
    header_timeout: Duration,
    connections: &hyper_util::server::graceful::GracefulShutdown,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        let (sock, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // out of file descriptors and the like: wait instead of spinning
                eprintln!("nomoat serve: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        // on SIGTERM: the request in progress finishes, then the connection closes
        let watcher = connections.watcher();
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
            let _ = watcher.watch(http.serve_connection(TokioIo::new(sock), service)).await;
            drop(slot);
        });
    }
}

struct RouterOptions {
    www: Option<PathBuf>,
    model_file: PathBuf,
    cors_origins: Vec<String>,
    /// None: no Host check.
    hosts: Option<HostPolicy>,
}

/// The Host names requests may give: the loopback ones (any port) and the --allowed-host ones.
#[derive(Clone, Debug)]
struct HostPolicy {
    /// (name in lowercase, port: None for any)
    allowed: Vec<(String, Option<u16>)>,
}

/// A Host header (or URI authority) as (name in lowercase, port); None when it is malformed.
fn split_host(host: &str) -> Option<(String, Option<u16>)> {
    let host = host.trim();
    let (name, port) = match host.strip_prefix('[') {
        // [IPv6]:port
        Some(rest) => {
            let end = rest.find(']')? + 2;
            match &host[end..] {
                "" => (&host[..end], None),
                p => (&host[..end], Some(p.strip_prefix(':')?)),
            }
        }
        None => match host.rsplit_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        },
    };
    let port = match port {
        None => None,
        Some(p) => Some(p.parse::<u16>().ok()?),
    };
    (!name.is_empty()).then(|| (name.to_ascii_lowercase(), port))
}

impl HostPolicy {
    fn new(extra: &[String]) -> HostPolicy {
        let mut allowed: Vec<(String, Option<u16>)> = ["localhost", "127.0.0.1", "[::1]"].iter().map(|n| (n.to_string(), None)).collect();
        allowed.extend(extra.iter().filter_map(|h| split_host(h)));
        HostPolicy { allowed }
    }

    fn allows(&self, host: &str) -> bool {
        split_host(host).is_some_and(|(name, port)| self.allowed.iter().any(|(n, p)| *n == name && (p.is_none() || *p == port)))
    }
}

/// Refuses requests that do not name this server by an allowed Host: a page whose own name
/// was made to resolve to 127.0.0.1 (DNS rebinding) sends its own name.
async fn check_host(State(policy): State<Arc<HostPolicy>>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).map(|v| String::from_utf8_lossy(v.as_bytes()).to_string());
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let refused = match (&host, &authority) {
        (None, None) => Some("the request has no Host header".to_string()),
        _ => [&host, &authority].into_iter().flatten().find(|h| !policy.allows(h)).map(|h| {
            format!(
                "the Host '{h}' is not a name of this server: requests must be sent to localhost, 127.0.0.1 or [::1] (this protects against DNS rebinding); \
                 start the server with --allowed-host NAME to accept another name"
            )
        }),
    };
    match refused {
        Some(msg) => ApiError::new(StatusCode::FORBIDDEN, "invalid_request_error", msg).with_code("host_not_allowed").into_response(),
        None => next.run(req).await,
    }
}

fn router(state: Shared, o: &RouterOptions) -> Result<Router> {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/adapters", get(adapters))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/models", get(models))
        .route("/chat/completions", post(chat_completions))
        .route("/completions", post(completions))
        .route("/metrics", get(metrics))
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let mut app = Router::new().route("/health", get(health)).route("/v1/health", get(health)).merge(api);
    app = match &o.www {
        // tower-http's ServeDir refuses `..` and absolute components: nothing outside www/
        Some(dir) => {
            // the model file, and the catalog's models already in the cache (the page lists
            // them), behind the key when there is one; names are compared, never made part of
            // a route (where `{` or `}` would mean something) or of a path
            let name = o.model_file.file_name().unwrap_or_default().to_string_lossy().to_string();
            let loaded = o.model_file.clone();
            let model = Router::new()
                .route(
                    "/models/{*file}",
                    get(move |Path(asked): Path<String>, req: Request| {
                        let (name, loaded) = (name.clone(), loaded.clone());
                        async move {
                            let file = if asked == name {
                                loaded
                            } else if let Some(e) = nomoat_runtime::catalog::entries().iter().find(|e| e.file == asked) {
                                let cached = crate::pull::cached_path(&e.file);
                                if !std::fs::metadata(&cached).is_ok_and(|m| m.len() == e.size) {
                                    return not_found(req.method().clone(), req.uri().clone()).await.into_response();
                                }
                                cached
                            } else {
                                return not_found(req.method().clone(), req.uri().clone()).await.into_response();
                            };
                            match tower_http::services::ServeFile::new(&file).try_call(req).await {
                                Ok(r) => r.into_response(),
                                Err(e) => ApiError::server(format!("reading the model file: {e}")).into_response(),
                            }
                        }
                    }),
                )
                .route_layer(middleware::from_fn_with_state(state.clone(), auth));
            app.merge(model).fallback_service(tower_http::services::ServeDir::new(dir).call_fallback_on_method_not_allowed(true).fallback(axum::routing::any(not_found)))
        }
        None => app.fallback(not_found),
    };
    app = app.layer(middleware::from_fn(content_length_limit));
    if !o.cors_origins.is_empty() {
        let origins = o.cors_origins.iter().map(|s| s.parse::<header::HeaderValue>()).collect::<Result<Vec<_>, _>>().context("--cors-origin")?;
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    // outermost: a request for another host name is answered before anything else
    if let Some(p) = &o.hosts {
        app = app.layer(middleware::from_fn_with_state(Arc::new(p.clone()), check_host));
    }
    Ok(app.with_state(state))
}

/// A declared body over the limit is refused before any of it is read (a body without a
/// Content-Length is cut off at the limit by [`DefaultBodyLimit`] instead).
async fn content_length_limit(req: Request, next: Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("the request body is larger than the {MAX_BODY}-byte limit"))
            .with_code("request_too_large")
            .into_response();
    }
    next.run(req).await
}

async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim);
        let ok = given.is_some_and(|g| api::constant_time_eq(g.as_bytes(), key.as_bytes()));
        if !ok {
            let msg = if given.is_none() { "no API key given: send it as the header 'Authorization: Bearer KEY'" } else { "incorrect API key" };
            return ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", msg).with_code("invalid_api_key").into_response();
        }
    }
    next.run(req).await
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("no such endpoint: {method} {}", uri.path())).with_code("not_found")
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", format!("{} does not accept {method}", uri.path())).with_code("method_not_allowed")
}

async fn health(State(s): State<Shared>) -> Json<Value> {
    let queued = s.max_queue - s.jobs.capacity();
    Json(json!({
        "status": "ok",
        "model": s.model_id,
        "n_ctx": s.info.n_ctx,
        "busy": s.stats.busy.load(Ordering::Relaxed),
        "queued": queued,
        "served": s.stats.served.load(Ordering::Relaxed),
        "gpu_buffer_bytes": s.stats.gpu_bytes.load(Ordering::Relaxed),
    }))
}

/// Prometheus' text format (behind the key, like the API: it tells how busy the server is).
async fn metrics(State(s): State<Shared>) -> Response {
    let snapshot = metrics::Snapshot {
        counters: &s.stats.counters,
        requests: s.stats.served.load(Ordering::Relaxed),
        queued: s.max_queue - s.jobs.capacity(),
        busy: s.stats.busy.load(Ordering::Relaxed),
        gpu_bytes: s.stats.gpu_bytes.load(Ordering::Relaxed),
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics::render(&snapshot)).into_response()
}

fn model_object(s: &AppState) -> Value {
    json!({"id": s.model_id, "object": "model", "created": s.model_created, "owned_by": "nomoat", "meta": {"n_ctx": s.info.n_ctx, "n_ctx_train": s.info.n_ctx_train}})
}

/// The LoRA adapters loaded at start, which requests may pick with `adapters`.
async fn adapters(State(s): State<Shared>) -> Json<Value> {
    let data: Vec<Value> = s
        .info
        .adapters
        .iter()
        .map(|(name, scale, rank, bytes)| json!({"name": name, "object": "adapter", "default_scale": scale, "rank": rank, "bytes": bytes}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&s)]}))
}

async fn model(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    if id == s.model_id {
        Json(model_object(&s)).into_response()
    } else {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", format!("the model '{id}' does not exist; this server has '{}'", s.model_id))
            .with_param("model")
            .with_code("model_not_found")
            .into_response()
    }
}

async fn chat_completions(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    complete(s, Kind::Chat, &headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    complete(s, Kind::Completion, &headers, body).await.unwrap_or_else(IntoResponse::into_response)
}

/// Only JSON bodies: a page on another origin can POST text/plain (or a body with no type)
/// without asking first (no CORS preflight), but not application/json.
fn check_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers.get(header::CONTENT_TYPE).map(|v| String::from_utf8_lossy(v.as_bytes()).to_string());
    let essence = given.as_deref().map(|t| t.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    if essence.as_deref() == Some("application/json") {
        return Ok(());
    }
    let got = match &given {
        Some(t) => format!("got '{t}'"),
        None => "the request has no Content-Type".to_string(),
    };
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "invalid_request_error",
        format!("the request body must be JSON sent as 'Content-Type: application/json'; {got}"),
    )
    .with_code("unsupported_media_type"))
}

/// The whole body, within one deadline for all of it (however its bytes are spread out) and
/// the size limit.
async fn read_body(body: Body, timeout: Duration) -> Result<Bytes, ApiError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ApiError::invalid(format!("could not read the request body: {e}")))?;
            if buf.len() + chunk.len() > MAX_BODY {
                return Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", format!("the request body is larger than the {MAX_BODY}-byte limit"))
                    .with_code("request_too_large"));
            }
            buf.extend_from_slice(&chunk);
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(ApiError::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", format!("the request body did not arrive within {} s", timeout.as_secs()))
            .with_code("request_timeout")),
        Ok(r) => r.map(|()| Bytes::from(buf)),
    }
}

/// Sets the cancel flag when dropped: held by whatever carries the response to the client
/// (the handler while it waits, or the SSE stream), so a client that goes away stops its job.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn complete(s: Shared, kind: Kind, headers: &HeaderMap, body: Body) -> Result<Response, ApiError> {
    check_content_type(headers)?;
    let body = read_body(body, s.body_timeout).await?;
    // a place in the queue first: a full queue costs no parsing, templating or tokenizing
    let place = s.jobs.clone().try_reserve_owned().map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", format!("the server is busy: {} requests are already waiting; try again shortly", s.max_queue))
                .with_code("queue_full")
        }
        mpsc::error::TrySendError::Closed(_) => ApiError::server("the model engine has stopped"),
    })?;
    let id_n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let random = mix(s.started ^ mix(id_n) ^ SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0));
    // parsing, templating and tokenizing a large body takes a while: off the async workers
    let s2 = s.clone();
    let (mut common, prompt, guide, tools_active) =
        tokio::task::spawn_blocking(move || prepare(&s2, kind, &body, random)).await.map_err(|e| ApiError::server(format!("preparing the request failed: {e}")))??;
    let n_ctx = s.info.n_ctx;
    if prompt.is_empty() {
        return Err(ApiError::param("prompt", "the prompt has no tokens"));
    }
    if prompt.len() >= n_ctx {
        return Err(ApiError::param(
            if kind == Kind::Chat { "messages" } else { "prompt" },
            format!(
                "the prompt is {} tokens, but the context holds {n_ctx} (with at least one more needed for the reply); shorten it, or start the server with a larger --ctx-size (this model allows up to {})",
                prompt.len(),
                s.info.n_ctx_train
            ),
        )
        .with_code("context_length_exceeded"));
    }
    let room = n_ctx - prompt.len();
    let limit = if s.max_tokens_limit > 0 { s.max_tokens_limit } else { usize::MAX };
    let max_tokens = match common.max_tokens.map(|n| n.min(limit)) {
        Some(n) if n > room => {
            let name = common.max_tokens_param;
            return Err(ApiError::param(
                name,
                format!(
                    "{name} is {n}, but the context holds {n_ctx} tokens and the prompt takes {}: at most {room} tokens can follow it; lower {name}, or start the server with a larger --ctx-size (this model allows up to {})",
                    prompt.len(),
                    s.info.n_ctx_train
                ),
            )
            .with_code("context_length_exceeded"));
        }
        Some(n) => n,
        None => room.min(limit),
    };
    // a top_k beyond the vocabulary keeps every token, as the whole vocabulary does
    common.sampler.top_k = common.sampler.top_k.min(s.info.n_vocab);
    let prompt_tokens = prompt.len();
    let cancel = Arc::new(AtomicBool::new(false));
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let adapters = match &common.adapters {
        None => None,
        Some(list) => {
            let mut out = Vec::new();
            for (name, scale) in list {
                let i = s.info.adapters.iter().position(|a| &a.0 == name).ok_or_else(|| {
                    let known: Vec<&str> = s.info.adapters.iter().map(|a| a.0.as_str()).collect();
                    ApiError::param(
                        "adapters",
                        format!("no adapter named '{name}' is loaded (loaded: {})", if known.is_empty() { "none".to_string() } else { known.join(", ") }),
                    )
                })?;
                out.push((i, *scale));
            }
            Some(out)
        }
    };
    let job = Job {
        id: id_n,
        adapters,
        prompt,
        opts: GenerateOptions { max_tokens, sampler: common.sampler.clone(), stop: common.stop.clone(), stop_at_eog: true },
        guide,
        cancel: cancel.clone(),
        events: ev_tx,
    };
    place.send(job);
    let meta =
        Meta { kind, id: format!("{}-{:016x}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, mix(random)), created: unix_now(), model: s.model_id.clone() };
    let guard = CancelOnDrop(cancel);
    // tool call ids: unique within the reply, unguessable across replies
    let calls = tools_active.then_some(CallIds(mix(random ^ 0x746f_6f6c)));
    let logprobs = common.logprobs.map(|_| s.info.tokenizer.clone());
    if common.stream {
        Ok(stream_response(meta, ev_rx, guard, prompt_tokens, common.include_usage, calls, logprobs))
    } else {
        collect_response(meta, ev_rx, guard, prompt_tokens, calls, logprobs).await
    }
}

/// The request's options, prompt tokens, what steers its reply (its grammar, compiled here so
/// that a schema that cannot be used is a 400 before the request is queued), and whether tool
/// calls are to be read out of the reply.
fn prepare(s: &AppState, kind: Kind, body: &[u8], random_seed: u64) -> Result<(Common, Vec<u32>, Guide, bool), ApiError> {
    let o = api::parse_body(body)?;
    let common = api::parse_common(&o, &s.info.sampling, random_seed)?;
    if kind == Kind::Chat && common.logprobs_count {
        return Err(ApiError::param("logprobs", "'logprobs' must be a boolean on /v1/chat/completions (with top_logprobs for the count)"));
    }
    let mut guide = Guide { logit_bias: api::parse_logit_bias(&o, s.info.n_vocab)?, top_logprobs: common.logprobs, ..Guide::default() };
    let constrainer = |param: &str| s.constrainer.as_ref().map_err(|e| ApiError::param(param, e.clone()));
    let format = api::parse_response_format(&o)?;
    if let Some(grammar) = &format {
        let param = if matches!(grammar, nomoat_runtime::constrain::Grammar::JsonSchema(_)) { "response_format.json_schema.schema" } else { "response_format" };
        let constraint = constrainer("response_format")?
            .compile(grammar)
            .map_err(|e| ApiError::param(param, format!("the schema cannot be used: {e}")).with_code("invalid_schema"))?;
        guide.constraint = Some(constraint);
    }
    let tools = api::parse_tools(&o)?;
    let tools_active = tools.active();
    if tools_active && kind == Kind::Completion {
        return Err(ApiError::param("tools", "tools are for /v1/chat/completions"));
    }
    // llama.cpp's extension: a GBNF (or Lark) grammar for the reply
    let grammar = api::parse_grammar(&o)?;
    if grammar.is_some() && (format.is_some() || tools_active) {
        return Err(ApiError::param("grammar", "grammar is used alone: not with response_format or tools"));
    }
    if let Some(g) = &grammar {
        guide.constraint =
            Some(constrainer("grammar")?.compile(g).map_err(|e| ApiError::param("grammar", format!("the grammar cannot be used: {e}")).with_code("invalid_grammar"))?);
    }
    // with tools, the reply is calls, or (auto) text that fits response_format
    if let Some(grammar) = tools::grammar_with_format(&tools.tools, &tools.choice, tools.parallel, format.as_ref()) {
        let constraint = constrainer("tools")?
            .compile(&grammar)
            .map_err(|e| ApiError::param("tools", format!("a tool's parameters or the response_format schema cannot be used: {e}")).with_code("invalid_schema"))?;
        guide.constraint = Some(constraint);
    }
    let tok = &s.info.tokenizer;
    let prompt = match kind {
        Kind::Chat => {
            let messages = api::parse_chat_messages(&o)?;
            let template = s.info.template.as_ref().map_err(|e| ApiError::invalid(e.clone()).with_code("no_chat_template"))?;
            // the messages' text never becomes a control token (role injection)
            prompt::request_prompt(tok, &s.guard, template, s.template_tools, &messages, &tools.tools).map_err(|e| match e {
                prompt::PromptError::Template(e) => ApiError::param("messages", e.to_string()),
                e @ prompt::PromptError::Tokenizer(_) => ApiError::invalid(e.to_string()),
            })?
        }
        Kind::Completion => {
            api::check_completion_extras(&o)?;
            match api::parse_prompt(&o, tok.vocab_size())? {
                Prompt::Text(t) => tok.encode(&t, true, true).map_err(|e| ApiError::invalid(format!("tokenizing the prompt: {e}")))?,
                Prompt::Tokens(ids) => ids,
            }
        }
    };
    Ok((common, prompt, guide, tools_active))
}

/// Makes the ids of a reply's tool calls: "call_" and 24 hex digits.
struct CallIds(u64);

/// A reply read as tool calls: the text before them (None when empty), each call with its id,
/// and the finish_reason (from the generation's own when a call was cut short).
struct ReadCalls {
    content: Option<String>,
    calls: Vec<(String, ToolCall)>,
    finish: &'static str,
}

impl CallIds {
    /// The calls of a reply with tools, with their ids, and the text before them; None when the
    /// reply is text (it did not start with a call, or its calls do not parse). `generated`: the
    /// generation's finish_reason.
    fn read(&self, text: &str, generated: &'static str) -> Option<ReadCalls> {
        let reply = tools::read_calls(text)?;
        let finish = reply.finish_reason(generated);
        Some(ReadCalls { content: reply.content, calls: tools::with_ids(self.0, reply.calls), finish })
    }
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        // Cancelled only happens when nobody is listening any more.
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

/// `logprobs`: the tokenizer that names the tokens, when the request asked for them.
async fn collect_response(
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<Event>,
    _guard: CancelOnDrop,
    prompt_tokens: usize,
    calls: Option<CallIds>,
    logprobs: Option<Arc<Tokenizer>>,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done(Outcome { completion_tokens, cached_tokens, finish, logprobs: entries }) => {
                let lp = logprobs.as_ref().map_or(Value::Null, |tok| api::logprobs_json(meta.kind, tok, &entries));
                let usage = api::Usage { prompt: prompt_tokens, cached: cached_tokens, completion: completion_tokens };
                if let Some(read) = calls.as_ref().and_then(|c| c.read(&text, finish_str(finish))) {
                    return Ok(Json(meta.tool_response(read.content.as_deref(), &read.calls, read.finish, usage, lp)).into_response());
                }
                return Ok(Json(meta.response(&text, finish_str(finish), usage, lp)).into_response());
            }
            Event::Error(e) => return Err(ApiError::server(e)),
        }
    }
    Err(ApiError::server("the model engine stopped before finishing the request"))
}

struct StreamState {
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Event>,
    pending: VecDeque<SseEvent>,
    done: bool,
    prompt_tokens: usize,
    include_usage: bool,
    /// With tools: the ids to give calls; `held` keeps a reply that starts with '<' (calls,
    /// by the tool grammar) until it is complete, to be sent as `delta.tool_calls`.
    calls: Option<CallIds>,
    held: Option<String>,
    /// The tokenizer that names the tokens when logprobs were asked for: they come with the
    /// last chunk (the finish_reason's), all of them.
    logprobs: Option<Arc<Tokenizer>>,
    _guard: CancelOnDrop,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

fn stream_response(
    meta: Meta,
    rx: mpsc::UnboundedReceiver<Event>,
    guard: CancelOnDrop,
    prompt_tokens: usize,
    include_usage: bool,
    calls: Option<CallIds>,
    logprobs: Option<Arc<Tokenizer>>,
) -> Response {
    let mut pending = VecDeque::new();
    if meta.kind == Kind::Chat {
        pending.push_back(data(&meta.chunk(Some(""), true, None, include_usage)));
    }
    let state = StreamState { meta, rx, pending, done: false, prompt_tokens, include_usage, calls, held: None, logprobs, _guard: guard };
    let stream = futures::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(ev) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(ev), st));
            }
            if st.done {
                return None;
            }
            match st.rx.recv().await {
                Some(Event::Text(t)) => {
                    // a reply with tools that starts with '<' is calls: held until complete
                    if let Some(held) = st.held.as_mut() {
                        held.push_str(&t);
                        continue;
                    }
                    if st.calls.is_some() && t.starts_with('<') {
                        st.held = Some(t);
                        continue;
                    }
                    let c = st.meta.chunk(Some(&t), false, None, st.include_usage);
                    st.pending.push_back(data(&c));
                }
                Some(Event::Done(o)) => {
                    let mut finish = finish_str(o.finish);
                    if let Some(held) = st.held.take() {
                        match st.calls.as_ref().and_then(|c| c.read(&held, finish)) {
                            Some(read) => {
                                if let Some(text) = read.content {
                                    st.pending.push_back(data(&st.meta.chunk(Some(&text), false, None, st.include_usage)));
                                }
                                for c in st.meta.tool_chunks(&read.calls, st.include_usage) {
                                    st.pending.push_back(data(&c));
                                }
                                finish = read.finish;
                            }
                            None => st.pending.push_back(data(&st.meta.chunk(Some(&held), false, None, st.include_usage))),
                        }
                    }
                    let mut c = st.meta.chunk(None, false, Some(finish), st.include_usage);
                    if let Some(tok) = &st.logprobs {
                        c["choices"][0]["logprobs"] = api::logprobs_json(st.meta.kind, tok, &o.logprobs);
                    }
                    st.pending.push_back(data(&c));
                    if st.include_usage {
                        let usage = api::Usage { prompt: st.prompt_tokens, cached: o.cached_tokens, completion: o.completion_tokens };
                        st.pending.push_back(data(&st.meta.usage_chunk(usage)));
                    }
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                Some(Event::Error(e)) => {
                    st.pending.push_back(data(&ApiError::server(e).body()));
                    st.pending.push_back(SseEvent::default().data("[DONE]"));
                    st.done = true;
                }
                None => {
                    st.pending.push_back(data(&ApiError::server("the model engine stopped before finishing the request").body()));
                    st.done = true;
                }
            }
        }
    });
    // Comments while a request waits its turn keep proxies from timing out, and let a closed
    // connection be noticed (and the queued job cancelled) before the engine reaches it.
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(2))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        let p = HostPolicy::new(&["My.Box".to_string(), "proxy.example:8443".to_string()]);
        for ok in ["localhost", "localhost:8080", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:8080", "[::1]", "[::1]:8080", "my.box", "my.box:80", "proxy.example:8443"] {
            assert!(p.allows(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.2",
            "[::1]x",
            "[::1]:x",
            "localhost:",
            "localhost:99999",
            "",
            "proxy.example",
            "proxy.example:80",
            "0.0.0.0:8080",
        ] {
            assert!(!p.allows(bad), "{bad}");
        }
    }

    #[test]
    fn content_types() {
        let with = |t: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, t.parse().unwrap());
            check_content_type(&h)
        };
        assert!(with("application/json").is_ok());
        assert!(with("Application/JSON; charset=utf-8").is_ok());
        for bad in ["text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonx"] {
            assert_eq!(with(bad).unwrap_err().status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad}");
        }
        assert_eq!(check_content_type(&HeaderMap::new()).unwrap_err().status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
