//! The embedded worker pool as a source, against a real queue and guests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasm_pc::dispatch::{Dispatcher, Slot, Source};
use wasm_pc::embedded::{EmbeddedOutbound, Pool, PoolOptions};
use wasm_pc::metrics::Metrics;
use wasm_pc::queue::{NewMessage, QueueHandle, StoreOptions};
use wasm_pc::runtime::{ModuleSpec, Runtime, RuntimeOptions};
use wasm_pc::scale::ScaleRule;

use crate::guests;

/// A queue error (here: another process holds the database longer than the
/// busy timeout) must not end the pool: it reports not ready, backs off,
/// and consumes again once the queue answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pool_outlives_a_queue_it_cannot_read_for_a_while() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let queue = QueueHandle::open(&path, StoreOptions::default()).unwrap();
    let order = |i: usize| NewMessage {
        id: Some(format!("o-{i}")),
        body: format!(r#"{{"id":"o-{i}","customer":"acme","items":[{{"sku":"A","qty":1,"price_cents":100}}]}}"#)
            .into_bytes(),
        ..NewMessage::default()
    };
    queue.send("orders", (0..5).map(order).collect()).await.unwrap();

    let runtime = Arc::new(Runtime::new(RuntimeOptions::default()).unwrap());
    let consumer = runtime.load_consumer(ModuleSpec::new("consumer", guests::bytes("consumer"))).unwrap();
    let metrics = Arc::new(Metrics::default());
    let outbound = Arc::new(EmbeddedOutbound::new(queue.clone(), ["orders".to_string()], metrics.clone()));
    let dispatcher =
        Arc::new(Dispatcher::new(runtime, outbound, Some(Arc::new(Slot::new(consumer))), None, metrics.clone()));
    let options = PoolOptions {
        scale: ScaleRule { min: 2, max: 2, target: 16, activation: 0 },
        backoff: Duration::from_millis(50),
        ..PoolOptions::default()
    };
    let pool = Arc::new(Pool::new(queue.clone(), options));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(Arc::clone(&pool).run(dispatcher, stopped));
    let completed = || metrics.completed.load(std::sync::atomic::Ordering::Relaxed);
    wait(Duration::from_secs(20), "the first five", || completed() == 5).await;

    // Another process takes the database for longer than the busy timeout.
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        // The write lock: every write of the queue's waits out its 5 s busy timeout and fails.
        conn.execute_batch("BEGIN IMMEDIATE;").unwrap();
        std::thread::sleep(Duration::from_secs(8));
        conn.execute_batch("COMMIT;").unwrap();
    });
    wait(Duration::from_secs(20), "not ready while the queue cannot be read", || pool.not_ready().is_some()).await;
    let reason = pool.not_ready().unwrap();
    assert!(reason.contains("cannot read queue orders") && reason.contains("locked"), "{reason}");
    assert!(!running.is_finished(), "the pool keeps going");
    tokio::task::spawn_blocking(move || holder.join().unwrap()).await.unwrap();

    queue.send("orders", (5..10).map(order).collect()).await.unwrap();
    wait(Duration::from_secs(30), "the next five, after the queue came back", || completed() == 10).await;
    assert_eq!(pool.not_ready(), None, "ready again");
    // `/metrics` says how well the queue's commands shared transactions.
    let readings = Arc::clone(&pool).readings().await;
    let reading = |name| wasm_pc::metrics::Reading::find(&readings, name).unwrap();
    let (transactions, commands) = (reading("queue_transactions_total"), reading("queue_commands_total"));
    assert!(commands >= 12, "two sends and ten settles at least: {commands}");
    assert!((1..=commands).contains(&transactions), "{transactions} transactions for {commands} commands");
    let _ = stop.send(true);
    running.await.unwrap();
}

