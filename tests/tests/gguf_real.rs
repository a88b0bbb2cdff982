//! The real test models parse, with facts checked against the `gguf` Python package's reader.

use std::fs::File;
use std::path::Path;

use nomoat_runtime::ggml_type::GgmlType;
use nomoat_runtime::gguf::{tensor_type_summary, Gguf, GgufError, GgufWriter, Parse};
use nomoat_tests::support::{model_path, GEMMA3, SMOLLM2};

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn read(path: &Path) -> Gguf {
    Gguf::read_from(File::open(path).unwrap(), file_len(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn types_present(g: &Gguf) -> Vec<GgmlType> {
    let mut types: Vec<GgmlType> = tensor_type_summary(g).into_iter().map(|(ty, _, _)| ty).collect();
    types.sort_by_key(|t| t.id());
    types
}

#[test]
fn smollm2_facts() {
    let g = read(&model_path(SMOLLM2));
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(g.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(g.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(g.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(g.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 100000.0);
    assert_eq!(g.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(), 1e-5);
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert!(!g.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    let tokens = g.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(g.get_i32_array("tokenizer.ggml.token_type").unwrap().len(), 49152);
    assert_eq!(g.get_str_array("tokenizer.ggml.merges").unwrap().len(), 48900);
    assert_eq!(g.get_u32("tokenizer.ggml.eos_token_id").unwrap(), 2);
    assert_eq!(g.get_str_array("general.languages").unwrap(), vec!["en"]);
    assert_eq!(g.get_u32_opt("general.alignment").unwrap(), None);

    assert_eq!(g.metadata.len(), 33);
    assert_eq!(g.tensors.len(), 272);
    assert_eq!((g.alignment, g.data_offset), (32, 1785664));
    let embd = g.tensor("token_embd.weight").unwrap();
    assert_eq!((embd.ty, embd.dims.as_slice(), embd.offset), (GgmlType::Q8_0, &[576u64, 49152][..], 0));
    assert_eq!((embd.row_len(), embd.n_rows(), embd.size_bytes()), (576, 49152, 30081024));
    let down = g.tensor("blk.0.ffn_down.weight").unwrap();
    assert_eq!((down.ty, down.dims.as_slice()), (GgmlType::Q4_1, &[1536u64, 576][..]));
    assert_eq!(types_present(&g), vec![GgmlType::F32, GgmlType::Q4_1, GgmlType::Q8_0]);
    assert_eq!(tensor_type_summary(&g), vec![(GgmlType::Q4_1, 210, 66355200), (GgmlType::Q8_0, 1, 30081024), (GgmlType::F32, 61, 140544)]);
    // The last tensor's data ends exactly at the end of the file.
    let len = file_len(&model_path(SMOLLM2));
    assert_eq!(g.tensors.iter().map(|t| g.tensor_data_range(t).end).max(), Some(len));
}

#[test]
fn gemma3_facts() {
    let g = read(&model_path(GEMMA3));
    assert_eq!(g.version, 3);
    assert_eq!(g.architecture().unwrap(), "gemma3");
    assert_eq!(g.get_u32("gemma3.block_count").unwrap(), 18);
    assert_eq!(g.get_u32("gemma3.embedding_length").unwrap(), 640);
    assert_eq!(g.get_u32("gemma3.attention.head_count").unwrap(), 4);
    assert_eq!(g.get_u32("gemma3.attention.head_count_kv").unwrap(), 1);
    assert_eq!(g.get_u32("gemma3.attention.key_length").unwrap(), 256);
    assert_eq!(g.get_u32("gemma3.attention.sliding_window").unwrap(), 512);
    assert_eq!(g.get_f32("gemma3.rope.freq_base").unwrap(), 1e6);
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "llama");
    assert!(g.get_bool("tokenizer.ggml.add_bos_token").unwrap());
    assert_eq!(g.get_str_array("tokenizer.ggml.tokens").unwrap().len(), 262144);
    assert_eq!(g.get_f32_array("tokenizer.ggml.scores").unwrap().len(), 262144);
    assert_eq!(g.get_u32("tokenizer.ggml.bos_token_id").unwrap(), 2);
    assert_eq!(g.get_str_array("general.tags").unwrap(), vec!["gemma3", "gemma", "google", "text-generation"]);

    assert_eq!(g.metadata.len(), 33);
    assert_eq!(g.tensors.len(), 236);
    assert_eq!((g.alignment, g.data_offset), (32, 6525120));
    let embd = g.tensor("token_embd.weight").unwrap();
    assert_eq!((embd.ty, embd.dims.as_slice(), embd.offset), (GgmlType::Q8_0, &[640u64, 262144][..], 2560));
    let types = types_present(&g);
    let allowed = [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4K, GgmlType::Q6K];
    assert!(types.iter().all(|t| allowed.contains(t)), "{types:?}");
    assert_eq!(
        tensor_type_summary(&g),
        vec![(GgmlType::Q8_0, 10, 179824640), (GgmlType::Q5_0, 81, 43591680), (GgmlType::Q4K, 27, 13271040), (GgmlType::Q6K, 9, 9676800), (GgmlType::F32, 109, 223744),]
    );
    let len = file_len(&model_path(GEMMA3));
    assert_eq!(g.tensors.iter().map(|t| g.tensor_data_range(t).end).max(), Some(len));
}

/// The chunked reader, a 16 MiB prefix and the file length check agree.
#[test]
fn chunked_parse_equals_prefix_parse() {
    for model in [SMOLLM2, GEMMA3] {
        let path = model_path(model);
        let len = file_len(&path);
        let chunked = read(&path);
        let mut prefix = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(File::open(&path).unwrap(), 16 << 20), &mut prefix).unwrap();
        let Parse::Complete(from_prefix) = Gguf::parse_prefix(&prefix).unwrap() else { panic!("{model}: the header is longer than 16 MiB") };
        assert_eq!(from_prefix, chunked, "{model}");
        from_prefix.check_file_len(len).unwrap();
        let e = from_prefix.check_file_len(len - 1).unwrap_err();
        assert!(matches!(e, GgufError::TensorOutOfBounds { .. }), "{model}: {e:?}");
        // Cut just before the end of the header, a prefix asks for more.
        let cut = &prefix[..chunked.data_offset as usize - 32];
        assert!(matches!(Gguf::parse_prefix(cut).unwrap(), Parse::NeedMore { .. }), "{model}");
    }
}

/// GgufWriter lays files out exactly as llama.cpp's tools do: rewriting a real model from its
/// parsed header and tensor data gives back the same bytes.
#[test]
fn writer_reproduces_smollm2_byte_for_byte() {
    let bytes = std::fs::read(model_path(SMOLLM2)).unwrap();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g, read(&model_path(SMOLLM2)));
    let mut w = GgufWriter::new();
    for (k, v) in &g.metadata {
        w.add_metadata(k.clone(), v.clone());
    }
    for t in &g.tensors {
        let r = g.tensor_data_range(t);
        w.add_tensor(t.name.clone(), &t.dims, t.ty, bytes[r.start as usize..r.end as usize].to_vec());
    }
    let rewritten = w.to_bytes();
    assert_eq!(rewritten.len(), bytes.len());
    assert!(rewritten == bytes, "first difference at byte {:?}", rewritten.iter().zip(&bytes).position(|(a, b)| a != b));
}
