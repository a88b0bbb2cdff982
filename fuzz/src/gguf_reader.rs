//! The `gguf_reader` target: arbitrary bytes through every way into the GGUF parser.
//!
//! Nothing may panic, and the ways in must agree with each other:
//! - `Gguf::parse(bytes)` and `Gguf::read_from(bytes, len)` give the same answer;
//! - `Gguf::parse_prefix(bytes)` completes exactly when the header is in `bytes`, and then
//!   `parse` succeeds exactly when `check_file_len(len)` does; a `NeedMore` asks for more bytes
//!   than it got (at most `MAX_HEADER_BYTES`), and `parse` then says `Truncated`;
//! - a header that completes also completes (or asks for more, never fails) from any shorter
//!   prefix, asking for no more than the whole;
//! - metadata written back with `GgufWriter` parses to the same bytes again.
//!
//! On success every accessor runs on every key and tensor.

use std::io::Cursor;

use nomoat_runtime::gguf::{tensor_type_summary, Gguf, GgufError, GgufWriter, Parse, MAX_HEADER_BYTES};

/// Runs `bytes` through the parser's entry points and checks that they agree.
pub fn check(bytes: &[u8]) {
    let len = bytes.len() as u64;
    let whole = Gguf::parse(bytes);
    if let Err(e) = &whole {
        let _ = e.to_string();
    }

    let from_reader = Gguf::read_from(Cursor::new(bytes), len);
    assert_eq!(summary(&whole), summary(&from_reader), "parse and read_from disagree");

    match Gguf::parse_prefix(bytes) {
        Ok(Parse::Complete(g)) => {
            let fits = g.check_file_len(len);
            assert_eq!(fits.is_ok(), whole.is_ok(), "parse_prefix completed but parse says {:?}", whole.as_ref().err());
            if let Ok(w) = &whole {
                assert_eq!(fingerprint(w), fingerprint(&g), "parse and parse_prefix differ");
            }
            exercise(&g, len);
            shorter_prefixes(bytes, &g);
        }
        Ok(Parse::NeedMore { at_least }) => {
            assert!(at_least > bytes.len() && at_least as u64 <= MAX_HEADER_BYTES, "NeedMore {{ at_least: {at_least} }} for a {len}-byte prefix");
            assert!(matches!(whole, Err(GgufError::Truncated { .. })), "parse_prefix wants more bytes but parse says {:?}", whole.as_ref().map(|_| ()));
        }
        Err(e) => {
            let _ = e.to_string();
            assert!(whole.is_err(), "parse_prefix failed ({e}) but parse succeeded");
        }
    }

    // Knowing the file's length changes only what running out of bytes means.
    match Gguf::parse_prefix_of_file(bytes, len) {
        Ok(Parse::Complete(g)) => {
            assert!(whole.is_ok(), "parse_prefix_of_file completed but parse failed");
            exercise(&g, len);
        }
        Ok(Parse::NeedMore { at_least }) => {
            panic!("parse_prefix_of_file wants {at_least} bytes of a {len}-byte file")
        }
        Err(_) => assert!(whole.is_err(), "parse_prefix_of_file failed but parse succeeded"),
    }

    if let Ok(g) = &whole {
        exercise(g, len);
        round_trip(g);
    }
}

/// What two answers must share: the error's variant, or the parsed header.
fn summary(r: &Result<Gguf, GgufError>) -> String {
    match r {
        Ok(g) => fingerprint(g),
        Err(e) => format!("{e}"),
    }
}

/// A comparable rendering of a header (metadata as written bytes, so NaNs compare equal).
fn fingerprint(g: &Gguf) -> String {
    format!("v{} align {} data at {} tensors {:?} metadata {:?}", g.version, g.alignment, g.data_offset, g.tensors, metadata_bytes(g))
}

fn metadata_bytes(g: &Gguf) -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.version(g.version);
    for (k, v) in &g.metadata {
        w.add_metadata(k.clone(), v.clone());
    }
    w.to_bytes()
}

/// Every strictly shorter prefix of a complete header completes to the same header or asks
/// for more (never fails, never asks for more than the whole); a few lengths are tried.
fn shorter_prefixes(bytes: &[u8], full: &Gguf) {
    let header_end = full.data_offset.min(bytes.len() as u64) as usize;
    let mut cuts = vec![0, 4, 8, 16, 24, bytes.len() / 2, header_end.saturating_sub(1)];
    cuts.retain(|&k| k < bytes.len());
    cuts.sort_unstable();
    cuts.dedup();
    for k in cuts {
        match Gguf::parse_prefix(&bytes[..k]) {
            Ok(Parse::Complete(g)) => assert_eq!(fingerprint(&g), fingerprint(full), "the {k}-byte prefix parses differently"),
            Ok(Parse::NeedMore { at_least }) => {
                assert!(at_least > k && at_least <= bytes.len(), "the {k}-byte prefix asks for {at_least} bytes of a complete {}-byte header", bytes.len())
            }
            Err(e) => panic!("the {k}-byte prefix fails ({e}) where the whole parses"),
        }
    }
}

/// Every accessor on every key and tensor; errors are fine, panics are not.
pub fn exercise(g: &Gguf, file_len: u64) {
    let _ = g.check_file_len(file_len);
    let _ = g.check_file_len(0);
    let _ = g.check_file_len(u64::MAX);
    for t in &g.tensors {
        let _ = (t.n_elements(), t.row_len(), t.n_rows(), t.size_bytes());
        let r = g.tensor_data_range(t);
        assert!(r.start <= r.end);
        assert!(g.tensor(&t.name).is_some());
        let _ = (t.ty.name(), t.ty.block_layout(), t.ty.is_supported_by_kernels());
    }
    let _ = tensor_type_summary(g);
    let _ = g.architecture().map_err(|e| e.to_string());
    let _ = g.tensor("");
    let _ = g.get("general.architecture");
    for (key, value) in &g.metadata {
        let _ = format!("{value} {value:?}");
        assert!(g.get(key).is_some());
        let _ = g.get_u32(key).map_err(|e| e.to_string());
        let _ = g.get_u64(key);
        let _ = g.get_i64(key);
        let _ = g.get_f32(key);
        let _ = g.get_str(key);
        let _ = g.get_bool(key);
        let _ = g.get_array(key);
        let _ = g.get_str_array(key).map_err(|e| e.to_string());
        let _ = g.get_f32_array(key);
        let _ = g.get_i32_array(key).map_err(|e| e.to_string());
    }
    let _ = g.get_u32("no.such.key").map_err(|e| e.to_string());
}

/// The metadata written back by `GgufWriter` parses, and writes the same bytes again.
fn round_trip(g: &Gguf) {
    let first = metadata_bytes(g);
    let again = match Gguf::parse(&first) {
        Ok(g2) => g2,
        Err(e) => panic!("written-back metadata does not parse: {e}"),
    };
    assert_eq!(metadata_bytes(&again), first, "metadata changes when written back");
}
