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

/// A JSON order of about 1 KiB (14 lines and a long customer name): what the
/// Dapr benches and the drain send, so the guest's parsing weighs as it does
/// there.
pub fn order_of_about_1k() -> Vec<u8> {
    let items: Vec<_> = (0..14)
        .map(|i| serde_json::json!({"sku": format!("SKU-{i:04}-XYZ"), "qty": 1 + i % 3, "price_cents": 1999 + i}))
        .collect();
    let mut order = serde_json::json!({"id": "o-1", "customer": "", "items": items});
    let len = serde_json::to_vec(&order).map_or(0, |bytes| bytes.len());
    order["customer"] = serde_json::Value::String("c".repeat(1024usize.saturating_sub(len)));
    serde_json::to_vec(&order).unwrap_or_default()
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
    use clap::ValueEnum;
    use wasm_pc::logging::LogFormat;

    if let Ok(value) = std::env::var("BENCH_LOG") {
        // Parsed as the binary parses WASM_PC_LOG_FORMAT: a typo is refused,
        // not measured as the other format.
        match LogFormat::from_str(&value, false) {
            Ok(format) => wasm_pc::logging::init(format),
            Err(e) => {
                eprintln!("BENCH_LOG={value}: {e}");
                std::process::exit(2);
            }
        }
    }
}
