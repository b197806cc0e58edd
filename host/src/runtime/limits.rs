//! Per-invocation limits and the store limiter that enforces them.
//!
//! | limit | default | why |
//! |---|---|---|
//! | wall time | 5 s | a consumer that hangs holds a Service Bus lock and a worker |
//! | linear memory | 64 MiB | a guest's heap; the pooling allocator reserves this per slot |
//! | table elements | 20,000 | function tables of large guests fit; runaway growth does not |
//! | instances | 20 core instances per component | a Rust component needs ~5 |
//! | wasm stack | 512 KiB | unbounded recursion ends as a classified stack overflow |
//! | concurrent instances | 1,000 | the pool's size; 1,000 messages in flight per host |

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
    /// Most invocations that may run at once on one runtime (pool slots).
    pub max_concurrent: u32,
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
