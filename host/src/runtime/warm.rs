//! Instances kept between invocations, when the deployment allows it.
//!
//! By default every invocation gets a fresh instance: nothing a guest leaves
//! in its globals or heap reaches the next message. With reuse set to N > 1 an
//! instance that returned normally (success, or the guest's own retry or
//! reject) goes back to an idle list and serves up to N invocations, one
//! after another, never two at once. One that trapped, timed out or hit a
//! limit is dropped. This trades isolation between messages for skipping
//! instantiation, the same trade `wasmtime serve` offers with instance reuse.
//!
//! Either way a few instances may be prepared ahead (see [`super::ahead`]):
//! instantiated, never given a message, handed to the next invocation.
//!
//! Idle and prepared instances hold pool slots. An instance is only created
//! when the idle list is empty, so idle ones never exceed the peak number of
//! invocations that ran at once; both lists are cleared when the pool runs
//! out of slots, and go away with their module version on a swap.

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::{Mutex, Weak};

use wasmtime::Store;

use super::bindings::{Consumer, ConsumerPre, Producer, ProducerPre};
use super::state::HostState;

/// A linked module that can make instances of its world.
pub trait Linked: Clone + Send + Sync + 'static {
    /// The world's typed instance.
    type Instance: Send + 'static;

    /// Instantiates into `store`.
    fn instantiate(
        &self,
        store: &mut Store<HostState>,
    ) -> impl Future<Output = wasmtime::Result<Self::Instance>> + Send;
}

impl Linked for ConsumerPre<HostState> {
    type Instance = Consumer;

    fn instantiate(&self, store: &mut Store<HostState>) -> impl Future<Output = wasmtime::Result<Consumer>> + Send {
        self.instantiate_async(store)
    }
}

impl Linked for ProducerPre<HostState> {
    type Instance = Producer;

    fn instantiate(&self, store: &mut Store<HostState>) -> impl Future<Output = wasmtime::Result<Producer>> + Send {
        self.instantiate_async(store)
    }
}

/// Where an invocation's instance comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    /// It served earlier invocations (instance reuse).
    Reused,
    /// Made ahead of the invocation, which is its first.
    Prepared,
    /// Made by the invocation itself, on the delivery path.
    Inline,
}

/// A store for one invocation, with the instance it already holds when it
/// was reused or prepared ahead.
pub(super) struct Lease<I> {
    pub store: Store<HostState>,
    instance: Option<I>,
    /// Invocations this store has started, this one included; 0 for an
    /// instance prepared ahead that no invocation has had yet.
    uses: u32,
}

impl<I> Lease<I> {
    /// A fresh store: the instance is created on first use.
    pub fn fresh(store: Store<HostState>) -> Self {
        Lease { store, instance: None, uses: 1 }
    }

    /// An instance made ahead of the invocation that will take it.
    pub fn prepared(store: Store<HostState>, instance: I) -> Self {
        Lease { store, instance: Some(instance), uses: 0 }
    }

    /// Whether this invocation runs on an instance that served before.
    pub fn reused(&self) -> bool {
        self.uses > 1
    }

    /// Where this invocation's instance comes from; ask before
    /// [`Lease::ready`], which makes one if there is none.
    pub fn origin(&self) -> Origin {
        match (&self.instance, self.reused()) {
            (None, _) => Origin::Inline,
            (Some(_), true) => Origin::Reused,
            (Some(_), false) => Origin::Prepared,
        }
    }

    /// The store and its instance, instantiating if it has none yet.
    pub async fn ready<P: Linked<Instance = I>>(
        &mut self,
        pre: &P,
    ) -> wasmtime::Result<(&mut Store<HostState>, &mut I)> {
        let instance = match self.instance.take() {
            Some(instance) => instance,
            None => pre.instantiate(&mut self.store).await?,
        };
        Ok((&mut self.store, self.instance.insert(instance)))
    }
}

/// The instances of one module version waiting for an invocation: ones that
/// served before (with reuse) and ones prepared ahead that never ran a
/// message.
pub(super) struct Warm<I> {
    max_uses: NonZeroU32,
    /// How many never-used instances to keep ready.
    prepared_target: usize,
    lists: Mutex<Lists<I>>,
}

