//! AMQP 1.0 framing: protocol headers, the 8-byte frame header, and the
//! performative (or SASL frame) each frame body starts with.
//!
//! Performatives decode into `fe2o3-amqp-types`' typed structs. Those insist
//! on symbol keys in every map, while go-amqp and rhea write the `info` map
//! of an error (a dead-letter disposition's reason) with string keys; such a
//! body is decoded generically, its string keys turned into symbols, and
//! decoded again.

use bytes::{Buf, BytesMut};
use fe2o3_amqp_types::definitions::{Error as AmqpError, ErrorCondition};
use fe2o3_amqp_types::performatives::Performative;
use fe2o3_amqp_types::sasl::{SaslInit, SaslMechanisms, SaslOutcome};
use serde_amqp::Value;
use serde_amqp::described::Described;
use serde_amqp::primitives::{OrderedMap, Symbol};

use super::wire;

/// `AMQP` 3 1 0 0: the client wants SASL first.
pub const SASL_HEADER: [u8; 8] = *b"AMQP\x03\x01\x00\x00";
/// `AMQP` 0 1 0 0: plain AMQP 1.0.
pub const AMQP_HEADER: [u8; 8] = *b"AMQP\x00\x01\x00\x00";

const TYPE_AMQP: u8 = 0;
const TYPE_SASL: u8 = 1;

/// Why the bytes a peer sent are not AMQP this endpoint can read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a frame of {size} bytes is over the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("a frame declares {0} bytes, fewer than its own header")]
    TooSmall(usize),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("cannot decode a frame body: {0}")]
    Decode(String),
    #[error("unexpected protocol header {0:02x?}")]
    Header([u8; 8]),
}

/// A whole frame read off the wire.
#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "one frame is handled at a time; boxing would only add an allocation")]
pub enum Frame {
    /// An empty frame: the peer is alive.
    Heartbeat,
    Amqp {
        channel: u16,
        performative: Performative,
        payload: BytesMut,
    },
    Sasl(SaslFrame),
}

/// The SASL frames a server receives.
#[derive(Debug)]
pub enum SaslFrame {
    Init(SaslInit),
    /// Any other SASL frame: never expected from a client.
    Other(u64),
}

/// Takes one whole frame off the front of `buffer`, if it holds one.
pub fn take(buffer: &mut BytesMut, limit: usize) -> Result<Option<Frame>, FrameError> {
    if buffer.len() < 8 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buffer[0], buffer[1], buffer[2], buffer[3]]) as usize;
    if size > limit {
        return Err(FrameError::TooLarge { size, limit });
    }
    let offset = usize::from(buffer[4]) * 4;
    if size < 8 || offset < 8 || offset > size {
        return Err(FrameError::TooSmall(size));
    }
    if buffer.len() < size {
        buffer.reserve(size - buffer.len());
        return Ok(None);
    }
    let kind = buffer[5];
    let channel = u16::from_be_bytes([buffer[6], buffer[7]]);
    let mut frame = buffer.split_to(size);
    frame.advance(offset);
    if frame.is_empty() {
        return Ok(Some(Frame::Heartbeat));
    }
    match kind {
        TYPE_AMQP => {
            let length = wire::first_value_len(&frame).map_err(|e| FrameError::Decode(e.to_string()))?;
            let performative = performative(&frame[..length])?;
            frame.advance(length);
            Ok(Some(Frame::Amqp { channel, performative, payload: frame }))
        }
        TYPE_SASL => Ok(Some(Frame::Sasl(sasl(&frame)?))),
        other => Err(FrameError::UnknownType(other)),
    }
}

fn performative(bytes: &[u8]) -> Result<Performative, FrameError> {
    let strict = match serde_amqp::from_slice::<Performative>(bytes) {
        Ok(performative) => return Ok(performative),
        Err(e) => e,
    };
    let value: Value = serde_amqp::from_slice(bytes).map_err(|e| FrameError::Decode(e.to_string()))?;
    let symbolized = serde_amqp::to_vec(&symbol_keys(value)).map_err(|e| FrameError::Decode(e.to_string()))?;
    serde_amqp::from_slice(&symbolized).map_err(|_| FrameError::Decode(strict.to_string()))
}

