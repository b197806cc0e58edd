//! The daprd → app direction: the input binding route, the subscription
//! probe, the producer route and health, on one HTTP/1.1 listener.
//!
//! | request | answer |
//! |---|---|
//! | `OPTIONS /<route>` | 200 at once (daprd's subscription probe; anything but 2xx/405 silently unsubscribes) |
//! | `POST /<route>` | **exactly 200** after the consumer succeeded; 500 + JSON reason otherwise (daprd abandons, Service Bus redelivers) |
//! | other methods on `/<route>` | 405 |
//! | `POST /produce` | the producer's response |
//! | `GET /healthz` | 200 while the process runs (no token: daprd sends none to health probes) |
//! | `GET /readyz` | 200 when modules are loaded and, for producers, daprd's outbound API answers; 503 with the reason otherwise |
//! | `GET /metrics` | Prometheus text |
//!
//! With `APP_API_TOKEN` set, the probe and deliveries must carry a matching
//! `dapr-api-token` (compared in constant time), or get 401.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::Semaphore;

use super::attempts::Attempts;
use super::client::{DaprOutbound, TRACEPARENT};
use super::codec;
use crate::dispatch::{Dispatcher, Settlement};
use crate::http::{self, Body};
use crate::metrics::Metrics;
use crate::outbound::{Outbound, OutboundMessage};
use crate::reload::ReloadStatus;
use crate::runtime::Message;

/// How the app side is set up.
#[derive(Debug, Clone)]
pub struct AppOptions {
    /// The input binding's route (`/` + component name, or its `route` metadata); `None` for producer-only hosts.
    pub input_route: Option<String>,
    /// Where requests for the producer arrive; `None` for consumer-only hosts.
    pub produce_route: Option<String>,
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

/// State shared by every request.
pub struct App {
    options: AppOptions,
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    outbound: Arc<DaprOutbound>,
    deliveries: Semaphore,
    attempts: Attempts,
    /// Set while daprd's outbound API answers (producers need it).
    pub sidecar_ready: AtomicBool,
    /// Set after SIGTERM: still serving, but reporting not ready.
    pub draining: AtomicBool,
    peak_in_flight: AtomicU64,
    /// Subscription probes answered (daprd sends one per binding start).
    probes: AtomicU64,
    reload: ReloadStatus,
}

impl App {
    pub fn new(
        options: AppOptions,
        dispatcher: Arc<Dispatcher>,
        metrics: Arc<Metrics>,
        outbound: Arc<DaprOutbound>,
        reload: ReloadStatus,
    ) -> Self {
        let permits = options.max_concurrency.max(1);
        let attempts = Attempts::new(options.attempt_memory);
        App {
            options,
            dispatcher,
            metrics,
            outbound,
            deliveries: Semaphore::new(permits),
            attempts,
            sidecar_ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            peak_in_flight: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            reload,
        }
    }

    /// Deliveries running now.
    pub fn in_flight(&self) -> u64 {
        self.metrics.in_flight.load(Ordering::Relaxed)
    }

    /// Routes one request.
    pub async fn handle(self: Arc<Self>, request: Request<Incoming>) -> Response<Body> {
        let path = request.uri().path();
        if self.options.input_route.as_deref() == Some(path) {
            return match *request.method() {
                Method::OPTIONS if self.authorized(&request) => {
                    if self.probes.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::info!(route = %path, "daprd probed the input binding route: subscribed");
                    }
                    http::empty_json(StatusCode::OK)
                }
                Method::OPTIONS => unauthorized(),
                Method::POST => self.deliver(request).await,
                _ => http::error(StatusCode::METHOD_NOT_ALLOWED, "the binding route takes OPTIONS and POST"),
            };
        }
        if self.options.produce_route.as_deref() == Some(path) {
            if request.method() != Method::POST {
                return http::error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
            }
            let traceparent = header(&request, "traceparent");
            let (dispatcher, metrics, limit) =
                (Arc::clone(&self.dispatcher), Arc::clone(&self.metrics), self.options.max_body_bytes);
            return TRACEPARENT.scope(traceparent, http::produce(dispatcher, metrics, request, limit)).await;
        }
        match (request.method(), path) {
            (&Method::GET, "/healthz") => http::text(StatusCode::OK, "ok\n"),
            (&Method::GET, "/readyz") => self.readiness(),
            (&Method::GET, "/metrics") => http::text(StatusCode::OK, self.render_metrics()),
            (_, "/healthz" | "/readyz" | "/metrics") => http::error(StatusCode::METHOD_NOT_ALLOWED, "use GET"),
            _ => http::error(StatusCode::NOT_FOUND, format!("no route {path}")),
        }
    }

    fn authorized<B>(&self, request: &Request<B>) -> bool {
        let Some(expected) = &self.options.app_token else {
            return true;
        };
        let given = request.headers().get("dapr-api-token").map(|v| v.as_bytes()).unwrap_or_default();
        constant_time_eq(given, expected.as_bytes())
    }

