//! Hot swap: kubelet-style ConfigMap updates and plain file replacement,
//! under load, through the Dapr route and the embedded worker pool.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use wasm_pc::dispatch::Slot;
use wasm_pc::metrics::Metrics;
use wasm_pc::modules::ModuleSource;
use wasm_pc::queue::{Database, NewMessage, StoreOptions, SubQueue};
use wasm_pc::reload::{Reloader, Target};
use wasm_pc::runtime::{ModuleSpec, Runtime, RuntimeOptions, World};

use crate::guests;
use crate::process::{Running, command, free_port, http};
use crate::sidecar::{Broker, Config, Sidecar, eventually};

/// A directory laid out and updated exactly as the kubelet does a
/// ConfigMap volume (atomic_writer.go).
pub struct ConfigMapDir {
    dir: tempfile::TempDir,
    generation: u32,
}

impl ConfigMapDir {
    pub fn new(files: &[(&str, &[u8])]) -> ConfigMapDir {
        let mut cm = ConfigMapDir { dir: tempfile::tempdir().unwrap(), generation: 0 };
        cm.update(files);
        cm
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// New timestamped dir, `..data_tmp` symlink to it, renamed over `..data`,
    /// visible names linked through `..data`, old dir removed.
    pub fn update(&mut self, files: &[(&str, &[u8])]) {
        let root = self.dir.path();
        let old = std::fs::read_link(root.join("..data")).ok();
        self.generation += 1;
        let stamp = format!("..2026_11_25_09_00_{:02}.{}", self.generation % 60, self.generation);
        std::fs::create_dir(root.join(&stamp)).unwrap();
        for (name, bytes) in files {
            std::fs::write(root.join(&stamp).join(name), bytes).unwrap();
        }
        std::os::unix::fs::symlink(&stamp, root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        for (name, _) in files {
            let link = root.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(PathBuf::from("..data").join(name), &link).unwrap();
            }
        }
        if let Some(old) = old {
            std::fs::remove_dir_all(root.join(old)).unwrap();
        }
    }
}

fn start_consumer(dir: &Path, sidecar_port: u16) -> (Running, u16) {
    let port = free_port();
    let mut cmd =
        command(&["serve", "--role", "consumer", "--app-port", &port.to_string(), "--listen-address", "127.0.0.1"]);
    cmd.args(["--rescan-secs", "1", "--max-concurrency", "64"])
        .env("WASM_PC_MODULES_DIR", dir)
        .env("DAPR_HTTP_PORT", sidecar_port.to_string());
    (tokio::task::block_in_place(|| Running::start(&mut cmd, "app listening for daprd on ")), port)
}

/// `/readyz` now; it blocks, so call it on a multi-thread runtime.
fn readyz(port: u16) -> serde_json::Value {
    let (status, body) =
        tokio::task::block_in_place(|| http(([127, 0, 0, 1], port).into(), "GET", "/readyz", "text/plain", b""))
            .unwrap();
    assert!(status == 200 || status == 503);
    serde_json::from_slice(&body).unwrap()
}

/// One ConfigMap update: when the files were renamed into place, and when
/// `/readyz` first counted the swap.
struct Swap {
    renamed: Instant,
    live: Instant,
    flavor: &'static str,
}

/// Waits until `/readyz` has counted `swaps` swaps; the instant it saw them.
async fn swapped(port: u16, swaps: u64) -> Instant {
    let counted = || readyz(port)["reload"][0]["swaps"].as_u64().is_some_and(|n| n >= swaps);
    eventually(Duration::from_secs(60), &format!("swap {swaps} counted in /readyz"), counted).await;
    Instant::now()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_kubelet_swaps_under_load_fail_nothing() {
    let (a, b) = (guests::bytes("faulty"), guests::bytes("faulty-b"));
    let mut cm = ConfigMapDir::new(&[("consumer.wasm", &a)]);
    let broker = Arc::new(Broker::default());
    let sidecar = Sidecar::start(Config { outputs: vec!["tags".into()], ..Config::default() }, broker.clone()).await;
    let (host, port) = start_consumer(cm.path(), sidecar.port());

    // Load: 8 keep-alive connections posting `tag` deliveries as daprd would.
    let stop = Arc::new(AtomicBool::new(false));
    let sent: Arc<Mutex<Vec<(String, Instant, u16)>>> = Arc::default();
    let mut load = Vec::new();
    for c in 0..8 {
        let (stop, sent) = (stop.clone(), sent.clone());
        load.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
            tokio::spawn(conn);
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("c{c}-{i}");
                i += 1;
                let req = hyper::Request::post("/orders")
                    .header("host", "x")
                    .header("id", &id)
                    .body(Full::new(Bytes::from_static(b"tag")))
                    .unwrap();
                let started = Instant::now();
                let status = match tx.send_request(req).await {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        let _ = r.into_body().collect().await;
                        s
                    }
                    Err(_) => 0,
                };
                sent.lock().unwrap().push((id, started, status));
            }
        }));
    }

    tokio::time::sleep(Duration::from_millis(800)).await;
    // Each update is waited for in `/readyz` rather than given a fixed time:
    // how soon a swap goes live depends on the machine (a compile under
    // load), and is the benchmarks' concern, not this test's.
    let mut swaps = Vec::new();
    for k in 0..20 {
        let (bytes, flavor) = if k % 2 == 0 { (&b, "flavor-b") } else { (&a, "flavor-a") };
        cm.update(&[("consumer.wasm", bytes)]);
        let renamed = Instant::now();
        let live = swapped(port, k + 1).await;
        swaps.push(Swap { renamed, live, flavor });
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    let ready = readyz(port);
    drop(host);

    let sent = sent.lock().unwrap().clone();
    let failed: Vec<_> = sent.iter().filter(|s| s.2 != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        sent.len(),
        &failed[..failed.len().min(5)]
    );

    let mut tagged: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for m in broker.messages("tags") {
        // A text/plain body crosses the contract as base64 (see dapr::codec).
        assert_eq!(m.properties["wasmpc-encoding"], "base64");
        use base64::Engine as _;
        let encoded: String = serde_json::from_slice(&m.body).unwrap();
        let text = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(encoded).unwrap()).unwrap();
        let (flavor, id) = text.split_once(' ').unwrap();
        tagged.entry(id.to_string()).or_default().push(flavor.to_string());
    }
    assert_eq!(tagged.len(), sent.len(), "every request was handled and tagged");
    assert!(tagged.values().all(|v| v.len() == 1), "each request ran on exactly one version");
    // Once a swap shows in `/readyz`, every request started after it (until
    // the next update) runs the new version; and each window saw load.
    for (k, swap) in swaps.iter().enumerate() {
        let until = swaps.get(k + 1).map_or(swap.live + Duration::from_secs(60), |next| next.renamed);
        let window: Vec<_> = sent.iter().filter(|s| s.1 >= swap.live && s.1 < until).collect();
        assert!(window.len() >= 5, "swap {k}: only {} requests after it went live", window.len());
        for (id, started, _) in window {
            assert_eq!(
                tagged[id][0],
                swap.flavor,
                "request {id} started {:?} after swap {k} went live",
                *started - swap.live
            );
        }
    }
    let mut pickup: Vec<Duration> = swaps.iter().map(|s| s.live - s.renamed).collect();
    pickup.sort();
    eprintln!(
        "kubelet swaps: rename to live in /readyz, median {:?}, slowest {:?}",
        pickup[pickup.len() / 2],
        pickup[pickup.len() - 1]
    );
    assert_eq!(ready["reload"][0]["swaps"], 20, "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_modules_never_replace_the_live_one() {
    let (a, b) = (guests::bytes("faulty"), guests::bytes("faulty-b"));
    let mut cm = ConfigMapDir::new(&[("consumer.wasm", &a)]);
    let (host, port) = start_consumer(cm.path(), 1);
    let whoami = || {
        let (status, body) =
            http(([127, 0, 0, 1], port).into(), "POST", "/orders", "application/json", b"whoami").unwrap();
        assert_eq!(status, 500, "whoami answers with a retry naming the flavor");
        String::from_utf8(body).unwrap()
    };
    let live = readyz(port)["reload"][0]["live"].as_str().unwrap().to_string();
    assert!(tokio::task::block_in_place(whoami).contains("flavor-a"));

    let five_mib = {
        let mut v = a.clone();
        v.resize(5 << 20, 0);
        v
    };
    let cases: [(&str, &[u8], &str); 4] = [
        ("broken", b"\0asm\x0d\0\x01\0garbage", "does not compile"),
        ("wrong world", &guests::bytes("producer"), "targets the producer world"),
        ("empty", b"", "empty file"),
        ("5 MiB", &five_mib, "over the limit"),
    ];
    for (what, bytes, reason) in cases {
        cm.update(&[("consumer.wasm", bytes)]);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = readyz(port);
            if r["reload"][0]["last_error"].as_str().is_some_and(|e| e.contains(reason)) {
                assert_eq!(r["reload"][0]["live"], live.as_str(), "{what}: the live version stays");
                break;
            }
            assert!(Instant::now() < deadline, "{what}: no error reported: {r}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(tokio::task::block_in_place(whoami).contains("flavor-a"), "{what}: still serving the old version");
    }
    cm.update(&[("consumer.wasm", &b)]);
    eventually(Duration::from_secs(10), "good file picked up", || {
        tokio::task::block_in_place(whoami).contains("flavor-b")
    })
    .await;
    let r = readyz(port);
    assert!(r["reload"][0]["last_error"].is_null(), "{r}");
    let (_, metrics) =
        tokio::task::block_in_place(|| http(([127, 0, 0, 1], port).into(), "GET", "/metrics", "text/plain", b""))
            .unwrap();
    assert!(String::from_utf8(metrics).unwrap().contains("wasm_pc_module_reload_failures_total 4"));
    drop(host);
}

#[test]
fn twenty_plain_file_replacements_swap_the_embedded_pool_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let modules = dir.path().join("modules");
    std::fs::create_dir(&modules).unwrap();
    let (a, b) = (guests::bytes("faulty"), guests::bytes("faulty-b"));
    std::fs::write(modules.join("producer.wasm"), guests::bytes("producer")).unwrap();
    std::fs::write(modules.join("consumer.wasm"), &a).unwrap();
    let db_path = dir.path().join("q.db");
    let host = Running::start(
        command(&["dev", "--listen", "127.0.0.1:0", "--bindings", "orders,tags", "--rescan-secs", "1"])
            .env("WASM_PC_MODULES_DIR", &modules)
            .arg("--db")
            .arg(&db_path),
        "POST http://",
    );
    let mut db = Database::open(&db_path, StoreOptions::default()).unwrap();
    let mut sent = 0;
    for round in 0..20 {
        for _ in 0..25 {
            db.send(
                "orders",
                vec![NewMessage { id: Some(format!("m{sent}")), body: b"tag".to_vec(), ..NewMessage::default() }],
            )
            .unwrap();
            sent += 1;
        }
        // Write beside, rename over: what `cp` + `mv` or an editor does.
        let next = if round % 2 == 0 { &b } else { &a };
        std::fs::write(modules.join(".consumer.wasm.tmp"), next).unwrap();
        std::fs::rename(modules.join(".consumer.wasm.tmp"), modules.join("consumer.wasm")).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while db.depth("tags").unwrap().active < sent {
        assert!(Instant::now() < deadline, "not all tagged: {:?}", db.depth("tags"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(host.terminate().code(), Some(0));
    let tags = db.peek("tags", SubQueue::Active, 0, 10_000).unwrap();
    assert_eq!(tags.len() as u64, sent);
    let flavors: Vec<&str> =
        tags.iter().map(|t| std::str::from_utf8(&t.body).unwrap().split(' ').next().unwrap()).collect();
    assert!(flavors.contains(&"flavor-a") && flavors.contains(&"flavor-b"), "both versions served");
    let mut ids: Vec<&str> =
        tags.iter().map(|t| std::str::from_utf8(&t.body).unwrap().split(' ').nth(1).unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len() as u64, sent, "each message handled once");
    assert_eq!(db.depth("orders").unwrap().dead_lettered, 0);
}

#[tokio::test]
async fn two_hundred_swaps_free_every_old_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("consumer.wasm");
    let (a, b) = (guests::bytes("faulty"), guests::bytes("faulty-b"));
    std::fs::write(&path, &a).unwrap();
    let runtime = Arc::new(Runtime::new(RuntimeOptions::default()).unwrap());
    let source = ModuleSource::file(path.clone(), World::Consumer);
    let slot = Arc::new(Slot::new(runtime.load_consumer(ModuleSpec::new("consumer", a.clone())).unwrap()));
    let metrics = Arc::new(Metrics::default());
    let mut reloader = Reloader::new(
        runtime,
        dir.path().to_path_buf(),
        vec![Target::Consumer(source, slot.clone())],
        metrics.clone(),
        Duration::from_secs(60),
    );
    let mut old = Vec::new();
    for k in 0..200 {
        old.push(Arc::downgrade(&slot.current().unwrap().info));
        std::fs::write(&path, if k % 2 == 0 { &b } else { &a }).unwrap();
        reloader.scan().await;
    }
    assert_eq!(metrics.snapshot().reloads, 200);
    let alive = old.iter().filter(|w| w.upgrade().is_some()).count();
    assert_eq!(alive, 0, "old versions still referenced after their last invocation");
}

/// A reloader on `dir/modules/consumer.wasm` (version `a`), running with a
/// re-scan too slow to matter: what it sees, it sees through file events.
fn watched(root: &Path, rescan: Duration) -> (Arc<Slot<wasm_pc::runtime::ConsumerModule>>, Arc<Metrics>, Reloader) {
    let dir = root.join("modules");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("consumer.wasm"), guests::bytes("faulty")).unwrap();
    let runtime = Arc::new(Runtime::new(RuntimeOptions::default()).unwrap());
    let source = ModuleSource::in_dir(&dir, "consumer.wasm", World::Consumer);
    let slot =
        Arc::new(Slot::new(runtime.load_consumer(ModuleSpec::new("consumer", guests::bytes("faulty"))).unwrap()));
    let metrics = Arc::new(Metrics::default());
    let reloader = Reloader::new(runtime, dir, vec![Target::Consumer(source, slot.clone())], metrics.clone(), rescan);
    (slot, metrics, reloader)
}

/// The modules directory deleted and made again (a `cargo clean`, a
/// redeploy): the watch follows it, so later swaps still come by event, not
/// at the re-scan's pace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_follows_a_modules_directory_made_again() {
    let root = tempfile::tempdir().unwrap();
    let (slot, _, reloader) = watched(root.path(), Duration::from_secs(600));
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(reloader.run(stopped));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let hash = || slot.current().unwrap().info.hash;
    let (a, b) = (hash(), wasm_pc::runtime::content_hash(&guests::bytes("faulty-b")));
    let dir = root.path().join("modules");
    std::fs::remove_dir_all(&dir).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("consumer.wasm"), guests::bytes("faulty-b")).unwrap();
    eventually(Duration::from_secs(5), "the new directory's module", || hash() == b).await;
    // And the re-armed watch sees the next change too.
    std::fs::write(dir.join(".next"), guests::bytes("faulty")).unwrap();
    std::fs::rename(dir.join(".next"), dir.join("consumer.wasm")).unwrap();
    eventually(Duration::from_secs(5), "the next swap in the new directory", || hash() == a).await;
}

/// A module file that cannot be read (here a link to nothing) is reported
/// in the status and counted, while the live version keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_module_file_is_reported_not_just_logged() {
    let root = tempfile::tempdir().unwrap();
    let (slot, metrics, reloader) = watched(root.path(), Duration::from_millis(200));
    let status = reloader.status();
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(reloader.run(stopped));
    let file = root.path().join("modules/consumer.wasm");
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink(root.path().join("nowhere.wasm"), &file).unwrap();
    let reported = || status.snapshot()[0].last_error.clone().unwrap_or_default();
    eventually(Duration::from_secs(5), "the unreadable file in the status", || reported().contains("cannot read"))
        .await;
    assert!(metrics.snapshot().reload_failures >= 1);
    assert!(slot.current().is_some(), "the live version keeps serving");
    // Readable again (the same module): the report clears.
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, guests::bytes("faulty")).unwrap();
    eventually(Duration::from_secs(5), "the report cleared", || reported().is_empty()).await;
}
