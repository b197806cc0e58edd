//! The app → daprd direction: output bindings and sidecar readiness.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};

use super::codec;
use super::connections::SidecarConnections;
use crate::metrics::Metrics;
use crate::runtime::outbound::{Outbound, OutboundMessage, SendError, SendFuture};

tokio::task_local! {
    /// The W3C trace context of the request or delivery being handled, so a
    /// guest's sends continue its trace.
    pub static TRACEPARENT: Option<String>;
}

/// How sends to daprd are retried. daprd itself retries Service Bus sends
/// for up to minutes, so one attempt may take long: the timeout is generous.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub first_delay: Duration,
    pub max_delay: Duration,
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            timeout: Duration::from_secs(120),
        }
    }
}

/// Why daprd did not take a binding request.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BindingError {
    #[error("daprd refused the API token (401): {0}")]
    Unauthorized(String),
    #[error("daprd rejected the request (400 {code}): {message}")]
    Malformed { code: String, message: String },
    #[error("daprd has no output binding {0:?}: {1}")]
    UnknownBinding(String, String),
    #[error("daprd failed to invoke the binding ({status} {code}): {message}")]
    Failed { status: u16, code: String, message: String },
    #[error("daprd is unreachable: {0}")]
    Unreachable(String),
}

impl BindingError {
    fn is_transient(&self) -> bool {
        matches!(self, BindingError::Failed { .. } | BindingError::Unreachable(_))
    }
}

impl From<BindingError> for SendError {
    fn from(e: BindingError) -> SendError {
        match e {
            BindingError::UnknownBinding(..) => SendError::UnknownBinding(e.to_string()),
            BindingError::Unauthorized(_) | BindingError::Malformed { .. } => SendError::Rejected(e.to_string()),
            BindingError::Failed { .. } | BindingError::Unreachable(_) => SendError::Unavailable(e.to_string()),
        }
    }
}

/// A client for the local daprd's HTTP API.
#[derive(Clone)]
pub struct DaprClient {
    base: String,
    token: Option<String>,
    http: Arc<SidecarConnections>,
    retry: RetryPolicy,
}

impl DaprClient {
    /// `port` is `DAPR_HTTP_PORT`; `token` is `DAPR_API_TOKEN`, if set.
    pub fn new(port: u16, token: Option<String>, retry: RetryPolicy) -> Self {
        let (base, token) = (format!("http://127.0.0.1:{port}"), token.filter(|t| !t.is_empty()));
        DaprClient { base, token, http: Arc::new(SidecarConnections::new()), retry }
    }

    /// At the stop signal: closes idle connections to daprd and pools no
    /// more (see [`super::connections`] for why daprd needs it).
    pub fn let_go_of_idle_connections(&self) {
        self.http.let_go();
    }

    /// One probe of `GET /v1.0/healthz/outbound`: 204 once components are
    /// loaded. (Never `/v1.0/healthz`, which waits for this app.)
    async fn outbound_ready(&self) -> bool {
        let request = hyper::Request::get(format!("{}/v1.0/healthz/outbound", self.base)).body(Full::new(Bytes::new()));
        let Ok(request) = request else { return false };
        match tokio::time::timeout(Duration::from_secs(2), self.http.client().request(request)).await {
            Ok(Ok(response)) => response.status().is_success(),
            _ => false,
        }
    }

    /// `POST /v1.0/bindings/<name>` with `operation: create`, retried with
    /// backoff while the failure may be transient.
    pub async fn create(
        &self,
        binding: &str,
        data: &serde_json::Value,
        metadata: &[(String, String)],
    ) -> Result<(), BindingError> {
        let metadata: serde_json::Map<String, serde_json::Value> =
            metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        let body = serde_json::json!({ "data": data, "metadata": metadata, "operation": "create" }).to_string();
        let body = Bytes::from(body);
        self.with_retries(binding, || self.create_once(binding, body.clone())).await
    }

    /// `POST /v1.0/publish/<pubsub>/<topic>`: the body as it is, under its
    /// content type, with `metadata` as `metadata.<key>` query parameters;
    /// retried like [`DaprClient::create`].
    pub async fn publish(
        &self,
        pubsub: &str,
        topic: &str,
        body: Bytes,
        content_type: &str,
        metadata: &[(String, String)],
    ) -> Result<(), BindingError> {
        let query: Vec<String> = metadata
            .iter()
            .map(|(k, v)| format!("metadata.{}={}", codec::query_escape(k), codec::query_escape(v)))
            .collect();
        let path = format!("/v1.0/publish/{pubsub}/{topic}?{}", query.join("&"));
        let target = format!("{pubsub}/{topic}");
        self.with_retries(&target, || self.post(&path, &target, body.clone(), content_type)).await
    }

