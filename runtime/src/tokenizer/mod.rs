//! Text to token ids and back, built from a GGUF file's own tokenizer metadata
//! (`tokenizer.ggml.*`), reproducing llama.cpp's tokenizer (`src/llama-vocab.cpp`) id for id.
//!
//! Two vocabulary kinds, by `tokenizer.ggml.model`:
//! - `llama`, SentencePiece-style (Llama 1/2, Mistral, Gemma): llama.cpp's "SPM" tokenizer.
//!   Spaces become U+2581 (`▁`); text that starts the input or follows a special token gets a
//!   `▁` prefix when `tokenizer.ggml.add_space_prefix` (default true, Gemma 3 sets false). Then
//!   adjacent pieces merge, highest `tokenizer.ggml.scores` first and leftmost among equal
//!   scores, as long as the merged text is a token; a character that ends up in no token
//!   becomes its `<0xXX>` byte tokens. This is done here directly: neither model of the
//!   `tokenizers` crate reproduces it (its BPE ranks merges by pair, so equal scores would not
//!   break ties by position; its Unigram is a different algorithm).
//! - `gpt2`, byte-level BPE (GPT-2, Llama 3, Qwen 2, SmolLM): the text is split by the regexes
//!   of llama.cpp's pre-tokenizer type `tokenizer.ggml.pre`, each piece's bytes are mapped to
//!   GPT-2's byte alphabet and merged by `tokenizer.ggml.merges` rank with the `tokenizers`
//!   crate's `BPE` model, whose merge order (lowest rank, then leftmost) is llama.cpp's.
//!
//! Before either, special tokens are cut out of the text as llama.cpp does: control and unknown
//! tokens (`token_type` 3 and 2) only when `parse_special` is asked for, user-defined tokens
//! (type 4, e.g. Gemma's whitespace runs and HTML tags) always; longest token first, each
//! matched at every non-overlapping occurrence, left to right.
//!
//! Decoding follows `llama_detokenize`: a token's piece ([`Tokenizer::token_bytes`]) is its
//! text with `▁` turned back into spaces (SPM), its GPT-2 byte alphabet mapped back to bytes
//! (BPE), the byte of a `<0xXX>` token, or a special token's text; one leading space is dropped
//! when the vocabulary adds a space prefix; and vocabularies whose pre-tokenizer llama.cpp marks
//! `clean_spaces` (GPT-2, Llama 3) get its clean-up of spaces before punctuation. Decoding works
//! on bytes: one token may hold part of a UTF-8 character, which [`StreamDecoder`] reassembles.
//!
//! llama.cpp behaviour this module copies on purpose, although it may surprise: tokens named
//! like end-of-turn markers (`<|im_end|>`, `<end_of_turn>`, `</s>`, ...) become control tokens
//! even where the file says otherwise (so Gemma 3's `</s>`, a user-defined token in the file,
//! ends generation and is only parsed with `parse_special`), and a vocabulary with two tokens
//! of the same text is refused.
//!
//! Not covered: llama.cpp's other vocabulary types (`bert`, `t5`, `rwkv`, `plamo2`, `gemma4`),
//! pre-tokenizers outside `PRE_TYPES` (an error names the ones known), and the strip-space
//! attributes llama.cpp gives special tokens of a few models by name (Phi-3, Jina, ModernBERT).
//! The regexes run on fancy-regex, which is pure Rust, so all of this builds for wasm32.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;

use aho_corasick::AhoCorasick;
use fancy_regex::{Regex, RegexBuilder};
use thiserror::Error;
use tokenizers::models::bpe::BPE;

use crate::gguf::{Gguf, GgufError};

mod bpe;
mod decode;
mod special;
mod spm;

use bpe::{bpe, pre_spec, read_merges, BACKTRACK_LIMIT, PRE_TYPES};
pub use decode::StreamDecoder;
use decode::{clean_spaces, strip_space};
use special::{Fragment, SpecialIds};
use spm::read_scores;

