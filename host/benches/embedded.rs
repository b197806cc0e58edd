//! End-to-end durable throughput of embedded mode: producer component →
//! SQLite queue (group commit) → worker pool → consumer component → complete.
//!
//! `cargo bench -p wasm-pc --bench embedded [-- N]`; `BENCH_PREPARED=0` runs
//! it with nothing prepared ahead (`--prepared-instances 0`), `BENCH_REUSE`
//! with instances reused that many times (`--instance-reuse`),
//! `BENCH_WORKERS` sets the pool's workers (64), `BENCH_PRODUCERS` the
//! concurrent produce requests (8) and `BENCH_MAX_CONCURRENT` the runtime's
//! pool slots (1,000; valgrind cannot reserve the address space of that
//! many: `docs/BENCHMARKS.md` runs callgrind with 6 slots and 4 workers).
//! `BENCH_LOG=json` (or `text`) logs as the binary does, filtered by
//! `WASM_PC_LOG`; unset, nothing is logged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use wasm_pc::dispatch::{Dispatcher, Slot, Source};
use wasm_pc::embedded::{EmbeddedOutbound, Pool, PoolOptions};
use wasm_pc::metrics::Metrics;
use wasm_pc::queue::{QueueHandle, StoreOptions};
use wasm_pc::runtime::{ModuleSpec, Request, Runtime, RuntimeOptions};
use wasm_pc::scale::ScaleRule;

fn main() {
    common::logging();
    let count: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(50_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(count, true));
    rt.block_on(run(count, false));
}

/// `concurrent`: producers and consumers run at once (the headline figure);
/// otherwise everything is produced first, then consumed, timed apart.
async fn run(count: usize, concurrent: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut options = RuntimeOptions::default();
    if let Some(reuse) = env("BENCH_REUSE") {
        options.instance_reuse = reuse;
    }
    if let Some(slots) = env("BENCH_MAX_CONCURRENT") {
        options.limits.max_concurrent = slots;
    }
    if let Some(prepared) = env("BENCH_PREPARED") {
        options.prepared_instances = prepared;
    }
    let runtime = Arc::new(Runtime::new(options).unwrap());
    let metrics = Arc::new(Metrics::default());
    let queue = QueueHandle::open(&dir.path().join("bench.db"), StoreOptions::default()).unwrap();
    let outbound = Arc::new(EmbeddedOutbound::new(queue.clone(), ["orders".to_string()], metrics.clone()));
    let producer = runtime.load_producer(ModuleSpec::new("producer", common::module("producer.wasm"))).unwrap();
    let consumer = runtime.load_consumer(ModuleSpec::new("consumer", common::module("consumer.wasm"))).unwrap();
    let dispatcher = Arc::new(Dispatcher::new(
        runtime,
        outbound,
        Some(Arc::new(Slot::new(consumer))),
        Some(Arc::new(Slot::new(producer))),
        metrics.clone(),
    ));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let workers = env_or("BENCH_WORKERS", 64);
    let options = PoolOptions {
        scale: ScaleRule { min: workers, max: workers, target: 16, activation: 0 },
        ..PoolOptions::default()
    };
    let start_pool =
        || tokio::spawn(Arc::new(Pool::new(queue.clone(), options.clone())).run(dispatcher.clone(), stopped.clone()));
    let mut pool = concurrent.then(start_pool);

    let commits_before = queue.commits();
    let started = Instant::now();
    let batches: Vec<Vec<u8>> = (0..count)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|chunk| {
            let orders: Vec<_> = chunk
                .iter()
                .map(|i| serde_json::json!({"id": format!("b-{i}"), "customer": "acme", "items": [{"sku": "A", "qty": 1, "price_cents": 100}]}))
                .collect();
            serde_json::to_vec(&orders).unwrap()
        })
        .collect();
    let mut producers = tokio::task::JoinSet::new();
    let per_task = batches.len().div_ceil(env_or("BENCH_PRODUCERS", 8) as usize);
    for share in batches.chunks(per_task.max(1)).map(<[Vec<u8>]>::to_vec) {
        let dispatcher = dispatcher.clone();
        producers.spawn(async move {
            for body in share {
                let request = Request { method: "POST".into(), path: "/produce".into(), headers: vec![], body };
                let response = dispatcher.produce(&request).await.unwrap();
                assert_eq!(response.status, 202, "{}", String::from_utf8_lossy(&response.body));
            }
        });
    }
    while producers.join_next().await.is_some() {}
    let produced_in = started.elapsed();
    let consume_started = Instant::now();
    if pool.is_none() {
        pool = Some(start_pool());
    }
    while metrics.completed.load(Ordering::Relaxed) < count as u64 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    let _ = stop.send(true);
    if let Some(pool) = pool {
        pool.await.unwrap();
    }
    let depth = queue.depth("orders").await.unwrap();
    assert_eq!(depth.pending(), 0);
    let commits = queue.commits();
    let (transactions, commands) =
        (commits.transactions - commits_before.transactions, commits.commands - commits_before.commands);
    let rate = |d: Duration| count as f64 / d.as_secs_f64();
    if concurrent {
        println!(
            "embedded end-to-end, concurrent: {count} messages in {:.2}s = {:.0} msg/s; \
             queue: {transactions} transactions, {:.1} commands each, {:.2} per message",
            elapsed.as_secs_f64(),
            rate(elapsed),
            commands as f64 / transactions.max(1) as f64,
            transactions as f64 / count as f64
        );
    } else {
        let consumed_in = consume_started.elapsed();
        println!(
            "embedded phases: produce {:.0} msg/s ({:.2}s), consume {:.0} msg/s ({:.2}s)",
            rate(produced_in),
            produced_in.as_secs_f64(),
            rate(consumed_in),
            consumed_in.as_secs_f64()
        );
    }
}

/// `name` from the environment, if set and parseable.
fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn env_or(name: &str, default: u32) -> u32 {
    env(name).filter(|&n| n > 0).unwrap_or(default)
}
