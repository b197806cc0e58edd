//! In-process scaling with KEDA's arithmetic, for the embedded worker pool.
//!
//! KEDA activates a scaled object (0 → 1) when the queue length is above
//! `activationMessageCount`; from then on the HPA wants
//! `ceil(length / messageCount)` replicas, clamped to `[max(min, 1), max]`, and
//! KEDA returns to zero only after `cooldownPeriod` without activity. The
//! HPA's default scale-down stabilization keeps the highest recommendation of
//! a window; this pool uses the cooldown as that window.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The ScaledObject fields that matter here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleRule {
    /// `minReplicaCount` (workers).
    pub min: u32,
    /// `maxReplicaCount`.
    pub max: u32,
    /// `messageCount`: target queue length per worker.
    pub target: u64,
    /// `activationMessageCount`: active when the length is above this.
    pub activation: u64,
}

impl ScaleRule {
    /// The replica count KEDA and the HPA aim for at this queue length,
    /// ignoring time (cooldown and stabilization).
    pub fn desired(&self, length: u64, current: u32) -> u32 {
        let active = length > self.activation;
        if current == 0 && !active {
            return self.min;
        }
        let target = self.target.max(1);
        let wanted = length.div_ceil(target);
        let wanted = u32::try_from(wanted).unwrap_or(u32::MAX);
        wanted.clamp(self.min.max(1), self.max.max(1))
    }
}

/// Applies a [`ScaleRule`] over time.
#[derive(Debug)]
pub struct Autoscaler {
    rule: ScaleRule,
    cooldown: Duration,
    current: u32,
    last_active: Option<Instant>,
    /// Recent recommendations, for scale-down stabilization.
    recent: VecDeque<(Instant, u32)>,
}

impl Autoscaler {
    pub fn new(rule: ScaleRule, cooldown: Duration) -> Self {
        Autoscaler { rule, cooldown, current: rule.min, last_active: None, recent: VecDeque::new() }
    }

    pub fn current(&self) -> u32 {
        self.current
    }

    /// Feeds one observation of the queue length; returns the new size.
    pub fn observe(&mut self, length: u64, now: Instant) -> u32 {
        if length > self.rule.activation {
            self.last_active = Some(now);
        }
        let recommended = self.rule.desired(length, self.current);
        self.recent.push_back((now, recommended));
        while self.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > self.cooldown) {
            self.recent.pop_front();
        }
        let stabilized = self.recent.iter().map(|(_, r)| *r).max().unwrap_or(recommended);
        let mut next = if recommended >= self.current { recommended } else { stabilized.min(self.current) };
        let idle_long_enough = self.last_active.is_none_or(|t| now.duration_since(t) >= self.cooldown);
        if self.rule.min == 0 && length <= self.rule.activation && idle_long_enough {
            next = 0;
        }
        self.current = next;
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: ScaleRule = ScaleRule { min: 0, max: 8, target: 5, activation: 0 };

    #[test]
    fn follows_keda_arithmetic() {
        // KEDA's documented example: 20 messages, target 5 → 4 replicas.
        assert_eq!(RULE.desired(20, 1), 4);
        assert_eq!(RULE.desired(21, 1), 5);
        assert_eq!(RULE.desired(1_000, 1), 8, "clamped to max");
        assert_eq!(RULE.desired(1, 0), 1, "activation from zero");
        assert_eq!(RULE.desired(0, 0), 0, "stays at zero");
        assert_eq!(RULE.desired(0, 3), 1, "the HPA never asks for zero");
        let lazy = ScaleRule { activation: 10, ..RULE };
        assert_eq!(lazy.desired(10, 0), 0, "activation is strictly greater than");
        assert_eq!(lazy.desired(11, 0), 3);
    }

    #[test]
    fn scales_up_at_once_and_down_after_the_cooldown() {
        let t0 = Instant::now();
        let cooldown = Duration::from_secs(10);
        let mut scaler = Autoscaler::new(RULE, cooldown);
        assert_eq!(scaler.observe(40, t0), 8);
        assert_eq!(scaler.observe(5, t0 + Duration::from_secs(1)), 8, "stabilized");
        assert_eq!(scaler.observe(5, t0 + Duration::from_secs(12)), 1);
        assert_eq!(scaler.observe(0, t0 + Duration::from_secs(13)), 1, "not idle long enough");
        assert_eq!(scaler.observe(0, t0 + Duration::from_secs(23)), 0, "back to zero after the cooldown");
        assert_eq!(scaler.observe(3, t0 + Duration::from_secs(24)), 1, "activates again");
    }
}
