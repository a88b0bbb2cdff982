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
//! pre-tokenizers outside [`PRE_TYPES`] (an error names the ones known), and the strip-space
//! attributes llama.cpp gives special tokens of a few models by name (Phi-3, Jina, ModernBERT).
//! The regexes run on fancy-regex, which is pure Rust, so all of this builds for wasm32.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;

use aho_corasick::AhoCorasick;
use fancy_regex::{Regex, RegexBuilder};
use thiserror::Error;
use tokenizers::models::bpe::BPE;
use tokenizers::Model;

use crate::gguf::{Gguf, GgufError};

/// Metadata keys read here.
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
}

impl From<GgufError> for TokenizerError {
    fn from(e: GgufError) -> Self {
        match e {
            GgufError::MissingKey { key } => TokenizerError::MissingKey { key },
            e => TokenizerError::Metadata(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers: llama.cpp's regexes per `tokenizer.ggml.pre` (llm_tokenizer_bpe's constructor)
// ---------------------------------------------------------------------------------------------

const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str =
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Clone, Copy, Debug)]
struct PreSpec {
    /// Applied in order, each splitting every piece into its matches and the text between.
    regexes: &'static [&'static str],
    /// A whole piece that is a token is that token, merges or not (llama.cpp's ignore_merges).
    ignore_merges: bool,
    /// llama.cpp's default for add_bos (tokenizer.ggml.add_bos_token overrides it).
    add_bos: bool,
    /// llama.cpp's clean_spaces: detokenizing drops spaces before ?!., and some apostrophes.
    clean_spaces: bool,
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
const PRE_TYPES: &[(&str, PreSpec)] = &[
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

fn pre_spec(name: &str) -> Option<PreSpec> {
    let name = if name.is_empty() { "default" } else { name };
    PRE_TYPES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// Regexes get a far higher backtracking budget than fancy-regex's default: on the patterns
/// above backtracking grows with runs of whitespace, and failing is worse than working longer.
const BACKTRACK_LIMIT: usize = 100_000_000;

// ---------------------------------------------------------------------------------------------
// Token names llama.cpp recognizes (llama_vocab::impl::load)
// ---------------------------------------------------------------------------------------------

const EOT_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];
const EOM_NAMES: &[&str] = &["<|eom_id|>"];
const FIM_PRE_NAMES: &[&str] = &["<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>", "<|code_prefix|>", "<|prefix|>"];
const FIM_SUF_NAMES: &[&str] = &["<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>", "<|code_suffix|>", "<|suffix|>"];
const FIM_MID_NAMES: &[&str] = &["<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>", "<|code_middle|>", "<|middle|>"];
const FIM_PAD_NAMES: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_NAMES: &[&str] = &["<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"];
const FIM_SEP_NAMES: &[&str] = &["<|file_sep|>"];
/// Tokens that end generation, whatever the metadata says.
const EOG_NAMES: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];
/// gpt-oss: always rendered, so made user-defined.
const ALWAYS_RENDERED: &[&str] = &["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"];

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

/// Reads a special token id: the key's value when it names a token, else `default` (llama.cpp
/// ignores ids beyond the vocabulary, and so does this).
fn special_id(g: &Gguf, key: &str, n: usize, default: Option<u32>) -> Result<Option<u32>, TokenizerError> {
    let default = default.filter(|&d| (d as usize) < n);
    match g.get_u32_opt(key) {
        Ok(Some(id)) if (id as usize) < n => Ok(Some(id)),
        Ok(_) | Err(GgufError::ValueOutOfRange { .. }) => Ok(default),
        Err(e) => Err(e.into()),
    }
}

/// `tokenizer.ggml.scores`: f32 (or, as llama.cpp also accepts, i32) per token.
fn read_scores(g: &Gguf, n: usize) -> Result<Option<Vec<f32>>, TokenizerError> {
    let scores = match g.get_f32_array_opt(keys::SCORES) {
        Ok(s) => s,
        Err(GgufError::WrongMetadataType { .. }) => g.get_i32_array_opt(keys::SCORES)?.map(|v| v.into_iter().map(|x| x as f32).collect()),
        Err(e) => return Err(e.into()),
    };
    if let Some(s) = &scores {
        if s.len() < n {
            return Err(TokenizerError::LengthMismatch { key: keys::SCORES, len: s.len(), n_tokens: n });
        }
    }
    Ok(scores)
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
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let fragments = self.partition(text, parse_special);
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

    /// llama.cpp's token_to_piece.
    fn piece(&self, id: u32, special: bool) -> Cow<'_, [u8]> {
        let Some(text) = self.texts.get(id as usize) else {
            return Cow::Borrowed(&[]);
        };
        let attr = self.attrs[id as usize];
        if !special && attr & (ATTR_UNKNOWN | ATTR_CONTROL) != 0 {
            return Cow::Borrowed(&[]);
        }
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
            return Cow::Borrowed(text.as_bytes());
        }
        if attr & ATTR_NORMAL != 0 {
            return match self.kind {
                Kind::Spm => Cow::Owned(text.replace('\u{2581}', " ").into_bytes()),
                Kind::Bpe { .. } => Cow::Owned(byte_level_decode(text)),
            };
        }
        if attr & ATTR_BYTE != 0 {
            return Cow::Owned(vec![byte_of_byte_token(text)]);
        }
        Cow::Borrowed(&[])
    }

    pub fn vocab_size(&self) -> usize {
        self.texts.len()
    }

    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    pub fn unk(&self) -> Option<u32> {
        self.unk
    }

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

    pub fn add_eos(&self) -> bool {
        self.add_eos
    }

    /// Every id that ends a turn or a generation (llama.cpp's end-of-generation set), sorted:
    /// EOS, EOT, EOM, the FIM pad/repo/separator tokens, and the tokens named like
    /// `<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`, `<|endoftext|>`, `</s>`, ...
    pub fn eot_ids(&self) -> Vec<u32> {
        self.eog.clone()
    }

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

    /// llama.cpp's tokenizer_st_partition: cuts special tokens out of the text.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut fragments = vec![Fragment::Text(0..text.len())];
        let Some(finder) = &self.special_finder else {
            return fragments;
        };
        // a token that is nowhere in the text is in no fragment of it
        let mut present = vec![false; self.special.len()];
        for m in finder.find_overlapping_iter(text) {
            present[m.pattern().as_usize()] = true;
        }
        for (k, &id) in self.special.iter().enumerate() {
            if !present[k] {
                continue;
            }
            if !parse_special && self.attrs[id as usize] & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let pattern = self.texts[id as usize].as_str();
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                let Fragment::Text(r) = f else {
                    next.push(f);
                    continue;
                };
                let mut start = r.start;
                while let Some(at) = text[start..r.end].find(pattern) {
                    let at = start + at;
                    if at > start {
                        next.push(Fragment::Text(start..at));
                    }
                    next.push(Fragment::Token(id));
                    start = at + pattern.len();
                }
                if start < r.end {
                    next.push(Fragment::Text(start..r.end));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// llama.cpp's llm_tokenizer_spm_session::tokenize, on text already escaped.
    fn spm(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
        let mut syms: Vec<Symbol> =
            text.char_indices().enumerate().map(|(i, (start, c))| Symbol { start, len: c.len_utf8(), prev: i as isize - 1, next: i as isize + 1 }).collect();
        let Some(last) = syms.last_mut() else {
            return Ok(());
        };
        last.next = -1;

        let mut queue = BinaryHeap::new();
        let try_add = |syms: &[Symbol], queue: &mut BinaryHeap<Bigram>, left: isize, right: isize| {
            if left < 0 || right < 0 {
                return;
            }
            let (l, r) = (syms[left as usize], syms[right as usize]);
            let merged = &text[l.start..l.start + l.len + r.len];
            if let Some(&id) = self.ids.get(merged) {
                queue.push(Bigram { score: self.scores[id as usize], left: left as usize, right: right as usize, size: merged.len() });
            }
        };
        for i in 1..syms.len() as isize {
            try_add(&syms, &mut queue, i - 1, i);
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (syms[b.left], syms[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue; // one side was merged since
            }
            syms[b.left].len += r.len;
            syms[b.right].len = 0;
            syms[b.left].next = r.next;
            if r.next >= 0 {
                syms[r.next as usize].prev = b.left as isize;
            }
            let (prev, next) = (syms[b.left].prev, syms[b.left].next);
            try_add(&syms, &mut queue, prev, b.left as isize);
            try_add(&syms, &mut queue, b.left as isize, next);
        }

        let mut i = 0isize;
        while i >= 0 {
            let s = syms[i as usize];
            let piece = &text[s.start..s.start + s.len];
            // a merged symbol is always a token; a lone character may not be
            match self.ids.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        out.push(self.byte_token(b)?);
                    }
                }
            }
            i = s.next;
        }
        Ok(())
    }

    /// SentencePiece byte fallback: `<0xXX>`, else the byte itself as a token.
    fn byte_token(&self, b: u8) -> Result<u32, TokenizerError> {
        let hex = format!("<0x{b:02X}>");
        if let Some(&id) = self.ids.get(hex.as_str()) {
            return Ok(id);
        }
        if b.is_ascii() {
            if let Some(&id) = self.ids.get((b as char).encode_utf8(&mut [0; 4]) as &str) {
                return Ok(id);
            }
        }
        Err(TokenizerError::NoByteToken { byte: b })
    }
}

