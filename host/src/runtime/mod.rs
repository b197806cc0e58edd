//! The wasmtime side of the host: one engine, modules loaded and checked
//! against their world, and invocations with limits.
//!
//! Every invocation gets a fresh `Store` and instance from a pre-linked
//! `InstancePre`, so no state leaks between messages; the pooling allocator
//! keeps that cheap, and between deliveries the next instance is made, and
//! the last one dropped, after the answer (see [`ahead`]). A
//! deployment may opt into reusing instances that returned normally (see
//! [`warm`]). Wall time is bounded by epoch interruption (a ticker
//! thread bumps the epoch; the store yields to tokio each tick and traps at its
//! deadline), memory and tables by a store limiter. Every failure comes back as
//! an [`InvokeError`] whose [`FailureKind`] the caller maps to retry, reject or
//! an HTTP status.

mod ahead;
pub mod bindings;
mod cache;
pub mod limits;
mod module;
pub mod outbound;
mod state;
mod stdio;
mod stores;
mod warm;

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Trap};

pub use bindings::types::{ConsumeError, Message, Request, Response};
pub use cache::{ArtifactCache, CacheError, CacheStatus};
pub use limits::{LimitExceeded, Limits, Resource};
pub use module::{LoadError, LoadErrorKind, ModuleInfo, ModuleSpec, World, content_hash};
pub use state::HostState;

use ahead::{Ahead, Refill};
use bindings::{ConsumerPre, ProducerPre};
use state::GuestContext;
use stores::Stores;
pub use warm::Linked;
use warm::{IdleList, Lease, Origin, Registry, Warm};

use crate::metrics::Reading;
use crate::runtime::outbound::Outbound;

/// How often the epoch advances: the granularity of timeouts, and how often a
/// running guest yields to other tasks.
const EPOCH_TICK: Duration = Duration::from_millis(10);
/// Extra time the outer timer allows over the epoch deadline, so that a guest
/// spinning in wasm is stopped by the (precise) epoch trap.
const TIMER_SLACK: Duration = Duration::from_millis(250);

/// How a runtime is set up.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub limits: Limits,
    /// Where precompiled components are kept; `None` compiles every time.
    pub cache_dir: Option<PathBuf>,
    /// Largest module file accepted, in bytes.
    pub max_module_bytes: usize,
    /// Invocations one instance may serve in sequence; 1 (the default) gives
    /// every invocation a fresh instance.
    pub instance_reuse: NonZeroU32,
    /// Instances of each module made ahead of the invocations that take
    /// them, and spent stores dropped after the answer (see [`ahead`]);
    /// 0 does both on the delivery path.
    pub prepared_instances: usize,
    /// Reset pool slots with `PAGEMAP_SCAN` where the kernel has it (Linux
    /// 6.7+). Off only to measure what a machine without it pays
    /// (`docs/BENCHMARKS.md`, "Between machines").
    pub pagemap_scan: bool,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        RuntimeOptions {
            limits: Limits::default(),
            cache_dir: None,
            max_module_bytes: 4 << 20,
            instance_reuse: NonZeroU32::MIN,
            prepared_instances: 2,
            pagemap_scan: true,
        }
    }
}

/// A loaded, linked module of one world, ready to instantiate.
pub struct Module<P: Linked> {
    pub info: Arc<ModuleInfo>,
    pre: P,
    /// Idle instances of this version; shared by clones, dropped with the last.
    warm: Arc<Warm<P::Instance>>,
}

// By hand: a derive would ask for `P::Instance: Clone`, which no instance is.
impl<P: Linked> Clone for Module<P> {
    fn clone(&self) -> Self {
        Module { info: Arc::clone(&self.info), pre: self.pre.clone(), warm: Arc::clone(&self.warm) }
    }
}

impl<P: Linked> Module<P> {
    /// Instances kept idle for reuse now.
    pub fn idle_instances(&self) -> usize {
        self.warm.idle()
    }

    /// Instances prepared ahead, never given a message, ready now.
    pub fn prepared_instances(&self) -> usize {
        self.warm.prepared()
    }
}

/// A module checked against the consumer world.
pub type ConsumerModule = Module<ConsumerPre<HostState>>;
/// A module checked against the producer world.
pub type ProducerModule = Module<ProducerPre<HostState>>;

