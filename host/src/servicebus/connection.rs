//! One client connection: the handshake, then sessions and links.
//!
//! Each connection is one task that owns all its state: frames from the
//! socket and events from the work it started (queue receives, durable
//! sends, settlements, management operations) are handled in turn, so no
//! state is shared between tasks. What it writes is collected and flushed
//! once per turn.
//!
//! Flow control follows AMQP 1.0: a client's receiver grants link credit and
//! gets at most that many deliveries; a client's sender gets credit from
//! here, topped up as messages are stored. Messages fetched for a link that
//! lost its credit (or went away) are released at once, and a delivery the
//! client never settles is redelivered when its lock expires, as on Service
//! Bus.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fe2o3_amqp_types::definitions::{
    AmqpError, ConnectionError, DeliveryNumber, Error as AmqpErrorBody, ErrorCondition, Handle, LinkError,
    ReceiverSettleMode, Role, SenderSettleMode,
};
use fe2o3_amqp_types::messaging::{Accepted, DeliveryState, Modified, Rejected, Source, Target, TargetArchetype};
use fe2o3_amqp_types::performatives::{
    Attach, Begin, ChannelMax, Close, Detach, Disposition, End, Flow, MaxFrameSize, Open, Performative, Transfer,
};
use serde_amqp::primitives::{Binary, Symbol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc, watch};

use super::Shared;
use super::entities::Node;
use super::frame::{self, Frame, SaslFrame};
use super::link::{self, Fetch, Intake, Kind, Link, Outbound, Partial, Replies};
use super::message::{self, Locked};
use super::request::{Request, Response};
use super::{cbs, management};
use crate::queue::{Lock, QueueError, ReceiveMode, Received, Settle, Settled, SubQueue};

/// Largest frame a client may send; also offered as ours.
const MAX_FRAME: u32 = 256 << 10;
/// Sessions per connection, links per session.
const CHANNEL_MAX: u16 = 4095;
const HANDLE_MAX: u32 = 4095;
/// The session window offered to clients, refreshed at half.
const INCOMING_WINDOW: u32 = 65_536;
/// Credit given to a client's sender, refreshed at half.
const INBOUND_CREDIT: u32 = 256;
/// Messages one fetch asks the queue for at most.
const FETCH_BATCH: u32 = 64;
/// A fetch with nothing to take re-checks this often (scheduled messages,
/// expired locks), besides waking when something is sent or settled.
const FETCH_POLL: Duration = Duration::from_millis(500);
/// The handshake must be over in this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Our idle time-out: a client silent for twice this is gone.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// A client that does not read what we write for this long is gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

static LINK_IDS: AtomicU64 = AtomicU64::new(1);

/// Work finished elsewhere, for the connection task to act on.
enum Event {
    Fetched { channel: u16, link: u64, result: Result<Vec<Received>, QueueError> },
    Stored { channel: u16, link: u64, delivery: u32, settled: bool, outcome: DeliveryState },
    Settled { channel: u16, delivery: u32, echo: DeliveryState },
    Reply { channel: u16, node: Node, reply_to: Option<String>, message: Vec<u8> },
}

/// What the connection's work reports back to it. However the connection
/// ends, dropping its inbox gives back the messages fetched for the client
/// but never sent to it: they are visible again at once, their delivery not
/// counted, instead of waiting out a lock nobody holds.
struct Inbox {
    events: mpsc::UnboundedReceiver<Event>,
    queue: crate::queue::QueueHandle,
}

impl Drop for Inbox {
    fn drop(&mut self) {
        // Closed first, so that a fetch finishing later gives back its own.
        self.events.close();
        let mut unsent = Vec::new();
        while let Ok(event) = self.events.try_recv() {
            if let Event::Fetched { result: Ok(received), .. } = event {
                unsent.extend(received);
            }
        }
        if unsent.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let queue = self.queue.clone();
                runtime.spawn(async move { give_back(&queue, unsent).await });
            }
            Err(_) => tracing::debug!(
                messages = unsent.len(),
                "no runtime to give back fetched messages; their locks will expire"
            ),
        }
    }
}

/// Why a connection ends early.
#[derive(Debug, thiserror::Error)]
enum Fatal {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Frame(#[from] frame::FrameError),
    #[error("the client broke the protocol: {0}")]
    Protocol(String),
    #[error("timed out")]
    Timeout,
}

/// Serves one client until it closes, errs, or the endpoint shuts down.
pub async fn serve(stream: TcpStream, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let _ = stream.set_nodelay(true);
    let (reader, writer) = stream.into_split();
    let (events, rx) = mpsc::unbounded_channel();
    let inbox = Inbox { events: rx, queue: shared.queue.clone() };
    let mut connection = Connection {
        shared,
        reader,
        writer,
        input: BytesMut::with_capacity(16 << 10),
        out: Vec::new(),
        peer_max_frame: 512,
        heartbeat: None,
        sessions: HashMap::new(),
        authorized: Vec::new(),
        events,
        closing: false,
    };
    let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connection.handshake()).await {
        Ok(Ok(())) => connection.run(inbox, &mut shutdown).await,
        Ok(Err(e)) => Err(e),
        Err(_) => Err(Fatal::Timeout),
    };
    match result {
        Ok(()) => tracing::debug!(%peer, "AMQP connection closed"),
        Err(Fatal::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionReset
            ) =>
        {
            tracing::debug!(%peer, "AMQP client went away")
        }
        Err(error) => {
            tracing::info!(%peer, %error, "AMQP connection ended");
            let condition = match &error {
                Fatal::Frame(frame::FrameError::TooLarge { .. }) => ConnectionError::FramingError.into(),
                Fatal::Frame(_) => AmqpError::DecodeError.into(),
                _ => ErrorCondition::from(AmqpError::InternalError),
            };
            connection.close_with(condition, error.to_string());
            let _ = tokio::time::timeout(Duration::from_secs(1), connection.flush()).await;
        }
    }
    connection.release_everything();
}

struct Connection {
    shared: Arc<Shared>,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    input: BytesMut,
    out: Vec<u8>,
    /// The largest frame the client takes.
    peer_max_frame: usize,
    /// How often to send an empty frame: half the client's idle time-out.
    heartbeat: Option<Duration>,
    sessions: HashMap<u16, Session>,
    /// Entity paths the client holds a valid token for.
    authorized: Vec<String>,
    events: mpsc::UnboundedSender<Event>,
    closing: bool,
}

