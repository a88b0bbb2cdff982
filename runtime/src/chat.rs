//! Chat templates and stop strings.
//!
//! [`ChatTemplate`] renders a conversation with the model's own Jinja template
//! (`tokenizer.chat_template` in the GGUF) through `minijinja`, set up the way Hugging Face
//! `transformers` renders templates (`apply_chat_template`), so prompts match what the model
//! was trained on:
//!
//! - `trim_blocks` and `lstrip_blocks` on, trailing newline of the template dropped (Jinja2's
//!   default), loop controls (`{% break %}`, `{% continue %}`) enabled;
//! - Python string/dict/list methods (`.strip()`, `.startswith()`, `.split()`, `.items()`, ...)
//!   through `minijinja-contrib`'s pycompat callback;
//! - the globals `raise_exception(msg)` (becomes [`ChatError::Raised`]) and
//!   `strftime_now(format)` (UTC; see [`ChatTemplate::with_fixed_time`]);
//! - `tojson` as HF defines it: `json.dumps(x, ensure_ascii=False, indent=..., separators=...,
//!   sort_keys=...)`, i.e. no HTML escaping and Python's spacing;
//! - the context HF passes: `messages` (each a `{role, content}` dict), `add_generation_prompt`,
//!   `bos_token`, `eos_token`, and `tools`/`documents` set to `none`.
//!
//! llama.cpp's built-in template handling (its own Jinja engine, or the hard-coded formats it
//! matches templates against) may differ in corner cases; we follow HF/Jinja2, which is what
//! `tests/reference/make_chat_refs.py` checks against. Not supported: HF's `{% generation %}`
//! tag (assistant-mask extension).
//!
//! Templates come from model files, so they are untrusted: a rendering runs on a budget
//! ([`RENDER_FUEL`], minijinja's fuel: instructions executed and bytes created), its output is
//! capped at [`MAX_RENDERED_BYTES`], `tojson`'s indent at [`MAX_TOJSON_INDENT`] and
//! `strftime_now`'s format at [`MAX_STRFTIME_FORMAT`]; past any of them the rendering fails with
//! [`ChatError::Limit`] (a loop nested to billions of steps or a string doubled in a loop ends
//! there, instead of hanging or exhausting memory).
//!
//! [`StopMatcher`] watches streamed text for stop strings, holding back text that might be the
//! start of one.

use crate::gguf::{Gguf, GgufError};
use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use std::fmt;

/// One chat turn. `role` is usually "system", "user" or "assistant".
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Message {
    /// Who speaks: the template decides which roles it knows.
    pub role: String,
    /// What they say.
    pub content: String,
}

