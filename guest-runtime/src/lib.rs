//! What `std` gives a guest on `wasm32-wasip2`, for guests built without it:
//! a heap, the canonical ABI's `cabi_realloc`, and a way to report a panic.
//!
//! Why a guest would go without `std`: `std` makes a component import about
//! 13 WASI interfaces (stdio and terminals, environment, exit, streams) for
//! its print and panic machinery, whether the guest prints or not, and every
//! fresh instance pays for wiring each import. The sample consumer takes
//! about 19,000 fewer instructions per fresh instance without them
//! (docs/BENCHMARKS.md). A guest that wants WASI (clocks, printing) keeps
//! `std` and leaves this crate out.
//!
//! A guest opts in with `#![cfg_attr(target_arch = "wasm32", no_std)]`, a
//! dependency on this crate, and a panic handler that reports through its
//! world's `log` import (which this crate cannot name):
//!
//! ```ignore
//! #[cfg(target_arch = "wasm32")]
//! #[panic_handler]
//! fn panic(info: &core::panic::PanicInfo) -> ! {
//!     guest_runtime::report_panic(info, |line| log(Level::Error, line, &[]))
//! }
//! ```
//!
//! On other targets the crate holds only the part tested natively; guests
//! build natively, with `std`, for their own unit tests.
#![no_std]

mod line;
mod panic_report;
#[cfg(target_arch = "wasm32")]
mod wasm;

pub use panic_report::PanicReport;
#[cfg(target_arch = "wasm32")]
pub use wasm::report_panic;