struct Session {
    /// Our transfer-id for the next frame we send.
    next_outgoing_id: u32,
    /// How many more transfer frames the client takes.
    remote_incoming_window: u32,
    next_incoming_id: u32,
    /// How many more transfer frames we take before we refresh the window.
    incoming_window: u32,
    next_delivery_id: u32,
    links: HashMap<u32, Link>,
    /// Deliveries we sent and the client has yet to settle.
    unsettled: HashMap<u32, Unsettled>,
    /// Transfer frames waiting for the client's session window.
    blocked: std::collections::VecDeque<Vec<u8>>,
}

impl Session {
    /// A flow with this session's windows and nothing of any link.
    fn flow(&self) -> Flow {
        Flow {
            next_incoming_id: Some(self.next_incoming_id),
            incoming_window: self.incoming_window,
            next_outgoing_id: self.next_outgoing_id,
            outgoing_window: u32::MAX,
            handle: None,
            delivery_count: None,
            link_credit: None,
            available: None,
            drain: false,
            echo: false,
            properties: None,
        }
    }
}

struct Unsettled {
    link: u64,
    lock: Lock,
}

impl Connection {
    /// Protocol headers, SASL ANONYMOUS, and Open.
    async fn handshake(&mut self) -> Result<(), Fatal> {
        let mut header = self.read_header().await?;
        if header == frame::SASL_HEADER {
            self.out.extend(frame::SASL_HEADER);
            frame::write_sasl(&mut self.out, &frame::mechanisms());
            self.flush().await?;
            match self.next_frame().await? {
                Frame::Sasl(SaslFrame::Init(init)) if init.mechanism.as_str() == "ANONYMOUS" => {
                    frame::write_sasl(&mut self.out, &frame::sasl_ok());
                }
                Frame::Sasl(SaslFrame::Init(init)) => {
                    let outcome = fe2o3_amqp_types::sasl::SaslOutcome {
                        code: fe2o3_amqp_types::sasl::SaslCode::Auth,
                        additional_data: None,
                    };
                    frame::write_sasl(&mut self.out, &outcome);
                    self.flush().await?;
                    return Err(Fatal::Protocol(format!(
                        "SASL mechanism {} (only ANONYMOUS)",
                        init.mechanism.as_str()
                    )));
                }
                other => return Err(Fatal::Protocol(format!("expected sasl-init, got {other:?}"))),
            }
            self.flush().await?;
            header = self.read_header().await?;
        }
        if header != frame::AMQP_HEADER {
            self.out.extend(frame::AMQP_HEADER);
            self.flush().await?;
            return Err(frame::FrameError::Header(header).into());
        }
        // Answer the header before waiting for Open: go-amqp sends Open only
        // after it has our header (rhea and pyamqp pipeline it).
        self.out.extend(frame::AMQP_HEADER);
        self.flush().await?;
        let Frame::Amqp { performative: Performative::Open(open), .. } = self.next_frame().await? else {
            return Err(Fatal::Protocol("the first frame was not open".into()));
        };
        self.peer_max_frame =
            usize::try_from(open.max_frame_size.0).unwrap_or(usize::MAX).clamp(512, MAX_FRAME as usize);
        self.heartbeat = open
            .idle_time_out
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(u64::from(ms) / 2).max(Duration::from_millis(500)));
        self.send(
            0,
            Performative::Open(Open {
                container_id: format!("wasm-pc-servicebus-{}", std::process::id()),
                hostname: None,
                max_frame_size: MaxFrameSize(MAX_FRAME),
                channel_max: ChannelMax(CHANNEL_MAX),
                idle_time_out: Some(u32::try_from(IDLE_TIMEOUT.as_millis()).unwrap_or(u32::MAX)),
                outgoing_locales: None,
                incoming_locales: None,
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            }),
        );
        self.flush().await?;
        Ok(())
    }

    async fn read_header(&mut self) -> Result<[u8; 8], Fatal> {
        while self.input.len() < 8 {
            if self.reader.read_buf(&mut self.input).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
        let mut header = [0u8; 8];
        header.copy_from_slice(&self.input.split_to(8));
        Ok(header)
    }

    async fn next_frame(&mut self) -> Result<Frame, Fatal> {
        loop {
            if let Some(frame) = frame::take(&mut self.input, MAX_FRAME as usize)? {
                return Ok(frame);
            }
            if self.reader.read_buf(&mut self.input).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
            }
        }
    }

    async fn run(&mut self, mut inbox: Inbox, shutdown: &mut watch::Receiver<bool>) -> Result<(), Fatal> {
        let mut heard = Instant::now();
        let mut wrote = Instant::now();
        let tick = self.heartbeat.unwrap_or(Duration::from_secs(15)).min(Duration::from_secs(15));
        let mut ticker = tokio::time::interval(tick);
        // What the client pipelined behind its open (pyamqp sends begin and
        // attaches with it) may have come in with it: it waits for answers,
        // so no more bytes would come to make us look.
        self.on_input()?;
        while !self.closing {
            tokio::select! {
                read = self.reader.read_buf(&mut self.input) => {
                    if read? == 0 {
                        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
                    }
                    heard = Instant::now();
                    self.on_input()?;
                }
                Some(event) = inbox.events.recv() => self.on_event(event),
                _ = ticker.tick() => {
                    if heard.elapsed() > IDLE_TIMEOUT * 2 {
                        self.close_with(AmqpError::ResourceLimitExceeded.into(), "idle past the idle time-out".into());
                    } else if self.heartbeat.is_some_and(|every| wrote.elapsed() >= every) && self.out.is_empty() {
                        frame::write_heartbeat(&mut self.out);
                    }
                }
                _ = crate::shutdown::requested(shutdown) => {
                    self.close_with(ConnectionError::ConnectionForced.into(), "the endpoint is shutting down".into());
                }
            }
            if !self.out.is_empty() {
                self.flush().await?;
                wrote = Instant::now();
            }
        }
        Ok(())
    }

    /// Handles every whole frame read so far.
    fn on_input(&mut self) -> Result<(), Fatal> {
        while let Some(frame) = frame::take(&mut self.input, MAX_FRAME as usize)? {
            self.on_frame(frame)?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), Fatal> {
        let bytes = std::mem::take(&mut self.out);
        match tokio::time::timeout(WRITE_TIMEOUT, self.writer.write_all(&bytes)).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(Fatal::Timeout),
        }
    }

    fn send(&mut self, channel: u16, performative: Performative) {
        frame::write(&mut self.out, channel, &performative, &[]);
    }

    fn close_with(&mut self, condition: ErrorCondition, description: String) {
        self.send(0, Performative::Close(Close { error: Some(frame::error(condition, description)) }));
        self.closing = true;
    }

    /// Ends every link's work; their locks expire on their own, as when a
    /// Service Bus client disconnects.
    fn release_everything(&mut self) {
        self.sessions.clear();
    }

    fn on_frame(&mut self, frame: Frame) -> Result<(), Fatal> {
        let (channel, performative, payload) = match frame {
            Frame::Heartbeat => return Ok(()),
            Frame::Sasl(SaslFrame::Init(_)) => return Err(Fatal::Protocol("a second sasl-init".into())),
            Frame::Sasl(SaslFrame::Other(code)) => {
                return Err(Fatal::Protocol(format!("a SASL frame ({code:#x}) after the handshake")));
            }
            Frame::Amqp { channel, performative, payload } => (channel, performative, payload),
        };
        match performative {
            Performative::Begin(begin) => self.on_begin(channel, begin),
            Performative::Close(_) => {
                self.send(0, Performative::Close(Close { error: None }));
                self.closing = true;
                Ok(())
            }
            Performative::Open(_) => Err(Fatal::Protocol("a second open".into())),
            other => {
                if !self.sessions.contains_key(&channel) {
                    // pyamqp detaches its $management links after its End:
                    // the session, and with it the links, is gone already.
                    if matches!(other, Performative::Detach(_)) {
                        tracing::debug!(channel, "a detach after its session ended; ignored");
                        return Ok(());
                    }
                    return Err(Fatal::Protocol(format!(
                        "{} on channel {channel}, which has no session",
                        name(&other)
                    )));
                }
                match other {
                    Performative::End(_) => {
                        self.sessions.remove(&channel);
                        self.send(channel, Performative::End(End { error: None }));
                        Ok(())
                    }
                    Performative::Attach(attach) => {
                        self.on_attach(channel, attach);
                        Ok(())
                    }
                    Performative::Flow(flow) => {
                        self.on_flow(channel, flow);
                        Ok(())
                    }
                    Performative::Transfer(transfer) => self.on_transfer(channel, transfer, &payload),
                    Performative::Disposition(disposition) => {
                        self.on_disposition(channel, disposition);
                        Ok(())
                    }
                    Performative::Detach(detach) => {
                        self.on_detach(channel, detach);
                        Ok(())
                    }
                    _ => Ok(()),
                }
            }
        }
    }

    fn on_begin(&mut self, channel: u16, begin: Begin) -> Result<(), Fatal> {
        if self.sessions.contains_key(&channel) || channel > CHANNEL_MAX {
            return Err(Fatal::Protocol(format!("begin on channel {channel}, which is in use or over the maximum")));
        }
        self.sessions.insert(
            channel,
            Session {
                next_outgoing_id: 1,
                remote_incoming_window: begin.incoming_window,
                next_incoming_id: begin.next_outgoing_id,
                incoming_window: INCOMING_WINDOW,
                next_delivery_id: 0,
                links: HashMap::new(),
                unsettled: HashMap::new(),
                blocked: Default::default(),
            },
        );
        // Our channel numbers mirror the client's: one session each way.
        self.send(
            channel,
            Performative::Begin(Begin {
                remote_channel: Some(channel),
                next_outgoing_id: 1,
                incoming_window: INCOMING_WINDOW,
                outgoing_window: u32::MAX,
                handle_max: Handle(HANDLE_MAX),
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            }),
        );
        Ok(())
    }

    /// Whether a token put on `$cbs` covers the entity path.
    fn authorized_for(&self, path: &str) -> bool {
        self.authorized.iter().any(|granted| super::sas::covers(granted, path))
    }

    fn on_attach(&mut self, channel: u16, attach: Attach) {
        let handle = attach.handle.0;
        let client_sends = attach.role == Role::Sender;
        let address = if client_sends {
            match attach.target.as_deref() {
                Some(TargetArchetype::Target(target)) => target.address.clone(),
                _ => None,
            }
        } else {
            attach.source.as_ref().and_then(|s| s.address.clone())
        };
        let address = address.unwrap_or_default();
        let refuse = |this: &mut Self, condition: ErrorCondition, why: String| {
            tracing::info!(%address, %why, "link refused");
            this.reply_attach(channel, &attach, true);
            this.send(
                channel,
                Performative::Detach(Detach {
                    handle: Handle(handle),
                    closed: true,
                    error: Some(frame::error(condition, why)),
                }),
            );
        };
        if handle > HANDLE_MAX || self.sessions.get(&channel).is_some_and(|s| s.links.contains_key(&handle)) {
            return refuse(
                self,
                AmqpError::NotAllowed.into(),
                format!("handle {handle} is in use or over {HANDLE_MAX}"),
            );
        }
        let Some(node) = self.shared.entities.resolve(&address) else {
            return refuse(
                self,
                AmqpError::NotFound.into(),
                format!("the messaging entity {address:?} could not be found"),
            );
        };
        let path = super::sas::entity_path(&address);
        if node.queue().is_some() && !self.authorized_for(&path) {
            return refuse(
                self,
                AmqpError::UnauthorizedAccess.into(),
                format!("no valid token for {path}: put one on $cbs first"),
            );
        }
        let intake = Intake::new(attach.initial_delivery_count.unwrap_or(0), INBOUND_CREDIT);
        let target_address = match attach.target.as_deref() {
            Some(TargetArchetype::Target(target)) => target.address.clone(),
            _ => None,
        };
        let kind = match (&node, client_sends) {
            (Node::Messages { queue, sub: SubQueue::Active }, true) => Kind::Inbound { queue: queue.clone(), intake },
            (Node::Messages { .. }, true) => {
                return refuse(self, AmqpError::NotAllowed.into(), "a dead-letter queue takes no sends".into());
            }
            (Node::Messages { queue, sub }, false) => {
                let mode = if attach.snd_settle_mode == SenderSettleMode::Settled {
                    ReceiveMode::ReceiveAndDelete
                } else {
                    ReceiveMode::PeekLock
                };
                Kind::Outbound(Outbound {
                    queue: queue.clone(),
                    sub: *sub,
                    mode,
                    credit: 0,
                    delivery_count: 0,
                    draining: false,
                    fetch: None,
                })
            }
            (Node::Cbs | Node::Management { .. }, true) => Kind::Requests { node: node.clone(), intake },
            (Node::Cbs | Node::Management { .. }, false) => Kind::Replies(Replies {
                node: node.clone(),
                address: target_address,
                credit: 0,
                delivery_count: 0,
                waiting: Default::default(),
            }),
        };
        let grants = match &kind {
            Kind::Inbound { intake, .. } | Kind::Requests { intake, .. } => {
                Some((intake.delivery_count, intake.credit))
            }
            _ => None,
        };
        let link = Link { id: LINK_IDS.fetch_add(1, Ordering::Relaxed), name: attach.name.clone(), kind };
        tracing::debug!(%address, name = %link.name, client_sends, "link attached");
        self.reply_attach(channel, &attach, false);
        if let Some(session) = self.sessions.get_mut(&channel) {
            session.links.insert(handle, link);
        }
        if let Some((delivery_count, credit)) = grants {
            self.grant(channel, handle, delivery_count, credit);
        }
    }

    /// The attach answering the client's: the opposite role, its terminus
    /// echoed (none when refusing), and the settle modes the SDKs check.
    fn reply_attach(&mut self, channel: u16, theirs: &Attach, refusing: bool) {
        let we_send = theirs.role == Role::Receiver;
        let source = match (&theirs.source, refusing && we_send) {
            (_, true) => None,
            (Some(source), false) => Some(source.clone()),
            (None, false) => Some(Box::new(Source::default())),
        };
        let target = match (&theirs.target, refusing && !we_send) {
            (_, true) => None,
            (Some(target), false) => Some(target.clone()),
            (None, false) => Some(Box::new(TargetArchetype::Target(Target::default()))),
        };
        // Our receivers settle first (go-amqp insists on it); our senders
        // take the mode the client asked for (go-amqp insists on the echo).
        let rcv_settle_mode = if we_send { theirs.rcv_settle_mode.clone() } else { ReceiverSettleMode::First };
        self.send(
            channel,
            Performative::Attach(Attach {
                name: theirs.name.clone(),
                handle: theirs.handle.clone(),
                role: if we_send { Role::Sender } else { Role::Receiver },
                snd_settle_mode: theirs.snd_settle_mode.clone(),
                rcv_settle_mode,
                source,
                target,
                unsettled: None,
                incomplete_unsettled: false,
                initial_delivery_count: we_send.then_some(0),
                max_message_size: Some(self.shared.max_message_bytes as u64),
                offered_capabilities: None,
                desired_capabilities: None,
                properties: None,
            }),
        );
    }

    /// Gives a client's sender `credit`.
    fn grant(&mut self, channel: u16, handle: u32, delivery_count: u32, credit: u32) {
        let Some(session) = self.sessions.get(&channel) else { return };
        let flow = Flow {
            handle: Some(Handle(handle)),
            delivery_count: Some(delivery_count),
            link_credit: Some(credit),
            ..session.flow()
        };
        self.send(channel, Performative::Flow(flow));
    }

    fn on_flow(&mut self, channel: u16, flow: Flow) {
        let Some(session) = self.sessions.get_mut(&channel) else { return };
        let their_next_incoming = flow.next_incoming_id.unwrap_or(1);
        session.remote_incoming_window =
            their_next_incoming.wrapping_add(flow.incoming_window).wrapping_sub(session.next_outgoing_id);
        let Some(handle) = flow.handle.as_ref().map(|h| h.0) else {
            self.unblock(channel);
            if flow.echo {
                self.session_flow(channel);
            }
            return;
        };
        let Some(link) = session.links.get_mut(&handle) else { return };
        let credit = flow.link_credit.unwrap_or(0);
        match &mut link.kind {
            Kind::Outbound(outbound) => {
                outbound.credit = link::credit_from_flow(flow.delivery_count, credit, outbound.delivery_count);
                outbound.draining = flow.drain;
            }
            Kind::Replies(replies) => {
                replies.credit = link::credit_from_flow(flow.delivery_count, credit, replies.delivery_count);
            }
            Kind::Inbound { intake, .. } | Kind::Requests { intake, .. } => {
                if let Some(count) = flow.delivery_count {
                    intake.delivery_count = count;
                }
            }
        }
        self.unblock(channel);
        self.pump(channel, handle);
        if flow.echo {
            self.link_flow(channel, handle);
        }
    }

    fn session_flow(&mut self, channel: u16) {
        let Some(session) = self.sessions.get(&channel) else { return };
        let flow = session.flow();
        self.send(channel, Performative::Flow(flow));
    }

    /// Our view of a link we send on: its count and remaining credit.
    fn link_flow(&mut self, channel: u16, handle: u32) {
        let Some(session) = self.sessions.get_mut(&channel) else { return };
        let Some(link) = session.links.get_mut(&handle) else { return };
        let (delivery_count, credit, drain) = match &link.kind {
            Kind::Outbound(o) => (o.delivery_count, o.credit, o.draining),
            Kind::Replies(r) => (r.delivery_count, r.credit, false),
            Kind::Inbound { intake, .. } | Kind::Requests { intake, .. } => {
                (intake.delivery_count, intake.credit, false)
            }
        };
        let flow = Flow {
            handle: Some(Handle(handle)),
            delivery_count: Some(delivery_count),
            link_credit: Some(credit),
            available: Some(0),
            drain,
            ..session.flow()
        };
        self.send(channel, Performative::Flow(flow));
    }

    /// Moves a link's queued work along: waiting replies, or a fetch for an
    /// outbound link with credit.
    fn pump(&mut self, channel: u16, handle: u32) {
        let Some(link) = self.sessions.get_mut(&channel).and_then(|s| s.links.get_mut(&handle)) else { return };
        let link_id = link.id;
        match &mut link.kind {
            Kind::Replies(replies) => {
                let mut ready = Vec::new();
                while replies.credit > 0 {
                    let Some(message) = replies.waiting.pop_front() else { break };
                    replies.credit -= 1;
                    replies.delivery_count = replies.delivery_count.wrapping_add(1);
                    ready.push(message);
                }
                for message in ready {
                    self.deliver(channel, handle, &message, true, None);
                }
            }
            Kind::Outbound(outbound) if outbound.credit == 0 => {
                if outbound.draining {
                    self.link_flow_drained(channel, handle);
                }
            }
            Kind::Outbound(Outbound { fetch: Some(fetch), draining, .. }) => {
                if *draining {
                    fetch.poke.notify_one();
                }
            }
            Kind::Outbound(outbound) => {
                let spec = FetchSpec {
                    channel,
                    link: link_id,
                    queue: outbound.queue.clone(),
                    sub: outbound.sub,
                    mode: outbound.mode,
                    want: outbound.credit.min(FETCH_BATCH),
                    now: outbound.draining,
                };
                outbound.fetch = Some(spec.start(self.shared.queue.clone(), self.events.clone()));
            }
            Kind::Inbound { .. } | Kind::Requests { .. } => {}
        }
    }

    /// The answer to a drain: the credit is used up, say so.
    fn link_flow_drained(&mut self, channel: u16, handle: u32) {
        if let Some(outbound) =
            self.sessions.get_mut(&channel).and_then(|s| s.links.get_mut(&handle)).and_then(Link::outbound)
        {
            outbound.delivery_count = outbound.delivery_count.wrapping_add(outbound.credit);
            outbound.credit = 0;
            outbound.draining = true;
        }
        self.link_flow(channel, handle);
        if let Some(outbound) =
            self.sessions.get_mut(&channel).and_then(|s| s.links.get_mut(&handle)).and_then(Link::outbound)
        {
            outbound.draining = false;
        }
    }

    fn on_fetched(&mut self, channel: u16, link_id: u64, result: Result<Vec<Received>, QueueError>) {
        let received = match result {
            Ok(received) => received,
            Err(error) => {
                tracing::warn!(%error, "receive failed");
                Vec::new()
            }
        };
        let found = self.sessions.get_mut(&channel).and_then(|session| {
            session.links.iter_mut().find(|(_, l)| l.id == link_id).map(|(handle, link)| (*handle, link))
        });
        let Some((handle, link)) = found else {
            self.release(received);
            return;
        };
        let Some(outbound) = link.outbound() else { return };
        outbound.fetch = None;
        let (mode, mut extra) = (outbound.mode, Vec::new());
        let mut ready = Vec::new();
        for one in received {
            if outbound.credit > 0 {
                outbound.credit -= 1;
                outbound.delivery_count = outbound.delivery_count.wrapping_add(1);
                ready.push(one);
            } else {
                extra.push(one);
            }
        }
        let draining = outbound.draining;
        self.release(extra);
        for one in ready {
            let (payload, lock) = match mode {
                ReceiveMode::PeekLock => {
                    let locked = Locked { token: one.lock.token(), until_ms: one.locked_until_ms };
                    (message::outgoing(&one.message, Some(locked)), Some(one.lock))
                }
                ReceiveMode::ReceiveAndDelete => (message::outgoing(&one.message, None), None),
            };
            self.deliver(channel, handle, &payload, lock.is_none(), lock.map(|l| (link_id, l)));
        }
        if draining {
            self.link_flow_drained(channel, handle);
        } else {
            self.pump(channel, handle);
        }
    }

    /// Sends one delivery on a link (split into frames as the client's
    /// frame size needs). Unsettled ones are remembered with their lock.
    fn deliver(&mut self, channel: u16, handle: u32, payload: &[u8], settled: bool, lock: Option<(u64, Lock)>) {
        let max_frame = self.peer_max_frame;
        let Some(session) = self.sessions.get_mut(&channel) else { return };
        let delivery = session.next_delivery_id;
        session.next_delivery_id = delivery.wrapping_add(1);
        // The tag is the lock token in .NET's GUID byte order: every SDK swaps it back.
        let tag = match lock {
            Some((_, lock)) => uuid::Uuid::from_bytes(lock.token()).to_bytes_le().to_vec(),
            None => delivery.to_be_bytes().to_vec(),
        };
        if let (false, Some((link, lock))) = (settled, lock) {
            session.unsettled.insert(delivery, Unsettled { link, lock });
        }
        let first = Transfer {
            handle: Handle(handle),
            delivery_id: Some(DeliveryNumber::from(delivery)),
            delivery_tag: Some(Binary::from(tag)),
            message_format: Some(0),
            settled: Some(settled),
            more: true,
            rcv_settle_mode: None,
            state: None,
            resume: false,
            aborted: false,
            batchable: false,
        };
        let mut rest = payload;
        let mut transfer = first;
        loop {
            // Sized with `more` set: the larger of the two encodings.
            let overhead = 8 + serde_amqp::serialized_size(&Performative::Transfer(transfer.clone())).unwrap_or(256);
            let room = max_frame.saturating_sub(overhead).max(1);
            let (chunk, tail) = rest.split_at(rest.len().min(room));
            transfer.more = !tail.is_empty();
            let mut bytes = Vec::with_capacity(chunk.len() + overhead);
            frame::write(&mut bytes, channel, &Performative::Transfer(transfer.clone()), chunk);
            session.blocked.push_back(bytes);
            if tail.is_empty() {
                break;
            }
            rest = tail;
            transfer = Transfer {
                handle: Handle(handle),
                delivery_id: None,
                delivery_tag: None,
                message_format: None,
                settled: None,
                more: true,
                rcv_settle_mode: None,
                state: None,
                resume: false,
                aborted: false,
                batchable: false,
            };
        }
        self.unblock(channel);
    }

    /// Writes transfer frames as far as the client's session window allows.
    fn unblock(&mut self, channel: u16) {
        let Some(session) = self.sessions.get_mut(&channel) else { return };
        while session.remote_incoming_window > 0 {
            let Some(bytes) = session.blocked.pop_front() else { break };
            self.out.extend(bytes);
            session.remote_incoming_window -= 1;
            session.next_outgoing_id = session.next_outgoing_id.wrapping_add(1);
        }
    }

    fn release(&self, received: Vec<Received>) {
        if received.is_empty() {
            return;
        }
        let queue = self.shared.queue.clone();
        tokio::spawn(async move { give_back(&queue, received).await });
    }

    fn on_transfer(&mut self, channel: u16, transfer: Transfer, payload: &[u8]) -> Result<(), Fatal> {
        let limit = self.shared.max_message_bytes;
        let Some(session) = self.sessions.get_mut(&channel) else { return Ok(()) };
        session.next_incoming_id = session.next_incoming_id.wrapping_add(1);
        session.incoming_window = session.incoming_window.saturating_sub(1);
        let refresh = session.incoming_window < INCOMING_WINDOW / 2;
        if refresh {
            session.incoming_window = INCOMING_WINDOW;
        }
        let handle = transfer.handle.0;
        let Some(link) = session.links.get_mut(&handle) else {
            return Err(Fatal::Protocol(format!("a transfer on handle {handle}, which is not attached")));
        };
        let link_id = link.id;
        let partial = match &mut link.kind {
            Kind::Inbound { intake, .. } | Kind::Requests { intake, .. } => &mut intake.partial,
            _ => return Err(Fatal::Protocol("a transfer on a link the client receives on".into())),
        };
        if transfer.aborted {
            *partial = None;
            return Ok(());
        }
        let current = match partial.take() {
            Some(current) => current,
            None => Partial {
                delivery_id: transfer
                    .delivery_id
                    .ok_or_else(|| Fatal::Protocol("a transfer without a delivery-id".into()))?,
                format: transfer.message_format.unwrap_or(0),
                settled: transfer.settled.unwrap_or(false),
                payload: Vec::new(),
                too_large: false,
            },
        };
        let mut current = current;
        current.extend(payload, limit);
        if transfer.more {
            *partial = Some(current);
        } else {
            self.on_delivery(channel, handle, link_id, current);
        }
        if refresh {
            self.session_flow(channel);
        }
        Ok(())
    }

    /// A whole delivery from the client.
    fn on_delivery(&mut self, channel: u16, handle: u32, link_id: u64, delivery: Partial) {
        let Some(link) = self.sessions.get_mut(&channel).and_then(|s| s.links.get_mut(&handle)) else { return };
        let (topped_up, count) = match &mut link.kind {
            Kind::Inbound { intake, .. } | Kind::Requests { intake, .. } => {
                (intake.arrived(INBOUND_CREDIT), intake.delivery_count)
            }
            _ => return,
        };
        match &link.kind {
            Kind::Inbound { queue, .. } => {
                let queue = queue.clone();
                self.store(channel, link_id, queue, delivery);
            }
            Kind::Requests { node, .. } => {
                let node = node.clone();
                if !delivery.settled {
                    self.settle_delivery(channel, delivery.delivery_id, DeliveryState::Accepted(Accepted {}));
                }
                self.on_request(channel, node, &delivery.payload);
            }
            _ => {}
        }
        if topped_up {
            self.grant(channel, handle, count, INBOUND_CREDIT);
        }
    }

    /// Stores a client's message (or batch) durably, then answers.
    fn store(&self, channel: u16, link: u64, queue: String, delivery: Partial) {
        let events = self.events.clone();
        let reject = |condition: ErrorCondition, why: String| {
            DeliveryState::Rejected(Rejected { error: Some(frame::error(condition, why)) })
        };
        let limit = self.shared.max_message_bytes;
        let messages = if delivery.too_large {
            Err(reject(LinkError::MessageSizeExceeded.into(), format!("the message is larger than {limit} bytes")))
        } else {
            message::incoming(&delivery.payload, delivery.format)
                .map_err(|e| reject(AmqpError::DecodeError.into(), e.to_string()))
        };
        let store = self.shared.queue.clone();
        tokio::spawn(async move {
            let outcome = match messages {
                Err(rejected) => rejected,
                Ok(messages) => match store.send(&queue, messages).await {
                    Ok(_) => DeliveryState::Accepted(Accepted {}),
                    Err(error) => {
                        tracing::warn!(%queue, %error, "cannot store a message; refused");
                        reject(AmqpError::ResourceLimitExceeded.into(), error.to_string())
                    }
                },
            };
            let _ = events.send(Event::Stored {
                channel,
                link,
                delivery: delivery.delivery_id,
                settled: delivery.settled,
                outcome,
            });
        });
    }

    fn settle_delivery(&mut self, channel: u16, delivery: u32, state: DeliveryState) {
        // Our role: the receiver of the client's transfers.
        self.send(
            channel,
            Performative::Disposition(Disposition {
                role: Role::Receiver,
                first: DeliveryNumber::from(delivery),
                last: None,
                settled: true,
                state: Some(state),
                batchable: false,
            }),
        );
    }

    fn on_request(&mut self, channel: u16, node: Node, payload: &[u8]) {
        let request = match Request::decode(payload) {
            Ok(request) => request,
            Err(error) => {
                tracing::info!(%error, "undecodable request; ignored");
                return;
            }
        };
        let reply_to = request.reply_to.clone();
        match &node {
            Node::Cbs => {
                let (response, grant) = cbs::put_token(&self.shared.auth, &request);
                if let Some(path) = grant
                    && !self.authorized.contains(&path)
                {
                    self.authorized.push(path);
                }
                let message = response.encode(&request);
                self.on_reply(channel, node, reply_to, message);
            }
            Node::Management { queue, sub } => {
                let (queue_name, sub, store, events) =
                    (queue.clone(), *sub, self.shared.queue.clone(), self.events.clone());
                tokio::spawn(async move {
                    let response: Response = management::handle(&store, &queue_name, sub, &request).await;
                    let message = response.encode(&request);
                    let _ = events.send(Event::Reply { channel, node, reply_to, message });
                });
            }
            Node::Messages { .. } => {}
        }
    }

    /// Sends a reply on the client's receiver link for `node` in this
    /// session, preferring the one whose address is the request's reply-to.
    fn on_reply(&mut self, channel: u16, node: Node, reply_to: Option<String>, message: Vec<u8>) {
        let Some(session) = self.sessions.get_mut(&channel) else { return };
        let mut candidates: Vec<(u32, bool)> = session
            .links
            .iter()
            .filter_map(|(handle, link)| match &link.kind {
                Kind::Replies(r) if r.node == node => Some((*handle, r.address.is_some() && r.address == reply_to)),
                _ => None,
            })
            .collect();
        candidates.sort_by_key(|(handle, exact)| (!exact, *handle));
        let Some((handle, _)) = candidates.first().copied() else {
            tracing::debug!(?node, "a reply with no link to take it; dropped");
            return;
        };
        if let Some(Link { kind: Kind::Replies(replies), .. }) = session.links.get_mut(&handle) {
            replies.waiting.push_back(message);
        }
        self.pump(channel, handle);
    }

    fn on_disposition(&mut self, channel: u16, disposition: Disposition) {
        // Dispositions from the client's sender side concern its own transfers.
        if disposition.role != Role::Receiver {
            return;
        }
        let Some(session) = self.sessions.get_mut(&channel) else { return };
        let (first, last) = (disposition.first, disposition.last.unwrap_or(disposition.first));
        let span = last.wrapping_sub(first);
        let ids: Vec<u32> = if span as usize <= session.unsettled.len() {
            (0..=span).map(|i| first.wrapping_add(i)).filter(|id| session.unsettled.contains_key(id)).collect()
        } else {
            session.unsettled.keys().copied().filter(|id| id.wrapping_sub(first) <= span).collect()
        };
        let Some(state) = disposition.state else { return };
        let (how, echo) = match &state {
            DeliveryState::Accepted(_) => (Settle::Complete, state.clone()),
            DeliveryState::Released(_) => (Settle::Release, state.clone()),
            DeliveryState::Modified(Modified { undeliverable_here: Some(true), .. }) => (Settle::Defer, state.clone()),
            DeliveryState::Modified(_) => {
                (Settle::Abandon { delay: Duration::ZERO, reason: "abandoned by the client".into() }, state.clone())
            }
            DeliveryState::Rejected(Rejected { error }) => {
                let (reason, description) = dead_letter_reason(error.as_ref());
                // A bare Rejected: an echo carrying the error fails Go and Python.
                (Settle::DeadLetter { reason, description }, DeliveryState::Rejected(Rejected { error: None }))
            }
            _ => return,
        };
        let mut work = Vec::new();
        for id in ids {
            if let Some(unsettled) = session.unsettled.remove(&id) {
                work.push((id, unsettled.lock));
            }
        }
        let (queue, events, echoes) = (self.shared.queue.clone(), self.events.clone(), !disposition.settled);
        tokio::spawn(async move {
            for (delivery, lock) in work {
                let result = queue.settle(lock, how.clone()).await;
                let echo = match result {
                    Ok(
                        Settled::Completed
                        | Settled::Abandoned
                        | Settled::DeadLettered
                        | Settled::Released
                        | Settled::Deferred,
                    ) => echo.clone(),
                    Err(error) => {
                        tracing::debug!(%error, "settle refused");
                        let condition = ErrorCondition::Custom(Symbol::from("com.microsoft:message-lock-lost"));
                        DeliveryState::Rejected(Rejected { error: Some(frame::error(condition, error.to_string())) })
                    }
                };
                if echoes {
                    let _ = events.send(Event::Settled { channel, delivery, echo });
                }
            }
        });
    }

    fn on_detach(&mut self, channel: u16, detach: Detach) {
        let handle = detach.handle.0;
        if let Some(session) = self.sessions.get_mut(&channel)
            && let Some(link) = session.links.remove(&handle)
        {
            session.unsettled.retain(|_, u| u.link != link.id);
            tracing::debug!(name = %link.name, "link detached");
        }
        self.send(channel, Performative::Detach(Detach { handle: Handle(handle), closed: detach.closed, error: None }));
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Fetched { channel, link, result } => self.on_fetched(channel, link, result),
            Event::Stored { channel, link, delivery, settled, outcome } => {
                let attached = self.sessions.get(&channel).is_some_and(|s| s.links.values().any(|l| l.id == link));
                if attached && !settled {
                    self.settle_delivery(channel, delivery, outcome);
                }
            }
            Event::Settled { channel, delivery, echo } => {
                if self.sessions.contains_key(&channel) {
                    self.send(
                        channel,
                        Performative::Disposition(Disposition {
                            role: Role::Sender,
                            first: DeliveryNumber::from(delivery),
                            last: None,
                            settled: true,
                            state: Some(echo),
                            batchable: false,
                        }),
                    );
                }
            }
            Event::Reply { channel, node, reply_to, message } => self.on_reply(channel, node, reply_to, message),
        }
    }
}

