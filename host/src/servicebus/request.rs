//! Request/response messages on `$cbs` and `$management` nodes.
//!
//! A request carries its operation in the application properties and its
//! arguments in an `amqp-value` body (a map with string keys). A response
//! answers with the request's message-id as correlation-id, in the same AMQP
//! type (Go type-asserts a string, Python compares uuids), and its status
//! as an int32 under both spellings the SDKs read (`statusCode` for
//! Python's management link, `status-code` for its CBS link; Go and JS take
//! either).

use serde_amqp::Value;
use serde_amqp::described::Described;

use super::wire::{self, Amqp};

/// A decoded request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The message-id, as sent (any AMQP type).
    pub message_id: Value,
    pub reply_to: Option<String>,
    /// The application properties (a map), `Null` when absent.
    pub properties: Value,
    /// The `amqp-value` body, `Null` when absent.
    pub body: Value,
}

impl Request {
    /// Reads a request message.
    pub fn decode(mut bytes: &[u8]) -> Result<Request, String> {
        let mut request =
            Request { message_id: Value::Null, reply_to: None, properties: Value::Null, body: Value::Null };
        while !bytes.is_empty() {
            let length = wire::first_value_len(bytes).map_err(|e| e.to_string())?;
            let (this, rest) = bytes.split_at(length);
            let section: Described<Value> = serde_amqp::from_slice(this).map_err(|e| e.to_string())?;
            match wire::descriptor_code(&section) {
                Some(0x73) => {
                    let fields = wire::items(&section.value);
                    request.message_id = fields.first().cloned().unwrap_or(Value::Null);
                    request.reply_to = fields.get(4).and_then(wire::text).map(str::to_string);
                }
                Some(0x74) => request.properties = section.value,
                Some(0x77) => request.body = section.value,
                _ => {}
            }
            bytes = rest;
        }
        Ok(request)
    }

    /// An application property's text.
    pub fn property(&self, key: &str) -> Option<&str> {
        wire::get(&self.properties, key).and_then(wire::text)
    }

    /// A body field.
    pub fn field(&self, key: &str) -> Option<&Value> {
        wire::get(&self.body, key)
    }
}

/// A response to send back.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: i32,
    pub description: String,
    /// `errorCondition` for failures (a symbol such as `com.microsoft:message-lock-lost`).
    pub condition: Option<String>,
    /// The `amqp-value` body (a map), if any.
    pub body: Option<Amqp>,
}

impl Response {
    pub fn ok(body: Option<Amqp>) -> Response {
        Response { status: 200, description: "OK".into(), condition: None, body }
    }

    pub fn status(status: i32, description: impl Into<String>) -> Response {
        Response { status, description: description.into(), condition: None, body: None }
    }

    pub fn error(status: i32, condition: &str, description: impl Into<String>) -> Response {
        Response { status, description: description.into(), condition: Some(condition.into()), body: None }
    }

    /// The response message answering `request`.
    pub fn encode(&self, request: &Request) -> Vec<u8> {
        let mut out = Vec::new();
        let message_id = Amqp::string(uuid::Uuid::new_v4().to_string());
        let properties =
            vec![message_id, Amqp::Null, Amqp::Null, Amqp::Null, Amqp::Null, wire::from_value(&request.message_id)];
        Amqp::described(0x73, Amqp::List(properties)).encode(&mut out);
        let mut application = vec![
            (Amqp::string("statusCode"), Amqp::Int(self.status)),
            (Amqp::string("status-code"), Amqp::Int(self.status)),
            (Amqp::string("statusDescription"), Amqp::string(&self.description)),
            (Amqp::string("status-description"), Amqp::string(&self.description)),
        ];
        if let Some(condition) = &self.condition {
            application.push((Amqp::string("errorCondition"), Amqp::symbol(condition)));
        }
        Amqp::described(0x74, Amqp::Map(application)).encode(&mut out);
        Amqp::described(0x77, self.body.clone().unwrap_or(Amqp::Null)).encode(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_response_correlates_in_the_requests_own_type() {
        let request_bytes: Vec<u8> = [
            Amqp::described(
                0x73,
                Amqp::List(vec![Amqp::Uuid([3; 16]), Amqp::Null, Amqp::Null, Amqp::Null, Amqp::string("$cbs")]),
            ),
            Amqp::described(0x74, Amqp::Map(vec![(Amqp::string("operation"), Amqp::string("put-token"))])),
            Amqp::described(0x77, Amqp::string("SharedAccessSignature sr=x")),
        ]
        .iter()
        .flat_map(Amqp::to_bytes)
        .collect();
        let request = Request::decode(&request_bytes).unwrap();
        assert_eq!((request.property("operation"), request.reply_to.as_deref()), (Some("put-token"), Some("$cbs")));
        assert_eq!(wire::text(&request.body), Some("SharedAccessSignature sr=x"));

        let response = Response::error(410, "com.microsoft:message-lock-lost", "gone").encode(&request);
        let back = Request::decode(&response).unwrap();
        let properties = serde_amqp::from_slice::<Described<Value>>(&response).unwrap();
        assert!(
            matches!(wire::items(&properties.value).get(5), Some(Value::Uuid(_))),
            "correlation-id keeps the uuid type"
        );
        assert!(matches!(wire::get(&back.properties, "statusCode"), Some(Value::Int(410))));
        assert!(matches!(wire::get(&back.properties, "status-code"), Some(Value::Int(410))));
        assert!(matches!(wire::get(&back.properties, "errorCondition"), Some(Value::Symbol(_))));
    }
}
