//! A daprd double that follows section 11 of `shared/dapr-contract.md` for
//! bindings and `docs/dapr-pubsub-contract.md` for pub/sub (the Service Bus
//! queues component's behaviour).
//!
//! It is written from the contract, not from the host: the Go-style JSON
//! re-encoding, query-escaping and header rules are implemented here again,
//! so a host that misreads the contract fails against it.
//!
//! Several doubles can share one [`Broker`] (a stand-in for the Service Bus
//! namespace), as the producer's and the consumer's sidecars do in a cluster.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// A message as Service Bus holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SbMessage {
    pub id: String,
    pub body: Vec<u8>,
    pub correlation_id: Option<String>,
    pub label: Option<String>,
    /// String application properties.
    pub properties: BTreeMap<String, String>,
    pub delivery_count: u32,
}

impl SbMessage {
    pub fn new(id: &str, body: &[u8]) -> SbMessage {
        SbMessage {
            id: id.into(),
            body: body.to_vec(),
            correlation_id: None,
            label: None,
            properties: BTreeMap::new(),
            delivery_count: 0,
        }
    }
}

/// Queues by name, plus their dead-letter queues.
#[derive(Default)]
pub struct Broker {
    queues: Mutex<BTreeMap<String, VecDeque<SbMessage>>>,
    dead: Mutex<BTreeMap<String, Vec<SbMessage>>>,
    arrived: Notify,
}

impl Broker {
    pub fn push(&self, queue: &str, message: SbMessage) {
        self.queues.lock().unwrap().entry(queue.into()).or_default().push_back(message);
        self.arrived.notify_waiters();
    }

    fn pop(&self, queue: &str) -> Option<SbMessage> {
        self.queues.lock().unwrap().get_mut(queue).and_then(VecDeque::pop_front)
    }

    pub fn messages(&self, queue: &str) -> Vec<SbMessage> {
        self.queues.lock().unwrap().get(queue).map(|q| q.iter().cloned().collect()).unwrap_or_default()
    }

    pub fn dead_letters(&self, queue: &str) -> Vec<SbMessage> {
        self.dead.lock().unwrap().get(queue).cloned().unwrap_or_default()
    }
}

/// What the double saw, for assertions.
#[derive(Debug, Clone)]
pub enum Event {
    Probe {
        status: Option<u16>,
    },
    Delivery {
        id: String,
        attempt: u32,
        status: Option<u16>,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    Output {
        status: u16,
    },
    /// `GET /dapr/subscribe`: its status and body.
    Subscribe {
        status: Option<u16>,
        body: serde_json::Value,
    },
    /// A pub/sub delivery and the status daprd read from the answer.
    TopicDelivery {
        id: String,
        attempt: u32,
        outcome: PubSubOutcome,
        body: serde_json::Value,
    },
    /// A bulk delivery: how many entries, and their outcomes.
    Bulk {
        entries: usize,
        outcomes: Vec<PubSubOutcome>,
    },
    Published {
        topic: String,
        status: u16,
    },
}

/// How daprd reads a pub/sub answer (`docs/dapr-pubsub-contract.md` 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubSubOutcome {
    Success,
    Retry,
    Drop,
}

/// What the double is set up with; the default has no bindings, no tokens
/// and listens on any port.
#[derive(Clone, Default)]
pub struct Config {
    /// Input binding: deliver queue `queue` to `route` on the app's port.
    pub input: Option<Input>,
    /// Output bindings this sidecar has, by name (each writes the queue of the same name).
    pub outputs: Vec<String>,
    /// `DAPR_API_TOKEN`: what the app must present.
    pub api_token: Option<String>,
    /// `APP_API_TOKEN`: what this sidecar presents to the app.
    pub app_token: Option<String>,
    /// Listen on this port (0: any).
    pub port: u16,
    /// A pub/sub component of this name: its topics are broker queues (as
    /// for `pubsub.azure.servicebus.queues`), published to through the API
    /// and delivered to the app's subscriptions.
    pub pubsub: Option<PubSubConfig>,
    /// Message ids the output bindings fail to send, as a broker that
    /// refuses them would (500 `ERR_INVOKE_OUTPUT_BINDING`, every attempt).
    pub refuse: Vec<String>,
    /// How long each output binding call takes before it answers.
    pub output_delay: Duration,
}

