//! A consumer built against `wasm-pc:app@0.1.0`, the WIT of the first
//! release (a frozen copy lives in `wit/`). Newer hosts must keep loading and
//! running it: the host's WIT only grows in semver-compatible steps.
//!
//! Body `ok` succeeds after logging; anything else is retried with the value
//! of config `answer` as the reason, so a test can see the imports work.

use exports::wasm_pc::app::consume::{ConsumeError, Guest, Message};
use wasm_pc::app::config;
use wasm_pc::app::log::{Level, log};

wit_bindgen::generate!({ world: "consumer", path: "wit" });

struct Compat;

impl Guest for Compat {
    fn handle(message: Message) -> Result<(), ConsumeError> {
        log(Level::Info, "compat guest called", &[("id".to_string(), message.id.clone())]);
        if message.body == b"ok" {
            return Ok(());
        }
        Err(ConsumeError::Retry(config::get("answer").unwrap_or_default()))
    }
}

export!(Compat);
