//! Entry points for the fuzz targets in `fuzz/` (`cargo xtask fuzz`), and
//! for the regression tests that replay what they found. They exist for
//! that only: nothing else in the host calls them.
//!
//! Each takes arbitrary bytes and must not panic or hang, whatever they
//! hold; where a decoder has a partner (an encoder, a re-encoding), the
//! round trip is checked too, with `assert!`. Inputs are cut up with
//! [`Input`], so that a fuzzer's mutations stay meaningful:
//!
//! | entry point | what it feeds |
//! |---|---|
//! | [`dapr_delivery`] | a binding delivery's headers and body ([`crate::dapr::codec::decode_delivery`]) |
//! | [`cloudevent`] | a pub/sub delivery's JSON ([`crate::dapr::cloudevent`]) |
//! | [`binding_response`] | daprd's answer to a failed output-binding or publish call |
//! | [`stored_row`] | odd values in the queue's `messages` rows, read back by peek, receive and settle |
//! | [`amqp_frame`] | bytes off a Service Bus AMQP connection, cut into frames |
//! | [`amqp_message`] | a transfer's payload as a message, and its delivery back |
//! | [`amqp_request`] | a `$cbs` / `$management` request, and put-token |

#![allow(clippy::panic, reason = "a fuzz entry point fails an input by panicking")]

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::BytesMut;
use hyper::StatusCode;
use rusqlite::types::Value as Sql;

use crate::dapr::{cloudevent, codec};
use crate::queue::{
    Database, MessageState, NewMessage, PurgeTarget, QueueOptions, Settle, StoreOptions, StoredMessage, SubQueue,
    now_ms,
};
use crate::servicebus::cbs::{self, Auth};
use crate::servicebus::frame::{self, Frame};
use crate::servicebus::message::{self, BATCH_FORMAT, Locked};
use crate::servicebus::request::{Request, Response};
use crate::servicebus::{SasKey, sas, wire};

/// A cursor over fuzz input: every read succeeds (with zeros, or less
/// than asked, once the input runs out).
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input(data)
    }

    pub fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().map(|(b, rest)| (*b, rest)).unwrap_or((0, &[]));
        self.0 = rest;
        first
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    /// A chunk whose length is the next byte.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = self.byte();
        self.bytes(usize::from(n))
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }

    pub fn u64(&mut self) -> u64 {
        let mut bytes = [0u8; 8];
        bytes.iter_mut().for_each(|b| *b = self.byte());
        u64::from_be_bytes(bytes)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

/// A binding delivery as text: `name:value` header lines, an empty line,
/// then the body (the empty line and body may be left out). Names are made
/// UTF-8 (hyper hands them over as such); values stay bytes.
///
/// Checks too that whatever [`codec::encode_data`] sends (the body from the
/// input, the first `content-type` value as its type) decodes back to the
/// same body, and that property escaping round trips.
pub fn dapr_delivery(data: &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&data[..at], &data[at + 2..]),
        None => (data, &[][..]),
    };
    let lines: Vec<(String, &[u8])> = head
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            let at = line.iter().position(|b| *b == b':').unwrap_or(line.len());
            (String::from_utf8_lossy(&line[..at]).into_owned(), line.get(at + 1..).unwrap_or_default())
        })
        .collect();
    let _ = codec::decode_delivery(lines.iter().map(|(k, v)| (k.as_str(), *v)), body);

    for (name, value) in &lines {
        let value = String::from_utf8_lossy(value);
        assert_eq!(codec::query_unescape(&codec::query_escape(name)), *name);
        assert_eq!(codec::query_unescape(&codec::query_escape(&value)), value);
    }

    // What a producer host sends through daprd comes back as it was sent.
    let content_type = lines.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type"));
    let content_type = content_type.map(|(_, v)| String::from_utf8_lossy(v).into_owned());
    let (value, extra) = codec::encode_data(body, content_type.as_deref());
    let sent = serde_json::to_vec(&value).unwrap_or_default();
    let headers: Vec<(String, Vec<u8>)> =
        extra.iter().map(|(k, v)| (codec::query_escape(k), codec::query_escape(v).into_bytes())).collect();
    let decoded = codec::decode_delivery(headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())), &sent);
    let decoded = match decoded {
        Ok(decoded) => decoded,
        Err(e) => panic!("encode_data's own output does not decode: {e}"),
    };
    assert_eq!(decoded.content_type, content_type);
    if extra.iter().any(|(k, _)| k == codec::ENCODING) {
        assert_eq!(decoded.body, body, "a base64 body comes back byte for byte");
    } else {
        let json = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).unwrap_or_default();
        let (back, sent) = (json(&decoded.body), json(body));
        assert!(same_json(&back, &sent), "a JSON body comes back as the same value: {back} for {sent}");
    }
}