#[derive(Clone)]
pub struct PubSubConfig {
    pub name: String,
    pub app_port: u16,
    /// The queue's MaxDeliveryCount.
    pub max_delivery_count: u32,
}

#[derive(Clone)]
pub struct Input {
    pub app_port: u16,
    pub route: String,
    pub queue: String,
    /// `maxConcurrentHandlers`.
    pub concurrency: usize,
    /// The queue's MaxDeliveryCount.
    pub max_delivery_count: u32,
    /// `direction: input` skips the probe.
    pub skip_probe: bool,
}

impl Input {
    pub fn new(app_port: u16, binding: &str) -> Input {
        Input {
            app_port,
            route: format!("/{binding}"),
            queue: binding.into(),
            concurrency: 1,
            max_delivery_count: 10,
            skip_probe: false,
        }
    }
}

/// A running double.
pub struct Sidecar {
    pub address: SocketAddr,
    events: Arc<Mutex<Vec<Event>>>,
    outputs: Arc<Concurrency>,
    connections: Arc<Concurrency>,
    stop_deliveries: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Sidecar {
    pub async fn start(config: Config, broker: Arc<Broker>) -> Sidecar {
        let listener = TcpListener::bind(("127.0.0.1", config.port)).await.unwrap();
        let address = listener.local_addr().unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let subscribed = Arc::new(AtomicBool::new(config.input.is_none()));
        let stop_deliveries = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        let outputs = Arc::new(Concurrency::default());
        let api = Api {
            config: config.clone(),
            broker: broker.clone(),
            events: events.clone(),
            subscribed: subscribed.clone(),
            outputs: outputs.clone(),
        };
        let connections = Arc::new(Concurrency::default());
        tasks.push(tokio::spawn(serve_api(listener, Arc::new(api), connections.clone())));
        if let Some(input) = config.input.clone() {
            let (broker, events, stop) = (broker.clone(), events.clone(), stop_deliveries.clone());
            tasks.push(tokio::spawn(run_input(input, config.app_token.clone(), broker, events, subscribed, stop)));
        }
        if let Some(pubsub) = config.pubsub.clone() {
            let (broker, events, stop) = (broker.clone(), events.clone(), stop_deliveries.clone());
            tasks.push(tokio::spawn(run_subscriptions(pubsub, config.app_token.clone(), broker, events, stop)));
        }
        Sidecar { address, events, outputs, connections, stop_deliveries, tasks }
    }

    /// Connections to its API open now (the app's, used or not).
    pub fn open_connections(&self) -> usize {
        self.connections.open.load(Ordering::SeqCst)
    }

    /// The most output binding calls that were open at once.
    pub fn peak_concurrent_outputs(&self) -> usize {
        self.outputs.peak.load(Ordering::SeqCst)
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Deliveries that got exactly this status, by message id.
    pub fn deliveries(&self) -> Vec<(String, u32, Option<u16>)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Delivery { id, attempt, status, .. } => Some((id, attempt, status)),
                _ => None,
            })
            .collect()
    }

    pub fn probes(&self) -> Vec<Option<u16>> {
        self.events()
            .into_iter()
            .filter_map(|e| if let Event::Probe { status } = e { Some(status) } else { None })
            .collect()
    }

    /// daprd's shutdown for input bindings: no new deliveries.
    pub fn stop_deliveries(&self) {
        self.stop_deliveries.store(true, Ordering::SeqCst);
    }

    /// Stops everything, the API listener included.
    pub fn kill(self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Api {
    config: Config,
    broker: Arc<Broker>,
    events: Arc<Mutex<Vec<Event>>>,
    subscribed: Arc<AtomicBool>,
    outputs: Arc<Concurrency>,
}

/// Calls open now, and the most ever open at once.
#[derive(Default)]
struct Concurrency {
    open: AtomicUsize,
    peak: AtomicUsize,
}

impl Concurrency {
    /// Counts one in until the guard is dropped; the guard owns its count, so
    /// it can be taken in one place and moved into a task.
    fn enter(self: &Arc<Self>) -> impl Drop + Send + 'static {
        let now = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Leave(self.clone())
    }
}

