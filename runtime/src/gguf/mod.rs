//! GGUF, the file format llama.cpp stores models in: versions 2 and 3, little-endian.
//!
//! Layout: magic "GGUF", version u32, tensor count u64, metadata count u64, the metadata
//! key-value pairs, the tensor infos, then padding up to `general.alignment` (default 32)
//! where the data section starts. Tensor offsets are relative to that start.
//!
//! Three ways in, all validating the same things:
//! - [`Gguf::parse`]: the whole file is in memory.
//! - [`Gguf::parse_prefix`]: the first bytes of a file, for callers that read in chunks (the
//!   browser cannot hold a 2 GB model in wasm memory). It answers `NeedMore` until the prefix
//!   covers the header; [`Gguf::check_file_len`] then checks tensor data against the file size.
//! - [`Gguf::read_from`]: any `std::io::Read`, reading the header and none of the data section
//!   beyond the last chunk.
//!
//! Files are untrusted input: no input makes the parser panic, and no length or count read
//! from the file sizes an allocation before the bytes behind it are in hand.

mod error;
mod parse;
#[cfg(test)]
mod tests;
mod value;
mod writer;

use std::io::Read;
use std::ops::Range;

pub use error::GgufError;
pub use value::{MetadataValue, ValueType};
pub use writer::GgufWriter;

use crate::ggml_type::GgmlType;

/// No real header comes close (a 262k-token vocabulary takes about 6 MB), and the cap keeps
/// a corrupt length from making a chunked reader fetch gigabytes.
pub const MAX_HEADER_BYTES: u64 = 256 << 20;
/// Arrays of arrays deeper than this are refused; real files nest at most one level.
pub const MAX_NESTING: usize = 8;
/// Array elements in the whole header. Each becomes a 32-byte MetadataValue, so this bounds
/// memory at ~256 MiB where the byte cap alone would allow 8 GiB (a 256 MiB array of u8).
/// Real files hold about a million (Gemma 3: 3 arrays of 262144).
pub const MAX_ARRAY_ELEMENTS: u64 = 1 << 23;
/// Far beyond real files (a few thousand tensors, a few dozen keys); bounds the memory a
/// forged count can make the parser use.
pub const MAX_TENSORS: u64 = 1 << 20;
/// The most metadata keys a header may declare (real files have a few dozen).
pub const MAX_METADATA_KVS: u64 = 1 << 20;
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// First chunk `read_from` reads: enough for the headers of small models in one go.
const FIRST_CHUNK: u64 = 1 << 20;

/// A tensor's entry in the header: name, shape, type and where its data is.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Its name (`blk.0.attn_q.weight`).
    pub name: String,
    /// `dims[0]` is the innermost dimension (ggml's `ne[0]`, the row length).
    pub dims: Vec<u64>,
    /// Its element type.
    pub ty: GgmlType,
    /// Relative to the data section; see [`Gguf::tensor_data_range`].
    pub offset: u64,
}

impl TensorInfo {
    /// The parser guarantees these sizes fit; for hand-made infos they saturate.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// Elements in a row (`dims[0]`).
    pub fn row_len(&self) -> u64 {
        self.dims.first().copied().unwrap_or(0)
    }

    /// Rows: the product of the outer dimensions (saturating).
    pub fn n_rows(&self) -> u64 {
        self.dims.iter().skip(1).fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// Bytes of its data (`u64::MAX` when rows are not whole blocks or the size overflows).
    pub fn size_bytes(&self) -> u64 {
        self.ty.row_bytes(self.row_len()).map_or(u64::MAX, |row| row.saturating_mul(self.n_rows()))
    }
}

/// A parsed GGUF header: metadata, tensor table and where the data starts. The data itself is
/// not read; [`Gguf::tensor_data_range`] says where each tensor's bytes are.
#[derive(Clone, Debug, PartialEq)]
pub struct Gguf {
    /// GGUF version (2 or 3).
    pub version: u32,
    /// In file order.
    pub metadata: Vec<(String, MetadataValue)>,
    /// In file order (not necessarily data order).
    pub tensors: Vec<TensorInfo>,
    /// Alignment of tensor data, from `general.alignment` (default [`DEFAULT_ALIGNMENT`]).
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
}

/// The answer to a prefix of a file.
#[derive(Clone, Debug, PartialEq)]
pub enum Parse {
    /// The whole header was in the prefix.
    Complete(Gguf),
    /// Call again with a prefix of at least this many bytes. It only grows as the prefix
    /// does, and never exceeds [`MAX_HEADER_BYTES`].
    NeedMore {
        /// Bytes of prefix needed.
        at_least: usize,
    },
}

impl Gguf {
    /// Parses a whole file, checking that every tensor's data lies within `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Gguf, GgufError> {
        parse::parse_file(bytes)
    }

