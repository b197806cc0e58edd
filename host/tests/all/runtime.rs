//! The runtime against real components built from the guest crates.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wasm_pc::metrics::Reading;
use wasm_pc::runtime::outbound::{NoOutbound, Outbound, Recorder};
use wasm_pc::runtime::{
    CacheStatus, ConsumeError, ConsumerModule, FailureKind, Limits, LoadErrorKind, Message, ModuleSpec, ProducerModule,
    Request, Resource, Runtime, RuntimeOptions, World,
};

use crate::guests;
use crate::sidecar::eventually;

fn runtime_with(limits: Limits) -> Runtime {
    Runtime::new(RuntimeOptions { limits, ..RuntimeOptions::default() }).unwrap()
}

/// Small limits, and each instance that returns normally serves up to `uses`
/// messages.
fn runtime_reusing(uses: u32) -> Runtime {
    let instance_reuse = std::num::NonZeroU32::new(uses).unwrap();
    Runtime::new(RuntimeOptions { limits: small_limits(), instance_reuse, ..RuntimeOptions::default() }).unwrap()
}

fn small_limits() -> Limits {
    Limits { timeout: Duration::from_millis(300), max_memory_bytes: 16 << 20, max_concurrent: 8, ..Limits::default() }
}

fn message(id: &str, body: &[u8]) -> Message {
    Message {
        id: id.to_string(),
        body: body.to_vec(),
        content_type: Some("application/json".into()),
        metadata: vec![],
        delivery_count: Some(1),
    }
}

fn order(id: &str, sku: &str) -> String {
    format!(r#"{{"id":"{id}","customer":"acme","items":[{{"sku":"{sku}","qty":3,"price_cents":250}}]}}"#)
}

fn consumer(rt: &Runtime, config: &[(&str, &str)]) -> ConsumerModule {
    let spec = ModuleSpec::new("consumer", guests::bytes("consumer")).with_config(config.iter().copied());
    rt.load_consumer(spec).unwrap()
}

/// The sample producer, sending to binding `orders`.
fn producer(rt: &Runtime) -> ProducerModule {
    rt.load_producer(ModuleSpec::new("producer", guests::bytes("producer")).with_config([("binding", "orders")]))
        .unwrap()
}

/// A JSON `POST /produce` carrying `body`.
fn produce_request(body: impl Into<Vec<u8>>) -> Request {
    Request {
        method: "POST".into(),
        path: "/produce".into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.into(),
    }
}

#[tokio::test]
async fn consumer_accepts_rejects_and_retries() {
    let rt = runtime_with(small_limits());
    let recorder = Recorder::default();
    let module = consumer(&rt, &[("transient-sku", "FLAKY"), ("forward-binding", "done"), ("version", "v7")]);
    let out: Arc<dyn Outbound> = Arc::new(recorder.clone());

    let ok = rt.consume(&module, &message("m1", order("o1", "A").as_bytes()), out.clone()).await.unwrap();
    assert_eq!(ok, Ok(()));
    let sent = recorder.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, "done");
    let summary: serde_json::Value = serde_json::from_slice(&sent[0].1.body).unwrap();
    assert_eq!(summary, serde_json::json!({"order": "o1", "customer": "acme", "total_cents": 750, "version": "v7"}));

    let bad = rt.consume(&module, &message("m2", b"{not json"), out.clone()).await.unwrap();
    assert!(matches!(bad, Err(ConsumeError::Reject(ref r)) if r.contains("not a valid order")), "{bad:?}");

    let mut flaky = message("m3", order("o3", "FLAKY").as_bytes());
    let first = rt.consume(&module, &flaky, out.clone()).await.unwrap();
    assert!(matches!(first, Err(ConsumeError::Retry(ref r)) if r.contains("FLAKY")), "{first:?}");
    flaky.delivery_count = Some(3);
    assert_eq!(rt.consume(&module, &flaky, out.clone()).await.unwrap(), Ok(()));
    assert_eq!(recorder.sent().len(), 2, "only the successes forward");
}

/// A send that hangs (a sidecar that does not answer) uses up the time
/// limit: the error says the time went to the host call, not the guest.
#[tokio::test]
async fn time_spent_waiting_on_the_host_is_not_blamed_on_the_guest() {
    struct Hang;
    impl Outbound for Hang {
        fn send<'a>(
            &'a self,
            _binding: &'a str,
            _message: wasm_pc::runtime::outbound::OutboundMessage,
        ) -> wasm_pc::runtime::outbound::SendFuture<'a> {
            Box::pin(std::future::pending())
        }
    }
    let rt = runtime_with(small_limits());
    let module = producer(&rt);
    let request = produce_request(format!("[{}]", order("h", "A")));
    let error = rt.produce(&module, &request, Arc::new(Hang)).await.unwrap_err();
    let FailureKind::Timeout(spent) = &error.kind else { panic!("{error}") };
    // The sample producer sends its orders as one batch.
    assert_eq!(spent.waiting_on.as_deref(), Some("outbound.send-batch of 1 to orders"), "{error}");
    assert!(spent.in_host_calls >= small_limits().timeout, "{error}");
    assert!(error.to_string().contains("waiting on the host in outbound.send-batch of 1 to orders"), "{error}");
}