/// JSON values equal but for the last bits of a float: serde_json (without
/// its `float_roundtrip` feature) may parse a float one unit in the last
/// place off, so one that is sent and read again may move by that much.
fn same_json(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y || (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs()),
            _ => false,
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// A pub/sub delivery: `data` as JSON text (anything else is skipped),
/// decoded as one event (with its `metadata` object, if any, as the
/// delivery's headers) and as a bulk delivery, entry by entry.
pub fn cloudevent(data: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let headers: Vec<(String, String)> = value
        .get("metadata")
        .and_then(serde_json::Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.to_ascii_lowercase(), v.as_str()?.to_string()))).collect())
        .unwrap_or_default();
    let _ = cloudevent::decode(&value, &[]);
    let _ = cloudevent::decode(&value, &headers);
    let Ok(entries) = cloudevent::bulk_entries(&value) else { return };
    let raw = value.get("entries").and_then(serde_json::Value::as_array).cloned().unwrap_or_default();
    for ((_, event, metadata), entry) in entries.iter().zip(&raw) {
        let decoded = cloudevent::decode(event, metadata);
        // A raw payload (base64 of the broker's bytes) always decodes.
        if let Some(bytes) =
            entry.get("event").and_then(serde_json::Value::as_str).and_then(|b| STANDARD.decode(b).ok())
        {
            match decoded {
                Ok(event) => assert_eq!(event.body, bytes),
                Err(e) => panic!("a raw bulk entry does not decode: {e}"),
            }
        }
    }
}

/// daprd's answer to a failed POST: two bytes of status (taken into
/// 100..=999, as HTTP has them), then the body.
pub fn binding_response(data: &[u8]) {
    let mut input = Input::new(data);
    let status = 100 + input.u16() % 900;
    let Ok(status) = StatusCode::from_u16(status) else { return };
    let error = crate::dapr::client::error_answer(status, input.rest(), "binding");
    let _ = error.to_string();
    match status {
        StatusCode::UNAUTHORIZED => assert!(matches!(error, crate::dapr::BindingError::Unauthorized(_))),
        StatusCode::BAD_REQUEST => assert!(matches!(error, crate::dapr::BindingError::Malformed { .. })),
        _ => {}
    }
    let _ = format!("{:?}", crate::runtime::outbound::SendError::from(error));
}

/// The queue's rows as the database may hold them after a crash, an older
/// or newer host, or a hand edit: up to three rows with odd values in any
/// column (NULL, extreme or random integers, reals, text that is not
/// UTF-8, blobs), then every read path: depth, peek, receive, each
/// delivery as AMQP, settle or renew, deferred receive, requeue, cancel,
/// purge, and now and then salvage.
///
/// One database per thread, emptied before each input.
pub fn stored_row(data: &[u8]) {
    let mut input = Input::new(data);
    STORE.with(|store| {
        let mut store = store.borrow_mut();
        if store.is_none() {
            *store = Store::open();
        }
        if let Some(store) = store.as_mut() {
            store.run(&mut input);
        }
    });
}

thread_local! {
    static STORE: RefCell<Option<Store>> = const { RefCell::new(None) };
}

/// The columns of `messages`, with the value a healthy row has.
const COLUMNS: [&str; 18] = [
    "seq",
    "queue",
    "id",
    "body",
    "content_type",
    "metadata",
    "enqueued_at",
    "visible_at",
    "expires_at",
    "delivery_count",
    "lock_token",
    "dead",
    "dl_reason",
    "dl_description",
    "dl_at",
    "sequence",
    "deferred",
    "amqp",
];

