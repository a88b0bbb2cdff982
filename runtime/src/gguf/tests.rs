use super::*;

fn all_scalars() -> Vec<(&'static str, MetadataValue)> {
    use MetadataValue as V;
    vec![
        ("t.u8", V::U8(200)),
        ("t.i8", V::I8(-100)),
        ("t.u16", V::U16(60000)),
        ("t.i16", V::I16(-30000)),
        ("t.u32", V::U32(4_000_000_000)),
        ("t.i32", V::I32(-2_000_000_000)),
        ("t.f32", V::F32(1.5e-5)),
        ("t.bool_t", V::Bool(true)),
        ("t.bool_f", V::Bool(false)),
        ("t.string", V::String("héllo ✓".to_string())),
        ("t.empty_string", V::String(String::new())),
        ("t.u64", V::U64(u64::MAX)),
        ("t.i64", V::I64(i64::MIN)),
        ("t.f64", V::F64(-2.25e300)),
    ]
}

fn arrays() -> Vec<(&'static str, MetadataValue)> {
    use MetadataValue as V;
    let arr = |elem_type, items| V::Array { elem_type, items };
    vec![
        ("a.u8", arr(ValueType::U8, vec![V::U8(1), V::U8(255)])),
        ("a.i8", arr(ValueType::I8, vec![V::I8(-1)])),
        ("a.u16", arr(ValueType::U16, vec![V::U16(7)])),
        ("a.i16", arr(ValueType::I16, vec![V::I16(-7)])),
        ("a.u32", V::u32_array([1, 2, 3])),
        ("a.i32", V::i32_array([-1, 0, 1])),
        ("a.f32", V::f32_array([0.5, -0.25])),
        ("a.bool", arr(ValueType::Bool, vec![V::Bool(true), V::Bool(false)])),
        ("a.str", V::str_array(["a", "", "ccc"])),
        ("a.u64", arr(ValueType::U64, vec![V::U64(1 << 40)])),
        ("a.i64", arr(ValueType::I64, vec![V::I64(-(1 << 40))])),
        ("a.f64", arr(ValueType::F64, vec![V::F64(0.1)])),
        ("a.empty_u32", arr(ValueType::U32, vec![])),
        ("a.empty_str", arr(ValueType::String, vec![])),
        ("a.empty_arr", arr(ValueType::Array, vec![])),
        ("a.nested", arr(ValueType::Array, vec![V::str_array(["x", "y"]), V::f32_array([]), arr(ValueType::Array, vec![V::u32_array([9])])])),
    ]
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn sample(alignment: Option<u64>) -> (GgufWriter, Vec<(&'static str, MetadataValue)>) {
    let mut w = GgufWriter::new();
    let mut kvs = all_scalars();
    kvs.extend(arrays());
    for (k, v) in &kvs {
        w.add_metadata(*k, v.clone());
    }
    if let Some(a) = alignment {
        w.alignment(a);
    }
    w.add_tensor("norm", &[3], GgmlType::F32, f32_bytes(&[1.0, 2.0, 3.0]));
    w.add_tensor("q8", &[64, 2], GgmlType::Q8_0, (0..136).map(|i| i as u8).collect());
    w.add_tensor("h", &[5, 1, 1, 2], GgmlType::F16, vec![0xAB; 20]);
    (w, kvs)
}

#[test]
fn round_trips_every_value_type() {
    let (w, kvs) = sample(None);
    let bytes = w.to_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.metadata.len(), kvs.len());
    for ((k, v), (k2, v2)) in kvs.iter().zip(&g.metadata) {
        assert_eq!(k, k2);
        assert_eq!(v, v2, "{k}");
    }
    assert_eq!(g.get("a.empty_u32"), Some(&MetadataValue::Array { elem_type: ValueType::U32, items: vec![] }));
    assert_eq!(g.get("a.empty_arr").unwrap().type_name(), "array of array");
    assert_eq!(g.tensors.len(), 3);
    let h = g.tensor("h").unwrap();
    assert_eq!((h.n_elements(), h.row_len(), h.n_rows(), h.size_bytes()), (10, 5, 2, 20));
    // Writing what was read gives the same file.
    let mut w2 = GgufWriter::new();
    for (k, v) in &g.metadata {
        w2.add_metadata(k.clone(), v.clone());
    }
    for t in &g.tensors {
        let r = g.tensor_data_range(t);
        w2.add_tensor(t.name.clone(), &t.dims, t.ty, bytes[r.start as usize..r.end as usize].to_vec());
    }
    assert_eq!(w2.to_bytes(), bytes);
}

#[test]
fn lays_out_data_on_the_alignment() {
    for alignment in [32u64, 64] {
        let (w, _) = sample(Some(alignment));
        let bytes = w.to_bytes();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.alignment, alignment);
        assert_eq!(g.get_u32("general.alignment").unwrap() as u64, alignment);
        assert_eq!(g.data_offset % alignment, 0);
        assert!(g.data_offset >= alignment);
        // Offsets are consecutive padded sizes, as llama.cpp's reader requires, and the file
        // ends with the last tensor's padding.
        let mut expect = 0;
        for t in &g.tensors {
            assert_eq!(t.offset, expect, "{}", t.name);
            expect += t.size_bytes().div_ceil(alignment) * alignment;
        }
        assert_eq!(bytes.len() as u64, g.data_offset + expect);
        let norm = g.tensor_data_range(g.tensor("norm").unwrap());
        assert_eq!(&bytes[norm.start as usize..norm.end as usize], f32_bytes(&[1.0, 2.0, 3.0]).as_slice());
        let q8 = g.tensor_data_range(g.tensor("q8").unwrap());
        assert_eq!(q8.start % alignment, 0);
        assert_eq!(bytes[q8.start as usize + 5], 5);
        // Padding is zeros.
        assert!(bytes[norm.end as usize..q8.start as usize].iter().all(|&b| b == 0));
    }
}

