//! The synchronous SQLite store behind the embedded queue.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, params};

use super::{
    Depth, Lock, NewMessage, Peeked, PurgeTarget, QueueError, QueueOptions, Received, Settle, Settled, now_ms,
};

/// The schema this host writes. Bump it with a migration in [`Database::open`].
const SCHEMA_VERSION: i64 = 1;

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
    dl_at          INTEGER
);
-- Receives walk a queue in sequence order, skipping the few not yet visible.
CREATE INDEX IF NOT EXISTS messages_by_queue ON messages (queue, dead, seq);
";

/// Service Bus's dead-letter reasons.
const TTL_EXPIRED: &str = "TTLExpiredException";
const MAX_DELIVERIES: &str = "MaxDeliveryCountExceeded";

/// A queue database: several named queues in one file.
pub struct Database {
    conn: Connection,
    path: String,
    options: QueueOptions,
}

impl Database {
    /// Opens or creates the database at `path`, in WAL mode.
    ///
    /// `synchronous=NORMAL` in WAL mode survives a crash or `kill -9` of the
    /// host (committed transactions are in the WAL file); only an OS crash or
    /// power loss may lose the last commits. `full_sync` closes that gap at
    /// some throughput cost.
    pub fn open(path: &Path, options: QueueOptions, full_sync: bool) -> Result<Database, QueueError> {
        let shown = path.display().to_string();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| QueueError::Open {
                path: shown.clone(),
                detail: format!("creating {}: {e}", parent.display()),
            })?;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(|e| classify(&shown, e))?;
        let mut db = Database { conn, path: shown, options };
        db.init(full_sync)?;
        Ok(db)
    }

    fn init(&mut self, full_sync: bool) -> Result<(), QueueError> {
        let path = self.path.clone();
        let err = |e| classify(&path, e);
        self.conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        let mode: String = self.conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(QueueError::Open { path, detail: format!("cannot switch to WAL mode (got {mode})") });
        }
        let sync = if full_sync { "FULL" } else { "NORMAL" };
        self.conn.pragma_update(None, "synchronous", sync).map_err(err)?;
        if let Some(max) = self.options.max_bytes {
            let page: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0)).map_err(err)?;
            let pages = i64::try_from(max).unwrap_or(i64::MAX) / page.max(512);
            self.conn.pragma_update(None, "max_page_count", pages.max(16)).map_err(err)?;
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
                    "SELECT count(*) FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' AND name NOT IN ('wasm_pc_meta','messages')",
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
        match found {
            Some(v) if v > SCHEMA_VERSION => {
                return Err(QueueError::NewerSchema { path, found: v, supported: SCHEMA_VERSION });
            }
            Some(_) => return Ok(()),
            None if has_meta => {
                return Err(QueueError::Corrupt { path, detail: "no schema version recorded".into() });
            }
            None => {}
        }
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(err)?;
        tx.execute_batch(SCHEMA).map_err(err)?;
        tx.execute("INSERT OR IGNORE INTO wasm_pc_meta (key, value) VALUES ('schema_version', ?1)", [SCHEMA_VERSION])
            .map_err(err)?;
        tx.commit().map_err(err)?;
        Ok(())
    }

    /// The path it was opened with, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn options(&self) -> QueueOptions {
        self.options
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
        let mut ops = Ops { tx, path: &path, options: self.options, now: now_ms() };
        let result = f(&mut ops)?;
        ops.tx.commit().map_err(|e| classify(&path, e))?;
        Ok(result)
    }

    pub fn send(&mut self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<String>, QueueError> {
        self.write(|ops| ops.send(queue, messages))
    }

    pub fn receive(&mut self, queue: &str, max: usize) -> Result<Vec<Received>, QueueError> {
        self.write(|ops| ops.receive(queue, max))
    }

    pub fn settle(&mut self, lock: Lock, how: Settle) -> Result<Settled, QueueError> {
        self.write(|ops| ops.settle(lock, &how))
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

    /// Looks at messages without locking them: live ones, or dead letters.
    pub fn peek(&mut self, queue: &str, dead: bool, limit: usize) -> Result<Vec<Peeked>, QueueError> {
        self.read(|ops| ops.peek(queue, dead, limit))
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
}

/// Queue operations inside one transaction.
pub struct Ops<'a> {
    tx: Transaction<'a>,
    path: &'a str,
    options: QueueOptions,
    /// One clock reading per transaction, so its operations agree.
    now: i64,
}

impl Ops<'_> {
    fn err(&self) -> impl Fn(rusqlite::Error) -> QueueError + '_ {
        move |e| classify(self.path, e)
    }

    /// Enqueues messages; returns their ids.
    pub fn send(&mut self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<String>, QueueError> {
        let mut ids = Vec::with_capacity(messages.len());
        let mut insert = self
            .tx
            .prepare_cached(
                "INSERT INTO messages (queue, id, body, content_type, metadata, enqueued_at, visible_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )
            .map_err(|e| classify(self.path, e))?;
        for m in messages {
            let id = m.id.filter(|id| !id.is_empty()).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let metadata = serde_json::to_string(&m.metadata).unwrap_or_else(|_| "[]".into());
            let ttl = m.ttl.or(self.options.default_ttl);
            let expires = ttl.map(|t| self.now.saturating_add(millis(t)));
            let visible = m.scheduled_at_ms.unwrap_or(self.now).max(self.now);
            insert
                .execute(params![queue, id, m.body, m.content_type, metadata, self.now, visible, expires])
                .map_err(|e| classify(self.path, e))?;
            ids.push(id);
        }
        Ok(ids)
    }

    /// Locks up to `max` visible messages for the lock duration. Expired
    /// messages and those out of deliveries are dead-lettered on the way.
    pub fn receive(&mut self, queue: &str, max: usize) -> Result<Vec<Received>, QueueError> {
        let mut got = Vec::new();
        let lock_until = self.now.saturating_add(millis(self.options.lock_duration));
        loop {
            let want = max.saturating_sub(got.len());
            if want == 0 {
                break;
            }
            let candidates = self.visible(queue, want)?;
            if candidates.is_empty() {
                break;
            }
            let mut swept = false;
            for c in candidates {
                if c.expires_at.is_some_and(|t| t <= self.now) {
                    self.dead_letter(c.seq, TTL_EXPIRED, "the message's time-to-live expired before it was consumed")?;
                    swept = true;
                } else if c.delivery_count >= i64::from(self.options.max_delivery_count) {
                    self.dead_letter(c.seq, MAX_DELIVERIES, "the lock expired after the last allowed delivery")?;
                    swept = true;
                } else {
                    let token = new_token();
                    self.tx
                        .prepare_cached(
                            "UPDATE messages SET lock_token = ?1, visible_at = ?2, delivery_count = delivery_count + 1 WHERE seq = ?3",
                        )
                        .and_then(|mut s| s.execute(params![token, lock_until, c.seq]))
                        .map_err(self.err())?;
                    got.push(Received {
                        lock: Lock { seq: c.seq, token },
                        id: c.id,
                        body: c.body,
                        content_type: c.content_type,
                        metadata: c.metadata,
                        delivery_count: u32::try_from(c.delivery_count + 1).unwrap_or(u32::MAX),
                        enqueued_at_ms: c.enqueued_at,
                    });
                }
            }
            if !swept {
                break;
            }
        }
        Ok(got)
    }

    fn visible(&mut self, queue: &str, limit: usize) -> Result<Vec<Candidate>, QueueError> {
        let mut stmt = self
            .tx
            .prepare_cached(
                "SELECT seq, id, body, content_type, metadata, enqueued_at, expires_at, delivery_count
                 FROM messages WHERE queue = ?1 AND dead = 0 AND visible_at <= ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(|e| classify(self.path, e))?;
        let rows = stmt
            .query_map(params![queue, self.now, limit as i64], |r| {
                Ok(Candidate {
                    seq: r.get(0)?,
                    id: r.get(1)?,
                    body: r.get(2)?,
                    content_type: r.get(3)?,
                    metadata: parse_metadata(&r.get::<_, String>(4)?),
                    enqueued_at: r.get(5)?,
                    expires_at: r.get(6)?,
                    delivery_count: r.get(7)?,
                })
            })
            .map_err(|e| classify(self.path, e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| classify(self.path, e))
    }

    /// Settles a message whose lock is still held.
    pub fn settle(&mut self, lock: Lock, how: &Settle) -> Result<Settled, QueueError> {
        let held: Option<(String, i64)> = self
            .tx
            .prepare_cached(
                "SELECT id, delivery_count FROM messages
                 WHERE seq = ?1 AND lock_token = ?2 AND visible_at > ?3 AND dead = 0",
            )
            .and_then(|mut s| {
                s.query_row(params![lock.seq, lock.token, self.now], |r| Ok((r.get(0)?, r.get(1)?))).optional()
            })
            .map_err(self.err())?;
        let Some((_id, deliveries)) = held else {
            let id = self
                .tx
                .query_row("SELECT id FROM messages WHERE seq = ?1", [lock.seq], |r| r.get(0))
                .optional()
                .map_err(self.err())?
                .unwrap_or_else(|| format!("#{}", lock.seq));
            return Err(QueueError::LockLost { id });
        };
        match how {
            Settle::Complete => {
                self.tx
                    .prepare_cached("DELETE FROM messages WHERE seq = ?1")
                    .and_then(|mut s| s.execute([lock.seq]))
                    .map_err(self.err())?;
                Ok(Settled::Completed)
            }
            Settle::Abandon { delay, reason } => {
                if deliveries >= i64::from(self.options.max_delivery_count) {
                    let why = format!("abandoned after {deliveries} deliveries; last failure: {reason}");
                    self.dead_letter(lock.seq, MAX_DELIVERIES, &why)?;
                    return Ok(Settled::DeadLettered);
                }
                let visible = self.now.saturating_add(millis(*delay));
                self.tx
                    .prepare_cached("UPDATE messages SET lock_token = NULL, visible_at = ?1 WHERE seq = ?2")
                    .and_then(|mut s| s.execute(params![visible, lock.seq]))
                    .map_err(self.err())?;
                Ok(Settled::Abandoned)
            }
            Settle::DeadLetter { reason, description } => {
                self.dead_letter(lock.seq, reason, description)?;
                Ok(Settled::DeadLettered)
            }
        }
    }

    fn dead_letter(&mut self, seq: i64, reason: &str, description: &str) -> Result<(), QueueError> {
        self.tx
            .prepare_cached(
                "UPDATE messages SET dead = 1, lock_token = NULL, dl_reason = ?1, dl_description = ?2, dl_at = ?3 WHERE seq = ?4",
            )
            .and_then(|mut s| s.execute(params![reason, description, self.now, seq]))
            .map_err(self.err())?;
        Ok(())
    }

    pub fn depth(&mut self, queue: &str) -> Result<Depth, QueueError> {
        let now = self.now;
        self.tx
            .prepare_cached(
                "SELECT
                   coalesce(sum(dead = 0 AND visible_at <= ?2), 0),
                   coalesce(sum(dead = 0 AND visible_at > ?2 AND lock_token IS NOT NULL), 0),
                   coalesce(sum(dead = 0 AND visible_at > ?2 AND lock_token IS NULL), 0),
                   coalesce(sum(dead = 1), 0)
                 FROM messages WHERE queue = ?1",
            )
            .and_then(|mut s| {
                s.query_row(params![queue, now], |r| {
                    Ok(Depth {
                        active: r.get::<_, i64>(0)?.max(0) as u64,
                        locked: r.get::<_, i64>(1)?.max(0) as u64,
                        scheduled: r.get::<_, i64>(2)?.max(0) as u64,
                        dead_lettered: r.get::<_, i64>(3)?.max(0) as u64,
                    })
                })
            })
            .map_err(self.err())
    }

    fn queue_names(&mut self) -> Result<Vec<String>, QueueError> {
        let mut stmt = self.tx.prepare("SELECT DISTINCT queue FROM messages ORDER BY queue").map_err(self.err())?;
        let names = stmt.query_map([], |r| r.get(0)).map_err(|e| classify(self.path, e))?;
        names.collect::<Result<Vec<String>, _>>().map_err(|e| classify(self.path, e))
    }

    pub fn peek(&mut self, queue: &str, dead: bool, limit: usize) -> Result<Vec<Peeked>, QueueError> {
        let now = self.now;
        let mut stmt = self
            .tx
            .prepare(
                "SELECT seq, id, body, content_type, metadata, enqueued_at, delivery_count, visible_at, lock_token,
                        dl_reason, dl_description
                 FROM messages WHERE queue = ?1 AND dead = ?2 ORDER BY seq LIMIT ?3",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map(params![queue, dead, limit as i64], |r| {
                let body: Vec<u8> = r.get(2)?;
                let visible_at: i64 = r.get(7)?;
                let locked: Option<i64> = r.get(8)?;
                let state = match (dead, visible_at <= now, locked.is_some()) {
                    (true, _, _) => "dead-lettered",
                    (false, true, _) => "active",
                    (false, false, true) => "locked",
                    (false, false, false) => "scheduled",
                };
                Ok(Peeked {
                    sequence: r.get(0)?,
                    id: r.get(1)?,
                    body_preview: preview(&body),
                    body_bytes: body.len(),
                    content_type: r.get(3)?,
                    metadata: parse_metadata(&r.get::<_, String>(4)?),
                    enqueued_at_ms: r.get(5)?,
                    delivery_count: u32::try_from(r.get::<_, i64>(6)?).unwrap_or(u32::MAX),
                    state,
                    dead_letter_reason: r.get(9)?,
                    dead_letter_description: r.get(10)?,
                })
            })
            .map_err(|e| classify(self.path, e))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(|e| classify(self.path, e))
    }

    pub fn requeue(&mut self, queue: &str, ids: &[String]) -> Result<usize, QueueError> {
        const SQL: &str = "UPDATE messages SET dead = 0, delivery_count = 0, lock_token = NULL, visible_at = ?2,
                             expires_at = NULL, dl_reason = NULL, dl_description = NULL, dl_at = NULL
                           WHERE queue = ?1 AND dead = 1";
        let now = self.now;
        if ids.is_empty() {
            return self.tx.execute(SQL, params![queue, now]).map_err(self.err());
        }
        let mut stmt = self.tx.prepare(&format!("{SQL} AND id = ?3")).map_err(self.err())?;
        let mut moved = 0;
        for id in ids {
            moved += stmt.execute(params![queue, now, id]).map_err(|e| classify(self.path, e))?;
        }
        Ok(moved)
    }

    pub fn purge(&mut self, queue: &str, target: PurgeTarget) -> Result<usize, QueueError> {
        let sql = match target {
            PurgeTarget::Active => "DELETE FROM messages WHERE queue = ?1 AND dead = 0",
            PurgeTarget::DeadLetters => "DELETE FROM messages WHERE queue = ?1 AND dead = 1",
            PurgeTarget::All => "DELETE FROM messages WHERE queue = ?1",
        };
        self.tx.execute(sql, [queue]).map_err(self.err())
    }
}

struct Candidate {
    seq: i64,
    id: String,
    body: Vec<u8>,
    content_type: Option<String>,
    metadata: Vec<(String, String)>,
    enqueued_at: i64,
    expires_at: Option<i64>,
    delivery_count: i64,
}

fn parse_metadata(json: &str) -> Vec<(String, String)> {
    serde_json::from_str(json).unwrap_or_default()
}

fn preview(body: &[u8]) -> String {
    let shown = &body[..body.len().min(120)];
    match std::str::from_utf8(shown) {
        Ok(text) => text.to_string(),
        Err(_) => format!("<{} bytes of binary>", body.len()),
    }
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
