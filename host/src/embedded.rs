//! Embedded mode: the SQLite queue as both the guests' output binding and
//! the consumer's message source, with a worker pool scaled like KEDA.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};

use crate::dispatch::{Acknowledge, BoxFuture, Delivery, Dispatcher, Settlement, Source};
use crate::http::{self, Body};
use crate::metrics::{Metrics, Reading};
use crate::queue::{NewMessage, QueueError, QueueHandle, Received, Settle, Settled};
use crate::runtime::Message;
use crate::runtime::outbound::{BatchFuture, Outbound, OutboundMessage, SendError, SendFuture};
use crate::scale::{Autoscaler, ScaleRule};

/// Sends guest messages into queues of the embedded database; a binding name
/// is a queue name, and only configured bindings exist.
pub struct EmbeddedOutbound {
    queue: QueueHandle,
    bindings: BTreeSet<String>,
    metrics: Arc<Metrics>,
}

impl EmbeddedOutbound {
    pub fn new(queue: QueueHandle, bindings: impl IntoIterator<Item = String>, metrics: Arc<Metrics>) -> Self {
        EmbeddedOutbound { queue, bindings: bindings.into_iter().collect(), metrics }
    }
}

/// Builds the queue record for a guest's message. Metadata keys follow the
/// Dapr Service Bus binding (`ttlInSeconds`), so a guest sees the same
/// behaviour in both modes.
fn to_new_message(message: OutboundMessage) -> Result<NewMessage, SendError> {
    let ttl = match message.metadata.iter().find(|(k, _)| k == "ttlInSeconds" || k == "ttl") {
        Some((_, v)) => match v.parse::<u64>() {
            Ok(secs) if secs > 0 => Some(Duration::from_secs(secs)),
            _ => {
                return Err(SendError::Rejected(format!("ttlInSeconds must be a positive integer, got {v:?}")));
            }
        },
        None => None,
    };
    Ok(NewMessage {
        id: message.id,
        body: message.body,
        content_type: message.content_type,
        metadata: message.metadata,
        ttl,
        scheduled_at_ms: None,
        amqp: None,
    })
}

impl EmbeddedOutbound {
    fn known(&self, binding: &str) -> Result<(), SendError> {
        if self.bindings.contains(binding) {
            return Ok(());
        }
        let known = self.bindings.iter().cloned().collect::<Vec<_>>().join(", ");
        Err(SendError::UnknownBinding(format!("no binding {binding:?}; configured: {known}")))
    }

    /// Stores `records` in one queue command: all of them durably, or none.
    async fn store(&self, binding: &str, records: Vec<NewMessage>) -> Result<Vec<String>, SendError> {
        let count = records.len();
        // Every queue failure (full, busy, closed) may clear up: never `rejected`.
        let sent = self.queue.send(binding, records).await.map_err(|e| SendError::Unavailable(e.to_string()))?;
        if sent.len() != count {
            return Err(SendError::Unavailable(format!("the queue stored {} of {count} messages", sent.len())));
        }
        self.metrics.sent.fetch_add(count as u64, Ordering::Relaxed);
        Ok(sent.into_iter().map(|sent| sent.id).collect())
    }
}

impl Outbound for EmbeddedOutbound {
    fn send<'a>(&'a self, binding: &'a str, message: OutboundMessage) -> SendFuture<'a> {
        Box::pin(async move {
            self.known(binding)?;
            let mut ids = self.store(binding, vec![to_new_message(message)?]).await?;
            ids.pop().ok_or_else(|| SendError::Unavailable("the queue returned no id".into()))
        })
    }

    /// One durable step for the whole batch, as Service Bus sends a batch:
    /// every message is stored, or none is. A message the binding refuses
    /// gets its own error and holds back the rest, which may be sent again.
    fn send_batch<'a>(&'a self, binding: &'a str, messages: Vec<OutboundMessage>) -> BatchFuture<'a> {
        Box::pin(async move {
            let count = messages.len();
            let all = |error: SendError| (0..count).map(|_| Err(error.clone())).collect();
            if let Err(error) = self.known(binding) {
                return all(error);
            }
            let records: Vec<Result<NewMessage, SendError>> = messages.into_iter().map(to_new_message).collect();
            if let Some(refused) = records.iter().position(Result::is_err) {
                let held_back = SendError::Unavailable(format!(
                    "not sent: message {refused} of the batch was refused, and a batch is stored whole or not at all"
                ));
                return records.into_iter().map(|r| r.and(Err(held_back.clone()))).collect();
            }
            match self.store(binding, records.into_iter().flatten().collect()).await {
                Ok(ids) => ids.into_iter().map(Ok).collect(),
                Err(error) => all(error),
            }
        })
    }
}

