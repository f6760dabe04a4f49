//! The cluster: the nodes of one Instance finding each other and keeping links between them.
//!
//! Every node listens on its cluster address and dials every peer it is told of (the `peers`
//! setting and the `peers_file`, read again as it changes). A link opens with a handshake in
//! which both nodes prove the shared secret and check the cluster name; a node that fails it
//! is refused, with a log line saying why. One link per pair of nodes: when both dial at once,
//! the link dialed by the node with the smaller name is kept. A peer address that turns out
//! to be this node is remembered and not dialed again, so every node can be given the same
//! list. A node alone is a cluster of one; it runs the same code with no peers. Links use TLS
//! when the node has a certificate (see [`tls`]).
//!
//! The Raft log that every Raft group of a node writes to is in [`log_store`].

pub mod handshake;
pub mod link;
pub mod log_store;
pub mod meta_state;
pub mod metadata;
pub mod raft_network;
pub mod rpc;
pub mod secret;
pub mod tls;

use crate::config::Config;
use handshake::{NONCE_LEN, Role};
use link::{Established, Frame, LinkError};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// The port of a peer given without one.
pub const DEFAULT_PORT: u16 = 25672;
/// How often the peers are dialed again while their links are down.
const REDIAL: Duration = Duration::from_secs(1);
/// Accepted connections in their handshake at once; more are closed at once, so that
/// strangers holding connections open cannot use up the descriptors clients need.
const MAX_HANDSHAKES: usize = 64;
/// Frames queued for one link before senders are told it is full: forwarded publishes,
/// deliveries and settlements share it with Raft.
const LINK_QUEUE: usize = 16 * 1024;
/// The longest wait between dials of a peer that keeps failing.
const REDIAL_MAX: Duration = Duration::from_secs(15);

/// What this node knows of one node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    pub name: String,
    /// Whether a link to it is up (always, for this node).
    pub running: bool,
    /// The peer address it was reached at or came from.
    pub address: Option<String>,
}

#[derive(Debug)]
struct LinkEntry {
    id: u64,
    /// The peer's process: a link from a newer one (the peer restarted) replaces this one.
    peer_instance: u64,
    /// The dialing node's name and nonce: of two links between the same two processes, both
    /// ends keep the one with the smaller key, whichever they saw first.
    key: (String, [u8; NONCE_LEN]),
    outgoing: mpsc::Sender<Frame>,
    stop: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct State {
    links: HashMap<String, LinkEntry>,
    /// Every node ever linked, with the address it was last seen at.
    known: BTreeMap<String, String>,
    /// Peer addresses that are this node.
    itself: HashSet<String>,
    /// When each peer address may be dialed next, and the wait after that.
    backoff: HashMap<String, (Instant, Duration)>,
    /// Peer addresses being dialed now.
    dialing: HashSet<String>,
    /// The node each dialed peer address turned out to be, so that a peer linked by its own
    /// dialing is not dialed again.
    reached: HashMap<String, String>,
    next_id: u64,
}

/// This node's part of the cluster.
#[derive(Debug)]
pub struct Cluster {
    node: String,
    /// The configured cluster name ("" when none is).
    name: String,
    secret: Vec<u8>,
    instance: u64,
    peers: Vec<String>,
    peers_file: Option<PathBuf>,
    state: Mutex<State>,
    pending: Mutex<rpc::Pending>,
    /// Nonces of this process's accepting ends still in their handshake: how a dial that
    /// meets its own process knows it reached itself, not someone replaying its hello.
    accepting: Mutex<HashSet<[u8; NONCE_LEN]>>,
    /// Handshakes in progress on accepted connections.
    handshakes: Arc<tokio::sync::Semaphore>,
    handlers: rpc::Handlers,
    hooks: Hooks,
    /// TLS on the links, when the node has a certificate.
    tls: Option<tls::LinkTls>,
}

/// The handlers of one-way messages and of links going down.
#[derive(Default)]
struct Hooks {
    casts: parking_lot::RwLock<HashMap<rpc::Service, CastHandler>>,
    link_down: parking_lot::RwLock<Vec<LinkDown>>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("casts", &self.casts.read().len())
            .field("link_down", &self.link_down.read().len())
            .finish()
    }
}

/// What a node does with a one-way message from `node`, received on link `link`: run on the
/// link's reading task, in the order the messages were sent, so it must not block.
pub type CastHandler = Arc<dyn Fn(&str, u64, bytes::Bytes) + Send + Sync>;

/// Told that link `link` to `node` ended (went down, or was replaced by another).
pub type LinkDown = Arc<dyn Fn(&str, u64) + Send + Sync>;

