//! Structured output: a grammar (a JSON schema, a regular expression or a Lark grammar) turned
//! into the set of tokens allowed at each step of a generation, through llguidance.
//!
//! - [`Constrainer`] is made once per tokenizer: the token trie llguidance walks (every token's
//!   bytes; control tokens marked so that no grammar matches them as text) and its limits.
//! - [`Constrainer::compile`] turns a [`Grammar`] into a [`Constraint`], the state of one
//!   generation: [`Constraint::mask`] gives the allowed tokens as a bitset (one bit a token,
//!   32 tokens a word, as the GPU's masked top-k reads it), [`Constraint::accept`] moves past a
//!   token, [`Constraint::forced`] gives the tokens the grammar leaves no choice about, which the
//!   generation feeds without sampling (fast-forward).
//! - [`Guide`] is what a generation is steered by: an optional constraint and a logit bias.
//!
//! A constrained reply ends where the grammar is complete, or where it may end and the model
//! takes an end-of-generation token (the mask allows those only there).
//!
//! Nothing here is native-only: llguidance is built without rayon, so this runs in wasm too.

pub mod gbnf;

use crate::tokenizer::Tokenizer;
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use std::sync::Arc;
use toktrie::{InferenceCapabilities, SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use web_time::Instant;

/// What a reply must match.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A JSON schema (llguidance's subset: draft 2020-12 less a few keywords; an unsupported
    /// keyword is an error, not ignored).
    JsonSchema(serde_json::Value),
    /// A regular expression (Rust `regex` syntax) the whole reply matches.
    Regex(String),
    /// A Lark-style grammar (llguidance's dialect; `start` is the top rule).
    Lark(String),
    /// A llama.cpp GBNF grammar (`root` is the top rule), read as Lark ([`gbnf::to_lark`]).
    Gbnf(String),
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        // replies as models write JSON ("a": 1, "b": 2) and nothing else between the tokens:
        // flexible whitespace would let a sampled model emit newlines until max_tokens
        let json = |mut schema: serde_json::Value| {
            let opts = llguidance::JsonCompileOptions { item_separator: ", ".into(), key_separator: ": ".into(), whitespace_flexible: false, ..Default::default() };
            if schema.is_object() {
                opts.apply_to(&mut schema);
            }
            TopLevelGrammar::from_json_schema(schema)
        };
        match self {
            Grammar::JsonObject => json(serde_json::json!({"type": "object"})),
            Grammar::JsonSchema(s) => json(s.clone()),
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
            // converted (and checked) by compile before this
            Grammar::Gbnf(g) => TopLevelGrammar::from_lark(gbnf::to_lark(g).unwrap_or_default()),
        }
    }
}

/// A request field that cannot be used: which one (its dotted path) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// The field, as a dotted path (`response_format.json_schema.schema`).
    pub param: String,
    /// What is wrong with it.
    pub message: String,
}

/// What kind of JSON value `v` is, as error messages name it ("a string", "a list", ...).
pub fn json_type_name(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

impl Grammar {
    /// OpenAI's `response_format` (the server's and the browser's): None for absent, null or
    /// `{"type": "text"}`; `json_object`: any JSON object; `json_schema`: `{"name", "schema",
    /// "strict"}` (the schema is enforced whether or not `strict` is set; an absent schema
    /// allows any JSON value).
    pub fn from_response_format(rf: Option<&serde_json::Value>) -> Result<Option<Grammar>, FieldError> {
        use serde_json::Value;
        let bad = |param: &str, message: String| Err(FieldError { param: param.to_string(), message });
        const P: &str = "response_format";
        let rf = match rf {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(rf)) => rf,
            Some(v) => return bad(P, format!("'{P}' must be an object, got {}", json_type_name(v))),
        };
        let field = |o: &'_ serde_json::Map<String, Value>, k: &str| o.get(k).filter(|v| !v.is_null()).cloned();
        match rf.get("type") {
            Some(Value::String(t)) if t == "text" => Ok(None),
            Some(Value::String(t)) if t == "json_object" => Ok(Some(Grammar::JsonObject)),
            Some(Value::String(t)) if t == "json_schema" => {
                let p = "response_format.json_schema";
                let js = match field(rf, "json_schema") {
                    Some(Value::Object(js)) => js,
                    Some(v) => return bad(p, format!("'{p}' must be an object, got {}", json_type_name(&v))),
                    None => return bad(p, format!("'{p}' is required for type json_schema: {{\"name\", \"schema\", \"strict\"}}")),
                };
                let name = format!("{p}.name");
                match js.get("name") {
                    Some(Value::String(n)) if !n.is_empty() && n.len() <= 64 && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') => {}
                    Some(Value::String(n)) => return bad(&name, format!("'{name}' must be 1 to 64 letters, digits, '_' or '-', got {n:?}")),
                    Some(v) => return bad(&name, format!("'{name}' must be a string, got {}", json_type_name(v))),
                    None => return bad(&name, format!("'{name}' is required")),
                }
                if let Some(v) = field(&js, "strict").filter(|v| !v.is_boolean()) {
                    let strict = format!("{p}.strict");
                    return bad(&strict, format!("'strict' must be a boolean, got {}", json_type_name(&v)));
                }
                match field(&js, "schema") {
                    None => Ok(Some(Grammar::JsonSchema(serde_json::json!({})))),
                    Some(s @ (Value::Object(_) | Value::Bool(true))) => Ok(Some(Grammar::JsonSchema(s))),
                    Some(v) => bad(&format!("{p}.schema"), format!("'{p}.schema' must be a JSON schema object, got {}", json_type_name(&v))),
                }
            }
            Some(Value::String(t)) => bad(P, format!("response_format type '{t}' is not supported: use 'text', 'json_object' or 'json_schema'")),
            _ => bad(P, format!("'{P}' must have a string 'type': 'text', 'json_object' or 'json_schema'")),
        }
    }
}

