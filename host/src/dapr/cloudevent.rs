//! CloudEvents as daprd delivers pub/sub messages (see
//! `docs/dapr-pubsub-contract.md`, section 2).
//!
//! Every delivery is a structured CloudEvent (`application/cloudevents+json`):
//! the publisher's envelope as the broker holds it, or, for a subscription
//! with `rawPayload`, a fresh envelope whose `data_base64` holds the broker's
//! bytes. The guest gets the event's data as the body, its `datacontenttype`
//! as the content type, and its attributes (`cloudevent.<name>`) and Dapr's
//! metadata headers (`metadata.<name>`, `pubsubname`) as metadata.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

use super::codec::DecodeError;

/// A delivered event, as the guest will see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The publisher's event id; for raw payloads (whose envelope id is new
    /// on every delivery) the broker's message id.
    pub id: String,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub metadata: Vec<(String, String)>,
    /// The broker's delivery count (`metadata.deliverycount`, 1 on the first
    /// delivery), when the component gives one (Service Bus does).
    pub delivery_count: Option<u32>,
}

/// Attributes copied into the guest's metadata, as `cloudevent.<name>`.
const ATTRIBUTES: [&str; 9] =
    ["id", "source", "type", "specversion", "subject", "time", "topic", "pubsubname", "traceid"];

/// Decodes one event: a CloudEvent JSON object, with the delivery's
/// metadata (`metadata.*`, `pubsubname`, `traceparent`, lower-case names).
pub fn decode(event: &serde_json::Value, headers: &[(String, String)]) -> Result<Event, DecodeError> {
    let object = event.as_object().ok_or_else(|| DecodeError("the event is not a JSON object".into()))?;
    let text = |name: &str| object.get(name).and_then(serde_json::Value::as_str);
    let content_type = text("datacontenttype").map(str::to_string);
    let body = match (object.get("data_base64"), object.get("data")) {
        (Some(serde_json::Value::String(b64)), _) => {
            STANDARD.decode(b64).map_err(|e| DecodeError(format!("data_base64 is not base64: {e}")))?
        }
        (Some(_), _) => return Err(DecodeError("data_base64 is not a string".into())),
        // A string is its text unless the content type says JSON.
        (None, Some(serde_json::Value::String(s))) if !is_json(content_type.as_deref()) => s.clone().into_bytes(),
        (None, Some(data)) => serde_json::to_vec(data).map_err(|e| DecodeError(e.to_string()))?,
        (None, None) => Vec::new(),
    };
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let raw = text("source") == Some("Dapr") && object.contains_key("data_base64");
    let id = match (raw, header("metadata.messageid"), text("id")) {
        (true, Some(message_id), _) => message_id.to_string(),
        (_, _, Some(id)) => id.to_string(),
        (_, Some(message_id), None) => message_id.to_string(),
        (_, None, None) => return Err(DecodeError("the event has no id".into())),
    };
    let mut metadata: Vec<(String, String)> = ATTRIBUTES
        .iter()
        .filter_map(|name| text(name).map(|v| (format!("cloudevent.{name}"), v.to_string())))
        .collect();
    metadata.extend(
        headers
            .iter()
            .filter(|(k, _)| k.starts_with("metadata.") || k == "pubsubname" || k == "traceparent" || k == "tracestate")
            .cloned(),
    );
    let delivery_count = header("metadata.deliverycount").and_then(|n| n.parse().ok()).filter(|n| *n > 0);
    Ok(Event { id, body, content_type, metadata, delivery_count })
}

fn is_json(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let ct = ct.split(';').next().unwrap_or_default().trim();
        ct == "application/json" || ct.ends_with("+json")
    })
}

/// One entry of a bulk delivery: its id, its event as a CloudEvent object,
/// and its metadata (lower-case names).
pub type BulkEntry = (String, serde_json::Value, Vec<(String, String)>);