impl Cluster {
    /// The cluster as `config` describes it; fails when the secret cannot be read or made, or
    /// the node's certificate cannot be used for the links' TLS.
    pub fn new(config: &Config) -> std::io::Result<Arc<Self>> {
        let secret = secret::load(config)?;
        let tls = tls::LinkTls::from_config(config).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("cluster TLS: {e}"),
            )
        })?;
        Ok(Arc::new(Self {
            node: config.node_name.clone(),
            name: config.cluster_name.clone().unwrap_or_default(),
            secret,
            instance: rand::random(),
            peers: config.peers.clone(),
            peers_file: config.peers_file.clone(),
            state: Mutex::new(State::default()),
            pending: Mutex::new(rpc::Pending::default()),
            accepting: Mutex::new(HashSet::new()),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES)),
            handlers: rpc::Handlers::default(),
            hooks: Hooks::default(),
            tls,
        }))
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// This node and every node it has linked with, by name.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        let st = self.state.lock();
        let mut out = vec![NodeStatus {
            name: self.node.clone(),
            running: true,
            address: None,
        }];
        out.extend(st.known.iter().map(|(name, address)| NodeStatus {
            name: name.clone(),
            running: st.links.contains_key(name),
            address: Some(address.clone()),
        }));
        out
    }

    /// Whether this node knows of no peer address at all (none given, an empty or missing
    /// peers file).
    pub fn has_no_peers(&self) -> bool {
        self.peer_addresses().is_empty()
    }

    /// The nodes a link is up to now, by name.
    pub fn linked(&self) -> Vec<String> {
        let mut out: Vec<String> = self.state.lock().links.keys().cloned().collect();
        out.sort();
        out
    }

    /// The nodes linked, once every peer address is linked or known to be this node (None
    /// before): the whole cluster this node was told of. With no peer address at all (an
    /// empty or missing peers file), the node is a cluster of one.
    pub fn linked_peers_if_settled(&self) -> Option<Vec<String>> {
        let addresses = self.peer_addresses();
        let st = self.state.lock();
        let settled = addresses.iter().all(|a| {
            st.itself.contains(a)
                || st
                    .reached
                    .get(a)
                    .is_some_and(|node| st.links.contains_key(node))
        });
        if !settled {
            return None;
        }
        let mut out: Vec<String> = st.links.keys().cloned().collect();
        out.sort();
        Some(out)
    }

    /// Queues `frame` on the link to `node`; false when no link to it is up or its queue is
    /// full (the caller retries or fails the request: nothing waits here).
    pub fn send(&self, node: &str, frame: Frame) -> bool {
        self.send_on(node, frame).is_some()
    }

    /// Sends a one-way message for `service` to `node`, handled there in the order sent on
    /// the link. Returns the id of the link it went on; None when no link is up or its
    /// queue is full, or the message does not fit in a frame (nothing is sent then).
    pub fn cast(&self, node: &str, service: rpc::Service, body: &[u8]) -> Option<u64> {
        if body.len() + 3 > link::MAX_FRAME {
            return None;
        }
        let mut b = bytes::BytesMut::with_capacity(2 + body.len());
        bytes::BufMut::put_u16(&mut b, service);
        b.extend_from_slice(body);
        self.send_on(
            node,
            Frame {
                kind: link::Kind::Cast,
                payload: b.freeze(),
            },
        )
    }

    /// Like [`Cluster::cast`], on link `link` only: None when another link (or none) is up
    /// to `node` now.
    pub fn cast_on(
        &self,
        node: &str,
        link: u64,
        service: rpc::Service,
        body: &[u8],
    ) -> Option<u64> {
        if self.link_to(node) != Some(link) {
            return None;
        }
        self.cast(node, service, body).filter(|l| *l == link)
    }

    /// Ends link `link` to `node` (both ends then recover as from a link that went down),
    /// when a message that must not be lost could not be sent on it.
    pub fn drop_link(&self, node: &str, link: u64, why: &str) {
        let st = self.state.lock();
        if let Some(l) = st.links.get(node).filter(|l| l.id == link) {
            tracing::warn!(node, reason = why, "closing a cluster link");
            let _ = l.stop.send(true);
        }
    }

    /// Handles one-way messages for `service` with `handler`.
    pub fn on_cast(&self, service: rpc::Service, handler: CastHandler) {
        self.hooks.casts.write().insert(service, handler);
    }

    /// Calls `hook` whenever a link ends.
    pub fn on_link_down(&self, hook: LinkDown) {
        self.hooks.link_down.write().push(hook);
    }

    /// The id of the link up to `node` now.
    pub fn link_to(&self, node: &str) -> Option<u64> {
        self.state.lock().links.get(node).map(|l| l.id)
    }

    /// Like [`Cluster::send`], returning the id of the link the frame went on.
    fn send_on(&self, node: &str, frame: Frame) -> Option<u64> {
        let st = self.state.lock();
        let link = st.links.get(node)?;
        link.outgoing.try_send(frame).ok().map(|()| link.id)
    }

    /// Sends an answer on the link its request came on, waiting (a while) for room in the
    /// link's queue rather than dropping it when the link is busy: a lost answer would leave
    /// its caller to wait out its timeout.
    async fn answer(&self, node: &str, link: u64, frame: Frame) {
        let outgoing = {
            let st = self.state.lock();
            st.links
                .get(node)
                .filter(|l| l.id == link)
                .map(|l| l.outgoing.clone())
        };
        if let Some(outgoing) = outgoing {
            let _ = tokio::time::timeout(link::SILENCE, outgoing.send(frame)).await;
        }
    }

    /// Serves requests for `service` from other nodes with `handler` (replacing any before).
    pub fn handle(&self, service: rpc::Service, handler: rpc::Handler) {
        self.handlers.insert(service, handler);
    }

    /// Asks `node` for `service` with `body`; the answer, or why there is none, within
    /// `timeout`.
    pub async fn call(
        &self,
        node: &str,
        service: rpc::Service,
        body: &[u8],
        timeout: Duration,
    ) -> Result<bytes::Bytes, rpc::RpcError> {
        if body.len() + rpc::REQUEST_HEADER + 1 > link::MAX_FRAME {
            return Err(rpc::RpcError::TooLarge(body.len()));
        }
        let (id, answer) = self.pending.lock().register(node);
        // Forgets the call however this ends, the caller giving up included.
        let _forget = Forget(self, id);
        let frame = Frame {
            kind: link::Kind::Request,
            payload: rpc::encode_request(id, service, body),
        };
        let Some(link) = self.send_on(node, frame) else {
            return Err(rpc::RpcError::Unreachable(node.to_owned()));
        };
        self.pending.lock().sent_on(id, link);
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            // The sender went with a link that failed its calls.
            Ok(Err(_)) => Err(rpc::RpcError::Unreachable(node.to_owned())),
            Err(_) => Err(rpc::RpcError::TimedOut(node.to_owned())),
        }
    }

    /// A frame from `node`: a request served on a task of its own, or an answer for a caller.
    fn on_frame(self: &Arc<Self>, node: &str, link: u64, kind: link::Kind, payload: bytes::Bytes) {
        match kind {
            link::Kind::Cast => {
                if payload.len() < 2 {
                    tracing::warn!(node, "malformed cluster message dropped");
                    return;
                }
                let service = u16::from_be_bytes([payload[0], payload[1]]);
                let handler = self.hooks.casts.read().get(&service).cloned();
                match handler {
                    Some(h) => h(node, link, payload.slice(2..)),
                    None => tracing::debug!(node, service, "message for no service dropped"),
                }
            }
            link::Kind::Request => {
                let Some((id, service, body)) = rpc::decode_request(payload) else {
                    tracing::warn!(node, "malformed cluster request dropped");
                    return;
                };
                let handler = self.handlers.get(service);
                let me = self.clone();
                let node = node.to_owned();
                tokio::spawn(async move {
                    let result = match handler {
                        Some(h) => rpc::on_link(link, h(node.clone(), body)).await,
                        None => Err(format!("no service {service} on this node")),
                    };
                    let frame = Frame {
                        kind: link::Kind::Response,
                        payload: rpc::encode_response(id, &result),
                    };
                    me.answer(&node, link, frame).await;
                });
            }
            link::Kind::Response => match rpc::decode_response(payload) {
                Some((id, result)) => self.pending.lock().answer(node, id, result),
                None => tracing::warn!(node, "malformed cluster answer dropped"),
            },
            link::Kind::Heartbeat => {}
        }
    }

    /// Starts accepting peers on `listener` and dialing the configured ones, until `stop`.
    pub fn start(
        self: &Arc<Self>,
        listener: TcpListener,
        stop: watch::Receiver<bool>,
    ) -> Vec<JoinHandle<()>> {
        vec![
            tokio::spawn(self.clone().accept_loop(listener, stop.clone())),
            tokio::spawn(self.clone().dial_loop(stop)),
        ]
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, from)) => {
                        let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                            tracing::debug!(peer = %from, "too many cluster handshakes, closed");
                            continue;
                        };
                        let me = self.clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            me.open(stream, from.to_string(), Role::Acceptor, stop, Some(permit)).await;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }

    /// The peer addresses to dial: the configured ones and the file's, with the default port
    /// where none is given.
    fn peer_addresses(&self) -> Vec<String> {
        let mut out: Vec<String> = self.peers.iter().map(|p| with_port(p)).collect();
        if let Some(path) = &self.peers_file {
            match std::fs::read_to_string(path) {
                Ok(text) => out.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(with_port),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read the peers file")
                }
            }
        }
        out.sort();
        out.dedup();
        out
    }

    async fn dial_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(REDIAL);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let now = Instant::now();
            for address in self.peer_addresses() {
                {
                    let mut st = self.state.lock();
                    let linked = st
                        .reached
                        .get(&address)
                        .is_some_and(|node| st.links.contains_key(node));
                    let waiting = st.backoff.get(&address).is_some_and(|(at, _)| *at > now);
                    if st.itself.contains(&address)
                        || linked
                        || waiting
                        || !st.dialing.insert(address.clone())
                    {
                        continue;
                    }
                }
                let me = self.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let ok = match link::dial(&address).await {
                        Ok((stream, _)) => {
                            me.clone()
                                .open(stream, address.clone(), Role::Dialer, stop, None)
                                .await
                        }
                        Err(e) => {
                            tracing::debug!(peer = %address, error = %e, "cannot reach cluster peer");
                            false
                        }
                    };
                    let mut st = me.state.lock();
                    st.dialing.remove(&address);
                    let wait = if ok {
                        REDIAL
                    } else {
                        st.backoff
                            .get(&address)
                            .map_or(REDIAL, |(_, w)| (*w * 2).min(REDIAL_MAX))
                    };
                    st.backoff.insert(address, (Instant::now() + wait, wait));
                });
            }
        }
    }

    /// Runs the handshake on a new connection and, if it succeeds, serves the link until it
    /// ends. Returns whether the handshake succeeded. `permit` is an accepted connection's
    /// place among the handshakes in progress, given back once the handshake is over.
    async fn open(
        self: Arc<Self>,
        stream: tokio::net::TcpStream,
        address: String,
        role: Role,
        stop: watch::Receiver<bool>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> bool {
        // Small frames (answers, acks, heartbeats) go out at once, dialed or accepted.
        let _ = stream.set_nodelay(true);
        let connection = match &self.tls {
            None => tls::Connection::plain(stream),
            Some(tls) => {
                let session = match role {
                    Role::Acceptor => {
                        tokio::time::timeout(link::HANDSHAKE_TIMEOUT, tls.accept(stream)).await
                    }
                    Role::Dialer => {
                        tokio::time::timeout(link::HANDSHAKE_TIMEOUT, tls.connect(stream, &address))
                            .await
                    }
                };
                match session {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %address, error = %e, "cluster link: TLS handshake failed (with a certificate, this node's links use TLS: every node of the cluster needs one)");
                        return false;
                    }
                    Err(_) => {
                        tracing::debug!(peer = %address, "cluster link: TLS handshake timed out");
                        return false;
                    }
                }
            }
        };
        let ours = link::hello(self.instance, &self.node, &self.name);
        if role == Role::Acceptor {
            self.accepting.lock().insert(ours.nonce);
        }
        let result = link::handshake(connection, &ours, &self.secret, role, |n| {
            self.accepting.lock().contains(n)
        })
        .await;
        if role == Role::Acceptor {
            self.accepting.lock().remove(&ours.nonce);
        }
        drop(permit);
        let established = match result {
            Ok(e) => e,
            Err(LinkError::Refused(handshake::Refusal::Itself)) => {
                if role == Role::Dialer {
                    self.state.lock().itself.insert(address);
                }
                return true;
            }
            Err(LinkError::Refused(why)) => {
                tracing::warn!(peer = %address, reason = %why, "refusing a cluster peer");
                return false;
            }
            Err(e) => {
                tracing::debug!(peer = %address, error = %e, "cluster handshake failed");
                return false;
            }
        };
        self.serve(established, ours.nonce, address, role, stop)
            .await;
        true
    }

    async fn serve(
        self: Arc<Self>,
        established: Established,
        own_nonce: [u8; NONCE_LEN],
        address: String,
        role: Role,
        mut stop: watch::Receiver<bool>,
    ) {
        let peer = established.peer.node.clone();
        let peer_instance = established.peer.instance;
        if role == Role::Dialer {
            self.state
                .lock()
                .reached
                .insert(address.clone(), peer.clone());
        }
        let key = match role {
            Role::Dialer => (self.node.clone(), own_nonce),
            Role::Acceptor => (peer.clone(), established.peer.nonce),
        };
        let (outgoing, outgoing_rx) = mpsc::channel(LINK_QUEUE);
        let (link_stop, mut link_stopped) = watch::channel(false);
        let id = {
            let mut st = self.state.lock();
            st.next_id += 1;
            let id = st.next_id;
            if let Some(existing) = st.links.get(&peer) {
                // Two links between the same processes (both dialed at once, or one peer under
                // two addresses): both ends keep the one with the smaller key. A link from a
                // newer process of the peer replaces one from the process that went.
                if existing.peer_instance == peer_instance && existing.key <= key {
                    return;
                }
                let _ = existing.stop.send(true);
            }
            st.links.insert(
                peer.clone(),
                LinkEntry {
                    id,
                    peer_instance,
                    key,
                    outgoing,
                    stop: link_stop,
                },
            );
            // A dialed address names the peer better than the port it dialed us from.
            if role == Role::Dialer || !st.known.contains_key(&peer) {
                st.known.insert(peer.clone(), address.clone());
            }
            id
        };
        tracing::info!(node = %peer, peer = %address, "cluster link up");
        let ended = tokio::spawn(async move {
            tokio::select! {
                _ = stop.changed() => {}
                _ = link_stopped.changed() => {}
            }
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let relay = tokio::spawn(async move {
            let _ = ended.await;
            let _ = stop_tx.send(true);
        });
        let me = self.clone();
        let from = peer.clone();
        let why = link::run(
            established,
            outgoing_rx,
            move |kind, payload| me.on_frame(&from, id, kind, payload),
            stop_rx,
        )
        .await;
        relay.abort();
        // What was asked on this link will not be answered on it, whether it went down or
        // another link replaced it.
        self.pending.lock().fail_link(id);
        {
            let mut st = self.state.lock();
            if st.links.get(&peer).is_some_and(|l| l.id == id) {
                st.links.remove(&peer);
                drop(st);
                tracing::warn!(node = %peer, peer = %address, reason = %why, "cluster link down");
            }
        }
        let hooks = self.hooks.link_down.read().clone();
        for hook in hooks {
            hook(&peer, id);
        }
    }
}

/// Runs `fut` on `rt` and waits for it on this thread, whatever runtime (if any) this thread
/// belongs to: the work is done by `rt`'s threads, never by the one waiting. None: the
/// runtime stopped first.
pub fn block_on<T: Send + 'static>(
    rt: &tokio::runtime::Handle,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(fut.await);
    });
    // On a worker of a multi-threaded runtime, its other tasks move to another thread while
    // this one waits (a commit without a majority waits seconds).
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => {
            tokio::task::block_in_place(|| rx.recv().ok())
        }
        _ => rx.recv().ok(),
    }
}

