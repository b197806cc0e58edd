//! The links of a session, as this endpoint sees them.
//!
//! A client's sender link to a queue is a [`Kind::Inbound`] link here; its
//! receiver link from a queue (or dead-letter queue) is [`Kind::Outbound`].
//! Links to `$cbs` and `$management` come in pairs: the client's sender
//! carries requests ([`Kind::Requests`]), its receiver gets the replies
//! ([`Kind::Replies`]).

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::Notify;

use super::entities::Node;
use crate::queue::{ReceiveMode, SubQueue};

/// One attached link.
pub struct Link {
    /// Unique within the process: events name it, so an event for a link
    /// that has since been detached (and its handle reused) is recognised.
    pub id: u64,
    pub name: String,
    pub kind: Kind,
}

pub enum Kind {
    /// Messages from the client into `queue`.
    Inbound { queue: String, intake: Intake },
    /// Messages from `queue` (or its dead-letter queue) to the client.
    Outbound(Outbound),
    /// Requests to `$cbs` or a management node.
    Requests { node: Node, intake: Intake },
    /// Replies from `$cbs` or a management node, sent as credit allows.
    Replies(Replies),
}

/// The receiving side of a link the client sends on.
pub struct Intake {
    /// What the client may still send.
    pub credit: u32,
    /// The client's delivery-count as we know it: its initial count plus
    /// what arrived. Our flows must carry it, or the credit we grant is
    /// read against the wrong base.
    pub delivery_count: u32,
    pub partial: Option<Partial>,
}

impl Intake {
    pub fn new(initial_delivery_count: u32, credit: u32) -> Intake {
        Intake { credit, delivery_count: initial_delivery_count, partial: None }
    }

    /// Counts one whole delivery; says whether credit should be topped up
    /// to `full` (it fell below half).
    pub fn arrived(&mut self, full: u32) -> bool {
        self.credit = self.credit.saturating_sub(1);
        self.delivery_count = self.delivery_count.wrapping_add(1);
        if self.credit < full / 2 {
            self.credit = full;
            return true;
        }
        false
    }
}

/// The sending side of a link that carries messages to the client.
pub struct Outbound {
    pub queue: String,
    pub sub: SubQueue,
    pub mode: ReceiveMode,
    pub credit: u32,
    /// Deliveries sent on this link (the AMQP delivery-count).
    pub delivery_count: u32,
    /// A drain was asked for: use up the credit, then say so.
    pub draining: bool,
    pub fetch: Option<Fetch>,
}

/// A running receive from the queue for an outbound link.
pub struct Fetch {
    /// Wakes a waiting fetch to try once more and report, even empty-handed.
    pub poke: Arc<Notify>,
    /// Tells the fetch its link is gone (on drop): it ends when it next
    /// waits, not in the middle of a receive.
    pub stop: Arc<Notify>,
}

/// The reply side of a request/response pair.
pub struct Replies {
    pub node: Node,
    /// The client's target address: the reply-to its requests name.
    pub address: Option<String>,
    pub credit: u32,
    pub delivery_count: u32,
    /// Replies waiting for credit.
    pub waiting: VecDeque<Vec<u8>>,
}

/// A delivery arriving in several frames.
pub struct Partial {
    pub delivery_id: u32,
    pub format: u32,
    /// Sent pre-settled: nothing to answer.
    pub settled: bool,
    pub payload: Vec<u8>,
    /// More arrived than a message may hold; the rest is dropped and the
    /// delivery refused when it ends.
    pub too_large: bool,
}

impl Partial {
    /// Adds a frame's bytes, up to `limit` in all.
    pub fn extend(&mut self, bytes: &[u8], limit: usize) {
        if self.payload.len() + bytes.len() > limit {
            self.too_large = true;
            self.payload.clear();
        }
        if !self.too_large {
            self.payload.extend_from_slice(bytes);
        }
    }
}

impl Link {
    /// The outbound state, if this is an outbound link.
    pub fn outbound(&mut self) -> Option<&mut Outbound> {
        match &mut self.kind {
            Kind::Outbound(outbound) => Some(outbound),
            _ => None,
        }
    }
}

/// Credit a sender has from a receiver's flow: what the receiver allows
/// beyond what the sender has sent (serial-number arithmetic, RFC 1982).
pub fn credit_from_flow(their_delivery_count: Option<u32>, link_credit: u32, our_delivery_count: u32) -> u32 {
    // Before its first flow a receiver counts from our initial count (0).
    let theirs = their_delivery_count.unwrap_or(0);
    let limit = theirs.wrapping_add(link_credit);
    // The signed distance from our count to the limit.
    let ahead = limit.wrapping_sub(our_delivery_count) as i32;
    u32::try_from(ahead).unwrap_or(0).min(link_credit)
}

impl Drop for Fetch {
    fn drop(&mut self) {
        // A permit: the fetch stops even if it is not waiting yet.
        self.stop.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::credit_from_flow;

    #[test]
    fn credit_counts_what_was_sent_since_the_flow() {
        assert_eq!(credit_from_flow(Some(0), 10, 0), 10);
        assert_eq!(credit_from_flow(Some(0), 10, 4), 6, "4 sent since the receiver's count");
        assert_eq!(credit_from_flow(Some(4), 10, 4), 10);
        assert_eq!(credit_from_flow(Some(u32::MAX), 2, 0), 1, "counts wrap");
        assert_eq!(credit_from_flow(None, 5, 0), 5);
        assert_eq!(credit_from_flow(Some(0), 10, 12), 0, "never negative");
    }
}
