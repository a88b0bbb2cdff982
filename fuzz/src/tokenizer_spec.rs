//! The `tokenizer_from_gguf` target: a GGUF file whose tokenizer metadata the fuzzer
//! controls, through `Gguf::parse` into `Tokenizer::from_gguf`, then encoding and decoding.
//!
//! Random bytes would almost never get past the parser to the tokenizer, so the input is a
//! small text format describing the metadata, which this module writes with `GgufWriter`
//! and parses back. An input that starts with the magic `GGUF` is taken as a file instead
//! (the seed corpus has real headers with truncated vocabularies).
//!
//! The format: one directive per line, words separated by single spaces. In words, `\s` is a
//! space, `\n` `\t` `\r` `\0` `\\` as usual, `\xHH` the character U+00HH and `\u{H..}` any
//! character. A KEY without a dot means `tokenizer.ggml.KEY`.
//!
//! ```text
//! model llama                 tokenizer.ggml.model (a string); `pre NAME` likewise
//! tok TEXT [SCORE] [TYPE]     appends a token (score 0 and type 1, normal, by default)
//! byte_toks                   appends <0x00>..<0xFF> as byte tokens (type 6)
//! gpt2_alphabet               appends GPT-2's 256 byte characters as normal tokens
//! merge A B                   appends "A B" to tokenizer.ggml.merges; `merge_raw TEXT` as is
//! auto_merges                 appends a merge for every split of a token into two tokens
//! scores TY | types TY        element type of the scores / token_type array, or `none`
//! trunc tokens|scores|types|merges N   writes only the first N elements
//! TY KEY VALUE                any key, TY one of u8 i8 u16 i16 u32 i32 u64 i64 f32 f64 bool str
//! arr KEY TY V...             an array of TY (values that do not parse are 0, "" or false)
//! nest KEY DEPTH [TY V...]    that array inside DEPTH arrays of one element
//! version N | align N         the file's version / alignment (align capped at 4096)
//! text TEXT                   a text to encode (at most 8, each cut to 512 bytes)
//! ids N...                    ids to decode (at most 256)
//! flip POS BYTE               after writing, sets byte POS (modulo the length) to BYTE
//! ```
//!
//! A key set explicitly replaces the one the tokens, scores, types and merges would give.
//! Integers are read as i128 and wrapped into the type, so every value is reachable.

use nomoat_runtime::gguf::{Gguf, GgufWriter, MetadataValue, ValueType};
use nomoat_runtime::tokenizer::{StreamDecoder, Tokenizer};

const MAX_TEXTS: usize = 8;
const MAX_TEXT_BYTES: usize = 512;
const MAX_IDS: usize = 256;
const MAX_FLIPS: usize = 16;
const MAX_NEST: usize = 12;
const MAX_ALIGN: u64 = 4096;
/// Tokens decoded one by one after a successful build.
const MAX_PIECES: u32 = 1024;

/// Texts every tokenizer built is given: spaces, newlines, digits, apostrophes, non-ASCII,
/// special-token names.
const TEXTS: &[&str] = &[
    "Hello world! It's 2024, isn't it?",
    "  two  spaces\n\n\ttab \u{2581}x",
    "日本語 über café 🙂",
    "<s>a</s><|im_start|>user\nhi<|im_end|><start_of_turn><end_of_turn><|endoftext|>",
    "",
];

/// One input: the file and what to encode and decode with its tokenizer.
pub struct Case {
    pub gguf: Vec<u8>,
    pub texts: Vec<String>,
    pub ids: Vec<u32>,
}

/// The whole target: build the case, parse, build the tokenizer, use it.
pub fn run(data: &[u8]) {
    run_case(&case_from_input(data));
}

pub fn run_case(case: &Case) {
    let g = match Gguf::parse(&case.gguf) {
        Ok(g) => g,
        Err(e) => {
            let msg = e.to_string();
            if debug() {
                eprintln!("parse: {msg}");
            }
            return;
        }
    };
    exercise_tokenizer(&g, &case.texts, &case.ids);
}

