//! The Dapr input route under load, against the same consumer logic compiled
//! natively into a plain hyper handler, in one run.
//!
//! 1 KiB JSON orders, loopback, keep-alive, 32 connections, each sending its
//! share one after another (as daprd does per handler slot). The host runs
//! twice: with a fresh instance per message (the default) and with instance
//! reuse (`--instance-reuse`), and once more fresh with nothing done ahead
//! (`--prepared-instances 0`: instantiation and the slot reset on the
//! delivery path). Then each answers one delivery at a time on
//! one connection (as a sequential input binding drives it), for the latency
//! the host adds over native: first from a client on a thread of its own, as
//! daprd calls from another process, then from a client task on the
//! servers' own runtime, where the figure depends on whether the scheduler
//! puts the client and the server's connection on one worker thread.
//!
//! `cargo bench -p wasm-pc --bench dapr_input [-- REQUESTS [REUSE] [sequential]]`:
//! `sequential` runs only the concurrency-1 phase, for profiling it.
//! `BENCH_LOG=json` (or `text`) logs as the binary does, filtered by
//! `WASM_PC_LOG`; unset, nothing is logged.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use wasm_pc::dapr::{Binding, BindingOptions, DaprClient, DaprOutbound, RetryPolicy};
use wasm_pc::dispatch::Source;
use wasm_pc::dispatch::{Dispatcher, Slot};
use wasm_pc::metrics::{Metrics, Reading};
use wasm_pc::runtime::{ModuleSpec, Runtime, RuntimeOptions};

const CONNECTIONS: usize = 32;

fn main() {
    common::logging();
    let mut numbers = std::env::args().skip(1).filter_map(|a| a.parse::<usize>().ok());
    let requests = numbers.next().unwrap_or(40_000);
    let reuse = NonZeroU32::new(numbers.next().unwrap_or(100) as u32).unwrap();
    let only_sequential = std::env::args().any(|a| a == "sequential");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let body = Bytes::from(common::order_of_about_1k());
        let servers = [
            ("native hyper handler".to_string(), start_native().await, None),
            wasm_host("wasm-pc, fresh, none ahead".to_string(), NonZeroU32::MIN, 0).await,
            wasm_host("wasm-pc, fresh instances".to_string(), NonZeroU32::MIN, 2).await,
            wasm_host(format!("wasm-pc, reuse {reuse}"), reuse, 2).await,
        ];
        for (_, port, _) in &servers {
            load(*port, &body, 4_000, CONNECTIONS).await;
        }
        if !only_sequential {
            throughput(&servers, &body, requests).await;
        }
        let requests = (requests / 8).max(1_000);
        sequential(&servers, &body, requests, Client::OwnThread).await;
        sequential(&servers, &body, requests, Client::SharedRuntime).await;
    });
}

/// Many connections at once: the better of two interleaved runs each, by req/s.
async fn throughput(servers: &[Server], body: &Bytes, requests: usize) {
    let mut best: Vec<Option<Run>> = servers.iter().map(|_| None).collect();
    for _ in 0..2 {
        for (i, (_, port, _)) in servers.iter().enumerate() {
            let r = load(*port, body, requests, CONNECTIONS).await;
            if best[i].as_ref().is_none_or(|b| r.rps > b.rps) {
                best[i] = Some(r);
            }
        }
    }
    let runs: Vec<Run> = best.into_iter().map(Option::unwrap).collect();
    println!("body {} bytes, {requests} requests, {CONNECTIONS} connections", body.len());
    for ((name, _, _), r) in servers.iter().zip(&runs) {
        println!(
            "{name:<26} {:>8.0} req/s  p50 {:>6.0}us  p99 {:>6.0}us  {:>3.0}% of native",
            r.rps,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            100.0 * r.rps / runs[0].rps
        );
    }
}

/// Where the concurrency-1 client runs.
#[derive(Clone, Copy, Debug)]
enum Client {
    /// A thread of its own: every request wakes a server thread and every
    /// answer the client's, as between daprd and the app.
    OwnThread,
    /// A task on the servers' runtime: when it shares a worker with the
    /// server's connection task, a round trip wakes no thread at all.
    SharedRuntime,
}

