//! AMQP values on the wire: an encoder for what this endpoint writes, and
//! lenient readers for what clients send.
//!
//! Everything the endpoint builds (message sections, management replies) is
//! encoded here rather than through `serde_amqp`'s serializer, because the
//! SDKs depend on byte-level details it does not let us choose: a header
//! whose `delivery-count` is written even when 0 (it trims default fields),
//! and empty arrays that carry an element type (go-amqp cannot parse one
//! without). Incoming values are decoded with `serde_amqp` into its generic
//! [`Value`] and read through the helpers below, which accept either string
//! or symbol keys, as the three SDKs differ there.

use serde_amqp::Value;
use serde_amqp::described::Described;
use serde_amqp::descriptor::Descriptor;

/// A value to encode.
#[derive(Debug, Clone, PartialEq)]
pub enum Amqp {
    Null,
    Bool(bool),
    Ubyte(u8),
    Uint(u32),
    Ulong(u64),
    Int(i32),
    Long(i64),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
    Uuid([u8; 16]),
    Binary(Vec<u8>),
    String(String),
    Symbol(String),
    List(Vec<Amqp>),
    Map(Vec<(Amqp, Amqp)>),
    /// Elements all of `kind`.
    Array(ArrayOf, Vec<Amqp>),
    Described(u64, Box<Amqp>),
    /// Already encoded bytes, written as they are.
    Raw(Vec<u8>),
}

/// The element type of an [`Amqp::Array`]: it is written even when the
/// array is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArrayOf {
    Long,
    Timestamp,
    Uuid,
    Symbol,
    Map,
}

impl ArrayOf {
    fn constructor(self) -> u8 {
        match self {
            ArrayOf::Long => 0x81,
            ArrayOf::Timestamp => 0x83,
            ArrayOf::Uuid => 0x98,
            ArrayOf::Symbol => 0xb3,
            ArrayOf::Map => 0xd1,
        }
    }
}

impl Amqp {
    pub fn string(s: impl Into<String>) -> Amqp {
        Amqp::String(s.into())
    }

    pub fn symbol(s: impl Into<String>) -> Amqp {
        Amqp::Symbol(s.into())
    }

    /// A described value with a numeric descriptor (what every section and
    /// performative uses).
    pub fn described(code: u64, value: Amqp) -> Amqp {
        Amqp::Described(code, Box::new(value))
    }

    /// The encoded bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Amqp::Null => out.push(0x40),
            Amqp::Bool(true) => out.push(0x41),
            Amqp::Bool(false) => out.push(0x42),
            Amqp::Ubyte(v) => out.extend([0x50, *v]),
            Amqp::Uint(0) => out.push(0x43),
            Amqp::Uint(v) => {
                out.push(0x70);
                out.extend(v.to_be_bytes());
            }
            Amqp::Ulong(v) => {
                out.push(0x80);
                out.extend(v.to_be_bytes());
            }
            Amqp::Int(v) => {
                out.push(0x71);
                out.extend(v.to_be_bytes());
            }
            Amqp::Long(v) => {
                out.push(0x81);
                out.extend(v.to_be_bytes());
            }
            Amqp::Timestamp(v) => {
                out.push(0x83);
                out.extend(v.to_be_bytes());
            }
            Amqp::Uuid(v) => {
                out.push(0x98);
                out.extend(v);
            }
            Amqp::Binary(v) => variable(out, 0xb0, v),
            Amqp::String(v) => variable(out, 0xb1, v.as_bytes()),
            Amqp::Symbol(v) => variable(out, 0xb3, v.as_bytes()),
            Amqp::List(items) => {
                let mut body = Vec::new();
                items.iter().for_each(|i| i.encode(&mut body));
                compound(out, 0xd0, items.len(), &body);
            }
            Amqp::Map(pairs) => {
                let mut body = Vec::new();
                for (k, v) in pairs {
                    k.encode(&mut body);
                    v.encode(&mut body);
                }
                compound(out, 0xd1, pairs.len() * 2, &body);
            }
            Amqp::Array(kind, items) => {
                let mut body = vec![kind.constructor()];
                for item in items {
                    // An element is its encoding without the constructor byte.
                    let mut one = Vec::new();
                    element(item, &mut one);
                    body.extend(one);
                }
                compound(out, 0xf0, items.len(), &body);
            }
            Amqp::Described(code, value) => {
                // smallulong where it fits: pyamqp reads a section's code from the third byte.
                match u8::try_from(*code) {
                    Ok(small) => out.extend([0x00, 0x53, small]),
                    Err(_) => {
                        out.extend([0x00, 0x80]);
                        out.extend(code.to_be_bytes());
                    }
                }
                value.encode(out);
            }
            Amqp::Raw(bytes) => out.extend(bytes),
        }
    }
}