/// A producer upgraded to send a new field must not make every message
/// poison at the consumers not yet upgraded.
#[tokio::test]
async fn the_sample_consumer_reads_orders_with_fields_it_does_not_know() {
    let rt = runtime_with(small_limits());
    let module = consumer(&rt, &[]);
    let out: Arc<dyn Outbound> = Arc::new(Recorder::default());
    let newer =
        r#"{"id":"o9","customer":"acme","channel":"web","items":[{"sku":"A","qty":1,"price_cents":5,"gift":true}]}"#;
    assert_eq!(rt.consume(&module, &message("m9", newer.as_bytes()), out).await.unwrap(), Ok(()));
}

/// `depth` JSON arrays, each inside the last.
fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

const ONE_ITEM: &str = r#"[{"sku":"A","qty":1,"price_cents":5}]"#;

/// An order with an unknown field nested `depth` arrays deep.
fn nested_order(id: &str, depth: usize) -> String {
    format!(r#"{{"id":"{id}","customer":"acme","items":{ONE_ITEM},"extra":{}}}"#, nested(depth))
}

/// The sample guests run on a 64 KiB stack (their `build.rs`), and the
/// deepest JSON they read must fit: a body nested past what they read is a
/// clear rejection, never a stack overflow that traps the guest and has a
/// poison message retried. Both read orders into types, skipping unknown
/// fields without recursion; the producer splits a batch into its orders'
/// JSON text the same way, without reading them as JSON values.
#[tokio::test]
async fn the_sample_guests_stacks_hold_the_deepest_json_they_read() {
    let rt = runtime_with(small_limits());
    let consumer = consumer(&rt, &[]);
    let out: Arc<dyn Outbound> = Arc::new(Recorder::default());
    let consume = |body: String| {
        let (rt, consumer, out) = (&rt, &consumer, out.clone());
        async move { rt.consume(consumer, &message("m", body.as_bytes()), out).await.unwrap() }
    };
    assert_eq!(consume(nested_order("deep", 100_000)).await, Ok(()), "an unknown field is skipped at any depth");
    let deep_customer = format!(r#"{{"id":"o","customer":{},"items":{ONE_ITEM}}}"#, nested(100_000));
    let rejected = consume(deep_customer.clone()).await;
    assert!(matches!(rejected, Err(ConsumeError::Reject(ref r)) if r.contains("invalid type")), "{rejected:?}");

    let producer = producer(&rt);
    let produce = |batch: String| {
        let request = produce_request(batch);
        let (rt, producer, out) = (&rt, &producer, out.clone());
        async move { rt.produce(producer, &request, out).await.unwrap() }
    };
    for depth in [125, 126, 100_000] {
        let response = produce(format!("[{}]", nested_order(&format!("deep-{depth}"), depth))).await;
        assert_eq!(response.status, 202, "an unknown field {depth} deep is skipped: {response:?}");
    }
    for batch in [format!("[{deep_customer}]"), nested(100_000)] {
        let response = produce(batch).await;
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap_or_default();
        assert_eq!(response.status, 400, "{body}");
        assert!(body["error"].as_str().is_some_and(|e| e.contains("invalid type")) && body["index"] == 0, "{body}");
    }
}

#[tokio::test]
async fn producer_turns_a_batch_into_sends_and_a_bad_batch_into_400() {
    let rt = runtime_with(small_limits());
    let module = producer(&rt);
    let recorder = Recorder::default();
    let out: Arc<dyn Outbound> = Arc::new(recorder.clone());
    let batch = format!("[{},{},{}]", order("a", "X"), order("b", "Y"), order("c", "Z"));

    let response = rt.produce(&module, &produce_request(batch), out.clone()).await.unwrap();
    assert_eq!(response.status, 202);
    let sent = recorder.sent();
    assert_eq!(sent.len(), 3);
    for ((binding, msg), id) in sent.iter().zip(["a", "b", "c"]) {
        assert_eq!(binding, "orders");
        assert_eq!(msg.id.as_deref(), Some(id));
        let body: serde_json::Value = serde_json::from_slice(&msg.body).unwrap();
        assert_eq!(body["id"], id);
        assert_eq!(body["items"][0]["qty"], 3);
        assert!(msg.metadata.contains(&("order-id".to_string(), id.to_string())));
        assert!(msg.metadata.contains(&("customer".to_string(), "acme".to_string())));
    }

    let bad = format!("[{},{{\"id\":\"\",\"customer\":\"x\",\"items\":[]}}]", order("d", "X"));
    let response = rt.produce(&module, &produce_request(bad), out.clone()).await.unwrap();
    assert_eq!(response.status, 400);
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body["index"], 1);
    assert_eq!(recorder.sent().len(), 3, "a bad batch sends nothing");

    let garbage = rt.produce(&module, &produce_request("nope"), out).await.unwrap();
    assert_eq!(garbage.status, 400);
}

#[tokio::test]
async fn misbehaving_guests_are_stopped_and_classified() {
    let limits = small_limits();
    let rt = runtime_with(limits);
    let module = rt.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap();
    let out: Arc<dyn Outbound> = Arc::new(NoOutbound);
    let run = |cmd: &'static str| {
        let (rt, module, out) = (&rt, &module, out.clone());
        async move { rt.consume(module, &message(cmd, cmd.as_bytes()), out).await }
    };

    let trap = run("trap").await.unwrap_err();
    assert!(matches!(trap.kind, FailureKind::Trap(_)), "{trap}");
    assert!(trap.to_string().contains("faulty@") && trap.to_string().contains("`handle`"), "{trap}");

    let started = Instant::now();
    let spin = run("loop").await.unwrap_err();
    assert!(
        matches!(spin.kind, FailureKind::Timeout(ref t) if t.limit == limits.timeout && !t.in_host_call()),
        "{spin}"
    );
    assert!(spin.to_string().contains("in guest code"), "{spin}");
    // Generous: it proves the loop is stopped, on a loaded machine too.
    assert!(started.elapsed() < limits.timeout * 20, "stopped late: {:?}", started.elapsed());

    let hoard = run("alloc").await.unwrap_err();
    assert!(matches!(hoard.kind, FailureKind::ResourceLimit { resource: Resource::Memory, .. }), "{hoard}");

    let deep = run("recurse").await.unwrap_err();
    assert!(matches!(deep.kind, FailureKind::ResourceLimit { resource: Resource::Stack, .. }), "{deep}");

    // After all that, the same runtime and module still serve.
    assert_eq!(run("ok").await.unwrap(), Ok(()));
    assert!(matches!(run("reject").await.unwrap(), Err(ConsumeError::Reject(_))));
    assert!(matches!(run("retry").await.unwrap(), Err(ConsumeError::Retry(_))));
}

