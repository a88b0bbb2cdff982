//! OpenAI request parsing (field by field, so that every wrong type or value is a 400 naming
//! the field) and the JSON shapes of responses, chunks and errors.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use nomoat_runtime::constrain::{json_type_name as type_name, FieldError, Grammar};
use nomoat_runtime::prompt::{self, ChatTurn};
use nomoat_runtime::sampler::SamplerConfig;
use nomoat_runtime::tools::{self, ToolCall, ToolRequest};
use serde_json::{json, Map, Value};

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code: None }
    }
    /// 400 invalid_request_error.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    /// 400 about one field.
    pub fn param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError::invalid(message).with_param(param)
    }
    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
    pub fn with_param(mut self, p: &str) -> ApiError {
        self.param = Some(p.to_string());
        self
    }
    pub fn with_code(mut self, c: &'static str) -> ApiError {
        self.code = Some(c);
        self
    }
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE || self.status == StatusCode::TOO_MANY_REQUESTS {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        // the rest of a body that was too slow or too large is not read: the connection ends
        if self.status == StatusCode::REQUEST_TIMEOUT || self.status == StatusCode::PAYLOAD_TOO_LARGE {
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        r
    }
}

/// The body as a JSON object.
pub fn parse_body(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::invalid("the request body is empty; send a JSON object"));
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(v) => Err(ApiError::invalid(format!("the request body must be a JSON object, got {}", type_name(&v)))),
        Err(e) => Err(ApiError::invalid(format!("the request body is not valid JSON: {e}")).with_code("invalid_json")),
    }
}

/// A field that is absent or null is None.
fn field<'a>(o: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    o.get(name).filter(|v| !v.is_null())
}

fn opt_bool(o: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match field(o, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::param(name, format!("'{name}' must be a boolean, got {}", type_name(v)))),
    }
}

fn opt_f32(o: &Map<String, Value>, name: &str) -> Result<Option<f32>, ApiError> {
    match field(o, name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if !x.is_finite() || x.abs() > f32::MAX as f64 {
                return Err(ApiError::param(name, format!("'{name}' must be a finite number, got {n}")));
            }
            Ok(Some(x as f32))
        }
        Some(v) => Err(ApiError::param(name, format!("'{name}' must be a number, got {}", type_name(v)))),
    }
}

fn opt_int(o: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    match field(o, name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if let Some(u) = n.as_u64() {
                Ok(Some(u.min(i64::MAX as u64) as i64))
            } else {
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
                    _ => Err(ApiError::param(name, format!("'{name}' must be an integer, got {n}"))),
                }
            }
        }
        Some(v) => Err(ApiError::param(name, format!("'{name}' must be an integer, got {}", type_name(v)))),
    }
}