/// The special token ids of the metadata, with llama.cpp's defaults.
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    eot: Option<u32>,
    eom: Option<u32>,
    unk: Option<u32>,
    pad: Option<u32>,
    fim_pre: Option<u32>,
    fim_suf: Option<u32>,
    fim_mid: Option<u32>,
    fim_pad: Option<u32>,
    fim_rep: Option<u32>,
    fim_sep: Option<u32>,
}

impl SpecialIds {
    fn read(g: &Gguf, n: usize, spm: bool) -> Result<SpecialIds, TokenizerError> {
        let (bos, eos, unk) = if spm { (Some(1), Some(2), Some(0)) } else { (Some(11), Some(11), None) };
        let id = |key, default| special_id(g, key, n, default);
        // the deprecated FIM keys are read last, so they win
        let (fim_pre, fim_suf, fim_mid) = (id(keys::FIM_PRE_ID, None)?, id(keys::FIM_SUF_ID, None)?, id(keys::FIM_MID_ID, None)?);
        Ok(SpecialIds {
            bos: id(keys::BOS_ID, bos)?,
            eos: id(keys::EOS_ID, eos)?,
            eot: id(keys::EOT_ID, None)?,
            eom: id(keys::EOM_ID, None)?,
            unk: id(keys::UNK_ID, unk)?,
            pad: id(keys::PAD_ID, None)?,
            fim_pre: id(keys::PREFIX_ID, fim_pre)?,
            fim_suf: id(keys::SUFFIX_ID, fim_suf)?,
            fim_mid: id(keys::MIDDLE_ID, fim_mid)?,
            fim_pad: id(keys::FIM_PAD_ID, None)?,
            fim_rep: id(keys::FIM_REP_ID, None)?,
            fim_sep: id(keys::FIM_SEP_ID, None)?,
        })
    }