    async fn deliver(&self, request: Request<Incoming>) -> Response<Body> {
        if !self.authorized(&request) {
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
            Err(e) => return self.reject(&fallback_message(&body), e.to_string()).await,
        };
        let _permit = match self.deliveries.acquire().await {
            Ok(permit) => permit,
            Err(_) => return http::error(StatusCode::SERVICE_UNAVAILABLE, "shutting down"),
        };
        let in_flight = self.metrics.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_in_flight.fetch_max(in_flight, Ordering::Relaxed);
        let attempt = self.attempts.estimate(&decoded.id);
        let message = Message {
            id: decoded.id,
            body: decoded.body,
            content_type: decoded.content_type,
            metadata: decoded.metadata,
            delivery_count: Some(attempt),
        };
        let traceparent = message.metadata.iter().find(|(k, _)| k == "traceparent").map(|(_, v)| v.clone());
        let delivery = TRACEPARENT.scope(traceparent, self.dispatcher.deliver(&message)).await;
        self.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
        let response = match delivery.settlement {
            Settlement::Complete => {
                self.metrics.record(&Settlement::Complete, None);
                // Exactly 200: under a Dapr retry policy any other 2xx is a failure.
                http::empty_json(StatusCode::OK)
            }
            Settlement::Abandon { reason } => {
                self.metrics.record(&Settlement::Abandon { reason: reason.clone() }, delivery.failure.as_ref());
                http::json(StatusCode::INTERNAL_SERVER_ERROR, &serde_json::json!({"error": reason, "outcome": "retry"}))
            }
            Settlement::DeadLetter { reason } => self.reject(&message, reason).await,
        };
        if response.status() != StatusCode::OK {
            self.attempts.failed(&message.id);
        } else if attempt > 1 {
            self.attempts.forget(&message.id);
        }
        response
    }

    /// A poison message: to the dead-letter binding if there is one (then
    /// acknowledge), else refuse it until Service Bus dead-letters it after
    /// the queue's max delivery count.
    async fn reject(&self, message: &Message, reason: String) -> Response<Body> {
        let Some(binding) = &self.options.dead_letter_binding else {
            self.metrics.record(&Settlement::Abandon { reason: reason.clone() }, None);
            tracing::warn!(id = %message.id, %reason, "poison message: no dead-letter binding configured, so it is refused until Service Bus dead-letters it after the queue's max delivery count");
            return http::json(
                StatusCode::INTERNAL_SERVER_ERROR,
                &serde_json::json!({"error": reason, "outcome": "reject"}),
            );
        };
        let mut metadata = message.metadata.clone();
        metadata.push(("deadletter-reason".to_string(), reason.clone()));
        if let Some(route) = &self.options.input_route {
            metadata.push(("deadletter-source".to_string(), route.trim_start_matches('/').to_string()));
        }
        let copy = OutboundMessage {
            id: Some(message.id.clone()),
            body: message.body.clone(),
            content_type: message.content_type.clone(),
            metadata,
        };
        match self.outbound.send(binding, copy).await {
            Ok(_) => {
                self.metrics.record(&Settlement::DeadLetter { reason: reason.clone() }, None);
                tracing::warn!(id = %message.id, %binding, %reason, "poison message sent to the dead-letter binding");
                http::json(StatusCode::OK, &serde_json::json!({"outcome": "dead-lettered"}))
            }
            Err(error) => {
                self.metrics.record(&Settlement::Abandon { reason: reason.clone() }, None);
                tracing::error!(id = %message.id, %binding, ?error, "cannot dead-letter; refusing the message so it is redelivered");
                http::json(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &serde_json::json!({"error": format!("dead-lettering failed: {error:?}"), "outcome": "retry"}),
                )
            }
        }
    }

    fn readiness(&self) -> Response<Body> {
        let needs_sidecar = self.options.produce_route.is_some() || self.options.dead_letter_binding.is_some();
        let sidecar = self.sidecar_ready.load(Ordering::Relaxed);
        let reason = if self.draining.load(Ordering::Relaxed) {
            Some("draining after SIGTERM")
        } else if needs_sidecar && !sidecar {
            Some("waiting for daprd's outbound API (/v1.0/healthz/outbound)")
        } else {
            None
        };
        let status = if reason.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        http::json(status, &http::readiness(reason.is_none(), reason, &self.dispatcher, &self.reload))
    }

    fn render_metrics(&self) -> String {
        let gauges = [
            ("in_flight_peak", "Most deliveries that ran at once.", self.peak_in_flight.load(Ordering::Relaxed)),
            (
                "sidecar_ready",
                "1 when daprd's outbound API answers.",
                u64::from(self.sidecar_ready.load(Ordering::Relaxed)),
            ),
            ("binding_probes", "Subscription probes (OPTIONS) daprd sent.", self.probes.load(Ordering::Relaxed)),
        ];
        self.metrics.render(&self.dispatcher.live_modules(), &gauges)
    }
}

fn unauthorized() -> Response<Body> {
    http::error(StatusCode::UNAUTHORIZED, "missing or wrong dapr-api-token")
}

fn header<B>(request: &Request<B>, name: &str) -> Option<String> {
    request.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
}

fn fallback_message(body: &[u8]) -> Message {
    Message { id: String::new(), body: body.to_vec(), content_type: None, metadata: vec![], delivery_count: None }
}

/// Compares without an early exit, so timing says nothing about the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, y) in b.iter().enumerate() {
        let x = a.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret!", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