struct Lists<I> {
    idle: Vec<Lease<I>>,
    prepared: Vec<Lease<I>>,
    /// Instances being prepared now, counted so that racing refills do not
    /// overshoot the target.
    preparing: usize,
}

impl<I> Warm<I> {
    pub fn new(max_uses: NonZeroU32, prepared_target: usize) -> Self {
        Warm {
            max_uses,
            prepared_target,
            lists: Mutex::new(Lists { idle: Vec::new(), prepared: Vec::new(), preparing: 0 }),
        }
    }

    /// An instance for the next invocation: one that served before if reuse
    /// allows, else one prepared ahead.
    pub fn take(&self) -> Option<Lease<I>> {
        let mut lists = self.lists.lock().ok()?;
        let mut lease = lists.idle.pop().or_else(|| lists.prepared.pop())?;
        lease.uses += 1;
        Some(lease)
    }

    /// Keeps an instance that returned normally, unless it has served its
    /// share; gives it back when not kept. Call only after a normal return:
    /// a trapped instance must never run again.
    pub fn give_back(&self, lease: Lease<I>) -> Option<Lease<I>> {
        if lease.uses >= self.max_uses.get() || lease.instance.is_none() {
            return Some(lease);
        }
        match self.lists.lock() {
            Ok(mut lists) => {
                lists.idle.push(lease);
                None
            }
            Err(_) => Some(lease),
        }
    }

    /// How many instances to prepare to reach the target; they are counted
    /// as being prepared until [`Warm::add_prepared`] or
    /// [`Warm::preparing_failed`].
    pub fn reserve_prepared(&self) -> usize {
        let Ok(mut lists) = self.lists.lock() else { return 0 };
        let missing = self.prepared_target.saturating_sub(lists.prepared.len() + lists.preparing);
        lists.preparing += missing;
        missing
    }

    pub fn add_prepared(&self, lease: Lease<I>) {
        if let Ok(mut lists) = self.lists.lock() {
            lists.preparing = lists.preparing.saturating_sub(1);
            lists.prepared.push(lease);
        }
    }

    pub fn preparing_failed(&self, count: usize) {
        if let Ok(mut lists) = self.lists.lock() {
            lists.preparing = lists.preparing.saturating_sub(count);
        }
    }

    /// Instances that served before and wait for reuse.
    pub fn idle(&self) -> usize {
        self.lists.lock().map(|lists| lists.idle.len()).unwrap_or(0)
    }

    /// Never-used instances ready now.
    pub fn prepared(&self) -> usize {
        self.lists.lock().map(|lists| lists.prepared.len()).unwrap_or(0)
    }
}

/// An idle list of any world, so the runtime can free every module's slots.
pub(super) trait IdleList: Send + Sync {
    /// Drops every idle and prepared instance, freeing their pool slots.
    fn clear(&self) -> usize;
}

impl<I: Send> IdleList for Warm<I> {
    fn clear(&self) -> usize {
        let Ok(mut lists) = self.lists.lock() else { return 0 };
        let idle = std::mem::take(&mut lists.idle);
        let prepared = std::mem::take(&mut lists.prepared);
        // Dropped outside the lock: resetting a slot takes a while.
        drop(lists);
        idle.len() + prepared.len()
    }
}

/// Every module's idle list, weakly: a list goes away with its module version.
#[derive(Default)]
pub(super) struct Registry {
    lists: Mutex<Vec<Weak<dyn IdleList>>>,
}

impl Registry {
    pub fn add(&self, list: Weak<dyn IdleList>) {
        if let Ok(mut lists) = self.lists.lock() {
            lists.retain(|l| l.strong_count() > 0);
            lists.push(list);
        }
    }

    /// Drops the idle instances of every live module; returns how many.
    pub fn clear_all(&self) -> usize {
        let lists: Vec<_> = self.lists.lock().map(|l| l.iter().filter_map(Weak::upgrade).collect()).unwrap_or_default();
        lists.iter().map(|l| l.clear()).sum()
    }
}
