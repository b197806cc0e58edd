//! The embedded queue: a durable SQLite stand-in for an Azure Service Bus
//! queue in peek-lock mode.
//!
//! | Service Bus | here |
//! |---|---|
//! | send (single, batch), MessageId, ContentType, application properties, TTL, ScheduledEnqueueTimeUtc | [`NewMessage`] |
//! | receive in PeekLock for the lock duration | [`Database::receive`]; an expired lock makes the message visible again |
//! | complete, abandon (DeliveryCount + 1), dead-letter with reason | [`Database::settle`] |
//! | MaxDeliveryCount (default 10) → DLQ `MaxDeliveryCountExceeded` | checked on abandon and on receive |
//! | TTL expiry → DLQ `TTLExpiredException` | checked on receive |
//! | active / locked / scheduled / dead-letter counts | [`Depth`] |
//!
//! [`Database`] is the synchronous store (the `queue` CLI uses it directly);
//! [`QueueHandle`] puts it on its own thread and commits concurrent
//! operations in groups, so throughput comes from batching while every
//! caller still waits for its own durable commit.

mod db;
mod handle;

use std::time::Duration;

pub use db::Database;
pub use handle::QueueHandle;

/// Service Bus's defaults, which the embedded queue copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// Deliveries before a message is dead-lettered (Service Bus: 10).
    pub max_delivery_count: u32,
    /// How long a received message stays locked (Service Bus: 60 s).
    pub lock_duration: Duration,
    /// TTL of messages sent without one; `None` is forever.
    pub default_ttl: Option<Duration>,
    /// Largest the database file may grow, in bytes; `None` is up to the
    /// disk. Past it, sends fail with [`QueueError::DiskFull`] and nothing is
    /// lost: a producer gets a clear error instead of a full disk.
    pub max_bytes: Option<u64>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            max_delivery_count: 10,
            lock_duration: Duration::from_secs(60),
            default_ttl: None,
            max_bytes: None,
        }
    }
}

/// A message to enqueue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewMessage {
    /// Assigned (UUID) when `None`.
    pub id: Option<String>,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub metadata: Vec<(String, String)>,
    pub ttl: Option<Duration>,
    /// Not visible before this many milliseconds since the Unix epoch.
    pub scheduled_at_ms: Option<i64>,
}

/// A message received under a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub lock: Lock,
    pub id: String,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub metadata: Vec<(String, String)>,
    /// Including this delivery.
    pub delivery_count: u32,
    pub enqueued_at_ms: i64,
}

/// Proof of holding a message's lock: needed to settle it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lock {
    pub(crate) seq: i64,
    pub(crate) token: i64,
}

/// How to settle a locked message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Delete it: done.
    Complete,
    /// Release the lock; visible again after `delay` (Service Bus: at once).
    /// Dead-lettered instead when the max delivery count is reached, with
    /// `reason` (the last failure) in the description.
    Abandon { delay: Duration, reason: String },
    /// Move it to the dead-letter queue.
    DeadLetter { reason: String, description: String },
}

/// What became of a settle request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Completed,
    Abandoned,
    /// Dead-lettered, on request or because deliveries ran out.
    DeadLettered,
}

/// Message counts of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Depth {
    /// Visible now: what a receive would get (Service Bus ActiveMessageCount
    /// also counts locked ones; see [`Depth::service_bus_active`]).
    pub active: u64,
    pub locked: u64,
    pub scheduled: u64,
    pub dead_lettered: u64,
}

impl Depth {
    /// What Service Bus (and so KEDA) reports as the active count: visible
    /// plus locked.
    pub fn service_bus_active(&self) -> u64 {
        self.active + self.locked
    }

    /// Messages not yet settled for good.
    pub fn pending(&self) -> u64 {
        self.active + self.locked + self.scheduled
    }
}

/// A stored message, as `peek` and `dead-letters` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Peeked {
    pub id: String,
    pub sequence: i64,
    pub state: &'static str,
    pub delivery_count: u32,
    pub enqueued_at_ms: i64,
    pub body_preview: String,
    pub body_bytes: usize,
    pub content_type: Option<String>,
    pub metadata: Vec<(String, String)>,
    pub dead_letter_reason: Option<String>,
    pub dead_letter_description: Option<String>,
}

/// Which messages `purge` removes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PurgeTarget {
    Active,
    DeadLetters,
    All,
}

/// Why a queue operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("cannot open queue database {path}: {detail}")]
    Open { path: String, detail: String },
    #[error("queue database {path} is not a wasm-pc queue or is corrupt: {detail}")]
    Corrupt { path: String, detail: String },
    #[error("queue database {path} is locked by another process (is another host running on it?)")]
    Busy { path: String },
    #[error("queue database {path} has schema version {found}; this host supports up to {supported}: upgrade the host")]
    NewerSchema { path: String, found: i64, supported: i64 },
    #[error("the lock on message {id} was lost (expired or already settled)")]
    LockLost { id: String },
    #[error("the disk is full: {0}")]
    DiskFull(String),
    #[error("queue database error: {0}")]
    Sqlite(String),
    #[error("the queue is shut down")]
    Closed,
}

/// Milliseconds since the Unix epoch: locks and schedules survive restarts,
/// so they are wall-clock times.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
