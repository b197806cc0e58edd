//! The real guest components, built once per test run from the workspace's
//! guest crates (as wasmtime's test-programs do), into their own target dir.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// Where `cargo xtask guests` and these tests put the components.
pub fn guest_dir() -> PathBuf {
    workspace().join("target/guests/wasm32-wasip2/guest")
}

fn cargo_build(target_dir: &str, extra: &[&str]) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(workspace())
        .args(["build", "--quiet", "--profile", "guest", "--target", "wasm32-wasip2"])
        .args(extra)
        .env("CARGO_TARGET_DIR", workspace().join(target_dir))
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the guests failed ({status}); is the wasm32-wasip2 target installed?"));
    }
    Ok(())
}

fn build() -> Result<PathBuf, String> {
    cargo_build(
        "target/guests",
        &[
            "-p",
            "guest-consumer",
            "-p",
            "guest-producer",
            "-p",
            "test-guests",
            "-p",
            "compat-guest",
            "-p",
            "minimal-guest",
        ],
    )?;
    // The second flavor builds into its own target dir, so neither build
    // undoes the other.
    cargo_build("target/guests-b", &["-p", "test-guests", "--features", "flavor-b"])?;
    Ok(guest_dir())
}

/// The bytes of a guest component: `consumer`, `producer`, `faulty`,
/// `faulty-b` (the same test guest built with the `flavor-b` feature),
/// `compat` (a consumer built against the 0.1.0 WIT) or `minimal` (the
/// trivial consumer without `std`).
pub fn bytes(which: &str) -> Vec<u8> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = match BUILT.get_or_init(build) {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    };
    let file = match which {
        "consumer" => dir.join("guest_consumer.wasm"),
        "producer" => dir.join("guest_producer.wasm"),
        "faulty" => dir.join("test_guests.wasm"),
        "compat" => dir.join("compat_guest.wasm"),
        "minimal" => dir.join("minimal_guest.wasm"),
        "faulty-b" => workspace().join("target/guests-b/wasm32-wasip2/guest/test_guests.wasm"),
        other => panic!("no guest named {other}"),
    };
    std::fs::read(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()))
}
