//! Tool (function) calling: the grammar a reply with tool calls follows, reading the calls back
//! out of the reply, and a generic tool prompt for chat templates without tool support.
//!
//! A call is written as Qwen2.5 and Hermes-style templates render one, and as those models were
//! trained to write it:
//!
//! ```text
//! <tool_call>
//! {"name": "get_weather", "arguments": {"city": "Paris"}}
//! </tool_call>
//! ```
//!
//! The grammar ([`grammar`]) makes every call name a given tool and its arguments fit that tool's
//! parameter schema. With [`ToolChoice::Auto`] a reply is either plain text that does not start
//! with `<`, or calls only; the first character tells which, so a streamed reply knows at once.

use crate::constrain::{json_type_name, FieldError, Grammar};
use serde_json::{json, Value};

/// A function the model may call: OpenAI's `{"type": "function", "function": {...}}`.
#[derive(Clone, Debug, PartialEq)]
pub struct Tool {
    /// 1 to 64 of `[A-Za-z0-9_-]` (OpenAI's rule; the grammar writes it as a literal).
    pub name: String,
    /// What the function does, for the model's prompt.
    pub description: Option<String>,
    /// A JSON schema for the arguments object.
    pub parameters: Value,
}

impl Tool {
    /// The tool as templates and the generic prompt show it (OpenAI's shape).
    pub fn to_json(&self) -> Value {
        // OpenAI's key order: templates print the tool with tojson as it was sent
        let mut f = serde_json::Map::new();
        f.insert("name".into(), json!(self.name));
        if let Some(d) = &self.description {
            f.insert("description".into(), json!(d));
        }
        f.insert("parameters".into(), self.parameters.clone());
        json!({"type": "function", "function": f})
    }
}

/// Whether a name is one the grammar can write literally.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// OpenAI's `tool_choice`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// No calls: the tools are still shown to the model, the reply is text.
    None,
    /// Text or calls, the model's choice.
    Auto,
    /// At least one call.
    Required,
    /// One call of this tool.
    Named(String),
}

/// Most tools a request may offer.
pub const MAX_TOOLS: usize = 128;

/// A request's tools: the server's and the browser's, in OpenAI's shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolRequest {
    /// The functions offered.
    pub tools: Vec<Tool>,
    /// What the reply must be.
    pub choice: ToolChoice,
    /// Whether more than one call may come (`parallel_tool_calls`).
    pub parallel: bool,
}

impl ToolRequest {
    /// Whether the reply is to be read for calls: there are tools and `tool_choice` is not "none".
    pub fn active(&self) -> bool {
        !self.tools.is_empty() && self.choice != ToolChoice::None
    }

