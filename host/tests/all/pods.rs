//! Pods as Kubernetes starts them.
//!
//! Renders the `hot-swap` overlay (`kubectl kustomize`) and runs the first
//! container of each Deployment on this machine the way the kubelet and a
//! container runtime would:
//!
//! - command: the image's ENTRYPOINT (read from the Dockerfile's `runtime`
//!   stage) followed by the container's `args`; the binary is the one cargo
//!   built for these tests, placed at the ENTRYPOINT path;
//! - environment: the image's ENV, the kubelet's service links, the
//!   container's `env` (secrets replaced by test values) and what the Dapr
//!   injector adds; nothing from the test's own environment;
//! - user: `runAsUser`/`runAsGroup`, with `fsGroup` as a supplementary group,
//!   no new privileges, in a PID namespace of its own (the host is PID 1);
//! - filesystem: a chroot that is read-only when the container says
//!   `readOnlyRootFilesystem`, the ConfigMap laid out as the kubelet's atomic
//!   writer does (`..<timestamp>/`, `..data`, one symlink per key, group
//!   fsGroup) and mounted read-only, the emptyDir owned by root with group
//!   fsGroup and mode 2777;
//! - network: a namespace of its own, as a pod has (the manifests fix port
//!   8080), with the sidecar double (`sidecar.rs`) playing daprd on
//!   127.0.0.1:3500, configured from the rendered Dapr Components.
//!
//! Then it checks what the manifests promise: the liveness and readiness
//! probes answer 200 in time, one delivery through the double is settled
//! (consumer) or one produced order reaches the double's broker (producer),
//! the logs hold no error, and nothing changed outside the writable volumes.
//!
//! Why: every other test runs the host as the test user, in a writable tree,
//! configured by flags. A pod differs in exactly the ways that break a host
//! at start (a volume it does not own, a read-only root, configuration by
//! environment), and those otherwise show up only in a cluster. This test
//! found the artifact cache chmod-ing the emptyDir at /cache, which uid 65532
//! may not do: the host exited at start and never became live.
//!
//! Mechanics: each outer test re-runs this test binary under
//! `unshare --net`, selecting the ignored [`pod_in_its_own_network_namespace`]
//! test, which does the work; every process left in that namespace is killed
//! when the outer test ends. Needs root, util-linux (`unshare`, `mount`,
//! `setpriv`), coreutils `chroot`, iproute2 `ip` and `kubectl`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use std::{fs, thread};

use base64::Engine as _;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::guests;
use crate::sidecar::{Broker, Config, Input, SbMessage, Sidecar};

const OVERLAY: &str = "hot-swap";
/// Set for the inner run: the Deployment to start and the rendered overlay.
const DEPLOYMENT_VAR: &str = "WASM_PC_POD_DEPLOYMENT";
const RENDERED_VAR: &str = "WASM_PC_POD_RENDERED";
const INNER_TEST: &str = "pods::pod_in_its_own_network_namespace";
/// The binary the image's ENTRYPOINT runs.
const BINARY: &str = env!("CARGO_BIN_EXE_wasm-pc");
/// What the Dapr injector adds to app containers (`addDaprEnvVarsToContainers`).
const DAPR_HTTP_PORT: &str = "3500";
const DAPR_GRPC_PORT: &str = "50001";
/// containerd's PATH for an image that sets none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Host directories bind-mounted read-only as the image's glibc and libgcc.
const LIBRARY_DIRS: [&str; 4] = ["/lib", "/lib64", "/usr/lib", "/usr/lib64"];
/// A bound for readiness, which has no restart behind it: a debug build
/// compiles a module in seconds.
const READY_WITHIN: Duration = Duration::from_secs(120);

#[test]
fn consumer_pod_starts_as_kubernetes_starts_it() {
    run_in_own_network_namespace("wasm-pc-consumer");
}

#[test]
fn producer_pod_starts_as_kubernetes_starts_it() {
    run_in_own_network_namespace("wasm-pc-producer");
}

/// The pod itself; run only by the tests above, inside the network namespace.
#[test]
#[ignore = "run by the pod tests, inside a network namespace of their own"]
fn pod_in_its_own_network_namespace() {
    let (Ok(deployment), Ok(rendered)) = (std::env::var(DEPLOYMENT_VAR), std::env::var(RENDERED_VAR)) else {
        eprintln!("pods: nothing to do outside the pod tests");
        return;
    };
    run_pod(&deployment, Path::new(&rendered));
}

// ---------------------------------------------------------------------------
// Outside: render, then re-run this binary in a new network namespace.