/// The bounds every compiled grammar runs under, so that a pathological schema or grammar is
/// refused (or stops with an error) rather than taking unbounded time or memory.
pub fn limits() -> ParserLimits {
    ParserLimits {
        // lexer states cost 1-2 kB each: 50,000 keeps one request under about 100 MB
        max_lexer_states: 50_000,
        // symbols in the grammar's productions: a schema of a few hundred kB
        max_grammar_size: 200_000,
        // about 20 ms of building the lexer (llguidance's measure: 50k a ms)
        initial_lexer_fuel: 1_000_000,
        // per token: about 10 ms of lexing and 2.5 ms of parsing at most
        step_lexer_fuel: 150_000,
        step_max_items: 50_000,
        max_items_in_row: 2_000,
        precompute_large_lexemes: true,
        // errors go to clients: the grammar and the tokens so far are not theirs to read back
        verbose_errors: false,
    }
}

/// The tokenizer as llguidance sees it: the token trie, and our own tokenizer for the text the
/// grammar forces (byte-level BPE tokenizes any piece of text canonically; SentencePiece's
/// space prefix does not, so there llguidance tokenizes forced text greedily over the trie).
struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
    canonical: bool,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<u32> {
        match std::str::from_utf8(s) {
            Ok(text) if self.canonical => self.tokenizer.encode(text, false, false).unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            _ => self.trie.greedy_tokenize(s),
        }
    }

    fn tokenize_is_canonical(&self) -> bool {
        self.canonical
    }
}

/// Compiles grammars for one tokenizer. Made once per model (it walks the whole vocabulary).
pub struct Constrainer {
    factory: ParserFactory,
    end: u32,
    /// Every end-of-generation token (sorted): where the grammar may end, the model may end
    /// with any of them (a chat model ends its turn with `<|im_end|>`, not `<|endoftext|>`).
    eog: Arc<[u32]>,
}

/// Why a grammar was refused: the message names the problem (for a 400 or the command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConstraintError(pub String);

impl std::fmt::Display for ConstraintError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConstraintError {}

