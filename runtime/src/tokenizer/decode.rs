//! Detokenizing: a token's piece, llama.cpp's clean-up of spaces, and [`StreamDecoder`].

use std::borrow::Cow;

use super::bpe::byte_level_decode;
use super::{Kind, Tokenizer, ATTR_BYTE, ATTR_CONTROL, ATTR_NORMAL, ATTR_UNKNOWN, ATTR_USER_DEFINED};

impl Tokenizer {
    /// llama.cpp's token_to_piece.
    pub(super) fn piece(&self, id: u32, special: bool) -> Cow<'_, [u8]> {
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

pub(super) fn strip_space(piece: &[u8], strip: bool) -> &[u8] {
    match piece {
        [b' ', rest @ ..] if strip => rest,
        _ => piece,
    }
}

/// llama.cpp's clean_up_tokenization_spaces, in place, pass for pass.
pub(super) fn clean_spaces(t: &mut Vec<u8>) {
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
    fn byte_tokens() {
        assert_eq!(byte_of_byte_token("<0x0A>"), 10);
        assert_eq!(byte_of_byte_token("<0xff>"), 255);
        assert_eq!(byte_of_byte_token("<0xZ1>"), 0);
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
