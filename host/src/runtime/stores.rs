//! How every store is made, whether for the invocation waiting on it or
//! ahead of one: its limits, its deadline and its epoch behaviour.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::{Engine, Store, UpdateDeadline};

use super::limits::Limits;
use super::outbound::{NoOutbound, Outbound};
use super::state::{GuestContext, HostState};

/// Makes stores; cheap to clone into a background task.
#[derive(Clone)]
pub(super) struct Stores {
    engine: Engine,
    limits: Limits,
    /// Where a store prepared ahead sends until an invocation takes it and
    /// sets the real target.
    unassigned: Arc<dyn Outbound>,
}

impl Stores {
    pub fn new(engine: Engine, limits: Limits) -> Self {
        Stores { engine, limits, unassigned: Arc::new(NoOutbound) }
    }

    /// A store whose time limit starts now, ready to instantiate into.
    pub fn store(&self, guest: Arc<GuestContext>, outbound: Arc<dyn Outbound>) -> Store<HostState> {
        let state = HostState::new(guest, outbound, self.limits, self.deadline());
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Each epoch tick a running guest yields to other tasks; past its
        // deadline it traps.
        store.epoch_deadline_callback(|store| {
            let expired = Instant::now() >= store.data().deadline();
            Ok(if expired { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
        });
        store.set_epoch_deadline(1);
        store
    }

    /// Readies a store that waited (reused or prepared ahead) for the
    /// invocation taking it: its sends go to `outbound`, its time limit
    /// starts now.
    pub fn begin(&self, store: &mut Store<HostState>, outbound: Arc<dyn Outbound>) {
        store.data_mut().begin(outbound, self.deadline());
        store.set_epoch_deadline(1);
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.limits.timeout
    }

    /// A store for an instance prepared ahead: it sends nowhere until an
    /// invocation takes it.
    pub fn unassigned(&self, guest: Arc<GuestContext>) -> Store<HostState> {
        self.store(guest, Arc::clone(&self.unassigned))
    }
}
