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

/// The length of the first complete encoded value in `bytes`.
pub fn first_value_len(bytes: &[u8]) -> Result<usize, serde_amqp::Error> {
    use serde_amqp::read::Read;
    let mut reader = serde_amqp::read::SliceReader::new(bytes);
    serde_amqp::lazy::LazyValue::from_reader(&mut reader)?;
    Ok(reader.bytes_consumed())
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
