//! Dapr pub/sub as a source: the host subscribes to one topic, and daprd
//! POSTs each event (see `docs/dapr-pubsub-contract.md`).
//!
//! | request | answer |
//! |---|---|
//! | `GET /dapr/subscribe` | the subscription: pubsub, topic, route, and `deadLetterTopic`, `rawPayload`, `bulkSubscribe` where set |
//! | `POST /<route>`, one CloudEvent | 200 `{"status":"SUCCESS"}` after the consumer succeeded; `RETRY` when it asked for a retry or failed; `DROP` for poison (daprd moves it to the dead-letter topic when there is one) |
//! | `POST /<route>`, a bulk delivery | 200 `{"statuses":[{"entryId","status"}]}`, one per entry |
//!
//! Every answer is a 200 with a status: daprd reads 404 as DROP, so a route
//! mistake would silently discard messages; a status never does. With
//! `APP_API_TOKEN` set, daprd's calls must carry it. The guest's delivery
//! count is the broker's where the component gives one (Service Bus's
//! `metadata.deliverycount`), else the host's estimate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::Semaphore;

use super::attempts::Attempts;
use super::binding::{authorized, unauthorized};
use super::client::TRACEPARENT;
use super::cloudevent::{self, Event};
use crate::dispatch::{Acknowledge, BoxFuture, Delivery, Dispatcher, Settlement, Source};
use crate::http::{self, Body};
use crate::metrics::Reading;
use crate::runtime::Message;

/// How the subscription is set up.
#[derive(Debug, Clone)]
pub struct PubSubOptions {
    /// The pub/sub Component's name.
    pub pubsub: String,
    pub topic: String,
    /// Where daprd delivers.
    pub route: String,
    /// Where daprd moves dropped (poison) events; without one they are discarded.
    pub dead_letter_topic: Option<String>,
    /// Subscribe with `rawPayload`: events published without an envelope.
    pub raw_payload: bool,
    /// Subscribe in bulk, with at most this many events per delivery.
    pub bulk: Option<u32>,
    pub app_token: Option<String>,
    /// Events handled at once.
    pub max_concurrency: usize,
    pub max_body_bytes: usize,
    pub attempt_memory: usize,
}

/// The status daprd reads in an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Success,
    Retry,
    Drop,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Success => "SUCCESS",
            Status::Retry => "RETRY",
            Status::Drop => "DROP",
        }
    }
}

/// The subscription and its route.
pub struct PubSub {
    options: PubSubOptions,
    deliveries: Arc<Semaphore>,
    attempts: Attempts,
    /// Subscription requests daprd made.
    asked: AtomicU64,
}

impl PubSub {
    pub fn new(options: PubSubOptions) -> Self {
        let deliveries = Arc::new(Semaphore::new(options.max_concurrency.max(1)));
        let attempts = Attempts::new(options.attempt_memory);
        PubSub { options, deliveries, attempts, asked: AtomicU64::new(0) }
    }

    /// The `GET /dapr/subscribe` answer (metadata values are strings, or
    /// daprd starts no subscription at all).
    fn subscription(&self) -> serde_json::Value {
        let o = &self.options;
        let mut entry = serde_json::json!({"pubsubname": o.pubsub, "topic": o.topic, "route": o.route});
        if let Some(topic) = &o.dead_letter_topic {
            entry["deadLetterTopic"] = topic.clone().into();
        }
        if o.raw_payload {
            entry["metadata"] = serde_json::json!({"rawPayload": "true"});
        }
        if let Some(max) = o.bulk {
            entry["bulkSubscribe"] =
                serde_json::json!({"enabled": true, "maxMessagesCount": max, "maxAwaitDurationMs": 100});
        }
        serde_json::json!([entry])
    }

