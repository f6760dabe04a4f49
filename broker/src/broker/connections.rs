//! The open client connections and their channels, as the management API, the metrics and
//! vhost deletion see them: who is connected to what, what each channel is doing, and a way
//! to close a connection from outside (320 CONNECTION_FORCED).

use super::stats::{MessageCounts, MessageStats};
use amq_protocol::types::FieldTable;
use parking_lot::RwLock;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use tokio::sync::watch;

/// Bytes and frames through a connection's socket.
#[derive(Debug, Default)]
pub struct Traffic {
    pub recv_oct: AtomicU64,
    pub recv_cnt: AtomicU64,
    pub send_oct: AtomicU64,
    pub send_cnt: AtomicU64,
}

impl Traffic {
    pub fn received(&self, bytes: usize) {
        self.recv_oct.fetch_add(bytes as u64, Ordering::Relaxed);
        self.recv_cnt.fetch_add(1, Ordering::Relaxed);
    }

    pub fn sent(&self, bytes: usize) {
        self.send_oct.fetch_add(bytes as u64, Ordering::Relaxed);
        self.send_cnt.fetch_add(1, Ordering::Relaxed);
    }

    /// A reading: `[recv_oct, send_oct, recv_cnt, send_cnt]`.
    pub fn read(&self) -> [u64; 4] {
        [
            self.recv_oct.load(Ordering::Relaxed),
            self.send_oct.load(Ordering::Relaxed),
            self.recv_cnt.load(Ordering::Relaxed),
            self.send_cnt.load(Ordering::Relaxed),
        ]
    }

    fn absorb(&self, [recv_oct, send_oct, recv_cnt, send_cnt]: [u64; 4]) {
        self.recv_oct.fetch_add(recv_oct, Ordering::Relaxed);
        self.send_oct.fetch_add(send_oct, Ordering::Relaxed);
        self.recv_cnt.fetch_add(recv_cnt, Ordering::Relaxed);
        self.send_cnt.fetch_add(send_cnt, Ordering::Relaxed);
    }
}

/// A consumer as the management API lists it.
#[derive(Debug, Clone)]
pub struct ConsumerSnapshot {
    pub queue: String,
    pub tag: String,
    pub ack_required: bool,
    pub exclusive: bool,
    pub prefetch_count: u32,
    pub arguments: FieldTable,
}

/// What a channel is doing, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct ChannelSnapshot {
    pub number: u16,
    /// `basic.qos` with global=false: the prefetch of new consumers.
    pub prefetch_count: u32,
    /// `basic.qos` with global=true.
    pub global_prefetch_count: u32,
    pub confirm: bool,
    pub transactional: bool,
    pub messages_unacknowledged: u64,
    pub messages_unconfirmed: u64,
    pub messages_uncommitted: u64,
    pub acks_uncommitted: u64,
    pub consumers: Vec<ConsumerSnapshot>,
    pub counts: MessageCounts,
}

/// A channel, seen from outside the connection that runs it.
pub trait ChannelView: Send + Sync + std::fmt::Debug {
    fn snapshot(&self) -> ChannelSnapshot;
    fn stats(&self) -> &MessageStats;
}

/// One open connection.
#[derive(Debug)]
pub struct ConnectionInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub user: String,
    pub vhost: String,
    /// Milliseconds since the Unix epoch.
    pub connected_at: u64,
    pub client_properties: FieldTable,
    pub auth_mechanism: String,
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
    /// The TLS protocol and cipher suite, when the connection is over TLS.
    pub tls: Option<(String, String)>,
    pub traffic: Arc<Traffic>,
    channels: RwLock<BTreeMap<u16, Arc<dyn ChannelView>>>,
    /// Set to a reason to make the connection close itself with 320.
    close: watch::Sender<Option<String>>,
    /// The close drops the socket at once instead of waiting for `close-ok`.
    close_at_once: AtomicBool,
    state: AtomicU8,
}

/// What an open connection is doing, as RabbitMQ's management API names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ConnectionState {
    Running = 0,
    /// Flow control: not read until consumers catch up with a backlog on disk.
    Flow = 1,
    /// A resource alarm stops it publishing.
    Blocked = 2,
}

impl ConnectionState {
    pub fn name(self) -> &'static str {
        match self {
            ConnectionState::Running => "running",
            ConnectionState::Flow => "flow",
            ConnectionState::Blocked => "blocked",
        }
    }
}

/// What a connection is, known once it is open.
#[derive(Debug, Clone)]
pub struct ConnectionDetails {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub user: String,
    pub vhost: String,
    pub client_properties: FieldTable,
    pub auth_mechanism: String,
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
    pub tls: Option<(String, String)>,
}

impl ConnectionInfo {
    pub fn new(
        id: u64,
        details: ConnectionDetails,
        traffic: Arc<Traffic>,
    ) -> (Arc<Self>, watch::Receiver<Option<String>>) {
        let (close, closed) = watch::channel(None);
        let connected_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let ConnectionDetails {
            peer,
            local,
            user,
            vhost,
            client_properties,
            auth_mechanism,
            channel_max,
            frame_max,
            heartbeat,
            tls,
        } = details;
        (
            Arc::new(Self {
                id,
                peer,
                local,
                user,
                vhost,
                connected_at,
                client_properties,
                auth_mechanism,
                channel_max,
                frame_max,
                heartbeat,
                tls,
                traffic,
                channels: RwLock::new(BTreeMap::new()),
                close,
                close_at_once: AtomicBool::new(false),
                state: AtomicU8::new(ConnectionState::Running as u8),
            }),
            closed,
        )
    }