/// Inside a performative every map is keyed by symbols (or binary, for
/// `unsettled`), so a string key can only be a client's spelling of one.
fn symbol_keys(value: Value) -> Value {
    match value {
        Value::Described(described) => {
            let Described { descriptor, value } = *described;
            Value::Described(Box::new(Described { descriptor, value: symbol_keys(value) }))
        }
        Value::List(items) => Value::List(items.into_iter().map(symbol_keys).collect()),
        Value::Map(map) => {
            let mut out = OrderedMap::new();
            for (key, value) in map.into_iter() {
                let key = match key {
                    Value::String(s) => Value::Symbol(Symbol::from(s)),
                    other => other,
                };
                out.insert(key, symbol_keys(value));
            }
            Value::Map(out)
        }
        other => other,
    }
}

fn sasl(bytes: &[u8]) -> Result<SaslFrame, FrameError> {
    let length = wire::first_value_len(bytes).map_err(|e| FrameError::Decode(e.to_string()))?;
    let bytes = &bytes[..length];
    let described: Described<Value> = serde_amqp::from_slice(bytes).map_err(|e| FrameError::Decode(e.to_string()))?;
    match wire::descriptor_code(&described) {
        Some(0x41) => serde_amqp::from_slice(bytes).map(SaslFrame::Init).map_err(|e| FrameError::Decode(e.to_string())),
        Some(code) => Ok(SaslFrame::Other(code)),
        None => Err(FrameError::Decode("a SASL frame with an unknown descriptor".into())),
    }
}

/// Appends one frame: header, performative, payload.
pub fn write(out: &mut Vec<u8>, channel: u16, performative: &Performative, payload: &[u8]) {
    match serde_amqp::to_vec(performative) {
        Ok(body) => write_raw(out, TYPE_AMQP, channel, &body, payload),
        // Our own performatives always encode; nothing to send if one did not.
        Err(error) => tracing::error!(%error, "cannot encode a performative"),
    }
}

/// Appends a SASL frame.
pub fn write_sasl<T: serde::Serialize>(out: &mut Vec<u8>, frame: &T) {
    match serde_amqp::to_vec(frame) {
        Ok(body) => write_raw(out, TYPE_SASL, 0, &body, &[]),
        Err(error) => tracing::error!(%error, "cannot encode a SASL frame"),
    }
}

/// Appends an empty frame (a heartbeat).
pub fn write_heartbeat(out: &mut Vec<u8>) {
    out.extend([0, 0, 0, 8, 2, 0, 0, 0]);
}

fn write_raw(out: &mut Vec<u8>, kind: u8, channel: u16, body: &[u8], payload: &[u8]) {
    let size = 8 + body.len() + payload.len();
    out.extend(u32::try_from(size).unwrap_or(u32::MAX).to_be_bytes());
    out.extend([2, kind]);
    out.extend(channel.to_be_bytes());
    out.extend(body);
    out.extend(payload);
}

/// An error to send (in a close, a detach or a rejected outcome), with all
/// three fields on the wire. serde_amqp leaves out a trailing null `info`,
/// and pyamqp reads `info` by position without a length check when it
/// settles a send or takes a close: the IndexError kills its callback, and
/// the send then waits for an outcome it already got.
pub fn error(condition: ErrorCondition, description: String) -> AmqpError {
    AmqpError { condition, description: Some(description), info: Some(Default::default()) }
}

/// The mechanisms offered: ANONYMOUS only; authorization is by CBS token.
pub fn mechanisms() -> SaslMechanisms {
    SaslMechanisms { sasl_server_mechanisms: serde_amqp::primitives::Array(vec![Symbol::from("ANONYMOUS")]) }
}

