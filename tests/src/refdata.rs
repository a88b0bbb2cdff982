//! Loader for the dequantization reference data made by PyPI `gguf` (gguf-py):
//! `tests/data/dequant_random.json` and `tests/data/dequant_real.json`, written by
//! `tests/reference/make_dequant_refs.py` (see its header for the exact contents).
//!
//! Every dequantized value in these files is an exact f32 written as an f64 decimal, so
//! `v as f32` gives the f32 back bit for bit (even if the JSON parser is one f64 ulp off, the
//! nearest f32 is still the original value). `y` values are f64.

use crate::support;
use nomoat_runtime::ggml_type::GgmlType;
use serde::Deserialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

/// `tests/data`.
pub fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data")
}

/// `dequant_random.json`: random blocks of each kernel type and gguf-py's dequantization.
#[derive(Debug, Deserialize)]
pub struct RandomBlocks {
    pub generator: String,
    pub gguf_version: String,
    pub seed: u64,
    pub types: Vec<RandomType>,
}

#[derive(Debug, Deserialize)]
pub struct RandomType {
    /// GGML type name, e.g. "Q4_K".
    #[serde(rename = "type")]
    pub type_name: String,
    pub block_elems: usize,
    pub block_bytes: usize,
    pub blocks: Vec<RandomBlock>,
}

impl RandomType {
    pub fn ggml_type(&self) -> GgmlType {
        GgmlType::from_name(&self.type_name).unwrap_or_else(|| panic!("unknown type {}", self.type_name))
    }
}

/// One quant block (or, for F32/F16/BF16, 256 elements) and its reference values.
#[derive(Debug, Deserialize)]
pub struct RandomBlock {
    /// The raw bytes, hex.
    pub hex: String,
    pub n_elements: usize,
    /// gguf-py's dequantized values (exact f32 values).
    pub values: Vec<f64>,
}

impl RandomBlock {
    pub fn bytes(&self) -> Vec<u8> {
        hex_decode(&self.hex)
    }
    pub fn values_f32(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }
}

/// `dequant_real.json`: one tensor per type per test model.
#[derive(Debug, Deserialize)]
pub struct RealRefs {
    pub generator: String,
    pub gguf_version: String,
    pub x_definition: String,
    pub tensors: Vec<RealTensorRef>,
}

#[derive(Debug, Deserialize)]
pub struct RealTensorRef {
    /// Model file name, under `support::models_dir()`.
    pub model: String,
    pub tensor: String,
    #[serde(rename = "type")]
    pub type_name: String,
    /// ggml order: dims[0] = ne0 is the row length.
    pub dims: Vec<u64>,
    pub ne0: usize,
    pub n_rows: usize,
    /// Absolute byte offset of the tensor's data in the model file.
    pub data_offset: u64,
    pub row_bytes: usize,
    /// A few dequantized rows (first, middle, last).
    pub rows: Vec<RefRow>,
    /// `y` covers rows `0..y_rows` (all rows except for very tall tensors; see `y_note`).
    pub y_rows: usize,
    /// y[r] = sum_k row_r[k] * x[k] in f64, with x from `matvec_x`.
    pub y: Vec<f64>,
    #[serde(default)]
    pub y_note: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct RefRow {
    pub index: usize,
    /// Exact f32 values.
    pub values: Vec<f64>,
}

impl RefRow {
    pub fn values_f32(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }
}

impl RealTensorRef {
    pub fn ggml_type(&self) -> GgmlType {
        GgmlType::from_name(&self.type_name).unwrap_or_else(|| panic!("unknown type {}", self.type_name))
    }

    /// Path of the model file (panics with the set-up command when it is missing).
    pub fn model_path(&self) -> PathBuf {
        support::model_path(&self.model)
    }

    /// Raw bytes of rows `first..first + count`, read straight from the model file (no GGUF
    /// parsing: `data_offset` is absolute).
    pub fn read_rows(&self, first: usize, count: usize) -> Vec<u8> {
        assert!(first + count <= self.n_rows, "{}: rows {first}..{} of {}", self.tensor, first + count, self.n_rows);
        let path = self.model_path();
        let mut f = File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        f.seek(SeekFrom::Start(self.data_offset + (first * self.row_bytes) as u64)).unwrap();
        let mut buf = vec![0u8; count * self.row_bytes];
        f.read_exact(&mut buf).unwrap_or_else(|e| panic!("{}: {}: {e}", path.display(), self.tensor));
        buf
    }

    /// The x the reference matvec used.
    pub fn matvec_x(&self) -> Vec<f64> {
        matvec_x(self.ne0)
    }
}

/// x[k] = sin(0.37 k + 0.11) * 0.5, as in `make_dequant_refs.py`.
pub fn matvec_x(n: usize) -> Vec<f64> {
    (0..n).map(|k| (0.37 * k as f64 + 0.11).sin() * 0.5).collect()
}

fn load<T: for<'de> Deserialize<'de>>(file: &str) -> T {
    let path = data_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (made by tests/reference/make_dequant_refs.py)", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn load_random() -> RandomBlocks {
    load("dequant_random.json")
}

pub fn load_real() -> RealRefs {
    load("dequant_real.json")
}

fn hex_decode(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd-length hex");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("bad hex")).collect()
}
