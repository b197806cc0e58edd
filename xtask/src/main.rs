//! Project tasks. `cargo xtask <task>`:
//!
//! - `guests`: build the guest components (wasm32-wasip2, size-optimised) and
//!   copy them to `target/modules/{producer,consumer}.wasm`.
//! - `demo [N]`: build the guests and the host, run `wasm-pc dev --demo N`.
//! - `daprd`: build a real daprd (pinned release, RabbitMQ binding only) from
//!   the Go module proxy into a cache outside the repo.
//! - `e2e`: build daprd if needed, then run the end-to-end test with real
//!   daprd sidecars and a real RabbitMQ broker.
//! - `ci`: everything CI checks: fmt, clippy, guests, the Rust tests and the
//!   Kubernetes manifest checks, closing with one `ci: N passed, M failed` line.

use std::path::{Path, PathBuf};
use std::process::Command;

use std::io::Write;

use anyhow::{Context, bail};

/// Guest crates and the module file each becomes.
const GUESTS: [(&str, &str); 3] =
    [("guest-producer", "producer.wasm"), ("guest-consumer", "consumer.wasm"), ("test-guests", "faulty.wasm")];
/// Overlays whose modules ConfigMap is generated from the built guests.
const K8S_MODULE_DIRS: [&str; 2] = ["k8s/overlays/hot-swap/modules", "k8s/overlays/rolling/modules"];
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
        Some("daprd") => daprd().map(|path| eprintln!("xtask: daprd ready at {}", path.display())),
        Some("e2e") => {
            daprd()?;
            guests(&root)?;
            e2e(&root, true).map(|_| ())
        }
        _ => bail!("usage: cargo xtask <guests | demo [N] | ci | daprd | e2e>"),
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
    Ok(())
}

fn ci(root: &Path) -> anyhow::Result<()> {
    cargo(root, &["fmt", "--all", "--check"])?;
    guests(root)?;
    cargo(root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    let rust = rust_tests(root);
    let manifests = manifest_tests(root);
    let end_to_end = if daprd_path().exists() && which("rabbitmq-server") {
        e2e(root, false)
    } else {
        writeln!(
            std::io::stdout().lock(),
            "e2e: SKIPPED: no cached daprd at {} (or no rabbitmq-server); `cargo xtask e2e` builds daprd and runs it",
            daprd_path().display()
        )?;
        Ok((0, 0))
    };
    let (passed, failed) = [&rust, &manifests, &end_to_end].iter().fold((0, 0), |(p, f), r| match r {
        Ok((rp, rf)) => (p + rp, f + rf),
        Err(_) => (p, f + 1),
    });
    // One plain closing line for every runner together.
    writeln!(std::io::stdout().lock(), "ci: {passed} passed, {failed} failed")?;
    rust?;
    manifests?;
    end_to_end?;
    Ok(())
}

/// The Dapr release the end-to-end test runs against.
const DAPR_VERSION: &str = "v1.18.0";

/// Where `cargo xtask daprd` keeps its build: outside the repo, reused.
fn daprd_cache() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("wasm-pc").join(format!("daprd-{DAPR_VERSION}"))
}

fn daprd_path() -> PathBuf {
    daprd_cache().join("daprd")
}

fn which(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// Builds daprd from the `github.com/dapr/dapr` module at a pinned release.
/// Its go.mod has replace directives, so it is built inside a copy of the
/// module, not with `go install pkg@version`. Only the RabbitMQ binding is
/// compiled in (a `wasmpc` build tag), which keeps the build to minutes.
fn daprd() -> anyhow::Result<PathBuf> {
    let out = daprd_path();
    if out.exists() {
        return Ok(out);
    }
    let started = std::time::Instant::now();
    let cache = daprd_cache();
    let download = Command::new("go")
        .args(["mod", "download", "-json", &format!("github.com/dapr/dapr@{DAPR_VERSION}")])
        .env("GOFLAGS", "-mod=mod")
        .output()
        .context("running go (is Go installed?)")?;
    let listing = String::from_utf8_lossy(&download.stdout);
    let dir = listing
        .lines()
        .find_map(|l| l.trim().strip_prefix("\"Dir\": \""))
        .map(|l| l.trim_end_matches(['"', ',']).to_string())
        .with_context(|| format!("go mod download gave no Dir: {listing}"))?;
    let src = cache.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&cache)?;
    run(Command::new("cp").arg("-r").arg(&dir).arg(&src))?;
    run(Command::new("chmod").arg("-R").arg("u+w").arg(&src))?;
    let components = src.join("cmd/daprd/components");
    let rabbit = std::fs::read_to_string(components.join("bindings_rabbitmq.go"))?;
    std::fs::write(
        components.join("wasmpc_rabbitmq.go"),
        rabbit.replacen("//go:build allcomponents || stablecomponents", "//go:build wasmpc", 1),
    )?;
    let notag = std::fs::read_to_string(components.join("zz_notag.go"))?;
    std::fs::write(
        components.join("zz_notag.go"),
        notag.replacen(
            "//go:build !allcomponents && !stablecomponents",
            "//go:build !allcomponents && !stablecomponents && !wasmpc",
            1,
        ),
    )?;
    run(Command::new("go")
        .current_dir(&src)
        .args(["build", "-tags", "wasmpc", "-o"])
        .arg(&out)
        .arg("./cmd/daprd")
        .env("GOFLAGS", "-mod=mod"))?;
    eprintln!("xtask: built daprd {DAPR_VERSION} in {:.0} s", started.elapsed().as_secs_f64());
    Ok(out)
}

/// The end-to-end test (ignored by default): real daprd, real RabbitMQ.
fn e2e(root: &Path, install_broker: bool) -> anyhow::Result<(u64, u64)> {
    if install_broker && !which("rabbitmq-server") {
        run(Command::new("apt-get").args(["install", "-y", "-qq", "rabbitmq-server"]))?;
    }
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .current_dir(root)
        .args(["test", "-p", "wasm-pc", "--test", "all", "e2e::", "--", "--ignored", "--nocapture"])
        .env("WASM_PC_DAPRD", daprd_path());
    echo_and_count(&mut command, |line| match line.strip_prefix("test result: ") {
        Some(rest) => count_words(rest.split([';', '.'])),
        None => (0, 0),
    })
}

/// The Rust tests; returns (passed, failed) summed over every test binary.
fn rust_tests(root: &Path) -> anyhow::Result<(u64, u64)> {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root).args(["test", "--workspace"]);
    for guest in GUESTS {
        command.args(["--exclude", guest.0]);
    }
    let counts = echo_and_count(&mut command, |line| match line.strip_prefix("test result: ") {
        Some(rest) => count_words(rest.split([';', '.'])),
        None => (0, 0),
    })?;
    if counts.0 == 0 {
        bail!("no test ran");
    }
    Ok(counts)
}

/// The Kubernetes manifest checks (pytest; see k8s/tests).
fn manifest_tests(root: &Path) -> anyhow::Result<(u64, u64)> {
    run(Command::new("python3").current_dir(root).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "kubernetes-validate",
        "pyyaml",
        "pytest",
    ]))?;
    let mut command = Command::new("python3");
    command.current_dir(root).args(["-m", "pytest", "-q", "k8s/tests"]);
    // pytest's summary line: "3 failed, 26 passed in 2.17s".
    echo_and_count(&mut command, |line| {
        if line.contains(" in ") && (line.contains(" passed") || line.contains(" failed")) {
            count_words(line.split(','))
        } else {
            (0, 0)
        }
    })
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