fn run_in_own_network_namespace(deployment: &str) {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).and_then(|ids| ids.split_whitespace().next());
    assert_eq!(uid, Some("0"), "starting a pod needs root: network, mount and PID namespaces, mounts, chroot");
    let work = tempfile::tempdir().unwrap();
    let rendered = work.path().join("rendered.yaml");
    fs::write(&rendered, render_overlay(work.path())).unwrap();
    let log = work.path().join("pod.log");
    let out = fs::File::create(&log).unwrap();
    let child = Command::new(tool("unshare"))
        .args(["--net", "--"])
        .arg(std::env::current_exe().unwrap())
        .args([INNER_TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(DEPLOYMENT_VAR, deployment)
        .env(RENDERED_VAR, &rendered)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut namespace = Namespace::enter(child);
    let status = namespace.wait(Duration::from_secs(600));
    let output = fs::read_to_string(&log).unwrap_or_default();
    eprintln!("---- the {deployment} pod, in its own network namespace ----\n{output}");
    assert!(
        status.as_ref().is_some_and(ExitStatus::success),
        "the {deployment} pod, started as Kubernetes starts it, failed ({}):\n{}",
        status.map_or("timed out".to_string(), |s| s.to_string()),
        failure_of(&output)
    );
}

/// The overlay rendered from a copy of `k8s/`, with the guests the tests
/// built as its modules (what `cargo xtask guests` copies there).
fn render_overlay(work: &Path) -> String {
    let k8s = work.join("k8s");
    copy_tree(&guests::workspace().join("k8s"), &k8s);
    let overlay = k8s.join("overlays").join(OVERLAY);
    fs::create_dir_all(overlay.join("modules")).unwrap();
    for world in ["producer", "consumer"] {
        fs::write(overlay.join("modules").join(format!("{world}.wasm")), guests::bytes(world)).unwrap();
    }
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(&overlay)
        .output()
        .unwrap_or_else(|e| panic!("kubectl (with kustomize) renders k8s/overlays/{OVERLAY}: {e}"));
    assert!(out.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap().map(Result::unwrap) {
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &to.join(entry.file_name()));
        } else {
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// The inner run's panic message, without libtest's noise around it.
fn failure_of(output: &str) -> String {
    let tail = (output.len().saturating_sub(4000)..output.len()).find(|i| output.is_char_boundary(*i));
    let start = output.find("panicked at").or(tail).unwrap_or(0);
    let rest = &output[start..];
    let end = ["\nstack backtrace:", "\nnote: run with"].iter().filter_map(|m| rest.find(m)).min();
    rest[..end.unwrap_or(rest.len())].to_string()
}

/// The network namespace a child created: every process in it is killed
/// when this is dropped, whatever happened inside.
struct Namespace {
    child: Child,
    id: Option<PathBuf>,
}

impl Namespace {
    fn enter(child: Child) -> Namespace {
        let ours = fs::read_link("/proc/self/ns/net").ok();
        let theirs = format!("/proc/{}/ns/net", child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        let id = loop {
            match fs::read_link(&theirs) {
                Ok(id) if Some(&id) != ours.as_ref() => break Some(id),
                Ok(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
                _ => break None,
            }
        };
        Namespace { child, id }
    }

    fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let Some(id) = &self.id else { return };
        for _ in 0..50 {
            let inside: Vec<u32> = pids()
                .into_iter()
                .filter(|pid| fs::read_link(format!("/proc/{pid}/ns/net")).ok().as_ref() == Some(id))
                .collect();
            if inside.is_empty() {
                return;
            }
            kill(&inside);
            thread::sleep(Duration::from_millis(100));
        }
    }
}

// ---------------------------------------------------------------------------
// Inside: the pod.

fn run_pod(deployment: &str, rendered: &Path) {
    let manifests = Manifests::load(rendered);
    let image = Image::from_dockerfile(&fs::read_to_string(guests::workspace().join("Dockerfile")).unwrap());
    let pod = Pod::from_deployment(&manifests, deployment, &image);
    eprintln!("{pod}");
    let status = Command::new(tool("ip")).args(["link", "set", "lo", "up"]).status().unwrap();
    assert!(status.success(), "ip link set lo up: {status}");

    // Beside the rendered overlay, in the outer test's directory: removed
    // even if this process is killed.
    let layout = Layout::new(&pod, rendered.parent().unwrap());
    let untouched = [layout.rootfs.clone()]
        .into_iter()
        .chain(pod.volumes.iter().filter(|v| v.read_only).map(|v| layout.volume(v)))
        .map(|dir| (snapshot(&dir), dir))
        .collect::<Vec<_>>();

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let broker = Arc::new(Broker::default());
    let config = sidecar_config(&manifests, &pod);
    let sidecar = runtime.block_on(Sidecar::start(config.clone(), broker.clone()));
    let mut container = Container::start(&pod, &layout);

    probes_answer(&pod, &mut container);
    match pod.role() {
        "consumer" => consumer_settles_a_delivery(&pod, &config, &sidecar, &broker, &mut container),
        "producer" => producer_sends_an_order(&pod, &manifests, &broker, &mut container),
        other => panic!("role {other}: not modelled"),
    }
    let (path, port) = pod.probe("livenessProbe");
    assert_eq!(probe(port, &path, pod.probe_timeout("livenessProbe")), Ok(200), "still live at the end");
    logs_are_clean(&container);
    wrote_only_to_its_volumes(&pod, &layout, &untouched, &container);
    drop(container);
    sidecar.kill();
}

/// Liveness first (it must answer while modules compile, or the kubelet
/// restarts the container), then readiness once the modules are loaded.
fn probes_answer(pod: &Pod, container: &mut Container) {
    let started = Instant::now();
    for (probe_name, within) in
        [("livenessProbe", pod.restart_after("livenessProbe")), ("readinessProbe", READY_WITHIN)]
    {
        let (path, port) = pod.probe(probe_name);
        let timeout = pod.probe_timeout(probe_name);
        let what = format!("its {probe_name} (GET {path} on port {port}) answered 200 within {within:?}");
        container.wait_for(&what, within.saturating_sub(started.elapsed()), || {
            (probe(port, &path, timeout) == Ok(200)).then_some(())
        });
        eprintln!("pods: {probe_name} GET {path} answered 200 after {:?}", started.elapsed());
    }
    let port = pod.probe("readinessProbe").1;
    assert!(
        listens_on_every_address(port),
        "port {port} is not bound on every address: the kubelet probes the pod's IP, not 127.0.0.1"
    );
}

fn consumer_settles_a_delivery(pod: &Pod, config: &Config, sidecar: &Sidecar, broker: &Broker, c: &mut Container) {
    let input = config.input.as_ref().unwrap();
    let order = sample_order("pod-consumer-1");
    broker.push(&input.queue, SbMessage::new(&order.id, &serde_json::to_vec(&order).unwrap()));
    let what = format!("the delivery of {} to {} to be answered", order.id, input.route);
    c.wait_for(&what, Duration::from_secs(30), || sidecar.deliveries().iter().any(|d| d.2.is_some()).then_some(()));
    assert_eq!(
        sidecar.deliveries(),
        vec![(order.id.to_string(), 1, Some(200))],
        "the delivery to {} (dapr-api-token = APP_API_TOKEN) is settled with 200 at the first attempt\n{}",
        input.route,
        c.logs()
    );
    assert!(broker.messages(&input.queue).is_empty(), "the message is completed, not back on the queue");
    assert!(broker.dead_letters(&input.queue).is_empty(), "nothing dead-lettered");
    for output in &config.outputs {
        assert!(broker.messages(output).is_empty(), "{} sent nothing to {output}", pod.name);
    }
}

fn producer_sends_an_order(pod: &Pod, manifests: &Manifests, broker: &Broker, container: &mut Container) {
    let route = pod.env.get("WASM_PC_PRODUCE_ROUTE").map_or("/produce", String::as_str);
    let config = pod.env.get("WASM_PC_PRODUCER_CONFIG").cloned().unwrap_or_default();
    let binding = config.split(',').find_map(|kv| kv.trim().strip_prefix("binding=")).unwrap_or("orders");
    let order = sample_order("pod-producer-1");
    let body = serde_json::to_vec(&[&order]).unwrap();
    let mut headers = vec![("Content-Type".to_string(), "application/json".to_string())];
    // A client holding the produce route's token, when the pod has one.
    headers.extend(pod.env.get("WASM_PC_PRODUCE_TOKEN").map(|t| ("Authorization".into(), format!("Bearer {t}"))));
    let port = pod.service_port(manifests);
    let (status, reply) = request(port, "POST", route, &headers, &body, Duration::from_secs(30)).unwrap();
    assert_eq!(status, 202, "POST {route} on port {port}: {reply}\n{}", container.logs());
    let sent = broker.messages(binding);
    assert_eq!(sent.len(), 1, "one message through the output binding {binding} (WASM_PC_PRODUCER_CONFIG)");
    assert_eq!(sent[0].id, order.id);
    assert_eq!(guest_orders::Order::parse(&sent[0].body), Ok(order), "the order arrives as sent");
}

fn sample_order(id: &str) -> guest_orders::Order<'_> {
    guest_orders::Order {
        id: id.into(),
        customer: "acme".into(),
        items: vec![guest_orders::Item { sku: "A-1".into(), qty: 2, price_cents: 350 }],
    }
}

/// The image sets JSON logs: every line is JSON, none is an error, none is
/// about a file it could not write (the root is read-only).
fn logs_are_clean(container: &Container) {
    let refused = ["Read-only file system", "os error 30", "Permission denied", "Operation not permitted"];
    let (stderr, stdout) = (container.stderr(), container.stdout());
    let bad: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .filter(|line| {
            let level = serde_json::from_str::<Value>(line).ok().map(|v| v["level"].as_str().unwrap_or("").to_owned());
            level.is_none_or(|l| l == "ERROR") || refused.iter().any(|r| line.contains(r))
        })
        .collect();
    assert!(bad.is_empty(), "the container logged problems:\n{}", bad.join("\n"));
}

/// The root and the read-only volumes are as laid out; the container wrote
/// its cache into the emptyDir, as its own user; /dev/shm and the
/// termination log stayed empty.
fn wrote_only_to_its_volumes(
    pod: &Pod,
    layout: &Layout,
    untouched: &[(BTreeMap<PathBuf, String>, PathBuf)],
    container: &Container,
) {
    for (before, dir) in untouched {
        let after = snapshot(dir);
        let changed: Vec<_> = before
            .keys()
            .chain(after.keys())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|p| before.get(*p) != after.get(*p))
            .collect();
        assert!(changed.is_empty(), "the container changed {}: {changed:?}", dir.display());
    }
    for volume in pod.volumes.iter().filter(|v| !v.read_only) {
        let written: Vec<(PathBuf, u32)> = walk(&layout.volume(volume))
            .into_iter()
            .filter(|(path, meta)| meta.is_file() && path.file_name().is_some())
            .map(|(path, meta)| (path.strip_prefix(layout.volume(volume)).unwrap().to_path_buf(), meta.uid()))
            .collect();
        eprintln!("pods: the emptyDir {} at {} holds {written:?}", volume.name, volume.mount_path);
        assert!(
            !written.is_empty(),
            "nothing was written to the emptyDir at {} (the artifact cache)",
            volume.mount_path
        );
        let uid = pod.user.uid;
        assert!(written.iter().all(|(_, owner)| *owner == uid), "written by uid {uid}: {written:?}");
    }
    let shm = format!("/proc/{}/root/dev/shm", container.pid());
    assert_eq!(fs::read_dir(&shm).unwrap().count(), 0, "the container wrote into /dev/shm");
    assert_eq!(fs::metadata(&layout.termination_log).unwrap().len(), 0, "the termination log stays empty");
}

// ---------------------------------------------------------------------------
// Manifests and the image.

struct Manifests(Vec<Value>);

impl Manifests {
    fn load(path: &Path) -> Manifests {
        use serde::Deserialize as _;
        let text = fs::read_to_string(path).unwrap();
        let docs = serde_yaml_ng::Deserializer::from_str(&text).map(|doc| Value::deserialize(doc).unwrap());
        Manifests(docs.filter(|d| !d.is_null()).collect())
    }

    fn all(&self, kind: &str) -> impl Iterator<Item = &Value> {
        let kind = kind.to_string();
        self.0.iter().filter(move |d| d["kind"] == kind.as_str())
    }

    fn find(&self, kind: &str, name: &str) -> &Value {
        self.all(kind)
            .find(|d| d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} named {name} in the rendered overlay"))
    }
}

/// What the runtime takes from the image config.
#[derive(Debug, Clone, Default)]
struct Image {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    user: Option<String>,
}

impl Image {
    /// The stage named `runtime` (the last stage if none is), with what it
    /// inherits from earlier stages it is built `FROM`.
    fn from_dockerfile(text: &str) -> Image {
        let mut stages: Vec<(Option<String>, Image)> = Vec::new();
        for line in logical_lines(text) {
            let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((&line, ""));
            let rest = rest.trim();
            if instruction.eq_ignore_ascii_case("FROM") {
                let words: Vec<&str> = rest.split_whitespace().filter(|w| !w.starts_with("--")).collect();
                let from = words[0].to_lowercase();
                let parent = stages.iter().rev().find(|(name, _)| name.as_deref() == Some(from.as_str()));
                let image = parent.map(|(_, image)| image.clone()).unwrap_or_default();
                let name = (words.len() == 3 && words[1].eq_ignore_ascii_case("AS")).then(|| words[2].to_lowercase());
                stages.push((name, image));
                continue;
            }
            let Some((_, image)) = stages.last_mut() else { continue };
            match instruction.to_uppercase().as_str() {
                "ENV" => image.env.extend(env_pairs(rest)),
                "USER" => image.user = Some(rest.to_string()),
                "ENTRYPOINT" => {
                    image.entrypoint = exec_form(rest, "ENTRYPOINT");
                    image.cmd.clear();
                }
                "CMD" => image.cmd = exec_form(rest, "CMD"),
                _ => {}
            }
        }
        let runtime = stages.iter().position(|(name, _)| name.as_deref() == Some("runtime"));
        let index = runtime.unwrap_or_else(|| stages.len().checked_sub(1).expect("a Dockerfile with a stage"));
        stages.swap_remove(index).1
    }
}

/// Instructions with continuations joined and comments dropped.
fn logical_lines(text: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    lines.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    lines
}

/// `ENV K=V K2="v 2"`, or the legacy `ENV K V`.
fn env_pairs(rest: &str) -> Vec<(String, String)> {
    let mut words = Vec::new();
    let (mut word, mut quoted, mut chars) = (String::new(), false, rest.chars());
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() && !quoted => words.extend((!word.is_empty()).then(|| std::mem::take(&mut word))),
            c => word.push(c),
        }
    }
    words.extend((!word.is_empty()).then_some(word));
    if !words.first().is_some_and(|w| w.contains('=')) {
        let (key, value) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        return vec![(key.to_string(), value.trim().to_string())];
    }
    words.iter().map(|w| w.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).unwrap()).collect()
}

