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

/// Sends messages to named output bindings on a guest's behalf.
pub trait Outbound: Send + Sync + 'static {
    /// Sends one message; resolves to the id it was sent with. The message id
    /// is already set: the runtime assigns one before calling this.
    fn send<'a>(&'a self, binding: &'a str, message: OutboundMessage) -> SendFuture<'a>;

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
