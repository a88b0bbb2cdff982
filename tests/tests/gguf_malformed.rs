//! Corrupt GGUF files, each built from a valid one by one change, must fail with the error
//! that names what is wrong: the variant, and a message naming the key, tensor or offset.

use nomoat_runtime::ggml_type::GgmlType;
use nomoat_runtime::gguf::{Gguf, GgufError, GgufWriter, MetadataValue, Parse, ValueType, MAX_HEADER_BYTES};
use nomoat_tests::support::Rng;

fn base() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama")
        .add_metadata("general.name", "tiny model")
        .add_metadata("test.flag", true)
        .add_metadata("test.count", 7u32)
        .add_metadata("tokenizer.ggml.tokens", MetadataValue::str_array(["<s>", "hello", "world"]))
        .add_metadata("tokenizer.ggml.scores", MetadataValue::f32_array([0.0, -1.0, -2.0]));
    w.add_tensor("token_embd.weight", &[32, 3], GgmlType::Q8_0, vec![1; 3 * 34])
        .add_tensor("blk.0.attn_q.weight", &[256, 2], GgmlType::Q4K, vec![2; 2 * 144])
        .add_tensor("output_norm.weight", &[32], GgmlType::F32, vec![3; 128]);
    w
}

fn base_bytes() -> Vec<u8> {
    base().to_bytes()
}

/// Where `needle` occurs in `bytes`; it must occur exactly once.
fn find(bytes: &[u8], needle: &[u8]) -> usize {
    let hits: Vec<usize> = bytes.windows(needle.len()).enumerate().filter(|(_, w)| *w == needle).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "{:?} occurs {} times", String::from_utf8_lossy(needle), hits.len());
    hits[0]
}

/// Offset of the u32 value type following metadata key `key`.
fn value_type_at(bytes: &[u8], key: &str) -> usize {
    find(bytes, key.as_bytes()) + key.len()
}

/// Offset of the value (after its type) of metadata key `key`.
fn value_at(bytes: &[u8], key: &str) -> usize {
    value_type_at(bytes, key) + 4
}

/// Offsets of a tensor info's fields: (n_dims, first dim, type, data offset).
fn tensor_fields(bytes: &[u8], name: &str) -> (usize, usize, usize, usize) {
    let n_dims_at = find(bytes, name.as_bytes()) + name.len();
    let n_dims = u32::from_le_bytes(bytes[n_dims_at..n_dims_at + 4].try_into().unwrap()) as usize;
    let type_at = n_dims_at + 4 + 8 * n_dims;
    (n_dims_at, n_dims_at + 4, type_at, type_at + 4)
}

