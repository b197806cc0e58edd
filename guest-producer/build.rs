//! A 64 KiB stack instead of Rust's default 1 MiB: the guest's linear memory
//! shrinks by 15 wasm pages, and every fresh instance's slot reset walks
//! that much less (docs/BENCHMARKS.md). Only address-taken locals live on
//! this stack; the deepest JSON the guest reads fits with room to spare
//! (test `the_sample_guests_stacks_hold_the_deepest_json_they_read`), and
//! an overflow traps rather than corrupting memory (`--stack-first`).
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|arch| arch == "wasm32") {
        println!("cargo:rustc-link-arg=-zstack-size=65536");
    }
}