fn variable(out: &mut Vec<u8>, code32: u8, bytes: &[u8]) {
    out.push(code32);
    out.extend(u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend(bytes);
}

/// list32, map32 and array32: size covers the count and the body.
fn compound(out: &mut Vec<u8>, code32: u8, count: usize, body: &[u8]) {
    out.push(code32);
    out.extend(u32::try_from(body.len() + 4).unwrap_or(u32::MAX).to_be_bytes());
    out.extend(u32::try_from(count).unwrap_or(u32::MAX).to_be_bytes());
    out.extend(body);
}

/// An array element: the fixed-width forms the array constructors above name.
fn element(item: &Amqp, out: &mut Vec<u8>) {
    match item {
        Amqp::Long(v) | Amqp::Timestamp(v) => out.extend(v.to_be_bytes()),
        Amqp::Uuid(v) => out.extend(v),
        Amqp::Symbol(v) => {
            out.extend(u32::try_from(v.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend(v.as_bytes());
        }
        Amqp::Map(_) => {
            let mut full = Vec::new();
            item.encode(&mut full);
            out.extend(full.get(1..).unwrap_or_default());
        }
        other => other.encode(out),
    }
}

/// Decodes one value of any type.
pub fn decode(bytes: &[u8]) -> Result<Value, serde_amqp::Error> {
    serde_amqp::from_slice(bytes)
}

/// Why bytes do not begin with one well-formed AMQP value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodingError {
    #[error("an AMQP value is cut short")]
    Truncated,
    #[error("{0:#04x} is not an AMQP type constructor")]
    BadConstructor(u8),
    #[error("AMQP values nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("a compound AMQP value does not fill its declared size")]
    SizeMismatch,
    #[error("an AMQP map with an odd number of keys and values")]
    OddMapCount,
}

/// Deeper than any message or performative the SDKs send.
const MAX_DEPTH: usize = 32;

/// The length of the first complete encoded value in `bytes`, every size
/// and count inside it checked against the bytes actually there.
///
/// Peers' bytes are measured here, without allocating, before `serde_amqp`
/// decodes them: its reader allocates whatever length a value declares
/// before looking for the bytes, so four bytes claiming a 2 GiB binary
/// made it ask for 2 GiB (found by `cargo xtask fuzz`).
pub fn first_value_len(bytes: &[u8]) -> Result<usize, EncodingError> {
    value_len(bytes, 0)
}

fn value_len(bytes: &[u8], depth: usize) -> Result<usize, EncodingError> {
    let (head, code) = constructor(bytes, depth)?;
    Ok(head + body_len(code, bytes.get(head..).ok_or(EncodingError::Truncated)?, depth)?)
}

/// A constructor's length and its primitive type code; a described one
/// carries its descriptor, a value of its own.
fn constructor(bytes: &[u8], depth: usize) -> Result<(usize, u8), EncodingError> {
    if depth > MAX_DEPTH {
        return Err(EncodingError::TooDeep);
    }
    match bytes.first() {
        None => Err(EncodingError::Truncated),
        Some(0x00) => {
            let descriptor = 1 + value_len(&bytes[1..], depth + 1)?;
            let (inner, code) = constructor(bytes.get(descriptor..).ok_or(EncodingError::Truncated)?, depth + 1)?;
            Ok((descriptor + inner, code))
        }
        Some(code) => Ok((1, *code)),
    }
}

/// The length of a value's data after a constructor with `code`.
fn body_len(code: u8, bytes: &[u8], depth: usize) -> Result<usize, EncodingError> {
    let len = match code >> 4 {
        0x4 => 0,
        0x5 => 1,
        0x6 => 2,
        0x7 => 4,
        0x8 => 8,
        0x9 => 16,
        0xa => 1 + size(bytes, 1)?,
        0xb => 4 + size(bytes, 4)?,
        0xc => compound_len(code, bytes, 1, depth)?,
        0xd => compound_len(code, bytes, 4, depth)?,
        0xe => array_len(bytes, 1, depth)?,
        0xf => array_len(bytes, 4, depth)?,
        _ => return Err(EncodingError::BadConstructor(code)),
    };
    if len > bytes.len() {
        return Err(EncodingError::Truncated);
    }
    Ok(len)
}

/// A size or count of `width` bytes at the start of `bytes`.
fn size(bytes: &[u8], width: usize) -> Result<usize, EncodingError> {
    let field = bytes.get(..width).ok_or(EncodingError::Truncated)?;
    Ok(field.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b)))
}

