//! The Dapr input binding as a source: daprd POSTs each message to the
//! binding's route (see `shared/dapr-contract.md`).
//!
//! | request | answer |
//! |---|---|
//! | `OPTIONS /<route>` | 200 at once (daprd's subscription probe; anything but 2xx/405 silently unsubscribes) |
//! | `POST /<route>` | **exactly 200** after the consumer succeeded; 500 + JSON reason otherwise (daprd abandons, Service Bus redelivers) |
//! | other methods on `/<route>` | 405 |
//!
//! With `APP_API_TOKEN` set, the probe and deliveries must carry a matching
//! `dapr-api-token` (compared in constant time), or get 401. Poison (the
//! consumer said `reject`) goes to the dead-letter binding when there is one
//! and is then acknowledged; without one it is refused until Service Bus
//! dead-letters it after the queue's max delivery count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::Semaphore;

use super::attempts::Attempts;
use super::client::{DaprOutbound, TRACEPARENT};
use super::codec;
use crate::dispatch::{Acknowledge, BoxFuture, Delivery, Dispatcher, Settlement, Source};
use crate::http::{self, Body};
use crate::metrics::Reading;
use crate::runtime::Message;
use crate::runtime::outbound::{Outbound, OutboundMessage};

/// How the binding route is set up.
#[derive(Debug, Clone)]
pub struct BindingOptions {
    /// `/` + the component name, or its `route` metadata.
    pub route: String,
    /// `APP_API_TOKEN`: what daprd must present.
    pub app_token: Option<String>,
    /// Deliveries handled at once; match the Component's
    /// `maxConcurrentHandlers` and `dapr.io/app-max-concurrency`.
    pub max_concurrency: usize,
    pub max_body_bytes: usize,
    /// Output binding that receives rejected (poison) messages, if any.
    pub dead_letter_binding: Option<String>,
    /// Message ids whose failed deliveries are remembered (for the
    /// delivery-count estimate).
    pub attempt_memory: usize,
}

/// The input binding route.
pub struct Binding {
    options: BindingOptions,
    outbound: Arc<DaprOutbound>,
    deliveries: Semaphore,
    attempts: Attempts,
    /// Subscription probes answered (daprd sends one per binding start).
    probes: AtomicU64,
}

impl Binding {
    pub fn new(options: BindingOptions, outbound: Arc<DaprOutbound>) -> Self {
        let deliveries = Semaphore::new(options.max_concurrency.max(1));
        let attempts = Attempts::new(options.attempt_memory);
        Binding { options, outbound, deliveries, attempts, probes: AtomicU64::new(0) }
    }

    async fn deliver(&self, dispatcher: &Dispatcher, request: Request<Incoming>) -> Response<Body> {
        if !authorized(&request, self.options.app_token.as_deref()) {
            return unauthorized();
        }
        let declared = http::content_length(&request);
        let (parts, body) = request.into_parts();
        let body = match http::read_body(body, declared, self.options.max_body_bytes).await {
            Ok(body) => body,
            Err(e) => return e.response(),
        };
        let headers = parts.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
        let decoded = match codec::decode_delivery(headers, &body) {
            Ok(decoded) => decoded,
            // It will never decode: settle it as poison.
            Err(e) => {
                let message = fallback_message(&body);
                let (response, settled) = self.reject(&message, e.to_string()).await;
                dispatcher.metrics().record(&settled, None);
                return response;
            }
        };
        let Ok(_permit) = self.deliveries.acquire().await else {
            return http::error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
        };
        let attempt = self.attempts.estimate(&decoded.id);
        let message = Message {
            id: decoded.id,
            body: decoded.body,
            content_type: decoded.content_type,
            metadata: decoded.metadata,
            delivery_count: Some(attempt),
        };
        let traceparent = message.metadata.iter().find(|(k, _)| k == "traceparent").map(|(_, v)| v.clone());
        TRACEPARENT
            .scope(traceparent, dispatcher.deliver("dapr-binding", message, Answer { binding: self, attempt }))
            .await
    }

