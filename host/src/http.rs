//! The HTTP plumbing both modes share: a hyper/tokio server with graceful
//! shutdown, bounded body reading, JSON replies, and the producer route.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::dispatch::{Dispatcher, ProduceError};
use crate::metrics::Metrics;
use crate::runtime::{self, FailureKind, Resource};

/// The body type of every response.
pub type Body = Full<Bytes>;

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    json_bytes(status, Bytes::from(value.to_string()))
}

/// `{}` with `status`: the answer daprd needs, without building a value.
pub fn empty_json(status: StatusCode) -> Response<Body> {
    json_bytes(status, Bytes::from_static(b"{}"))
}

fn json_bytes(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("application/json"));
    response
}

/// A JSON `{"error": ...}` response.
pub fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}

/// A plain-text response.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("could not read the request body: {0}")]
    Read(String),
}

impl BodyError {
    /// The reply for the client: 413 with a JSON reason, or 400.
    pub fn response(&self) -> Response<Body> {
        match self {
            BodyError::TooLarge(_) => error(StatusCode::PAYLOAD_TOO_LARGE, self.to_string()),
            BodyError::Read(_) => error(StatusCode::BAD_REQUEST, self.to_string()),
        }
    }
}

/// Past the limit, this much more is read and thrown away so that the client,
/// still sending, gets to read the 413 instead of a broken pipe.
const DRAIN_CAP: usize = 16 << 20;

/// Reads a whole body, refusing more than `limit` bytes (declared or sent,
/// chunked or not).
pub async fn read_body(mut body: Incoming, declared: Option<u64>, limit: usize) -> Result<Bytes, BodyError> {
    let mut kept = bytes::BytesMut::new();
    let mut seen: usize = 0;
    let mut too_large = declared.is_some_and(|len| len > limit as u64);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > limit {
            too_large = true;
        }
        if too_large {
            if seen > limit.saturating_add(DRAIN_CAP) {
                break;
            }
            continue;
        }
        kept.extend_from_slice(&data);
    }
    if too_large {
        return Err(BodyError::TooLarge(limit));
    }
    Ok(kept.freeze())
}

/// The declared `content-length`, if any.
pub fn content_length<B>(request: &Request<B>) -> Option<u64> {
    request.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
}

/// Serves HTTP/1.1 on `listener` until `shutdown` turns true; then stops
/// accepting and lets open connections finish their requests for up to
/// `grace`.
pub async fn serve<H, F>(listener: TcpListener, handler: H, mut shutdown: watch::Receiver<bool>, grace: Duration)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::shutdown::requested(&mut shutdown) => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = hyper::service::service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(request).await) }
        });
        let connection =
            hyper::server::conn::http1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!(?grace, "connections still open after the grace period; closing them");
    }
}

/// The status a failed invocation maps to.
pub fn failure_status(kind: &FailureKind) -> StatusCode {
    match kind {
        FailureKind::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        FailureKind::ResourceLimit { resource: Resource::Pool, .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `POST /produce` (or whatever route is configured): hands the request to
/// the producer and returns its response.
pub async fn produce(
    dispatcher: Arc<Dispatcher>,
    metrics: Arc<Metrics>,
    request: Request<Incoming>,
    limit: usize,
) -> Response<Body> {
    metrics.requests.fetch_add(1, Ordering::Relaxed);
    let declared = content_length(&request);
    let (parts, body) = request.into_parts();
    let body = match read_body(body, declared, limit).await {
        Ok(body) => body,
        Err(e) => return e.response(),
    };
    let headers = parts
        .headers
        .iter()
        .filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str().to_string(), v.to_string())))
        .collect();
    let guest_request = runtime::Request {
        method: parts.method.as_str().to_string(),
        path: parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into()),
        headers,
        body: body.to_vec(),
    };
    match dispatcher.produce(&guest_request).await {
        Ok(answer) => {
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut response = text(status, answer.body);
            for (name, value) in answer.headers {
                if let (Ok(name), Ok(value)) = (
                    hyper::header::HeaderName::from_bytes(name.as_bytes()),
                    hyper::header::HeaderValue::from_str(&value),
                ) {
                    response.headers_mut().append(name, value);
                }
            }
            response
        }
        Err(ProduceError::NoProducer) => error(StatusCode::NOT_FOUND, "this host runs no producer"),
        Err(ProduceError::Invoke(e)) => error(failure_status(&e.kind), e.to_string()),
    }
}

/// The `/readyz` body: readiness, why not, and every live module with its
/// reload state (a refused new file shows as `last_error`).
pub fn readiness(
    ready: bool,
    reason: Option<&str>,
    dispatcher: &Dispatcher,
    reload: &crate::reload::ReloadStatus,
) -> serde_json::Value {
    let live: serde_json::Map<String, serde_json::Value> =
        dispatcher.live_modules().into_iter().map(|(role, label)| (role.to_string(), label.into())).collect();
    serde_json::json!({"ready": ready, "reason": reason, "modules": live, "reload": reload.snapshot()})
}
