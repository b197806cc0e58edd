//! Service Bus messages on the wire, to and from the queue's records.
//!
//! A message a client sends is kept as it came (its annotations, properties,
//! application properties and body sections, byte for byte), next to the
//! fields the queue and the guests use. A delivery sends those sections back
//! with what the broker adds: a header whose `delivery-count` is the number
//! of earlier deliveries, the lock token, and the `x-opt-*` annotations the
//! SDKs read (sequence number, enqueued time, locked-until, state).

use std::time::Duration;

use serde_amqp::Value;
use serde_amqp::described::Described;

use super::wire::{self, Amqp};
use crate::queue::{MessageState, NewMessage, StoredMessage};

/// Service Bus's batch message format: the body's data sections each hold a
/// complete encoded message.
pub const BATCH_FORMAT: u32 = 0x8001_3700;

const HEADER: u64 = 0x70;
const DELIVERY_ANNOTATIONS: u64 = 0x71;
const MESSAGE_ANNOTATIONS: u64 = 0x72;
const PROPERTIES: u64 = 0x73;
const APPLICATION_PROPERTIES: u64 = 0x74;
const DATA: u64 = 0x75;
const FOOTER: u64 = 0x78;

/// Annotations the broker sets on every delivery (a client's own values for
/// them are replaced).
const BROKER_ANNOTATIONS: [&str; 5] =
    ["x-opt-sequence-number", "x-opt-enqueued-time", "x-opt-locked-until", "x-opt-message-state", "x-opt-lock-token"];

/// Why a message cannot be taken.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("cannot decode the message: {0}")]
    Decode(String),
    #[error("a batch holds no messages")]
    EmptyBatch,
}

/// One section: its descriptor code, its bytes, and its decoded value.
struct Section {
    code: u64,
    bytes: Vec<u8>,
    value: Value,
}

fn sections(mut bytes: &[u8]) -> Result<Vec<Section>, MessageError> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let length = wire::first_value_len(bytes).map_err(|e| MessageError::Decode(e.to_string()))?;
        let (this, rest) = bytes.split_at(length);
        let described: Described<Value> =
            serde_amqp::from_slice(this).map_err(|e| MessageError::Decode(format!("a section: {e}")))?;
        let code = wire::descriptor_code(&described)
            .ok_or_else(|| MessageError::Decode("a section with an unknown descriptor".into()))?;
        out.push(Section { code, bytes: this.to_vec(), value: described.value });
        bytes = rest;
    }
    Ok(out)
}

/// The messages in one transfer: one, or the members of a batch.
pub fn incoming(payload: &[u8], format: u32) -> Result<Vec<NewMessage>, MessageError> {
    if format != BATCH_FORMAT {
        return Ok(vec![one(payload)?]);
    }
    let members: Vec<NewMessage> = sections(payload)?
        .into_iter()
        .filter(|s| s.code == DATA)
        .map(|s| match s.value {
            Value::Binary(bytes) => one(&bytes),
            _ => Err(MessageError::Decode("a batch member is not binary".into())),
        })
        .collect::<Result<_, _>>()?;
    if members.is_empty() {
        return Err(MessageError::EmptyBatch);
    }
    Ok(members)
}

