//! The queue on its own thread, with group commit.
//!
//! Callers on many tasks send commands; the queue thread takes every command
//! waiting, runs them all in one SQLite transaction, commits once, and only
//! then answers each caller. A send is therefore acknowledged only when it is
//! durable, yet a thousand concurrent sends cost one commit.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc, oneshot};

use super::db::{Database, Ops};
use super::{Depth, Lock, NewMessage, QueueError, QueueOptions, Received, Settle, Settled};

/// Most commands folded into one transaction.
const MAX_GROUP: usize = 2048;

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

enum Command {
    Send { queue: String, messages: Vec<NewMessage>, reply: Reply<Vec<String>> },
    Receive { queue: String, max: usize, reply: Reply<Vec<Received>> },
    Settle { lock: Lock, how: Settle, reply: Reply<Settled> },
    Depth { queue: String, reply: Reply<Depth> },
}

/// What a command produced inside the transaction, delivered after commit.
enum Outcome {
    Sent(Result<Vec<String>, QueueError>),
    Received(Result<Vec<Received>, QueueError>),
    Settled(Result<Settled, QueueError>),
    Depth(Result<Depth, QueueError>),
}

impl Command {
    fn run(&mut self, ops: &mut Ops<'_>) -> Outcome {
        match self {
            Command::Send { queue, messages, .. } => Outcome::Sent(ops.send(queue, std::mem::take(messages))),
            Command::Receive { queue, max, .. } => Outcome::Received(ops.receive(queue, *max)),
            Command::Settle { lock, how, .. } => Outcome::Settled(ops.settle(*lock, how)),
            Command::Depth { queue, .. } => Outcome::Depth(ops.depth(queue)),
        }
    }

    fn answer(self, outcome: Outcome) {
        // A caller that gave up (dropped its receiver) needs no answer.
        match (self, outcome) {
            (Command::Send { reply, .. }, Outcome::Sent(r)) => drop(reply.send(r)),
            (Command::Receive { reply, .. }, Outcome::Received(r)) => drop(reply.send(r)),
            (Command::Settle { reply, .. }, Outcome::Settled(r)) => drop(reply.send(r)),
            (Command::Depth { reply, .. }, Outcome::Depth(r)) => drop(reply.send(r)),
            (command, _) => command.fail(QueueError::Sqlite("internal: outcome does not match command".into())),
        }
    }

    fn fail(self, error: QueueError) {
        match self {
            Command::Send { reply, .. } => drop(reply.send(Err(error))),
            Command::Receive { reply, .. } => drop(reply.send(Err(error))),
            Command::Settle { reply, .. } => drop(reply.send(Err(error))),
            Command::Depth { reply, .. } => drop(reply.send(Err(error))),
        }
    }

    fn is_send(&self) -> bool {
        matches!(self, Command::Send { .. })
    }
}

/// A cheap, cloneable handle to the queue thread.
#[derive(Clone)]
pub struct QueueHandle {
    commands: mpsc::Sender<Command>,
    /// Woken after every commit that added messages, so idle receivers need
    /// not poll.
    arrivals: Arc<Notify>,
}

impl QueueHandle {
    /// Opens the database and starts its thread. The thread ends when the
    /// last handle is dropped.
    pub fn open(path: &Path, options: QueueOptions, full_sync: bool) -> Result<QueueHandle, QueueError> {
        let db = Database::open(path, options, full_sync)?;
        let (commands, rx) = mpsc::channel(4096);
        let arrivals = Arc::new(Notify::new());
        let notify = Arc::clone(&arrivals);
        std::thread::Builder::new().name("queue-db".into()).spawn(move || run(db, rx, &notify)).map_err(|e| {
            QueueError::Open { path: path.display().to_string(), detail: format!("cannot start thread: {e}") }
        })?;
        Ok(QueueHandle { commands, arrivals })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, QueueError> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(make(reply)).await.map_err(|_| QueueError::Closed)?;
        answer.await.map_err(|_| QueueError::Closed)?
    }

    /// Enqueues messages durably; returns their ids.
    pub async fn send(&self, queue: &str, messages: Vec<NewMessage>) -> Result<Vec<String>, QueueError> {
        self.call(|reply| Command::Send { queue: queue.to_string(), messages, reply }).await
    }

    /// Locks up to `max` visible messages.
    pub async fn receive(&self, queue: &str, max: usize) -> Result<Vec<Received>, QueueError> {
        self.call(|reply| Command::Receive { queue: queue.to_string(), max, reply }).await
    }

    /// Settles a locked message.
    pub async fn settle(&self, lock: Lock, how: Settle) -> Result<Settled, QueueError> {
        self.call(|reply| Command::Settle { lock, how, reply }).await
    }

    pub async fn depth(&self, queue: &str) -> Result<Depth, QueueError> {
        self.call(|reply| Command::Depth { queue: queue.to_string(), reply }).await
    }

    /// A future that completes at the next commit that adds messages. Create
    /// it *before* a receive that came back empty, then await it.
    pub fn arrivals(&self) -> Arc<Notify> {
        Arc::clone(&self.arrivals)
    }
}

fn run(mut db: Database, mut rx: mpsc::Receiver<Command>, arrivals: &Notify) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(command) => group.push(command),
                Err(_) => break,
            }
        }
        let added = group.iter().any(Command::is_send);
        let result = db.write(|ops| Ok(group.iter_mut().map(|c| c.run(ops)).collect::<Vec<_>>()));
        match result {
            Ok(outcomes) => {
                for (command, outcome) in group.into_iter().zip(outcomes) {
                    command.answer(outcome);
                }
                if added {
                    arrivals.notify_waiters();
                }
            }
            Err(error) => {
                tracing::error!(%error, commands = group.len(), "queue transaction failed; nothing in it was applied");
                for command in group {
                    command.fail(error.clone());
                }
            }
        }
    }
    tracing::debug!(path = db.path(), "queue thread stopped");
}
