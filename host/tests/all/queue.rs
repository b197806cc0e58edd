//! The embedded queue's Service Bus semantics, against real SQLite files.

use std::time::Duration;

use wasm_pc::queue::{
    Database, Depth, NewMessage, PurgeTarget, QueueError, QueueHandle, QueueOptions, ReceiveMode, Settle, Settled,
    StoreOptions, SubQueue, now_ms,
};

fn options(lock_ms: u64, max_deliveries: u32) -> QueueOptions {
    QueueOptions {
        max_delivery_count: max_deliveries,
        lock_duration: Duration::from_millis(lock_ms),
        default_ttl: None,
        dead_letter_on_expiry: true,
    }
}

fn msg(id: &str) -> NewMessage {
    NewMessage { id: Some(id.into()), body: id.as_bytes().to_vec(), ..NewMessage::default() }
}

fn open(dir: &tempfile::TempDir, opts: QueueOptions) -> Database {
    Database::open(&dir.path().join("q.db"), StoreOptions::with_defaults(opts)).unwrap()
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
    assert_eq!(ids[0].id.len(), 36, "a UUID is assigned when no id is given");
    assert_eq!(ids[1].id, "b");
    assert_eq!((ids[0].sequence, ids[1].sequence), (1, 2), "sequence numbers start at 1 per queue");

    let got = db.receive("orders", 10).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].message.body, vec![0, 159, 146, 150]);
    assert_eq!(got[0].message.content_type.as_deref(), Some("application/octet-stream"));
    assert_eq!(got[0].message.metadata, vec![("k".to_string(), "v w".to_string())]);
    assert_eq!(got[0].message.delivery_count, 1);
    assert!(db.receive("orders", 10).unwrap().is_empty(), "locked messages are not received twice");
    assert_eq!(db.depth("orders").unwrap(), Depth { active: 0, locked: 2, ..Depth::default() });

    assert_eq!(db.settle(got[0].lock, Settle::Complete).unwrap(), Settled::Completed);
    assert!(matches!(db.settle(got[0].lock, Settle::Complete), Err(QueueError::Gone { .. })), "settling twice fails");
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
    assert_eq!(second.message.id, "a");
    assert_eq!(second.message.delivery_count, 2);
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
        assert_eq!(m.message.delivery_count, round);
        assert_eq!(db.settle(m.lock, abandon()).unwrap(), Settled::Abandoned);
    }
    let last = db.receive("q", 1).unwrap().remove(0);
    assert_eq!(last.message.delivery_count, 3);
    assert_eq!(db.settle(last.lock, abandon()).unwrap(), Settled::DeadLettered);
    let dead = db.peek("q", SubQueue::DeadLetter, 0, 10).unwrap();
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
    let got: Vec<String> = db.receive("q", 10).unwrap().into_iter().map(|m| m.message.id).collect();
    assert_eq!(got, vec!["now"]);
    let dead = db.peek("q", SubQueue::DeadLetter, 0, 10).unwrap();
    assert_eq!(dead[0].id, "short");
    assert_eq!(dead[0].dead_letter_reason.as_deref(), Some("TTLExpiredException"));
    std::thread::sleep(Duration::from_millis(150));
    let got: Vec<String> = db.receive("q", 10).unwrap().into_iter().map(|m| m.message.id).collect();
    assert_eq!(got, vec!["later"]);
}

