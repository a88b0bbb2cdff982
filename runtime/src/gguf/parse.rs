//! The header parser. One routine serves three callers: a whole file in memory, a prefix of
//! a file of unknown length (the browser's first chunk), and a prefix of a file of known
//! length. They differ only in what running out of bytes means: past the end of a known file
//! it is truncation, short of it the caller should fetch more.
//!
//! Everything is checked arithmetic, and no allocation is sized by the file: a Vec gets at
//! most as much capacity as the bytes actually in hand could fill.

use std::collections::HashSet;
use std::fmt;

use super::{Gguf, GgufError, MetadataValue, Parse, TensorInfo, ValueType};
use super::{DEFAULT_ALIGNMENT, MAX_ARRAY_ELEMENTS, MAX_HEADER_BYTES, MAX_METADATA_KVS, MAX_NESTING, MAX_TENSORS};
use crate::ggml_type::GgmlType;

/// The smallest encodings, which bound how many entries a count can honestly claim.
const MIN_KV_BYTES: u64 = 8 + 4 + 1; // key length, value type, a one-byte value
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8; // name length, n_dims, one dim, type, offset
const MAX_DIMS: u32 = 4;

/// Why parsing stopped short of a result.
enum Stop {
    Err(GgufError),
    /// The prefix ends before the header does; this many bytes would get further.
    NeedMore(u64),
}

impl From<GgufError> for Stop {
    fn from(e: GgufError) -> Stop {
        Stop::Err(e)
    }
}

type R<T> = Result<T, Stop>;

/// What is being read, for error messages; formatted only when something goes wrong.
#[derive(Clone, Copy)]
enum What<'a> {
    Magic,
    Version,
    TensorCount,
    KvCount,
    Key { index: u64 },
    ValueType { key: &'a str },
    Value { key: &'a str },
    TensorName { index: u64 },
    Tensor { name: &'a str, field: &'static str },
}

impl fmt::Display for What<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            What::Magic => f.write_str("the magic bytes"),
            What::Version => f.write_str("the version"),
            What::TensorCount => f.write_str("the tensor count"),
            What::KvCount => f.write_str("the metadata key-value count"),
            What::Key { index } => write!(f, "the key of metadata entry #{index}"),
            What::ValueType { key } => write!(f, "the value type of metadata '{key}'"),
            What::Value { key } => write!(f, "the value of metadata '{key}'"),
            What::TensorName { index } => write!(f, "the name of tensor info #{index}"),
            What::Tensor { name, field } => write!(f, "the {field} of tensor '{name}'"),
        }
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: u64,
    /// Set when the file's end is known: reading past it is truncation, not a short prefix.
    file_len: Option<u64>,
    /// Array elements the rest of the header may still hold (see MAX_ARRAY_ELEMENTS).
    elements_left: u64,
}

