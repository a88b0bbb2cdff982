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
//! The chat page (www/) is served at `/` and the loaded model file at `/models/<its name>`, so
//! the page can run the same model in the browser; `--no-www` turns both off. Connections are
//! capped, headers must arrive within `--header-timeout`, bodies within `--body-timeout`;
//! cross-origin requests get no CORS headers unless `--cors-origin` names the origin. See
//! SECURITY.md for the threat model.

mod api;
mod engine;

use crate::ModelArgs;
use anyhow::{Context, Result};
use api::{ApiError, Common, Kind, Meta, Prompt};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use clap::Args;
use engine::{Event, Job, ModelInfo, Outcome, Stats};
use nomoat_runtime::generate::{FinishReason, GenerateOptions};
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
    /// Address to listen on (loopback by default; 0.0.0.0 opens the server to the network)
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 = any free port; the address is printed once listening)
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require this key as a Bearer token (Authorization: Bearer KEY) on every route but /health
    #[arg(long)]
    pub api_key: Option<String>,
    /// Requests that may wait for the model at once (beyond the one it is working on); more
    /// are answered 503
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
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
    /// Allow cross-origin requests from this origin (repeatable; e.g. http://localhost:3000).
    /// Without it browsers on other origins cannot read the API's answers
    #[arg(long = "cors-origin")]
    pub cors_origins: Vec<String>,
    /// Open connections at once; more are closed on accept
    #[arg(long, default_value_t = 256)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (also how long an idle keep-alive
    /// connection stays open)
    #[arg(long, default_value_t = 15)]
    pub header_timeout: u64,
    /// Seconds a client has to send a request's body (408 after)
    #[arg(long, default_value_t = 30)]
    pub body_timeout: u64,
}

/// Largest request body accepted (413 beyond).
const MAX_BODY: usize = 1 << 20;

