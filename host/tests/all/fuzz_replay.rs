//! Every fuzz target's seeds and every input a fuzzer ever failed on
//! (`fuzz/regressions/<target>/`), replayed through the same entry points
//! `cargo xtask fuzz` drives. A crash that was fixed stays fixed here, on
//! stable Rust, in the README's test command.

use std::path::{Path, PathBuf};

/// What `cargo fuzz` calls with each input.
type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 7] = [
    ("amqp_frame", wasm_pc::fuzz::amqp_frame),
    ("amqp_message", wasm_pc::fuzz::amqp_message),
    ("amqp_request", wasm_pc::fuzz::amqp_request),
    ("binding_response", wasm_pc::fuzz::binding_response),
    ("cloudevent", wasm_pc::fuzz::cloudevent),
    ("dapr_delivery", wasm_pc::fuzz::dapr_delivery),
    ("stored_row", wasm_pc::fuzz::stored_row),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect();
    files.sort();
    files
}

/// Runs `target` on `file`, naming the file if it panics.
fn replay(name: &str, target: Target, file: &Path) {
    let data = std::fs::read(file).unwrap();
    if std::panic::catch_unwind(|| target(&data)).is_err() {
        panic!("fuzz target {name} fails on {}", file.display());
    }
}

#[test]
fn every_target_has_seeds_and_passes_them() {
    for (name, target) in TARGETS {
        let seeds = inputs(&fuzz_dir().join("seeds").join(name));
        assert!(!seeds.is_empty(), "fuzz target {name} has no seeds");
        for seed in &seeds {
            replay(name, target, seed);
        }
    }
}

#[test]
fn every_input_a_fuzzer_failed_on_passes() {
    for (name, target) in TARGETS {
        for input in inputs(&fuzz_dir().join("regressions").join(name)) {
            replay(name, target, &input);
        }
    }
}

#[test]
fn the_fuzz_targets_are_the_ones_replayed() {
    let mut declared: Vec<String> = inputs(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_string()))
        .collect();
    declared.sort();
    let replayed: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(declared, replayed, "a fuzz target is missing from the replay (or the replay names one that is gone)");
}