    /// llama.cpp's fix-ups by token text, which change `attrs`, and its end-of-generation set
    /// (sorted).
    fn end_of_generation(&mut self, ids: &HashMap<String, u32>, texts: &[String], attrs: &mut [u16]) -> Vec<u32> {
        // Special tokens the metadata does not name are found by their text, and made control
        // tokens. (llama.cpp walks a hash map here, so where several names match it takes any
        // one of them; this takes the lowest id.)
        let find = |names: &[&str]| names.iter().filter_map(|t| ids.get(*t).copied()).min();
        for (slot, names) in [
            (&mut self.eot, EOT_NAMES),
            (&mut self.eom, EOM_NAMES),
            (&mut self.fim_pre, FIM_PRE_NAMES),
            (&mut self.fim_suf, FIM_SUF_NAMES),
            (&mut self.fim_mid, FIM_MID_NAMES),
            (&mut self.fim_pad, FIM_PAD_NAMES),
            (&mut self.fim_rep, FIM_REP_NAMES),
            (&mut self.fim_sep, FIM_SEP_NAMES),
        ] {
            if slot.is_none() {
                if let Some(id) = find(names) {
                    *slot = Some(id);
                    attrs[id as usize] |= ATTR_CONTROL;
                }
            }
        }
        for (i, text) in texts.iter().enumerate() {
            if attrs[i] & ATTR_CONTROL != 0 && text.contains("unused") {
                attrs[i] |= ATTR_UNUSED;
            }
        }
        let mut eog: BTreeSet<u32> = [self.fim_pad, self.fim_rep, self.fim_sep].into_iter().flatten().collect();
        for name in EOG_NAMES {
            if let Some(&id) = ids.get(*name) {
                eog.insert(id);
                attrs[id as usize] |= ATTR_CONTROL;
            }
        }
        for name in ALWAYS_RENDERED {
            if let Some(&id) = ids.get(*name) {
                attrs[id as usize] = ATTR_USER_DEFINED;
            }
        }
        eog.extend([self.eos, self.eot, self.eom].into_iter().flatten());
        let in_eog = |eog: &BTreeSet<u32>, name: &str| ids.get(name).filter(|id| eog.contains(id)).copied();
        // gpt-oss and solar-open: <|end|> does not end generation when <|return|>/<|call|> do
        let has_call = in_eog(&eog, "<|call|>").or(in_eog(&eog, "<|calls|>")).is_some();
        if let Some(end) = in_eog(&eog, "<|end|>") {
            let has_return = in_eog(&eog, "<|return|>").is_some();
            let has_flush = in_eog(&eog, "<|flush|>").is_some();
            if has_call && (has_return || has_flush) {
                eog.remove(&end);
                attrs[end as usize] = ATTR_USER_DEFINED;
            }
        }
        // gemma4 and paddleocr: </s> is not an end-of-generation token there
        if let (Some(_), Some(s)) = (in_eog(&eog, "<|tool_response>"), in_eog(&eog, "</s>")) {
            eog.remove(&s);
            attrs[s as usize] = ATTR_NORMAL;
        }
        eog.into_iter().collect()
    }
}