struct Leave(Arc<Concurrency>);

impl Drop for Leave {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_api(listener: TcpListener, api: Arc<Api>, open: Arc<Concurrency>) {
    // Connections live in this set, so aborting this task (`kill`) closes
    // them too, as a dying daprd would.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let api = api.clone();
        // Counted as soon as it is accepted, and open until its task ends,
        // aborted or not, so no accepted connection is ever missed.
        let open = open.enter();
        connections.spawn(async move {
            let _open = open;
            let service = hyper::service::service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if status != StatusCode::NO_CONTENT {
        r.headers_mut().insert("content-type", content_type.parse().unwrap());
    }
    r
}

fn dapr_error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    reply(status, "application/json", serde_json::json!({"errorCode": code, "message": message}).to_string())
}

impl Api {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.as_str()) {
            (Method::GET, "/v1.0/healthz/outbound") => reply(StatusCode::NO_CONTENT, "", ""),
            (Method::GET, "/v1.0/healthz") => {
                if self.subscribed.load(Ordering::SeqCst) {
                    reply(StatusCode::NO_CONTENT, "", "")
                } else {
                    dapr_error(StatusCode::INTERNAL_SERVER_ERROR, "ERR_HEALTH_NOT_READY", "dapr is not ready: [app]")
                }
            }
            (Method::POST | Method::PUT, p) if p.starts_with("/v1.0/publish/") => {
                let topic = p
                    .trim_start_matches("/v1.0/publish/")
                    .split_once('/')
                    .map(|(_, t)| t.to_string())
                    .unwrap_or_default();
                let response = self.publish(req).await;
                self.events.lock().unwrap().push(Event::Published { topic, status: response.status().as_u16() });
                response
            }
            (Method::POST | Method::PUT, p) if p.starts_with("/v1.0/bindings/") => {
                let name = p.trim_start_matches("/v1.0/bindings/").to_string();
                let status_of = |r: &Response<Full<Bytes>>| r.status().as_u16();
                let response = self.output(&name, req).await;
                self.events.lock().unwrap().push(Event::Output { status: status_of(&response) });
                response
            }
            _ => dapr_error(StatusCode::NOT_FOUND, "ERR_DIRECT_INVOKE", "no such route"),
        }
    }