fn exec_form(rest: &str, instruction: &str) -> Vec<String> {
    serde_json::from_str(rest).unwrap_or_else(|_| {
        panic!("{instruction} {rest}: the shell form needs /bin/sh, which the distroless image does not have")
    })
}

// ---------------------------------------------------------------------------
// The pod: what the kubelet makes of a Deployment's template.

/// The first container of a Deployment, resolved as the kubelet starts it.
struct Pod {
    name: String,
    app_id: String,
    labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    container: Value,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    /// Names in `env` that are service links (left out when printed).
    linked: BTreeSet<String>,
    user: User,
    read_only_root: bool,
    volumes: Vec<Volume>,
}

struct User {
    uid: u32,
    gid: u32,
    /// Supplementary groups, the primary one first.
    groups: Vec<u32>,
    fs_group: Option<u32>,
}

struct Volume {
    name: String,
    mount_path: String,
    read_only: bool,
    source: VolumeSource,
}

enum VolumeSource {
    /// Files by key, and `defaultMode`.
    ConfigMap(BTreeMap<String, Vec<u8>>, u32),
    EmptyDir,
}

/// The test value of a Secret's key.
fn secret(name: &str, key: &str) -> String {
    format!("test-{name}-{key}")
}

fn strings(value: &Value) -> Option<Vec<String>> {
    value.as_array().map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
}

