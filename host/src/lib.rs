//! wasm-pc: a host that runs producer and consumer logic as WebAssembly
//! components, fed by sources (an embedded queue, a Dapr sidecar).
//!
//! The pieces, in the order a message meets them:
//!
//! - a *source* hands a message to the [`dispatch::Dispatcher`]: the
//!   embedded worker pool ([`embedded`]), the Dapr input binding or pub/sub
//!   ([`dapr`]);
//! - the [`runtime`] (one wasmtime engine) invokes the live consumer with
//!   limits, a fresh instance per invocation; its `outbound` import goes to
//!   the queue or to daprd;
//! - the source settles the outcome in its own terms.
//!
//! [`host`] composes them from the options of `dev` and `serve`; [`queue`]
//! is the durable SQLite queue, which [`servicebus`] also serves to Service
//! Bus clients over AMQP. Guests see only the WIT worlds in `wit/`.
//!
//! The public modules are what the binary, the tests and the benchmarks
//! use; everything else is private to the crate.

mod cli;
pub mod dapr;
pub mod dispatch;
pub mod embedded;
#[doc(hidden)]
pub mod fuzz;
pub mod host;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod modules;
pub mod queue;
pub mod reload;
mod reply;
pub mod runtime;
pub mod scale;
pub mod servicebus;
mod settlement;
mod shutdown;
mod slot;

pub use cli::main;

/// jemalloc, declared here rather than in `main.rs` so that the benchmarks
/// and tests run on the allocator the binary ships with. Buffers cross
/// threads on every message (the queue thread allocates each received
/// message, a tokio worker frees it), which glibc serves through locked
/// arenas: with jemalloc the embedded bench uses a tenth less CPU, for about
/// 7 MiB more resident memory; mimalloc saved as much but kept 70 MiB more
/// (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