#[test]
fn dead_letter_requeue_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open(&dir, options(60_000, 10));
    db.send("q", vec![msg("a"), msg("b"), msg("c")]).unwrap();
    for m in db.receive("q", 3).unwrap() {
        let how = Settle::DeadLetter { reason: "Poison".into(), description: format!("{} is bad", m.message.id) };
        assert_eq!(db.settle(m.lock, how).unwrap(), Settled::DeadLettered);
    }
    let dead = db.peek("q", SubQueue::DeadLetter, 0, 10).unwrap();
    assert_eq!(
        dead.iter().map(|d| d.dead_letter_description.clone().unwrap_or_default()).collect::<Vec<_>>(),
        ["a is bad", "b is bad", "c is bad"]
    );
    assert_eq!(db.requeue("q", &["b".to_string()]).unwrap(), 1);
    let again = db.receive("q", 10).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].message.id.as_str(), again[0].message.delivery_count), ("b", 1));
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
    let err = Database::open(&junk, StoreOptions::default()).err().unwrap();
    assert!(matches!(err, QueueError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("junk.db"));

    let newer = dir.path().join("newer.db");
    drop(Database::open(&newer, StoreOptions::default()).unwrap());
    let conn = rusqlite::Connection::open(&newer).unwrap();
    conn.execute("UPDATE wasm_pc_meta SET value = 99 WHERE key = 'schema_version'", []).unwrap();
    drop(conn);
    let err = Database::open(&newer, StoreOptions::default()).err().unwrap();
    assert!(matches!(err, QueueError::NewerSchema { found: 99, supported: 2, .. }), "{err}");

    let foreign = dir.path().join("foreign.db");
    rusqlite::Connection::open(&foreign).unwrap().execute("CREATE TABLE customers (id INTEGER)", []).unwrap();
    let err = Database::open(&foreign, StoreOptions::default()).err().unwrap();
    assert!(matches!(err, QueueError::Corrupt { .. }), "{err}");

    let under_a_file = junk.join("q.db");
    let err = Database::open(&under_a_file, StoreOptions::default()).err().unwrap();
    assert!(matches!(err, QueueError::Open { .. }), "{err}");
}

