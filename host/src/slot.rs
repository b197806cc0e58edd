//! The live version of a module, swapped by the reloader.

use std::sync::Arc;

use arc_swap::ArcSwapOption;

/// The live version of a module, or none while no file has loaded (a host
/// started with a module it refuses stays up, unready, until one loads).
/// Swapped atomically by the reloader; invocations that already hold the
/// old version finish on it.
pub struct Slot<M> {
    current: ArcSwapOption<M>,
}

impl<M> Slot<M> {
    pub fn new(module: M) -> Self {
        Slot { current: ArcSwapOption::from_pointee(module) }
    }

    /// A slot with no module yet.
    pub fn empty() -> Self {
        Slot { current: ArcSwapOption::empty() }
    }

    /// The version new invocations use.
    pub fn current(&self) -> Option<Arc<M>> {
        self.current.load_full()
    }

    /// Makes `module` the live version.
    pub fn replace(&self, module: M) {
        self.current.store(Some(Arc::new(module)));
    }
}
