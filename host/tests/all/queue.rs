//! The embedded queue's Service Bus semantics, against real SQLite files.

use std::time::Duration;

use wasm_pc::queue::{
    Database, Depth, NewMessage, PurgeTarget, QueueError, QueueHandle, QueueOptions, Settle, Settled, now_ms,
};

fn options(lock_ms: u64, max_deliveries: u32) -> QueueOptions {
    QueueOptions {
        max_delivery_count: max_deliveries,
        lock_duration: Duration::from_millis(lock_ms),
        default_ttl: None,
        max_bytes: None,
    }
}

fn msg(id: &str) -> NewMessage {
    NewMessage { id: Some(id.into()), body: id.as_bytes().to_vec(), ..NewMessage::default() }
}

fn open(dir: &tempfile::TempDir, opts: QueueOptions) -> Database {
    Database::open(&dir.path().join("q.db"), opts, false).unwrap()
}

fn abandon() -> Settle {
    Settle::Abandon { delay: Duration::ZERO, reason: "test".into() }
}

#[test]
fn peek_lock_complete_and_fields_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open(&dir, options(60_000, 10));
    let full = NewMessage {
        id: None,
        body: vec![0, 159, 146, 150],
        content_type: Some("application/octet-stream".into()),
        metadata: vec![("k".into(), "v w".into())],
        ..NewMessage::default()
    };
    let ids = db.send("orders", vec![full, msg("b")]).unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0].len(), 36, "a UUID is assigned when no id is given");
    assert_eq!(ids[1], "b");

    let got = db.receive("orders", 10).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].body, vec![0, 159, 146, 150]);
    assert_eq!(got[0].content_type.as_deref(), Some("application/octet-stream"));
    assert_eq!(got[0].metadata, vec![("k".to_string(), "v w".to_string())]);
    assert_eq!(got[0].delivery_count, 1);
    assert!(db.receive("orders", 10).unwrap().is_empty(), "locked messages are not received twice");
    assert_eq!(db.depth("orders").unwrap(), Depth { active: 0, locked: 2, scheduled: 0, dead_lettered: 0 });

    assert_eq!(db.settle(got[0].lock, Settle::Complete).unwrap(), Settled::Completed);
    assert!(
        matches!(db.settle(got[0].lock, Settle::Complete), Err(QueueError::LockLost { .. })),
        "settling twice fails"
    );
    assert_eq!(db.depth("orders").unwrap().locked, 1);
    assert!(db.depth("other").unwrap() == Depth::default(), "queues are separate");
}

#[test]
fn an_expired_lock_makes_the_message_visible_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open(&dir, options(50, 10));
    db.send("q", vec![msg("a")]).unwrap();
    let first = db.receive("q", 1).unwrap().remove(0);
    std::thread::sleep(Duration::from_millis(80));
    assert_eq!(db.depth("q").unwrap().active, 1);
    let second = db.receive("q", 1).unwrap().remove(0);
    assert_eq!(second.id, "a");
    assert_eq!(second.delivery_count, 2);
    assert!(matches!(db.settle(first.lock, Settle::Complete), Err(QueueError::LockLost { ref id }) if id == "a"));
    assert_eq!(db.settle(second.lock, Settle::Complete).unwrap(), Settled::Completed);
}

#[test]
fn abandon_counts_deliveries_and_dead_letters_at_the_max() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open(&dir, options(60_000, 3));
    db.send("q", vec![msg("a")]).unwrap();
    for round in 1..=2 {
        let m = db.receive("q", 1).unwrap().remove(0);
        assert_eq!(m.delivery_count, round);
        assert_eq!(db.settle(m.lock, abandon()).unwrap(), Settled::Abandoned);
    }
    let last = db.receive("q", 1).unwrap().remove(0);
    assert_eq!(last.delivery_count, 3);
    assert_eq!(db.settle(last.lock, abandon()).unwrap(), Settled::DeadLettered);
    let dead = db.peek("q", true, 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].dead_letter_reason.as_deref(), Some("MaxDeliveryCountExceeded"));
    assert!(dead[0].dead_letter_description.as_deref().unwrap_or("").contains("last failure: test"));
    assert!(db.receive("q", 1).unwrap().is_empty());
}

#[test]
fn a_lock_that_expires_on_the_last_delivery_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open(&dir, options(30, 1));
    db.send("q", vec![msg("a")]).unwrap();
    let _lost = db.receive("q", 1).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    assert!(db.receive("q", 1).unwrap().is_empty());
    assert_eq!(db.depth("q").unwrap().dead_lettered, 1);
}

#[test]
fn ttl_expiry_dead_letters_and_schedules_delay_visibility() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open(&dir, options(60_000, 10));
    let short = NewMessage { ttl: Some(Duration::from_millis(1)), ..msg("short") };
    let later = NewMessage { scheduled_at_ms: Some(now_ms() + 150), ..msg("later") };
    db.send("q", vec![short, later, msg("now")]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(db.depth("q").unwrap().scheduled, 1);
    let got: Vec<String> = db.receive("q", 10).unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(got, vec!["now"]);
    let dead = db.peek("q", true, 10).unwrap();
    assert_eq!(dead[0].id, "short");
    assert_eq!(dead[0].dead_letter_reason.as_deref(), Some("TTLExpiredException"));
    std::thread::sleep(Duration::from_millis(150));
    let got: Vec<String> = db.receive("q", 10).unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(got, vec!["later"]);
}

