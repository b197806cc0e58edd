//! Instantiate + call cost of one invocation: a fresh store and instance from
//! the pooling allocator and `InstancePre`, the way every message is handled
//! by default; then the same calls with instance reuse (`--instance-reuse`).
//!
//! `cargo bench -p wasm-pc --bench invoke [-- CALLS [GUEST/REUSE]]`: CALLS
//! timed calls per case (default 20,000); a filter such as `faulty.wasm/1`
//! runs one case only (add the pool budget: `faulty.wasm/1/512`), which is
//! how instruction counts per call are taken (`docs/BENCHMARKS.md`: two
//! callgrind runs with different CALLS). The trivial consumer comes twice:
//! `faulty.wasm` sent `ok` is built with `std`, `minimal.wasm` without.
//! The sample consumer gets a small order (80 bytes), or with
//! `INVOKE_ORDER=1k` the 1 KiB order the Dapr benches send.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasm_pc::runtime::outbound::{NoOutbound, Outbound};
use wasm_pc::runtime::{Limits, Message, ModuleSpec, Runtime, RuntimeOptions};

fn main() {
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with("--"));
    let calls: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let only = args.next();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        // The default pool budget, and one that gives every slot the 4 MiB
        // it kept before the budget existed: the cost of the bound.
        for budget_mib in [512, 4096] {
            for reuse in [1, 100] {
                measure(NonZeroU32::new(reuse).unwrap(), calls, budget_mib, only.as_deref()).await;
            }
        }
    });
}

async fn measure(instance_reuse: NonZeroU32, calls: usize, budget_mib: usize, only: Option<&str>) {
    // `INVOKE_MAX_INSTANCES=4` under valgrind, which cannot reserve the
    // address space of 1,000 slots.
    let slots = std::env::var("INVOKE_MAX_INSTANCES").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    let limits = Limits { pool_resident_bytes: budget_mib << 20, max_concurrent: slots, ..Limits::default() };
    // Nothing prepared ahead: this is the cost of instantiate + call, all
    // of it on the caller's path (`dapr_input` shows what work ahead hides).
    // `BENCH_NO_PAGEMAP=1`: reset slots as a kernel without PAGEMAP_SCAN must.
    let pagemap_scan = std::env::var_os("BENCH_NO_PAGEMAP").is_none();
    let options =
        RuntimeOptions { instance_reuse, limits, prepared_instances: 0, pagemap_scan, ..RuntimeOptions::default() };
    let runtime = Runtime::new(options).unwrap();
    let out: Arc<dyn Outbound> = Arc::new(NoOutbound);
    let large_order = std::env::var("INVOKE_ORDER").is_ok_and(|size| size == "1k");
    let order = if large_order {
        common::order_of_about_1k()
    } else {
        br#"{"id":"o1","customer":"acme","items":[{"sku":"A","qty":2,"price_cents":350}]}"#.to_vec()
    };
    let guests = [("faulty.wasm", &b"ok"[..]), ("minimal.wasm", &b"ok"[..]), ("consumer.wasm", &order[..])];
    // `INVOKE_EXTRA_GUEST=<file>`: one more guest from `target/modules`, a
    // variant of one above, to compare the two. It is sent what the guest
    // its name starts with is sent (`consumer-small-stack.wasm`: an order).
    let extra = std::env::var("INVOKE_EXTRA_GUEST").ok().map(|file| {
        let like = guests.iter().find(|(guest, _)| file.starts_with(guest.trim_end_matches(".wasm")));
        (file, like.map_or(&b"ok"[..], |(_, body)| *body))
    });
    for (file, body) in guests.into_iter().chain(extra.as_ref().map(|(file, body)| (file.as_str(), *body))) {
        if only.is_some_and(|only| only != format!("{file}/{instance_reuse}/{budget_mib}")) {
            continue;
        }
        let module = runtime.load_consumer(ModuleSpec::new(file, common::module(file))).unwrap();
        let message = Message {
            id: "m".into(),
            body: body.to_vec(),
            content_type: None,
            metadata: vec![],
            delivery_count: Some(1),
        };
        for _ in 0..2_000 {
            runtime.consume(&module, &message, out.clone()).await.unwrap().unwrap();
        }
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let started = Instant::now();
            runtime.consume(&module, &message, out.clone()).await.unwrap().unwrap();
            samples.push(started.elapsed());
        }
        let (p50, p99) = common::percentiles(&mut samples);
        let total: Duration = samples.iter().sum();
        println!(
            "invoke {file:<14} reuse={instance_reuse:<3} pool-resident={budget_mib}MiB body={}B n={calls} p50={:.1}us p99={:.1}us mean={:.1}us",
            message.body.len(),
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            total.as_secs_f64() * 1e6 / samples.len() as f64
        );
    }
}