/// A receive from the queue for one outbound link.
struct FetchSpec {
    channel: u16,
    link: u64,
    queue: String,
    sub: SubQueue,
    mode: ReceiveMode,
    want: u32,
    /// Report after one try even when nothing is there (a drain).
    now: bool,
}

impl FetchSpec {
    /// Receives until something arrives (or, when poked or `now`, after one
    /// more try), and reports it as [`Event::Fetched`]. It ends when its
    /// [`Fetch`] is dropped, but only between receives, never during one:
    /// cut short there, the queue would have locked messages nobody gets
    /// until their lock expires.
    fn start(self, queue: crate::queue::QueueHandle, events: mpsc::UnboundedSender<Event>) -> Fetch {
        let (poke, stop) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        if self.now {
            poke.notify_one();
        }
        let (wake, stopped) = (Arc::clone(&poke), Arc::clone(&stop));
        tokio::spawn(async move {
            let FetchSpec { channel, link, queue: name, sub, mode, want, .. } = self;
            let arrivals = queue.arrivals();
            loop {
                let notified = arrivals.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let result = queue.receive_from(&name, sub, want as usize, mode).await;
                let report = match &result {
                    Ok(got) if got.is_empty() => {
                        tokio::select! {
                            _ = &mut notified => false,
                            _ = tokio::time::sleep(FETCH_POLL) => false,
                            _ = wake.notified() => true,
                            _ = stopped.notified() => return,
                        }
                    }
                    Ok(_) => true,
                    Err(error) => {
                        tracing::warn!(queue = %name, %error, "receive failed; trying again");
                        tokio::select! {
                            _ = tokio::time::sleep(FETCH_POLL) => false,
                            _ = stopped.notified() => return,
                        }
                    }
                };
                if report {
                    let result = match result {
                        Ok(got) if got.is_empty() => queue.receive_from(&name, sub, want as usize, mode).await,
                        other => other,
                    };
                    // A link that went away meanwhile is the connection's to
                    // release; a connection that went away, ours.
                    if let Err(unsent) = events.send(Event::Fetched { channel, link, result })
                        && let Event::Fetched { result: Ok(received), .. } = unsent.0
                    {
                        give_back(&queue, received).await;
                    }
                    return;
                }
            }
        });
        Fetch { poke, stop }
    }
}