fn put_u32(bytes: &mut [u8], at: usize, v: u32) {
    bytes[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put_u64(bytes: &mut [u8], at: usize, v: u64) {
    bytes[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

/// Parses a whole file that must fail; the streaming entry points must agree word for word.
fn fail(bytes: &[u8]) -> GgufError {
    let e = Gguf::parse(bytes).expect_err("a corrupt file parsed");
    let streamed = Gguf::read_from(bytes, bytes.len() as u64).expect_err("read_from accepted a corrupt file");
    assert_eq!(e.to_string(), streamed.to_string());
    let prefixed = Gguf::parse_prefix_of_file(bytes, bytes.len() as u64).expect_err("parse_prefix_of_file accepted it");
    assert_eq!(e.to_string(), prefixed.to_string());
    e
}

/// `expect_err!(bytes, Variant { .. } [if guard], "text the message must contain", ...)`
macro_rules! expect_err {
    ($bytes:expr, $pat:pat $(if $guard:expr)? $(, $mention:expr)* $(,)?) => {{
        let e = fail(&$bytes);
        assert!(matches!(e, $pat $(if $guard)?), "wrong variant: {e:?}");
        let msg = e.to_string();
        $(
            let mention = $mention.to_string();
            assert!(msg.contains(&mention), "message {msg:?} should mention {mention:?}");
        )*
        let _ = msg;
        e
    }};
}

#[test]
fn the_base_file_is_valid() {
    let bytes = base_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.get_str("general.name").unwrap(), "tiny model");
    assert_eq!(g.tensors.len(), 3);
    assert_eq!(Gguf::read_from(bytes.as_slice(), bytes.len() as u64).unwrap(), g);
}

#[test]
fn bad_magic() {
    let mut b = base_bytes();
    b[..4].copy_from_slice(b"GGML");
    let e = expect_err!(b, GgufError::BadMagic { found } if &found == b"GGML", "\"GGML\"", "byte 0");
    assert_eq!(e.to_string(), "not a GGUF file: expected the magic bytes \"GGUF\" at byte 0 but found \"GGML\"");
    let e = expect_err!([0xFFu8, 0, 0x47, 0x47, 0, 0], GgufError::BadMagic { .. });
    assert!(e.to_string().contains("\\xff\\x00GG"), "{e}");
}

#[test]
fn unsupported_versions() {
    let mut b = base_bytes();
    for version in [0, 1, 4, 99] {
        put_u32(&mut b, 4, version);
        expect_err!(b, GgufError::UnsupportedVersion { version: v } if v == version, format!("version {version}"));
    }
    put_u32(&mut b, 4, 1);
    expect_err!(b, GgufError::UnsupportedVersion { .. }, "current llama.cpp");
    put_u32(&mut b, 4, 3u32.swap_bytes());
    expect_err!(b, GgufError::UnsupportedVersion { .. }, "big-endian");
}

#[test]
fn truncated_in_header() {
    let b = base_bytes();
    expect_err!(b[..20], GgufError::Truncated { offset: 16, needed: 8, file_len: 20, .. }, "metadata key-value count", "byte 16", "ends at byte 20");
    expect_err!(b[..3], GgufError::Truncated { offset: 0, file_len: 3, .. }, "magic");
    expect_err!(b[..0], GgufError::Truncated { offset: 0, file_len: 0, .. });
    expect_err!(b[..6], GgufError::Truncated { offset: 4, .. }, "version");
}

#[test]
fn truncated_in_a_metadata_string() {
    let b = base_bytes();
    let text = value_at(&b, "general.name") + 8;
    let e = expect_err!(b[..text + 4], GgufError::Truncated { needed: 10, .. }, "general.name", format!("byte {text}"));
    assert_eq!(
        e.to_string(),
        format!("the file is truncated: the value of metadata 'general.name' at byte {text} needs 10 bytes but the file ends at byte {}", text + 4)
    );
    // In an array of strings, and in a key.
    let tokens = value_at(&b, "tokenizer.ggml.tokens");
    expect_err!(b[..tokens + 20], GgufError::Truncated { .. }, "tokenizer.ggml.tokens");
    let key = find(&b, b"test.flag");
    expect_err!(b[..key + 3], GgufError::Truncated { .. }, "metadata entry #2", format!("byte {key}"));
}

#[test]
fn truncated_in_tensor_infos() {
    let b = base_bytes();
    let (_, dim0, ty, _) = tensor_fields(&b, "output_norm.weight");
    expect_err!(b[..dim0 + 3], GgufError::Truncated { .. }, "dimensions of tensor 'output_norm.weight'", format!("byte {dim0}"));
    expect_err!(b[..ty + 1], GgufError::Truncated { .. }, "type of tensor 'output_norm.weight'");
    let name = find(&b, b"output_norm.weight");
    expect_err!(b[..name + 5], GgufError::Truncated { .. }, "name of tensor info #2");
}

#[test]
fn huge_string_length() {
    let mut b = base_bytes();
    let at = value_at(&b, "general.name");
    put_u64(&mut b, at, 1 << 63);
    expect_err!(b, GgufError::StringTooLong { len, .. } if len == 1 << 63,
        "general.name", format!("byte {at}"), "9223372036854775808");
    // A huge key length too.
    let mut b = base_bytes();
    let at = find(&b, b"test.count") - 8;
    put_u64(&mut b, at, u64::MAX);
    expect_err!(b, GgufError::StringTooLong { .. }, "metadata entry #3", format!("byte {at}"));
}

#[test]
fn huge_counts() {
    let mut b = base_bytes();
    put_u64(&mut b, 16, 1 << 40);
    expect_err!(b, GgufError::CountTooLarge { offset: 16, count, .. } if count == 1 << 40,
        "metadata key-value count", "byte 16", "1099511627776");
    let mut b = base_bytes();
    put_u64(&mut b, 8, u64::MAX);
    expect_err!(b, GgufError::CountTooLarge { offset: 8, .. }, "tensor count", "byte 8");
    // Even from a 24-byte prefix of unknown length: no NeedMore for absurd sizes.
    let e = Gguf::parse_prefix(&b[..24]).unwrap_err();
    assert!(matches!(e, GgufError::CountTooLarge { offset: 8, .. }), "{e:?}");
}

#[test]
fn huge_array_length() {
    let mut b = base_bytes();
    let at = value_at(&b, "tokenizer.ggml.tokens");
    put_u64(&mut b, at + 4, 1 << 62);
    expect_err!(b, GgufError::ArrayTooLong { len, elem_type: "string", .. } if len == 1 << 62,
        "tokenizer.ggml.tokens", format!("byte {at}"));
    let e = Gguf::parse_prefix(&b[..at + 12]).unwrap_err();
    assert!(matches!(e, GgufError::ArrayTooLong { .. }), "{e:?}");
    // A length that could be real but runs past the end of this file is truncation, and from
    // a prefix it asks for just the bytes that array would take.
    let mut b = base_bytes();
    let at = value_at(&b, "tokenizer.ggml.scores");
    put_u64(&mut b, at + 4, 1 << 20);
    expect_err!(b, GgufError::Truncated { needed, .. } if needed == 4 << 20, "tokenizer.ggml.scores");
    assert_eq!(Gguf::parse_prefix(&b).unwrap(), Parse::NeedMore { at_least: at + 12 + (4 << 20) });
}

#[test]
fn invalid_utf8() {
    let mut b = base_bytes();
    let key = find(&b, b"test.count");
    b[key + 4] = 0xFF;
    expect_err!(b, GgufError::InvalidUtf8 { offset, .. } if offset == key as u64 + 4,
        "metadata entry #3", format!("offset {}", key + 4));

    let mut b = base_bytes();
    let text = find(&b, b"tiny model");
    b[text + 2] = 0xC3; // starts a two-byte sequence that the next byte does not continue
    expect_err!(b, GgufError::InvalidUtf8 { offset, .. } if offset == text as u64 + 2,
        "general.name", format!("offset {}", text + 2));

    let mut b = base_bytes();
    let name = find(&b, b"output_norm.weight");
    b[name] = 0x80;
    expect_err!(b, GgufError::InvalidUtf8 { .. }, "name of tensor info #2");
}

#[test]
fn unknown_value_type() {
    let mut b = base_bytes();
    let at = value_type_at(&b, "test.count");
    put_u32(&mut b, at, 13);
    expect_err!(b, GgufError::UnknownValueType { ty: 13, offset, .. } if offset == at as u64,
        "test.count", "type 13", format!("byte {at}"));
    // An array's element type too.
    let mut b = base_bytes();
    let at = value_at(&b, "tokenizer.ggml.scores");
    put_u32(&mut b, at, 0xFFFF_FFFF);
    expect_err!(b, GgufError::UnknownValueType { ty: 0xFFFF_FFFF, .. }, "tokenizer.ggml.scores");
}

#[test]
fn bool_byte_other_than_0_or_1() {
    let mut b = base_bytes();
    let at = value_at(&b, "test.flag");
    b[at] = 7;
    let e = expect_err!(b, GgufError::BadBool { value: 7, .. }, "test.flag", format!("byte {at}"));
    assert_eq!(e.to_string(), format!("the value of metadata 'test.flag' at byte {at} is a bool stored as 7; only 0 and 1 are valid"));
}

#[test]
fn dimension_count_0_and_5() {
    for n in [0, 5, u32::MAX] {
        let mut b = base_bytes();
        let (n_dims_at, ..) = tensor_fields(&b, "blk.0.attn_q.weight");
        put_u32(&mut b, n_dims_at, n);
        expect_err!(b, GgufError::TooManyDims { n_dims, .. } if n_dims == n,
            "tensor 'blk.0.attn_q.weight'", format!("{n} dimensions"), format!("byte {n_dims_at}"));
    }
}

#[test]
fn zero_dimension() {
    let mut w = base();
    w.add_tensor("empty", &[32, 0], GgmlType::F32, vec![]);
    expect_err!(w.to_bytes(), GgufError::ZeroOrOverflowingDims { .. }, "tensor 'empty'", "[32, 0]", "zero");
}

#[test]
fn dimensions_whose_product_overflows() {
    for (dims, why) in [
        (vec![1u64 << 32, 1 << 32, 4], "element count overflows"),
        (vec![1 << 32, 1 << 31], "element count overflows"), // 2^63: past ggml's int64
        (vec![u64::MAX], "element count overflows"),
        (vec![1 << 62], "size in bytes overflows"), // 2^62 F32 elements: 2^64 bytes
    ] {
        let mut w = base();
        w.add_tensor("huge", &dims, GgmlType::F32, vec![0; 4]);
        expect_err!(w.to_bytes(), GgufError::ZeroOrOverflowingDims { .. }, "tensor 'huge'", why);
    }
}

#[test]
fn unknown_tensor_type() {
    let mut b = base_bytes();
    let (_, _, ty_at, _) = tensor_fields(&b, "token_embd.weight");
    put_u32(&mut b, ty_at, 99);
    let e = expect_err!(b, GgufError::UnknownTensorType { id: 99, .. }, "token_embd.weight", "99", format!("byte {ty_at}"));
    assert_eq!(e.to_string(), format!("tensor 'token_embd.weight': unknown GGML type id 99 (at byte {ty_at})"));
    // Retired ids are unknown too.
    put_u32(&mut b, ty_at, 4);
    expect_err!(b, GgufError::UnknownTensorType { id: 4, .. });
}

#[test]
fn row_not_whole_blocks() {
    let mut w = base();
    w.add_tensor("blk.1.ffn_up.weight", &[100, 2], GgmlType::Q4K, vec![0; 288]);
    let e = expect_err!(w.to_bytes(), GgufError::RowNotWholeBlocks { ty: GgmlType::Q4K, ne0: 100, block: 256, .. }, "blk.1.ffn_up.weight", "100", "Q4_K", "256");
    assert_eq!(e.to_string(), "tensor 'blk.1.ffn_up.weight': rows of 100 elements are not a whole number of Q4_K blocks (256 elements each)");
}

#[test]
fn misaligned_tensor_offset() {
    let mut b = base_bytes();
    let (.., off_at) = tensor_fields(&b, "output_norm.weight");
    let offset = get_u64(&b, off_at) + 4;
    put_u64(&mut b, off_at, offset);
    expect_err!(b, GgufError::MisalignedOffset { alignment: 32, .. }, "output_norm.weight", offset, "alignment 32");
    // With alignment 64 an offset that is only 32-aligned is wrong.
    let mut w = base();
    w.alignment(64);
    let mut b = w.to_bytes();
    let (.., off_at) = tensor_fields(&b, "output_norm.weight");
    let offset = get_u64(&b, off_at) + 32;
    put_u64(&mut b, off_at, offset);
    expect_err!(b, GgufError::MisalignedOffset { alignment: 64, .. }, "output_norm.weight");
}

#[test]
fn tensor_offset_overflows() {
    let mut b = base_bytes();
    let (.., off_at) = tensor_fields(&b, "output_norm.weight");
    put_u64(&mut b, off_at, u64::MAX - 31);
    expect_err!(b, GgufError::OffsetOverflow { .. }, "output_norm.weight", (u64::MAX - 31).to_string());
}

#[test]
fn tensor_data_past_end_of_file() {
    let b = base_bytes();
    let g = Gguf::parse(&b).unwrap();
    let end = g.tensor_data_range(g.tensor("output_norm.weight").unwrap()).end;
    // Missing trailing padding is tolerated; missing data is not.
    assert!(Gguf::parse(&b[..end as usize]).is_ok());
    let short = &b[..end as usize - 1];
    let e = expect_err!(short, GgufError::TensorOutOfBounds { .. }, "output_norm.weight");
    assert_eq!(e.to_string(), format!("tensor 'output_norm.weight': data ends at byte {end} but the file is {} bytes", end - 1));
    // A header that parses from a prefix is checked once the length is known.
    let Parse::Complete(g) = Gguf::parse_prefix(short).unwrap() else { panic!("the header is complete") };
    let e = g.check_file_len(end - 1).unwrap_err();
    assert!(matches!(e, GgufError::TensorOutOfBounds { file_len, .. } if file_len == end - 1), "{e:?}");
    assert!(g.check_file_len(end).is_ok());
    // A tensor moved far out.
    let mut b = base_bytes();
    let (.., off_at) = tensor_fields(&b, "output_norm.weight");
    put_u64(&mut b, off_at, 1 << 40);
    expect_err!(b, GgufError::TensorOutOfBounds { .. }, "output_norm.weight", format!("{}", (1u64 << 40) + 128 + g.data_offset));
}

#[test]
fn overlapping_tensors() {
    let mut b = base_bytes();
    // token_embd.weight takes data bytes 0..102; move attn_q to 96.
    let (.., off_at) = tensor_fields(&b, "blk.0.attn_q.weight");
    put_u64(&mut b, off_at, 96);
    let e = expect_err!(b, GgufError::OverlappingTensors { first_end: 102, second_start: 96, .. }, "'token_embd.weight'", "'blk.0.attn_q.weight'");
    assert_eq!(
        e.to_string(),
        "tensors 'token_embd.weight' and 'blk.0.attn_q.weight' overlap: 'token_embd.weight' ends at data offset 102 but 'blk.0.attn_q.weight' starts at data offset 96"
    );
    // Two tensors at the same offset.
    let mut b = base_bytes();
    let (.., off_at) = tensor_fields(&b, "output_norm.weight");
    put_u64(&mut b, off_at, 0);
    expect_err!(b, GgufError::OverlappingTensors { .. }, "output_norm.weight", "token_embd.weight");
}

#[test]
fn duplicate_tensor_name() {
    let mut w = base();
    w.add_tensor("token_embd.weight", &[32], GgmlType::F32, vec![0; 128]);
    expect_err!(w.to_bytes(), GgufError::DuplicateTensor { .. }, "tensor 'token_embd.weight' appears twice");
}

#[test]
fn duplicate_key() {
    let mut w = base();
    w.add_metadata("test.count", 8u32);
    let b = w.to_bytes();
    let second = b.windows(10).rposition(|w| w == b"test.count").unwrap() - 8;
    expect_err!(b, GgufError::DuplicateKey { offset, .. } if offset == second as u64,
        "metadata key 'test.count' appears twice", format!("byte {second}"));
}

#[test]
fn bad_alignment() {
    for a in [0u64, 3, 48] {
        let mut w = base();
        w.alignment(a);
        expect_err!(w.to_bytes(), GgufError::BadAlignment { .. }, "general.alignment", format!("is {a};"));
    }
    let mut w = base();
    w.add_metadata("general.alignment", MetadataValue::I32(-32));
    expect_err!(w.to_bytes(), GgufError::BadAlignment { .. }, "-32");
    let mut w = base();
    w.add_metadata("general.alignment", "32");
    expect_err!(w.to_bytes(), GgufError::WrongMetadataType { .. }, "general.alignment", "string");
}

#[test]
fn arrays_nested_too_deep() {
    let mut v = MetadataValue::u32_array([1, 2]);
    for _ in 0..20 {
        v = MetadataValue::Array { elem_type: ValueType::Array, items: vec![v] };
    }
    let mut w = base();
    w.add_metadata("test.deep", v);
    expect_err!(w.to_bytes(), GgufError::NestingTooDeep { max: 8, .. }, "test.deep", "nested more than 8 deep");
}

#[test]
fn oversized_header_is_refused_even_from_a_prefix() {
    let mut b = base_bytes();
    let at = value_at(&b, "general.name");
    // Too long for any header: an error at once, not a request for 300 MiB.
    put_u64(&mut b, at, 300 << 20);
    let e = Gguf::parse_prefix(&b).unwrap_err();
    assert!(matches!(e, GgufError::StringTooLong { .. }), "{e:?}");
    // Long but allowed: the prefix asks for exactly what the string needs.
    put_u64(&mut b, at, 200 << 20);
    assert_eq!(Gguf::parse_prefix(&b).unwrap(), Parse::NeedMore { at_least: at + 8 + (200 << 20) });
    // A string that fills the header to the cap leaves no room for the next read.
    let mut w = GgufWriter::new();
    let prefix_len = 24 + 8 + 1 + 4 + 8; // header, key "k", type, string length
    w.add_metadata("k", "x".repeat(MAX_HEADER_BYTES as usize - prefix_len)).add_metadata("l", 1u8);
    let b = w.to_bytes();
    let e = Gguf::parse(&b).unwrap_err();
    assert!(matches!(e, GgufError::HeaderTooLarge { offset, .. } if offset == MAX_HEADER_BYTES), "{e:?}");
    assert!(e.to_string().contains("metadata entry #1"), "{e}");
    let e = Gguf::parse_prefix(&b[..MAX_HEADER_BYTES as usize]).unwrap_err();
    assert!(matches!(e, GgufError::HeaderTooLarge { .. }), "{e:?}");
}

#[test]
fn every_prefix_needs_more_until_complete() {
    let b = base_bytes();
    let full = Gguf::parse(&b).unwrap();
    let mut last_need = 0;
    let mut complete_from = None;
    for n in 0..=b.len() {
        match Gguf::parse_prefix(&b[..n]) {
            Ok(Parse::NeedMore { at_least }) => {
                assert!(complete_from.is_none(), "prefix {n} needs more after a shorter one completed");
                assert!(at_least > n, "prefix {n}: asks for {at_least}");
                assert!(at_least >= last_need, "prefix {n}: at_least shrank from {last_need} to {at_least}");
                assert!(at_least as u64 <= full.data_offset, "prefix {n}: asks for {at_least}, past the header");
                last_need = at_least;
            }
            Ok(Parse::Complete(g)) => {
                assert_eq!(g, full, "prefix {n}");
                assert!(n >= last_need);
                complete_from.get_or_insert(n);
            }
            Err(e) => panic!("prefix {n} of a valid file: {e}"),
        }
    }
    let complete_from = complete_from.unwrap();
    assert!(complete_from as u64 <= full.data_offset);

    // Following at_least from nothing reaches Complete, at the same length.
    let mut n = 0;
    let mut steps = 0;
    loop {
        match Gguf::parse_prefix(&b[..n]).unwrap() {
            Parse::NeedMore { at_least } => n = at_least,
            Parse::Complete(g) => break assert_eq!(g, full),
        }
        steps += 1;
    }
    assert_eq!(n, complete_from);
    assert!(steps > 10, "only {steps} steps");
}

#[test]
fn random_corruption_never_panics() {
    let b = base_bytes();
    let header_end = Gguf::parse(&b).unwrap().data_offset as usize;
    let mut rng = Rng::new(0x6767_7566);
    let mut outcomes = [0usize; 2];
    for _ in 0..4000 {
        let mut c = b.clone();
        let flips = 1 + rng.next_u64() % 4;
        for _ in 0..flips {
            // Mostly in the header, where the parser looks; sometimes anywhere.
            let range = if rng.next_u64().is_multiple_of(8) { c.len() } else { header_end };
            let i = (rng.next_u64() % range as u64) as usize;
            c[i] = match rng.next_u64() % 3 {
                0 => c[i] ^ (1 << (rng.next_u64() % 8)),
                1 => 0xFF,
                _ => rng.next_u64() as u8,
            };
        }
        if rng.next_u64().is_multiple_of(4) {
            let keep = (rng.next_u64() % c.len() as u64) as usize;
            c.truncate(keep);
        }
        let parsed = Gguf::parse(&c);
        let _ = parsed.as_ref().map_err(|e| e.to_string());
        outcomes[parsed.is_ok() as usize] += 1;
        match Gguf::parse_prefix(&c) {
            Ok(Parse::NeedMore { at_least }) => {
                assert!(at_least > c.len() && at_least as u64 <= MAX_HEADER_BYTES)
            }
            Ok(Parse::Complete(g)) => {
                let _ = g.check_file_len(c.len() as u64);
                for t in &g.tensors {
                    let _ = (g.tensor_data_range(t), t.n_elements(), t.n_rows());
                }
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
        let streamed = Gguf::read_from(c.as_slice(), c.len() as u64);
        assert_eq!(parsed.is_ok(), streamed.is_ok());
    }
    // Both outcomes happen: the flips are neither all harmless nor all fatal.
    assert!(outcomes[0] > 1000 && outcomes[1] > 50, "{outcomes:?}");
}