    /// RabbitMQ's name for a connection: `peer -> local`.
    pub fn name(&self) -> String {
        format!("{} -> {}", self.peer, self.local)
    }

    /// The name the client gave the connection (`connection_name` in its properties), or "".
    pub fn client_name(&self) -> String {
        match self.client_properties.inner().get("connection_name") {
            Some(amq_protocol::types::AMQPValue::LongString(n)) => {
                String::from_utf8_lossy(n.as_bytes()).into_owned()
            }
            _ => String::new(),
        }
    }

    pub fn set_state(&self, state: ConnectionState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn state(&self) -> ConnectionState {
        match self.state.load(Ordering::Relaxed) {
            1 => ConnectionState::Flow,
            2 => ConnectionState::Blocked,
            _ => ConnectionState::Running,
        }
    }

    pub fn channel_count(&self) -> usize {
        self.channels.read().len()
    }

    pub fn channels(&self) -> Vec<Arc<dyn ChannelView>> {
        self.channels.read().values().cloned().collect()
    }

    /// Asks the connection to close with 320 CONNECTION_FORCED and `reason`.
    pub fn force_close(&self, reason: &str) {
        self.close.send_replace(Some(reason.to_owned()));
    }

    /// As [`ConnectionInfo::force_close`], then the socket is dropped at once without
    /// waiting for `close-ok`: what RabbitMQ does to the connections of a vhost that goes down.
    pub fn force_close_at_once(&self, reason: &str) {
        self.close_at_once.store(true, Ordering::Release);
        self.force_close(reason);
    }

    pub fn closes_at_once(&self) -> bool {
        self.close_at_once.load(Ordering::Acquire)
    }

    /// Resolves once the connection has ended and its socket is closed.
    pub async fn ended(&self) {
        self.close.closed().await;
    }
}

/// The registry of open connections, and the node's message counters: those of live channels
/// plus those of every channel that closed, so the node's totals never go down.
#[derive(Debug, Default)]
pub struct Connections {
    open: RwLock<HashMap<u64, Arc<ConnectionInfo>>>,
    /// Counters of closed channels. A channel's counters move here under the write lock of
    /// `open`, and totals are read under its read lock: no reading counts them twice or
    /// misses them.
    closed: MessageStats,
    /// Traffic of closed connections, moved here the same way.
    closed_traffic: Traffic,
}

impl Connections {
    pub fn add(&self, info: Arc<ConnectionInfo>) {
        self.open.write().insert(info.id, info);
    }

    /// Forgets a connection, keeping its channels' counters in the node's totals.
    pub fn remove(&self, id: u64) {
        let mut open = self.open.write();
        if let Some(info) = open.remove(&id) {
            self.closed_traffic.absorb(info.traffic.read());
            for ch in std::mem::take(&mut *info.channels.write()).into_values() {
                self.closed.absorb(&ch.stats().read());
            }
        }
    }

    pub fn add_channel(&self, info: &ConnectionInfo, number: u16, channel: Arc<dyn ChannelView>) {
        let _open = self.open.read();
        info.channels.write().insert(number, channel);
    }

    pub fn remove_channel(&self, info: &ConnectionInfo, number: u16) {
        let _open = self.open.write();
        if let Some(ch) = info.channels.write().remove(&number) {
            self.closed.absorb(&ch.stats().read());
        }
    }

    /// Adds messages handled on no channel of a client (the management API's publish) to the
    /// node's counters, as RabbitMQ counts them on the channel its management plugin uses.
    pub fn count_without_channel(&self, counts: &MessageCounts) {
        self.closed.absorb(counts);
    }

    /// The node's message counters since it started.
    pub fn totals(&self) -> MessageCounts {
        let open = self.open.read();
        let mut total = self.closed.read();
        for c in open.values() {
            for ch in c.channels.read().values() {
                total += ch.stats().read();
            }
        }
        total
    }

    /// The node's traffic since it started, as [`Traffic::read`] orders it: open connections
    /// and closed ones, so the sums never go down.
    pub fn traffic_totals(&self) -> [u64; 4] {
        let open = self.open.read();
        let mut total = self.closed_traffic.read();
        for c in open.values() {
            for (t, v) in total.iter_mut().zip(c.traffic.read()) {
                *t += v;
            }
        }
        total
    }

    pub fn list(&self) -> Vec<Arc<ConnectionInfo>> {
        let mut all: Vec<_> = self.open.read().values().cloned().collect();
        all.sort_by_key(|c| c.id);
        all
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<ConnectionInfo>> {
        self.open
            .read()
            .values()
            .find(|c| c.name() == name)
            .cloned()
    }

    pub fn in_vhost(&self, vhost: &str) -> Vec<Arc<ConnectionInfo>> {
        self.list()
            .into_iter()
            .filter(|c| c.vhost == vhost)
            .collect()
    }

    pub fn count(&self) -> usize {
        self.open.read().len()
    }
}
