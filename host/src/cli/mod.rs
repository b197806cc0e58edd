//! The command line: one binary, one subcommand per job.
//!
//! Every flag can also be set through the environment variable named in its
//! help, so a Kubernetes manifest configures the host without a wrapper.

mod demo;
mod dev;
mod queue;
mod serve;
pub(crate) mod servicebus;
mod tools;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;
use crate::modules::{ModuleSource, parse_pairs};
use crate::runtime::{Limits, RuntimeOptions, World};

/// Runs producer and consumer logic as WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "wasm-pc", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, env = "WASM_PC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Threads that run the host's tasks and guests. The default is one per
    /// core this process may use. Where a sidecar drives the host one
    /// delivery at a time on a small pod, 1 saves waking a second thread for
    /// every delivery (see docs/BENCHMARKS.md).
    #[arg(long, env = "WASM_PC_WORKER_THREADS", global = true)]
    worker_threads: Option<std::num::NonZeroUsize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Embedded mode: producer, consumer and a durable SQLite queue in one process.
    Dev(Box<dev::DevArgs>),
    /// Dapr mode: serve daprd's input binding and/or the producer route.
    Serve(Box<serve::ServeArgs>),
    /// A local Azure Service Bus endpoint (AMQP) on the embedded queue.
    #[command(name = "servicebus")]
    ServiceBus(Box<servicebus::ServiceBusArgs>),
    /// Inspect and repair the embedded queue database.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// Check a module against a world, as the host would when loading it.
    Check(tools::CheckArgs),
    /// Precompile a module for this host's engine.
    Compile(tools::CompileArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::logging::init(cli.log_format);
    raise_open_files_limit();
    let threads = cli.worker_threads;
    let result = match cli.command {
        Command::Dev(args) => run_async(threads, dev::run(*args)),
        Command::Serve(args) => run_async(threads, serve::run(*args)),
        Command::ServiceBus(args) => run_async(threads, servicebus::run(*args)),
        Command::Queue(cmd) => queue::run(cmd),
        Command::Check(args) => tools::check(args),
        Command::Compile(args) => tools::compile(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            tracing::error!("{error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_async(
    worker_threads: Option<std::num::NonZeroUsize>,
    future: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        builder.worker_threads(threads.get());
    }
    builder.enable_all().build()?.block_on(future)
}

/// Engine limits and the artifact cache.
#[derive(Debug, Clone, Args)]
struct RuntimeArgs {
    /// Longest one invocation may run, in milliseconds.
    #[arg(long, env = "WASM_PC_TIMEOUT_MS", default_value_t = 5_000)]
    timeout_ms: u64,
    /// Largest a guest's linear memory may grow, in MiB.
    #[arg(long, env = "WASM_PC_MEMORY_MIB", default_value_t = 64)]
    memory_mib: usize,
    /// Most invocations running at once (pooling allocator slots, plus a
    /// few for instances prepared ahead).
    #[arg(long, env = "WASM_PC_MAX_INSTANCES", default_value_t = 1_000)]
    max_instances: u32,
    /// Most memory, in MiB, the instance pool's idle slots keep resident
    /// between invocations, all together; a burst of invocations leaves at
    /// most about this much (and up to the same again waiting to be
    /// returned) behind. More per slot saves page faults.
    #[arg(long, env = "WASM_PC_POOL_RESIDENT_MIB", default_value_t = 512)]
    pool_resident_mib: usize,
    /// Directory for precompiled modules; restarts skip compilation.
    #[arg(long, env = "WASM_PC_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Messages one instance may serve in sequence. 1 gives every message a
    /// fresh instance; more skips instantiation but lets a guest's globals
    /// and heap carry over between messages (an instance that fails is
    /// always dropped).
    #[arg(long, env = "WASM_PC_INSTANCE_REUSE", default_value = "1")]
    instance_reuse: NonZeroU32,
    /// Instances of each module made ahead of the messages that take them
    /// (never used before: isolation is unchanged), with spent ones dropped
    /// after the answer, so a delivery waits for neither. 0 does both while
    /// the delivery waits.
    #[arg(long, env = "WASM_PC_PREPARED_INSTANCES", default_value_t = 2)]
    prepared_instances: usize,
}

impl RuntimeArgs {
    fn options(&self) -> RuntimeOptions {
        RuntimeOptions {
            limits: Limits {
                timeout: Duration::from_millis(self.timeout_ms),
                max_memory_bytes: self.memory_mib << 20,
                max_concurrent: self.max_instances,
                pool_resident_bytes: self.pool_resident_mib << 20,
                ..Limits::default()
            },
            cache_dir: self.cache_dir.clone(),
            instance_reuse: self.instance_reuse,
            prepared_instances: self.prepared_instances,
            ..RuntimeOptions::default()
        }
    }
}

/// How the HTTP listener protects itself.
#[derive(Debug, Clone, Args)]
struct ListenerArgs {
    /// A request's headers must arrive within this many milliseconds.
    #[arg(long, env = "WASM_PC_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    header_timeout_ms: u64,
    /// Seconds a connection may stay idle before it is closed.
    #[arg(long, env = "WASM_PC_IDLE_TIMEOUT_SECS", default_value_t = 120)]
    idle_timeout_secs: u64,
    /// Connections at once (plus a few kept for loopback peers such as
    /// daprd); more get a 503.
    #[arg(long, env = "WASM_PC_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
}

impl ListenerArgs {
    fn limits(&self) -> crate::http::ListenerLimits {
        crate::http::ListenerLimits {
            header_timeout: Duration::from_millis(self.header_timeout_ms.max(1)),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs.max(1)),
            max_connections: self.max_connections.max(1),
            ..crate::http::ListenerLimits::default()
        }
    }
}

/// Raises the soft limit on open files to the hard one: every connection
/// costs a descriptor, and a default of 1,024 is reached by a flood long
/// before the connection cap could help.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        tracing::debug!(open_files = limit.rlim_cur, "raised the open files limit");
    }
}

