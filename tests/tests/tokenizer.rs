//! The tokenizer against llama.cpp: every case of `tests/data/token_refs.json` (written by
//! `tests/reference/make_token_refs.py` through llama-cpp-python) must give llama.cpp's ids
//! exactly, decode to llama.cpp's detokenization, and stream to the same text. Plus the
//! metadata facts of the two test models and typed errors for broken tokenizer metadata.

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use nomoat_runtime::gguf::{Gguf, GgufWriter, MetadataValue};
use nomoat_runtime::tokenizer::{keys, StreamDecoder, Tokenizer, TokenizerError};
use nomoat_tests::refdata::data_dir;
use nomoat_tests::support::{model_path, GEMMA3, SMOLLM2};
use serde::Deserialize;

#[derive(Deserialize)]
struct Refs {
    vocabs: Vec<VocabRefs>,
}

#[derive(Deserialize)]
struct VocabRefs {
    name: String,
    file: String,
    patch: serde_json::Map<String, serde_json::Value>,
    facts: Facts,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Facts {
    n_vocab: usize,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    eog: Vec<u32>,
    n_control: usize,
    control_hash: String,
    pieces_hash: String,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    add_special: bool,
    parse_special: bool,
    ids: Vec<u32>,
    detok: String,
    detok_skip: String,
    #[serde(default)]
    detok_hex: Option<String>,
    #[serde(default)]
    detok_skip_hex: Option<String>,
}

fn refs() -> Refs {
    let path = data_dir().join("token_refs.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn read_gguf(path: &Path) -> Gguf {
    let len = std::fs::metadata(path).unwrap().len();
    Gguf::read_from(File::open(path).unwrap(), len).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The reference's metadata patch, applied as make_token_refs.py applies it.
fn patch(g: &mut Gguf, patch: &serde_json::Map<String, serde_json::Value>) {
    for (key, value) in patch {
        let value = match value {
            serde_json::Value::String(s) => MetadataValue::from(s.as_str()),
            serde_json::Value::Bool(b) => MetadataValue::from(*b),
            other => panic!("patch {key}: unsupported value {other}"),
        };
        match g.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => g.metadata.push((key.clone(), value)),
        }
    }
}

fn fnv1a64<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h: u64 = 0xCBF29CE484222325;
    for chunk in chunks {
        for &b in chunk {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001B3);
        }
    }
    format!("{h:016x}")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams `ids` through a StreamDecoder: the piece each push returned, then finish's.
fn stream(tok: &Tokenizer, ids: &[u32], skip_special: bool) -> Vec<String> {
    let mut dec = StreamDecoder::new(skip_special);
    let mut pieces: Vec<String> = ids.iter().map(|&id| dec.push(tok, id)).collect();
    pieces.push(dec.finish());
    pieces
}

/// Checks one vocabulary of the reference file; panics listing every mismatch.
fn check_vocab(name: &str) {
    let refs = refs();
    let v = refs.vocabs.iter().find(|v| v.name == name).unwrap_or_else(|| panic!("no vocabulary {name} in token_refs.json"));
    let mut g = read_gguf(&model_path(&v.file));
    patch(&mut g, &v.patch);
    let tok = Tokenizer::from_gguf(&g).unwrap_or_else(|e| panic!("{name}: {e}"));

    // facts
    let f = &v.facts;
    assert_eq!(tok.vocab_size(), f.n_vocab, "{name}: vocab size");
    assert_eq!(tok.bos(), f.bos, "{name}: bos");
    assert_eq!(tok.eos(), f.eos, "{name}: eos");
    assert_eq!(tok.add_bos(), f.add_bos, "{name}: add_bos");
    assert_eq!(tok.add_eos(), f.add_eos, "{name}: add_eos");
    assert_eq!(tok.eot_ids(), f.eog, "{name}: end-of-generation ids");
    let n = tok.vocab_size() as u32;
    let control: Vec<[u8; 4]> = (0..n).filter(|&i| tok.is_control(i)).map(u32::to_le_bytes).collect();
    assert_eq!(control.len(), f.n_control, "{name}: control tokens");
    assert_eq!(fnv1a64(control.iter().map(|b| &b[..])), f.control_hash, "{name}: control ids");
    let pieces: Vec<Vec<u8>> = (0..n)
        .flat_map(|i| {
            let p = tok.token_bytes(i);
            [(p.len() as u32).to_le_bytes().to_vec(), p]
        })
        .collect();
    assert_eq!(fnv1a64(pieces.iter().map(Vec::as_slice)), f.pieces_hash, "{name}: token pieces");

    // cases
    let mut failures = Vec::new();
    for (i, c) in v.cases.iter().enumerate() {
        let what = format!("{name} case {i} {:?} (add_special {}, parse_special {})", c.text, c.add_special, c.parse_special);
        let ids = match tok.encode(&c.text, c.add_special, c.parse_special) {
            Ok(ids) => ids,
            Err(e) => {
                failures.push(format!("{what}: {e}"));
                continue;
            }
        };
        if ids != c.ids {
            failures.push(format!("{what}:\n    ids      {ids:?}\n    llama.cpp {:?}", c.ids));
        }
        // decode(encode(text)), with and without special tokens, against llama_detokenize
        for (skip, want, want_hex) in [(false, &c.detok, &c.detok_hex), (true, &c.detok_skip, &c.detok_skip_hex)] {
            let bytes = tok.decode_bytes(&ids, skip);
            match want_hex {
                Some(h) if hex(&bytes) != *h => failures.push(format!("{what}: decode(skip {skip}) bytes {} != {h}", hex(&bytes))),
                _ => {}
            }
            let text = tok.decode(&ids, skip);
            if text != *want {
                failures.push(format!("{what}: decode(skip {skip}) {text:?} != {want:?}"));
            }
            let pieces = stream(&tok, &ids, skip);
            let joined: String = pieces.concat();
            if joined != text {
                failures.push(format!("{what}: stream(skip {skip}) {joined:?} != decode {text:?}"));
            }
            if !text.contains('\u{FFFD}') && pieces.iter().any(|p| p.contains('\u{FFFD}')) {
                failures.push(format!("{what}: stream(skip {skip}) broke a character: {pieces:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{name}: {} of {} cases differ from llama.cpp:\n{}", failures.len(), v.cases.len(), failures.join("\n"));
    eprintln!("{name}: {} cases match llama.cpp", v.cases.len());
}

#[test]
fn smollm2_matches_llama_cpp() {
    check_vocab("smollm2");
}

#[test]
fn gemma3_matches_llama_cpp() {
    check_vocab("gemma3");
}

#[test]
fn gpt2_pre_tokenizer_matches_llama_cpp() {
    check_vocab("smollm2-pre-gpt2");
}

#[test]
fn llama3_pre_tokenizer_matches_llama_cpp() {
    check_vocab("smollm2-pre-llama3");
}

#[test]
fn qwen2_pre_tokenizer_matches_llama_cpp() {
    check_vocab("smollm2-pre-qwen2");
}

#[test]
fn default_pre_tokenizer_matches_llama_cpp() {
    check_vocab("smollm2-pre-default");
}

#[test]
fn sentencepiece_space_prefix_matches_llama_cpp() {
    check_vocab("gemma3-space-prefix");
}

#[test]
fn every_reference_vocabulary_is_tested() {
    let names: Vec<String> = refs().vocabs.into_iter().map(|v| v.name).collect();
    assert_eq!(names, ["smollm2", "gemma3", "smollm2-pre-gpt2", "smollm2-pre-llama3", "smollm2-pre-qwen2", "smollm2-pre-default", "gemma3-space-prefix"]);
}

/// Plain text (no special tokens parsed) comes back exactly, as llama.cpp's does for these two
/// vocabularies: SmolLM2 does no space clean-up, Gemma 3 adds no space prefix. (The one
/// exception is a literal U+2581 in the input, which SentencePiece cannot tell from a space.)
#[test]
fn decode_is_lossless_for_plain_text() {
    for (name, file) in [("smollm2", SMOLLM2), ("gemma3", GEMMA3)] {
        let tok = Tokenizer::from_gguf(&read_gguf(&model_path(file))).unwrap();
        let refs = refs();
        let v = refs.vocabs.iter().find(|v| v.name == name).unwrap();
        let mut n = 0;
        for c in v.cases.iter().filter(|c| !c.parse_special && !c.text.contains('\u{2581}')) {
            let ids = tok.encode(&c.text, c.add_special, false).unwrap();
            assert_eq!(tok.decode(&ids, true), c.text, "{name}: {ids:?}");
            n += 1;
        }
        assert!(n > 100, "{name}: only {n} cases");
    }
}

#[test]
fn smollm2_facts() {
    let tok = Tokenizer::from_gguf(&read_gguf(&model_path(SMOLLM2))).unwrap();
    assert_eq!(tok.model(), "gpt2");
    assert_eq!(tok.pre(), "smollm");
    assert_eq!(tok.vocab_size(), 49152);
    assert!(!tok.add_bos());
    let ids = tok.encode("Hello", true, false).unwrap();
    assert_ne!(ids.first().copied(), tok.bos(), "SmolLM2 adds no BOS");
    assert_eq!(tok.token_text(1), "<|im_start|>");
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert!(tok.is_control(1) && tok.is_control(2));
    assert!(tok.eot_ids().contains(&2), "<|im_end|> ends a turn");
    let chat = tok.encode("<|im_start|>user\nhi<|im_end|>", false, true).unwrap();
    assert_eq!(chat.first(), Some(&1));
    assert_eq!(chat.last(), Some(&2));
    assert_eq!(tok.decode(&chat, true), "user\nhi");
    assert_eq!(tok.decode(&chat, false), "<|im_start|>user\nhi<|im_end|>");
    // "Ġ" is the space of GPT-2's byte alphabet
    assert_eq!(tok.token_bytes(tok.token_id("Ġthe").unwrap()), b" the");
}

#[test]
fn gemma3_facts_and_build_time() {
    let g = read_gguf(&model_path(GEMMA3));
    let start = Instant::now();
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let built = start.elapsed();
    eprintln!("Gemma 3 tokenizer (262144 tokens) built in {built:?}");
    // well under a second in an optimized build; generous for a loaded 2-core CI machine
    assert!(built.as_secs_f64() < 5.0, "building the Gemma 3 tokenizer took {built:?}");
    assert_eq!(tok.model(), "llama");
    assert_eq!(tok.vocab_size(), 262144);
    assert_eq!(tok.bos(), Some(2));
    assert_eq!(tok.eos(), Some(1));
    assert!(tok.add_bos() && !tok.add_eos());
    let ids = tok.encode("Hello", true, false).unwrap();
    assert_eq!(ids[0], 2, "Gemma 3 adds BOS");
    assert_eq!(tok.encode("Hello", false, false).unwrap().first(), ids.get(1));
    assert_eq!(tok.token_text(106), "<end_of_turn>");
    assert!(tok.eot_ids().contains(&106) && tok.eot_ids().contains(&1));
    // byte fallback: a character outside the vocabulary becomes its UTF-8 bytes, each a <0xXX>
    // token (U+10FFFD, the last private-use character)
    let pua = tok.encode("\u{10FFFD}", false, false).unwrap();
    let texts: Vec<&str> = pua.iter().map(|&i| tok.token_text(i)).collect();
    assert_eq!(texts, ["<0xF4>", "<0x8F>", "<0xBF>", "<0xBD>"]);
    assert_eq!(tok.token_bytes(pua[0]), [0xF4]);
    // decoding part of them gives those bytes, or U+FFFD for the unfinished character
    assert_eq!(tok.decode_bytes(&pua[..2], true), [0xF4, 0x8F]);
    assert_eq!(tok.decode(&pua[..2], true), "\u{FFFD}");
    // a stream of those byte tokens holds the character back until it is whole
    let mut dec = StreamDecoder::new(true);
    assert_eq!(dec.push(&tok, pua[0]), "");
    assert_eq!(dec.push(&tok, pua[1]), "");
    assert_eq!(dec.push(&tok, pua[2]), "");
    assert_eq!(dec.push(&tok, pua[3]), "\u{10FFFD}");
    assert_eq!(dec.finish(), "");
    // and a character left incomplete ends as U+FFFD
    let mut dec = StreamDecoder::new(true);
    assert_eq!(dec.push(&tok, pua[0]), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
}

// ---------------------------------------------------------------------------------------------
// Small vocabularies written with GgufWriter: the algorithms and the errors
// ---------------------------------------------------------------------------------------------

fn build(w: &GgufWriter) -> Result<Tokenizer, TokenizerError> {
    Tokenizer::from_gguf(&Gguf::parse(&w.to_bytes()).unwrap())
}

/// A SentencePiece vocabulary: `pieces` with their scores, plus <unk>, <s>, </s>.
fn spm_writer(pieces: &[(&str, f32)]) -> GgufWriter {
    let mut tokens = vec!["<unk>", "<s>", "</s>"];
    let mut scores = vec![0.0, 0.0, 0.0];
    let mut types = vec![2, 3, 3];
    for (p, s) in pieces {
        tokens.push(p);
        scores.push(*s);
        types.push(1);
    }
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "llama")
        .add_metadata(keys::TOKENS, MetadataValue::str_array(tokens))
        .add_metadata(keys::SCORES, MetadataValue::f32_array(scores))
        .add_metadata(keys::TOKEN_TYPE, MetadataValue::i32_array(types));
    w
}

/// A byte-level BPE vocabulary over `tokens` with `merges`.
fn bpe_writer(tokens: &[&str], merges: &[&str]) -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "gpt2")
        .add_metadata(keys::PRE, "gpt-2")
        .add_metadata(keys::TOKENS, MetadataValue::str_array(tokens.iter().copied()))
        .add_metadata(keys::MERGES, MetadataValue::str_array(merges.iter().copied()));
    w
}

#[test]
fn spm_merges_by_score_and_ties_go_left() {
    // "aba": "ab" and "ba" both possible; the higher score wins, equal scores merge leftmost
    let ids_of = |tok: &Tokenizer, ids: &[u32]| ids.iter().map(|&i| tok.token_text(i).to_string()).collect::<Vec<_>>();
    let tok = build(&spm_writer(&[("▁", -1.0), ("a", -2.0), ("b", -2.0), ("ab", -5.0), ("ba", -4.0)])).unwrap();
    assert_eq!(ids_of(&tok, &tok.encode("aba", false, false).unwrap()), ["▁", "a", "ba"]);
    let tok = build(&spm_writer(&[("▁", -1.0), ("a", -2.0), ("b", -2.0), ("ab", -4.0), ("ba", -4.0)])).unwrap();
    assert_eq!(ids_of(&tok, &tok.encode("aba", false, false).unwrap()), ["▁", "ab", "a"]);
    // add_space_prefix defaults to true for SentencePiece, and decode drops that space again
    let ids = tok.encode("ab a", true, false).unwrap();
    assert_eq!(ids_of(&tok, &ids), ["<s>", "▁", "ab", "▁", "a"]);
    assert_eq!(tok.decode(&ids, true), " ab a", "after BOS llama.cpp keeps the space");
    assert_eq!(tok.decode(&ids[1..], true), "ab a");
}

#[test]
fn spm_without_byte_tokens_is_an_error_not_a_panic() {
    let tok = build(&spm_writer(&[("▁", -1.0), ("a", -2.0)])).unwrap();
    match tok.encode("a日", false, false) {
        Err(TokenizerError::NoByteToken { byte: 0xE6 }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn bpe_merges_by_rank() {
    let tok = build(&bpe_writer(&["a", "b", "c", "ab", "bc", "abc"], &["b c", "a b", "a bc"])).unwrap();
    // "b c" ranks first, so "abc" is a + bc, then "a bc"
    assert_eq!(tok.encode("abc", false, false).unwrap(), [5]);
    assert_eq!(tok.encode("ab", false, false).unwrap(), [3]);
    assert_eq!(tok.decode(&[0, 4], false), "abc");
}

#[test]
fn missing_tokens_is_a_typed_error() {
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "llama");
    match build(&w) {
        Err(TokenizerError::MissingKey { key }) => assert_eq!(key, keys::TOKENS),
        other => panic!("{other:?}"),
    }
    let mut w = GgufWriter::new();
    w.add_metadata(keys::TOKENS, MetadataValue::str_array(["a"]));
    match build(&w) {
        Err(TokenizerError::MissingKey { key }) => assert_eq!(key, keys::MODEL),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_model_and_pre_tokenizer_are_typed_errors() {
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "bert").add_metadata(keys::TOKENS, MetadataValue::str_array(["a"]));
    match build(&w) {
        Err(e @ TokenizerError::UnsupportedModel { .. }) => {
            assert!(e.to_string().contains("'bert'"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    let mut g = Gguf::parse(&bpe_writer(&["a"], &[]).to_bytes()).unwrap();
    g.metadata.iter_mut().find(|(k, _)| k == keys::PRE).unwrap().1 = "no-such-pre".into();
    match Tokenizer::from_gguf(&g) {
        Err(e @ TokenizerError::UnknownPreTokenizer { .. }) => {
            assert!(e.to_string().contains("no-such-pre") && e.to_string().contains("smollm"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_merges_are_typed_errors() {
    let cases: &[(&[&str], &str)] =
        &[(&["a b", "a x"], "\"x\" is not a token"), (&["q b"], "\"q\" is not a token"), (&["b a"], "the merged text \"ba\" is not a token"), (&["ab"], "no space")];
    for (merges, reason) in cases {
        match build(&bpe_writer(&["a", "b", "ab"], merges)) {
            Err(e @ TokenizerError::BadMerge { .. }) => {
                assert!(e.to_string().contains(reason), "{merges:?}: {e}");
            }
            other => panic!("{merges:?}: {other:?}"),
        }
    }
    // the index of the bad one is reported
    match build(&bpe_writer(&["a", "b", "ab"], &["a b", "a x"])) {
        Err(TokenizerError::BadMerge { index, merge, .. }) => {
            assert_eq!((index, merge.as_str()), (1, "a x"))
        }
        other => panic!("{other:?}"),
    }
    // a gpt2 vocabulary needs merges
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "gpt2").add_metadata(keys::TOKENS, MetadataValue::str_array(["a"]));
    match build(&w) {
        Err(TokenizerError::MissingKey { key }) => assert_eq!(key, keys::MERGES),
        other => panic!("{other:?}"),
    }
}

#[test]
fn inconsistent_vocabularies_are_typed_errors() {
    // scores shorter than tokens
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "llama")
        .add_metadata(keys::TOKENS, MetadataValue::str_array(["<unk>", "<s>", "</s>"]))
        .add_metadata(keys::SCORES, MetadataValue::f32_array([0.0]));
    assert!(matches!(build(&w), Err(TokenizerError::LengthMismatch { key: keys::SCORES, len: 1, n_tokens: 3 })));
    // token types shorter than tokens
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "llama")
        .add_metadata(keys::TOKENS, MetadataValue::str_array(["<unk>", "<s>", "</s>"]))
        .add_metadata(keys::TOKEN_TYPE, MetadataValue::i32_array([1, 1]));
    assert!(matches!(build(&w), Err(TokenizerError::LengthMismatch { key: keys::TOKEN_TYPE, .. })));
    // tokens of the wrong type
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "llama").add_metadata(keys::TOKENS, MetadataValue::u32_array([1, 2]));
    assert!(matches!(build(&w), Err(TokenizerError::Metadata(_))));
    // the same text twice
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "llama").add_metadata(keys::TOKENS, MetadataValue::str_array(["<unk>", "<s>", "</s>", "a", "a"]));
    assert!(matches!(build(&w), Err(TokenizerError::DuplicateToken { first: 3, second: 4, .. })));
    // no tokens at all
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "llama").add_metadata(keys::TOKENS, MetadataValue::str_array(Vec::<&str>::new()));
    assert!(matches!(build(&w), Err(TokenizerError::EmptyVocab)));
    // BOS to be added but none to add (llama's default BOS id 1 is beyond a 1-token vocabulary)
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "llama").add_metadata(keys::TOKENS, MetadataValue::str_array(["a"]));
    assert!(matches!(build(&w), Err(TokenizerError::MissingSpecialToken { add_key: keys::ADD_BOS, .. })));
}

/// A SentencePiece-style vocabulary of `tokens` with their `types` (llama.cpp's token types:
/// 1 normal, 2 unknown, 3 control, 4 user-defined) and equal scores.
fn typed_vocab(tokens: &[String], types: Vec<i32>) -> GgufWriter {
    let scores = vec![0.0f32; tokens.len()];
    let mut w = GgufWriter::new();
    w.add_metadata(keys::MODEL, "llama")
        .add_metadata(keys::TOKENS, MetadataValue::str_array(tokens.iter().map(String::as_str)))
        .add_metadata(keys::SCORES, MetadataValue::f32_array(scores))
        .add_metadata(keys::TOKEN_TYPE, MetadataValue::i32_array(types));
    w
}

/// Cutting special tokens out of a text lists every occurrence once and takes them by rank;
/// llama.cpp makes a pass over the text for each token. Both ways give the same fragments, over
/// random vocabularies of short tokens that overlap and contain one another (control and
/// user-defined, multibyte characters among them), random texts, `parse_special` on and off, and
/// random offsets marked literal.
#[test]
fn special_tokens_are_cut_as_llama_cpp_cuts_them() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let alphabet = ['a', 'b', '<', '>', '\u{e9}', '|'];
    let mut cut = 0;
    for round in 0..300 {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "\u{2581}"].map(String::from).to_vec();
        let mut types = vec![2, 3, 3, 1];
        for c in alphabet {
            tokens.push(c.to_string());
            types.push(1);
        }
        for _ in 0..1 + next(12) {
            let t: String = (0..1 + next(5)).map(|_| alphabet[next(alphabet.len())]).collect();
            if !tokens.contains(&t) {
                tokens.push(t);
                types.push(if next(2) == 0 { 3 } else { 4 });
            }
        }
        let tok = build(&typed_vocab(&tokens, types)).unwrap();
        for _ in 0..20 {
            let text: String = (0..next(60)).map(|_| alphabet[next(alphabet.len())]).collect();
            let mut literal: Vec<usize> = text.char_indices().map(|(i, _)| i).filter(|_| next(4) == 0).collect();
            literal.dedup();
            for parse_special in [false, true] {
                let fast = tok.fragments(&text, parse_special, &literal, false);
                let passes = tok.fragments(&text, parse_special, &literal, true);
                assert_eq!(fast, passes, "round {round}: {text:?} with {tokens:?}, literal {literal:?}, parse_special {parse_special}");
                cut += fast.iter().filter(|f| f.is_ok()).count();
            }
        }
    }
    assert!(cut > 4_000, "only {cut} tokens cut out: the cases do not exercise the cutting");
}

/// Vocabularies made to be expensive. Refused by name, at once: more special tokens than
/// `MAX_SPECIAL_TOKENS` (100,000 control tokens), one longer than `MAX_SPECIAL_TOKEN_BYTES`, or
/// texts adding up to more than `MAX_SPECIAL_TEXT_BYTES`. At the caps (32,768 control tokens of
/// 32 bytes, 1 MiB) the tokenizer builds, and a 300 KB text holding 8,000 of them encodes, each
/// within seconds (the encoding took ~3 s in this profile when each token present was a pass over
/// the text; now one pass finds them all).
#[test]
fn hostile_vocabularies_are_capped() {
    use nomoat_runtime::tokenizer::{MAX_SPECIAL_TEXT_BYTES, MAX_SPECIAL_TOKENS, MAX_SPECIAL_TOKEN_BYTES};
    use std::time::Instant;
    // <unk>, <s>, </s>, "▁", "a" and "b", then `n` control tokens of `len` bytes each
    let control = |i: usize, len: usize| format!("<c{i:07}>{}", "x".repeat(len - 10));
    let vocab = |n: usize, len: usize| -> GgufWriter {
        let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "\u{2581}", "a", "b"].map(String::from).to_vec();
        let mut types = vec![2, 3, 3, 1, 1, 1];
        for i in 0..n {
            tokens.push(control(i, len));
            types.push(3);
        }
        typed_vocab(&tokens, types)
    };
    let start = Instant::now();
    assert!(matches!(build(&vocab(100_000, 16)), Err(TokenizerError::TooManySpecialTokens { .. })));
    assert!(matches!(build(&vocab(2, MAX_SPECIAL_TOKEN_BYTES + 1)), Err(TokenizerError::SpecialTokenTooLong { .. })));
    assert!(matches!(build(&vocab(MAX_SPECIAL_TEXT_BYTES / 200 + 1, 200)), Err(TokenizerError::SpecialTextTooLarge { .. })));
    eprintln!("refusals: {:?}", start.elapsed());

    let n = MAX_SPECIAL_TOKENS - 3; // <unk>, <s> and </s> are special too
    let len = 32;
    let start = Instant::now();
    let tok = build(&vocab(n, len - 1)).unwrap();
    let built = start.elapsed();
    // 8,000 different control tokens between letters
    let text: String = (0..8000).map(|i| format!("a{}b", control(i * 4, len - 1))).collect();
    let start = Instant::now();
    let ids = tok.encode(&text, false, true).unwrap();
    let encoded = start.elapsed();
    eprintln!("built in {built:?}, encoded {} bytes into {} ids in {encoded:?}", text.len(), ids.len());
    assert_eq!(ids.iter().filter(|&&id| id >= 6).count(), 8000);
    assert!(built.as_secs() < 20 && encoded.as_secs() < 20, "{built:?} {encoded:?}");
}
