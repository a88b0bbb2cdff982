//! SentencePiece-style (`llama`) vocabularies: llama.cpp's SPM merge by score, with byte
//! fallback.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::{keys, Tokenizer, TokenizerError};
use crate::gguf::{Gguf, GgufError};

/// `tokenizer.ggml.scores`: f32 (or, as llama.cpp also accepts, i32) per token.
pub(super) fn read_scores(g: &Gguf, n: usize) -> Result<Option<Vec<f32>>, TokenizerError> {
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
    /// llama.cpp's llm_tokenizer_spm_session::tokenize, on text already escaped.
    pub(super) fn spm(&self, text: &str, out: &mut Vec<u32>) -> Result<(), TokenizerError> {
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
