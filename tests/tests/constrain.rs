//! The constraint engine (runtime/src/constrain.rs) on real tokenizers, without a model: random
//! walks through the allowed tokens always spell text the grammar accepts, compile times stay
//! small, and bad or pathological grammars are refused with a message, quickly.

use nomoat_tests::support;

/// xorshift64*: the walks' choices, seeded.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) % n as u64) as u32
    }
}

use nomoat_runtime::constrain::{Constrainer, Grammar, Guide};
use nomoat_runtime::generate::GenerateOptions;
use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::model::Model;
use nomoat_runtime::ops::KvType;
use nomoat_runtime::sampler::SamplerConfig;
use nomoat_runtime::session::Session;
use nomoat_runtime::tokenizer::Tokenizer;
use nomoat_tests::gpu::variants;
use serde_json::{json, Value};
use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

fn tokenizer(file: &str) -> Arc<Tokenizer> {
    let path = support::model_path(file);
    let len = std::fs::metadata(&path).unwrap().len();
    let g = Gguf::read_from(File::open(&path).unwrap(), len).unwrap();
    Arc::new(Tokenizer::from_gguf(&g).unwrap())
}

/// The schemas the server test samples from too: nested objects, arrays, enums, bounded
/// numbers, optional fields.
fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "person",
            json!({"type": "object", "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["name", "age"], "additionalProperties": false}),
        ),
        (
            "enum",
            json!({"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}}, "required": ["color", "ok"], "additionalProperties": false}),
        ),
        (
            "nested",
            json!({"type": "object", "properties": {
            "city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "population": {"type": "integer", "minimum": 1}}, "required": ["name", "population"], "additionalProperties": false},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
            "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
            "note": {"type": "string", "maxLength": 10}
        }, "required": ["city", "tags", "score"], "additionalProperties": false}),
        ),
    ]
}

/// A hand-written check of what each schema requires, independent of llguidance.
fn check(name: &str, v: &Value) -> Result<(), String> {
    let obj = v.as_object().ok_or("not an object")?;
    let keys = |allowed: &[&str]| obj.keys().all(|k| allowed.contains(&k.as_str()));
    let ok = match name {
        "person" => {
            keys(&["name", "age"]) && obj["name"].as_str().is_some_and(|s| s.chars().count() <= 20) && obj["age"].as_i64().is_some_and(|a| (0..=120).contains(&a))
        }
        "enum" => keys(&["color", "ok"]) && ["red", "green", "blue"].contains(&obj["color"].as_str().unwrap_or("")) && obj["ok"].is_boolean(),
        "nested" => {
            let city = obj.get("city").and_then(Value::as_object);
            let tags = obj.get("tags").and_then(Value::as_array);
            keys(&["city", "tags", "score", "note"])
                && city.is_some_and(|c| {
                    c.len() == 2 && c["name"].as_str().is_some_and(|s| s.chars().count() <= 12) && c["population"].as_f64().is_some_and(|p| p >= 1.0 && p.fract() == 0.0)
                })
                && tags.is_some_and(|t| (1..=3).contains(&t.len()) && t.iter().all(|s| s.as_str().is_some_and(|s| s.chars().count() <= 8)))
                && obj["score"].as_f64().is_some_and(|s| (-1.5..=2.5).contains(&s))
                && obj.get("note").is_none_or(|n| n.as_str().is_some_and(|s| s.chars().count() <= 10))
        }
        _ => unreachable!(),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{name}: {v} does not fit"))
    }
}

/// Walks the grammar choosing allowed tokens at random (the lowest allowed id, often the
/// closing punctuation, a third of the time, so that walks end), as a sampler may; returns the
/// text and whether it ended with the end token or a complete grammar.
fn walk(c: &Constrainer, tok: &Tokenizer, g: &Grammar, rng: &mut Rng, max: usize) -> (String, bool) {
    let mut con = c.compile(g).unwrap();
    let mut ids = Vec::new();
    for _ in 0..max {
        if con.is_done() {
            return (tok.decode(&ids, true), true);
        }
        let mask = con.mask().unwrap();
        let allowed: Vec<u32> = mask.ids().collect();
        assert!(!allowed.is_empty());
        let id = if rng.below(3) == 0 { allowed[0] } else { allowed[rng.below(allowed.len() as u32) as usize] };
        assert!(mask.allows(id));
        if con.is_end(id) {
            return (tok.decode(&ids, true), true);
        }
        con.accept(id).unwrap();
        ids.push(id);
        ids.extend(con.forced());
    }
    (tok.decode(&ids, true), false)
}

#[test]
fn random_walks_spell_valid_json() {
    for file in [support::SMOLLM2, support::QWEN2] {
        let tok = tokenizer(file);
        let c = Constrainer::new(tok.clone()).unwrap();
        let mut rng = Rng::new(7);
        for (name, schema) in schemas() {
            let g = Grammar::JsonSchema(schema);
            let mut finished = 0;
            for _ in 0..20 {
                let (text, done) = walk(&c, &tok, &g, &mut rng, 400);
                if done {
                    finished += 1;
                    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file} {name}: {text:?} is not JSON: {e}"));
                    check(name, &v).unwrap();
                }
            }
            assert!(finished >= 15, "{file} {name}: only {finished} of 20 walks ended");
        }
    }
}

