//! Counters the host keeps, rendered as Prometheus text at `/metrics`.
//!
//! Plain atomics: the set is small and fixed, and a registry crate would add
//! more than it saves.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::dispatch::Settlement;
use crate::runtime::FailureKind;

/// Process-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Requests handled by the producer (any status).
    pub requests: AtomicU64,
    /// Messages the guests sent through `outbound`.
    pub sent: AtomicU64,
    pub completed: AtomicU64,
    pub abandoned: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Invocations the host ended: trap, timeout, limit.
    pub traps: AtomicU64,
    pub timeouts: AtomicU64,
    pub limits: AtomicU64,
    /// Settlements refused because the lock had expired.
    pub locks_lost: AtomicU64,
    /// Deliveries running now.
    pub in_flight: AtomicU64,
    /// Module reloads that went live, and those refused.
    pub reloads: AtomicU64,
    pub reload_failures: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    pub requests: u64,
    pub sent: u64,
    pub completed: u64,
    pub abandoned: u64,
    pub dead_lettered: u64,
    pub traps: u64,
    pub timeouts: u64,
    pub limits: u64,
    pub locks_lost: u64,
    pub in_flight: u64,
    pub reloads: u64,
    pub reload_failures: u64,
}

impl Metrics {
    /// Counts a settled delivery and, if the host ended it, why.
    pub fn record(&self, settlement: &Settlement, failure: Option<&FailureKind>) {
        let counter = match settlement {
            Settlement::Complete => &self.completed,
            Settlement::Abandon { .. } => &self.abandoned,
            Settlement::DeadLetter { .. } => &self.dead_lettered,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(kind) = failure {
            let counter = match kind {
                FailureKind::Trap(_) | FailureKind::Instantiate(_) => &self.traps,
                FailureKind::Timeout(_) => &self.timeouts,
                FailureKind::ResourceLimit { .. } => &self.limits,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            requests: get(&self.requests),
            sent: get(&self.sent),
            completed: get(&self.completed),
            abandoned: get(&self.abandoned),
            dead_lettered: get(&self.dead_lettered),
            traps: get(&self.traps),
            timeouts: get(&self.timeouts),
            limits: get(&self.limits),
            locks_lost: get(&self.locks_lost),
            in_flight: get(&self.in_flight),
            reloads: get(&self.reloads),
            reload_failures: get(&self.reload_failures),
        }
    }

    /// Prometheus text exposition; `modules` are `(role, label)` pairs shown
    /// as an info metric so dashboards see which version is live.
    pub fn render(&self, modules: &[(&str, String)], extra: &[(&str, &str, u64)]) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ =
                writeln!(out, "# HELP wasm_pc_{name} {help}\n# TYPE wasm_pc_{name} counter\nwasm_pc_{name} {value}");
        };
        counter("requests_total", "Requests handled by the producer.", s.requests);
        counter("messages_sent_total", "Messages guests sent through outbound.", s.sent);
        counter("messages_completed_total", "Deliveries acknowledged.", s.completed);
        counter("messages_abandoned_total", "Deliveries given back for retry.", s.abandoned);
        counter("messages_dead_lettered_total", "Deliveries dead-lettered.", s.dead_lettered);
        counter("guest_traps_total", "Invocations ended by a trap.", s.traps);
        counter("guest_timeouts_total", "Invocations ended by the time limit.", s.timeouts);
        counter("guest_limits_total", "Invocations ended by a resource limit.", s.limits);
        counter("locks_lost_total", "Settlements refused because the lock had expired.", s.locks_lost);
        counter("module_reloads_total", "Module versions that went live.", s.reloads);
        counter("module_reload_failures_total", "Module versions refused.", s.reload_failures);
        let _ = writeln!(
            out,
            "# HELP wasm_pc_in_flight Deliveries running now.\n# TYPE wasm_pc_in_flight gauge\nwasm_pc_in_flight {}",
            s.in_flight
        );
        for (name, help, value) in extra {
            let _ = writeln!(out, "# HELP wasm_pc_{name} {help}\n# TYPE wasm_pc_{name} gauge\nwasm_pc_{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP wasm_pc_module_info The live module version per role.\n# TYPE wasm_pc_module_info gauge"
        );
        for (role, label) in modules {
            let _ = writeln!(
                out,
                "wasm_pc_module_info{{role=\"{role}\",module=\"{}\"}} 1",
                label.replace(['"', '\\', '\n'], "_")
            );
        }
        out
    }
}
