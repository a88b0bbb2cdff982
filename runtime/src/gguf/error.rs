//! Everything that can be wrong with a GGUF file, each case carrying enough to point at the
//! offending bytes: the key or tensor involved and the absolute byte offset in the file.

use thiserror::Error;

use super::MAX_HEADER_BYTES;
use crate::ggml_type::GgmlType;

/// What is wrong with a GGUF file, with the key or tensor and the byte offset involved.
#[derive(Debug, Error)]
#[non_exhaustive]
#[allow(missing_docs)] // each variant's #[error] message says what it means and names its fields
pub enum GgufError {
    #[error("not a GGUF file: expected the magic bytes \"GGUF\" at byte 0 but found {}", show_magic(.found))]
    BadMagic { found: [u8; 4] },

    #[error("unsupported GGUF version {version}: only versions 2 and 3 can be read{}", version_hint(*.version))]
    UnsupportedVersion { version: u32 },

    #[error("the file is truncated: {what} at byte {offset} needs {needed} bytes but the file ends at byte {file_len}")]
    Truncated { what: String, offset: u64, needed: u64, file_len: u64 },

    /// A fixed-size read past the cap on header size; declared lengths and counts that would
    /// need that much get their own variants below.
    #[error("{what} at byte {offset} lies beyond the first {} bytes, the most a GGUF header may take", MAX_HEADER_BYTES)]
    HeaderTooLarge { what: String, offset: u64 },

    /// `offset` is that of the first byte that is not valid UTF-8.
    #[error("{what} is not valid UTF-8 (bad byte at offset {offset})")]
    InvalidUtf8 { what: String, offset: u64 },

    #[error("{what} at byte {offset} has unknown value type {ty} (known types are 0 to 12)")]
    UnknownValueType { what: String, offset: u64, ty: u32 },

    #[error("{what} at byte {offset} is a bool stored as {value}; only 0 and 1 are valid")]
    BadBool { what: String, offset: u64, value: u8 },

    // The next three are lengths and counts no valid file has: they would not fit in the
    // limits on header size (MAX_HEADER_BYTES and friends). A plausible length that merely
    // runs past the end of the file is Truncated instead. `max` is what would have fit.
    #[error("{what} at byte {offset} declares a length of {len} bytes; at most {max} fit in a GGUF header")]
    StringTooLong { what: String, offset: u64, len: u64, max: u64 },

    #[error("metadata '{key}': the array at byte {offset} declares {len} elements of type {elem_type}; at most {max} fit in a GGUF header")]
    ArrayTooLong { key: String, offset: u64, len: u64, elem_type: &'static str, max: u64 },

    #[error("the {what} at byte {offset} is {count}; at most {max} fit in a GGUF header")]
    CountTooLarge { what: &'static str, offset: u64, count: u64, max: u64 },

    #[error("metadata '{key}': arrays nested more than {max} deep at byte {offset}")]
    NestingTooDeep { key: String, offset: u64, max: usize },

    #[error("metadata key '{key}' appears twice (the second time at byte {offset})")]
    DuplicateKey { key: String, offset: u64 },

    #[error("general.alignment is {value}; it must be a power of two (usually 32)")]
    BadAlignment { value: String },

    /// Also used for a dimension count of zero.
    #[error("tensor '{tensor}': {n_dims} dimensions (at byte {offset}); GGUF tensors have 1 to 4")]
    TooManyDims { tensor: String, n_dims: u32, offset: u64 },

    #[error("tensor '{tensor}': dimensions {dims:?} are invalid: {reason}")]
    ZeroOrOverflowingDims { tensor: String, dims: Vec<u64>, reason: &'static str },

    #[error("tensor '{tensor}': unknown GGML type id {id} (at byte {offset})")]
    UnknownTensorType { tensor: String, id: u32, offset: u64 },

    #[error("tensor '{tensor}': rows of {ne0} elements are not a whole number of {ty} blocks ({block} elements each)")]
    RowNotWholeBlocks { tensor: String, ty: GgmlType, ne0: u64, block: usize },

    #[error("tensor '{tensor}': data offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedOffset { tensor: String, offset: u64, alignment: u64 },

    #[error("tensor '{tensor}': data offset {offset} plus the tensor's size overflows a 64-bit file position")]
    OffsetOverflow { tensor: String, offset: u64 },

    #[error("tensor '{tensor}': data ends at byte {end} but the file is {file_len} bytes")]
    TensorOutOfBounds { tensor: String, end: u64, file_len: u64 },

    /// Offsets are relative to the data section, as stored in the file.
    #[error("tensors '{first}' and '{second}' overlap: '{first}' ends at data offset {first_end} but '{second}' starts at data offset {second_start}")]
    OverlappingTensors { first: String, second: String, first_end: u64, second_start: u64 },

    #[error("tensor '{tensor}' appears twice (the second time at byte {offset})")]
    DuplicateTensor { tensor: String, offset: u64 },

    #[error("metadata '{key}' is {found}, expected {expected}")]
    WrongMetadataType { key: String, expected: &'static str, found: String },

    #[error("metadata '{key}' is {value}, which does not fit in {expected}")]
    ValueOutOfRange { key: String, value: String, expected: &'static str },

    #[error("metadata key '{key}' is missing")]
    MissingKey { key: String },

    #[error("reading the GGUF header failed at byte {offset}: {source}")]
    Io { offset: u64, source: std::io::Error },
}

fn show_magic(found: &[u8; 4]) -> String {
    format!("\"{}\"", found.escape_ascii())
}

fn version_hint(version: u32) -> &'static str {
    match version {
        1 => " (version 1 files come from 2023 tools; convert the model again with a current llama.cpp)",
        // GGUF v3 allowed big-endian files; read as little-endian their version is byte-swapped.
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => " (this looks like a big-endian file; nomoat reads little-endian only)",
        _ => "",
    }
}
