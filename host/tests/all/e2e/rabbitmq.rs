//! On RabbitMQ (`bindings.rabbitmq`), as the first end-to-end test ran it,
//! and with the shipped Resiliency policy.
#![allow(clippy::print_stdout)] // the test reports the figures docs/BENCHMARKS.md records

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{API_TOKEN, APP_TOKEN, App, Proc, order, post, post_sample_orders, start_daprd};
use crate::process::{command, free_port, http};

/// RabbitMQ on loopback ports, with the management API for inspection.
struct Rabbit {
    proc: Proc,
    amqp: u16,
    api: u16,
    epmd: u16,
}

impl Drop for Rabbit {
    /// `rabbitmq-server` is a script: the Erlang VM and its helpers run as
    /// its children (in its process group, started as a group of its own)
    /// and epmd as a daemon of its own. Kill the group, then stop epmd, so
    /// no broker outlives the test, passed or failed. The data is disposable.
    fn drop(&mut self) {
        let group = format!("-{}", self.proc.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).stderr(Stdio::null()).status();
        self.proc.reap();
        // epmd refuses while the dead node is still registered, which it
        // notices a moment later.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let out = Command::new("epmd").args(["-port", &self.epmd.to_string(), "-kill"]).output();
            match out {
                Ok(out) if !String::from_utf8_lossy(&out.stdout).contains("not allowed") => break,
                Err(_) => break,
                Ok(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Rabbit {
    fn start(dir: &Path) -> Rabbit {
        let (amqp, api, dist, epmd) = (free_port(), free_port(), free_port(), free_port());
        for sub in ["home", "mnesia", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!(
                "listeners.tcp.default = 127.0.0.1:{amqp}\nmanagement.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {api}\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_management].\n").unwrap();
        let proc = Proc::spawn(
            Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server")
                // A process group of its own, so Drop can stop all of it.
                .process_group(0)
                // Erlang writes crash dumps (MnesiaCore.*) into its working
                // directory: keep them out of the source tree.
                .current_dir(dir)
                .env("HOME", dir.join("home"))
                .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
                .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", dir.join("log"))
                .env("RABBITMQ_NODENAME", format!("wasmpc{amqp}@localhost"))
                .env("RABBITMQ_DIST_PORT", dist.to_string())
                .env("ERL_EPMD_PORT", epmd.to_string()),
            &dir.join("rabbitmq.log"),
        );
        // Owned before the waits, so a broker that never comes up is stopped too.
        let mut rabbit = Rabbit { proc, amqp, api, epmd };
        rabbit.proc.wait_for_port(amqp, "rabbitmq", Duration::from_secs(60));
        rabbit.proc.wait_for_port(api, "rabbitmq management", Duration::from_secs(60));
        rabbit
    }

    /// Waits until `queue` holds `count` messages ready (the management
    /// API's figures lag by up to its stats interval, 5 s).
    fn wait_for_depth(&self, queue: &str, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let out = Command::new("curl")
                .args(["-s", "-u", "guest:guest"])
                .arg(format!("http://127.0.0.1:{}/api/queues/%2F/{queue}", self.api))
                .output()
                .unwrap();
            let ready = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|v| v["messages_ready"].as_u64())
                .unwrap_or(0);
            if ready as usize >= count {
                return;
            }
            assert!(Instant::now() < deadline, "{queue} holds {ready} of {count}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Takes up to `count` messages off `queue` (acknowledged).
    fn take(&self, queue: &str, count: usize) -> Vec<serde_json::Value> {
        let body =
            serde_json::json!({"count": count, "ackmode": "ack_requeue_false", "encoding": "base64"}).to_string();
        let out = Command::new("curl")
            .args(["-s", "-u", "guest:guest", "-H", "content-type: application/json", "-X", "POST", "-d", &body])
            .arg(format!("http://127.0.0.1:{}/api/queues/%2F/{queue}/get", self.api))
            .output()
            .unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }
}

fn component(dir: &Path, name: &str, queue: &str, amqp: u16, direction: Option<&str>) {
    let direction = direction.map(|d| format!("    - name: direction\n      value: \"{d}\"\n")).unwrap_or_default();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: bindings.rabbitmq\n  version: v1\n  metadata:\n    - name: queueName\n      value: \"{queue}\"\n    - name: host\n      value: \"amqp://guest:guest@127.0.0.1:{amqp}\"\n    - name: durable\n      value: \"true\"\n    - name: deleteWhenUnused\n      value: \"false\"\n{direction}"
        ),
    )
    .unwrap();
}

/// Collects every message from `queue` until `want` distinct keys are seen.
fn collect(
    rabbit: &Rabbit,
    queue: &str,
    want: usize,
    within: Duration,
    key: impl Fn(&serde_json::Value) -> String,
) -> BTreeMap<String, Vec<serde_json::Value>> {
    let deadline = Instant::now() + within;
    let mut seen: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    while seen.len() < want {
        assert!(Instant::now() < deadline, "only {} of {want} on {queue}", seen.len());
        let got = rabbit.take(queue, 500);
        if got.is_empty() {
            std::thread::sleep(Duration::from_millis(100));
        }
        for m in got {
            seen.entry(key(&m)).or_default().push(m);
        }
    }
    seen
}

/// The AMQP message id of a message taken off a queue.
fn message_id_of(m: &serde_json::Value) -> String {
    m["properties"]["message_id"].as_str().unwrap_or_default().to_string()
}

/// The order id of a forwarded summary.
fn order_of(m: &serde_json::Value) -> String {
    serde_json::from_slice::<serde_json::Value>(&payload(m)).unwrap()["order"].as_str().unwrap().to_string()
}

fn payload(m: &serde_json::Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(m["payload"].as_str().unwrap()).unwrap()
}

#[test]
#[ignore = "needs a real daprd (cargo xtask daprd) and rabbitmq-server; run with cargo xtask e2e"]
fn real_daprd_and_rabbitmq_end_to_end() {
    let daprd = super::daprd();
    let dir = super::workdir();
    let root = dir.path();
    let rabbit = Rabbit::start(&root.join("rabbit"));

    // The producer's sidecar has an output binding; the consumer's an input
    // binding on the same queue (no `direction`, so daprd probes OPTIONS),
    // plus outputs for forwarded results and for poison.
    component(&root.join("producer"), "orders", "orders", rabbit.amqp, Some("output"));
    component(&root.join("consumer"), "orders", "orders", rabbit.amqp, None);
    component(&root.join("consumer"), "done", "done", rabbit.amqp, Some("output"));
    component(&root.join("consumer"), "poison", "poison", rabbit.amqp, Some("output"));

    let producer = App::start(&daprd, "producer", root, &[]);
    let consumer_args = [
        "--consumer-config",
        "forward-binding=done,transient-sku=FLAKY,transient-attempts=2,max-order-cents=100000",
        "--dead-letter-binding",
        "poison",
    ];
    let mut consumer = App::start(&daprd, "consumer", root, &consumer_args);

    // 1. JSON orders, one flaky (retried, then fine) and one poison.
    let started = Instant::now();
    let expected = post_sample_orders(&producer);
    let done = collect(&rabbit, "done", 199, Duration::from_secs(60), order_of);
    let elapsed = started.elapsed();
    for (id, copies) in &done {
        let summary: serde_json::Value = serde_json::from_slice(&payload(&copies[0])).unwrap();
        let o = &expected[id];
        let total = o["items"][0]["qty"].as_u64().unwrap() * o["items"][0]["price_cents"].as_u64().unwrap();
        assert_eq!(summary["total_cents"], total, "{id}: the consumer saw the order the producer sent");
        assert_eq!(summary["customer"], "acme <&> co");
    }
    assert!(done.contains_key("o-0-0"), "the flaky order succeeded after its retries");
    let metrics = consumer.metrics();
    assert!(
        metrics.contains("wasm_pc_binding_probes_total 1"),
        "daprd's OPTIONS probe subscribed the binding:\n{metrics}"
    );
    assert!(metrics.contains("wasm_pc_messages_abandoned_total 2"), "the flaky order was refused twice:\n{metrics}");
    assert!(!done.contains_key("o-0-1"), "the poison order was not processed");
    println!(
        "e2e throughput: 199 orders through two sidecars and RabbitMQ in {:.2} s = {:.0} orders/s",
        elapsed.as_secs_f64(),
        199.0 / elapsed.as_secs_f64()
    );

    let poison = collect(&rabbit, "poison", 1, Duration::from_secs(30), message_id_of);
    let dead = poison.values().next().unwrap()[0].clone();
    assert!(dead["properties"]["headers"]["deadletter-reason"].as_str().unwrap().contains("credit limit"), "{dead}");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&payload(&dead)).unwrap(), expected["o-0-1"]);

    // 2. A binary body: exact bytes, through base64 and back.
    let binary: Vec<u8> = (0..=255u8).rev().chain([0, b'"', b'\\', b'+', b'%']).collect();
    let (status, body) = post(&producer, "application/octet-stream", &binary);
    assert_eq!(status, 202, "{body}");
    let raw = collect(&rabbit, "done", 1, Duration::from_secs(30), message_id_of);
    let m = raw.values().next().unwrap()[0].clone();
    assert_eq!(m["properties"]["headers"]["wasmpc-encoding"], "base64");
    let text: String = serde_json::from_slice(&payload(&m)).unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD.decode(text).unwrap(),
        binary,
        "binary bodies round-trip exactly"
    );

    // 3. SIGTERM to host and daprd together with work in flight loses nothing.
    let orders: Vec<_> = (0..400).map(|i| order(&format!("t-{i}"), "A", 100)).collect();
    let (status, _) = post(&producer, "application/json", &serde_json::to_vec(&orders).unwrap());
    assert_eq!(status, 202);
    std::thread::sleep(Duration::from_millis(20));
    consumer.terminate_together();
    // Restart the consumer side; whatever was not acknowledged comes back.
    consumer.launch(&daprd, "consumer", root, &consumer_args, "daprd-consumer-2.log");
    let after = collect(&rabbit, "done", 400, Duration::from_secs(60), order_of);
    assert!((0..400).all(|i| after.contains_key(&format!("t-{i}"))), "none lost across SIGTERM");
    let twice = after.values().filter(|copies| copies.len() > 1).count();
    println!("e2e SIGTERM: 400 of 400 orders completed after the restart; {twice} processed twice (at-least-once)");
}

/// The shipped `k8s/base/resiliency.yaml`, its one component target renamed
/// to `input_binding` (same policy, same scopes): `(app id it is scoped
/// to, maxRetries, YAML for daprd's resources dir)`. Read line by line (the
/// file's block layout; k8s/tests/test_resiliency.py checks its content).
fn shipped_resiliency(input_binding: &str) -> (String, u64, String) {
    let path = crate::guests::workspace().join("k8s/base/resiliency.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let value = |line: &str, key: &str| line.trim().strip_prefix(key).map(|v| v.trim().trim_matches('"').to_string());
    let meaningful = |line: &str| !line.trim().is_empty() && !line.trim_start().starts_with('#');
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.contains(&"kind: Resiliency"), "{}: not a Resiliency", path.display());
    let components = lines.iter().position(|l| l.trim() == "components:").expect("spec.targets.components");
    let target = (components + 1..lines.len()).find(|&i| meaningful(lines[i])).expect("a component target");
    let (indent, rest) = lines[target].split_at(lines[target].len() - lines[target].trim_start().len());
    let (_, after) = rest.split_once(':').expect("`<component>:`");
    let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    out[target] = format!("{indent}{input_binding}:{after}");
    let max_retries = lines.iter().find_map(|l| value(l, "maxRetries:")).expect("maxRetries").parse().unwrap();
    let scopes = lines.iter().position(|l| l.trim() == "scopes:").expect("scopes");
    let app_id = lines[scopes + 1..].iter().find(|l| meaningful(l)).and_then(|l| value(l, "- ")).expect("a scope");
    (app_id, max_retries, out.join("\n") + "\n")
}

/// Seconds since midnight (UTC) of a tracing JSON timestamp
/// (`2025-01-02T03:04:05.123456Z`).
fn seconds_of_day(timestamp: &str) -> f64 {
    let time = timestamp.get(11..).unwrap_or_default().trim_end_matches('Z');
    let mut parts = time.split(':');
    let mut field = || parts.next().and_then(|p| p.parse::<f64>().ok()).unwrap_or_else(|| panic!("{timestamp}"));
    field() * 3600.0 + field() * 60.0 + field()
}

/// When the host handled each delivery: `message id -> [(the host's
/// delivery-count estimate, seconds of the first event logged inside that
/// delivery's span)]`, from the host's JSON log.
fn deliveries_in_host_log(log: &Path) -> BTreeMap<String, Vec<(u64, f64)>> {
    let mut seen: BTreeMap<String, Vec<(u64, f64)>> = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap().lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let spans = event["spans"].as_array().cloned().unwrap_or_default();
        let Some(span) = spans.iter().find(|s| s["name"] == "deliver") else { continue };
        let (Some(id), Some(delivery)) = (span["messaging.message.id"].as_str(), span["delivery"].as_u64()) else {
            continue;
        };
        let at = seconds_of_day(event["timestamp"].as_str().unwrap_or_default());
        let list = seen.entry(id.to_string()).or_default();
        if !list.iter().any(|(d, _)| *d == delivery) {
            list.push((delivery, at));
        }
    }
    seen
}