    /// Parses the first bytes of a file of unknown length. Tensor data is not checked against
    /// the file length; call [`Gguf::check_file_len`] once it is known.
    pub fn parse_prefix(prefix: &[u8]) -> Result<Parse, GgufError> {
        parse::parse_prefix(prefix, None)
    }

    /// Like [`Gguf::parse_prefix`] for a file known to be `file_len` bytes: reading past that
    /// is `Truncated` rather than `NeedMore`, and a complete header is checked against it.
    pub fn parse_prefix_of_file(prefix: &[u8], file_len: u64) -> Result<Parse, GgufError> {
        parse::parse_prefix(prefix, Some(file_len))
    }

    /// Reads the header from `reader`, positioned at the start of a `file_len`-byte file, in
    /// growing chunks, and checks tensor data against `file_len`.
    pub fn read_from<R: Read>(reader: R, file_len: u64) -> Result<Gguf, GgufError> {
        read_from_in_chunks(reader, file_len, FIRST_CHUNK)
    }

    /// Every tensor's data must end within the file.
    pub fn check_file_len(&self, file_len: u64) -> Result<(), GgufError> {
        for t in &self.tensors {
            let end = self.tensor_data_range(t).end;
            if end > file_len {
                return Err(GgufError::TensorOutOfBounds { tensor: t.name.clone(), end, file_len });
            }
        }
        Ok(())
    }

    /// Absolute byte range of a tensor's data.
    pub fn tensor_data_range(&self, t: &TensorInfo) -> Range<u64> {
        let start = self.data_offset.saturating_add(t.offset);
        start..start.saturating_add(t.size_bytes())
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The value of metadata `key`.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `general.architecture`, which names the prefix of the model's other keys.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.get_str("general.architecture")
    }

    /// An integer key as a u32: `MissingKey` when absent, an error when of another type or out of
    /// range.
    pub fn get_u32(&self, key: &str) -> Result<u32, GgufError> {
        required(key, self.get_u32_opt(key))
    }
    /// [`Gguf::get_u32`], None when the key is absent.
    pub fn get_u32_opt(&self, key: &str) -> Result<Option<u32>, GgufError> {
        self.get(key).map(|v| integer(key, v, "u32")).transpose()
    }

    /// An integer key as a u64 (see [`Gguf::get_u32`]).
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        required(key, self.get_u64_opt(key))
    }
    /// [`Gguf::get_u64`], None when the key is absent.
    pub fn get_u64_opt(&self, key: &str) -> Result<Option<u64>, GgufError> {
        self.get(key).map(|v| integer(key, v, "u64")).transpose()
    }

    /// An integer key as an i64 (see [`Gguf::get_u32`]).
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        required(key, self.get_i64_opt(key))
    }
    /// [`Gguf::get_i64`], None when the key is absent.
    pub fn get_i64_opt(&self, key: &str) -> Result<Option<i64>, GgufError> {
        self.get(key).map(|v| integer(key, v, "i64")).transpose()
    }

    /// F32 or F64 values (F64 rounded).
    pub fn get_f32(&self, key: &str) -> Result<f32, GgufError> {
        required(key, self.get_f32_opt(key))
    }
    /// [`Gguf::get_f32`], None when the key is absent.
    pub fn get_f32_opt(&self, key: &str) -> Result<Option<f32>, GgufError> {
        self.get(key).map(|v| float(key, v)).transpose()
    }

    /// A string key: `MissingKey` when absent, `WrongMetadataType` when not a string.
    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        required(key, self.get_str_opt(key))
    }
    /// [`Gguf::get_str`], None when the key is absent.
    pub fn get_str_opt(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| wrong_type(key, "a string", v))).transpose()
    }

    /// A bool key: `MissingKey` when absent, `WrongMetadataType` when not a bool.
    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        required(key, self.get_bool_opt(key))
    }
    /// [`Gguf::get_bool`], None when the key is absent.
    pub fn get_bool_opt(&self, key: &str) -> Result<Option<bool>, GgufError> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| wrong_type(key, "a bool", v))).transpose()
    }

    /// Any array's items.
    pub fn get_array(&self, key: &str) -> Result<&[MetadataValue], GgufError> {
        required(key, self.get_array_opt(key))
    }
    /// [`Gguf::get_array`], None when the key is absent.
    pub fn get_array_opt(&self, key: &str) -> Result<Option<&[MetadataValue]>, GgufError> {
        self.get(key).map(|v| v.as_array().ok_or_else(|| wrong_type(key, "an array", v))).transpose()
    }

    /// An array of strings (token texts, merges).
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        required(key, self.get_str_array_opt(key))
    }
    /// [`Gguf::get_str_array`], None when the key is absent.
    pub fn get_str_array_opt(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = typed_array(key, v, "an array of strings", |t| t == ValueType::String)?;
        Ok(Some(items.iter().filter_map(MetadataValue::as_str).collect()))
    }

    /// Arrays of F32 or F64 (F64 rounded).
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>, GgufError> {
        required(key, self.get_f32_array_opt(key))
    }
    /// [`Gguf::get_f32_array`], None when the key is absent.
    pub fn get_f32_array_opt(&self, key: &str) -> Result<Option<Vec<f32>>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = typed_array(key, v, "an array of floats", |t| matches!(t, ValueType::F32 | ValueType::F64))?;
        Ok(Some(items.iter().filter_map(|x| x.as_f64().map(|x| x as f32)).collect()))
    }

    /// Arrays of any integer type whose values all fit in an i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>, GgufError> {
        required(key, self.get_i32_array_opt(key))
    }
    /// [`Gguf::get_i32_array`], None when the key is absent.
    pub fn get_i32_array_opt(&self, key: &str) -> Result<Option<Vec<i32>>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = typed_array(key, v, "an array of integers", ValueType::is_integer)?;
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let x = item.as_i128().unwrap_or_default(); // the element type is an integer type
            let x = i32::try_from(x).map_err(|_| GgufError::ValueOutOfRange { key: key.to_string(), value: format!("{x} at element {i}"), expected: "i32" })?;
            out.push(x);
        }
        Ok(Some(out))
    }
}