impl Constrainer {
    /// Prepares structured output over `tokenizer`'s vocabulary (a trie of every token's bytes: it
    /// takes a moment, so build one per model and keep it).
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Constrainer, ConstraintError> {
        let n = tokenizer.vocab_size();
        let end =
            tokenizer.eot().or(tokenizer.eos()).ok_or_else(|| ConstraintError("the tokenizer has no end-of-turn or EOS token to end a constrained reply with".into()))?;
        // control tokens start with llguidance's marker byte, so no grammar matches them as text
        let words: Vec<Vec<u8>> = (0..n as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                if tokenizer.is_control(id) || tokenizer.is_eog(id) {
                    let mut marked = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    marked.extend_from_slice(&bytes);
                    marked
                } else {
                    bytes
                }
            })
            .collect();
        let info = TokRxInfo {
            vocab_size: n as u32,
            tok_eos: end,
            tok_bos: tokenizer.bos(),
            tok_pad: tokenizer.pad(),
            tok_unk: tokenizer.unk(),
            tok_end_of_turn: tokenizer.eot(),
        };
        let canonical = tokenizer.model() == "gpt2";
        let eog: Arc<[u32]> = tokenizer.eot_ids().into();
        let env: TokEnv = Arc::new(Env { trie: TokTrie::from(&info, &words), tokenizer, canonical });
        let caps = InferenceCapabilities { ff_tokens: true, conditional_ff_tokens: false, backtrack: false, fork: false };
        let mut factory = ParserFactory::new(&env, caps, &llguidance::earley::SlicedBiasComputer::general_slices()).map_err(|e| ConstraintError(e.to_string()))?;
        factory.quiet();
        *factory.limits_mut() = limits();
        Ok(Constrainer { factory, end, eog })
    }

    /// The token a constrained reply ends with.
    pub fn end_token(&self) -> u32 {
        self.end
    }

    /// The state of one generation under `grammar`, or why the grammar cannot be used (it does
    /// not parse, names an unsupported keyword, or is over the limits).
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, ConstraintError> {
        if let Grammar::Gbnf(g) = grammar {
            gbnf::to_lark(g).map_err(|e| ConstraintError(format!("GBNF: {e}")))?;
        }
        check_nesting(grammar)?;
        let t = Instant::now();
        let parser = self.factory.create_parser(grammar.top_level()).map_err(|e| ConstraintError(e.to_string()))?;
        let mut matcher = Matcher::new(Ok(parser));
        // the first mask is where a lexer that cannot be built within its fuel shows: here,
        // before the request is accepted, rather than in its first decoding step
        let first = matcher.compute_mask().map_err(|e| ConstraintError(e.to_string()))?;
        if first.is_zero() {
            return Err(ConstraintError("the grammar allows no reply at all".into()));
        }
        Ok(Constraint { matcher, end: self.end, eog: self.eog.clone(), compile_seconds: t.elapsed().as_secs_f64(), first: Some(first) })
    }
}

/// How deeply a JSON schema may nest (JSON levels: serde_json's own parsing limit) and a
/// regular expression its groups: llguidance compiles them recursively, and a schema 400 levels
/// deep overflows a 2 MB thread stack, which aborts the process. Lark grammars have their own
/// limit in llguidance.
pub const MAX_SCHEMA_DEPTH: usize = 128;
/// How deeply a regular expression's groups may nest (see [`MAX_SCHEMA_DEPTH`]).
pub const MAX_REGEX_DEPTH: usize = 100;

fn check_nesting(grammar: &Grammar) -> Result<(), ConstraintError> {
    match grammar {
        Grammar::JsonSchema(v) => {
            // iterative, so that the check itself cannot overflow
            let mut stack = vec![(v, 1usize)];
            while let Some((v, depth)) = stack.pop() {
                if depth > MAX_SCHEMA_DEPTH {
                    return Err(ConstraintError(format!("the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")));
                }
                match v {
                    serde_json::Value::Array(a) => stack.extend(a.iter().map(|x| (x, depth + 1))),
                    serde_json::Value::Object(o) => stack.extend(o.values().map(|x| (x, depth + 1))),
                    _ => {}
                }
            }
            Ok(())
        }
        Grammar::Regex(rx) => {
            let (mut depth, mut most, mut escaped, mut in_class) = (0usize, 0usize, false, false);
            for c in rx.chars() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '[' => in_class = true,
                    ']' => in_class = false,
                    '(' if !in_class => {
                        depth += 1;
                        most = most.max(depth);
                    }
                    ')' if !in_class => depth = depth.saturating_sub(1),
                    _ => {}
                }
            }
            if most > MAX_REGEX_DEPTH {
                return Err(ConstraintError(format!("the regular expression nests groups deeper than {MAX_REGEX_DEPTH} levels")));
            }
            Ok(())
        }
        Grammar::JsonObject | Grammar::Lark(_) | Grammar::Gbnf(_) => Ok(()),
    }
}

/// One generation's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
    end: u32,
    eog: Arc<[u32]>,
    /// How long [`Constrainer::compile`] took (the parser and the first mask).
    pub compile_seconds: f64,
    /// The first mask, computed while compiling.
    first: Option<SimpleVob>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("end", &self.end).field("stopped", &self.matcher.is_stopped()).finish_non_exhaustive()
    }
}

/// The tokens allowed at one step: bit `id % 32` of word `id / 32`; ids past the words are not
/// allowed (a model's vocabulary can be padded past its tokenizer's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenMask {
    /// The bits, 32 tokens a word.
    pub words: Vec<u32>,
}

impl TokenMask {
    /// Whether token `id` is allowed.
    pub fn allows(&self, id: u32) -> bool {
        self.words.get(id as usize / 32).is_some_and(|w| w >> (id % 32) & 1 == 1)
    }

    /// How many tokens are allowed.
    pub fn count(&self) -> usize {
        self.words.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// The allowed ids, lowest first.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| (0..32).filter(move |b| w >> b & 1 == 1).map(move |b| i as u32 * 32 + b))
    }