/// A Go duration as daprd logs it (`623.4567ms`, `1.05s`), in seconds.
fn go_duration(text: &str) -> f64 {
    let number = |s: &str| s.parse::<f64>().unwrap_or_else(|_| panic!("not a duration: {text}"));
    if let Some(ms) = text.strip_suffix("ms") {
        number(ms) / 1e3
    } else if let Some(us) = text.strip_suffix("µs") {
        number(us) / 1e6
    } else {
        number(text.strip_suffix('s').unwrap_or(text))
    }
}

/// Publishes `body` to `queue` through the default exchange, with the
/// `MessageId` header the output binding would set; waits (bounded) until
/// the queue exists so the message is routed.
fn publish(rabbit: &Rabbit, queue: &str, id: &str, body: &serde_json::Value) {
    let request = serde_json::json!({
        "properties": {"headers": {"MessageId": id}},
        "routing_key": queue,
        "payload": body.to_string(),
        "payload_encoding": "string",
    })
    .to_string();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = Command::new("curl")
            .args(["-s", "-u", "guest:guest", "-H", "content-type: application/json", "-X", "POST", "-d", &request])
            .arg(format!("http://127.0.0.1:{}/api/exchanges/%2F/amq.default/publish", rabbit.api))
            .output()
            .unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if answer["routed"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "{queue} never took {id}: {answer}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `GET path` on `port` until it answers `status` (bounded).
fn wait_for_status(port: u16, path: &str, status: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if http(([127, 0, 0, 1], port).into(), "GET", path, "text/plain", b"").is_ok_and(|(got, _)| got == status) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: GET {path} never answered {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The shipped Resiliency (k8s/base/resiliency.yaml) in a real daprd: a
/// transient failure is retried by daprd itself with exponential back-off,
/// then completed once; poison is not retried; nothing flaky reaches the
/// poison binding.
///
/// Dapr's exponential back-off waits 500 ms x 1.5^k, each wait randomized by
/// +-50% (cenkalti/backoff's default, not settable in a Resiliency): the
/// first wait is in [250, 750] ms, the second in [375, 1125] ms. Only the
/// windows grow for sure (one message's second gap can be shorter than its
/// first), so those are what is checked: the gaps between the host's
/// deliveries, and the first wait, which daprd logs.
#[test]
#[ignore = "needs a real daprd (cargo xtask daprd) and rabbitmq-server; run with cargo xtask e2e"]
fn real_daprd_retries_with_the_shipped_resiliency_policy() {
    const INPUT: &str = "orders";
    let daprd = super::daprd();
    let dir = super::workdir();
    let root = dir.path();
    let rabbit = Rabbit::start(&root.join("rabbit"));

    let resources = root.join("consumer");
    component(&resources, INPUT, "orders", rabbit.amqp, Some("input"));
    component(&resources, "done", "done", rabbit.amqp, Some("output"));
    component(&resources, "poison", "poison", rabbit.amqp, Some("output"));
    // Its own file: daprd reads only the first YAML document of a file.
    let (app_id, max_retries, policy) = shipped_resiliency(INPUT);
    // The sample consumer refuses a FLAKY order while its delivery-count (the
    // host's estimate, which counts daprd's retries) is at most this.
    const FAILURES: u64 = 2;
    assert!(max_retries >= FAILURES, "the policy must outlast {FAILURES} transient failures");
    let consumer_config =
        format!("forward-binding=done,transient-sku=FLAKY,transient-attempts={FAILURES},max-order-cents=100000");
    std::fs::write(resources.join("resiliency.yaml"), policy).unwrap();

    // The host, logging JSON at debug (every delivery leaves an event inside
    // its `deliver` span), then daprd under the app id the policy is scoped to.
    let (app_port, http_port) = (free_port(), free_port());
    let host_log = root.join("host-consumer.log");
    let mut cmd = command(&["serve", "--role", "consumer", "--app-port", &app_port.to_string()]);
    cmd.args(["--listen-address", "127.0.0.1", "--input-binding", INPUT, "--dead-letter-binding", "poison"])
        .args(["--consumer-config", &consumer_config])
        .env("DAPR_HTTP_PORT", http_port.to_string())
        .env("APP_API_TOKEN", APP_TOKEN)
        .env("DAPR_API_TOKEN", API_TOKEN)
        .env("WASM_PC_LOG", "info,wasm_pc=debug,guest=debug")
        .env("WASM_PC_LOG_FORMAT", "json")
        .stdin(Stdio::null());
    let mut host = Proc::spawn(&mut cmd, &host_log);
    host.wait_for_port(app_port, "the consumer host", Duration::from_secs(60));
    let daprd_log = root.join("daprd-consumer.log");
    let _sidecar = start_daprd(&daprd, &app_id, app_port, http_port, &resources, &daprd_log);
    wait_for_status(http_port, "/v1.0/healthz", 204, "daprd (bindings started)");
    wait_for_status(app_port, "/readyz", 200, "the consumer host");

    // Sequential deliveries (the RabbitMQ binding has one handler): three
    // flaky orders, a plain one and a poison one between them.
    let flaky = ["r-flaky-0", "r-flaky-1", "r-flaky-2"];
    let sent = [
        (flaky[0], order(flaky[0], "FLAKY", 350)),
        ("r-plain", order("r-plain", "A", 350)),
        (flaky[1], order(flaky[1], "FLAKY", 350)),
        ("r-poison", order("r-poison", "YACHT", 9_000_000)),
        (flaky[2], order(flaky[2], "FLAKY", 350)),
    ];
    let started = Instant::now();
    for (id, body) in &sent {
        publish(&rabbit, "orders", id, body);
    }
    let done = collect(&rabbit, "done", 4, Duration::from_secs(60), order_of);
    let elapsed = started.elapsed();
    let poison = collect(&rabbit, "poison", 1, Duration::from_secs(30), message_id_of);

    // Completed once each; only the poison order in the poison binding.
    for id in flaky.iter().chain(&["r-plain"]) {
        assert_eq!(done.get(*id).map(Vec::len), Some(1), "{id} completed exactly once: {:?}", done.keys());
    }
    assert_eq!(poison.keys().collect::<Vec<_>>(), ["r-poison"], "nothing flaky was dead-lettered");
    assert_eq!(poison["r-poison"].len(), 1);
    let (_, metrics) = http(([127, 0, 0, 1], app_port).into(), "GET", "/metrics", "text/plain", b"").unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    let refused = flaky.len() as u64 * FAILURES;
    assert!(metrics.contains(&format!("wasm_pc_messages_abandoned_total {refused}")), "{metrics}");
    assert!(metrics.contains("wasm_pc_messages_dead_lettered_total 1"), "{metrics}");

    // daprd loaded the policy and did the retrying. It logs the wait it chose
    // for the FIRST retry of an operation only (dapr/kit NotifyRecover), and
    // the attempts once it recovers; in delivery order (one handler).
    let daprd_text = std::fs::read_to_string(&daprd_log).unwrap();
    assert!(daprd_text.contains("Loading Resiliency configuration"), "daprd did not load the policy:\n{daprd_text}");
    let first_waits: Vec<f64> = daprd_text
        .lines()
        .filter_map(|l| l.split("Retrying in ").nth(1))
        .map(|rest| go_duration(rest.split(['…', '"', ' ']).next().unwrap_or_default()))
        .collect();
    assert_eq!(first_waits.len(), flaky.len(), "one retry chain per flaky order:\n{daprd_text}");
    let recovered: Vec<&str> = daprd_text
        .lines()
        .filter_map(|l| l.split("Recovered processing operation ").nth(1))
        .filter_map(|rest| rest.split(" after ").nth(1))
        .filter_map(|rest| rest.split(" attempts").next())
        .collect();
    let attempts = (FAILURES + 1).to_string();
    assert_eq!(recovered, vec![attempts.as_str(); flaky.len()], "recovered inside daprd:\n{daprd_text}");

    // What the host saw: each flaky order three times with the estimate
    // rising 1, 2, 3; the plain and the poison order once each.
    let seen = deliveries_in_host_log(&host_log);
    for id in ["r-plain", "r-poison"] {
        assert_eq!(seen.get(id).map(|d| d.iter().map(|(n, _)| *n).collect::<Vec<_>>()), Some(vec![1]), "{id}");
    }
    // The windows of the first and second wait (+-50% around 0.5 s, 0.75 s).
    let windows = [(0.25, 0.75), (0.375, 1.125)];
    // Measurement slack: host timestamps are taken as a delivery ends, and
    // a loaded machine (the other e2e test runs alongside) adds latency.
    let (early, late) = (0.02, 0.5);
    let mut report = Vec::new();
    for (i, id) in flaky.iter().enumerate() {
        let deliveries = &seen[*id];
        assert_eq!(deliveries.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3], "{id}: {deliveries:?}");
        let times: Vec<f64> = deliveries.iter().map(|(_, t)| *t).collect();
        for (k, pair) in times.windows(2).enumerate() {
            let gap = (pair[1] - pair[0]).rem_euclid(86_400.0);
            let (low, high) = windows[k];
            assert!(gap >= low - early && gap <= high + late, "{id}: retry {} came after {gap:.3} s", k + 1);
            let mut line = format!("{id} retry {}: {:.0} ms", k + 1, gap * 1e3);
            if k == 0 {
                let wait = first_waits[i];
                assert!((low - 0.001..=high + 0.001).contains(&wait), "{id}: daprd chose to wait {wait} s");
                assert!(gap >= wait - early && gap <= wait + late, "{id}: gap {gap:.3} s, daprd's wait {wait:.3} s");
                line += &format!(" (daprd: wait {:.0} ms)", wait * 1e3);
            }
            report.push(line);
        }
    }
    println!("e2e resiliency: {} orders in {:.2} s; {}", sent.len(), elapsed.as_secs_f64(), report.join("; "));
}

/// Producer request to consumer settled, 2,000 orders: the figure
/// docs/BENCHMARKS.md sets beside the Service Bus one (`cargo xtask bench-e2e`).
#[test]
#[ignore = "a benchmark; run with cargo xtask bench-e2e"]
fn throughput_on_rabbitmq() {
    const ORDERS: usize = 2_000;
    let daprd = super::daprd();
    let dir = super::workdir();
    let root = dir.path();
    let rabbit = Rabbit::start(&root.join("rabbit"));
    component(&root.join("producer"), "orders", "orders", rabbit.amqp, Some("output"));
    component(&root.join("consumer"), "orders", "orders", rabbit.amqp, Some("input"));
    component(&root.join("consumer"), "done", "done", rabbit.amqp, Some("output"));
    let producer = App::start(&daprd, "producer", root, &[]);
    let _consumer = App::start(&daprd, "consumer", root, &["--consumer-config", "forward-binding=done"]);
    let mut settled = 0;
    let elapsed = super::drive(&producer, ORDERS, Duration::from_secs(300), || {
        settled += rabbit.take("done", 1_000).len();
        settled
    });
    println!(
        "throughput RabbitMQ: {ORDERS} orders, producer request to consumer settled, in {:.2} s = {:.0} orders/s",
        elapsed.as_secs_f64(),
        ORDERS as f64 / elapsed.as_secs_f64()
    );
}

/// `pubsub.rabbitmq` as loopback needs it (`docs/dapr-pubsub-contract.md`
/// 6.2): durable, kept while the subscriber is down, failures requeued.
fn pubsub_component(dir: &Path, name: &str, amqp: u16) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: pubsub.rabbitmq\n  version: v1\n  metadata:\n    - name: connectionString\n      value: \"amqp://guest:guest@127.0.0.1:{amqp}\"\n    - name: durable\n      value: \"true\"\n    - name: deletedWhenUnused\n      value: \"false\"\n    - name: requeueInFailure\n      value: \"true\"\n    - name: deliveryMode\n      value: \"2\"\n    - name: prefetchCount\n      value: \"16\"\n"
        ),
    )
    .unwrap();
}

