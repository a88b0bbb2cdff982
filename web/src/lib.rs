//! nomoat in the browser: an [`Engine`] class, exported with wasm-bindgen, over the same
//! `nomoat-runtime` the native CLI uses (GGUF reader, WGSL kernels, model graphs, tokenizer,
//! chat templates, sampler).
//!
//! Model bytes never sit in wasm memory as a whole: a JS-side reader (see `js/sources.js`)
//! hands out ranges of a download in progress, a cached download or a `File`, the header is
//! parsed from a growing prefix ([`Gguf::parse_prefix`]) and each tensor is copied in, uploaded
//! to the GPU and dropped before the next one is read.
//!
//! Every method returns a promise; failures reject with a JS `Error` whose `name` says what kind
//! of failure it is: `NoWebGPU`, `NotGGUF`, `UnsupportedModel`, `InvalidModel`, `OutOfMemory`,
//! `DeviceLost`, `ReadError`, `Busy`, `NoModel`, `BadRequest`, `ContextFull`, `GPUError`.
// The engine's RefCell is its lock: every entry point takes it with try_borrow(_mut) and
// answers Busy while another call holds it across its awaits, so no borrow can panic.
#![allow(clippy::await_holding_refcell_ref)]

use js_sys::{Function, Promise, Reflect, Uint8Array};
use nomoat_runtime::arch::Config;
use nomoat_runtime::chat::{ChatTemplate, Message};
use nomoat_runtime::constrain::{Constrainer, FieldError, Grammar, Guide};
use nomoat_runtime::device::{Gpu, GpuError, GpuOptions};
use nomoat_runtime::error::{ByteSource, ModelError};
use nomoat_runtime::generate::{self, GenerateOptions};
use nomoat_runtime::gguf::{Gguf, GgufError, Parse};
use nomoat_runtime::lora::LoraAdapter;
use nomoat_runtime::model::Model;
use nomoat_runtime::ops::KvType;
use nomoat_runtime::prompt::{self, Guard};
use nomoat_runtime::sampler::{SamplerConfig, SamplingOverrides};
use nomoat_runtime::session::Session;
use nomoat_runtime::tokenizer::Tokenizer;
use nomoat_runtime::tools::{self, ToolRequest};
use nomoat_runtime::train::data::{read_jsonl, DataOptions};
use nomoat_runtime::train::run::{context_of, memory_needed, Run, RunOptions};
use serde::Deserialize;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::{future_to_promise, JsFuture};

mod conformance;

// ---------------------------------------------------------------------------------------------
// JS side: byte sources (js/sources.js, copied into pkg/snippets by wasm-bindgen).

#[wasm_bindgen(module = "/js/sources.js")]
extern "C" {
    /// A model's bytes: `size` (bytes, or null while unknown), `read(offset, length)` resolving
    /// to a Uint8Array (shorter only at the end of the file), `plan(ranges)`, `finish()`,
    /// `close()`.
    pub type Reader;
    #[wasm_bindgen(method, getter)]
    fn size(this: &Reader) -> Option<f64>;
    #[wasm_bindgen(method, getter)]
    fn name(this: &Reader) -> String;
    #[wasm_bindgen(method, getter, js_name = fromCache)]
    fn from_cache(this: &Reader) -> bool;
    #[wasm_bindgen(method)]
    fn read(this: &Reader, offset: f64, length: f64) -> Promise;
    /// The byte ranges (flat [start, end, start, end, ...]) that will be read, each once: a
    /// streaming reader frees a downloaded chunk once every planned byte in it has been read.
    #[wasm_bindgen(method)]
    fn plan(this: &Reader, ranges: Vec<f64>);
    /// Resolves once the download (and its copy into the Cache API) is complete.
    #[wasm_bindgen(method)]
    fn finish(this: &Reader) -> Promise;
    /// Give up: abort a download in progress and forget its partial cache entry.
    #[wasm_bindgen(method)]
    fn close(this: &Reader);

    #[wasm_bindgen(js_name = openUrl)]
    fn open_url(url: &str, on_progress: &JsValue, use_cache: bool, max_buffered: f64) -> Promise;
    #[wasm_bindgen(js_name = openFile)]
    fn open_file(file: &JsValue) -> Promise;
    #[wasm_bindgen(js_name = hasWebGPU)]
    fn has_webgpu() -> bool;
    #[wasm_bindgen(js_name = adapterInfo)]
    fn adapter_info() -> Promise;
}

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = console, js_name = error)]
    fn console_error(s: &str);
}

// ---------------------------------------------------------------------------------------------
// Errors.

fn js_error(kind: &str, msg: impl std::fmt::Display) -> JsValue {
    let e = js_sys::Error::new(&msg.to_string());
    e.set_name(kind);
    e.into()
}

fn js_message(v: &JsValue) -> String {
    if let Some(e) = v.dyn_ref::<js_sys::Error>() {
        return String::from(e.message());
    }
    v.as_string().unwrap_or_else(|| format!("{v:?}"))
}

fn gpu_error(e: &GpuError) -> JsValue {
    match e {
        GpuError::OutOfMemory { .. } => js_error("OutOfMemory", format!("{e} — try a smaller model or a smaller context")),
        GpuError::DeviceLost(_) => js_error("DeviceLost", format!("{e} — reload the page to start again")),
        GpuError::NoAdapter(_) | GpuError::RequestDevice(_) => js_error("NoWebGPU", e),
        _ => js_error("GPUError", e),
    }
}

fn model_error(e: &ModelError) -> JsValue {
    match e {
        ModelError::UnsupportedArchitecture(_) | ModelError::UnsupportedType { .. } => js_error("UnsupportedModel", e),
        ModelError::Gpu(g) => gpu_error(g),
        ModelError::OutOfMemoryLoading { .. } => js_error("OutOfMemory", e),
        ModelError::Io(_) => js_error("ReadError", e),
        ModelError::ContextFull { .. } => js_error("ContextFull", e),
        ModelError::Metadata(GgufError::BadMagic { .. }) => js_error("NotGGUF", e),
        _ => js_error("InvalidModel", e),
    }
}

fn gguf_error(e: &GgufError) -> JsValue {
    match e {
        GgufError::BadMagic { .. } => js_error("NotGGUF", e),
        _ => js_error("InvalidModel", format!("not a usable GGUF file: {e}")),
    }
}

