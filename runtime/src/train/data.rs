//! Fine-tuning data: one JSON object a line, in the three formats mlx-lm and TRL read, turned
//! into token ids and the positions whose tokens the loss is taken on.
//!
//! - `{"messages": [{"role", "content"}, ...]}`: rendered through the model's chat template;
//!   the loss on the assistant turns only (each turn's text as the template ends it, its
//!   end-of-turn marker included, so the model learns to stop).
//! - `{"prompt": "...", "completion": "..."}`: as a user turn and the assistant's reply where
//!   the model has a chat template (as mlx-lm does), else the two texts one after the other;
//!   the loss on the completion only.
//! - `{"text": "..."}`: the text between the tokenizer's BOS and EOS; the loss on every token.

use crate::chat::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;

/// One training sequence: `ids`, and for each position whether the loss includes predicting
/// that token from the ones before it (never the first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The token ids, template and special tokens included.
    pub ids: Vec<u32>,
    /// Per position: whether the loss includes predicting that token.
    pub trained: Vec<bool>,
    /// The line of the file it came from (1-based).
    pub line: usize,
}

impl Example {
    /// Tokens the loss is taken on.
    pub fn n_trained(&self) -> usize {
        self.trained.iter().filter(|t| **t).count()
    }
}

/// Which of the three formats a line is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"messages": [...]}`: a conversation, rendered with the chat template; the loss is on the
    /// assistant turns.
    Messages,
    /// `{"prompt", "completion"}`: the loss is on the completion.
    PromptCompletion,
    /// `{"text"}`: the loss is on all of it.
    Text,
}

impl Format {
    /// The format as messages show it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Messages => "{\"messages\": [...]}",
            Format::PromptCompletion => "{\"prompt\", \"completion\"}",
            Format::Text => "{\"text\"}",
        }
    }
}

/// What went wrong in a data file, with the line it was on (0: the file as a whole).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if *line > 0 { format!("line {line}: ") } else { String::new() })]
pub struct DataError {
    /// The line (1-based; 0: the file as a whole).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

fn err<T>(line: usize, message: impl Into<String>) -> Result<T, DataError> {
    Err(DataError { line, message: message.into() })
}

/// How examples are read.
#[derive(Clone, Copy, Debug)]
pub struct DataOptions {
    /// Longest sequence in tokens (`--ctx`).
    pub ctx: usize,
    /// Refuse an example longer than `ctx` instead of skipping it (`--strict`).
    pub strict: bool,
}

/// A data file read: its examples, its format, and what was left out.
#[derive(Clone, Debug)]
pub struct DataSet {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// The format of its lines (one format a file).
    pub format: Format,
    /// Examples longer than the context, left out (none with `strict`).
    pub skipped_too_long: usize,
    /// Blank lines, which are allowed and ignored.
    pub blank_lines: usize,
}

impl DataSet {
    /// Tokens in all the examples.
    pub fn n_tokens(&self) -> usize {
        self.examples.iter().map(|e| e.ids.len()).sum()
    }
    /// Tokens the loss is computed on.
    pub fn n_trained(&self) -> usize {
        self.examples.iter().map(|e| e.n_trained()).sum()
    }
}

/// Reads `text` (a JSONL file's contents) for the model of `tok` and `template`.
pub fn read_jsonl(text: &str, tok: &Tokenizer, template: Option<&ChatTemplate>, opts: DataOptions) -> Result<DataSet, DataError> {
    let mut set = DataSet { examples: Vec::new(), format: Format::Text, skipped_too_long: 0, blank_lines: 0 };
    let mut format: Option<(Format, usize)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            set.blank_lines += 1;
            continue;
        }
        let value: serde_json::Value = match serde_json::from_str(raw) {
            Ok(v) => v,
            Err(e) => return err(line, format!("not valid JSON ({e})")),
        };
        let Some(obj) = value.as_object() else { return err(line, "expected a JSON object") };
        let this = format_of(obj).ok_or_else(|| DataError {
            line,
            message: format!(
                "unknown format (keys: {}): expected {}, {} or {}",
                obj.keys().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", "),
                Format::Messages.name(),
                Format::PromptCompletion.name(),
                Format::Text.name()
            ),
        })?;
        match format {
            None => format = Some((this, line)),
            Some((first, first_line)) if first != this => {
                return err(line, format!("this line is {} but line {first_line} is {}: use one format per file", this.name(), first.name()));
            }
            _ => {}
        }
        let ex = match this {
            Format::Messages => messages_example(obj, tok, template, line)?,
            Format::PromptCompletion => prompt_completion_example(obj, tok, template, line)?,
            Format::Text => text_example(obj, tok, line)?,
        };
        if ex.n_trained() == 0 {
            return err(line, "no token to train on (an empty completion or assistant turn?)");
        }
        if ex.ids.len() > opts.ctx {
            if opts.strict {
                return err(line, format!("{} tokens, longer than the context of {} (--ctx)", ex.ids.len(), opts.ctx));
            }
            set.skipped_too_long += 1;
            continue;
        }
        set.examples.push(ex);
    }
    set.format = format.map(|f| f.0).unwrap_or(Format::Text);
    if set.examples.is_empty() {
        let why =
            if set.skipped_too_long > 0 { format!(": all {} examples are longer than the context of {} (--ctx)", set.skipped_too_long, opts.ctx) } else { String::new() };
        return err(0, format!("the data set has no examples{why}"));
    }
    Ok(set)
}

