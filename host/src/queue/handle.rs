//! The queue on its own thread, with group commit.
//!
//! Callers on many tasks send commands; the queue thread takes every command
//! waiting, runs them all in one SQLite transaction, commits once, and only
//! then answers each caller. A send is therefore acknowledged only when it is
//! durable, yet a thousand concurrent sends cost one commit.
//!
//! Each command is one all-or-nothing step (a savepoint, or for a settle or
//! a renewal its one write statement): one that fails midway leaves nothing
//! behind and its caller gets the error, while the rest of the group
//! commits. If SQLite itself aborts the transaction (a full disk), the
//! group's sends fail with that error and the rest of the group runs again
//! without them.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{Notify, mpsc, oneshot};

use super::db::{Database, Ops};
use super::{
    Depth, Lock, NewMessage, QueueError, ReceiveMode, Received, Sent, Settle, Settled, StoreOptions, StoredMessage,
    SubQueue,
};

/// Most commands folded into one transaction.
const MAX_GROUP: usize = 2048;

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

/// One operation, its arguments, and where its answer goes.
enum Command {
    Send { queue: String, messages: Vec<NewMessage>, reply: Reply<Vec<Sent>> },
    Receive { queue: String, sub: SubQueue, max: usize, mode: ReceiveMode, reply: Reply<Vec<Received>> },
    Settle { lock: Lock, how: Settle, reply: Reply<Settled> },
    Renew { lock: Lock, reply: Reply<i64> },
    Depth { queue: String, reply: Reply<Depth> },
    Peek { queue: String, sub: SubQueue, from: i64, max: usize, reply: Reply<Vec<StoredMessage>> },
    CancelScheduled { queue: String, sequences: Vec<i64>, reply: Reply<usize> },
    ReceiveDeferred { queue: String, sub: SubQueue, sequences: Vec<i64>, reply: Reply<Vec<Received>> },
}

/// What a command produced inside the transaction, delivered after commit.
enum Outcome {
    Sent(Result<Vec<Sent>, QueueError>),
    Received(Result<Vec<Received>, QueueError>),
    Settled(Result<Settled, QueueError>),
    Renewed(Result<i64, QueueError>),
    Depth(Result<Depth, QueueError>),
    Peeked(Result<Vec<StoredMessage>, QueueError>),
    Count(Result<usize, QueueError>),
}

impl Command {
    fn run(&mut self, ops: &mut Ops<'_>) -> Outcome {
        match self {
            Command::Send { queue, messages, .. } => {
                let messages = std::mem::take(messages);
                Outcome::Sent(ops.step(|ops| ops.send(queue, messages)))
            }
            Command::Receive { queue, sub, max, mode, .. } => {
                Outcome::Received(ops.step(|ops| ops.receive(queue, *sub, *max, *mode)))
            }
            // One write statement each, which SQLite undoes by itself when it
            // fails: no savepoint, the cost of a step on every message.
            Command::Settle { lock, how, .. } => Outcome::Settled(ops.settle(*lock, how)),
            Command::Renew { lock, .. } => Outcome::Renewed(ops.renew(*lock)),
            Command::Depth { queue, .. } => Outcome::Depth(ops.depth(queue)),
            Command::Peek { queue, sub, from, max, .. } => Outcome::Peeked(ops.peek(queue, *sub, *from, *max)),
            Command::CancelScheduled { queue, sequences, .. } => {
                Outcome::Count(ops.step(|ops| ops.cancel_scheduled(queue, sequences)))
            }
            Command::ReceiveDeferred { queue, sub, sequences, .. } => {
                Outcome::Received(ops.step(|ops| ops.receive_deferred(queue, *sub, sequences)))
            }
        }
    }

    /// The error a failed outcome carries, if any.
    fn error(outcome: &Outcome) -> Option<&QueueError> {
        match outcome {
            Outcome::Sent(Err(e))
            | Outcome::Received(Err(e))
            | Outcome::Settled(Err(e))
            | Outcome::Renewed(Err(e))
            | Outcome::Depth(Err(e))
            | Outcome::Peeked(Err(e))
            | Outcome::Count(Err(e)) => Some(e),
            _ => None,
        }
    }