    /// Sets every disallowed logit to -inf.
    pub fn apply(&self, logits: &mut [f32]) {
        for (i, l) in logits.iter_mut().enumerate() {
            if !self.allows(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

impl Constraint {
    /// The tokens allowed next. An error when the grammar is in a state with none (a token
    /// that did not fit was accepted) or a step ran out of its limits.
    pub fn mask(&mut self) -> Result<TokenMask, ConstraintError> {
        let mut words = if self.matcher.is_stopped() {
            vec![0u32; self.end as usize / 32 + 1]
        } else {
            let vob = match self.first.take() {
                Some(v) => v,
                None => self.matcher.compute_mask().map_err(|e| ConstraintError(e.to_string()))?,
            };
            if vob.is_zero() {
                return Err(ConstraintError("the grammar allows no token here".into()));
            }
            vob.as_slice().to_vec()
        };
        let ends = self.matcher.is_stopped() || words.get(self.end as usize / 32).is_some_and(|w| w >> (self.end % 32) & 1 == 1);
        if ends {
            for &id in self.eog.iter().chain([&self.end]) {
                if let Some(w) = words.get_mut(id as usize / 32) {
                    *w |= 1 << (id % 32);
                }
            }
        }
        Ok(TokenMask { words })
    }

    /// Moves past `id` (sampled under the last mask, or forced).
    pub fn accept(&mut self, id: u32) -> Result<(), ConstraintError> {
        self.first = None;
        if self.is_end(id) && self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher.consume_token(id).map_err(|e| ConstraintError(e.to_string()))
    }

    /// The tokens the grammar forces next (none when there is a choice), already accepted:
    /// the caller feeds them without sampling.
    pub fn forced(&mut self) -> Vec<u32> {
        if self.matcher.is_stopped() {
            return Vec::new();
        }
        let ff = self.matcher.consume_ff_tokens();
        if !ff.is_empty() {
            self.first = None;
        }
        ff
    }

    /// Whether the reply is complete: the grammar allows nothing more.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Whether `id` is a token that ends a constrained reply (the mask allows them only where
    /// the grammar can end).
    pub fn is_end(&self, id: u32) -> bool {
        id == self.end || self.eog.binary_search(&id).is_ok()
    }
}

/// What a generation is steered by besides its sampler: a grammar and a logit bias (OpenAI's
/// `logit_bias`: added to the token's logit before sampling), and whether it records
/// log-probabilities.
#[derive(Debug, Default)]
pub struct Guide {
    /// The grammar the reply must fit, if any.
    pub constraint: Option<Constraint>,
    /// (token id, bias) pairs added to those tokens' logits before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// Some(n): record each generated token's log-probability and the n most likely tokens'
    /// (OpenAI's `logprobs` / `top_logprobs`) into `logprobs`. The model's distribution, logit
    /// bias included and grammar left out; every logit is read back, and forced tokens are
    /// stepped one by one so that each has its own.
    pub top_logprobs: Option<usize>,
    /// Filled with each generated token's log-probabilities when `top_logprobs` is set.
    pub logprobs: Vec<TokenLogprob>,
    /// Time spent computing masks (seconds), for the benchmark and the server's log.
    pub mask_seconds: f64,
}

/// A generated token's log-probability, with the most likely tokens' at that step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token generated.
    pub id: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, highest first.
    pub top: Vec<(u32, f32)>,
}

impl TokenLogprob {
    /// log Σ exp(logits) (NaN left out): `log p(i) = logits[i] - this`.
    pub fn log_sum_exp(logits: &[f32]) -> f64 {
        let max = logits.iter().copied().filter(|x| !x.is_nan()).fold(f32::NEG_INFINITY, f32::max) as f64;
        if max == f64::NEG_INFINITY {
            return max;
        }
        max + logits.iter().filter(|x| !x.is_nan()).map(|&x| (x as f64 - max).exp()).sum::<f64>().ln()
    }

    /// The n most likely tokens' log-probabilities (highest first, the lower id first on ties).
    pub fn top(logits: &[f32], n: usize, lse: f64) -> Vec<(u32, f32)> {
        crate::reference::top_k(logits, n).into_iter().map(|(i, l)| (i as u32, (l as f64 - lse) as f32)).collect()
    }
}

impl Guide {
    /// Whether it steers nothing (no grammar, no bias, no log-probabilities): plain sampling.
    pub fn is_empty(&self) -> bool {
        self.constraint.is_none() && self.logit_bias.is_empty() && self.top_logprobs.is_none()
    }

    /// A guide with only `constraint`.
    pub fn with_constraint(constraint: Constraint) -> Guide {
        Guide { constraint: Some(constraint), ..Guide::default() }
    }
}