#[test]
fn a_database_locked_by_another_process_is_reported_as_busy() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    drop(Database::open(&path, StoreOptions::default()).unwrap());
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE;").unwrap();
    let started = std::time::Instant::now();
    let err = Database::open(&path, StoreOptions::default()).err().unwrap();
    assert!(matches!(err, QueueError::Busy { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_are_group_committed_and_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let queue = QueueHandle::open(&dir.path().join("q.db"), StoreOptions::default()).unwrap();
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
    let mut ids: Vec<_> = got.iter().map(|m| m.message.id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2000);
}

/// Commands that arrive while the queue thread is busy share its next
/// transaction: the group commit that a message's share of the queue's
/// work rests on, as `/metrics` counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_waiting_while_the_queue_is_busy_share_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let queue = QueueHandle::open(&path, StoreOptions::default()).unwrap();
    queue.depth("q").await.unwrap();
    let before = queue.commits();
    // Another connection holds the write lock, so the queue thread's next
    // transaction waits for it (the busy timeout) and what is sent
    // meanwhile waits behind that one.
    let holder = rusqlite::Connection::open(&path).unwrap();
    holder.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let mut sends: Vec<_> = (0..50).map(|i| Box::pin(queue.send("q", vec![msg(&format!("m{i}"))]))).collect();
    // One poll each puts every command in the channel (it has room); none
    // can be answered while the lock is held.
    std::future::poll_fn(|cx| {
        for send in &mut sends {
            assert!(send.as_mut().poll(cx).is_pending());
        }
        std::task::Poll::Ready(())
    })
    .await;
    holder.execute_batch("COMMIT;").unwrap();
    for send in sends {
        send.await.unwrap();
    }
    let after = queue.commits();
    assert_eq!(after.commands - before.commands, 50);
    // All 50 together, or the one the thread took first and then the other
    // 49 together.
    let transactions = after.transactions - before.transactions;
    assert!((1..=2).contains(&transactions), "{before:?} -> {after:?}");
    assert_eq!(queue.depth("q").await.unwrap().active, 50);
}

#[test]
fn a_full_database_refuses_sends_clearly_and_keeps_what_it_has() {
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions { max_bytes: Some(256 << 10), ..StoreOptions::default() };
    let mut db = Database::open(&dir.path().join("q.db"), opts).unwrap();
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
    assert_eq!(db.peek("q", SubQueue::Active, 0, 10_000).unwrap().len(), stored);
    assert_eq!(db.purge("q", PurgeTarget::All).unwrap(), stored);
    assert!(db.send("q", vec![big(0)]).is_ok());
}

fn store(defaults: QueueOptions) -> StoreOptions {
    StoreOptions::with_defaults(defaults)
}

#[test]
fn lock_tokens_renew_release_and_defer() {
    use wasm_pc::queue::Lock;
    let dir = tempfile::tempdir().unwrap();
    let mut db = Database::open(&dir.path().join("q.db"), store(options(200, 10))).unwrap();
    db.send("q", vec![msg("a"), msg("b")]).unwrap();
    let got = db.receive("q", 2).unwrap();
    let (a, b) = (&got[0], &got[1]);
    assert_eq!(Lock::from_token(a.lock.token()), a.lock, "a lock token names its lock");
    assert_ne!(a.lock.token(), b.lock.token());
    assert!(a.locked_until_ms > now_ms());

    // Renewing keeps the lock past its first expiry.
    std::thread::sleep(Duration::from_millis(120));
    let until = db.renew(a.lock).unwrap();
    assert!(until > a.locked_until_ms);
    db.renew(b.lock).unwrap();
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(db.settle(a.lock, Settle::Complete).unwrap(), Settled::Completed, "renewed, so still held");

    // Released: back at once, and that delivery does not count.
    assert_eq!(db.settle(b.lock, Settle::Release).unwrap(), Settled::Released);
    let again = db.receive("q", 1).unwrap().remove(0);
    assert_eq!(again.message.delivery_count, 1);
    // Deferred: only a receive by sequence number finds it.
    assert_eq!(db.settle(again.lock, Settle::Defer).unwrap(), Settled::Deferred);
    assert!(db.receive("q", 10).unwrap().is_empty());
    assert_eq!(db.depth("q").unwrap().deferred, 1);
    let seq = again.message.sequence;
    let deferred = db.receive_deferred("q", SubQueue::Active, &[seq, 999]).unwrap();
    assert_eq!(deferred.len(), 1);
    assert_eq!(deferred[0].message.id, "b");
    // Abandoning a deferred message keeps it deferred.
    assert_eq!(db.settle(deferred[0].lock, abandon()).unwrap(), Settled::Abandoned);
    assert!(db.receive("q", 10).unwrap().is_empty());
    let last = db.receive_deferred("q", SubQueue::Active, &[seq]).unwrap().remove(0);
    assert_eq!(db.settle(last.lock, Settle::Complete).unwrap(), Settled::Completed);
    assert!(matches!(db.renew(last.lock), Err(QueueError::Gone { .. })), "completed: gone");
    assert_eq!(db.depth("q").unwrap(), Depth::default());
}

#[test]
fn sequence_numbers_are_per_queue_and_peek_starts_where_asked() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Database::open(&dir.path().join("q.db"), StoreOptions::default()).unwrap();
    let a: Vec<i64> = db.send("a", vec![msg("a1"), msg("a2")]).unwrap().iter().map(|s| s.sequence).collect();
    let b: Vec<i64> = db.send("b", vec![msg("b1")]).unwrap().iter().map(|s| s.sequence).collect();
    let a3 = db.send("a", vec![msg("a3")]).unwrap()[0].sequence;
    assert_eq!((a, b, a3), (vec![1, 2], vec![1], 3));
    // Completed numbers are never given out again.
    for m in db.receive("a", 3).unwrap() {
        db.settle(m.lock, Settle::Complete).unwrap();
    }
    assert_eq!(db.send("a", vec![msg("a4")]).unwrap()[0].sequence, 4);
    db.send("a", vec![msg("a5")]).unwrap();
    let peeked: Vec<String> = db
        .peek("a", SubQueue::Active, 5, 10)
        .unwrap()
        .into_iter()
        .map(|m| format!("{}#{}", m.id, m.sequence))
        .collect();
    assert_eq!(peeked, ["a5#5"]);
}