async fn wait(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A guest that runs longer than the lock keeps it (renewed while it runs):
/// it is delivered once and completed, not redelivered and dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_slower_than_the_lock_keeps_it() {
    use wasm_pc::queue::{QueueOptions, SubQueue};
    let dir = tempfile::tempdir().unwrap();
    let defaults =
        QueueOptions { lock_duration: Duration::from_millis(300), max_delivery_count: 2, ..QueueOptions::default() };
    let queue = QueueHandle::open(&dir.path().join("q.db"), StoreOptions::with_defaults(defaults)).unwrap();
    queue
        .send(
            "orders",
            vec![NewMessage { id: Some("slow".into()), body: b"sleep:1500".to_vec(), ..NewMessage::default() }],
        )
        .await
        .unwrap();
    let runtime = Arc::new(Runtime::new(RuntimeOptions::default()).unwrap());
    let faulty = runtime.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap();
    let metrics = Arc::new(Metrics::default());
    let outbound = Arc::new(EmbeddedOutbound::new(queue.clone(), ["orders".to_string()], metrics.clone()));
    let dispatcher =
        Arc::new(Dispatcher::new(runtime, outbound, Some(Arc::new(Slot::new(faulty))), None, metrics.clone()));
    let options =
        PoolOptions { scale: ScaleRule { min: 4, max: 4, target: 1, activation: 0 }, ..PoolOptions::default() };
    let pool = Arc::new(Pool::new(queue.clone(), options));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let running = tokio::spawn(Arc::clone(&pool).run(dispatcher, stopped));
    let completed = || metrics.completed.load(std::sync::atomic::Ordering::Relaxed);
    wait(Duration::from_secs(20), "the slow message completed", || completed() == 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let snapshot = metrics.snapshot();
    assert_eq!((snapshot.completed, snapshot.abandoned, snapshot.locks_lost), (1, 0, 0), "{snapshot:?}");
    assert_eq!(snapshot.deliveries, 1, "delivered once: no other worker got it while it ran");
    assert!(queue.peek("orders", SubQueue::DeadLetter, 0, 10).await.unwrap().is_empty());
    let _ = stop.send(true);
    running.await.unwrap();
}

fn outbound_message(id: &str, metadata: &[(&str, &str)]) -> wasm_pc::runtime::outbound::OutboundMessage {
    wasm_pc::runtime::outbound::OutboundMessage {
        id: Some(id.to_string()),
        body: format!("{{\"id\":\"{id}\"}}").into_bytes(),
        content_type: Some("application/json".into()),
        metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
    }
}

/// A batch is stored as Service Bus stores one: all of it in one step, with
/// consecutive sequence numbers, or none of it. A message the binding
/// refuses gets its own error; the rest come back unsent and may be sent
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_whole_or_not_at_all() {
    use wasm_pc::queue::SubQueue;
    use wasm_pc::runtime::outbound::{Outbound, SendError};

    let dir = tempfile::tempdir().unwrap();
    let queue = QueueHandle::open(&dir.path().join("q.db"), StoreOptions::default()).unwrap();
    let metrics = Arc::new(Metrics::default());
    let outbound = EmbeddedOutbound::new(queue.clone(), ["orders".to_string()], metrics.clone());

    let good: Vec<_> = ["a", "b", "c"].iter().map(|id| outbound_message(id, &[])).collect();
    let results = outbound.send_batch("orders", good).await;
    assert_eq!(results, vec![Ok("a".to_string()), Ok("b".to_string()), Ok("c".to_string())]);
    let stored = queue.peek("orders", SubQueue::Active, 0, 10).await.unwrap();
    let stored: Vec<_> = stored.iter().map(|m| (m.id.as_str(), m.sequence)).collect();
    assert_eq!(stored, vec![("a", 1), ("b", 2), ("c", 3)]);

    let mixed = vec![
        outbound_message("d", &[]),
        outbound_message("e", &[("ttlInSeconds", "soon")]),
        outbound_message("f", &[]),
    ];
    let results = outbound.send_batch("orders", mixed).await;
    assert!(matches!(&results[1], Err(SendError::Rejected(m)) if m.contains("ttlInSeconds")), "{results:?}");
    for held_back in [&results[0], &results[2]] {
        assert!(
            matches!(held_back, Err(SendError::Unavailable(m)) if m.contains("message 1 of the batch was refused")),
            "{results:?}"
        );
    }
    assert_eq!(queue.depth("orders").await.unwrap().active, 3, "nothing of the refused batch is stored");

    let results = outbound.send_batch("elsewhere", vec![outbound_message("g", &[]), outbound_message("h", &[])]).await;
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| matches!(r, Err(SendError::UnknownBinding(_)))), "{results:?}");
    assert_eq!(metrics.sent.load(std::sync::atomic::Ordering::Relaxed), 3);
}