#[test]
fn reads_version_2() {
    let (mut w, _) = sample(None);
    let bytes = w.version(2).to_bytes();
    assert_eq!(&bytes[4..8], &2u32.to_le_bytes());
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.version, 2);
    assert_eq!(g.get_str("t.string").unwrap(), "héllo ✓");
}

#[test]
fn typed_getters_convert_and_explain() {
    let (w, _) = sample(None);
    let g = Gguf::parse(&w.to_bytes()).unwrap();
    assert_eq!(g.get_u32("t.u8").unwrap(), 200);
    assert_eq!(g.get_u64("t.u32").unwrap(), 4_000_000_000);
    assert_eq!(g.get_i64("t.i8").unwrap(), -100);
    assert_eq!(g.get_u64("t.u64").unwrap(), u64::MAX);
    assert_eq!(g.get_f32("t.f32").unwrap(), 1.5e-5);
    assert_eq!(g.get_f32("t.f64").unwrap(), -2.25e300f64 as f32);
    assert!(g.get_bool("t.bool_t").unwrap());
    assert_eq!(g.get_str_array("a.str").unwrap(), vec!["a", "", "ccc"]);
    assert_eq!(g.get_f32_array("a.f32").unwrap(), vec![0.5, -0.25]);
    assert_eq!(g.get_f32_array("a.f64").unwrap(), vec![0.1f32]);
    assert_eq!(g.get_i32_array("a.i32").unwrap(), vec![-1, 0, 1]);
    assert_eq!(g.get_i32_array("a.u8").unwrap(), vec![1, 255]);
    assert_eq!(g.get_i32_array("a.empty_u32").unwrap(), Vec::<i32>::new());
    assert_eq!(g.get_array("a.nested").unwrap().len(), 3);
    assert_eq!(g.get_u32_opt("nope").unwrap(), None);
    assert_eq!(g.get_str_opt("t.string").unwrap(), Some("héllo ✓"));

    let e = g.get_u32("t.u64").unwrap_err();
    assert!(matches!(e, GgufError::ValueOutOfRange { .. }), "{e:?}");
    assert!(e.to_string().contains("t.u64") && e.to_string().contains("u32"), "{e}");
    let e = g.get_u32("t.i8").unwrap_err();
    assert!(matches!(e, GgufError::ValueOutOfRange { .. }), "{e:?}");
    let e = g.get_i32_array("a.u64").unwrap_err();
    assert!(e.to_string().contains("element 0"), "{e}");
    let e = g.get_str("t.u32").unwrap_err();
    assert!(matches!(&e, GgufError::WrongMetadataType { key, .. } if key == "t.u32"), "{e:?}");
    assert_eq!(e.to_string(), "metadata 't.u32' is u32, expected a string");
    let e = g.get_f32("t.u32").unwrap_err();
    assert!(matches!(e, GgufError::WrongMetadataType { .. }), "{e:?}");
    let e = g.get_str_array("a.empty_u32").unwrap_err();
    assert_eq!(e.to_string(), "metadata 'a.empty_u32' is array of u32, expected an array of strings");
    let e = g.get_bool_opt("t.string").unwrap_err();
    assert!(matches!(e, GgufError::WrongMetadataType { .. }), "{e:?}");
    let e = g.get_u32("llama.block_count").unwrap_err();
    assert!(matches!(e, GgufError::MissingKey { .. }), "{e:?}");
    assert_eq!(e.to_string(), "metadata key 'llama.block_count' is missing");
}