struct AppState {
    info: ModelInfo,
    jobs: mpsc::Sender<Job>,
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

pub fn run(a: ServeArgs) -> Result<()> {
    let path = a.m.model.clone().unwrap_or_else(crate::default_model);
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
    let info = engine::start(a.m.clone(), jobs_rx, stats.clone())?;
    let n_ctx = info.n_ctx;
    let device = info.device.clone();
    if let Err(e) = &info.template {
        eprintln!("note: {e}");
    }
    let state = Arc::new(AppState {
        info,
        jobs: jobs_tx,
        max_queue,
        max_tokens_limit: a.max_tokens_limit,
        api_key: a.api_key.clone().filter(|k| !k.is_empty()),
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
        eprintln!("nomoat serve: listening on http://{addr}{}", if state.api_key.is_some() { " (API key required)" } else { "" });
        let www = if a.no_www { None } else { www_dir(a.www.clone())? };
        match &www {
            Some(d) => eprintln!("nomoat serve: chat page at http://{addr}/ (from {})", d.display()),
            None if !a.no_www => eprintln!("nomoat serve: no chat page (www/pkg is not built: scripts/build-web.sh)"),
            None => {}
        }
        let opts = RouterOptions { www, model_file: path.clone(), cors_origins: a.cors_origins.clone(), body_timeout: Duration::from_secs(a.body_timeout.max(1)) };
        let app = router(state, &opts)?;
        let shutdown = async {
            let ctrl_c = tokio::signal::ctrl_c();
            #[cfg(unix)]
            {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            #[cfg(not(unix))]
            ctrl_c.await.ok();
        };
        tokio::select! {
            _ = accept_loop(listener, app, a.max_connections.max(1), Duration::from_secs(a.header_timeout.max(1))) => {}
            _ = shutdown => eprintln!("nomoat serve: shutting down"),
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
async fn accept_loop(listener: tokio::net::TcpListener, app: Router, max_connections: usize, header_timeout: Duration) {
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
        tokio::spawn(async move {
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
            let _ = http.serve_connection(TokioIo::new(sock), service).await;
            drop(slot);
        });
    }
}

struct RouterOptions {
    www: Option<PathBuf>,
    model_file: PathBuf,
    cors_origins: Vec<String>,
    body_timeout: Duration,
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
        .method_not_allowed_fallback(method_not_allowed)
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let mut app = Router::new().route("/health", get(health)).route("/v1/health", get(health)).merge(api);
    app = match &o.www {
        // tower-http's ServeDir refuses `..` and absolute components: nothing outside www/
        Some(dir) => {
            let name = o.model_file.file_name().unwrap_or_default().to_string_lossy().to_string();
            let model = tower_http::services::ServeFile::new(&o.model_file);
            app.route_service(&format!("/models/{name}"), model)
                .fallback_service(tower_http::services::ServeDir::new(dir).call_fallback_on_method_not_allowed(true).fallback(axum::routing::any(not_found)))
        }
        None => app.fallback(not_found),
    };
    app = app
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(o.body_timeout))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(content_length_limit));
    if !o.cors_origins.is_empty() {
        let origins = o.cors_origins.iter().map(|s| s.parse::<header::HeaderValue>()).collect::<Result<Vec<_>, _>>().context("--cors-origin")?;
        app = app.layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
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

async fn chat_completions(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    complete(s, Kind::Chat, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    complete(s, Kind::Completion, body).await.unwrap_or_else(IntoResponse::into_response)
}

fn body_error(r: BytesRejection) -> ApiError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&r);
    while let Some(e) = source {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return ApiError::new(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "the request body did not arrive in time").with_code("request_timeout");
        }
        source = e.source();
    }
    let status = r.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(status, "invalid_request_error", format!("the request body is larger than the {MAX_BODY}-byte limit")).with_code("request_too_large")
    } else {
        ApiError::new(
            if status.is_client_error() { status } else { StatusCode::BAD_REQUEST },
            "invalid_request_error",
            format!("could not read the request body: {}", r.body_text()),
        )
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

async fn complete(s: Shared, kind: Kind, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let body = body.map_err(body_error)?;
    let id_n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let random = mix(s.started ^ mix(id_n) ^ SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0));
    // parsing, templating and tokenizing a large body takes a while: off the async workers
    let s2 = s.clone();
    let (common, prompt) =
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
    let mut max_tokens = common.max_tokens.unwrap_or(room).min(room);
    if s.max_tokens_limit > 0 {
        max_tokens = max_tokens.min(s.max_tokens_limit);
    }
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
        cancel: cancel.clone(),
        events: ev_tx,
    };
    s.jobs.try_send(job).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", format!("the server is busy: {} requests are already waiting; try again shortly", s.max_queue))
                .with_code("queue_full")
        }
        mpsc::error::TrySendError::Closed(_) => ApiError::server("the model engine has stopped"),
    })?;
    let meta =
        Meta { kind, id: format!("{}-{:016x}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }, mix(random)), created: unix_now(), model: s.model_id.clone() };
    let guard = CancelOnDrop(cancel);
    if common.stream {
        Ok(stream_response(meta, ev_rx, guard, prompt_tokens, common.include_usage))
    } else {
        collect_response(meta, ev_rx, guard, prompt_tokens).await
    }
}

/// The request's options and prompt tokens.
fn prepare(s: &AppState, kind: Kind, body: &[u8], random_seed: u64) -> Result<(Common, Vec<u32>), ApiError> {
    let o = api::parse_body(body)?;
    let common = api::parse_common(&o, &s.info.sampling, random_seed)?;
    let tok = &s.info.tokenizer;
    let prompt = match kind {
        Kind::Chat => {
            let messages = api::parse_messages(&o)?;
            let template = s.info.template.as_ref().map_err(|e| ApiError::invalid(e.clone()).with_code("no_chat_template"))?;
            let text = template.render(&messages, true).map_err(|e| ApiError::param("messages", e.to_string()))?;
            tok.encode(&text, false, true).map_err(|e| ApiError::invalid(format!("tokenizing the prompt: {e}")))?
        }
        Kind::Completion => {
            api::check_completion_extras(&o)?;
            match api::parse_prompt(&o, tok.vocab_size())? {
                Prompt::Text(t) => tok.encode(&t, true, true).map_err(|e| ApiError::invalid(format!("tokenizing the prompt: {e}")))?,
                Prompt::Tokens(ids) => ids,
            }
        }
    };
    Ok((common, prompt))
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Length => "length",
        // Cancelled only happens when nobody is listening any more.
        FinishReason::Stop | FinishReason::Cancelled => "stop",
    }
}

async fn collect_response(meta: Meta, mut rx: mpsc::UnboundedReceiver<Event>, _guard: CancelOnDrop, prompt_tokens: usize) -> Result<Response, ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done(Outcome { completion_tokens, finish, .. }) => {
                return Ok(Json(meta.response(&text, finish_str(finish), prompt_tokens, completion_tokens)).into_response());
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
    _guard: CancelOnDrop,
}

fn data(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

fn stream_response(meta: Meta, rx: mpsc::UnboundedReceiver<Event>, guard: CancelOnDrop, prompt_tokens: usize, include_usage: bool) -> Response {
    let mut pending = VecDeque::new();
    if meta.kind == Kind::Chat {
        pending.push_back(data(&meta.chunk(Some(""), true, None, include_usage)));
    }
    let state = StreamState { meta, rx, pending, done: false, prompt_tokens, include_usage, _guard: guard };
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
                    let c = st.meta.chunk(Some(&t), false, None, st.include_usage);
                    st.pending.push_back(data(&c));
                }
                Some(Event::Done(o)) => {
                    let c = st.meta.chunk(None, false, Some(finish_str(o.finish)), st.include_usage);
                    st.pending.push_back(data(&c));
                    if st.include_usage {
                        st.pending.push_back(data(&st.meta.usage_chunk(st.prompt_tokens, o.completion_tokens)));
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