    fn answer(self, outcome: Outcome) {
        // A caller that gave up (dropped its receiver) needs no answer.
        match (self, outcome) {
            (Command::Send { reply, .. }, Outcome::Sent(r)) => drop(reply.send(r)),
            (Command::Receive { reply, .. } | Command::ReceiveDeferred { reply, .. }, Outcome::Received(r)) => {
                drop(reply.send(r))
            }
            (Command::Settle { reply, .. }, Outcome::Settled(r)) => drop(reply.send(r)),
            (Command::Renew { reply, .. }, Outcome::Renewed(r)) => drop(reply.send(r)),
            (Command::Depth { reply, .. }, Outcome::Depth(r)) => drop(reply.send(r)),
            (Command::Peek { reply, .. }, Outcome::Peeked(r)) => drop(reply.send(r)),
            (Command::CancelScheduled { reply, .. }, Outcome::Count(r)) => drop(reply.send(r)),
            (command, _) => command.fail(QueueError::Sqlite("internal: outcome does not match command".into())),
        }
    }

    fn fail(self, error: QueueError) {
        match self {
            Command::Send { reply, .. } => drop(reply.send(Err(error))),
            Command::Receive { reply, .. } | Command::ReceiveDeferred { reply, .. } => drop(reply.send(Err(error))),
            Command::Settle { reply, .. } => drop(reply.send(Err(error))),
            Command::Renew { reply, .. } => drop(reply.send(Err(error))),
            Command::Depth { reply, .. } => drop(reply.send(Err(error))),
            Command::Peek { reply, .. } => drop(reply.send(Err(error))),
            Command::CancelScheduled { reply, .. } => drop(reply.send(Err(error))),
        }
    }

    /// Whether it stores new messages: what a full database refuses.
    fn grows(&self) -> bool {
        matches!(self, Command::Send { .. })
    }

    /// Whether committing it may make messages receivable.
    fn adds(&self) -> bool {
        matches!(self, Command::Send { .. } | Command::Settle { .. })
    }
}

/// What the queue thread has committed so far: how well commands share
/// transactions, which is what a message's share of the queue thread's work
/// (and so the embedded rate) depends on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Commits {
    /// Transactions committed, each with a group of commands (one rolled
    /// back by a full disk and run again without its sends counts once).
    pub transactions: u64,
    /// Commands run in them.
    pub commands: u64,
}

#[derive(Default)]
struct CommitCounters {
    transactions: AtomicU64,
    commands: AtomicU64,
}

/// A cheap, cloneable handle to the queue thread.
#[derive(Clone)]
pub struct QueueHandle {
    commands: mpsc::Sender<Command>,
    /// Woken after every commit that may have made messages receivable, so
    /// idle receivers need not poll.
    arrivals: Arc<Notify>,
    options: Arc<StoreOptions>,
    commits: Arc<CommitCounters>,
}

impl QueueHandle {
    /// Opens the database and starts its thread. The thread ends when the
    /// last handle is dropped.
    pub fn open(path: &Path, options: StoreOptions) -> Result<QueueHandle, QueueError> {
        let db = Database::open(path, options.clone())?;
        let (commands, rx) = mpsc::channel(4096);
        let arrivals = Arc::new(Notify::new());
        let notify = Arc::clone(&arrivals);
        let commits = Arc::new(CommitCounters::default());
        let counters = Arc::clone(&commits);
        std::thread::Builder::new().name("queue-db".into()).spawn(move || run(db, rx, &notify, &counters)).map_err(
            |e| QueueError::Open { path: path.display().to_string(), detail: format!("cannot start thread: {e}") },
        )?;
        Ok(QueueHandle { commands, arrivals, options: Arc::new(options), commits })
    }

    /// Transactions committed and commands in them, since the queue was opened.
    pub fn commits(&self) -> Commits {
        Commits {
            transactions: self.commits.transactions.load(Ordering::Relaxed),
            commands: self.commits.commands.load(Ordering::Relaxed),
        }
    }