#[tokio::test]
async fn guests_have_no_ambient_authority_and_their_output_is_captured() {
    let rt = runtime_with(small_limits());
    let module = rt
        .load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty")).with_config([("colour", "green")]))
        .unwrap();
    let out: Arc<dyn Outbound> = Arc::new(NoOutbound);
    // Config is what the deployment gave, nothing else.
    let got = rt.consume(&module, &message("c", b"config:colour"), out.clone()).await.unwrap();
    assert_eq!(got, Err(ConsumeError::Retry("green".into())));
    let got = rt.consume(&module, &message("c", b"config:PATH"), out.clone()).await.unwrap();
    assert_eq!(got, Err(ConsumeError::Retry(String::new())));
    // Sends to an unconfigured binding come back as a typed error.
    let got = rt.consume(&module, &message("s", b"send:nowhere"), out.clone()).await.unwrap();
    assert!(matches!(got, Err(ConsumeError::Retry(ref r)) if r.contains("UnknownBinding")), "{got:?}");
    // Printing does not fail the guest, and what it prints reaches the logs,
    // tagged with its stream.
    let logs = CapturedLogs::default();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(logs.clone()).finish();
    let outcome = {
        let _guard = tracing::subscriber::set_default(subscriber);
        rt.consume(&module, &message("l", b"log"), out).await.unwrap()
    };
    assert_eq!(outcome, Ok(()));
    let logs = logs.text();
    for (stream, line) in [("stdout", "to stdout"), ("stderr", "to stderr")] {
        assert!(logs.lines().any(|l| l.contains(&format!("stream=\"{stream}\"")) && l.contains(line)), "{logs}");
    }
}

/// Log lines written by a test's tracing subscriber.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLogs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLogs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for CapturedLogs {
    type Writer = CapturedLogs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn concurrent_invocations_beyond_the_pool_are_refused_not_queued_forever() {
    let limits = Limits { max_concurrent: 2, timeout: Duration::from_millis(400), ..small_limits() };
    let rt = Arc::new(runtime_with(limits));
    let module = rt.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (rt, module) = (rt.clone(), module.clone());
        tasks
            .push(tokio::spawn(async move { rt.consume(&module, &message("l", b"loop"), Arc::new(NoOutbound)).await }));
    }
    let mut kinds = Vec::new();
    for task in tasks {
        kinds.push(task.await.unwrap().unwrap_err().kind);
    }
    let pool =
        kinds.iter().filter(|k| matches!(k, FailureKind::ResourceLimit { resource: Resource::Pool, .. })).count();
    let timeouts = kinds.iter().filter(|k| matches!(k, FailureKind::Timeout(_))).count();
    assert_eq!((pool, timeouts), (1, 2), "{kinds:?}");
}