    async fn output(&self, name: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(token) = &self.config.api_token
            && req.headers().get("dapr-api-token").map(|v| v.as_bytes()) != Some(token.as_bytes())
        {
            return reply(StatusCode::UNAUTHORIZED, "text/plain", "invalid api token\n");
        }
        let _open = self.outputs.enter();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        tokio::time::sleep(self.config.output_delay).await;
        let malformed = |detail: &str| {
            dapr_error(
                StatusCode::BAD_REQUEST,
                "ERR_MALFORMED_REQUEST",
                &format!("failed deserializing HTTP body: {detail}"),
            )
        };
        if body.len() > 4 << 20 {
            return malformed("body too large");
        }
        let Ok(serde_json::Value::Object(request)) = serde_json::from_slice::<serde_json::Value>(&body) else {
            return malformed("invalid JSON");
        };
        let mut metadata = BTreeMap::new();
        match request.get("metadata") {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Object(m)) => {
                for (k, v) in m {
                    let Some(v) = v.as_str() else {
                        return malformed(&format!("metadata value of {k} is not a string"));
                    };
                    metadata.insert(k.clone(), v.to_string());
                }
            }
            Some(_) => return malformed("metadata is not an object"),
        }
        if !self.config.outputs.iter().any(|o| o == name) {
            return dapr_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_INVOKE_OUTPUT_BINDING",
                &format!("error invoking output binding {name}: couldn't find output binding {name}"),
            );
        }
        if request.get("operation").and_then(|o| o.as_str()) != Some("create") {
            return dapr_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_INVOKE_OUTPUT_BINDING",
                &format!("error invoking output binding {name}: unsupported operation"),
            );
        }
        let data = go_json(request.get("data").unwrap_or(&serde_json::Value::Null));
        let mut message = SbMessage::new("", data.as_bytes());
        for (k, v) in metadata {
            match k.as_str() {
                "MessageId" | "id" => message.id = v,
                "CorrelationId" | "correlationID" => message.correlation_id = Some(v),
                "Label" => message.label = Some(v),
                "SessionId"
                | "ReplyTo"
                | "To"
                | "PartitionKey"
                | "ContentType"
                | "ScheduledEnqueueTimeUtc"
                | "ttlInSeconds"
                | "ttl" => {}
                _ if v.is_empty() => {}
                _ => {
                    message.properties.insert(k, v);
                }
            }
        }
        if self.config.refuse.contains(&message.id) {
            return dapr_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "ERR_INVOKE_OUTPUT_BINDING",
                &format!("error invoking output binding {name}: the broker refused message {}", message.id),
            );
        }
        self.broker.push(name, message);
        reply(StatusCode::NO_CONTENT, "", "")
    }
}

impl Api {
    /// `POST /v1.0/publish/<pubsub>/<topic>?metadata.k=v`: the body wrapped
    /// in a CloudEvent by its content type (raw with `metadata.rawPayload`),
    /// stored on the topic's queue; 204.
    async fn publish(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(token) = &self.config.api_token
            && req.headers().get("dapr-api-token").map(|v| v.as_bytes()) != Some(token.as_bytes())
        {
            return reply(StatusCode::UNAUTHORIZED, "text/plain", "invalid api token\n");
        }
        let path = req.uri().path().trim_start_matches("/v1.0/publish/").to_string();
        let Some((pubsub, topic)) = path.split_once('/') else {
            return dapr_error(StatusCode::NOT_FOUND, "ERR_TOPIC_NAME_EMPTY", "topic is empty");
        };
        if self.config.pubsub.as_ref().is_none_or(|p| p.name != pubsub) {
            return dapr_error(StatusCode::NOT_FOUND, "ERR_PUBSUB_NOT_FOUND", &format!("pubsub {pubsub} not found"));
        }
        let metadata: BTreeMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .filter_map(|(k, v)| k.strip_prefix("metadata.").map(|k| (query_unescape(k), query_unescape(v))))
            .collect();
        let content_type =
            req.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("text/plain").to_string();
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let raw = metadata.get("rawPayload").is_some_and(|v| v == "true");
        let bytes = if raw {
            body.to_vec()
        } else {
            let mut envelope = serde_json::json!({"id": uuid::Uuid::new_v4().to_string(), "specversion": "1.0",
                "source": "producer", "type": "com.dapr.event.sent", "topic": topic, "pubsubname": pubsub,
                "datacontenttype": content_type, "traceid": "", "traceparent": "", "tracestate": ""});
            if content_type.starts_with("application/json") {
                match serde_json::from_slice::<serde_json::Value>(&body) {
                    Ok(data) => envelope["data"] = data,
                    Err(_) => envelope["data"] = String::from_utf8_lossy(&body).into_owned().into(),
                }
            } else if content_type.starts_with("application/octet-stream") {
                envelope["data_base64"] = base64::engine::general_purpose::STANDARD.encode(&body).into();
            } else {
                envelope["data"] = String::from_utf8_lossy(&body).into_owned().into();
            }
            go_json(&envelope).into_bytes()
        };
        let mut message = SbMessage::new(metadata.get("MessageId").map(String::as_str).unwrap_or(""), &bytes);
        for (k, v) in metadata {
            if !matches!(k.as_str(), "MessageId" | "rawPayload" | "ttlInSeconds") {
                message.properties.insert(k, v);
            }
        }
        self.broker.push(topic, message);
        reply(StatusCode::NO_CONTENT, "", "")
    }
}