/// `tokenizer.ggml.merges`, checked: "left right", both sides and their concatenation tokens.
/// A merge repeated later keeps its first rank, as in llama.cpp.
fn read_merges(g: &Gguf, ids: &HashMap<String, u32>) -> Result<Vec<(String, String)>, TokenizerError> {
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
fn bpe(model: &BPE, splitters: &[Regex], text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
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

#[derive(Clone, Debug)]
enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

#[derive(Clone, Copy, Debug)]
struct Symbol {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

/// A candidate SPM merge: the highest score pops first, then the leftmost.
#[derive(Debug)]
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl Ord for Bigram {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.partial_cmp(&other.score).unwrap_or(Ordering::Equal).then_with(|| other.left.cmp(&self.left))
    }
}

impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Bigram {}

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
fn byte_level_decode(text: &str) -> Vec<u8> {
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

/// The byte of a `<0xXX>` token (strtol on the two hex digits, as llama.cpp).
fn byte_of_byte_token(text: &str) -> u8 {
    let digits = text.get(3..5).unwrap_or("");
    let mut v = 0u8;
    for c in digits.chars() {
        match c.to_digit(16) {
            Some(d) => v = v.wrapping_mul(16).wrapping_add(d as u8),
            None => break,
        }
    }
    v
}

fn strip_space(piece: &[u8], strip: bool) -> &[u8] {
    match piece {
        [b' ', rest @ ..] if strip => rest,
        _ => piece,
    }
}

/// llama.cpp's clean_up_tokenization_spaces, in place, pass for pass.
fn clean_spaces(t: &mut Vec<u8>) {
    // first pass: " ?", " !", " .", " ," lose their space
    let n = t.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = t[i];
        if t[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        t[total] = x;
        total += 1;
    }
    // second pass: " ' " becomes "'"
    let n = total;
    total = usize::from(n > 0);
    let mut i = 1;
    while i < n {
        let x = t[i];
        if x == b'\'' && i + 1 < n && t[i - 1] == b' ' && t[i + 1] == b' ' {
            total -= 1;
            i += 1;
            t[i] = 0;
        }
        t[total] = x;
        total += 1;
        i += 1;
    }
    // third pass: " 's", " 'm", " 're", " 've" lose their space
    let n = total;
    total = usize::from(n > 0);
    for i in 1..n {
        let x = t[i];
        if t[i - 1] == b' ' && x == b'\'' && i + 1 < n {
            let x1 = t[i + 1];
            if x1 == b's' || x1 == b'm' {
                total -= 1;
            } else if i + 2 < n {
                let x2 = t[i + 2];
                if (x1 == b'r' || x1 == b'v') && x2 == b'e' {
                    total -= 1;
                }
            }
        }
        t[total] = x;
        total += 1;
    }
    t.truncate(total);
}

/// Whether `clean_spaces(a + b) == clean_spaces(a) + clean_spaces(b)` for every `b`: each pass
/// looks at most two bytes ahead of an apostrophe and one ahead of a space.
fn clean_cut_ok(a: &[u8]) -> bool {
    !matches!(a, [] | [.., b' ' | b'\''] | [.., b'\'', _])
}

// ---------------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------------

/// Turns ids, one at a time, into text: each call returns what is newly complete. A UTF-8
/// character split across tokens is held back until its last byte arrives (or, at
/// [`StreamDecoder::finish`], turns into U+FFFD), so no returned piece is ever a broken
/// character, and all pieces together are exactly [`Tokenizer::decode`] of all ids.
///
/// Holds no reference to the tokenizer (so a browser binding can keep both side by side):
/// pass the same one to every call.
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    skip_special: bool,
    started: bool,
    /// Raw bytes waiting for the space clean-up to be sure of them (clean_spaces vocabularies).
    held: Vec<u8>,
    /// Bytes waiting for the rest of a UTF-8 character.
    partial: Vec<u8>,
}

impl StreamDecoder {
    /// `skip_special` as in [`Tokenizer::decode`]. (One difference: a vocabulary that adds EOS
    /// has decode drop a final EOS, which a stream cannot know is final; EOS is a control token,
    /// rendering as nothing with `skip_special`, in every vocabulary seen so far.)
    pub fn new(skip_special: bool) -> StreamDecoder {
        StreamDecoder { skip_special, ..StreamDecoder::default() }
    }

    /// The text that `id` completes (often empty while a character is incomplete).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        let first = !self.started;
        self.started = true;
        if first && self.skip_special && tokenizer.add_bos && Some(id) == tokenizer.bos {
            return String::new(); // dropped, and the next token keeps its leading space
        }
        let piece = tokenizer.piece(id, !self.skip_special);
        let piece = strip_space(&piece, first && tokenizer.add_space_prefix);
        if tokenizer.clean_spaces {
            self.held.extend_from_slice(piece);
            if clean_cut_ok(&self.held) {
                let mut cleaned = std::mem::take(&mut self.held);
                clean_spaces(&mut cleaned);
                self.partial.extend_from_slice(&cleaned);
            }
        } else {
            self.partial.extend_from_slice(piece);
        }
        self.take_text(false)
    }

    /// Everything still held: the end of the text.
    pub fn finish(&mut self) -> String {
        if !self.held.is_empty() {
            let mut cleaned = std::mem::take(&mut self.held);
            clean_spaces(&mut cleaned);
            self.partial.extend_from_slice(&cleaned);
        }
        self.take_text(true)
    }

    /// The complete characters in `partial` (U+FFFD for invalid bytes, as from_utf8_lossy),
    /// leaving an incomplete last character unless `flush`.
    fn take_text(&mut self, flush: bool) -> String {
        let mut out = String::new();
        let mut rest: &[u8] = &self.partial;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            rest = &after[bad..];
                        }
                        None if flush => {
                            out.push('\u{FFFD}');
                            rest = &[];
                            break;
                        }
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.partial = rest.to_vec();
        out
    }
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
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Tokenizer>();
        check::<StreamDecoder>();
    }

    #[test]
    fn byte_tokens() {
        assert_eq!(byte_of_byte_token("<0x0A>"), 10);
        assert_eq!(byte_of_byte_token("<0xff>"), 255);
        assert_eq!(byte_of_byte_token("<0xZ1>"), 0);
    }

    #[test]
    fn every_pre_tokenizer_regex_compiles() {
        for (name, spec) in PRE_TYPES {
            for re in spec.regexes {
                Regex::new(re).unwrap_or_else(|e| panic!("{name}: {re}: {e}"));
            }
        }
    }

    fn cleaned(s: &str) -> String {
        let mut v = s.as_bytes().to_vec();
        clean_spaces(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn clean_spaces_as_llama_cpp() {
        assert_eq!(cleaned("Hi , there . Yes ! Why ?"), "Hi, there. Yes! Why?");
        assert_eq!(cleaned("He said ' hello ' and"), "He said'hello'and");
        assert_eq!(cleaned("it 's I 'm we 're they 've I 'll don 't"), "it's I'm we're they've I 'll don 't");
        assert_eq!(cleaned(" ?"), "?");
        assert_eq!(cleaned("a ' ' b"), "a'' b");
        assert_eq!(cleaned(""), "");
    }

    /// Splitting a text at cuts that clean_cut_ok accepts never changes the clean-up.
    #[test]
    fn clean_spaces_streams() {
        let alphabet = b" 'smrevt?.,!a";
        let mut state = 0x9E3779B97F4A7C15u64;
        let mut rand = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        for _ in 0..20_000 {
            let len = rand(12);
            let text: Vec<u8> = (0..len).map(|_| alphabet[rand(alphabet.len())]).collect();
            let mut whole = text.clone();
            clean_spaces(&mut whole);
            // stream it in random chunks, cleaning at each acceptable cut
            let mut out = Vec::new();
            let mut held = Vec::new();
            let mut i = 0;
            while i < text.len() {
                let step = 1 + rand(3);
                held.extend_from_slice(&text[i..(i + step).min(text.len())]);
                i += step;
                if clean_cut_ok(&held) {
                    clean_spaces(&mut held);
                    out.append(&mut held);
                }
            }
            clean_spaces(&mut held);
            out.append(&mut held);
            assert_eq!(out, whole, "{:?}", String::from_utf8_lossy(&text));
        }
    }
}
