//! Hot swap: watch the modules directory and put new versions live without
//! a restart.
//!
//! A ConfigMap mount is updated by the kubelet in one atomic step: the new
//! files go into a fresh hidden `..<timestamp>` directory, a `..data_tmp`
//! symlink to it is renamed over `..data`, and the visible names are symlinks
//! through `..data`. So the directory is watched, never a file (a watch on a
//! file follows the old target and goes dead), and every module is re-read by
//! its stable path. Plain file replacement (rename over, write in place)
//! works the same way. Event bursts are debounced, and a periodic re-scan
//! compares content hashes in case an event is missed.
//!
//! A changed module is compiled and checked against its world off the
//! serving path. Only a module that loads replaces the live one, atomically:
//! new invocations use it, in-flight ones finish on the old version, which is
//! freed when its last invocation ends. A module that fails to load is
//! logged with the file and the reason, counted, and reported in `/readyz`;
//! the working version keeps serving.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::dispatch::Slot;
use crate::metrics::Metrics;
use crate::modules::ModuleSource;
use crate::runtime::{ConsumerModule, LoadError, ModuleInfo, ProducerModule, Runtime, World, content_hash};

/// Wait this long after the last file event before re-reading.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// A live slot the reloader keeps current.
#[derive(Clone)]
pub enum Target {
    Consumer(ModuleSource, Arc<Slot<ConsumerModule>>),
    Producer(ModuleSource, Arc<Slot<ProducerModule>>),
}

impl Target {
    fn source(&self) -> &ModuleSource {
        match self {
            Target::Consumer(s, _) | Target::Producer(s, _) => s,
        }
    }

    fn live(&self) -> Arc<ModuleInfo> {
        match self {
            Target::Consumer(_, slot) => Arc::clone(&slot.current().info),
            Target::Producer(_, slot) => Arc::clone(&slot.current().info),
        }
    }

    /// Compiles and checks `bytes`; swaps it in only if it loads.
    fn load_and_swap(&self, runtime: &Runtime, bytes: Vec<u8>) -> Result<Arc<ModuleInfo>, String> {
        let spec = self.source().spec(bytes);
        let swap_err = |e: LoadError| e.to_string();
        match self {
            Target::Consumer(_, slot) => {
                let module = runtime.load_consumer(spec).map_err(swap_err)?;
                let info = Arc::clone(&module.info);
                slot.replace(module);
                Ok(info)
            }
            Target::Producer(_, slot) => {
                let module = runtime.load_producer(spec).map_err(swap_err)?;
                let info = Arc::clone(&module.info);
                slot.replace(module);
                Ok(info)
            }
        }
    }
}

/// What the reloader knows about one role, for `/readyz` and status output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoleStatus {
    pub world: World,
    pub file: String,
    /// `name@version+hash` of the live module.
    pub live: String,
    /// Why the newest file was refused, while it is on disk.
    pub last_error: Option<String>,
    pub swaps: u64,
}

/// Shared reload status, one entry per target.
#[derive(Debug, Default, Clone)]
pub struct ReloadStatus(Arc<Mutex<Vec<RoleStatus>>>);

impl ReloadStatus {
    pub fn snapshot(&self) -> Vec<RoleStatus> {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// True when every role's newest file is the live one.
    pub fn healthy(&self) -> bool {
        self.snapshot().iter().all(|r| r.last_error.is_none())
    }
}

/// Watches `dir` and keeps `targets` current until `stop` turns true.
pub struct Reloader {
    runtime: Arc<Runtime>,
    dir: PathBuf,
    targets: Vec<Target>,
    metrics: Arc<Metrics>,
    status: ReloadStatus,
    /// The hash of the last file seen per target, good or bad, so a refused
    /// file is not recompiled on every scan.
    seen: Vec<[u8; 32]>,
    rescan: Duration,
}

impl Reloader {
    pub fn new(
        runtime: Arc<Runtime>,
        dir: PathBuf,
        targets: Vec<Target>,
        metrics: Arc<Metrics>,
        rescan: Duration,
    ) -> Self {
        let status: Vec<RoleStatus> = targets
            .iter()
            .map(|t| RoleStatus {
                world: t.source().world,
                file: t.source().path.display().to_string(),
                live: t.live().label().to_string(),
                last_error: None,
                swaps: 0,
            })
            .collect();
        let seen = targets.iter().map(|t| t.live().hash).collect();
        Reloader { runtime, dir, targets, metrics, status: ReloadStatus(Arc::new(Mutex::new(status))), seen, rescan }
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.clone()
    }

    /// Runs until `stop` turns true. File events come from a `notify`
    /// watcher thread; the re-scan timer covers anything it misses.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let (tx, mut events) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let _ = tx.send(event.map(|_| ()).map_err(|e| e.to_string()));
        });
        let _watcher = match watcher.and_then(|mut w| w.watch(&self.dir, RecursiveMode::NonRecursive).map(|()| w)) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot watch the modules directory; relying on the periodic re-scan");
                None
            }
        };
        let mut next_scan = Instant::now() + self.rescan;
        loop {
            tokio::select! {
                _ = crate::shutdown::requested(&mut stop) => return,
                event = events.recv() => {
                    if let Some(Err(e)) = event {
                        tracing::warn!(error = %e, "file watch error");
                    }
                    // Debounce: take everything that arrives within the window.
                    let settle = tokio::time::sleep(DEBOUNCE);
                    tokio::pin!(settle);
                    loop {
                        tokio::select! {
                            _ = &mut settle => break,
                            more = events.recv() => if more.is_none() { break },
                        }
                    }
                    self.scan().await;
                }
                _ = tokio::time::sleep_until(next_scan.into()) => {
                    self.scan().await;
                    next_scan = Instant::now() + self.rescan;
                }
            }
        }
    }

    /// Re-reads every target; loads and swaps those whose content changed.
    pub async fn scan(&mut self) {
        for i in 0..self.targets.len() {
            let path = self.targets[i].source().path.clone();
            let bytes = match tokio::fs::read(&path).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    // Mid-swap a link may dangle for an instant; the next event or scan retries.
                    tracing::debug!(file = %path.display(), error = %e, "module not readable now");
                    continue;
                }
            };
            let hash = content_hash(&bytes);
            if hash == self.seen[i] {
                continue;
            }
            self.seen[i] = hash;
            let started = Instant::now();
            let (runtime, target) = (Arc::clone(&self.runtime), self.targets[i].clone());
            let outcome = tokio::task::spawn_blocking(move || target.load_and_swap(&runtime, bytes))
                .await
                .unwrap_or_else(|e| Err(format!("loader task failed: {e}")));
            let Ok(mut status) = self.status.0.lock() else { continue };
            let entry = &mut status[i];
            match outcome {
                Ok(info) => {
                    self.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(file = %path.display(), from = %entry.live, to = %info.label(), took = ?started.elapsed(), "module swapped");
                    entry.live = info.label().to_string();
                    entry.last_error = None;
                    entry.swaps += 1;
                }
                Err(reason) => {
                    self.metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(file = %path.display(), %reason, live = %entry.live, "new module refused; the live version keeps serving");
                    entry.last_error = Some(reason);
                }
            }
        }
    }
}