/// Pub/sub end to end on RabbitMQ: the producer publishes (a binding mapped
/// to a topic), the consumer subscribes programmatically; a flaky order is
/// retried (RETRY, requeued; RabbitMQ gives no delivery count, so the
/// host's estimate counts), poison is dropped, and every good order is
/// consumed once.
#[test]
#[ignore = "needs a real daprd (cargo xtask daprd) and rabbitmq-server; run with cargo xtask e2e"]
fn real_daprd_pubsub_on_rabbitmq() {
    let daprd = super::daprd();
    let dir = super::workdir();
    let root = dir.path();
    let rabbit = Rabbit::start(&root.join("rabbit"));
    pubsub_component(&root.join("producer"), "bus", rabbit.amqp);
    pubsub_component(&root.join("consumer"), "bus", rabbit.amqp);
    component(&root.join("consumer"), "done", "done", rabbit.amqp, Some("output"));

    let config = "forward-binding=done,transient-sku=FLAKY,transient-attempts=2,max-order-cents=100000";
    let consumer =
        App::start(&daprd, "consumer", root, &["--pubsub", "bus", "--topic", "orders", "--consumer-config", config]);
    // The subscriber's queue exists once daprd subscribed: publish after that.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !consumer.metrics().contains("wasm_pc_subscription_requests_total 1") {
        assert!(Instant::now() < deadline, "daprd never asked for subscriptions:\n{}", consumer.metrics());
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !queue_exists(&rabbit, "consumer-orders") {
        assert!(Instant::now() < deadline, "the subscriber's queue never appeared");
        std::thread::sleep(Duration::from_millis(100));
    }
    let producer = App::start(
        &daprd,
        "producer",
        root,
        &["--producer-config", "binding=orders-out", "--publish", "orders-out=bus/orders"],
    );
    let mut orders: Vec<_> = (0..30).map(|i| order(&format!("ps-{i}"), "A", 100 + i as u64)).collect();
    orders.push(order("ps-flaky", "FLAKY", 100));
    orders.push(order("ps-poison", "YACHT", 9_000_000));
    let (status, body) = post(&producer, "application/json", &serde_json::to_vec(&orders).unwrap());
    assert_eq!(status, 202, "{body}");
    let done = collect(&rabbit, "done", 31, Duration::from_secs(60), order_of);
    assert!(done.contains_key("ps-flaky"), "the flaky order succeeded after its retries");
    assert!(!done.contains_key("ps-poison"));
    assert!(done.values().all(|copies| copies.len() == 1), "each consumed once");
    let metrics = consumer.metrics();
    assert!(metrics.contains("wasm_pc_messages_abandoned_total 2"), "RETRY twice:\n{metrics}");
    assert!(metrics.contains("wasm_pc_messages_dead_lettered_total 1"), "DROP once:\n{metrics}");
}