#[test]
fn prefix_completes_exactly_at_the_end_of_the_tensor_infos() {
    let (w, _) = sample(Some(64));
    let bytes = w.to_bytes();
    let full = Gguf::parse(&bytes).unwrap();
    // Find the header's true end: the shortest prefix that completes.
    let end = (0..=bytes.len()).find(|&n| matches!(Gguf::parse_prefix(&bytes[..n]), Ok(Parse::Complete(_)))).unwrap();
    assert!(end as u64 <= full.data_offset && end as u64 > full.data_offset - 64);
    assert_eq!(Gguf::parse_prefix(&bytes[..end]).unwrap(), Parse::Complete(full.clone()));
    assert_eq!(Gguf::parse_prefix(&bytes[..end - 1]).unwrap(), Parse::NeedMore { at_least: end });
    // Knowing the file length turns a short prefix of a too-short file into Truncated.
    let e = Gguf::parse_prefix_of_file(&bytes[..end - 1], end as u64 - 1).unwrap_err();
    assert!(matches!(e, GgufError::Truncated { .. }), "{e:?}");
    assert_eq!(Gguf::parse_prefix_of_file(&bytes[..end], bytes.len() as u64).unwrap(), Parse::Complete(full.clone()));
    // Trailing padding may be missing, but not a byte of tensor data.
    let data_end = full.tensor_data_range(full.tensors.last().unwrap()).end;
    assert!(data_end < bytes.len() as u64);
    assert!(Gguf::parse_prefix_of_file(&bytes[..end], data_end).is_ok());
    let e = Gguf::parse_prefix_of_file(&bytes[..end], data_end - 1).unwrap_err();
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e:?}");
}

#[test]
fn read_from_grows_its_chunks_until_the_header_parses() {
    let (w, _) = sample(None);
    let bytes = w.to_bytes();
    let full = Gguf::parse(&bytes).unwrap();
    for first in [1, 7, 64, 1 << 20] {
        let g = read_from_in_chunks(std::io::Cursor::new(&bytes), bytes.len() as u64, first).unwrap();
        assert_eq!(g, full);
    }
    assert_eq!(Gguf::read_from(bytes.as_slice(), bytes.len() as u64).unwrap(), full);
    // A reader that ends before the stated length: the file is truncated.
    let data_end = full.tensor_data_range(full.tensors.last().unwrap()).end as usize;
    let e = Gguf::read_from(&bytes[..data_end - 1], bytes.len() as u64).unwrap_err();
    assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{e:?}");
    let e = Gguf::read_from(&bytes[..40], bytes.len() as u64).unwrap_err();
    assert!(matches!(e, GgufError::Truncated { file_len: 40, .. }), "{e:?}");
}

#[test]
fn read_from_reads_no_further_than_it_needs() {
    struct Counting<'a>(&'a [u8], usize);
    impl std::io::Read for Counting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.read(buf)?;
            self.1 += n;
            Ok(n)
        }
    }
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama");
    w.add_tensor("big", &[1 << 20], GgmlType::F32, vec![0; 4 << 20]);
    let bytes = w.to_bytes();
    let mut r = Counting(&bytes, 0);
    let g = read_from_in_chunks(&mut r, bytes.len() as u64, 16).unwrap();
    assert_eq!(g.tensors[0].size_bytes(), 4 << 20);
    assert!(r.1 < 256, "read {} bytes of a header of {}", r.1, g.data_offset);
}

#[test]
fn nesting_is_limited() {
    fn nest(levels: usize) -> MetadataValue {
        let mut v = MetadataValue::u32_array([1]);
        for _ in 1..levels {
            v = MetadataValue::Array { elem_type: ValueType::Array, items: vec![v] };
        }
        v
    }
    let file = |levels| GgufWriter::new().add_metadata("deep", nest(levels)).to_bytes();
    let g = Gguf::parse(&file(MAX_NESTING)).unwrap();
    assert_eq!(g.get("deep"), Some(&nest(MAX_NESTING)));
    let e = Gguf::parse(&file(MAX_NESTING + 1)).unwrap_err();
    assert!(matches!(e, GgufError::NestingTooDeep { .. }), "{e:?}");
}

#[test]
fn summarizes_tensor_types_largest_first() {
    let (w, _) = sample(None);
    let g = Gguf::parse(&w.to_bytes()).unwrap();
    assert_eq!(tensor_type_summary(&g), vec![(GgmlType::Q8_0, 1, 136), (GgmlType::F16, 1, 20), (GgmlType::F32, 1, 12)]);
}

#[test]
fn displays_values_briefly() {
    assert_eq!(MetadataValue::U32(7).to_string(), "7");
    assert_eq!(MetadataValue::from("a\"b").to_string(), "\"a\\\"b\"");
    assert_eq!(MetadataValue::str_array(["x"; 10]).to_string(), "[string; 10: \"x\", \"x\", \"x\", \"x\", \"x\", \"x\", …]");
    assert_eq!(MetadataValue::f32_array([]).to_string(), "[f32; 0]");
    let long = MetadataValue::from("y".repeat(100)).to_string();
    assert!(long.ends_with("… (100 bytes)"), "{long}");
}