// ---------------------------------------------------------------------------------------------
// ByteSource over a JS reader.

async fn read_js(reader: &Reader, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let v = JsFuture::from(reader.read(offset as f64, len as f64)).await.map_err(|e| js_message(&e))?;
    let arr = Uint8Array::new(&v);
    Ok(arr.to_vec())
}

struct JsSource<'a>(&'a Reader);

impl ByteSource for JsSource<'_> {
    async fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let v = JsFuture::from(self.0.read(offset as f64, buf.len() as f64)).await.map_err(|e| js_message(&e))?;
        let arr = Uint8Array::new(&v);
        if arr.length() as usize != buf.len() {
            return Err(format!("the file ended early: {} of {} bytes at offset {offset}", arr.length(), buf.len()));
        }
        arr.copy_to(buf);
        Ok(())
    }
}

/// Parse the header from a growing prefix: 1 MiB first, then as much as the parser asks for.
async fn read_header(reader: &Reader) -> Result<Gguf, JsValue> {
    let size = reader.size().map(|s| s as u64);
    let mut want: u64 = 1 << 20;
    loop {
        let n = size.map_or(want, |s| want.min(s));
        let bytes = read_js(reader, 0, n as usize).await.map_err(|e| js_error("ReadError", e))?;
        let at_end = (bytes.len() as u64) < n || size == Some(n);
        let parsed = match size {
            Some(s) => Gguf::parse_prefix_of_file(&bytes, s),
            None => Gguf::parse_prefix(&bytes),
        };
        match parsed {
            Ok(Parse::Complete(g)) => {
                if let Some(s) = size {
                    g.check_file_len(s).map_err(|e| gguf_error(&e))?;
                }
                return Ok(g);
            }
            Ok(Parse::NeedMore { at_least }) => {
                if at_end {
                    return Err(js_error("InvalidModel", format!("not a usable GGUF file: it ends ({} bytes) inside its header", bytes.len())));
                }
                want = (at_least as u64).max(want * 2);
            }
            Err(e) => return Err(gguf_error(&e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The engine.

struct Loaded {
    // The sessions and a fine-tuning run share `model` and the engine's `Gpu` (Arc): no borrow
    // ties them together, so they are 'static.
    /// The "default" conversation's session (KV cache), made at load.
    session: Session<'static>,
    /// Conversations chat() named, each with a KV cache of its own over the same weights.
    others: Vec<(String, Session<'static>)>,
    /// A fine-tuning run started with `finetune_start`, until `finetune_end` (or unload).
    training: Option<Run<'static>>,
    /// Compiles response formats over this model's vocabulary: built at the first request for
    /// one (the token trie takes a moment), or why this model cannot have them.
    constrainer: Option<Result<Constrainer, String>>,
    /// LoRA adapters added for this model, active or not (the session holds the active ones
    /// with their scales).
    adapters: Vec<Arc<LoraAdapter>>,
    model: Arc<Model>,
    /// The model's header: adapters are checked against its tensor names and shapes.
    gguf: Gguf,
    /// The model's recommended sampling values (its header's general.sampling.*, else its catalog entry's).
    sampling: SamplingOverrides,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    /// What chat messages' text is marked with, so that none of it becomes a control token.
    guard: Guard,
    /// Whether the chat template shows tools itself (else the generic tool prompt is used).
    template_tools: bool,
    /// The KV cache type and the memory limit of the load, for sessions made later.
    kv: KvType,
    max_gpu_memory: Option<u64>,
    name: String,
    from_cache: bool,
    load_seconds: f64,
}

struct Inner {
    // every session and model buffer belongs to `gpu`; the sessions hold it too
    loaded: Option<Loaded>,
    gpu: Arc<Gpu>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct LoadOptions {
    /// Context size in tokens (default 2048, at most the model's training context).
    n_ctx: Option<usize>,
    /// "f16" (default) or "f32".
    kv: Option<String>,
    /// Use the Cache API for URL loads (default true).
    cache: Option<bool>,
    /// GPU memory the model may take, in MiB (weights + KV cache): a larger model is refused
    /// before anything is uploaded. Browsers do not say how much memory a GPU has.
    max_gpu_memory: Option<u64>,
    /// Downloaded bytes a URL load may hold in memory before it pauses the network (default
    /// 64 MiB, sources.js).
    max_buffered_bytes: Option<f64>,
}

/// Sampling options left out take the model's `general.sampling.*` values, else llama.cpp's
/// defaults (`SamplingOverrides::defaults`).
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ChatOptions {
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    presence_penalty: f32,
    frequency_penalty: f32,
    seed: Option<u64>,
    max_tokens: usize,
    stop: Vec<String>,
    /// OpenAI's `response_format` (json_object, or json_schema {name, schema, strict}): the
    /// reply is constrained to it, as the server's are.
    response_format: Option<serde_json::Value>,
    /// Which conversation: each name has its own KV cache over the one model (default
    /// "default"), made at its first use.
    session: Option<String>,
    /// OpenAI's `tools`, `tool_choice` and `parallel_tool_calls`, as the server takes them.
    tools: Option<serde_json::Value>,
    tool_choice: Option<serde_json::Value>,
    parallel_tool_calls: Option<serde_json::Value>,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions {
            temperature: None,
            top_k: None,
            top_p: None,
            min_p: None,
            repeat_penalty: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            max_tokens: 512,
            stop: Vec::new(),
            response_format: None,
            session: None,
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
        }
    }
}

impl ChatOptions {
    fn generate_options(&self, defaults: &SamplerConfig) -> GenerateOptions {
        let chosen = SamplingOverrides {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            ..Default::default()
        };
        let sampler = SamplerConfig {
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed.unwrap_or(SamplerConfig::DEFAULT_SEED),
            ..chosen.over(defaults)
        };
        GenerateOptions { max_tokens: self.max_tokens, sampler, stop: self.stop.clone(), stop_at_eog: true }
    }
}

/// `finetune_start`'s options: `nomoat finetune`'s flags, in snake case.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FinetuneOptions {
    rank: u32,
    alpha: f32,
    targets: Vec<String>,
    lr: f32,
    epochs: Option<u32>,
    steps: Option<u32>,
    batch_tokens: usize,
    ctx: usize,
    strict: bool,
    seed: u64,
    /// Validation examples, JSONL like the training data.
    valid: Option<String>,
    valid_every: u32,
}

impl Default for FinetuneOptions {
    fn default() -> Self {
        let r = RunOptions::default();
        FinetuneOptions {
            rank: r.rank,
            alpha: r.alpha,
            targets: r.targets,
            lr: r.lr,
            epochs: None,
            steps: None,
            batch_tokens: r.batch_tokens,
            ctx: 512,
            strict: false,
            seed: r.seed,
            valid: None,
            valid_every: r.valid_every,
        }
    }
}

fn field_error(e: FieldError) -> JsValue {
    js_error("BadRequest", format!("{}: {}", e.param, e.message))
}

fn parse_json<'a, T: Deserialize<'a>>(what: &str, s: &'a str) -> Result<T, JsValue> {
    serde_json::from_str(s).map_err(|e| js_error("BadRequest", format!("{what}: {e}")))
}

/// Options given as JSON, or their defaults when none (or an empty string) are given.
fn parse_options<T: for<'de> Deserialize<'de> + Default>(what: &str, json: Option<&str>) -> Result<T, JsValue> {
    match json {
        Some(s) if !s.trim().is_empty() => parse_json(what, s),
        _ => Ok(T::default()),
    }
}

/// Loads a GGUF model into WebGPU and chats with it. One engine holds one model and one
/// conversation's KV cache (a new conversation reuses the longest shared prefix).
#[wasm_bindgen]
pub struct Engine {
    inner: Rc<RefCell<Inner>>,
    abort: Rc<Cell<bool>>,
}

fn busy() -> JsValue {
    js_error("Busy", "the engine is busy with another load or chat; wait for it or call stop()")
}

#[wasm_bindgen]
impl Engine {
    /// Opens the WebGPU device (adapter's own limits; shader-f16 and subgroups when offered).
    pub async fn create() -> Result<Engine, JsValue> {
        std::panic::set_hook(Box::new(|info| console_error(&format!("nomoat panicked: {info}"))));
        if !has_webgpu() {
            return Err(js_error(
                "NoWebGPU",
                "this browser has no WebGPU (navigator.gpu is missing): use a recent Chrome, Edge or Safari, or Firefox with WebGPU enabled, on a secure (https or localhost) page",
            ));
        }
        let mut gpu = Gpu::new(GpuOptions::default()).await.map_err(|e| gpu_error(&e))?;
        // wgpu's browser backend reports an empty adapter name and calls every adapter but a
        // "fallback" one a GPU. Name it from GPUAdapterInfo, and mark software adapters
        // (Chromium's SwiftShader) as CPUs so the kernels choose as they do natively on CPU
        // devices (prefill through matvec's token loop rather than the tiled matmul).
        if let Ok(v) = JsFuture::from(adapter_info()).await {
            let get = |k: &str| Reflect::get(&v, &k.into()).ok().and_then(|s| s.as_string()).unwrap_or_default();
            let (vendor, arch, desc) = (get("vendor"), get("architecture"), get("description"));
            let fallback = Reflect::get(&v, &"fallback".into()).ok().and_then(|b| b.as_bool()).unwrap_or(false);
            let mut info = gpu.info.clone();
            if info.name.is_empty() {
                info.name = [vendor.as_str(), arch.as_str(), desc.as_str()].iter().filter(|s| !s.is_empty()).cloned().collect::<Vec<_>>().join(" ");
            }
            if fallback || arch.eq_ignore_ascii_case("swiftshader") {
                info.device_type = wgpu::DeviceType::Cpu;
            }
            gpu.set_adapter_info(info);
        }
        Ok(Engine { inner: Rc::new(RefCell::new(Inner { loaded: None, gpu: Arc::new(gpu) })), abort: Rc::new(Cell::new(false)) })
    }

    /// The device: adapter name, backend, kernel variant, largest binding.
    pub fn device(&self) -> String {
        match self.inner.try_borrow() {
            Ok(i) => i.gpu.describe(),
            Err(_) => "(busy)".into(),
        }
    }

    /// Destroys the GPU device as a driver reset or the browser would: what every later call
    /// then rejects with (`DeviceLost`) is what a real loss gives. For tests of the page.
    pub fn simulate_device_loss(&self) -> Result<(), JsValue> {
        let inner = self.inner.try_borrow().map_err(|_| busy())?;
        inner.gpu.device.destroy();
        Ok(())
    }

    /// Streams a model from `url` (fetch; the Cache API keeps a copy, and a cached copy is read
    /// without touching the network). `progress_cb({phase: "download" | "upload", done, total})`.
    /// `options_json`: {"n_ctx": 2048, "kv": "f16", "cache": true}. Resolves to the model's info.
    pub fn load_from_url(&self, url: String, progress_cb: Option<Function>, options_json: Option<String>) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let opts: LoadOptions = parse_options("load options", options_json.as_deref())?;
            let cb = progress_cb.map(JsValue::from).unwrap_or(JsValue::UNDEFINED);
            let reader: Reader = JsFuture::from(open_url(&url, &cb, opts.cache.unwrap_or(true), opts.max_buffered_bytes.unwrap_or(0.0)))
                .await
                .map_err(|e| js_error("ReadError", format!("downloading {url}: {}", js_message(&e))))?
                .unchecked_into();
            load(inner, reader, cb, opts).await
        })
    }

    /// Loads a model from a `File` (or `Blob`), reading it slice by slice.
    pub fn load_from_file(&self, file: JsValue, progress_cb: Option<Function>, options_json: Option<String>) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let opts: LoadOptions = parse_options("load options", options_json.as_deref())?;
            let reader: Reader = JsFuture::from(open_file(&file)).await?.unchecked_into();
            let cb = progress_cb.map(JsValue::from).unwrap_or(JsValue::UNDEFINED);
            load(inner, reader, cb, opts).await
        })
    }

    /// Loads from any reader object with the shape js/sources.js documents.
    pub fn load_from_reader(&self, reader: JsValue, progress_cb: Option<Function>, options_json: Option<String>) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let opts: LoadOptions = parse_options("load options", options_json.as_deref())?;
            let cb = progress_cb.map(JsValue::from).unwrap_or(JsValue::UNDEFINED);
            load(inner, reader.unchecked_into(), cb, opts).await
        })
    }

    /// The loaded model as JSON: name, architecture, sizes, context, device.
    pub fn info(&self) -> Result<String, JsValue> {
        let inner = self.inner.try_borrow().map_err(|_| busy())?;
        let l = inner.loaded.as_ref().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
        Ok(info_json(&inner.gpu, l).to_string())
    }

    /// The prompt text the model's chat template makes of `messages_json`
    /// ([{"role", "content"}, ...]), ending where the assistant's reply begins.
    pub fn render(&self, messages_json: String) -> Result<String, JsValue> {
        let inner = self.inner.try_borrow().map_err(|_| busy())?;
        let l = inner.loaded.as_ref().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
        render(l, &messages_json)
    }

    /// Replies to a conversation (`messages_json`: [{"role": "system" | "user" | "assistant",
    /// "content"}]) with the model's chat template. `options_json`: {"temperature", "top_k",
    /// "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty", "seed",
    /// "max_tokens", "stop", "response_format"}. `on_piece(text)` is called with each piece as it decodes.
    /// Resolves to JSON {text, tokens, prompt_tokens, reused_tokens, prompt_tps, gen_tps,
    /// finish_reason ("stop" | "length" | "cancelled")}.
    pub fn chat(&self, messages_json: String, options_json: Option<String>, on_piece: Option<Function>) -> Promise {
        self.run(Some(messages_json), None, options_json, on_piece)
    }

    /// Like [`Engine::chat`] for a raw prompt (no template; BOS added where the model asks).
    pub fn complete(&self, prompt: String, options_json: Option<String>, on_piece: Option<Function>) -> Promise {
        self.run(None, Some(prompt), options_json, on_piece)
    }

    /// The last position's logits (a Float32Array of n_vocab) after the token ids `ids_json`
    /// (a JSON list), with the KV cache type chosen at load: from an empty cache, or with
    /// `reuse_prefix` after the longest prefix of the ids the cache already holds (the last id
    /// is always evaluated), so that one more id a call decodes token by token as a reply
    /// does. The cache then holds these ids, in place of the conversation's.
    pub fn logits(&self, ids_json: String, reuse_prefix: Option<bool>) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let ids: Vec<u32> = parse_json("token ids", &ids_json)?;
            let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
            let l = guard.loaded.as_mut().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
            let n_vocab = l.model.config.n_vocab;
            if ids.is_empty() {
                return Err(js_error("BadRequest", "no token ids to evaluate"));
            }
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= n_vocab) {
                return Err(js_error("BadRequest", format!("token id {bad} is outside the vocabulary of {n_vocab}")));
            }
            let keep = if reuse_prefix == Some(true) {
                l.session.keep_prefix_of(&ids)
            } else {
                l.session.reset();
                0
            };
            let logits = l.session.eval_logits(&ids[keep..]).await.map_err(|e| model_error(&e))?;
            Ok(js_sys::Float32Array::from(&logits[..]).into())
        })
    }

    /// Stops the reply being written (it resolves with finish_reason "cancelled").
    pub fn stop(&self) {
        self.abort.set(true);
    }

    /// Adds a LoRA adapter (llama.cpp's GGUF adapter format) from a `File`, checked against the
    /// loaded model (architecture, tensor names, shapes: an adapter for another model is
    /// refused, naming the first tensor that does not fit). It starts inactive; see
    /// `set_adapters`. Resolves to JSON {name, bytes, tensors, alpha}.
    pub fn add_adapter(&self, file: JsValue) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let reader: Reader = JsFuture::from(open_file(&file)).await.map_err(|e| js_error("ReadError", js_message(&e)))?.unchecked_into();
            let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
            let inner = &mut *guard;
            let l = inner.loaded.as_mut().ok_or_else(|| js_error("NoModel", "load a model before adding adapters"))?;
            let file_name = reader.name();
            let name = file_name.strip_suffix(".gguf").unwrap_or(&file_name).to_string();
            if l.adapters.iter().any(|a| a.name == name) {
                return Err(js_error("BadRequest", format!("an adapter named '{name}' is already added")));
            }
            let ag = read_header(&reader).await?;
            let adapter = LoraAdapter::load(&name, &ag, &mut JsSource(&reader), &inner.gpu, &l.model.config, &l.gguf).await.map_err(|e| match e {
                ModelError::Gpu(g) => gpu_error(&g),
                e => js_error("InvalidAdapter", e),
            })?;
            let info = adapter_json(&adapter, None);
            l.adapters.push(Arc::new(adapter));
            Ok(JsValue::from_str(&info.to_string()))
        })
    }

    /// The adapters that apply from the next reply on, with their scales: JSON
    /// [{"name": "...", "scale": 1.0}, ...] ([] for the base model). Changing the set clears
    /// the conversation's cache (it was computed with the old weights).
    pub fn set_adapters(&self, active_json: String) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Active {
                name: String,
                scale: f32,
            }
            let active: Vec<Active> = parse_json("adapters", &active_json)?;
            let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
            let l = guard.loaded.as_mut().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
            let mut set = Vec::new();
            for a in active {
                if !a.scale.is_finite() {
                    return Err(js_error("BadRequest", format!("adapter '{}': the scale must be a finite number", a.name)));
                }
                let adapter = l.adapters.iter().find(|x| x.name == a.name).ok_or_else(|| js_error("BadRequest", format!("no adapter named '{}' is added", a.name)))?;
                set.push((adapter.clone(), a.scale));
            }
            l.set_active(set).await.map_err(|e| model_error(&e))?;
            Ok(JsValue::from_str(&adapters_json(l).to_string()))
        })
    }

    /// Removes an adapter (deactivating it first) and frees its GPU memory.
    pub fn remove_adapter(&self, name: String) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
            let l = guard.loaded.as_mut().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
            let i = l.adapters.iter().position(|a| a.name == name).ok_or_else(|| js_error("BadRequest", format!("no adapter named '{name}' is added")))?;
            let keep: Vec<_> = l.session.adapters().iter().filter(|(a, _)| a.name != name).cloned().collect();
            l.set_active(keep).await.map_err(|e| model_error(&e))?;
            l.adapters.remove(i);
            Ok(JsValue::from_str(&adapters_json(l).to_string()))
        })
    }

    /// JSON [{name, bytes, tensors, alpha, active, scale}] of the added adapters.
    pub fn adapters(&self) -> Result<String, JsValue> {
        let inner = self.inner.try_borrow().map_err(|_| busy())?;
        let l = inner.loaded.as_ref().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
        Ok(adapters_json(l).to_string())
    }

    /// JSON [{name, tokens, n_ctx}] of the conversations over the loaded model ("default"
    /// first; chat's `session` option makes others).
    pub fn sessions(&self) -> Result<String, JsValue> {
        let inner = self.inner.try_borrow().map_err(|_| busy())?;
        let l = inner.loaded.as_ref().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
        Ok(l.sessions_json().to_string())
    }

    /// Frees a conversation's KV cache ("default" is emptied, not removed); resolves to the
    /// remaining list.
    pub fn close_session(&self, name: String) -> Result<String, JsValue> {
        let mut inner = self.inner.try_borrow_mut().map_err(|_| busy())?;
        let l = inner.loaded.as_mut().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
        if name == DEFAULT_SESSION {
            l.session.reset();
        } else {
            let i = l.others.iter().position(|(n, _)| *n == name).ok_or_else(|| js_error("BadRequest", format!("no conversation named '{name}'")))?;
            l.others.remove(i);
        }
        Ok(l.sessions_json().to_string())
    }

    /// llama-bench's pp / tg on the loaded model, the same routine `nomoat bench` runs
    /// (`generate::bench_once`): `reps` repetitions after a warm-up; resolves to JSON
    /// {device, prompt_tps: [..], gen_tps: [..]}. Clears the conversation's cache.
    pub fn bench(&self, n_prompt: usize, n_gen: usize, reps: usize) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
            let inner = &mut *guard;
            let l = inner.loaded.as_mut().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
            if n_prompt + n_gen >= l.session.n_ctx {
                return Err(js_error("ContextFull", format!("pp{n_prompt} + tg{n_gen} needs a context over {} tokens", l.session.n_ctx)));
            }
            let ids = generate::bench_ids(n_prompt, l.model.config.n_vocab);
            generate::bench_warm_up(&mut l.session, &ids).await.map_err(|e| model_error(&e))?;
            let (mut pp, mut tg) = (Vec::new(), Vec::new());
            for _ in 0..reps.max(1) {
                let run = generate::bench_once(&mut l.session, &ids[..n_prompt], n_gen, &[], &mut || {}).await.map_err(|e| model_error(&e))?;
                pp.push(run.prompt_tps);
                tg.push(run.gen_tps);
            }
            l.session.reset();
            let report = serde_json::json!({"device": inner.gpu.describe(), "prompt_tps": pp, "gen_tps": tg});
            Ok(JsValue::from_str(&report.to_string()))
        })
    }

    /// Runs the runtime's kernel conformance suite on this device (the cases and bounds the
    /// native tests use), or the ops whose names contain `filter`; resolves to a JSON report,
    /// see conformance.rs.
    pub fn run_conformance(&self, filter: Option<String>) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let inner = inner.try_borrow().map_err(|_| busy())?;
            Ok(JsValue::from_str(&conformance::run(&inner.gpu, filter.as_deref().unwrap_or("")).await.to_string()))
        })
    }

    /// Starts fine-tuning a LoRA adapter on the loaded model (the runtime's `train::run`, the
    /// loop `nomoat finetune` runs). `data`: JSONL, one {"messages"}, {"prompt", "completion"}
    /// or {"text"} a line. `options_json`: {rank, alpha, targets, lr, epochs | steps,
    /// batch_tokens, ctx, strict, seed, valid (JSONL), valid_every}. Resolves to JSON {format,
    /// examples, skipped_too_long, tokens, trained_tokens, valid_examples, memory_mib: {weights,
    /// adapters, activations}, steps, adapters}; rejects with OutOfMemory where the model's
    /// max_gpu_memory leaves too little for the run.
    /// Replaces a run already started.
    pub fn finetune_start(&self, data: String, options_json: Option<String>) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
            let inner = &mut *guard;
            let l = inner.loaded.as_mut().ok_or_else(|| js_error("NoModel", "load a model before fine-tuning"))?;
            let o: FinetuneOptions = parse_options("fine-tuning options", options_json.as_deref())?;
            l.training = None; // frees a previous run's buffers before the new one takes its own
            let data_opts = DataOptions { ctx: o.ctx, strict: o.strict };
            let read =
                |what: &str, text: &str| read_jsonl(text, &l.tokenizer, l.template.as_ref(), data_opts).map_err(|e| js_error("BadRequest", format!("{what} data: {e}")));
            let set = read("training", &data)?;
            let valid = match &o.valid {
                Some(v) if !v.trim().is_empty() => read("validation", v)?.examples,
                _ => Vec::new(),
            };
            let summary = serde_json::json!({
                "format": set.format.name(),
                "examples": set.examples.len(),
                "skipped_too_long": set.skipped_too_long,
                "tokens": set.n_tokens(),
                "trained_tokens": set.n_trained(),
                "valid_examples": valid.len(),
            });
            let opts = RunOptions {
                targets: o.targets,
                rank: o.rank,
                alpha: o.alpha,
                lr: o.lr,
                epochs: o.epochs,
                steps: o.steps,
                batch_tokens: o.batch_tokens,
                seed: o.seed,
                valid_every: o.valid_every,
            };
            // what the run adds to the model and its KV caches, refused before it allocates
            // where the page set a limit (the CLI's --max-gpu-memory check)
            let ctx = context_of(&set.examples, &valid);
            let (weights, adapters, activations) = memory_needed(&l.gguf, &l.model.config, &opts, ctx);
            let mib = |b: u64| b.div_ceil(1 << 20);
            if let Some(limit) = l.max_gpu_memory {
                let (_, kv_bytes) = Model::memory_needed(&l.gguf, &l.model.config, l.session.n_ctx, l.kv);
                let total = weights + kv_bytes * (l.others.len() as u64 + 1) + adapters + activations;
                if total > limit << 20 {
                    return Err(js_error(
                        "OutOfMemory",
                        format!(
                            "fine-tuning needs {} MiB of GPU memory beside the model ({} MiB of adapters and optimizer state, {} MiB of activations for examples of up to {ctx} tokens), {} MiB in all, over the {limit} MiB allowed: lower the rank or the targets, or shorten the examples (ctx)",
                            mib(adapters + activations),
                            mib(adapters),
                            mib(activations),
                            mib(total)
                        ),
                    ));
                }
            }
            let mut summary = summary;
            summary["memory_mib"] = serde_json::json!({"weights": mib(weights), "adapters": mib(adapters), "activations": mib(activations)});
            let run = Run::new(l.model.clone(), inner.gpu.clone(), set.examples, valid, opts).await.map_err(|e| match e {
                ModelError::Training(m) => js_error("BadRequest", m),
                e => model_error(&e),
            })?;
            summary["steps"] = run.total.into();
            summary["adapters"] = run.trainer.pairs.len().into();
            l.training = Some(run);
            Ok(JsValue::from_str(&summary.to_string()))
        })
    }

    /// One optimizer step of the run; resolves to JSON {step, steps, loss, val_loss, lr,
    /// grad_norm, tokens}. A loss that is not finite rejects (the factors are left as they were
    /// before the step).
    pub fn finetune_step(&self) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
            let l = guard.loaded.as_mut().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
            let run = l.training.as_mut().ok_or_else(|| js_error("BadRequest", "no fine-tuning run is started: call finetune_start first"))?;
            let p = run.step().await.map_err(|e| match e {
                e @ ModelError::NonFiniteLoss { .. } => js_error("TrainingFailed", e),
                ModelError::Training(m) => js_error("BadRequest", m),
                e => model_error(&e),
            })?;
            Ok(JsValue::from_str(&p.to_json().to_string()))
        })
    }

    /// The run's adapter as it stands, in llama.cpp's GGUF LoRA format (a Uint8Array), also
    /// added to this engine's adapters as `name` (replacing one of that name) and, with
    /// `activate`, made the one active adapter at scale 1.
    pub fn finetune_adapter(&self, name: String, activate: bool) -> Promise {
        let inner = self.inner.clone();
        future_to_promise(async move {
            let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
            let inner = &mut *guard;
            let l = inner.loaded.as_mut().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
            let run = l.training.as_ref().ok_or_else(|| js_error("BadRequest", "no fine-tuning run is started"))?;
            let bytes = run.trainer.adapter_gguf(&name).await.map_err(|e| gpu_error(&e))?;
            let g = Gguf::parse(&bytes).map_err(|e| gguf_error(&e))?;
            let adapter = LoraAdapter::load(&name, &g, &mut bytes.as_slice(), &inner.gpu, &l.model.config, &l.gguf).await.map_err(|e| model_error(&e))?;
            let adapter = Arc::new(adapter);
            let mut active: Vec<_> = l.session.adapters().iter().filter(|(a, _)| a.name != name).cloned().collect();
            if activate {
                active = vec![(adapter.clone(), 1.0)];
            }
            l.set_active(active).await.map_err(|e| model_error(&e))?;
            l.adapters.retain(|a| a.name != name);
            l.adapters.push(adapter);
            Ok(Uint8Array::from(bytes.as_slice()).into())
        })
    }

    /// Ends the fine-tuning run and frees its GPU memory (the adapters it made stay).
    pub fn finetune_end(&self) -> Result<(), JsValue> {
        let mut inner = self.inner.try_borrow_mut().map_err(|_| busy())?;
        if let Some(l) = inner.loaded.as_mut() {
            l.training = None;
        }
        Ok(())
    }

    /// Frees the model and its KV cache (GPU memory).
    pub fn unload(&self) -> Result<(), JsValue> {
        let mut inner = self.inner.try_borrow_mut().map_err(|_| busy())?;
        inner.loaded = None;
        Ok(())
    }
}

