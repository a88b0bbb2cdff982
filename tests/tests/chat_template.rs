//! Chat templates rendered by nomoat (minijinja) against Jinja2 set up as Hugging Face
//! `transformers` does (`tests/reference/make_chat_refs.py` → `tests/data/chat_refs.json`),
//! plus the stop-string matcher.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use nomoat_runtime::chat::{strftime, ChatError, ChatTemplate, Message, StopMatcher};
use nomoat_runtime::gguf::Gguf;
use nomoat_tests::support::{model_path, GEMMA3, SMOLLM2};
use serde::Deserialize;

#[derive(Deserialize)]
struct Refs {
    fixed_time: i64,
    templates: BTreeMap<String, TemplateRef>,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct TemplateRef {
    source: String,
    bos_token: String,
    eos_token: String,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    template: String,
    messages: Vec<Message>,
    add_generation_prompt: bool,
    expected: Option<String>,
    error: Option<String>,
}

fn refs() -> Refs {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/chat_refs.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn read(path: &Path) -> Gguf {
    let len = std::fs::metadata(path).unwrap().len();
    Gguf::read_from(File::open(path).unwrap(), len).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check_case(t: &ChatTemplate, case: &Case) {
    let got = t.render(&case.messages, case.add_generation_prompt);
    match (&case.expected, &case.error, got) {
        (Some(want), _, Ok(got)) => assert_eq!(got, *want, "{}", case.name),
        (_, Some(want), Err(ChatError::Raised(msg))) => assert_eq!(msg, *want, "{}", case.name),
        (_, _, got) => panic!("{}: got {got:?}, want {:?} / error {:?}", case.name, case.expected, case.error),
    }
}

#[test]
fn reference_renderings_match_jinja2() {
    let refs = refs();
    let mut n = 0;
    for case in &refs.cases {
        let r = &refs.templates[&case.template];
        let t = ChatTemplate::new(&r.source, &r.bos_token, &r.eos_token).unwrap_or_else(|e| panic!("{}: {e}", case.template)).with_fixed_time(refs.fixed_time);
        check_case(&t, case);
        n += 1;
    }
    assert!(n >= 40, "only {n} cases");
}

#[test]
fn smollm2_template_from_gguf() {
    let refs = refs();
    let g = read(&model_path(SMOLLM2));
    let t = ChatTemplate::from_gguf(&g).unwrap().expect("SmolLM2-Instruct has a chat template");
    let r = &refs.templates["smollm2"];
    assert_eq!(t.source(), r.source);
    assert_eq!(t.bos_token(), "<|im_start|>");
    assert_eq!(t.eos_token(), "<|im_end|>");
    assert_eq!((t.bos_token(), t.eos_token()), (r.bos_token.as_str(), r.eos_token.as_str()));
    let cases: Vec<&Case> = refs.cases.iter().filter(|c| c.template == "smollm2").collect();
    assert!(cases.len() >= 8);
    for case in cases {
        check_case(&t, case);
    }

    // system + user + assistant + user, spelled out.
    let msgs =
        [Message::system("You are a helpful assistant."), Message::user("Hi, who are you?"), Message::assistant("I am an assistant."), Message::user("Tell me a joke.")];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\nHi, who are you?<|im_end|>\n\
         <|im_start|>assistant\nI am an assistant.<|im_end|>\n\
         <|im_start|>user\nTell me a joke.<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    // Without a system prompt the template inserts its own.
    assert!(t
        .render(&[Message::user("Hi")], false)
        .unwrap()
        .starts_with("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"));
}

#[test]
fn gemma3_base_model_has_no_template() {
    let g = read(&model_path(GEMMA3));
    assert!(ChatTemplate::from_gguf(&g).unwrap().is_none());
}

#[test]
fn broken_templates_are_typed_errors() {
    for src in ["{% for m in messages %}{{ m.content }}", "{{ 1 + }}", "{% if x %}{% endfor %}", "{{ a | }}"] {
        match ChatTemplate::new(src, "", "") {
            Err(ChatError::Syntax(msg)) => assert!(!msg.is_empty()),
            other => panic!("{src:?}: {other:?}"),
        }
    }
    let err = ChatTemplate::new("{% if x %}", "", "").unwrap_err();
    assert!(err.to_string().starts_with("chat template syntax error"), "{err}");

    // raise_exception is its own variant, with the template's message.
    let t = ChatTemplate::new("{% if messages|length == 0 %}{{ raise_exception('No messages: ' ~ 'need one') }}{% endif %}ok", "", "").unwrap();
    match t.render(&[], true) {
        Err(ChatError::Raised(m)) => assert_eq!(m, "No messages: need one"),
        other => panic!("{other:?}"),
    }
    assert_eq!(t.render(&[Message::user("x")], true).unwrap(), "ok");

    // Other runtime failures are Render errors.
    let t = ChatTemplate::new("{{ messages[0].content | no_such_filter }}", "", "");
    match t.map(|t| t.render(&[Message::user("x")], false)) {
        Err(ChatError::Syntax(_)) | Ok(Err(ChatError::Render(_))) => {}
        other => panic!("{other:?}"),
    }
    let t = ChatTemplate::new("{{ messages[0].content.no_such_method() }}", "", "").unwrap();
    assert!(matches!(t.render(&[Message::user("x")], false), Err(ChatError::Render(_))));
}

#[test]
fn hand_written_gemma_style() {
    let src = "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n\
               {{ m.content | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";
    let t = ChatTemplate::new(src, "<bos>", "<eos>").unwrap();
    let msgs = [Message::user(" Hi "), Message::assistant("Hello."), Message::user("Bye")];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
         <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    );
    assert_eq!(t.render(&msgs[..1], false).unwrap(), "<bos><start_of_turn>user\nHi<end_of_turn>\n");
}

#[test]
fn hand_written_llama3_style() {
    // trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before it.
    let src = "{{ bos_token }}\n{% for m in messages %}\n    {% if m.role == 'system' %}\n\
               <|start_header_id|>system<|end_header_id|>\n\n{{ m.content }}<|eot_id|>\n    {% else %}\n\
               <|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>\n    {% endif %}\n\
               {% endfor %}\n{% if add_generation_prompt %}\n<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}\n";
    let t = ChatTemplate::new(src, "<|begin_of_text|>", "<|eot_id|>").unwrap();
    let msgs = [Message::system("Be brief."), Message::user("Hi")];
    assert_eq!(
        t.render(&msgs, true).unwrap(),
        "<|begin_of_text|>\n<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\n\
         <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\n\
         <|start_header_id|>assistant<|end_header_id|>\n\n"
    );
}

#[test]
fn strftime_now_and_fixed_time() {
    // 2025-03-08 12:00:00 UTC, a Saturday, day 67.
    let t0 = 1_741_435_200;
    assert_eq!(strftime("%d %b %Y", t0), "08 Mar 2025");
    assert_eq!(strftime("%A %B %-d, %Y %H:%M:%S %j %p %I %y %F %T %%", t0), "Saturday March 8, 2025 12:00:00 067 PM 12 25 2025-03-08 12:00:00 %");
    assert_eq!(strftime("%Y-%m-%d %a", 0), "1970-01-01 Thu");
    assert_eq!(strftime("%Y-%m-%d %j", 951_782_400), "2000-02-29 060"); // leap day
    assert_eq!(strftime("%Y-%m-%d %H:%M", -1), "1969-12-31 23:59");
    let t = ChatTemplate::new("{{ strftime_now('%Y-%m-%d') }}", "", "").unwrap();
    let today = t.render(&[], false).unwrap();
    assert_eq!(today.len(), 10);
    assert!(today.as_str() >= "2025-01-01", "{today}");
    assert_eq!(t.with_fixed_time(t0).render(&[], false).unwrap(), "2025-03-08");
}

#[test]
fn message_serde_round_trip() {
    let m = Message::user("héllo");
    let j = serde_json::to_string(&m).unwrap();
    assert_eq!(j, r#"{"role":"user","content":"héllo"}"#);
    assert_eq!(serde_json::from_str::<Message>(&j).unwrap(), m);
}

// ----------------------------------------------------------------------------------------------
// StopMatcher

fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
    let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
    let mut emitted = Vec::new();
    let mut stopped = false;
    for p in pieces {
        let (e, s) = m.push(p);
        emitted.push(e);
        if s {
            stopped = true;
            break;
        }
    }
    let rest = m.finish();
    (emitted, stopped, rest)
}

#[test]
fn stop_split_across_pieces() {
    let (e, stopped, rest) = run(&["<|im_end|>"], &["Hello", " world<|im", "_e", "nd|>more"]);
    assert_eq!(e, ["Hello", " world", "", ""]);
    assert!(stopped);
    assert_eq!(rest, "");
}

#[test]
fn stop_inside_one_piece_cuts_the_rest() {
    let (e, stopped, _) = run(&["STOP"], &["abc", "deSTOPfg"]);
    assert_eq!(e, ["abc", "de"]);
    assert!(stopped);
}

#[test]
fn partial_match_then_mismatch_releases_text() {
    let (e, stopped, rest) = run(&["<|im_end|>"], &["a<|im", "_x", "yz"]);
    assert_eq!(e, ["a", "<|im_x", "yz"]);
    assert!(!stopped);
    assert_eq!(rest, "");
    // Held text comes out of finish() when generation ends mid-prefix.
    let (e, stopped, rest) = run(&["</s>"], &["text</"]);
    assert_eq!(e, ["text"]);
    assert!(!stopped);
    assert_eq!(rest, "</");
    // A new prefix can start inside a failed one: "<<|" after "<".
    let (e, stopped, _) = run(&["<|end|>"], &["x<", "<|en", "d|>"]);
    assert_eq!(e, ["x", "<", ""]);
    assert!(stopped);
}

#[test]
fn multiple_stop_strings() {
    // The earliest match wins, whichever stop string it is.
    let (e, stopped, _) = run(&["\nUser:", "###"], &["answer ##", "# \nUser:"]);
    assert_eq!(e, ["answer ", ""]);
    assert!(stopped);
    let (e, stopped, _) = run(&["\nUser:", "###"], &["one\nUs", "er: two ###"]);
    assert_eq!(e, ["one", ""]);
    assert!(stopped);
    // A prefix of one stop string held while another is being checked.
    let (e, stopped, rest) = run(&["ab", "abc", "xyz"], &["1a", "x", "y", "2"]);
    assert_eq!(e, ["1", "a", "", "xy2"]);
    assert_eq!(rest, "");
    assert!(!stopped);
    // After a stop, nothing more is emitted.
    let mut m = StopMatcher::new(vec!["!".into()]);
    assert_eq!(m.push("hi!"), ("hi".into(), true));
    assert_eq!(m.push("more"), (String::new(), true));
    assert!(m.is_stopped());
    assert_eq!(m.finish(), "");
}

#[test]
fn stop_strings_with_unicode() {
    let (e, stopped, _) = run(&["。終"], &["こんにちは", "。", "終わり"]);
    assert_eq!(e, ["こんにちは", "", ""]);
    assert!(stopped);
    let (e, stopped, rest) = run(&["é!"], &["caf", "é", "s"]);
    assert_eq!(e, ["caf", "", "és"]);
    assert!(!stopped);
    assert_eq!(rest, "");
    let (e, stopped, _) = run(&["🛑"], &["go 😀", "🛑 no"]);
    assert_eq!(e, ["go 😀", ""]);
    assert!(stopped);
    // No stop strings (or only empty ones): everything passes straight through.
    let (e, stopped, rest) = run(&[""], &["a", "b"]);
    assert_eq!((e, stopped, rest), (vec!["a".to_string(), "b".to_string()], false, String::new()));
}

// ---------------------------------------------------------------------------------------------
// Templates from model files are untrusted: each rendering is bounded
// ---------------------------------------------------------------------------------------------

/// Renders `src` on another thread with a 2 MiB stack (a server worker's), giving the outcome
/// and how long it took.
fn render_hostile(src: &str) -> (Result<String, ChatError>, std::time::Duration) {
    let src = src.to_owned();
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || {
            let t = ChatTemplate::new(&src, "<s>", "</s>").unwrap_or_else(|e| panic!("{src}: {e}"));
            let start = std::time::Instant::now();
            let r = t.render(&[Message::user("hi"), Message::assistant("hello")], true);
            (r, start.elapsed())
        })
        .unwrap()
        .join()
        .unwrap()
}

/// Loops nested to 10^10 steps, a string doubled 64 times, a list doubled 40 times, a 100 MB string, 100 MB of output,
/// `tojson` indented by 10^12 spaces (which aborted the process: the allocation failed), a huge
/// `strftime_now` format: each is a `ChatError::Limit` within seconds, and a macro calling itself
/// endlessly is an error, not a stack overflow.
#[test]
fn hostile_templates_stop_at_their_limits() {
    let limited = [
        "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
        "{% set ns = namespace(s=['ab']) %}{% for i in range(30) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | tojson }}",
        "{% set ns = namespace(s=['ab']) %}{% for i in range(30) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ''.join(ns.s) | length }}",
        // minijinja materializes a concatenation of lists nested over 32 deep at once: 2^33
        // items and more, priced in fuel by vendor/minijinja's patch before it allocates (the
        // second, an iterable of no length, is flattened lazily and charged as it goes)
        "{% set ns = namespace(s=['ab']) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
        "{% set ns = namespace(s=range(99999) | list) %}{% for i in range(1000) %}{% for j in range(1000) %}{% set ns.s = ns.s + [j] %}{% endfor %}{% endfor %}{{ ns.s | length }}",
        "{% set ns = namespace(s={'a': 1} | items) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
        "{% for i in range(10) %}{{ ('x' * 90000000) | length }}{% endfor %}",
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
        "{{ messages | tojson(indent=1000000000000) }}",
        "{{ messages | tojson(indent=' ' * 1000) }}",
        "{{ strftime_now('%c' * 100000) }}",
        "{% set ns = namespace(s='%c') %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ strftime_now(ns.s) }}",
        "{% set big = 'y' * 1000000 %}{% for i in range(1000) %}{{ [big] | tojson(indent=16) }}{% endfor %}",
    ];
    for src in limited {
        eprintln!("{src}");
        let (r, took) = render_hostile(src);
        eprintln!("  {:?} {took:?}", r.as_ref().map(|s| s.len()));
        match r {
            Err(ChatError::Limit(msg)) => assert!(!msg.is_empty()),
            other => panic!("{src}: {:?}", other.map(|s| s.len())),
        }
        assert!(took.as_secs() < 20, "{src}: {took:?}");
    }
    let (r, took) = render_hostile("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
    assert!(matches!(r, Err(ChatError::Render(_)) | Err(ChatError::Limit(_))), "{r:?}");
    assert!(took.as_secs() < 20, "{took:?}");
    // within the limits, what Python's json.dumps gives
    let (r, _) = render_hostile("{{ {'a': [1]} | tojson(indent=16) }}|{{ {'a': 1} | tojson(indent=-3) }}");
    assert_eq!(r.unwrap(), format!("{{\n{0}\"a\": [\n{0}{0}1\n{0}]\n}}|{{\n\"a\": 1\n}}", " ".repeat(16)));
}

/// The limits leave room for real use: SmolLM2's template (ChatML) and Qwen2.5's (with tools)
/// render a conversation of 1 MiB, the server's largest request.
#[test]
fn real_templates_render_a_large_conversation_within_the_limits() {
    let refs = refs();
    let chunk = "All work and no play makes Jack a dull boy. ".repeat(1000);
    let messages: Vec<Message> = (0..24).map(|i| if i % 2 == 0 { Message::user(chunk.clone()) } else { Message::assistant(chunk.clone()) }).collect();
    let total: usize = messages.iter().map(|m| m.content.len()).sum();
    assert!(total > 1 << 20);
    let mut rendered = 0;
    for (name, r) in &refs.templates {
        let t = ChatTemplate::new(&r.source, &r.bos_token, &r.eos_token).unwrap().with_fixed_time(refs.fixed_time);
        match t.render(&messages, true) {
            Ok(out) => {
                assert!(out.len() > total, "{name}");
                rendered += 1;
            }
            // some templates refuse conversations of this shape (a system turn first, ...)
            Err(ChatError::Raised(_)) => {}
            Err(e) => panic!("{name}: {e}"),
        }
    }
    assert!(rendered >= 3, "only {rendered} templates rendered");
}

#[path = "../../fuzz/src/chat_template.rs"]
mod chat_template_fuzz;

/// The committed corpus of the `chat_template` fuzz target (real templates and hostile ones)
/// through the target's own checks: no panic, each within seconds.
#[test]
fn chat_template_fuzz_corpus_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/chat_template");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let start = std::time::Instant::now();
        chat_template_fuzz::run(&std::fs::read(&path).unwrap());
        assert!(start.elapsed().as_secs() < 30, "{}: {:?}", path.display(), start.elapsed());
        n += 1;
    }
    assert!(n >= 10, "only {n} inputs");
}
