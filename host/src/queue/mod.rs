//! The embedded queue: a durable SQLite stand-in for an Azure Service Bus
//! queue in peek-lock mode.
//!
//! | Service Bus | here |
//! |---|---|
//! | send (single, batch), MessageId, ContentType, application properties, TTL, ScheduledEnqueueTimeUtc | [`NewMessage`] |
//! | SequenceNumber: per queue, from 1, never reused | [`StoredMessage::sequence`] |
//! | receive in PeekLock for the lock duration, or ReceiveAndDelete | [`Database::receive`]; an expired lock makes the message visible again |
//! | lock token (16 bytes), LockedUntilUtc, renew lock | [`Lock::token`], [`Received::locked_until_ms`], [`Database::renew`] |
//! | complete, abandon (DeliveryCount + 1), dead-letter with reason, defer, release | [`Database::settle`] |
//! | MaxDeliveryCount (default 10) → DLQ `MaxDeliveryCountExceeded` | checked on abandon and on receive |
//! | TTL expiry → DLQ `TTLExpiredException` (or dropped) | checked on receive, per [`QueueOptions::dead_letter_on_expiry`] |
//! | `<queue>/$DeadLetterQueue` | [`SubQueue::DeadLetter`] |
//! | peek, schedule / cancel, receive deferred by sequence number | [`Database::peek`], [`Database::cancel_scheduled`], [`Database::receive_deferred`] |
//! | active / locked / scheduled / deferred / dead-letter counts | [`Depth`] |
//!
//! [`Database`] is the synchronous store (the `queue` CLI uses it directly);
//! [`QueueHandle`] puts it on its own thread and commits concurrent
//! operations in groups, so throughput comes from batching while every
//! caller still waits for its own durable commit.

mod db;
mod handle;

use std::collections::BTreeMap;
use std::time::Duration;

pub use db::Database;
pub use handle::{Commits, QueueHandle};

/// One queue's entity properties, with Service Bus's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueOptions {
    /// Deliveries before a message is dead-lettered (Service Bus: 10).
    pub max_delivery_count: u32,
    /// How long a received message stays locked (Service Bus: 60 s).
    pub lock_duration: Duration,
    /// TTL of messages sent without one; `None` is forever.
    pub default_ttl: Option<Duration>,
    /// Expired messages go to the dead-letter queue (`true`) or are dropped
    /// (`false`, Service Bus's default for DeadLetteringOnMessageExpiration).
    pub dead_letter_on_expiry: bool,
}

impl Default for QueueOptions {
    fn default() -> Self {
        QueueOptions {
            max_delivery_count: 10,
            lock_duration: Duration::from_secs(60),
            default_ttl: None,
            dead_letter_on_expiry: false,
        }
    }
}

/// How the database is opened, and the properties of its queues.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreOptions {
    /// Properties of queues not named in `queues`.
    pub defaults: QueueOptions,
    /// Queues declared with their own properties.
    pub queues: BTreeMap<String, QueueOptions>,
    /// Largest the database file may grow through sends, in bytes; `None`
    /// is up to the disk. Past it, sends fail with [`QueueError::DiskFull`]
    /// and nothing is lost: a producer gets a clear error instead of a full
    /// disk. Receives and settles may use a sixteenth more (they move index
    /// entries), so consumers can always drain a full queue.
    pub max_bytes: Option<u64>,
    /// fsync every commit (survives power loss, not only a crash).
    pub full_sync: bool,
}

impl StoreOptions {
    /// Every queue with `defaults`.
    pub fn with_defaults(defaults: QueueOptions) -> Self {
        StoreOptions { defaults, ..StoreOptions::default() }
    }

    /// The properties of `queue`.
    pub fn queue(&self, queue: &str) -> QueueOptions {
        self.queues.get(queue).copied().unwrap_or(self.defaults)
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
    /// The message as an AMQP client encoded it, kept so that AMQP receivers
    /// get back every section and type it sent (`None` for guests' sends).
    pub amqp: Option<Vec<u8>>,
}

/// What a send stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub id: String,
    /// The queue's sequence number for it.
    pub sequence: i64,
}

