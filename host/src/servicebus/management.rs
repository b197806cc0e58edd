//! The `$management` operations a queue answers.
//!
//! | operation | body | reply |
//! |---|---|---|
//! | `com.microsoft:renew-lock` | `lock-tokens` | 200 `expirations`; 410 when a lock is gone |
//! | `com.microsoft:update-disposition` | `disposition-status`, `lock-tokens`, dead-letter reason and description | 200; 410 when a lock is gone |
//! | `com.microsoft:peek-message` | `from-sequence-number`, `message-count` | 200 `messages`; 204 when there are none |
//! | `com.microsoft:schedule-message` | `messages` (encoded, each with its scheduled time) | 200 `sequence-numbers` |
//! | `com.microsoft:cancel-scheduled-message` | `sequence-numbers` | 200 |
//! | `com.microsoft:receive-by-sequence-number` | `sequence-numbers`, `receiver-settle-mode` | 200 `messages` with their lock tokens; 404 when one is not deferred |
//!
//! Anything else is answered 404 (go-amqp treats an unknown status as a
//! broken connection and reconnects, but 404 as final).

use serde_amqp::Value;

use super::message::{self, Locked};
use super::request::{Request, Response};
use super::wire::{self, Amqp, ArrayOf};
use crate::queue::{Lock, QueueError, QueueHandle, Received, Settle, SubQueue};

const LOCK_LOST: &str = "com.microsoft:message-lock-lost";
/// The SDKs raise MessageNotFoundError for it.
const MESSAGE_NOT_FOUND: &str = "com.microsoft:message-not-found";

/// Most messages one peek or receive-by-sequence-number returns.
const MAX_BATCH: usize = 1_000;

/// Answers one management request for `queue` (or its dead-letter queue).
pub async fn handle(queue: &QueueHandle, name: &str, sub: SubQueue, request: &Request) -> Response {
    let operation = request.property("operation").unwrap_or_default();
    let outcome = match operation {
        "com.microsoft:renew-lock" => renew(queue, request).await,
        "com.microsoft:update-disposition" => update_disposition(queue, request).await,
        "com.microsoft:peek-message" => peek(queue, name, sub, request).await,
        "com.microsoft:schedule-message" => schedule(queue, name, request).await,
        "com.microsoft:cancel-scheduled-message" => cancel(queue, name, request).await,
        "com.microsoft:receive-by-sequence-number" => receive_deferred(queue, name, sub, request).await,
        other => {
            Err(Response::error(404, "amqp:not-implemented", format!("operation {other:?} is not supported here")))
        }
    };
    let response = outcome.unwrap_or_else(|response| response);
    tracing::debug!(queue = name, operation, status = response.status, "management request");
    response
}

fn bad_request(detail: impl Into<String>) -> Response {
    Response::error(400, "amqp:invalid-field", detail)
}

fn queue_error(error: QueueError) -> Response {
    match error {
        QueueError::LockLost { id } => {
            Response::error(410, LOCK_LOST, format!("the lock on message {id} was lost (expired or already settled)"))
        }
        // Settled (or purged) meanwhile: to the client, as on Service Bus,
        // its lock is lost.
        gone @ QueueError::Gone { .. } => Response::error(410, LOCK_LOST, gone.to_string()),
        other => Response::error(500, "amqp:internal-error", other.to_string()),
    }
}

fn locks(request: &Request) -> Result<Vec<Lock>, Response> {
    let tokens = request.field("lock-tokens").ok_or_else(|| bad_request("lock-tokens is missing"))?;
    wire::items(tokens)
        .iter()
        .map(|t| wire::uuid(t).map(Lock::from_token).ok_or_else(|| bad_request("lock-tokens holds a non-uuid")))
        .collect()
}

fn sequences(request: &Request) -> Result<Vec<i64>, Response> {
    let numbers = request.field("sequence-numbers").ok_or_else(|| bad_request("sequence-numbers is missing"))?;
    wire::items(numbers)
        .iter()
        .map(|n| wire::integer(n).ok_or_else(|| bad_request("sequence-numbers holds a non-integer")))
        .collect()
}

async fn renew(queue: &QueueHandle, request: &Request) -> Result<Response, Response> {
    let mut expirations = Vec::new();
    for lock in locks(request)? {
        expirations.push(Amqp::Timestamp(queue.renew(lock).await.map_err(queue_error)?));
    }
    let body = Amqp::Map(vec![(Amqp::string("expirations"), Amqp::Array(ArrayOf::Timestamp, expirations))]);
    Ok(Response::ok(Some(body)))
}

