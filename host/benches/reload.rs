//! Hot-swap latency: from the kubelet-style `..data` rename to the new
//! version serving, while a loop keeps invoking the live consumer.
//!
//! `cargo bench -p wasm-pc --bench reload`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use wasm_pc::dispatch::{Dispatcher, Report, Settlement, Slot};
use wasm_pc::metrics::Metrics;
use wasm_pc::modules::ModuleSource;
use wasm_pc::reload::{Reloader, Target};
use wasm_pc::runtime::outbound::NoOutbound;
use wasm_pc::runtime::{Message, ModuleSpec, Runtime, RuntimeOptions, World};

const SWAPS: usize = 20;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let versions = [common::module("consumer.wasm"), common::module("faulty.wasm")];
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut generation = 0;
        let mut publish = |bytes: &[u8]| {
            generation += 1;
            let stamp = format!("..ts{generation}");
            std::fs::create_dir(root.join(&stamp)).unwrap();
            std::fs::write(root.join(&stamp).join("consumer.wasm"), bytes).unwrap();
            std::os::unix::fs::symlink(&stamp, root.join("..data_tmp")).unwrap();
            std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
            if !root.join("consumer.wasm").exists() {
                std::os::unix::fs::symlink("..data/consumer.wasm", root.join("consumer.wasm")).unwrap();
            }
        };
        publish(&versions[0]);

        let runtime = Arc::new(Runtime::new(RuntimeOptions::default()).unwrap());
        let slot = Arc::new(Slot::new(runtime.load_consumer(ModuleSpec::new("consumer", versions[0].clone())).unwrap()));
        let metrics = Arc::new(Metrics::default());
        let source = ModuleSource::in_dir(root, "consumer.wasm", World::Consumer);
        let reloader = Reloader::new(
            runtime.clone(),
            root.to_path_buf(),
            vec![Target::Consumer(source, slot.clone())],
            metrics.clone(),
            Duration::from_secs(5),
        );
        let (_stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(reloader.run(stopped));

        // Invocations run throughout; any error during a swap is counted.
        let dispatcher = Arc::new(Dispatcher::new(runtime, Arc::new(NoOutbound), Some(slot.clone()), None, metrics));
        let running = Arc::new(AtomicBool::new(true));
        let (calls, failures) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let load = {
            let (running, calls, failures) = (running.clone(), calls.clone(), failures.clone());
            tokio::spawn(async move {
                let body = br#"{"id":"o","customer":"c","items":[{"sku":"A","qty":1,"price_cents":1}]}"#;
                let message = Message { id: "m".into(), body: body.to_vec(), content_type: None, metadata: vec![], delivery_count: Some(1) };
                while running.load(Ordering::Relaxed) {
                    let settled = dispatcher.deliver("bench", message.clone(), Report).await;
                    calls.fetch_add(1, Ordering::Relaxed);
                    if settled != Settlement::Complete {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };

        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut latencies = Vec::new();
        for k in 1..=SWAPS {
            let before = slot.current().unwrap().info.hash;
            publish(&versions[k % 2]);
            let t = Instant::now();
            while slot.current().unwrap().info.hash == before {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            latencies.push(t.elapsed());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        running.store(false, Ordering::Relaxed);
        load.await.unwrap();
        let (p50, _) = common::percentiles(&mut latencies);
        let max = latencies.iter().max().copied().unwrap_or_default();
        println!(
            "{SWAPS} swaps: rename -> new version live p50 {:.0} ms, max {:.0} ms; {} invocations during the run, {} failed",
            p50.as_secs_f64() * 1e3,
            max.as_secs_f64() * 1e3,
            calls.load(Ordering::Relaxed),
            failures.load(Ordering::Relaxed)
        );
    });
}