/// How the consumer worker pool behaves.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// The queue consumed.
    pub queue: String,
    pub scale: ScaleRule,
    /// Idle time before the pool shrinks (KEDA `cooldownPeriod`).
    pub cooldown: Duration,
    /// First retry delay; doubled per delivery up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// How often queue length is sampled for scaling.
    pub poll: Duration,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            queue: "orders".into(),
            scale: ScaleRule { min: 0, max: 8, target: 16, activation: 0 },
            cooldown: Duration::from_secs(5),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            poll: Duration::from_millis(100),
        }
    }
}

impl PoolOptions {
    /// Exponential backoff for the `delivery`th failed delivery.
    fn backoff_for(&self, delivery: u32) -> Duration {
        let factor = 1u32.checked_shl(delivery.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// Converts a received record into the guest's message (moving the body,
/// not copying it).
fn to_message(received: Received) -> Message {
    let stored = received.message;
    Message {
        id: stored.id,
        body: stored.body,
        content_type: stored.content_type,
        metadata: stored.metadata,
        delivery_count: Some(stored.delivery_count),
    }
}

/// The worker pool: consumes `options.queue`, scaled like KEDA, as a source.
///
/// A queue error (a busy or full database, a disk hiccup) never stops it:
/// it backs off, says why in `/readyz` and the logs, and tries again for as
/// long as the process lives.
pub struct Pool {
    queue: QueueHandle,
    options: PoolOptions,
    /// The last queue error, while the pool cannot read the queue.
    trouble: std::sync::Mutex<Option<String>>,
}

impl Pool {
    pub fn new(queue: QueueHandle, options: PoolOptions) -> Self {
        Pool { queue, options, trouble: std::sync::Mutex::new(None) }
    }

    fn lock_duration(&self) -> Duration {
        self.queue.options().queue(&self.options.queue).lock_duration
    }

    fn report(&self, error: Option<&QueueError>) {
        let Ok(mut trouble) = self.trouble.lock() else { return };
        match (error, trouble.as_ref()) {
            (Some(e), None) => {
                tracing::error!(queue = %self.options.queue, error = %e, "cannot read the queue; retrying")
            }
            (None, Some(_)) => tracing::info!(queue = %self.options.queue, "reading the queue again"),
            _ => {}
        }
        *trouble = error.map(|e| format!("cannot read queue {}: {e}", self.options.queue));
    }

    async fn consume(self: Arc<Self>, dispatcher: Arc<Dispatcher>, mut shutdown: watch::Receiver<bool>) {
        let options = &self.options;
        let max = options.scale.max.max(1) as usize;
        // Permits = workers allowed now. Start with none; the scaler adds them.
        let workers = Arc::new(Semaphore::new(0));
        let mut allowed: usize = 0;
        let mut scaler = Autoscaler::new(options.scale, options.cooldown);
        let arrivals = self.queue.arrivals();
        let mut next_scale = Instant::now();
        let mut failures = 0u32;
        let mut deliveries = tokio::task::JoinSet::new();
        let metrics = Arc::clone(dispatcher.metrics());

        loop {
            if *shutdown.borrow() {
                break;
            }
            while deliveries.try_join_next().is_some() {}
            if failures > 0 {
                // Back off on queue errors, up to a few seconds.
                let pause = options.backoff.saturating_mul(1u32 << failures.min(6)).min(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.changed() => continue,
                }
            }
            if Instant::now() >= next_scale {
                let depth = match self.queue.depth(&options.queue).await {
                    Ok(depth) => depth,
                    Err(e) => {
                        self.report(Some(&e));
                        failures += 1;
                        continue;
                    }
                };
                let in_flight = metrics.in_flight.load(Ordering::Relaxed);
                // Service Bus counts locked messages as active; so does KEDA.
                let want = scaler.observe(depth.active + in_flight.min(depth.locked), Instant::now()) as usize;
                let want = want.min(max);
                if want > allowed {
                    workers.add_permits(want - allowed);
                } else if want < allowed {
                    // Shrinking waits for busy workers to finish, off this loop.
                    let shrink = u32::try_from(allowed - want).unwrap_or(u32::MAX);
                    let workers = Arc::clone(&workers);
                    tokio::spawn(async move {
                        if let Ok(permits) = workers.acquire_many(shrink).await {
                            permits.forget();
                        }
                    });
                }
                if want != allowed {
                    tracing::info!(queue = %options.queue, from = allowed, to = want, depth = depth.active, "scaling consumer workers");
                }
                allowed = want;
                next_scale = Instant::now() + options.poll;
            }

            // Wait for a free worker (or the next scaling decision).
            let first = tokio::select! {
                permit = Arc::clone(&workers).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = tokio::time::sleep_until(next_scale.into()) => continue,
                _ = shutdown.changed() => continue,
            };
            let mut permits = vec![first];
            while let Ok(p) = Arc::clone(&workers).try_acquire_owned() {
                permits.push(p);
            }

            let notified = arrivals.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let batch = match self.queue.receive(&options.queue, permits.len()).await {
                Ok(batch) => {
                    if failures > 0 {
                        failures = 0;
                        self.report(None);
                    }
                    batch
                }
                Err(e) => {
                    self.report(Some(&e));
                    failures += 1;
                    continue;
                }
            };
            if batch.is_empty() {
                drop(permits);
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep_until(next_scale.into()) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            }
            for (received, permit) in batch.into_iter().zip(permits) {
                let (pool, dispatcher) = (Arc::clone(&self), Arc::clone(&dispatcher));
                deliveries.spawn(async move {
                    let (lock, attempt) = (received.lock, received.message.delivery_count);
                    let settle = Settler {
                        queue: &pool.queue,
                        metrics: dispatcher.metrics(),
                        options: &pool.options,
                        lock,
                        attempt,
                        patience: pool.lock_duration(),
                        worker: Some(permit),
                    };
                    let delivering = dispatcher.deliver("embedded", to_message(received), settle);
                    tokio::pin!(delivering);
                    // A guest slower than the lock must not lose it: renew
                    // while it runs, in this task (most deliveries end long
                    // before the first renewal is due), until it settles or
                    // the lock is gone.
                    tokio::select! {
                        biased;
                        () = &mut delivering => {}
                        () = renew(&pool.queue, lock, pool.lock_duration()) => delivering.await,
                    }
                });
            }
        }

        // Drain: let every delivery in flight finish and settle.
        let draining = deliveries.len();
        if draining > 0 {
            tracing::debug!(deliveries = draining, "waiting for deliveries in flight");
        }
        while deliveries.join_next().await.is_some() {}
    }
}

/// Renews `lock` every third of its duration until the lock is gone (the
/// delivery settled) or the future is dropped; as Dapr's Service Bus
/// component renews while the app works.
async fn renew(queue: &QueueHandle, lock: crate::queue::Lock, duration: Duration) {
    let every = (duration / 3).max(Duration::from_millis(50));
    loop {
        tokio::time::sleep(every).await;
        if let Err(error) = queue.renew(lock).await {
            tracing::debug!(%error, "stopped renewing a lock");
            return;
        }
    }
}

/// Settles a delivery in the queue, under its lock. A settle the database
/// refuses for now (busy, full) is tried again while the lock is renewed,
/// for up to `patience`: giving up means the guest runs again. One that
/// still fails leaves the message locked; it comes back when the lock
/// expires.
struct Settler<'a> {
    queue: &'a QueueHandle,
    metrics: &'a Metrics,
    options: &'a PoolOptions,
    lock: crate::queue::Lock,
    attempt: u32,
    patience: Duration,
    /// The worker the guest ran on, free again once the guest is done: the
    /// settle's commit is the queue's work, and the next message need not
    /// wait for it.
    worker: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Settler<'_> {
    async fn settle(&self, how: Settle) -> Result<Settled, QueueError> {
        let deadline = tokio::time::Instant::now() + self.patience;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.queue.settle(self.lock, how.clone()).await {
                Err(error) if error.is_transient() && tokio::time::Instant::now() + pause < deadline => {
                    tracing::warn!(%error, retry_in = ?pause, "cannot settle yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                outcome => return outcome,
            }
        }
    }
}

impl Acknowledge for Settler<'_> {
    type Output = ();

    async fn acknowledge(mut self, message: Message, delivery: Delivery) -> ((), Settlement) {
        drop(self.worker.take());
        let how = match &delivery.settlement {
            Settlement::Complete => Settle::Complete,
            Settlement::Abandon { reason } => {
                Settle::Abandon { delay: self.options.backoff_for(self.attempt), reason: reason.clone() }
            }
            Settlement::DeadLetter { reason } => {
                Settle::DeadLetter { reason: "RejectedByConsumer".into(), description: reason.clone() }
            }
        };
        let abandoned = Settlement::Abandon { reason: "not settled; the lock will expire".into() };
        match self.settle(how).await {
            Ok(Settled::Completed) => ((), Settlement::Complete),
            Ok(Settled::DeadLettered) => {
                let reason = match delivery.settlement {
                    Settlement::DeadLetter { reason } => reason,
                    other => format!("max deliveries reached; last: {other:?}"),
                };
                tracing::warn!(id = %message.id, delivery = self.attempt, %reason, "message dead-lettered");
                ((), Settlement::DeadLetter { reason })
            }
            Ok(_) => {
                tracing::debug!(id = %message.id, delivery = self.attempt, "message abandoned for retry");
                ((), delivery.settlement)
            }
            Err(error @ QueueError::Gone { .. }) => {
                tracing::info!(id = %message.id, %error, "nothing to settle");
                ((), abandoned)
            }
            Err(QueueError::LockLost { id }) => {
                self.metrics.locks_lost.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%id, "lock lost before settling; the message will be redelivered");
                ((), abandoned)
            }
            Err(error) => {
                tracing::error!(id = %message.id, %error, "cannot settle; the message will be redelivered after its lock expires");
                ((), abandoned)
            }
        }
    }
}

impl Source for Pool {
    fn name(&self) -> &'static str {
        "embedded"
    }

