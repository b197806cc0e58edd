//! The HTTP plumbing both modes share: a hyper/tokio server with graceful
//! shutdown, bounded body reading, JSON replies, and the producer route.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::dispatch::{Dispatcher, ProduceError};
use crate::runtime::{self, FailureKind, Resource};

pub use crate::reply::{Body, empty_json, error, json, text};

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

/// How a listener protects itself from clients that hold connections.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// A request's headers must arrive within this, or the connection is
    /// closed (a half-sent request is held no longer).
    pub header_timeout: Duration,
    /// A connection with no request running or arriving for this long is
    /// closed. Above Go's 90 s idle time, so daprd closes its idle
    /// connections first and never sends on one being closed.
    pub idle_timeout: Duration,
    /// Connections at once; past it, a new connection gets a 503 and is closed.
    pub max_connections: usize,
    /// Connections kept for loopback peers (daprd, in a pod), on top of the
    /// rest: a flood from elsewhere cannot lock daprd out.
    pub loopback_reserve: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 1024,
            loopback_reserve: 64,
        }
    }
}

/// What a connection's requests are doing, for its idle time-out.
#[derive(Default)]
struct Activity {
    running: std::sync::atomic::AtomicUsize,
    /// Milliseconds since `epoch` of the last request's end.
    last: std::sync::atomic::AtomicU64,
}

/// Serves HTTP/1.1 on `listener` until `shutdown` turns true; then stops
/// accepting and lets open connections finish their requests for up to
/// `grace`. Connections are bounded by `limits` (header and idle time-outs,
/// a cap with a loopback reserve); a client over the cap gets a 503.
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
    limits: ListenerLimits,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let reserve = Arc::new(tokio::sync::Semaphore::new(limits.loopback_reserve));
    // Answering the shed costs a task and a descriptor each: bounded too.
    let shedding = Arc::new(tokio::sync::Semaphore::new(64));
    let mut connections = tokio::task::JoinSet::new();
    let mut shed = 0u64;
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
        while connections.try_join_next().is_some() {}
        let permit = admit(peer.ip(), &slots, &reserve);
        let Some(permit) = permit else {
            shed += 1;
            if shed.is_power_of_two() {
                tracing::warn!(%peer, shed, max = limits.max_connections, "too many connections: answering 503");
            }
            if let Ok(token) = Arc::clone(&shedding).try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream).await;
                    drop(token);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (handler, shutdown) = (handler.clone(), shutdown.clone());
        connections.spawn(async move {
            connection(stream, peer, handler, shutdown, limits).await;
            drop(permit);
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(?grace, open = connections.len(), "connections still open after the grace period; closing them");
        connections.abort_all();
    }
}

/// A slot for a new connection from `peer`: a general one, or one kept for
/// loopback peers; `None` when full.
fn admit(
    peer: std::net::IpAddr,
    slots: &Arc<tokio::sync::Semaphore>,
    reserve: &Arc<tokio::sync::Semaphore>,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    Arc::clone(slots)
        .try_acquire_owned()
        .ok()
        .or_else(|| peer.is_loopback().then(|| Arc::clone(reserve).try_acquire_owned().ok()).flatten())
}

/// One connection: its requests, its time-outs, and a graceful close when
/// the server stops.
async fn connection<H, F>(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    handler: H,
    mut shutdown: watch::Receiver<bool>,
    limits: ListenerLimits,
) where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let epoch = std::time::Instant::now();
    let activity = Arc::new(Activity::default());
    let seen = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |request| {
        let (handler, activity) = (handler.clone(), Arc::clone(&seen));
        async move {
            activity.running.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _done = RequestDone { activity: &activity, epoch };
            Ok::<_, Infallible>(handler(request).await)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.keep_alive(true).timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut closing = false;
    let check = (limits.idle_timeout / 4).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = crate::shutdown::requested(&mut shutdown), if !closing => {
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep(check), if !closing => {
                let idle_ms = (epoch.elapsed().as_millis() as u64)
                    .saturating_sub(activity.last.load(std::sync::atomic::Ordering::Relaxed));
                let running = activity.running.load(std::sync::atomic::Ordering::Relaxed);
                if running == 0 && Duration::from_millis(idle_ms) >= limits.idle_timeout {
                    tracing::debug!(%peer, "closing an idle connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Counts a request's end on every path (a dropped future included).
struct RequestDone<'a> {
    activity: &'a Activity,
    epoch: std::time::Instant,
}

impl Drop for RequestDone<'_> {
    fn drop(&mut self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.activity.last.store(now, std::sync::atomic::Ordering::Relaxed);
        self.activity.running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A 503 for a client over the connection cap, written without waiting on it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    const BODY: &str = "{\"error\":\"too many connections; retry shortly\"}";
    let reply = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(reply.as_bytes())).await;
}

/// The status a failed invocation maps to.
fn failure_status(kind: &FailureKind) -> StatusCode {
    match kind {
        FailureKind::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        FailureKind::ResourceLimit { resource: Resource::Pool, .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `POST /produce` (or whatever route is configured): hands the request to
/// the producer and returns its response.
pub async fn produce(dispatcher: Arc<Dispatcher>, request: Request<Incoming>, limit: usize) -> Response<Body> {
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
        Err(e @ ProduceError::NoProducer) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ ProduceError::NotLoaded) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
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

/// Compares without an early exit, so timing says nothing about a token.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
    fn a_full_listener_still_admits_loopback_peers_into_the_reserve() {
        let (slots, reserve) = (Arc::new(tokio::sync::Semaphore::new(2)), Arc::new(tokio::sync::Semaphore::new(1)));
        let outside: std::net::IpAddr = [10, 0, 0, 7].into();
        let daprd: std::net::IpAddr = [127, 0, 0, 1].into();
        let held: Vec<_> = (0..2).filter_map(|_| admit(outside, &slots, &reserve)).collect();
        assert_eq!(held.len(), 2);
        assert!(admit(outside, &slots, &reserve).is_none(), "the flood is shed");
        let kept = admit(daprd, &slots, &reserve);
        assert!(kept.is_some(), "daprd still gets in");
        assert!(admit(daprd, &slots, &reserve).is_none(), "the reserve is bounded too");
        drop(held);
        assert!(admit(outside, &slots, &reserve).is_some(), "slots come back");
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret!", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
