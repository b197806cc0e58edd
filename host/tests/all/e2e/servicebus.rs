//! End to end on Service Bus: real daprd sidecars running Dapr's own
//! `bindings.azure.servicebusqueues` component (the Go `azservicebus` SDK
//! inside) against `wasm-pc servicebus`, with two `wasm-pc serve` hosts and
//! the real guests, all as processes on 127.0.0.1.
//!
//! The Components are the ones `k8s/base` deploys, rendered by kustomize;
//! only the connection string differs: their `servicebus-app` secret comes
//! from a local file secret store holding the endpoint's connection string.
//! Ignored by default; `cargo xtask e2e` (and `cargo xtask ci`) runs it.
#![allow(clippy::print_stdout)] // the test reports the figures docs/BENCHMARKS.md records

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine as _;
use wasm_pc::queue::{Database, NewMessage, StoreOptions, StoredMessage, SubQueue};

use super::{App, Proc, order, post, post_sample_orders};
use crate::process::free_port;

/// The app ids the Components are scoped to.
const CONSUMER: &str = "wasm-pc-consumer";
const PRODUCER: &str = "wasm-pc-producer";

/// `wasm-pc servicebus` with its queues declared in the emulator's format.
struct Endpoint {
    proc: Proc,
    db: PathBuf,
    connection_string: String,
}

impl Endpoint {
    fn start(dir: &Path) -> Endpoint {
        let port = free_port();
        let config = serde_json::json!({"UserConfig": {"Namespaces": [{"Name": "local", "Queues": [
            // Short locks keep the restart after SIGTERM quick: unsettled
            // deliveries come back when their lock expires.
            {"Name": "orders", "Properties": {"LockDuration": "PT10S", "MaxDeliveryCount": 10}},
            {"Name": "orders-poison", "Properties": {}},
            {"Name": "done", "Properties": {}},
            {"Name": "slow", "Properties": {"LockDuration": "PT4S", "MaxDeliveryCount": 10}},
        ], "Topics": []}]}});
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let db = dir.join("servicebus.db");
        let mut command = crate::process::command(&["servicebus", "--port", &port.to_string(), "--config"]);
        command.arg(dir.join("config.json")).arg("--db").arg(&db).env("WASM_PC_LOG", "info,wasm_pc=debug");
        let mut proc = Proc::spawn(&mut command, &dir.join("servicebus.log"));
        proc.wait_for_port(port, "the Service Bus endpoint", Duration::from_secs(30));
        let connection_string = format!(
            "Endpoint=sb://localhost:{port};SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;"
        );
        Endpoint { proc, db, connection_string }
    }

    /// Messages in a queue (or its dead-letter queue), read beside the endpoint.
    fn messages(&self, queue: &str, sub: SubQueue) -> Vec<StoredMessage> {
        let mut db = Database::open(&self.db, StoreOptions::default()).unwrap();
        db.peek(queue, sub, 0, 100_000).unwrap()
    }

