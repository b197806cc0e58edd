//! The synchronous SQLite store behind the embedded queue.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Row, Transaction, params};

use super::{
    Depth, Lock, MessageState, NewMessage, PurgeTarget, QueueError, QueueOptions, ReceiveMode, Received, Sent, Settle,
    Settled, StoreOptions, StoredMessage, SubQueue, now_ms,
};

/// The schema this host writes. Bump it with a migration in [`Database::open`].
const SCHEMA_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS wasm_pc_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    queue          TEXT    NOT NULL,
    id             TEXT    NOT NULL,
    body           BLOB    NOT NULL,
    content_type   TEXT,
    metadata       TEXT    NOT NULL,
    enqueued_at    INTEGER NOT NULL,
    -- Not receivable before this time: a schedule, a backoff or a lock's expiry.
    visible_at     INTEGER NOT NULL,
    expires_at     INTEGER,
    delivery_count INTEGER NOT NULL DEFAULT 0,
    -- Set while (or since) locked; a settle must present it.
    lock_token     INTEGER,
    dead           INTEGER NOT NULL DEFAULT 0,
    dl_reason      TEXT,
    dl_description TEXT,
    dl_at          INTEGER,
    -- The queue's own sequence number (Service Bus SequenceNumber).
    sequence       INTEGER NOT NULL,
    deferred       INTEGER NOT NULL DEFAULT 0,
    amqp           BLOB
);
-- Receives walk a queue in sequence order, skipping the few not yet visible.
CREATE INDEX IF NOT EXISTS messages_by_queue ON messages (queue, dead, seq);
CREATE INDEX IF NOT EXISTS messages_by_sequence ON messages (queue, sequence);
-- The last sequence number given out per queue: numbers are never reused.
CREATE TABLE IF NOT EXISTS queue_sequences (queue TEXT PRIMARY KEY, last INTEGER NOT NULL);
";

/// Schema 1 had one sequence for all queues, and no deferral or AMQP copy.
const MIGRATE_1_TO_2: &str = "
ALTER TABLE messages ADD COLUMN sequence INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN deferred INTEGER NOT NULL DEFAULT 0;
ALTER TABLE messages ADD COLUMN amqp BLOB;
UPDATE messages SET sequence = seq;
CREATE INDEX IF NOT EXISTS messages_by_sequence ON messages (queue, sequence);
CREATE TABLE IF NOT EXISTS queue_sequences (queue TEXT PRIMARY KEY, last INTEGER NOT NULL);
INSERT OR REPLACE INTO queue_sequences (queue, last)
    SELECT queue, max(seq) FROM messages GROUP BY queue;
INSERT OR REPLACE INTO queue_sequences (queue, last)
    SELECT '', coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'messages'), 0);
UPDATE wasm_pc_meta SET value = 2 WHERE key = 'schema_version';
";

/// Depth without reading every message: each queue's counts of live,
/// deferred and dead-lettered messages, kept by every operation that changes
/// them (in its transaction, so a rollback takes the change back too) and
/// counted afresh at every open. The time-dependent counts (locked,
/// scheduled) come from the few messages not visible now, through a
/// partial index that covers what they need. Its condition holds for every
/// message that is locked, scheduled or held back after an abandon, and
/// for none that was sent and not yet received: a send adds no entry, and a
/// completion removes one from a small index. (An index over every message,
/// as the first version had, took a fifth off produce throughput.) Nothing
/// here changes the schema's version: a host that does not know the table
/// or the index leaves them, and the next open recounts.
const COUNTS: &str = "
CREATE TABLE IF NOT EXISTS queue_counts (
    queue    TEXT PRIMARY KEY,
    live     INTEGER NOT NULL DEFAULT 0,
    deferred INTEGER NOT NULL DEFAULT 0,
    dead     INTEGER NOT NULL DEFAULT 0
);
DROP INDEX IF EXISTS messages_by_visibility;
CREATE INDEX IF NOT EXISTS messages_not_visible ON messages (queue, dead, visible_at, deferred, lock_token)
    WHERE visible_at > enqueued_at;
DELETE FROM queue_counts;
INSERT INTO queue_counts (queue, live, deferred, dead)
    SELECT queue, sum(dead = 0), sum(dead = 0 AND deferred = 1), sum(dead = 1) FROM messages GROUP BY queue;
";

/// Service Bus's dead-letter reasons.
const TTL_EXPIRED: &str = "TTLExpiredException";
const MAX_DELIVERIES: &str = "MaxDeliveryCountExceeded";

/// Columns every message query reads, in [`stored`]'s order.
const COLUMNS: &str = "seq, id, body, content_type, metadata, enqueued_at, expires_at, delivery_count, visible_at, \
                       lock_token, dead, dl_reason, dl_description, sequence, deferred, amqp";

/// A queue database: several named queues in one file.
pub struct Database {
    conn: Connection,
    path: String,
    options: StoreOptions,
    cap: Option<Cap>,
}

/// The database's size limit in pages ([`StoreOptions::max_bytes`]). Sends
/// stop at it; every other operation may go a sixteenth past it, because
/// locking and settling move index entries, which may take a page: a full
/// queue must still be drained.
#[derive(Debug, Clone, Copy)]
struct Cap {
    sends: i64,
    others: i64,
}