/// The queue, or its dead-letter sub-queue (`<queue>/$DeadLetterQueue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SubQueue {
    Active,
    DeadLetter,
}

/// How a receive takes messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveMode {
    /// Locked for the lock duration; settled later.
    PeekLock,
    /// Deleted as it is handed out (at most once).
    ReceiveAndDelete,
}

/// Where a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MessageState {
    Active,
    Locked,
    /// Not visible yet: scheduled, or waiting out a retry backoff.
    Scheduled,
    /// Set aside by its receiver; only a receive by sequence number gets it.
    Deferred,
    DeadLettered,
}

/// A message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: String,
    /// Per queue, from 1.
    pub sequence: i64,
    pub body: Vec<u8>,
    pub content_type: Option<String>,
    pub metadata: Vec<(String, String)>,
    /// Deliveries so far (a received message counts the current one).
    pub delivery_count: u32,
    pub enqueued_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub state: MessageState,
    pub dead_letter_reason: Option<String>,
    pub dead_letter_description: Option<String>,
    /// See [`NewMessage::amqp`].
    pub amqp: Option<Vec<u8>>,
}

/// A message received under a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub lock: Lock,
    pub locked_until_ms: i64,
    pub message: StoredMessage,
}

/// Proof of holding a message's lock: needed to settle it. On the wire it
/// is a 16-byte lock token ([`Lock::token`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lock {
    pub(crate) seq: i64,
    pub(crate) token: i64,
}

impl Lock {
    /// The lock token: the row (8 bytes) and the lock's random part (8
    /// bytes), so a token finds its message without an index.
    pub fn token(&self) -> [u8; 16] {
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&self.seq.to_be_bytes());
        bytes[8..].copy_from_slice(&self.token.to_le_bytes());
        bytes
    }

    /// The lock a token stands for (it may since have been lost).
    pub fn from_token(bytes: [u8; 16]) -> Lock {
        let mut seq = [0u8; 8];
        let mut token = [0u8; 8];
        seq.copy_from_slice(&bytes[..8]);
        token.copy_from_slice(&bytes[8..]);
        Lock { seq: i64::from_be_bytes(seq), token: i64::from_le_bytes(token) }
    }
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
    /// Give it back untouched: this delivery does not count.
    Release,
    /// Set it aside; only a receive by sequence number gets it again.
    Defer,
}

/// What became of a settle request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Completed,
    Abandoned,
    /// Dead-lettered, on request or because deliveries ran out.
    DeadLettered,
    Released,
    Deferred,
}

/// Message counts of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Depth {
    /// Visible now: what a receive would get (Service Bus's
    /// ActiveMessageCount, which KEDA reads, also counts locked ones).
    pub active: u64,
    pub locked: u64,
    pub scheduled: u64,
    pub deferred: u64,
    pub dead_lettered: u64,
}

impl Depth {
    /// Messages not yet settled for good (deferred ones wait for their
    /// receiver, not for the queue).
    pub fn pending(&self) -> u64 {
        self.active + self.locked + self.scheduled
    }
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
    #[error("message #{row} is no longer in the queue (purged while it was being delivered)")]
    Gone { row: i64 },
    #[error("the disk is full: {0}")]
    DiskFull(String),
    #[error("queue database error: {0}")]
    Sqlite(String),
    #[error("the queue is shut down")]
    Closed,
}

impl QueueError {
    /// Whether the same command may succeed if tried again shortly: the
    /// database is busy or full, not the command wrong.
    pub fn is_transient(&self) -> bool {
        matches!(self, QueueError::Busy { .. } | QueueError::DiskFull(_) | QueueError::Sqlite(_))
    }
}

/// Milliseconds since the Unix epoch: locks and schedules survive restarts,
/// so they are wall-clock times.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
