//! `wasm-pc serve` against the sidecar double: the Dapr contract, both ways.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::process::{Running, command};
use crate::sidecar::{Broker, Config, Event, Input, SbMessage, Sidecar, eventually};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Host {
    running: Option<Running>,
    port: u16,
}

impl Host {
    /// Starts `wasm-pc serve` on a free port, with extra args and env.
    fn start(role: &str, dapr_port: u16, args: &[&str], env: &[(&str, &str)]) -> Host {
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

    fn terminate(&mut self) -> std::process::ExitStatus {
        let running = self.running.take().unwrap();
        tokio::task::block_in_place(|| running.terminate())
    }
}

async fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, Vec<u8>) {
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

async fn metric(port: u16, name: &str) -> u64 {
    let (_, body) = request(port, "GET", "/metrics", &[], vec![]).await;
    let text = String::from_utf8(body).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no metric {name}"))
}

fn order(id: &str) -> serde_json::Value {
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

    eventually(Duration::from_secs(30), "4 forwarded", || broker.messages("done").len() == 4).await;
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
    eventually(Duration::from_secs(30), "dead-lettered", || broker.messages("poison").len() == 1).await;
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
    let (status, _) = request(good.port, "POST", "/produce", &[("content-type", "application/json")], batch).await;
    assert_eq!(status, 202);
    assert_eq!(broker.messages("outbox").iter().filter(|m| m.id == "x-1").count(), 1);
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