/// A module of either world, for tools that take whichever they are given.
pub enum AnyModule {
    Consumer(ConsumerModule),
    Producer(ProducerModule),
}

impl AnyModule {
    pub fn info(&self) -> &Arc<ModuleInfo> {
        match self {
            AnyModule::Consumer(m) => &m.info,
            AnyModule::Producer(m) => &m.info,
        }
    }
}

/// The engine, its linker and limits. Share it behind an `Arc`.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    limits: Limits,
    stores: Stores,
    ahead: Ahead,
    prepared_instances: usize,
    /// Invocations running now; the pool has headroom beyond
    /// `max_concurrent` for work ahead, so this is what holds the limit.
    in_flight: AtomicU32,
    /// Invocations counted by where their instance came from.
    origins: Origins,
    cache: Option<ArtifactCache>,
    max_module_bytes: usize,
    instance_reuse: NonZeroU32,
    /// Every module's idle instances, freed when the pool runs out of slots.
    warm: Registry,
    /// Whether pool slots are reset with `PAGEMAP_SCAN`.
    pagemap_scan: bool,
}

impl Runtime {
    /// Builds the engine (component model, pooling allocator, epoch
    /// interruption) and starts its epoch ticker.
    pub fn new(options: RuntimeOptions) -> anyhow::Result<Runtime> {
        let limits = options.limits;
        let mut pool = PoolingAllocationConfig::new();
        let slots = limits.max_concurrent.saturating_add(ahead::headroom(options.prepared_instances));
        // The resident budget is shared over every slot, headroom included.
        let pool_limits = Limits { max_concurrent: slots, ..limits };
        let per_component = u32::try_from(limits.max_instances).unwrap_or(u32::MAX);
        pool.total_component_instances(slots)
            .total_core_instances(slots.saturating_mul(per_component.min(8)))
            .max_core_instances_per_component(per_component)
            .total_memories(slots)
            .max_memories_per_component(1)
            .total_tables(slots.saturating_mul(4))
            .max_tables_per_component(per_component)
            .total_stacks(slots)
            .max_memory_size(limits.max_memory_bytes)
            .table_elements(limits.max_table_elements)
            // Returning a slot's memory with madvise costs a TLB shootdown on
            // every core; batching those calls amortises it, but a batch
            // holds its slots' memory until it is flushed.
            .decommit_batch_size(pool_limits.decommit_batch());
        // Keeping memory resident between instances saves page faults and
        // madvise calls. With PAGEMAP_SCAN (Linux 6.7+) only the pages a guest
        // dirtied are reset, so a generous window is cheap; without it the
        // whole window is memset, so keep it small. Idle slots keep what
        // they hold until reused, so the window is the pool's resident
        // budget shared out over its slots.
        let pagemap_scan = options.pagemap_scan && PoolingAllocationConfig::is_pagemap_scan_available();
        if pagemap_scan {
            pool.pagemap_scan(wasmtime::Enabled::Yes)
                .linear_memory_keep_resident(pool_limits.keep_resident_per_slot())
                .table_keep_resident(pool_limits.table_keep_resident());
        } else {
            pool.linear_memory_keep_resident(64 << 10).table_keep_resident(64 << 10);
            // A fresh instance costs about twice as much without it.
            tracing::info!("PAGEMAP_SCAN not used: pool slots are reset with memset and madvise");
        }

        let mut config = Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .max_wasm_stack(limits.max_stack_bytes)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        bindings::Consumer::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)?;

        // The cache only saves compile time: never a reason not to start.
        let cache = options.cache_dir.as_deref().and_then(|dir| match ArtifactCache::open(dir, &engine) {
            Ok(cache) => {
                tracing::debug!(dir = %cache.dir().display(), "artifact cache");
                Some(cache)
            }
            Err(error) => {
                tracing::warn!(%error, "artifact cache unusable; modules are compiled at every start");
                None
            }
        });

