//! One AMQP connection: the protocol header, the handshake (start, tune, open), then frames
//! read in batches and dispatched to channels; heartbeats; closing both ways. Errors are data
//! (`AmqpError`): a channel error closes that channel, anything else the connection.

use super::channel::{Channel, Session, Settle};
use super::codec::{
    self, FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, FrameError, RawFrame,
};
use super::writer::{ConnectionOutput, Outbound, run_writer};
use crate::auth;
use crate::broker::Broker;
use crate::broker::connections::{ConnectionDetails, ConnectionInfo, ConnectionState, Traffic};
use crate::broker::stats::MessageStats;
use crate::error::{
    AmqpError, AmqpResult, CHANNEL_ERROR, COMMAND_INVALID, CONNECTION_FORCED, FRAME_ERROR,
    NOT_ALLOWED, NOT_IMPLEMENTED, REPLY_SUCCESS, Scope, UNEXPECTED_FRAME, precondition_failed,
};
use crate::store::durability::ProgressWatch;
use amq_protocol::protocol::{AMQPClass, channel, connection};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{Instant, timeout, timeout_at};

/// How long the broker waits for `connection.close-ok` after sending `connection.close`.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the broker keeps a socket open after answering the client's `connection.close`,
/// waiting for the client to drop it (RabbitMQ's 30 s closing timeout).
const CLOSED_LINGER: Duration = Duration::from_secs(30);
/// How often unacknowledged deliveries are checked against the consumer timeout.
const ACK_CHECK: Duration = Duration::from_millis(500);
/// How often a connection held by flow control looks again whether the queue still holds it
/// (its consumers may have stopped taking, or the queue gone).
const FLOW_RECHECK: Duration = Duration::from_millis(50);
/// Frame size limit before tuning (connection.start-ok may carry large client properties).
const HANDSHAKE_FRAME_MAX: u32 = 131_072;
/// How much a connection blocked by an alarm is read ahead of the publish it stopped at: its
/// heartbeats and its close are heard, while its publishes cost no more than this.
const BLOCKED_READ_AHEAD: usize = 64 * 1024;
/// How often the socket of a blocked connection read ahead that far is looked at for a close.
const BLOCKED_PROBE: Duration = Duration::from_millis(250);
/// How often such a connection is sent a heartbeat, to make a client that is gone reset it.
const BLOCKED_NUDGE: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitStartOk,
    AwaitTuneOk,
    AwaitOpen,
    Open,
    /// We sent `connection.close`; waiting for `close-ok` until the deadline.
    Closing(Instant),
    /// We answered the client's `connection.close`; until it drops the socket (or the
    /// deadline), each further `connection.close` gets its `close-ok` too, as RabbitMQ does:
    /// several threads of a client may close the same connection at once, each waiting for
    /// its own reply.
    CloseOkSent(Instant),
    Closed,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::AwaitStartOk => "starting",
            Phase::AwaitTuneOk => "tuning",
            Phase::AwaitOpen => "opening",
            Phase::Open => "running",
            Phase::Closing(_) | Phase::CloseOkSent(_) => "closing",
            Phase::Closed => "closed",
        }
    }
}

/// What the client said about itself in `connection.start-ok`.
#[derive(Debug, Default, Clone)]
struct ClientCapabilities {
    cancel_notify: bool,
    auth_failure_close: bool,
    blocked: bool,
}

struct Connection {
    broker: Arc<Broker>,
    peer: SocketAddr,
    local: SocketAddr,
    id: u64,
    out: Arc<ConnectionOutput>,
    heartbeat: Arc<AtomicU32>,
    phase: Phase,
    frame_max: u32,
    channel_max: u16,
    capabilities: ClientCapabilities,
    user: Option<String>,
    session: Option<Session>,
    channels: HashMap<u16, Channel>,
    /// Channels that published since confirms were last flushed.
    dirty: Vec<u16>,
    /// Channels with confirms (or a commit-ok) waiting for a flush round.
    waiting: Vec<u16>,
    /// This connection has published: alarms block it.
    published: bool,
    /// We sent `connection.blocked` and owe a `connection.unblocked`.
    blocked: bool,
    client_properties: FieldTable,
    auth_mechanism: String,
    /// TLS protocol version and cipher suite, for a connection over TLS.
    tls: Option<(String, String)>,
    traffic: Arc<Traffic>,
    /// What the broker's registry shows of this connection, once open.
    info: Option<Arc<ConnectionInfo>>,
    /// Set from outside (management API, vhost deletion) to close this connection.
    closed: Option<watch::Receiver<Option<String>>>,
}

/// Serves one client socket until it closes. Returns when the connection is over and every
/// resource it held (channels, consumers, exclusive queues) is released.
/// `tls` is the protocol version and cipher suite of a TLS connection.
pub async fn serve<S>(
    stream: S,
    peer: SocketAddr,
    local: SocketAddr,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
    tls: Option<(String, String)>,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    serve_halves(reader, writer, peer, local, broker, shutdown, tls).await;
}

/// The read half of a client's stream.
trait ClientReader: AsyncRead + Unpin + Send + 'static {
    /// A duplicate of the socket's descriptor, to watch for the client's close while the
    /// stream is not read (none where the stream does not show its socket).
    fn socket(&self) -> Option<OwnedFd> {
        None
    }
}

impl ClientReader for tokio::net::tcp::OwnedReadHalf {
    fn socket(&self) -> Option<OwnedFd> {
        self.as_ref().as_fd().try_clone_to_owned().ok()
    }
}

