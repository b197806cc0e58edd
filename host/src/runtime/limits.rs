//! Per-invocation limits and the store limiter that enforces them.
//!
//! | limit | default | why |
//! |---|---|---|
//! | wall time | 5 s | a consumer that hangs holds a Service Bus lock and a worker |
//! | linear memory | 64 MiB | a guest's heap; the pooling allocator reserves this per slot |
//! | table elements | 20,000 | function tables of large guests fit; runaway growth does not |
//! | instances | 20 core instances per component | a Rust component needs ~5 |
//! | wasm stack | 512 KiB | unbounded recursion ends as a classified stack overflow |
//! | concurrent instances | 1,000 | 1,000 messages in flight per host; the pool has this many slots plus a few for instances prepared ahead |

use std::time::Duration;

use wasmtime::ResourceLimiter;

/// Limits applied to every invocation. Cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest an invocation may run, host calls included.
    pub timeout: Duration,
    /// Largest a linear memory may grow, in bytes.
    pub max_memory_bytes: usize,
    /// Largest a table may grow, in elements.
    pub max_table_elements: usize,
    /// Most core instances one component may create.
    pub max_instances: usize,
    /// Deepest the wasm stack may get, in bytes.
    pub max_stack_bytes: usize,
    /// Most invocations that may run at once on one runtime (the pool has
    /// this many slots, plus headroom for instances prepared ahead).
    pub max_concurrent: u32,
    /// Most memory the pool's idle slots may keep resident, all together:
    /// each instance slot's share of it goes three quarters to its linear
    /// memory and a sixteenth to each of its four table slots, so that a
    /// burst cannot leave more behind.
    pub pool_resident_bytes: usize,
}

impl Limits {
    /// What one idle pool slot keeps of a guest's linear memory: three
    /// quarters of its share of the budget, in whole wasm pages, from 64 KiB
    /// to 3 MiB.
    pub fn keep_resident_per_slot(&self) -> usize {
        const PAGE: usize = 64 << 10;
        (self.share_per_slot() / 4 * 3 / PAGE * PAGE).clamp(PAGE, 3 << 20)
    }

    /// What one idle table slot (four per instance slot) keeps: a sixteenth
    /// of the instance slot's share, in whole host pages, from 4 KiB to
    /// 256 KiB (a table at the 20,000-element limit is about 156 KiB).
    pub fn table_keep_resident(&self) -> usize {
        const PAGE: usize = 4 << 10;
        (self.share_per_slot() / 16 / PAGE * PAGE).clamp(PAGE, 256 << 10)
    }

    fn share_per_slot(&self) -> usize {
        let slots = usize::try_from(self.max_concurrent.max(1)).unwrap_or(usize::MAX);
        self.pool_resident_bytes / slots
    }

    /// How many freed slots may wait for their memory past the window to
    /// be returned together (one madvise pass for the batch): as many as
    /// the budget covers at the largest memory, from 1 to 32.
    pub fn decommit_batch(&self) -> usize {
        (self.pool_resident_bytes / self.max_memory_bytes.max(1)).clamp(1, 32)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(5),
            max_memory_bytes: 64 << 20,
            max_table_elements: 20_000,
            max_instances: 20,
            max_stack_bytes: 512 << 10,
            max_concurrent: 1_000,
            pool_resident_bytes: 512 << 20,
        }
    }
}

/// Which limit stopped a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Memory,
    Table,
    Instances,
    Stack,
    /// Every pool slot is in use: the host is at its concurrency limit.
    Pool,
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Resource::Memory => "linear memory",
            Resource::Table => "table",
            Resource::Instances => "instance",
            Resource::Stack => "stack",
            Resource::Pool => "concurrent instance",
        })
    }
}

/// The error a refused growth traps with, so the invoker can classify it.
#[derive(Debug, thiserror::Error)]
#[error("{resource} limit exceeded: wanted {desired}, limit {limit}")]
pub struct LimitExceeded {
    pub resource: Resource,
    pub desired: usize,
    pub limit: usize,
}

/// Enforces [`Limits`] for one store. A refused growth traps at once, with a
/// [`LimitExceeded`], instead of handing the guest a failed `memory.grow`:
/// the guest would abort anyway, and this way the cause is precise.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        Limiter { limits }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limits.max_memory_bytes {
            return Err(
                LimitExceeded { resource: Resource::Memory, desired, limit: self.limits.max_memory_bytes }.into()
            );
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limits.max_table_elements {
            return Err(
                LimitExceeded { resource: Resource::Table, desired, limit: self.limits.max_table_elements }.into()
            );
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.limits.max_instances
    }

    fn memories(&self) -> usize {
        self.limits.max_instances
    }

    fn tables(&self) -> usize {
        self.limits.max_instances * 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resident_budget_is_shared_out_and_bounds_what_waits_for_decommit() {
        let limits = |slots, budget_mib: usize, memory_mib: usize| Limits {
            max_concurrent: slots,
            pool_resident_bytes: budget_mib << 20,
            max_memory_bytes: memory_mib << 20,
            ..Limits::default()
        };
        // Defaults: 1,000 slots share 512 MiB, 384 KiB of memory and 32 KiB
        // of each of four tables each.
        assert_eq!(Limits::default().keep_resident_per_slot(), 384 << 10);
        assert_eq!(Limits::default().table_keep_resident(), 32 << 10);
        assert_eq!(Limits::default().decommit_batch(), 8);
        // Few slots get the most a slot keeps; many, a page each.
        assert_eq!(limits(16, 512, 64).keep_resident_per_slot(), 3 << 20);
        assert_eq!(limits(16, 512, 64).table_keep_resident(), 256 << 10);
        assert_eq!(limits(100_000, 512, 64).keep_resident_per_slot(), 64 << 10);
        assert_eq!(limits(100_000, 512, 64).table_keep_resident(), 4 << 10);
        // Whole pages only.
        assert_eq!(limits(3, 1, 64).keep_resident_per_slot() % (64 << 10), 0);
        // Large guests flush alone; small ones batch up to 32.
        assert_eq!(limits(1000, 512, 4096).decommit_batch(), 1);
        assert_eq!(limits(1000, 512, 1).decommit_batch(), 32);
        // Memory and tables that idle slots keep, plus what waits for
        // decommit, stay within twice the budget, whatever the guests do.
        for (slots, budget, memory) in [(1000, 512, 64), (16, 512, 64), (1000, 64, 512), (8, 1024, 16)] {
            let l = limits(slots, budget, memory);
            let per_slot = l.keep_resident_per_slot() + 4 * l.table_keep_resident();
            let kept = usize::try_from(slots).unwrap() * per_slot;
            let waiting = l.decommit_batch() * (memory << 20);
            // Tables included; the floor of a page each when the budget is tiny.
            let floor = usize::try_from(slots).unwrap() * ((64 << 10) + 4 * (4 << 10));
            assert!(kept <= (budget << 20).max(floor), "{slots} {budget} {memory}");
            assert!(waiting <= (budget << 20).max(memory << 20), "{slots} {budget} {memory}");
        }
    }
}
