//! A daprd double that follows section 11 of `shared/dapr-contract.md`.
//!
//! It is written from the contract, not from the host: the Go-style JSON
//! re-encoding, query-escaping and header rules are implemented here again,
//! so a host that misreads the contract fails against it.
//!
//! Several doubles can share one [`Broker`] (a stand-in for the Service Bus
//! namespace), as the producer's and the consumer's sidecars do in a cluster.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    Probe { status: Option<u16> },
    Delivery { id: String, attempt: u32, status: Option<u16>, headers: Vec<(String, String)>, body: Vec<u8> },
    Output { status: u16 },
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
        let api = Api {
            config: config.clone(),
            broker: broker.clone(),
            events: events.clone(),
            subscribed: subscribed.clone(),
        };
        tasks.push(tokio::spawn(serve_api(listener, Arc::new(api))));
        if let Some(input) = config.input.clone() {
            let (broker, events, stop) = (broker.clone(), events.clone(), stop_deliveries.clone());
            tasks.push(tokio::spawn(run_input(input, config.app_token.clone(), broker, events, subscribed, stop)));
        }
        Sidecar { address, events, stop_deliveries, tasks }
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
}

async fn serve_api(listener: TcpListener, api: Arc<Api>) {
    // Connections live in this set, so aborting this task (`kill`) closes
    // them too, as a dying daprd would.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        while connections.try_join_next().is_some() {}
        let api = api.clone();
        connections.spawn(async move {
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
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
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
        self.broker.push(name, message);
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