#[test]
fn regex_and_lark_walks_match() {
    let tok = tokenizer(support::SMOLLM2);
    let c = Constrainer::new(tok.clone()).unwrap();
    let mut rng = Rng::new(3);
    let date = Grammar::Regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}".into());
    let lark = Grammar::Lark("start: \"yes\" | \"no\" | \"maybe \" NUMBER\nNUMBER: /[0-9]{1,3}/\n".into());
    for _ in 0..20 {
        let (text, done) = walk(&c, &tok, &date, &mut rng, 50);
        assert!(done, "{text:?}");
        let b = text.as_bytes();
        assert!(b.len() == 10 && b[4] == b'-' && b[7] == b'-' && text.chars().filter(|c| c.is_ascii_digit()).count() == 8, "{text:?}");
        let (text, done) = walk(&c, &tok, &lark, &mut rng, 50);
        assert!(done, "{text:?}");
        let ok = text == "yes" || text == "no" || text.strip_prefix("maybe ").is_some_and(|n| (1..=3).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_digit()));
        assert!(ok, "{text:?}");
    }
}

#[test]
fn gbnf_walks_match() {
    // llama.cpp's GBNF, converted to Lark: a list of one to three yes/no answers or a number
    let tok = tokenizer(support::SMOLLM2);
    let c = Constrainer::new(tok.clone()).unwrap();
    let g = Grammar::Gbnf("# answers\nroot ::= item (\", \" item){0,2}\nitem ::= (\"yes\" | \"no\") | num\nnum ::= [1-9] [0-9]?\n".into());
    let mut rng = Rng::new(5);
    for _ in 0..20 {
        let (text, done) = walk(&c, &tok, &g, &mut rng, 40);
        assert!(done, "{text:?}");
        let items: Vec<&str> = text.split(", ").collect();
        let ok = (1..=3).contains(&items.len())
            && items.iter().all(|i| *i == "yes" || *i == "no" || (1..=2).contains(&i.len()) && i.bytes().all(|b| b.is_ascii_digit()) && !i.starts_with('0'));
        assert!(ok, "{text:?}");
    }
    let e = c.compile(&Grammar::Gbnf("item ::= \"x\"".into())).unwrap_err();
    assert!(e.0.contains("GBNF") && e.0.contains("root"), "{e}");
}

#[test]
fn forced_tokens_are_fed_without_a_choice() {
    // an enum of one long value leaves nothing to choose after its first token
    let tok = tokenizer(support::SMOLLM2);
    let c = Constrainer::new(tok.clone()).unwrap();
    let mut con = c.compile(&Grammar::JsonSchema(json!({"const": "the quick brown fox jumps over the lazy dog"}))).unwrap();
    let forced = con.forced();
    assert!(forced.len() > 5, "{forced:?}");
    assert!(tok.decode(&forced, true).starts_with("\"the quick"), "{:?}", tok.decode(&forced, true));
}

#[test]
fn test_schemas_compile_quickly() {
    for file in [support::SMOLLM2, support::QWEN2] {
        let tok = tokenizer(file);
        let t = Instant::now();
        let c = Constrainer::new(tok).unwrap();
        let setup = t.elapsed().as_secs_f64() * 1e3;
        let mut times = Vec::new();
        for (name, schema) in schemas() {
            // the best of three: the first compile of a process also warms allocator and caches
            let ms = (0..3).map(|_| c.compile(&Grammar::JsonSchema(schema.clone())).unwrap().compile_seconds * 1e3).fold(f64::INFINITY, f64::min);
            times.push(format!("{name} {ms:.1} ms"));
            assert!(ms < 250.0, "{file}: {name} took {ms:.1} ms to compile");
        }
        eprintln!("{file}: tokenizer set-up {setup:.0} ms; compile (parser and first mask): {}", times.join(", "));
    }
}