impl Message {
    /// A turn of `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message { role: role.into(), content: content.into() }
    }
    /// A system turn.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// A user turn.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// An assistant turn.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The template does not parse.
    #[error("chat template syntax error: {0}")]
    Syntax(String),
    /// The template called `raise_exception(message)`, typically because the conversation has
    /// a shape it does not accept (e.g. roles that do not alternate).
    #[error("chat template rejected the conversation: {0}")]
    Raised(String),
    /// Any other failure while rendering (unknown filter, bad operand types, ...).
    #[error("chat template failed to render: {0}")]
    Render(String),
    /// The template went past a limit on its work, its output or an argument
    /// ([`RENDER_FUEL`], [`MAX_RENDERED_BYTES`], [`MAX_TOJSON_INDENT`], [`MAX_STRFTIME_FORMAT`]).
    #[error("chat template went past its limits: {0}")]
    Limit(String),
    /// The GGUF's template or tokenizer metadata has the wrong type.
    #[error("chat template metadata: {0}")]
    Gguf(#[from] GgufError),
    /// A special-token id that is not in `tokenizer.ggml.tokens`.
    #[error("{key} = {id} is outside the vocabulary ({vocab} tokens)")]
    #[allow(missing_docs)] // the message names the key, the id and the vocabulary size
    TokenId { key: &'static str, id: u64, vocab: usize },
}

/// Marks an error raised by the template's `raise_exception`, found again via `source()`.
#[derive(Debug)]
struct TemplateException(String);

impl fmt::Display for TemplateException {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TemplateException {}

const TEMPLATE_NAME: &str = "chat_template";

/// The work one rendering may do, in minijinja's fuel: about one unit per instruction executed
/// and one per 64 bytes of data the template creates (output, strings, lists), so it bounds both
/// time and memory (here about 256 MiB created in all). Real templates take a few thousand units
/// for a short conversation and about 70,000 for 1 MiB of messages (the server's largest body).
pub const RENDER_FUEL: u64 = 4_000_000;
/// The longest text a template may render.
pub const MAX_RENDERED_BYTES: usize = 16 << 20;
/// The largest `tojson` indent (a number of spaces, or the length of an indent string); real
/// templates use 2 or 4.
pub const MAX_TOJSON_INDENT: usize = 16;
/// The longest format `strftime_now` takes (real templates pass a dozen characters).
pub const MAX_STRFTIME_FORMAT: usize = 256;

/// A compiled chat template with the model's BOS/EOS token texts.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: String,
    eos_token: String,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).field("bos_token", &self.bos_token).field("eos_token", &self.eos_token).finish()
    }
}

impl ChatTemplate {
    /// The template in `tokenizer.chat_template`, with BOS/EOS texts from
    /// `tokenizer.ggml.tokens` at `tokenizer.ggml.bos_token_id`/`eos_token_id` (empty when an
    /// id is absent). `None` when the model has no template (base models).
    pub fn from_gguf(g: &Gguf) -> Result<Option<ChatTemplate>, ChatError> {
        let Some(source) = g.get_str_opt("tokenizer.chat_template")? else {
            return Ok(None);
        };
        let bos = token_text(g, "tokenizer.ggml.bos_token_id")?;
        let eos = token_text(g, "tokenizer.ggml.eos_token_id")?;
        ChatTemplate::new(source, &bos, &eos).map(Some)
    }

