//! wasm-pc: a host that runs producer and consumer logic as WebAssembly
//! components.
//!
//! The pieces, in the order a message meets them:
//!
//! - [`runtime`]: one wasmtime engine; loads, checks and caches components and
//!   invokes them with limits, one fresh instance per invocation.
//! - [`outbound`]: where a guest's `outbound.send` goes (the embedded queue or
//!   a Dapr output binding), behind one trait.
//!
//! Guests see only the WIT worlds in `wit/`; the host's job is to give them
//! messages and requests, and to settle what they answer.

pub mod cli;
pub mod dapr;
pub mod dispatch;
pub mod embedded;
pub mod http;
pub mod metrics;
pub mod modules;
pub mod outbound;
pub mod queue;
pub mod reload;
pub mod runtime;
pub mod scale;
pub mod shutdown;