#[test]
fn schedules_can_be_cancelled_until_they_are_due() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Database::open(&dir.path().join("q.db"), StoreOptions::default()).unwrap();
    let later = |id: &str, ms: i64| NewMessage { scheduled_at_ms: Some(now_ms() + ms), ..msg(id) };
    let sent = db.send("q", vec![later("x", 60_000), later("y", 60_000), msg("now")]).unwrap();
    assert_eq!(db.depth("q").unwrap().scheduled, 2);
    let now_seq = sent[2].sequence;
    assert_eq!(db.cancel_scheduled("q", &[sent[0].sequence, now_seq]).unwrap(), 1, "only scheduled ones");
    let peeked: Vec<String> = db.peek("q", SubQueue::Active, 0, 10).unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(peeked, ["y", "now"]);
}

#[test]
fn the_dead_letter_queue_is_received_from_like_a_queue() {
    use wasm_pc::queue::{ReceiveMode, StoredMessage};
    let dir = tempfile::tempdir().unwrap();
    let queue = QueueHandle::open(&dir.path().join("q.db"), store(options(60_000, 10))).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        queue.send("q", vec![msg("a"), msg("b")]).await.unwrap();
        for m in queue.receive("q", 2).await.unwrap() {
            let how = Settle::DeadLetter { reason: "Bad".into(), description: "because".into() };
            queue.settle(m.lock, how).await.unwrap();
        }
        let dead = queue.receive_from("q", SubQueue::DeadLetter, 1, ReceiveMode::PeekLock).await.unwrap();
        let StoredMessage { id, dead_letter_reason, dead_letter_description, .. } = &dead[0].message;
        assert_eq!(
            (id.as_str(), dead_letter_reason.as_deref(), dead_letter_description.as_deref()),
            ("a", Some("Bad"), Some("because"))
        );
        // Abandoning a dead letter keeps it in the dead-letter queue; completing removes it.
        queue.settle(dead[0].lock, abandon()).await.unwrap();
        assert_eq!(queue.depth("q").await.unwrap().dead_lettered, 2);
        let taken = queue.receive_from("q", SubQueue::DeadLetter, 10, ReceiveMode::ReceiveAndDelete).await.unwrap();
        assert_eq!(taken.len(), 2, "receive-and-delete takes them");
        assert_eq!(queue.depth("q").await.unwrap(), Depth::default());
    });
}

#[test]
fn each_queue_has_its_own_properties() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = StoreOptions::with_defaults(QueueOptions { max_delivery_count: 5, ..QueueOptions::default() });
    options.queues.insert(
        "strict".into(),
        QueueOptions { max_delivery_count: 1, default_ttl: Some(Duration::from_millis(1)), ..QueueOptions::default() },
    );
    let mut db = Database::open(&dir.path().join("q.db"), options).unwrap();
    db.send("strict", vec![msg("s")]).unwrap();
    db.send("loose", vec![msg("l")]).unwrap();
    std::thread::sleep(Duration::from_millis(10));
    // The default TTL expired "s"; dead-lettering on expiry is off, so it is dropped.
    assert!(db.receive("strict", 1).unwrap().is_empty());
    assert_eq!(db.depth("strict").unwrap(), Depth::default());
    let l = db.receive("loose", 1).unwrap().remove(0);
    assert_eq!(db.settle(l.lock, abandon()).unwrap(), Settled::Abandoned, "5 deliveries allowed here");
}

