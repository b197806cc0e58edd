//! Clients that misbehave, against a real endpoint on loopback: a raw AMQP
//! client written here (on the crate's own framing) disconnects mid-transfer,
//! sends garbage, opens a thousand links and never settles. Nothing may be
//! lost, the endpoint must keep serving, and locks of a dropped connection
//! must expire so the messages come back.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use fe2o3_amqp_types::definitions::{DeliveryNumber, Handle, ReceiverSettleMode, Role, SenderSettleMode};
use fe2o3_amqp_types::messaging::{Source, Target, TargetArchetype};
use fe2o3_amqp_types::performatives::{Attach, Begin, ChannelMax, Flow, MaxFrameSize, Open, Performative, Transfer};
use serde_amqp::primitives::Binary;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::frame::{self, Frame};
use super::wire::{self, Amqp};
use super::{Auth, Entities, Shared};
use crate::queue::{QueueHandle, QueueOptions, StoreOptions, SubQueue};

/// An endpoint on a free loopback port with queue `q` (2 s locks).
async fn endpoint(dir: &tempfile::TempDir) -> (u16, QueueHandle, watch::Sender<bool>) {
    let options = QueueOptions { lock_duration: Duration::from_secs(2), ..QueueOptions::default() };
    let queue = QueueHandle::open(&dir.path().join("q.db"), StoreOptions::with_defaults(options)).unwrap();
    let mut entities = Entities::default();
    entities.declare("q", options);
    let shared =
        Arc::new(Shared { queue: queue.clone(), entities, auth: Auth::AcceptAny, max_message_bytes: 256 << 10 });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(super::serve(listener, shared, 64, stopped));
    (port, queue, stop)
}

/// A bare AMQP client: just enough protocol to misbehave precisely.
struct Raw {
    stream: TcpStream,
    input: BytesMut,
}