fn format_of(obj: &serde_json::Map<String, serde_json::Value>) -> Option<Format> {
    if obj.contains_key("messages") {
        Some(Format::Messages)
    } else if obj.contains_key("prompt") && obj.contains_key("completion") {
        Some(Format::PromptCompletion)
    } else if obj.contains_key("text") {
        Some(Format::Text)
    } else {
        None
    }
}

fn string_field<'a>(obj: &'a serde_json::Map<String, serde_json::Value>, key: &str, line: usize) -> Result<&'a str, DataError> {
    match obj.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(_) => err(line, format!("\"{key}\" must be a string")),
        None => err(line, format!("\"{key}\" is missing")),
    }
}

fn encode(tok: &Tokenizer, text: &str, add_special: bool, line: usize) -> Result<Vec<u32>, DataError> {
    tok.encode(text, add_special, true).map_err(|e| DataError { line, message: format!("tokenizing: {e}") })
}

/// BOS (where the tokenizer adds one), the text, EOS; trained on everything after BOS.
fn text_example(obj: &serde_json::Map<String, serde_json::Value>, tok: &Tokenizer, line: usize) -> Result<Example, DataError> {
    let text = string_field(obj, "text", line)?;
    let mut ids = encode(tok, text, true, line)?;
    if let Some(eos) = tok.eos() {
        ids.push(eos);
    }
    let trained = (0..ids.len()).map(|i| i > 0).collect();
    Ok(Example { ids, trained, line })
}

fn prompt_completion_example(
    obj: &serde_json::Map<String, serde_json::Value>,
    tok: &Tokenizer,
    template: Option<&ChatTemplate>,
    line: usize,
) -> Result<Example, DataError> {
    let (prompt, completion) = (string_field(obj, "prompt", line)?, string_field(obj, "completion", line)?);
    if let Some(t) = template {
        return chat_example(&[Message::user(prompt), Message::assistant(completion)], tok, t, line);
    }
    let mut ids = encode(tok, prompt, true, line)?;
    let n_prompt = ids.len();
    ids.extend(encode(tok, completion, false, line)?);
    if let Some(eos) = tok.eos() {
        ids.push(eos);
    }
    let trained = (0..ids.len()).map(|i| i >= n_prompt.max(1)).collect();
    Ok(Example { ids, trained, line })
}

fn messages_example(obj: &serde_json::Map<String, serde_json::Value>, tok: &Tokenizer, template: Option<&ChatTemplate>, line: usize) -> Result<Example, DataError> {
    let Some(t) = template else {
        return err(line, "the model has no chat template for {\"messages\"}: use {\"prompt\", \"completion\"} or {\"text\"}");
    };
    let Some(list) = obj.get("messages").and_then(|m| m.as_array()) else { return err(line, "\"messages\" must be a list") };
    let mut messages = Vec::new();
    for (j, m) in list.iter().enumerate() {
        let Some(m) = m.as_object() else { return err(line, format!("message {j} is not an object")) };
        let role = string_field(m, "role", line).map_err(|e| DataError { line, message: format!("message {j}: {}", e.message) })?;
        let content = string_field(m, "content", line).map_err(|e| DataError { line, message: format!("message {j}: {}", e.message) })?;
        messages.push(Message::new(role, content));
    }
    if !messages.iter().any(|m| m.role == "assistant") {
        return err(line, "no assistant message to train on");
    }
    chat_example(&messages, tok, t, line)
}

/// The conversation rendered and tokenized, trained on each assistant turn: the tokens between
/// the rendering up to that turn's generation prompt and the rendering through the turn.
fn chat_example(messages: &[Message], tok: &Tokenizer, t: &ChatTemplate, line: usize) -> Result<Example, DataError> {
    let render = |m: &[Message], gen: bool| t.render(m, gen).map_err(|e| DataError { line, message: format!("chat template: {e}") });
    let full = render(messages, false)?;
    let ids = encode(tok, &full, false, line)?;
    let mut trained = vec![false; ids.len()];
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = encode(tok, &render(&messages[..i], true)?, false, line)?;
        let through = encode(tok, &render(&messages[..=i], false)?, false, line)?;
        // both renderings must be prefixes of the whole, token for token, for the span to be
        // the assistant's own tokens
        if !ids.starts_with(&through) || !through.starts_with(&before) {
            return err(line, "the chat template renders this conversation differently turn by turn: its assistant turns cannot be told apart");
        }
        for flag in &mut trained[before.len().max(1)..through.len()] {
            *flag = true;
        }
    }
    Ok(Example { ids, trained, line })
}
