//! The order model shared by the sample producer and consumer.
//!
//! Kept free of WIT bindings so it can be unit-tested natively and linked into
//! either component without dragging the other world's exports along.
//!
//! Parsing is where a guest spends most of its time on a message, so orders
//! borrow their strings from the body they were read from (a string with
//! escapes is the only one copied) and a batch is read straight into typed
//! orders, never through a generic JSON tree.
//!
//! Without `std`, as the sample guests are (`guest-runtime` says why).
#![no_std]

extern crate alloc;

use alloc::borrow::Cow;
use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One order, as the producer receives it and the consumer reads it.
///
/// A tolerant reader: fields it does not know are ignored, so a producer
/// that adds a field does not turn every message into poison at consumers
/// not yet upgraded. (Samples are what users copy.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order<'a> {
    /// Caller-chosen, unique per order; becomes the message id.
    #[serde(borrow)]
    pub id: Cow<'a, str>,
    #[serde(borrow)]
    pub customer: Cow<'a, str>,
    #[serde(borrow)]
    pub items: Vec<Item<'a>>,
}

/// One line of an order (a tolerant reader too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item<'a> {
    #[serde(borrow)]
    pub sku: Cow<'a, str>,
    pub qty: u32,
    /// Unit price in cents; integers keep totals exact.
    pub price_cents: u64,
}

/// A batch's orders, each left as its JSON text until it is read as an order,
/// so a bad one can be named by its position.
type Entries<'a> = Vec<&'a RawValue>;

/// `{"orders": [...]}`, the wrapped form of a batch.
#[derive(Deserialize)]
struct Wrapped<'a> {
    #[serde(borrow)]
    orders: Entries<'a>,
}

/// Why an order or a batch is not acceptable. The text is shown to the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Position in the batch, when the problem is one order's.
    pub index: Option<usize>,
    pub reason: String,
}

impl core::fmt::Display for Invalid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.index {
            Some(i) => write!(f, "order {i}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

/// Largest batch the producer accepts; bigger ones are a caller bug, not load.
pub const MAX_BATCH: usize = 1000;

impl<'a> Order<'a> {
    /// Parses and validates one order from a message body.
    pub fn parse(body: &'a [u8]) -> Result<Order<'a>, Invalid> {
        let order: Order = serde_json::from_slice(body)
            .map_err(|e| Invalid { index: None, reason: format!("not a valid order: {e}") })?;
        order.validate().map_err(|reason| Invalid { index: None, reason })?;
        Ok(order)
    }

    /// Checks the rules serde cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.trim().is_empty() {
            return Err("id must not be empty".into());
        }
        if self.id.len() > 128 {
            return Err("id must be at most 128 bytes".into());
        }
        if self.customer.trim().is_empty() {
            return Err("customer must not be empty".into());
        }
        if self.items.is_empty() {
            return Err("items must not be empty".into());
        }
        for (i, item) in self.items.iter().enumerate() {
            if item.sku.trim().is_empty() {
                return Err(format!("items[{i}].sku must not be empty"));
            }
            if item.qty == 0 {
                return Err(format!("items[{i}].qty must be at least 1"));
            }
        }
        Ok(())
    }

    /// Order total in cents, or `None` on overflow (which validation of a real
    /// shop would reject; here it is reported as poison).
    pub fn total_cents(&self) -> Option<u64> {
        self.items.iter().try_fold(0u64, |acc, item| {
            item.price_cents.checked_mul(u64::from(item.qty)).and_then(|line| acc.checked_add(line))
        })
    }
}

/// Parses a batch and validates every order; all or nothing.
pub fn parse_batch(body: &[u8]) -> Result<Vec<Order<'_>>, Invalid> {
    let entries = batch_entries(body).map_err(|e| Invalid {
        index: None,
        reason: format!("body is not a JSON array of orders or {{\"orders\": [...]}}: {e}"),
    })?;
    if entries.is_empty() {
        return Err(Invalid { index: None, reason: "the batch has no orders".into() });
    }
    if entries.len() > MAX_BATCH {
        return Err(Invalid {
            index: None,
            reason: format!("the batch has {} orders; at most {MAX_BATCH} are accepted", entries.len()),
        });
    }
    let mut orders = Vec::with_capacity(entries.len());
    let mut seen = BTreeSet::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let order: Order = serde_json::from_str(entry.get())
            .map_err(|e| Invalid { index: Some(index), reason: without_position(&e) })?;
        order.validate().map_err(|reason| Invalid { index: Some(index), reason })?;
        if !seen.insert(order.id.clone()) {
            return Err(Invalid { index: Some(index), reason: format!("duplicate id {:?}", order.id) });
        }
        orders.push(order);
    }
    Ok(orders)
}