impl<'a> Cursor<'a> {
    /// The next `n` bytes, or why they are not there.
    fn take(&mut self, n: u64, what: What) -> R<&'a [u8]> {
        let start = self.pos;
        let end = start.saturating_add(n);
        // The cap holds whether or not the bytes are in hand, so that a whole file and its
        // prefixes give the same answer.
        if end > MAX_HEADER_BYTES {
            return Err(GgufError::HeaderTooLarge { what: what.to_string(), offset: start }.into());
        }
        if end <= self.buf.len() as u64 {
            self.pos = end;
            // Both bounds are within `buf`, whose length is a usize.
            return Ok(&self.buf[start as usize..end as usize]);
        }
        match self.file_len {
            Some(file_len) if end > file_len => Err(GgufError::Truncated { what: what.to_string(), offset: start, needed: n, file_len }.into()),
            _ => Err(Stop::NeedMore(end)),
        }
    }

    fn array<const N: usize>(&mut self, what: What) -> R<[u8; N]> {
        let b = self.take(N as u64, what)?;
        let mut a = [0; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    fn u32(&mut self, what: What) -> R<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: What) -> R<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Header bytes left before the cap on header size.
    fn room(&self) -> u64 {
        MAX_HEADER_BYTES.saturating_sub(self.pos)
    }

    /// Capacity to reserve for `count` entries: no more than the bytes in hand could hold,
    /// so a lying count costs nothing until the bytes behind it have been read.
    fn capacity(&self, count: u64, min_size: u64) -> usize {
        let in_hand = (self.buf.len() as u64).saturating_sub(self.pos);
        count.min(in_hand / min_size.max(1)) as usize
    }

    fn string(&mut self, what: What) -> R<String> {
        let start = self.pos;
        let len = self.u64(what)?;
        let max = self.room();
        if len > max {
            return Err(GgufError::StringTooLong { what: what.to_string(), offset: start, len, max }.into());
        }
        let text_start = self.pos;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(GgufError::InvalidUtf8 { what: what.to_string(), offset: text_start + e.valid_up_to() as u64 }.into()),
        }
    }

    fn value_type(&mut self, key: &str, what: What) -> R<ValueType> {
        let offset = self.pos;
        let ty = self.u32(what)?;
        ValueType::from_id(ty).ok_or_else(|| GgufError::UnknownValueType { what: What::Value { key }.to_string(), offset, ty }.into())
    }

    /// One value of type `ty`; `depth` is the number of arrays around it.
    fn value(&mut self, ty: ValueType, key: &str, depth: usize) -> R<MetadataValue> {
        use MetadataValue as V;
        let what = What::Value { key };
        Ok(match ty {
            ValueType::U8 => V::U8(self.array::<1>(what)?[0]),
            ValueType::I8 => V::I8(i8::from_le_bytes(self.array(what)?)),
            ValueType::U16 => V::U16(u16::from_le_bytes(self.array(what)?)),
            ValueType::I16 => V::I16(i16::from_le_bytes(self.array(what)?)),
            ValueType::U32 => V::U32(self.u32(what)?),
            ValueType::I32 => V::I32(i32::from_le_bytes(self.array(what)?)),
            ValueType::F32 => V::F32(f32::from_le_bytes(self.array(what)?)),
            ValueType::U64 => V::U64(self.u64(what)?),
            ValueType::I64 => V::I64(i64::from_le_bytes(self.array(what)?)),
            ValueType::F64 => V::F64(f64::from_le_bytes(self.array(what)?)),
            ValueType::Bool => {
                let offset = self.pos;
                match self.array::<1>(what)?[0] {
                    0 => V::Bool(false),
                    1 => V::Bool(true),
                    value => return Err(GgufError::BadBool { what: what.to_string(), offset, value }.into()),
                }
            }
            ValueType::String => V::String(self.string(what)?),
            ValueType::Array => self.array_value(key, depth)?,
        })
    }

    fn array_value(&mut self, key: &str, depth: usize) -> R<MetadataValue> {
        let what = What::Value { key };
        let start = self.pos;
        if depth + 1 > MAX_NESTING {
            return Err(GgufError::NestingTooDeep { key: key.to_string(), offset: start, max: MAX_NESTING }.into());
        }
        let elem_type = self.value_type(key, what)?;
        let len = self.u64(what)?;
        let max = self.elements_left.min(self.room() / elem_type.min_size());
        if len > max {
            let elem_type = elem_type.name();
            return Err(GgufError::ArrayTooLong { key: key.to_string(), offset: start, len, elem_type, max }.into());
        }
        self.elements_left -= len;
        let capacity = match elem_type.fixed_size() {
            Some(size) => {
                // Ask for the whole run at once: from a prefix that is one NeedMore, not one
                // per element. len <= room / size, so the product cannot overflow.
                let items_start = self.pos;
                self.take(len * size, what)?;
                self.pos = items_start;
                len as usize
            }
            None => self.capacity(len, elem_type.min_size()),
        };
        let mut items = Vec::with_capacity(capacity);
        for _ in 0..len {
            items.push(self.value(elem_type, key, depth + 1)?);
        }
        Ok(MetadataValue::Array { elem_type, items })
    }

    fn tensor_info(&mut self, index: u64, names: &mut HashSet<String>, alignment: u64) -> R<TensorInfo> {
        let name_offset = self.pos;
        let name = self.string(What::TensorName { index })?;
        if names.contains(&name) {
            return Err(GgufError::DuplicateTensor { tensor: name, offset: name_offset }.into());
        }
        let field = |field| What::Tensor { name: &name, field };

        let n_dims_offset = self.pos;
        let n_dims = self.u32(field("dimension count"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(GgufError::TooManyDims { tensor: name, n_dims, offset: n_dims_offset }.into());
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64(field("dimensions"))?);
        }
        let type_offset = self.pos;
        let id = self.u32(field("type"))?;
        let offset = self.u64(field("data offset"))?;

        let Some(ty) = GgmlType::from_id(id) else {
            return Err(GgufError::UnknownTensorType { tensor: name, id, offset: type_offset }.into());
        };
        check_dims(&name, &dims, ty)?;
        if !offset.is_multiple_of(alignment) {
            return Err(GgufError::MisalignedOffset { tensor: name, offset, alignment }.into());
        }
        names.insert(name.clone());
        Ok(TensorInfo { name, dims, ty, offset })
    }
}

