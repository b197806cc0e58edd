//! Shared bench helpers: the guests from `target/modules` and percentiles.
#![allow(dead_code)] // each bench uses a different part

use std::path::PathBuf;
use std::time::Duration;

/// The bytes of `target/modules/<file>`; run `cargo xtask guests` first.
pub fn module(file: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/modules").join(file);
    match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("cannot read {}: {e}; run `cargo xtask guests` first", path.display());
            std::process::exit(2);
        }
    }
}

/// `(p50, p99)` of a set of samples.
pub fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q).round() as usize];
    (at(0.50), at(0.99))
}

/// `BENCH_LOG=text|json` installs the binary's subscriber (filter from
/// `WASM_PC_LOG`, as the binary reads it): what logging costs a delivery.
/// Unset, nothing is installed and spans cost next to nothing.
pub fn logging() {
    match std::env::var("BENCH_LOG").as_deref() {
        Ok("json") => wasm_pc::logging::init(wasm_pc::logging::LogFormat::Json),
        Ok(_) => wasm_pc::logging::init(wasm_pc::logging::LogFormat::Text),
        Err(_) => {}
    }
}