    /// `tools` ([{"type": "function", "function": {"name", "description", "parameters",
    /// "strict"}}]), `tool_choice` ("none", "auto", "required" or {"type": "function",
    /// "function": {"name"}}; "auto" by default when there are tools) and
    /// `parallel_tool_calls` (default true); absent and null are the same.
    pub fn parse(tools: Option<&Value>, tool_choice: Option<&Value>, parallel_tool_calls: Option<&Value>) -> Result<ToolRequest, FieldError> {
        let bad = |param: &str, message: String| FieldError { param: param.to_string(), message };
        let given = |v: Option<&Value>| v.filter(|v| !v.is_null()).cloned();
        let mut list = Vec::new();
        match given(tools) {
            None => {}
            Some(Value::Array(ts)) => {
                if ts.len() > MAX_TOOLS {
                    return Err(bad("tools", format!("at most {MAX_TOOLS} tools, got {}", ts.len())));
                }
                for (i, t) in ts.iter().enumerate() {
                    let p = format!("tools[{i}]");
                    if t.get("type").and_then(Value::as_str) != Some("function") {
                        return Err(bad(&p, format!("{p} must be {{\"type\": \"function\", \"function\": {{...}}}}")));
                    }
                    let Some(Value::Object(f)) = t.get("function") else {
                        return Err(bad(&format!("{p}.function"), format!("{p}.function must be an object")));
                    };
                    let name = match f.get("name") {
                        Some(Value::String(n)) if valid_name(n) => n.clone(),
                        _ => return Err(bad(&format!("{p}.function.name"), format!("{p}.function.name must be 1 to 64 letters, digits, '_' or '-'"))),
                    };
                    if list.iter().any(|t: &Tool| t.name == name) {
                        return Err(bad(&format!("{p}.function.name"), format!("two tools are named '{name}'")));
                    }
                    let description = match given(f.get("description")) {
                        None => None,
                        Some(Value::String(d)) => Some(d),
                        Some(v) => {
                            return Err(bad(&format!("{p}.function.description"), format!("{p}.function.description must be a string, got {}", json_type_name(&v))))
                        }
                    };
                    let parameters = match given(f.get("parameters")) {
                        None => json!({"type": "object", "properties": {}}),
                        Some(v @ Value::Object(_)) => v,
                        Some(v) => {
                            return Err(bad(
                                &format!("{p}.function.parameters"),
                                format!("{p}.function.parameters must be a JSON schema object, got {}", json_type_name(&v)),
                            ))
                        }
                    };
                    if let Some(v) = given(f.get("strict")).filter(|v| !v.is_boolean()) {
                        return Err(bad(&format!("{p}.function.strict"), format!("'strict' must be a boolean, got {}", json_type_name(&v))));
                    }
                    list.push(Tool { name, description, parameters });
                }
            }
            Some(v) => return Err(bad("tools", format!("'tools' must be a list, got {}", json_type_name(&v)))),
        }
        const SHAPES: &str = "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}";
        let choice = match given(tool_choice) {
            None if list.is_empty() => ToolChoice::None,
            None => ToolChoice::Auto,
            Some(Value::String(c)) if c == "none" => ToolChoice::None,
            Some(Value::String(c)) if c == "auto" => ToolChoice::Auto,
            Some(Value::String(c)) if c == "required" => ToolChoice::Required,
            Some(Value::Object(c)) => match c.get("function").and_then(|f| f.get("name")).and_then(Value::as_str) {
                Some(n) if list.iter().any(|t| t.name == n) => ToolChoice::Named(n.to_string()),
                Some(n) => return Err(bad("tool_choice", format!("tool_choice names '{n}', which is not one of the tools"))),
                None => return Err(bad("tool_choice", SHAPES.into())),
            },
            Some(v) => return Err(bad("tool_choice", format!("{SHAPES}, got {v}"))),
        };
        if list.is_empty() && matches!(choice, ToolChoice::Auto | ToolChoice::Required) {
            return Err(bad("tool_choice", "tool_choice asks for tool calls, but the request has no tools".into()));
        }
        let parallel = match given(parallel_tool_calls) {
            None => true,
            Some(Value::Bool(b)) => b,
            Some(v) => return Err(bad("parallel_tool_calls", format!("'parallel_tool_calls' must be a boolean, got {}", json_type_name(&v)))),
        };
        Ok(ToolRequest { tools: list, choice, parallel })
    }
}

/// A call read out of a reply.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolCall {
    /// The tool called.
    pub name: String,
    /// The arguments object as JSON text, as the model wrote it.
    pub arguments: String,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The grammar of a reply under `choice` (None for [`ToolChoice::None`]: unconstrained text).
/// `parallel`: more than one call may follow (OpenAI's `parallel_tool_calls`).
pub fn grammar(tools: &[Tool], choice: &ToolChoice, parallel: bool) -> Option<Grammar> {
    grammar_with_format(tools, choice, parallel, None)
}

/// `grammar`, with the text a reply under [`ToolChoice::Auto`] may be instead of calls given
/// by `response_format` (a JSON schema or any JSON object: it starts with `{`, never `<`);
/// None for other text grammars, which do not combine with tools.
pub fn grammar_with_format(tools: &[Tool], choice: &ToolChoice, parallel: bool, format: Option<&Grammar>) -> Option<Grammar> {
    let text = match format {
        None => ("TEXT", "TEXT: /[^<](?s:.*)/".to_string()),
        Some(Grammar::JsonObject) => ("reply", "reply: %json {\"type\": \"object\"}".to_string()),
        Some(Grammar::JsonSchema(s)) => ("reply", format!("reply: %json {}", with_layout(s))),
        Some(_) => return None,
    };
    let chosen: Vec<&Tool> = match choice {
        ToolChoice::None => return None,
        ToolChoice::Named(n) => tools.iter().filter(|t| &t.name == n).collect(),
        ToolChoice::Auto | ToolChoice::Required => tools.iter().collect(),
    };
    let mut g = String::new();
    let calls = if parallel && !matches!(choice, ToolChoice::Named(_)) { "call (\"\\n\" call)*" } else { "call" };
    match choice {
        ToolChoice::Auto => g.push_str(&format!("start: {} | calls\n{}\ncalls: {calls}\n", text.0, text.1)),
        _ => g.push_str(&format!("start: calls\ncalls: {calls}\n")),
    }
    let alternatives: Vec<String> = (0..chosen.len()).map(|i| format!("call_{i}")).collect();
    g.push_str(&format!("call: {}\n", alternatives.join(" | ")));
    for (i, t) in chosen.iter().enumerate() {
        let schema = with_layout(&t.parameters);
        let head = serde_json::to_string(&format!("{OPEN}\n{{\"name\": \"{}\", \"arguments\": ", t.name)).expect("a string serializes");
        let tail = serde_json::to_string(&format!("}}\n{CLOSE}")).expect("a string serializes");
        g.push_str(&format!("call_{i}: {head} args_{i} {tail}\nargs_{i}: %json {schema}\n"));
    }
    Some(Grammar::Lark(g))
}