/// One at a time, as a sequential binding drives the route: the better of
/// two interleaved runs each, by p50.
async fn sequential(servers: &[Server], body: &Bytes, requests: usize, client: Client) {
    let before: Vec<_> = servers.iter().map(|(_, _, rt)| origins(rt.as_deref())).collect();
    let mut best: Vec<Option<Run>> = servers.iter().map(|_| None).collect();
    for _ in 0..2 {
        for (i, (_, port, _)) in servers.iter().enumerate() {
            let r = match client {
                Client::OwnThread => load_from_own_thread(*port, body, requests),
                Client::SharedRuntime => load(*port, body, requests, 1).await,
            };
            if best[i].as_ref().is_none_or(|b| r.p50 < b.p50) {
                best[i] = Some(r);
            }
        }
    }
    let runs: Vec<Run> = best.into_iter().map(Option::unwrap).collect();
    println!("concurrency 1, {requests} requests, client: {client:?}");
    for ((name, _, _), r) in servers.iter().zip(&runs) {
        let cpu = r.server_cpu.map(|c| format!("  server CPU {:>5.1}us per request", c.as_secs_f64() * 1e6));
        println!(
            "{name:<26} p50 {:>6.1}us  p99 {:>6.1}us  p50 +{:>5.1}us over native{}",
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            (r.p50.as_secs_f64() - runs[0].p50.as_secs_f64()) * 1e6,
            cpu.unwrap_or_default()
        );
    }
    // Where each delivery's instance came from, over both rounds: how often
    // work ahead had it ready.
    for ((name, _, rt), before) in servers.iter().zip(before) {
        let after = origins(rt.as_deref());
        if rt.is_some() {
            let [reused, prepared, inline] = std::array::from_fn(|i| after[i] - before[i]);
            println!("{name:<26} instances: {prepared} prepared, {inline} made inline, {reused} reused");
        }
    }
}

/// A server's name, port, and the runtime behind it (none for native).
type Server = (String, u16, Option<Arc<Runtime>>);

/// Invocations on a reused, a prepared and an inline-made instance so far.
fn origins(runtime: Option<&Runtime>) -> [u64; 3] {
    let readings = runtime.map(Runtime::readings).unwrap_or_default();
    let count = |name: &str| Reading::find(&readings, name).unwrap_or(0);
    [
        count("invocations_reused_instance_total"),
        count("invocations_prepared_instance_total"),
        count("invocations_instantiated_inline_total"),
    ]
}

async fn wasm_host(name: String, instance_reuse: NonZeroU32, prepared_instances: usize) -> Server {
    let (port, runtime) = start_wasm_host(instance_reuse, prepared_instances).await;
    (name, port, Some(runtime))
}

async fn start_wasm_host(instance_reuse: NonZeroU32, prepared_instances: usize) -> (u16, Arc<Runtime>) {
    // `BENCH_NO_PAGEMAP=1`: reset slots as a kernel without PAGEMAP_SCAN must.
    let pagemap_scan = std::env::var_os("BENCH_NO_PAGEMAP").is_none();
    let runtime = Arc::new(
        Runtime::new(RuntimeOptions { instance_reuse, prepared_instances, pagemap_scan, ..RuntimeOptions::default() })
            .unwrap(),
    );
    let consumer = runtime.load_consumer(ModuleSpec::new("consumer", common::module("consumer.wasm"))).unwrap();
    let metrics = Arc::new(Metrics::default());
    let outbound = Arc::new(DaprOutbound::new(DaprClient::new(1, None, RetryPolicy::default()), metrics.clone()));
    let dispatcher = Arc::new(Dispatcher::new(
        Arc::clone(&runtime),
        outbound.clone(),
        Some(Arc::new(Slot::new(consumer))),
        None,
        metrics,
    ));
    let options = BindingOptions {
        route: "/orders".into(),
        app_token: None,
        max_concurrency: CONNECTIONS,
        max_body_bytes: 4 << 20,
        dead_letter_binding: None,
        attempt_memory: 100_000,
    };
    let binding = Arc::new(Binding::new(options, outbound));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    std::mem::forget(_stop);
    let handler = move |req| Arc::clone(&binding).handle(Arc::clone(&dispatcher), req);
    tokio::spawn(wasm_pc::http::serve(listener, handler, stopped, Duration::from_secs(1), Default::default()));
    (port, runtime)
}