impl Engine {
    fn run(&self, messages_json: Option<String>, raw: Option<String>, options_json: Option<String>, on_piece: Option<Function>) -> Promise {
        let inner = self.inner.clone();
        let abort = self.abort.clone();
        future_to_promise(async move {
            let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
            let inner = &mut *guard;
            let gpu = inner.gpu.clone();
            let l = inner.loaded.as_mut().ok_or_else(|| js_error("NoModel", "no model is loaded"))?;
            let opts: ChatOptions = parse_options("chat options", options_json.as_deref())?;
            let gen = opts.generate_options(&l.sampling.defaults());
            gen.sampler.validate().map_err(|e| js_error("BadRequest", e))?;
            let format = Grammar::from_response_format(opts.response_format.as_ref()).map_err(field_error)?;
            let tools = ToolRequest::parse(opts.tools.as_ref(), opts.tool_choice.as_ref(), opts.parallel_tool_calls.as_ref()).map_err(field_error)?;
            if raw.is_some() && !tools.tools.is_empty() {
                return Err(js_error("BadRequest", "tools: tools are for chat(), not complete()"));
            }
            // with tools, the reply is calls, or (auto) text that fits response_format
            let grammar = tools::grammar_with_format(&tools.tools, &tools.choice, tools.parallel, format.as_ref()).or(format);
            let mut guide = match grammar {
                Some(g) => {
                    let tokenizer = l.tokenizer.clone();
                    let c = l.constrainer.get_or_insert_with(|| Constrainer::new(tokenizer).map_err(|e| e.to_string()));
                    let c = c.as_ref().map_err(|e| js_error("UnsupportedModel", format!("structured output is unavailable for this model: {e}")))?;
                    let what = if tools.active() { "tools" } else { "response_format" };
                    Guide::with_constraint(c.compile(&g).map_err(|e| js_error("BadRequest", format!("{what}: {e}")))?)
                }
                None => Guide::default(),
            };
            let ids = match (&messages_json, &raw) {
                (Some(m), _) => {
                    let turns = prompt::parse_messages(Some(&parse_json::<serde_json::Value>("messages", m)?)).map_err(field_error)?;
                    let t = l.template.as_ref().ok_or_else(no_template)?;
                    // the messages' text never becomes a control token (role injection)
                    prompt::request_prompt(&l.tokenizer, &l.guard, t, l.template_tools, &turns, &tools.tools).map_err(|e| js_error("BadRequest", e.to_string()))?
                }
                (None, Some(p)) => l.tokenizer.encode(p, true, true).map_err(|e| js_error("BadRequest", format!("tokenizing the prompt: {e}")))?,
                (None, None) => unreachable!(),
            };
            let at = match opts.session.as_deref() {
                None | Some(DEFAULT_SESSION) => None,
                Some(name) => Some(open_session(gpu, l, name).await?),
            };
            let session = match at {
                None => &mut l.session,
                Some(i) => &mut l.others[i].1,
            };
            let n_ctx = session.n_ctx;
            if ids.len() >= n_ctx {
                return Err(js_error(
                    "ContextFull",
                    format!("the conversation is {} tokens; the context holds {n_ctx}: start a new chat or load with a larger n_ctx", ids.len()),
                ));
            }
            abort.set(false);
            let emit = |piece: &str| {
                if let Some(f) = &on_piece {
                    if let Err(e) = f.call1(&JsValue::NULL, &JsValue::from_str(piece)) {
                        console_error(&format!("on_piece threw: {}", js_message(&e)));
                    }
                }
            };
            // with tools, a reply that starts with '<' is calls (the grammar says so): it is held
            // back, not streamed as text
            let mut held: Option<String> = tools.active().then(String::new);
            let mut on_text = |piece: &str| {
                match &mut held {
                    Some(h) => {
                        h.push_str(piece);
                        if !h.is_empty() && !h.starts_with('<') {
                            emit(h);
                            held = None;
                        }
                    }
                    None => emit(piece),
                }
                !abort.get()
            };
            let g = session.generate_guided(&l.tokenizer, &ids, &gen, &mut guide, &mut on_text, &|| false, &mut |_| {}).await.map_err(|e| model_error(&e))?;
            let calls = held.as_deref().and_then(tools::read_calls);
            if calls.is_none() {
                // held text that is not calls after all (cut short, or stopped) is text
                if let Some(h) = held.filter(|h| !h.is_empty()) {
                    emit(&h);
                }
            }
            let (text, finish, tool_calls) = match calls {
                Some(read) => {
                    let seed = (js_sys::Math::random() * 9007199254740992.0) as u64; // 53 random bits
                    let finish = read.finish_reason(g.finish.as_str());
                    let list = tools::openai_calls(&tools::with_ids(seed, read.calls));
                    let tool_calls = if list.is_empty() { serde_json::Value::Null } else { serde_json::Value::Array(list) };
                    (read.content.unwrap_or_default(), finish, tool_calls)
                }
                None => (g.text.clone(), g.finish.as_str(), serde_json::Value::Null),
            };
            let summary = serde_json::json!({
                "text": text,
                "tool_calls": tool_calls,
                "tokens": g.tokens.len(),
                "token_ids": g.tokens,
                "prompt_tokens": g.prompt_tokens,
                "reused_tokens": g.reused_tokens,
                "prompt_seconds": g.prompt_seconds,
                "gen_seconds": g.gen_seconds,
                "prompt_tps": g.prompt_tps(),
                "gen_tps": g.gen_tps(),
                "finish_reason": finish,
            });
            Ok(JsValue::from_str(&summary.to_string()))
        })
    }
}