/// A bulk delivery's entries (a raw payload's base64 string is wrapped as
/// daprd wraps single raw deliveries).
pub fn bulk_entries(body: &serde_json::Value) -> Result<Vec<BulkEntry>, DecodeError> {
    let entries = body
        .get("entries")
        .and_then(serde_json::Value::as_array)
        .ok_or_else(|| DecodeError("a bulk delivery without entries".into()))?;
    let pubsub = body.get("pubsubname").and_then(serde_json::Value::as_str).unwrap_or_default();
    entries
        .iter()
        .map(|entry| {
            let id = entry.get("entryId").and_then(serde_json::Value::as_str).unwrap_or_default().to_string();
            let mut metadata: Vec<(String, String)> = entry
                .get("metadata")
                .and_then(serde_json::Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| v.as_str().map(|v| (k.to_ascii_lowercase(), v.to_string())))
                        .collect()
                })
                .unwrap_or_default();
            metadata.push(("pubsubname".into(), pubsub.to_string()));
            let event = match entry.get("event") {
                // A raw payload arrives as base64 of the broker's bytes.
                Some(serde_json::Value::String(b64)) => serde_json::json!({
                    "id": metadata.iter().find(|(k, _)| k == "metadata.messageid").map(|(_, v)| v.clone()).unwrap_or_else(|| id.clone()),
                    "source": "Dapr",
                    "datacontenttype": entry.get("contentType").and_then(serde_json::Value::as_str).unwrap_or("application/octet-stream"),
                    "data_base64": b64,
                }),
                Some(event) => event.clone(),
                None => serde_json::Value::Null,
            };
            Ok((id, event, metadata))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_published_json_event_gives_its_data_and_attributes() {
        let event = serde_json::json!({"id": "e-1", "source": "producer", "type": "com.dapr.event.sent", "specversion": "1.0",
            "datacontenttype": "application/json", "topic": "orders", "pubsubname": "bus", "data": {"id": "o-1", "n": 2}});
        let got = decode(&event, &headers(&[("pubsubname", "bus"), ("metadata.deliverycount", "3")])).unwrap();
        assert_eq!(got.id, "e-1");
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&got.body).unwrap(),
            serde_json::json!({"id": "o-1", "n": 2})
        );
        assert_eq!(got.content_type.as_deref(), Some("application/json"));
        assert_eq!(got.delivery_count, Some(3));
        assert!(got.metadata.contains(&("cloudevent.topic".into(), "orders".into())));
        assert!(got.metadata.contains(&("metadata.deliverycount".into(), "3".into())));
    }

    #[test]
    fn text_binary_and_raw_payloads() {
        let text = serde_json::json!({"id": "t", "datacontenttype": "text/plain", "data": "hello"});
        assert_eq!(decode(&text, &[]).unwrap().body, b"hello");
        let quoted = serde_json::json!({"id": "q", "datacontenttype": "application/json", "data": "hello"});
        assert_eq!(decode(&quoted, &[]).unwrap().body, b"\"hello\"");
        let bytes: Vec<u8> = (0..=255).collect();
        let raw = serde_json::json!({"id": "random-per-delivery", "source": "Dapr", "datacontenttype": "application/octet-stream",
            "data_base64": STANDARD.encode(&bytes)});
        let got = decode(&raw, &headers(&[("metadata.messageid", "m-7")])).unwrap();
        assert_eq!((got.id.as_str(), got.body), ("m-7", bytes), "a raw payload keeps the broker's id");
        assert!(decode(&serde_json::json!({"data_base64": "%%%", "id": "x"}), &[]).is_err());
        assert!(decode(&serde_json::json!([1, 2]), &[]).is_err());
    }

    #[test]
    fn bulk_entries_carry_their_events_and_metadata() {
        let body = serde_json::json!({"pubsubname": "bus", "entries": [
            {"entryId": "a", "event": {"id": "e-a", "data": {"x": 1}, "datacontenttype": "application/json"}, "metadata": {"metadata.DeliveryCount": "2"}},
            {"entryId": "b", "event": STANDARD.encode(b"raw"), "contentType": "application/octet-stream"}
        ]});
        let entries = bulk_entries(&body).unwrap();
        assert_eq!(entries.len(), 2);
        let first = decode(&entries[0].1, &entries[0].2).unwrap();
        assert_eq!((first.id.as_str(), first.delivery_count), ("e-a", Some(2)));
        assert_eq!(decode(&entries[1].1, &entries[1].2).unwrap().body, b"raw");
    }
}