/// Options both endpoints share.
#[derive(Debug, Clone)]
pub struct Common {
    /// None: until the context fills (or the server's --max-tokens-limit).
    pub max_tokens: Option<usize>,
    /// The field max_tokens came from ("max_tokens" or "max_completion_tokens").
    pub max_tokens_param: &'static str,
    pub sampler: SamplerConfig,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `adapters`: [{"name", "scale"}] choosing among the adapters loaded at start (None: all
    /// of them at their command-line scales; an empty list: none).
    pub adapters: Option<Vec<(String, f32)>>,
    /// `logprobs` asked for, with this many `top_logprobs`.
    pub logprobs: Option<usize>,
    /// `logprobs` came as a count (the completions form), not a boolean (chat's).
    pub logprobs_count: bool,
}

pub const MAX_STOPS: usize = 16;

/// Reads the shared options over `defaults` (the model's sampling); `random_seed` is used when
/// the request has no `seed`.
pub fn parse_common(o: &Map<String, Value>, defaults: &SamplerConfig, random_seed: u64) -> Result<Common, ApiError> {
    let stream = opt_bool(o, "stream")?.unwrap_or(false);
    let mut include_usage = false;
    if let Some(so) = field(o, "stream_options") {
        let Value::Object(so) = so else {
            return Err(ApiError::param("stream_options", format!("'stream_options' must be an object, got {}", type_name(so))));
        };
        include_usage = opt_bool(so, "include_usage").map_err(|e| e.with_param("stream_options.include_usage"))?.unwrap_or(false);
    }
    let mut max_tokens = None;
    let mut max_tokens_param = "max_tokens";
    for name in ["max_tokens", "max_completion_tokens"] {
        if let Some(n) = opt_int(o, name)? {
            if n < 1 {
                return Err(ApiError::param(name, format!("'{name}' must be at least 1, got {n}")));
            }
            max_tokens = Some(n as usize);
            max_tokens_param = name;
        }
    }
    if let Some(n) = opt_int(o, "n")? {
        if n != 1 {
            return Err(ApiError::param("n", format!("only n = 1 is supported (one choice per request), got {n}")));
        }
    }
    if let Some(n) = opt_int(o, "best_of")? {
        if n != 1 {
            return Err(ApiError::param("best_of", format!("only best_of = 1 is supported, got {n}")));
        }
    }
    // chat's logprobs (a boolean) with top_logprobs, or the completions form: a count of the
    // most likely tokens to list (0 to 20; OpenAI allows 5, llama.cpp more)
    let (logprobs, logprobs_count) = match field(o, "logprobs") {
        None | Some(Value::Bool(false)) => (None, false),
        Some(Value::Bool(true)) => (Some(0), false),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(k @ 0..=20) => (Some(k as usize), true),
            _ => return Err(ApiError::param("logprobs", format!("'logprobs' must be true or false, or on /v1/completions a count from 0 to 20; got {n}"))),
        },
        Some(v) => return Err(ApiError::param("logprobs", format!("'logprobs' must be a boolean, got {}", type_name(v)))),
    };
    let logprobs = match opt_int(o, "top_logprobs")? {
        Some(n) if !(0..=20).contains(&n) => return Err(ApiError::param("top_logprobs", format!("'top_logprobs' must be from 0 to 20, got {n}"))),
        Some(_) if logprobs.is_none() || logprobs_count => return Err(ApiError::param("top_logprobs", "'top_logprobs' needs 'logprobs': true")),
        Some(n) => Some(n as usize),
        None => logprobs,
    };
    let mut sampler = SamplerConfig { seed: random_seed, ..defaults.clone() };
    if let Some(t) = opt_f32(o, "temperature")? {
        sampler.temperature = t;
    }
    if let Some(p) = opt_f32(o, "top_p")? {
        sampler.top_p = p;
    }
    if let Some(p) = opt_f32(o, "min_p")? {
        sampler.min_p = p;
    }
    if let Some(p) = opt_f32(o, "presence_penalty")? {
        sampler.presence_penalty = p;
    }
    if let Some(p) = opt_f32(o, "frequency_penalty")? {
        sampler.frequency_penalty = p;
    }
    if let Some(p) = opt_f32(o, "repeat_penalty")? {
        sampler.repeat_penalty = p;
    }
    if let Some(k) = opt_int(o, "top_k")? {
        if k < 0 {
            return Err(ApiError::param("top_k", format!("'top_k' must be >= 0 (0 = off), got {k}")));
        }
        sampler.top_k = k as usize;
    }
    if let Some(s) = opt_int(o, "seed")? {
        sampler.seed = s as u64;
    }
    if let Err(msg) = sampler.validate() {
        let param = msg.split_whitespace().next().unwrap_or("").to_string();
        return Err(ApiError::param(&param, msg));
    }
    let stop = match field(o, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => {
            let mut v = Vec::new();
            for x in a {
                match x {
                    Value::String(s) => v.push(s.clone()),
                    _ => return Err(ApiError::param("stop", format!("'stop' must be a string or a list of strings; found {} in the list", type_name(x)))),
                }
            }
            v
        }
        Some(v) => return Err(ApiError::param("stop", format!("'stop' must be a string or a list of strings, got {}", type_name(v)))),
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::param("stop", format!("at most {MAX_STOPS} stop strings, got {}", stop.len())));
    }
    let stop = stop.into_iter().filter(|s| !s.is_empty()).collect();
    let adapters = match field(o, "adapters") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let bad = || ApiError::param("adapters", "each of 'adapters' must be {\"name\": string, \"scale\": number}".to_string());
                let Value::Object(a) = item else { return Err(bad()) };
                let Some(Value::String(name)) = a.get("name") else { return Err(bad()) };
                let scale = match a.get("scale") {
                    None => 1.0,
                    // a scale beyond f32's range would become infinite on the GPU
                    Some(Value::Number(n)) => match n.as_f64() {
                        Some(v) if v.is_finite() && v.abs() <= f32::MAX as f64 => v as f32,
                        _ => return Err(ApiError::param("adapters", format!("adapters[{i}].scale must be a finite number of at most {:e} in size, got {n}", f32::MAX))),
                    },
                    Some(_) => return Err(bad()),
                };
                out.push((name.clone(), scale));
            }
            Some(out)
        }
        Some(v) => return Err(ApiError::param("adapters", format!("'adapters' must be a list, got {}", type_name(v)))),
    };
    Ok(Common { max_tokens, max_tokens_param, sampler, stop, stream, include_usage, adapters, logprobs, logprobs_count })
}