/// Metadata keys read here.
#[allow(missing_docs)] // each constant's value is the GGUF key it stands for
pub mod keys {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const SCORES: &str = "tokenizer.ggml.scores";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const ADD_EOS: &str = "tokenizer.ggml.add_eos_token";
    pub const ADD_SPACE_PREFIX: &str = "tokenizer.ggml.add_space_prefix";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    pub const EOM_ID: &str = "tokenizer.ggml.eom_token_id";
    pub const UNK_ID: &str = "tokenizer.ggml.unknown_token_id";
    pub const PAD_ID: &str = "tokenizer.ggml.padding_token_id";
    pub const FIM_PRE_ID: &str = "tokenizer.ggml.fim_pre_token_id";
    pub const FIM_SUF_ID: &str = "tokenizer.ggml.fim_suf_token_id";
    pub const FIM_MID_ID: &str = "tokenizer.ggml.fim_mid_token_id";
    pub const FIM_PAD_ID: &str = "tokenizer.ggml.fim_pad_token_id";
    pub const FIM_REP_ID: &str = "tokenizer.ggml.fim_rep_token_id";
    pub const FIM_SEP_ID: &str = "tokenizer.ggml.fim_sep_token_id";
    // deprecated spellings of the first three FIM keys; llama.cpp reads them last
    pub const PREFIX_ID: &str = "tokenizer.ggml.prefix_token_id";
    pub const SUFFIX_ID: &str = "tokenizer.ggml.suffix_token_id";
    pub const MIDDLE_ID: &str = "tokenizer.ggml.middle_token_id";
}

/// `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
#[allow(missing_docs)] // the values are llama.cpp's, named as there
pub mod token_type {
    pub const UNDEFINED: i32 = 0;
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

// llama.cpp's llama_token_attr bits (the ones its tokenizer looks at).
const ATTR_UNKNOWN: u16 = 1 << 0;
const ATTR_UNUSED: u16 = 1 << 1;
const ATTR_NORMAL: u16 = 1 << 2;
const ATTR_CONTROL: u16 = 1 << 3;
const ATTR_USER_DEFINED: u16 = 1 << 4;
const ATTR_BYTE: u16 = 1 << 5;

fn attr_of_type(t: i32) -> u16 {
    match t {
        token_type::NORMAL => ATTR_NORMAL,
        token_type::UNKNOWN => ATTR_UNKNOWN,
        token_type::CONTROL => ATTR_CONTROL,
        token_type::USER_DEFINED => ATTR_USER_DEFINED,
        token_type::UNUSED => ATTR_UNUSED,
        token_type::BYTE => ATTR_BYTE,
        _ => 0, // undefined: decodes to nothing, like llama.cpp
    }
}

/// Why a tokenizer could not be built, or a text not encoded.
#[derive(Debug, Error)]
#[non_exhaustive]
#[allow(missing_docs)] // each variant's #[error] message says what it means and names its fields
pub enum TokenizerError {
    #[error("the GGUF file has no usable tokenizer: metadata key '{key}' is missing")]
    MissingKey { key: String },

    /// A key of the wrong type, or an id that does not fit.
    #[error("tokenizer metadata: {0}")]
    Metadata(GgufError),

    #[error("tokenizer.ggml.model is '{model}'; nomoat reads 'llama' (SentencePiece) and 'gpt2' (byte-level BPE) vocabularies")]
    UnsupportedModel { model: String },

    #[error("tokenizer.ggml.pre is '{pre}', a pre-tokenizer nomoat does not know (it knows {})", PRE_TYPES.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))]
    UnknownPreTokenizer { pre: String },

    #[error("tokenizer.ggml.tokens is empty")]
    EmptyVocab,