#[test]
fn a_version_1_database_is_migrated_without_losing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE wasm_pc_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO wasm_pc_meta VALUES ('schema_version', 1);
             CREATE TABLE messages (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL, id TEXT NOT NULL, body BLOB NOT NULL,
                content_type TEXT, metadata TEXT NOT NULL, enqueued_at INTEGER NOT NULL, visible_at INTEGER NOT NULL,
                expires_at INTEGER, delivery_count INTEGER NOT NULL DEFAULT 0, lock_token INTEGER,
                dead INTEGER NOT NULL DEFAULT 0, dl_reason TEXT, dl_description TEXT, dl_at INTEGER);
             CREATE INDEX messages_by_queue ON messages (queue, dead, seq);
             INSERT INTO messages (queue, id, body, metadata, enqueued_at, visible_at) VALUES
                ('a', 'a1', x'01', '[]', 1, 1), ('b', 'b1', x'02', '[]', 1, 1), ('a', 'a2', x'03', '[[\"k\",\"v\"]]', 1, 1);
             INSERT INTO messages (queue, id, body, metadata, enqueued_at, visible_at, dead, dl_reason) VALUES
                ('a', 'dead', x'04', '[]', 1, 1, 1, 'Poison');",
        )
        .unwrap();
    }
    let mut db = Database::open(&path, StoreOptions::default()).unwrap();
    let live: Vec<(String, i64)> =
        db.peek("a", SubQueue::Active, 0, 10).unwrap().into_iter().map(|m| (m.id, m.sequence)).collect();
    assert_eq!(live, [("a1".to_string(), 1), ("a2".to_string(), 3)]);
    assert_eq!(db.peek("a", SubQueue::DeadLetter, 0, 10).unwrap()[0].dead_letter_reason.as_deref(), Some("Poison"));
    assert!(db.send("a", vec![msg("a3")]).unwrap()[0].sequence > 4, "numbers continue past the old ones");
    let got = db.receive("a", 10).unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[1].message.metadata, vec![("k".to_string(), "v".to_string())]);
    drop(db);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 =
        conn.query_row("SELECT value FROM wasm_pc_meta WHERE key='schema_version'", [], |r| r.get(0)).unwrap();
    assert_eq!(version, 2);
    assert_eq!(Database::open(&path, StoreOptions::default()).unwrap().depth("a").unwrap(), counted(&path, "a"));
}

/// Many callers share one transaction; a command that fails (here: the disk
/// cap reached midway through a batch) must leave nothing behind, and its
/// caller must get the real error, while the others' commits stand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_command_in_a_group_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions { max_bytes: Some(768 << 10), ..StoreOptions::default() };
    let queue = QueueHandle::open(&dir.path().join("q.db"), options).unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for round in 0..40 {
                let batch: Vec<NewMessage> = (0..6)
                    .map(|i| NewMessage {
                        id: Some(format!("t{t}-r{round}-{i}")),
                        body: vec![t as u8; 6 << 10],
                        ..NewMessage::default()
                    })
                    .collect();
                let ids: Vec<String> = batch.iter().filter_map(|m| m.id.clone()).collect();
                results.push((ids, queue.send("q", batch).await));
            }
            results
        }));
    }
    let mut accepted = std::collections::BTreeSet::new();
    let mut refused = 0;
    for task in tasks {
        for (ids, result) in task.await.unwrap() {
            match result {
                Ok(sent) => {
                    assert_eq!(sent.len(), ids.len());
                    accepted.extend(ids);
                }
                Err(e) => {
                    assert!(matches!(e, QueueError::DiskFull(_)), "the real error, not a follow-on one: {e}");
                    refused += 1;
                }
            }
        }
    }
    assert!(refused > 0, "the cap was reached");
    let stored: std::collections::BTreeSet<String> =
        queue.peek("q", SubQueue::Active, 0, 100_000).await.unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(stored, accepted, "exactly the acknowledged batches are stored: no partial batch, nothing refused");
    let depth = queue.depth("q").await.unwrap();
    assert_eq!(depth.active, accepted.len() as u64, "a refused batch's counts went with it");
}

