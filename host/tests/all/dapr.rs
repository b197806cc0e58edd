//! `wasm-pc serve` against the sidecar double: the Dapr contract, both ways.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::process::{Running, command, free_port};
use crate::sidecar::{Broker, Config, Event, Input, PubSubConfig, PubSubOutcome, SbMessage, Sidecar, eventually};

pub(crate) struct Host {
    running: Option<Running>,
    pub port: u16,
}

impl Host {
    /// Starts `wasm-pc serve` on a free port, with extra args and env.
    pub(crate) fn start(role: &str, dapr_port: u16, args: &[&str], env: &[(&str, &str)]) -> Host {
        let port = free_port();
        let mut cmd =
            command(&["serve", "--role", role, "--app-port", &port.to_string(), "--listen-address", "127.0.0.1"]);
        cmd.args(args)
            .env("DAPR_HTTP_PORT", dapr_port.to_string())
            .env_remove("APP_API_TOKEN")
            .env_remove("DAPR_API_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let running = tokio::task::block_in_place(|| Running::start(&mut cmd, "app listening for daprd on "));
        Host { running: Some(running), port }
    }

    /// The host's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.running.as_ref().map(|r| r.child.id()).unwrap_or_default()
    }

    pub(crate) fn terminate(&mut self) -> std::process::ExitStatus {
        let running = self.running.take().unwrap();
        tokio::task::block_in_place(|| running.terminate())
    }
}

