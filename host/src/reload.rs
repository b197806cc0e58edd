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

use crate::metrics::Metrics;
use crate::modules::ModuleSource;
use crate::runtime::{ConsumerModule, LoadError, ModuleInfo, ProducerModule, Runtime, World, content_hash};
use crate::slot::Slot;

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

    fn live(&self) -> Option<Arc<ModuleInfo>> {
        match self {
            Target::Consumer(_, slot) => slot.current().map(|m| Arc::clone(&m.info)),
            Target::Producer(_, slot) => slot.current().map(|m| Arc::clone(&m.info)),
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
    /// `name@version+hash` of the live module; `None` until one loads.
    pub live: Option<String>,
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

    /// Why a role has no module yet, for the first role without one: the
    /// reason `/readyz` gives while the host waits for a module it can load.
    pub fn unloaded(&self) -> Option<String> {
        self.snapshot().into_iter().find(|r| r.live.is_none()).map(|r| {
            let why = r.last_error.unwrap_or_else(|| "not loaded yet".into());
            format!("no {} module is live: {why}", r.world)
        })
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
    /// Scans in a row that could not read each target's file.
    unreadable: Vec<u32>,
    rescan: Duration,
}

/// The watches on the modules directory and its parent, and which directory
/// (by inode) they were armed on.
struct DirWatch {
    _watcher: Option<notify::RecommendedWatcher>,
    inode: Option<u64>,
}

impl DirWatch {
    fn arm(dir: &std::path::Path, tx: mpsc::UnboundedSender<Result<(), String>>) -> DirWatch {
        let inode = inode(dir);
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).map(std::path::Path::to_path_buf);
        let target = dir.to_path_buf();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // From the parent, only events about the modules directory itself.
            let relevant = match &event {
                Ok(e) => e.paths.iter().any(|p| p.starts_with(&target)),
                Err(_) => true,
            };
            if relevant {
                let _ = tx.send(event.map(|_| ()).map_err(|e| e.to_string()));
            }
        })
        .and_then(|mut w| {
            if let Some(parent) = &parent {
                w.watch(parent, RecursiveMode::NonRecursive)?;
            }
            if inode.is_some() {
                w.watch(dir, RecursiveMode::NonRecursive)?;
            }
            Ok(w)
        });
        match watcher {
            Ok(w) => DirWatch { _watcher: Some(w), inode },
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the modules directory; relying on the periodic re-scan");
                DirWatch { _watcher: None, inode }
            }
        }
    }

    /// Arms the watches again when the directory is a different one now
    /// (deleted and made again) or appeared since.
    fn rearm_if_moved(&mut self, dir: &std::path::Path, tx: &mpsc::UnboundedSender<Result<(), String>>) {
        let now = inode(dir);
        if now != self.inode {
            tracing::info!(dir = %dir.display(), "the modules directory changed; watching it again");
            *self = DirWatch::arm(dir, tx.clone());
        }
    }
}

fn inode(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| m.ino())
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
                live: t.live().map(|info| info.label().to_string()),
                last_error: None,
                swaps: 0,
            })
            .collect();
        // An empty slot has seen nothing: the first scan loads its file.
        let seen = targets.iter().map(|t| t.live().map(|info| info.hash).unwrap_or_default()).collect();
        let unreadable = vec![0; targets.len()];
        Reloader {
            runtime,
            dir,
            targets,
            metrics,
            status: ReloadStatus(Arc::new(Mutex::new(status))),
            seen,
            unreadable,
            rescan,
        }
    }

    pub fn status(&self) -> ReloadStatus {
        self.status.clone()
    }

    /// Runs until `stop` turns true. File events come from a `notify`
    /// watcher thread; the re-scan timer covers anything it misses.
    ///
    /// The directory is watched, and so is its parent: a watch dies with
    /// the directory it watches, so when the modules directory is deleted
    /// and made again (a `cargo clean`, a redeploy), the parent's event
    /// re-arms the watch at once instead of leaving it to the re-scan.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let (tx, mut events) = mpsc::unbounded_channel();
        let mut watch = DirWatch::arm(&self.dir, tx.clone());
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
                    watch.rearm_if_moved(&self.dir, &tx);
                    self.scan().await;
                }
                _ = tokio::time::sleep_until(next_scan.into()) => {
                    watch.rearm_if_moved(&self.dir, &tx);
                    self.scan().await;
                    next_scan = Instant::now() + self.rescan;
                }
            }
        }
    }

    /// A module file that cannot be read. Mid-swap a link may dangle for an
    /// instant, so it is reported (`/readyz`, the log, the refusal counter)
    /// only when the next scan cannot read it either, or when nothing is
    /// live meanwhile.
    fn unreadable(&mut self, i: usize, path: &std::path::Path, error: &std::io::Error) {
        self.unreadable[i] += 1;
        let reason = format!("cannot read {}: {error}", path.display());
        let live = self.targets[i].live().is_some();
        if live && self.unreadable[i] < 2 {
            tracing::debug!(%reason, "module not readable now; checking again");
            return;
        }
        let Ok(mut status) = self.status.0.lock() else { return };
        if status[i].last_error.as_ref() != Some(&reason) {
            match live {
                true => {
                    tracing::error!(%reason, live = ?status[i].live, "module file unreadable; the live version keeps serving")
                }
                false => tracing::error!(%reason, "no module to serve; waiting for one"),
            }
            self.metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
        }
        status[i].last_error = Some(reason);
    }

    /// Re-reads every target; loads and swaps those whose content changed.
    pub async fn scan(&mut self) {
        for i in 0..self.targets.len() {
            let path = self.targets[i].source().path.clone();
            let bytes = match tokio::fs::read(&path).await {
                Ok(bytes) => bytes,
                Err(e) => {
                    self.unreadable(i, &path, &e);
                    continue;
                }
            };
            let hash = content_hash(&bytes);
            if std::mem::take(&mut self.unreadable[i]) > 0 && hash == self.seen[i] {
                // Readable again, and unchanged: what was live still is.
                if let Ok(mut status) = self.status.0.lock() {
                    status[i].last_error = None;
                }
            }
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
                    match &entry.live {
                        Some(from) => {
                            tracing::info!(file = %path.display(), %from, to = %info.label(), took = ?started.elapsed(), "module swapped");
                            self.metrics.reloads.fetch_add(1, Ordering::Relaxed);
                            entry.swaps += 1;
                        }
                        None => tracing::info!(file = %path.display(), module = %info.label(), "module live"),
                    }
                    entry.live = Some(info.label().to_string());
                    entry.last_error = None;
                }
                Err(reason) => {
                    self.metrics.reload_failures.fetch_add(1, Ordering::Relaxed);
                    match &entry.live {
                        Some(live) => {
                            tracing::error!(file = %path.display(), %reason, %live, "new module refused; the live version keeps serving")
                        }
                        None => {
                            tracing::error!(file = %path.display(), %reason, "module refused; nothing to serve until a file loads")
                        }
                    }
                    entry.last_error = Some(reason);
                }
            }
        }
    }
}