#[test]
fn wrong_world_core_modules_and_junk_are_refused_with_the_reason() {
    let rt = runtime_with(small_limits());
    let kind = |r: Result<wasm_pc::runtime::AnyModule, wasm_pc::runtime::LoadError>| r.err().map(|e| e.kind);

    let producer_as_consumer = kind(rt.load(ModuleSpec::new("p", guests::bytes("producer")), World::Consumer));
    assert!(
        matches!(
            producer_as_consumer,
            Some(LoadErrorKind::WrongWorld { expected: World::Consumer, found: World::Producer, .. })
        ),
        "{producer_as_consumer:?}"
    );
    let consumer_as_producer = kind(rt.load(ModuleSpec::new("c", guests::bytes("consumer")), World::Producer));
    assert!(matches!(consumer_as_producer, Some(LoadErrorKind::WrongWorld { expected: World::Producer, .. })));

    let core = wat::parse_str("(module (func (export \"handle\")))").unwrap();
    assert!(matches!(kind(rt.load(ModuleSpec::new("core", core), World::Consumer)), Some(LoadErrorKind::CoreModule)));

    let empty_component = wat::parse_str("(component)").unwrap();
    let missing = rt.load(ModuleSpec::new("empty", empty_component), World::Consumer).err().unwrap();
    assert!(matches!(missing.kind, LoadErrorKind::MissingExport { world: World::Consumer, .. }), "{missing}");
    assert!(missing.to_string().contains("module empty") && missing.to_string().contains("wasm-pc:app/consume"));

    let mut truncated = guests::bytes("consumer");
    truncated.truncate(truncated.len() / 2);
    assert!(matches!(
        kind(rt.load(ModuleSpec::new("half", truncated), World::Consumer)),
        Some(LoadErrorKind::Compile(_))
    ));

    assert!(matches!(
        kind(rt.load(ModuleSpec::new("txt", b"hello".to_vec()), World::Consumer)),
        Some(LoadErrorKind::NotWasm)
    ));
    assert!(matches!(kind(rt.load(ModuleSpec::new("none", vec![]), World::Consumer)), Some(LoadErrorKind::Empty)));

    let wants_http = wat::parse_str(r#"(component (import "wasi:http/outgoing-handler@0.2.0" (instance)))"#).unwrap();
    let link = kind(rt.load(ModuleSpec::new("http", wants_http), World::Consumer));
    assert!(matches!(link, Some(LoadErrorKind::MissingExport { .. }) | Some(LoadErrorKind::Link(_))), "{link:?}");
}

#[test]
fn the_artifact_cache_is_hit_and_a_damaged_entry_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let options = RuntimeOptions {
        limits: small_limits(),
        cache_dir: Some(dir.path().to_path_buf()),
        ..RuntimeOptions::default()
    };
    let bytes = guests::bytes("consumer");
    let load = |rt: &Runtime| rt.load_consumer(ModuleSpec::new("consumer", bytes.clone())).unwrap().info.cache;

    let rt = Runtime::new(options.clone()).unwrap();
    assert_eq!(load(&rt), CacheStatus::Miss);
    assert_eq!(load(&rt), CacheStatus::Hit);
    // A new runtime (a restart) hits too.
    let rt = Runtime::new(options.clone()).unwrap();
    assert_eq!(load(&rt), CacheStatus::Hit);

    let entry = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .unwrap();
    let len = std::fs::metadata(&entry).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&entry).unwrap().set_len(len / 2).unwrap();
    assert_eq!(load(&rt), CacheStatus::Rebuilt);
    assert_eq!(load(&rt), CacheStatus::Hit);

    // Flip one byte in the artifact: the checksum catches it.
    let mut data = std::fs::read(&entry).unwrap();
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&entry, &data).unwrap();
    assert_eq!(load(&rt), CacheStatus::Rebuilt);
    assert_eq!(load(&rt), CacheStatus::Hit);
}

/// A Kubernetes `emptyDir` with an `fsGroup`: owned by root, group the
/// fsGroup, mode 2777. Made here owned by another uid, as the host sees it.
fn shared_volume(owner: u32) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::chown(dir.path(), Some(owner), Some(65532)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o2777)).unwrap();
    dir
}