/// `response_format` as a grammar (`Grammar::from_response_format`, which the browser engine
/// reads it with too).
pub fn parse_response_format(o: &Map<String, Value>) -> Result<Option<Grammar>, ApiError> {
    Ok(Grammar::from_response_format(o.get("response_format"))?)
}

/// llama.cpp's `grammar` extension: a GBNF grammar (rules with `::=`) or a Lark one.
pub fn parse_grammar(o: &Map<String, Value>) -> Result<Option<Grammar>, ApiError> {
    match field(o, "grammar") {
        None => Ok(None),
        Some(Value::String(g)) if g.trim().is_empty() => Ok(None),
        Some(Value::String(g)) => Ok(Some(if g.contains("::=") { Grammar::Gbnf(g.clone()) } else { Grammar::Lark(g.clone()) })),
        Some(v) => Err(ApiError::param("grammar", format!("'grammar' must be a string (GBNF or Lark), got {}", type_name(v)))),
    }
}

/// Most entries `logit_bias` may have (OpenAI takes up to 300).
pub const MAX_LOGIT_BIAS: usize = 1024;

/// `logit_bias`: token id (as a string) to a bias in [-100, 100], added to that token's logit.
pub fn parse_logit_bias(o: &Map<String, Value>, n_vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    const P: &str = "logit_bias";
    let Some(v) = field(o, P) else { return Ok(Vec::new()) };
    let Value::Object(m) = v else {
        return Err(ApiError::param(P, format!("'{P}' must be an object mapping token ids to biases, got {}", type_name(v))));
    };
    if m.len() > MAX_LOGIT_BIAS {
        return Err(ApiError::param(P, format!("'{P}' may have at most {MAX_LOGIT_BIAS} entries, got {}", m.len())));
    }
    let mut out = Vec::with_capacity(m.len());
    for (k, b) in m {
        let id = match k.trim().parse::<u64>() {
            Ok(id) if (id as usize) < n_vocab => id as u32,
            Ok(id) => return Err(ApiError::param(P, format!("logit_bias names token {id}, outside the vocabulary (0..{n_vocab})"))),
            Err(_) => return Err(ApiError::param(P, format!("logit_bias keys must be token ids, got {k:?}"))),
        };
        match b.as_f64() {
            Some(x) if (-100.0..=100.0).contains(&x) => out.push((id, x as f32)),
            _ => return Err(ApiError::param(P, format!("logit_bias[{k:?}] must be a number from -100 to 100, got {b}"))),
        }
    }
    Ok(out)
}

impl From<FieldError> for ApiError {
    fn from(e: FieldError) -> ApiError {
        ApiError::param(&e.param, e.message)
    }
}

/// The `messages` of a chat request (`prompt::parse_messages`, which the browser engine uses too).
pub fn parse_chat_messages(o: &Map<String, Value>) -> Result<Vec<ChatTurn>, ApiError> {
    Ok(prompt::parse_messages(o.get("messages"))?)
}

/// `tools`, `tool_choice` and `parallel_tool_calls` (`ToolRequest::parse`, the browser's too).
pub fn parse_tools(o: &Map<String, Value>) -> Result<ToolRequest, ApiError> {
    Ok(ToolRequest::parse(o.get("tools"), o.get("tool_choice"), o.get("parallel_tool_calls"))?)
}

/// The `prompt` of a completions request.
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