/// Numbers tried one by one past a damaged page before salvage gives up
/// on the rest: more rows than one page holds.
const SALVAGE_PROBES: u32 = 100_000;

impl Database {
    /// Opens or creates the database at `path`, in WAL mode.
    ///
    /// `synchronous=NORMAL` in WAL mode survives a crash or `kill -9` of the
    /// host (committed transactions are in the WAL file); only an OS crash or
    /// power loss may lose the last commits. `full_sync` closes that gap at
    /// some throughput cost.
    pub fn open(path: &Path, options: StoreOptions) -> Result<Database, QueueError> {
        let shown = path.display().to_string();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| QueueError::Open {
                path: shown.clone(),
                detail: format!("creating {}: {e}", parent.display()),
            })?;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(&shown, e))?;
        let mut db = Database { conn, path: shown, options, cap: None };
        db.init()?;
        Ok(db)
    }

    fn init(&mut self) -> Result<(), QueueError> {
        let path = self.path.clone();
        let err = |e| classify(&path, e);
        self.conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        // Plans never depend on bound values. Without this, SQLite marks a
        // bound `LIMIT ?` (and, with STAT4, any range bound) as plan-shaping
        // and prepares the statement again at every new binding: every
        // receive was parsed and planned afresh, 8 % of the queue thread.
        self.conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map_err(err)?;
        let mode: String = self.conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(QueueError::Open { path, detail: format!("cannot switch to WAL mode (got {mode})") });
        }
        let sync = if self.options.full_sync { "FULL" } else { "NORMAL" };
        self.conn.pragma_update(None, "synchronous", sync).map_err(err)?;
        if let Some(max) = self.options.max_bytes {
            let page: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(err)?;
            let pages = (i64::try_from(max).unwrap_or(i64::MAX) / page.max(512)).max(16);
            let cap = Cap { sends: pages, others: pages.saturating_add((pages / 16).max(16)) };
            self.conn.pragma_update(None, "max_page_count", cap.others).map_err(err)?;
            self.cap = Some(cap);
        }
        // Look first, in a read transaction: a database another host is busy
        // writing to can still be opened (WAL readers never wait).
        let (has_meta, has_other, found) = {
            let tx = self.conn.transaction().map_err(err)?;
            let has_meta: bool = tx
                .query_row("SELECT count(*) FROM sqlite_master WHERE type='table' AND name='wasm_pc_meta'", [], |r| {
                    r.get(0)
                })
                .map_err(err)?;
            let has_other: bool = tx
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'
                     AND name NOT IN ('wasm_pc_meta','messages','queue_sequences','queue_counts')",
                    [],
                    |r| r.get(0),
                )
                .map_err(err)?;
            let found: Option<i64> = if has_meta {
                tx.query_row("SELECT value FROM wasm_pc_meta WHERE key='schema_version'", [], |r| r.get(0))
                    .optional()
                    .map_err(err)?
            } else {
                None
            };
            (has_meta, has_other, found)
        };
        if !has_meta && has_other {
            return Err(QueueError::Corrupt {
                path,
                detail: "it holds other tables; refusing to write into it".into(),
            });
        }
        if found.is_some() {
            self.check_pages()?;
        }
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(err)?;
        match found {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(QueueError::NewerSchema { path, found: v, supported: SCHEMA_VERSION });
            }
            Some(SCHEMA_VERSION) => {}
            Some(1) => tx.execute_batch(MIGRATE_1_TO_2).map_err(err)?,
            Some(v) => return Err(QueueError::Corrupt { path, detail: format!("unknown schema version {v}") }),
            None if has_meta => {
                return Err(QueueError::Corrupt { path, detail: "no schema version recorded".into() });
            }
            None => {
                tx.execute_batch(SCHEMA).map_err(err)?;
                tx.execute(
                    "INSERT OR IGNORE INTO wasm_pc_meta (key, value) VALUES ('schema_version', ?1)",
                    [SCHEMA_VERSION],
                )
                .map_err(err)?;
            }
        }
        tx.execute_batch(COUNTS).map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(())
    }

    /// Refuses a database with damaged pages at open, saying how to recover,
    /// rather than failing at the first query that touches them.
    fn check_pages(&mut self) -> Result<(), QueueError> {
        let path = self.path.clone();
        let problems: Vec<String> = self
            .conn
            .prepare("PRAGMA quick_check(5)")
            .and_then(|mut s| s.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>())
            .map_err(|e| classify(&path, e))?;
        if problems.iter().all(|p| p == "ok") {
            return Ok(());
        }
        Err(QueueError::Corrupt {
            path: path.clone(),
            detail: format!(
                "damaged pages ({}); copy what can be read into a new database with \
                 `wasm-pc queue salvage --db {path} --into NEW.db`, then use NEW.db",
                problems.join("; ")
            ),
        })
    }

    /// Copies every message that can still be read from the (possibly
    /// damaged) database at `from` into a new one at `into`, locks released.
    /// Returns `(copied, unreadable)`.
    pub fn salvage(from: &Path, into: &Path) -> Result<(usize, usize), QueueError> {
        let shown = from.display().to_string();
        let source =
            Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| classify(&shown, e))?;
        if into.exists() {
            return Err(QueueError::Open { path: into.display().to_string(), detail: "already exists".into() });
        }
        let mut target = Database::open(into, StoreOptions::default())?;
        let (mut copied, mut unreadable) = (0, 0);
        let mut read = source
            .prepare(&format!("SELECT queue, {COLUMNS} FROM messages WHERE seq = ?1"))
            .map_err(|e| classify(&shown, e))?;
        let mut next = source
            .prepare("SELECT seq FROM messages WHERE seq > ?1 ORDER BY seq LIMIT 1")
            .map_err(|e| classify(&shown, e))?;
        target.write(|ops| {
            // From one row to the next by key, each step a fresh descent from
            // the root: a damaged page costs the rows on it, not the rest.
            // Where a step fails, the numbers after it are tried one by one
            // (ours are dense) until the walk gets past the damage. Steps
            // follow the rows there are, so a row numbered near i64::MAX
            // costs one step, not 2^63.
            let mut at = i64::MIN;
            let mut probes = 0;
            loop {
                let seq = match next.query_row([at], |r| r.get::<_, i64>(0)) {
                    Ok(seq) => {
                        probes = 0;
                        seq
                    }
                    Err(rusqlite::Error::QueryReturnedNoRows) => break,
                    Err(_) if probes < SALVAGE_PROBES && at < i64::MAX => {
                        probes += 1;
                        at + 1
                    }
                    Err(_) => break,
                };
                match read.query_row([seq], |r| {
                    let queue: String = r.get(0)?;
                    let values: Vec<rusqlite::types::Value> = (1..=16).map(|i| r.get(i)).collect::<Result<_, _>>()?;
                    Ok((queue, values))
                }) {
                    Ok((queue, values)) => {
                        ops.restore(&queue, &values)?;
                        copied += 1;
                    }
                    Err(rusqlite::Error::QueryReturnedNoRows) => {}
                    Err(_) => unreadable += 1,
                }
                if seq == i64::MAX {
                    break;
                }
                at = seq;
            }
            ops.renumber()
        })?;
        Ok((copied, unreadable))
    }

    /// The path it was opened with, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    /// Runs `f` in one write transaction; all of it commits or none.
    pub fn write<R>(&mut self, f: impl FnOnce(&mut Ops<'_>) -> Result<R, QueueError>) -> Result<R, QueueError> {
        self.transaction(rusqlite::TransactionBehavior::Immediate, f)
    }

    /// Runs `f` in a read transaction: a consistent snapshot that never waits
    /// for writers.
    fn read<R>(&mut self, f: impl FnOnce(&mut Ops<'_>) -> Result<R, QueueError>) -> Result<R, QueueError> {
        self.transaction(rusqlite::TransactionBehavior::Deferred, f)
    }

    fn transaction<R>(
        &mut self,
        behavior: rusqlite::TransactionBehavior,
        f: impl FnOnce(&mut Ops<'_>) -> Result<R, QueueError>,
    ) -> Result<R, QueueError> {
        let path = self.path.clone();
        let tx = self.conn.transaction_with_behavior(behavior).map_err(|e| classify(&path, e))?;
        let mut ops =
            Ops { tx, path: &path, options: &self.options, cap: self.cap, now: now_ms(), counts: Counts::default() };
        let result = f(&mut ops)?;
        ops.write_counts()?;
        ops.tx.commit().map_err(|e| classify(&path, e))?;
        Ok(result)
    }

    pub fn send(&mut self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<Sent>, QueueError> {
        self.write(|ops| ops.send(queue, messages))
    }

    pub fn receive(&mut self, queue: &str, max: usize) -> Result<Vec<Received>, QueueError> {
        self.write(|ops| ops.receive(queue, SubQueue::Active, max, ReceiveMode::PeekLock))
    }

    pub fn settle(&mut self, lock: Lock, how: Settle) -> Result<Settled, QueueError> {
        self.write(|ops| ops.settle(lock, &how))
    }

    /// Extends a held lock by the queue's lock duration; returns its new end.
    pub fn renew(&mut self, lock: Lock) -> Result<i64, QueueError> {
        self.write(|ops| ops.renew(lock))
    }

    pub fn depth(&mut self, queue: &str) -> Result<Depth, QueueError> {
        self.read(|ops| ops.depth(queue))
    }

    /// Every queue that holds messages, with its depth.
    pub fn queues(&mut self) -> Result<Vec<(String, Depth)>, QueueError> {
        self.read(|ops| {
            let names = ops.queue_names()?;
            names.into_iter().map(|q| ops.depth(&q).map(|d| (q, d))).collect()
        })
    }

    /// Looks at up to `limit` messages from sequence number `from` on,
    /// without locking them.
    pub fn peek(
        &mut self,
        queue: &str,
        sub: SubQueue,
        from: i64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, QueueError> {
        self.read(|ops| ops.peek(queue, sub, from, limit))
    }

    /// Moves dead letters back to the queue as fresh messages (delivery count
    /// 0); all of them, or those with the given ids. Returns how many.
    pub fn requeue(&mut self, queue: &str, ids: &[String]) -> Result<usize, QueueError> {
        self.write(|ops| ops.requeue(queue, ids))
    }

    /// Deletes messages for good. Returns how many.
    pub fn purge(&mut self, queue: &str, target: PurgeTarget) -> Result<usize, QueueError> {
        self.write(|ops| ops.purge(queue, target))
    }

    /// Deletes scheduled messages that are not yet visible. Returns how many.
    pub fn cancel_scheduled(&mut self, queue: &str, sequences: &[i64]) -> Result<usize, QueueError> {
        self.write(|ops| ops.cancel_scheduled(queue, sequences))
    }

    /// Locks deferred messages by sequence number.
    pub fn receive_deferred(
        &mut self,
        queue: &str,
        sub: SubQueue,
        sequences: &[i64],
    ) -> Result<Vec<Received>, QueueError> {
        self.write(|ops| ops.receive_deferred(queue, sub, sequences))
    }
}

/// A locked message, as a settle finds it.
struct Held {
    deliveries: i64,
    dead: bool,
    deferred: bool,
    queue: String,
}

/// Queue operations inside one transaction.
pub struct Ops<'a> {
    tx: Transaction<'a>,
    path: &'a str,
    options: &'a StoreOptions,
    cap: Option<Cap>,
    /// One clock reading per transaction, so its operations agree.
    now: i64,
    /// Count changes not yet written: one upsert per queue per transaction,
    /// not one per message.
    counts: Counts,
}

/// Changes to the kept counts of each queue (see [`COUNTS`]), as
/// `[live, deferred, dead]`. A group of commands touches one queue or a
/// few, so a list beats a map.
#[derive(Debug, Default, Clone)]
struct Counts(Vec<(String, [i64; 3])>);

impl Counts {
    fn add(&mut self, queue: &str, change: [i64; 3]) {
        match self.0.iter_mut().find(|(q, _)| q == queue) {
            Some((_, total)) => total.iter_mut().zip(change).for_each(|(t, c)| *t += c),
            None => self.0.push((queue.to_string(), change)),
        }
    }

    fn of(&self, queue: &str) -> [i64; 3] {
        self.0.iter().find(|(q, _)| q == queue).map_or([0; 3], |(_, change)| *change)
    }
}

impl Ops<'_> {
    fn err(&self) -> impl Fn(rusqlite::Error) -> QueueError + '_ {
        move |e| classify(self.path, e)
    }

    fn queue_options(&self, queue: &str) -> QueueOptions {
        self.options.queue(queue)
    }

    /// Runs `f` as one all-or-nothing step of a larger transaction: a step
    /// that fails leaves nothing behind, and the others still commit.
    ///
    /// Some failures (a full disk, say) make SQLite roll back the whole
    /// transaction by itself; then nothing before this step stands either,
    /// and [`Ops::aborted`] says so.
    pub fn step<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R, QueueError>) -> Result<R, QueueError> {
        // Cached statements: a step wraps every command of a group (each
        // settle, each send), and parsing these anew each time showed.
        let run = |tx: &Transaction<'_>, sql: &str| tx.prepare_cached(sql).and_then(|mut s| s.execute([]));
        run(&self.tx, "SAVEPOINT step").map_err(self.err())?;
        let counts = self.counts.clone();
        let result = f(self);
        if self.aborted() {
            return result;
        }
        if result.is_err() {
            run(&self.tx, "ROLLBACK TO step").map_err(self.err())?;
            self.counts = counts;
        }
        run(&self.tx, "RELEASE step").map_err(self.err())?;
        result
    }

    /// True when SQLite has already rolled the transaction back.
    pub fn aborted(&self) -> bool {
        self.tx.is_autocommit()
    }

    /// Enqueues messages; returns their ids and sequence numbers.
    pub fn send(&mut self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<Sent>, QueueError> {
        let Some(cap) = self.cap else {
            return self.store(queue, messages);
        };
        self.limit_pages(cap.sends)?;
        let stored = self.store(queue, messages);
        // Not transactional: set back whatever became of the send.
        self.limit_pages(cap.others)?;
        stored
    }

    fn limit_pages(&mut self, pages: i64) -> Result<(), QueueError> {
        // A pragma takes no parameters; each cap has its own cached text.
        self.tx
            .prepare_cached(&format!("PRAGMA max_page_count = {pages}"))
            .and_then(|mut s| s.query_row([], |_| Ok(())))
            .map_err(self.err())
    }

    /// Moves `queue`'s kept counts by these amounts (see [`COUNTS`]), when
    /// the transaction commits.
    fn count(&mut self, queue: &str, live: i64, deferred: i64, dead: i64) {
        self.counts.add(queue, [live, deferred, dead]);
    }

    /// Writes the count changes made so far.
    fn write_counts(&mut self) -> Result<(), QueueError> {
        for (queue, [live, deferred, dead]) in std::mem::take(&mut self.counts).0 {
            if [live, deferred, dead] == [0; 3] {
                continue;
            }
            self.tx
                .prepare_cached(
                    "INSERT INTO queue_counts (queue, live, deferred, dead) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(queue) DO UPDATE SET live = live + ?2, deferred = deferred + ?3, dead = dead + ?4",
                )
                .and_then(|mut s| s.execute(params![queue, live, deferred, dead]))
                .map_err(self.err())?;
        }
        Ok(())
    }

    fn store(&mut self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<Sent>, QueueError> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let count = i64::try_from(messages.len()).unwrap_or(i64::MAX);
        let last: i64 = self
            .tx
            .prepare_cached(
                "INSERT INTO queue_sequences (queue, last) VALUES (?1, ?2)
                 ON CONFLICT(queue) DO UPDATE SET last = last + ?2 RETURNING last",
            )
            .and_then(|mut s| s.query_row(params![queue, count], |r| r.get(0)))
            .map_err(self.err())?;
        let defaults = self.queue_options(queue);
        let mut sent = Vec::with_capacity(messages.len());
        let mut insert = self
            .tx
            .prepare_cached(
                "INSERT INTO messages (queue, id, body, content_type, metadata, enqueued_at, visible_at, expires_at, sequence, amqp)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )
            .map_err(|e| classify(self.path, e))?;
        for (sequence, m) in (last - count + 1..).zip(messages) {
            let id = m.id.filter(|id| !id.is_empty()).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let metadata = serde_json::to_string(&m.metadata).unwrap_or_else(|_| "[]".into());
            let ttl = m.ttl.or(defaults.default_ttl);
            let expires = ttl.map(|t| self.now.saturating_add(millis(t)));
            let visible = m.scheduled_at_ms.unwrap_or(self.now).max(self.now);
            insert
                .execute(params![
                    queue,
                    id,
                    m.body,
                    m.content_type,
                    metadata,
                    self.now,
                    visible,
                    expires,
                    sequence,
                    m.amqp
                ])
                .map_err(|e| classify(self.path, e))?;
            sent.push(Sent { id, sequence });
        }
        drop(insert);
        self.count(queue, count, 0, 0);
        Ok(sent)
    }

    /// Locks (or, in receive-and-delete mode, takes) up to `max` visible
    /// messages. Expired messages and those out of deliveries are
    /// dead-lettered on the way.
    pub fn receive(
        &mut self,
        queue: &str,
        sub: SubQueue,
        max: usize,
        mode: ReceiveMode,
    ) -> Result<Vec<Received>, QueueError> {
        let options = self.queue_options(queue);
        let mut got = Vec::new();
        loop {
            let want = max.saturating_sub(got.len());
            if want == 0 {
                break;
            }
            let candidates = self.visible(queue, sub, want)?;
            if candidates.is_empty() {
                break;
            }
            let mut swept = false;
            for (seq, message) in candidates {
                let live = sub == SubQueue::Active;
                // Candidates are never deferred: only a receive by sequence number takes those.
                if live && message.expires_at_ms.is_some_and(|t| t <= self.now) {
                    self.expire(seq, queue, options)?;
                    swept = true;
                } else if live && message.delivery_count >= options.max_delivery_count {
                    let why = "the lock expired after the last allowed delivery";
                    self.dead_letter(seq, queue, false, MAX_DELIVERIES, why)?;
                    swept = true;
                } else {
                    got.push(self.lock(seq, queue, message, options, mode)?);
                }
            }
            if !swept {
                break;
            }
        }
        Ok(got)
    }

    /// Takes one candidate: locks it, or deletes it in receive-and-delete mode.
    fn lock(
        &mut self,
        seq: i64,
        queue: &str,
        mut message: StoredMessage,
        options: QueueOptions,
        mode: ReceiveMode,
    ) -> Result<Received, QueueError> {
        let token = new_token();
        let locked_until = self.now.saturating_add(millis(options.lock_duration));
        match mode {
            ReceiveMode::PeekLock => {
                self.tx
                    .prepare_cached(
                        "UPDATE messages SET lock_token = ?1, visible_at = ?2, delivery_count = delivery_count + 1 WHERE seq = ?3",
                    )
                    .and_then(|mut s| s.execute(params![token, locked_until, seq]))
                    .map_err(self.err())?;
            }
            ReceiveMode::ReceiveAndDelete => {
                let dead = message.state == MessageState::DeadLettered;
                self.delete(seq, queue, dead, message.state == MessageState::Deferred)?;
            }
        }
        message.delivery_count = message.delivery_count.saturating_add(1);
        if message.state != MessageState::DeadLettered {
            message.state = MessageState::Locked;
        }
        Ok(Received { lock: Lock { seq, token }, locked_until_ms: locked_until, message })
    }

    fn visible(&mut self, queue: &str, sub: SubQueue, limit: usize) -> Result<Vec<(i64, StoredMessage)>, QueueError> {
        let dead = sub == SubQueue::DeadLetter;
        let now = self.now;
        let mut stmt = self.tx.prepare_cached(&visible_query()).map_err(|e| classify(self.path, e))?;
        let rows = stmt
            .query_map(params![queue, dead, now, limit as i64], |r| stored(r, now))
            .map_err(|e| classify(self.path, e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| classify(self.path, e))
    }

    /// The message a lock holds, if the lock is still held.
    fn held(&mut self, lock: Lock) -> Result<Held, QueueError> {
        let held = self
            .tx
            .prepare_cached(
                "SELECT delivery_count, dead, deferred, queue FROM messages
                 WHERE seq = ?1 AND lock_token = ?2 AND visible_at > ?3",
            )
            .and_then(|mut s| {
                s.query_row(params![lock.seq, lock.token, self.now], |r| {
                    Ok(Held { deliveries: r.get(0)?, dead: r.get(1)?, deferred: r.get(2)?, queue: r.get(3)? })
                })
                .optional()
            })
            .map_err(self.err())?;
        match held {
            Some(found) => Ok(found),
            None => {
                let id: Option<String> = self
                    .tx
                    .query_row("SELECT id FROM messages WHERE seq = ?1", [lock.seq], |r| r.get(0))
                    .optional()
                    .map_err(self.err())?;
                Err(match id {
                    Some(id) => QueueError::LockLost { id },
                    None => QueueError::Gone { row: lock.seq },
                })
            }
        }
    }

    /// Settles a message whose lock is still held, in one write statement
    /// (the queue thread runs it without a savepoint; keep it to one).
    pub fn settle(&mut self, lock: Lock, how: &Settle) -> Result<Settled, QueueError> {
        let Held { deliveries, dead, deferred, queue } = self.held(lock)?;
        let unlock = |ops: &mut Self, visible: i64, extra: &str| {
            ops.tx
                .prepare_cached(&format!(
                    "UPDATE messages SET lock_token = NULL, visible_at = ?1{extra} WHERE seq = ?2"
                ))
                .and_then(|mut s| s.execute(params![visible, lock.seq]))
                .map_err(ops.err())
        };
        match how {
            Settle::Complete => {
                self.delete(lock.seq, &queue, dead, deferred)?;
                Ok(Settled::Completed)
            }
            Settle::Abandon { delay, reason } => {
                let max = i64::from(self.queue_options(&queue).max_delivery_count);
                if !dead && deliveries >= max {
                    let why = format!("abandoned after {deliveries} deliveries; last failure: {reason}");
                    self.dead_letter(lock.seq, &queue, deferred, MAX_DELIVERIES, &why)?;
                    return Ok(Settled::DeadLettered);
                }
                unlock(self, self.now.saturating_add(millis(*delay)), "")?;
                Ok(Settled::Abandoned)
            }
            Settle::DeadLetter { reason, description } if !dead => {
                self.dead_letter(lock.seq, &queue, deferred, reason, description)?;
                Ok(Settled::DeadLettered)
            }
            // Already a dead letter: it stays one, visible to the next reader.
            Settle::DeadLetter { .. } => {
                unlock(self, self.now, "")?;
                Ok(Settled::DeadLettered)
            }
            Settle::Release => {
                unlock(self, self.now, ", delivery_count = max(delivery_count - 1, 0)")?;
                Ok(Settled::Released)
            }
            Settle::Defer => {
                unlock(self, self.now, ", deferred = 1")?;
                if !dead && !deferred {
                    self.count(&queue, 0, 1, 0);
                }
                Ok(Settled::Deferred)
            }
        }
    }

    /// Extends a held lock by its queue's lock duration, in one write
    /// statement (as [`Ops::settle`]).
    pub fn renew(&mut self, lock: Lock) -> Result<i64, QueueError> {
        let Held { queue, .. } = self.held(lock)?;
        let until = self.now.saturating_add(millis(self.queue_options(&queue).lock_duration));
        self.tx
            .prepare_cached("UPDATE messages SET visible_at = ?1 WHERE seq = ?2")
            .and_then(|mut s| s.execute(params![until, lock.seq]))
            .map_err(self.err())?;
        Ok(until)
    }

    /// Moves a live message (of `queue`, deferred or not) to the dead letters.
    fn dead_letter(
        &mut self,
        seq: i64,
        queue: &str,
        deferred: bool,
        reason: &str,
        description: &str,
    ) -> Result<(), QueueError> {
        self.tx
            .prepare_cached(
                "UPDATE messages SET dead = 1, deferred = 0, lock_token = NULL, visible_at = ?3,
                        dl_reason = ?1, dl_description = ?2, dl_at = ?3 WHERE seq = ?4",
            )
            .and_then(|mut s| s.execute(params![reason, description, self.now, seq]))
            .map_err(self.err())?;
        self.count(queue, -1, -i64::from(deferred), 1);
        Ok(())
    }

    /// A message whose time to live ran out: dead-lettered or dropped, as the
    /// queue says.
    fn expire(&mut self, seq: i64, queue: &str, options: QueueOptions) -> Result<(), QueueError> {
        if options.dead_letter_on_expiry {
            let why = "the message's time-to-live expired before it was consumed";
            return self.dead_letter(seq, queue, false, TTL_EXPIRED, why);
        }
        self.delete(seq, queue, false, false)
    }

    /// Removes one message of `queue` and the counts it held: a dead letter
    /// counts only as dead; a live one as live, and as deferred if it is.
    fn delete(&mut self, seq: i64, queue: &str, dead: bool, deferred: bool) -> Result<(), QueueError> {
        self.tx
            .prepare_cached("DELETE FROM messages WHERE seq = ?1")
            .and_then(|mut s| s.execute([seq]))
            .map_err(self.err())?;
        if dead {
            self.count(queue, 0, 0, -1)
        } else {
            self.count(queue, -1, -i64::from(deferred), 0)
        }
        Ok(())
    }

    /// The queue's counts, in time proportional to the messages not visible
    /// now (locked or scheduled), not to the queue's length: the pool asks
    /// every poll, on the thread every commit waits for.
    pub fn depth(&mut self, queue: &str) -> Result<Depth, QueueError> {
        let (live, deferred, dead): (i64, i64, i64) = self
            .tx
            .prepare_cached("SELECT live, deferred, dead FROM queue_counts WHERE queue = ?1")
            .and_then(|mut s| s.query_row([queue], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional())
            .map_err(self.err())?
            .unwrap_or_default();
        // This transaction's own changes, not written yet.
        let [live_change, deferred_change, dead_change] = self.counts.of(queue);
        let (live, deferred, dead) = (live + live_change, deferred + deferred_change, dead + dead_change);
        // A locked message is invisible until its lock ends; a scheduled one
        // until its time. A locked deferred message counts as locked. One
        // not visible now becomes visible after it was enqueued, which is
        // the partial index's condition; only a wall clock set back past a
        // lock's length breaks that, and then these counts (which steer
        // scaling, never delivery) are off until those messages settle.
        let (locked, locked_deferred, scheduled): (i64, i64, i64) = self
            .tx
            .prepare_cached(
                "SELECT coalesce(sum(lock_token IS NOT NULL), 0),
                        coalesce(sum(lock_token IS NOT NULL AND deferred = 1), 0),
                        coalesce(sum(lock_token IS NULL AND deferred = 0), 0)
                 FROM messages INDEXED BY messages_not_visible
                 WHERE queue = ?1 AND dead = 0 AND visible_at > ?2 AND visible_at > enqueued_at",
            )
            .and_then(|mut s| s.query_row(params![queue, self.now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))))
            .map_err(self.err())?;
        let count = |n: i64| n.max(0) as u64;
        Ok(Depth {
            active: count(live - deferred - (locked - locked_deferred) - scheduled),
            locked: count(locked),
            scheduled: count(scheduled),
            deferred: count(deferred - locked_deferred),
            dead_lettered: count(dead),
        })
    }

    fn queue_names(&mut self) -> Result<Vec<String>, QueueError> {
        let mut stmt = self.tx.prepare("SELECT DISTINCT queue FROM messages ORDER BY queue").map_err(self.err())?;
        let names = stmt.query_map([], |r| r.get(0)).map_err(|e| classify(self.path, e))?;
        names.collect::<Result<Vec<String>, _>>().map_err(|e| classify(self.path, e))
    }

    pub fn peek(
        &mut self,
        queue: &str,
        sub: SubQueue,
        from: i64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, QueueError> {
        let now = self.now;
        let mut stmt = self
            .tx
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM messages WHERE queue = ?1 AND dead = ?2 AND sequence >= ?3
                 ORDER BY sequence LIMIT ?4"
            ))
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![queue, sub == SubQueue::DeadLetter, from, limit as i64], |r| stored(r, now))
            .map_err(|e| classify(self.path, e))?;
        rows.map(|r| r.map(|(_, m)| m)).collect::<Result<Vec<_>, _>>().map_err(|e| classify(self.path, e))
    }

    pub fn requeue(&mut self, queue: &str, ids: &[String]) -> Result<usize, QueueError> {
        // Back as a fresh message: not deferred either.
        const SQL: &str = "UPDATE messages SET dead = 0, deferred = 0, delivery_count = 0, lock_token = NULL,
                             visible_at = ?2, expires_at = NULL, dl_reason = NULL, dl_description = NULL, dl_at = NULL
                           WHERE queue = ?1 AND dead = 1";
        let now = self.now;
        let moved = if ids.is_empty() {
            self.tx.execute(SQL, params![queue, now]).map_err(self.err())?
        } else {
            let mut stmt = self.tx.prepare(&format!("{SQL} AND id = ?3")).map_err(self.err())?;
            let mut moved = 0;
            for id in ids {
                moved += stmt.execute(params![queue, now, id]).map_err(|e| classify(self.path, e))?;
            }
            moved
        };
        let n = i64::try_from(moved).unwrap_or(i64::MAX);
        self.count(queue, n, 0, -n);
        Ok(moved)
    }

    pub fn purge(&mut self, queue: &str, target: PurgeTarget) -> Result<usize, QueueError> {
        // It sets counts outright: what moved before must be in the table.
        self.write_counts()?;
        let (sql, counts) = match target {
            PurgeTarget::Active => {
                ("DELETE FROM messages WHERE queue = ?1 AND dead = 0", "UPDATE queue_counts SET live = 0, deferred = 0")
            }
            PurgeTarget::DeadLetters => {
                ("DELETE FROM messages WHERE queue = ?1 AND dead = 1", "UPDATE queue_counts SET dead = 0")
            }
            PurgeTarget::All => ("DELETE FROM messages WHERE queue = ?1", "DELETE FROM queue_counts"),
        };
        let removed = self.tx.execute(sql, [queue]).map_err(self.err())?;
        self.tx.execute(&format!("{counts} WHERE queue = ?1"), [queue]).map_err(self.err())?;
        Ok(removed)
    }

    /// Writes back a message read with `queue, COLUMNS` (salvage): unlocked,
    /// everything else as it was.
    fn restore(&mut self, queue: &str, v: &[rusqlite::types::Value]) -> Result<(), QueueError> {
        // COLUMNS: seq id body content_type metadata enqueued_at expires_at delivery_count visible_at
        //          lock_token dead dl_reason dl_description sequence deferred amqp
        self.tx
            .execute(
                "INSERT INTO messages (queue, id, body, content_type, metadata, enqueued_at, expires_at, delivery_count,
                                       visible_at, dead, dl_reason, dl_description, sequence, deferred, amqp)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                params![queue, v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[10], v[11], v[12], v[13], v[14], v[15]],
            )
            .map_err(self.err())?;
        Ok(())
    }

    /// Sets each queue's last sequence number and counts from what it holds.
    fn renumber(&mut self) -> Result<(), QueueError> {
        // It counts everything afresh: nothing moved before may be added on top.
        self.counts = Counts::default();
        self.tx
            .execute_batch(
                "INSERT OR REPLACE INTO queue_sequences (queue, last) SELECT queue, max(sequence) FROM messages GROUP BY queue",
            )
            .map_err(self.err())?;
        self.tx.execute_batch(COUNTS).map_err(self.err())
    }

    /// Deletes scheduled messages by sequence number while they still wait
    /// for their time (never delivered, not locked).
    pub fn cancel_scheduled(&mut self, queue: &str, sequences: &[i64]) -> Result<usize, QueueError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "DELETE FROM messages WHERE queue = ?1 AND sequence = ?2 AND dead = 0 AND deferred = 0
                 AND lock_token IS NULL AND delivery_count = 0 AND visible_at > ?3",
            )
            .map_err(self.err())?;
        let mut removed = 0;
        for sequence in sequences {
            removed += stmt.execute(params![queue, sequence, self.now]).map_err(|e| classify(self.path, e))?;
        }
        drop(stmt);
        self.count(queue, -i64::try_from(removed).unwrap_or(i64::MAX), 0, 0);
        Ok(removed)
    }

    /// Locks deferred messages by sequence number; unknown, not deferred or
    /// already locked ones are skipped.
    pub fn receive_deferred(
        &mut self,
        queue: &str,
        sub: SubQueue,
        sequences: &[i64],
    ) -> Result<Vec<Received>, QueueError> {
        let options = self.queue_options(queue);
        let now = self.now;
        let mut got = Vec::new();
        for sequence in sequences {
            let found = self
                .tx
                .prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM messages
                     WHERE queue = ?1 AND dead = ?2 AND sequence = ?3 AND deferred = 1 AND visible_at <= ?4"
                ))
                .and_then(|mut s| {
                    s.query_row(params![queue, sub == SubQueue::DeadLetter, sequence, now], |r| stored(r, now))
                        .optional()
                })
                .map_err(self.err())?;
            if let Some((seq, message)) = found {
                got.push(self.lock(seq, queue, message, options, ReceiveMode::PeekLock)?);
            }
        }
        Ok(got)
    }
}

