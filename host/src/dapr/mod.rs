//! Dapr mode: the host speaks the Dapr HTTP binding contract in both
//! directions (see `shared/dapr-contract.md`).
//!
//! - [`app`]: what daprd calls (input binding route, subscription probe,
//!   health) plus the producer route.
//! - [`client`]: what the host calls on daprd (output bindings, readiness).
//! - [`codec`]: how bodies and metadata survive the trip.
//! - `attempts`: the delivery-count estimate daprd cannot give.

pub mod app;
mod attempts;
pub mod client;
pub mod codec;

pub use app::{App, AppOptions};
pub use client::{BindingError, DaprClient, DaprOutbound, RetryPolicy};
