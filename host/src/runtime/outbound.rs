//! Where a guest's `outbound.send` goes.
//!
//! One trait with one implementation per mode (embedded queue, Dapr output
//! binding), so guests cannot tell the modes apart and no logic is written twice.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

pub use crate::runtime::bindings::types::{OutboundMessage, SendError};

/// A boxed future, as the trait must be object-safe.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<String, SendError>> + Send + 'a>>;

/// A batch's outcome: one result per message, in the batch's order.
pub type BatchFuture<'a> = Pin<Box<dyn Future<Output = Vec<Result<String, SendError>>> + Send + 'a>>;

/// Sends messages to named output bindings on a guest's behalf.
pub trait Outbound: Send + Sync + 'static {
    /// Sends one message; resolves to the id it was sent with. The message id
    /// is already set: the runtime assigns one before calling this.
    fn send<'a>(&'a self, binding: &'a str, message: OutboundMessage) -> SendFuture<'a>;

    /// Sends several messages; one result per message, in their order. Ids
    /// are set, as for [`Outbound::send`]. By default one `send` after
    /// another, stopping at the first `unavailable`: the rest would wait on
    /// the same outage, so they come back unsent for the guest to retry.
    fn send_batch<'a>(&'a self, binding: &'a str, messages: Vec<OutboundMessage>) -> BatchFuture<'a> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(messages.len());
            let mut outage = None;
            for message in messages {
                let result = match &outage {
                    Some(reason) => Err(SendError::Unavailable(format!("not sent: {reason}"))),
                    None => self.send(binding, message).await,
                };
                if let (Err(SendError::Unavailable(reason)), None) = (&result, &outage) {
                    outage = Some(format!("an earlier message of the batch failed: {reason}"));
                }
                results.push(result);
            }
            results
        })
    }

    /// Why sends would fail now (a sidecar that does not answer), if they would.
    fn not_ready(&self) -> Option<String> {
        None
    }
}

/// Refuses every send: for hosts that configure no output binding.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoOutbound;

impl Outbound for NoOutbound {
    fn send<'a>(&'a self, binding: &'a str, _message: OutboundMessage) -> SendFuture<'a> {
        Box::pin(
            async move { Err(SendError::UnknownBinding(format!("no output binding named {binding:?} is configured"))) },
        )
    }
}

/// Keeps every message sent, in order: the `dev --dry-run` sink and a test aid.
#[derive(Debug, Default, Clone)]
pub struct Recorder {
    sent: Arc<Mutex<Vec<(String, OutboundMessage)>>>,
}

impl Recorder {
    /// Everything sent so far, as `(binding, message)`.
    pub fn sent(&self) -> Vec<(String, OutboundMessage)> {
        self.sent.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Outbound for Recorder {
    fn send<'a>(&'a self, binding: &'a str, message: OutboundMessage) -> SendFuture<'a> {
        Box::pin(async move {
            let id = message.id.clone().unwrap_or_default();
            match self.sent.lock() {
                Ok(mut sent) => sent.push((binding.to_string(), message)),
                Err(_) => return Err(SendError::Unavailable("recorder poisoned".into())),
            }
            Ok(id)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails the message with id `down` as unavailable; counts every call.
    struct Flaky {
        down: &'static str,
        calls: Mutex<Vec<String>>,
    }

    impl Outbound for Flaky {
        fn send<'a>(&'a self, _binding: &'a str, message: OutboundMessage) -> SendFuture<'a> {
            Box::pin(async move {
                let id = message.id.unwrap_or_default();
                self.calls.lock().map_err(|_| SendError::Unavailable("poisoned".into()))?.push(id.clone());
                if id == self.down { Err(SendError::Unavailable("sidecar gone".into())) } else { Ok(id) }
            })
        }
    }

    fn message(id: &str) -> OutboundMessage {
        OutboundMessage { id: Some(id.into()), body: vec![], content_type: None, metadata: vec![] }
    }

    #[tokio::test]
    async fn a_batch_by_default_goes_one_by_one_and_stops_at_an_outage() {
        let flaky = Flaky { down: "b", calls: Mutex::new(Vec::new()) };
        let results = flaky.send_batch("orders", ["a", "b", "c", "d"].map(message).to_vec()).await;
        assert_eq!(results[0], Ok("a".to_string()));
        assert_eq!(results[1], Err(SendError::Unavailable("sidecar gone".into())));
        for unsent in &results[2..] {
            assert!(matches!(unsent, Err(SendError::Unavailable(m)) if m.starts_with("not sent")), "{results:?}");
        }
        let calls = flaky.calls.lock().map(|c| c.clone()).unwrap_or_default();
        assert_eq!(calls, ["a", "b"], "nothing is tried after the outage");
    }
}