#[test]
fn bad_grammars_are_refused_with_a_reason() {
    let tok = tokenizer(support::SMOLLM2);
    let c = Constrainer::new(tok).unwrap();
    let refused = |g: Grammar, needle: &str| {
        let t = Instant::now();
        let e = c.compile(&g).expect_err(&format!("{g:?} compiled"));
        assert!(e.0.to_lowercase().contains(needle), "{g:?}: {e}");
        assert!(t.elapsed().as_secs() < 5, "{g:?} took {:?} to refuse", t.elapsed());
    };
    refused(Grammar::JsonSchema(json!({"type": "object", "properties": {"a": {"type": "strin"}}})), "strin");
    refused(Grammar::JsonSchema(json!({"type": "string", "format": "no-such-format"})), "no-such-format");
    refused(Grammar::JsonSchema(json!({"type": "array", "uniqueItems": true})), "uniqueitems");
    refused(Grammar::JsonSchema(json!({"$ref": "https://example.com/remote.json"})), "example.com");
    refused(Grammar::Regex("(unclosed".into()), "");
    refused(Grammar::Lark("start: missing_rule\n".into()), "missing_rule");
    refused(Grammar::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1})), "");
}

#[test]
fn pathological_schemas_are_bounded() {
    let tok = tokenizer(support::SMOLLM2);
    let c = Constrainer::new(tok).unwrap();
    // deep nesting, a huge enum, an ambiguous grammar, a regex whose lexer explodes: each is
    // refused or compiles, within seconds either way
    let mut deep = json!({"type": "string"});
    for _ in 0..400 {
        deep = json!({"type": "object", "properties": {"a": deep}, "required": ["a"]});
    }
    // 70,000 values (770 kB, under the server's body limit) compile; 100,000 longer ones are
    // over the lexer's fuel and refused
    let big_enum = json!({"enum": (0..70_000).map(|i| format!("v{i:06}")).collect::<Vec<_>>()});
    let huge_enum = json!({"enum": (0..100_000).map(|i| format!("value number {i}")).collect::<Vec<_>>()});
    let e = c.compile(&Grammar::JsonSchema(huge_enum.clone())).expect_err("a 100,000-value enum compiled");
    assert!(e.0.contains("too big"), "{e}");
    let ambiguous = Grammar::Lark("start: x\nx: x x | x x x | \"a\" | \"\"\n".into());
    let exploding = Grammar::Regex("(a|b)*a(a|b){40}".into());
    let deep_regex = Grammar::Regex(format!("{}a{}", "(".repeat(400), ")".repeat(400)));
    let deep_lark = Grammar::Lark(format!("start: {}\"a\"{}\n", "(".repeat(400), ")".repeat(400)));
    // groups nested in a schema's pattern or a Lark regex: regex-syntax's own limit (250) refuses
    // the deep ones before anything recursive runs
    let nested = |d: usize| format!("{}a{}", "(".repeat(d), ")".repeat(d));
    let deep_pattern = Grammar::JsonSchema(json!({"type": "string", "pattern": nested(240)}));
    let deeper_pattern = Grammar::JsonSchema(json!({"type": "string", "pattern": nested(3000)}));
    let lark_regex = Grammar::Lark(format!("start: /{}/\n", nested(3000)));
    for g in [deep_pattern, deeper_pattern, lark_regex] {
        let _ = c.compile(&g);
    }
    for g in [Grammar::JsonSchema(deep), Grammar::JsonSchema(big_enum), Grammar::JsonSchema(huge_enum), ambiguous, exploding, deep_regex, deep_lark] {
        let label = format!("{:.60}", format!("{g:?}"));
        let t = Instant::now();
        let r = c.compile(&g);
        let secs = t.elapsed().as_secs_f64();
        eprintln!("{label}: {} in {secs:.2} s", r.as_ref().map_or_else(|e| format!("refused ({:.80})", e.0), |_| "compiled".into()));
        assert!(secs < 10.0, "{label} took {secs:.1} s");
        if let Ok(mut con) = r {
            // and each step is bounded too
            let t = Instant::now();
            for _ in 0..5 {
                let Ok(m) = con.mask() else { break };
                let id = m.ids().next().unwrap();
                if con.is_end(id) || con.accept(id).is_err() {
                    break;
                }
            }
            assert!(t.elapsed().as_secs() < 10, "{label}: steps took {:?}", t.elapsed());
        }
    }
}