fn required<T>(key: &str, v: Result<Option<T>, GgufError>) -> Result<T, GgufError> {
    v?.ok_or_else(|| GgufError::MissingKey { key: key.to_string() })
}

fn wrong_type(key: &str, expected: &'static str, v: &MetadataValue) -> GgufError {
    GgufError::WrongMetadataType { key: key.to_string(), expected, found: v.type_name() }
}

fn integer<T: TryFrom<i128>>(key: &str, v: &MetadataValue, name: &'static str) -> Result<T, GgufError> {
    let x = v.as_i128().ok_or_else(|| wrong_type(key, "an integer", v))?;
    T::try_from(x).map_err(|_| GgufError::ValueOutOfRange { key: key.to_string(), value: x.to_string(), expected: name })
}

fn float(key: &str, v: &MetadataValue) -> Result<f32, GgufError> {
    v.as_f64().map(|x| x as f32).ok_or_else(|| wrong_type(key, "a float", v))
}

fn typed_array<'a>(key: &str, v: &'a MetadataValue, expected: &'static str, elem_ok: impl Fn(ValueType) -> bool) -> Result<&'a [MetadataValue], GgufError> {
    match v {
        MetadataValue::Array { elem_type, items } if elem_ok(*elem_type) => Ok(items),
        _ => Err(wrong_type(key, expected, v)),
    }
}

/// `read_from` with a chosen first chunk, so tests can make it take many steps.
pub(crate) fn read_from_in_chunks<R: Read>(mut reader: R, file_len: u64, first_chunk: u64) -> Result<Gguf, GgufError> {
    let mut buf = Vec::new();
    let mut want = first_chunk.max(1).min(file_len);
    loop {
        let have = buf.len() as u64;
        let wanted = want.saturating_sub(have);
        // `want` never exceeds MAX_HEADER_BYTES, so the reservation is bounded.
        buf.reserve_exact(wanted as usize);
        let got = reader.by_ref().take(wanted).read_to_end(&mut buf).map_err(|source| GgufError::Io { offset: have, source })?;
        // A reader that ends early means the file is shorter than the caller said.
        let end = if (got as u64) < wanted { buf.len() as u64 } else { file_len };
        match parse::parse_prefix(&buf, Some(end))? {
            Parse::Complete(g) => return Ok(g),
            Parse::NeedMore { at_least } => {
                let doubled = (buf.len() as u64).saturating_mul(2).min(file_len).min(MAX_HEADER_BYTES);
                want = doubled.max(at_least as u64);
            }
        }
    }
}

/// Per tensor type: how many tensors and how many bytes, largest total first.
pub fn tensor_type_summary(gguf: &Gguf) -> Vec<(GgmlType, usize, u64)> {
    let mut out: Vec<(GgmlType, usize, u64)> = Vec::new();
    for t in &gguf.tensors {
        match out.iter_mut().find(|(ty, _, _)| *ty == t.ty) {
            Some(entry) => {
                entry.1 += 1;
                entry.2 = entry.2.saturating_add(t.size_bytes());
            }
            None => out.push((t.ty, 1, t.size_bytes())),
        }
    }
    out.sort_by_key(|&(ty, _, bytes)| (std::cmp::Reverse(bytes), ty.id()));
    out
}
