//! One path for every message and request.
//!
//! Messages reach the consumer from *sources*: the embedded worker pool, the
//! Dapr input binding, Dapr pub/sub. Requests reach the producer on the
//! host's HTTP route. Every delivery goes through [`Dispatcher::deliver`],
//! which takes the live module version, invokes it with limits, turns the
//! outcome into a [`Settlement`], and keeps the books: the delivery is counted
//! in flight until it is acknowledged (or its future is dropped), its outcome
//! and time are counted, and a tracing span covers it. A source only carries
//! the settlement out in its own terms, through [`Acknowledge`].
//!
//! # Adding a source
//!
//! A source is one module plus its flags:
//!
//! 1. A type that implements [`Source`]. A source that pulls (a queue)
//!    implements [`Source::run`]; one that is called (daprd) claims its
//!    requests in [`Source::claims`] and answers them in [`Source::handle`].
//!    Either way it builds a [`Message`] and calls [`Dispatcher::deliver`]
//!    with an [`Acknowledge`] that settles in the source's terms (a queue's
//!    complete/abandon/dead-letter, an HTTP status) and says what really
//!    became of the message.
//! 2. Its readiness ([`Source::not_ready`]) and readings ([`Source::readings`]),
//!    if it has any; the host adds them to `/readyz` and `/metrics`.
//! 3. Its flags, in `cli/`, and one line where `dev` or `serve` picks the
//!    sources it runs. The host ([`crate::host`]) does the rest.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use tokio::sync::watch;
use tracing::Instrument;

use crate::metrics::{Metrics, Reading};
use crate::reply::Body;
use crate::runtime::outbound::Outbound;
use crate::runtime::{
    ConsumerModule, FailureKind, InvokeError, Message, ModuleInfo, ProducerModule, Request, Response, Runtime,
};
pub use crate::settlement::Settlement;
pub use crate::slot::Slot;

/// The result of one invocation, before it is acknowledged.
#[derive(Debug)]
pub struct Delivery {
    pub settlement: Settlement,
    /// Set when the host, not the guest, ended the invocation (the
    /// dispatcher counts it; sources see `None`).
    pub failure: Option<FailureKind>,
    /// The version that handled it.
    pub module: Option<Arc<ModuleInfo>>,
}

/// How a source carries out a settlement in its own terms.
pub trait Acknowledge: Send {
    /// What the source gets back: an HTTP response for daprd, nothing for a
    /// queue it settles itself.
    type Output: Send;

    /// Settles `message` as `delivery` says. Returns the acknowledgement and
    /// what really became of the message (dead-lettered instead of
    /// abandoned when deliveries ran out, say), which is what is counted.
    fn acknowledge(
        self,
        message: Message,
        delivery: Delivery,
    ) -> impl Future<Output = (Self::Output, Settlement)> + Send;
}

/// Settles nothing and hands back the settlement: for tools, tests and
/// benchmarks that look at outcomes.
pub struct Report;

impl Acknowledge for Report {
    type Output = Settlement;

    async fn acknowledge(self, _message: Message, delivery: Delivery) -> (Settlement, Settlement) {
        (delivery.settlement.clone(), delivery.settlement)
    }
}

/// A boxed future, for the object-safe [`Source`] trait.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Where messages come from (see the module doc for how to add one).
pub trait Source: Send + Sync + 'static {
    /// Its name, in logs.
    fn name(&self) -> &'static str;

    /// Whether it answers this request on the host's HTTP listener (daprd
    /// calls the app there). Sources are asked in order; the host's own
    /// routes come first.
    fn claims(&self, _request: &hyper::Request<Incoming>) -> bool {
        false
    }

    /// Answers a request it claimed.
    fn handle(
        self: Arc<Self>,
        _dispatcher: Arc<Dispatcher>,
        _request: hyper::Request<Incoming>,
    ) -> BoxFuture<hyper::Response<Body>> {
        Box::pin(async { crate::reply::error(hyper::StatusCode::NOT_FOUND, "no such route") })
    }

    /// Work it does by itself (pulling from a queue) until `shutdown`, then
    /// lets its deliveries in flight finish. The default has none.
    fn run(self: Arc<Self>, _dispatcher: Arc<Dispatcher>, mut shutdown: watch::Receiver<bool>) -> BoxFuture<()> {
        Box::pin(async move { crate::shutdown::requested(&mut shutdown).await })
    }

    /// Why it cannot take work now, if it cannot.
    fn not_ready(&self) -> Option<String> {
        None
    }

    /// What it reports at `/metrics`.
    fn readings(self: Arc<Self>) -> BoxFuture<Vec<Reading>> {
        Box::pin(async { Vec::new() })
    }
}