/// A message row read with [`COLUMNS`], as `(row id, message)`.
fn stored(r: &Row<'_>, now: i64) -> rusqlite::Result<(i64, StoredMessage)> {
    let visible_at: i64 = r.get(8)?;
    let locked: Option<i64> = r.get(9)?;
    let dead: bool = r.get(10)?;
    let deferred: bool = r.get(14)?;
    let state = match (dead, deferred, visible_at <= now, locked.is_some()) {
        (true, ..) => MessageState::DeadLettered,
        (false, _, false, true) => MessageState::Locked,
        (false, true, ..) => MessageState::Deferred,
        (false, false, true, _) => MessageState::Active,
        (false, false, false, false) => MessageState::Scheduled,
    };
    let message = StoredMessage {
        id: r.get(1)?,
        body: r.get(2)?,
        content_type: r.get(3)?,
        metadata: parse_metadata(&r.get::<_, String>(4)?),
        enqueued_at_ms: r.get(5)?,
        expires_at_ms: r.get(6)?,
        delivery_count: u32::try_from(r.get::<_, i64>(7)?).unwrap_or(u32::MAX),
        state,
        dead_letter_reason: r.get(11)?,
        dead_letter_description: r.get(12)?,
        sequence: r.get(13)?,
        amqp: r.get(15)?,
    };
    Ok((r.get(0)?, message))
}