/// The conversation made at load, which chat() uses unless told another.
const DEFAULT_SESSION: &str = "default";

/// Most conversations one model holds at once (each has a KV cache of the load's context).
const MAX_SESSIONS: usize = 8;

impl Loaded {
    /// Makes `set` the active adapters of every conversation.
    async fn set_active(&mut self, set: Vec<(Arc<LoraAdapter>, f32)>) -> Result<(), ModelError> {
        self.session.set_adapters(set.clone()).await?;
        for (_, s) in &mut self.others {
            s.set_adapters(set.clone()).await?;
        }
        Ok(())
    }

    /// The conversations' names and the tokens each one's cache holds.
    fn sessions_json(&self) -> serde_json::Value {
        let one = |name: &str, s: &Session| serde_json::json!({"name": name, "tokens": s.tokens.len(), "n_ctx": s.n_ctx});
        let list: Vec<_> = std::iter::once(one(DEFAULT_SESSION, &self.session)).chain(self.others.iter().map(|(n, s)| one(n, s))).collect();
        serde_json::Value::Array(list)
    }
}

/// The index in `l.others` of the conversation `name`, made (with the active adapters) if it is
/// new: refused past [`MAX_SESSIONS`], or past the load's GPU memory limit.
async fn open_session(gpu: Arc<Gpu>, l: &mut Loaded, name: &str) -> Result<usize, JsValue> {
    if let Some(i) = l.others.iter().position(|(n, _)| n == name) {
        return Ok(i);
    }
    if name.is_empty() || name.len() > 64 {
        return Err(js_error("BadRequest", "session: a conversation's name is 1 to 64 bytes"));
    }
    if l.others.len() + 1 >= MAX_SESSIONS {
        return Err(js_error("BadRequest", format!("session: {MAX_SESSIONS} conversations are open; close one (closeSession) first")));
    }
    let n_ctx = l.session.n_ctx;
    if let Some(mib) = l.max_gpu_memory {
        let (weights, kv_bytes) = Model::memory_needed(&l.gguf, &l.model.config, n_ctx, l.kv);
        let total = weights + kv_bytes * (l.others.len() as u64 + 2);
        if total > mib << 20 {
            return Err(js_error(
                "OutOfMemory",
                format!("another conversation needs {} MiB more of GPU memory (a {n_ctx}-token KV cache), over the {mib} MiB allowed: close one first", kv_bytes >> 20),
            ));
        }
    }
    let mut session = Session::new(l.model.clone(), gpu, n_ctx, l.kv, false).await.map_err(|e| model_error(&e))?;
    session.set_adapters(l.session.adapters().to_vec()).await.map_err(|e| model_error(&e))?;
    l.others.push((name.to_string(), session));
    Ok(l.others.len() - 1)
}