/// The schema with the same JSON layout as response_format's: "a": 1, no free whitespace.
fn with_layout(schema: &Value) -> Value {
    let mut schema = schema.clone();
    if let Value::Object(o) = &mut schema {
        o.insert("x-guidance".into(), json!({"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": false}));
    }
    schema
}

/// A reply's calls with their ids, "call_" and 24 hex digits drawn from `seed` (random for each
/// reply: the ids are unique within it and unguessable across replies).
pub fn with_ids(seed: u64, calls: Vec<ToolCall>) -> Vec<(String, ToolCall)> {
    let mut rng = crate::rng::Rng::new(seed);
    calls.into_iter().map(|c| (format!("call_{:016x}{:08x}", rng.next_u64(), rng.next_u64() as u32), c)).collect()
}

/// A reply's calls with their ids as OpenAI's `tool_calls` list:
/// `[{"id", "type": "function", "function": {"name", "arguments"}}]`.
pub fn openai_calls(calls: &[(String, ToolCall)]) -> Vec<Value> {
    calls.iter().map(|(id, c)| json!({"id": id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})).collect()
}

/// A reply with tools, read back: the text before its calls, the calls, and whether it stopped
/// inside a call (cut by max_tokens or a stop string): that call is in neither.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadReply {
    /// Text outside the calls, trimmed; None when empty.
    pub content: Option<String>,
    /// The calls, in order.
    pub calls: Vec<ToolCall>,
    /// The reply ended inside an unfinished call.
    pub cut_short: bool,
}

impl ReadReply {
    /// OpenAI's finish_reason: "tool_calls" when every call it began is complete, else the
    /// generation's own reason (`generated`: "length" or "stop"), so a cut reply says so.
    pub fn finish_reason<'a>(&self, generated: &'a str) -> &'a str {
        if self.calls.is_empty() || self.cut_short {
            generated
        } else {
            "tool_calls"
        }
    }
}

/// A reply under a tool grammar read as calls; None when it is text (it did not start with a
/// call, or it holds neither a call that parses nor an unfinished one). The grammar makes the
/// first character tell: a call starts with `<`, text cannot.
pub fn read_calls(text: &str) -> Option<ReadReply> {
    if !text.starts_with('<') {
        return None;
    }
    let reply = parse_reply(text);
    (!reply.calls.is_empty() || reply.cut_short).then_some(reply)
}

/// A reply written as [`grammar`] makes it, read back. A call whose JSON does not parse, or has
/// no string `name`, is left in the text; an unclosed call at the end is dropped (`cut_short`).
pub fn parse_reply(text: &str) -> ReadReply {
    let mut calls = Vec::new();
    let mut content = String::new();
    let mut cut_short = false;
    let mut rest = text;
    while let Some(start) = rest.find(OPEN) {
        content.push_str(&rest[..start]);
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find(CLOSE) else {
            cut_short = true;
            rest = "";
            break;
        };
        match serde_json::from_str::<Value>(after[..end].trim()) {
            Ok(Value::Object(o)) if o.get("name").is_some_and(Value::is_string) => {
                let arguments = o.get("arguments").cloned().unwrap_or(json!({}));
                // arguments as OpenAI sends them: JSON text (a model may write a string of JSON)
                let arguments = match arguments {
                    Value::String(s) if serde_json::from_str::<Value>(&s).is_ok() => s,
                    v => v.to_string(),
                };
                calls.push(ToolCall { name: o["name"].as_str().unwrap_or_default().to_string(), arguments });
            }
            _ => content.push_str(&rest[start..start + OPEN.len() + end + CLOSE.len()]),
        }
        rest = &after[end + CLOSE.len()..];
    }
    // cut inside the call's opening tag
    if !rest.trim().is_empty() && OPEN.starts_with(rest.trim()) {
        cut_short = true;
        rest = "";
    }
    content.push_str(rest);
    let content = content.trim();
    ReadReply { content: (!content.is_empty()).then(|| content.to_string()), calls, cut_short }
}