    /// Compiles `source`; a syntax error is [`ChatError::Syntax`].
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, ChatError> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .keep_trailing_newline(false)
                .build()
                .map_err(|e| ChatError::Syntax(e.to_string()))?,
        );
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(python_method);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", |format: &str| checked_format(format).map(|f| strftime(f, now_unix())));
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned()).map_err(|e| ChatError::Syntax(describe(&e)))?;
        Ok(ChatTemplate { env, source: source.to_owned(), bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// Makes `strftime_now` report this moment (Unix seconds, UTC) instead of the clock, for
    /// reproducible prompts.
    pub fn with_fixed_time(mut self, unix_seconds: i64) -> Self {
        self.env.add_function("strftime_now", move |format: &str| checked_format(format).map(|f| strftime(f, unix_seconds)));
        self
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }
    /// The text it renders as `bos_token`.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }
    /// The text it renders as `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends where the
    /// assistant's reply begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, ChatError> {
        let messages: Vec<Value> = messages.iter().map(|m| minijinja::context! { role => m.role.as_str(), content => m.content.as_str() }).collect();
        self.render_values(messages, Value::from(()), add_generation_prompt)
    }

    /// Renders a conversation with tools, as Hugging Face's `apply_chat_template(messages,
    /// tools=...)` does: `messages` as OpenAI sends them, with an assistant turn's
    /// `tool_calls` ([{"id", "type", "function": {"name", "arguments"}}], arguments as an
    /// object, which templates print with `tojson`) and `role: "tool"` turns with
    /// `tool_call_id`; `tools` as OpenAI's [{"type": "function", "function": {...}}].
    pub fn render_with_tools(&self, messages: &[serde_json::Value], tools: &[serde_json::Value], add_generation_prompt: bool) -> Result<String, ChatError> {
        let messages: Vec<Value> = messages.iter().map(from_json).collect();
        let tools = if tools.is_empty() { Value::from(()) } else { Value::from(tools.iter().map(from_json).collect::<Vec<_>>()) };
        self.render_values(messages, tools, add_generation_prompt)
    }

    /// Whether the template shows the tools it is given (Qwen2.5's does, SmolLM2's does not):
    /// a probe tool's name appears in the rendering, as llama.cpp tells.
    pub fn supports_tools(&self) -> bool {
        let probe =
            serde_json::json!({"type": "function", "function": {"name": "nomoat_probe_tool", "description": "", "parameters": {"type": "object", "properties": {}}}});
        self.render_with_tools(&[serde_json::json!({"role": "user", "content": "hi"})], &[probe], true).is_ok_and(|r| r.contains("nomoat_probe_tool"))
    }

    fn render_values(&self, messages: Vec<Value>, tools: Value, add_generation_prompt: bool) -> Result<String, ChatError> {
        let tmpl = self.env.get_template(TEMPLATE_NAME).map_err(|e| ChatError::Render(describe(&e)))?;
        let ctx = minijinja::context! {
            messages => messages,
            tools => tools,
            documents => (),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let mut out = CappedOutput(Vec::new());
        match tmpl.render_captured_to(ctx, &mut out) {
            // the template writes whole strs, so the bytes are UTF-8
            Ok(_) => String::from_utf8(out.0).map_err(|e| ChatError::Render(e.to_string())),
            Err(e) => Err(classify(&e)),
        }
    }
}

/// The rendering's output, refused past [`MAX_RENDERED_BYTES`].
struct CappedOutput(Vec<u8>);

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other("the rendered text is too long"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A rendering error as a [`ChatError`]: the template's own `raise_exception`, a limit, or
/// anything else.
fn classify(e: &minijinja::Error) -> ChatError {
    match e.kind() {
        ErrorKind::OutOfFuel => return ChatError::Limit(format!("it did more work than a rendering may ({RENDER_FUEL} units of fuel): {}", describe(e))),
        // the output is written to CappedOutput only, which fails only at the cap
        ErrorKind::WriteFailure => return ChatError::Limit(format!("the rendered text is longer than {MAX_RENDERED_BYTES} bytes")),
        _ => {}
    }
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(raised) = s.downcast_ref::<TemplateException>() {
            return ChatError::Raised(raised.0.clone());
        }
        if s.downcast_ref::<LimitExceeded>().is_some() || s.downcast_ref::<minijinja::Error>().is_some_and(|m| m.kind() == ErrorKind::OutOfFuel) {
            return ChatError::Limit(describe(e));
        }
        src = s.source();
    }
    ChatError::Render(describe(e))
}

/// Marks a limit that `tojson` or `strftime_now` enforce.
#[derive(Debug)]
struct LimitExceeded(String);

impl fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LimitExceeded {}

fn limit_error(message: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(LimitExceeded(message))
}

fn checked_format(format: &str) -> Result<&str, minijinja::Error> {
    if format.len() > MAX_STRFTIME_FORMAT {
        return Err(limit_error(format!("strftime_now: the format is {} bytes, over {MAX_STRFTIME_FORMAT}", format.len())));
    }
    Ok(format)
}

/// A JSON value as the templates see it (objects keep their key order).
fn from_json(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::from(i),
            (_, Some(u)) => Value::from(u),
            _ => Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::from(a.iter().map(from_json).collect::<Vec<_>>()),
        serde_json::Value::Object(o) => Value::from(o.iter().map(|(k, v)| (Value::from(k.as_str()), from_json(v))).collect::<indexmap::IndexMap<Value, Value>>()),
    }
}