fn no_template() -> JsValue {
    js_error("UnsupportedModel", "this model has no chat template (a base model?): use complete() with a raw prompt")
}

/// The text the chat template makes of plain messages (tool parts are not shown).
fn render(l: &Loaded, messages_json: &str) -> Result<String, JsValue> {
    let turns = prompt::parse_messages(Some(&parse_json::<serde_json::Value>("messages", messages_json)?)).map_err(field_error)?;
    let msgs: Vec<Message> = turns.into_iter().map(|m| Message { role: m.role, content: m.content }).collect();
    let t = l.template.as_ref().ok_or_else(no_template)?;
    t.render(&msgs, true).map_err(|e| js_error("BadRequest", format!("chat template: {e}")))
}

fn info_json(gpu: &Gpu, l: &Loaded) -> serde_json::Value {
    let c = &l.model.config;
    serde_json::json!({
        "name": l.name,
        "architecture": c.arch_name,
        "n_layer": c.n_layer,
        "n_embd": c.n_embd,
        "n_head": c.n_head,
        "n_kv_head": c.n_kv_head,
        "n_vocab": c.n_vocab,
        "n_ctx": l.session.n_ctx,
        "kv": l.kv.name(),
        "sessions": l.sessions_json(),
        "n_ctx_train": c.n_ctx_train,
        "weight_bytes": l.model.weight_bytes,
        "has_chat_template": l.template.is_some(),
        "from_cache": l.from_cache,
        "load_seconds": l.load_seconds,
        "device": gpu.describe(),
        "sampling": sampling_json(&l.sampling),
    })
}

