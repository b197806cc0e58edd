//! `wasm-pc dev`: embedded mode. Producer, consumer and the SQLite queue in
//! one process; `--demo N` drives it by itself and prints a summary.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{ModuleArgs, RuntimeArgs, shutdown_signal};
use crate::dispatch::{Dispatcher, Slot};
use crate::embedded::{EmbeddedOutbound, PoolOptions, run_pool};
use crate::http;
use crate::metrics::Metrics;
use crate::queue::{QueueHandle, QueueOptions};
use crate::reload::{ReloadStatus, Reloader, Target};
use crate::runtime::{Runtime, World};
use crate::scale::ScaleRule;

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
    /// clear error rather than filling the disk.
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
    #[command(flatten)]
    modules: ModuleArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub async fn run(mut args: DevArgs) -> anyhow::Result<ExitCode> {
    if args.demo.is_some() {
        demo_config(&mut args.modules.consumer_config);
    }
    let runtime = Arc::new(Runtime::new(args.runtime.options())?);
    let metrics = Arc::new(Metrics::default());
    let queue = QueueHandle::open(
        &args.db,
        QueueOptions {
            max_delivery_count: args.max_delivery_count,
            lock_duration: Duration::from_millis(args.lock_ms),
            default_ttl: None,
            max_bytes: args.max_db_mib.map(|m| m << 20),
        },
        args.full_sync,
    )?;
    let mut bindings = args.bindings.clone();
    if !bindings.contains(&args.queue) {
        bindings.push(args.queue.clone());
    }
    let outbound = Arc::new(EmbeddedOutbound::new(queue.clone(), bindings, Arc::clone(&metrics)));

    let producer_source = args.modules.source(World::Producer)?;
    let consumer_source = args.modules.source(World::Consumer)?;
    let (rt, sources) = (Arc::clone(&runtime), (producer_source.clone(), consumer_source.clone()));
    let (producer, consumer) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let read = |s: &crate::modules::ModuleSource| {
            s.read()
                .with_context(|| format!("reading {} (build the guests with `cargo xtask guests`)", s.path.display()))
        };
        let producer = rt.load_producer(read(&sources.0)?)?;
        let consumer = rt.load_consumer(read(&sources.1)?)?;
        Ok((producer, consumer))
    })
    .await??;
    let (producer, consumer) = (Arc::new(Slot::new(producer)), Arc::new(Slot::new(consumer)));
    let dispatcher = Arc::new(Dispatcher::new(
        Arc::clone(&runtime),
        outbound,
        Some(Arc::clone(&consumer)),
        Some(Arc::clone(&producer)),
    ));
    let reloader = Reloader::new(
        runtime,
        args.modules.modules_dir.clone(),
        vec![Target::Producer(producer_source, producer), Target::Consumer(consumer_source, consumer)],
        Arc::clone(&metrics),
        args.modules.rescan(),
    );
    let reload = reloader.status();

    let listen = args.listen.unwrap_or_else(|| {
        let port = if args.demo.is_some() { 0 } else { 8080 };
        SocketAddr::from(([127, 0, 0, 1], port))
    });
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    tracing::info!("producer endpoint: POST http://{address}/produce");

    let (stop, stopped) = watch::channel(false);
    if args.modules.reload {
        tokio::spawn(reloader.run(stopped.clone()));
    }
    let state = Arc::new(Routes {
        dispatcher: Arc::clone(&dispatcher),
        metrics: Arc::clone(&metrics),
        queue: queue.clone(),
        queue_name: args.queue.clone(),
        limit: args.max_body_bytes,
        reload,
    });
    let reload_status = state.reload.clone();
    let router = move |request| Arc::clone(&state).route(request);
    let server = tokio::spawn(http::serve(listener, router, stopped.clone(), Duration::from_secs(10)));
    let pool_options = PoolOptions {
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
    };
    let pool = tokio::spawn(run_pool(
        queue.clone(),
        Arc::clone(&dispatcher),
        Arc::clone(&metrics),
        pool_options,
        stopped.clone(),
    ));
    let status = tokio::spawn(report_status(
        queue.clone(),
        args.queue.clone(),
        Arc::clone(&metrics),
        reload_status,
        stopped.clone(),
    ));

    let code = match args.demo {
        Some(count) => {
            let started = Instant::now();
            let outcome = tokio::select! {
                outcome = demo(address, count, &queue, &args.queue, &metrics) => outcome,
                _ = shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
            };
            let _ = stop.send(true);
            let _ = status.await;
            let accepted = outcome?;
            print_summary(count, accepted, started.elapsed(), &metrics, &args)?;
            ExitCode::SUCCESS
        }
        None => {
            shutdown_signal().await;
            tracing::info!("shutting down: finishing deliveries in flight");
            ExitCode::SUCCESS
        }
    };
    let _ = stop.send(true);
    let _ = server.await;
    pool.await??;
    Ok(code)
}

/// Business rules the demo's sample data exercises, unless set by the user.
fn demo_config(config: &mut Vec<String>) {
    for (key, value) in [("transient-sku", "FLAKY"), ("transient-attempts", "2"), ("max-order-cents", "500000")] {
        if !config.iter().any(|c| c.starts_with(&format!("{key}="))) {
            config.push(format!("{key}={value}"));
        }
    }
}

/// What the dev HTTP routes need.
struct Routes {
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    queue: QueueHandle,
    queue_name: String,
    limit: usize,
    reload: ReloadStatus,
}