        spawn_epoch_ticker(&engine);
        Ok(Runtime {
            stores: Stores::new(engine.clone(), limits),
            ahead: Ahead::new(options.prepared_instances > 0),
            prepared_instances: options.prepared_instances,
            in_flight: AtomicU32::new(0),
            origins: Origins::default(),
            engine,
            linker,
            limits,
            cache,
            max_module_bytes: options.max_module_bytes,
            instance_reuse: options.instance_reuse,
            warm: Registry::default(),
            pagemap_scan,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// What the runtime reports at `/metrics`: the pooling allocator's
    /// slots (what idle slots keep resident is the memory a burst leaves
    /// behind, `docs/BENCHMARKS.md` "Memory"), and invocations by where
    /// their instance came from (how often work ahead had it ready).
    pub fn readings(&self) -> Vec<Reading> {
        let o = &self.origins;
        let mut readings = vec![
            Reading::counter(
                "invocations_reused_instance_total",
                "Invocations on an instance that had served before (--instance-reuse).",
                o.reused.load(Ordering::Relaxed),
            ),
            Reading::counter(
                "invocations_prepared_instance_total",
                "Invocations on a fresh instance prepared ahead of them.",
                o.prepared.load(Ordering::Relaxed),
            ),
            Reading::counter(
                "invocations_instantiated_inline_total",
                "Invocations that made their instance on the delivery path (none prepared, or under load).",
                o.inline.load(Ordering::Relaxed),
            ),
        ];
        let Some(pool) = self.engine.pooling_allocator_metrics() else { return readings };
        let n = |v: usize| u64::try_from(v).unwrap_or(u64::MAX);
        readings.extend([
            Reading::gauge(
                "pool_pagemap_scan",
                "1 if pool slots are reset with PAGEMAP_SCAN (only dirtied pages), 0 if with memset and madvise.",
                u64::from(self.pagemap_scan),
            ),
            Reading::gauge("pool_memories", "Linear memories in use in the instance pool.", n(pool.memories())),
            Reading::gauge(
                "pool_work_ahead_jobs",
                "Work-ahead jobs pending or running: spent instances to drop, instances to prepare.",
                n(self.ahead.jobs()),
            ),
            Reading::gauge(
                "pool_unused_warm_memories",
                "Idle instance pool slots that were used before.",
                u64::from(pool.unused_warm_memories()),
            ),
            Reading::gauge(
                "pool_unused_memory_bytes_resident",
                "Bytes of linear memory idle pool slots keep resident.",
                n(pool.unused_memory_bytes_resident()),
            ),
        ]);
        readings
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Loads a consumer; refuses anything that is not one, saying why.
    pub fn load_consumer(&self, spec: ModuleSpec) -> Result<ConsumerModule, LoadError> {
        let (info, component) = self.compile(spec, World::Consumer)?;
        let pre = self.link(&info.name, &component, ConsumerPre::new)?;
        Ok(self.module(info, pre))
    }

    /// Loads a producer; refuses anything that is not one, saying why.
    pub fn load_producer(&self, spec: ModuleSpec) -> Result<ProducerModule, LoadError> {
        let (info, component) = self.compile(spec, World::Producer)?;
        let pre = self.link(&info.name, &component, ProducerPre::new)?;
        Ok(self.module(info, pre))
    }

    /// Loads a module for `world`; the verdict `wasm-pc check` gives.
    pub fn load(&self, spec: ModuleSpec, world: World) -> Result<AnyModule, LoadError> {
        match world {
            World::Consumer => self.load_consumer(spec).map(AnyModule::Consumer),
            World::Producer => self.load_producer(spec).map(AnyModule::Producer),
        }
    }

    /// Compiles a module for `world` and writes its precompiled artifact
    /// (the `compile` subcommand): what a cache would hold.
    pub fn precompile(&self, spec: ModuleSpec, world: World) -> Result<Vec<u8>, LoadError> {
        let name = spec.name.clone();
        let (_, component) = self.compile(spec, world)?;
        component.serialize().map_err(|e| LoadError { module: name, kind: LoadErrorKind::Compile(e.to_string()) })
    }

    fn compile(&self, spec: ModuleSpec, world: World) -> Result<(Arc<ModuleInfo>, Component), LoadError> {
        let fail = |kind| LoadError { module: spec.name.clone(), kind };
        module::check_header(&spec.bytes, self.max_module_bytes).map_err(fail)?;
        let hash = module::content_hash(&spec.bytes);
        let (component, cache) = self.compile_cached(&spec, &hash).map_err(fail)?;
        module::check_exports(&self.engine, &component, world).map_err(fail)?;
        let guest = Arc::new(GuestContext {
            label: module::label(&spec.name, spec.version.as_deref(), &hash),
            config: Arc::new(spec.config),
        });
        let info =
            ModuleInfo { name: spec.name, world, hash, version: spec.version, size: spec.bytes.len(), cache, guest };
        tracing::info!(module = %info.label(), %world, bytes = info.size, cache = ?info.cache, "module loaded");
        Ok((Arc::new(info), component))
    }

    fn compile_cached(&self, spec: &ModuleSpec, hash: &[u8; 32]) -> Result<(Component, CacheStatus), LoadErrorKind> {
        let compile =
            || Component::new(&self.engine, &spec.bytes).map_err(|e| LoadErrorKind::Compile(format!("{e:#}")));
        let Some(cache) = &self.cache else {
            return Ok((compile()?, CacheStatus::Miss));
        };
        let status = match cache.load(&self.engine, hash) {
            Ok(Some(component)) => return Ok((component, CacheStatus::Hit)),
            Ok(None) => CacheStatus::Miss,
            Err(reason) => {
                tracing::warn!(module = %spec.name, %reason, "ignoring unusable cache entry; recompiling");
                CacheStatus::Rebuilt
            }
        };
        let component = compile()?;
        if let Err(e) = cache.store(hash, &component) {
            tracing::warn!(module = %spec.name, error = %e, "could not write the artifact cache");
        }
        Ok((component, status))
    }

    fn module<P: Linked>(&self, info: Arc<ModuleInfo>, pre: P) -> Module<P> {
        let warm = Arc::new(Warm::new(self.instance_reuse, self.prepared_instances));
        let list: Arc<dyn IdleList> = warm.clone();
        self.warm.add(Arc::downgrade(&list));
        let module = Module { info, pre, warm };
        // The first delivery need not wait for its instance either.
        self.ahead.after(None, || self.refill(&module));
        module
    }

    /// One more prepared instance for `module`, if it is below its target.
    fn refill<P: Linked>(&self, module: &Module<P>) -> Option<Refill<P>> {
        Refill::reserve(module, &self.stores)
    }

    fn link<P>(
        &self,
        name: &str,
        component: &Component,
        wrap: impl FnOnce(wasmtime::component::InstancePre<HostState>) -> wasmtime::Result<P>,
    ) -> Result<P, LoadError> {
        let fail =
            |e: wasmtime::Error| LoadError { module: name.to_string(), kind: LoadErrorKind::Link(format!("{e:#}")) };
        let pre = self.linker.instantiate_pre(component).map_err(fail)?;
        wrap(pre).map_err(fail)
    }

    /// A store for one invocation: an idle instance of `module` if reuse
    /// allows, else one prepared ahead, else a fresh store. Its deadline
    /// starts now.
    fn lease<P: Linked>(&self, module: &Module<P>, outbound: Arc<dyn Outbound>) -> Lease<P::Instance> {
        let lease = self.take_lease(module, outbound);
        let origin = match lease.origin() {
            Origin::Reused => &self.origins.reused,
            Origin::Prepared => &self.origins.prepared,
            Origin::Inline => &self.origins.inline,
        };
        origin.fetch_add(1, Ordering::Relaxed);
        lease
    }

    fn take_lease<P: Linked>(&self, module: &Module<P>, outbound: Arc<dyn Outbound>) -> Lease<P::Instance> {
        match module.warm.take() {
            Some(mut lease) => {
                self.stores.begin(&mut lease.store, outbound);
                lease
            }
            None => Lease::fresh(self.stores.store(Arc::clone(&module.info.guest), outbound)),
        }
    }

    /// Hands one message to a consumer. The outer `Result` is the host's
    /// verdict on the invocation, the inner one the guest's answer.
    pub async fn consume(
        &self,
        module: &ConsumerModule,
        message: &Message,
        outbound: Arc<dyn Outbound>,
    ) -> Result<Result<(), ConsumeError>, InvokeError> {
        let _running = self.admit(&module.info)?;
        let mut lease = self.lease(module, outbound);
        let call = async {
            let (store, instance) = lease.ready(&module.pre).await.map_err(Phase::Instantiate)?;
            instance.wasm_pc_app_consume().call_handle(store, message).await.map_err(Phase::Call)
        };
        let result = tokio::time::timeout(self.limits.timeout + TIMER_SLACK, call).await;
        self.finish(module, lease, result)
    }

    /// Hands one request to a producer; its sends go to `outbound`.
    pub async fn produce(
        &self,
        module: &ProducerModule,
        request: &Request,
        outbound: Arc<dyn Outbound>,
    ) -> Result<Response, InvokeError> {
        let _running = self.admit(&module.info)?;
        let mut lease = self.lease(module, outbound);
        let call = async {
            let (store, instance) = lease.ready(&module.pre).await.map_err(Phase::Instantiate)?;
            instance.wasm_pc_app_produce().call_handle(store, request).await.map_err(Phase::Call)
        };
        let result = tokio::time::timeout(self.limits.timeout + TIMER_SLACK, call).await;
        self.finish(module, lease, result)
    }

    /// Counts an invocation in, or refuses it when `max_concurrent` run
    /// already.
    fn admit(&self, info: &ModuleInfo) -> Result<Running<'_>, InvokeError> {
        let max = self.limits.max_concurrent;
        match self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1)) {
            Ok(_) => Ok(Running(&self.in_flight)),
            Err(_) => {
                let detail = format!("{max} invocations are running already");
                let kind = FailureKind::ResourceLimit { resource: Resource::Pool, detail };
                let error = InvokeError { module: info.label().to_string(), function: "handle", kind };
                tracing::warn!(%error, "invocation refused");
                Err(error)
            }
        }
    }

