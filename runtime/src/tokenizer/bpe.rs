//! Byte-level BPE (`gpt2`) vocabularies: llama.cpp's pre-tokenizer regexes per
//! `tokenizer.ggml.pre`, the merges, and GPT-2's byte alphabet.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use fancy_regex::Regex;
use tokenizers::models::bpe::BPE;
use tokenizers::Model;

use super::{keys, TokenizerError};
use crate::gguf::Gguf;

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers: llama.cpp's regexes per `tokenizer.ggml.pre` (llm_tokenizer_bpe's constructor)
// ---------------------------------------------------------------------------------------------

const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Clone, Copy, Debug)]
pub(super) struct PreSpec {
    /// Applied in order, each splitting every piece into its matches and the text between.
    pub(super) regexes: &'static [&'static str],
    /// A whole piece that is a token is that token, merges or not (llama.cpp's ignore_merges).
    pub(super) ignore_merges: bool,
    /// llama.cpp's default for add_bos (tokenizer.ggml.add_bos_token overrides it).
    pub(super) add_bos: bool,
    /// llama.cpp's clean_spaces: detokenizing drops spaces before ?!., and some apostrophes.
    pub(super) clean_spaces: bool,
}

const DEFAULT: PreSpec =
    PreSpec { regexes: &[r"[\p{P}\$\+<=>\^~\|]+", RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"], ignore_merges: false, add_bos: false, clean_spaces: true };
const GPT2: PreSpec = PreSpec { regexes: &[RE_GPT2], ..DEFAULT };
const SMOLLM: PreSpec = PreSpec { regexes: &[r"\p{N}", RE_GPT2], ..DEFAULT };
const LLAMA3: PreSpec = PreSpec { regexes: &[RE_LLAMA3], ignore_merges: true, add_bos: true, clean_spaces: true };
const QWEN2: PreSpec = PreSpec { regexes: &[RE_QWEN2], ..DEFAULT };
const FALCON: PreSpec = PreSpec { regexes: &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, r"[0-9][0-9][0-9]"], ..DEFAULT };

/// Every `tokenizer.ggml.pre` understood, with llama.cpp's settings for it. (A missing key is
/// "default", as in llama.cpp; "gpt2" is accepted as a spelling of "gpt-2".)
pub(super) const PRE_TYPES: &[(&str, PreSpec)] = &[
    ("default", DEFAULT),
    ("gpt-2", GPT2),
    ("gpt2", GPT2),
    ("phi-2", GPT2),
    ("gigachat", GPT2),
    ("a.x-4.0", GPT2),
    ("mellum", GPT2),
    ("mpt", GPT2),
    ("olmo", GPT2),
    ("jais", GPT2),
    ("exaone4", GPT2),
    ("trillion", PreSpec { clean_spaces: false, ..GPT2 }),
    ("granite-docling", PreSpec { clean_spaces: false, ..GPT2 }),
    ("smollm", PreSpec { clean_spaces: false, ..SMOLLM }),
    ("command-r", PreSpec { clean_spaces: false, ..SMOLLM }),
    ("starcoder", SMOLLM),
    ("refact", SMOLLM),
    ("codeshell", SMOLLM),
    ("exaone", SMOLLM),
    ("minerva-7b", SMOLLM),
    ("mellum2", SMOLLM),
    ("llama3", LLAMA3),
    ("llama-v3", LLAMA3),
    ("llama-bpe", LLAMA3),
    ("falcon3", LLAMA3),
    ("falcon-h1", LLAMA3),
    ("pixtral", LLAMA3),
    ("midm-2.0", LLAMA3),
    ("lfm2", LLAMA3),
    ("dbrx", PreSpec { ignore_merges: false, add_bos: false, ..LLAMA3 }),
    ("smaug-bpe", PreSpec { ignore_merges: false, add_bos: false, ..LLAMA3 }),
    ("qwen2", PreSpec { clean_spaces: false, ..QWEN2 }),
    ("deepseek-r1-qwen", PreSpec { clean_spaces: false, ..QWEN2 }),
    ("kormo", PreSpec { clean_spaces: false, ..QWEN2 }),
    ("stablelm2", QWEN2),
    ("megrez", QWEN2),
    ("falcon", FALCON),
];

pub(super) fn pre_spec(name: &str) -> Option<PreSpec> {
    let name = if name.is_empty() { "default" } else { name };
    PRE_TYPES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// Regexes get a far higher backtracking budget than fancy-regex's default: on the patterns
/// above backtracking grows with runs of whitespace, and failing is worse than working longer.
pub(super) const BACKTRACK_LIMIT: usize = 100_000_000;

/// `tokenizer.ggml.merges`, checked: "left right", both sides and their concatenation tokens.
/// A merge repeated later keeps its first rank, as in llama.cpp.
pub(super) fn read_merges(g: &Gguf, ids: &HashMap<String, u32>) -> Result<Vec<(String, String)>, TokenizerError> {
    let raw = g.get_str_array(keys::MERGES)?;
    let mut merges = Vec::with_capacity(raw.len());
    let mut seen = HashSet::with_capacity(raw.len());
    for (index, m) in raw.iter().enumerate() {
        let bad = |reason: String| TokenizerError::BadMerge { index, merge: m.to_string(), reason };
        // llama.cpp splits at the first space after the first byte
        let Some(space) = m.bytes().skip(1).position(|b| b == b' ').map(|p| p + 1) else {
            return Err(bad("no space separates two tokens".into()));
        };
        let (a, b) = (&m[..space], &m[space + 1..]);
        let a_id = ids.get(a).ok_or_else(|| bad(format!("{a:?} is not a token")))?;
        let b_id = ids.get(b).ok_or_else(|| bad(format!("{b:?} is not a token")))?;
        let merged = format!("{a}{b}");
        if !ids.contains_key(&merged) {
            return Err(bad(format!("the merged text {merged:?} is not a token")));
        }
        if seen.insert((*a_id, *b_id)) {
            merges.push((a.to_string(), b.to_string()));
        }
    }
    Ok(merges)
}

/// Byte-level BPE on one fragment: llama.cpp's pre-tokenizer regexes, then GPT-2's byte
/// alphabet, then merges.
pub(super) fn bpe(model: &BPE, splitters: &[Regex], text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
    let mut pieces = vec![Range { start: 0, end: text.len() }];
    for re in splitters {
        let mut next = Vec::with_capacity(pieces.len() * 2);
        for r in pieces {
            let s = &text[r.clone()];
            let mut prev = 0;
            for m in re.find_iter(s) {
                let m = m.map_err(|e| TokenizerError::Regex(e.to_string()))?;
                if m.end() == m.start() {
                    continue;
                }
                if m.start() > prev {
                    next.push(r.start + prev..r.start + m.start());
                }
                next.push(r.start + m.start()..r.start + m.end());
                prev = m.end();
            }
            if prev < s.len() {
                next.push(r.start + prev..r.end);
            }
        }
        pieces = next;
    }
    let mut word = String::new();
    for r in pieces {
        word.clear();
        word.extend(text.as_bytes()[r].iter().map(|&b| BYTE_TO_CHAR[b as usize]));
        let tokens = model.tokenize(&word).map_err(|e| TokenizerError::Bpe(e.to_string()))?;
        out.extend(tokens.iter().map(|t| t.id));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bytes
// ---------------------------------------------------------------------------------------------

/// GPT-2's byte alphabet: printable bytes stand for themselves, the others for U+0100 onwards.
const fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    let mut b = 0usize;
    while b < 256 {
        let printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
        let cp = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        table[b] = match char::from_u32(cp) {
            Some(c) => c,
            None => '\0',
        };
        b += 1;
    }
    table
}

const BYTE_TO_CHAR: [char; 256] = byte_to_char_table();

fn char_to_byte(c: char) -> Option<u8> {
    let cp = c as u32;
    if cp < 256 {
        let b = cp as usize;
        return (BYTE_TO_CHAR[b] == c).then_some(b as u8);
    }
    // the non-printable bytes, in order, took U+0100 onwards
    let k = cp.checked_sub(256)? as usize;
    (0..256).filter(|&b| BYTE_TO_CHAR[b] as u32 >= 256).nth(k).map(|b| b as u8)
}

/// Output size past which [`byte_level_decode`] stops repeating a token's text (see there).
const MAX_UNK_BYTE_ECHO: usize = 1 << 16;

/// llama.cpp's llama_decode_text: GPT-2's byte alphabet back to bytes, with its marker for a
/// character outside it. That marker repeats the whole token text, so a token of n such
/// characters would decode to O(n²) bytes (a 60 KB one to about a gigabyte: an out-of-memory
/// in the tokenizer fuzz target). Here the text is repeated only while the output stays
/// within [`MAX_UNK_BYTE_ECHO`] bytes: the same bytes as llama.cpp wherever its output would
/// fit in that.
pub(super) fn byte_level_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                if out.len() + text.len() <= MAX_UNK_BYTE_ECHO {
                    out.extend_from_slice(text.as_bytes());
                }
                out.push(b']');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_round_trips() {
        let mut seen = HashSet::new();
        for b in 0..=255u8 {
            let c = BYTE_TO_CHAR[b as usize];
            assert!(seen.insert(c));
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(BYTE_TO_CHAR[b' ' as usize], 'Ġ');
        assert_eq!(BYTE_TO_CHAR[b'\n' as usize], 'Ċ');
        assert_eq!(char_to_byte('a'), Some(b'a'));
        assert_eq!(char_to_byte('é'), Some(0xE9));
        assert_eq!(char_to_byte('日'), None);
        assert_eq!(byte_level_decode("a日"), b"a[UNK_BYTE_0xe697a5a\xe6\x97\xa5]".to_vec());
    }

    #[test]
    fn every_pre_tokenizer_regex_compiles() {
        for (name, spec) in PRE_TYPES {
            for re in spec.regexes {
                Regex::new(re).unwrap_or_else(|e| panic!("{name}: {re}: {e}"));
            }
        }
    }
}
