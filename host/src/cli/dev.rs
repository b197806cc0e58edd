//! `wasm-pc dev`: embedded mode. Producer, consumer and the SQLite queue in
//! one process: the embedded worker pool is the source, the queue the
//! guests' output binding; `--servicebus-port` also serves the queues to
//! Service Bus clients, and `--demo N` drives it all by itself.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tokio::sync::{oneshot, watch};

use super::{ModuleArgs, RuntimeArgs, demo, shutdown_signal};
use crate::dispatch::Source;
use crate::embedded::{EmbeddedOutbound, Pool, PoolOptions};
use crate::host::{self, Host, HostOptions, ProduceRoute, StopPolicy};
use crate::metrics::Metrics;
use crate::queue::{QueueHandle, QueueOptions, StoreOptions};
use crate::reload::ReloadStatus;
use crate::runtime::World;
use crate::runtime::outbound::Outbound;
use crate::scale::ScaleRule;
use crate::servicebus::Entities;

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the producer's HTTP endpoint listens (`--demo`: a free port).
    #[arg(long, env = "WASM_PC_LISTEN")]
    listen: Option<SocketAddr>,
    /// The queue database file.
    #[arg(long, env = "WASM_PC_DB", default_value = ".wasm-pc/dev.db")]
    db: PathBuf,
    /// The queue the consumer reads (and the producer's default binding).
    #[arg(long, env = "WASM_PC_QUEUE", default_value = "orders")]
    queue: String,
    /// Output bindings guests may send to; each is a queue of the same name.
    #[arg(long, env = "WASM_PC_BINDINGS", value_delimiter = ',', default_value = "orders")]
    bindings: Vec<String>,
    /// Fewest consumer workers (KEDA minReplicaCount).
    #[arg(long, env = "WASM_PC_MIN_WORKERS", default_value_t = 0)]
    min_workers: u32,
    /// Most consumer workers (KEDA maxReplicaCount).
    #[arg(long, env = "WASM_PC_MAX_WORKERS", default_value_t = 8)]
    max_workers: u32,
    /// Queue length per worker (KEDA messageCount).
    #[arg(long, env = "WASM_PC_MESSAGES_PER_WORKER", default_value_t = 16)]
    messages_per_worker: u64,
    /// Seconds idle before the pool shrinks (KEDA cooldownPeriod).
    #[arg(long, env = "WASM_PC_COOLDOWN_SECS", default_value_t = 5)]
    cooldown_secs: u64,
    /// Lock duration of received messages, in milliseconds.
    #[arg(long, env = "WASM_PC_LOCK_MS", default_value_t = 60_000)]
    lock_ms: u64,
    /// Deliveries before a message is dead-lettered.
    #[arg(long, env = "WASM_PC_MAX_DELIVERY_COUNT", default_value_t = 10)]
    max_delivery_count: u32,
    /// First retry delay in milliseconds (doubles per delivery).
    #[arg(long, env = "WASM_PC_RETRY_BACKOFF_MS", default_value_t = 100)]
    retry_backoff_ms: u64,
    /// Cap on the queue database's size, in MiB: past it, sends fail with a
    /// clear error rather than filling the disk (receives and settles may
    /// use a sixteenth more, so a full queue can still be drained).
    #[arg(long, env = "WASM_PC_MAX_DB_MIB")]
    max_db_mib: Option<u64>,
    /// fsync every commit (survives power loss, not only a crash).
    #[arg(long, env = "WASM_PC_FULL_SYNC")]
    full_sync: bool,
    /// Largest request body, in bytes.
    #[arg(long, env = "WASM_PC_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    max_body_bytes: usize,
    /// Post this many sample orders, wait until they are settled, print a
    /// summary and exit.
    #[arg(long)]
    demo: Option<usize>,
    /// Also serve the queues as a local Azure Service Bus endpoint (AMQP) on
    /// this port: Service Bus clients and the guests share them.
    #[arg(long, env = "WASM_PC_SERVICEBUS_PORT")]
    servicebus_port: Option<u16>,
    #[command(flatten)]
    endpoint: super::servicebus::EndpointArgs,
    #[command(flatten)]
    listener: super::ListenerArgs,
    #[command(flatten)]
    modules: ModuleArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub async fn run(mut args: DevArgs) -> anyhow::Result<ExitCode> {
    if args.demo.is_some() {
        demo::configure(&mut args.modules.consumer_config);
    }
    // Locks are renewed at a third of their duration while a guest runs:
    // that needs a lock long enough for a renewal to commit in time.
    anyhow::ensure!(args.lock_ms >= 1_000, "--lock-ms must be at least 1000 (locks are renewed while a guest runs)");
    let queue_options = QueueOptions {
        max_delivery_count: args.max_delivery_count,
        lock_duration: Duration::from_millis(args.lock_ms),
        default_ttl: None,
        // A laptop keeps what expired, to look at (`queue dead-letters`).
        dead_letter_on_expiry: true,
    };
    let queue = QueueHandle::open(
        &args.db,
        StoreOptions {
            defaults: queue_options,
            queues: Default::default(),
            max_bytes: args.max_db_mib.map(|m| m << 20),
            full_sync: args.full_sync,
        },
    )?;
    let mut bindings = args.bindings.clone();
    if !bindings.contains(&args.queue) {
        bindings.push(args.queue.clone());
    }
    let metrics = Arc::new(Metrics::default());
    let outbound = Arc::new(EmbeddedOutbound::new(queue.clone(), bindings.clone(), Arc::clone(&metrics)));
    let host = Host::build(HostOptions {
        runtime: args.runtime.options(),
        modules: vec![args.modules.source(World::Producer)?, args.modules.source(World::Consumer)?],
        modules_dir: args.modules.modules_dir.clone(),
        reload: args.modules.reload,
        rescan: args.modules.rescan(),
        outbound: outbound as Arc<dyn Outbound>,
        metrics: Arc::clone(&metrics),
        produce: Some(ProduceRoute { path: "/produce".into(), token: None, max_body_bytes: args.max_body_bytes }),
        // On a laptop a module that does not load is the first thing to fix.
        require_modules: true,
        listener: args.listener.limits(),
        stop: StopPolicy { drain: Duration::ZERO, deadline: Duration::from_secs(10) },
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#} (build the guests with `cargo xtask guests`)"))?;

    let listen = args.listen.unwrap_or_else(|| {
        let port = if args.demo.is_some() { 0 } else { 8080 };
        SocketAddr::from(([127, 0, 0, 1], port))
    });
    let listener = host::listen(listen).await?;
    let address = listener.local_addr()?;
    tracing::info!("producer endpoint: POST http://{address}/produce");

    let (stop_aux, aux) = watch::channel(false);
    let endpoint = match args.servicebus_port {
        Some(port) => {
            let mut entities = Entities::default();
            for name in &bindings {
                entities.declare(name, queue_options);
            }
            Some(args.endpoint.start(port, queue.clone(), entities, aux.clone()).await?)
        }
        None => None,
    };
    let status = tokio::spawn(report_status(
        queue.clone(),
        args.queue.clone(),
        Arc::clone(&metrics),
        host.reload_status().clone(),
        aux.clone(),
    ));
    let pool = Pool::new(
        queue.clone(),
        PoolOptions {
            queue: args.queue.clone(),
            scale: ScaleRule {
                min: args.min_workers,
                max: args.max_workers,
                target: args.messages_per_worker,
                activation: 0,
            },
            cooldown: Duration::from_secs(args.cooldown_secs),
            backoff: Duration::from_millis(args.retry_backoff_ms),
            ..PoolOptions::default()
        },
    );
    let sources: Vec<Arc<dyn Source>> = vec![Arc::new(pool)];

    let started = Instant::now();
    let (outcome, demo_done) = oneshot::channel();
    let stop = {
        let (queue, name, metrics) = (queue.clone(), args.queue.clone(), Arc::clone(&metrics));
        let count = args.demo;
        async move {
            let Some(count) = count else {
                shutdown_signal().await;
                tracing::info!("shutting down: finishing deliveries in flight");
                return;
            };
            let result = tokio::select! {
                result = demo::drive(address, count, &queue, &name, &metrics) => result,
                _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
            };
            let _ = outcome.send(result);
        }
    };
    host.run(listener, sources, stop).await?;
    let _ = stop_aux.send(true);
    let _ = status.await;
    if let Some(endpoint) = endpoint {
        let _ = endpoint.await;
    }
    if let Some(count) = args.demo {
        let accepted = demo_done.await.map_err(|_| anyhow::anyhow!("the demo did not finish"))??;
        demo::print_summary(count, accepted, started.elapsed(), &metrics, &args.queue, &args.db)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// A one-line live status on a terminal; a log line now and then otherwise.
async fn report_status(
    queue: QueueHandle,
    name: String,
    metrics: Arc<Metrics>,
    reload: ReloadStatus,
    mut stopped: watch::Receiver<bool>,
) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty { Duration::from_millis(200) } else { Duration::from_secs(5) };
    let mut last = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::shutdown::requested(&mut stopped) => break,
        }
        let depth = queue.depth(&name).await.unwrap_or_default();
        let s = metrics.snapshot();
        let line = format!(
            "produced {}  consumed {}  retried {}  dead-lettered {}  in flight {}  depth {}",
            s.sent,
            s.completed,
            s.abandoned,
            s.dead_lettered,
            s.in_flight,
            depth.pending()
        );
        // A refused module is news: say which version still serves, and why.
        let refused: Vec<String> = reload
            .snapshot()
            .into_iter()
            .filter_map(|r| {
                let live = r.live.unwrap_or_else(|| "nothing".into());
                r.last_error.map(|e| format!("  | {} refused, {live} serving: {e}", r.file))
            })
            .collect();
        let line = line + &refused.concat();
        if tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K{line}");
            let _ = err.flush();
        } else if last.as_ref() != Some(&line) {
            tracing::info!("{line}");
        }
        last = Some(line);
    }
    if tty {
        let _ = writeln!(std::io::stderr());
    }
}