    /// Flushes the guest's output, keeps the instance if it returned
    /// normally, and turns the outcome into the caller's terms.
    fn finish<P: Linked, R>(
        &self,
        module: &Module<P>,
        lease: Lease<P::Instance>,
        result: Result<Result<R, Phase>, tokio::time::error::Elapsed>,
    ) -> Result<R, InvokeError> {
        lease.store.data().flush_output();
        let reused = lease.reused();
        let spent = lease.store.data().time_spent(self.limits.timeout);
        let spent_lease = if matches!(result, Ok(Ok(_))) { module.warm.give_back(lease) } else { Some(lease) };
        // Other invocations running: no idle time for the work to hide in,
        // and the next delivery may already be waiting for this worker.
        if self.in_flight.load(Ordering::Acquire) > 1 {
            drop(spent_lease);
        } else {
            self.ahead.after(spent_lease, || self.refill(module));
        }
        let outcome = self.settle(&module.info, "handle", result, spent);
        if let Err(InvokeError { kind: FailureKind::ResourceLimit { resource: Resource::Pool, .. }, .. }) = &outcome {
            // Idle instances hold slots; give them up so the redelivery fits.
            let freed = self.warm.clear_all();
            if freed > 0 {
                tracing::info!(freed, "pool full: dropped idle instances");
            }
        } else if reused && outcome.is_err() {
            tracing::debug!(module = %module.info.label(), "a reused instance failed; it is dropped");
        }
        outcome
    }