    /// The options it was opened with (queue properties included).
    pub fn options(&self) -> &StoreOptions {
        &self.options
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, QueueError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| QueueError::Closed)?;
        answer.await.map_err(|_| QueueError::Closed)?
    }

    /// Enqueues messages durably; returns their ids and sequence numbers.
    pub async fn send(&self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<Sent>, QueueError> {
        self.call(|reply| Command::Send { queue: queue.to_string(), messages, reply }).await
    }

    /// Locks up to `max` visible messages.
    pub async fn receive(&self, queue: &str, max: usize) -> Result<Vec<Received>, QueueError> {
        self.receive_from(queue, SubQueue::Active, max, ReceiveMode::PeekLock).await
    }

    /// Takes up to `max` visible messages from `queue` or its dead-letter
    /// queue, locked or deleted as `mode` says.
    pub async fn receive_from(
        &self,
        queue: &str,
        sub: SubQueue,
        max: usize,
        mode: ReceiveMode,
    ) -> Result<Vec<Received>, QueueError> {
        self.call(|reply| Command::Receive { queue: queue.to_string(), sub, max, mode, reply }).await
    }

    /// Settles a locked message.
    pub async fn settle(&self, lock: Lock, how: Settle) -> Result<Settled, QueueError> {
        self.call(|reply| Command::Settle { lock, how, reply }).await
    }

    /// Extends a held lock; returns when it now ends (ms since the epoch).
    pub async fn renew(&self, lock: Lock) -> Result<i64, QueueError> {
        self.call(|reply| Command::Renew { lock, reply }).await
    }

    pub async fn depth(&self, queue: &str) -> Result<Depth, QueueError> {
        self.call(|reply| Command::Depth { queue: queue.to_string(), reply }).await
    }

    /// Looks at up to `max` messages from sequence number `from` on.
    pub async fn peek(
        &self,
        queue: &str,
        sub: SubQueue,
        from: i64,
        max: usize,
    ) -> Result<Vec<StoredMessage>, QueueError> {
        self.call(|reply| Command::Peek { queue: queue.to_string(), sub, from, max, reply }).await
    }

    /// Deletes scheduled messages that have not become visible yet.
    pub async fn cancel_scheduled(&self, queue: &str, sequences: Vec<i64>) -> Result<usize, QueueError> {
        self.call(|reply| Command::CancelScheduled { queue: queue.to_string(), sequences, reply }).await
    }

    /// Locks deferred messages by sequence number.
    pub async fn receive_deferred(
        &self,
        queue: &str,
        sub: SubQueue,
        sequences: Vec<i64>,
    ) -> Result<Vec<Received>, QueueError> {
        self.call(|reply| Command::ReceiveDeferred { queue: queue.to_string(), sub, sequences, reply }).await
    }

    /// A future that completes at the next commit that may make messages
    /// receivable. Create it *before* a receive that came back empty, then
    /// await it.
    pub fn arrivals(&self) -> Arc<Notify> {
        Arc::clone(&self.arrivals)
    }
}

/// Runs `group` in one transaction and answers every command. When the
/// database is full, SQLite rolls the whole transaction back: the commands
/// that add data fail with that error, and the rest (settles, receives,
/// renewals, which free space or need none) run again without them.
fn commit(db: &mut Database, mut group: Vec<Command>, arrivals: &Notify, counters: &CommitCounters) {
    loop {
        let added = group.iter().any(Command::adds);
        let result = db.write(|ops| {
            let mut outcomes = Vec::with_capacity(group.len());
            for command in group.iter_mut() {
                let outcome = command.run(ops);
                if ops.aborted() {
                    // SQLite rolled everything back: the group as a whole failed.
                    let error = Command::error(&outcome)
                        .cloned()
                        .unwrap_or_else(|| QueueError::Sqlite("the transaction was rolled back".into()));
                    return Err(error);
                }
                outcomes.push(outcome);
            }
            Ok(outcomes)
        });
        match result {
            Ok(outcomes) => {
                // Counted before the answers go out, so a caller's next look
                // includes them.
                counters.transactions.fetch_add(1, Ordering::Relaxed);
                counters.commands.fetch_add(group.len() as u64, Ordering::Relaxed);
                for (command, outcome) in group.into_iter().zip(outcomes) {
                    command.answer(outcome);
                }
                if added {
                    arrivals.notify_waiters();
                }
                return;
            }
            Err(error @ QueueError::DiskFull(_)) if group.iter().any(Command::grows) => {
                let (grows, rest): (Vec<Command>, Vec<Command>) = group.into_iter().partition(Command::grows);
                tracing::warn!(%error, refused = grows.len(), retried = rest.len(), "queue full: sends refused");
                for command in grows {
                    command.fail(error.clone());
                }
                if rest.is_empty() {
                    return;
                }
                group = rest;
            }
            Err(error) => {
                tracing::error!(%error, commands = group.len(), "queue transaction failed; nothing in it was applied");
                for command in group {
                    command.fail(error.clone());
                }
                return;
            }
        }
    }
}

fn run(mut db: Database, mut rx: mpsc::Receiver<Command>, arrivals: &Notify, counters: &CommitCounters) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(command) => group.push(command),
                Err(_) => break,
            }
        }
        commit(&mut db, group, arrivals, counters);
    }
    tracing::debug!(path = db.path(), "queue thread stopped");
}
