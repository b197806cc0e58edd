//! Counters the host keeps, rendered as Prometheus text at `/metrics`.
//!
//! Plain atomics: the set is small and fixed, and a registry crate would add
//! more than it saves.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::runtime::FailureKind;
use crate::settlement::Settlement;

/// A value kept elsewhere (the instance pool, a source), read when
/// `/metrics` is asked for; its kind says how Prometheus should treat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reading {
    name: &'static str,
    help: &'static str,
    value: u64,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
}

impl Reading {
    /// A count that only goes up; its name ends in `_total`.
    pub fn counter(name: &'static str, help: &'static str, value: u64) -> Self {
        debug_assert!(name.ends_with("_total"), "a counter's name ends in _total: {name}");
        Reading { name, help, value, kind: Kind::Counter }
    }

    /// A value that goes up and down.
    pub fn gauge(name: &'static str, help: &'static str, value: u64) -> Self {
        Reading { name, help, value, kind: Kind::Gauge }
    }

    /// The value of the reading named `name` (without `wasm_pc_`), if any.
    pub fn find(readings: &[Reading], name: &str) -> Option<u64> {
        readings.iter().find(|r| r.name == name).map(|r| r.value)
    }

    fn write(&self, out: &mut String) {
        let (name, help, value) = (self.name, self.help, self.value);
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(out, "# HELP wasm_pc_{name} {help}\n# TYPE wasm_pc_{name} {kind}\nwasm_pc_{name} {value}");
    }
}

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
    pub fn render(&self, modules: &[(&str, String)], readings: &[Reading]) -> String {
        let s = self.snapshot();
        let mut out = String::new();
        let counters = [
            Reading::counter("requests_total", "Requests handled by the producer.", s.requests),
            Reading::counter("messages_sent_total", "Messages guests sent through outbound.", s.sent),
            Reading::counter("messages_completed_total", "Deliveries acknowledged.", s.completed),
            Reading::counter("messages_abandoned_total", "Deliveries given back for retry.", s.abandoned),
            Reading::counter("messages_dead_lettered_total", "Deliveries dead-lettered.", s.dead_lettered),
            Reading::counter("guest_traps_total", "Invocations ended by a trap.", s.traps),
            Reading::counter("guest_timeouts_total", "Invocations ended by the time limit in guest code.", s.timeouts),
            Reading::counter(
                "host_call_timeouts_total",
                "Invocations ended by the time limit while waiting on the host (a send).",
                s.host_call_timeouts,
            ),
            Reading::counter("guest_limits_total", "Invocations ended by a resource limit.", s.limits),
            Reading::counter("locks_lost_total", "Settlements refused because the lock had expired.", s.locks_lost),
            Reading::counter("module_reloads_total", "Module versions that went live.", s.reloads),
            Reading::counter("module_reload_failures_total", "Module versions refused.", s.reload_failures),
        ];
        for reading in counters.iter().chain(readings.iter().filter(|r| r.kind == Kind::Counter)) {
            reading.write(&mut out);
        }
        let _ = writeln!(
            out,
            "# HELP wasm_pc_delivery_seconds Time from receipt to acknowledgement.\n# TYPE wasm_pc_delivery_seconds summary\n\
             wasm_pc_delivery_seconds_sum {:.6}\nwasm_pc_delivery_seconds_count {}",
            s.delivery_micros as f64 / 1e6,
            s.deliveries
        );
        let gauges = [
            Reading::gauge("in_flight", "Deliveries running now.", s.in_flight),
            Reading::gauge("in_flight_peak", "Most deliveries that ran at once.", s.in_flight_peak),
        ];
        for reading in gauges.iter().chain(readings.iter().filter(|r| r.kind == Kind::Gauge)) {
            reading.write(&mut out);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_are_rendered_as_their_kind() {
        let readings = [
            Reading::gauge("queue_active_messages", "Visible.", 7),
            Reading::counter("binding_probes_total", "Probes.", 2),
        ];
        let text = Metrics::default().render(&[("consumer", "c.wasm".into())], &readings);
        assert!(
            text.contains("# TYPE wasm_pc_queue_active_messages gauge\nwasm_pc_queue_active_messages 7\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE wasm_pc_binding_probes_total counter\nwasm_pc_binding_probes_total 2\n"),
            "{text}"
        );
        assert!(text.contains("wasm_pc_module_info{role=\"consumer\",module=\"c.wasm\"} 1"), "{text}");
        assert_eq!(Reading::find(&readings, "binding_probes_total"), Some(2));
        assert_eq!(Reading::find(&readings, "binding_probes"), None);
    }
}
