//! Builds GGUF v3 files in memory, laid out as llama.cpp writes them: tensor data in the
//! order the tensors were added, each starting on the alignment and padded with zeros to it
//! (the last one too: llama.cpp's reader expects the padded size).
//!
//! The writer checks nothing about consistency (dims against data length, duplicate names,
//! alignment values), so tests can build malformed files with it. It panics only on misuse
//! that could not be written at all: an array item whose type differs from the array's.

use super::{MetadataValue, DEFAULT_ALIGNMENT};
use crate::ggml_type::GgmlType;

/// A GGUF file under construction: metadata and tensors in the order added (see the module doc).
#[derive(Clone, Debug)]
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<PendingTensor>,
}

#[derive(Clone, Debug)]
struct PendingTensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    bytes: Vec<u8>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        GgufWriter::new()
    }
}

impl GgufWriter {
    /// An empty version-3 file with the default alignment.
    pub fn new() -> GgufWriter {
        GgufWriter { version: 3, alignment: DEFAULT_ALIGNMENT, metadata: Vec::new(), tensors: Vec::new() }
    }

    /// The version number written; the layout is the same for 2 and 3.
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Pads to `alignment` and records it as `general.alignment` (a u32), replacing any
    /// earlier value. Zero pads as 1 so that a test can still write such a file.
    pub fn alignment(&mut self, alignment: u64) -> &mut Self {
        self.alignment = alignment;
        let value = MetadataValue::U32(alignment as u32);
        match self.metadata.iter_mut().find(|(k, _)| k == "general.alignment") {
            Some(entry) => entry.1 = value,
            None => self.metadata.push(("general.alignment".to_string(), value)),
        }
        self
    }

    /// Appends a key (a repeated key is written twice).
    pub fn add_metadata(&mut self, key: impl Into<String>, value: impl Into<MetadataValue>) -> &mut Self {
        self.metadata.push((key.into(), value.into()));
        self
    }

    /// `dims[0]` is the row length; `bytes` is the tensor's data, unpadded.
    pub fn add_tensor(&mut self, name: impl Into<String>, dims: &[u64], ty: GgmlType, bytes: Vec<u8>) -> &mut Self {
        self.tensors.push(PendingTensor { name: name.into(), dims: dims.to_vec(), ty, bytes });
        self
    }

    /// The whole file.
    pub fn to_bytes(&self) -> Vec<u8> {
        let align = self.alignment.max(1);
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_str(&mut out, key);
            out.extend_from_slice(&value.value_type().id().to_le_bytes());
            write_value(&mut out, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            write_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id().to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += pad_len(t.bytes.len() as u64, align);
        }
        pad(&mut out, align);
        for t in &self.tensors {
            out.extend_from_slice(&t.bytes);
            pad(&mut out, align);
        }
        out
    }
}

fn pad_len(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

fn pad(out: &mut Vec<u8>, align: u64) {
    let len = pad_len(out.len() as u64, align) as usize;
    out.resize(len, 0);
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The value without its type tag (array items carry none).
fn write_value(out: &mut Vec<u8>, value: &MetadataValue) {
    use MetadataValue as V;
    match value {
        V::U8(x) => out.push(*x),
        V::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::Bool(x) => out.push(*x as u8),
        V::String(s) => write_str(out, s),
        V::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
        V::Array { elem_type, items } => {
            out.extend_from_slice(&elem_type.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                assert_eq!(item.value_type(), *elem_type, "GgufWriter: an array of {elem_type} holds a {} item", item.type_name());
                write_value(out, item);
            }
        }
    }
}