fn queue_exists(rabbit: &Rabbit, queue: &str) -> bool {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-u", "guest:guest"])
        .arg(format!("http://127.0.0.1:{}/api/queues/%2F/{queue}", rabbit.api))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout) == "200"
}

/// The drain rate of a prefilled queue behind a real daprd, one consumer
/// at a time, interleaved: (a) a null native app that only answers 200, (b)
/// the same app busy for 60 us per delivery (what a slower app costs daprd),
/// (c) a native app doing the sample consumer's work (decoding the delivery,
/// parsing and pricing the order), (d) the host with the sample consumer and
/// a fresh instance per message, with nothing made ahead and (e) as by
/// default, (f) as by default on one worker thread, (g) the host with
/// instance reuse. 1 KiB orders; `cargo xtask bench-e2e`.
#[test]
#[ignore = "a benchmark; run with cargo xtask bench-e2e"]
fn throughput_drain_behind_the_real_sidecar() {
    const MESSAGES: usize = 5_000;
    const ROUNDS: usize = 2;
    let daprd = super::daprd();
    let dir = super::workdir();
    let root = dir.path();
    let rabbit = Rabbit::start(&root.join("rabbit"));
    component(&root.join("producer"), "orders", "drain", rabbit.amqp, Some("output"));
    component(&root.join("consumer"), "orders", "drain", rabbit.amqp, Some("input"));
    let producer = App::start(&daprd, "producer", root, &[]);
    let customer = "c".repeat(900);

    enum Consumer {
        Native(NativeWork),
        Host(&'static [&'static str]),
    }
    let variants = [
        ("null native app (200)", Consumer::Native(NativeWork::Spin(Duration::ZERO))),
        ("native app, busy 60us", Consumer::Native(NativeWork::Spin(Duration::from_micros(60)))),
        ("native app, the order logic", Consumer::Native(NativeWork::Orders)),
        ("wasm-pc, fresh, none ahead", Consumer::Host(&["--prepared-instances", "0"])),
        ("wasm-pc, fresh instances", Consumer::Host(&[])),
        ("wasm-pc, fresh, 1 thread", Consumer::Host(&["--worker-threads", "1"])),
        ("wasm-pc, reuse 100", Consumer::Host(&["--instance-reuse", "100"])),
    ];
    let mut best = [0f64; 7];
    for round in 0..ROUNDS {
        for (v, (name, consumer)) in variants.iter().enumerate() {
            let ids = (0..MESSAGES).map(|i| format!("d{round}-{v}-{i}"));
            for batch in ids.collect::<Vec<_>>().chunks(100) {
                let orders: Vec<_> = batch.iter().map(|id| order_for(id, &customer)).collect();
                let (status, body) = post(&producer, "application/json", &serde_json::to_vec(&orders).unwrap());
                assert_eq!(status, 202, "{body}");
            }
            rabbit.wait_for_depth("drain", MESSAGES, Duration::from_secs(60));
            let (rate, cpu) = match consumer {
                Consumer::Native(work) => drain_native_app(&daprd, root, MESSAGES, *work),
                Consumer::Host(args) => {
                    let mut app = App::start(&daprd, "consumer", root, args);
                    let pids = [app.daprd.as_ref().unwrap().id(), app.host.as_ref().unwrap().child.id()];
                    let before = pids.map(super::cpu_seconds);
                    let rate = drain_rate(MESSAGES, || delivered(&app.metrics()));
                    let after = pids.map(super::cpu_seconds);
                    app.terminate_together();
                    (rate, [after[0] - before[0], after[1] - before[1]])
                }
            };
            let per = |seconds: f64| seconds * 1e6 / MESSAGES as f64;
            println!(
                "drain round {round}: {name:<26} {rate:>7.0} msg/s  CPU per message: daprd {:>4.0}us, app {:>4.0}us",
                per(cpu[0]),
                per(cpu[1])
            );
            best[v] = best[v].max(rate);
        }
    }
    println!("drain behind daprd + RabbitMQ, {MESSAGES} prefilled 1 KiB orders, best of {ROUNDS} interleaved:");
    for (v, (name, _)) in variants.iter().enumerate() {
        println!("drain {name:<26} {:>7.0} msg/s  {:>3.0}% of the null app", best[v], 100.0 * best[v] / best[0]);
    }
}