    /// Waits until `queue` holds `want` messages with distinct keys.
    fn collect(
        &self,
        queue: &str,
        sub: SubQueue,
        want: usize,
        within: Duration,
        key: impl Fn(&StoredMessage) -> String,
    ) -> BTreeMap<String, Vec<StoredMessage>> {
        let deadline = Instant::now() + within;
        loop {
            let mut seen: BTreeMap<String, Vec<StoredMessage>> = BTreeMap::new();
            for m in self.messages(queue, sub) {
                seen.entry(key(&m)).or_default().push(m);
            }
            if seen.len() >= want {
                return seen;
            }
            assert!(Instant::now() < deadline, "only {} of {want} in {queue} ({sub:?})", seen.len());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until each of the orders `t-0`..`t-{count}` is either done
    /// (its summary in `done`) or a dead letter of `orders`; says which.
    fn settle_orders(
        &self,
        count: usize,
        within: Duration,
    ) -> (BTreeMap<String, Vec<StoredMessage>>, BTreeMap<String, StoredMessage>) {
        let deadline = Instant::now() + within;
        loop {
            let mut done: BTreeMap<String, Vec<StoredMessage>> = BTreeMap::new();
            for m in self.messages("done", SubQueue::Active) {
                if let Some(order) = serde_json::from_slice::<serde_json::Value>(&m.body)
                    .ok()
                    .and_then(|v| v["order"].as_str().map(str::to_string))
                    .filter(|order| order.starts_with("t-"))
                {
                    done.entry(order).or_default().push(m);
                }
            }
            let shed: BTreeMap<String, StoredMessage> = self
                .messages("orders", SubQueue::DeadLetter)
                .into_iter()
                .map(|m| (order_id(&m), m))
                .filter(|(id, _)| id.starts_with("t-"))
                .collect();
            let missing: Vec<String> = (0..count)
                .map(|i| format!("t-{i}"))
                .filter(|id| !done.contains_key(id) && !shed.contains_key(id))
                .collect();
            if missing.is_empty() {
                return (done, shed);
            }
            assert!(Instant::now() < deadline, "neither done nor dead-lettered: {missing:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn send(&self, queue: &str, message: NewMessage) {
        let mut db = Database::open(&self.db, StoreOptions::default()).unwrap();
        db.send(queue, vec![message]).unwrap();
    }
}

/// The Dapr Components of `k8s/base`, rendered, with their secrets resolved
/// by a local file store; written into each app's resources directory by
/// scope. `extra` adds test-only Components (YAML) for one app.
fn components(root: &Path, endpoint: &Endpoint, extra: &[(&str, String)]) {
    let rendered =
        Command::new("kubectl").args(["kustomize"]).arg(crate::guests::workspace().join("k8s/base")).output().unwrap();
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let text = String::from_utf8(rendered.stdout).unwrap();
    let secrets = serde_json::json!({"servicebus-app": {"connectionString": endpoint.connection_string}});
    // Outside the resources directories: daprd would try to load it as a resource.
    let secrets_file = root.join("secrets.json");
    std::fs::write(&secrets_file, secrets.to_string()).unwrap();
    for app in [CONSUMER, PRODUCER] {
        secret_store(&root.join(app), &secrets_file);
    }
    let mut count = 0;
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let mut value: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).unwrap();
        if value["kind"].as_str() != Some("Component") {
            continue;
        }
        let name = value["metadata"]["name"].as_str().unwrap().to_string();
        let scopes: Vec<String> =
            value["scopes"].as_sequence().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect();
        // Self-hosted daprd resolves secretKeyRef through the named store.
        value["auth"] = serde_yaml_ng::from_str("secretStore: localsecrets").unwrap();
        for app in scopes {
            std::fs::write(root.join(&app).join(format!("{name}.yaml")), serde_yaml_ng::to_string(&value).unwrap())
                .unwrap();
            count += 1;
        }
    }
    assert_eq!(count, 3, "orders, orders-out and orders-poison from k8s/base");
    for (app, yaml) in extra {
        let name = yaml.lines().find_map(|l| l.trim().strip_prefix("name: ")).unwrap().to_string();
        std::fs::write(root.join(app).join(format!("{name}.yaml")), yaml).unwrap();
    }
}

/// The local file secret store the Components read `servicebus-app` from.
fn secret_store(resources: &Path, secrets_file: &Path) {
    std::fs::create_dir_all(resources).unwrap();
    std::fs::write(
        resources.join("localsecrets.yaml"),
        format!(
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: localsecrets\nspec:\n  type: secretstores.local.file\n  version: v1\n  metadata:\n    - name: secretsFile\n      value: \"{}\"\n    - name: multiValued\n      value: \"true\"\n",
            secrets_file.display()
        ),
    )
    .unwrap();
}

/// A test-only output binding on the endpoint (the consumer forwards here).
fn output_component(name: &str, queue: &str) -> String {
    format!(
        "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: bindings.azure.servicebusqueues\n  version: v1\n  metadata:\n    - name: connectionString\n      secretKeyRef:\n        name: servicebus-app\n        key: connectionString\n    - name: queueName\n      value: \"{queue}\"\n    - name: direction\n      value: \"output\"\n    - name: disableEntityManagement\n      value: \"true\"\nauth:\n  secretStore: localsecrets\n"
    )
}

fn order_of(m: &StoredMessage) -> String {
    serde_json::from_slice::<serde_json::Value>(&m.body).unwrap()["order"].as_str().unwrap().to_string()
}

/// The id of an order as the producer sent it (the body of a message in `orders`).
fn order_id(m: &StoredMessage) -> String {
    serde_json::from_slice::<serde_json::Value>(&m.body)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string))
        .unwrap_or_else(|| m.id.clone())
}

fn id_of(m: &StoredMessage) -> String {
    m.id.clone()
}