/// The queues the rows go to: `strict` dead-letters expired messages and
/// allows one delivery.
const QUEUES: [&str; 2] = ["q", "strict"];

struct Store {
    dir: PathBuf,
    db: Database,
    raw: rusqlite::Connection,
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Store {
    fn open() -> Option<Store> {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = std::env::var_os("WASM_PC_FUZZ_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("wasm-pc-fuzz-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut options = StoreOptions::default();
        let strict = QueueOptions { max_delivery_count: 1, dead_letter_on_expiry: true, ..QueueOptions::default() };
        options.queues.insert(QUEUES[1].to_string(), strict);
        let db = Database::open(&dir.join("queue.db"), options).ok()?;
        let raw = rusqlite::Connection::open(dir.join("queue.db")).ok()?;
        raw.busy_timeout(Duration::from_secs(5)).ok()?;
        Some(Store { dir, db, raw })
    }

    fn run(&mut self, input: &mut Input<'_>) {
        let cleared =
            self.raw.execute_batch("DELETE FROM messages; DELETE FROM queue_sequences; DELETE FROM sqlite_sequence;");
        if cleared.is_err() {
            return;
        }
        let now = now_ms();
        let rows = 1 + usize::from(input.byte() % 3);
        for row in 0..rows {
            self.insert(input, row, now);
        }
        let flags = input.byte();
        let queue = QUEUES[usize::from(flags & 1)];
        let _ = self.db.depth(queue);
        let _ = self.db.queues();
        for sub in [SubQueue::Active, SubQueue::DeadLetter] {
            for message in self.db.peek(queue, sub, i64::MIN, 8).unwrap_or_default() {
                let _ = message::outgoing(&message, None);
            }
        }
        let received = self.db.receive(queue, 8).unwrap_or_default();
        for got in &received {
            let lock = Locked { token: got.lock.token(), until_ms: got.locked_until_ms };
            let _ = message::outgoing(&got.message, Some(lock));
            let settle = match input.byte() % 7 {
                0 => Settle::Complete,
                1 => Settle::Abandon { delay: Duration::from_millis(input.u64()), reason: "fuzz".into() },
                2 => Settle::DeadLetter { reason: "fuzz".into(), description: "fuzz".into() },
                3 => Settle::Release,
                4 => Settle::Defer,
                5 => {
                    let _ = self.db.renew(got.lock);
                    continue;
                }
                _ => continue,
            };
            let _ = self.db.settle(got.lock, settle);
        }
        let sequences: Vec<i64> = (0..input.byte() % 4).map(|_| input.u64() as i64).collect();
        let _ = self.db.receive_deferred(queue, SubQueue::Active, &sequences);
        let _ = self.db.receive_deferred(queue, SubQueue::DeadLetter, &sequences);
        let _ = self.db.cancel_scheduled(queue, &sequences);
        let _ = self.db.requeue(queue, &[]);
        let _ = self.db.receive(queue, 8);
        if flags & 2 != 0 {
            let into = self.dir.join("salvaged.db");
            let _ = std::fs::remove_file(&into);
            let _ = Database::salvage(&self.dir.join("queue.db"), &into);
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(self.dir.join(format!("salvaged.db{suffix}")));
            }
        }
        let target = [PurgeTarget::Active, PurgeTarget::DeadLetters, PurgeTarget::All][usize::from(flags >> 2) % 3];
        let _ = self.db.purge(queue, target);
    }

    /// One row: for each column a tag byte says a healthy value (0) or an
    /// odd one; non-UTF-8 text is stored with `CAST(blob AS TEXT)`.
    fn insert(&mut self, input: &mut Input<'_>, row: usize, now: i64) {
        let mut values = Vec::with_capacity(COLUMNS.len());
        let mut placeholders = Vec::with_capacity(COLUMNS.len());
        for (i, column) in COLUMNS.iter().enumerate() {
            let tag = input.byte() % 9;
            let value = match tag {
                1 => Sql::Null,
                2 => Sql::Integer(input.u64() as i64),
                3 => Sql::Integer(
                    [0, 1, -1, i64::MIN, i64::MAX, i64::from(u32::MAX), i64::from(i32::MIN), now, now + 60_000]
                        [usize::from(input.byte() % 9)],
                ),
                4 => Sql::Real(f64::from_bits(input.u64())),
                5 | 6 => Sql::Blob(input.chunk().to_vec()),
                7 => Sql::Text(String::from_utf8_lossy(input.chunk()).into_owned()),
                8 => Sql::Integer(i64::from(input.byte() as i8)),
                _ => healthy(column, row, now),
            };
            placeholders.push(match tag {
                6 => format!("CAST(?{} AS TEXT)", i + 1),
                _ => format!("?{}", i + 1),
            });
            values.push(value);
        }
        let sql = format!("INSERT INTO messages ({}) VALUES ({})", COLUMNS.join(", "), placeholders.join(", "));
        let _ = self.raw.execute(&sql, rusqlite::params_from_iter(values));
    }
}

/// What a row written by this host holds in `column`.
fn healthy(column: &str, row: usize, now: i64) -> Sql {
    let row = row as i64;
    match column {
        "queue" => Sql::Text(QUEUES[(row % 2) as usize].into()),
        "id" => Sql::Text(format!("m-{row}")),
        "body" => Sql::Blob(b"{}".to_vec()),
        "metadata" => Sql::Text(r#"[["k","v"]]"#.into()),
        "enqueued_at" => Sql::Integer(now),
        "visible_at" => Sql::Integer(now - 1),
        "delivery_count" | "dead" | "deferred" => Sql::Integer(0),
        "sequence" => Sql::Integer(row + 1),
        _ => Sql::Null,
    }
}

/// Bytes off an AMQP connection: the first byte picks the frame size
/// limit, the second how many bytes each read brings; frames are taken
/// after every read until one is missing or refused (the connection then
/// closes). Every frame taken must write back out and be taken again.
pub fn amqp_frame(data: &[u8]) {
    let mut input = Input::new(data);
    let limit = 512usize << (input.byte() % 12);
    let step = usize::from(input.byte()).max(1);
    let mut buffer = BytesMut::new();
    let mut reads = input.rest().chunks(step);
    loop {
        match frame::take(&mut buffer, limit) {
            Ok(Some(frame)) => check_frame_round_trip(frame),
            Ok(None) => match reads.next() {
                Some(read) => buffer.extend_from_slice(read),
                None => return,
            },
            Err(_) => return,
        }
    }
}

fn check_frame_round_trip(taken: Frame) {
    let Frame::Amqp { channel, performative, payload } = taken else { return };
    let mut out = Vec::new();
    frame::write(&mut out, channel, &performative, &payload);
    let mut again = BytesMut::from(&out[..]);
    match frame::take(&mut again, usize::MAX) {
        Ok(Some(Frame::Amqp { channel: c, performative: p, payload: b })) => {
            assert_eq!((c, &b[..]), (channel, &payload[..]));
            assert_eq!(format!("{p:?}"), format!("{performative:?}"), "a performative re-encodes as itself");
        }
        other => panic!("a performative we write is not read back: {other:?} from {performative:?}"),
    }
}

/// A transfer's payload: the first byte picks the message format (single
/// or batch), then the messages it holds go through the queue's fields to
/// a delivery, which must decode as the same message.
pub fn amqp_message(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let format = if flags & 1 == 0 { 0 } else { BATCH_FORMAT };
    let delivery_count = u32::from(input.byte());
    let Ok(messages) = message::incoming(input.rest(), format) else { return };
    let now = now_ms();
    for (sequence, new) in (1..).zip(messages) {
        let stored = stored_as_the_queue_would(new.clone(), sequence, delivery_count, flags >> 1, now);
        let lock = (flags & 0x10 != 0).then_some(Locked { token: [7; 16], until_ms: now + 60_000 });
        let delivery = message::outgoing(&stored, lock);
        let back = match message::incoming(&delivery, 0) {
            Ok(mut back) if back.len() == 1 => back.remove(0),
            other => panic!("a delivery does not decode as one message: {other:?}"),
        };
        assert_eq!(back.body, new.body, "the body survives the queue");
        if new.id.is_some() {
            assert_eq!(back.id, new.id, "the message id survives the queue");
        }
        assert_eq!(back.content_type, new.content_type, "the content type survives the queue");
    }
}

/// The record [`Database::send`] and a receive make of `new`.
fn stored_as_the_queue_would(
    new: NewMessage,
    sequence: i64,
    delivery_count: u32,
    state: u8,
    now: i64,
) -> StoredMessage {
    let state = [
        MessageState::Active,
        MessageState::Locked,
        MessageState::Scheduled,
        MessageState::Deferred,
        MessageState::DeadLettered,
    ][usize::from(state % 5)];
    let dead = state == MessageState::DeadLettered;
    StoredMessage {
        id: new.id.unwrap_or_else(|| "assigned".into()),
        sequence,
        body: new.body,
        content_type: new.content_type,
        metadata: new.metadata,
        delivery_count,
        enqueued_at_ms: now,
        expires_at_ms: new.ttl.map(|t| now.saturating_add(i64::try_from(t.as_millis()).unwrap_or(i64::MAX))),
        state,
        dead_letter_reason: dead.then(|| "reason".into()),
        dead_letter_description: dead.then(|| "description".into()),
        amqp: new.amqp,
    }
}

/// A `$cbs` or `$management` request message. A decoded request is
/// answered (the answer must decode, with the request's id as its
/// correlation id) and put as a token to a keyed endpoint.
///
/// Input starting with `S` instead makes a correctly signed token for a
/// resource and an audience from the rest (two chunks): it must be taken
/// exactly when the resource covers the audience.
pub fn amqp_request(data: &[u8]) {
    let key = SasKey { name: "RootManageSharedAccessKey".into(), key: "fuzz-key".into() };
    if let Some(rest) = data.strip_prefix(b"S") {
        return signed_token(&key, rest);
    }
    let Ok(request) = Request::decode(data) else { return };
    let _ = request.property("operation");
    let _ = request.field("name");
    let answer = Response::error(500, "amqp:internal-error", "fuzz").encode(&request);
    match Request::decode(&answer) {
        Ok(_) => {
            let properties = serde_amqp::from_slice::<serde_amqp::described::Described<serde_amqp::Value>>(&answer);
            let correlation = properties.ok().and_then(|p| wire::items(&p.value).get(5).cloned());
            if matches!(
                request.message_id,
                serde_amqp::Value::String(_)
                    | serde_amqp::Value::Uuid(_)
                    | serde_amqp::Value::Ulong(_)
                    | serde_amqp::Value::Binary(_)
            ) {
                assert_eq!(correlation.as_ref(), Some(&request.message_id), "the answer correlates in the id's type");
            }
        }
        Err(e) => panic!("an answer we encode does not decode: {e}"),
    }
    let _ = cbs::put_token(&Auth::Key(key), &request);
    let _ = cbs::put_token(&Auth::AcceptAny, &request);
}

fn signed_token(key: &SasKey, data: &[u8]) {
    let mut input = Input::new(data);
    let resource = String::from_utf8_lossy(input.chunk()).into_owned();
    let audience = String::from_utf8_lossy(input.rest()).into_owned();
    let token = sas::sign(&resource, key, u64::from(u32::MAX) * 2);
    let request = Request {
        message_id: serde_amqp::Value::Ulong(1),
        reply_to: Some("$cbs".into()),
        properties: wire::decode(
            &wire::Amqp::Map(vec![
                (wire::Amqp::string("operation"), wire::Amqp::string("put-token")),
                (wire::Amqp::string("name"), wire::Amqp::string(&audience)),
            ])
            .to_bytes(),
        )
        .unwrap_or(serde_amqp::Value::Null),
        body: serde_amqp::Value::String(token),
    };
    let (response, granted) = cbs::put_token(&Auth::Key(key.clone()), &request);
    let covered = sas::covers(&resource, &audience);
    assert_eq!(response.status == 202, covered, "a signed token for {resource:?} asking for {audience:?}");
    assert_eq!(granted, covered.then(|| sas::entity_path(&audience)));
}