/// The error with its template location (minijinja's `Display` already names line and name).
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn token_text(g: &Gguf, key: &'static str) -> Result<String, ChatError> {
    let Some(id) = g.get_u64_opt(key)? else {
        return Ok(String::new());
    };
    let Some(tokens) = g.get_array_opt("tokenizer.ggml.tokens")? else {
        return Ok(String::new());
    };
    let tok = usize::try_from(id).ok().and_then(|i| tokens.get(i)).ok_or(ChatError::TokenId { key, id, vocab: tokens.len() })?;
    tok.as_str().map(str::to_owned).ok_or_else(|| {
        ChatError::Gguf(GgufError::WrongMetadataType {
            key: "tokenizer.ggml.tokens".to_owned(),
            expected: "an array of strings",
            found: format!("an array whose item {id} is not a string"),
        })
    })
}

/// Python's str/dict/list methods (minijinja-contrib's pycompat), with `str.join` charging fuel
/// for every item it writes (pycompat's charges only for the separators, so `''.join(x)` over a
/// lazy list of 2^30 items grew without bound).
fn python_method(state: &mut minijinja::State, value: &Value, method: &str, args: &[Value]) -> Result<Value, minijinja::Error> {
    if method == "join" && value.kind() == ValueKind::String {
        if let [items] = args {
            let sep = value.as_str().unwrap_or("");
            let mut out = String::new();
            for (i, item) in items.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                let before = out.len();
                std::fmt::Write::write_fmt(&mut out, format_args!("{item}")).ok();
                state.consume_fuel(1 + (out.len() - before + sep.len()) as u64 / 64)?;
            }
            return Ok(Value::from(out));
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(TemplateException(message)))
}

// ---------------------------------------------------------------------------------------------
// tojson, as HF's chat-template environment defines it.

/// `x | tojson(ensure_ascii=False, indent=None, separators=None, sort_keys=False)`: Python's
/// `json.dumps` with those arguments (positional order as in HF's definition).
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, minijinja::Error> {
    let names = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > names.len() {
        return Err(minijinja::Error::new(ErrorKind::TooManyArguments, "tojson takes at most 4 arguments"));
    }
    let mut opt: [Value; 4] = Default::default();
    for (i, a) in args.iter().enumerate() {
        opt[i] = a.clone();
    }
    for (i, name) in names.iter().enumerate() {
        if let Some(v) = kwargs.get::<Option<Value>>(name)? {
            opt[i] = v;
        }
    }
    kwargs.assert_all_used()?;
    let ensure_ascii = opt[0].is_true();
    let indent: Option<String> = match opt[1].kind() {
        ValueKind::Undefined | ValueKind::None => None,
        ValueKind::String => Some(opt[1].as_str().unwrap_or("").to_owned()),
        ValueKind::Number => match opt[1].as_i64() {
            // Python indents by no spaces for 0 or less; the cap is checked below
            Some(n) => Some(" ".repeat(n.clamp(0, MAX_TOJSON_INDENT as i64 + 1) as usize)),
            None => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an integer or a string")),
        },
        _ => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: indent must be a number or a string")),
    };
    if let Some(ind) = &indent {
        if ind.len() > MAX_TOJSON_INDENT {
            return Err(limit_error(format!("tojson: an indent over {MAX_TOJSON_INDENT} is not allowed")));
        }
    }
    let (item_sep, key_sep) = match opt[2].kind() {
        ValueKind::Undefined | ValueKind::None => (if indent.is_some() { "," } else { ", " }.to_owned(), ": ".to_owned()),
        _ => {
            let parts: Vec<Value> = opt[2].try_iter()?.collect();
            match parts.as_slice() {
                [a, b] if a.as_str().is_some() && b.as_str().is_some() => (a.as_str().unwrap().to_owned(), b.as_str().unwrap().to_owned()),
                _ => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair of strings")),
            }
        }
    };
    let mut w = JsonWriter { out: String::new(), ensure_ascii, indent, item_sep, key_sep, sort_keys: opt[3].is_true() };
    w.value(value, 0)?;
    Ok(Value::from(w.out))
}