    fn settle<R>(
        &self,
        info: &ModuleInfo,
        function: &'static str,
        result: Result<Result<R, Phase>, tokio::time::error::Elapsed>,
        spent: TimeSpent,
    ) -> Result<R, InvokeError> {
        let kind = match result {
            Ok(Ok(value)) => return Ok(value),
            // The outer timer fires when the guest waits in a host call:
            // wasm is not running, so the epoch cannot interrupt it.
            Err(_) => FailureKind::Timeout(spent),
            Ok(Err(phase)) => classify(phase, spent),
        };
        let error = InvokeError { module: info.label().to_string(), function, kind };
        tracing::warn!(%error, "invocation failed");
        Err(error)
    }
}

/// One invocation counted in [`Runtime::admit`], counted out when dropped.
struct Running<'a>(&'a AtomicU32);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Where an invocation failed.
enum Phase {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
}

fn classify(phase: Phase, spent: TimeSpent) -> FailureKind {
    let (error, instantiating) = match phase {
        Phase::Instantiate(e) => (e, true),
        Phase::Call(e) => (e, false),
    };
    if let Some(limit) = error.downcast_ref::<LimitExceeded>() {
        return FailureKind::ResourceLimit { resource: limit.resource, detail: limit.to_string() };
    }
    if let Some(pool) = error.downcast_ref::<wasmtime::PoolConcurrencyLimitError>() {
        return FailureKind::ResourceLimit { resource: Resource::Pool, detail: pool.to_string() };
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => return FailureKind::Timeout(spent),
        Some(Trap::StackOverflow) => {
            return FailureKind::ResourceLimit { resource: Resource::Stack, detail: "call stack exhausted".into() };
        }
        _ => {}
    }
    if instantiating { FailureKind::Instantiate(format!("{error:#}")) } else { FailureKind::Trap(trap_message(&error)) }
}

