//! The delivery-attempt estimate a guest sees as `delivery-count`.
//!
//! The Service Bus binding does not pass DeliveryCount on, so the host counts
//! failed deliveries per message id itself: the estimate is one more than the
//! failures this process has seen. Another replica's attempts are unknown, so
//! it is a lower bound. Only failures are stored: the common case (delivered
//! once, succeeded) costs a lookup in a small map and nothing else. Bounded:
//! past `capacity` ids, the one that failed longest ago is forgotten.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Failed deliveries by message id, bounded.
pub(super) struct Attempts {
    capacity: usize,
    inner: Mutex<Failures>,
}

#[derive(Default)]
struct Failures {
    /// Failures so far and the stamp of the latest, by id.
    counts: HashMap<String, (u32, u64)>,
    /// `(stamp, id)` oldest first. An entry whose stamp no longer matches
    /// `counts` is stale and skipped; stale entries are compacted away.
    order: VecDeque<(u64, String)>,
    next_stamp: u64,
}

impl Attempts {
    pub fn new(capacity: usize) -> Self {
        Attempts { capacity: capacity.max(1), inner: Mutex::new(Failures::default()) }
    }

    /// The attempt this delivery of `id` probably is, counting from 1.
    pub fn estimate(&self, id: &str) -> u32 {
        let Ok(failures) = self.inner.lock() else {
            return 1;
        };
        failures.counts.get(id).map_or(1, |(n, _)| n.saturating_add(1))
    }

    /// Records that a delivery of `id` was not acknowledged.
    pub fn failed(&self, id: &str) {
        if id.is_empty() {
            return; // nothing to key on
        }
        let Ok(mut guard) = self.inner.lock() else {
            return;
        };
        let failures = &mut *guard;
        let stamp = failures.next_stamp;
        failures.next_stamp += 1;
        let entry = failures.counts.entry(id.to_string()).or_insert((0, stamp));
        entry.0 = entry.0.saturating_add(1);
        entry.1 = stamp;
        failures.order.push_back((stamp, id.to_string()));
        while failures.counts.len() > self.capacity {
            let Some((stamp, oldest)) = failures.order.pop_front() else { break };
            if failures.counts.get(&oldest).is_some_and(|(_, s)| *s == stamp) {
                failures.counts.remove(&oldest);
            }
        }
        if failures.order.len() > 2 * self.capacity {
            let Failures { counts, order, .. } = failures;
            order.retain(|(stamp, id)| counts.get(id).is_some_and(|(_, s)| s == stamp));
        }
    }

    /// Forgets `id`: it was acknowledged (completed or dead-lettered).
    pub fn forget(&self, id: &str) {
        if let Ok(mut failures) = self.inner.lock() {
            // Its entry in `order` goes stale and is compacted later.
            failures.counts.remove(id);
        }
    }

    /// Ids remembered now, and entries in the age queue (for tests).
    #[cfg(test)]
    fn sizes(&self) -> (usize, usize) {
        self.inner.lock().map(|f| (f.counts.len(), f.order.len())).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_failures_and_forgets_acknowledged_ids() {
        let a = Attempts::new(10);
        assert_eq!(a.estimate("x"), 1);
        a.failed("x");
        a.failed("x");
        assert_eq!(a.estimate("x"), 3);
        assert_eq!(a.estimate("y"), 1, "ids are counted apart");
        a.forget("x");
        assert_eq!(a.estimate("x"), 1);
        a.failed("");
        assert_eq!(a.sizes().0, 0, "an empty id is not tracked");
    }

    #[test]
    fn the_oldest_failure_is_forgotten_first() {
        let a = Attempts::new(2);
        a.failed("x");
        a.failed("y");
        a.failed("x"); // x failed most recently now
        a.failed("z"); // evicts y
        assert_eq!((a.estimate("x"), a.estimate("y"), a.estimate("z")), (3, 1, 2));
    }

    #[test]
    fn memory_stays_bounded_however_many_messages_pass() {
        let a = Attempts::new(100);
        for i in 0..100_000 {
            let id = format!("m-{i}");
            a.failed(&id);
            if i % 3 != 0 {
                a.forget(&id);
            }
        }
        let (ids, queued) = a.sizes();
        assert!(ids <= 100, "{ids} ids remembered");
        assert!(queued <= 201, "{queued} entries in the age queue");
        assert_eq!(a.estimate("m-99999"), 2, "the latest failure is still known");
    }
}
