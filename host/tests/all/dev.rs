//! `wasm-pc dev` end to end: the real binary, real modules, a real SQLite file.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wasm_pc::queue::{Database, NewMessage, StoreOptions, SubQueue};

use crate::process::{Running, command, http, queue_json};

fn depth(db: &std::path::Path, queue: &str) -> serde_json::Value {
    queue_json(db, &["stats", queue])[0]["depth"].clone()
}

#[test]
fn demo_of_10000_orders_settles_every_one_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo.db");
    let out = command(&[
        "dev",
        "--demo",
        "10000",
        "--bindings",
        "orders,done",
        "--consumer-config",
        "forward-binding=done",
        "--retry-backoff-ms",
        "5",
    ])
    .arg("--db")
    .arg(&db)
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let figure = |label: &str| -> u64 {
        let line = stdout.lines().find(|l| l.contains(label)).unwrap_or_else(|| panic!("no {label:?} in {stdout}"));
        line.split_whitespace().last().unwrap().parse().unwrap()
    };
    // The sample data: every 40th order is over the credit limit, every 25th
    // carries the flaky SKU that fails twice.
    assert_eq!(figure("orders accepted"), 10_000);
    assert_eq!(figure("completed by consumer"), 9_750);
    assert_eq!(figure("dead-lettered"), 250);
    assert_eq!(figure("retried"), 800);

    let orders = depth(&db, "orders");
    assert_eq!(
        (orders["active"].as_u64(), orders["locked"].as_u64(), orders["dead_lettered"].as_u64()),
        (Some(0), Some(0), Some(250))
    );
    assert_eq!(depth(&db, "done")["active"], 9_750, "each completed order was forwarded exactly once");

    let dead = queue_json(&db, &["dead-letters", "orders", "--limit", "1000"]);
    let dead = dead.as_array().unwrap();
    assert_eq!(dead.len(), 250);
    assert!(dead.iter().all(|d| {
        d["dead_letter_reason"] == "RejectedByConsumer"
            && d["dead_letter_description"].as_str().unwrap().contains("credit limit")
    }));
}

#[test]
fn failing_guests_are_retried_then_dead_lettered_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("faults.db");
    let mut db = Database::open(&db_path, StoreOptions::default()).unwrap();
    let cmd = |id: &str, body: &str| NewMessage {
        id: Some(id.into()),
        body: body.as_bytes().to_vec(),
        ..NewMessage::default()
    };
    db.send("orders", vec![cmd("t", "trap"), cmd("l", "loop"), cmd("m", "alloc"), cmd("r", "reject"), cmd("ok", "ok")])
        .unwrap();
    drop(db);

    let host = Running::start(
        command(&[
            "dev",
            "--listen",
            "127.0.0.1:0",
            "--consumer-file",
            "faulty.wasm",
            "--max-delivery-count",
            "3",
            "--retry-backoff-ms",
            "1",
            "--timeout-ms",
            "200",
            "--memory-mib",
            "16",
        ])
        .arg("--db")
        .arg(&db_path),
        "POST http://",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while depth(&db_path, "orders")["dead_lettered"] != 4 {
        assert!(Instant::now() < deadline, "not all dead-lettered: {}", depth(&db_path, "orders"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(host.terminate().code(), Some(0));

    let dead = queue_json(&db_path, &["dead-letters", "orders"]);
    let by_id: BTreeMap<String, (String, String, u64)> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
            (s("id"), (s("dead_letter_reason"), s("dead_letter_description"), d["delivery_count"].as_u64().unwrap()))
        })
        .collect();
    let expect = |id: &str, reason: &str, needle: &str, deliveries: u64| {
        let (r, d, n) = &by_id[id];
        assert_eq!((r.as_str(), *n), (reason, deliveries), "{id}: {d}");
        assert!(d.contains(needle), "{id}: {d:?} lacks {needle:?}");
    };
    expect("t", "MaxDeliveryCountExceeded", "trapped", 3);
    expect("l", "MaxDeliveryCountExceeded", "time limit", 3);
    expect("m", "MaxDeliveryCountExceeded", "linear memory limit", 3);
    expect("r", "RejectedByConsumer", "asked to reject", 1);
    assert_eq!(depth(&db_path, "orders")["active"], 0, "the good message was completed");
}

#[test]
fn sigkill_at_any_moment_loses_no_message() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("kill.db");
    let start = || {
        Running::start(
            command(&[
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--bindings",
                "orders,done",
                "--consumer-config",
                "forward-binding=done",
                "--lock-ms",
                "1000",
            ])
            .arg("--db")
            .arg(&db),
            "POST http://",
        )
    };
    let mut accepted: Vec<String> = Vec::new();
    for round in 0..3 {
        let host = start();
        let address = host.address;
        // Post until the kill lands mid-stream; only 202s count as produced.
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300 + 150 * round));
            host.kill9();
        });
        for batch in 0.. {
            let ids: Vec<String> = (0..50).map(|i| format!("r{round}-b{batch}-{i}")).collect();
            let orders: Vec<_> = ids
                .iter()
                .map(|id| serde_json::json!({"id": id, "customer": "c", "items": [{"sku": "s", "qty": 1, "price_cents": 1}]}))
                .collect();
            match http(address, "POST", "/produce", "application/json", &serde_json::to_vec(&orders).unwrap()) {
                Ok((202, _)) => accepted.extend(ids),
                Ok((status, body)) => {
                    panic!("unexpected {status}: {}", String::from_utf8_lossy(&body))
                }
                Err(_) => break,
            }
        }
        killer.join().unwrap();
    }
    assert!(accepted.len() >= 100, "the test produced too little to mean anything: {}", accepted.len());

    // A last run drains everything, including messages whose locks the kills left behind.
    let host = start();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let d = depth(&db, "orders");
        if d["active"] == 0 && d["locked"] == 0 && d["scheduled"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "did not drain: {d}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(host.terminate().code(), Some(0));

    let mut db = Database::open(&db, StoreOptions::default()).unwrap();
    let done = db.peek("done", SubQueue::Active, 0, 1_000_000).unwrap();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for m in &done {
        let summary: serde_json::Value = serde_json::from_slice(&m.body).unwrap();
        *seen.entry(summary["order"].as_str().unwrap().to_string()).or_default() += 1;
    }
    let missing: Vec<_> = accepted.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} accepted orders were lost: {:?}",
        missing.len(),
        accepted.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(db.depth("orders").unwrap().dead_lettered, 0);
}

/// A log format the host does not write is a usage error that names the
/// ones it does, not text in place of the JSON a collector expects.
#[test]
fn an_unknown_log_format_is_refused_with_the_choices() {
    let out = command(&["dev", "--demo", "1"]).env("WASM_PC_LOG_FORMAT", "jsn").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("jsn") && stderr.contains("text") && stderr.contains("json"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("demo.db");
    let out = command(&["dev", "--demo", "1", "--db"]).arg(&db).env("WASM_PC_LOG_FORMAT", "json").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty(), "the host logged nothing");
    for line in lines {
        let event: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(event["level"].is_string() && event["fields"].is_object(), "{line}");
    }
}
