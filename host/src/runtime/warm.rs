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
//! Idle instances hold pool slots. An instance is only created when the idle
//! list is empty, so live instances never exceed the peak number of
//! invocations that ran at once; the idle list is also cleared when the pool
//! runs out of slots, and goes away with its module version on a swap.

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

/// A store for one invocation, with the instance it already holds when it
/// was reused.
pub(super) struct Lease<I> {
    pub store: Store<HostState>,
    instance: Option<I>,
    /// Invocations this store has started, this one included.
    uses: u32,
}

impl<I> Lease<I> {
    /// A fresh store: the instance is created on first use.
    pub fn fresh(store: Store<HostState>) -> Self {
        Lease { store, instance: None, uses: 1 }
    }

    /// Whether this invocation runs on an instance that served before.
    pub fn reused(&self) -> bool {
        self.uses > 1
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

/// The idle instances of one module version.
pub(super) struct Warm<I> {
    max_uses: NonZeroU32,
    idle: Mutex<Vec<Lease<I>>>,
}

impl<I> Warm<I> {
    pub fn new(max_uses: NonZeroU32) -> Self {
        Warm { max_uses, idle: Mutex::new(Vec::new()) }
    }

    /// An idle instance to reuse, if reuse is on and one is free.
    pub fn take(&self) -> Option<Lease<I>> {
        if self.max_uses.get() == 1 {
            return None;
        }
        let mut lease = self.idle.lock().ok()?.pop()?;
        lease.uses += 1;
        Some(lease)
    }

    /// Keeps an instance that returned normally, unless it has served its
    /// share. Call only after a normal return: a trapped instance must never
    /// run again.
    pub fn give_back(&self, lease: Lease<I>) {
        if lease.uses >= self.max_uses.get() || lease.instance.is_none() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(lease);
        }
    }

    /// Idle instances now.
    pub fn idle(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }
}

/// An idle list of any world, so the runtime can free every module's slots.
pub(super) trait IdleList: Send + Sync {
    /// Drops every idle instance, freeing their pool slots.
    fn clear(&self) -> usize;
}

impl<I: Send> IdleList for Warm<I> {
    fn clear(&self) -> usize {
        self.idle.lock().map(|mut idle| std::mem::take(&mut *idle).len()).unwrap_or(0)
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
