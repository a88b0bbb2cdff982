//! `nomoat synth`: a GGUF with the shapes of a real model and random weights, for measuring
//! speed where the real file cannot travel (bench/gpu.sh on a GPU machine with no network and a
//! 64 MiB working tree). Speed depends on shapes and weight types, not on values; the blocks
//! hold random quants under small finite scales so no kernel meets a NaN.

use anyhow::{bail, Context, Result};
use nomoat_runtime::ggml_type::GgmlType;
use nomoat_runtime::gguf::{GgufWriter, MetadataValue};
use std::path::Path;

/// A llama-architecture model's dimensions.
struct Shape {
    name: &'static str,
    n_layer: usize,
    n_embd: usize,
    n_ff: usize,
    n_head: usize,
    n_kv_head: usize,
    n_vocab: usize,
    tied: bool,
}

const SHAPES: [Shape; 2] = [
    Shape { name: "llama-3.2-1b", n_layer: 16, n_embd: 2048, n_ff: 8192, n_head: 32, n_kv_head: 8, n_vocab: 128_256, tied: true },
    Shape { name: "llama-3.1-8b", n_layer: 32, n_embd: 4096, n_ff: 14_336, n_head: 32, n_kv_head: 8, n_vocab: 128_256, tied: false },
];

/// The shape names `--shape` takes.
pub fn shape_names() -> Vec<&'static str> {
    SHAPES.iter().map(|s| s.name).collect()
}

/// Which type each tensor gets, as llama.cpp's quantize does for these file types.
#[derive(Clone, Copy, PartialEq)]
enum FileType {
    Q4_0,
    Q8_0,
    /// Q4_K, with Q6_K for the output head and for attn_v / ffn_down in the layers llama.cpp
    /// gives more bits (the first and last eighth, and every third between).
    Q4KM,
}

fn file_type(name: &str) -> Result<FileType> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "q4_0" => FileType::Q4_0,
        "q8_0" => FileType::Q8_0,
        "q4_k_m" => FileType::Q4KM,
        _ => bail!("--type {name}: q4_0, q4_k_m or q8_0"),
    })
}

fn more_bits(layer: usize, n_layer: usize) -> bool {
    let eighth = n_layer / 8;
    layer < eighth || layer >= 7 * n_layer / 8 || (layer - eighth) % 3 == 2
}

/// Writes the model to `out`; returns its weight bytes.
pub fn write(shape: &str, ty: &str, out: &Path) -> Result<u64> {
    let s = SHAPES.iter().find(|s| s.name == shape).with_context(|| format!("--shape {shape}: one of {}", shape_names().join(", ")))?;
    let ft = file_type(ty)?;
    let head_dim = s.n_embd / s.n_head;
    let kv = s.n_kv_head * head_dim;
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", "llama");
    w.add_metadata("general.name", format!("synthetic {} {ty}", s.name));
    let u = |x: usize| MetadataValue::from(x as u32);
    w.add_metadata("llama.block_count", u(s.n_layer));
    w.add_metadata("llama.context_length", u(131_072));
    w.add_metadata("llama.embedding_length", u(s.n_embd));
    w.add_metadata("llama.feed_forward_length", u(s.n_ff));
    w.add_metadata("llama.attention.head_count", u(s.n_head));
    w.add_metadata("llama.attention.head_count_kv", u(s.n_kv_head));
    w.add_metadata("llama.rope.dimension_count", u(head_dim));
    w.add_metadata("llama.rope.freq_base", 500_000.0f32);
    w.add_metadata("llama.attention.layer_norm_rms_epsilon", 1e-5f32);
    w.add_metadata("llama.vocab_size", u(s.n_vocab));
    add_vocab(&mut w, s.n_vocab);
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut bytes = 0u64;
    let mut tensor = |w: &mut GgufWriter, name: String, n_in: usize, n_out: usize, ty: GgmlType| {
        let data = random_blocks(ty, n_in * n_out, &mut rng);
        bytes += data.len() as u64;
        w.add_tensor(name, &[n_in as u64, n_out as u64], ty, data);
    };
    let (plain, big) = match ft {
        FileType::Q4_0 => (GgmlType::Q4_0, GgmlType::Q4_0),
        FileType::Q8_0 => (GgmlType::Q8_0, GgmlType::Q8_0),
        FileType::Q4KM => (GgmlType::Q4K, GgmlType::Q6K),
    };
    // a tied head is the embedding: it gets the head's type
    tensor(&mut w, "token_embd.weight".into(), s.n_embd, s.n_vocab, if s.tied { big } else { plain });
    if !s.tied {
        tensor(&mut w, "output.weight".into(), s.n_embd, s.n_vocab, big);
    }
    let ones = |n: usize| (0..n).flat_map(|_| 1.0f32.to_le_bytes()).collect::<Vec<u8>>();
    w.add_tensor("output_norm.weight", &[s.n_embd as u64], GgmlType::F32, ones(s.n_embd));
    for l in 0..s.n_layer {
        let extra = if ft == FileType::Q4KM && more_bits(l, s.n_layer) { big } else { plain };
        w.add_tensor(format!("blk.{l}.attn_norm.weight"), &[s.n_embd as u64], GgmlType::F32, ones(s.n_embd));
        w.add_tensor(format!("blk.{l}.ffn_norm.weight"), &[s.n_embd as u64], GgmlType::F32, ones(s.n_embd));
        tensor(&mut w, format!("blk.{l}.attn_q.weight"), s.n_embd, s.n_embd, plain);
        tensor(&mut w, format!("blk.{l}.attn_k.weight"), s.n_embd, kv, plain);
        tensor(&mut w, format!("blk.{l}.attn_v.weight"), s.n_embd, kv, extra);
        tensor(&mut w, format!("blk.{l}.attn_output.weight"), s.n_embd, s.n_embd, plain);
        tensor(&mut w, format!("blk.{l}.ffn_gate.weight"), s.n_embd, s.n_ff, plain);
        tensor(&mut w, format!("blk.{l}.ffn_up.weight"), s.n_embd, s.n_ff, plain);
        tensor(&mut w, format!("blk.{l}.ffn_down.weight"), s.n_ff, s.n_embd, extra);
    }
    std::fs::write(out, w.to_bytes()).with_context(|| format!("writing {}", out.display()))?;
    Ok(bytes)
}