    fn claims(&self, request: &hyper::Request<hyper::body::Incoming>) -> bool {
        request.uri().path() == "/stats"
    }

    fn handle(
        self: Arc<Self>,
        dispatcher: Arc<Dispatcher>,
        _request: hyper::Request<hyper::body::Incoming>,
    ) -> BoxFuture<hyper::Response<Body>> {
        Box::pin(async move {
            match self.queue.depth(&self.options.queue).await {
                Ok(depth) => http::json(
                    hyper::StatusCode::OK,
                    &serde_json::json!({"queue": self.options.queue, "depth": depth, "counters": dispatcher.metrics().snapshot()}),
                ),
                Err(e) => http::error(hyper::StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        })
    }

    fn run(self: Arc<Self>, dispatcher: Arc<Dispatcher>, shutdown: watch::Receiver<bool>) -> BoxFuture<()> {
        Box::pin(self.consume(dispatcher, shutdown))
    }

    fn not_ready(&self) -> Option<String> {
        self.trouble.lock().ok().and_then(|t| t.clone())
    }

    fn readings(self: Arc<Self>) -> BoxFuture<Vec<Reading>> {
        Box::pin(async move {
            let depth = self.queue.depth(&self.options.queue).await.unwrap_or_default();
            let commits = self.queue.commits();
            vec![
                Reading::gauge("queue_active_messages", "Messages visible in the queue.", depth.active),
                Reading::gauge("queue_locked_messages", "Messages locked by a consumer.", depth.locked),
                Reading::gauge(
                    "queue_dead_lettered_messages",
                    "Messages in the dead-letter queue.",
                    depth.dead_lettered,
                ),
                Reading::counter(
                    "queue_transactions_total",
                    "Transactions the queue thread committed, each with every command that was waiting.",
                    commits.transactions,
                ),
                Reading::counter(
                    "queue_commands_total",
                    "Queue commands (sends, receives, settles, ...) run in those transactions.",
                    commits.commands,
                ),
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let o = PoolOptions {
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            ..PoolOptions::default()
        };
        let got: Vec<u128> = (1..=6).map(|d| o.backoff_for(d).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(o.backoff_for(u32::MAX), Duration::from_secs(1));
    }
}
