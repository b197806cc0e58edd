//! A panic's text, handed on once.

use core::fmt::{Display, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::line::Line;

/// Reports a panic once: a panic while reporting (in the report itself, or
/// in the message's own formatting) is not reported again, so the panic
/// handler goes on to trap instead of recursing until the stack runs out.
pub struct PanicReport {
    reporting: AtomicBool,
}

/// The longest report; the rest of a message is cut.
const REPORT_BYTES: usize = 1024;

impl PanicReport {
    pub const fn new() -> Self {
        PanicReport { reporting: AtomicBool::new(false) }
    }

    /// Formats `panic` (a `PanicInfo`: "panicked at file:line:column:" and
    /// the message) without the heap, which may be what ran out, and hands
    /// the text to `report`, unless this is a panic inside a report.
    pub fn report(&self, panic: &dyn Display, report: impl FnOnce(&str)) {
        if self.reporting.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut line = Line::<REPORT_BYTES>::new();
        // `Line` drops what does not fit instead of failing.
        let _ = write!(line, "{panic}");
        report(line.as_str());
    }
}

impl Default for PanicReport {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use core::cell::RefCell;

    use super::{PanicReport, REPORT_BYTES};

    #[test]
    fn a_panic_is_reported_once_and_cut_to_fit() {
        let reports = PanicReport::new();
        let seen = RefCell::new([0usize; 2]);
        let long = "x".repeat(REPORT_BYTES * 2);
        reports.report(&format_args!("panicked at a.rs:1:2:\n{long}"), |line| {
            assert!(line.starts_with("panicked at a.rs:1:2:\nxx"), "{line}");
            seen.borrow_mut()[0] = line.len();
            // A panic while reporting comes back here; it is not reported.
            reports.report(&format_args!("again"), |_| seen.borrow_mut()[1] += 1);
        });
        assert_eq!(*seen.borrow(), [REPORT_BYTES, 0]);
    }
}