#[test]
fn a_cache_in_a_shared_volume_uses_a_private_subdirectory() {
    use std::os::unix::fs::MetadataExt;
    let volume = shared_volume(4242);
    let options = RuntimeOptions {
        limits: small_limits(),
        cache_dir: Some(volume.path().to_path_buf()),
        ..RuntimeOptions::default()
    };
    let load =
        |rt: &Runtime| rt.load_consumer(ModuleSpec::new("consumer", guests::bytes("consumer"))).unwrap().info.cache;
    assert_eq!(load(&Runtime::new(options.clone()).unwrap()), CacheStatus::Miss);
    assert_eq!(load(&Runtime::new(options).unwrap()), CacheStatus::Hit, "a restart reuses the cache");

    let uid = unsafe_geteuid();
    let private = volume.path().join(format!("wasm-pc-{uid}"));
    let meta = std::fs::metadata(&private).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700), "{}", private.display());
    let volume_mode = std::fs::metadata(volume.path()).unwrap().mode() & 0o7777;
    assert_eq!(volume_mode, 0o2777, "the shared volume itself is left as the kubelet made it");
}

#[test]
fn a_cache_that_cannot_be_prepared_never_stops_the_host() {
    let volume = shared_volume(4242);
    let uid = unsafe_geteuid();
    // Someone else planted our private name as a link to their directory.
    let theirs = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(theirs.path(), volume.path().join(format!("wasm-pc-{uid}"))).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    for dir in [volume.path().to_path_buf(), file.path().join("cache")] {
        let options =
            RuntimeOptions { limits: small_limits(), cache_dir: Some(dir.clone()), ..RuntimeOptions::default() };
        let rt = Runtime::new(options).unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()));
        let module = rt.load_consumer(ModuleSpec::new("consumer", guests::bytes("consumer"))).unwrap();
        assert_eq!(module.info.cache, CacheStatus::Miss, "compiled without a cache: {}", dir.display());
    }
    assert_eq!(std::fs::read_dir(theirs.path()).unwrap().count(), 0, "nothing is written through a planted link");
}

/// The issue's reproduction: the release image's user (65532) on a volume
/// laid out as the kubelet lays out an emptyDir with `fsGroup: 65532`.
#[test]
fn the_host_runs_as_the_image_user_on_a_kubelet_emptydir() {
    use std::os::unix::fs::PermissionsExt;
    let volume = shared_volume(0);
    let modules = tempfile::tempdir().unwrap();
    std::fs::set_permissions(modules.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let module = modules.path().join("consumer.wasm");
    std::fs::write(&module, guests::bytes("consumer")).unwrap();
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o644)).unwrap();
    let check = |expect: &str| {
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65532", "--regid=65532", "--groups=65532", "--"])
            .arg(env!("CARGO_BIN_EXE_wasm-pc"))
            .arg("check")
            .arg(&module)
            .args(["--world", "consumer", "--cache-dir"])
            .arg(volume.path())
            .env("WASM_PC_LOG", "debug")
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success() && stdout.starts_with("ok: ") && stderr.contains(expect),
            "exit {:?}\nstdout: {stdout}\nstderr: {stderr}",
            out.status
        );
    };
    check("cache=Miss");
    check("cache=Hit");
    assert!(volume.path().join("wasm-pc-65532").is_dir());
}

fn unsafe_geteuid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[test]
fn release_guests_fit_in_a_configmap() {
    for which in ["consumer", "producer"] {
        let size = guests::bytes(which).len();
        assert!(size < 1 << 20, "{which} is {size} bytes; a ConfigMap holds at most 1 MiB");
    }
}

/// `cargo component build` (wasm32-wasip1 plus the preview-1 adapter) makes
/// components the host runs like the wasm32-wasip2 ones. Skipped, saying so,
/// where cargo-component is not installed.
#[tokio::test]
async fn guests_built_with_cargo_component_load_and_run() {
    let have = |cmd: &str, args: &[&str], needle: &str| {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(needle))
    };
    if !have("cargo", &["component", "--version"], "cargo-component")
        || !have("rustup", &["target", "list", "--installed"], "wasm32-wasip1")
    {
        eprintln!("SKIPPED: cargo-component or the wasm32-wasip1 target is not installed");
        return;
    }
    let target = guests::workspace().join("target/guests-component");
    let status = std::process::Command::new("cargo")
        .current_dir(guests::workspace())
        .args(["component", "build", "--release", "-p", "guest-consumer", "-p", "guest-producer"])
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .unwrap();
    assert!(status.success());
    let dir = target.join("wasm32-wasip1/release");
    let rt = runtime_with(small_limits());
    let consumer =
        rt.load_consumer(ModuleSpec::new("consumer", std::fs::read(dir.join("guest_consumer.wasm")).unwrap())).unwrap();
    rt.load_producer(ModuleSpec::new("producer", std::fs::read(dir.join("guest_producer.wasm")).unwrap())).unwrap();
    let out: Arc<dyn Outbound> = Arc::new(NoOutbound);
    assert_eq!(rt.consume(&consumer, &message("m", order("o", "A").as_bytes()), out.clone()).await.unwrap(), Ok(()));
    let bad = rt.consume(&consumer, &message("m", b"nope"), out).await.unwrap();
    assert!(matches!(bad, Err(ConsumeError::Reject(_))));
}