/// Dims must give a nonzero element count and byte size that fit ggml's int64 sizes, with
/// rows made of whole blocks. After this, TensorInfo's size methods cannot overflow.
fn check_dims(name: &str, dims: &[u64], ty: GgmlType) -> Result<(), GgufError> {
    let bad = |reason| GgufError::ZeroOrOverflowingDims { tensor: name.to_string(), dims: dims.to_vec(), reason };
    if dims.contains(&0) {
        return Err(bad("a dimension is zero"));
    }
    let n = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d)).filter(|&n| n <= i64::MAX as u64);
    if n.is_none() {
        return Err(bad("the element count overflows"));
    }
    let ne0 = dims[0];
    let block = ty.block_elems();
    if !ne0.is_multiple_of(block as u64) {
        return Err(GgufError::RowNotWholeBlocks { tensor: name.to_string(), ty, ne0, block });
    }
    let rows: u64 = dims[1..].iter().product(); // divides n, so no overflow
    let size = ty.row_bytes(ne0).and_then(|b| b.checked_mul(rows)).filter(|&s| s <= i64::MAX as u64);
    if size.is_none() {
        return Err(bad("the size in bytes overflows"));
    }
    Ok(())
}

/// `file_len`: where the file ends, when known (always when `buf` is the whole file).
fn parse(buf: &[u8], file_len: Option<u64>) -> R<Gguf> {
    let buf = match file_len {
        Some(len) if len < buf.len() as u64 => &buf[..len as usize],
        _ => buf,
    };
    let mut c = Cursor { buf, pos: 0, file_len, elements_left: MAX_ARRAY_ELEMENTS };

    let magic = c.array::<4>(What::Magic)?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic { found: magic }.into());
    }
    // Versions 2 and 3 share one layout (3 only added big-endian files); 1 had 32-bit counts.
    let version = c.u32(What::Version)?;
    if version != 2 && version != 3 {
        return Err(GgufError::UnsupportedVersion { version }.into());
    }
    let tensor_count_offset = c.pos;
    let tensor_count = c.u64(What::TensorCount)?;
    let kv_count_offset = c.pos;
    let kv_count = c.u64(What::KvCount)?;
    let max = MAX_TENSORS.min(c.room() / MIN_TENSOR_INFO_BYTES);
    if tensor_count > max {
        let e = GgufError::CountTooLarge { what: "tensor count", offset: tensor_count_offset, count: tensor_count, max };
        return Err(e.into());
    }
    let max = MAX_METADATA_KVS.min(c.room() / MIN_KV_BYTES);
    if kv_count > max {
        let what = "metadata key-value count";
        return Err(GgufError::CountTooLarge { what, offset: kv_count_offset, count: kv_count, max }.into());
    }

    let mut metadata = Vec::with_capacity(c.capacity(kv_count, MIN_KV_BYTES));
    let mut keys = HashSet::new();
    for index in 0..kv_count {
        let key_offset = c.pos;
        let key = c.string(What::Key { index })?;
        if keys.contains(&key) {
            return Err(GgufError::DuplicateKey { key, offset: key_offset }.into());
        }
        let ty = c.value_type(&key, What::ValueType { key: &key })?;
        let value = c.value(ty, &key, 0)?;
        keys.insert(key.clone());
        metadata.push((key, value));
    }

    let alignment = alignment(&metadata)?;
    let mut tensors = Vec::with_capacity(c.capacity(tensor_count, MIN_TENSOR_INFO_BYTES));
    let mut names = HashSet::new();
    for index in 0..tensor_count {
        tensors.push(c.tensor_info(index, &mut names, alignment)?);
    }

    // c.pos <= MAX_HEADER_BYTES and alignment <= 2^31, so this cannot overflow.
    let data_offset = c.pos.div_ceil(alignment) * alignment;
    check_layout(&tensors, data_offset)?;
    Ok(Gguf { version, metadata, tensors, alignment, data_offset })
}