/// What a chat that sets no sampling option gets, and which of it the model chose.
fn sampling_json(m: &SamplingOverrides) -> serde_json::Value {
    let d = m.defaults();
    serde_json::json!({
        "temperature": d.temperature,
        "top_k": d.top_k,
        "top_p": d.top_p,
        "min_p": d.min_p,
        "repeat_penalty": d.repeat_penalty,
        "from_model": m.describe(),
        "ignored": m.ignored,
    })
}

fn report(cb: &JsValue, phase: &str, done: u64, total: u64) {
    let Some(f) = cb.dyn_ref::<Function>() else { return };
    let o = js_sys::Object::new();
    let _ = Reflect::set(&o, &"phase".into(), &phase.into());
    let _ = Reflect::set(&o, &"done".into(), &(done as f64).into());
    let _ = Reflect::set(&o, &"total".into(), &(total as f64).into());
    let _ = f.call1(&JsValue::NULL, &o);
}

async fn load(inner: Rc<RefCell<Inner>>, reader: Reader, cb: JsValue, opts: LoadOptions) -> Result<JsValue, JsValue> {
    let result = load_inner(&inner, &reader, &cb, &opts).await;
    if result.is_err() {
        reader.close();
    }
    result
}

async fn load_inner(inner: &Rc<RefCell<Inner>>, reader: &Reader, cb: &JsValue, opts: &LoadOptions) -> Result<JsValue, JsValue> {
    let start = web_time_now();
    let mut guard = inner.try_borrow_mut().map_err(|_| busy())?;
    let inner = &mut *guard;
    inner.loaded = None; // free the previous model first
    let kv = match opts.kv.as_deref() {
        None => KvType::F16,
        Some(name) => KvType::parse(name).map_err(|e| js_error("BadRequest", format!("kv: {e}")))?,
    };
    let gguf = read_header(reader).await?;
    let mut ranges = Vec::with_capacity(gguf.tensors.len() * 2);
    for t in &gguf.tensors {
        let r = gguf.tensor_data_range(t);
        ranges.push(r.start as f64);
        ranges.push(r.end as f64);
    }
    reader.plan(ranges);
    let config = Config::from_gguf(&gguf).map_err(|e| model_error(&e))?;
    let n_ctx = opts.n_ctx.unwrap_or(2048).min(config.n_ctx_train.max(1));
    if let Some(mib) = opts.max_gpu_memory {
        let (weights, kv_bytes) = Model::memory_needed(&gguf, &config, n_ctx, kv);
        if weights + kv_bytes > mib << 20 {
            return Err(js_error(
                "OutOfMemory",
                format!(
                    "this model needs {} MiB of GPU memory ({} MiB of weights and {} MiB of KV cache for {n_ctx} tokens), over the {mib} MiB allowed: choose a smaller model, a shorter context or a larger limit",
                    (weights + kv_bytes) >> 20,
                    weights >> 20,
                    kv_bytes >> 20
                ),
            ));
        }
    }
    let tokenizer = Tokenizer::from_gguf(&gguf).map_err(|e| js_error("UnsupportedModel", format!("building the tokenizer: {e}")))?;
    let template = ChatTemplate::from_gguf(&gguf).map_err(|e| js_error("UnsupportedModel", format!("the chat template: {e}")))?;
    let mut progress = |done: u64, total: u64| report(cb, "upload", done, total);
    let model = Arc::new(Model::load(&gguf, &inner.gpu, &mut JsSource(reader), &mut progress).await.map_err(|e| model_error(&e))?);
    let session = Session::new(model.clone(), inner.gpu.clone(), n_ctx, kv, false).await.map_err(|e| model_error(&e))?;
    // the download must be complete (and cached) before we call the load done
    JsFuture::from(reader.finish()).await.map_err(|e| js_error("ReadError", js_message(&e)))?;
    let loaded = Loaded {
        session,
        others: Vec::new(),
        kv,
        max_gpu_memory: opts.max_gpu_memory,
        training: None,
        constrainer: None,
        adapters: Vec::new(),
        model,
        sampling: model_sampling(&gguf, reader),
        gguf,
        guard: Guard::new(&tokenizer),
        template_tools: template.as_ref().is_some_and(|t| t.supports_tools()),
        tokenizer: Arc::new(tokenizer),
        template,
        name: reader.name(),
        from_cache: reader.from_cache(),
        load_seconds: web_time_now() - start,
    };
    let info = info_json(&inner.gpu, &loaded);
    inner.loaded = Some(loaded);
    Ok(JsValue::from_str(&info.to_string()))
}

/// The model's recommended sampling (`catalog::recommended_sampling`), told by the file name at
/// the end of the reader's URL or name.
fn model_sampling(gguf: &Gguf, reader: &Reader) -> SamplingOverrides {
    let name = reader.name();
    let file = name.rsplit('/').next().unwrap_or(&name).split(['?', '#']).next().unwrap_or("");
    nomoat_runtime::catalog::recommended_sampling(gguf, file, reader.size().map_or(0, |s| s as u64))
}

fn adapter_json(a: &LoraAdapter, scale: Option<f32>) -> serde_json::Value {
    serde_json::json!({"name": a.name, "bytes": a.bytes, "tensors": a.pairs.len(), "alpha": a.alpha, "active": scale.is_some(), "scale": scale})
}

fn adapters_json(l: &Loaded) -> serde_json::Value {
    let active = l.session.adapters();
    let list: Vec<_> = l.adapters.iter().map(|a| adapter_json(a, active.iter().find(|(x, _)| Arc::ptr_eq(x, a)).map(|(_, s)| *s))).collect();
    serde_json::Value::Array(list)
}

fn web_time_now() -> f64 {
    js_sys::Date::now() / 1000.0
}
