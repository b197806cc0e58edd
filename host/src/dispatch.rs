//! One path for every message and request.
//!
//! The embedded worker pool and the Dapr input route are two *sources* of
//! messages; the producer route is a source of requests. All of them call a
//! [`Dispatcher`], which takes the current module version, invokes it with
//! limits and turns the outcome into a [`Settlement`]. The source only carries
//! the settlement out in its own terms (SQLite complete/abandon/dead-letter,
//! or an HTTP status for daprd).

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::outbound::Outbound;
use crate::runtime::{
    ConsumeError, ConsumerModule, FailureKind, InvokeError, Message, ModuleInfo, ProducerModule, Request, Response,
    Runtime,
};

/// What must happen to a delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The consumer succeeded: acknowledge (complete) the message.
    Complete,
    /// A transient failure: give the message back for redelivery.
    Abandon { reason: String },
    /// Poison: dead-letter now, never retry.
    DeadLetter { reason: String },
}

impl Settlement {
    /// Maps an invocation outcome. Every failure the guest did not call
    /// poison is retried: a trap or timeout may be caused by this host (load,
    /// a bad deploy being rolled back) and redelivery is bounded by the max
    /// delivery count anyway.
    pub fn from_outcome(outcome: &Result<Result<(), ConsumeError>, InvokeError>) -> Settlement {
        match outcome {
            Ok(Ok(())) => Settlement::Complete,
            Ok(Err(ConsumeError::Retry(reason))) => {
                Settlement::Abandon { reason: format!("consumer asked to retry: {reason}") }
            }
            Ok(Err(ConsumeError::Reject(reason))) => {
                Settlement::DeadLetter { reason: format!("consumer rejected: {reason}") }
            }
            Err(error) => Settlement::Abandon { reason: error.to_string() },
        }
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Settlement::Complete => "complete",
            Settlement::Abandon { .. } => "abandon",
            Settlement::DeadLetter { .. } => "dead_letter",
        }
    }
}

/// The live version of a module. Swapped atomically by the reloader;
/// invocations that already hold the old one finish on it.
pub struct Slot<M> {
    current: ArcSwap<M>,
}

impl<M> Slot<M> {
    pub fn new(module: M) -> Self {
        Slot { current: ArcSwap::from_pointee(module) }
    }

    /// The version new invocations use.
    pub fn current(&self) -> Arc<M> {
        self.current.load_full()
    }

    /// Makes `module` the live version.
    pub fn replace(&self, module: M) {
        self.current.store(Arc::new(module));
    }
}

/// Invokes the live consumer and producer modules and settles the outcome.
pub struct Dispatcher {
    runtime: Arc<Runtime>,
    outbound: Arc<dyn Outbound>,
    consumer: Option<Arc<Slot<ConsumerModule>>>,
    producer: Option<Arc<Slot<ProducerModule>>>,
}

/// A request the host could not hand to a producer.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("no producer module is loaded in this host")]
    NoProducer,
    #[error(transparent)]
    Invoke(#[from] InvokeError),
}

impl Dispatcher {
    pub fn new(
        runtime: Arc<Runtime>,
        outbound: Arc<dyn Outbound>,
        consumer: Option<Arc<Slot<ConsumerModule>>>,
        producer: Option<Arc<Slot<ProducerModule>>>,
    ) -> Self {
        Dispatcher { runtime, outbound, consumer, producer }
    }

    /// The consumer version new deliveries would use.
    pub fn consumer_info(&self) -> Option<Arc<ModuleInfo>> {
        self.consumer.as_ref().map(|slot| Arc::clone(&slot.current().info))
    }

    /// The producer version new requests would use.
    pub fn producer_info(&self) -> Option<Arc<ModuleInfo>> {
        self.producer.as_ref().map(|slot| Arc::clone(&slot.current().info))
    }

    /// `(role, label)` of every live module, for metrics and health.
    pub fn live_modules(&self) -> Vec<(&'static str, String)> {
        [("producer", self.producer_info()), ("consumer", self.consumer_info())]
            .into_iter()
            .filter_map(|(role, info)| info.map(|i| (role, i.label().to_string())))
            .collect()
    }

    /// Delivers one message to the live consumer and says how to settle it.
    #[tracing::instrument(name = "deliver", skip_all, fields(messaging.message.id = %message.id, delivery = message.delivery_count))]
    pub async fn deliver(&self, message: &Message) -> Delivery {
        let Some(slot) = &self.consumer else {
            return Delivery {
                settlement: Settlement::Abandon { reason: "no consumer module is loaded in this host".into() },
                failure: None,
                module: None,
            };
        };
        let module = slot.current();
        let outcome = self.runtime.consume(&module, message, Arc::clone(&self.outbound)).await;
        let settlement = Settlement::from_outcome(&outcome);
        if let Settlement::DeadLetter { reason } | Settlement::Abandon { reason } = &settlement {
            tracing::debug!(module = %module.info.label(), %reason, "message not completed");
        }
        Delivery { settlement, failure: outcome.err().map(|e| e.kind), module: Some(Arc::clone(&module.info)) }
    }

    /// Hands one request to the live producer.
    pub async fn produce(&self, request: &Request) -> Result<Response, ProduceError> {
        let slot = self.producer.as_ref().ok_or(ProduceError::NoProducer)?;
        let module = slot.current();
        Ok(self.runtime.produce(&module, request, Arc::clone(&self.outbound)).await?)
    }
}

/// The result of one delivery.
#[derive(Debug)]
pub struct Delivery {
    pub settlement: Settlement,
    /// Set when the host, not the guest, ended the invocation.
    pub failure: Option<FailureKind>,
    /// The version that handled it.
    pub module: Option<Arc<ModuleInfo>>,
}