fn retry_reason(outcome: Result<Result<(), ConsumeError>, wasm_pc::runtime::InvokeError>) -> String {
    match outcome {
        Ok(Err(ConsumeError::Retry(reason))) => reason,
        other => panic!("expected a retry, got {other:?}"),
    }
}

#[tokio::test]
async fn every_message_gets_a_fresh_instance_by_default() {
    let rt = runtime_with(small_limits());
    let module = rt.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap();
    let out: Arc<dyn Outbound> = Arc::new(NoOutbound);
    for i in 0..4 {
        let outcome = rt.consume(&module, &message(&format!("m{i}"), b"count"), out.clone()).await;
        assert_eq!(retry_reason(outcome), "calls=1", "call {i} saw state from an earlier message");
    }
    assert_eq!(module.idle_instances(), 0);
}

#[test]
fn metrics_say_how_pool_slots_are_reset() {
    let off = RuntimeOptions { limits: small_limits(), pagemap_scan: false, ..RuntimeOptions::default() };
    assert_eq!(reading(&Runtime::new(off).unwrap(), "pool_pagemap_scan"), Some(0));
    let available = wasmtime::PoolingAllocationConfig::is_pagemap_scan_available();
    assert_eq!(reading(&runtime_with(small_limits()), "pool_pagemap_scan"), Some(u64::from(available)));
}

/// The runtime's `/metrics` reading named `name`.
fn reading(rt: &Runtime, name: &str) -> Option<u64> {
    Reading::find(&rt.readings(), name)
}

#[tokio::test]
async fn instances_prepared_ahead_are_taken_by_messages_and_never_reused() {
    let rt = runtime_with(small_limits());
    let module = rt.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap();
    let out: Arc<dyn Outbound> = Arc::new(NoOutbound);
    wait_for_prepared(&module, 2).await;
    for i in 0..6 {
        let outcome = rt.consume(&module, &message(&format!("m{i}"), b"count"), out.clone()).await;
        assert_eq!(retry_reason(outcome), "calls=1", "call {i} ran on an instance a message had used");
        assert!(module.prepared_instances() < 2, "call {i} did not take a prepared instance");
        wait_for_prepared(&module, 2).await;
    }
    assert_eq!(module.idle_instances(), 0, "a used instance is never kept without reuse");
    // A prepared instance's sends go where its invocation says.
    let sink = wasm_pc::runtime::outbound::Recorder::default();
    let sent = rt.consume(&module, &message("s", b"send:orders"), Arc::new(sink.clone())).await;
    assert_eq!(sent.unwrap(), Ok(()));
    let sent = sink.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, "orders");
}

#[tokio::test]
async fn work_ahead_waits_until_the_invoking_task_yields() {
    // The source's answer goes out before any of the work is done.
    let rt = runtime_with(small_limits());
    let module = rt.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap();
    wait_for_work_ahead(&rt, &module).await;
    let outcome = rt.consume(&module, &message("m", b"count"), Arc::new(NoOutbound)).await;
    assert_eq!(retry_reason(outcome), "calls=1");
    // Holds this single-threaded executor without yielding: ample time to
    // refill, had the job run anywhere but behind this task.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(module.prepared_instances(), 1, "work ahead began before the invoking task yielded");
    wait_for_prepared(&module, 2).await;
}

#[tokio::test]
async fn work_ahead_lets_the_workers_other_ready_tasks_go_first() {
    // Under load the next delivery is already waiting: it must not wait
    // behind the last one's work ahead.
    let rt = runtime_with(small_limits());
    let module = Arc::new(rt.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap());
    wait_for_work_ahead(&rt, &module).await;
    let outcome = rt.consume(&module, &message("m", b"count"), Arc::new(NoOutbound)).await;
    assert_eq!(retry_reason(outcome), "calls=1");
    // Ready now, after the job: on this executor it runs once the job has
    // let it by.
    let next = tokio::spawn({
        let module = Arc::clone(&module);
        async move { module.prepared_instances() }
    });
    assert_eq!(next.await.unwrap(), 1, "the work-ahead job ran before a task that was ready");
    wait_for_prepared(&module, 2).await;
}

#[tokio::test]
async fn an_invocation_finishing_while_work_ahead_is_pending_still_hands_its_work_over() {
    let rt = runtime_with(small_limits());
    let module = rt.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap();
    wait_for_work_ahead(&rt, &module).await;
    // The first call's job is still pending when the second finishes.
    fresh_calls_without_yielding(&rt, &module, 2).await;
    assert_eq!(module.prepared_instances(), 0, "both calls took a prepared instance");
    assert_eq!(reading(&rt, "pool_work_ahead_jobs"), Some(2), "the second invocation's work was not taken");
    // Each job prepares the one its invocation took; had the second been
    // turned away, one would be missing until the next delivery.
    wait_for_work_ahead(&rt, &module).await;
}

