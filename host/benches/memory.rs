//! Resident memory of one host runtime (default limits: 1,000 pool slots,
//! 64 MiB per guest): idle, with 1,000 deliveries in flight, and after they
//! finish, for the sample consumer and for a guest that dirties 4 MiB (the
//! most a pool slot keeps resident, as a Python or JS guest would; it
//! sleeps 3 s so that most of its calls overlap).
//!
//! `cargo bench -p wasm-pc --bench memory [-- IN_FLIGHT]`: each case runs
//! in a process of its own, so one's pages do not count in the next, with
//! the default pool budget (`--pool-resident-mib 512`) and with 4 GiB.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use wasm_pc::metrics::Reading;
use wasm_pc::runtime::outbound::{Outbound, OutboundMessage, SendFuture};
use wasm_pc::runtime::{Limits, Message, ModuleSpec, Runtime, RuntimeOptions};

const ORDER: &[u8] = br#"{"id":"o-1","customer":"acme","items":[{"sku":"A","qty":2,"price_cents":350}]}"#;

/// (name, module file, body, config key) of each case.
const CASES: [(&str, &str, &[u8], bool); 2] = [
    ("sample consumer (forwards, held in its send)", "consumer.wasm", ORDER, true),
    ("guest dirtying 4 MiB, held in a sleep", "faulty.wasm", b"touch:4096:3000", false),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let in_flight: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    if let (Some(case), Some(budget)) = (args.get(1), args.get(2)) {
        return run_case(case.parse().unwrap(), in_flight, budget.parse().unwrap());
    }
    println!("| guest | pool budget | idle | {in_flight} started together | after | idle slots keep resident |");
    println!("|---|---|---|---|---|---|");
    // The default budget, and 4 GiB: every slot keeps up to 4 MiB, as
    // before the budget existed.
    for (case, budget) in (0..CASES.len()).flat_map(|c| [(c, 512), (c, 4096)]) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([in_flight.to_string(), case.to_string(), budget.to_string()])
            .output()
            .unwrap();
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            std::process::exit(1);
        }
    }
}

fn run_case(case: usize, in_flight: usize, budget_mib: usize) {
    let (name, file, body, forwards) = CASES[case];
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        // A wall-time limit well past the default 5 s: on a slow hour of a
        // 2-core machine, 1,000 guests each faulting in 4 MiB took longer.
        let timeout = Duration::from_secs(30);
        let limits = Limits { pool_resident_bytes: budget_mib << 20, timeout, ..Limits::default() };
        let runtime = Arc::new(Runtime::new(RuntimeOptions { limits, ..RuntimeOptions::default() }).unwrap());
        let mut spec = ModuleSpec::new(file, common::module(file));
        if forwards {
            spec.config = BTreeMap::from([("forward-binding".to_string(), "done".to_string())]);
        }
        let module = Arc::new(runtime.load_consumer(spec).unwrap());
        let gate = Arc::new(Gate { waiting: AtomicUsize::new(0), open: Semaphore::new(0) });
        let message = Arc::new(Message {
            id: "m".into(),
            body: body.to_vec(),
            content_type: Some("application/json".into()),
            metadata: vec![],
            delivery_count: Some(1),
        });
        // One call first, so that code pages and the engine's own state
        // count as idle.
        let warm = Arc::new(Gate { waiting: AtomicUsize::new(0), open: Semaphore::new(1 << 20) });
        runtime.consume(&module, &message, warm).await.unwrap().unwrap();
        let idle = rss();

        let mut calls = Vec::with_capacity(in_flight);
        for _ in 0..in_flight {
            let (runtime, module, message) = (Arc::clone(&runtime), Arc::clone(&module), Arc::clone(&message));
            let out: Arc<dyn Outbound> = gate.clone();
            calls.push(tokio::spawn(async move { runtime.consume(&module, &message, out).await }));
        }
        // The most at once, and the resident set then: the sample consumer
        // waits in its send until all are in; the sleeping guest is sampled
        // until its calls end.
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut peak, mut during) = (0, 0);
        loop {
            let memories = Reading::find(&runtime.readings(), "pool_memories").unwrap_or(0);
            let held = if forwards { gate.waiting.load(Ordering::SeqCst) } else { memories as usize };
            if held >= peak {
                (peak, during) = (held, rss().max(during));
            }
            if held >= in_flight || (!forwards && calls.iter().all(|c| c.is_finished())) {
                break;
            }
            assert!(Instant::now() < deadline, "{in_flight} calls did not run within 20 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        gate.open.add_permits(in_flight);
        for call in calls {
            call.await.unwrap().unwrap().unwrap();
        }
        let after = rss();
        let resident = Reading::find(&runtime.readings(), "pool_unused_memory_bytes_resident").unwrap_or(0);
        println!(
            "| {name} | {budget_mib} MiB | {} MiB | {} MiB ({peak} at once) | {} MiB | {} MiB |",
            idle >> 20,
            during >> 20,
            after >> 20,
            resident >> 20
        );
    });
}

/// Holds every send until let through: deliveries stay in flight.
struct Gate {
    waiting: AtomicUsize,
    open: Semaphore,
}

impl Outbound for Gate {
    fn send<'a>(&'a self, _binding: &'a str, message: OutboundMessage) -> SendFuture<'a> {
        Box::pin(async move {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let _pass = self.open.acquire().await;
            Ok(message.id.unwrap_or_default())
        })
    }
}

/// This process's resident set, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib << 10)
        .unwrap_or(0)
}