impl<S: AsyncRead + Send + 'static> ClientReader for tokio::io::ReadHalf<S> {}

/// [`serve`] for a plain TCP socket, whose halves need no lock between them.
pub async fn serve_tcp(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
) {
    let local = stream.local_addr().unwrap_or(peer);
    let (reader, writer) = stream.into_split();
    serve_halves(reader, writer, peer, local, broker, shutdown, None).await;
}

async fn serve_halves<R, W>(
    mut reader: R,
    mut writer: W,
    peer: SocketAddr,
    local: SocketAddr,
    broker: Arc<Broker>,
    shutdown: watch::Receiver<bool>,
    tls: Option<(String, String)>,
) where
    R: ClientReader,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut header = [0u8; 8];
    let handshake = Duration::from_secs(broker.config.handshake_timeout);
    match timeout(handshake, reader.read_exact(&mut header)).await {
        Ok(Ok(_)) if &header == codec::PROTOCOL_HEADER => {}
        Ok(Ok(_)) => {
            tracing::info!(%peer, header = ?Bytes::copy_from_slice(&header), "unsupported protocol header, closing");
            let _ = writer.write_all(codec::PROTOCOL_HEADER).await;
            let _ = writer.shutdown().await;
            return;
        }
        _ => {
            tracing::debug!(%peer, "no protocol header before timeout or close");
            return;
        }
    }
    let (out, rx) = ConnectionOutput::new(HANDSHAKE_FRAME_MAX);
    let heartbeat = Arc::new(AtomicU32::new(0));
    let traffic = Arc::new(Traffic::default());
    traffic.received(header.len());
    let writer_task = tokio::spawn(run_writer(
        writer,
        out.clone(),
        rx,
        heartbeat.clone(),
        traffic.clone(),
    ));
    let mut conn = Connection {
        id: broker.next_connection_id(),
        broker,
        peer,
        local,
        out,
        heartbeat,
        phase: Phase::AwaitStartOk,
        frame_max: HANDSHAKE_FRAME_MAX,
        channel_max: 0,
        capabilities: ClientCapabilities::default(),
        user: None,
        session: None,
        channels: HashMap::new(),
        dirty: Vec::new(),
        waiting: Vec::new(),
        published: false,
        blocked: false,
        client_properties: FieldTable::default(),
        auth_mechanism: String::new(),
        tls,
        traffic,
        info: None,
        closed: None,
    };
    conn.send_start();
    conn.run(&mut reader, shutdown, handshake).await;
    conn.cleanup();
    conn.out.send(Outbound::Close);
    // What is still queued is flushed for a client that reads it; one that does not cannot
    // keep the socket open.
    let mut writer_task = writer_task;
    if timeout(CLOSE_TIMEOUT, &mut writer_task).await.is_err() {
        writer_task.abort();
    }
}