    #[error("{key} has {len} entries but tokenizer.ggml.tokens has {n_tokens}")]
    LengthMismatch { key: &'static str, len: usize, n_tokens: usize },

    #[error("tokens {first} and {second} are both {text:?}")]
    DuplicateToken { text: String, first: u32, second: u32 },

    #[error("tokenizer.ggml.merges[{index}] = {merge:?}: {reason}")]
    BadMerge { index: usize, merge: String, reason: String },

    #[error("{add_key} is true but {id_key} names no token")]
    MissingSpecialToken { add_key: &'static str, id_key: &'static str },

    #[error("the byte 0x{byte:02X} has no token: the vocabulary has neither <0x{byte:02X}> nor the byte itself")]
    NoByteToken { byte: u8 },

    /// The pre-tokenizer's regex gave up (its backtracking limit): never seen on real text.
    #[error("pre-tokenizer regex failed: {0}")]
    Regex(String),

    #[error("BPE model: {0}")]
    Bpe(String),

    /// More control, user-defined and unknown tokens than [`MAX_SPECIAL_TOKENS`]: every one is
    /// looked for in every text.
    #[error("the vocabulary has {count} special (control, user-defined or unknown) tokens, over the {max} allowed")]
    TooManySpecialTokens { count: usize, max: usize },

    /// A special token longer than [`MAX_SPECIAL_TOKEN_BYTES`].
    #[error("special token {id} is {len} bytes long, over the {max} allowed")]
    SpecialTokenTooLong { id: u32, len: usize, max: usize },

    /// Special tokens whose texts add up to more than [`MAX_SPECIAL_TEXT_BYTES`].
    #[error("the special tokens' texts add up to {bytes} bytes, over the {max} allowed")]
    SpecialTextTooLarge { bytes: usize, max: usize },
}

/// The most special tokens (control, user-defined, unknown) a vocabulary may have; every one is
/// looked for in every text. Real vocabularies have a few dozen to a few thousand (Gemma 3:
/// 6,414).
pub const MAX_SPECIAL_TOKENS: usize = 1 << 15;
/// The longest special token, in bytes (Gemma 3's longest is 31).
pub const MAX_SPECIAL_TOKEN_BYTES: usize = 256;
/// The special tokens' texts in all, in bytes (Gemma 3's: 77 KB). They make the matcher that
/// finds them in a text, whose size grows with theirs.
pub const MAX_SPECIAL_TEXT_BYTES: usize = 1 << 20;

impl From<GgufError> for TokenizerError {
    fn from(e: GgufError) -> Self {
        match e {
            GgufError::MissingKey { key } => TokenizerError::MissingKey { key },
            e => TokenizerError::Metadata(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The tokenizer
// ---------------------------------------------------------------------------------------------

enum Kind {
    Spm,
    Bpe { model: Box<BPE>, splitters: Vec<Regex> },
}

/// A GGUF file's tokenizer. Cheap to share (`&Tokenizer` is all encoding and decoding need).
pub struct Tokenizer {
    kind: Kind,
    model: String,
    pre: String,
    texts: Vec<String>,
    scores: Vec<f32>,
    attrs: Vec<u16>,
    ids: HashMap<String, u32>,
    /// Tokens cut out of text before tokenizing (control, user-defined, unknown), longest first.
    special: Vec<u32>,
    /// Finds which of `special` occur in a text (pattern i is `special[i]`).
    special_finder: Option<AhoCorasick>,
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model)
            .field("pre", &self.pre)
            .field("vocab_size", &self.texts.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("add_space_prefix", &self.add_space_prefix)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file describes. Nothing here panics on a malformed file:
    /// every problem is a [`TokenizerError`].
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, TokenizerError> {
        let model = g.get_str(keys::MODEL)?;
        let spm = match model {
            "llama" => true,
            "gpt2" => false,
            other => return Err(TokenizerError::UnsupportedModel { model: other.to_string() }),
        };
        let pre_name = g.get_str_opt(keys::PRE)?.unwrap_or("");
        let pre = if spm { None } else { Some(pre_spec(pre_name).ok_or_else(|| TokenizerError::UnknownPreTokenizer { pre: pre_name.to_string() })?) };

        let raw_texts = g.get_str_array(keys::TOKENS)?;
        let n = raw_texts.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }
        let scores_in = read_scores(g, n)?;
        let types = g.get_i32_array_opt(keys::TOKEN_TYPE)?;
        if let Some(t) = &types {
            if t.len() < n {
                return Err(TokenizerError::LengthMismatch { key: keys::TOKEN_TYPE, len: t.len(), n_tokens: n });
            }
        }

        let mut texts = Vec::with_capacity(n);
        let mut ids: HashMap<String, u32> = HashMap::with_capacity(n);
        let mut attrs = Vec::with_capacity(n);
        for (i, raw) in raw_texts.iter().enumerate() {
            let i = i as u32; // n <= MAX_ARRAY_ELEMENTS
            let text = if raw.is_empty() { format!("[EMPTY_{i}]") } else { raw.to_string() };
            match ids.entry(text.clone()) {
                Entry::Occupied(e) => return Err(TokenizerError::DuplicateToken { text, first: *e.get(), second: i }),
                Entry::Vacant(e) => {
                    e.insert(i);
                }
            }
            texts.push(text);
            attrs.push(types.as_ref().map_or(ATTR_NORMAL, |t| attr_of_type(t[i as usize])));
        }
        let scores = match scores_in {
            Some(mut s) => {
                s.truncate(n);
                s
            }
            None => vec![0.0; n],
        };

        let (mut add_bos, mut add_eos, mut add_space_prefix, clean_spaces) = match &pre {
            None => (true, false, true, false),
            Some(p) => (p.add_bos, false, false, p.clean_spaces),
        };
        if let Some(v) = g.get_bool_opt(keys::ADD_SPACE_PREFIX)? {
            add_space_prefix = v;
        }
        if let Some(v) = g.get_bool_opt(keys::ADD_BOS)? {
            add_bos = v;
        }
        if let Some(v) = g.get_bool_opt(keys::ADD_EOS)? {
            add_eos = v;
        }

        let mut sp = SpecialIds::read(g, n, spm)?;
        if add_bos && sp.bos.is_none() {
            return Err(TokenizerError::MissingSpecialToken { add_key: keys::ADD_BOS, id_key: keys::BOS_ID });
        }
        if add_eos && sp.eos.is_none() {
            return Err(TokenizerError::MissingSpecialToken { add_key: keys::ADD_EOS, id_key: keys::EOS_ID });
        }
        let eog = sp.end_of_generation(&ids, &texts, &mut attrs);

        // the special-token cache: longest text first (ties by id; llama.cpp's order among
        // equal lengths is unspecified, and matters only for overlapping same-length tokens)
        let mut special: Vec<u32> = (0..n as u32).filter(|&i| attrs[i as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0).collect();
        special.sort_by_key(|&i| std::cmp::Reverse(texts[i as usize].len()));
        if special.len() > MAX_SPECIAL_TOKENS {
            return Err(TokenizerError::TooManySpecialTokens { count: special.len(), max: MAX_SPECIAL_TOKENS });
        }
        if let Some(&id) = special.first().filter(|&&id| texts[id as usize].len() > MAX_SPECIAL_TOKEN_BYTES) {
            return Err(TokenizerError::SpecialTokenTooLong { id, len: texts[id as usize].len(), max: MAX_SPECIAL_TOKEN_BYTES });
        }
        let special_bytes: usize = special.iter().map(|&id| texts[id as usize].len()).sum();
        if special_bytes > MAX_SPECIAL_TEXT_BYTES {
            return Err(TokenizerError::SpecialTextTooLarge { bytes: special_bytes, max: MAX_SPECIAL_TEXT_BYTES });
        }
        let special_finder = if special.is_empty() {
            None
        } else {
            Some(AhoCorasick::new(special.iter().map(|&i| texts[i as usize].as_str())).map_err(|e| TokenizerError::Regex(format!("special-token matcher: {e}")))?)
        };

        let kind = match pre {
            None => Kind::Spm,
            Some(p) => {
                let merges = read_merges(g, &ids)?;
                let model = BPE::builder()
                    .vocab_and_merges(ids.iter().map(|(t, &id)| (t.clone(), id)).collect::<tokenizers::models::bpe::Vocab>(), merges)
                    .ignore_merges(p.ignore_merges)
                    .build()
                    .map_err(|e| TokenizerError::Bpe(e.to_string()))?;
                let splitters = p
                    .regexes
                    .iter()
                    .map(|re| RegexBuilder::new(re).backtrack_limit(BACKTRACK_LIMIT).build().map_err(|e| TokenizerError::Regex(format!("{re}: {e}"))))
                    .collect::<Result<Vec<_>, _>>()?;
                Kind::Bpe { model: Box::new(model), splitters }
            }
        };

        Ok(Tokenizer {
            kind,
            model: model.to_string(),
            pre: pre_name.to_string(),
            texts,
            scores,
            attrs,
            ids,
            special,
            special_finder,
            bos: sp.bos,
            eos: sp.eos,
            eot: sp.eot,
            unk: sp.unk,
            pad: sp.pad,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
        })
    }

    /// Text to ids. `add_special`: add BOS and EOS where the metadata asks for them
    /// (`tokenizer.ggml.add_bos_token` / `add_eos_token`). `parse_special`: control tokens
    /// written in the text (`<|im_start|>`, `<start_of_turn>`) become those tokens rather than
    /// being tokenized as text; user-defined tokens are always recognized.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>, TokenizerError> {
        self.encode_marked(text, add_special, parse_special, &[])
    }

    /// [`Tokenizer::encode`] with `parse_special`, except where a control (or unknown) token's
    /// text would cover one of the byte offsets in `literal`: there the characters stay text.
    /// A chat prompt marks what the conversation's messages put into the template's text this
    /// way, so that text from a message never becomes a control token. `literal` must be sorted.
    pub fn encode_with_literal(&self, text: &str, add_special: bool, literal: &[usize]) -> Result<Vec<u32>, TokenizerError> {
        self.encode_marked(text, add_special, true, literal)
    }

    /// The byte ranges of `text` holding the text of a token that `parse_special` decides on
    /// (control and unknown tokens), overlapping ones included, in no particular order.
    pub fn find_control_texts(&self, text: &str) -> Vec<std::ops::Range<usize>> {
        let Some(finder) = &self.special_finder else {
            return Vec::new();
        };
        finder.find_overlapping_iter(text).filter(|m| self.parse_special_governs(self.special[m.pattern().as_usize()])).map(|m| m.range()).collect()
    }

    /// The texts of the tokens that `parse_special` decides on (control and unknown tokens).
    pub fn control_texts(&self) -> impl Iterator<Item = &str> + '_ {
        self.special.iter().filter(|&&id| self.parse_special_governs(id)).map(|&id| self.texts[id as usize].as_str())
    }

    fn encode_marked(&self, text: &str, add_special: bool, parse_special: bool, literal: &[usize]) -> Result<Vec<u32>, TokenizerError> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let fragments = self.partition(text, parse_special, literal);
        match &self.kind {
            Kind::Spm => {
                let mut escaped = String::new();
                let mut after_special = true; // the start counts as following a special token
                for f in fragments {
                    match f {
                        Fragment::Token(id) => {
                            out.push(id);
                            after_special = true;
                        }
                        Fragment::Text(r) => {
                            escaped.clear();
                            if self.add_space_prefix && after_special {
                                escaped.push('\u{2581}');
                            }
                            for c in text[r].chars() {
                                escaped.push(if c == ' ' { '\u{2581}' } else { c });
                            }
                            self.spm(&escaped, &mut out)?;
                            after_special = false;
                        }
                    }
                }
            }
            Kind::Bpe { model, splitters } => {
                for f in fragments {
                    match f {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(r) => bpe(model, splitters, &text[r], &mut out)?,
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        Ok(out)
    }

    /// Ids to text, as llama.cpp's `llama_detokenize`: with `skip_special`, control tokens
    /// render as nothing and a leading BOS (trailing EOS) that the metadata adds is dropped;
    /// without it they render as their text. Bytes that are not UTF-8 (a sequence cut short)
    /// become U+FFFD; [`Tokenizer::decode_bytes`] has them as they are.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        String::from_utf8_lossy(&self.decode_bytes(ids, skip_special)).into_owned()
    }

    /// [`Tokenizer::decode`] without the UTF-8 check. Ids beyond the vocabulary render as
    /// nothing.
    pub fn decode_bytes(&self, ids: &[u32], skip_special: bool) -> Vec<u8> {
        let mut ids = ids;
        let mut remove_space = self.add_space_prefix;
        if skip_special && self.add_bos && matches!((ids.first(), self.bos), (Some(&f), Some(b)) if f == b) {
            remove_space = false;
            ids = &ids[1..];
        }
        if skip_special && self.add_eos && matches!((ids.last(), self.eos), (Some(&l), Some(e)) if l == e) {
            ids = &ids[..ids.len() - 1];
        }
        let mut out = Vec::new();
        for &id in ids {
            let piece = self.piece(id, !skip_special);
            out.extend_from_slice(strip_space(&piece, remove_space));
            remove_space = false;
        }
        if self.clean_spaces {
            clean_spaces(&mut out);
        }
        out
    }

    /// The bytes one token stands for, special tokens rendered as their text: what
    /// [`Tokenizer::decode_bytes`] concatenates (before its first-space and clean-up rules).
    /// A piece may be part of a UTF-8 character (byte tokens, byte-level BPE).
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        self.piece(id, true).into_owned()
    }

    /// The number of tokens in the vocabulary (ids are 0 to this, exclusive).
    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the model has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// The token that stands for text the vocabulary cannot spell, if the model has one.
    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

    /// The padding token, if the model names one.
    pub fn pad(&self) -> Option<u32> {
        self.pad
    }

    /// The end-of-turn token: `tokenizer.ggml.eot_token_id`, else one named like `<|im_end|>`,
    /// `<end_of_turn>`, `<|eot_id|>`, `<|endoftext|>`.
    pub fn eot(&self) -> Option<u32> {
        self.eot
    }

    /// Whether `encode(.., add_special = true, ..)` starts with BOS / ends with EOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether `encode(.., add_special = true, ..)` ends with EOS.
    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Every id that ends a turn or a generation (llama.cpp's end-of-generation set), sorted:
    /// EOS, EOT, EOM, the FIM pad/repo/separator tokens, and the tokens named like
    /// `<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, `<|endoftext|>`, `</s>`, ...
    pub fn eot_ids(&self) -> Vec<u32> {
        self.eog.clone()
    }

    /// Whether `id` ends a turn or a generation (one of [`Tokenizer::eot_ids`]).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// A control token (BOS, EOS, `<|im_start|>`, `<start_of_turn>`, ...): rendered only when
    /// decoding without `skip_special`.
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs.get(id as usize).is_some_and(|a| a & ATTR_CONTROL != 0)
    }

    /// The token's text as the file stores it (`▁` for spaces, GPT-2's byte alphabet, `<0x0A>`
    /// for byte tokens; an empty one reads `[EMPTY_<id>]`, as in llama.cpp); "" for an id
    /// beyond the vocabulary.
    pub fn token_text(&self, id: u32) -> &str {
        self.texts.get(id as usize).map_or("", String::as_str)
    }

    /// The id of the token whose text (as the file stores it) is `text`.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// `tokenizer.ggml.model`: "llama" or "gpt2".
    pub fn model(&self) -> &str {
        &self.model
    }

    /// `tokenizer.ggml.pre` ("" when absent).
    pub fn pre(&self) -> &str {
        &self.pre
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_offsets_keep_control_tokens_as_text() {
        let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/tiny/llama-tiny.gguf")).unwrap();
        let tok = Tokenizer::from_gguf(&crate::gguf::Gguf::parse(&bytes).unwrap()).unwrap();
        let end = tok.token_id("<|im_end|>").unwrap();
        let text = "a<|im_end|>b<|im_end|>";
        assert_eq!(tok.encode_with_literal(text, false, &[]).unwrap(), tok.encode(text, false, true).unwrap());
        // an offset anywhere inside the first token's text keeps it text; the second is a token
        for at in [1, 5, 10] {
            let ids = tok.encode_with_literal(text, false, &[at]).unwrap();
            let mut want = tok.encode("a<|im_end|>b", false, false).unwrap();
            want.push(end);
            assert_eq!(ids, want, "offset {at}");
        }
        assert_eq!(tok.encode_with_literal(text, false, &[0, 11]).unwrap(), tok.encode(text, false, true).unwrap(), "offsets outside the tokens");
        assert_eq!(tok.find_control_texts(text), [1..11, 12..22]);
        assert!(tok.control_texts().any(|t| t == "<|im_start|>"));
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
        check::<StreamDecoder>();
    }
}