/// A full database refuses sends, yet settles that share their transaction
/// still commit: a consumer's work is not repeated because a producer hit
/// the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_database_still_settles_what_shares_a_group_with_refused_sends() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions { max_bytes: Some(256 << 10), ..StoreOptions::default() };
    let queue = QueueHandle::open(&dir.path().join("q.db"), options).unwrap();
    let small = |i: usize| NewMessage { id: Some(format!("m{i}")), body: vec![1u8; 4 << 10], ..NewMessage::default() };
    let mut stored = 0;
    while queue.send("q", vec![small(stored)]).await.is_ok() {
        stored += 1;
        assert!(stored < 1_000, "the cap was never hit");
    }
    let locked = queue.receive_from("q", SubQueue::Active, stored, ReceiveMode::PeekLock).await.unwrap();
    assert_eq!(locked.len(), stored);
    let before = queue.commits();

    // Settles and sends that cannot fit, all at once, so they share groups.
    let mut settles = Vec::new();
    let mut sends = Vec::new();
    for (i, received) in locked.iter().enumerate() {
        let (q, lock) = (queue.clone(), received.lock);
        settles.push(tokio::spawn(async move { q.settle(lock, Settle::Complete).await }));
        let q = queue.clone();
        let too_big = NewMessage { id: Some(format!("big{i}")), body: vec![2u8; 300 << 10], ..NewMessage::default() };
        sends.push(tokio::spawn(async move { q.send("q", vec![too_big]).await }));
    }
    for send in sends {
        let refused = send.await.unwrap().unwrap_err();
        assert!(matches!(refused, QueueError::DiskFull(_)), "{refused}");
    }
    for settle in settles {
        assert_eq!(settle.await.unwrap().unwrap(), Settled::Completed);
    }
    assert_eq!(queue.depth("q").await.unwrap(), Depth::default(), "every settle committed");
    // What `/metrics` counts as committed: the settles and the depth, not
    // the refused sends rolled back with them.
    let after = queue.commits();
    assert_eq!(after.commands - before.commands, stored as u64 + 1, "{before:?} -> {after:?}");
}

/// A message purged while it was being delivered is gone, not "redelivered
/// when its lock expires": its settle says so.
#[test]
fn a_message_purged_mid_delivery_is_reported_gone() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = open(&dir, options(60_000, 10));
    db.send("q", vec![msg("a"), msg("b")]).unwrap();
    let got = db.receive("q", 2).unwrap();
    assert_eq!(db.purge("q", PurgeTarget::Active).unwrap(), 2);
    let err = db.settle(got[0].lock, Settle::Complete).unwrap_err();
    assert!(matches!(err, QueueError::Gone { .. }), "{err}");
    assert!(err.to_string().contains("purged"), "{err}");
    assert!(matches!(db.renew(got[1].lock), Err(QueueError::Gone { .. })));
}

/// Damaged pages are found at open, with the way out in the error; salvage
/// copies what can still be read into a new database.
/// Found by `cargo xtask fuzz` (fuzz/regressions/stored_row): salvage
/// counted from 1 to the highest sequence number, so one row numbered near
/// i64::MAX kept it busy for ever.
#[test]
fn salvage_walks_the_rows_there_are_whatever_they_are_numbered() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let mut db = open(&dir, options(60_000, 10));
        db.send("a", vec![msg("first"), msg("second")]).unwrap();
    }
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute("UPDATE messages SET seq = ?1 WHERE id = 'second'", [i64::MAX]).unwrap();
    raw.execute("UPDATE messages SET seq = ?1 WHERE id = 'first'", [-5]).unwrap();
    drop(raw);
    let salvaged = dir.path().join("salvaged.db");
    assert_eq!(Database::salvage(&path, &salvaged).unwrap(), (2, 0));
    let mut db = Database::open(&salvaged, StoreOptions::default()).unwrap();
    let ids: Vec<String> = db.receive("a", 10).unwrap().into_iter().map(|m| m.message.id).collect();
    assert_eq!(ids, ["first", "second"]);
}

