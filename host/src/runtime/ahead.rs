//! Work taken off the delivery path.
//!
//! Besides the call, a fresh instance costs its delivery two things: creating
//! the instance, and resetting its pool slot when the store is dropped.
//! Neither needs the delivery to wait. After an invocation a thread of its
//! own drops the spent store and prepares the module's next instance (store,
//! WASI context, instantiation; no export is called), so the next delivery
//! finds its instance ready. The job is handed over only once the invoking
//! task yields, so even waking the thread comes after the answer is written.
//! A message still never runs on an instance that ran another message.
//!
//! That pays only with a core to spare, so the thread runs at idle priority
//! (`SCHED_IDLE`: only when a core has nothing else to run), holds at most
//! [`MAX_JOBS`] jobs, and takes them only from an invocation that finishes
//! with no other running (waking the thread costs a few µs: under load that
//! is more than it saves; the embedded bench lost 10–15 % before this rule).
//! While it is full or starved, or other invocations run, an invocation
//! drops its store inline and prepares nothing, as without it, so under load
//! the work does not pile up. (If it is preempted
//! holding one of the pool's short locks, a worker that waits on that lock
//! leaves its core idle, which is what lets the thread run and release it.)
//! Each module keeps at most its target of prepared instances, and the pool
//! gets [`headroom`] slots for them and the store being dropped on top of
//! `max_concurrent`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::Module;
use super::state::GuestContext;
use super::stores::Stores;
use super::warm::{Lease, Linked, Warm};

/// Jobs the thread holds at once, running or waiting. More than one: at
/// concurrency 1 the next invocation often finishes while the thread is
/// still on the last one's job (it runs only in the gaps a core leaves), and
/// with one at most it reset its slot inline before answering and prepared
/// nothing (a third of deliveries behind the Dapr route at concurrency 1).
const MAX_JOBS: usize = 3;

/// Pool slots added for work ahead: the stores being dropped, and
/// `prepared` instances for each of two worlds in two versions (a swap in
/// progress).
pub(super) fn headroom(prepared: usize) -> u32 {
    if prepared == 0 {
        return 0;
    }
    u32::try_from(prepared.saturating_mul(4).saturating_add(MAX_JOBS)).unwrap_or(u32::MAX)
}

/// The work-ahead thread.
pub(super) struct Ahead {
    /// Jobs handed to the thread and not done yet.
    jobs: Arc<AtomicUsize>,
    /// The thread's executor; `None` when disabled or the thread could not
    /// start, and then everything is done inline.
    thread: Option<tokio::runtime::Handle>,
    /// Dropped with the runtime, which ends the thread.
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Ahead {
    /// Work ahead on its own thread, or none at all (`enabled` false: all
    /// of it on the delivery path).
    pub fn start(enabled: bool) -> Self {
        let (thread, stop) = if enabled { start_thread().unzip() } else { (None, None) };
        Ahead { jobs: Arc::default(), thread, _stop: stop }
    }

    /// Jobs handed to the thread and not done yet.
    pub fn jobs(&self) -> usize {
        self.jobs.load(Ordering::Acquire)
    }

    /// Drops `spent` and prepares what `refill` reserves, on the thread if
    /// it has room, else drops `spent` now and prepares nothing.
    pub fn after<P: Linked>(&self, spent: Option<Lease<P::Instance>>, refill: impl FnOnce() -> Option<Refill<P>>) {
        let Some(thread) = &self.thread else { return };
        let Ok(held) = self.jobs.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_JOBS).then_some(n + 1))
        else {
            return;
        };
        let done = Done(Arc::clone(&self.jobs));
        let refill = refill();
        if spent.is_none() && refill.is_none() {
            return;
        }
        let job = async move {
            drop(spent);
            if let Some(refill) = refill {
                refill.run().await;
            }
            drop(done);
        };
        if held > 0 {
            // The thread has a job, so it is awake or about to be woken for
            // it: queueing behind that job seldom wakes anything.
            drop(thread.spawn(job));
            return;
        }
        // Handing the job over wakes the thread, which costs the caller a
        // few µs: a task on the caller's own worker does it once the caller
        // yields, after the source has written its answer.
        match tokio::runtime::Handle::try_current() {
            Ok(here) => {
                let thread = thread.clone();
                drop(here.spawn(async move {
                    drop(thread.spawn(job));
                }));
            }
            Err(_) => drop(thread.spawn(job)),
        }
    }
}

/// Counts a job out when it is done or dropped.
struct Done(Arc<AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A thread running a single-threaded executor until the returned sender
/// is dropped; it sleeps when there is no work.
fn start_thread() -> Option<(tokio::runtime::Handle, tokio::sync::oneshot::Sender<()>)> {
    let runtime = match tokio::runtime::Builder::new_current_thread().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::warn!(%error, "no work-ahead executor; instances are made and dropped on the delivery path");
            return None;
        }
    };
    let handle = runtime.handle().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new().name("wasm-ahead".into()).spawn(move || {
        idle_priority();
        // Ends when the sender is dropped; a job not yet done is dropped
        // with the executor, and gives back what it reserved.
        let _ = runtime.block_on(stopped);
    });
    match spawned {
        Ok(_) => Some((handle, stop)),
        Err(error) => {
            tracing::warn!(%error, "no work-ahead thread; instances are made and dropped on the delivery path");
            None
        }
    }
}

/// Lowers the calling thread to run only on otherwise idle cores.
#[cfg(target_os = "linux")]
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes only the calling thread's policy; `param` outlives the call.
    let set = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if set != 0 {
        let error = std::io::Error::last_os_error();
        tracing::debug!(%error, "work-ahead thread keeps normal priority");
    }
}

#[cfg(not(target_os = "linux"))]
fn idle_priority() {}

/// Instances to prepare for a module, counted by its [`Warm`] from
/// reservation until each is added or has failed.
pub(super) struct Refill<P: Linked> {
    pre: P,
    warm: Arc<Warm<P::Instance>>,
    guest: Arc<GuestContext>,
    stores: Stores,
    /// Reserved and not yet added.
    owed: usize,
}

impl<P: Linked> Refill<P> {
    /// A refill if `module` is below its target of prepared instances.
    pub fn reserve(module: &Module<P>, stores: &Stores) -> Option<Self> {
        let owed = module.warm.reserve_prepared();
        (owed > 0).then(|| Refill {
            pre: module.pre.clone(),
            warm: Arc::clone(&module.warm),
            guest: Arc::clone(&module.info.guest),
            stores: stores.clone(),
            owed,
        })
    }

    async fn run(mut self) {
        while self.owed > 0 {
            let mut store = self.stores.unassigned(Arc::clone(&self.guest));
            match self.pre.instantiate(&mut store).await {
                Ok(instance) => {
                    self.owed -= 1;
                    self.warm.add_prepared(Lease::prepared(store, instance));
                }
                // The delivery that would have taken it instantiates inline
                // and reports the failure itself.
                Err(error) => {
                    let error = format!("{error:#}");
                    tracing::debug!(module = %self.guest.label, %error, "could not prepare an instance ahead");
                    return;
                }
            }
        }
    }
}

impl<P: Linked> Drop for Refill<P> {
    fn drop(&mut self) {
        if self.owed > 0 {
            self.warm.preparing_failed(self.owed);
        }
    }
}
