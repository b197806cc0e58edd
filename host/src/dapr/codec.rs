//! How message bodies and metadata cross the Dapr binding contract.
//!
//! Output: daprd decodes `data` and re-encodes it with Go's encoding/json, so
//! a JSON body survives as the same JSON *value* (keys sorted, whitespace
//! gone, numbers as float64), and anything else cannot be sent raw. Such
//! bodies go as a base64 JSON string with the application property
//! `wasmpc-encoding: base64`; the consumer host decodes them, so bytes round
//! trip exactly. The content type rides along as `wasmpc-content-type`
//! (Service Bus's own ContentType is not forwarded to binding consumers).
//!
//! Input: daprd lower-cases metadata names and, for Service Bus application
//! properties, URL-query-escapes names and values; they are decoded here.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Application property naming the body encoding (`base64`).
pub const ENCODING: &str = "wasmpc-encoding";
/// Application property carrying the body's content type.
pub const CONTENT_TYPE: &str = "wasmpc-content-type";

/// Headers that belong to HTTP or Dapr, not to the message.
const NOT_METADATA: &[&str] = &[
    "host",
    "user-agent",
    "accept",
    "accept-encoding",
    "content-type",
    "content-length",
    "transfer-encoding",
    "connection",
    "expect",
    "dapr-api-token",
    "dapr-app-id",
    "dapr-caller-app-id",
    "dapr-callee-app-id",
    "dapr-caller-namespace",
];

/// The `data` field for a body: the JSON value itself when the body is JSON,
/// else a base64 string plus the metadata that says so.
pub fn encode_data(body: &[u8], content_type: Option<&str>) -> (serde_json::Value, Vec<(String, String)>) {
    let mut extra = Vec::new();
    if let Some(ct) = content_type {
        extra.push((CONTENT_TYPE.to_string(), ct.to_string()));
    }
    let says_json = content_type.is_none_or(|ct| ct.starts_with("application/json") || ct.ends_with("+json"));
    if says_json && let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        return (value, extra);
    }
    extra.push((ENCODING.to_string(), "base64".to_string()));
    (serde_json::Value::String(STANDARD.encode(body)), extra)
}

/// What a delivery carried, restored: body bytes, content type, and the
/// message metadata (without the host's own `wasmpc-*` properties).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub id: String,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub metadata: Vec<(String, String)>,
}

/// Why a delivery could not be decoded. Poison: it will never decode.
#[derive(Debug, thiserror::Error)]
#[error("undecodable delivery: {0}")]
pub struct DecodeError(pub String);

/// Rebuilds the message from a delivery's headers and body.
pub fn decode_delivery<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    body: &[u8],
) -> Result<Decoded, DecodeError> {
    let mut id = String::new();
    let mut metadata = Vec::new();
    let mut encoding = None;
    let mut content_type = None;
    for (name, value) in headers {
        let name = name.to_ascii_lowercase();
        if NOT_METADATA.contains(&name.as_str()) {
            continue;
        }
        let value = String::from_utf8_lossy(value);
        match name.as_str() {
            "id" => id = value.into_owned(),
            // Set by Dapr itself, not query-escaped.
            "correlationid" | "label" | "traceparent" | "tracestate" | "baggage" => {
                metadata.push((name, value.into_owned()))
            }
            _ => {
                let key = query_unescape(&name);
                let value = query_unescape(&value);
                match key.as_str() {
                    ENCODING => encoding = Some(value),
                    CONTENT_TYPE => content_type = Some(value),
                    _ => metadata.push((key, value)),
                }
            }
        }
    }
    if id.is_empty() {
        // Bindings other than Service Bus's (RabbitMQ's, say) forward the
        // sender's `MessageId` metadata as a plain header instead of `id`.
        if let Some(pos) = metadata.iter().position(|(k, _)| k == "messageid") {
            id = metadata.remove(pos).1;
        }
    }
    let body = match encoding.as_deref() {
        None => body.to_vec(),
        Some("base64") => {
            let text: String = serde_json::from_slice(body)
                .map_err(|e| DecodeError(format!("{ENCODING}=base64 but the body is not a JSON string: {e}")))?;
            STANDARD.decode(text).map_err(|e| DecodeError(format!("bad base64 body: {e}")))?
        }
        Some(other) => return Err(DecodeError(format!("unknown {ENCODING} {other:?}"))),
    };
    Ok(Decoded { id, body, content_type, metadata })
}

/// Go's `url.QueryUnescape`: `+` is a space, `%XX` a byte. A malformed
/// escape is kept as it is (a property must never fail a delivery).
pub fn query_unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Go's `url.QueryEscape`, for the sidecar double and tests.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn hex(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_escaping_round_trips_like_go() {
        for s in ["plain", "a b", "a/b+c", "ünïcode & co", "100%", ""] {
            assert_eq!(query_unescape(&query_escape(s)), s);
        }
        assert_eq!(query_escape("a b/c"), "a+b%2Fc");
        assert_eq!(query_unescape("50%"), "50%");
        assert_eq!(query_unescape("%zz"), "%zz");
    }

    #[test]
    fn json_goes_as_a_value_and_bytes_as_base64() {
        let (data, extra) = encode_data(br#"{"b":1,"a":[true]}"#, Some("application/json"));
        assert_eq!(data, serde_json::json!({"a": [true], "b": 1}));
        assert_eq!(extra, vec![(CONTENT_TYPE.to_string(), "application/json".to_string())]);

        let bytes = [0u8, 255, 34, 92];
        let (data, extra) = encode_data(&bytes, Some("application/octet-stream"));
        assert!(extra.contains(&(ENCODING.to_string(), "base64".to_string())));
        let body = serde_json::to_vec(&data).unwrap_or_default();
        let headers = [
            ("wasmpc-encoding", &b"base64"[..]),
            ("wasmpc-content-type", &b"application%2Foctet-stream"[..]),
            ("id", &b"m1"[..]),
        ];
        let decoded = decode_delivery(headers, &body).map_err(|e| e.to_string());
        assert_eq!(
            decoded,
            Ok(Decoded {
                id: "m1".into(),
                body: bytes.to_vec(),
                content_type: Some("application/octet-stream".into()),
                metadata: vec![]
            })
        );

        let (data, _) = encode_data(b"not json", Some("application/json"));
        assert!(data.is_string(), "invalid JSON labelled as JSON still round-trips as bytes");
    }

    #[test]
    fn properties_are_unescaped_and_http_headers_dropped() {
        let headers = [
            ("Content-Type", &b"application/json"[..]),
            ("id", b"x"),
            ("correlationid", b"c-1"),
            ("order+id", b"a%2Fb+c"),
            ("dapr-api-token", b"secret"),
        ];
        let decoded = decode_delivery(headers, b"{}").ok();
        assert_eq!(decoded.as_ref().map(|d| d.id.as_str()), Some("x"));
        assert_eq!(
            decoded.map(|d| d.metadata),
            Some(vec![("correlationid".into(), "c-1".into()), ("order id".into(), "a/b c".into())])
        );
    }
}