struct JsonWriter {
    out: String,
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl JsonWriter {
    fn newline(&mut self, depth: usize) {
        if let Some(ind) = &self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(ind);
            }
        }
    }

    fn value(&mut self, v: &Value, depth: usize) -> Result<(), minijinja::Error> {
        if depth > 500 {
            return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: nesting too deep"));
        }
        // each step adds at most an indent per level (<= 500 * 16 bytes) or one string
        if self.out.len() > MAX_RENDERED_BYTES {
            return Err(limit_error(format!("tojson: the text is longer than {MAX_RENDERED_BYTES} bytes")));
        }
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => self.out.push_str("null"),
            ValueKind::Bool => self.out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    self.out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    self.out.push_str(&py_float(f));
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or("")),
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                let key_strings: Vec<String> = keys.iter().map(json_key).collect::<Result<_, _>>()?;
                let mut order: Vec<usize> = (0..keys.len()).collect();
                if self.sort_keys {
                    order.sort_by(|&a, &b| key_strings[a].cmp(&key_strings[b]));
                }
                if keys.is_empty() {
                    self.out.push_str("{}");
                    return Ok(());
                }
                self.out.push('{');
                for (n, &i) in order.iter().enumerate() {
                    if n > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    self.string(&key_strings[i]);
                    let sep = self.key_sep.clone();
                    self.out.push_str(&sep);
                    let item = v.get_item(&std::mem::take(&mut keys[i]))?;
                    self.value(&item, depth + 1)?;
                }
                self.newline(depth);
                self.out.push('}');
            }
            ValueKind::Seq | ValueKind::Iterable => {
                // item by item: a list can be lazy (`a + a` doubled 30 times is 2^30 items that
                // take no memory until they are collected); the length check stops it
                let mut items = v.try_iter()?.peekable();
                if items.peek().is_none() {
                    self.out.push_str("[]");
                    return Ok(());
                }
                self.out.push('[');
                for (n, item) in items.enumerate() {
                    if n > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    self.value(&item, depth + 1)?;
                }
                self.newline(depth);
                self.out.push(']');
            }
            ValueKind::Bytes | ValueKind::Plain | ValueKind::Invalid | _ => {
                return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: a value of type {} is not JSON serializable", v.kind())))
            }
        }
        Ok(())
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        self.out.push_str(&format!("\\u{:04x}", unit));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// Python's `json` key coercion: strings as is, numbers/bools/None as their JSON text.
fn json_key(k: &Value) -> Result<String, minijinja::Error> {
    match k.kind() {
        ValueKind::String => Ok(k.as_str().unwrap_or("").to_owned()),
        ValueKind::None | ValueKind::Undefined => Ok("null".to_owned()),
        ValueKind::Bool => Ok(if k.is_true() { "true" } else { "false" }.to_owned()),
        ValueKind::Number if k.is_integer() => Ok(k.to_string()),
        ValueKind::Number => Ok(py_float(f64::try_from(k.clone())?)),
        _ => Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: keys must be str, int, float, bool or None, not {}", k.kind()))),
    }
}