/// The size and count fields, and the elements they frame.
fn framed(bytes: &[u8], width: usize) -> Result<(usize, usize, &[u8]), EncodingError> {
    let size = size(bytes, width)?;
    let inner = bytes.get(width..width + size).ok_or(EncodingError::Truncated)?;
    let count = self::size(inner, width).map_err(|_| EncodingError::SizeMismatch)?;
    Ok((width + size, count, &inner[width..]))
}

/// A list or map: `count` values, each with its own constructor.
fn compound_len(code: u8, bytes: &[u8], width: usize, depth: usize) -> Result<usize, EncodingError> {
    let (len, count, elements) = framed(bytes, width)?;
    // A map counts keys and values; `serde_amqp` takes two at a time and
    // underflows on an odd count.
    if matches!(code, 0xc1 | 0xd1) && count % 2 == 1 {
        return Err(EncodingError::OddMapCount);
    }
    // Every element takes at least its constructor byte.
    if count > elements.len() {
        return Err(EncodingError::SizeMismatch);
    }
    let mut at = 0;
    for _ in 0..count {
        at += value_len(&elements[at..], depth + 1)?;
    }
    if at != elements.len() {
        return Err(EncodingError::SizeMismatch);
    }
    Ok(len)
}

/// An array: one constructor, then `count` values without one.
fn array_len(bytes: &[u8], width: usize, depth: usize) -> Result<usize, EncodingError> {
    let (len, count, rest) = framed(bytes, width)?;
    // Some encoders leave the element constructor out of an empty array.
    if count == 0 && rest.is_empty() {
        return Ok(len);
    }
    let (head, code) = constructor(rest, depth + 1)?;
    let elements = rest.get(head..).ok_or(EncodingError::Truncated)?;
    // Elements of a zero-width type (null, true, ...) take no bytes, so
    // their count is capped by the array's size instead.
    if count > elements.len().max(len) {
        return Err(EncodingError::SizeMismatch);
    }
    let mut at = 0;
    for _ in 0..count {
        at += body_len(code, &elements[at..], depth + 1)?;
    }
    if at != elements.len() {
        return Err(EncodingError::SizeMismatch);
    }
    Ok(len)
}

/// The numeric descriptor of a described value, names mapped to codes.
pub fn descriptor_code(described: &Described<Value>) -> Option<u64> {
    match &described.descriptor {
        Descriptor::Code(code) => Some(*code),
        Descriptor::Name(name) => NAMED.iter().find(|(n, _)| *n == name.as_str()).map(|(_, code)| *code),
    }
}

const NAMED: [(&str, u64); 9] = [
    ("amqp:header:list", 0x70),
    ("amqp:delivery-annotations:map", 0x71),
    ("amqp:message-annotations:map", 0x72),
    ("amqp:properties:list", 0x73),
    ("amqp:application-properties:map", 0x74),
    ("amqp:data:binary", 0x75),
    ("amqp:amqp-sequence:list", 0x76),
    ("amqp:amqp-value:*", 0x77),
    ("amqp:footer:map", 0x78),
];

/// A string or symbol's text.
pub fn text(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) => Some(s),
        Value::Symbol(s) => Some(&s.0),
        _ => None,
    }
}

/// Looks `key` up in a map whose keys may be strings or symbols.
pub fn get<'a>(map: &'a Value, key: &str) -> Option<&'a Value> {
    match map {
        Value::Map(m) => m.iter().find(|(k, _)| text(k) == Some(key)).map(|(_, v)| v),
        _ => None,
    }
}

/// The items of a list or an array.
pub fn items(value: &Value) -> &[Value] {
    match value {
        Value::List(items) => items,
        Value::Array(array) => &array.0,
        _ => &[],
    }
}