impl Routes {
    async fn route(self: Arc<Self>, request: hyper::Request<hyper::body::Incoming>) -> hyper::Response<http::Body> {
        let (dispatcher, metrics, name) = (&self.dispatcher, &self.metrics, self.queue_name.as_str());
        match (request.method(), request.uri().path()) {
            (_, "/produce") => http::produce(Arc::clone(dispatcher), Arc::clone(metrics), request, self.limit).await,
            (&Method::GET, "/healthz") => http::text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => {
                http::json(StatusCode::OK, &http::readiness(true, None, dispatcher, &self.reload))
            }
            (&Method::GET, "/stats") => match self.queue.depth(name).await {
                Ok(depth) => http::json(
                    StatusCode::OK,
                    &serde_json::json!({"queue": name, "depth": depth, "counters": metrics.snapshot(), "modules": self.reload.snapshot()}),
                ),
                Err(e) => http::error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            },
            (&Method::GET, "/metrics") => {
                let depth = self.queue.depth(name).await.unwrap_or_default();
                let gauges = [
                    ("queue_active_messages", "Messages visible in the queue.", depth.active),
                    ("queue_locked_messages", "Messages locked by a consumer.", depth.locked),
                    ("queue_dead_lettered_messages", "Messages in the dead-letter queue.", depth.dead_lettered),
                ];
                http::text(StatusCode::OK, metrics.render(&dispatcher.live_modules(), &gauges))
            }
            (_, "/healthz" | "/readyz" | "/stats" | "/metrics") => {
                http::error(StatusCode::METHOD_NOT_ALLOWED, "use GET")
            }
            _ => http::error(StatusCode::NOT_FOUND, "no such route; POST /produce"),
        }
    }
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
            .filter_map(|r| r.last_error.map(|e| format!("  | {} refused, {} serving: {e}", r.file, r.live)))
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

/// Posts `count` sample orders in batches through the HTTP endpoint, then
/// waits until the queue has nothing pending. Returns how many were accepted.
async fn demo(
    address: SocketAddr,
    count: usize,
    queue: &QueueHandle,
    name: &str,
    metrics: &Metrics,
) -> anyhow::Result<usize> {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let run = &uuid::Uuid::new_v4().simple().to_string()[..6];
    let orders: Vec<serde_json::Value> = (0..count).map(|i| sample_order(run, i)).collect();
    let mut accepted = 0usize;
    let mut posts = tokio::task::JoinSet::new();
    for batch in orders.chunks(100) {
        let body = serde_json::to_vec(batch)?;
        let request = hyper::Request::post(format!("http://{address}/produce"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let client = client.clone();
        posts.spawn(async move {
            let response = client.request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::ensure!(
                status == StatusCode::ACCEPTED,
                "producer answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
            let reply: serde_json::Value = serde_json::from_slice(&body)?;
            Ok(reply["accepted"].as_u64().unwrap_or(0) as usize)
        });
        while posts.len() >= 4 {
            if let Some(done) = posts.join_next().await {
                accepted += done??;
            }
        }
    }
    while let Some(done) = posts.join_next().await {
        accepted += done??;
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let depth = queue.depth(name).await?;
        if depth.pending() == 0 && metrics.in_flight.load(Ordering::Relaxed) == 0 {
            return Ok(accepted);
        }
        anyhow::ensure!(Instant::now() < deadline, "the queue did not drain within 5 minutes: {depth:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Order `i` of a demo run: every 25th holds the flaky SKU (retried, then
/// fine), every 40th is over the credit limit (dead-lettered).
fn sample_order(run: &str, i: usize) -> serde_json::Value {
    const CUSTOMERS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];
    let mut items = vec![
        serde_json::json!({"sku": format!("SKU-{}", i % 17), "qty": 1 + i % 3, "price_cents": 499 + (i % 7) * 100}),
    ];
    if i % 25 == 7 {
        items.push(serde_json::json!({"sku": "FLAKY", "qty": 1, "price_cents": 100}));
    }
    if i % 40 == 13 {
        items.push(serde_json::json!({"sku": "YACHT", "qty": 1, "price_cents": 99_000_000}));
    }
    serde_json::json!({"id": format!("demo-{run}-{i:05}"), "customer": CUSTOMERS[i % CUSTOMERS.len()], "items": items})
}

fn print_summary(
    requested: usize,
    accepted: usize,
    elapsed: Duration,
    metrics: &Metrics,
    args: &DevArgs,
) -> std::io::Result<()> {
    let s = metrics.snapshot();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    writeln!(out, "wasm-pc dev --demo {requested}: done in {secs:.2} s")?;
    writeln!(out, "  {:<34} {:>8}", "orders accepted by producer.wasm", accepted)?;
    writeln!(out, "  {:<34} {:>8}", "messages enqueued (durable)", s.sent)?;
    writeln!(out, "  {:<34} {:>8}", "completed by consumer.wasm", s.completed)?;
    writeln!(out, "  {:<34} {:>8}", "retried (SKU FLAKY, then ok)", s.abandoned)?;
    writeln!(out, "  {:<34} {:>8}", "dead-lettered (over credit limit)", s.dead_lettered)?;
    writeln!(out, "  {:<34} {:>8}", "host-ended (trap/timeout/limit)", s.traps + s.timeouts + s.limits)?;
    writeln!(out, "  {:<34} {:>8.0}", "orders/s, produce to settle", accepted as f64 / secs)?;
    writeln!(out)?;
    writeln!(
        out,
        "Dead letters and their reasons: cargo run --release -- queue dead-letters {} --db {}",
        args.queue,
        args.db.display()
    )?;
    Ok(())
}