async fn update_disposition(queue: &QueueHandle, request: &Request) -> Result<Response, Response> {
    let text = |key| request.field(key).and_then(wire::text).map(str::to_string);
    let how = match text("disposition-status").as_deref() {
        Some("completed") => Settle::Complete,
        Some("abandoned") => {
            Settle::Abandon { delay: std::time::Duration::ZERO, reason: "abandoned by the client".into() }
        }
        // Service Bus spells it this way on the wire.
        Some("defered" | "deferred") => Settle::Defer,
        Some("suspended") => Settle::DeadLetter {
            reason: text("deadletter-reason").unwrap_or_default(),
            description: text("deadletter-description").unwrap_or_default(),
        },
        other => {
            return Err(bad_request(format!(
                "disposition-status {other:?} is not one of completed, abandoned, suspended, defered"
            )));
        }
    };
    for lock in locks(request)? {
        queue.settle(lock, how.clone()).await.map_err(queue_error)?;
    }
    Ok(Response::ok(None))
}

async fn peek(queue: &QueueHandle, name: &str, sub: SubQueue, request: &Request) -> Result<Response, Response> {
    let from = request.field("from-sequence-number").and_then(wire::integer).unwrap_or(1);
    let count = request.field("message-count").and_then(wire::integer).unwrap_or(1).clamp(1, MAX_BATCH as i64) as usize;
    let found = queue.peek(name, sub, from, count).await.map_err(queue_error)?;
    if found.is_empty() {
        return Ok(Response::status(204, "No messages"));
    }
    let messages = found
        .iter()
        .map(|m| Amqp::Map(vec![(Amqp::string("message"), Amqp::Binary(message::outgoing(m, None)))]))
        .collect();
    Ok(Response::ok(Some(Amqp::Map(vec![(Amqp::string("messages"), Amqp::List(messages))]))))
}

async fn schedule(queue: &QueueHandle, name: &str, request: &Request) -> Result<Response, Response> {
    let entries = request.field("messages").ok_or_else(|| bad_request("messages is missing"))?;
    let mut batch = Vec::new();
    for entry in wire::items(entries) {
        let Some(Value::Binary(bytes)) = wire::get(entry, "message") else {
            return Err(bad_request("a scheduled message has no encoded message"));
        };
        let mut decoded = message::incoming(bytes, 0).map_err(|e| bad_request(e.to_string()))?;
        batch.append(&mut decoded);
    }
    if batch.iter().any(|m| m.scheduled_at_ms.is_none()) {
        return Err(bad_request("a scheduled message has no x-opt-scheduled-enqueue-time"));
    }
    let sent = queue.send(name, batch).await.map_err(queue_error)?;
    let numbers = sent.iter().map(|s| Amqp::Long(s.sequence)).collect();
    Ok(Response::ok(Some(Amqp::Map(vec![(Amqp::string("sequence-numbers"), Amqp::Array(ArrayOf::Long, numbers))]))))
}

async fn cancel(queue: &QueueHandle, name: &str, request: &Request) -> Result<Response, Response> {
    queue.cancel_scheduled(name, sequences(request)?).await.map_err(queue_error)?;
    Ok(Response::ok(None))
}

/// Service Bus fails the whole receive when one sequence number names no
/// deferred message: give back the locks taken (they stay deferred) and say
/// which were missing.
async fn not_all_deferred(queue: &QueueHandle, received: Vec<Received>, asked: &[i64]) -> Response {
    let found: Vec<i64> = received.iter().map(|r| r.message.sequence).collect();
    for one in received {
        if let Err(error) = queue.settle(one.lock, Settle::Release).await {
            tracing::debug!(%error, "release failed; the lock will expire");
        }
    }
    let missing: Vec<String> = asked.iter().filter(|n| !found.contains(n)).map(i64::to_string).collect();
    let detail = format!("no deferred message with sequence number {}", missing.join(", "));
    Response::error(404, MESSAGE_NOT_FOUND, detail)
}

