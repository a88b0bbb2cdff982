//! Hostile inputs for the GGUF parser and the tokenizer, replayed through the code the fuzz
//! targets run (fuzz/src, included below): every file in `tests/data/fuzz_regressions/` goes
//! through both targets and must not panic, then the crafted ones must fail with the error
//! that names the problem, before any allocation their lengths and counts would ask for.
//!
//! Files starting with `GGUF` are GGUF files (what `gguf_reader` reads, and what
//! `tokenizer_from_gguf` reads as is); the others are in `tokenizer_from_gguf`'s text format
//! (see fuzz/src/tokenizer_spec.rs). An input a fuzz run crashes on goes in that directory
//! once fixed (scripts/fuzz.sh runs the targets).

#[path = "../../fuzz/src/gguf_reader.rs"]
mod gguf_reader;
#[path = "../../fuzz/src/tokenizer_spec.rs"]
mod tokenizer_spec;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use nomoat_runtime::gguf::{Gguf, GgufError, MAX_NESTING};
use nomoat_runtime::tokenizer::{Tokenizer, TokenizerError};
use nomoat_tests::refdata::data_dir;

fn regressions_dir() -> PathBuf {
    data_dir().join("fuzz_regressions")
}

fn read(name: &str) -> Vec<u8> {
    let path = regressions_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_saved_input_runs_through_both_targets() {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(regressions_dir())
        .expect("tests/data/fuzz_regressions")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "md"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 20, "only {} saved inputs", paths.len());
    let mut failed = Vec::new();
    for path in &paths {
        let bytes = std::fs::read(path).unwrap();
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            gguf_reader::check(&bytes);
            tokenizer_spec::run(&bytes);
        }));
        if outcome.is_err() {
            failed.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    assert!(failed.is_empty(), "panicked on: {failed:?}");
}

fn parse_err(name: &str) -> GgufError {
    match Gguf::parse(&read(name)) {
        Ok(_) => panic!("{name} parsed"),
        Err(e) => e,
    }
}

#[test]
fn lengths_and_counts_no_header_could_hold_are_refused() {
    assert!(matches!(parse_err("hostile-huge-array-length.gguf"), GgufError::ArrayTooLong { len: u64::MAX, .. }));
    assert!(matches!(
        parse_err("hostile-huge-string-length.gguf"),
        GgufError::StringTooLong { len, .. } if len == 1 << 63
    ));
    assert!(matches!(parse_err("hostile-huge-counts.gguf"), GgufError::CountTooLarge { count: u64::MAX, .. }));
    // 2^23 strings fit in a header, but only three are there: truncated, not 2^23 slots
    // reserved up front (the parser reserves no more than the bytes in hand could hold)
    assert!(matches!(parse_err("hostile-array-count-lies.gguf"), GgufError::Truncated { .. }));
    assert!(matches!(parse_err("hostile-long-string-value.gguf"), GgufError::Truncated { .. }));
}

#[test]
fn nesting_stops_at_the_limit() {
    assert_eq!(MAX_NESTING, 8);
    assert!(matches!(parse_err("hostile-nested-9-deep.gguf"), GgufError::NestingTooDeep { max: 8, .. }));
    let g = Gguf::parse(&read("hostile-nested-8-deep.gguf")).unwrap();
    let mut v = g.get("n").unwrap();
    let mut depth = 0;
    while let Some(items) = v.as_array() {
        depth += 1;
        match items.first() {
            Some(inner) if inner.as_array().is_some() => v = inner,
            _ => break,
        }
    }
    assert_eq!(depth, 8);
}

#[test]
fn tensor_infos_that_overflow_are_refused() {
    assert!(matches!(parse_err("hostile-tensor-dims-overflow.gguf"), GgufError::ZeroOrOverflowingDims { .. }));
    assert!(matches!(parse_err("hostile-tensor-offset-overflow.gguf"), GgufError::OffsetOverflow { .. } | GgufError::TensorOutOfBounds { .. }));
    assert!(matches!(parse_err("hostile-tensor-n-dims.gguf"), GgufError::TooManyDims { n_dims: u32::MAX, .. }));
}

/// The tokenizer a text-format input describes.
fn tokenizer(name: &str) -> Result<Tokenizer, TokenizerError> {
    let case = tokenizer_spec::case_from_input(&read(name));
    let g = Gguf::parse(&case.gguf).unwrap_or_else(|e| panic!("{name}: {e}"));
    Tokenizer::from_gguf(&g)
}