impl Connection {
    fn send_start(&self) {
        let mut caps = FieldTable::default();
        for cap in [
            "publisher_confirms",
            "exchange_exchange_bindings",
            "basic.nack",
            "consumer_cancel_notify",
            "connection.blocked",
            "consumer_priorities",
            "authentication_failure_close",
            "per_consumer_qos",
            "direct_reply_to",
        ] {
            caps.insert(cap.into(), AMQPValue::Boolean(true));
        }
        let mut props = FieldTable::default();
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
        props.insert("cluster_name".into(), text(&self.broker.cluster_name()));
        props.insert("copyright".into(), text("Copyright (c) the Warren authors"));
        props.insert(
            "information".into(),
            text("Licensed under the Apache License 2.0"),
        );
        props.insert("platform".into(), text("Rust"));
        props.insert("product".into(), text("Warren"));
        props.insert("version".into(), text(env!("CARGO_PKG_VERSION")));
        self.out.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                version_major: 0,
                version_minor: 9,
                server_properties: props,
                mechanisms: "AMQPLAIN PLAIN".into(),
                locales: "en_US".into(),
            })),
        );
    }

    async fn run<R: ClientReader>(
        &mut self,
        reader: &mut R,
        mut shutdown: watch::Receiver<bool>,
        handshake: Duration,
    ) {
        let mut buf = BytesMut::with_capacity(64 * 1024);
        let handshake_deadline = Instant::now() + handshake;
        let mut durable = ProgressWatch::new(&self.broker.storage);
        let mut alarms = self.broker.alarms.subscribe();
        // Unacknowledged deliveries are checked against the consumer timeout once a second.
        let mut ack_check = tokio::time::interval(ACK_CHECK);
        ack_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The heartbeat deadline counts from the last bytes the client sent, not from the
        // last turn of this loop (timers turn it too).
        let mut last_heard = Instant::now();
        // When a heartbeat was last sent to a blocked client to see whether it is still there.
        let mut last_nudge = Instant::now();
        // The socket, watched while the connection is blocked and not read (taken then only:
        // a descriptor more for every connection would halve how many the node can take).
        let mut probe: Option<OwnedFd> = None;
        loop {
            if self.phase == Phase::Closed {
                return;
            }
            // Everything already buffered is handled before reading more, except that during
            // an alarm a publish is left unread: the connection blocks before it.
            let alarm_on = alarms.borrow().any();
            loop {
                if alarm_on && self.phase == Phase::Open && codec::peek_is_publish(&buf) {
                    self.published = true;
                    break;
                }
                match codec::next_frame(&mut buf, self.frame_max) {
                    Ok(Some(frame)) => {
                        if let Err(e) = self.handle_frame(frame) {
                            self.fail(e);
                        }
                        if self.phase == Phase::Closed {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        self.frame_error(e);
                        return;
                    }
                }
            }
            self.flush_confirms();
            if self.phase == Phase::Open && self.published {
                let alarm = *alarms.borrow_and_update();
                if alarm.any() {
                    // A publisher during an alarm: stop reading it until the alarm clears.
                    if !self.blocked && self.capabilities.blocked {
                        self.out.method(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::Blocked(
                                connection::Blocked {
                                    reason: alarm.reason().into(),
                                },
                            )),
                        );
                    }
                    self.blocked = true;
                    self.set_state(ConnectionState::Blocked);
                    // Its publishes wait unread in `buf`, but the client is still read a
                    // little ahead, to hear its heartbeats and its close; past that, the
                    // socket itself is watched, so that a publisher that gives up and goes
                    // away does not leave its connection behind.
                    let read_ahead = buf.len() < BLOCKED_READ_AHEAD;
                    if read_ahead {
                        buf.reserve(16 * 1024);
                    } else {
                        // Its bytes are waiting on us: the client is as good as heard (as
                        // RabbitMQ, which checks no heartbeats of a blocked publisher; one that
                        // vanished is found by the heartbeats sent to it failing).
                        last_heard = Instant::now();
                        if probe.is_none() {
                            probe = reader.socket();
                        }
                    }
                    let deadline = self.heartbeat_deadline(last_heard);
                    // No more than the read-ahead, however much room `buf` has spare.
                    let room = BLOCKED_READ_AHEAD.saturating_sub(buf.len()) as u64;
                    let read = async {
                        let mut ahead = (&mut *reader).take(room);
                        match deadline {
                            Some(d) => timeout_at(d, ahead.read_buf(&mut buf)).await,
                            None => Ok(ahead.read_buf(&mut buf).await),
                        }
                    };
                    tokio::select! {
                        _ = alarms.changed() => {}
                        _ = shutdown.changed() => self.force_close(),
                        () = durable.changed(), if !self.waiting.is_empty() => self.flush_waiting(),
                        reason = closed_from_outside(&mut self.closed) => {
                            self.close_from_outside(reason);
                        }
                        _ = ack_check.tick() => self.check_consumer_timeouts(),
                        r = read, if read_ahead => match r {
                            Ok(Ok(0)) | Ok(Err(_)) => {
                                tracing::debug!(peer = %self.peer, "blocked client closed the socket");
                                return;
                            }
                            Ok(Ok(n)) => {
                                last_heard = Instant::now();
                                self.traffic.received(n);
                            }
                            Err(_) => {
                                tracing::warn!(peer = %self.peer, "missed heartbeats from blocked client, closing");
                                return;
                            }
                        },
                        () = tokio::time::sleep(BLOCKED_PROBE), if !read_ahead => {
                            if peer_gone(probe.as_ref()) || self.out.is_closed() {
                                tracing::debug!(peer = %self.peer, "blocked client closed the socket");
                                return;
                            }
                            // A client that closed with publishes still unsent has its close
                            // stuck behind them, unread here; a write makes its system answer
                            // with a reset, which the probe (or the writer, failing) sees. A
                            // heartbeat is harmless to a client that is still there.
                            if last_nudge.elapsed() >= BLOCKED_NUDGE {
                                last_nudge = Instant::now();
                                let mut frame = BytesMut::new();
                                codec::encode_heartbeat(&mut frame);
                                self.out.send(Outbound::Raw(frame.freeze()));
                            }
                        }
                    }
                    if self.phase == Phase::Closed {
                        return;
                    }
                    continue;
                }
                if std::mem::take(&mut self.blocked) {
                    probe = None;
                    self.set_state(ConnectionState::Running);
                    if self.capabilities.blocked {
                        self.out.method(
                            0,
                            AMQPClass::Connection(connection::AMQPMethod::Unblocked(
                                connection::Unblocked {},
                            )),
                        );
                    }
                }
            }
            let flow = self
                .session
                .as_mut()
                .map(|s| std::mem::take(&mut s.flow))
                .unwrap_or_default();
            let holder = if self.phase == Phase::Open && self.broker.config.flow_control {
                flow.iter().find(|q| q.holds_publisher(self.id)).cloned()
            } else {
                None
            };
            if holder.is_none() && !flow.is_empty() {
                // Held before (or about to be), and no queue holds us now.
                self.set_state(ConnectionState::Running);
            }
            if let Some(q) = holder {
                // Flow control: a queue this connection feeds has its backlog on disk while
                // consumers on other connections take from it. Stop reading the client until
                // they bring it back into memory, so it publishes at their pace, not paging.
                let held = {
                    let drained = q.backlog_drained();
                    tokio::pin!(drained);
                    drained.as_mut().enable();
                    // Again, now that a wake-up cannot be missed.
                    let held = q.holds_publisher(self.id);
                    if held {
                        self.set_state(ConnectionState::Flow);
                        tokio::select! {
                            () = &mut drained => {}
                            () = tokio::time::sleep(FLOW_RECHECK) => {}
                            _ = shutdown.changed() => self.force_close(),
                            () = durable.changed(), if !self.waiting.is_empty() => self.flush_waiting(),
                            reason = closed_from_outside(&mut self.closed) => {
                                self.close_from_outside(reason);
                            }
                            _ = ack_check.tick() => self.check_consumer_timeouts(),
                        }
                    }
                    held
                };
                if held {
                    // Look again before reading: the queues may still hold us.
                    if let Some(s) = self.session.as_mut() {
                        s.flow = flow;
                    }
                    // The client could not be heard while it was not read.
                    last_heard = Instant::now();
                    if self.phase == Phase::Closed {
                        return;
                    }
                    continue;
                }
                self.set_state(ConnectionState::Running);
            }
            // After close-ok nothing more is answered to a client that does not read: it is
            // read on, and dropped when the linger ends.
            if self.out.is_backed_up() && !matches!(self.phase, Phase::CloseOkSent(_)) {
                // The client is not reading what we send: stop reading what it sends. A
                // closing connection still ends on time, and one closed from outside closes.
                let deadline = match self.phase {
                    Phase::Open => None,
                    Phase::Closing(deadline) | Phase::CloseOkSent(deadline) => Some(deadline),
                    _ => Some(handshake_deadline),
                };
                let ends = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    () = self.out.wait_drained() => {}
                    _ = shutdown.changed() => { self.force_close(); }
                    reason = closed_from_outside(&mut self.closed), if self.phase == Phase::Open => {
                        self.close_from_outside(reason);
                    }
                    () = ends => return,
                }
                continue;
            }
            let deadline = match self.phase {
                Phase::Open => self.heartbeat_deadline(last_heard),
                Phase::Closing(deadline) | Phase::CloseOkSent(deadline) => Some(deadline),
                _ => Some(handshake_deadline),
            };
            buf.reserve(16 * 1024);
            let read = async {
                match deadline {
                    Some(d) => timeout_at(d, reader.read_buf(&mut buf)).await,
                    None => Ok(reader.read_buf(&mut buf).await),
                }
            };
            tokio::select! {
                r = read => match r {
                    Ok(Ok(0)) | Ok(Err(_)) => {
                        if !matches!(self.phase, Phase::Closing(_) | Phase::CloseOkSent(_)) {
                            tracing::debug!(peer = %self.peer, "client closed the socket");
                        }
                        return;
                    }
                    Ok(Ok(n)) => {
                        last_heard = Instant::now();
                        self.traffic.received(n);
                    }
                    Err(_) => {
                        match self.phase {
                            Phase::Open => tracing::warn!(peer = %self.peer, "missed heartbeats from client, closing"),
                            Phase::Closing(_) | Phase::CloseOkSent(_) => {}
                            _ => tracing::info!(peer = %self.peer, "handshake timed out"),
                        }
                        return;
                    }
                },
                _ = shutdown.changed(), if !matches!(self.phase, Phase::Closing(_)) => self.force_close(),
                () = durable.changed(), if !self.waiting.is_empty() => self.flush_waiting(),
                reason = closed_from_outside(&mut self.closed), if matches!(self.phase, Phase::Open | Phase::CloseOkSent(_)) => {
                    self.close_from_outside(reason);
                }
                _ = ack_check.tick(), if self.phase == Phase::Open => self.check_consumer_timeouts(),
            }
        }
    }

    /// When an open connection whose client was last heard at `last_heard` has missed its
    /// heartbeats (two intervals of silence, as RabbitMQ counts them); never without them.
    fn heartbeat_deadline(&self, last_heard: Instant) -> Option<Instant> {
        match self.heartbeat.load(Ordering::Relaxed) {
            0 => None,
            hb => Some(last_heard + Duration::from_secs(2 * u64::from(hb))),
        }
    }

    /// Closes, with 406 as RabbitMQ does, each channel holding a delivery unacknowledged for
    /// longer than the consumer timeout; closing it requeues its deliveries.
    fn check_consumer_timeouts(&mut self) {
        let now = crate::broker::message::now_ms();
        let default = self.broker.config.consumer_timeout;
        let overdue: Vec<(u16, u64)> = self
            .channels
            .iter()
            .filter(|(_, c)| !c.closing)
            .filter_map(|(id, c)| Some((*id, c.shared.overdue(now, default)?)))
            .collect();
        for (id, timeout) in overdue {
            tracing::warn!(peer = %self.peer, channel = id, timeout_ms = timeout, "consumer timeout: closing the channel");
            let mut e = precondition_failed(format!(
                "delivery acknowledgement on channel {id} timed out. Timeout value used: {timeout} ms. This timeout value can be configured, see consumers doc guide to learn more"
            ));
            e.channel = id;
            self.fail(e);
        }
    }

    /// Closed through the management API or by its vhost's deletion: 320 with the reason.
    /// A connection whose vhost went down is dropped at once, as RabbitMQ drops it, so its
    /// client hears of it before the deletion is answered.
    fn close_from_outside(&mut self, reason: String) {
        if self.phase != Phase::Open {
            // The client's own close was answered already: nothing more to say.
            self.phase = Phase::Closed;
            return;
        }
        let at_once = self.info.as_ref().is_some_and(|i| i.closes_at_once());
        self.fail(AmqpError::new(CONNECTION_FORCED, reason));
        if at_once {
            self.phase = Phase::Closed;
        }
    }

    /// Broker shutdown: tell the client why, then wait a little for its close-ok.
    fn force_close(&mut self) {
        if self.phase == Phase::Open {
            self.fail(AmqpError::new(
                CONNECTION_FORCED,
                "broker forced connection closure with reason 'shutdown'",
            ));
        } else {
            self.phase = Phase::Closed;
        }
    }

    fn handle_frame(&mut self, frame: RawFrame) -> AmqpResult<()> {
        if let Phase::CloseOkSent(_) = self.phase {
            // The connection is over: only another `connection.close` gets an answer, and
            // only while the client reads them: one sending closes without reading must not
            // pile up answers.
            if frame.kind == FRAME_METHOD
                && !self.out.is_backed_up()
                && frame.channel == 0
                && let Ok(AMQPClass::Connection(connection::AMQPMethod::Close(_))) =
                    codec::decode_method(&frame.payload)
            {
                self.send_close_ok();
            }
            return Ok(());
        }
        if let Phase::Closing(_) = self.phase {
            // Only the close handshake matters now.
            if frame.kind == FRAME_METHOD && frame.channel == 0 {
                match codec::decode_method(&frame.payload) {
                    Ok(AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))) => {
                        self.phase = Phase::Closed;
                    }
                    Ok(AMQPClass::Connection(connection::AMQPMethod::Close(_))) => {
                        self.send_close_ok();
                        self.phase = Phase::Closed;
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        match frame.kind {
            FRAME_METHOD => self.handle_method_frame(frame),
            FRAME_HEADER | FRAME_BODY => self.handle_content_frame(frame),
            FRAME_HEARTBEAT if frame.channel == 0 && frame.payload.is_empty() => Ok(()),
            FRAME_HEARTBEAT if frame.channel == 0 => Err(AmqpError::new(
                FRAME_ERROR,
                format!("type 8, {}: unknown_frame", snippet(&frame.payload)),
            )),
            FRAME_HEARTBEAT => Err(AmqpError::new(
                UNEXPECTED_FRAME,
                format!("type 8, {}", snippet(&frame.payload)),
            )),
            kind => Err(AmqpError::new(
                FRAME_ERROR,
                format!("type {kind}, {}: unknown_frame", snippet(&frame.payload)),
            )),
        }
    }

    fn handle_method_frame(&mut self, frame: RawFrame) -> AmqpResult<()> {
        let ch = frame.channel;
        if ch != 0 && self.phase == Phase::Open && codec::is_publish(&frame.payload) {
            self.published = true;
            let channel = self.open_channel(ch).map_err(|e| e.on(60, 40))?;
            if channel.closing {
                return Ok(());
            }
            let args = codec::decode_publish(&frame.payload).ok_or_else(|| {
                AmqpError::new(
                    FRAME_ERROR,
                    format!("cannot decode {}", erlang_binary(&frame.payload[4..])),
                )
                .on(60, 40)
            })?;
            return channel.on_publish(args).map_err(|e| with_channel(e, ch));
        }
        if ch != 0
            && self.phase == Phase::Open
            && let Some(ack) = codec::decode_ack(&frame.payload)
        {
            // Consumers' acks, the other per-message method, skip the generic decoder too.
            let method_id = frame.payload[3].into();
            let channel = self.open_channel(ch).map_err(|e| e.on(60, method_id))?;
            if channel.closing {
                return Ok(());
            }
            let how = match ack.kind {
                codec::AckKind::Ack => Settle::Ack,
                codec::AckKind::Reject | codec::AckKind::Nack => Settle::Reject {
                    requeue: ack.requeue,
                },
            };
            return channel
                .expect_method()
                .and_then(|()| channel.settle(ack.delivery_tag, ack.multiple, how))
                .map_err(|e| e.on(60, method_id).in_channel(ch));
        }
        // basic.qos carries a prefetch_size that the generated codec does not keep.
        if frame.payload.len() >= 8 && frame.payload[..4] == [0, 60, 0, 10] {
            let size = u32::from_be_bytes(frame.payload[4..8].try_into().unwrap_or([0; 4]));
            if size != 0 {
                return Err(
                    AmqpError::new(NOT_IMPLEMENTED, format!("prefetch_size!=0 ({size})"))
                        .on(60, 10),
                );
            }
        }
        let method = codec::decode_method(&frame.payload).map_err(|e| match e {
            // RabbitMQ drops the connection without a word here; Warren says why.
            codec::MethodError::Unknown {
                class_id,
                method_id,
            } => AmqpError::new(
                NOT_IMPLEMENTED,
                format!("unknown method {{{class_id},{method_id}}}"),
            )
            .on(class_id, method_id),
            codec::MethodError::Syntax {
                class_id,
                method_id,
            } => AmqpError::new(
                FRAME_ERROR,
                format!("cannot decode {}", erlang_binary(&frame.payload[4..])),
            )
            .on(class_id, method_id),
            // RabbitMQ has no limit; a malformed frame is the closest of its errors.
            codec::MethodError::TooDeep {
                class_id,
                method_id,
            } => AmqpError::new(
                FRAME_ERROR,
                format!(
                    "field table nested deeper than {} levels",
                    codec::MAX_TABLE_DEPTH
                ),
            )
            .on(class_id, method_id),
            codec::MethodError::Truncated => AmqpError::new(
                FRAME_ERROR,
                format!("type 1, {}: unknown_frame", snippet(&frame.payload)),
            ),
        })?;
        if ch == 0 {
            return self.handle_connection_method(method);
        }
        if self.phase != Phase::Open {
            return Err(unexpected_in(self.phase)
                .on(method.get_amqp_class_id(), method.get_amqp_method_id()));
        }
        self.handle_channel_method(ch, method)
            .map_err(|e| with_channel(e, ch))
    }

    fn open_channel(&mut self, ch: u16) -> AmqpResult<&mut Channel> {
        self.channels
            .get_mut(&ch)
            .ok_or_else(|| AmqpError::new(CHANNEL_ERROR, "expected 'channel.open'"))
    }

    fn handle_channel_method(&mut self, ch: u16, method: AMQPClass) -> AmqpResult<()> {
        let ids = (method.get_amqp_class_id(), method.get_amqp_method_id());
        if !self.channels.contains_key(&ch) {
            return match method {
                AMQPClass::Channel(channel::AMQPMethod::Open(_)) => {
                    if self.channels.len() >= usize::from(self.channel_max) {
                        return Err(AmqpError::new(
                            NOT_ALLOWED,
                            format!(
                                "number of channels opened ({}) has reached the negotiated channel_max ({})",
                                self.channels.len(),
                                self.channel_max
                            ),
                        ));
                    }
                    let session = self
                        .session
                        .as_ref()
                        .expect("open connections have a session");
                    let channel = Channel::new(ch, session);
                    if let Some(info) = &self.info {
                        self.broker
                            .connections
                            .add_channel(info, ch, channel.shared.clone());
                        MessageStats::bump(&self.broker.churn.channel_created);
                    }
                    self.channels.insert(ch, channel);
                    self.out.method(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                    );
                    Ok(())
                }
                _ => Err(AmqpError::new(CHANNEL_ERROR, "expected 'channel.open'").on(ids.0, ids.1)),
            };
        }
        let session = self
            .session
            .as_mut()
            .expect("open connections have a session");
        let channel = self.channels.get_mut(&ch).expect("checked above");
        if channel.closing {
            match method {
                AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                    self.forget_channel(ch);
                }
                AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                    self.out.method(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    );
                    self.forget_channel(ch);
                }
                _ => {}
            }
            return Ok(());
        }
        channel.expect_method()?;
        match method {
            AMQPClass::Channel(channel::AMQPMethod::Open(_)) => {
                Err(AmqpError::new(CHANNEL_ERROR, "second 'channel.open' seen").on(ids.0, ids.1))
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                channel.close(session);
                self.forget_channel(ch);
                self.out.method(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                );
                Ok(())
            }
            method => {
                let publishes = channel.confirms.is_some() || channel.tx.is_some();
                channel.handle_method(session, method)?;
                if publishes && !self.dirty.contains(&ch) {
                    self.dirty.push(ch);
                }
                Ok(())
            }
        }
    }

    /// Drops a closed channel, moving its counters into the node's totals.
    fn forget_channel(&mut self, ch: u16) {
        if self.channels.remove(&ch).is_some()
            && let Some(info) = &self.info
        {
            self.broker.connections.remove_channel(info, ch);
            MessageStats::bump(&self.broker.churn.channel_closed);
        }
    }

    fn handle_content_frame(&mut self, frame: RawFrame) -> AmqpResult<()> {
        let ch = frame.channel;
        if ch == 0 || self.phase != Phase::Open {
            return Err(AmqpError::new(
                UNEXPECTED_FRAME,
                format!("type {}, {}", frame.kind, snippet(&frame.payload)),
            ));
        }
        let Some(channel) = self.channels.get_mut(&ch) else {
            return Err(AmqpError::new(
                UNEXPECTED_FRAME,
                "expected method frame, got non method frame instead",
            ));
        };
        if channel.closing {
            return Ok(());
        }
        let session = self
            .session
            .as_mut()
            .expect("open connections have a session");
        let result = if frame.kind == FRAME_HEADER {
            channel.on_header(session, frame.payload)
        } else {
            channel.on_body(session, frame.payload)
        };
        if channel.confirms.is_some() && !self.dirty.contains(&ch) {
            self.dirty.push(ch);
        }
        result.map_err(|e| with_channel(e, ch))
    }

    fn flush_confirms(&mut self) {
        let Some(session) = &self.session else { return };
        let progress = session.progress();
        for ch in self.dirty.drain(..) {
            if let Some(channel) = self.channels.get_mut(&ch) {
                channel.flush_confirms(session, progress);
                if channel.waits_for_durability() && !self.waiting.contains(&ch) {
                    self.waiting.push(ch);
                }
            }
        }
    }

    fn set_state(&self, state: ConnectionState) {
        if let Some(info) = &self.info {
            info.set_state(state);
        }
    }

    /// A flush round finished: send the confirms it settled.
    fn flush_waiting(&mut self) {
        let Some(session) = &self.session else { return };
        let progress = session.progress();
        let channels = &mut self.channels;
        self.waiting.retain(|ch| match channels.get_mut(ch) {
            Some(channel) => {
                channel.flush_confirms(session, progress);
                channel.waits_for_durability()
            }
            None => false,
        });
    }

    fn handle_connection_method(&mut self, method: AMQPClass) -> AmqpResult<()> {
        use connection::AMQPMethod as M;
        let ids = (method.get_amqp_class_id(), method.get_amqp_method_id());
        let AMQPClass::Connection(m) = method else {
            return Err(unexpected_in(self.phase).on(ids.0, ids.1));
        };
        match (self.phase, m) {
            (Phase::AwaitStartOk, M::StartOk(start_ok)) => self.start_ok(start_ok),
            (Phase::AwaitTuneOk, M::TuneOk(tune)) => self.tune_ok(tune),
            (Phase::AwaitOpen, M::Open(open)) => self.open(open),
            (_, M::Close(_)) => {
                self.send_close_ok();
                // Everything is released now; the socket stays open for the client to drop.
                self.cleanup();
                self.phase = Phase::CloseOkSent(Instant::now() + CLOSED_LINGER);
                Ok(())
            }
            (Phase::Open, M::Blocked(_) | M::Unblocked(_)) => Ok(()),
            (Phase::Open, M::UpdateSecret(_)) => {
                self.out.method(
                    0,
                    AMQPClass::Connection(M::UpdateSecretOk(connection::UpdateSecretOk {})),
                );
                Ok(())
            }
            (phase, _) => Err(unexpected_in(phase).on(ids.0, ids.1)),
        }
    }

    fn start_ok(&mut self, m: connection::StartOk) -> AmqpResult<()> {
        self.client_properties = m.client_properties.clone();
        let caps = match m.client_properties.inner().get("capabilities") {
            Some(AMQPValue::FieldTable(t)) => t.clone(),
            _ => FieldTable::default(),
        };
        let has = |k: &str| matches!(caps.inner().get(k), Some(AMQPValue::Boolean(true)));
        self.capabilities = ClientCapabilities {
            cancel_notify: has("consumer_cancel_notify"),
            auth_failure_close: has("authentication_failure_close"),
            blocked: has("connection.blocked"),
        };
        let mechanism = m.mechanism.as_str();
        self.auth_mechanism = mechanism.to_owned();
        if !matches!(mechanism, "PLAIN" | "AMQPLAIN") {
            return Err(AmqpError::new(
                COMMAND_INVALID,
                format!("unknown authentication mechanism '{mechanism}'"),
            )
            .on(10, 11));
        }
        let login = auth::decode_response(mechanism, m.response.as_bytes())
            .and_then(|(user, pass)| self.broker.users.authenticate(&user, &pass, self.peer.ip()));
        match login {
            Ok(user) => {
                self.user = Some(user.name);
                self.phase = Phase::AwaitTuneOk;
                let config = &self.broker.config;
                self.out.method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                        channel_max: config.channel_max,
                        frame_max: config.frame_max,
                        heartbeat: config.heartbeat,
                    })),
                );
                Ok(())
            }
            Err(why) => {
                tracing::warn!(peer = %self.peer, reason = %why, "login refused");
                if self.capabilities.auth_failure_close {
                    Err(AmqpError::new(
                        crate::error::ACCESS_REFUSED,
                        format!(
                            "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
                        ),
                    )
                    .connection_level())
                } else {
                    // Clients that did not ask for a close frame get the socket closed.
                    self.phase = Phase::Closed;
                    Ok(())
                }
            }
        }
    }

    fn tune_ok(&mut self, m: connection::TuneOk) -> AmqpResult<()> {
        let config = &self.broker.config;
        // RabbitMQ's rules: zero means "no limit", which a server with a limit refuses.
        // (RabbitMQ drops the socket silently here; Warren says why in a close frame.)
        let refuse = |text: String| Err(AmqpError::new(NOT_ALLOWED, text).on(10, 31));
        if m.frame_max != 0 && m.frame_max < codec::FRAME_MIN_SIZE {
            return refuse(format!(
                "negotiated frame_max = {} is lower than the minimum allowed value ({})",
                m.frame_max,
                codec::FRAME_MIN_SIZE
            ));
        }
        if m.frame_max == 0 || m.frame_max > config.frame_max {
            return refuse(format!(
                "negotiated frame_max = {} is higher than the maximum allowed value ({})",
                m.frame_max, config.frame_max
            ));
        }
        if m.channel_max == 0 || m.channel_max > config.channel_max {
            let no_limit = if m.channel_max == 0 {
                " (no limit)"
            } else {
                ""
            };
            return refuse(format!(
                "negotiated channel_max = {}{no_limit} is higher than the maximum allowed value ({})",
                m.channel_max, config.channel_max
            ));
        }
        self.frame_max = m.frame_max;
        self.channel_max = m.channel_max;
        self.out.set_frame_max(self.frame_max);
        self.heartbeat
            .store(u32::from(m.heartbeat), Ordering::Relaxed);
        self.phase = Phase::AwaitOpen;
        Ok(())
    }

    fn open(&mut self, m: connection::Open) -> AmqpResult<()> {
        let name = m.virtual_host.as_str();
        let Some(vhost) = self.broker.vhost(name) else {
            return Err(AmqpError::new(NOT_ALLOWED, format!("vhost {name} not found")).on(10, 40));
        };
        let user = self.user.clone().unwrap_or_default();
        if self.broker.users.permission(&user, name).is_none() {
            return Err(AmqpError::new(
                NOT_ALLOWED,
                format!("access to vhost '{name}' refused for user '{user}'"),
            )
            .on(10, 40));
        }
        if let Some(max) = vhost.meta().limit("max-connections")
            && self.broker.connections.in_vhost(name).len() as u64 >= max
        {
            return Err(AmqpError::new(
                NOT_ALLOWED,
                format!(
                    "access to vhost '{name}' refused for user '{user}': connection limit ({max}) is reached"
                ),
            )
            .on(10, 40));
        }
        let (info, closed) = ConnectionInfo::new(
            self.id,
            ConnectionDetails {
                peer: self.peer,
                local: self.local,
                user: user.clone(),
                vhost: name.to_owned(),
                client_properties: std::mem::take(&mut self.client_properties),
                auth_mechanism: self.auth_mechanism.clone(),
                channel_max: self.channel_max,
                frame_max: self.frame_max,
                heartbeat: self.heartbeat.load(Ordering::Relaxed) as u16,
                tls: self.tls.clone(),
            },
            self.traffic.clone(),
        );
        self.broker.connections.add(info.clone());
        MessageStats::bump(&self.broker.churn.connection_created);
        tracing::info!(
            peer = %self.peer,
            user = %info.user,
            vhost = %info.vhost,
            // Debug: escaped, so that a client cannot forge log lines.
            name = ?info.client_name(),
            "connection opened"
        );
        self.info = Some(info);
        self.closed = Some(closed);
        self.session = Some(Session {
            connection_id: self.id,
            broker: self.broker.clone(),
            vhost,
            user: self.user.clone().unwrap_or_default(),
            out: self.out.clone(),
            cancel_notify: self.capabilities.cancel_notify,
            exclusive_queues: Vec::new(),
            flow: Vec::new(),
        });
        self.phase = Phase::Open;
        self.out.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
        );
        Ok(())
    }

    fn send_close_ok(&self) {
        self.out.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
        );
    }

    /// Turns an error into the close frame its scope asks for.
    fn fail(&mut self, e: AmqpError) {
        let channel_id = e.channel;
        if e.scope == Scope::Channel && channel_id != 0 && self.phase == Phase::Open {
            tracing::warn!(
                peer = %self.peer,
                user = self.user.as_deref().unwrap_or_default(),
                channel = channel_id,
                code = e.code,
                text = ?e.reply_text(),
                "channel error, closing the channel"
            );
            if let (Some(channel), Some(session)) =
                (self.channels.get_mut(&channel_id), self.session.as_ref())
            {
                channel.close(session);
                channel.closing = true;
            }
            self.out.method(
                channel_id,
                AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                    reply_code: e.code,
                    reply_text: ShortString::from(e.reply_text()),
                    class_id: e.class_id,
                    method_id: e.method_id,
                })),
            );
            return;
        }
        if e.code != CONNECTION_FORCED && e.code != REPLY_SUCCESS {
            tracing::warn!(peer = %self.peer, error = %e, "closing connection");
        }
        self.cleanup();
        self.out.method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                reply_code: e.code,
                reply_text: ShortString::from(e.reply_text()),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
        self.phase = Phase::Closing(Instant::now() + CLOSE_TIMEOUT);
    }

    /// A framing error: the stream can no longer be trusted, so close without waiting.
    fn frame_error(&mut self, e: FrameError) {
        let text = match e {
            FrameError::TooLarge {
                kind, size, max, ..
            } => {
                format!("type {kind}, all octets = <<>>: {{frame_too_large,{size},{max}}}")
            }
            FrameError::BadFrameEnd {
                kind, payload, end, ..
            } => {
                format!(
                    "type {kind}, {}: {{invalid_frame_end_marker,{end}}}",
                    snippet(&payload)
                )
            }
        };
        tracing::warn!(peer = %self.peer, error = %text, "frame error, closing connection");
        self.fail(AmqpError::new(FRAME_ERROR, text));
        self.phase = Phase::Closed;
    }

    /// Releases everything the connection holds: channels (requeueing their unacknowledged
    /// deliveries) and exclusive queues.
    fn cleanup(&mut self) {
        if let Some(info) = self.info.take() {
            tracing::info!(
                peer = %self.peer,
                user = %info.user,
                vhost = %info.vhost,
                // Debug: escaped, so that a client cannot forge log lines.
            name = ?info.client_name(),
                "connection closed"
            );
            self.broker.connections.remove(info.id);
            MessageStats::bump(&self.broker.churn.connection_closed);
            let channels = self.channels.len() as u64;
            self.broker
                .churn
                .channel_closed
                .fetch_add(channels, Ordering::Relaxed);
        }
        let Some(session) = self.session.as_mut() else {
            return;
        };
        for (_, mut channel) in self.channels.drain() {
            if !channel.closing {
                channel.close(session);
            }
        }
        for q in std::mem::take(&mut session.exclusive_queues) {
            session.vhost.remove_queue(&q);
        }
    }
}

