//! `cargo xtask fuzz [SECONDS]`: every target in `fuzz/` for a bounded time
//! each (60 s by default), with `cargo fuzz` on nightly Rust. Each starts
//! from its seeds and the corpus earlier runs grew; an input a target fails
//! on is copied to `fuzz/regressions/<target>/`, which the README's test
//! command replays (`host/tests/all/fuzz_replay.rs`), so a crash becomes a
//! regression test by committing that file with its fix. `FUZZ_ONLY=amqp`
//! runs only the targets whose names contain one of its comma-separated words.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{run, run_logged};

pub(crate) fn run_all(root: &Path, seconds: u64) -> anyhow::Result<()> {
    let fuzz = root.join("fuzz");
    ensure_cargo_fuzz()?;
    run(cargo_fuzz(&fuzz).args(["build", "--release", "--debug-assertions"]))?;
    let mut rows = Vec::new();
    let mut crashed = Vec::new();
    // `FUZZ_ONLY=amqp,stored` runs the targets whose names hold one of those.
    let only = std::env::var("FUZZ_ONLY").unwrap_or_default();
    let wanted = |t: &str| only.is_empty() || only.split(',').any(|w| t.contains(w.trim()));
    for target in targets(&fuzz)?.into_iter().filter(|t| wanted(t)) {
        let corpus = fuzz.join("corpus").join(&target);
        std::fs::create_dir_all(&corpus)?;
        let artifacts = fuzz.join("artifacts").join(&target);
        std::fs::create_dir_all(&artifacts)?;
        let before = files(&artifacts);
        let log = root.join("target/fuzz-logs").join(format!("{target}.log"));
        let mut command = cargo_fuzz(&fuzz);
        command
            .args(["run", "--release", "--debug-assertions", &target])
            .arg(&corpus)
            .arg(fuzz.join("seeds").join(&target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args(["-timeout=10", "-rss_limit_mb=2048", "-max_len=65536", "-print_final_stats=1"])
            .env("WASM_PC_FUZZ_DIR", std::env::temp_dir());
        let outcome = run_logged(&mut command, &log);
        let log_text = std::fs::read_to_string(&log).unwrap_or_default();
        let runs = final_stat(&log_text, "stat::number_of_executed_units:").unwrap_or(0);
        let found: Vec<PathBuf> = files(&artifacts).into_iter().filter(|f| !before.contains(f)).collect();
        let result = match (&outcome, found.is_empty()) {
            (Ok(()), true) => "no failure".to_string(),
            _ => {
                let regressions = fuzz.join("regressions").join(&target);
                std::fs::create_dir_all(&regressions)?;
                for input in &found {
                    if let Some(name) = input.file_name() {
                        std::fs::copy(input, regressions.join(name))?;
                    }
                }
                crashed.push(target.clone());
                format!("FAILED: {} input(s) copied to fuzz/regressions/{target}/ (log {})", found.len(), log.display())
            }
        };
        rows.push(format!("| {target} | {seconds} | {runs} | {} | {result} |", files(&corpus).len()));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "| target | seconds | inputs run | corpus | result |\n|---|---|---|---|---|")?;
    for row in rows {
        writeln!(out, "{row}")?;
    }
    if !crashed.is_empty() {
        bail!("fuzz targets failed: {}", crashed.join(", "));
    }
    Ok(())
}

fn cargo_fuzz(fuzz: &Path) -> Command {
    let mut command = Command::new("cargo");
    // The nightly toolchain is named explicitly: `cargo fuzz` needs it for
    // the sanitizer and coverage flags, whatever the workspace's default.
    command.current_dir(fuzz).args(["+nightly", "fuzz"]).env_remove("RUSTUP_TOOLCHAIN").env_remove("CARGO");
    command
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let present = Command::new("cargo").args(["fuzz", "--version"]).output().is_ok_and(|o| o.status.success());
    if !present {
        run(Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
        run(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))?;
    }
    Ok(())
}

/// The targets `fuzz/Cargo.toml` declares, one file each in `fuzz_targets/`.
fn targets(fuzz: &Path) -> anyhow::Result<Vec<String>> {
    let dir = fuzz.join("fuzz_targets");
    let mut names: Vec<String> =
        files(&dir).iter().filter_map(|p| Some(p.file_stem()?.to_str()?.to_string())).collect();
    names.sort();
    if names.is_empty() {
        bail!("no fuzz targets in {}", dir.display());
    }
    Ok(names)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default()
}

/// A `-print_final_stats` figure, e.g. `stat::number_of_executed_units: 1234`.
fn final_stat(log: &str, name: &str) -> Option<u64> {
    log.lines().rev().find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
}

/// Parses the optional seconds argument.
pub(crate) fn seconds(arg: Option<&str>) -> anyhow::Result<u64> {
    arg.map(|s| s.parse::<u64>().with_context(|| format!("seconds per target, not {s:?}")))
        .transpose()
        .map(|s| s.unwrap_or(60))
}