impl Raw {
    /// Connected, past SASL ANONYMOUS, opened, with session 0.
    async fn connect(port: u16) -> Raw {
        let mut raw = Raw { stream: TcpStream::connect(("127.0.0.1", port)).await.unwrap(), input: BytesMut::new() };
        raw.stream.write_all(&frame::SASL_HEADER).await.unwrap();
        raw.header().await;
        let _mechanisms = raw.next().await;
        let init =
            Amqp::described(0x41, Amqp::List(vec![Amqp::symbol("ANONYMOUS"), Amqp::Binary(Vec::new()), Amqp::Null]));
        raw.raw_frame(1, 0, &init.to_bytes()).await;
        let _outcome = raw.next().await;
        raw.stream.write_all(&frame::AMQP_HEADER).await.unwrap();
        raw.header().await;
        raw.send(Performative::Open(Open {
            container_id: "raw".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(65_536),
            channel_max: ChannelMax(16),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }))
        .await;
        assert!(matches!(raw.next().await, Frame::Amqp { performative: Performative::Open(_), .. }));
        raw.send(Performative::Begin(Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 100_000,
            outgoing_window: 100_000,
            handle_max: Handle(4095),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }))
        .await;
        assert!(matches!(raw.next().await, Frame::Amqp { performative: Performative::Begin(_), .. }));
        raw.authorize().await;
        raw
    }

    async fn header(&mut self) {
        while self.input.len() < 8 {
            assert!(self.stream.read_buf(&mut self.input).await.unwrap() > 0, "closed during the handshake");
        }
        let _ = self.input.split_to(8);
    }

    async fn raw_frame(&mut self, kind: u8, channel: u16, body: &[u8]) {
        let mut out = Vec::new();
        out.extend(u32::try_from(8 + body.len()).unwrap().to_be_bytes());
        out.extend([2, kind]);
        out.extend(channel.to_be_bytes());
        out.extend(body);
        self.stream.write_all(&out).await.unwrap();
    }

    async fn send(&mut self, performative: Performative) {
        self.send_with(performative, &[]).await;
    }

    async fn send_with(&mut self, performative: Performative, payload: &[u8]) {
        let mut out = Vec::new();
        frame::write(&mut out, 0, &performative, payload);
        self.stream.write_all(&out).await.unwrap();
    }

    /// The next frame, skipping heartbeats; panics after 10 s.
    async fn next(&mut self) -> Frame {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(frame) = frame::take(&mut self.input, 1 << 20).unwrap() {
                    if !matches!(frame, Frame::Heartbeat) {
                        return frame;
                    }
                    continue;
                }
                assert!(self.stream.read_buf(&mut self.input).await.unwrap() > 0, "the endpoint closed the connection");
            }
        })
        .await
        .expect("no frame within 10 s")
    }

    async fn attach(&mut self, handle: u32, role: Role, address: &str) {
        let sender = role == Role::Sender;
        let (source, target) = if sender { (None, Some(address)) } else { (Some(address), None) };
        self.send(Performative::Attach(Attach {
            name: format!("link-{handle}"),
            handle: Handle(handle),
            role,
            snd_settle_mode: SenderSettleMode::Unsettled,
            rcv_settle_mode: ReceiverSettleMode::Second,
            source: Some(Box::new(Source { address: source.map(str::to_string), ..Source::default() })),
            target: Some(Box::new(TargetArchetype::Target(Target {
                address: target.map(str::to_string),
                ..Target::default()
            }))),
            unsettled: None,
            incomplete_unsettled: false,
            initial_delivery_count: sender.then_some(0),
            max_message_size: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        }))
        .await;
    }

    async fn credit(&mut self, handle: u32, credit: u32) {
        self.send(Performative::Flow(Flow {
            next_incoming_id: Some(1),
            incoming_window: 100_000,
            next_outgoing_id: 0,
            outgoing_window: 100_000,
            handle: Some(Handle(handle)),
            delivery_count: Some(0),
            link_credit: Some(credit),
            available: None,
            drain: false,
            echo: false,
            properties: None,
        }))
        .await;
    }

    /// A put-token on `$cbs` for the whole namespace (the endpoint takes
    /// any token here), waiting for its answer.
    async fn authorize(&mut self) {
        self.attach(4000, Role::Sender, "$cbs").await;
        self.attach(4001, Role::Receiver, "$cbs").await;
        self.credit(4001, 10).await;
        let request: Vec<u8> = [
            Amqp::described(
                0x73,
                Amqp::List(vec![Amqp::string("cbs-1"), Amqp::Null, Amqp::Null, Amqp::Null, Amqp::string("$cbs")]),
            ),
            Amqp::described(
                0x74,
                Amqp::Map(vec![
                    (Amqp::string("operation"), Amqp::string("put-token")),
                    (Amqp::string("type"), Amqp::string("servicebus.windows.net:sastoken")),
                    (Amqp::string("name"), Amqp::string("sb://localhost/")),
                ]),
            ),
            Amqp::described(0x77, Amqp::string("any")),
        ]
        .iter()
        .flat_map(Amqp::to_bytes)
        .collect();
        self.transfer(4000, 0, &request, false).await;
        loop {
            if let Frame::Amqp { performative: Performative::Transfer(t), payload, .. } = self.next().await {
                assert_eq!(t.handle.0, 4001);
                let reply = super::request::Request::decode(&payload).unwrap();
                assert!(matches!(wire::get(&reply.properties, "status-code"), Some(serde_amqp::Value::Int(202))));
                return;
            }
        }
    }

    async fn transfer(&mut self, handle: u32, delivery: u32, payload: &[u8], more: bool) {
        let transfer = Transfer {
            handle: Handle(handle),
            delivery_id: Some(DeliveryNumber::from(delivery)),
            delivery_tag: Some(Binary::from(delivery.to_be_bytes().to_vec())),
            message_format: Some(0),
            settled: Some(false),
            more,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        };
        self.send_with(Performative::Transfer(transfer), payload).await;
    }
}

fn message(id: &str) -> Vec<u8> {
    [
        Amqp::described(0x73, Amqp::List(vec![Amqp::string(id)])),
        Amqp::described(0x75, Amqp::Binary(id.as_bytes().to_vec())),
    ]
    .iter()
    .flat_map(Amqp::to_bytes)
    .collect()
}

