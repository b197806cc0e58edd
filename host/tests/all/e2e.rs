//! End to end with a real daprd (built by `cargo xtask daprd`) and a real
//! RabbitMQ broker, all as separate processes on 127.0.0.1. Ignored by
//! default; `cargo xtask e2e` runs it (and `cargo xtask ci` does when a
//! cached daprd exists).
#![allow(clippy::print_stdout)] // the test reports the figures docs/BENCHMARKS.md records

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::process::{Running, command, http};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for_port(port: u16, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not open port {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A child process group that is killed when dropped.
struct Proc(Child);

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Proc {
        let file = std::fs::File::create(log).unwrap();
        let err = file.try_clone().unwrap();
        Proc(cmd.stdout(file).stderr(err).spawn().unwrap())
    }

    fn signal(&self, sig: &str) {
        let _ = Command::new("kill").args([sig, &self.0.id().to_string()]).status();
    }

    fn wait(mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// RabbitMQ on loopback ports, with the management API for inspection.
struct Rabbit {
    _proc: Proc,
    amqp: u16,
    api: u16,
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
        wait_for_port(amqp, "rabbitmq", Duration::from_secs(60));
        wait_for_port(api, "rabbitmq management", Duration::from_secs(60));
        Rabbit { _proc: proc, amqp, api }
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

const APP_TOKEN: &str = "e2e-app-token";
const API_TOKEN: &str = "e2e-api-token";

/// One app: daprd plus a `wasm-pc serve` host.
struct App {
    daprd: Option<Proc>,
    host: Option<Running>,
    app_port: u16,
    http_port: u16,
}

impl App {
    /// Starts the `role` app on free ports, daprd logging to `daprd-<role>.log`.
    fn start(daprd: &Path, role: &str, root: &Path, host_args: &[&str]) -> App {
        let mut app = App { daprd: None, host: None, app_port: free_port(), http_port: free_port() };
        app.launch(daprd, role, root, host_args, &format!("daprd-{role}.log"));
        app
    }

    /// Starts the host, then daprd with the components in `root/<role>`, on
    /// this app's ports (again, after a stop). The host goes first: daprd
    /// probes the app port as it starts, and a producer host only waits (not
    /// ready) until daprd answers.
    fn launch(&mut self, daprd: &Path, role: &str, root: &Path, host_args: &[&str], log: &str) {
        let (app_port, http_port) = (self.app_port, self.http_port);
        self.host = Some(start_host(role, app_port, http_port, host_args));
        self.daprd = Some(start_daprd(daprd, role, app_port, http_port, &root.join(role), &root.join(log)));
    }
}

fn start_daprd(daprd: &Path, id: &str, app_port: u16, http_port: u16, resources: &Path, log: &Path) -> Proc {
    let p = Proc::spawn(
        Command::new(daprd)
            .args(["--app-id", id, "--app-port", &app_port.to_string(), "--dapr-http-port", &http_port.to_string()])
            .args(["--dapr-grpc-port", &free_port().to_string(), "--dapr-internal-grpc-port", &free_port().to_string()])
            .args(["--metrics-port", &free_port().to_string(), "--dapr-public-port", &free_port().to_string()])
            .args([
                "--profile-port",
                &free_port().to_string(),
                "--placement-host-address",
                "",
                "--scheduler-host-address",
                "",
            ])
            .args(["--dapr-graceful-shutdown-seconds", "5", "--resources-path"])
            .arg(resources)
            .env("APP_API_TOKEN", APP_TOKEN)
            .env("DAPR_API_TOKEN", API_TOKEN)
            .stdin(Stdio::null()),
        log,
    );
    wait_for_port(http_port, "daprd", Duration::from_secs(30));
    p
}

fn start_host(role: &str, app_port: u16, http_port: u16, extra: &[&str]) -> Running {
    let mut cmd =
        command(&["serve", "--role", role, "--app-port", &app_port.to_string(), "--listen-address", "127.0.0.1"]);
    cmd.args(["--drain-secs", "6", "--shutdown-deadline-secs", "15"])
        .args(extra)
        .env("DAPR_HTTP_PORT", http_port.to_string())
        .env("APP_API_TOKEN", APP_TOKEN)
        .env("DAPR_API_TOKEN", API_TOKEN);
    Running::start(&mut cmd, "app listening for daprd on ")
}

fn order(id: &str, sku: &str, price: u64) -> serde_json::Value {
    serde_json::json!({"id": id, "customer": "acme <&> co", "items": [{"sku": sku, "qty": 2, "price_cents": price}]})
}

fn post(app: &App, content_type: &str, body: &[u8]) -> (u16, String) {
    let (status, body) = http(([127, 0, 0, 1], app.app_port).into(), "POST", "/produce", content_type, body).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
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
    let daprd = PathBuf::from(std::env::var("WASM_PC_DAPRD").expect("WASM_PC_DAPRD: the daprd binary"));
    let dir = tempfile::tempdir().unwrap();
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
    let mut expected = BTreeMap::new();
    for batch in 0..10 {
        let orders: Vec<_> = (0..20)
            .map(|i| {
                let id = format!("o-{batch}-{i}");
                let (sku, price) = match (batch, i) {
                    (0, 0) => ("FLAKY", 350),
                    (0, 1) => ("YACHT", 9_000_000),
                    _ => ("A", 350 + i as u64),
                };
                expected.insert(id.clone(), order(&id, sku, price));
                order(&id, sku, price)
            })
            .collect();
        let (status, body) = post(&producer, "application/json", &serde_json::to_vec(&orders).unwrap());
        assert_eq!(status, 202, "{body}");
    }
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
    let (_, metrics) = http(([127, 0, 0, 1], consumer.app_port).into(), "GET", "/metrics", "text/plain", b"").unwrap();
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("wasm_pc_binding_probes 1"), "daprd's OPTIONS probe subscribed the binding:\n{metrics}");
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
    let host = consumer.host.take().unwrap();
    let sidecar = consumer.daprd.take().unwrap();
    let pid = host.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    sidecar.signal("-TERM");
    assert_eq!(sidecar.wait(Duration::from_secs(30)), Some(0), "daprd exits cleanly");
    let status = host.terminate();
    assert_eq!(status.code(), Some(0));
    // Restart the consumer side; whatever was not acknowledged comes back.
    consumer.launch(&daprd, "consumer", root, &consumer_args, "daprd-consumer-2.log");
    let after = collect(&rabbit, "done", 400, Duration::from_secs(60), order_of);
    assert!((0..400).all(|i| after.contains_key(&format!("t-{i}"))), "none lost across SIGTERM");
    let twice = after.values().filter(|copies| copies.len() > 1).count();
    println!("e2e SIGTERM: 400 of 400 orders completed after the restart; {twice} processed twice (at-least-once)");
}
