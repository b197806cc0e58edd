//! Dapr mode: the host speaks Dapr's HTTP contract in both directions (see
//! `shared/dapr-contract.md` and `docs/dapr-pubsub-contract.md`).
//!
//! - [`binding`]: the input binding as a source (daprd POSTs each message).
//! - [`pubsub`]: a pub/sub subscription as a source (CloudEvents, statuses),
//!   and [`cloudevent`], how its events decode.
//! - [`client`]: what the host calls on daprd (output bindings, readiness).
//! - [`codec`]: how bodies and metadata survive the trip.
//! - `connections`: the host's connections to daprd, let go of at the
//!   stop signal.
//! - `attempts`: the delivery-count estimate the binding does not give.

mod attempts;
pub mod binding;
pub mod client;
pub mod cloudevent;
pub mod codec;
mod connections;
pub mod pubsub;

pub use binding::{Binding, BindingOptions};
pub use client::{BindingError, DaprClient, DaprOutbound, RetryPolicy};
pub use pubsub::{PubSub, PubSubOptions};