/// A SentencePiece-style vocabulary: unknown, BOS, EOS, the 256 byte tokens, then plain words.
fn add_vocab(w: &mut GgufWriter, n_vocab: usize) {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2i32, 3, 3];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    let mut i = 0;
    while tokens.len() < n_vocab {
        tokens.push(format!("\u{2581}w{i}"));
        types.push(1);
        i += 1;
    }
    let scores: Vec<f32> = (0..n_vocab).map(|i| -(i as f32)).collect();
    w.add_metadata("tokenizer.ggml.model", "llama");
    w.add_metadata("tokenizer.ggml.tokens", MetadataValue::str_array(tokens));
    w.add_metadata("tokenizer.ggml.scores", MetadataValue::f32_array(scores));
    w.add_metadata("tokenizer.ggml.token_type", MetadataValue::i32_array(types));
    w.add_metadata("tokenizer.ggml.bos_token_id", 1u32);
    w.add_metadata("tokenizer.ggml.eos_token_id", 2u32);
}

/// `n` weights of type `ty`: random quants, scales of 2^-9 (f16 0x1800).
fn random_blocks(ty: GgmlType, n: usize, rng: &mut u64) -> Vec<u8> {
    const SCALE: [u8; 2] = 0x1800u16.to_le_bytes();
    let (block_elems, block_bytes) = ty.block_layout();
    // one tile of random blocks, repeated: random enough for speed, cheap for 8B models
    let tile_blocks = 4096usize;
    let mut tile = vec![0u8; tile_blocks * block_bytes];
    for b in tile.iter_mut() {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *b = (*rng >> 32) as u8;
    }
    for block in tile.chunks_mut(block_bytes) {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q8_0 => block[..2].copy_from_slice(&SCALE),
            GgmlType::Q4K => {
                block[..2].copy_from_slice(&SCALE);
                block[2..4].copy_from_slice(&SCALE);
            }
            GgmlType::Q6K => {
                block[208..210].copy_from_slice(&SCALE);
                // scales are i8: keep them small and positive
                for s in &mut block[192..208] {
                    *s = (*s & 7) + 1;
                }
            }
            _ => {}
        }
    }
    let blocks = n / block_elems;
    let mut out = Vec::with_capacity(blocks * block_bytes);
    while out.len() < blocks * block_bytes {
        let take = (blocks * block_bytes - out.len()).min(tile.len());
        out.extend_from_slice(&tile[..take]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_gives_more_bits_where_llama_cpp_does() {
        let layers: Vec<usize> = (0..16).filter(|&l| more_bits(l, 16)).collect();
        assert_eq!(layers, [0, 1, 4, 7, 10, 13, 14, 15]);
    }

    #[test]
    fn blocks_have_the_types_layout_and_finite_scales() {
        let mut rng = 1;
        for ty in [GgmlType::Q4_0, GgmlType::Q8_0, GgmlType::Q4K, GgmlType::Q6K] {
            let (elems, bytes) = ty.block_layout();
            let n = elems * 5000;
            let data = random_blocks(ty, n, &mut rng);
            assert_eq!(data.len(), 5000 * bytes);
            let values = nomoat_runtime::quant::dequantize(ty, &data, n).unwrap();
            assert!(values.iter().all(|v| v.is_finite() && v.abs() < 8.0), "{ty:?}");
            assert!(values.iter().any(|&v| v != 0.0), "{ty:?}");
        }
    }
}
