//! Counters the host keeps, rendered as Prometheus text at `/metrics`.
//!
//! Plain atomics: the set is small and fixed, and a registry crate would add
//! more than it saves.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::runtime::FailureKind;
use crate::settlement::Settlement;

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
    /// Invocations whose time ran out while the guest waited on the host
    /// (a send to a sidecar that did not answer), not in its own code.
    pub host_call_timeouts: AtomicU64,
    pub limits: AtomicU64,
    /// Settlements refused because the lock had expired.
    pub locks_lost: AtomicU64,
    /// Deliveries running now, and the most that ever ran at once.
    pub in_flight: AtomicU64,
    pub in_flight_peak: AtomicU64,
    /// Time deliveries took, from receipt to acknowledgement, in
    /// microseconds, and how many there were: a Prometheus summary's sum
    /// and count.
    pub delivery_micros: AtomicU64,
    pub deliveries: AtomicU64,
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
    pub host_call_timeouts: u64,
    pub limits: u64,
    pub locks_lost: u64,
    pub in_flight: u64,
    pub in_flight_peak: u64,
    pub deliveries: u64,
    pub delivery_micros: u64,
    pub reloads: u64,
    pub reload_failures: u64,
}

/// One delivery counted in flight; counted out when dropped, on every path
/// (a future dropped because its client went away included).
pub struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts a delivery in flight until the guard is dropped.
    pub fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.in_flight_peak.fetch_max(now, Ordering::Relaxed);
        InFlight(self)
    }

    /// Counts a finished delivery: how it was settled, how long it took and,
    /// if the host ended it, why.
    pub fn delivered(&self, settlement: &Settlement, failure: Option<&FailureKind>, took: std::time::Duration) {
        self.record(settlement, failure);
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        self.delivery_micros.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Counts a settled delivery and, if the host ended it, why.
    pub fn record(&self, settlement: &Settlement, failure: Option<&FailureKind>) {
        let counter = match settlement {
            Settlement::Complete => &self.completed,
            Settlement::Abandon { .. } => &self.abandoned,
            Settlement::DeadLetter { .. } => &self.dead_lettered,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(kind) = failure {
            self.record_failure(kind);
        }
    }

    /// Counts an invocation the host ended (a consumer's or a producer's), by why.
    pub fn record_failure(&self, kind: &FailureKind) {
        let counter = match kind {
            FailureKind::Trap(_) | FailureKind::Instantiate(_) => &self.traps,
            FailureKind::Timeout(spent) if spent.in_host_call() => &self.host_call_timeouts,
            FailureKind::Timeout(_) => &self.timeouts,
            FailureKind::ResourceLimit { .. } => &self.limits,
        };
        counter.fetch_add(1, Ordering::Relaxed);
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
            host_call_timeouts: get(&self.host_call_timeouts),
            limits: get(&self.limits),
            locks_lost: get(&self.locks_lost),
            in_flight: get(&self.in_flight),
            in_flight_peak: get(&self.in_flight_peak),
            deliveries: get(&self.deliveries),
            delivery_micros: get(&self.delivery_micros),
            reloads: get(&self.reloads),
            reload_failures: get(&self.reload_failures),
        }
    }

    /// Prometheus text exposition; `modules` are `(role, label)` pairs shown
    /// as an info metric so dashboards see which version is live.
    pub fn render(
        &self,
        modules: &[(&str, String)],
        extra_counters: &[(&str, &str, u64)],
        extra: &[(&str, &str, u64)],
    ) -> String {
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
        counter("guest_timeouts_total", "Invocations ended by the time limit in guest code.", s.timeouts);
        counter(
            "host_call_timeouts_total",
            "Invocations ended by the time limit while waiting on the host (a send).",
            s.host_call_timeouts,
        );
        counter("guest_limits_total", "Invocations ended by a resource limit.", s.limits);
        counter("locks_lost_total", "Settlements refused because the lock had expired.", s.locks_lost);
        counter("module_reloads_total", "Module versions that went live.", s.reloads);
        counter("module_reload_failures_total", "Module versions refused.", s.reload_failures);
        for (name, help, value) in extra_counters {
            counter(name, help, *value);
        }
        let _ = writeln!(
            out,
            "# HELP wasm_pc_delivery_seconds Time from receipt to acknowledgement.\n# TYPE wasm_pc_delivery_seconds summary\n\
             wasm_pc_delivery_seconds_sum {:.6}\nwasm_pc_delivery_seconds_count {}",
            s.delivery_micros as f64 / 1e6,
            s.deliveries
        );
        let gauges = [
            ("in_flight", "Deliveries running now.", s.in_flight),
            ("in_flight_peak", "Most deliveries that ran at once.", s.in_flight_peak),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP wasm_pc_{name} {help}\n# TYPE wasm_pc_{name} gauge\nwasm_pc_{name} {value}");
        }
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