/// A sample order of about 1 KiB.
fn order_for(id: &str, customer: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "customer": customer, "items": [{"sku": "SKU-0001-XYZ", "qty": 2, "price_cents": 1999}]})
}

/// Deliveries the host has finished, from its `/metrics`.
fn delivered(metrics: &str) -> usize {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("wasm_pc_delivery_seconds_count "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Messages per second from the first delivery seen to the `count`-th,
/// polling `done()` every 10 ms (the first poll's deliveries do not count).
fn drain_rate(count: usize, mut done: impl FnMut() -> usize) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(300);
    let (first, at_first) = loop {
        let n = done();
        if n > 0 {
            break (Instant::now(), n);
        }
        assert!(Instant::now() < deadline, "no delivery arrived");
        std::thread::sleep(Duration::from_millis(10));
    };
    loop {
        let n = done();
        if n >= count {
            return (n - at_first) as f64 / first.elapsed().as_secs_f64();
        }
        assert!(Instant::now() < deadline, "{n} of {count} delivered");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What a native app does with a delivery before it answers 200.
#[derive(Clone, Copy)]
enum NativeWork {
    /// Spins this long, as work would, without reading the body.
    Spin(Duration),
    /// The sample consumer's work, compiled natively: reads the body,
    /// decodes the delivery as the host does, parses and prices the order
    /// (`guest-orders`); anything that fails is answered 500.
    Orders,
}

impl NativeWork {
    async fn answer(self, request: hyper::Request<hyper::body::Incoming>) -> hyper::StatusCode {
        use http_body_util::BodyExt;

        match self {
            NativeWork::Spin(busy) => {
                let started = Instant::now();
                while started.elapsed() < busy {
                    std::hint::spin_loop();
                }
                hyper::StatusCode::OK
            }
            NativeWork::Orders => {
                let (parts, body) = request.into_parts();
                let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else {
                    return hyper::StatusCode::BAD_REQUEST;
                };
                let headers = parts.headers.iter().map(|(k, v)| (k.as_str(), v.as_bytes()));
                let priced = wasm_pc::dapr::codec::decode_delivery(headers, &body)
                    .ok()
                    .and_then(|delivery| guest_orders::Order::parse(&delivery.body).ok()?.total_cents());
                match priced {
                    Some(_) => hyper::StatusCode::OK,
                    None => hyper::StatusCode::INTERNAL_SERVER_ERROR,
                }
            }
        }
    }
}

/// Drains the queue into a native app that answers every delivery after
/// doing `work`: on the host's own HTTP server, so only the work differs.
/// Returns the rate and the CPU seconds daprd and the app (this process:
/// the app's server and the polling) used meanwhile.
fn drain_native_app(daprd: &Path, root: &Path, count: usize, work: NativeWork) -> (f64, [f64; 2]) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let app_port = {
        let answered = Arc::clone(&answered);
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let handler = move |request: hyper::Request<hyper::body::Incoming>| {
                let answered = Arc::clone(&answered);
                async move {
                    let mut status = hyper::StatusCode::OK;
                    if request.method() == hyper::Method::POST {
                        status = work.answer(request).await;
                        if status == hyper::StatusCode::OK {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let mut response =
                        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")));
                    *response.status_mut() = status;
                    response
                }
            };
            let serve = wasm_pc::http::serve(listener, handler, stopped, Duration::from_secs(1), Default::default());
            tokio::spawn(serve);
            port
        })
    };
    let sidecar =
        start_daprd(daprd, "consumer", app_port, free_port(), &root.join("consumer"), &root.join("daprd-null-app.log"));
    let pids = [sidecar.id(), std::process::id()];
    let before = pids.map(super::cpu_seconds);
    let rate = drain_rate(count, || answered.load(Ordering::Relaxed));
    let after = pids.map(super::cpu_seconds);
    sidecar.signal("-TERM");
    sidecar.daprd_exits(Duration::from_secs(30));
    let _ = stop.send(true);
    runtime.shutdown_timeout(Duration::from_secs(5));
    (rate, [after[0] - before[0], after[1] - before[1]])
}