fn one(bytes: &[u8]) -> Result<NewMessage, MessageError> {
    let sections = sections(bytes)?;
    let find = |code| sections.iter().find(|s| s.code == code);
    let properties = find(PROPERTIES).map(|s| wire::items(&s.value)).unwrap_or_default();
    let property = |index: usize| properties.get(index).filter(|v| !matches!(v, Value::Null));
    let ttl = find(HEADER)
        .and_then(|s| wire::items(&s.value).get(2).and_then(wire::integer))
        .filter(|ms| *ms > 0)
        .map(|ms| Duration::from_millis(ms.unsigned_abs()));
    let scheduled_at_ms =
        find(MESSAGE_ANNOTATIONS).and_then(|s| match wire::get(&s.value, "x-opt-scheduled-enqueue-time") {
            Some(Value::Timestamp(t)) => Some(t.milliseconds()),
            _ => None,
        });
    let metadata = match find(APPLICATION_PROPERTIES).map(|s| &s.value) {
        Some(Value::Map(map)) => {
            map.iter().filter_map(|(k, v)| Some((wire::text(k)?.to_string(), wire::display(v)?))).collect()
        }
        _ => Vec::new(),
    };
    let body_sections: Vec<&Section> = sections.iter().filter(|s| (DATA..=0x77).contains(&s.code)).collect();
    let body = match body_sections.as_slice() {
        [Section { code: DATA, value: Value::Binary(bytes), .. }] => bytes.to_vec(),
        many => many.iter().flat_map(|s| s.bytes.iter().copied()).collect(),
    };
    // Kept as sent, minus what is per delivery (header, delivery
    // annotations) or per hop (footer).
    let kept: Vec<u8> = sections
        .iter()
        .filter(|s| !matches!(s.code, HEADER | DELIVERY_ANNOTATIONS | FOOTER))
        .flat_map(|s| s.bytes.iter().copied())
        .collect();
    Ok(NewMessage {
        id: property(0).and_then(wire::id_text),
        body,
        content_type: property(6).and_then(wire::text).map(str::to_string),
        metadata,
        ttl,
        scheduled_at_ms,
        amqp: Some(kept),
    })
}

/// What a delivery says about the lock it is under.
#[derive(Debug, Clone, Copy)]
pub struct Locked {
    /// The canonical (RFC 4122 byte order) lock token.
    pub token: [u8; 16],
    pub until_ms: i64,
}