/// Go's encoding/json: sorted keys, no whitespace, `<>&` escaped, numbers as float64.
pub fn go_json(value: &serde_json::Value) -> String {
    fn number(n: &serde_json::Number) -> String {
        let f = n.as_f64().unwrap_or(0.0);
        let abs = f.abs();
        if abs != 0.0 && !(1e-6..1e21).contains(&abs) {
            let s = format!("{f:e}");
            let (mantissa, exp) = s.split_once('e').unwrap();
            let exp: i32 = exp.parse().unwrap();
            format!("{mantissa}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
                .replace("e-0", "e-")
                .replace("e+0", "e+")
        } else {
            format!("{f}")
        }
    }
    fn write(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Number(n) => out.push_str(&number(n)),
            serde_json::Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out);
                }
                out.push(']');
            }
            serde_json::Value::Object(map) => {
                let sorted: BTreeMap<&String, &serde_json::Value> = map.iter().collect();
                out.push('{');
                for (i, (k, item)) in sorted.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::String(k.clone()).to_string());
                    out.push(':');
                    write(item, out);
                }
                out.push('}');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(value, &mut out);
    out.replace('<', "\\u003c").replace('>', "\\u003e").replace('&', "\\u0026")
}

fn query_unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if let Some(byte) = s.get(i + 1..i + 3).and_then(|hex| u8::from_str_radix(hex, 16).ok()) => {
                out.push(byte);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b' ' => "+".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn run_input(
    input: Input,
    app_token: Option<String>,
    broker: Arc<Broker>,
    events: Arc<Mutex<Vec<Event>>>,
    subscribed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    // 1. Wait for the app port, every 100 ms.
    while tokio::net::TcpStream::connect(("127.0.0.1", input.app_port)).await.is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let url = format!("http://127.0.0.1:{}{}", input.app_port, input.route);
    // 2. The subscription probe, 3 s timeout; 2xx or 405 subscribes.
    if !input.skip_probe {
        let mut probe = Request::builder().method(Method::OPTIONS).uri(&url).header("content-type", "application/json");
        if let Some(t) = &app_token {
            probe = probe.header("dapr-api-token", t);
        }
        let probe = probe.body(Full::new(Bytes::new())).unwrap();
        let status = match tokio::time::timeout(Duration::from_secs(3), client.request(probe)).await {
            Ok(Ok(r)) => Some(r.status().as_u16()),
            _ => None,
        };
        events.lock().unwrap().push(Event::Probe { status });
        let ok = status.is_some_and(|s| (200..300).contains(&s) || s == 405);
        if !ok {
            return;
        }
    }
    subscribed.store(true, Ordering::SeqCst);
    // 3. Deliveries, `concurrency` at a time.
    let mut workers = Vec::new();
    for _ in 0..input.concurrency.max(1) {
        let (client, url, broker, events, stop, input, token) = (
            client.clone(),
            url.clone(),
            broker.clone(),
            events.clone(),
            stop.clone(),
            input.clone(),
            app_token.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let notified = broker.arrived.notified();
                let Some(mut message) = broker.pop(&input.queue) else {
                    let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
                    continue;
                };
                message.delivery_count += 1;
                let mut request =
                    Request::post(&url).header("content-type", "application/json").header("id", &message.id);
                if let Some(c) = &message.correlation_id {
                    request = request.header("correlationid", c);
                }
                if let Some(l) = &message.label {
                    request = request.header("label", l);
                }
                for (k, v) in &message.properties {
                    request = request.header(query_escape(&k.to_lowercase()), query_escape(v));
                }
                if let Some(t) = &token {
                    request = request.header("dapr-api-token", t);
                }
                let request = request.body(Full::new(Bytes::from(message.body.clone()))).unwrap();
                let headers: Vec<(String, String)> = request
                    .headers()
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
                    .collect();
                // No timeout: daprd waits for the app forever.
                let status = client.request(request).await.ok().map(|r| r.status().as_u16());
                events.lock().unwrap().push(Event::Delivery {
                    id: message.id.clone(),
                    attempt: message.delivery_count,
                    status,
                    headers,
                    body: message.body.clone(),
                });
                if status == Some(200) {
                    continue;
                }
                if message.delivery_count >= input.max_delivery_count {
                    broker.dead.lock().unwrap().entry(input.queue.clone()).or_default().push(message);
                } else {
                    // Abandon: back at once, after the ~100 ms error pacing.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    broker.queues.lock().unwrap().entry(input.queue.clone()).or_default().push_front(message);
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn go_json_matches_go() {
    let v: serde_json::Value =
        serde_json::from_str(r#"{"b":1,"a":"<x&y>","c":[1.5,1e21,0.0000001,12345678901234567890]}"#).unwrap();
    assert_eq!(go_json(&v), r#"{"a":"\u003cx\u0026y\u003e","b":1,"c":[1.5,1e+21,1e-7,12345678901234567000]}"#);
}

/// One subscription the app asked for.
#[derive(Clone, Debug)]
struct Subscription {
    topic: String,
    route: String,
    dead_letter_topic: Option<String>,
    raw: bool,
    bulk: Option<usize>,
}

/// daprd's pub/sub side: once the app port opens, `GET /dapr/subscribe`;
/// then each subscription's topic (a queue) is delivered to its route, one
/// at a time or in bulk, settled by the status the app answers.
async fn run_subscriptions(
    config: PubSubConfig,
    app_token: Option<String>,
    broker: Arc<Broker>,
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
) {
    while tokio::net::TcpStream::connect(("127.0.0.1", config.app_port)).await.is_err() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::get(format!("http://127.0.0.1:{}/dapr/subscribe", config.app_port))
        .header("content-type", "application/json")
        .header("dapr-app-id", "app");
    if let Some(t) = &app_token {
        request = request.header("dapr-api-token", t);
    }
    let (status, body) = match client.request(request.body(Full::new(Bytes::new())).unwrap()).await {
        Ok(r) => {
            let status = r.status().as_u16();
            (Some(status), r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default())
        }
        Err(_) => (None, Bytes::new()),
    };
    let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    events.lock().unwrap().push(Event::Subscribe { status, body: parsed.clone() });
    // Metadata values must be strings, or daprd starts nothing.
    let subscriptions: Vec<Subscription> = parsed
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s["pubsubname"] == config.name.as_str())
        .filter_map(|s| {
            let route = s["routes"]["default"].as_str().or(s["route"].as_str())?.to_string();
            let raw = match s["metadata"].get("rawPayload") {
                None => false,
                Some(serde_json::Value::String(v)) => v == "true",
                Some(_) => return None,
            };
            let bulk = (s["bulkSubscribe"]["enabled"] == true)
                .then(|| s["bulkSubscribe"]["maxMessagesCount"].as_u64().unwrap_or(100) as usize);
            Some(Subscription {
                topic: s["topic"].as_str()?.to_string(),
                route,
                dead_letter_topic: s["deadLetterTopic"].as_str().map(str::to_string),
                raw,
                bulk,
            })
        })
        .collect();
    let mut workers = Vec::new();
    for subscription in subscriptions {
        let (client, broker, events, stop, token, config) =
            (client.clone(), broker.clone(), events.clone(), stop.clone(), app_token.clone(), config.clone());
        workers.push(tokio::spawn(async move {
            let url = format!("http://127.0.0.1:{}{}", config.app_port, subscription.route);
            loop {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let notified = broker.arrived.notified();
                let mut batch = Vec::new();
                while batch.len() < subscription.bulk.unwrap_or(1) {
                    match broker.pop(&subscription.topic) {
                        Some(message) => batch.push(message),
                        None => break,
                    }
                }
                if batch.is_empty() {
                    let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
                    continue;
                }
                for message in &mut batch {
                    message.delivery_count += 1;
                }
                let outcomes = match subscription.bulk {
                    None => vec![
                        deliver_event(&client, &url, &config, &subscription, &batch[0], token.as_deref(), &events)
                            .await,
                    ],
                    Some(_) => {
                        deliver_bulk(&client, &url, &config, &subscription, &batch, token.as_deref(), &events).await
                    }
                };
                for (message, outcome) in batch.into_iter().zip(outcomes) {
                    settle_event(&broker, &subscription, &config, message, outcome).await;
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
}

/// The body daprd sends: the stored envelope, or for rawPayload a new one
/// around the stored bytes.
fn event_body(subscription: &Subscription, config: &PubSubConfig, message: &SbMessage) -> serde_json::Value {
    if subscription.raw {
        return serde_json::json!({"id": uuid::Uuid::new_v4().to_string(), "specversion": "1.0", "source": "Dapr",
            "type": "com.dapr.event.sent", "datacontenttype": "application/octet-stream", "topic": subscription.topic,
            "pubsubname": config.name, "data_base64": base64::engine::general_purpose::STANDARD.encode(&message.body)});
    }
    serde_json::from_slice(&message.body).unwrap_or(serde_json::Value::Null)
}

fn broker_metadata(message: &SbMessage) -> Vec<(String, String)> {
    let mut metadata = vec![("metadata.deliverycount".to_string(), message.delivery_count.to_string())];
    if !message.id.is_empty() {
        metadata.push(("metadata.messageid".to_string(), message.id.clone()));
    }
    for (k, v) in &message.properties {
        metadata.push((format!("metadata.{}", k.to_lowercase()), v.clone()));
    }
    metadata
}

/// 3.1: 2xx with no status (or not JSON) or SUCCESS acks; RETRY, an
/// unknown status or a non-2xx fails; 404 and DROP drop.
fn read_answer(status: Option<u16>, body: &[u8]) -> PubSubOutcome {
    match status {
        Some(404) => PubSubOutcome::Drop,
        Some(s) if (200..300).contains(&s) => {
            match serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["status"].as_str().map(str::to_string))
            {
                None => PubSubOutcome::Success,
                Some(s) if s.is_empty() || s == "SUCCESS" => PubSubOutcome::Success,
                Some(s) if s == "DROP" => PubSubOutcome::Drop,
                Some(_) => PubSubOutcome::Retry,
            }
        }
        _ => PubSubOutcome::Retry,
    }
}

async fn deliver_event(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    config: &PubSubConfig,
    subscription: &Subscription,
    message: &SbMessage,
    token: Option<&str>,
    events: &Mutex<Vec<Event>>,
) -> PubSubOutcome {
    let body = event_body(subscription, config, message);
    let mut request =
        Request::post(url).header("content-type", "application/cloudevents+json").header("pubsubname", &config.name);
    for (k, v) in broker_metadata(message) {
        request = request.header(k, v);
    }
    if let Some(t) = token {
        request = request.header("dapr-api-token", t);
    }
    let request = request.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let (status, answer) = match client.request(request).await {
        Ok(r) => (Some(r.status().as_u16()), r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default()),
        Err(_) => (None, Bytes::new()),
    };
    let outcome = read_answer(status, &answer);
    let id = body["id"].as_str().unwrap_or_default().to_string();
    events.lock().unwrap().push(Event::TopicDelivery { id, attempt: message.delivery_count, outcome, body });
    outcome
}

/// Section 4: one POST for the batch; statuses per entry, a missing or
/// empty status counts as RETRY, a 404 acks all.
async fn deliver_bulk(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    config: &PubSubConfig,
    subscription: &Subscription,
    batch: &[SbMessage],
    token: Option<&str>,
    events: &Mutex<Vec<Event>>,
) -> Vec<PubSubOutcome> {
    let entries: Vec<serde_json::Value> = batch
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let metadata: serde_json::Map<String, serde_json::Value> = broker_metadata(m)
                .into_iter()
                .map(|(k, v)| (k.replace("metadata.deliverycount", "metadata.DeliveryCount"), v.into()))
                .collect();
            let (event, content_type) = if subscription.raw {
                (base64::engine::general_purpose::STANDARD.encode(&m.body).into(), "application/octet-stream")
            } else {
                (serde_json::from_slice(&m.body).unwrap_or(serde_json::Value::Null), "application/cloudevents+json")
            };
            serde_json::json!({"entryId": format!("entry-{i}"), "event": event, "contentType": content_type, "metadata": metadata})
        })
        .collect();
    let body = serde_json::json!({"id": uuid::Uuid::new_v4().to_string(), "type": "com.dapr.event.sent.bulk",
        "topic": subscription.topic, "pubsubname": config.name, "metadata": {"pubsubName": config.name}, "entries": entries});
    let mut request = Request::post(url).header("content-type", "application/json").header("pubsubname", &config.name);
    if let Some(t) = token {
        request = request.header("dapr-api-token", t);
    }
    let request = request.body(Full::new(Bytes::from(body.to_string()))).unwrap();
    let (status, answer) = match client.request(request).await {
        Ok(r) => (Some(r.status().as_u16()), r.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default()),
        Err(_) => (None, Bytes::new()),
    };
    let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap_or(serde_json::Value::Null);
    let outcomes: Vec<PubSubOutcome> = (0..batch.len())
        .map(|i| match status {
            Some(404) => PubSubOutcome::Success,
            Some(s) if (200..300).contains(&s) => {
                let entry = format!("entry-{i}");
                let found =
                    answer["statuses"].as_array().and_then(|all| all.iter().find(|e| e["entryId"] == entry.as_str()));
                match found.and_then(|e| e["status"].as_str()) {
                    Some("SUCCESS") => PubSubOutcome::Success,
                    Some("DROP") => PubSubOutcome::Drop,
                    _ => PubSubOutcome::Retry,
                }
            }
            _ => PubSubOutcome::Retry,
        })
        .collect();
    events.lock().unwrap().push(Event::Bulk { entries: batch.len(), outcomes: outcomes.clone() });
    outcomes
}

/// 3.1's final table: with a dead-letter topic a failure or a drop is
/// published there and acked; without one a drop is gone and a failure is
/// abandoned (the queue dead-letters it after its max delivery count).
async fn settle_event(
    broker: &Broker,
    subscription: &Subscription,
    config: &PubSubConfig,
    message: SbMessage,
    outcome: PubSubOutcome,
) {
    match (outcome, &subscription.dead_letter_topic) {
        (PubSubOutcome::Success, _) => {}
        (_, Some(dead)) => broker.push(dead, message),
        (PubSubOutcome::Drop, None) => {}
        (PubSubOutcome::Retry, None) if message.delivery_count >= config.max_delivery_count => {
            broker.dead.lock().unwrap().entry(subscription.topic.clone()).or_default().push(message);
        }
        (PubSubOutcome::Retry, None) => {
            tokio::time::sleep(Duration::from_millis(100)).await;
            broker.queues.lock().unwrap().entry(subscription.topic.clone()).or_default().push_front(message);
        }
    }
}