/// Forgets a call when dropped.
struct Forget<'a>(&'a Cluster, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.pending.lock().forget(self.1);
    }
}

/// `host:port`, with the default port when `peer` names none.
fn with_port(peer: &str) -> String {
    let peer = peer.trim();
    let has_port = match peer.rsplit_once(':') {
        // `[v6]:port`, or `host:port` (a bare IPv6 address has more colons).
        Some((host, port)) => {
            port.parse::<u16>().is_ok() && (host.ends_with(']') || !host.contains(':'))
        }
        None => false,
    };
    if has_port {
        peer.to_owned()
    } else if peer.contains(':') && !peer.starts_with('[') {
        format!("[{peer}]:{DEFAULT_PORT}")
    } else {
        format!("{peer}:{DEFAULT_PORT}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two nodes on loopback that list each other as peers, linked; with their stop switches.
    async fn pair() -> (
        Arc<Cluster>,
        Arc<Cluster>,
        watch::Sender<bool>,
        watch::Sender<bool>,
        tempfile::TempDir,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (aa, ab) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
        let config = |name: &str, peer: std::net::SocketAddr| Config {
            data_dir: dir.path().join(name),
            node_name: name.into(),
            cluster_secret: Some("s".into()),
            peers: vec![peer.to_string()],
            ..Config::default()
        };
        let a = Cluster::new(&config("a", ab)).unwrap();
        let b = Cluster::new(&config("b", aa)).unwrap();
        let (stop_a, rx_a) = watch::channel(false);
        let (stop_b, rx_b) = watch::channel(false);
        a.start(la, rx_a);
        b.start(lb, rx_b);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(a.nodes().iter().any(|n| n.name == "b" && n.running)
            && b.nodes().iter().any(|n| n.name == "a" && n.running))
        {
            assert!(Instant::now() < deadline, "no link between a and b");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (a, b, stop_a, stop_b, dir)
    }

    fn link_id(c: &Cluster, node: &str) -> Option<u64> {
        c.state.lock().links.get(node).map(|l| l.id)
    }

    fn config(dir: &std::path::Path, name: &str, peers: Vec<String>) -> Config {
        Config {
            data_dir: dir.join(name),
            node_name: name.into(),
            cluster_secret: Some("s".into()),
            peers,
            ..Config::default()
        }
    }

    #[tokio::test]
    async fn a_node_among_its_own_peers_knows_itself_and_one_peer_under_two_addresses_keeps_one_link()
     {
        let dir = tempfile::tempdir().unwrap();
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (pa, pb) = (
            la.local_addr().unwrap().port(),
            lb.local_addr().unwrap().port(),
        );
        // Every address twice (by IP and by name), its own included, as in the operator's
        // peers file.
        let peers: Vec<String> = [pa, pb]
            .iter()
            .flat_map(|p| [format!("127.0.0.1:{p}"), format!("localhost:{p}")])
            .collect();
        let a = Cluster::new(&config(dir.path(), "a", peers.clone())).unwrap();
        let b = Cluster::new(&config(dir.path(), "b", peers)).unwrap();
        let (_stop_a, rx_a) = watch::channel(false);
        let (_stop_b, rx_b) = watch::channel(false);
        a.start(la, rx_a);
        b.start(lb, rx_b);
        let deadline = Instant::now() + Duration::from_secs(10);
        while link_id(&a, "b").is_none() || link_id(&b, "a").is_none() {
            assert!(Instant::now() < deadline, "no link");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Let every address be dialed a few times over, then watch the link stay put.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (ida, idb) = (link_id(&a, "b"), link_id(&b, "a"));
        assert!(ida.is_some() && idb.is_some());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            (link_id(&a, "b"), link_id(&b, "a")),
            (ida, idb),
            "the link flaps"
        );
        let own = a.state.lock().itself.clone();
        assert!(
            own.contains(&format!("127.0.0.1:{pa}")) && own.contains(&format!("localhost:{pa}")),
            "{own:?}"
        );
        assert!(
            a.nodes()
                .iter()
                .all(|n| n.name != "a" || n.address.is_none())
        );
        assert_eq!(a.nodes().len(), 2);
    }

    /// Reads a hello off a raw connection.
    async fn raw_hello(s: &mut tokio::net::TcpStream) -> handshake::Hello {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        loop {
            if let Ok(h) = handshake::Hello::decode(&got) {
                return h;
            }
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a whole hello");
            got.extend_from_slice(&buf[..n]);
        }
    }

    #[tokio::test]
    async fn a_stranger_gets_no_proof_and_an_echo_of_our_hello_is_not_taken_for_ourselves() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a_addr = la.local_addr().unwrap();
        // A "peer" that answers every dial with the dialer's own hello.
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let h = raw_hello(&mut s).await;
                    let _ = s.write_all(&h.encode()).await;
                    let mut rest = [0u8; 64];
                    let _ = s.read(&mut rest).await;
                });
            }
        });
        let a = Cluster::new(&config(dir.path(), "a", vec![echo_addr.to_string()])).unwrap();
        let (_stop, rx) = watch::channel(false);
        a.start(la, rx);

        // A stranger dials a, says hello and sends a made-up proof: a sends no proof back.
        let mut s = tokio::net::TcpStream::connect(a_addr).await.unwrap();
        let theirs = raw_hello(&mut s).await;
        let ours = link::hello(7, "intruder", &theirs.cluster);
        s.write_all(&ours.encode()).await.unwrap();
        s.write_all(&[0u8; handshake::PROOF_LEN]).await.unwrap();
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(6), s.read_to_end(&mut rest))
            .await
            .expect("a closes the connection")
            .unwrap_or(0);
        assert_eq!(n, 0, "a sent {n} bytes after a bad proof");

        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            a.state.lock().itself.is_empty(),
            "an echo of its hello made a take an address for itself"
        );
        assert_eq!(a.nodes().len(), 1);
    }

    fn handler<F, Fut>(f: F) -> rpc::Handler
    where
        F: Fn(String, bytes::Bytes) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<bytes::Bytes, String>> + Send + 'static,
    {
        Arc::new(move |from, body| Box::pin(f(from, body)))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_that_stops_reading_loses_its_link_though_it_keeps_sending() {
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir().unwrap();
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a_addr = la.local_addr().unwrap();
        let a = Cluster::new(&config(dir.path(), "a", Vec::new())).unwrap();
        let (_stop, rx) = watch::channel(false);
        a.start(la, rx);
        // A peer that knows the secret, links up, sends heartbeats, and never reads.
        let stream = tokio::net::TcpStream::connect(a_addr).await.unwrap();
        let ours = link::hello(42, "z", "");
        let linked = link::handshake(
            tls::Connection::plain(stream),
            &ours,
            b"s",
            Role::Dialer,
            |_| false,
        )
        .await
        .unwrap();
        let (_unread, mut writer) = (linked.reader, linked.writer);
        let beating = tokio::spawn(async move {
            loop {
                if writer.write_all(&[0, 0, 0, 1, 0]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while link_id(&a, "z").is_none() {
            assert!(Instant::now() < deadline, "no link from z");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Requests pile up on the link until its socket buffers are full and a write sticks.
        let big = vec![0u8; 1 << 20];
        let calls: Vec<_> = (0..64)
            .map(|_| {
                let a = a.clone();
                let big = big.clone();
                tokio::spawn(async move { a.call("z", 1, &big, Duration::from_secs(60)).await })
            })
            .collect();
        let started = Instant::now();
        while link_id(&a, "z").is_some() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the link stays up with a write stuck"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // And the calls on it hear of it, long before their own timeout.
        for c in calls {
            let result = tokio::time::timeout(Duration::from_secs(5), c)
                .await
                .expect("the caller hears back")
                .unwrap();
            assert_eq!(result, Err(rpc::RpcError::Unreachable("z".into())));
        }
        beating.abort();
    }

    /// A CA, a certificate it signed for a name no node is dialed by, and a CA that signed
    /// nothing of it: PEM files in `dir`.
    fn link_pki(dir: &std::path::Path) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let (trusted, rogue) = (ca("cluster CA"), ca("rogue CA"));
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["node.example".to_owned()])
            .unwrap()
            .signed_by(&key, &trusted)
            .unwrap();
        std::fs::write(dir.join("ca.pem"), trusted.pem()).unwrap();
        std::fs::write(dir.join("rogue-ca.pem"), rogue.pem()).unwrap();
        std::fs::write(dir.join("node.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("node.key"), key.serialize_pem()).unwrap();
    }

    /// Relays connections to `to`, keeping every byte that crosses, both ways.
    async fn recording_relay(
        to: std::net::SocketAddr,
    ) -> (std::net::SocketAddr, Arc<Mutex<Vec<u8>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = seen.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(to).await else {
                    continue;
                };
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                for (mut from, mut to) in [
                    (
                        Box::new(ri) as Box<dyn tokio::io::AsyncRead + Send + Unpin>,
                        Box::new(wo) as Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
                    ),
                    (Box::new(ro), Box::new(wi)),
                ] {
                    let kept = kept.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = from.read(&mut buf).await {
                            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                            kept.lock().extend_from_slice(&buf[..n]);
                        }
                    });
                }
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn links_use_tls_with_a_certificate_and_refuse_nodes_without_one_or_of_another_ca() {
        let dir = tempfile::tempdir().unwrap();
        link_pki(dir.path());
        let tls = |c: Config, ca: &str| Config {
            tls_cert_file: Some(dir.path().join("node.pem")),
            tls_key_file: Some(dir.path().join("node.key")),
            tls_ca_file: Some(dir.path().join(ca)),
            ..c
        };
        let lb = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b_addr = lb.local_addr().unwrap();
        let b = Cluster::new(&tls(config(dir.path(), "tls-b", Vec::new()), "ca.pem")).unwrap();
        let (_stop_b, rx_b) = watch::channel(false);
        b.start(lb, rx_b);
        b.handle(
            1,
            handler(|_, body| async move { Ok(bytes::Bytes::from(body.to_vec())) }),
        );
        // a reaches b through a relay that keeps what crosses: the certificate names neither
        // address, and the CA it was signed by is checked.
        let (relay, seen) = recording_relay(b_addr).await;
        let la = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = Cluster::new(&tls(
            config(dir.path(), "tls-a", vec![relay.to_string()]),
            "ca.pem",
        ))
        .unwrap();
        let (_stop_a, rx_a) = watch::channel(false);
        a.start(la, rx_a);
        let deadline = Instant::now() + Duration::from_secs(10);
        while link_id(&a, "tls-b").is_none() {
            assert!(Instant::now() < deadline, "no TLS link between a and b");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let said = a
            .call("tls-b", 1, b"a private word", Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(said, bytes::Bytes::from_static(b"a private word"));
        {
            let seen = seen.lock();
            assert!(seen.len() > 100, "the relay saw the link's bytes");
            for plain in [&b"a private word"[..], b"tls-a", b"tls-b"] {
                assert!(
                    !seen.windows(plain.len()).any(|w| w == plain),
                    "{} crossed in the clear",
                    String::from_utf8_lossy(plain)
                );
            }
        }
        // A node without a certificate, and one that trusts another CA, get no link to b.
        let plain = Cluster::new(&config(dir.path(), "plain", vec![b_addr.to_string()])).unwrap();
        let other = Cluster::new(&tls(
            config(dir.path(), "other-ca", vec![b_addr.to_string()]),
            "rogue-ca.pem",
        ))
        .unwrap();
        let mut stops = Vec::new();
        for c in [&plain, &other] {
            let (stop, rx) = watch::channel(false);
            c.start(TcpListener::bind("127.0.0.1:0").await.unwrap(), rx);
            stops.push(stop);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(link_id(&plain, "tls-b"), None);
        assert_eq!(link_id(&other, "tls-b"), None);
        assert!(
            b.nodes()
                .iter()
                .all(|n| !(n.running && (n.name == "plain" || n.name == "other-ca"))),
            "{:?}",
            b.nodes()
        );
        // A machine in the middle with a certificate the nodes trust, ending one TLS session
        // with the dialer and opening another to b, passing the bytes between: the proofs of
        // one session are worthless on the other, so no link forms.
        let mitm_tls =
            tls::LinkTls::from_config(&tls(config(dir.path(), "mitm", Vec::new()), "ca.pem"))
                .unwrap()
                .unwrap();
        let mitm = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mitm_addr = mitm.local_addr().unwrap();
        // Bytes it passed from the dialer's session to b's: the hello at least, so the test
        // shows the proofs failing, not the relay.
        let relayed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = relayed.clone();
        tokio::spawn(async move {
            while let Ok((inbound, _)) = mitm.accept().await {
                let mitm_tls = mitm_tls.clone();
                let counted = counted.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(b_addr).await else {
                        return;
                    };
                    let (Ok(inner), Ok(outer)) = (
                        mitm_tls.accept(inbound).await,
                        mitm_tls.connect(outbound, &b_addr.to_string()).await,
                    ) else {
                        return;
                    };
                    let (mut ir, mut iw) = (inner.reader, inner.writer);
                    let (mut or, mut ow) = (outer.reader, outer.writer);
                    tokio::join!(
                        async {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = ir.read(&mut buf).await {
                                if n == 0 || ow.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                                let _ = ow.flush().await;
                                counted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                            }
                        },
                        async {
                            let _ = tokio::io::copy(&mut or, &mut iw).await;
                            let _ = tokio::io::AsyncWriteExt::flush(&mut iw).await;
                        },
                    );
                });
            }
        });
        let fooled = Cluster::new(&tls(
            config(dir.path(), "fooled", vec![mitm_addr.to_string()]),
            "ca.pem",
        ))
        .unwrap();
        let (_stop_fooled, rx) = watch::channel(false);
        fooled.start(TcpListener::bind("127.0.0.1:0").await.unwrap(), rx);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(link_id(&fooled, "tls-b"), None, "a link through the middle");
        drop(_stop_fooled);
        let deadline = Instant::now() + Duration::from_secs(10);
        while relayed.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the relay passed nothing on");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A certificate that cannot be read stops the node from starting, saying why.
        let broken = Config {
            tls_key_file: Some(dir.path().join("missing.key")),
            ..tls(config(dir.path(), "broken", Vec::new()), "ca.pem")
        };
        let e = Cluster::new(&broken).unwrap_err();
        assert!(e.to_string().contains("missing.key"), "{e}");
    }

    #[tokio::test]
    async fn calls_are_answered_and_every_failure_is_told_to_the_caller() {
        let (a, b, _stop_a, stop_b, _dir) = pair().await;
        b.handle(
            1,
            handler(|from, body| async move {
                Ok(bytes::Bytes::from(format!(
                    "{from} said {}",
                    String::from_utf8_lossy(&body)
                )))
            }),
        );
        b.handle(
            2,
            handler(|_, _| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(bytes::Bytes::new())
            }),
        );
        b.handle(3, handler(|_, _| async { Err("not now".to_owned()) }));
        let second = Duration::from_secs(5);
        assert_eq!(
            a.call("b", 1, b"hi", second).await.unwrap(),
            bytes::Bytes::from_static(b"a said hi")
        );
        // Many at once on one link, each answer to its own caller.
        let calls = (0..50).map(|i| {
            let a = a.clone();
            async move { a.call("b", 1, format!("{i}").as_bytes(), second).await }
        });
        let answers = futures::future::join_all(calls).await;
        for (i, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.unwrap(), format!("a said {i}").as_bytes());
        }
        assert_eq!(
            a.call("b", 3, b"", second).await,
            Err(rpc::RpcError::Failed {
                node: "b".into(),
                reason: "not now".into()
            })
        );
        match a.call("b", 99, b"", second).await {
            Err(rpc::RpcError::Failed { reason, .. }) => assert!(reason.contains("no service 99")),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            a.call("nobody", 1, b"", second).await,
            Err(rpc::RpcError::Unreachable("nobody".into()))
        );
        assert_eq!(
            a.call("b", 2, b"", Duration::from_millis(200)).await,
            Err(rpc::RpcError::TimedOut("b".into()))
        );
        // A call in flight when the link goes: told at once, not at its timeout.
        let waiting = {
            let a = a.clone();
            tokio::spawn(async move { a.call("b", 2, b"", Duration::from_secs(30)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = Instant::now();
        stop_b.send(true).unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the caller hears of the lost link")
            .unwrap();
        assert_eq!(result, Err(rpc::RpcError::Unreachable("b".into())));
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn peers_without_a_port_get_the_cluster_port() {
        assert_eq!(
            with_port("n1.warren-nodes.ns.svc"),
            "n1.warren-nodes.ns.svc:25672"
        );
        assert_eq!(with_port("127.0.0.1:4000"), "127.0.0.1:4000");
        assert_eq!(with_port(" host:1 "), "host:1");
        assert_eq!(with_port("::1"), "[::1]:25672");
        assert_eq!(with_port("[::1]:7"), "[::1]:7");
    }
}