pub(crate) async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, Vec<u8>) {
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = hyper::Request::builder().method(method).uri(format!("http://127.0.0.1:{port}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = client.request(req.body(Full::new(Bytes::from(body))).unwrap()).await.unwrap();
    let status = response.status().as_u16();
    (status, response.into_body().collect().await.unwrap().to_bytes().to_vec())
}

pub(crate) async fn metric(port: u16, name: &str) -> u64 {
    let (_, body) = request(port, "GET", "/metrics", &[], vec![]).await;
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no metric {name}"))
}

pub(crate) fn order(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "customer": "acme <&> co", "items": [{"sku": "A", "qty": 2, "price_cents": 350}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_reply_in_the_contract() {
    let broker = Arc::new(Broker::default());
    let app_port_host = Host::start(
        "consumer",
        1,
        &["--consumer-file", "faulty.wasm", "--input-binding", "orders", "--timeout-ms", "300"],
        &[],
    );
    let mut host = app_port_host;
    let sidecar =
        Sidecar::start(Config { input: Some(Input::new(host.port, "orders")), ..Config::default() }, broker.clone())
            .await;
    for (id, body) in [("ok", "ok"), ("retry", "retry"), ("trap", "trap"), ("loop", "loop"), ("poison", "reject")] {
        broker.push("orders", SbMessage::new(id, body.as_bytes()));
    }
    eventually(Duration::from_secs(60), "all settled", || {
        broker.messages("orders").is_empty() && broker.dead_letters("orders").len() == 4
    })
    .await;
    assert_eq!(sidecar.probes(), vec![Some(200)], "the OPTIONS probe subscribes");
    let by_id = |id: &str| sidecar.deliveries().into_iter().filter(|d| d.0 == id).map(|d| d.2).collect::<Vec<_>>();
    assert_eq!(by_id("ok"), vec![Some(200)], "success is exactly 200, once");
    for id in ["retry", "trap", "loop", "poison"] {
        assert_eq!(by_id(id), vec![Some(500); 10], "{id}: 500 every time until Service Bus dead-letters it");
    }
    // The rest of the surface.
    assert_eq!(request(host.port, "GET", "/orders", &[], vec![]).await.0, 405);
    assert_eq!(request(host.port, "GET", "/nope", &[], vec![]).await.0, 404);
    assert_eq!(request(host.port, "GET", "/healthz", &[], vec![]).await.0, 200);
    assert_eq!(
        request(host.port, "GET", "/readyz", &[], vec![]).await.0,
        200,
        "a consumer does not need the sidecar's API"
    );
    let (status, body) =
        request(host.port, "POST", "/orders", &[("content-type", "application/json")], vec![b'x'; 5 << 20]).await;
    assert_eq!(status, 413);
    assert!(String::from_utf8_lossy(&body).contains("larger than the limit"));
    assert_eq!(host.terminate().code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn json_and_binary_bodies_round_trip_through_the_contract() {
    let broker = Arc::new(Broker::default());
    let producer_sidecar =
        Sidecar::start(Config { outputs: vec!["orders".into()], ..Config::default() }, broker.clone()).await;
    let producer = Host::start("producer", producer_sidecar.port(), &[], &[]);
    let consumer_sidecar_port = free_port();
    let consumer = Host::start("consumer", consumer_sidecar_port, &["--consumer-config", "forward-binding=done"], &[]);
    let consumer_sidecar = Sidecar::start(
        Config {
            input: Some(Input::new(consumer.port, "orders")),
            outputs: vec!["done".into()],
            port: consumer_sidecar_port,
            ..Config::default()
        },
        broker.clone(),
    )
    .await;

    let batch = serde_json::json!([order("o-1"), order("o-2"), order("o-3")]);
    let (status, body) = request(
        producer.port,
        "POST",
        "/produce",
        &[
            ("content-type", "application/json"),
            ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
        ],
        batch.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    let binary: Vec<u8> = (0..=255u8).chain([0, 0, b'"', b'\\']).collect();
    let (status, _) =
        request(producer.port, "POST", "/produce", &[("content-type", "application/octet-stream")], binary.clone())
            .await;
    assert_eq!(status, 202);

    // A forward is sent before its delivery is answered: wait for both.
    let answered = |id: &str| {
        consumer_sidecar
            .events()
            .iter()
            .any(|e| matches!(e, Event::Delivery { id: got, status: Some(200), .. } if got == id))
    };
    eventually(Duration::from_secs(30), "4 forwarded and answered", || {
        broker.messages("done").len() == 4 && ["o-1", "o-2", "o-3"].iter().all(|id| answered(id))
    })
    .await;
    // What the consumer host was given is what the producer guest sent, as JSON values.
    let delivered: BTreeMap<String, Vec<u8>> =
        consumer_sidecar
            .events()
            .into_iter()
            .filter_map(|e| {
                if let Event::Delivery { id, body, status: Some(200), .. } = e { Some((id, body)) } else { None }
            })
            .collect();
    for id in ["o-1", "o-2", "o-3"] {
        let value: serde_json::Value = serde_json::from_slice(&delivered[id]).unwrap();
        assert_eq!(value, order(id), "{id} arrived as the same JSON value");
    }
    // The consumer's forwards: JSON summaries, and the binary body byte for byte.
    let done = broker.messages("done");
    let mut summaries = Vec::new();
    let mut raw = Vec::new();
    for m in &done {
        match m.properties.get("wasmpc-encoding").map(String::as_str) {
            Some("base64") => {
                use base64::Engine as _;
                let text: String = serde_json::from_slice(&m.body).unwrap();
                raw.push(base64::engine::general_purpose::STANDARD.decode(text).unwrap());
            }
            _ => summaries.push(serde_json::from_slice::<serde_json::Value>(&m.body).unwrap()),
        }
    }
    assert_eq!(raw, vec![binary], "binary bodies round-trip exactly");
    summaries.sort_by_key(|s| s["order"].as_str().unwrap().to_string());
    assert_eq!(summaries.len(), 3);
    assert_eq!(
        summaries[0],
        serde_json::json!({"order": "o-1", "customer": "acme <&> co", "total_cents": 700, "version": null})
    );
    // Output calls were 204s; properties arrived query-escaped and were decoded.
    assert!(producer_sidecar.events().iter().all(|e| matches!(e, Event::Output { status: 204, .. })));
    let first = consumer_sidecar
        .events()
        .into_iter()
        .find_map(|e| if let Event::Delivery { headers, .. } = e { Some(headers) } else { None })
        .unwrap();
    assert!(first.iter().any(|(k, v)| k == "customer" && v == "acme+%3C%26%3E+co"), "{first:?}");
    assert!(first.iter().all(|(k, _)| k != "deliverycount"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_goes_to_the_dead_letter_binding_when_there_is_one() {
    let broker = Arc::new(Broker::default());
    let sidecar_port = free_port();
    let host = Host::start("consumer", sidecar_port, &["--dead-letter-binding", "poison"], &[]);
    let sidecar = Sidecar::start(
        Config {
            input: Some(Input::new(host.port, "orders")),
            outputs: vec!["poison".into()],
            port: sidecar_port,
            ..Config::default()
        },
        broker.clone(),
    )
    .await;
    let mut bad = SbMessage::new("bad-1", b"{not an order");
    bad.properties.insert("tenant id".into(), "a/b".into());
    broker.push("orders", bad);
    // The dead letter is sent before the delivery is answered, so the
    // answer may not be recorded yet when the dead letter shows.
    eventually(Duration::from_secs(30), "dead-lettered and answered", || {
        broker.messages("poison").len() == 1 && !sidecar.deliveries().is_empty()
    })
    .await;
    assert_eq!(
        sidecar.deliveries(),
        vec![("bad-1".to_string(), 1, Some(200))],
        "acknowledged once it is safely dead-lettered"
    );
    let dead = &broker.messages("poison")[0];
    assert_eq!(dead.id, "bad-1");
    assert!(dead.properties["deadletter-reason"].contains("not a valid order"));
    assert_eq!(dead.properties["tenant id"], "a/b");
    assert_eq!(dead.properties["deadletter-source"], "orders");
    assert!(broker.dead_letters("orders").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrency_is_capped_under_200_parallel_deliveries() {
    let broker = Arc::new(Broker::default());
    let host = Host::start("consumer", 1, &["--consumer-file", "faulty.wasm", "--max-concurrency", "4"], &[]);
    for i in 0..200 {
        broker.push("orders", SbMessage::new(&format!("m{i}"), b"sleep:20"));
    }
    let mut input = Input::new(host.port, "orders");
    input.concurrency = 200;
    let sidecar = Sidecar::start(Config { input: Some(input), ..Config::default() }, broker.clone()).await;
    eventually(Duration::from_secs(60), "200 delivered", || {
        sidecar.deliveries().iter().filter(|d| d.2 == Some(200)).count() == 200
    })
    .await;
    assert_eq!(metric(host.port, "wasm_pc_in_flight_peak").await, 4);
    assert_eq!(metric(host.port, "wasm_pc_messages_completed_total").await, 200);
    assert!(sidecar.deliveries().iter().all(|d| d.2 == Some(200)), "waiting for a slot is not a failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_required_both_ways() {
    // daprd -> app: APP_API_TOKEN.
    let broker = Arc::new(Broker::default());
    let host = Host::start("consumer", 1, &["--consumer-file", "faulty.wasm"], &[("APP_API_TOKEN", "app-secret")]);
    assert_eq!(request(host.port, "OPTIONS", "/orders", &[], vec![]).await.0, 401);
    assert_eq!(request(host.port, "POST", "/orders", &[("dapr-api-token", "wrong")], b"ok".to_vec()).await.0, 401);
    assert_eq!(request(host.port, "GET", "/healthz", &[], vec![]).await.0, 200, "health needs no token");
    let wrong = Sidecar::start(
        Config { input: Some(Input::new(host.port, "orders")), app_token: Some("nope".into()), ..Config::default() },
        broker.clone(),
    )
    .await;
    broker.push("orders", SbMessage::new("t1", b"ok"));
    eventually(Duration::from_secs(10), "probe", || !wrong.probes().is_empty()).await;
    assert_eq!(wrong.probes(), vec![Some(401)], "a wrong token unsubscribes the binding");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(wrong.deliveries().is_empty());
    wrong.kill();
    let right = Sidecar::start(
        Config {
            input: Some(Input::new(host.port, "orders")),
            app_token: Some("app-secret".into()),
            ..Config::default()
        },
        broker.clone(),
    )
    .await;
    eventually(Duration::from_secs(10), "delivered", || right.deliveries() == vec![("t1".to_string(), 1, Some(200))])
        .await;

    // app -> daprd: DAPR_API_TOKEN.
    let guarded = Sidecar::start(
        Config { outputs: vec!["outbox".into()], api_token: Some("dapr-secret".into()), ..Config::default() },
        broker.clone(),
    )
    .await;
    let batch = serde_json::json!([order("x-1")]).to_string().into_bytes();
    let outbox = ["--producer-config", "binding=outbox"];
    let bad = Host::start("producer", guarded.port(), &outbox, &[("DAPR_API_TOKEN", "wrong")]);
    let (status, body) =
        request(bad.port, "POST", "/produce", &[("content-type", "application/json")], batch.clone()).await;
    assert_eq!(status, 502, "the guest saw `rejected`: {}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("401"));
    let good = Host::start("producer", guarded.port(), &outbox, &[("DAPR_API_TOKEN", "dapr-secret")]);
    let (status, _) =
        request(good.port, "POST", "/produce", &[("content-type", "application/json")], batch.clone()).await;
    assert_eq!(status, 202);
    assert_eq!(broker.messages("outbox").iter().filter(|m| m.id == "x-1").count(), 1);

    // client -> producer route: WASM_PC_PRODUCE_TOKEN.
    let env = [("DAPR_API_TOKEN", "dapr-secret"), ("WASM_PC_PRODUCE_TOKEN", "produce-secret")];
    let closed = Host::start("producer", guarded.port(), &outbox, &env);
    let json = ("content-type", "application/json");
    for auth in [None, Some("Bearer wrong"), Some("produce-secret"), Some("Basic produce-secret")] {
        let headers: Vec<(&str, &str)> = [json].into_iter().chain(auth.map(|a| ("authorization", a))).collect();
        let (status, _) = request(closed.port, "POST", "/produce", &headers, batch.clone()).await;
        assert_eq!(status, 401, "{auth:?}");
    }
    let headers = [json, ("authorization", "Bearer produce-secret")];
    assert_eq!(request(closed.port, "POST", "/produce", &headers, batch).await.0, 202);
    assert_eq!(request(closed.port, "GET", "/readyz", &[], vec![]).await.0, 200, "probes need no token");
    assert_eq!(
        broker.messages("outbox").iter().filter(|m| m.id == "x-1").count(),
        2,
        "only the authorised one was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_missing_sidecar_is_reported_not_fatal() {
    let sidecar_port = free_port();
    let producer = Host::start("producer", sidecar_port, &["--send-attempts", "2"], &[]);
    assert_eq!(request(producer.port, "GET", "/healthz", &[], vec![]).await.0, 200);
    let (status, body) = request(producer.port, "GET", "/readyz", &[], vec![]).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let batch = serde_json::json!([order("d-1")]).to_string().into_bytes();
    let (status, body) =
        request(producer.port, "POST", "/produce", &[("content-type", "application/json")], batch.clone()).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("unavailable"));

    // The sidecar comes up: ready, and sends work.
    let broker = Arc::new(Broker::default());
    let sidecar = Sidecar::start(
        Config { outputs: vec!["orders".into()], port: sidecar_port, ..Config::default() },
        broker.clone(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while request(producer.port, "GET", "/readyz", &[], vec![]).await.0 != 200 {
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        request(producer.port, "POST", "/produce", &[("content-type", "application/json")], batch.clone()).await.0,
        202
    );
    assert_eq!(broker.messages("orders").len(), 1);

    // And goes away mid-run: a typed error, 503 to the caller.
    sidecar.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, _) = request(producer.port, "POST", "/produce", &[("content-type", "application/json")], batch).await;
    assert_eq!(status, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_in_flight_and_new_deliveries_and_loses_nothing() {
    let broker = Arc::new(Broker::default());
    let mut host = Host::start(
        "consumer",
        1,
        &[
            "--consumer-file",
            "faulty.wasm",
            "--max-concurrency",
            "64",
            "--drain-secs",
            "2",
            "--shutdown-deadline-secs",
            "10",
        ],
        &[],
    );
    for i in 0..50 {
        broker.push("orders", SbMessage::new(&format!("slow-{i}"), b"sleep:1500"));
    }
    let mut input = Input::new(host.port, "orders");
    input.concurrency = 64;
    let sidecar = Sidecar::start(Config { input: Some(input), ..Config::default() }, broker.clone()).await;
    eventually(Duration::from_secs(20), "50 in flight", || broker.messages("orders").is_empty()).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let pid = host.running.as_ref().unwrap().child.id().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    // daprd got SIGTERM too but still delivers while it drains.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..10 {
        broker.push("orders", SbMessage::new(&format!("late-{i}"), b"sleep:100"));
    }
    eventually(Duration::from_secs(20), "60 answered", || sidecar.deliveries().len() == 60).await;
    sidecar.stop_deliveries();
    let status = tokio::task::block_in_place(|| host.running.take().unwrap().child.wait().unwrap());
    assert_eq!(status.code(), Some(0));

    let deliveries = sidecar.deliveries();
    let mut ok: Vec<&str> = deliveries.iter().filter(|d| d.2 == Some(200)).map(|d| d.0.as_str()).collect();
    ok.sort();
    let before = ok.len();
    ok.dedup();
    assert_eq!(before, ok.len(), "nothing acknowledged twice");
    assert_eq!(ok.len(), 60, "every delivery, old and new, finished: {deliveries:?}");
    assert!(broker.messages("orders").is_empty() && broker.dead_letters("orders").is_empty());
}

/// daprd's shutdown waits for connections that never sent a request until
/// they are 5-6 s old, past its 5 s grace (`src/dapr/connections.rs`), and
/// the host's pool holds such connections; the host keeps running for its
/// drain window after the same SIGTERM, so it must let them go.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_sigterm_the_host_closes_its_idle_connections_to_daprd_and_still_sends() {
    let broker = Arc::new(Broker::default());
    let sidecar_port = free_port();
    let args = [
        "--consumer-file",
        "faulty.wasm",
        "--max-concurrency",
        "16",
        "--drain-secs",
        "60",
        "--shutdown-deadline-secs",
        "60",
    ];
    let mut host = Host::start("consumer", sidecar_port, &args, &[]);
    let mut input = Input::new(host.port, "orders");
    input.concurrency = 16;
    let config = Config {
        input: Some(input),
        outputs: vec!["out".into()],
        port: sidecar_port,
        output_delay: Duration::from_millis(50),
        ..Config::default()
    };
    let sidecar = Sidecar::start(config, broker.clone()).await;
    for i in 0..32 {
        broker.push("orders", SbMessage::new(&format!("m-{i}"), b"send:out"));
    }
    eventually(Duration::from_secs(30), "32 sent and answered", || {
        broker.messages("out").len() == 32 && sidecar.deliveries().len() == 32
    })
    .await;
    let pooled = sidecar.open_connections();
    assert!(pooled >= 1, "the sends left idle connections in the pool");

    let pid = host.pid().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    eventually(Duration::from_secs(10), "the host's connections to daprd closed", || sidecar.open_connections() == 0)
        .await;
    assert!(host.running.as_mut().unwrap().child.try_wait().unwrap().is_none(), "the host still drains");

    // It still delivers and sends while it drains, a connection a call.
    broker.push("orders", SbMessage::new("late", b"send:out"));
    eventually(Duration::from_secs(30), "the late one sent and answered", || {
        broker.messages("out").len() == 33 && sidecar.deliveries().len() == 33
    })
    .await;
    assert_eq!(sidecar.deliveries().last(), Some(&("late".to_string(), 1, Some(200))));
    eventually(Duration::from_secs(10), "the late send's connection closed", || sidecar.open_connections() == 0).await;
    eprintln!("{pooled} connections pooled before SIGTERM, none after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_reuse_is_set_from_the_environment_and_zero_is_refused() {
    let mut host = Host::start("consumer", 1, &["--consumer-file", "faulty.wasm"], &[("WASM_PC_INSTANCE_REUSE", "2")]);
    let mut reasons = Vec::new();
    for i in 0..4 {
        let id = format!("m-{i}");
        let headers = [("content-type", "application/json"), ("id", id.as_str())];
        let (status, body) = request(host.port, "POST", "/orders", &headers, b"count".to_vec()).await;
        assert_eq!(status, 500, "the guest asks for a retry");
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        reasons.push(body["error"].as_str().unwrap().rsplit(' ').next().unwrap().to_string());
    }
    assert_eq!(reasons, ["calls=1", "calls=2", "calls=1", "calls=2"], "each instance serves two messages");
    assert_eq!(host.terminate().code(), Some(0));

    let refused = command(&["serve", "--role", "consumer"]).env("WASM_PC_INSTANCE_REUSE", "0").output().unwrap();
    assert_eq!(refused.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("--instance-reuse"), "{stderr}");
}

/// A new pod whose ConfigMap holds a module the host refuses (a bad push
/// that reached a scale-out) must not crash-loop or take deliveries: it
/// stays up, says why in `/readyz`, and goes live when a good file lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_started_with_a_refused_module_stays_up_unready_until_one_loads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("consumer.wasm"), b"\0asm but not really").unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let mut host =
        Host::start("consumer", 1, &["--modules-dir", dir_arg, "--rescan-secs", "0.2"], &[("WASM_PC_LOG", "info")]);

    assert_eq!(request(host.port, "GET", "/healthz", &[], vec![]).await.0, 200, "alive: no restart loop");
    let (status, body) = request(host.port, "GET", "/readyz", &[], vec![]).await;
    let readyz: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 503, "{readyz}");
    let reason = readyz["reason"].as_str().unwrap();
    assert!(reason.starts_with("no consumer module is live: ") && reason.contains("consumer"), "{reason}");
    assert!(readyz["reload"][0]["live"].is_null(), "{readyz}");
    let headers = [("content-type", "application/json"), ("id", "early")];
    let (status, _) = request(host.port, "POST", "/orders", &headers, order("early").to_string().into_bytes()).await;
    assert_eq!(status, 500, "a delivery that slips in is refused (redelivered), never acknowledged");

    // A good module lands, as a ConfigMap update would bring it.
    let tmp = dir.path().join(".consumer.tmp");
    std::fs::write(&tmp, crate::guests::bytes("consumer")).unwrap();
    std::fs::rename(&tmp, dir.path().join("consumer.wasm")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while request(host.port, "GET", "/readyz", &[], vec![]).await.0 != 200 {
        assert!(Instant::now() < deadline, "never became ready after a good module landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let headers = [("content-type", "application/json"), ("id", "late")];
    let (status, body) = request(host.port, "POST", "/orders", &headers, order("late").to_string().into_bytes()).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(host.terminate().code(), Some(0));
}

/// A delivery whose client goes away mid-way (daprd cancelled it, a
/// connection broke) is no longer in flight: the count is kept by a guard,
/// not by code after an `.await` that never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_dropped_by_its_client_is_no_longer_counted_in_flight() {
    use tokio::io::AsyncWriteExt;
    let host = Host::start("consumer", 1, &["--consumer-file", "faulty.wasm"], &[]);
    let body = b"sleep:1500";
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", host.port)).await.unwrap();
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nid: gone\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(host.port, "wasm_pc_in_flight").await != 1 {
        assert!(Instant::now() < deadline, "the delivery never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(stream);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(host.port, "wasm_pc_in_flight").await != 0 {
        assert!(Instant::now() < deadline, "the dropped delivery is still counted in flight");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(host.port, "wasm_pc_in_flight_peak").await, 1);
}

/// Publishes through the double's API, as a Dapr publisher would.
async fn publish(sidecar: &Sidecar, topic: &str, content_type: &str, body: Vec<u8>, query: &str) -> u16 {
    let path = format!("/v1.0/publish/bus/{topic}{query}");
    request(sidecar.port(), "POST", &path, &[("content-type", content_type)], body).await.0
}

fn pubsub_events(sidecar: &Sidecar) -> Vec<(String, u32, PubSubOutcome, serde_json::Value)> {
    sidecar
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::TopicDelivery { id, attempt, outcome, body } => Some((id, attempt, outcome, body)),
            _ => None,
        })
        .collect()
}

/// A pub/sub consumer and its sidecar double; `extra` adds host flags.
async fn pubsub_consumer(extra: &[&str], broker: &Arc<Broker>) -> (Host, Sidecar) {
    let config = "transient-sku=FLAKY,transient-attempts=2,max-order-cents=100000";
    let mut args = vec!["--pubsub", "bus", "--topic", "orders", "--consumer-config", config];
    args.extend(extra);
    let host = Host::start("consumer", 1, &args, &[("APP_API_TOKEN", "app-secret")]);
    let sidecar = Sidecar::start(
        Config {
            pubsub: Some(PubSubConfig { name: "bus".into(), app_port: host.port, max_delivery_count: 10 }),
            app_token: Some("app-secret".into()),
            ..Config::default()
        },
        broker.clone(),
    )
    .await;
    (host, sidecar)
}

/// One order each: fine, flaky (retried twice), over the credit limit.
async fn publish_three(sidecar: &Sidecar) {
    for (id, sku, price) in [("p-ok", "A", 100), ("p-flaky", "FLAKY", 100), ("p-poison", "YACHT", 9_000_000)] {
        let event =
            serde_json::json!({"id": id, "customer": "acme", "items": [{"sku": sku, "qty": 2, "price_cents": price}]});
        assert_eq!(publish(sidecar, "orders", "application/json", event.to_string().into_bytes(), "").await, 204);
    }
}

/// `(delivery count, outcome)` of every delivery of an order, in order.
fn deliveries_of(sidecar: &Sidecar, order: &str) -> Vec<(u32, PubSubOutcome)> {
    pubsub_events(sidecar).into_iter().filter(|e| e.3["data"]["id"] == order).map(|e| (e.1, e.2)).collect()
}

/// A topic consumed through Dapr pub/sub: the subscription daprd asks for,
/// CloudEvents in, SUCCESS / RETRY / DROP out, and the broker's delivery
/// count reaching the guest. With a dead-letter topic, daprd moves dropped
/// events there, and (as daprd does without a retry policy) the first
/// failure too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pubsub_subscribes_and_answers_every_event_with_a_status() {
    let broker = Arc::new(Broker::default());
    let (host, sidecar) = pubsub_consumer(&[], &broker).await;
    let subscribed = || {
        sidecar.events().into_iter().find_map(|e| match e {
            Event::Subscribe { status, body } => Some((status, body)),
            _ => None,
        })
    };
    eventually(Duration::from_secs(10), "the subscription call", || subscribed().is_some()).await;
    assert_eq!(
        subscribed().unwrap(),
        (Some(200), serde_json::json!([{"pubsubname": "bus", "topic": "orders", "route": "/bus/orders"}]))
    );
    publish_three(&sidecar).await;
    eventually(Duration::from_secs(20), "every event settled", || deliveries_of(&sidecar, "p-flaky").len() == 3).await;
    assert_eq!(deliveries_of(&sidecar, "p-ok"), [(1, PubSubOutcome::Success)]);
    assert_eq!(
        deliveries_of(&sidecar, "p-flaky"),
        [(1, PubSubOutcome::Retry), (2, PubSubOutcome::Retry), (3, PubSubOutcome::Success)],
        "the guest saw the broker's delivery count, and the third delivery succeeded"
    );
    assert_eq!(deliveries_of(&sidecar, "p-poison"), [(1, PubSubOutcome::Drop)]);
    assert!(broker.messages("orders").is_empty());
    assert_eq!(metric(host.port, "wasm_pc_messages_dead_lettered_total").await, 1);
    assert_eq!(metric(host.port, "wasm_pc_messages_abandoned_total").await, 2);
    let (status, _) = request(host.port, "GET", "/dapr/subscribe", &[], vec![]).await;
    assert_eq!(status, 401, "daprd's calls carry the app token");

    let broker = Arc::new(Broker::default());
    let (_host, sidecar) = pubsub_consumer(&["--dead-letter-topic", "orders-dead"], &broker).await;
    eventually(Duration::from_secs(10), "the second subscription", || {
        sidecar
            .events()
            .iter()
            .any(|e| matches!(e, Event::Subscribe { body, .. } if body[0]["deadLetterTopic"] == "orders-dead"))
    })
    .await;
    publish_three(&sidecar).await;
    eventually(Duration::from_secs(20), "two in the dead-letter topic", || broker.messages("orders-dead").len() == 2)
        .await;
    let dead: Vec<String> = broker
        .messages("orders-dead")
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.body).unwrap()["data"]["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(dead.contains(&"p-poison".to_string()) && dead.contains(&"p-flaky".to_string()), "{dead:?}");
}

/// rawPayload subscriptions get the broker's bytes back exactly; bulk
/// subscriptions get one status per entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pubsub_raw_payloads_and_bulk_deliveries() {
    let broker = Arc::new(Broker::default());
    // The sidecar's port first: the host forwards through it.
    let sidecar_port = free_port();
    let args = [
        "--pubsub",
        "bus",
        "--topic",
        "raw",
        "--raw-payload",
        "--bulk",
        "10",
        "--consumer-config",
        "forward-binding=done",
    ];
    let host = Host::start("consumer", sidecar_port, &args, &[]);
    let sidecar = Sidecar::start(
        Config {
            pubsub: Some(PubSubConfig { name: "bus".into(), app_port: host.port, max_delivery_count: 10 }),
            outputs: vec!["done".into()],
            port: sidecar_port,
            ..Config::default()
        },
        broker.clone(),
    )
    .await;
    let binary: Vec<u8> = (0..=255u8).rev().chain([0, b'"', b'\\', b'+', b'%']).collect();
    assert_eq!(
        publish(&sidecar, "raw", "application/octet-stream", binary.clone(), "?metadata.rawPayload=true").await,
        204
    );
    for i in 0..21 {
        let body = serde_json::json!(order(&format!("b-{i}"))).to_string().into_bytes();
        assert_eq!(publish(&sidecar, "raw", "application/json", body, "?metadata.rawPayload=true").await, 204);
    }
    let bulks = || -> Vec<(usize, Vec<PubSubOutcome>)> {
        sidecar
            .events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Bulk { entries, outcomes } => Some((entries, outcomes)),
                _ => None,
            })
            .collect()
    };
    eventually(Duration::from_secs(20), "22 entries settled", || bulks().iter().map(|b| b.0).sum::<usize>() == 22)
        .await;
    assert!(bulks().iter().all(|(entries, _)| *entries <= 10), "at most maxMessagesCount per delivery");
    assert!(bulks().into_iter().flat_map(|b| b.1).all(|o| o == PubSubOutcome::Success));
    assert_eq!(metric(host.port, "wasm_pc_messages_completed_total").await, 22);
    // The guest got the broker's bytes exactly (it forwards raw bodies as they are).
    use base64::Engine as _;
    let forwarded: Vec<Vec<u8>> = broker
        .messages("done")
        .iter()
        .map(|m| serde_json::from_slice::<String>(&m.body).unwrap())
        .map(|text| base64::engine::general_purpose::STANDARD.decode(text).unwrap())
        .collect();
    assert_eq!(forwarded.len(), 22);
    assert!(forwarded.contains(&binary), "the binary payload reached the guest byte for byte");
}

/// A binding mapped to a topic publishes there: the body under its content
/// type, the message id as metadata.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_producer_publishes_to_a_topic_mapped_to_its_binding() {
    let broker = Arc::new(Broker::default());
    let sidecar = Sidecar::start(
        Config {
            pubsub: Some(PubSubConfig { name: "bus".into(), app_port: 1, max_delivery_count: 10 }),
            api_token: Some("dapr-secret".into()),
            ..Config::default()
        },
        broker.clone(),
    )
    .await;
    let args = ["--producer-config", "binding=orders-out", "--publish", "orders-out=bus/orders"];
    let producer = Host::start("producer", sidecar.port(), &args, &[("DAPR_API_TOKEN", "dapr-secret")]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while request(producer.port, "GET", "/readyz", &[], vec![]).await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let batch = serde_json::json!([order("t-1")]).to_string().into_bytes();
    let (status, body) =
        request(producer.port, "POST", "/produce", &[("content-type", "application/json")], batch).await;
    assert_eq!(status, 202, "{}", String::from_utf8_lossy(&body));
    let published = broker.messages("orders");
    assert_eq!(published.len(), 1);
    assert_eq!(published[0].id, "t-1", "the message id rides along as MessageId");
    let envelope: serde_json::Value = serde_json::from_slice(&published[0].body).unwrap();
    assert_eq!(
        (envelope["datacontenttype"].as_str(), envelope["data"]["id"].as_str()),
        (Some("application/json"), Some("t-1"))
    );
    assert!(sidecar.events().iter().any(|e| matches!(e, Event::Published { topic, status: 204 } if topic == "orders")));
}

/// Half-sent requests are held no longer than the header time-out, a client
/// over the connection cap gets a clear 503 at once, and the host serves
/// again as soon as the flood's connections time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_sent_requests_time_out_and_a_connection_flood_is_shed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A header time-out long enough that the flood below is still in place
    // when the next connection is refused, on a loaded machine too.
    let env = [("WASM_PC_HEADER_TIMEOUT_MS", "1500"), ("WASM_PC_MAX_CONNECTIONS", "20")];
    let host = Host::start("consumer", 1, &["--consumer-file", "faulty.wasm"], &env);

    // One half-sent request: closed after the header time-out.
    let mut half = tokio::net::TcpStream::connect(("127.0.0.1", host.port)).await.unwrap();
    half.write_all(b"POST /orders HTTP/1.1\r\nhost: x\r\ncontent-").await.unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), half.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "a half-sent request was held past the header time-out");
    assert!(started.elapsed() >= Duration::from_millis(1_000), "closed only after the time-out");

    // A flood of half-sent requests: 20 slots plus the loopback reserve (64).
    let mut flood = Vec::new();
    for _ in 0..84 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", host.port)).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        flood.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut over = tokio::net::TcpStream::connect(("127.0.0.1", host.port)).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(2), over.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 503") && answer.contains("too many connections"), "{answer}");
    // The flood times out; the host answers again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", host.port)).await.ok()?;
            s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.ok()?;
            let mut reply = String::new();
            s.read_to_string(&mut reply).await.ok()?;
            Some(reply)
        };
        let reply = tokio::time::timeout(Duration::from_secs(1), probe).await.ok().flatten().unwrap_or_default();
        if reply.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered from the flood");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(flood);
}

/// A producer's batch goes to the output binding one call after another, in
/// order; a send the broker refuses fails the request, which names that order
/// and lists the orders sent before it, and nothing after it is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_is_sent_in_order_and_stops_at_a_refused_order() {
    let broker = Arc::new(Broker::default());
    let sidecar = Sidecar::start(
        Config {
            outputs: vec!["orders".into()],
            refuse: vec!["b-7".into()],
            output_delay: Duration::from_millis(5),
            ..Config::default()
        },
        broker.clone(),
    )
    .await;
    let producer = Host::start("producer", sidecar.port(), &["--send-attempts", "1"], &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while request(producer.port, "GET", "/readyz", &[], vec![]).await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ids: Vec<String> = (0..40).map(|i| format!("b-{i}")).collect();
    let batch = serde_json::Value::Array(ids.iter().map(|id| order(id)).collect()).to_string().into_bytes();
    let (status, body) =
        request(producer.port, "POST", "/produce", &[("content-type", "application/json")], batch).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["failed"], "b-7");
    let sent: Vec<String> =
        answer["sent"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    assert_eq!(sent, ids[..7].to_vec(), "the orders before the refused one");
    let stored: Vec<String> = broker.messages("orders").into_iter().map(|m| m.id).collect();
    assert_eq!(stored, sent, "what the answer calls sent is what the broker holds, in order");
    assert_eq!(sidecar.peak_concurrent_outputs(), 1, "one call at a time");
}