    async fn with_retries<F, Fut>(&self, target: &str, attempt_once: F) -> Result<(), BindingError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<(), BindingError>>,
    {
        let mut delay = self.retry.first_delay;
        let mut attempt = 1;
        loop {
            match attempt_once().await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && attempt < self.retry.attempts => {
                    tracing::debug!(%target, attempt, error = %e, "daprd call failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.retry.max_delay);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn create_once(&self, binding: &str, body: Bytes) -> Result<(), BindingError> {
        self.post(&format!("/v1.0/bindings/{binding}"), binding, body, "application/json").await
    }

    /// One POST to daprd; `target` names the binding or topic in errors.
    async fn post(&self, path: &str, target: &str, body: Bytes, content_type: &str) -> Result<(), BindingError> {
        let mut request = hyper::Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.base))
            .header("content-type", content_type);
        if let Some(token) = &self.token {
            request = request.header("dapr-api-token", token);
        }
        if let Ok(Some(tp)) = TRACEPARENT.try_with(Clone::clone) {
            request = request.header("traceparent", tp);
        }
        let request = request.body(Full::new(body)).map_err(|e| BindingError::Unreachable(e.to_string()))?;
        // The whole answer, body included: one broken off midway is not a
        // success, whatever its status line said.
        let exchange = async {
            let response =
                self.http.client().request(request).await.map_err(|e| BindingError::Unreachable(e.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| BindingError::Unreachable(format!("daprd's answer ({status}) broke off: {e}")))?;
            Ok((status, body.to_bytes()))
        };
        let (status, body) = match tokio::time::timeout(self.retry.timeout, exchange).await {
            Ok(answer) => answer?,
            Err(_) => {
                return Err(BindingError::Unreachable(format!("no answer within {:?}", self.retry.timeout)));
            }
        };
        if status.is_success() {
            return Ok(());
        }
        Err(error_answer(status, &body, target))
    }
}

/// What daprd's answer to a failed POST means: its status and body (Dapr's
/// `{"errorCode": ..., "message": ...}`, or any text) as a [`BindingError`];
/// `target` names the binding or topic.
pub(crate) fn error_answer(status: StatusCode, body: &[u8], target: &str) -> BindingError {
    let text = String::from_utf8_lossy(body).trim().to_string();
    let (code, message) = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => (
            v["errorCode"].as_str().unwrap_or_default().to_string(),
            v["message"].as_str().map(str::to_string).unwrap_or_else(|| text.clone()),
        ),
        Err(_) => (String::new(), text),
    };
    match status {
        StatusCode::UNAUTHORIZED => BindingError::Unauthorized(message),
        StatusCode::BAD_REQUEST => BindingError::Malformed { code, message },
        _ if code == "ERR_INVOKE_OUTPUT_BINDING"
            && (message.contains("not found") || message.contains("couldn't find")) =>
        {
            BindingError::UnknownBinding(target.to_string(), message)
        }
        StatusCode::NOT_FOUND if code.starts_with("ERR_PUBSUB") || code == "ERR_TOPIC_NAME_EMPTY" => {
            BindingError::UnknownBinding(target.to_string(), message)
        }
        StatusCode::FORBIDDEN => BindingError::Malformed { code, message },
        _ => BindingError::Failed { status: status.as_u16(), code, message },
    }
}

/// Guest sends through Dapr output bindings, or pub/sub topics where a
/// binding name is mapped to one.
pub struct DaprOutbound {
    client: DaprClient,
    metrics: Arc<Metrics>,
    /// Binding name → (pub/sub component, topic).
    topics: BTreeMap<String, (String, String)>,
    /// Set while daprd's outbound API answers.
    ready: AtomicBool,
}

impl DaprOutbound {
    pub fn new(client: DaprClient, metrics: Arc<Metrics>) -> Self {
        DaprOutbound { client, metrics, topics: BTreeMap::new(), ready: AtomicBool::new(false) }
    }

    /// Sends to `binding` publish to `pubsub`'s `topic` instead.
    pub fn with_topic(mut self, binding: &str, pubsub: &str, topic: &str) -> Self {
        self.topics.insert(binding.to_string(), (pubsub.to_string(), topic.to_string()));
        self
    }

    pub fn client(&self) -> &DaprClient {
        &self.client
    }

    /// Keeps readiness current by polling daprd's outbound health: fast
    /// until it first answers, then every few seconds, until `stopped`.
    pub async fn watch(self: Arc<Self>, mut stopped: tokio::sync::watch::Receiver<bool>) {
        let mut was = false;
        loop {
            let ready = self.client.outbound_ready().await;
            self.ready.store(ready, Ordering::Relaxed);
            if ready != was {
                tracing::info!(ready, "daprd outbound API (/v1.0/healthz/outbound)");
                was = ready;
            }
            let pause = if ready { Duration::from_secs(5) } else { Duration::from_millis(200) };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = crate::shutdown::requested(&mut stopped) => return,
            }
        }
    }

    /// Whether daprd's outbound API answered last time it was asked.
    pub fn sidecar_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

impl Outbound for DaprOutbound {
    fn send<'a>(&'a self, binding: &'a str, message: OutboundMessage) -> SendFuture<'a> {
        Box::pin(async move {
            let id = message.id.clone().unwrap_or_default();
            if let Some((pubsub, topic)) = self.topics.get(binding) {
                let content_type = message.content_type.clone().unwrap_or_else(|| {
                    let json = serde_json::from_slice::<serde::de::IgnoredAny>(&message.body).is_ok();
                    if json { "application/json" } else { "application/octet-stream" }.to_string()
                });
                let mut metadata = message.metadata;
                metadata.retain(|(k, _)| k != "MessageId" && k != "id");
                // Service Bus takes it as the message id; other brokers keep it as a property.
                metadata.push(("MessageId".to_string(), id.clone()));
                self.client.publish(pubsub, topic, Bytes::from(message.body), &content_type, &metadata).await?;
                self.metrics.sent.fetch_add(1, Ordering::Relaxed);
                return Ok(id);
            }
            let (data, extra) = codec::encode_data(&message.body, message.content_type.as_deref());
            let mut metadata = message.metadata;
            metadata.retain(|(k, _)| k != "MessageId" && k != "id" && !k.starts_with("wasmpc-"));
            metadata.push(("MessageId".to_string(), id.clone()));
            metadata.extend(extra);
            self.client.create(binding, &data, &metadata).await?;
            self.metrics.sent.fetch_add(1, Ordering::Relaxed);
            Ok(id)
        })
    }

    fn not_ready(&self) -> Option<String> {
        (!self.sidecar_ready()).then(|| "waiting for daprd's outbound API (/v1.0/healthz/outbound)".to_string())
    }
}