/// The trap's cause plus the innermost guest frame, without the full backtrace.
fn trap_message(error: &wasmtime::Error) -> String {
    let cause = error.root_cause().to_string();
    let frame = error.downcast_ref::<wasmtime::WasmBacktrace>().and_then(|bt| bt.frames().first());
    match frame.and_then(|f| f.func_name()) {
        Some(func) => format!("{cause} (in {func})"),
        None => cause,
    }
}

/// Why an invocation did not produce the guest's answer.
#[derive(Debug, thiserror::Error)]
#[error("{module} `{function}`: {kind}")]
pub struct InvokeError {
    /// The module's label (`name@version+hash`).
    pub module: String,
    pub function: &'static str,
    pub kind: FailureKind,
}

/// The classes of failure a caller maps to retry, reject or an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum FailureKind {
    /// The guest trapped: a panic, `unreachable`, an out-of-bounds access.
    #[error("trapped: {0}")]
    Trap(String),
    /// The invocation ran past its wall-time limit and was interrupted.
    #[error("interrupted: {0}")]
    Timeout(TimeSpent),
    /// The guest hit a memory, table, stack or instance limit, or the host is
    /// at its concurrency limit.
    #[error("{resource} limit reached: {detail}")]
    ResourceLimit { resource: Resource, detail: String },
    /// The module could not be instantiated.
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
}

/// Where a timed-out invocation's time went: guest code, or waiting on the
/// host (a send to a sidecar that does not answer is not the guest's fault).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimeSpent {
    pub limit: Duration,
    /// Time in host calls (sends), the running one included.
    pub in_host_calls: Duration,
    /// The host call it was waiting in when the time ran out, if any.
    pub waiting_on: Option<String>,
}

impl TimeSpent {
    /// Whether the host, not the guest's own code, took the time: it ran out
    /// during a host call, or host calls took most of it (a send that
    /// returned just before the deadline the guest then met).
    pub fn in_host_call(&self) -> bool {
        self.waiting_on.is_some() || self.in_host_calls * 2 >= self.limit
    }
}

impl std::fmt::Display for TimeSpent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let host = self.in_host_calls.as_secs_f64();
        match &self.waiting_on {
            Some(call) => {
                write!(
                    f,
                    "the {:?} time limit ran out waiting on the host in {call} ({host:.2} s in host calls)",
                    self.limit
                )
            }
            None if self.in_host_call() => write!(
                f,
                "the {:?} time limit ran out, {host:.2} s of it waiting on the host in host calls",
                self.limit
            ),
            None if host > 0.0 => {
                write!(f, "the {:?} time limit ran out in guest code ({host:.2} s of it in host calls)", self.limit)
            }
            None => write!(f, "the {:?} time limit ran out in guest code", self.limit),
        }
    }
}

/// Invocations counted by [`Origin`].
#[derive(Default)]
struct Origins {
    reused: AtomicU64,
    prepared: AtomicU64,
    inline: AtomicU64,
}

fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    let spawned = std::thread::Builder::new().name("wasm-epoch".into()).spawn(move || {
        loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => break,
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the epoch ticker; guest time limits will not be enforced");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spent(host_ms: u64, waiting_on: Option<&str>) -> TimeSpent {
        TimeSpent {
            limit: Duration::from_secs(5),
            in_host_calls: Duration::from_millis(host_ms),
            waiting_on: waiting_on.map(str::to_string),
        }
    }

    #[test]
    fn a_deadline_met_after_a_long_host_call_is_the_hosts() {
        // A send that returned at 5.04 s, and the guest's next instruction met the deadline.
        let late = spent(5_040, None);
        assert!(late.in_host_call());
        assert!(late.to_string().contains("5.04 s of it waiting on the host"), "{late}");
        assert!(spent(10, Some("outbound.send")).in_host_call());
        let busy_guest = spent(1_000, None);
        assert!(!busy_guest.in_host_call());
        assert!(busy_guest.to_string().contains("in guest code"), "{busy_guest}");
    }
}