/// Any integer type as an i64.
pub fn integer(value: &Value) -> Option<i64> {
    match value {
        Value::Ubyte(v) => Some(i64::from(*v)),
        Value::Ushort(v) => Some(i64::from(*v)),
        Value::Uint(v) => Some(i64::from(*v)),
        Value::Ulong(v) => i64::try_from(*v).ok(),
        Value::Byte(v) => Some(i64::from(*v)),
        Value::Short(v) => Some(i64::from(*v)),
        Value::Int(v) => Some(i64::from(*v)),
        Value::Long(v) => Some(*v),
        _ => None,
    }
}

/// A uuid's 16 bytes (also accepted as 16 bytes of binary).
pub fn uuid(value: &Value) -> Option<[u8; 16]> {
    match value {
        Value::Uuid(u) => Some(u.clone().into_inner()),
        Value::Binary(b) => <[u8; 16]>::try_from(b.as_slice()).ok(),
        _ => None,
    }
}

/// The message-id or correlation-id forms, as text for people and guests.
pub fn id_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Uuid(u) => Some(uuid::Uuid::from_bytes(u.clone().into_inner()).to_string()),
        Value::Ulong(v) => Some(v.to_string()),
        Value::Binary(b) => Some(hex::encode(b.as_slice())),
        _ => None,
    }
}

/// Re-encodes a decoded value as it came (for echoing ids in their type).
pub fn from_value(value: &Value) -> Amqp {
    match value {
        Value::Null => Amqp::Null,
        Value::Bool(v) => Amqp::Bool(*v),
        Value::Ubyte(v) => Amqp::Ubyte(*v),
        Value::Ushort(v) => Amqp::Uint(u32::from(*v)),
        Value::Uint(v) => Amqp::Uint(*v),
        Value::Ulong(v) => Amqp::Ulong(*v),
        Value::Byte(v) => Amqp::Int(i32::from(*v)),
        Value::Short(v) => Amqp::Int(i32::from(*v)),
        Value::Int(v) => Amqp::Int(*v),
        Value::Long(v) => Amqp::Long(*v),
        Value::Timestamp(t) => Amqp::Timestamp(t.milliseconds()),
        Value::Uuid(u) => Amqp::Uuid(u.clone().into_inner()),
        Value::Binary(b) => Amqp::Binary(b.to_vec()),
        Value::String(s) => Amqp::String(s.clone()),
        Value::Symbol(s) => Amqp::Symbol(s.0.clone()),
        Value::List(items) => Amqp::List(items.iter().map(from_value).collect()),
        Value::Map(m) => Amqp::Map(m.iter().map(|(k, v)| (from_value(k), from_value(v))).collect()),
        other => serde_amqp::to_vec(other).map(Amqp::Raw).unwrap_or(Amqp::Null),
    }
}