/// The bytes of one delivery of `message`.
pub fn outgoing(message: &StoredMessage, lock: Option<Locked>) -> Vec<u8> {
    let kept = message.amqp.as_deref().map(sections).and_then(Result::ok).unwrap_or_default();
    let find = |code| kept.iter().find(|s| s.code == code);
    let mut out = Vec::new();

    // Header: `delivery-count` is the deliveries before this one, written even when 0.
    // Saturating: the times come from the database, which a crash, an older
    // host or a hand edit may have left with any value.
    let ttl = message
        .expires_at_ms
        .map(|at| Amqp::Uint(u32::try_from(at.saturating_sub(message.enqueued_at_ms).max(0)).unwrap_or(u32::MAX)));
    Amqp::described(
        HEADER,
        Amqp::List(vec![
            Amqp::Bool(true),
            Amqp::Ubyte(4),
            ttl.unwrap_or(Amqp::Null),
            Amqp::Bool(message.delivery_count <= 1),
            Amqp::Uint(message.delivery_count.saturating_sub(1)),
        ]),
    )
    .encode(&mut out);
    if let Some(lock) = lock {
        let annotations = vec![(Amqp::symbol("x-opt-lock-token"), Amqp::Uuid(lock.token))];
        Amqp::described(DELIVERY_ANNOTATIONS, Amqp::Map(annotations)).encode(&mut out);
    }

    let mut annotations: Vec<(Amqp, Amqp)> = match find(MESSAGE_ANNOTATIONS).map(|s| &s.value) {
        Some(Value::Map(map)) => map
            .iter()
            .filter(|(k, _)| !wire::text(k).is_some_and(|k| BROKER_ANNOTATIONS.contains(&k)))
            .map(|(k, v)| (wire::from_value(k), wire::from_value(v)))
            .collect(),
        _ => Vec::new(),
    };
    let state = match message.state {
        MessageState::Deferred => 1,
        MessageState::Scheduled => 2,
        _ => 0,
    };
    annotations.extend([
        (Amqp::symbol("x-opt-sequence-number"), Amqp::Long(message.sequence)),
        (Amqp::symbol("x-opt-enqueued-time"), Amqp::Timestamp(message.enqueued_at_ms)),
        (Amqp::symbol("x-opt-message-state"), Amqp::Int(state)),
    ]);
    if let Some(lock) = lock {
        annotations.push((Amqp::symbol("x-opt-locked-until"), Amqp::Timestamp(lock.until_ms)));
    }
    Amqp::described(MESSAGE_ANNOTATIONS, Amqp::Map(annotations)).encode(&mut out);

    // Properties: always present (Go reads the header only inside it), with the message id.
    match find(PROPERTIES) {
        Some(section) if matches!(wire::items(&section.value).first(), Some(v) if !matches!(v, Value::Null)) => {
            out.extend(&section.bytes)
        }
        Some(section) => {
            let mut fields: Vec<Amqp> = wire::items(&section.value).iter().map(wire::from_value).collect();
            match fields.first_mut() {
                Some(first) => *first = Amqp::string(&message.id),
                None => fields.push(Amqp::string(&message.id)),
            }
            Amqp::described(PROPERTIES, Amqp::List(fields)).encode(&mut out);
        }
        None => {
            let content_type = message.content_type.clone().map(Amqp::Symbol).unwrap_or(Amqp::Null);
            let fields = vec![
                Amqp::string(&message.id),
                Amqp::Null,
                Amqp::Null,
                Amqp::Null,
                Amqp::Null,
                Amqp::Null,
                content_type,
            ];
            Amqp::described(PROPERTIES, Amqp::List(fields)).encode(&mut out);
        }
    }

    let mut properties: Vec<(Amqp, Amqp)> = match find(APPLICATION_PROPERTIES).map(|s| &s.value) {
        Some(Value::Map(map)) => map.iter().map(|(k, v)| (wire::from_value(k), wire::from_value(v))).collect(),
        Some(_) => Vec::new(),
        None if message.amqp.is_some() => Vec::new(),
        None => message.metadata.iter().map(|(k, v)| (Amqp::string(k), Amqp::string(v))).collect(),
    };
    if message.state == MessageState::DeadLettered {
        // Strings, or Go's SDK panics.
        let reason = message.dead_letter_reason.clone().unwrap_or_default();
        let description = message.dead_letter_description.clone().unwrap_or_default();
        properties.retain(
            |(k, _)| !matches!(k, Amqp::String(k) if k == "DeadLetterReason" || k == "DeadLetterErrorDescription"),
        );
        properties.push((Amqp::string("DeadLetterReason"), Amqp::String(reason)));
        properties.push((Amqp::string("DeadLetterErrorDescription"), Amqp::String(description)));
    }
    if !properties.is_empty() {
        Amqp::described(APPLICATION_PROPERTIES, Amqp::Map(properties)).encode(&mut out);
    }

    let body: Vec<&Section> = kept.iter().filter(|s| (DATA..=0x77).contains(&s.code)).collect();
    if body.is_empty() {
        Amqp::described(DATA, Amqp::Binary(message.body.clone())).encode(&mut out);
    } else {
        body.iter().for_each(|s| out.extend(&s.bytes));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(amqp: Option<Vec<u8>>, delivery_count: u32) -> StoredMessage {
        StoredMessage {
            id: "m-1".into(),
            sequence: 7,
            body: b"{}".to_vec(),
            content_type: Some("application/json".into()),
            metadata: vec![("k".into(), "v".into())],
            delivery_count,
            enqueued_at_ms: 1_000,
            expires_at_ms: None,
            state: MessageState::Locked,
            dead_letter_reason: None,
            dead_letter_description: None,
            amqp,
        }
    }

    fn sent(sections: Vec<Amqp>) -> Vec<u8> {
        sections.iter().flat_map(Amqp::to_bytes).collect()
    }

    #[test]
    fn a_sent_message_comes_back_with_its_sections_and_the_broker_fields() -> Result<(), MessageError> {
        let properties = Amqp::described(
            PROPERTIES,
            Amqp::List(vec![Amqp::Uuid([1; 16]), Amqp::Null, Amqp::Null, Amqp::string("subject")]),
        );
        let app = Amqp::described(
            APPLICATION_PROPERTIES,
            Amqp::Map(vec![(Amqp::string("count"), Amqp::Int(3)), (Amqp::string("name"), Amqp::string("x y"))]),
        );
        let annotations = Amqp::described(
            MESSAGE_ANNOTATIONS,
            Amqp::Map(vec![(Amqp::symbol("x-opt-scheduled-enqueue-time"), Amqp::Timestamp(5_000))]),
        );
        let header = Amqp::described(HEADER, Amqp::List(vec![Amqp::Bool(false), Amqp::Null, Amqp::Uint(60_000)]));
        let body = Amqp::described(DATA, Amqp::Binary(b"hello".to_vec()));
        let new =
            incoming(&sent(vec![header, annotations, properties.clone(), app.clone(), body.clone()]), 0)?.remove(0);
        assert_eq!(new.id.as_deref(), Some("01010101-0101-0101-0101-010101010101"));
        assert_eq!(new.body, b"hello");
        assert_eq!(new.metadata, vec![("count".to_string(), "3".to_string()), ("name".to_string(), "x y".to_string())]);
        assert_eq!((new.ttl, new.scheduled_at_ms), (Some(Duration::from_secs(60)), Some(5_000)));

        let lock = Locked { token: [9; 16], until_ms: 99 };
        let delivery = outgoing(&stored(new.amqp.clone(), 1), Some(lock));
        let back = sections(&delivery)?;
        let codes: Vec<u64> = back.iter().map(|s| s.code).collect();
        assert_eq!(
            codes,
            [HEADER, DELIVERY_ANNOTATIONS, MESSAGE_ANNOTATIONS, PROPERTIES, APPLICATION_PROPERTIES, DATA]
        );
        let header = wire::items(&back[0].value);
        assert!(matches!(header.get(4), Some(Value::Uint(0))), "delivery-count 0 is written: {header:?}");
        assert_eq!(wire::get(&back[1].value, "x-opt-lock-token").and_then(wire::uuid), Some([9; 16]));
        assert!(matches!(wire::get(&back[2].value, "x-opt-sequence-number"), Some(Value::Long(7))));
        assert!(
            matches!(wire::get(&back[2].value, "x-opt-locked-until"), Some(Value::Timestamp(t)) if t.milliseconds() == 99)
        );
        assert!(matches!(wire::get(&back[2].value, "x-opt-scheduled-enqueue-time"), Some(Value::Timestamp(_))));
        assert_eq!(back[3].bytes, properties.to_bytes(), "properties as sent");
        assert_eq!(back[4].bytes, app.to_bytes(), "typed application properties as sent");
        assert_eq!(back[5].bytes, body.to_bytes());
        Ok(())
    }

    #[test]
    fn a_batch_is_every_member() -> Result<(), MessageError> {
        let member = |id: &str| {
            let properties = Amqp::described(PROPERTIES, Amqp::List(vec![Amqp::string(id)]));
            Amqp::described(DATA, Amqp::Binary(sent(vec![properties, Amqp::described(DATA, Amqp::Binary(id.into()))])))
        };
        let batch = sent(vec![member("a"), member("b"), member("c")]);
        let ids: Vec<Option<String>> = incoming(&batch, BATCH_FORMAT)?.into_iter().map(|m| m.id).collect();
        assert_eq!(ids, [Some("a".into()), Some("b".into()), Some("c".into())]);
        assert!(matches!(incoming(&[], BATCH_FORMAT), Err(MessageError::EmptyBatch)));
        assert!(matches!(incoming(&[0xff, 0x00], 0), Err(MessageError::Decode(_))));
        Ok(())
    }

    #[test]
    fn a_guest_message_and_a_dead_letter_get_what_the_sdks_need() -> Result<(), MessageError> {
        let mut dead = stored(None, 3);
        dead.state = MessageState::DeadLettered;
        dead.dead_letter_reason = Some("MaxDeliveryCountExceeded".into());
        let back = sections(&outgoing(&dead, None))?;
        assert!(matches!(wire::items(&back[0].value).get(4), Some(Value::Uint(2))));
        assert_eq!(wire::items(&back[2].value).first().and_then(wire::text), Some("m-1"));
        let app = &back[3].value;
        assert_eq!(wire::get(app, "k").and_then(wire::text), Some("v"));
        assert_eq!(wire::get(app, "DeadLetterReason").and_then(wire::text), Some("MaxDeliveryCountExceeded"));
        assert!(matches!(wire::get(app, "DeadLetterErrorDescription"), Some(Value::String(s)) if s.is_empty()));
        assert!(matches!(&back[4].value, Value::Binary(b) if b.as_slice() == b"{}"));
        Ok(())
    }
}