async fn receive_deferred(
    queue: &QueueHandle,
    name: &str,
    sub: SubQueue,
    request: &Request,
) -> Result<Response, Response> {
    let numbers = sequences(request)?;
    if numbers.len() > MAX_BATCH {
        return Err(bad_request(format!("at most {MAX_BATCH} sequence numbers at once")));
    }
    // 0 is receive-and-delete; anything else peek-lock.
    let delete = request.field("receiver-settle-mode").and_then(wire::integer) == Some(0);
    let received = queue.receive_deferred(name, sub, numbers.clone()).await.map_err(queue_error)?;
    if received.len() < numbers.len() {
        return Err(not_all_deferred(queue, received, &numbers).await);
    }
    let mut messages = Vec::new();
    for Received { lock, locked_until_ms, message: stored } in received {
        if delete {
            queue.settle(lock, Settle::Complete).await.map_err(queue_error)?;
            messages.push(Amqp::Map(vec![(Amqp::string("message"), Amqp::Binary(message::outgoing(&stored, None)))]));
        } else {
            let token = lock.token();
            let bytes = message::outgoing(&stored, Some(Locked { token, until_ms: locked_until_ms }));
            messages.push(Amqp::Map(vec![
                (Amqp::string("lock-token"), Amqp::Uuid(token)),
                (Amqp::string("message"), Amqp::Binary(bytes)),
            ]));
        }
    }
    Ok(Response::ok(Some(Amqp::Map(vec![(Amqp::string("messages"), Amqp::List(messages))]))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{NewMessage, QueueOptions, ReceiveMode, StoreOptions};

    fn request(operation: &str, body: Amqp) -> Request {
        let bytes: Vec<u8> = [
            Amqp::described(0x73, Amqp::List(vec![Amqp::string("m-1")])),
            Amqp::described(0x74, Amqp::Map(vec![(Amqp::string("operation"), Amqp::string(operation))])),
            Amqp::described(0x77, body),
        ]
        .iter()
        .flat_map(Amqp::to_bytes)
        .collect();
        Request::decode(&bytes).unwrap()
    }

    fn by_sequence(numbers: &[i64]) -> Request {
        let numbers = numbers.iter().map(|n| Amqp::Long(*n)).collect();
        let body = Amqp::Map(vec![
            (Amqp::string("sequence-numbers"), Amqp::Array(ArrayOf::Long, numbers)),
            (Amqp::string("receiver-settle-mode"), Amqp::Uint(1)),
        ]);
        request("com.microsoft:receive-by-sequence-number", body)
    }

    #[tokio::test]
    async fn settling_a_settled_message_is_a_lost_lock() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions::with_defaults(QueueOptions::default());
        let queue = QueueHandle::open(&dir.path().join("q.db"), options).unwrap();
        queue.send("q", vec![NewMessage::default()]).await.unwrap();
        let received = queue.receive_from("q", SubQueue::Active, 1, ReceiveMode::PeekLock).await.unwrap();
        let complete = || {
            let tokens = Amqp::Array(ArrayOf::Uuid, vec![Amqp::Uuid(received[0].lock.token())]);
            let body = Amqp::Map(vec![
                (Amqp::string("lock-tokens"), tokens),
                (Amqp::string("disposition-status"), Amqp::string("completed")),
            ]);
            request("com.microsoft:update-disposition", body)
        };
        assert_eq!(handle(&queue, "q", SubQueue::Active, &complete()).await.status, 200);
        // The SDKs raise MessageLockLostError for a 410, not a server error.
        let again = handle(&queue, "q", SubQueue::Active, &complete()).await;
        assert_eq!((again.status, again.condition.as_deref()), (410, Some(LOCK_LOST)));
    }

    #[tokio::test]
    async fn receive_by_sequence_number_fails_whole_when_one_is_not_deferred() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions::with_defaults(QueueOptions::default());
        let queue = QueueHandle::open(&dir.path().join("q.db"), options).unwrap();
        let sent = queue.send("q", vec![NewMessage::default(), NewMessage::default()]).await.unwrap();
        let (deferred, active) = (sent[0].sequence, sent[1].sequence);
        let received = queue.receive_from("q", SubQueue::Active, 1, ReceiveMode::PeekLock).await.unwrap();
        queue.settle(received[0].lock, Settle::Defer).await.unwrap();

        // As Service Bus: 404 message-not-found (the SDKs' MessageNotFoundError), not fewer messages.
        let refused = handle(&queue, "q", SubQueue::Active, &by_sequence(&[deferred, active])).await;
        assert_eq!((refused.status, refused.condition.as_deref()), (404, Some(MESSAGE_NOT_FOUND)));
        assert!(refused.description.contains(&active.to_string()), "{}", refused.description);

        // The deferred one was given back, still deferred, and not counted as a delivery.
        let granted = handle(&queue, "q", SubQueue::Active, &by_sequence(&[deferred])).await;
        assert_eq!(granted.status, 200);
        let peeked = queue.peek("q", SubQueue::Active, deferred, 1).await.unwrap();
        assert_eq!(peeked[0].delivery_count, 2, "one receive, one receive by sequence number");
    }
}
