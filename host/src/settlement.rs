//! What becomes of a delivered message, whatever its source.

use crate::runtime::{ConsumeError, InvokeError};

/// What must happen to a delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// The consumer succeeded: acknowledge (complete) the message.
    Complete,
    /// A transient failure: give the message back for redelivery.
    Abandon { reason: String },
    /// Poison: dead-letter now, never retry.
    DeadLetter { reason: String },
}

impl Settlement {
    /// Maps an invocation outcome. Every failure the guest did not call
    /// poison is retried: a trap or timeout may be caused by this host (load,
    /// a bad deploy being rolled back) and redelivery is bounded by the max
    /// delivery count anyway.
    pub(crate) fn from_outcome(outcome: &Result<Result<(), ConsumeError>, InvokeError>) -> Settlement {
        match outcome {
            Ok(Ok(())) => Settlement::Complete,
            Ok(Err(ConsumeError::Retry(reason))) => {
                Settlement::Abandon { reason: format!("consumer asked to retry: {reason}") }
            }
            Ok(Err(ConsumeError::Reject(reason))) => {
                Settlement::DeadLetter { reason: format!("consumer rejected: {reason}") }
            }
            Err(error) => Settlement::Abandon { reason: error.to_string() },
        }
    }
}
