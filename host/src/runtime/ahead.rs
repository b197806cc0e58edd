//! Work taken off the delivery path.
//!
//! Besides the call, a fresh instance costs its delivery two things: creating
//! the instance, and resetting its pool slot when the store is dropped.
//! Neither needs the delivery to wait. After an invocation a task drops the
//! spent store and prepares the module's next instance (store, WASI context,
//! instantiation; no export is called), so the next delivery finds its
//! instance ready. A message still never runs on an instance that ran
//! another message.
//!
//! The task is spawned on the invoking task's own executor and worker, so it
//! runs after the source has written its answer, on a core that is already
//! awake and has the module's code in its caches. (An earlier design handed
//! the work to a thread of its own at idle priority: waking it cost every
//! delivery a context switch, and it found too few idle gaps;
//! `docs/BENCHMARKS.md`, "Work ahead on the invoking worker".) The task
//! yields first, so it runs only once the worker has nothing else ready:
//! under load the next deliveries go first and make their own instances.
//! (Run at once, the jobs took about 8 % off the rate at 32 connections:
//! "Work ahead behind the worker's other tasks".) At most [`MAX_JOBS`] are
//! pending at once, and the runtime hands over work only from an invocation
//! that finishes with no other running, so under load the work does not
//! pile up: a delivery drops its store inline and prepares nothing, as
//! without work ahead. Without a tokio runtime
//! nothing is prepared. Each module keeps at most its target of prepared
//! instances, and the pool gets [`headroom`] slots for them and the stores
//! being dropped on top of `max_concurrent`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::Module;
use super::state::GuestContext;
use super::stores::Stores;
use super::warm::{Lease, Linked, Warm};

/// Jobs pending or running at once. More than one: at concurrency 1 a
/// delivery may finish before the last one's job has run (its worker busy
/// with another task), and with one at most it would reset its slot inline
/// and prepare nothing.
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

/// Work ahead for one runtime: whether it is on, and its jobs in flight.
pub(super) struct Ahead {
    enabled: bool,
    /// Jobs spawned and not done yet.
    jobs: Arc<AtomicUsize>,
}

impl Ahead {
    /// Work ahead, or none at all (`enabled` false: all of it on the
    /// delivery path).
    pub fn new(enabled: bool) -> Self {
        Ahead { enabled, jobs: Arc::default() }
    }

    /// Jobs spawned and not done yet.
    pub fn jobs(&self) -> usize {
        self.jobs.load(Ordering::Acquire)
    }

    /// Drops `spent` and prepares what `refill` reserves in a task that runs
    /// after the caller yields; with no room for another job, or no tokio
    /// runtime to spawn on, drops `spent` now and prepares nothing.
    pub fn after<P: Linked>(&self, spent: Option<Lease<P::Instance>>, refill: impl FnOnce() -> Option<Refill<P>>) {
        if !self.enabled {
            return;
        }
        let Ok(here) = tokio::runtime::Handle::try_current() else { return };
        if self.jobs.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_JOBS).then_some(n + 1)).is_err() {
            return;
        }
        let done = Done(Arc::clone(&self.jobs));
        let refill = refill();
        if spent.is_none() && refill.is_none() {
            return;
        }
        // From a worker of a multi-threaded runtime the task takes that
        // worker's next-task slot: it runs there, after the caller, and
        // wakes no other thread.
        drop(here.spawn(async move {
            // Behind whatever else the worker has ready: under load the next
            // deliveries go first and make their own instances, as without
            // work ahead, and the job fills the worker's idle gaps only.
            tokio::task::yield_now().await;
            drop(spent);
            if let Some(refill) = refill {
                refill.run().await;
            }
            drop(done);
        }));
    }
}

/// Counts a job out when it is done or dropped.
struct Done(Arc<AtomicUsize>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

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
