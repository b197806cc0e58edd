//! Real Dapr for the tests: a daprd with the components the product uses,
//! and the sidecar injector's own patch logic, both built from the
//! `github.com/dapr/dapr` Go module at a pinned release into a cache
//! outside the repo.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::run_logged;

/// The Dapr release the end-to-end tests run against.
const DAPR_VERSION: &str = "v1.18.0";

/// The component registrations compiled into our daprd (files in the
/// module's `cmd/daprd/components`): RabbitMQ for the first end-to-end test,
/// the Service Bus binding and pub/sub the product deploys, and the local
/// secret stores that stand in for Kubernetes Secrets outside a cluster.
const DAPR_COMPONENTS: [&str; 6] = [
    "bindings_rabbitmq.go",
    "pubsub_rabbitmq.go",
    "bindings_azure_servicebusqueues.go",
    "pubsub_azure_servicebus_queues.go",
    "secretstores_local_file.go",
    "secretstores_local_env.go",
];

/// Our program that runs the injector's patch logic (k8s/tests/injectcheck).
const INJECTCHECK: &str = "k8s/tests/injectcheck/main.go";

/// Where builds are kept: outside the repo, reused. The name carries the
/// component set, so changing it builds a new daprd.
fn cache() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("wasm-pc").join(format!("daprd-{DAPR_VERSION}-{:08x}", short_hash(&DAPR_COMPONENTS.concat())))
}

fn short_hash(text: &str) -> u64 {
    // FNV-1a: stable across Rust releases, unlike DefaultHasher.
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)) & 0xffff_ffff
}

/// The cached daprd (it may not be built yet).
pub fn daprd_path() -> PathBuf {
    cache().join("daprd")
}

/// Builds daprd if it is not cached. Its go.mod has replace directives, so
/// it is built inside a copy of the module, not with `go install`. Every
/// registration file sits behind the `allcomponents`/`stablecomponents`
/// tags, which pull in every cloud SDK; copies of the ones we need go under
/// a `wasmpc` tag instead, which keeps the build to minutes.
pub fn daprd() -> anyhow::Result<PathBuf> {
    let out = daprd_path();
    if out.exists() {
        return Ok(out);
    }
    let started = std::time::Instant::now();
    let src = source()?;
    let components = src.join("cmd/daprd/components");
    for file in DAPR_COMPONENTS {
        let text = std::fs::read_to_string(components.join(file)).with_context(|| format!("dapr has no {file}"))?;
        let tagged = text.replacen("//go:build allcomponents || stablecomponents", "//go:build wasmpc", 1);
        anyhow::ensure!(tagged != text, "{file} no longer has the build tag this task rewrites");
        std::fs::write(components.join(format!("wasmpc_{file}")), tagged)?;
    }
    let notag = std::fs::read_to_string(components.join("zz_notag.go"))?;
    std::fs::write(
        components.join("zz_notag.go"),
        notag.replacen(
            "//go:build !allcomponents && !stablecomponents",
            "//go:build !allcomponents && !stablecomponents && !wasmpc",
            1,
        ),
    )?;
    let mut build = Command::new("go");
    build
        .current_dir(&src)
        .args(["build", "-tags", "wasmpc", "-o"])
        .arg(&out)
        .arg("./cmd/daprd")
        .env("GOFLAGS", "-mod=mod");
    run_logged(&mut build, &cache().join("daprd-build.log"))?;
    eprintln!("xtask: built daprd {DAPR_VERSION} in {:.0} s", started.elapsed().as_secs_f64());
    Ok(out)
}

/// Builds `wasmpc-injectcheck` (our program on Dapr's injector packages)
/// inside the Dapr module, against its go.mod; rebuilt when the program
/// changes.
pub fn injectcheck(root: &Path) -> anyhow::Result<PathBuf> {
    let program = std::fs::read_to_string(root.join(INJECTCHECK)).with_context(|| format!("reading {INJECTCHECK}"))?;
    let out = cache().join(format!("wasmpc-injectcheck-{:08x}", short_hash(&program)));
    if out.exists() {
        return Ok(out);
    }
    let src = source()?;
    let dir = src.join("cmd/wasmpc-injectcheck");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("main.go"), program)?;
    let mut build = Command::new("go");
    build.current_dir(&src).args(["build", "-o"]).arg(&out).arg("./cmd/wasmpc-injectcheck").env("GOFLAGS", "-mod=mod");
    run_logged(&mut build, &cache().join("injectcheck-build.log"))?;
    Ok(out)
}

/// A writable copy of the `github.com/dapr/dapr` module at [`DAPR_VERSION`],
/// made once.
fn source() -> anyhow::Result<PathBuf> {
    let src = cache().join("src");
    if src.join(".complete").exists() {
        return Ok(src);
    }
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
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(cache())?;
    crate::run(Command::new("cp").arg("-r").arg(&dir).arg(&src))?;
    crate::run(Command::new("chmod").arg("-R").arg("u+w").arg(&src))?;
    std::fs::write(src.join(".complete"), "")?;
    Ok(src)
}