fn alignment(metadata: &[(String, MetadataValue)]) -> Result<u64, GgufError> {
    const KEY: &str = "general.alignment";
    let Some((_, v)) = metadata.iter().find(|(k, _)| k == KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let Some(a) = v.as_i128() else {
        return Err(GgufError::WrongMetadataType { key: KEY.to_string(), expected: "a u32", found: v.type_name() });
    };
    // ggml stores the alignment as a u32.
    match u32::try_from(a) {
        Ok(a) if a.is_power_of_two() => Ok(a.into()),
        _ => Err(GgufError::BadAlignment { value: a.to_string() }),
    }
}

/// Every tensor's data must have a representable end and no two may share bytes.
fn check_layout(tensors: &[TensorInfo], data_offset: u64) -> Result<(), GgufError> {
    for t in tensors {
        if data_offset.checked_add(t.offset).and_then(|o| o.checked_add(t.size_bytes())).is_none() {
            return Err(GgufError::OffsetOverflow { tensor: t.name.clone(), offset: t.offset });
        }
    }
    let mut order: Vec<&TensorInfo> = tensors.iter().collect();
    order.sort_by_key(|t| t.offset);
    for pair in order.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let a_end = a.offset + a.size_bytes(); // checked above
        if a_end > b.offset {
            return Err(GgufError::OverlappingTensors { first: a.name.clone(), second: b.name.clone(), first_end: a_end, second_start: b.offset });
        }
    }
    Ok(())
}

/// The whole file is `bytes`.
pub(super) fn parse_file(bytes: &[u8]) -> Result<Gguf, GgufError> {
    let len = bytes.len() as u64;
    match parse(bytes, Some(len)) {
        Ok(g) => {
            g.check_file_len(len)?;
            Ok(g)
        }
        Err(Stop::Err(e)) => Err(e),
        // With the file's end known every short read is Truncated; this arm only keeps the
        // function total.
        Err(Stop::NeedMore(at_least)) => Err(GgufError::Truncated { what: "the header".to_string(), offset: len, needed: at_least.saturating_sub(len), file_len: len }),
    }
}

pub(super) fn parse_prefix(prefix: &[u8], file_len: Option<u64>) -> Result<Parse, GgufError> {
    match parse(prefix, file_len) {
        Ok(g) => {
            if let Some(len) = file_len {
                g.check_file_len(len)?;
            }
            Ok(Parse::Complete(g))
        }
        Err(Stop::Err(e)) => Err(e),
        // at_least <= MAX_HEADER_BYTES, which fits a usize even on wasm32.
        Err(Stop::NeedMore(at_least)) => Ok(Parse::NeedMore { at_least: at_least as usize }),
    }
}
