//! Integration tests: one binary (as wasmtime does) to keep link time down.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod dapr;
mod dev;
mod e2e;
mod embedded;
mod fuzz_replay;
mod guests;
mod hostile;
mod pods;
mod process;
mod queue;
mod reload;
mod runtime;
mod sidecar;
