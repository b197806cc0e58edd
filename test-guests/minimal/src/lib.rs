//! The trivial consumer, built without the standard library: it acknowledges
//! every message but one whose body is `retry`.
//!
//! Its component imports the wasm-pc types and nothing else. A `std` guest
//! on `wasm32-wasip2` also imports WASI's environment, exit, stdio, streams
//! and clocks whether it uses them or not, and each import is wiring that
//! every instantiation pays for; the invoke bench puts the two side by side.
#![cfg_attr(target_arch = "wasm32", no_std)]

extern crate alloc;

use alloc::string::String;
// The heap and `cabi_realloc` that `std` would otherwise give.
use guest_runtime as _;

use exports::wasm_pc::app::consume::{ConsumeError, Guest, Message};

wit_bindgen::generate!({ world: "consumer", path: "../../wit" });

struct Minimal;

impl Guest for Minimal {
    fn handle(message: Message) -> Result<(), ConsumeError> {
        match message.body.as_slice() {
            b"retry" => Err(ConsumeError::Retry(String::from("asked to retry"))),
            _ => Ok(()),
        }
    }
}

export!(Minimal);

/// A panic ends the instance with a trap, which the host turns into a
/// retry. (The sample guests report the panic through their `log` import
/// first; this one imports nothing it need not.)
#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}