/// Builds the tokenizer `g` describes and, if that works, encodes and decodes with it.
pub fn exercise_tokenizer(g: &Gguf, texts: &[String], ids: &[u32]) {
    let t = match Tokenizer::from_gguf(g) {
        Ok(t) => t,
        Err(e) => {
            let msg = e.to_string();
            if debug() {
                eprintln!("from_gguf: {msg}");
            }
            return;
        }
    };
    if debug() {
        eprintln!("from_gguf: {t:?}");
    }
    let n = t.vocab_size() as u32;
    let _ = format!("{t:?}");
    let _ = (t.bos(), t.eos(), t.unk(), t.pad(), t.eot(), t.add_bos(), t.add_eos());
    let _ = (t.model(), t.pre(), t.eot_ids());
    for id in (0..n.min(MAX_PIECES)).chain([n, u32::MAX]) {
        let _ = (t.is_eog(id), t.is_control(id), t.token_bytes(id));
        let text = t.token_text(id);
        if id < n {
            assert_eq!(t.token_id(text), Some(id), "token {id} {text:?} does not map back");
        }
    }
    for text in TEXTS.iter().copied().chain(texts.iter().map(String::as_str)) {
        for add_special in [false, true] {
            for parse_special in [false, true] {
                match t.encode(text, add_special, parse_special) {
                    Ok(out) => {
                        for &id in &out {
                            assert!(id < n, "{text:?} encodes to id {id} of a {n}-token vocabulary");
                        }
                        decode_both_ways(&t, &out);
                    }
                    Err(e) => {
                        let _ = e.to_string();
                    }
                }
            }
        }
    }
    decode_both_ways(&t, ids);
}

/// `decode` and a `StreamDecoder` fed one id at a time agree (the stream cannot know that
/// an EOS is the last id, so with `skip_special` and `add_eos` a final EOS is left out).
fn decode_both_ways(t: &Tokenizer, ids: &[u32]) {
    for skip_special in [false, true] {
        let whole = t.decode(ids, skip_special);
        let _ = t.decode_bytes(ids, skip_special);
        let mut ids = ids;
        if skip_special && t.add_eos() && ids.last().copied() == t.eos() {
            ids = &ids[..ids.len() - 1];
        }
        let mut stream = StreamDecoder::new(skip_special);
        let mut streamed = String::new();
        for &id in ids {
            streamed.push_str(&stream.push(t, id));
        }
        streamed.push_str(&stream.finish());
        if !(skip_special && t.add_eos() && t.eos().is_some()) {
            assert_eq!(streamed, whole, "streamed and whole decoding of {ids:?} differ");
        }
    }
}

/// `NOMOAT_FUZZ_DEBUG=1` prints why each input stopped where it did (for checking seeds).
fn debug() -> bool {
    static DEBUG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DEBUG.get_or_init(|| std::env::var_os("NOMOAT_FUZZ_DEBUG").is_some())
}

/// The input as a case: a GGUF file as is, or the text format above.
pub fn case_from_input(data: &[u8]) -> Case {
    if data.starts_with(b"GGUF") {
        return Case { gguf: data.to_vec(), texts: Vec::new(), ids: Vec::new() };
    }
    Spec::parse(&String::from_utf8_lossy(data)).build()
}

#[derive(Default)]
struct Spec {
    /// Explicit keys, in order.
    kvs: Vec<(String, MetadataValue)>,
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
    merges: Vec<String>,
    /// Element types of the generated arrays; `None` leaves the key out.
    scores_ty: Option<ValueType>,
    types_ty: Option<ValueType>,
    trunc: [Option<usize>; 4],
    byte_toks: bool,
    gpt2_alphabet: bool,
    auto_merges: bool,
    version: Option<u32>,
    align: Option<u64>,
    texts: Vec<String>,
    ids: Vec<u32>,
    flips: Vec<(usize, u8)>,
}

const TOKENS: usize = 0;
const SCORES: usize = 1;
const TYPES: usize = 2;
const MERGES: usize = 3;