#[test]
#[ignore = "needs a real daprd (cargo xtask daprd); run with cargo xtask e2e"]
fn real_daprd_on_the_local_service_bus_end_to_end() {
    let daprd = super::daprd();
    let dir = super::workdir();
    let root = dir.path();
    let endpoint = Endpoint::start(&root.join("endpoint"));
    components(root, &endpoint, &[(CONSUMER, output_component("done", "done"))]);

    // As the Deployments in k8s/base configure them.
    let producer = App::start_as(&daprd, PRODUCER, "producer", root, &["--producer-config", "binding=orders-out"]);
    let consumer_args = [
        "--input-binding",
        "orders",
        "--dead-letter-binding",
        "orders-poison",
        "--max-concurrency",
        "16",
        "--consumer-config",
        "forward-binding=done,transient-sku=FLAKY,transient-attempts=2,max-order-cents=100000",
    ];
    let mut consumer = App::start_as(&daprd, CONSUMER, "consumer", root, &consumer_args);

    // 1. JSON orders, one flaky (retried, then fine) and one poison, to the
    // dead-letter binding with its reason.
    let started = Instant::now();
    let expected = post_sample_orders(&producer);
    let done = endpoint.collect("done", SubQueue::Active, 199, Duration::from_secs(60), order_of);
    let elapsed = started.elapsed();
    for (id, copies) in &done {
        let summary: serde_json::Value = serde_json::from_slice(&copies[0].body).unwrap();
        let o = &expected[id];
        let total = o["items"][0]["qty"].as_u64().unwrap() * o["items"][0]["price_cents"].as_u64().unwrap();
        assert_eq!(summary["total_cents"], total, "{id}: the consumer saw the order the producer sent");
        assert_eq!(summary["customer"], "acme <&> co");
    }
    assert!(done.contains_key("o-0-0"), "the flaky order succeeded after its retries");
    assert!(!done.contains_key("o-0-1"), "the poison order was not processed");
    let metrics = consumer.metrics();
    assert!(metrics.contains("wasm_pc_messages_abandoned_total 2"), "the flaky order was refused twice:\n{metrics}");
    println!(
        "e2e throughput (Service Bus): 199 orders through two sidecars and the local Service Bus in {:.2} s = {:.0} orders/s",
        elapsed.as_secs_f64(),
        199.0 / elapsed.as_secs_f64()
    );
    let poison = endpoint.collect("orders-poison", SubQueue::Active, 1, Duration::from_secs(30), id_of);
    let dead = &poison.values().next().unwrap()[0];
    let reason = dead.metadata.iter().find(|(k, _)| k == "deadletter-reason").map(|(_, v)| v.as_str()).unwrap_or("");
    assert!(reason.contains("credit limit"), "{dead:?}");
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&dead.body).unwrap(), expected["o-0-1"]);

    // 2. A binary body: exact bytes, through base64 and back.
    let binary: Vec<u8> = (0..=255u8).rev().chain([0, b'"', b'\\', b'+', b'%']).collect();
    let (status, body) = post(&producer, "application/octet-stream", &binary);
    assert_eq!(status, 202, "{body}");
    let forwarded = endpoint.collect("done", SubQueue::Active, 200, Duration::from_secs(30), id_of);
    let raw =
        forwarded.values().flatten().find(|m| m.metadata.iter().any(|(k, v)| k == "wasmpc-encoding" && v == "base64"));
    let text: String = serde_json::from_slice(&raw.expect("the binary order was forwarded").body).unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD.decode(text).unwrap(),
        binary,
        "binary bodies round-trip exactly"
    );

    // 3. SIGTERM to host and daprd together with work in flight loses nothing.
    let orders: Vec<_> = (0..400).map(|i| order(&format!("t-{i}"), "A", 100)).collect();
    let (status, _) = post(&producer, "application/json", &serde_json::to_vec(&orders).unwrap());
    assert_eq!(status, 202);
    std::thread::sleep(Duration::from_millis(50));
    consumer.terminate_together();
    // Back without a dead-letter binding, as a deployment without one runs.
    let without_binding = [&consumer_args[..2], &consumer_args[4..]].concat();
    consumer.launch_as(&daprd, CONSUMER, "consumer", root, &without_binding, "daprd-consumer-2.log");
    let (after, shed) = endpoint.settle_orders(400, Duration::from_secs(90));
    // daprd 1.18 refuses new events once it is shutting down ("input binding
    // is closed") while its Service Bus receiver still runs for a few hundred
    // milliseconds; each refusal is an abandon, and on loopback a message can
    // go round ten times in that window. Such an order is dead-lettered, by
    // daprd alone, and not lost (docs/RELIABILITY.md).
    for (id, dead) in &shed {
        assert_eq!(dead.dead_letter_reason.as_deref(), Some("MaxDeliveryCountExceeded"), "{id}: {dead:?}");
        let why = dead.dead_letter_description.as_deref().unwrap_or("");
        assert!(why.contains("abandoned by the client"), "{id} was dead-lettered by daprd's abandons: {why}");
    }
    let twice = after.values().filter(|copies| copies.len() > 1).count();
    println!(
        "e2e SIGTERM (Service Bus): {} of 400 orders completed after the restart, {} dead-lettered by daprd's shutdown, \
         none lost; {twice} processed twice (at-least-once)",
        after.len(),
        shed.len()
    );

    // 4. Poison without a dead-letter binding: refused until Service Bus's
    // max delivery count, then in orders/$DeadLetterQueue, its count risen.
    let yacht = serde_json::to_vec(&[order("p-1", "YACHT", 9_000_000)]).unwrap();
    assert_eq!(post(&producer, "application/json", &yacht).0, 202);
    let dead = endpoint.collect("orders", SubQueue::DeadLetter, shed.len() + 1, Duration::from_secs(60), order_id);
    let dead = &dead.get("p-1").expect("the poison order was dead-lettered")[0];
    assert_eq!(dead.dead_letter_reason.as_deref(), Some("MaxDeliveryCountExceeded"), "{dead:?}");
    assert_eq!(dead.delivery_count, 10, "every refusal was an abandon Service Bus counted");

    // 5. Lock renewal: a delivery slower than the queue's 4 s lock, on a
    // binding that renews every second, is delivered once.
    let slow = output_component("slow", "slow").replace("\"output\"", "\"input\"").replace(
        "    - name: disableEntityManagement",
        "    - name: lockRenewalInSec\n      value: \"1\"\n    - name: disableEntityManagement",
    );
    secret_store(&root.join("wasm-pc-slow"), &root.join("secrets.json"));
    std::fs::write(root.join("wasm-pc-slow/slow.yaml"), slow).unwrap();
    let slow_args = ["--input-binding", "slow", "--consumer-file", "faulty.wasm", "--timeout-ms", "30000"];
    let slow_app = App::start_as(&daprd, "wasm-pc-slow", "consumer", root, &slow_args);
    endpoint
        .send("slow", NewMessage { id: Some("slow-1".into()), body: b"sleep:9000".to_vec(), ..NewMessage::default() });
    let deadline = Instant::now() + Duration::from_secs(60);
    while !endpoint.messages("slow", SubQueue::Active).is_empty() {
        assert!(Instant::now() < deadline, "the slow message was never completed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let metrics = slow_app.metrics();
    assert!(metrics.contains("wasm_pc_messages_completed_total 1"), "one delivery, completed:\n{metrics}");
    assert!(metrics.contains("wasm_pc_messages_abandoned_total 0"), "never redelivered:\n{metrics}");
}

/// Producer request to consumer settled, 2,000 orders, on the Components we
/// deploy; and the endpoint's share of a CPU meanwhile, which says whether
/// it is the bottleneck (`cargo xtask bench-e2e`).
#[test]
#[ignore = "a benchmark; run with cargo xtask bench-e2e"]
fn throughput_on_the_local_service_bus() {
    const ORDERS: usize = 2_000;
    let daprd = super::daprd();
    let dir = super::workdir();
    let root = dir.path();
    let endpoint = Endpoint::start(&root.join("endpoint"));
    components(root, &endpoint, &[(CONSUMER, output_component("done", "done"))]);
    let producer = App::start_as(&daprd, PRODUCER, "producer", root, &["--producer-config", "binding=orders-out"]);
    let consumer_args = ["--input-binding", "orders", "--consumer-config", "forward-binding=done"];
    let _consumer = App::start_as(&daprd, CONSUMER, "consumer", root, &consumer_args);
    let cpu_before = super::cpu_seconds(endpoint.proc.id());
    let elapsed =
        super::drive(&producer, ORDERS, Duration::from_secs(300), || endpoint.messages("done", SubQueue::Active).len());
    let cpu = super::cpu_seconds(endpoint.proc.id()) - cpu_before;
    println!(
        "throughput Service Bus: {ORDERS} orders, producer request to consumer settled, in {:.2} s = {:.0} orders/s; \
         the endpoint used {:.2} CPU s ({:.0} % of one core)",
        elapsed.as_secs_f64(),
        ORDERS as f64 / elapsed.as_secs_f64(),
        cpu,
        100.0 * cpu / elapsed.as_secs_f64()
    );
}

/// `k8s/overlays/pubsub`'s Component, its secrets read from the local store.
fn pubsub_component(resources: &Path) {
    let path = crate::guests::workspace().join("k8s/overlays/pubsub/pubsub.yaml");
    let mut value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    value["auth"] = serde_yaml_ng::from_str("secretStore: localsecrets").unwrap();
    std::fs::write(resources.join("orders-pubsub.yaml"), serde_yaml_ng::to_string(&value).unwrap()).unwrap();
}

/// Pub/sub end to end on the local Service Bus, with the pub/sub overlay's
/// Component: the broker's delivery count reaches the guest (a flaky order
/// succeeds on its third delivery), DROP discards without a dead-letter
/// topic and moves the event there with one.
#[test]
#[ignore = "needs a real daprd (cargo xtask daprd); run with cargo xtask e2e"]
fn real_daprd_pubsub_on_the_local_service_bus() {
    let daprd = super::daprd();
    let dir = super::workdir();
    let root = dir.path();
    let endpoint = Endpoint::start(&root.join("endpoint"));
    components(root, &endpoint, &[(CONSUMER, output_component("done", "done"))]);
    // As `k8s/overlays/pubsub` does: the binding Components give way to the
    // pub/sub one. Left in, the consumer's daprd would also read `orders`
    // through the input binding, whose deliveries (404 in pub/sub mode) are
    // abandoned and raise the delivery count the guest sees.
    for (app, name) in [(CONSUMER, "orders"), (PRODUCER, "orders-out")] {
        std::fs::remove_file(root.join(app).join(format!("{name}.yaml"))).unwrap();
    }
    for app in [CONSUMER, PRODUCER] {
        pubsub_component(&root.join(app));
    }
    let config = "forward-binding=done,transient-sku=FLAKY,transient-attempts=2,max-order-cents=100000";
    let subscribe = ["--pubsub", "orders-pubsub", "--topic", "orders", "--consumer-config", config];
    let mut consumer = App::start_as(&daprd, CONSUMER, "consumer", root, &subscribe);
    let publish = ["--producer-config", "binding=orders-out", "--publish", "orders-out=orders-pubsub/orders"];
    let producer = App::start_as(&daprd, PRODUCER, "producer", root, &publish);

    let mut orders: Vec<_> = (0..30).map(|i| order(&format!("ps-{i}"), "A", 100 + i as u64)).collect();
    orders.push(order("ps-flaky", "FLAKY", 100));
    orders.push(order("ps-poison", "YACHT", 9_000_000));
    let (status, body) = post(&producer, "application/json", &serde_json::to_vec(&orders).unwrap());
    assert_eq!(status, 202, "{body}");
    let done = endpoint.collect("done", SubQueue::Active, 31, Duration::from_secs(60), order_of);
    assert!(done.contains_key("ps-flaky") && !done.contains_key("ps-poison"));
    let metrics = consumer.metrics();
    assert!(metrics.contains("wasm_pc_messages_abandoned_total 2"), "two RETRYs, then success:\n{metrics}");
    assert!(metrics.contains("wasm_pc_messages_dead_lettered_total 1"), "one DROP:\n{metrics}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !endpoint.messages("orders", SubQueue::Active).is_empty() {
        assert!(Instant::now() < deadline, "the dropped event was not completed away");
        std::thread::sleep(Duration::from_millis(100));
    }

    // With a dead-letter topic, daprd moves the dropped event there.
    consumer.terminate_together();
    let with_topic = [&subscribe[..], &["--dead-letter-topic", "orders-poison"]].concat();
    consumer.launch_as(&daprd, CONSUMER, "consumer", root, &with_topic, "daprd-consumer-2.log");
    let poison = serde_json::to_vec(&[order("ps-poison-2", "YACHT", 9_000_000)]).unwrap();
    assert_eq!(post(&producer, "application/json", &poison).0, 202);
    let dead = endpoint.collect("orders-poison", SubQueue::Active, 1, Duration::from_secs(60), id_of);
    let event: serde_json::Value = serde_json::from_slice(&dead.values().next().unwrap()[0].body).unwrap();
    assert_eq!(event["data"]["id"], "ps-poison-2", "{event}");
}