/// Where modules come from and what they are told.
#[derive(Debug, Clone, Args)]
struct ModuleArgs {
    /// Directory holding the modules (a ConfigMap mount in Kubernetes).
    #[arg(long, env = "WASM_PC_MODULES_DIR", default_value = "target/modules")]
    modules_dir: PathBuf,
    /// File name of the producer module in the modules directory.
    #[arg(long, env = "WASM_PC_PRODUCER_FILE", default_value = "producer.wasm")]
    producer_file: String,
    /// File name of the consumer module in the modules directory.
    #[arg(long, env = "WASM_PC_CONSUMER_FILE", default_value = "consumer.wasm")]
    consumer_file: String,
    /// Config for the producer, `key=value` (repeat, or comma-separated in the env var).
    #[arg(long = "producer-config", env = "WASM_PC_PRODUCER_CONFIG", value_delimiter = ',')]
    producer_config: Vec<String>,
    /// Config for the consumer, `key=value`.
    #[arg(long = "consumer-config", env = "WASM_PC_CONSUMER_CONFIG", value_delimiter = ',')]
    consumer_config: Vec<String>,
    /// Version label of the producer, shown with its hash in logs and metrics.
    #[arg(long, env = "WASM_PC_PRODUCER_VERSION")]
    producer_version: Option<String>,
    /// Version label of the consumer.
    #[arg(long, env = "WASM_PC_CONSUMER_VERSION")]
    consumer_version: Option<String>,
    /// Watch the modules directory and swap changed modules in.
    #[arg(long, env = "WASM_PC_RELOAD", default_value_t = true, action = clap::ArgAction::Set)]
    reload: bool,
    /// Seconds between re-scans that back up missed file events.
    #[arg(long, env = "WASM_PC_RESCAN_SECS", default_value_t = 5.0)]
    rescan_secs: f64,
}

impl ModuleArgs {
    fn rescan(&self) -> Duration {
        Duration::from_secs_f64(self.rescan_secs.max(0.1))
    }

    fn source(&self, world: World) -> anyhow::Result<ModuleSource> {
        let (file, config, version) = match world {
            World::Producer => (&self.producer_file, &self.producer_config, &self.producer_version),
            World::Consumer => (&self.consumer_file, &self.consumer_config, &self.consumer_version),
        };
        let mut source = ModuleSource::in_dir(&self.modules_dir, file, world);
        source.config =
            parse_pairs(config.iter().map(String::as_str)).map_err(|e| anyhow::anyhow!("{world} config: {e}"))?;
        source.version = version.clone();
        Ok(source)
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_sizes_the_runtime_and_refuses_zero() {
        let cli = Cli::try_parse_from(["wasm-pc", "serve", "--role", "consumer", "--worker-threads", "3"]).unwrap();
        let mut workers = 0;
        run_async(cli.worker_threads, async {
            workers = tokio::runtime::Handle::current().metrics().num_workers();
            Ok(ExitCode::SUCCESS)
        })
        .unwrap();
        assert_eq!(workers, 3);

        let error =
            Cli::try_parse_from(["wasm-pc", "--worker-threads", "0", "serve", "--role", "consumer"]).unwrap_err();
        assert!(error.to_string().contains("--worker-threads"), "{error}");
    }
}