    async fn deliver(self: Arc<Self>, dispatcher: Arc<Dispatcher>, request: Request<Incoming>) -> Response<Body> {
        if !authorized(&request, self.options.app_token.as_deref()) {
            return unauthorized();
        }
        let declared = http::content_length(&request);
        let (parts, body) = request.into_parts();
        let body = match http::read_body(body, declared, self.options.max_body_bytes).await {
            Ok(body) => body,
            Err(e) => return e.response(),
        };
        let headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_ascii_lowercase(), v.to_string())))
            .collect();
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
            // It will never decode: poison.
            return status(Status::Drop);
        };
        if json.get("type").and_then(serde_json::Value::as_str) == Some("com.dapr.event.sent.bulk") {
            return self.deliver_bulk(dispatcher, &json).await;
        }
        match cloudevent::decode(&json, &headers) {
            Ok(event) => status(self.deliver_one(&dispatcher, event).await),
            Err(error) => {
                tracing::warn!(%error, "undecodable event dropped");
                dispatcher.metrics().record(&Settlement::DeadLetter { reason: error.to_string() }, None);
                status(Status::Drop)
            }
        }
    }

    async fn deliver_one(&self, dispatcher: &Dispatcher, event: Event) -> Status {
        let Ok(_permit) = self.deliveries.acquire().await else { return Status::Retry };
        let estimated = event.delivery_count.is_none();
        let delivery_count = event.delivery_count.unwrap_or_else(|| self.attempts.estimate(&event.id));
        let message = Message {
            id: event.id,
            body: event.body,
            content_type: event.content_type,
            metadata: event.metadata,
            delivery_count: Some(delivery_count),
        };
        let traceparent = message.metadata.iter().find(|(k, _)| k == "traceparent").map(|(_, v)| v.clone());
        let answer = Answer { pubsub: self, estimated, delivery_count };
        TRACEPARENT.scope(traceparent, dispatcher.deliver("dapr-pubsub", message, answer)).await
    }

    /// One status per entry; entries run at once, as far as the
    /// concurrency allows.
    async fn deliver_bulk(self: Arc<Self>, dispatcher: Arc<Dispatcher>, body: &serde_json::Value) -> Response<Body> {
        let entries = match cloudevent::bulk_entries(body) {
            Ok(entries) => entries,
            // Not an entry can be read: a 200 with no statuses makes daprd retry all.
            Err(error) => {
                tracing::warn!(%error, "undecodable bulk delivery");
                return http::json(StatusCode::OK, &serde_json::json!({"statuses": []}));
            }
        };
        let mut running = tokio::task::JoinSet::new();
        for (index, (entry_id, event, metadata)) in entries.into_iter().enumerate() {
            let (pubsub, dispatcher) = (Arc::clone(&self), Arc::clone(&dispatcher));
            running.spawn(async move {
                let status = match cloudevent::decode(&event, &metadata) {
                    Ok(event) => pubsub.deliver_one(&dispatcher, event).await,
                    Err(error) => {
                        tracing::warn!(%error, %entry_id, "undecodable bulk entry dropped");
                        Status::Drop
                    }
                };
                (index, entry_id, status)
            });
        }
        let mut statuses = Vec::new();
        while let Some(done) = running.join_next().await {
            if let Ok(done) = done {
                statuses.push(done);
            }
        }
        statuses.sort_by_key(|(index, _, _)| *index);
        let statuses: Vec<serde_json::Value> = statuses
            .into_iter()
            .map(|(_, entry_id, status)| serde_json::json!({"entryId": entry_id, "status": status.as_str()}))
            .collect();
        http::json(StatusCode::OK, &serde_json::json!({ "statuses": statuses }))
    }
}

/// One event's status for daprd.
struct Answer<'a> {
    pubsub: &'a PubSub,
    /// The delivery count is the host's estimate (the component gave none).
    estimated: bool,
    delivery_count: u32,
}

impl Acknowledge for Answer<'_> {
    type Output = Status;

    async fn acknowledge(self, message: Message, delivery: Delivery) -> (Status, Settlement) {
        let status = match &delivery.settlement {
            Settlement::Complete => Status::Success,
            Settlement::Abandon { .. } => Status::Retry,
            Settlement::DeadLetter { reason } => {
                let to = self.pubsub.options.dead_letter_topic.as_deref().unwrap_or("nowhere (no dead-letter topic)");
                tracing::warn!(id = %message.id, %reason, %to, "poison event dropped");
                Status::Drop
            }
        };
        if self.estimated {
            match status {
                Status::Retry => self.pubsub.attempts.failed(&message.id),
                _ if self.delivery_count > 1 => self.pubsub.attempts.forget(&message.id),
                _ => {}
            }
        }
        (status, delivery.settlement)
    }
}

fn status(status: Status) -> Response<Body> {
    http::json(StatusCode::OK, &serde_json::json!({ "status": status.as_str() }))
}

impl Source for PubSub {
    fn name(&self) -> &'static str {
        "dapr-pubsub"
    }

    fn claims(&self, request: &Request<Incoming>) -> bool {
        let path = request.uri().path();
        path == "/dapr/subscribe" || path == self.options.route
    }

    fn handle(self: Arc<Self>, dispatcher: Arc<Dispatcher>, request: Request<Incoming>) -> BoxFuture<Response<Body>> {
        Box::pin(async move {
            match (request.method(), request.uri().path()) {
                (&Method::GET, "/dapr/subscribe") if authorized(&request, self.options.app_token.as_deref()) => {
                    if self.asked.fetch_add(1, Ordering::Relaxed) == 0 {
                        tracing::info!(pubsub = %self.options.pubsub, topic = %self.options.topic, route = %self.options.route, "daprd asked for subscriptions");
                    }
                    http::json(StatusCode::OK, &self.subscription())
                }
                (&Method::GET, "/dapr/subscribe") => unauthorized(),
                (&Method::POST, _) => self.deliver(dispatcher, request).await,
                _ => http::error(StatusCode::METHOD_NOT_ALLOWED, "use POST"),
            }
        })
    }

    fn readings(self: Arc<Self>) -> BoxFuture<Vec<Reading>> {
        Box::pin(async move {
            vec![Reading::counter(
                "subscription_requests_total",
                "Times daprd asked for subscriptions.",
                self.asked.load(Ordering::Relaxed),
            )]
        })
    }
}