/// Releases messages received for a link that cannot take them: visible
/// again at once, this delivery not counted.
async fn give_back(queue: &crate::queue::QueueHandle, received: Vec<Received>) {
    for one in received {
        if let Err(error) = queue.settle(one.lock, Settle::Release).await {
            tracing::debug!(%error, "release failed; the lock will expire");
        }
    }
}

/// The reason and description a dead-lettering client gave (string or
/// symbol keys; either value may be missing or empty).
fn dead_letter_reason(error: Option<&AmqpErrorBody>) -> (String, String) {
    let Some(error) = error else { return (String::new(), String::new()) };
    let info = |key: &str| {
        error
            .info
            .as_ref()
            .and_then(|info| info.iter().find(|(k, _)| k.as_str() == key).map(|(_, v)| v))
            .and_then(super::wire::text)
            .unwrap_or_default()
            .to_string()
    };
    let reason = info("DeadLetterReason");
    let description = info("DeadLetterErrorDescription");
    match (reason.is_empty(), &error.condition) {
        (true, ErrorCondition::Custom(c)) if c.as_str() != "com.microsoft:dead-letter" => {
            (c.as_str().to_string(), description)
        }
        _ => (reason, description),
    }
}

fn name(performative: &Performative) -> &'static str {
    match performative {
        Performative::Open(_) => "open",
        Performative::Begin(_) => "begin",
        Performative::Attach(_) => "attach",
        Performative::Flow(_) => "flow",
        Performative::Transfer(_) => "transfer",
        Performative::Disposition(_) => "disposition",
        Performative::Detach(_) => "detach",
        Performative::End(_) => "end",
        Performative::Close(_) => "close",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{QueueHandle, StoreOptions};
    use crate::servicebus::{Auth, Entities};

    /// A client's end of one connection to [`serve`], over loopback.
    struct Client {
        stream: TcpStream,
        input: BytesMut,
        _shutdown: watch::Sender<bool>,
        _dir: tempfile::TempDir,
    }

    impl Client {
        async fn connect() -> Client {
            let dir = tempfile::tempdir().unwrap();
            let queue = QueueHandle::open(&dir.path().join("q.db"), StoreOptions::default()).unwrap();
            let shared = Arc::new(Shared {
                queue,
                entities: Entities::default(),
                auth: Auth::AcceptAny,
                max_message_bytes: 1024,
            });
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let stream = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            let (shutdown, stopped) = watch::channel(false);
            tokio::spawn(serve(accepted, shared, stopped));
            Client { stream, input: BytesMut::new(), _shutdown: shutdown, _dir: dir }
        }

        async fn send(&mut self, channel: u16, performative: Performative) {
            let mut out = Vec::new();
            frame::write(&mut out, channel, &performative, &[]);
            self.stream.write_all(&out).await.unwrap();
        }

        async fn next(&mut self) -> Performative {
            loop {
                match frame::take(&mut self.input, MAX_FRAME as usize).unwrap() {
                    Some(Frame::Amqp { performative, .. }) => return performative,
                    Some(other) => panic!("{other:?}"),
                    None => {}
                }
                let read = tokio::time::timeout(Duration::from_secs(5), self.stream.read_buf(&mut self.input));
                assert!(read.await.unwrap().unwrap() > 0, "the endpoint closed the socket");
            }
        }

        /// Header and Open, both ways.
        async fn open(&mut self) {
            self.stream.write_all(&frame::AMQP_HEADER).await.unwrap();
            self.send(0, open()).await;
            self.header().await;
            assert!(matches!(self.next().await, Performative::Open(_)));
        }

        async fn header(&mut self) {
            while self.input.len() < 8 {
                self.stream.read_buf(&mut self.input).await.unwrap();
            }
            assert_eq!(self.input.split_to(8)[..], frame::AMQP_HEADER);
        }
    }

    fn open() -> Performative {
        Performative::Open(Open {
            container_id: "test".into(),
            hostname: None,
            max_frame_size: MaxFrameSize(MAX_FRAME),
            channel_max: ChannelMax(16),
            idle_time_out: None,
            outgoing_locales: None,
            incoming_locales: None,
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    fn begin() -> Performative {
        Performative::Begin(Begin {
            remote_channel: None,
            next_outgoing_id: 0,
            incoming_window: 100,
            outgoing_window: 100,
            handle_max: Handle(16),
            offered_capabilities: None,
            desired_capabilities: None,
            properties: None,
        })
    }

    /// The one message of queue `q`, once it can be received again (within
    /// 5 s, far less than its lock).
    async fn given_back(queue: &QueueHandle, otherwise: &str) -> Received {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let got = queue.receive_from("q", SubQueue::Active, 1, ReceiveMode::PeekLock).await.unwrap();
            if let Some(one) = got.into_iter().next() {
                return one;
            }
            assert!(Instant::now() < deadline, "{otherwise}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_fetch_dropped_during_a_receive_gives_its_messages_back() {
        let dir = tempfile::tempdir().unwrap();
        let queue = QueueHandle::open(&dir.path().join("q.db"), StoreOptions::default()).unwrap();
        queue.send("q", vec![crate::queue::NewMessage::default()]).await.unwrap();
        let (events, gone) = mpsc::unbounded_channel();
        drop(gone); // the connection, too, is gone by the time it reports
        let spec = FetchSpec {
            channel: 0,
            link: 1,
            queue: "q".into(),
            sub: SubQueue::Active,
            mode: ReceiveMode::PeekLock,
            want: 1,
            now: false,
        };
        let fetch = spec.start(queue.clone(), events);
        // Let the fetch send its receive to the queue, then drop it (the link detached).
        tokio::task::yield_now().await;
        drop(fetch);
        let again = given_back(&queue, "the message stayed locked by a fetch nobody heard back from").await;
        assert_eq!(again.message.delivery_count, 1, "the fetch's delivery did not count");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_that_ends_gives_back_what_it_fetched_but_never_sent() {
        let dir = tempfile::tempdir().unwrap();
        let queue = QueueHandle::open(&dir.path().join("q.db"), StoreOptions::default()).unwrap();
        queue.send("q", vec![crate::queue::NewMessage::default()]).await.unwrap();
        let fetched = queue.receive_from("q", SubQueue::Active, 1, ReceiveMode::PeekLock).await.unwrap();
        assert_eq!(fetched.len(), 1);
        let (events, rx) = mpsc::unbounded_channel();
        events.send(Event::Fetched { channel: 0, link: 1, result: Ok(fetched) }).unwrap();
        // However the run loop ends (here: before it read its inbox), the inbox goes with it.
        drop(Inbox { events: rx, queue: queue.clone() });
        let again = given_back(&queue, "the fetched message stayed locked after its connection ended").await;
        assert_eq!(again.message.delivery_count, 1, "a delivery the client never saw was counted");
    }

    #[tokio::test]
    async fn frames_pipelined_behind_the_open_are_answered() {
        // pyamqp writes open, begin and its attaches at once, then waits.
        let mut client = Client::connect().await;
        let mut burst = frame::AMQP_HEADER.to_vec();
        frame::write(&mut burst, 0, &open(), &[]);
        frame::write(&mut burst, 3, &begin(), &[]);
        client.stream.write_all(&burst).await.unwrap();
        client.header().await;
        assert!(matches!(client.next().await, Performative::Open(_)));
        assert!(matches!(client.next().await, Performative::Begin(Begin { remote_channel: Some(3), .. })));
    }

    #[tokio::test]
    async fn a_detach_after_end_is_tolerated() {
        // pyamqp ends its session, then detaches its $management links on it.
        let mut client = Client::connect().await;
        client.open().await;
        client.send(1, begin()).await;
        assert!(matches!(client.next().await, Performative::Begin(_)));
        client.send(1, Performative::End(End { error: None })).await;
        assert!(matches!(client.next().await, Performative::End(_)));
        client.send(1, Performative::Detach(Detach { handle: Handle(4), closed: false, error: None })).await;
        client.send(0, Performative::Close(Close { error: None })).await;
        match client.next().await {
            Performative::Close(Close { error }) => assert!(error.is_none(), "{error:?}"),
            other => panic!("{other:?}"),
        }
    }
}
