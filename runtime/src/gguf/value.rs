//! Metadata values: the 13 GGUF value types and conversions the typed getters build on.

use std::fmt;

/// The type tag GGUF stores before each metadata value and each array's elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)] // each variant is the value type its name says, in GGUF's id order
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    const ALL: [ValueType; 13] = [
        ValueType::U8,
        ValueType::I8,
        ValueType::U16,
        ValueType::I16,
        ValueType::U32,
        ValueType::I32,
        ValueType::F32,
        ValueType::Bool,
        ValueType::String,
        ValueType::Array,
        ValueType::U64,
        ValueType::I64,
        ValueType::F64,
    ];

    /// The type of a tag in the file, or None for an unknown tag.
    pub fn from_id(id: u32) -> Option<ValueType> {
        Self::ALL.get(id as usize).copied()
    }

    /// Its tag in the file.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Its name in messages (`u32`, `string`, ...).
    pub fn name(self) -> &'static str {
        use ValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// Bytes a value of this type takes in the file, at least: what bounds how many array
    /// elements (or key-value pairs) a given number of bytes can hold.
    pub(crate) fn min_size(self) -> u64 {
        use ValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,    // the length
            Array => 4 + 8, // element type and length
        }
    }

    /// The exact size for types whose values all have one size.
    pub(crate) fn fixed_size(self) -> Option<u64> {
        match self {
            ValueType::String | ValueType::Array => None,
            t => Some(t.min_size()),
        }
    }

    /// Whether it is one of the eight integer types.
    pub fn is_integer(self) -> bool {
        use ValueType::*;
        matches!(self, U8 | I8 | U16 | I16 | U32 | I32 | U64 | I64)
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value as the file stores it.
#[derive(Clone, Debug, PartialEq)]
#[allow(missing_docs)] // each variant holds a value of the GGUF type its name says
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    /// `elem_type` is kept because an empty array still has one, and writing the file back
    /// must reproduce it. Every item has that type (arrays of arrays may differ inside).
    Array {
        elem_type: ValueType,
        items: Vec<MetadataValue>,
    },
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetadataValue {
    /// Its GGUF type.
    pub fn value_type(&self) -> ValueType {
        use MetadataValue as V;
        match self {
            V::U8(_) => ValueType::U8,
            V::I8(_) => ValueType::I8,
            V::U16(_) => ValueType::U16,
            V::I16(_) => ValueType::I16,
            V::U32(_) => ValueType::U32,
            V::I32(_) => ValueType::I32,
            V::F32(_) => ValueType::F32,
            V::Bool(_) => ValueType::Bool,
            V::String(_) => ValueType::String,
            V::Array { .. } => ValueType::Array,
            V::U64(_) => ValueType::U64,
            V::I64(_) => ValueType::I64,
            V::F64(_) => ValueType::F64,
        }
    }

    /// "u32", "array of string", ...: for error messages.
    pub fn type_name(&self) -> String {
        match self {
            MetadataValue::Array { elem_type, .. } => format!("array of {elem_type}"),
            v => v.value_type().name().to_string(),
        }
    }

    /// Any integer type, widened; `None` for non-integers (bools included).
    pub fn as_i128(&self) -> Option<i128> {
        use MetadataValue as V;
        Some(match *self {
            V::U8(x) => x.into(),
            V::I8(x) => x.into(),
            V::U16(x) => x.into(),
            V::I16(x) => x.into(),
            V::U32(x) => x.into(),
            V::I32(x) => x.into(),
            V::U64(x) => x.into(),
            V::I64(x) => x.into(),
            _ => return None,
        })
    }

    /// Any integer type whose value fits in a u64.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_i128().and_then(|x| u64::try_from(x).ok())
    }

    /// Any integer type whose value fits in an i64.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_i128().and_then(|x| i64::try_from(x).ok())
    }

    /// F32 or F64 (not integers: a float key stored as an integer is a writer bug worth seeing).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(x) => Some(x.into()),
            MetadataValue::F64(x) => Some(x),
            _ => None,
        }
    }

    /// The text of a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value of a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The items of an array.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array { items, .. } => Some(items),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn str_array<I, S>(items: I) -> MetadataValue
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let items = items.into_iter().map(|s| MetadataValue::String(s.into())).collect();
        MetadataValue::Array { elem_type: ValueType::String, items }
    }

    /// An array of f32s.
    pub fn f32_array(items: impl IntoIterator<Item = f32>) -> MetadataValue {
        let items = items.into_iter().map(MetadataValue::F32).collect();
        MetadataValue::Array { elem_type: ValueType::F32, items }
    }

    /// An array of i32s.
    pub fn i32_array(items: impl IntoIterator<Item = i32>) -> MetadataValue {
        let items = items.into_iter().map(MetadataValue::I32).collect();
        MetadataValue::Array { elem_type: ValueType::I32, items }
    }

    /// An array of u32s.
    pub fn u32_array(items: impl IntoIterator<Item = u32>) -> MetadataValue {
        let items = items.into_iter().map(MetadataValue::U32).collect();
        MetadataValue::Array { elem_type: ValueType::U32, items }
    }
}

macro_rules! from_scalar {
    ($($t:ty => $v:ident),*) => {$(
        impl From<$t> for MetadataValue {
            fn from(x: $t) -> Self {
                MetadataValue::$v(x)
            }
        }
    )*};
}
from_scalar!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32,
    bool => Bool, String => String, u64 => U64, i64 => I64, f64 => F64);

impl From<&str> for MetadataValue {
    fn from(s: &str) -> Self {
        MetadataValue::String(s.to_string())
    }
}

/// Short and single-line, for CLIs listing metadata: long strings and arrays are elided.
impl fmt::Display for MetadataValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use MetadataValue as V;
        const MAX_STR: usize = 60;
        const MAX_ITEMS: usize = 6;
        match self {
            V::U8(x) => write!(f, "{x}"),
            V::I8(x) => write!(f, "{x}"),
            V::U16(x) => write!(f, "{x}"),
            V::I16(x) => write!(f, "{x}"),
            V::U32(x) => write!(f, "{x}"),
            V::I32(x) => write!(f, "{x}"),
            V::U64(x) => write!(f, "{x}"),
            V::I64(x) => write!(f, "{x}"),
            V::F32(x) => write!(f, "{x}"),
            V::F64(x) => write!(f, "{x}"),
            V::Bool(x) => write!(f, "{x}"),
            V::String(s) if s.chars().count() > MAX_STR => {
                let head: String = s.chars().take(MAX_STR).collect();
                write!(f, "{head:?}… ({} bytes)", s.len())
            }
            V::String(s) => write!(f, "{s:?}"),
            V::Array { elem_type, items } => {
                write!(f, "[{elem_type}; {}", items.len())?;
                for (i, item) in items.iter().take(MAX_ITEMS).enumerate() {
                    write!(f, "{}{item}", if i == 0 { ": " } else { ", " })?;
                }
                if items.len() > MAX_ITEMS {
                    f.write_str(", …")?;
                }
                f.write_str("]")
            }
        }
    }
}
