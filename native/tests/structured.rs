//! Structured output through `nomoat serve` (issue #18): `response_format` json_object and
//! json_schema sampled at temperature 1.0, every reply validated by Python's `jsonschema`;
//! `seed` reproducible under a schema; `logit_bias`; `logprobs` (chat's and /v1/completions');
//! OpenAI-style 400s for schemas that cannot be used; tools through the generic prompt; then
//! `client.chat.completions.parse` with a pydantic model (tests/server/structured_test.py). One server (SmolLM2 135M) serves every step.

#[allow(dead_code)] // the other server tests use the rest
mod common;

use common::Server;

use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

impl Server {
    fn start() -> Server {
        let model = common::smollm2();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_nomoat"));
        cmd.args(["serve", "--port", "0", "-c", "1024", "--no-www", "-m"])
            .arg(&model)
            .env("XDG_RUNTIME_DIR", std::env::var_os("XDG_RUNTIME_DIR").unwrap_or_else(|| "/tmp".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let (child, addr, log) = common::spawn_listening(cmd);
        Server { child, addr, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn post_raw(&self, body: &Value) -> (u16, String) {
        self.post_to("/v1/chat/completions", body)
    }

    fn post_to(&self, path: &str, body: &Value) -> (u16, String) {
        let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(240)).build();
        match agent.post(&self.url(path)).set("Content-Type", "application/json").send_string(&body.to_string()) {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("request failed: {e}\nserver log:\n{}", self.log.lock().unwrap()),
        }
    }

    /// A 200 chat reply: (content, finish_reason).
    fn chat(&self, body: &Value) -> (String, String) {
        let (status, text) = self.post_raw(body);
        assert_eq!(status, 200, "{body}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let c = &v["choices"][0];
        (c["message"]["content"].as_str().unwrap().to_string(), c["finish_reason"].as_str().unwrap().to_string())
    }

    /// A 400 whose error names `param` and says `needle`.
    fn refused(&self, body: &Value, param: &str, needle: &str) {
        let t = Instant::now();
        let (status, text) = self.post_raw(body);
        assert_eq!(status, 400, "{:.300}: {text}", body.to_string());
        let e: Value = serde_json::from_str(&text).unwrap();
        let e = &e["error"];
        assert_eq!(e["type"], "invalid_request_error", "{text}");
        assert_eq!(e["param"], param, "{text}");
        assert!(e["message"].as_str().unwrap().to_lowercase().contains(&needle.to_lowercase()), "{needle:?} not in {text}");
        assert!(t.elapsed() < Duration::from_secs(10), "{text}: refused only after {:?}", t.elapsed());
        let code = match param {
            p if p.ends_with(".schema") => json!("invalid_schema"),
            "grammar" if !needle.contains("alone") => json!("invalid_grammar"),
            _ => Value::Null,
        };
        assert_eq!(e["code"], code, "{text}");
    }
}

fn ask(question: &str, response_format: Value, extra: Value) -> Value {
    let mut b = json!({"model": "m", "messages": [{"role": "user", "content": question}], "response_format": response_format});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

fn schema_format(name: &str, schema: &Value) -> Value {
    json!({"type": "json_schema", "json_schema": {"name": name, "strict": true, "schema": schema}})
}

/// Nested objects, arrays, enums, bounded numbers, optional fields; strings and arrays bounded
/// so that every reply fits the token budget.
fn schemas() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            "person",
            "Give a made-up person as JSON.",
            json!({"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 16},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "email": {"type": "string", "maxLength": 24}
            }, "required": ["name", "age"], "additionalProperties": false}),
        ),
        (
            "weather",
            "What is the weather like? Answer in JSON.",
            json!({"type": "object", "properties": {
                "sky": {"enum": ["sunny", "cloudy", "rain", "snow"]},
                "celsius": {"type": "number", "minimum": -40, "maximum": 50},
                "windy": {"type": "boolean"}
            }, "required": ["sky", "celsius", "windy"], "additionalProperties": false}),
        ),
        (
            "city",
            "Describe a city as JSON.",
            json!({"type": "object", "properties": {
                "city": {"type": "object", "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "population": {"type": "integer", "minimum": 1, "maximum": 40000000}
                }, "required": ["name", "population"], "additionalProperties": false},
                "sights": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 3},
                "rating": {"type": "integer", "minimum": 1, "maximum": 5}
            }, "required": ["city", "sights"], "additionalProperties": false}),
        ),
        (
            "list",
            "List two fruits and their colours in JSON.",
            json!({"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object", "properties": {
                "fruit": {"type": "string", "maxLength": 10},
                "colour": {"enum": ["red", "yellow", "green", "orange"]}
            }, "required": ["fruit", "colour"], "additionalProperties": false}}),
        ),
    ]
}