#[test]
fn tool_call_walks_name_a_tool_with_fitting_arguments() {
    use nomoat_runtime::tools::{grammar, parse_reply, Tool, ToolChoice};
    let tok = tokenizer(support::QWEN2);
    let c = Constrainer::new(tok.clone()).unwrap();
    let tools = vec![
        Tool { name: "get_weather".into(), description: Some("Weather in a city".into()), parameters: schemas()[1].1.clone() },
        Tool { name: "add_person".into(), description: None, parameters: schemas()[0].1.clone() },
    ];
    let mut rng = Rng::new(11);
    for (choice, parallel) in [(ToolChoice::Required, true), (ToolChoice::Named("add_person".into()), true), (ToolChoice::Required, false)] {
        let g = grammar(&tools, &choice, parallel).unwrap();
        let t = Instant::now();
        c.compile(&g).unwrap_or_else(|e| panic!("{g:?}: {e}"));
        eprintln!("tools grammar {choice:?}: compiled in {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        let mut ended = 0;
        for _ in 0..10 {
            let (text, done) = walk(&c, &tok, &g, &mut rng, 300);
            if !done {
                continue;
            }
            ended += 1;
            let reply = parse_reply(&text);
            let calls = reply.calls;
            assert!(reply.content.is_none() && !reply.cut_short && !calls.is_empty(), "{text:?}");
            assert!(parallel || calls.len() == 1, "{text:?}");
            for call in calls {
                let which = if call.name == "get_weather" { "enum" } else { "person" };
                if let ToolChoice::Named(n) = &choice {
                    assert_eq!(&call.name, n);
                }
                check(which, &serde_json::from_str(&call.arguments).unwrap()).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            }
        }
        assert!(ended >= 7, "{choice:?}: {ended} of 10 walks ended");
    }
    // auto: text that does not start with '<', or calls
    let g = grammar(&tools, &ToolChoice::Auto, true).unwrap();
    let mut con = c.compile(&g).unwrap();
    let mask = con.mask().unwrap();
    let one = |text: &str| {
        let ids = tok.encode(text, false, false).unwrap();
        assert_eq!(ids.len(), 1, "{text:?} is one token: {ids:?}");
        ids[0]
    };
    // "<" may still spell "<tool_call>" byte by byte; "<div" and "</" start neither a call nor text
    assert!(mask.allows(one("<tool_call>")) && mask.allows(one("Hello")) && mask.allows(one("<")));
    assert!(!mask.allows(one("</")) && !mask.allows(one("<div")), "text may not start with '<'");
}

/// Constrained decoding through the GPU's masked top-k (k values read back) picks, draw for
/// draw, what the CPU sampler picks from the whole logits with the disallowed ones at -inf (a
/// logit_bias of 0 sends a generation down that path), on every kernel variant, for the tiny
/// llama under a JSON schema; and the replies parse.
#[test]
fn gpu_masked_sampling_picks_what_the_masked_logits_give() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/tiny/llama-tiny.gguf");
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999}, "b": {"enum": ["x", "yy"]}, "c": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}, "required": ["a", "b", "c"], "additionalProperties": false});
    let configs = [SamplerConfig::default(), SamplerConfig { temperature: 1.5, top_k: 5, ..SamplerConfig::default() }, SamplerConfig::greedy()];
    for gpu in variants() {
        let mut f = std::fs::File::open(&path).unwrap();
        let len = f.metadata().unwrap().len();
        let gguf = Gguf::read_from(&mut f, len).unwrap();
        let tok = Arc::new(Tokenizer::from_gguf(&gguf).unwrap());
        let c = Constrainer::new(tok.clone()).unwrap();
        let model = pollster::block_on(Model::load(&gguf, gpu, &mut f, &mut |_, _| {})).unwrap();
        let prompt = tok.encode("hello world", false, false).unwrap();
        for (i, cfg) in configs.iter().enumerate() {
            let opts = GenerateOptions { max_tokens: 60, sampler: SamplerConfig { seed: 40 + i as u64, ..cfg.clone() }, ..GenerateOptions::default() };
            let run = |bias: Vec<(u32, f32)>| {
                let mut s = pollster::block_on(Session::new(&model, gpu, 256, KvType::F32, false)).unwrap();
                let mut guide = Guide { logit_bias: bias, ..Guide::with_constraint(c.compile(&Grammar::JsonSchema(schema.clone())).unwrap()) };
                pollster::block_on(s.generate_guided(&tok, &prompt, &opts, &mut guide, &mut |_| true, &|| false, &mut |_| {})).unwrap()
            };
            let (gpu_path, cpu_path) = (run(Vec::new()), run(vec![(0, 0.0)]));
            assert_eq!(gpu_path.tokens, cpu_path.tokens, "[{:?}] {cfg:?}", gpu.variant);
            if gpu_path.finish == nomoat_runtime::generate::FinishReason::Stop {
                let v: Value = serde_json::from_str(&gpu_path.text).unwrap_or_else(|e| panic!("{e}: {:?}", gpu_path.text));
                assert!(v["a"].as_u64().is_some_and(|a| a <= 999) && ["x", "yy"].contains(&v["b"].as_str().unwrap()), "{v}");
            }
            eprintln!("[{:?}] temp {} top_k {}: {:?} ({:?})", gpu.variant, cfg.temperature, cfg.top_k, gpu_path.text, gpu_path.finish);
        }
    }
}