#[tokio::test]
async fn metrics_count_where_each_invocations_instance_came_from() {
    let rt = runtime_with(small_limits());
    let module = rt.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap();
    wait_for_work_ahead(&rt, &module).await;
    // The two prepared instances go to the first two, and the third makes
    // its own.
    fresh_calls_without_yielding(&rt, &module, 3).await;
    assert_eq!(reading(&rt, "invocations_prepared_instance_total"), Some(2));
    assert_eq!(reading(&rt, "invocations_instantiated_inline_total"), Some(1));
    assert_eq!(reading(&rt, "invocations_reused_instance_total"), Some(0));

    let rt = runtime_reusing(3);
    let module = rt.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap();
    wait_for_work_ahead(&rt, &module).await;
    for (i, calls) in ["calls=1", "calls=2"].into_iter().enumerate() {
        let outcome = rt.consume(&module, &message(&format!("m{i}"), b"count"), Arc::new(NoOutbound)).await;
        assert_eq!(retry_reason(outcome), calls);
    }
    assert_eq!(reading(&rt, "invocations_prepared_instance_total"), Some(1));
    assert_eq!(reading(&rt, "invocations_reused_instance_total"), Some(1));
    assert_eq!(reading(&rt, "invocations_instantiated_inline_total"), Some(0));
}

/// `n` deliveries in a row, none of them yielding to this executor (so no
/// work-ahead job runs in between), each on an instance no message had.
async fn fresh_calls_without_yielding(rt: &Runtime, module: &ConsumerModule, n: usize) {
    for i in 0..n {
        let outcome = rt.consume(module, &message(&format!("m{i}"), b"count"), Arc::new(NoOutbound)).await;
        assert_eq!(retry_reason(outcome), "calls=1", "call {i}");
    }
}

/// Until the module has its 2 prepared instances and no work-ahead job is
/// left (a job is counted out just after its last instance).
async fn wait_for_work_ahead(rt: &Runtime, module: &ConsumerModule) {
    wait_for_prepared(module, 2).await;
    eventually(Duration::from_secs(1), "no work-ahead job to be left", || {
        reading(rt, "pool_work_ahead_jobs") == Some(0)
    })
    .await;
}