async fn count(queue: &QueueHandle) -> usize {
    queue.peek("q", SubQueue::Active, 0, 100_000).await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_transfer_stores_nothing_and_breaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (port, queue, _stop) = endpoint(&dir).await;
    let mut raw = Raw::connect(port).await;
    raw.attach(0, Role::Sender, "q").await;
    let whole = message("whole");
    raw.transfer(0, 0, &whole, false).await;
    // Half of a message, more to come, then gone.
    let half = message("half");
    raw.transfer(0, 1, &half[..half.len() / 2], true).await;
    loop {
        if let Frame::Amqp { performative: Performative::Disposition(d), .. } = raw.next().await {
            assert_eq!(d.first, 0, "the whole message was accepted");
            break;
        }
    }
    drop(raw);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ids: Vec<String> = queue.peek("q", SubQueue::Active, 0, 10).await.unwrap().into_iter().map(|m| m.id).collect();
    assert_eq!(ids, ["whole"], "the half-sent message was not stored");
    // The endpoint still serves.
    let mut again = Raw::connect(port).await;
    again.attach(0, Role::Sender, "q").await;
    again.transfer(0, 0, &message("after"), false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&queue).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_close_that_connection_only() {
    let dir = tempfile::tempdir().unwrap();
    let (port, queue, _stop) = endpoint(&dir).await;
    let mut good = Raw::connect(port).await;
    good.attach(0, Role::Sender, "q").await;
    for garbage in [
        vec![0xffu8; 64],                                      // a frame size far over the limit
        vec![0, 0, 0, 12, 2, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef], // a body that is no performative
        vec![0, 0, 0, 4, 2, 0, 0, 0],                          // a size smaller than its header
        b"GET / HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),         // not AMQP at all, after the handshake
    ] {
        let mut bad = Raw::connect(port).await;
        bad.stream.write_all(&garbage).await.unwrap();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), bad.stream.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a connection sending {garbage:02x?} was not closed");
    }
    // Garbage before any protocol header, too.
    let mut junk = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    junk.write_all(&[0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00]).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), junk.read_to_end(&mut rest)).await;
    // The good connection never noticed.
    good.transfer(0, 0, &message("still-fine"), false).await;
    loop {
        if let Frame::Amqp { performative: Performative::Disposition(_), .. } = good.next().await {
            break;
        }
    }
    assert_eq!(count(&queue).await, 1);
}

/// A thousand receiver links on one session, each with credit, none of
/// them settling; the connection dropped. Every message comes back once its
/// lock expires, to the next receiver, its delivery count risen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_links_that_never_settle_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (port, queue, _stop) = endpoint(&dir).await;
    let mut greedy = Raw::connect(port).await;
    for handle in 0..1000 {
        greedy.attach(handle, Role::Receiver, "q").await;
        greedy.credit(handle, 1).await;
    }
    let mut sender = Raw::connect(port).await;
    sender.attach(0, Role::Sender, "q").await;
    for i in 0..300 {
        sender.transfer(0, i, &message(&format!("m-{i}")), false).await;
    }
    let mut received = std::collections::BTreeSet::new();
    while received.len() < 300 {
        if let Frame::Amqp { performative: Performative::Transfer(t), .. } = greedy.next().await {
            assert!(t.handle.0 < 1000);
            received.insert(t.handle.0);
        }
    }
    assert_eq!(received.len(), 300, "one message per link, as its credit allows");
    assert_eq!(queue.depth("q").await.unwrap().locked, 300);
    drop(greedy);

    // Locks expire (2 s); a well-behaved receiver gets everything back.
    let mut next = Raw::connect(port).await;
    next.attach(0, Role::Receiver, "q").await;
    next.credit(0, 1000).await;
    let mut ids = std::collections::BTreeSet::new();
    while ids.len() < 300 {
        if let Frame::Amqp { performative: Performative::Transfer(_), payload, .. } = next.next().await {
            let stored = super::message::incoming(&payload, 0).unwrap().remove(0);
            ids.insert(stored.id.unwrap_or_default());
            let header = wire::decode(&payload[..wire::first_value_len(&payload).unwrap()]).unwrap();
            let serde_amqp::Value::Described(header) = header else { panic!("no header") };
            assert!(
                matches!(wire::items(&header.value).get(4), Some(serde_amqp::Value::Uint(1))),
                "one earlier delivery"
            );
        }
    }
    assert_eq!(ids.len(), 300, "none lost, none twice");
}