#[test]
fn structured_output_through_the_server() {
    let all = Instant::now();
    let s = Server::start();
    let step = |what: &str, t: Instant| eprintln!("[structured] {what}: {:.1} s", t.elapsed().as_secs_f64());

    // ---- 4 schemas x 13 seeds at temperature 1.0, every reply validated by jsonschema
    let t = Instant::now();
    let mut replies = Vec::new();
    for (name, question, schema) in schemas() {
        for seed in 0..13 {
            let body = ask(question, schema_format(name, &schema), json!({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": seed, "max_tokens": 120}));
            let (content, finish) = s.chat(&body);
            assert_eq!(finish, "stop", "{name} seed {seed}: the reply ran out of tokens: {content:?}");
            replies.push(json!({"schema": schema, "content": content}));
        }
    }
    // and json_object: any JSON object
    for seed in 0..4 {
        let (content, finish) =
            s.chat(&ask("Reply with a JSON object about cats.", json!({"type": "json_object"}), json!({"temperature": 1.0, "seed": seed, "max_tokens": 60})));
        if finish == "stop" {
            replies.push(json!({"schema": {"type": "object"}, "content": content}));
        } else {
            // an open object may run past max_tokens; what came must still be a JSON object's start
            assert!(content.starts_with('{'), "{content:?}");
        }
    }
    let n = replies.len();
    assert!(n >= 52, "{n} replies");
    let dir = std::env::temp_dir().join(format!("nomoat-structured-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("replies.json");
    std::fs::write(&file, serde_json::to_string_pretty(&replies).unwrap()).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/server/structured_test.py");
    let out = Command::new("python3").arg(&script).arg("validate").arg(&file).output().expect("running python3");
    assert!(out.status.success(), "jsonschema validation failed:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprint!("[structured] {}", String::from_utf8_lossy(&out.stdout));
    step(&format!("{n} sampled replies"), t);

    // ---- the same seed, the same constrained reply; another seed, another reply
    let t = Instant::now();
    let (_, question, schema) = &schemas()[0];
    let body =
        |seed: u64| ask(question, schema_format("person", schema), json!({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": seed, "max_tokens": 120}));
    let a = s.chat(&body(77)).0;
    assert_eq!(s.chat(&body(77)).0, a, "seed 77 twice");
    let others: Vec<String> = (78..82).map(|seed| s.chat(&body(seed)).0).collect();
    assert!(others.iter().any(|o| *o != a), "five seeds, one reply: {a}");
    step("seed reproducible under a schema", t);

    // ---- logit_bias: +100 makes a token the reply, -100 bans the greedy one
    let t = Instant::now();
    let q = json!({"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}], "temperature": 0, "max_tokens": 1});
    let (greedy, _) = s.chat(&q);
    let mut banned = q.clone();
    let tok = {
        let path = common::smollm2();
        let len = std::fs::metadata(&path).unwrap().len();
        Tokenizer::from_gguf(&Gguf::read_from(std::fs::File::open(&path).unwrap(), len).unwrap()).unwrap()
    };
    let tokenize = |text: &str| tok.encode(text, false, false).unwrap();
    let greedy_id = tokenize(&greedy);
    assert_eq!(greedy_id.len(), 1, "{greedy:?}: {greedy_id:?}");
    banned["logit_bias"] = json!({greedy_id[0].to_string(): -100});
    let (other, _) = s.chat(&banned);
    assert_ne!(other, greedy, "a banned token was chosen");
    let forced_id = tokenize(" Zebra");
    let mut forced = q.clone();
    forced["logit_bias"] = json!({forced_id[0].to_string(): 100});
    let (reply, _) = s.chat(&forced);
    assert_eq!(tokenize(&reply), vec![forced_id[0]], "{reply:?}");
    step("logit_bias", t);

    // ---- 400s naming the problem, quickly, and the server still answers after them
    let t = Instant::now();
    let fmt = |schema: Value| schema_format("x", &schema);
    let q = "Hi";
    let none = json!({"max_tokens": 4});
    s.refused(&ask(q, fmt(json!({"type": "strin"})), none.clone()), "response_format.json_schema.schema", "strin");
    s.refused(&ask(q, fmt(json!({"type": "array", "uniqueItems": true})), none.clone()), "response_format.json_schema.schema", "uniqueItems");
    s.refused(&ask(q, fmt(json!({"type": "string", "format": "no-such-format"})), none.clone()), "response_format.json_schema.schema", "no-such-format");
    s.refused(&ask(q, fmt(json!({"$ref": "https://example.com/s.json"})), none.clone()), "response_format.json_schema.schema", "example.com");
    s.refused(&ask(q, fmt(json!({"type": "integer", "minimum": 5, "maximum": 1})), none.clone()), "response_format.json_schema.schema", "");
    let mut deep = json!({"type": "string"});
    for _ in 0..70 {
        deep = json!({"type": "object", "properties": {"a": deep}, "required": ["a"]});
    }
    // JSON itself nests at most 128 levels when parsed: a schema deeper than llguidance can
    // compile on a thread's stack never reaches it
    let (status, text) = s.post_raw(&ask(q, fmt(deep), none.clone()));
    assert!(status == 400 && text.contains("recursion limit") && text.contains("invalid_json"), "{status} {text}");
    s.refused(&ask(q, json!({"type": "json_schema", "json_schema": {"schema": {}}}), none.clone()), "response_format.json_schema.name", "name");
    s.refused(&ask(q, json!({"type": "yaml"}), none.clone()), "response_format", "yaml");
    s.refused(&ask(q, json!({"type": "text"}), json!({"logit_bias": {"49152": 5}})), "logit_bias", "outside the vocabulary");
    s.refused(&ask(q, json!({"type": "text"}), json!({"logit_bias": {"5": 500}})), "logit_bias", "-100 to 100");
    let (content, _) = s.chat(&ask("Say yes or no in JSON.", fmt(json!({"enum": ["yes", "no"]})), json!({"temperature": 0})));
    assert!(content == "\"yes\"" || content == "\"no\"", "{content:?}");
    step("10 refused requests, then a good one", t);

    // ---- logprobs / top_logprobs: one entry a generated token (forced ones under a schema
    // too), greedy picks its own top entry, the tokens spell the reply; streamed, the same
    let t = Instant::now();
    for (format, max) in [(json!({"type": "text"}), 6), (schema_format("person", &schemas()[0].2), 60)] {
        let body = ask("Give a made-up person as JSON.", format, json!({"temperature": 0, "max_tokens": max, "logprobs": true, "top_logprobs": 3}));
        let (status, text) = s.post_raw(&body);
        assert_eq!(status, 200, "{text}");
        let r: Value = serde_json::from_str(&text).unwrap();
        let content = r["choices"][0]["message"]["content"].as_str().unwrap();
        let entries = r["choices"][0]["logprobs"]["content"].as_array().unwrap_or_else(|| panic!("{r}"));
        assert_eq!(entries.len() as u64, r["usage"]["completion_tokens"].as_u64().unwrap(), "{r}");
        let mut bytes = Vec::new();
        for e in entries {
            let lp = e["logprob"].as_f64().unwrap();
            let top = e["top_logprobs"].as_array().unwrap();
            assert!(lp <= 0.0 && top.len() == 3, "{e}");
            assert!(top.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()), "{e}");
            assert!(lp <= top[0]["logprob"].as_f64().unwrap() + 1e-6, "{e}");
            bytes.extend(e["bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u8));
        }
        assert_eq!(String::from_utf8_lossy(&bytes), content, "{r}");
        if max == 6 {
            // greedy and unconstrained: each token is its step's most likely
            assert!(entries.iter().all(|e| e["token"] == e["top_logprobs"][0]["token"]), "{r}");
        } else {
            serde_json::from_str::<Value>(content).unwrap_or_else(|e| panic!("{e}: {content}"));
        }
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (status, sse) = s.post_raw(&streamed);
        assert_eq!(status, 200);
        let last = sse.lines().filter_map(|l| l.strip_prefix("data: ")).rfind(|d| *d != "[DONE]").unwrap();
        let last: Value = serde_json::from_str(last).unwrap();
        assert_eq!(&last["choices"][0]["logprobs"]["content"], &r["choices"][0]["logprobs"]["content"], "streamed logprobs differ");
    }
    s.refused(&ask("Hi", json!({"type": "text"}), json!({"top_logprobs": 2})), "top_logprobs", "logprobs");
    s.refused(&ask("Hi", json!({"type": "text"}), json!({"logprobs": 2})), "logprobs", "boolean");
    // /v1/completions' form: a count; parallel lists; greedy picks its own best; streamed, the same
    let body = json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 3});
    let (status, text) = s.post_to("/v1/completions", &body);
    assert_eq!(status, 200, "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    let lp = &r["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"].as_array().unwrap_or_else(|| panic!("{r}")).iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tokens.len() as u64, r["usage"]["completion_tokens"].as_u64().unwrap(), "{r}");
    assert_eq!(tokens.concat(), r["choices"][0]["text"].as_str().unwrap(), "{r}");
    let mut at = 0;
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(lp["text_offset"][i].as_u64(), Some(at), "{r}");
        at += token.len() as u64;
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        let top = lp["top_logprobs"][i].as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3 && chosen <= 0.0, "{r}");
        let best = top.values().map(|v| v.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!((best - chosen).abs() < 1e-5 && top.get(*token).is_some(), "greedy: the best of {top:?} is {token:?} at {chosen}");
    }
    let (status, sse) = s.post_to("/v1/completions", &json!({"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 3, "stream": true}));
    assert_eq!(status, 200);
    let last = sse.lines().filter_map(|l| l.strip_prefix("data: ")).rfind(|d| *d != "[DONE]").unwrap();
    assert_eq!(&serde_json::from_str::<Value>(last).unwrap()["choices"][0]["logprobs"], lp, "streamed logprobs differ");
    let (status, text) = s.post_to("/v1/completions", &json!({"prompt": "Hi", "logprobs": 21}));
    assert!(status == 400 && text.contains("0 to 20"), "{text}");
    step("logprobs", t);

    // ---- tools on a template without tool support (SmolLM2's): the generic tool prompt, calls
    // that fit the tool's parameters, a round trip with the result
    let t = Instant::now();
    let weather = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false});
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": weather}}]);
    let q = json!([{"role": "user", "content": "What is the weather in Paris?"}]);
    let body = json!({"model": "m", "messages": q, "tools": tools, "tool_choice": "required", "temperature": 1.0, "seed": 4, "max_tokens": 60});
    let (status, text) = s.post_raw(&body);
    assert_eq!(status, 200, "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    let choice = &r["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{r}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather", "{r}");
    let args: Value = serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string() && ["celsius", "fahrenheit"].contains(&args["unit"].as_str().unwrap()), "{args}");
    let mut convo = q.as_array().unwrap().clone();
    convo.push(choice["message"].clone());
    convo.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "{\"celsius\": 21}"}));
    let (status, text) = s.post_raw(&json!({"model": "m", "messages": convo, "tools": tools, "tool_choice": "none", "temperature": 0, "max_tokens": 8}));
    assert_eq!(status, 200, "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert!(r["choices"][0]["message"]["content"].is_string() && r["choices"][0]["message"].get("tool_calls").is_none(), "{r}");
    s.refused(&json!({"model": "m", "messages": q, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice", "nope");
    // auto with a response_format: calls, or JSON that fits the schema
    let answer = json!({"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30}}, "required": ["answer"], "additionalProperties": false});
    for seed in 0..3 {
        let body = json!({"model": "m", "messages": q, "tools": tools, "response_format": schema_format("answer", &answer), "temperature": 1.0, "seed": seed, "max_tokens": 60, "parallel_tool_calls": false});
        let (status, text) = s.post_raw(&body);
        assert_eq!(status, 200, "{text}");
        let r: Value = serde_json::from_str(&text).unwrap();
        let m = &r["choices"][0]["message"];
        // one call (SmolLM2 at temperature 1 repeats calls until max_tokens when it may make
        // several), or JSON that fits
        match (r["choices"][0]["finish_reason"].as_str().unwrap(), m.get("tool_calls"), m["content"].as_str()) {
            ("tool_calls", Some(calls), None) => assert_eq!(calls[0]["function"]["name"], "get_weather", "{r}"),
            (_, None, Some(content)) => {
                let v: Value = serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {r}"));
                assert!(v["answer"].is_string() && v.as_object().unwrap().len() == 1, "{r}");
            }
            _ => panic!("neither calls nor an answer: {r}"),
        }
        eprintln!("[structured] auto with a response_format, seed {seed}: {}", r["choices"][0]["finish_reason"]);
    }
    step("tools through the generic prompt", t);

    // ---- llama.cpp's `grammar` field (GBNF or Lark)
    let t = Instant::now();
    let gbnf = "root ::= (\"yes\" | \"no\") \", \" [0-9]{1,2}\n";
    let (content, finish) = s.chat(
        &json!({"model": "m", "messages": [{"role": "user", "content": "Yes or no, and a number?"}], "grammar": gbnf, "temperature": 1.0, "seed": 1, "max_tokens": 10}),
    );
    let (word, num) = content.split_once(", ").unwrap_or_else(|| panic!("{content:?}"));
    assert!(finish == "stop" && (word == "yes" || word == "no") && (1..=2).contains(&num.len()) && num.bytes().all(|b| b.is_ascii_digit()), "{content:?}");
    s.refused(&json!({"model": "m", "messages": q, "grammar": "root ::= \"x"}), "grammar", "not closed");
    s.refused(&json!({"model": "m", "messages": q, "grammar": "start: \"x\"", "response_format": {"type": "json_object"}}), "grammar", "alone");
    step("grammar field", t);

    // ---- the official openai client: chat.completions.parse with a pydantic model
    let t = Instant::now();
    let out = Command::new("python3").arg(&script).args(["parse", &s.url("/v1"), "none", "m"]).output().expect("running python3");
    assert!(
        out.status.success(),
        "openai client test failed\n{}{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        s.log.lock().unwrap()
    );
    eprint!("[structured] {}", String::from_utf8_lossy(&out.stdout));
    step("openai client", t);
    eprintln!("[structured] all: {:.1} s", all.elapsed().as_secs_f64());
}
