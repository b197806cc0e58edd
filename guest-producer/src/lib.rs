//! Sample producer: turns an HTTP order batch into one message per order.
//!
//! `POST` a JSON array of orders (or `{"orders": [...]}`). Every order is
//! validated first; one bad order fails the whole batch with a 400 that names
//! it, and nothing is sent. A good batch sends one message per order to the
//! binding named by config `binding` (default `orders`), in one
//! `outbound.send-batch`, and answers 202 with the ids; if any send fails it
//! names the first failed order and lists the ids that were sent. A body
//! with content type `application/octet-stream` is sent as one message,
//! unchanged.
//!
//! Built without `std`, as the sample consumer is (see its crate docs).
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use exports::wasm_pc::app::produce::{Guest, Request, Response};
use guest_orders::{Order, parse_batch};
use wasm_pc::app::log::{Level, log};
use wasm_pc::app::types::{OutboundMessage, SendError};
use wasm_pc::app::{config, outbound};

wit_bindgen::generate!({ world: "producer", path: "../wit" });

struct Producer;

impl Guest for Producer {
    fn handle(request: Request) -> Response {
        if request.method != "POST" {
            return json(405, &serde_json::json!({"error": "use POST with a JSON order batch"}));
        }
        let binding = config::get("binding").unwrap_or_else(|| "orders".to_string());
        if header(&request, "content-type").is_some_and(|v| v.starts_with("application/octet-stream")) {
            return send_raw(&binding, request.body);
        }
        let orders = match parse_batch(&request.body) {
            Ok(orders) => orders,
            Err(invalid) => {
                return json(400, &serde_json::json!({"error": invalid.reason, "index": invalid.index}));
            }
        };
        let messages: Vec<OutboundMessage> = orders.iter().map(to_message).collect();
        let results = outbound::send_batch(&binding, &messages);
        let mut sent = Vec::with_capacity(orders.len());
        let mut failed = None;
        for (order, result) in orders.iter().zip(results) {
            match result {
                Ok(id) => sent.push(id),
                Err(error) => {
                    failed.get_or_insert((order, error));
                }
            }
        }
        if let Some((order, error)) = failed {
            return send_failed(&binding, &order.id, &error, &sent);
        }
        log(
            Level::Info,
            "batch sent",
            &[("orders".to_string(), sent.len().to_string()), ("binding".to_string(), binding)],
        );
        json(202, &serde_json::json!({"accepted": sent.len(), "ids": sent}))
    }
}

fn to_message(order: &Order) -> OutboundMessage {
    let body = serde_json::to_vec(order).unwrap_or_default();
    OutboundMessage {
        id: Some(order.id.to_string()),
        body,
        content_type: Some("application/json".to_string()),
        metadata: vec![
            ("order-id".to_string(), order.id.to_string()),
            ("customer".to_string(), order.customer.to_string()),
            ("item-count".to_string(), order.items.len().to_string()),
        ],
    }
}

fn send_raw(binding: &str, body: Vec<u8>) -> Response {
    let message = OutboundMessage {
        id: None,
        body,
        content_type: Some("application/octet-stream".to_string()),
        metadata: vec![],
    };
    match outbound::send(binding, &message) {
        Ok(id) => json(202, &serde_json::json!({"accepted": 1, "ids": [id]})),
        Err(error) => send_failed(binding, "raw", &error, &[]),
    }
}

/// A send failed: say which order, and which were sent, so the caller can
/// resend the rest (sends are idempotent by message id downstream).
fn send_failed(binding: &str, order: &str, error: &SendError, sent: &[String]) -> Response {
    let (status, reason) = match error {
        SendError::UnknownBinding(m) => (500, format!("unknown binding {binding}: {m}")),
        SendError::Rejected(m) => (502, format!("binding {binding} rejected the message: {m}")),
        SendError::Unavailable(m) => (503, format!("binding {binding} unavailable: {m}")),
    };
    log(
        Level::Warn,
        "send failed",
        &[("order".to_string(), order.to_string()), ("reason".to_string(), reason.clone())],
    );
    json(status, &serde_json::json!({"error": reason, "failed": order, "sent": sent}))
}

fn header<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

fn json(status: u16, value: &serde_json::Value) -> Response {
    Response {
        status,
        headers: vec![("content-type".to_string(), "application/json".to_string())],
        body: value.to_string().into_bytes(),
    }
}

export!(Producer);

/// A panic is logged, then traps; the host answers 500.
#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    guest_runtime::report_panic(info, |line| log(Level::Error, line, &[]))
}