impl Spec {
    fn parse(text: &str) -> Spec {
        let mut s = Spec { scores_ty: Some(ValueType::F32), types_ty: Some(ValueType::I32), ..Spec::default() };
        for line in text.split('\n') {
            let mut words = line.split(' ');
            let directive = words.next().unwrap_or("");
            let args: Vec<&str> = words.collect();
            let arg = |i: usize| args.get(i).copied().unwrap_or("");
            match directive {
                "model" | "pre" => s.kvs.push((key(directive), MetadataValue::String(unescape(arg(0))))),
                "tok" => {
                    s.tokens.push(unescape(arg(0)));
                    s.scores.push(arg(1).parse().unwrap_or(0.0));
                    s.types.push(args.get(2).map_or(1, |t| int(t) as i32));
                }
                "byte_toks" if !s.byte_toks => {
                    s.byte_toks = true;
                    for b in 0..=255u8 {
                        s.tokens.push(format!("<0x{b:02X}>"));
                        s.scores.push(0.0);
                        s.types.push(6);
                    }
                }
                "gpt2_alphabet" if !s.gpt2_alphabet => {
                    s.gpt2_alphabet = true;
                    for c in gpt2_byte_chars() {
                        s.tokens.push(c.to_string());
                        s.scores.push(0.0);
                        s.types.push(1);
                    }
                }
                "merge" => s.merges.push(format!("{} {}", unescape(arg(0)), unescape(arg(1)))),
                "merge_raw" => s.merges.push(unescape(arg(0))),
                "auto_merges" => s.auto_merges = true,
                "scores" => s.scores_ty = value_type(arg(0)),
                "types" => s.types_ty = value_type(arg(0)),
                "trunc" => {
                    let which = match arg(0) {
                        "tokens" => TOKENS,
                        "scores" => SCORES,
                        "types" => TYPES,
                        "merges" => MERGES,
                        _ => continue,
                    };
                    s.trunc[which] = Some(int(arg(1)) as usize);
                }
                "arr" => {
                    let Some(ty) = value_type(arg(1)) else {
                        continue;
                    };
                    let items = args.iter().skip(2).map(|v| scalar_or_default(ty, v)).collect();
                    s.kvs.push((key(arg(0)), MetadataValue::Array { elem_type: ty, items }));
                }
                "nest" => {
                    let depth = (int(arg(1)) as usize).min(MAX_NEST);
                    let ty = value_type(arg(2)).unwrap_or(ValueType::U8);
                    let items = args.iter().skip(3).map(|v| scalar_or_default(ty, v)).collect();
                    let mut v = MetadataValue::Array { elem_type: ty, items };
                    for _ in 0..depth {
                        v = MetadataValue::Array { elem_type: ValueType::Array, items: vec![v] };
                    }
                    s.kvs.push((key(arg(0)), v));
                }
                "version" => s.version = Some(int(arg(0)) as u32),
                "align" => s.align = Some((int(arg(0)) as u64).min(MAX_ALIGN)),
                "text" if s.texts.len() < MAX_TEXTS => {
                    let mut t = unescape(&args.join(" "));
                    let mut end = t.len().min(MAX_TEXT_BYTES);
                    while !t.is_char_boundary(end) {
                        end -= 1;
                    }
                    t.truncate(end);
                    s.texts.push(t);
                }
                "ids" => {
                    let room = MAX_IDS - s.ids.len();
                    s.ids.extend(args.iter().take(room).map(|v| int(v) as u32));
                }
                "flip" if s.flips.len() < MAX_FLIPS => {
                    s.flips.push((int(arg(0)) as usize, int(arg(1)) as u8));
                }
                ty => {
                    if let Some(v) = value_type(ty).and_then(|ty| scalar(ty, arg(1))) {
                        s.kvs.push((key(arg(0)), v));
                    }
                }
            }
        }
        s
    }

    fn build(mut self) -> Case {
        if self.auto_merges {
            self.merges.extend(splits_into_tokens(&self.tokens));
        }
        let mut w = GgufWriter::new();
        if let Some(v) = self.version {
            w.version(v);
        }
        if let Some(a) = self.align {
            w.alignment(a);
        }
        let explicit: Vec<String> = self.kvs.iter().map(|(k, _)| k.clone()).collect();
        for (k, v) in self.kvs {
            w.add_metadata(k, v);
        }
        let cut = |i: usize, n: usize| self.trunc[i].map_or(n, |t| t.min(n));
        let mut generated: Vec<(&str, MetadataValue)> = Vec::new();
        if !self.tokens.is_empty() {
            let n = cut(TOKENS, self.tokens.len());
            generated.push(("tokens", MetadataValue::str_array(self.tokens[..n].iter().cloned())));
            if let Some(ty) = self.scores_ty {
                let n = cut(SCORES, self.scores.len());
                let items = self.scores[..n].iter().map(|&x| from_f32(ty, x)).collect();
                generated.push(("scores", MetadataValue::Array { elem_type: ty, items }));
            }
            if let Some(ty) = self.types_ty {
                let n = cut(TYPES, self.types.len());
                let items = self.types[..n]
                    .iter()
                    .map(|&x| match ty {
                        t if t.is_integer() => from_int(t, x.into()),
                        t => from_f32(t, x as f32),
                    })
                    .collect();
                generated.push(("token_type", MetadataValue::Array { elem_type: ty, items }));
            }
        }
        if !self.merges.is_empty() {
            let n = cut(MERGES, self.merges.len());
            generated.push(("merges", MetadataValue::str_array(self.merges[..n].iter().cloned())));
        }
        for (k, v) in generated {
            let k = key(k);
            if !explicit.contains(&k) {
                w.add_metadata(k, v);
            }
        }
        let mut gguf = w.to_bytes();
        let len = gguf.len();
        for (pos, byte) in self.flips {
            gguf[pos % len] = byte; // never empty: the header alone is 24 bytes
        }
        Case { gguf, texts: self.texts, ids: self.ids }
    }
}