/// Python's `float.__repr__` (which `json.dumps` uses): shortest round-trip digits, exponent
/// form below 1e-4 and from 1e16 on, written `1e+16` / `1e-05`.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    // Rust's Debug switches to exponent form at the same thresholds as Python's repr.
    let s = format!("{f:?}");
    match s.split_once('e') {
        None => s,
        Some((mant, exp)) => {
            let e: i32 = exp.parse().unwrap_or(0);
            format!("{mant}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// strftime_now.

fn now_unix() -> i64 {
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    {
        (js_sys::Date::now() / 1000.0).floor() as i64
    }
    #[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
    {
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }
    }
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
const WEEKDAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];

/// C/Python `strftime` for a UTC time: `%a %A %b %B %c %d %e %F %H %I %j %m %M %p %S %T %u %w
/// %y %Y %z %Z %%`, plus glibc's `%-d`-style unpadded forms. Unknown directives are kept as
/// written.
pub fn strftime(format: &str, unix_seconds: i64) -> String {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    let is_leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[month as usize - 1] + day + u32::from(is_leap && month > 2);
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };
    let month_name = MONTHS[month as usize - 1];
    let weekday_name = WEEKDAYS[weekday];

    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let unpadded = chars.peek() == Some(&'-');
        if unpadded {
            chars.next();
        }
        let num = |v: i64, width: usize| {
            if unpadded {
                v.to_string()
            } else {
                format!("{v:0width$}")
            }
        };
        let Some(d) = chars.next() else {
            out.push('%');
            break;
        };
        let s = match d {
            'a' => weekday_name[..3].to_owned(),
            'A' => weekday_name.to_owned(),
            'b' | 'h' => month_name[..3].to_owned(),
            'B' => month_name.to_owned(),
            'c' => format!("{} {} {:>2} {:02}:{:02}:{:02} {}", &weekday_name[..3], &month_name[..3], day, hour, minute, second, year),
            'd' => num(day as i64, 2),
            'e' => {
                if unpadded {
                    day.to_string()
                } else {
                    format!("{day:>2}")
                }
            }
            'F' => format!("{year:04}-{month:02}-{day:02}"),
            'H' => num(hour, 2),
            'I' => num(hour12, 2),
            'j' => num(yday as i64, 3),
            'm' => num(month as i64, 2),
            'M' => num(minute, 2),
            'p' => if hour < 12 { "AM" } else { "PM" }.to_owned(),
            'S' => num(second, 2),
            'T' => format!("{hour:02}:{minute:02}:{second:02}"),
            'u' => (weekday + 1).to_string(),
            'w' => ((weekday + 1) % 7).to_string(),
            'y' => num(year.rem_euclid(100), 2),
            'Y' => year.to_string(),
            'z' => "+0000".to_owned(),
            'Z' => "UTC".to_owned(),
            '%' => "%".to_owned(),
            other => format!("%{}{other}", if unpadded { "-" } else { "" }),
        };
        out.push_str(&s);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Stop strings.

/// Finds stop strings in streamed text. Feed each decoded piece to [`StopMatcher::push`]; it
/// returns the text that is safe to show now and whether a stop string matched. Text that could
/// be the start of a stop string is held back until the following pieces decide; the stop string
/// itself and anything after it are never emitted. Call [`StopMatcher::finish`] at the end of
/// generation to get the held text.
#[derive(Clone, Debug)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
    max_len: usize,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let max_len = stops.iter().map(String::len).max().unwrap_or(0);
        StopMatcher { stops, held: String::new(), stopped: false, max_len }
    }

    /// Whether a stop string has matched (later pushes emit nothing).
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// The text held back so far.
    pub fn held(&self) -> &str {
        &self.held
    }

    /// Feeds the next decoded piece: the text safe to show now, and whether a stop string matched.
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(piece);
        // The earliest match of any stop string (the longest one when several start there).
        let mut best: Option<usize> = None;
        for s in &self.stops {
            if let Some(pos) = self.held.find(s.as_str()) {
                if best.is_none_or(|b| pos < b) {
                    best = Some(pos);
                }
            }
        }
        if let Some(pos) = best {
            self.held.truncate(pos);
            self.stopped = true;
            return (std::mem::take(&mut self.held), true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let min_start = self.held.len().saturating_sub(self.max_len.saturating_sub(1));
        let mut keep_from = self.held.len();
        for (i, _) in self.held.char_indices().filter(|&(i, _)| i >= min_start) {
            let tail = &self.held[i..];
            if self.stops.iter().any(|s| s.starts_with(tail)) {
                keep_from = i;
                break;
            }
        }
        let kept = self.held.split_off(keep_from);
        (std::mem::replace(&mut self.held, kept), false)
    }

    /// Releases the held text (generation ended without a stop string completing). Empty after
    /// a stop.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}
