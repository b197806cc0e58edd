//! A 64 KiB stack instead of Rust's default 1 MiB: the guest's linear memory
//! is 2 wasm pages instead of 17, and a fresh instance's slot reset walks
//! that much less (docs/BENCHMARKS.md). With `--stack-first`, which Rust's
//! wasm targets use, a stack overflow traps instead of corrupting memory.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|arch| arch == "wasm32") {
        println!("cargo:rustc-link-arg=-zstack-size=65536");
    }
}