fn parse_metadata(json: &str) -> Vec<(String, String)> {
    serde_json::from_str(json).unwrap_or_default()
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn new_token() -> i64 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    let mut token = [0u8; 8];
    token.copy_from_slice(&bytes[..8]);
    i64::from_le_bytes(token)
}

/// Turns SQLite's codes into errors that say what to do.
fn classify(path: &str, error: rusqlite::Error) -> QueueError {
    let path = path.to_string();
    match error.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
            QueueError::Corrupt { path, detail: error.to_string() }
        }
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => QueueError::Busy { path },
        Some(ErrorCode::DiskFull) => QueueError::DiskFull(format!("{path}: {error}")),
        Some(ErrorCode::CannotOpen) | Some(ErrorCode::PermissionDenied) | Some(ErrorCode::ReadOnly) => {
            QueueError::Open { path, detail: error.to_string() }
        }
        _ => QueueError::Sqlite(format!("{path}: {error}")),
    }
}

/// The next receivable messages of a queue (or its dead letters), in queue
/// order, skipping the few locked at its head: the visibility index would
/// sort every visible message first.
fn visible_query() -> String {
    format!(
        "SELECT {COLUMNS} FROM messages INDEXED BY messages_by_queue
         WHERE queue = ?1 AND dead = ?2 AND deferred = 0 AND visible_at <= ?3 ORDER BY seq LIMIT ?4"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receive_is_planned_once_whatever_it_asks_for() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Database::open(&dir.path().join("q.db"), StoreOptions::default()).unwrap();
        db.send("q", (0..10).map(|_| NewMessage::default()).collect()).unwrap();
        for max in [1, 2, 3, 1] {
            assert_eq!(db.receive("q", max).unwrap().len(), max);
        }
        let stmt = db.conn.prepare_cached(&visible_query()).unwrap();
        assert_eq!(stmt.get_status(rusqlite::StatementStatus::RePrepare), 0, "receives were prepared again");
    }
}
