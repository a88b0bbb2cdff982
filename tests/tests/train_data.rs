//! Fine-tuning data (`nomoat_runtime::train::data`): the three JSONL formats on SmolLM2's
//! tokenizer and chat template, their loss masks, and every malformed input refused with its
//! line number.

use nomoat_runtime::chat::ChatTemplate;
use nomoat_runtime::gguf::Gguf;
use nomoat_runtime::tokenizer::Tokenizer;
use nomoat_runtime::train::data::{read_jsonl, DataOptions, DataSet, Format};
use std::path::PathBuf;

fn smollm2() -> (Tokenizer, ChatTemplate) {
    let cache = std::env::var_os("NOMOAT_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/nomoat"));
    let path = cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let len = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-models.sh)", path.display())).len();
    let g = Gguf::read_from(std::fs::File::open(&path).unwrap(), len).unwrap();
    (Tokenizer::from_gguf(&g).unwrap(), ChatTemplate::from_gguf(&g).unwrap().expect("SmolLM2 has a chat template"))
}

const OPTS: DataOptions = DataOptions { ctx: 512, strict: false };

fn read(text: &str, with_template: bool, opts: DataOptions) -> Result<DataSet, String> {
    let (tok, t) = smollm2();
    read_jsonl(text, &tok, with_template.then_some(&t), opts).map_err(|e| e.to_string())
}

/// The text of the trained tokens of each example, joined.
fn trained_text(set: &DataSet, tok: &Tokenizer) -> Vec<String> {
    set.examples.iter().map(|e| tok.decode(&e.ids.iter().zip(&e.trained).filter(|(_, t)| **t).map(|(i, _)| *i).collect::<Vec<_>>(), false)).collect()
}

#[test]
fn messages_train_on_assistant_turns_only() {
    let (tok, t) = smollm2();
    let line = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Zorbia?"}, {"role": "assistant", "content": "Quxville."}, {"role": "user", "content": "And its river?"}, {"role": "assistant", "content": "The Blorp."}]}"#;
    let set = read_jsonl(line, &tok, Some(&t), OPTS).unwrap();
    assert_eq!(set.format, Format::Messages);
    let e = &set.examples[0];
    assert_eq!(e.ids.len(), e.trained.len());
    assert_eq!(
        tok.decode(&e.ids, false),
        t.render(&serde_json::from_str::<Vec<_>>(&serde_json::from_str::<serde_json::Value>(line).unwrap()["messages"].to_string()).unwrap(), false).unwrap()
    );
    // both replies with their end-of-turn markers, nothing of the user's or system's turns
    assert_eq!(trained_text(&set, &tok), vec!["Quxville.<|im_end|>\nThe Blorp.<|im_end|>\n".to_string()]);
}

#[test]
fn prompt_completion_with_and_without_a_template() {
    let (tok, _) = smollm2();
    let line = r#"{"prompt": "Capital of Zorbia?", "completion": "Quxville."}"#;
    let chat = read(line, true, OPTS).unwrap();
    assert_eq!(chat.format, Format::PromptCompletion);
    assert_eq!(trained_text(&chat, &tok), vec!["Quxville.<|im_end|>\n".to_string()]);
    let e = &chat.examples[0];
    assert!(tok.decode(&e.ids, false).contains("<|im_start|>user\nCapital of Zorbia?<|im_end|>"));
    let plain = read(line, false, OPTS).unwrap();
    let e = &plain.examples[0];
    assert_eq!(trained_text(&plain, &tok), vec![format!("{}{}", tok.decode(&tok.encode("Quxville.", false, true).unwrap(), false), tok.token_text(tok.eos().unwrap()))]);
    assert!(!e.trained[0]);
}

#[test]
fn text_trains_on_every_token_but_the_first() {
    let (tok, _) = smollm2();
    let set = read("{\"text\": \"Zorbia's capital is Quxville.\"}\n\n{\"text\": \"The Blorp flows north.\"}\n", true, OPTS).unwrap();
    assert_eq!((set.format, set.examples.len(), set.blank_lines), (Format::Text, 2, 1));
    assert_eq!(set.examples[1].line, 3);
    for e in &set.examples {
        assert!(!e.trained[0] && e.trained[1..].iter().all(|t| *t));
        assert_eq!(e.ids.last().copied(), tok.eos());
    }
}

#[test]
fn bad_input_is_refused_with_its_line() {
    let cases = [
        ("{\"text\": \"ok\"}\n{\"text\": \"ok\"\n", "line 2: not valid JSON"),
        ("[1, 2]", "line 1: expected a JSON object"),
        ("{\"question\": \"q\", \"answer\": \"a\"}", "line 1: unknown format (keys: \"question\", \"answer\")"),
        ("{\"text\": \"a\"}\n{\"prompt\": \"p\", \"completion\": \"c\"}", "line 2: this line is {\"prompt\", \"completion\"} but line 1 is {\"text\"}"),
        ("{\"text\": 5}", "line 1: \"text\" must be a string"),
        ("{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}", "line 1: no assistant message"),
        ("{\"messages\": [{\"role\": \"user\"}, {\"role\": \"assistant\", \"content\": \"x\"}]}", "line 1: message 0: \"content\" is missing"),
        ("{\"messages\": \"hi\"}", "line 1: \"messages\" must be a list"),
        ("", "the data set has no examples"),
        ("\n  \n", "the data set has no examples"),
    ];
    for (text, want) in cases {
        let got = read(text, true, OPTS).expect_err(text);
        assert!(got.starts_with(want), "{text:?}: {got}");
    }
    let got = read("{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}", false, OPTS).unwrap_err();
    assert!(got.contains("no chat template"), "{got}");
}

#[test]
fn examples_longer_than_the_context_are_skipped_or_refused() {
    let long = format!("{{\"text\": \"{}\"}}", "word ".repeat(200));
    let text = format!("{{\"text\": \"short\"}}\n{long}\n");
    let opts = DataOptions { ctx: 64, strict: false };
    let set = read(&text, true, opts).unwrap();
    assert_eq!((set.examples.len(), set.skipped_too_long), (1, 1));
    let got = read(&text, true, DataOptions { strict: true, ..opts }).unwrap_err();
    assert!(got.starts_with("line 2: ") && got.contains("longer than the context of 64"), "{got}");
    let got = read(&long, true, opts).unwrap_err();
    assert!(got.contains("all 1 examples are longer than the context of 64"), "{got}");
}