/// Resolves with the reason when the connection is closed from outside (never before it is
/// open).
async fn closed_from_outside(closed: &mut Option<watch::Receiver<Option<String>>>) -> String {
    let Some(rx) = closed else {
        return std::future::pending().await;
    };
    loop {
        if let Some(reason) = rx.borrow_and_update().clone() {
            return reason;
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Whether the client closed or reset the socket whose descriptor `probe` duplicates, even
/// with bytes of its still unread before the close.
fn peer_gone(probe: Option<&OwnedFd>) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let Some(fd) = probe else { return false };
    // A half-close with bytes still unread shows as RDHUP where there is one; elsewhere only
    // a full close or a reset (HUP, ERR) is seen.
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "illumos"
    ))]
    let watched = PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR;
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "illumos"
    )))]
    let watched = PollFlags::HUP | PollFlags::ERR;
    let mut fds = [PollFd::new(fd, watched)];
    let now = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    match poll(&mut fds, Some(&now)) {
        Ok(_) => fds[0].revents().intersects(watched),
        Err(_) => false,
    }
}

fn with_channel(e: AmqpError, ch: u16) -> AmqpError {
    e.in_channel(ch)
}

fn unexpected_in(phase: Phase) -> AmqpError {
    AmqpError::new(
        CHANNEL_ERROR,
        format!("unexpected method in connection state {}", phase.name()),
    )
}

/// RabbitMQ's description of a frame payload in its frame errors.
fn snippet(payload: &[u8]) -> String {
    let (which, bytes) = if payload.len() <= 16 {
        ("all", payload)
    } else {
        ("first 16", &payload[..16])
    };
    format!("{which} octets = {}", erlang_binary(bytes))
}

/// Bytes as Erlang prints a binary: `<<"text">>` when printable, else `<<0,20,0,10>>`.
fn erlang_binary(bytes: &[u8]) -> String {
    let printable = !bytes.is_empty() && bytes.iter().all(|b| (0x20..0x7f).contains(b));
    let body = if printable {
        format!("\"{}\"", String::from_utf8_lossy(bytes))
    } else {
        bytes
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    format!("<<{body}>>")
}