impl Pod {
    fn from_deployment(manifests: &Manifests, deployment: &str, image: &Image) -> Pod {
        let template = &manifests.find("Deployment", deployment)["spec"]["template"];
        let spec = &template["spec"];
        let container = spec["containers"][0].clone();
        let annotations: BTreeMap<String, String> =
            serde_json::from_value(template["metadata"]["annotations"].clone()).unwrap_or_default();
        let app_id = annotations.get("dapr.io/app-id").cloned().unwrap_or_else(|| deployment.to_string());
        let labels = serde_json::from_value(template["metadata"]["labels"].clone()).unwrap_or_default();

        let argv = Self::command(&container, image);
        let user = Self::user(spec, &container, image);
        let name = deployment.to_string();
        let hostname = format!("{name}-7d9c8b6f5d-x2k4p");
        let linked = service_links(manifests);
        let env = Self::environment(spec, &container, &annotations, image, &hostname, &linked);
        let linked = linked.into_iter().map(|(k, _)| k).filter(|k| env.contains_key(k)).collect();
        let volumes = Self::volumes(manifests, spec, &container);
        let read_only_root = container["securityContext"]["readOnlyRootFilesystem"].as_bool().unwrap_or(false);
        Pod { name, app_id, labels, annotations, container, argv, env, linked, user, read_only_root, volumes }
    }

    /// Kubernetes: `command` replaces the ENTRYPOINT, `args` replace the CMD.
    fn command(container: &Value, image: &Image) -> Vec<String> {
        let argv = match (strings(&container["command"]), strings(&container["args"])) {
            (Some(command), args) => [command, args.unwrap_or_default()].concat(),
            (None, Some(args)) => [image.entrypoint.clone(), args].concat(),
            (None, None) => [image.entrypoint.clone(), image.cmd.clone()].concat(),
        };
        assert!(!argv.iter().any(|a| a.contains("$(")), "$(VAR) in args: not modelled");
        argv
    }

    /// The securityContext's user and group (the container's over the
    /// pod's) over the image's USER; fsGroup and supplementalGroups join the
    /// groups.
    fn user(spec: &Value, container: &Value, image: &Image) -> User {
        let setting = |key: &str| match &container["securityContext"][key] {
            Value::Null => &spec["securityContext"][key],
            own => own,
        };
        let mut image_user = image.user.as_deref().unwrap_or("0").split(':').map(|id| {
            id.parse::<u32>().unwrap_or_else(|_| panic!("USER {id}: a user name needs the image's /etc/passwd"))
        });
        let (image_uid, image_gid) = (image_user.next().unwrap_or(0), image_user.next().unwrap_or(0));
        let uid = setting("runAsUser").as_u64().map_or(image_uid, |u| u as u32);
        let gid = setting("runAsGroup").as_u64().map_or(image_gid, |g| g as u32);
        let non_root = setting("runAsNonRoot").as_bool().unwrap_or(false);
        assert!(!non_root || uid != 0, "runAsNonRoot with uid 0: the kubelet refuses to start it");
        let fs_group = spec["securityContext"]["fsGroup"].as_u64().map(|g| g as u32);
        let supplemental = spec["securityContext"]["supplementalGroups"].as_array().into_iter().flatten();
        let mut groups = vec![gid];
        groups.extend(fs_group);
        groups.extend(supplemental.map(|g| g.as_u64().unwrap() as u32));
        let mut seen = BTreeSet::new();
        groups.retain(|g| seen.insert(*g));
        User { uid, gid, groups, fs_group }
    }

