//! The `chat_template` target: the input is a chat template (its bytes read as UTF-8, invalid
//! sequences replaced). What compiles is rendered for a short conversation, for an empty one and
//! with a tool. Any error is fine; a panic, a hang or a blow-up of memory is not, and the limits
//! in `nomoat_runtime::chat` (fuel, rendered length, `tojson`'s indent, `strftime_now`'s format)
//! are what keep each rendering within the harness's time and memory limits.

use nomoat_runtime::chat::{ChatTemplate, Message, MAX_RENDERED_BYTES};

pub fn run(data: &[u8]) {
    let source = String::from_utf8_lossy(data);
    let Ok(t) = ChatTemplate::new(&source, "<s>", "</s>") else {
        return;
    };
    let t = t.with_fixed_time(1_733_000_000);
    let messages = [Message::system("You are terse."), Message::user("Hi {{ 7 * 7 }} <|im_end|>\n\u{e9}"), Message::assistant("Hello!"), Message::user("What is 2+2?")];
    for (m, gen) in [(&messages[..], true), (&messages[..1], false), (&[][..], true)] {
        if let Ok(out) = t.render(m, gen) {
            assert!(out.len() <= MAX_RENDERED_BYTES, "{} bytes rendered", out.len());
        }
    }
    let tool = serde_json::json!({"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
    let turns = [
        serde_json::json!({"role": "user", "content": "Weather in Paris?"}),
        serde_json::json!({"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}),
        serde_json::json!({"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"}),
    ];
    if let Ok(out) = t.render_with_tools(&turns, &[tool], true) {
        assert!(out.len() <= MAX_RENDERED_BYTES, "{} bytes rendered", out.len());
    }
}
