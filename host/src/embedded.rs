//! Embedded mode: the SQLite queue as both the guests' output binding and
//! the consumer's message source, with a worker pool scaled like KEDA.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};

use crate::dispatch::{Dispatcher, Settlement};
use crate::metrics::Metrics;
use crate::outbound::{Outbound, OutboundMessage, SendError, SendFuture};
use crate::queue::{NewMessage, QueueError, QueueHandle, Received, Settle};
use crate::runtime::Message;
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
pub fn to_new_message(message: OutboundMessage) -> Result<NewMessage, SendError> {
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
    })
}

impl Outbound for EmbeddedOutbound {
    fn send<'a>(&'a self, binding: &'a str, message: OutboundMessage) -> SendFuture<'a> {
        Box::pin(async move {
            if !self.bindings.contains(binding) {
                let known = self.bindings.iter().cloned().collect::<Vec<_>>().join(", ");
                return Err(SendError::UnknownBinding(format!("no binding {binding:?}; configured: {known}")));
            }
            let record = to_new_message(message)?;
            // Every queue failure (full, busy, closed) may clear up: never `rejected`.
            let ids =
                self.queue.send(binding, vec![record]).await.map_err(|e| SendError::Unavailable(e.to_string()))?;
            self.metrics.sent.fetch_add(1, Ordering::Relaxed);
            ids.into_iter().next().ok_or_else(|| SendError::Unavailable("the queue returned no id".into()))
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
    pub fn backoff_for(&self, delivery: u32) -> Duration {
        let factor = 1u32.checked_shl(delivery.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// Converts a received record into the guest's message (moving the body,
/// not copying it).
pub fn to_message(received: Received) -> Message {
    Message {
        id: received.id,
        body: received.body,
        content_type: received.content_type,
        metadata: received.metadata,
        delivery_count: Some(received.delivery_count),
    }
}

/// Consumes `options.queue` until `shutdown` turns true, then waits for the
/// deliveries in flight to finish and settle.
pub async fn run_pool(
    queue: QueueHandle,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    options: PoolOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), QueueError> {
    let max = options.scale.max.max(1) as usize;
    // Permits = workers allowed now. Start with none; the scaler adds them.
    let workers = Arc::new(Semaphore::new(0));
    let mut allowed: usize = 0;
    let mut scaler = Autoscaler::new(options.scale, options.cooldown);
    let arrivals = queue.arrivals();
    let mut next_scale = Instant::now();
    let options = Arc::new(options);
    let mut deliveries = tokio::task::JoinSet::new();

    loop {
        if *shutdown.borrow() {
            break;
        }
        while deliveries.try_join_next().is_some() {}
        if Instant::now() >= next_scale {
            let depth = queue.depth(&options.queue).await?;
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
        let batch = queue.receive(&options.queue, permits.len()).await?;
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
            let (queue, dispatcher, metrics, options) =
                (queue.clone(), Arc::clone(&dispatcher), Arc::clone(&metrics), Arc::clone(&options));
            metrics.in_flight.fetch_add(1, Ordering::Relaxed);
            deliveries.spawn(async move {
                deliver(&queue, &dispatcher, &metrics, &options, received).await;
                metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    }

    // Drain: let every delivery in flight finish and settle.
    let draining = deliveries.len();
    if draining > 0 {
        tracing::debug!(deliveries = draining, "waiting for deliveries in flight");
    }
    while deliveries.join_next().await.is_some() {}
    Ok(())
}

/// One delivery: invoke, then settle under the lock. A settle that fails
/// leaves the message locked; it comes back when the lock expires.
async fn deliver(
    queue: &QueueHandle,
    dispatcher: &Dispatcher,
    metrics: &Metrics,
    options: &PoolOptions,
    received: Received,
) {
    let (lock, attempt) = (received.lock, received.delivery_count);
    let message = to_message(received);
    let delivery = dispatcher.deliver(&message).await;
    let how = match &delivery.settlement {
        Settlement::Complete => Settle::Complete,
        Settlement::Abandon { reason } => {
            Settle::Abandon { delay: options.backoff_for(attempt), reason: reason.clone() }
        }
        Settlement::DeadLetter { reason } => {
            Settle::DeadLetter { reason: "RejectedByConsumer".into(), description: reason.clone() }
        }
    };
    match queue.settle(lock, how).await {
        Ok(settled) => {
            let effective = match settled {
                crate::queue::Settled::Completed => Settlement::Complete,
                crate::queue::Settled::Abandoned => delivery.settlement.clone(),
                crate::queue::Settled::DeadLettered => match &delivery.settlement {
                    Settlement::DeadLetter { .. } => delivery.settlement.clone(),
                    other => Settlement::DeadLetter { reason: format!("max deliveries reached; last: {other:?}") },
                },
            };
            match &effective {
                Settlement::Complete => {}
                Settlement::Abandon { reason } => {
                    tracing::debug!(id = %message.id, delivery = attempt, %reason, "message abandoned for retry");
                }
                Settlement::DeadLetter { reason } => {
                    tracing::warn!(id = %message.id, delivery = attempt, %reason, "message dead-lettered");
                }
            }
            metrics.record(&effective, delivery.failure.as_ref());
        }
        Err(QueueError::LockLost { id }) => {
            metrics.locks_lost.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%id, "lock lost before settling; the message will be redelivered");
        }
        Err(error) => {
            tracing::error!(id = %message.id, %error, "cannot settle; the message will be redelivered after its lock expires")
        }
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