/// Invokes the live consumer and producer modules and keeps the books.
pub struct Dispatcher {
    runtime: Arc<Runtime>,
    outbound: Arc<dyn Outbound>,
    consumer: Option<Arc<Slot<ConsumerModule>>>,
    producer: Option<Arc<Slot<ProducerModule>>>,
    metrics: Arc<Metrics>,
}

/// A request the host could not hand to a producer.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("this host runs no producer")]
    NoProducer,
    #[error("no producer module is loaded yet (see /readyz for why)")]
    NotLoaded,
    #[error(transparent)]
    Invoke(#[from] InvokeError),
}

impl Dispatcher {
    pub fn new(
        runtime: Arc<Runtime>,
        outbound: Arc<dyn Outbound>,
        consumer: Option<Arc<Slot<ConsumerModule>>>,
        producer: Option<Arc<Slot<ProducerModule>>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Dispatcher { runtime, outbound, consumer, producer, metrics }
    }

    /// The runtime's readings for `/metrics` (see [`Runtime::readings`]).
    pub fn readings(&self) -> Vec<Reading> {
        self.runtime.readings()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where guests' sends go.
    pub fn outbound(&self) -> &Arc<dyn Outbound> {
        &self.outbound
    }

    /// Whether this host runs a producer (loaded or not).
    pub fn has_producer(&self) -> bool {
        self.producer.is_some()
    }

    /// The consumer version new deliveries would use.
    fn consumer_info(&self) -> Option<Arc<ModuleInfo>> {
        self.consumer.as_ref().and_then(|slot| slot.current()).map(|m| Arc::clone(&m.info))
    }

    /// The producer version new requests would use.
    fn producer_info(&self) -> Option<Arc<ModuleInfo>> {
        self.producer.as_ref().and_then(|slot| slot.current()).map(|m| Arc::clone(&m.info))
    }

    /// `(role, label)` of every live module, for metrics and health.
    pub fn live_modules(&self) -> Vec<(&'static str, String)> {
        [("producer", self.producer_info()), ("consumer", self.consumer_info())]
            .into_iter()
            .filter_map(|(role, info)| info.map(|i| (role, i.label().to_string())))
            .collect()
    }

    /// Delivers one message to the live consumer and has `ack` settle it.
    /// It counts in flight until settled (or until this future is dropped),
    /// and its outcome and time are counted.
    pub async fn deliver<A: Acknowledge>(&self, source: &'static str, message: Message, ack: A) -> A::Output {
        let span = tracing::info_span!(
            "deliver",
            messaging.source = source,
            messaging.message.id = %message.id,
            delivery = message.delivery_count,
        );
        // No `outcome` is recorded on the span: the fmt layer formats a
        // span's fields as they are recorded (its JSON format parses and
        // rewrites all of them), which cost a few thousand instructions per
        // delivery, and no event follows inside the span to show it. The
        // outcome is counted in the metrics.
        async move {
            let _in_flight = self.metrics.enter();
            let started = Instant::now();
            let mut delivery = self.invoke(&message).await;
            let failure = delivery.failure.take();
            let (output, settled) = ack.acknowledge(message, delivery).await;
            self.metrics.delivered(&settled, failure.as_ref(), started.elapsed());
            output
        }
        .instrument(span)
        .await
    }

    async fn invoke(&self, message: &Message) -> Delivery {
        let Some(module) = self.consumer.as_ref().and_then(|slot| slot.current()) else {
            return Delivery {
                settlement: Settlement::Abandon { reason: "no consumer module is loaded in this host".into() },
                failure: None,
                module: None,
            };
        };
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
        let module = slot.current().ok_or(ProduceError::NotLoaded)?;
        self.metrics.requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let answer = self.runtime.produce(&module, request, Arc::clone(&self.outbound)).await;
        if let Err(e) = &answer {
            self.metrics.record_failure(&e.kind);
        }
        Ok(answer?)
    }
}
