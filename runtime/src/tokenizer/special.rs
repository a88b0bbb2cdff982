//! Special tokens: the token names llama.cpp recognizes, the special token ids of the metadata
//! with its defaults and fix-ups, and cutting special tokens out of a text before tokenizing.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use super::{keys, Tokenizer, TokenizerError, ATTR_CONTROL, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_UNUSED, ATTR_USER_DEFINED};
use crate::gguf::{Gguf, GgufError};

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

/// The special token ids of the metadata, with llama.cpp's defaults.
pub(super) struct SpecialIds {
    pub(super) bos: Option<u32>,
    pub(super) eos: Option<u32>,
    pub(super) eot: Option<u32>,
    eom: Option<u32>,
    pub(super) unk: Option<u32>,
    pub(super) pad: Option<u32>,
    fim_pre: Option<u32>,
    fim_suf: Option<u32>,
    fim_mid: Option<u32>,
    fim_pad: Option<u32>,
    fim_rep: Option<u32>,
    fim_sep: Option<u32>,
}

impl SpecialIds {
    pub(super) fn read(g: &Gguf, n: usize, spm: bool) -> Result<SpecialIds, TokenizerError> {
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
    pub(super) fn end_of_generation(&mut self, ids: &HashMap<String, u32>, texts: &[String], attrs: &mut [u16]) -> Vec<u32> {
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

#[derive(Clone, Debug)]
pub(super) enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

impl Tokenizer {
    /// Whether `parse_special` decides on this token (control and unknown tokens; user-defined
    /// ones are always cut out).
    pub(super) fn parse_special_governs(&self, id: u32) -> bool {
        self.attrs[id as usize] & (ATTR_CONTROL | ATTR_UNKNOWN) != 0
    }

    /// llama.cpp's tokenizer_st_partition: cuts special tokens out of the text, longest first
    /// (ties by id), each where it stands whole in text no longer token cut out before it, from
    /// the left. A token that `parse_special` governs is not cut out where its text would cover a
    /// byte offset of `literal` (sorted): that character is plain text.
    ///
    /// Each occurrence is found once (one pass of the matcher over the text) and taken or left
    /// by rank; where a text holds more overlapping occurrences than [`MAX_OCCURRENCES_PER_BYTE`]
    /// a byte (tokens that contain one another, over and over), it cuts token by token instead.
    pub(super) fn partition(&self, text: &str, parse_special: bool, literal: &[usize]) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let Some(finder) = &self.special_finder else {
            return vec![Fragment::Text(0..text.len())];
        };
        let most = text.len().saturating_mul(MAX_OCCURRENCES_PER_BYTE).max(4096);
        // (rank in `special`, start) of every occurrence of a token that may be cut out
        let mut found: Vec<(usize, usize)> = Vec::new();
        for m in finder.find_overlapping_iter(text) {
            let k = m.pattern().as_usize();
            if (parse_special || !self.parse_special_governs(self.special[k])) && !m.is_empty() {
                found.push((k, m.start()));
                if found.len() > most {
                    return self.partition_by_passes(text, parse_special, literal);
                }
            }
        }
        found.sort_unstable();
        // what is cut out so far: start -> (end, token)
        let mut cut: std::collections::BTreeMap<usize, (usize, u32)> = std::collections::BTreeMap::new();
        for (k, at) in found {
            let id = self.special[k];
            let end = at + self.texts[id as usize].len();
            if self.parse_special_governs(id) && covers_literal(literal, at..end) {
                continue;
            }
            if cut.range(..end).next_back().is_some_and(|(_, &(cut_end, _))| cut_end > at) {
                continue;
            }
            cut.insert(at, (end, id));
        }
        let mut fragments = Vec::with_capacity(2 * cut.len() + 1);
        let mut start = 0;
        for (at, (end, id)) in cut {
            if at > start {
                fragments.push(Fragment::Text(start..at));
            }
            fragments.push(Fragment::Token(id));
            start = end;
        }
        if start < text.len() {
            fragments.push(Fragment::Text(start..text.len()));
        }
        fragments
    }

    /// [`Tokenizer::partition`] as llama.cpp writes it: a pass over the text's fragments for
    /// each token present, cutting it out where it stands whole. For texts whose occurrences are
    /// too many to list; [`Tokenizer::partition`] gives the same fragments (a test compares them).
    pub(super) fn partition_by_passes(&self, text: &str, parse_special: bool, literal: &[usize]) -> Vec<Fragment> {
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
            let pattern = self.texts[id as usize].as_str();
            if !present[k] || pattern.is_empty() {
                continue;
            }
            let governed = self.parse_special_governs(id);
            if !parse_special && governed {
                continue;
            }
            let covers_literal = |at: usize| governed && covers_literal(literal, at..at + pattern.len());
            let mut next = Vec::with_capacity(fragments.len() + 2);
            for f in fragments {
                let Fragment::Text(r) = f else {
                    next.push(f);
                    continue;
                };
                let mut start = r.start;
                let mut search = r.start;
                while let Some(at) = text[search..r.end].find(pattern) {
                    let at = search + at;
                    if covers_literal(at) {
                        // plain text here; look again from the next character
                        search = at + pattern.chars().next().map_or(1, char::len_utf8);
                        continue;
                    }
                    if at > start {
                        next.push(Fragment::Text(start..at));
                    }
                    next.push(Fragment::Token(id));
                    start = at + pattern.len();
                    search = start;
                }
                if start < r.end {
                    next.push(Fragment::Text(start..r.end));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// The fragments special tokens cut `text` into (`Ok(token)` or `Err(text)`), one pass
    /// over the text or (`by_passes`) llama.cpp's pass per token: for tests.
    #[doc(hidden)]
    pub fn fragments(&self, text: &str, parse_special: bool, literal: &[usize], by_passes: bool) -> Vec<Result<u32, Range<usize>>> {
        let f = if by_passes { self.partition_by_passes(text, parse_special, literal) } else { self.partition(text, parse_special, literal) };
        f.into_iter()
            .map(|f| match f {
                Fragment::Token(id) => Ok(id),
                Fragment::Text(r) => Err(r),
            })
            .collect()
    }
}

/// Whether `range` holds one of the byte offsets in `literal` (sorted).
fn covers_literal(literal: &[usize], range: Range<usize>) -> bool {
    literal.get(literal.partition_point(|&p| p < range.start)).is_some_and(|&p| p < range.end)
}

/// How many overlapping special-token occurrences a byte of text may hold before
/// [`Tokenizer::partition`] stops listing them (16 bytes each) and cuts token by token.
const MAX_OCCURRENCES_PER_BYTE: usize = 4;
