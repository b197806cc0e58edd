//! Project tasks. `cargo xtask <task>`:
//!
//! - `guests`: build the guest components (wasm32-wasip2, size-optimised) and
//!   copy them to `target/modules/{producer,consumer}.wasm`.
//! - `demo [N]`: build the guests and the host, run `wasm-pc dev --demo N`.
//! - `ci`: everything CI checks: fmt, clippy, guests, all tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Guest crates and the module file each becomes.
const GUESTS: [(&str, &str); 3] =
    [("guest-producer", "producer.wasm"), ("guest-consumer", "consumer.wasm"), ("test-guests", "faulty.wasm")];
/// A ConfigMap holds at most 1 MiB.
const MAX_GUEST_BYTES: u64 = 1 << 20;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    match args.first().map(String::as_str) {
        Some("guests") => guests(&root),
        Some("demo") => {
            guests(&root)?;
            let count = args.get(1).map(String::as_str).unwrap_or("2000");
            cargo(&root, &["run", "--release", "--quiet", "-p", "wasm-pc", "--", "dev", "--demo", count])
        }
        Some("ci") => ci(&root),
        _ => bail!("usage: cargo xtask <guests | demo [N] | ci>"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).current_dir(root).args(args))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {command:?}");
    let status = command.status().with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}

/// Builds the guests into `target/guests` (their own target dir, as the
/// host's tests do) and installs them as modules.
fn guests(root: &Path) -> anyhow::Result<()> {
    let mut args = vec!["build", "--quiet", "--profile", "guest", "--target", "wasm32-wasip2"];
    for (krate, _) in GUESTS {
        args.extend(["-p", krate]);
    }
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(&args)
        .env("CARGO_TARGET_DIR", root.join("target/guests")))?;
    let built = root.join("target/guests/wasm32-wasip2/guest");
    let modules = root.join("target/modules");
    std::fs::create_dir_all(&modules)?;
    for (krate, file) in GUESTS {
        let from = built.join(format!("{}.wasm", krate.replace('-', "_")));
        let size = std::fs::metadata(&from).with_context(|| format!("{} was not built", from.display()))?.len();
        if size > MAX_GUEST_BYTES {
            bail!("{krate} is {size} bytes; a ConfigMap holds at most {MAX_GUEST_BYTES}");
        }
        std::fs::copy(&from, modules.join(file))?;
        eprintln!("xtask: {file:<14} {size:>8} bytes  ({krate})");
    }
    Ok(())
}

fn ci(root: &Path) -> anyhow::Result<()> {
    cargo(root, &["fmt", "--all", "--check"])?;
    guests(root)?;
    cargo(root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    test_and_count(root)
}

/// Runs the tests, echoing their output, and ends with one plain
/// `ci: N passed, M failed` line summing every test binary.
fn test_and_count(root: &Path) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root).args(["test", "--workspace"]);
    for guest in GUESTS {
        command.args(["--exclude", guest.0]);
    }
    eprintln!("xtask: {command:?}");
    let mut child = command.stdout(std::process::Stdio::piped()).spawn()?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        let mut stdout = std::io::stdout().lock();
        for line in BufReader::new(out).lines() {
            let line = line?;
            writeln!(stdout, "{line}")?;
            if let Some(rest) = line.strip_prefix("test result: ") {
                for part in rest.split([';', '.']) {
                    let mut words = part.split_whitespace();
                    match (words.next().map(str::parse::<u64>), words.next()) {
                        (Some(Ok(n)), Some("passed")) => passed += n,
                        (Some(Ok(n)), Some("failed")) => failed += n,
                        _ => {}
                    }
                }
            }
        }
    }
    let status = child.wait()?;
    writeln!(std::io::stdout().lock(), "ci: {passed} passed, {failed} failed")?;
    if !status.success() || failed > 0 {
        bail!("tests failed: {status}");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}
