//! The app → daprd direction: output bindings and sidecar readiness.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;

use super::codec;
use crate::metrics::Metrics;
use crate::outbound::{Outbound, OutboundMessage, SendError, SendFuture};

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
    http: Client<HttpConnector, Full<Bytes>>,
    retry: RetryPolicy,
}

impl DaprClient {
    /// `port` is `DAPR_HTTP_PORT`; `token` is `DAPR_API_TOKEN`, if set.
    pub fn new(port: u16, token: Option<String>, retry: RetryPolicy) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let http = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        DaprClient { base: format!("http://127.0.0.1:{port}"), token: token.filter(|t| !t.is_empty()), http, retry }
    }

    /// One probe of `GET /v1.0/healthz/outbound`: 204 once components are
    /// loaded. (Never `/v1.0/healthz`, which waits for this app.)
    pub async fn outbound_ready(&self) -> bool {
        let request = hyper::Request::get(format!("{}/v1.0/healthz/outbound", self.base)).body(Full::new(Bytes::new()));
        let Ok(request) = request else { return false };
        match tokio::time::timeout(Duration::from_secs(2), self.http.request(request)).await {
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
        let mut delay = self.retry.first_delay;
        let mut attempt = 1;
        loop {
            match self.create_once(binding, body.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && attempt < self.retry.attempts => {
                    tracing::debug!(%binding, attempt, error = %e, "binding call failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.retry.max_delay);
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn create_once(&self, binding: &str, body: Bytes) -> Result<(), BindingError> {
        let mut request = hyper::Request::builder()
            .method(Method::POST)
            .uri(format!("{}/v1.0/bindings/{binding}", self.base))
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("dapr-api-token", token);
        }
        if let Ok(Some(tp)) = TRACEPARENT.try_with(Clone::clone) {
            request = request.header("traceparent", tp);
        }
        let request = request.body(Full::new(body)).map_err(|e| BindingError::Unreachable(e.to_string()))?;
        let response = match tokio::time::timeout(self.retry.timeout, self.http.request(request)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => return Err(BindingError::Unreachable(e.to_string())),
            Err(_) => {
                return Err(BindingError::Unreachable(format!("no answer within {:?}", self.retry.timeout)));
            }
        };
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        if status.is_success() {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&body).trim().to_string();
        let (code, message) = match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(v) => (
                v["errorCode"].as_str().unwrap_or_default().to_string(),
                v["message"].as_str().map(str::to_string).unwrap_or_else(|| text.clone()),
            ),
            Err(_) => (String::new(), text),
        };
        Err(match status {
            StatusCode::UNAUTHORIZED => BindingError::Unauthorized(message),
            StatusCode::BAD_REQUEST => BindingError::Malformed { code, message },
            _ if code == "ERR_INVOKE_OUTPUT_BINDING"
                && (message.contains("not found") || message.contains("couldn't find")) =>
            {
                BindingError::UnknownBinding(binding.to_string(), message)
            }
            _ => BindingError::Failed { status: status.as_u16(), code, message },
        })
    }
}

/// Guest sends through Dapr output bindings.
pub struct DaprOutbound {
    client: DaprClient,
    metrics: Arc<Metrics>,
}

impl DaprOutbound {
    pub fn new(client: DaprClient, metrics: Arc<Metrics>) -> Self {
        DaprOutbound { client, metrics }
    }

    pub fn client(&self) -> &DaprClient {
        &self.client
    }
}

impl Outbound for DaprOutbound {
    fn send<'a>(&'a self, binding: &'a str, message: OutboundMessage) -> SendFuture<'a> {
        Box::pin(async move {
            let id = message.id.clone().unwrap_or_default();
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
}