/// SASL succeeded.
pub fn sasl_ok() -> SaslOutcome {
    SaslOutcome { code: fe2o3_amqp_types::sasl::SaslCode::Ok, additional_data: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fe2o3_amqp_types::definitions::{DeliveryNumber, Role};
    use fe2o3_amqp_types::messaging::{DeliveryState, Rejected};
    use fe2o3_amqp_types::performatives::Disposition;

    fn one(bytes: &[u8]) -> Frame {
        let mut buffer = BytesMut::from(bytes);
        match take(&mut buffer, 1 << 20) {
            Ok(Some(frame)) => frame,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn frames_round_trip_and_partial_ones_wait() {
        let disposition = Performative::Disposition(Disposition {
            role: Role::Receiver,
            first: DeliveryNumber::from(3u32),
            last: None,
            settled: true,
            state: Some(DeliveryState::Rejected(Rejected { error: None })),
            batchable: false,
        });
        let mut out = Vec::new();
        write(&mut out, 7, &disposition, b"");
        write_heartbeat(&mut out);
        let mut buffer = BytesMut::from(&out[..out.len() - 3]);
        assert!(matches!(take(&mut buffer, 1 << 20), Ok(Some(Frame::Amqp { channel: 7, .. }))));
        assert!(matches!(take(&mut buffer, 1 << 20), Ok(None)), "a partial frame waits");
        buffer.extend_from_slice(&out[out.len() - 3..]);
        assert!(matches!(take(&mut buffer, 1 << 20), Ok(Some(Frame::Heartbeat))));
    }

    #[test]
    fn a_dead_letter_disposition_with_string_keys_decodes() {
        // As go-amqp writes it: error.info keys as str8, not symbols.
        let info = wire::Amqp::Map(vec![
            (wire::Amqp::string("DeadLetterReason"), wire::Amqp::string("bad")),
            (wire::Amqp::string("DeadLetterErrorDescription"), wire::Amqp::string("why")),
        ]);
        let error = wire::Amqp::described(
            0x1d,
            wire::Amqp::List(vec![wire::Amqp::symbol("com.microsoft:dead-letter"), wire::Amqp::Null, info]),
        );
        let state = wire::Amqp::described(0x25, wire::Amqp::List(vec![error]));
        let body = wire::Amqp::described(
            0x15,
            wire::Amqp::List(vec![
                wire::Amqp::Bool(true),
                wire::Amqp::Uint(9),
                wire::Amqp::Null,
                wire::Amqp::Bool(false),
                state,
            ]),
        );
        let mut out = Vec::new();
        write_raw(&mut out, TYPE_AMQP, 0, &body.to_bytes(), &[]);
        let Frame::Amqp { performative: Performative::Disposition(d), .. } = one(&out) else {
            panic!("not a disposition");
        };
        let Some(DeliveryState::Rejected(Rejected { error: Some(error) })) = d.state else {
            panic!("{:?}", d.state);
        };
        let info = error.info.map(|i| format!("{i:?}")).unwrap_or_default();
        assert!(info.contains("DeadLetterReason") && info.contains("bad"), "{info}");
    }

    #[test]
    fn errors_we_send_carry_all_three_fields() {
        // pyamqp reads error[2] unchecked when a send is rejected or a connection closed.
        let condition = ErrorCondition::from(fe2o3_amqp_types::definitions::LinkError::MessageSizeExceeded);
        let rejected = Performative::Disposition(Disposition {
            role: Role::Receiver,
            first: DeliveryNumber::from(1u32),
            last: None,
            settled: true,
            state: Some(DeliveryState::Rejected(Rejected { error: Some(error(condition.clone(), "too big".into())) })),
            batchable: false,
        });
        let close =
            Performative::Close(fe2o3_amqp_types::performatives::Close { error: Some(error(condition, "bye".into())) });
        for (performative, path) in [(rejected, &[4usize, 0][..]), (close, &[0][..])] {
            let bytes = serde_amqp::to_vec(&performative).unwrap();
            let mut value: Value = serde_amqp::from_slice(&bytes).unwrap();
            // Down to the error's list: through described values and list items.
            for &index in path {
                value = match value {
                    Value::Described(d) => match d.value {
                        Value::List(items) => items.into_iter().nth(index).unwrap(),
                        other => panic!("{other:?}"),
                    },
                    other => panic!("{other:?}"),
                };
            }
            let Value::Described(error) = value else { panic!("{value:?}") };
            assert!(matches!(&error.value, Value::List(fields) if fields.len() == 3), "{:?}", error.value);
        }
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused() {
        let mut big = BytesMut::from(&[0u8, 0x10, 0, 0, 2, 0, 0, 0][..]);
        assert!(matches!(take(&mut big, 1 << 16), Err(FrameError::TooLarge { .. })));
        let mut tiny = BytesMut::from(&[0u8, 0, 0, 4, 2, 0, 0, 0][..]);
        assert!(matches!(take(&mut tiny, 1 << 16), Err(FrameError::TooSmall(4))));
        let mut garbage = BytesMut::from(&[0u8, 0, 0, 12, 2, 0, 0, 0, 0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(take(&mut garbage, 1 << 16), Err(FrameError::Decode(_))));
    }
}