/// `KEY`, or `tokenizer.ggml.KEY` for a key without a dot.
fn key(k: &str) -> String {
    if k.contains('.') {
        unescape(k)
    } else {
        format!("tokenizer.ggml.{}", unescape(k))
    }
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('s') => out.push(' '),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('x') => {
                let mut v = 0u32;
                for _ in 0..2 {
                    match chars.peek().and_then(|c| c.to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d;
                            chars.next();
                        }
                        None => break,
                    }
                }
                out.push(char::from_u32(v).unwrap_or('\u{FFFD}'));
            }
            Some('u') => {
                if chars.peek() == Some(&'{') {
                    chars.next();
                }
                let mut v = 0u32;
                while let Some(d) = chars.peek().and_then(|c| c.to_digit(16)) {
                    v = v.saturating_mul(16).saturating_add(d);
                    chars.next();
                }
                if chars.peek() == Some(&'}') {
                    chars.next();
                }
                out.push(char::from_u32(v).unwrap_or('\u{FFFD}'));
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// An integer, wrapped into whatever type it is cast to; garbage is 0.
fn int(s: &str) -> i128 {
    s.parse().unwrap_or(0)
}

fn value_type(name: &str) -> Option<ValueType> {
    use ValueType::*;
    Some(match name {
        "u8" => U8,
        "i8" => I8,
        "u16" => U16,
        "i16" => I16,
        "u32" => U32,
        "i32" => I32,
        "u64" => U64,
        "i64" => I64,
        "f32" => F32,
        "f64" => F64,
        "bool" => Bool,
        "str" => String,
        _ => return None,
    })
}

/// `v` as a value of type `ty`, if it reads as one.
fn scalar(ty: ValueType, v: &str) -> Option<MetadataValue> {
    use MetadataValue as V;
    Some(match ty {
        ValueType::F32 => V::F32(v.parse().ok()?),
        ValueType::F64 => V::F64(v.parse().ok()?),
        ValueType::Bool => match v {
            "true" | "1" => V::Bool(true),
            "false" | "0" => V::Bool(false),
            _ => return None,
        },
        ValueType::String => V::String(unescape(v)),
        ValueType::Array => return None,
        t => from_int(t, v.parse().ok()?),
    })
}

fn scalar_or_default(ty: ValueType, v: &str) -> MetadataValue {
    scalar(ty, v).unwrap_or_else(|| from_int(ty, 0))
}

/// `x` wrapped into an integer type (and 0 / "0" / false for the others).
fn from_int(ty: ValueType, x: i128) -> MetadataValue {
    use MetadataValue as V;
    match ty {
        ValueType::U8 => V::U8(x as u8),
        ValueType::I8 => V::I8(x as i8),
        ValueType::U16 => V::U16(x as u16),
        ValueType::I16 => V::I16(x as i16),
        ValueType::U32 => V::U32(x as u32),
        ValueType::I32 => V::I32(x as i32),
        ValueType::U64 => V::U64(x as u64),
        ValueType::I64 => V::I64(x as i64),
        ValueType::F32 => V::F32(x as f32),
        ValueType::F64 => V::F64(x as f64),
        ValueType::Bool => V::Bool(x != 0),
        ValueType::String => V::String(x.to_string()),
        // not produced: value_type() never names it
        ValueType::Array => V::Array { elem_type: ValueType::U8, items: Vec::new() },
    }
}

fn from_f32(ty: ValueType, x: f32) -> MetadataValue {
    match ty {
        ValueType::F32 => MetadataValue::F32(x),
        ValueType::F64 => MetadataValue::F64(x.into()),
        ValueType::String => MetadataValue::String(x.to_string()),
        t => from_int(t, x as i128),
    }
}

/// GPT-2's byte alphabet: printable bytes stand for themselves, the others for U+0100 on.
fn gpt2_byte_chars() -> Vec<char> {
    let mut next = 256u32;
    (0..=255u32)
        .map(|b| {
            let printable = (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
            let cp = if printable {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(cp).unwrap_or('\u{FFFD}')
        })
        .collect()
}

/// "A B" for every token that is the concatenation of two tokens A and B, by token order.
fn splits_into_tokens(tokens: &[String]) -> Vec<String> {
    let set: std::collections::HashSet<&str> = tokens.iter().map(String::as_str).collect();
    let mut out = Vec::new();
    for t in tokens {
        for (i, _) in t.char_indices().skip(1) {
            let (a, b) = t.split_at(i);
            if set.contains(a) && set.contains(b) {
                out.push(format!("{a} {b}"));
            }
        }
    }
    out
}