    /// A poison message: to the dead-letter binding if there is one (then
    /// acknowledge), else refuse it until Service Bus dead-letters it after
    /// the queue's max delivery count.
    async fn reject(&self, message: &Message, reason: String) -> (Response<Body>, Settlement) {
        let Some(binding) = &self.options.dead_letter_binding else {
            tracing::warn!(id = %message.id, %reason, "poison message: no dead-letter binding configured, so it is refused until Service Bus dead-letters it after the queue's max delivery count");
            let response = http::json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &serde_json::json!({"error": reason, "outcome": "reject"}),
            );
            return (response, Settlement::Abandon { reason });
        };
        let mut metadata = message.metadata.clone();
        metadata.push(("deadletter-reason".to_string(), reason.clone()));
        metadata.push(("deadletter-source".to_string(), self.options.route.trim_start_matches('/').to_string()));
        let copy = OutboundMessage {
            id: Some(message.id.clone()),
            body: message.body.clone(),
            content_type: message.content_type.clone(),
            metadata,
        };
        match self.outbound.send(binding, copy).await {
            Ok(_) => {
                tracing::warn!(id = %message.id, %binding, %reason, "poison message sent to the dead-letter binding");
                let response = http::json(StatusCode::OK, &serde_json::json!({"outcome": "dead-lettered"}));
                (response, Settlement::DeadLetter { reason })
            }
            Err(error) => {
                tracing::error!(id = %message.id, %binding, ?error, "cannot dead-letter; refusing the message so it is redelivered");
                let response = http::json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": format!("dead-lettering failed: {error:?}"), "outcome": "retry"}),
                );
                (response, Settlement::Abandon { reason })
            }
        }
    }
}

/// A delivery's answer to daprd.
struct Answer<'a> {
    binding: &'a Binding,
    attempt: u32,
}

impl Acknowledge for Answer<'_> {
    type Output = Response<Body>;

    async fn acknowledge(self, message: Message, delivery: Delivery) -> (Response<Body>, Settlement) {
        let (response, settled) = match delivery.settlement {
            // Exactly 200: under a Dapr retry policy any other 2xx is a failure.
            Settlement::Complete => (http::empty_json(StatusCode::OK), Settlement::Complete),
            Settlement::Abandon { reason } => (
                http::json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": reason, "outcome": "retry"}),
                ),
                Settlement::Abandon { reason },
            ),
            Settlement::DeadLetter { reason } => self.binding.reject(&message, reason).await,
        };
        if response.status() != StatusCode::OK {
            self.binding.attempts.failed(&message.id);
        } else if self.attempt > 1 {
            self.binding.attempts.forget(&message.id);
        }
        (response, settled)
    }
}

impl Source for Binding {
    fn name(&self) -> &'static str {
        "dapr-binding"
    }

    fn claims(&self, request: &Request<Incoming>) -> bool {
        request.uri().path() == self.options.route
    }

    fn handle(self: Arc<Self>, dispatcher: Arc<Dispatcher>, request: Request<Incoming>) -> BoxFuture<Response<Body>> {
        Box::pin(async move {
            match *request.method() {
                Method::OPTIONS if authorized(&request, self.options.app_token.as_deref()) => {
                    if self.probes.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::info!(route = %self.options.route, "daprd probed the input binding route: subscribed");
                    }
                    http::empty_json(StatusCode::OK)
                }
                Method::OPTIONS => unauthorized(),
                Method::POST => self.deliver(&dispatcher, request).await,
                _ => http::error(StatusCode::METHOD_NOT_ALLOWED, "the binding route takes OPTIONS and POST"),
            }
        })
    }

    fn not_ready(&self) -> Option<String> {
        // Poison goes out through daprd.
        self.options.dead_letter_binding.as_ref().and_then(|_| self.outbound.not_ready())
    }

    fn readings(self: Arc<Self>) -> BoxFuture<Vec<Reading>> {
        Box::pin(async move {
            vec![
                Reading::gauge(
                    "sidecar_ready",
                    "1 when daprd's outbound API answers.",
                    u64::from(self.outbound.sidecar_ready()),
                ),
                Reading::counter(
                    "binding_probes_total",
                    "Subscription probes (OPTIONS) daprd sent.",
                    self.probes.load(Ordering::Relaxed),
                ),
            ]
        })
    }
}

/// The `dapr-api-token` check daprd's calls must pass when `APP_API_TOKEN`
/// is set.
pub fn authorized<B>(request: &Request<B>, expected: Option<&str>) -> bool {
    let Some(expected) = expected else { return true };
    let given = request.headers().get("dapr-api-token").map(|v| v.as_bytes()).unwrap_or_default();
    http::constant_time_eq(given, expected.as_bytes())
}

pub fn unauthorized() -> Response<Body> {
    http::error(StatusCode::UNAUTHORIZED, "missing or wrong dapr-api-token")
}

fn fallback_message(body: &[u8]) -> Message {
    Message { id: String::new(), body: body.to_vec(), content_type: None, metadata: vec![], delivery_count: None }
}