/// An assistant turn's calls as the model writes them, for templates without tool support.
pub fn render_calls(calls: &[ToolCall]) -> String {
    calls
        .iter()
        .map(|c| {
            let args = serde_json::from_str::<Value>(&c.arguments).unwrap_or(Value::String(c.arguments.clone()));
            format!("{OPEN}\n{}\n{CLOSE}", json!({"name": c.name, "arguments": args}))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The system prompt that describes the tools to a model whose template has no tool support,
/// in the words Qwen2.5's template uses (llama.cpp's generic tool prompt does the same).
pub fn generic_prompt(tools: &[Tool]) -> String {
    let list: Vec<String> = tools.iter().map(|t| t.to_json().to_string()).collect();
    format!(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{}\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
        list.join("\n")
    )
}

/// A tool's result as the user turn that carries it, for templates without tool support.
pub fn render_result(content: &str) -> String {
    format!("<tool_response>\n{content}\n</tool_response>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_into_text_and_calls() {
        let r = parse_reply("<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {}}\n</tool_call>");
        assert_eq!((r.content.as_deref(), r.cut_short), (None, false));
        assert_eq!(r.calls, vec![ToolCall { name: "f".into(), arguments: "{\"a\":1}".into() }, ToolCall { name: "g".into(), arguments: "{}".into() }]);
        assert_eq!(r.finish_reason("stop"), "tool_calls");
        let r = parse_reply("Sure. <tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"b\\\": 2}\"}</tool_call>");
        assert_eq!((r.content.as_deref(), r.calls[0].arguments.as_str()), (Some("Sure."), "{\"b\": 2}"));
        let r = parse_reply("no calls <tool_call>{broken</tool_call> <tool_call>unclosed");
        assert!(r.calls.is_empty() && r.cut_short);
        assert_eq!(r.content.as_deref(), Some("no calls <tool_call>{broken</tool_call>"));
    }

    #[test]
    fn a_reply_cut_inside_a_call_keeps_its_complete_calls_and_says_length() {
        let one = "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>";
        // max_tokens ran out in the second call: the first is a call, the second is not text
        let r = read_calls(&format!("{one}\n<tool_call>\n{{\"name\": \"f\", \"arguments\": {{\"a\": 2")).unwrap();
        assert_eq!((r.content.as_deref(), r.calls.len(), r.cut_short, r.finish_reason("length")), (None, 1, true, "length"));
        // ... or in the first: no calls and no text
        for cut in ["<tool_call>\n{\"name\": \"f\", \"argu", "<tool_ca"] {
            let r = read_calls(cut).unwrap();
            assert_eq!((r.content.as_deref(), r.calls.len(), r.finish_reason("length")), (None, 0, "length"), "{cut}");
        }
        let r = read_calls(&format!("{one}\n<tool")).unwrap();
        assert_eq!((r.content.as_deref(), r.calls.len(), r.cut_short), (None, 1, true));
        assert_eq!(parse_reply("a < b <").content.as_deref(), Some("a < b <"));
        assert_eq!(read_calls(one).unwrap().finish_reason("stop"), "tool_calls");
        assert_eq!(read_calls("plain text"), None);
        assert_eq!(read_calls("<b>bold</b>"), None);
    }

    #[test]
    fn calls_render_as_they_parse() {
        let calls = vec![ToolCall { name: "f".into(), arguments: "{\"a\": [1, 2]}".into() }];
        let r = parse_reply(&render_calls(&calls));
        assert_eq!((r.content, r.calls[0].name.as_str(), serde_json::from_str::<Value>(&r.calls[0].arguments).unwrap()), (None, "f", json!({"a": [1, 2]})));
    }

    #[test]
    fn grammar_per_choice() {
        let t = |n: &str| Tool { name: n.into(), description: None, parameters: json!({"type": "object"}) };
        let tools = [t("a"), t("b")];
        assert_eq!(grammar(&tools, &ToolChoice::None, true), None);
        let Some(Grammar::Lark(auto)) = grammar(&tools, &ToolChoice::Auto, true) else { panic!() };
        assert!(auto.starts_with("start: TEXT | calls") && auto.contains("call_1") && auto.contains("(\"\\n\" call)*"), "{auto}");
        assert!(auto.starts_with("start: TEXT | calls\nTEXT: /[^<](?s:.*)/\ncalls: "), "{auto}");
        let Some(Grammar::Lark(json)) = grammar_with_format(&tools, &ToolChoice::Auto, false, Some(&Grammar::JsonObject)) else { panic!() };
        assert!(json.starts_with("start: reply | calls\nreply: %json {\"type\": \"object\"}\ncalls: call\n"), "{json}");
        assert_eq!(grammar_with_format(&tools, &ToolChoice::Auto, true, Some(&Grammar::Regex("a".into()))), None);
        let Some(Grammar::Lark(named)) = grammar(&tools, &ToolChoice::Named("b".into()), true) else { panic!() };
        assert!(named.starts_with("start: calls\ncalls: call\n") && named.contains("\\\"b\\\"") && !named.contains("\\\"a\\\""), "{named}");
    }
}