fn tokenizer_err(name: &str) -> TokenizerError {
    match tokenizer(name) {
        Ok(t) => panic!("{name} built {t:?}"),
        Err(e) => e,
    }
}

#[test]
fn broken_vocabularies_are_typed_errors() {
    assert!(matches!(tokenizer_err("tok-duplicate-tokens.txt"), TokenizerError::DuplicateToken { first: 0, second: 2, .. }));
    // an empty token reads "[EMPTY_<id>]", as in llama.cpp, which may collide with a real one
    assert!(matches!(tokenizer_err("tok-empty-tokens-collide.txt"), TokenizerError::DuplicateToken { first: 1, second: 2, .. }));
    let t = tokenizer("tok-empty-tokens.txt").unwrap();
    assert_eq!(t.token_text(1), "[EMPTY_1]");
    assert!(matches!(tokenizer_err("tok-tokens-empty.txt"), TokenizerError::EmptyVocab));
    for name in ["tok-tokens-not-strings.txt", "tok-tokens-nested.txt", "tok-model-not-string.txt"] {
        assert!(matches!(tokenizer_err(name), TokenizerError::Metadata(GgufError::WrongMetadataType { .. })), "{name}");
    }
    assert!(matches!(tokenizer_err("tok-arrays-wrong-element-type.txt"), TokenizerError::Metadata(GgufError::WrongMetadataType { .. })));
    assert!(matches!(tokenizer_err("tok-types-short.txt"), TokenizerError::LengthMismatch { len: 2, n_tokens: 3, .. }));
    assert!(matches!(tokenizer_err("tok-scores-short.txt"), TokenizerError::LengthMismatch { len: 0, n_tokens: 3, .. }));
}

#[test]
fn merges_must_name_tokens() {
    for name in ["tok-merge-missing-token.txt", "tok-merge-malformed.txt", "tok-merge-result-missing.txt"] {
        assert!(matches!(tokenizer_err(name), TokenizerError::BadMerge { .. }), "{name}");
    }
}

#[test]
fn special_ids_beyond_the_vocabulary_are_ignored_or_refused() {
    // out of range ids fall back to the defaults (as llama.cpp), where those exist
    let t = tokenizer("tok-special-ids-out-of-range.txt").unwrap();
    assert_eq!(t.bos(), Some(1));
    assert_eq!(t.eos(), Some(2));
    assert_eq!(t.eot(), Some(3));
    assert!(t.vocab_size() > 3);
    // an id that is not an integer at all is an error
    assert!(matches!(tokenizer_err("tok-special-id-not-integer.txt"), TokenizerError::Metadata(GgufError::WrongMetadataType { .. })));
    // a BOS or EOS the metadata asks to add must exist
    assert!(matches!(tokenizer_err("tok-add-bos-without-bos.txt"), TokenizerError::MissingSpecialToken { .. }));
    assert!(matches!(tokenizer_err("tok-add-eos-out-of-range.txt"), TokenizerError::MissingSpecialToken { .. }));
}

#[test]
fn text_with_no_token_is_an_error_not_a_panic() {
    let t = tokenizer("tok-spm-no-byte-fallback.txt").unwrap();
    assert!(matches!(t.encode("a\u{65e5}", false, false), Err(TokenizerError::NoByteToken { .. })));
    assert_eq!(t.decode(&[3, 3, 99, u32::MAX], false), "aa");
}

/// llama.cpp's marker for a character outside GPT-2's byte alphabet repeats the whole token,
/// so a 60 KB token of such characters decoded to about a gigabyte (out of memory in the
/// fuzz target); the repetition now stops at 64 KiB of output.
#[test]
fn decoding_characters_outside_the_byte_alphabet_stays_bounded() {
    let t = tokenizer("oom-byte-level-decode-quadratic.txt").unwrap();
    let long = t.token_bytes(0);
    assert!(long.len() < 1 << 20, "a 60 KB token decodes to {} bytes", long.len());
    assert!(long.starts_with("[UNK_BYTE_0xe697a5日日".as_bytes()));
    // a short token decodes exactly as llama.cpp's llama_decode_text does
    let id = t.token_id("一x").unwrap();
    assert_eq!(t.token_bytes(id), "[UNK_BYTE_0xe4b880一x]x".as_bytes());
}