#[test]
fn a_damaged_database_is_refused_at_open_and_salvaged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    {
        let mut db = open(&dir, options(60_000, 10));
        for queue in ["a", "b"] {
            let batch = (0..150)
                .map(|i| NewMessage {
                    id: Some(format!("{queue}{i}")),
                    body: vec![b'x'; 1000],
                    ..NewMessage::default()
                })
                .collect();
            db.send(queue, batch).unwrap();
        }
    }
    // Garbage over a run of pages in the middle of the file.
    let mut bytes = std::fs::read(&path).unwrap();
    let (page, pages) = (4096, bytes.len() / 4096);
    assert!(pages > 40, "{pages} pages");
    for b in &mut bytes[page * (pages / 2)..page * (pages / 2 + 4)] {
        *b = 0xa5;
    }
    std::fs::write(&path, &bytes).unwrap();

    let err = Database::open(&path, StoreOptions::default()).err().expect("a damaged database is refused");
    assert!(matches!(err, QueueError::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("wasm-pc queue salvage --db"), "says how to recover: {err}");

    let salvaged = dir.path().join("salvaged.db");
    let (copied, unreadable) = Database::salvage(&path, &salvaged).unwrap();
    assert!(copied > 200 && copied < 300, "most rows survive, not all: {copied} copied, {unreadable} unreadable");
    let mut db = Database::open(&salvaged, StoreOptions::default()).unwrap();
    let total: u64 = db.queues().unwrap().iter().map(|(_, d)| d.active).sum();
    assert_eq!(total, copied as u64);
    let next = db.send("a", vec![msg("new")]).unwrap()[0].sequence;
    assert!(next > 1, "sequence numbers go on from the salvaged ones");
}

/// Depth by reading every message of the queue, as it once was computed:
/// what the kept counts must always agree with.
fn counted(path: &std::path::Path, queue: &str) -> Depth {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.query_row(
        "SELECT
           coalesce(sum(dead = 0 AND deferred = 0 AND visible_at <= ?2), 0),
           coalesce(sum(dead = 0 AND visible_at > ?2 AND lock_token IS NOT NULL), 0),
           coalesce(sum(dead = 0 AND deferred = 0 AND visible_at > ?2 AND lock_token IS NULL), 0),
           coalesce(sum(dead = 0 AND deferred = 1 AND NOT (visible_at > ?2 AND lock_token IS NOT NULL)), 0),
           coalesce(sum(dead = 1), 0)
         FROM messages WHERE queue = ?1",
        rusqlite::params![queue, now_ms()],
        |r| {
            let count = |i: usize| r.get::<_, i64>(i).map(|n| n as u64);
            Ok(Depth {
                active: count(0)?,
                locked: count(1)?,
                scheduled: count(2)?,
                deferred: count(3)?,
                dead_lettered: count(4)?,
            })
        },
    )
    .unwrap()
}