    /// containerd's default PATH, the image's ENV, HOSTNAME, the kubelet's
    /// service links, then the container's `env` with what the Dapr injector
    /// adds (it skips names the container already sets).
    fn environment(
        spec: &Value,
        container: &Value,
        annotations: &BTreeMap<String, String>,
        image: &Image,
        hostname: &str,
        service_links: &[(String, String)],
    ) -> BTreeMap<String, String> {
        assert!(container["envFrom"].is_null(), "envFrom: not modelled");
        let mut env = BTreeMap::from([("PATH".to_string(), DEFAULT_PATH.to_string())]);
        env.extend(image.env.iter().cloned());
        env.insert("HOSTNAME".into(), hostname.into());
        if spec["enableServiceLinks"].as_bool() != Some(false) {
            env.extend(service_links.iter().cloned());
        }
        let mut own: Vec<(String, String)> = Vec::new();
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().unwrap().to_string();
            // Every Secret exists, with test values (optional ones too).
            let value = match (&var["value"], &var["valueFrom"]["secretKeyRef"]) {
                (Value::String(v), _) => v.clone(),
                (_, Value::Object(r)) => secret(r["name"].as_str().unwrap(), r["key"].as_str().unwrap()),
                (Value::Null, Value::Null) if var["valueFrom"].is_null() => String::new(),
                _ => panic!("env {name}: {var} not modelled"),
            };
            assert!(!value.contains("$("), "env {name}: $(VAR) references not modelled");
            own.push((name, value));
        }
        let protocol = annotations.get("dapr.io/app-protocol").cloned().unwrap_or_else(|| "http".into());
        for (name, value) in [
            ("DAPR_HTTP_PORT", DAPR_HTTP_PORT.to_string()),
            ("DAPR_GRPC_PORT", DAPR_GRPC_PORT.into()),
            ("APP_PROTOCOL", protocol),
        ] {
            if !own.iter().any(|(n, _)| n == name) {
                own.push((name.into(), value));
            }
        }
        env.extend(own);
        env
    }

    fn volumes(manifests: &Manifests, spec: &Value, container: &Value) -> Vec<Volume> {
        let mut volumes = Vec::new();
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().unwrap().to_string();
            assert!(mount["subPath"].is_null(), "subPath on {name}: not modelled (and it would stop hot swaps)");
            let volume = spec["volumes"].as_array().unwrap().iter().find(|v| v["name"] == name.as_str()).unwrap();
            let source = if let Some(config_map) = volume["configMap"].as_object() {
                assert!(config_map.get("items").is_none(), "configMap items on {name}: not modelled");
                let object = manifests.find("ConfigMap", config_map["name"].as_str().unwrap());
                let mut files = BTreeMap::new();
                for (key, text) in object["data"].as_object().into_iter().flatten() {
                    files.insert(key.clone(), text.as_str().unwrap().as_bytes().to_vec());
                }
                for (key, encoded) in object["binaryData"].as_object().into_iter().flatten() {
                    let encoded: String = encoded.as_str().unwrap().split_whitespace().collect();
                    files.insert(key.clone(), base64::engine::general_purpose::STANDARD.decode(encoded).unwrap());
                }
                let mode = config_map.get("defaultMode").and_then(Value::as_u64).unwrap_or(0o644) as u32;
                VolumeSource::ConfigMap(files, mode)
            } else if let Some(empty_dir) = volume["emptyDir"].as_object() {
                assert!(empty_dir.get("medium").is_none(), "emptyDir medium on {name}: not modelled");
                VolumeSource::EmptyDir
            } else {
                panic!("volume {volume}: not modelled");
            };
            volumes.push(Volume {
                name,
                mount_path: mount["mountPath"].as_str().unwrap().to_string(),
                read_only: mount["readOnly"].as_bool().unwrap_or(false),
                source,
            });
        }
        volumes
    }

    fn role(&self) -> &str {
        let flag = self.argv.iter().position(|a| a == "--role").and_then(|i| self.argv.get(i + 1));
        flag.or(self.env.get("WASM_PC_ROLE")).map_or("", String::as_str)
    }

    /// A probe's httpGet path and port, a named port resolved through the
    /// container's ports.
    fn probe(&self, which: &str) -> (String, u16) {
        let get = &self.container[which]["httpGet"];
        assert!(get.is_object(), "{} has no {which}.httpGet", self.name);
        (get["path"].as_str().unwrap_or("/").to_string(), self.container_port(&get["port"]))
    }

    /// A port number, or a port name resolved through the container's ports.
    fn container_port(&self, port: &Value) -> u16 {
        let named = |name: &str| {
            let ports = self.container["ports"].as_array().into_iter().flatten();
            let port = ports.into_iter().find(|p| p["name"] == name).and_then(|p| p["containerPort"].as_u64());
            port.unwrap_or_else(|| panic!("{}: no container port named {name}", self.name))
        };
        match port {
            Value::Number(n) => n.as_u64().unwrap() as u16,
            Value::String(name) => named(name) as u16,
            other => panic!("port {other}"),
        }
    }

    /// Where the Service selecting this pod sends its clients: its first
    /// port's targetPort.
    fn service_port(&self, manifests: &Manifests) -> u16 {
        let selects = |s: &&Value| {
            let selector = s["spec"]["selector"].as_object().into_iter().flatten();
            selector.into_iter().all(|(k, v)| self.labels.get(k).map(String::as_str) == v.as_str())
        };
        let service = manifests.all("Service").find(selects);
        let service = service.unwrap_or_else(|| panic!("no Service selects the {} pods", self.name));
        let port = &service["spec"]["ports"][0];
        self.container_port(if port["targetPort"].is_null() { &port["port"] } else { &port["targetPort"] })
    }

    fn probe_setting(&self, which: &str, key: &str, default: u64) -> Duration {
        Duration::from_secs(self.container[which][key].as_u64().unwrap_or(default))
    }

    fn probe_timeout(&self, which: &str) -> Duration {
        self.probe_setting(which, "timeoutSeconds", 1)
    }

    /// How long the kubelet lets a probe fail before it restarts the container.
    fn restart_after(&self, which: &str) -> Duration {
        let failures = self.container[which]["failureThreshold"].as_u64().unwrap_or(3) as u32;
        self.probe_setting(which, "initialDelaySeconds", 0) + self.probe_setting(which, "periodSeconds", 10) * failures
    }
}

