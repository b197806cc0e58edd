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