/// Depth comes from counts the database keeps, not from reading every
/// message; through every way a message changes state, and across a
/// reopen (which counts afresh), it agrees with counting them all.
#[test]
fn depth_from_kept_counts_agrees_with_counting_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let mut db = Database::open(&path, store(options(150, 2))).unwrap();
    let check = |db: &mut Database, step: &str| {
        for queue in ["q", "other"] {
            assert_eq!(db.depth(queue).unwrap(), counted(&path, queue), "{queue} after {step}");
        }
    };
    check(&mut db, "nothing");
    db.send("q", (0..12).map(|i| msg(&format!("m{i}"))).collect()).unwrap();
    db.send("other", vec![msg("o1")]).unwrap();
    let later = NewMessage { scheduled_at_ms: Some(now_ms() + 60_000), ..msg("later") };
    db.send("q", vec![later]).unwrap();
    check(&mut db, "sends and a schedule");
    let got = db.receive("q", 8).unwrap();
    check(&mut db, "locks");
    db.settle(got[0].lock, Settle::Complete).unwrap();
    db.settle(got[1].lock, Settle::Abandon { delay: Duration::from_secs(60), reason: "later".into() }).unwrap();
    db.settle(got[2].lock, Settle::DeadLetter { reason: "bad".into(), description: "test".into() }).unwrap();
    db.settle(got[3].lock, Settle::Release).unwrap();
    db.settle(got[4].lock, Settle::Defer).unwrap();
    db.settle(got[5].lock, Settle::Defer).unwrap();
    check(&mut db, "every kind of settle");
    let deferred = db.receive_deferred("q", SubQueue::Active, &[got[5].message.sequence]).unwrap();
    assert_eq!(deferred.len(), 1);
    check(&mut db, "a deferred message locked");
    std::thread::sleep(Duration::from_millis(200));
    check(&mut db, "locks expired");
    // Out of deliveries (max 2): the next receive dead-letters what comes back a third time.
    for _ in 0..3 {
        for r in db.receive("q", 20).unwrap() {
            db.settle(r.lock, abandon()).unwrap();
        }
    }
    check(&mut db, "deliveries run out");
    db.requeue("q", &[]).unwrap();
    check(&mut db, "requeue");
    let taken = db.receive_deferred("q", SubQueue::Active, &[got[4].message.sequence]).unwrap();
    db.settle(taken[0].lock, Settle::Complete).unwrap();
    check(&mut db, "a deferred message completed");
    let before = db.depth("q").unwrap();
    drop(db);
    let mut db = Database::open(&path, store(options(150, 2))).unwrap();
    assert_eq!(db.depth("q").unwrap(), before, "counted afresh at open");
    check(&mut db, "a reopen");
    assert_eq!(db.cancel_scheduled("q", &[13]).unwrap(), 1, "the scheduled message");
    check(&mut db, "a cancelled schedule");
    db.send("other", vec![NewMessage { ttl: Some(Duration::from_millis(1)), ..msg("brief") }]).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(db.receive("other", 10).unwrap().len(), 1, "o1; the expired one is dead-lettered on the way");
    check(&mut db, "a message's time to live ran out");
    assert_eq!(db.depth("other").unwrap().dead_lettered, 1, "the expired message");
    let taken = db.write(|ops| ops.receive("other", SubQueue::DeadLetter, 5, ReceiveMode::ReceiveAndDelete)).unwrap();
    assert_eq!(taken.len(), 1);
    let taken = db.write(|ops| ops.receive("q", SubQueue::Active, 1, ReceiveMode::ReceiveAndDelete)).unwrap();
    assert_eq!(taken.len(), 1);
    check(&mut db, "receive-and-delete from the queue and its dead letters");
    db.purge("q", PurgeTarget::All).unwrap();
    check(&mut db, "purge");
    assert_eq!(db.depth("q").unwrap(), Depth::default());
    // Counts are written once per transaction; until then, depth inside
    // it still sees what the transaction did, a failed step excepted.
    let seen = db
        .write(|ops| {
            ops.step(|ops| ops.send("q", (0..3).map(|i| msg(&format!("n{i}"))).collect()))?;
            let failed: Result<(), QueueError> = ops.step(|ops| {
                ops.send("q", vec![msg("undone")])?;
                Err(QueueError::Sqlite("a step that fails after its send".into()))
            });
            assert!(failed.is_err());
            let got = ops.receive("q", SubQueue::Active, 1, ReceiveMode::PeekLock)?;
            ops.settle(got[0].lock, &Settle::Complete)?;
            ops.depth("q")
        })
        .unwrap();
    assert_eq!(seen.active, 2, "three sent, the failed step's one undone, one completed: {seen:?}");
    check(&mut db, "sends, a failed step and a completion in one transaction");
    assert_eq!(db.depth("q").unwrap(), seen);
}
