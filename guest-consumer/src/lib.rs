//! Sample consumer: settles one order message.
//!
//! - A body that is not a valid order is poison: `reject`, so it is dead-lettered
//!   at once instead of being retried ten times.
//! - An order that holds the SKU named by config `transient-sku` fails with
//!   `retry` until its delivery count exceeds `transient-attempts` (default 2):
//!   a stand-in for a flaky downstream, so retry-then-success is observable.
//! - Otherwise the order is accepted; if config `forward-binding` is set, a
//!   summary (`{"order","customer","total_cents","version"}`) is sent there.
//! - An order whose total is over config `max-order-cents` is rejected: a
//!   business rule, so it goes to the dead-letter queue for a person to review.
//! - A body sent as raw bytes (content type `application/octet-stream`) is
//!   accepted as-is and, when forwarding, passed on unchanged.
//!
//! Built without `std` on `wasm32-wasip2`, so the component imports the
//! wasm-pc interfaces and no WASI: `guest-runtime` says why and gives what
//! `std` would.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

use exports::wasm_pc::app::consume::{ConsumeError, Guest, Message};
use guest_orders::Order;
use wasm_pc::app::log::{Level, enabled, log};
use wasm_pc::app::types::OutboundMessage;
use wasm_pc::app::{config, outbound};

wit_bindgen::generate!({ world: "consumer", path: "../wit" });

struct Consumer;

impl Guest for Consumer {
    fn handle(message: Message) -> Result<(), ConsumeError> {
        if message.content_type.as_deref() == Some("application/octet-stream") {
            let body = message.body;
            return forward(&message.id, message.content_type, || body);
        }
        let order = Order::parse(&message.body).map_err(|e| ConsumeError::Reject(e.to_string()))?;
        let total =
            order.total_cents().ok_or_else(|| ConsumeError::Reject(format!("order {}: total overflows", order.id)))?;

        let limit = config::get("max-order-cents").and_then(|v| v.parse::<u64>().ok());
        if let Some(limit) = limit.filter(|limit| total > *limit) {
            return Err(ConsumeError::Reject(format!(
                "order {}: total {total} cents is over the credit limit of {limit}; needs manual review",
                order.id
            )));
        }

        if let Some(sku) = config::get("transient-sku") {
            let attempts = config::get("transient-attempts").and_then(|v| v.parse::<u32>().ok()).unwrap_or(2);
            let delivery = message.delivery_count.unwrap_or(1);
            if order.items.iter().any(|i| i.sku == sku) && delivery <= attempts {
                return Err(ConsumeError::Retry(format!(
                    "order {}: SKU {sku} is temporarily unavailable (delivery {delivery} of {attempts} failing)",
                    order.id
                )));
            }
        }

        if enabled(Level::Debug) {
            log(
                Level::Debug,
                "order accepted",
                &[
                    ("order".to_string(), order.id.to_string()),
                    ("customer".to_string(), order.customer.to_string()),
                    ("total_cents".to_string(), total.to_string()),
                ],
            );
        }
        forward(&order.id, Some("application/json".to_string()), || {
            let summary = serde_json::json!({
                "order": order.id,
                "customer": order.customer,
                "total_cents": total,
                "version": config::get("version"),
            });
            summary.to_string().into_bytes()
        })
    }
}

/// Sends the body `make` builds to the configured forward binding, if any
/// (and only then builds it). A failed send is worth a retry: the order
/// itself was fine.
fn forward(id: &str, content_type: Option<String>, make: impl FnOnce() -> Vec<u8>) -> Result<(), ConsumeError> {
    let Some(binding) = config::get("forward-binding") else {
        return Ok(());
    };
    let body = make();
    let message = OutboundMessage {
        id: Some(format!("{id}-processed")),
        body,
        content_type,
        metadata: vec![("source-message".to_string(), id.to_string())],
    };
    outbound::send(&binding, &message)
        .map(|_| ())
        .map_err(|e| ConsumeError::Retry(format!("forwarding to {binding} failed: {e:?}")))
}

export!(Consumer);

/// A panic is logged, then traps; the host retries the message.
#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    guest_runtime::report_panic(info, |line| log(Level::Error, line, &[]))
}