async fn wait_for_prepared(module: &wasm_pc::runtime::ConsumerModule, n: usize) {
    for _ in 0..500 {
        if module.prepared_instances() == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    panic!("{} instances prepared, expected {n}", module.prepared_instances());
}

#[tokio::test]
async fn reuse_serves_n_messages_per_instance_and_drops_failed_instances() {
    let rt = runtime_reusing(3);
    let module = rt.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap();
    let out: Arc<dyn Outbound> = Arc::new(NoOutbound);
    let mut seen = Vec::new();
    for i in 0..7 {
        seen.push(retry_reason(rt.consume(&module, &message(&format!("m{i}"), b"count"), out.clone()).await));
    }
    assert_eq!(seen, ["calls=1", "calls=2", "calls=3", "calls=1", "calls=2", "calls=3", "calls=1"]);
    assert_eq!(module.idle_instances(), 1, "the instance that served once is kept");

    // A trap ends the instance: the next message starts afresh.
    let trapped = rt.consume(&module, &message("t", b"trap"), out.clone()).await;
    assert!(matches!(trapped, Err(ref e) if matches!(e.kind, FailureKind::Trap(_))), "{trapped:?}");
    assert_eq!(module.idle_instances(), 0);
    assert_eq!(retry_reason(rt.consume(&module, &message("a", b"count"), out.clone()).await), "calls=1");

    // So does a timeout, and the reused store gets a fresh deadline each time.
    assert_eq!(retry_reason(rt.consume(&module, &message("b", b"count"), out.clone()).await), "calls=2");
    let spun = rt.consume(&module, &message("l", b"loop"), out.clone()).await;
    assert!(matches!(spun, Err(ref e) if matches!(e.kind, FailureKind::Timeout(_))), "{spun:?}");
    assert_eq!(retry_reason(rt.consume(&module, &message("c", b"count"), out.clone()).await), "calls=1");
    tokio::time::sleep(small_limits().timeout + Duration::from_millis(50)).await;
    assert_eq!(
        retry_reason(rt.consume(&module, &message("d", b"count"), out.clone()).await),
        "calls=2",
        "an idle instance older than the time limit still gets a full deadline"
    );
}

#[tokio::test]
async fn idle_instances_give_up_their_slots_when_the_pool_is_full() {
    let limits = Limits { max_concurrent: 1, ..small_limits() };
    let options = RuntimeOptions {
        limits,
        instance_reuse: std::num::NonZeroU32::new(100).unwrap(),
        // No headroom in the pool, and nothing prepared: one slot in all.
        prepared_instances: 0,
        ..RuntimeOptions::default()
    };
    let rt = Runtime::new(options).unwrap();
    let a = rt.load_consumer(ModuleSpec::new("a", guests::bytes("faulty"))).unwrap();
    let b = rt.load_consumer(ModuleSpec::new("b", guests::bytes("faulty-b"))).unwrap();
    let out: Arc<dyn Outbound> = Arc::new(NoOutbound);
    assert_eq!(rt.consume(&a, &message("1", b"ok"), out.clone()).await.unwrap(), Ok(()));
    assert_eq!(a.idle_instances(), 1, "a holds the only slot while idle");
    let refused = rt.consume(&b, &message("2", b"ok"), out.clone()).await;
    assert!(
        matches!(refused, Err(ref e) if matches!(e.kind, FailureKind::ResourceLimit { resource: Resource::Pool, .. })),
        "{refused:?}"
    );
    assert_eq!(a.idle_instances(), 0, "a full pool frees idle instances of every module");
    assert_eq!(rt.consume(&b, &message("2", b"ok"), out.clone()).await.unwrap(), Ok(()), "the redelivery fits");
}

#[tokio::test]
async fn guests_can_ask_which_log_levels_are_kept() {
    let rt = runtime_with(small_limits());
    let module = rt.load_consumer(ModuleSpec::new("faulty", guests::bytes("faulty"))).unwrap();
    let out: Arc<dyn Outbound> = Arc::new(NoOutbound);
    let subscriber = tracing_subscriber::fmt().with_max_level(tracing::Level::INFO).with_writer(std::io::sink).finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let levels = retry_reason(rt.consume(&module, &message("m", b"levels"), out.clone()).await);
    assert_eq!(levels, "info,warn,error");
}

#[tokio::test]
async fn a_guest_built_against_the_0_1_0_wit_still_runs() {
    let rt = runtime_with(small_limits());
    let spec = ModuleSpec::new("compat", guests::bytes("compat")).with_config([("answer", "42")]);
    let module = rt.load_consumer(spec).unwrap();
    let out: Arc<dyn Outbound> = Arc::new(NoOutbound);
    assert_eq!(rt.consume(&module, &message("m1", b"ok"), out.clone()).await.unwrap(), Ok(()));
    assert_eq!(retry_reason(rt.consume(&module, &message("m2", b"other"), out.clone()).await), "42");
    // And it is still told apart from a producer.
    let wrong = rt.load_producer(ModuleSpec::new("compat", guests::bytes("compat"))).map(|_| ()).unwrap_err();
    assert!(matches!(wrong.kind, LoadErrorKind::WrongWorld { .. }), "{wrong}");
}

/// The names a component imports.
fn imports(bytes: &[u8]) -> Vec<String> {
    let engine = wasmtime::Engine::default();
    let component = wasmtime::component::Component::new(&engine, bytes).unwrap();
    component.component_type().imports(&engine).map(|(name, _)| name.to_string()).collect()
}

/// The sample guests are built without `std` (see `guest-runtime`), so
/// they import the wasm-pc interfaces and no WASI.
#[test]
fn the_sample_guests_import_no_wasi() {
    for guest in ["consumer", "producer"] {
        let imports = imports(&guests::bytes(guest));
        assert!(imports.contains(&"wasm-pc:app/log@0.1.2".to_string()), "{guest}: {imports:?}");
        assert!(imports.iter().all(|name| name.starts_with("wasm-pc:app/")), "{guest}: {imports:?}");
    }
}

#[tokio::test]
async fn a_guest_built_without_std_imports_no_wasi_and_runs_fresh_and_reused() {
    let bytes = guests::bytes("minimal");
    let imports = imports(&bytes);
    assert!(!imports.is_empty() && imports.iter().all(|name| name.starts_with("wasm-pc:app/")), "{imports:?}");

    for reuse in [1, 100] {
        let rt = runtime_reusing(reuse);
        let module = rt.load_consumer(ModuleSpec::new("minimal", bytes.clone())).unwrap();
        let out: Arc<dyn Outbound> = Arc::new(NoOutbound);
        for i in 0..3 {
            let id = format!("m{i}");
            assert_eq!(rt.consume(&module, &message(&id, b"ok"), out.clone()).await.unwrap(), Ok(()), "reuse {reuse}");
            let retried = retry_reason(rt.consume(&module, &message(&id, b"retry"), out.clone()).await);
            assert_eq!(retried, "asked to retry", "reuse {reuse}");
        }
    }
}
