//! `quant::dequantize_row` against PyPI `gguf` (gguf-py), using the reference data made by
//! `tests/reference/make_dequant_refs.py`.
//!
//! Exactness: gguf-py computes in f32 with the same operations in the same order as ggml
//! (e.g. Q4_K: `(d * sc) * q - (dmin * m)`, Q6_K: `(d * sc) * q`, Q4_1: `d * q + m`), and so
//! does `quant.rs` (Rust never fuses `a * b + c` into an FMA by itself). So the results are
//! required to be bit-identical for every type, K-quants included; no float-association slack
//! is needed.

use nomoat_runtime::ggml_type::{GgmlType, KERNEL_TYPES};
use nomoat_runtime::quant;
use nomoat_tests::refdata::{self, RealTensorRef};

#[test]
fn random_blocks_match_gguf_py_bitwise() {
    let refs = refdata::load_random();
    let covered: Vec<GgmlType> = refs.types.iter().map(|t| t.ggml_type()).collect();
    for ty in KERNEL_TYPES {
        assert!(covered.contains(&ty), "dequant_random.json has no {ty} blocks");
    }
    let mut checked = 0;
    for t in &refs.types {
        let ty = t.ggml_type();
        assert_eq!((t.block_elems, t.block_bytes), ty.block_layout(), "{ty}: block layout");
        for (i, block) in t.blocks.iter().enumerate() {
            let bytes = block.bytes();
            let want = block.values_f32();
            assert_eq!(want.len(), block.n_elements);
            let mut got = vec![f32::NAN; block.n_elements];
            quant::dequantize_row(ty, &bytes, &mut got).unwrap_or_else(|e| panic!("{ty} block {i}: {e}"));
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{ty} block {i} element {k}: got {g:e}, gguf-py {w:e} (bytes {})", block.hex);
            }
            checked += 1;
        }
    }
    eprintln!("{checked} random blocks bit-identical to gguf-py {}", refs.gguf_version);
}

/// Dequantize rows `first..first + count` of a reference tensor, reading the file directly.
fn dequant_rows(t: &RealTensorRef, first: usize, count: usize) -> Vec<f32> {
    let bytes = t.read_rows(first, count);
    quant::dequantize(t.ggml_type(), &bytes, count * t.ne0).unwrap_or_else(|e| panic!("{} {}: {e}", t.model, t.tensor))
}

#[test]
fn real_tensors_match_gguf_py() {
    let refs = refdata::load_real();
    for t in &refs.tensors {
        let ty = t.ggml_type();
        assert_eq!(ty.row_bytes(t.ne0 as u64), Some(t.row_bytes as u64), "{}: row_bytes", t.tensor);
        assert_eq!(t.dims.iter().skip(1).product::<u64>() as usize, t.n_rows);

        // Rows: the brief's tolerance (1e-6 relative, floored at 1e-6 absolute), and also exact
        // equality, since both sides compute identical f32 operations (see the top comment).
        let mut max_row_diff = 0.0f32;
        let mut inexact = 0usize;
        for row in &t.rows {
            let got = dequant_rows(t, row.index, 1);
            let want = row.values_f32();
            assert_eq!(got.len(), want.len());
            for (k, (g, w)) in got.iter().zip(&want).enumerate() {
                let diff = (g - w).abs();
                max_row_diff = max_row_diff.max(diff);
                inexact += (g.to_bits() != w.to_bits()) as usize;
                assert!(diff <= 1e-6 * w.abs().max(1.0), "{} {} row {} element {k}: got {g:e}, gguf-py {w:e}", t.model, t.tensor, row.index);
            }
        }
        assert_eq!(inexact, 0, "{} {}: {inexact} values within tolerance but not bit-identical", t.model, t.tensor);

        // Matvec over every row of the tensor (f64 accumulation), compared with the reference
        // for the rows it covers. The error is relative to |y|, floored at 1e-3 of
        // sum_k |row_k x_k| so that a row whose dot product cancels to ~0 is judged against
        // the size of its terms rather than against an arbitrarily small |y|.
        let x = t.matvec_x();
        assert_eq!(t.y.len(), t.y_rows);
        let mut max_rel = 0.0f64;
        let chunk_rows = 1024;
        let mut r0 = 0;
        while r0 < t.n_rows {
            let count = chunk_rows.min(t.n_rows - r0);
            let w = dequant_rows(t, r0, count);
            for (i, row) in w.chunks_exact(t.ne0).enumerate() {
                let r = r0 + i;
                let (mut y, mut l1) = (0.0f64, 0.0f64);
                for (a, b) in row.iter().zip(&x) {
                    let p = *a as f64 * b;
                    y += p;
                    l1 += p.abs();
                }
                assert!(y.is_finite(), "{} row {r}: non-finite dot product", t.tensor);
                if r < t.y_rows {
                    let want = t.y[r];
                    let rel = (y - want).abs() / want.abs().max(1e-3 * l1).max(f64::MIN_POSITIVE);
                    max_rel = max_rel.max(rel);
                    assert!(rel <= 1e-5, "{} {} row {r}: y = {y}, gguf-py/numpy {want} (rel {rel:e})", t.model, t.tensor);
                }
            }
            r0 += count;
        }
        eprintln!(
            "{} {} ({ty}, {:?}): rows max |diff| {max_row_diff:e}, matvec over {} rows ({} compared) max rel err {max_rel:e}",
            t.model, t.tensor, t.dims, t.n_rows, t.y_rows
        );
    }
}

#[test]
fn real_refs_cover_every_type_of_both_models() {
    let refs = refdata::load_real();
    let types_of = |model: &str| -> Vec<String> {
        let mut v: Vec<String> = refs.tensors.iter().filter(|t| t.model == model).map(|t| t.type_name.clone()).collect();
        v.sort();
        v
    };
    assert_eq!(types_of(nomoat_tests::support::SMOLLM2), ["F32", "Q4_1", "Q8_0"]);
    assert_eq!(types_of(nomoat_tests::support::GEMMA3), ["F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"]);
}