/// The orders of a bare array or of `{"orders": [...]}`, told apart by the
/// first byte rather than by trying one form and then the other.
fn batch_entries(body: &[u8]) -> serde_json::Result<Entries<'_>> {
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_slice::<Wrapped>(body).map(|wrapped| wrapped.orders),
        _ => serde_json::from_slice(body),
    }
}

/// An order's error without serde_json's "at line L column C": that place is
/// within the order's own text, not the body, and the index already names
/// the order.
fn without_position(error: &serde_json::Error) -> String {
    let mut text = error.to_string();
    let position = format!(" at line {} column {}", error.line(), error.column());
    if let Some(kept) = text.strip_suffix(&position).map(str::len) {
        text.truncate(kept);
    }
    text
}

#[cfg(test)]
mod tests {
    use alloc::vec;

    use super::*;

    #[test]
    fn bare_and_wrapped_batches_parse_alike() {
        let one = r#"{"id":"a","customer":"c","items":[{"sku":"s","qty":2,"price_cents":150}]}"#;
        let (bare, wrapped) = (format!("[{one}]"), format!(" \n{{\"version\":2,\"orders\":[{one}]}}"));
        let bare = parse_batch(bare.as_bytes()).map_err(|e| e.to_string());
        let wrapped = parse_batch(wrapped.as_bytes()).map_err(|e| e.to_string());
        assert_eq!(bare, wrapped);
        assert_eq!(bare.map(|o| o[0].total_cents()), Ok(Some(300)));
    }

    #[test]
    fn strings_are_borrowed_from_the_body_unless_they_hold_escapes() {
        let body = br#"{"id":"a-1","customer":"say \"hi\"","items":[{"sku":"s\u00e9","qty":1,"price_cents":1}]}"#;
        let order = Order::parse(body).map_err(|e| e.to_string());
        assert!(matches!(order.as_ref().map(|o| &o.id), Ok(Cow::Borrowed("a-1"))), "{order:?}");
        assert!(matches!(order.as_ref().map(|o| &o.customer), Ok(Cow::Owned(c)) if c == "say \"hi\""), "{order:?}");
        assert_eq!(order.map(|o| o.items[0].sku.to_string()), Ok("s\u{e9}".to_string()));
    }

    #[test]
    fn a_batch_that_is_neither_form_is_refused_whole() {
        for body in [&br#"{"orders":{}}"#[..], br#"{"id":"a"}"#, b"\"orders\"", b"[1,"] {
            let err = parse_batch(body).err();
            assert!(
                err.as_ref().is_some_and(|e| e.index.is_none() && e.reason.starts_with("body is not a JSON array")),
                "{}: {err:?}",
                String::from_utf8_lossy(body)
            );
        }
        let err = parse_batch(br#"[{"id":"a","customer":"c","items":[]}, 7]"#).err();
        assert_eq!(err.map(|e| (e.index, e.reason)), Some((Some(0), "items must not be empty".to_string())));
        let err = parse_batch(br#"[{"id":"a","customer":"c","items":[{"sku":"s","qty":1,"price_cents":1}]}, 7]"#).err();
        assert_eq!(
            err.map(|e| (e.index, e.reason)),
            Some((Some(1), "invalid type: integer `7`, expected struct Order".to_string()))
        );
        let err = parse_batch(b"[{\"id\":\"a\",\n\"items\":[]}]").err();
        assert_eq!(err.map(|e| (e.index, e.reason)), Some((Some(0), "missing field `customer`".to_string())));
    }

    #[test]
    fn the_bad_order_is_named_by_index() {
        let body = br#"[{"id":"a","customer":"c","items":[{"sku":"s","qty":1,"price_cents":1}]},
                        {"id":"b","customer":"c","items":[]}]"#;
        let err = parse_batch(body).err().map(|e| (e.index, e.reason));
        assert_eq!(err, Some((Some(1), "items must not be empty".to_string())));
    }

    #[test]
    fn duplicates_and_empty_batches_are_refused() {
        let one = r#"{"id":"a","customer":"c","items":[{"sku":"s","qty":1,"price_cents":1}]}"#;
        assert!(parse_batch(format!("[{one},{one}]").as_bytes()).is_err());
        assert!(parse_batch(b"[]").is_err());
        assert!(parse_batch(b"{").is_err());
    }

    #[test]
    fn fields_a_newer_producer_added_are_ignored() {
        let newer =
            br#"{"id":"a","customer":"c","priority":"high","items":[{"sku":"s","qty":1,"price_cents":1,"gift":true}]}"#;
        let order = Order::parse(newer).map_err(|e| e.to_string());
        assert_eq!(order.map(|o| o.total_cents()), Ok(Some(1)));
    }

    #[test]
    fn overflowing_totals_are_detected() {
        let order = Order {
            id: "x".into(),
            customer: "c".into(),
            items: vec![Item { sku: "s".into(), qty: u32::MAX, price_cents: u64::MAX }],
        };
        assert_eq!(order.total_cents(), None);
    }
}