impl std::fmt::Display for Pod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "pods: {} runs {:?}", self.name, self.argv)?;
        let User { uid, gid, groups, .. } = &self.user;
        writeln!(f, "  as uid {uid} gid {gid} groups {groups:?}, read-only root: {}", self.read_only_root)?;
        for v in &self.volumes {
            let kind = if matches!(v.source, VolumeSource::EmptyDir) { "emptyDir" } else { "configMap" };
            writeln!(f, "  {kind} {} at {} (read-only: {})", v.name, v.mount_path, v.read_only)?;
        }
        for (k, v) in self.env.iter().filter(|(k, _)| !self.linked.contains(*k)) {
            writeln!(f, "  {k}={v}")?;
        }
        writeln!(f, "  and {} service-link variables (NAME_SERVICE_HOST, ...)", self.linked.len())
    }
}

/// The kubelet's service links (`enableServiceLinks` defaults to true): the
/// Services of the namespace, here the overlay's, the `<app-id>-dapr` one the
/// Dapr operator creates per Dapr-enabled Deployment, and `kubernetes`.
/// The cluster IPs are made up; nothing dials them.
fn service_links(manifests: &Manifests) -> Vec<(String, String)> {
    let mut services: Vec<(String, Vec<(String, u64)>)> = vec![("kubernetes".into(), vec![("https".into(), 443)])];
    for service in manifests.all("Service") {
        let ports = service["spec"]["ports"].as_array().into_iter().flatten();
        let ports = ports.map(|p| (p["name"].as_str().unwrap_or("").to_string(), p["port"].as_u64().unwrap()));
        services.push((service["metadata"]["name"].as_str().unwrap().into(), ports.collect()));
    }
    for deployment in manifests.all("Deployment") {
        let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
        if annotations["dapr.io/enabled"] == "true" {
            let ports = [("dapr-http", 80), ("dapr-grpc", 50001), ("dapr-internal", 50002), ("dapr-metrics", 9090)];
            let name = format!("{}-dapr", annotations["dapr.io/app-id"].as_str().unwrap());
            services.push((name, ports.iter().map(|(n, p)| (n.to_string(), *p)).collect()));
        }
    }
    let mut env = Vec::new();
    for (i, (name, ports)) in services.iter().enumerate() {
        let (prefix, ip) = (name.to_uppercase().replace('-', "_"), format!("10.96.0.{}", i + 1));
        env.push((format!("{prefix}_SERVICE_HOST"), ip.clone()));
        env.push((format!("{prefix}_SERVICE_PORT"), ports[0].1.to_string()));
        env.push((format!("{prefix}_PORT"), format!("tcp://{ip}:{}", ports[0].1)));
        for (port_name, port) in ports {
            if !port_name.is_empty() {
                env.push((
                    format!("{prefix}_SERVICE_PORT_{}", port_name.to_uppercase().replace('-', "_")),
                    port.to_string(),
                ));
            }
            let key = format!("{prefix}_PORT_{port}_TCP");
            env.push((key.clone(), format!("tcp://{ip}:{port}")));
            env.push((format!("{key}_PROTO"), "tcp".into()));
            env.push((format!("{key}_PORT"), port.to_string()));
            env.push((format!("{key}_ADDR"), ip.clone()));
        }
    }
    env
}

/// The double as daprd would be set up for this app: the Components scoped
/// to its app id, the token Secrets named by its annotations, on
/// DAPR_HTTP_PORT.
fn sidecar_config(manifests: &Manifests, pod: &Pod) -> Config {
    let components: Vec<&Value> = manifests
        .all("Component")
        .filter(|c| strings(&c["scopes"]).is_none_or(|scopes| scopes.contains(&pod.app_id)))
        .collect();
    let metadata = |c: &Value, key: &str| {
        let items = c["spec"]["metadata"].as_array().into_iter().flatten();
        items.filter(|m| m["name"] == key).find_map(|m| m["value"].as_str().map(str::to_lowercase))
    };
    let name = |c: &Value| c["metadata"]["name"].as_str().unwrap().to_string();
    let outputs = components
        .iter()
        .filter(|c| metadata(c, "direction").is_none_or(|d| d.contains("output")))
        .map(|c| name(c))
        .collect();
    let input = (pod.role() == "consumer").then(|| {
        let binding = pod.env.get("WASM_PC_INPUT_BINDING").map_or("orders", String::as_str);
        let component = components.iter().find(|c| name(c) == binding).unwrap_or_else(|| {
            panic!("WASM_PC_INPUT_BINDING={binding}: no Dapr Component of that name scoped to {}", pod.app_id)
        });
        assert!(metadata(component, "route").is_none(), "a `route` on {binding}: not modelled");
        let app_port = pod.annotations.get("dapr.io/app-port").map(|p| p.parse().unwrap()).unwrap_or(8080);
        let mut input = Input::new(app_port, binding);
        input.skip_probe = metadata(component, "direction").is_some_and(|d| d.contains("input"));
        input
    });
    let token = |annotation: &str| pod.annotations.get(annotation).map(|s| secret(s, "token"));
    Config {
        input,
        outputs,
        api_token: token("dapr.io/api-token-secret"),
        app_token: token("dapr.io/app-token-secret"),
        port: pod.env["DAPR_HTTP_PORT"].parse().unwrap(),
        ..Config::default()
    }
}

// ---------------------------------------------------------------------------
// The node: image root and volumes as the runtime and the kubelet lay them out.

struct Layout {
    _dir: tempfile::TempDir,
    rootfs: PathBuf,
    volumes: PathBuf,
    termination_log: PathBuf,
    logs: PathBuf,
    /// Host library directories to bind into the root.
    library_dirs: Vec<PathBuf>,
}