#[test]
fn dead_letter_requeue_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open(&dir, options(60_000, 10));
    db.send("q", vec![msg("a"), msg("b"), msg("c")]).unwrap();
    for m in db.receive("q", 3).unwrap() {
        let how = Settle::DeadLetter { reason: "Poison".into(), description: format!("{} is bad", m.id) };
        assert_eq!(db.settle(m.lock, how).unwrap(), Settled::DeadLettered);
    }
    let dead = db.peek("q", true, 10).unwrap();
    assert_eq!(
        dead.iter().map(|d| d.dead_letter_description.clone().unwrap_or_default()).collect::<Vec<_>>(),
        ["a is bad", "b is bad", "c is bad"]
    );
    assert_eq!(db.requeue("q", &["b".to_string()]).unwrap(), 1);
    let again = db.receive("q", 10).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].id.as_str(), again[0].delivery_count), ("b", 1));
    assert_eq!(db.purge("q", PurgeTarget::DeadLetters).unwrap(), 2);
    assert_eq!(db.purge("q", PurgeTarget::All).unwrap(), 1);
    assert_eq!(db.queues().unwrap(), vec![]);
}

#[test]
fn messages_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut db = open(&dir, options(60_000, 10));
        db.send("q", (0..100).map(|i| msg(&format!("m{i}"))).collect()).unwrap();
    }
    let mut db = open(&dir, options(60_000, 10));
    assert_eq!(db.depth("q").unwrap().active, 100);
}

#[test]
fn bad_database_files_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![b'x'; 8192]).unwrap();
    let err = Database::open(&junk, QueueOptions::default(), false).err().unwrap();
    assert!(matches!(err, QueueError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("junk.db"));

    let newer = dir.path().join("newer.db");
    drop(Database::open(&newer, QueueOptions::default(), false).unwrap());
    let conn = rusqlite::Connection::open(&newer).unwrap();
    conn.execute("UPDATE wasm_pc_meta SET value = 99 WHERE key = 'schema_version'", []).unwrap();
    drop(conn);
    let err = Database::open(&newer, QueueOptions::default(), false).err().unwrap();
    assert!(matches!(err, QueueError::NewerSchema { found: 99, supported: 1, .. }), "{err}");

    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign).unwrap().execute("CREATE TABLE customers (id INTEGER)", []).unwrap();
    let err = Database::open(&foreign, QueueOptions::default(), false).err().unwrap();
    assert!(matches!(err, QueueError::Corrupt { .. }), "{err}");

    let under_a_file = junk.join("q.db");
    let err = Database::open(&under_a_file, QueueOptions::default(), false).err().unwrap();
    assert!(matches!(err, QueueError::Open { .. }), "{err}");
}

#[test]
fn a_database_locked_by_another_process_is_reported_as_busy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    drop(Database::open(&path, QueueOptions::default(), false).unwrap());
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE;").unwrap();
    let started = std::time::Instant::now();
    let err = Database::open(&path, QueueOptions::default(), false).err().unwrap();
    assert!(matches!(err, QueueError::Busy { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_are_group_committed_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let queue = QueueHandle::open(&dir.path().join("q.db"), QueueOptions::default(), false).unwrap();
    let mut tasks = Vec::new();
    for t in 0..20 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100 {
                queue.send("q", vec![msg(&format!("t{t}-{i}"))]).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(queue.depth("q").await.unwrap().active, 2000);
    let got = queue.receive("q", 5000).await.unwrap();
    let mut ids: Vec<_> = got.iter().map(|m| m.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2000);
}

#[test]
fn a_full_database_refuses_sends_clearly_and_keeps_what_it_has() {
    let dir = tempfile::tempdir().unwrap();
    let opts = QueueOptions { max_bytes: Some(256 << 10), ..QueueOptions::default() };
    let mut db = Database::open(&dir.path().join("q.db"), opts, false).unwrap();
    let big = |i: usize| NewMessage { id: Some(format!("m{i}")), body: vec![7u8; 16 << 10], ..NewMessage::default() };
    let mut stored = 0;
    let err = loop {
        match db.send("q", vec![big(stored)]) {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 1_000, "the cap was never hit");
    };
    assert!(matches!(err, QueueError::DiskFull(_)), "{err}");
    assert!(err.to_string().contains("disk is full"), "{err}");
    assert!(stored > 0);
    // Nothing already stored is lost; once space is freed, sends work again.
    assert_eq!(db.depth("q").unwrap().active, stored as u64);
    assert_eq!(db.peek("q", false, 10_000).unwrap().len(), stored);
    assert_eq!(db.purge("q", PurgeTarget::All).unwrap(), stored);
    assert!(db.send("q", vec![big(0)]).is_ok());
}