/// The text form of a simple value, as guests see application properties.
pub fn display(value: &Value) -> Option<String> {
    Some(match value {
        Value::String(s) => s.clone(),
        Value::Symbol(s) => s.0.clone(),
        Value::Bool(v) => v.to_string(),
        Value::Timestamp(t) => t.milliseconds().to_string(),
        Value::Uuid(_) | Value::Binary(_) => id_text(value)?,
        Value::Double(v) => v.to_string(),
        Value::Float(v) => v.to_string(),
        Value::Char(c) => c.to_string(),
        other => integer(other)?.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_we_encode_is_measured_to_the_byte() {
        let values = [
            Amqp::Null,
            Amqp::Uuid([1; 16]),
            Amqp::String("x".repeat(300)),
            Amqp::Binary(vec![9; 5]),
            Amqp::List(vec![]),
            Amqp::Map(vec![(Amqp::symbol("k"), Amqp::List(vec![Amqp::Uint(7), Amqp::Null]))]),
            Amqp::Array(ArrayOf::Timestamp, vec![]),
            Amqp::Array(ArrayOf::Timestamp, vec![Amqp::Timestamp(1), Amqp::Timestamp(2)]),
            Amqp::described(0x70, Amqp::List(vec![Amqp::Bool(true), Amqp::Ubyte(4)])),
        ];
        for value in values {
            let mut bytes = value.to_bytes();
            let len = bytes.len();
            bytes.extend([0x40, 0x41]);
            assert_eq!(first_value_len(&bytes), Ok(len), "{value:?}");
            assert!(decode(&bytes[..len]).is_ok(), "{value:?}");
        }
    }

    /// Each of these made `serde_amqp` allocate what the value claims
    /// before it looked for the bytes (2 to 4 GiB; fuzz/regressions/amqp_*).
    #[test]
    fn sizes_and_counts_that_lie_are_refused_before_anything_is_allocated() {
        let binary_of_2_gib = [0xb0, 0x80, 0, 0, 0x15, 1, 2, 3];
        assert_eq!(first_value_len(&binary_of_2_gib), Err(EncodingError::Truncated));
        let list_of_4g_in_12_bytes =
            [0xd0, 0, 0, 0, 12, 0xff, 0xff, 0xff, 0xff, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40, 0x40];
        assert_eq!(first_value_len(&list_of_4g_in_12_bytes), Err(EncodingError::SizeMismatch));
        let header_sized_past_the_end = [0x00, 0x53, 0x70, 0xd0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(first_value_len(&header_sized_past_the_end), Err(EncodingError::Truncated));
        let array_of_4g_nulls = [0xf0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0x40];
        assert_eq!(first_value_len(&array_of_4g_nulls), Err(EncodingError::SizeMismatch));
        let element_past_its_list = [0xc0, 3, 1, 0xa1, 9, b'a'];
        assert_eq!(first_value_len(&element_past_its_list), Err(EncodingError::Truncated));
        assert_eq!(first_value_len(&[0x21]), Err(EncodingError::BadConstructor(0x21)));
        let map_of_one_key = [0xc1, 3, 1, 0xa1, 0];
        assert_eq!(first_value_len(&map_of_one_key), Err(EncodingError::OddMapCount));
        assert_eq!(first_value_len(&[]), Err(EncodingError::Truncated));
    }

    #[test]
    fn nesting_is_bounded() {
        let mut deep = Amqp::Null;
        for _ in 0..100 {
            deep = Amqp::List(vec![deep]);
        }
        assert_eq!(first_value_len(&deep.to_bytes()), Err(EncodingError::TooDeep));
        let mut descriptors = vec![0x00; 100];
        descriptors.push(0x40);
        assert_eq!(first_value_len(&descriptors), Err(EncodingError::TooDeep));
    }

    #[test]
    fn what_we_encode_decodes_to_the_same_values() -> Result<(), serde_amqp::Error> {
        let value = Amqp::Map(vec![
            (Amqp::string("expirations"), Amqp::Array(ArrayOf::Timestamp, vec![Amqp::Timestamp(5)])),
            (Amqp::symbol("n"), Amqp::List(vec![Amqp::Uint(0), Amqp::Uint(300), Amqp::Bool(true), Amqp::Null])),
            (Amqp::string("id"), Amqp::Uuid([7; 16])),
        ]);
        let decoded = decode(&value.to_bytes())?;
        let stamps = items(get(&decoded, "expirations").ok_or(serde_amqp::Error::InvalidValue)?);
        assert!(matches!(&stamps[0], Value::Timestamp(t) if t.milliseconds() == 5));
        assert_eq!(uuid(get(&decoded, "id").ok_or(serde_amqp::Error::InvalidValue)?), Some([7; 16]));
        assert_eq!(
            from_value(get(&decoded, "n").ok_or(serde_amqp::Error::InvalidValue)?),
            Amqp::List(vec![Amqp::Uint(0), Amqp::Uint(300), Amqp::Bool(true), Amqp::Null])
        );
        Ok(())
    }

    /// (serde_amqp 0.18 reads such an array's element constructor as the
    /// next value, so this is checked byte by byte, not by decoding.)
    #[test]
    fn an_empty_array_keeps_its_element_type() {
        // go-amqp refuses `e0 01 00` (no element constructor).
        assert_eq!(Amqp::Array(ArrayOf::Timestamp, vec![]).to_bytes(), [0xf0, 0, 0, 0, 5, 0, 0, 0, 0, 0x83]);
    }

    #[test]
    fn a_zero_is_written_not_trimmed() {
        let header = Amqp::described(0x70, Amqp::List(vec![Amqp::Bool(true), Amqp::Uint(0)]));
        let bytes = header.to_bytes();
        assert_eq!(bytes.last(), Some(&0x43), "uint0 is still a value");
    }
}