pub fn parse_prompt(o: &Map<String, Value>, vocab: usize) -> Result<Prompt, ApiError> {
    let bad = |what: &str| ApiError::param("prompt", format!("'prompt' must be a string, a list of one string, or a list of token ids; got {what}"));
    let tokens = |a: &Vec<Value>| -> Result<Vec<u32>, ApiError> {
        a.iter()
            .map(|t| match t.as_u64() {
                Some(id) if (id as usize) < vocab => Ok(id as u32),
                _ => Err(ApiError::param("prompt", format!("token id {t} is not in the vocabulary (0..{vocab})"))),
            })
            .collect()
    };
    match field(o, "prompt") {
        None => Err(ApiError::param("prompt", "'prompt' is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::param("prompt", "'prompt' must not be empty")),
        Some(Value::Array(a)) => match &a[0] {
            Value::String(s) if a.len() == 1 => Ok(Prompt::Text(s.clone())),
            Value::Array(inner) if a.len() == 1 => Ok(Prompt::Tokens(tokens(inner)?)),
            Value::String(_) | Value::Array(_) => Err(ApiError::param("prompt", "only one prompt per request is supported")),
            Value::Number(_) => Ok(Prompt::Tokens(tokens(a)?)),
            v => Err(bad(&format!("a list holding {}", type_name(v)))),
        },
        Some(v) => Err(bad(type_name(v))),
    }
}

/// Completions options that this server does not implement.
pub fn check_completion_extras(o: &Map<String, Value>) -> Result<(), ApiError> {
    if opt_bool(o, "echo")?.unwrap_or(false) {
        return Err(ApiError::param("echo", "echo is not supported by this server"));
    }
    match field(o, "suffix") {
        None => Ok(()),
        Some(Value::String(s)) if s.is_empty() => Ok(()),
        Some(_) => Err(ApiError::param("suffix", "suffix (fill-in-the-middle) is not supported by this server")),
    }
}

/// Chat's `logprobs` object: per token its text, log-probability, UTF-8 bytes and the most
/// likely tokens'.
pub fn logprobs_json(kind: Kind, tok: &nomoat_runtime::tokenizer::Tokenizer, entries: &[nomoat_runtime::constrain::TokenLogprob]) -> Value {
    let finite = |lp: f32| if lp.is_finite() { json!(lp) } else { json!(-9999.0) };
    if kind == Kind::Completion {
        // the completions form: parallel lists; text_offset in UTF-8 bytes from the completion's start
        let text = |id: u32| String::from_utf8_lossy(&tok.token_bytes(id)).into_owned();
        let mut offset = 0;
        let mut offsets = Vec::with_capacity(entries.len());
        for e in entries {
            offsets.push(offset);
            offset += tok.token_bytes(e.id).len();
        }
        let top: Vec<Value> = entries.iter().map(|e| Value::Object(e.top.iter().map(|&(id, lp)| (text(id), finite(lp))).collect())).collect();
        return json!({
            "tokens": entries.iter().map(|e| text(e.id)).collect::<Vec<_>>(),
            "token_logprobs": entries.iter().map(|e| finite(e.logprob)).collect::<Vec<_>>(),
            "top_logprobs": if entries.iter().all(|e| e.top.is_empty()) { Value::Null } else { Value::Array(top) },
            "text_offset": offsets,
        });
    }
    let one = |id: u32, lp: f32| {
        let bytes = tok.token_bytes(id);
        json!({"token": String::from_utf8_lossy(&bytes), "logprob": finite(lp), "bytes": bytes})
    };
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut v = one(e.id, e.logprob);
            v["top_logprobs"] = Value::Array(e.top.iter().map(|&(id, lp)| one(id, lp)).collect());
            v
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// A request's token counts: its prompt's (and of those, the ones found in the KV cache) and
/// its reply's.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub prompt: usize,
    pub cached: usize,
    pub completion: usize,
}

impl Usage {
    fn json(self) -> Value {
        json!({
            "prompt_tokens": self.prompt,
            "completion_tokens": self.completion,
            "total_tokens": self.prompt + self.completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        })
    }
}

/// Which endpoint a response belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// What every response and chunk carries.
#[derive(Clone, Debug)]
pub struct Meta {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
}

pub const FINGERPRINT: &str = concat!("nomoat-", env!("CARGO_PKG_VERSION"));

impl Meta {
    fn base(&self, object: &str, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
        })
    }

    /// The non-streaming response (`logprobs`: chat's `{"content": [...]}`, or null).
    pub fn response(&self, text: &str, finish: &str, usage: Usage, logprobs: Value) -> Value {
        let mut v = match self.kind {
            Kind::Chat => self.base(
                "chat.completion",
                json!([{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null}, "logprobs": logprobs, "finish_reason": finish}]),
            ),
            Kind::Completion => self.base("text_completion", json!([{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}])),
        };
        v["usage"] = usage.json();
        v
    }

    /// The non-streaming chat response of a reply with tool calls: content null unless text
    /// came before the calls, no tool_calls when a cut-short call was the only one, finish_reason
    /// "tool_calls" unless one was cut short ("length").
    pub fn tool_response(&self, content: Option<&str>, calls: &[(String, ToolCall)], finish: &str, usage: Usage, logprobs: Value) -> Value {
        let mut message = json!({"role": "assistant", "content": content, "refusal": null});
        if !calls.is_empty() {
            message["tool_calls"] = json!(tools::openai_calls(calls));
        }
        let mut v = self.base("chat.completion", json!([{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}]));
        v["usage"] = usage.json();
        v
    }

    /// The streamed pieces of tool calls, as OpenAI sends them: per call, one chunk with its
    /// index, id, type and name (arguments ""), then one with its arguments.
    pub fn tool_chunks(&self, calls: &[(String, ToolCall)], include_usage: bool) -> Vec<Value> {
        let mut out = Vec::new();
        for (i, (id, c)) in calls.iter().enumerate() {
            for delta in [
                json!({"tool_calls": [{"index": i, "id": id, "type": "function", "function": {"name": c.name, "arguments": ""}}]}),
                json!({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]}),
            ] {
                let mut v = self.base("chat.completion.chunk", json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]));
                if include_usage {
                    v["usage"] = Value::Null;
                }
                out.push(v);
            }
        }
        out
    }

    /// A streamed chunk: `delta` content (chat) or text (completions); `role` in the first
    /// chat chunk; `finish` in the last. With include_usage every chunk has `"usage": null`.
    pub fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&str>, include_usage: bool) -> Value {
        let mut v = match self.kind {
            Kind::Chat => {
                let mut delta = Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                self.base("chat.completion.chunk", json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]))
            }
            Kind::Completion => self.base("text_completion", json!([{"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish}])),
        };
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// The extra last chunk of `stream_options.include_usage`: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        let object = if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = self.base(object, json!([]));
        v["usage"] = usage.json();
        v
    }
}

/// Compares without stopping at the first difference, so the time taken does not tell how much
/// of a guessed key was right. (The length of the key can still show; it is not the secret.)
pub fn constant_time_eq(given: &[u8], key: &[u8]) -> bool {
    let mut diff = (given.len() != key.len()) as u8;
    for (i, k) in key.iter().enumerate() {
        let g = given.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(g ^ k);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use nomoat_runtime::chat::Message;
    use nomoat_runtime::tools::ToolChoice;

    fn obj(s: &str) -> Map<String, Value> {
        parse_body(s.as_bytes()).unwrap()
    }

    #[test]
    fn body_must_be_a_json_object() {
        assert_eq!(parse_body(b"{\"a\": ").unwrap_err().status, StatusCode::BAD_REQUEST);
        assert!(parse_body(b"[1]").unwrap_err().message.contains("a list"));
        assert!(parse_body(b"  ").unwrap_err().message.contains("empty"));
    }

    #[test]
    fn common_fields_are_typed() {
        let c = parse_common(&obj(r#"{"temperature": 0, "max_tokens": 5, "stop": "x", "seed": 7, "stream": true}"#), &SamplerConfig::default(), 1).unwrap();
        assert_eq!(c.max_tokens, Some(5));
        assert_eq!(c.sampler.temperature, 0.0);
        assert_eq!(c.sampler.seed, 7);
        assert_eq!(c.stop, vec!["x"]);
        assert!(c.stream);
        let c = parse_common(&obj(r#"{"max_completion_tokens": 3, "stop": ["a", ""]}"#), &SamplerConfig::default(), 99).unwrap();
        assert_eq!((c.max_tokens, c.sampler.seed, c.stop.len()), (Some(3), 99, 1));
        // what the request leaves out comes from the model's defaults, what it sets wins
        let model = SamplerConfig { temperature: 0.2, top_k: 20, ..SamplerConfig::default() };
        let c = parse_common(&obj(r#"{"top_k": 5}"#), &model, 3).unwrap();
        assert_eq!((c.sampler.temperature, c.sampler.top_k, c.sampler.seed), (0.2, 5, 3));
        for (body, param) in [
            (r#"{"temperature": "hot"}"#, "temperature"),
            (r#"{"max_tokens": -1}"#, "max_tokens"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_tokens": 1.5}"#, "max_tokens"),
            (r#"{"n": 2}"#, "n"),
            (r#"{"stop": 3}"#, "stop"),
            (r#"{"stop": ["a", 1]}"#, "stop"),
            (r#"{"stream": "yes"}"#, "stream"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"logprobs": 21}"#, "logprobs"),
            (r#"{"top_logprobs": 2}"#, "top_logprobs"),
            (r#"{"logprobs": true, "top_logprobs": 21}"#, "top_logprobs"),
            (r#"{"seed": "x"}"#, "seed"),
            (r#"{"adapters": [{"name": "a", "scale": 1e300}]}"#, "adapters"),
            (r#"{"adapters": [{"name": "a", "scale": -3.5e38}]}"#, "adapters"),
        ] {
            let e = parse_common(&obj(body), &SamplerConfig::default(), 0).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }

    fn parse_messages(o: &Map<String, Value>) -> Result<Vec<Message>, ApiError> {
        Ok(parse_chat_messages(o)?.into_iter().map(|m| Message { role: m.role, content: m.content }).collect())
    }

    #[test]
    fn tool_parts() {
        let m = parse_chat_messages(&obj(
            r#"{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "42"}]}"#,
        ))
        .unwrap();
        assert_eq!(m[0].tool_calls, vec![("c1".to_string(), ToolCall { name: "f".into(), arguments: "{\"a\": 1}".into() })]);
        assert_eq!((m[1].role.as_str(), m[1].tool_call_id.as_deref(), m[1].content.as_str()), ("tool", Some("c1"), "42"));
        for (body, param) in [
            (r#"{"messages": [{"role": "tool", "content": "x"}]}"#, "messages[0].tool_call_id"),
            (r#"{"messages": [{"role": "user", "content": "x", "tool_calls": []}]}"#, "messages[0].tool_calls"),
            (
                r#"{"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{oops"}}]}]}"#,
                "messages[0].tool_calls[0].function.arguments",
            ),
        ] {
            assert_eq!(parse_chat_messages(&obj(body)).unwrap_err().param.as_deref(), Some(param), "{body}");
        }
        let tool = r#"{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}"#;
        let r = parse_tools(&obj(&format!(r#"{{"tools": [{tool}], "parallel_tool_calls": false}}"#))).unwrap();
        assert_eq!((r.tools.len(), r.choice, r.parallel), (1, ToolChoice::Auto, false));
        let r = parse_tools(&obj(&format!(r#"{{"tools": [{tool}], "tool_choice": {{"type": "function", "function": {{"name": "get_weather"}}}}}}"#))).unwrap();
        assert_eq!(r.choice, ToolChoice::Named("get_weather".into()));
        assert_eq!(parse_tools(&obj("{}")).unwrap().choice, ToolChoice::None);
        for (body, needle) in [
            (format!(r#"{{"tools": [{tool}], "tool_choice": {{"type": "function", "function": {{"name": "nope"}}}}}}"#), "not one of the tools"),
            (r#"{"tool_choice": "required"}"#.to_string(), "no tools"),
            (format!(r#"{{"tools": [{tool}], "tool_choice": "sometimes"}}"#), "tool_choice must be"),
            (r#"{"tools": [{"type": "function", "function": {"name": "a b"}}]}"#.to_string(), "letters"),
            (format!(r#"{{"tools": [{tool}, {tool}]}}"#), "two tools"),
            (r#"{"tools": [{"type": "retrieval"}]}"#.to_string(), "function"),
        ] {
            let e = parse_tools(&obj(&body)).unwrap_err();
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
    }

    #[test]
    fn messages() {
        let m = parse_messages(&obj(
            r#"{"messages": [{"role": "developer", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        ))
        .unwrap();
        assert_eq!(m, vec![Message::system("s"), Message::user("ab")]);
        for body in [
            r#"{}"#,
            r#"{"messages": "hi"}"#,
            r#"{"messages": []}"#,
            r#"{"messages": [1]}"#,
            r#"{"messages": [{"content": "x"}]}"#,
            r#"{"messages": [{"role": "user"}]}"#,
            r#"{"messages": [{"role": "user", "content": 5}]}"#,
            r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
        ] {
            assert_eq!(parse_messages(&obj(body)).unwrap_err().status, StatusCode::BAD_REQUEST, "{body}");
        }
    }

    #[test]
    fn response_formats() {
        assert_eq!(parse_response_format(&obj(r#"{}"#)).unwrap(), None);
        assert_eq!(parse_response_format(&obj(r#"{"response_format": {"type": "text"}}"#)).unwrap(), None);
        assert_eq!(parse_response_format(&obj(r#"{"response_format": {"type": "json_object"}}"#)).unwrap(), Some(Grammar::JsonObject));
        let g =
            parse_response_format(&obj(r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "p", "strict": true, "schema": {"type": "integer"}}}}"#));
        assert_eq!(g.unwrap(), Some(Grammar::JsonSchema(json!({"type": "integer"}))));
        for (body, param) in [
            (r#"{"response_format": "json"}"#, "response_format"),
            (r#"{"response_format": {"type": "xml"}}"#, "response_format"),
            (r#"{"response_format": {"type": "json_schema"}}"#, "response_format.json_schema"),
            (r#"{"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}"#, "response_format.json_schema.name"),
            (r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}}"#, "response_format.json_schema.name"),
            (r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": 3}}}"#, "response_format.json_schema.schema"),
            (r#"{"response_format": {"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}}}"#, "response_format.json_schema.strict"),
        ] {
            let e = parse_response_format(&obj(body)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
        }
    }

    #[test]
    fn logit_biases() {
        assert_eq!(parse_logit_bias(&obj(r#"{"logit_bias": {"3": -100, "7": 2.5}}"#), 10).unwrap(), vec![(3, -100.0), (7, 2.5)]);
        assert!(parse_logit_bias(&obj(r#"{}"#), 10).unwrap().is_empty());
        for (body, needle) in [
            (r#"{"logit_bias": {"10": 1}}"#, "outside the vocabulary"),
            (r#"{"logit_bias": {"-1": 1}}"#, "token ids"),
            (r#"{"logit_bias": {"x": 1}}"#, "token ids"),
            (r#"{"logit_bias": {"1": 101}}"#, "-100 to 100"),
            (r#"{"logit_bias": {"1": "a"}}"#, "-100 to 100"),
            (r#"{"logit_bias": [1]}"#, "object"),
        ] {
            let e = parse_logit_bias(&obj(body), 10).unwrap_err();
            assert!(e.message.contains(needle) && e.param.as_deref() == Some("logit_bias"), "{body}: {}", e.message);
        }
    }

    #[test]
    fn prompts() {
        assert!(matches!(parse_prompt(&obj(r#"{"prompt": "hi"}"#), 10), Ok(Prompt::Text(s)) if s == "hi"));
        assert!(matches!(parse_prompt(&obj(r#"{"prompt": ["hi"]}"#), 10), Ok(Prompt::Text(s)) if s == "hi"));
        assert!(matches!(parse_prompt(&obj(r#"{"prompt": [1, 2]}"#), 10), Ok(Prompt::Tokens(t)) if t == [1, 2]));
        assert!(matches!(parse_prompt(&obj(r#"{"prompt": [[3]]}"#), 10), Ok(Prompt::Tokens(t)) if t == [3]));
        for body in [r#"{}"#, r#"{"prompt": 5}"#, r#"{"prompt": []}"#, r#"{"prompt": ["a", "b"]}"#, r#"{"prompt": [10]}"#, r#"{"prompt": [-1]}"#] {
            assert!(parse_prompt(&obj(body), 10).is_err(), "{body}");
        }
    }

    #[test]
    fn chunk_shapes() {
        let m = Meta { kind: Kind::Chat, id: "chatcmpl-1".into(), created: 5, model: "m".into() };
        let c = m.chunk(Some(""), true, None, false);
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert!(c["choices"][0]["finish_reason"].is_null());
        assert!(c.get("usage").is_none());
        let c = m.chunk(None, false, Some("stop"), true);
        assert_eq!(c["choices"][0]["delta"], json!({}));
        assert!(c["usage"].is_null());
        let u = m.usage_chunk(Usage { prompt: 3, cached: 2, completion: 4 });
        assert_eq!(u["usage"]["total_tokens"], 7);
        assert_eq!(u["usage"]["prompt_tokens_details"]["cached_tokens"], 2);
        assert_eq!(u["choices"], json!([]));
        let r = Meta { kind: Kind::Completion, ..m }.response("t", "length", Usage { prompt: 1, cached: 0, completion: 2 }, Value::Null);
        assert_eq!(r["object"], "text_completion");
        assert_eq!(r["choices"][0]["text"], "t");
    }

    #[test]
    fn key_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"secret", b""));
        assert!(constant_time_eq(b"", b""));
    }
}