/// The consumer's logic as a plain Rust handler: same decoding, same parsing,
/// pricing and config rules (looked up per request, as the guest does), no
/// wasm.
async fn start_native() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    std::mem::forget(_stop);
    let handler = |req: Request<hyper::body::Incoming>| async move {
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let headers = parts.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
        let delivery = wasm_pc::dapr::codec::decode_delivery(headers, &body).ok();
        let status = match delivery
            .as_ref()
            .and_then(|d| guest_orders::Order::parse(&d.body).ok())
            .and_then(|o| o.total_cents().map(|total| (o, total)))
            .filter(|(o, total)| native_rules(o, *total))
        {
            Some(_) => StatusCode::OK,
            None => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut r = Response::new(Full::new(Bytes::from_static(b"{}")));
        *r.status_mut() = status;
        r
    };
    tokio::spawn(wasm_pc::http::serve(listener, handler, stopped, Duration::from_secs(1), Default::default()));
    port
}

struct Run {
    rps: f64,
    p50: Duration,
    p99: Duration,
    /// CPU the process spent per request outside the client's thread: the
    /// server's cost, known when the client runs on a thread of its own.
    server_cpu: Option<Duration>,
}

/// CPU time used so far by the whole process or by the calling thread.
fn cpu_time(who: libc::c_int) -> Duration {
    // SAFETY: `getrusage` only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::getrusage(who, &mut usage) }, 0);
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// `load` at concurrency 1 from a current-thread runtime on a thread of its
/// own. Blocks the calling thread (the bench's `block_on`, not a worker).
fn load_from_own_thread(port: u16, body: &Bytes, requests: usize) -> Run {
    let body = body.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (process, client) = (cpu_time(libc::RUSAGE_SELF), cpu_time(libc::RUSAGE_THREAD));
        let mut run = rt.block_on(load(port, &body, requests, 1));
        let server = (cpu_time(libc::RUSAGE_SELF) - process).saturating_sub(cpu_time(libc::RUSAGE_THREAD) - client);
        run.server_cpu = Some(server / requests as u32);
        run
    })
    .join()
    .unwrap()
}

async fn load(port: u16, body: &Bytes, requests: usize, connections: usize) -> Run {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..connections {
        let body = body.clone();
        let share = requests / connections + usize::from(c < requests % connections);
        tasks.spawn(async move {
            let stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::with_capacity(share);
            for i in 0..share {
                let request = Request::post("/orders")
                    .header("host", "127.0.0.1")
                    .header("content-type", "application/json")
                    .header("id", format!("m-{c}-{i}"))
                    .body(Full::new(body.clone()))
                    .unwrap();
                let t = Instant::now();
                let response = sender.send_request(request).await.unwrap();
                assert_eq!(response.status(), StatusCode::OK);
                response.into_body().collect().await.unwrap();
                latencies.push(t.elapsed());
            }
            latencies
        });
    }
    let mut all = Vec::with_capacity(requests);
    while let Some(l) = tasks.join_next().await {
        all.extend(l.unwrap());
    }
    let elapsed = started.elapsed();
    let (p50, p99) = common::percentiles(&mut all);
    Run { rps: requests as f64 / elapsed.as_secs_f64(), p50, p99, server_cpu: None }
}

/// The guest's business rules with the bench's (empty) config, looked up the
/// way the guest does: by key, per request.
fn native_rules(order: &guest_orders::Order, total: u64) -> bool {
    let config: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    let limit = config.get("max-order-cents").and_then(|v| v.parse::<u64>().ok());
    if limit.is_some_and(|l| total > l) {
        return false;
    }
    let flaky = config.get("transient-sku");
    !order.items.iter().any(|i| flaky.is_some_and(|sku| i.sku == sku.as_str()))
        && !config.contains_key("forward-binding")
}