impl Layout {
    fn new(pod: &Pod, parent: &Path) -> Layout {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let path = dir.path().to_path_buf();
        let mut layout = Layout {
            rootfs: path.join("rootfs"),
            volumes: path.join("volumes"),
            termination_log: path.join("termination-log"),
            logs: path.join("logs"),
            library_dirs: Vec::new(),
            _dir: dir,
        };
        layout.image_root(pod);
        for dir in [&layout.volumes, &layout.logs] {
            fs::create_dir_all(dir).unwrap();
        }
        fs::write(&layout.termination_log, "").unwrap();
        set_mode(&layout.termination_log, 0o666);
        for volume in &pod.volumes {
            let dir = layout.volume(volume);
            match &volume.source {
                VolumeSource::ConfigMap(files, mode) => config_map_volume(&dir, files, *mode, pod.user.fs_group),
                VolumeSource::EmptyDir => empty_dir_volume(&dir, pod.user.fs_group),
            }
        }
        layout
    }

    fn volume(&self, volume: &Volume) -> PathBuf {
        self.volumes.join(&volume.name)
    }

    /// The image's filesystem as far as the binary needs it: the host's
    /// library directories (symlinks kept as symlinks), the entrypoint, the
    /// distroless /etc and /tmp, and mount points.
    fn image_root(&mut self, pod: &Pod) {
        let root = self.rootfs.clone();
        let inside = |path: &str| root.join(path.trim_start_matches('/'));
        for dir in ["", "proc", "sys", "dev", "etc", "tmp"] {
            fs::create_dir_all(inside(dir)).unwrap();
            set_mode(&inside(dir), 0o755);
        }
        set_mode(&inside("tmp"), 0o1777);
        for dir in LIBRARY_DIRS.iter().map(Path::new) {
            let target = inside(dir.to_str().unwrap());
            fs::create_dir_all(target.parent().unwrap()).unwrap();
            if let Ok(link) = fs::read_link(dir) {
                std::os::unix::fs::symlink(link, target).unwrap();
            } else if dir.is_dir() {
                fs::create_dir_all(target).unwrap();
                self.library_dirs.push(dir.to_path_buf());
            }
        }
        let entrypoint = inside(&pod.argv[0]);
        fs::create_dir_all(entrypoint.parent().unwrap()).unwrap();
        fs::write(&entrypoint, "").unwrap();
        set_mode(&entrypoint, 0o755);
        for volume in &pod.volumes {
            fs::create_dir_all(inside(&volume.mount_path)).unwrap();
        }
        let hostname = &pod.env["HOSTNAME"];
        let etc = [
            (
                "passwd",
                "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n",
            ),
            ("group", "root:x:0:\nnonroot:x:65532:\n"),
            ("hostname", &format!("{hostname}\n")),
            ("hosts", &format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{hostname}\n")),
        ];
        for (file, text) in etc {
            fs::write(inside("etc").join(file), text).unwrap();
        }
    }
}

/// The kubelet's configMap volume: an emptyDir (0777) into which its atomic
/// writer puts `..<timestamp>/` (0755) holding each key (`defaultMode`),
/// `..data -> ..<timestamp>` and `key -> ..data/key`; then, with fsGroup,
/// SetVolumeOwnership gives every path that group, group read (the volume
/// is read-only) and setgid on directories.
fn config_map_volume(dir: &Path, files: &BTreeMap<String, Vec<u8>>, mode: u32, fs_group: Option<u32>) {
    fs::create_dir_all(dir).unwrap();
    set_mode(dir, 0o777);
    let stamp = format!("..{}.{:09}", utc_stamp(), std::process::id());
    let data = dir.join(&stamp);
    fs::create_dir(&data).unwrap();
    set_mode(&data, 0o755);
    for (key, bytes) in files {
        fs::write(data.join(key), bytes).unwrap();
        set_mode(&data.join(key), mode);
    }
    std::os::unix::fs::symlink(&stamp, dir.join("..data")).unwrap();
    for key in files.keys() {
        std::os::unix::fs::symlink(Path::new("..data").join(key), dir.join(key)).unwrap();
    }
    if let Some(group) = fs_group {
        set_volume_ownership(dir, group, 0o440);
    }
}

/// The kubelet's emptyDir: a 0777 directory owned by root, then
/// SetVolumeOwnership for fsGroup with the read-write mask: 2777, group fsGroup.
fn empty_dir_volume(dir: &Path, fs_group: Option<u32>) {
    fs::create_dir_all(dir).unwrap();
    set_mode(dir, 0o777);
    if let Some(group) = fs_group {
        set_volume_ownership(dir, group, 0o660);
    }
}

fn set_volume_ownership(dir: &Path, group: u32, mask: u32) {
    for (path, meta) in walk(dir) {
        std::os::unix::fs::lchown(&path, None, Some(group)).unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        let extra = if meta.is_dir() { 0o2000 | 0o110 } else { 0 };
        set_mode(&path, (meta.mode() & 0o7777) | mask | extra);
    }
}

/// `2006_01_02_15_04_05` in UTC, as the atomic writer names its directories.
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}_{month:02}_{day:02}_{:02}_{:02}_{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// `dir` and everything under it, not following symlinks.
fn walk(dir: &Path) -> Vec<(PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            stack.extend(fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
        out.push((path, meta));
    }
    out
}

/// Type, mode, owner, mtime and content of every path under `dir`.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, String> {
    walk(dir)
        .into_iter()
        .map(|(path, meta)| {
            let what = if meta.file_type().is_symlink() {
                format!("-> {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_file() {
                hex::encode(Sha256::digest(fs::read(&path).unwrap()))
            } else {
                "dir".into()
            };
            let summary = format!(
                "{:o} {}:{} {}.{} {what}",
                meta.mode(),
                meta.uid(),
                meta.gid(),
                meta.mtime(),
                meta.mtime_nsec()
            );
            (path.strip_prefix(dir).unwrap().to_path_buf(), summary)
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The container runtime.

/// The container: `unshare` holding its mount and PID namespaces, the host
/// as PID 1 inside. Killed, with everything under it, when dropped.
struct Container {
    launcher: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Container {
    fn start(pod: &Pod, layout: &Layout) -> Container {
        let script = launch_script(pod, layout);
        let (stdout, stderr) = (layout.logs.join("stdout"), layout.logs.join("stderr"));
        let launcher = Command::new(tool("unshare"))
            .args(["--mount", "--pid", "--fork", "--propagation", "private", "--"])
            .arg(tool("sh"))
            .args(["-c", &script])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        Container { launcher, stdout, stderr }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.launcher.try_wait().unwrap()
    }

    /// The host's pid, as seen from here.
    fn pid(&self) -> u32 {
        *children(self.launcher.id()).first().expect("the container's process")
    }

    fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn logs(&self) -> String {
        format!("--- container stderr ---\n{}--- container stdout ---\n{}", self.stderr(), self.stdout())
    }

    /// Polls `check` every 100 ms; fails if the container exits first or
    /// `within` passes.
    fn wait_for<T>(&mut self, what: &str, within: Duration, mut check: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(value) = check() {
                return value;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "the container exited ({status}) before {what}; the kubelet would restart it, again and again \
                     (CrashLoopBackOff)\n{}",
                    self.logs()
                );
            }
            assert!(Instant::now() < deadline, "timed out: {what}\n{}", self.logs());
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // PID 1 of the namespace: its death takes every process inside.
        kill(&descendants(self.launcher.id()));
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
    }
}

/// Mounts in the new mount namespace, as runc sets up a container, then
/// the entrypoint with exactly the pod's environment, user and groups.
fn launch_script(pod: &Pod, layout: &Layout) -> String {
    let root = quote(&layout.rootfs);
    let at = |path: &str| quote(layout.rootfs.join(path.trim_start_matches('/')));
    let mut lines = vec!["set -eu".to_string(), "umask 0022".into(), format!("mount --bind {root} {root}")];
    for dir in &layout.library_dirs {
        lines.push(format!("mount --bind -o ro {} {}", quote(dir), at(dir.to_str().unwrap())));
    }
    lines.push(format!("mount --bind -o ro {} {}", quote(BINARY), at(&pod.argv[0])));
    lines.push(format!("mount -t proc -o nosuid,nodev,noexec proc {}", at("/proc")));
    lines.push(format!("mount -t sysfs -o ro,nosuid,nodev,noexec sysfs {}", at("/sys")));
    lines.push(format!("mount -t tmpfs -o nosuid,mode=755,size=65536k tmpfs {}", at("/dev")));
    for node in ["null", "zero", "full", "random", "urandom", "tty"] {
        lines.push(format!("touch {0} && mount --bind /dev/{node} {0}", at(&format!("/dev/{node}"))));
    }
    for (link, fd) in [("fd", ""), ("stdin", "/0"), ("stdout", "/1"), ("stderr", "/2")] {
        lines.push(format!("ln -s /proc/self/fd{fd} {}", at(&format!("/dev/{link}"))));
    }
    lines.push(format!(
        "mkdir {0} && mount -t tmpfs -o nosuid,nodev,noexec,mode=1777,size=65536k shm {0}",
        at("/dev/shm")
    ));
    let log = at("/dev/termination-log");
    lines.push(format!("touch {log} && mount --bind {} {log}", quote(&layout.termination_log)));
    for volume in &pod.volumes {
        let read_only = if volume.read_only { " -o ro" } else { "" };
        lines.push(format!("mount --bind{read_only} {} {}", quote(layout.volume(volume)), at(&volume.mount_path)));
    }
    if pod.read_only_root {
        lines.push(format!("mount -o remount,bind,ro {root}"));
    }
    let env: Vec<String> = pod.env.iter().map(|(k, v)| quote(format!("{k}={v}"))).collect();
    let groups: Vec<String> = pod.user.groups.iter().map(u32::to_string).collect();
    let argv: Vec<String> = pod.argv.iter().map(quote).collect();
    lines.push(format!(
        "exec {} -i {} {} --no-new-privs {} --userspec={}:{} --groups={} {root} {}",
        quote(tool("env")),
        env.join(" "),
        quote(tool("setpriv")),
        quote(tool("chroot")),
        pod.user.uid,
        pod.user.gid,
        groups.join(","),
        argv.join(" ")
    ));
    lines.join("\n")
}

/// Single-quoted for sh.
fn quote(text: impl AsRef<Path>) -> String {
    format!("'{}'", text.as_ref().to_str().unwrap().replace('\'', r"'\''"))
}

/// A tool of the machine, by absolute path (the pod's env has no PATH for it).
fn tool(name: &str) -> PathBuf {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("{name} is needed to start a pod here"))
}

// ---------------------------------------------------------------------------
// Processes and sockets.

fn pids() -> Vec<u32> {
    fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

fn children(pid: u32) -> Vec<u32> {
    pids().into_iter().filter(|p| parent_of(*p) == Some(pid)).collect()
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut found = children(pid);
    let mut i = 0;
    while i < found.len() {
        found.extend(children(found[i]));
        i += 1;
    }
    found
}

fn kill(pids: &[u32]) {
    if !pids.is_empty() {
        let _ = Command::new("kill").arg("-KILL").args(pids.iter().map(u32::to_string)).stderr(Stdio::null()).status();
    }
}

/// One kubelet httpGet probe: its headers, `timeoutSeconds`, the status.
fn probe(port: u16, path: &str, timeout: Duration) -> Result<u16, String> {
    let headers = [("User-Agent".to_string(), "kube-probe/1.32".to_string()), ("Accept".into(), "*/*".into())];
    request(port, "GET", path, &headers, b"", timeout).map(|(status, _)| status)
}

/// One HTTP/1.1 request to 127.0.0.1, `Connection: close`: the status and
/// the rest of the response as text.
fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
    timeout: Duration,
) -> Result<(u16, String), String> {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&address, timeout).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).and_then(|()| stream.write_all(body)).map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|e| e.to_string())?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    let rest = response.split_once("\r\n\r\n").map_or("", |(_, rest)| rest).to_string();
    status.map(|s| (s, rest)).ok_or_else(|| format!("no status in {response:?}"))
}

/// A listening socket on 0.0.0.0 or :: for `port`, in this network namespace.
fn listens_on_every_address(port: u16) -> bool {
    let any = [format!("00000000:{port:04X}"), format!("00000000000000000000000000000000:{port:04X}")];
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        fs::read_to_string(table).unwrap_or_default().lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && any.contains(&fields[1].to_string()) && fields[3] == "0A"
        })
    })
}
