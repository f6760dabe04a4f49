//! Classic queues owned by other nodes: any node serves any queue.
//!
//! A durable classic queue lives on the node it was declared on (its home, recorded in its
//! definition). Every other node holds a [`RemoteQueue`] for it: publishes, consumers,
//! `basic.get`, acknowledgements, purges and lengths are forwarded over the cluster link to
//! the home node, which does them on its own queue with the same code as for its own clients.
//!
//! What goes over the link:
//! - **One-way messages, in order** (handled on the link's reading task, never blocking):
//!   publishes, their confirms back once the home node has the message on disk, deliveries
//!   to consumers, the credit a consumer's node gives back as its channels take them,
//!   settlements (ack, reject, requeue) and cancellations.
//! - **Requests** for what needs an answer: consume, get, lengths, purge.
//!
//! Flow control: a home node sends a consumer at most [`DELIVERY_WINDOW`] deliveries its
//! node has not yet handed to the channel, and a node forwards at most
//! [`PUBLISH_WINDOW`] unconfirmed publishes to one home before holding its publishers.
//!
//! Failure: when a link goes down, the home node takes back every delivery it made over it
//! (requeued, marked redelivered) and drops its consumers; the other node cancels its
//! consumers of the home's queues (clients get `basic.cancel`) and nacks publishes not yet
//! confirmed.

use super::message::{Message, now_ms};
use super::policy::{Policy, QueueKind};
pub use super::queue::Unavailable;
use super::queue::{
    ConsumeRefused, Consumer, DeleteRefused, Delivered, DeliverySink, Enqueued, QueueLengths,
    QueueRef, QueueSpec, RemoteHome, Settings, top_level,
};
use super::ready::QueuedMessage;
use crate::cluster::{Cluster, block_on, rpc};
use crate::store::Storage;
use crate::store::durability::{FORWARDED, Progress, Ticket};
use crate::store::record::{decode_record, encode_record};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// Deliveries a home node sends one remote consumer before its node gives credit back.
pub const DELIVERY_WINDOW: u32 = 256;
/// Unconfirmed publishes a node forwards to one home node before holding its publishers.
pub const PUBLISH_WINDOW: usize = 4096;
/// How long a forwarded request waits for its answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a delivery that found the link's queue full is tried again.
const RETRY: Duration = Duration::from_millis(20);

/// The services of forwarding, by number (those of the metadata group are below 20).
mod service {
    use crate::cluster::rpc::Service;
    pub const PUBLISH: Service = 20;
    pub const PUBLISHED: Service = 21;
    pub const DELIVER: Service = 22;
    pub const CREDIT: Service = 23;
    pub const SETTLE: Service = 24;
    pub const CANCEL: Service = 25;
    pub const CANCELLED: Service = 26;
    pub const CONSUME: Service = 30;
    pub const GET: Service = 31;
    pub const LENGTHS: Service = 32;
    pub const PURGE: Service = 33;
    /// A consumer cancelled, answered once the home has taken it off its queue.
    pub const CANCEL_NOW: Service = 34;
}

/// How forwarded deliveries are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum How {
    Ack = 0,
    Reject = 1,
    Requeue = 2,
}

/// What the home side of forwarding needs of the broker.
pub trait Home: Send + Sync {
    /// This node's own queue `name` in `vhost`.
    fn local_queue(&self, vhost: &str, name: &str) -> Option<QueueRef>;
    /// Deletes an auto-delete queue its last consumer left (it may wait for the cluster).
    fn remove_queue(&self, q: &QueueRef);
    fn storage(&self) -> Arc<Storage>;
}

/// This node's side of forwarding: the queues it serves to other nodes and the remote
/// queues its clients use.
pub struct Forwarder {
    me: Weak<Forwarder>,
    cluster: Arc<Cluster>,
    rt: tokio::runtime::Handle,
    home: OnceLock<Weak<dyn Home>>,
    /// Ids of consumers made here on remote queues, and of deliveries made here to other
    /// nodes: unique for the process's life, so a stale one never matches.
    next_id: AtomicU64,
    /// This node's consumers on other nodes' queues.
    consumers: Mutex<HashMap<u64, Arc<RemoteConsumer>>>,
    /// Publishes forwarded and not yet confirmed, by home node: entry and the link it went on.
    unconfirmed: Mutex<HashMap<String, HashMap<u64, u64>>>,
    /// Told when a home's unconfirmed publishes fall below half the window.
    publish_room: Notify,
    /// What this node serves to other nodes, by the node and link it serves them on.
    served: Mutex<HashMap<(String, u64), SharedServed>>,
    /// Publishes taken for other nodes, waiting to be safe before they are confirmed.
    confirming: Mutex<Vec<Confirming>>,
    confirm_wake: Notify,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("node", &self.cluster.node())
            .field("consumers", &self.consumers.lock().len())
            .field("served", &self.served.lock().len())
            .finish()
    }
}

struct Confirming {
    node: String,
    link: u64,
    entry: u64,
    ticket: Ticket,
    /// False when the queue refused the message (reject-publish): nacked.
    ok: bool,
}

/// What this node serves another over one link, shared with the sinks of its consumers.
type SharedServed = Arc<Mutex<Served>>;

/// Remote consumers by their id (given by their node): the queue, the consumer as the queue
/// has it, and its sink.
type ServedConsumers = HashMap<u64, (QueueRef, Arc<Consumer>, Arc<RemoteSink>)>;

/// What this node serves another over one link.
#[derive(Default)]
struct Served {
    /// Remote consumers by their id (given by their node).
    consumers: ServedConsumers,
    /// Deliveries not yet settled, by delivery id.
    delivered: HashMap<u64, Delivered>,
    /// Its link went: nothing more is recorded here.
    closed: bool,
}

/// A small writer of the fields forwarding sends.
struct Out(BytesMut);

impl Out {
    fn new() -> Self {
        Self(BytesMut::with_capacity(64))
    }
    fn u8(mut self, v: u8) -> Self {
        self.0.put_u8(v);
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.put_u32(v);
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.put_u64(v);
        self
    }
    fn i32(mut self, v: i32) -> Self {
        self.0.put_i32(v);
        self
    }
    fn str(mut self, s: &str) -> Self {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.0.put_u16(b.len() as u16);
        self.0.put_slice(b);
        self
    }
    /// A message: persistence, then its record (the same encoding as on disk).
    fn message(mut self, m: &Message) -> Self {
        self.0.put_u8(u8::from(m.persistent));
        let mut record = Vec::with_capacity(64 + m.size());
        encode_record(&mut record, 0, m);
        self.0.put_slice(&record);
        self
    }
    fn done(self) -> Bytes {
        self.0.freeze()
    }
}

/// The matching reader: every read fails cleanly on a short or malformed body.
struct In(Bytes);

impl In {
    fn u8(&mut self) -> Option<u8> {
        (self.0.remaining() >= 1).then(|| self.0.get_u8())
    }
    fn u32(&mut self) -> Option<u32> {
        (self.0.remaining() >= 4).then(|| self.0.get_u32())
    }
    fn u64(&mut self) -> Option<u64> {
        (self.0.remaining() >= 8).then(|| self.0.get_u64())
    }
    fn i32(&mut self) -> Option<i32> {
        (self.0.remaining() >= 4).then(|| self.0.get_i32())
    }
    fn str(&mut self) -> Option<String> {
        if self.0.remaining() < 2 {
            return None;
        }
        let len = self.0.get_u16() as usize;
        if self.0.remaining() < len {
            return None;
        }
        String::from_utf8(self.0.split_to(len).to_vec()).ok()
    }
    /// The rest is a message.
    fn message(&mut self) -> Option<Message> {
        let persistent = self.u8()? != 0;
        let rest = std::mem::take(&mut self.0);
        decode_record(&rest, persistent).ok().map(|(_, m)| m)
    }
}

impl Forwarder {
    /// Forwarding over `cluster`'s links; its tasks run on `rt`.
    pub fn new(cluster: Arc<Cluster>, rt: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            cluster,
            rt,
            home: OnceLock::new(),
            // Random high bits: an id of an earlier process of this node never matches one of
            // this process (a settlement sent before a restart finds nothing).
            next_id: AtomicU64::new((rand::random::<u64>() >> 16) << 16 | 1),
            consumers: Mutex::new(HashMap::new()),
            unconfirmed: Mutex::new(HashMap::new()),
            publish_room: Notify::new(),
            served: Mutex::new(HashMap::new()),
            confirming: Mutex::new(Vec::new()),
            confirm_wake: Notify::new(),
        })
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        self.cluster.node()
    }

    /// Whether a link to `node` is up.
    pub fn reaches(&self, node: &str) -> bool {
        self.cluster.link_to(node).is_some()
    }

    /// Starts serving this node's queues to the others (`home` finds them) and listening for
    /// what they send back.
    pub fn start(self: &Arc<Self>, home: Weak<dyn Home>) {
        let _ = self.home.set(home);
        let cast = |service, f: fn(&Forwarder, &str, u64, In)| {
            let me = self.me.clone();
            self.cluster.on_cast(
                service,
                Arc::new(move |node: &str, link: u64, body: Bytes| {
                    if let Some(me) = me.upgrade() {
                        f(&me, node, link, In(body));
                    }
                }),
            );
        };
        cast(service::PUBLISH, Forwarder::on_publish);
        cast(service::PUBLISHED, Forwarder::on_published);
        cast(service::DELIVER, Forwarder::on_deliver);
        cast(service::CREDIT, Forwarder::on_credit);
        cast(service::SETTLE, Forwarder::on_settle);
        cast(service::CANCEL, Forwarder::on_cancel);
        cast(service::CANCELLED, Forwarder::on_cancelled);
        let call = |service, f: fn(&Forwarder, &str, In) -> Result<Bytes, String>| {
            let me = self.me.clone();
            self.cluster.handle(
                service,
                Arc::new(move |node: String, body: Bytes| {
                    let me = me.clone();
                    Box::pin(async move {
                        let me = me.upgrade().ok_or("stopping")?;
                        f(&me, &node, In(body))
                    })
                }),
            );
        };
        call(service::CONSUME, Forwarder::serve_consume);
        call(service::GET, Forwarder::serve_get);
        call(service::LENGTHS, Forwarder::serve_lengths);
        call(service::PURGE, Forwarder::serve_purge);
        call(service::CANCEL_NOW, Forwarder::serve_cancel);
        let me = self.me.clone();
        self.cluster
            .on_link_down(Arc::new(move |node: &str, link: u64| {
                if let Some(me) = me.upgrade() {
                    me.link_down(node, link);
                }
            }));
        self.rt.spawn(confirm_loop(self.me.clone()));
    }

    fn home(&self) -> Option<Arc<dyn Home>> {
        self.home.get().and_then(Weak::upgrade)
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// A request to `node`, waited for on this thread.
    fn call(&self, node: &str, service: rpc::Service, body: Bytes) -> Result<Bytes, Unavailable> {
        let cluster = self.cluster.clone();
        let to = node.to_owned();
        let answer = block_on(&self.rt, async move {
            cluster.call(&to, service, &body, CALL_TIMEOUT).await
        });
        match answer {
            Some(Ok(b)) => Ok(b),
            Some(Err(rpc::RpcError::Failed { reason, .. })) => Err(if reason == "not_found" {
                Unavailable::NotFound
            } else {
                Unavailable::Refused(reason)
            }),
            _ => Err(Unavailable::HomeDown(node.to_owned())),
        }
    }

    /// Sends a one-way message that must not be lost while the link stays up (settlements,
    /// credit): when the link's queue is full, it is sent again shortly, as long as the same
    /// link is up. A link that goes takes its state with it on both sides.
    fn cast_surely(&self, node: &str, link: u64, service: rpc::Service, body: Bytes) {
        if self.cluster.cast_on(node, link, service, &body).is_some() {
            return;
        }
        let cluster = self.cluster.clone();
        let node = node.to_owned();
        self.rt.spawn(async move {
            for _ in 0..250 {
                if cluster.link_to(&node) != Some(link) {
                    return;
                }
                tokio::time::sleep(RETRY).await;
                if cluster.cast_on(&node, link, service, &body).is_some() {
                    return;
                }
            }
            // Both ends recover from a link that goes: better than a lost settlement.
            cluster.drop_link(&node, link, "its queue stayed full for 5 s");
        });
    }

    // ---- The side of the node whose clients use a remote queue ----

    /// Forwards a publish to `q`'s home.
    fn publish(&self, q: &RemoteQueue, message: &Message) -> Enqueued {
        let entry = FORWARDED.open();
        let ticket = Ticket::forwarded(entry);
        let body = Out::new()
            .u64(entry.get())
            .str(&q.vhost)
            .str(&q.spec.name)
            .message(message)
            .done();
        let backlogged = {
            let mut all = self.unconfirmed.lock();
            let mine = all.entry(q.node.clone()).or_default();
            mine.insert(entry.get(), 0);
            mine.len() > PUBLISH_WINDOW
        };
        match self.cluster.cast(&q.node, service::PUBLISH, &body) {
            Some(link) => {
                let still = {
                    let mut all = self.unconfirmed.lock();
                    match all.get_mut(&q.node).and_then(|m| m.get_mut(&entry.get())) {
                        Some(l) => {
                            *l = link;
                            true
                        }
                        None => false,
                    }
                };
                // The link went down before the entry knew it: nobody else fails it.
                if still && self.cluster.link_to(&q.node) != Some(link) {
                    self.unconfirmed_settled(&q.node, [(entry.get(), false)]);
                }
            }
            None => self.unconfirmed_settled(&q.node, [(entry.get(), false)]),
        }
        Enqueued::Accepted { ticket, backlogged }
    }

    fn unconfirmed_settled(&self, node: &str, entries: impl IntoIterator<Item = (u64, bool)>) {
        // Only entries forwarded to that node: an answer settles nothing else.
        let mut settled = Vec::new();
        let room = {
            let mut all = self.unconfirmed.lock();
            match all.get_mut(node) {
                Some(mine) => {
                    settled.extend(
                        entries
                            .into_iter()
                            .filter(|(e, _)| mine.remove(e).is_some()),
                    );
                    mine.len() <= PUBLISH_WINDOW / 2
                }
                None => true,
            }
        };
        FORWARDED.settle(settled);
        if room {
            self.publish_room.notify_waiters();
        }
    }

    fn holds_publisher(&self, node: &str) -> bool {
        self.unconfirmed
            .lock()
            .get(node)
            .is_some_and(|m| m.len() > PUBLISH_WINDOW)
    }

    /// Confirms from a home node: entries and whether each is safe.
    fn on_published(&self, node: &str, _link: u64, mut body: In) {
        let mut entries = Vec::new();
        while let (Some(e), Some(ok)) = (body.u64(), body.u8()) {
            entries.push((e, ok != 0));
        }
        self.unconfirmed_settled(node, entries);
    }

    /// A delivery from a home node to one of this node's consumers.
    fn on_deliver(&self, node: &str, link: u64, mut body: In) {
        let (Some(consumer), Some(delivery), Some(redelivered), Some(returned)) =
            (body.u64(), body.u64(), body.u8(), body.u32())
        else {
            return;
        };
        let Some(message) = body.message() else {
            tracing::warn!(node, "malformed forwarded delivery dropped");
            return;
        };
        let rc = self
            .consumers
            .lock()
            .get(&consumer)
            .filter(|rc| rc.link == link)
            .cloned();
        let taken = rc.as_ref().is_some_and(|rc| {
            let mut buffer = rc.buffer.lock();
            if buffer.closed {
                return false;
            }
            buffer.messages.push_back(QueuedMessage {
                seq: delivery,
                message: Arc::new(message),
                redelivered: redelivered != 0,
                location: None,
                returned,
                level: 0,
            });
            true
        });
        match rc {
            Some(rc) if taken => rc.pump(self),
            // Gone (cancelled meanwhile, or never known here): the home takes it back and
            // forgets the consumer.
            _ => {
                self.settle_ids(node, link, How::Requeue, [delivery]);
                self.cancel_at_home(node, link, consumer);
            }
        }
    }

    /// The home cancelled a consumer (its queue was deleted).
    fn on_cancelled(&self, _node: &str, _link: u64, mut body: In) {
        let Some(id) = body.u64() else { return };
        let rc = self.consumers.lock().remove(&id);
        if let Some(rc) = rc {
            rc.cancel_locally();
        }
    }

    fn settle(&self, node: &str, delivered: &[Delivered], how: How) {
        // Deliveries of a link that went were taken back by the home when it saw it go.
        let Some(link) = self.cluster.link_to(node) else {
            return;
        };
        self.settle_ids(node, link, how, delivered.iter().map(|d| d.msg.seq));
    }

    /// Tells the home over `link` how deliveries `ids` are settled (nothing when there are
    /// none).
    fn settle_ids(&self, node: &str, link: u64, how: How, ids: impl IntoIterator<Item = u64>) {
        let ids: Vec<u64> = ids.into_iter().collect();
        // Frames stay well under the link's limit.
        for chunk in ids.chunks(8192) {
            let mut out = Out::new().u8(how as u8);
            for id in chunk {
                out = out.u64(*id);
            }
            self.cast_surely(node, link, service::SETTLE, out.done());
        }
    }

    /// Tells the home over `link` that consumer `id` is gone.
    fn cancel_at_home(&self, node: &str, link: u64, id: u64) {
        self.cast_surely(node, link, service::CANCEL, Out::new().u64(id).done());
    }

    fn link_down(&self, node: &str, link: u64) {
        // This node's consumers of that node's queues: cancelled.
        let gone: Vec<Arc<RemoteConsumer>> = {
            let mut consumers = self.consumers.lock();
            let ids: Vec<u64> = consumers
                .iter()
                .filter(|(_, rc)| {
                    rc.node == node && rc.link == link && rc.active.load(Ordering::Acquire)
                })
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| consumers.remove(id)).collect()
        };
        for rc in gone {
            rc.cancel_locally();
        }
        // Publishes it had not confirmed: nacked.
        let failed: Vec<(u64, bool)> = self
            .unconfirmed
            .lock()
            .get(node)
            .map(|m| {
                m.iter()
                    .filter(|(_, l)| **l == link)
                    .map(|(e, _)| (*e, false))
                    .collect()
            })
            .unwrap_or_default();
        if !failed.is_empty() {
            tracing::warn!(
                node,
                unconfirmed = failed.len(),
                "link to a home node lost; its unconfirmed publishes are nacked"
            );
            self.unconfirmed_settled(node, failed);
        }
        // What this node served over that link: deliveries back in their queues.
        let served = self.served.lock().remove(&(node.to_owned(), link));
        if let Some(served) = served {
            let (consumers, delivered) = {
                let mut s = served.lock();
                s.closed = true;
                (
                    std::mem::take(&mut s.consumers),
                    std::mem::take(&mut s.delivered),
                )
            };
            self.release(consumers, delivered);
        }
    }

    /// Takes back what a node was served: its consumers removed first (so that nothing is
    /// handed to them again), then its deliveries requeued.
    fn release(&self, consumers: ServedConsumers, delivered: HashMap<u64, Delivered>) {
        for (q, consumer, _) in consumers.into_values() {
            if q.remove_consumer(&consumer) {
                self.auto_delete(q);
            }
        }
        let mut by_queue: Vec<(QueueRef, Vec<Delivered>)> = Vec::new();
        for d in delivered.into_values() {
            match by_queue.iter_mut().find(|(q, _)| *q == d.queue) {
                Some((_, v)) => v.push(d),
                None => by_queue.push((d.queue.clone(), vec![d])),
            }
        }
        for (q, mut run) in by_queue {
            run.sort_by_key(|d| d.msg.seq);
            q.requeue(run);
        }
    }

    fn auto_delete(&self, q: QueueRef) {
        if let Some(home) = self.home() {
            // It commits the deletion, which may wait for the cluster: not on a link's task.
            self.rt.spawn_blocking(move || home.remove_queue(&q));
        }
    }

    // ---- The home side ----

    /// What `node` is served over `link`, while that link is up (a link that went has been
    /// accounted for: nothing is recorded for it again).
    fn served(&self, node: &str, link: u64) -> Option<SharedServed> {
        if self.cluster.link_to(node) != Some(link) {
            return None;
        }
        let served = self
            .served
            .lock()
            .entry((node.to_owned(), link))
            .or_default()
            .clone();
        // Its end may have come just now, before the entry was made: then it found none.
        if self.cluster.link_to(node) != Some(link) {
            self.served.lock().remove(&(node.to_owned(), link));
            return None;
        }
        Some(served)
    }

    fn existing_served(&self, node: &str, link: u64) -> Option<SharedServed> {
        self.served.lock().get(&(node.to_owned(), link)).cloned()
    }

    fn on_publish(&self, node: &str, link: u64, mut body: In) {
        let (Some(entry), Some(vhost), Some(queue)) = (body.u64(), body.str(), body.str()) else {
            return;
        };
        let Some(message) = body.message() else {
            tracing::warn!(node, "malformed forwarded publish dropped");
            return;
        };
        let (ticket, ok) = match self.home().and_then(|h| h.local_queue(&vhost, &queue)) {
            Some(q) => match q.publish(Arc::new(message)) {
                Enqueued::Accepted { ticket, .. } => (ticket, true),
                Enqueued::Rejected => (Ticket::Done, false),
                // Deleted meanwhile: dropped, as a local publish to it is.
                Enqueued::Deleted => (Ticket::Done, true),
            },
            // Not (or no longer) here while the other node has it: nacked, not dropped
            // silently.
            None => (Ticket::Done, false),
        };
        self.confirming.lock().push(Confirming {
            node: node.to_owned(),
            link,
            entry,
            ticket,
            ok,
        });
        self.confirm_wake.notify_one();
    }

    fn on_credit(&self, node: &str, link: u64, mut body: In) {
        let (Some(id), Some(n)) = (body.u64(), body.u32()) else {
            return;
        };
        let Some(served) = self.existing_served(node, link) else {
            return;
        };
        let found = served.lock().consumers.get(&id).cloned();
        if let Some((q, _, sink)) = found {
            let _ = sink
                .in_flight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                    Some(f.saturating_sub(n))
                });
            q.dispatch();
        }
    }

    fn on_settle(&self, node: &str, link: u64, mut body: In) {
        let Some(how) = body.u8() else { return };
        let Some(served) = self.existing_served(node, link) else {
            return;
        };
        let mut taken = Vec::new();
        {
            let mut s = served.lock();
            while let Some(id) = body.u64() {
                if let Some(d) = s.delivered.remove(&id) {
                    taken.push(d);
                }
            }
        }
        let mut by_queue: Vec<(QueueRef, Vec<Delivered>)> = Vec::new();
        for d in taken {
            match by_queue.iter_mut().find(|(q, _)| *q == d.queue) {
                Some((_, v)) => v.push(d),
                None => by_queue.push((d.queue.clone(), vec![d])),
            }
        }
        for (q, run) in by_queue {
            match how {
                0 => q.settle(&run, true),
                1 => q.settle(&run, false),
                _ => q.requeue(run),
            }
        }
    }

    fn on_cancel(&self, node: &str, link: u64, mut body: In) {
        if let Some(id) = body.u64() {
            self.cancel_served(node, link, id);
        }
    }

    /// A consumer's `basic.cancel`: answered once it is off its queue, so that everything
    /// the queue sent it is on the link before the answer.
    fn serve_cancel(&self, node: &str, mut body: In) -> Result<Bytes, String> {
        let id = body.u64().ok_or_else(|| "malformed cancel".to_owned())?;
        let link = rpc::request_link().ok_or_else(|| "no link".to_owned())?;
        self.cancel_served(node, link, id);
        Ok(Bytes::new())
    }

    fn cancel_served(&self, node: &str, link: u64, id: u64) {
        let Some(served) = self.existing_served(node, link) else {
            return;
        };
        let found = served.lock().consumers.remove(&id);
        if let Some((q, consumer, _)) = found
            && q.remove_consumer(&consumer)
        {
            self.auto_delete(q);
        }
    }

    fn serve_consume(&self, node: &str, mut body: In) -> Result<Bytes, String> {
        let bad = || "malformed consume".to_owned();
        let id = body.u64().ok_or_else(bad)?;
        let q = self.named_queue(&mut body)?;
        let tag = body.str().ok_or_else(bad)?;
        let flags = body.u8().ok_or_else(bad)?;
        let priority = body.i32().ok_or_else(bad)?;
        let prefetch = body.u32().ok_or_else(bad)?;
        let link = rpc::request_link().ok_or_else(|| "no link".to_owned())?;
        let served = self
            .served(node, link)
            .ok_or_else(|| "link gone".to_owned())?;
        let sink = Arc::new(RemoteSink {
            forwarder: self.me.clone(),
            node: node.to_owned(),
            link,
            id,
            served: Arc::downgrade(&served),
            in_flight: AtomicU32::new(0),
            retrying: Arc::new(AtomicBool::new(false)),
        });
        let consumer = Arc::new(Consumer::new(
            tag.into(),
            flags & 1 != 0,
            flags & 2 != 0,
            priority,
            prefetch,
            sink.clone(),
            Default::default(),
        ));
        // Known before the queue can deliver to it.
        {
            let mut s = served.lock();
            if s.closed {
                return Err("link gone".to_owned());
            }
            s.consumers.insert(id, (q.clone(), consumer.clone(), sink));
        }
        match q.add_consumer(consumer.clone(), || {}) {
            // Its link went while it was added: taken off again.
            Ok(()) if served.lock().closed => {
                if q.remove_consumer(&consumer) {
                    self.auto_delete(q);
                }
                Err("link gone".to_owned())
            }
            Ok(()) => Ok(Bytes::new()),
            Err(why) => {
                served.lock().consumers.remove(&id);
                Err(match why {
                    ConsumeRefused::ExclusiveInUse => "exclusive",
                    ConsumeRefused::Deleted | ConsumeRefused::HomeDown => "not_found",
                }
                .to_owned())
            }
        }
    }

    fn serve_get(&self, node: &str, mut body: In) -> Result<Bytes, String> {
        let bad = || "malformed get".to_owned();
        let id = body.u64().ok_or_else(bad)?;
        let q = self.named_queue(&mut body)?;
        let no_ack = body.u8().ok_or_else(bad)? != 0;
        let link = rpc::request_link().ok_or_else(|| "no link".to_owned())?;
        let served = if no_ack {
            None
        } else {
            Some(
                self.served(node, link)
                    .ok_or_else(|| "link gone".to_owned())?,
            )
        };
        let Ok(Some((msg, remaining))) = q.get(no_ack) else {
            return Ok(Out::new().u8(0).done());
        };
        let out = Out::new()
            .u8(1)
            .u32(remaining)
            .u64(id)
            .u8(u8::from(msg.redelivered))
            .u32(msg.returned)
            .message(&msg.message)
            .done();
        if let Some(served) = served {
            let d = Delivered {
                queue: q.clone(),
                consumer: None,
                msg,
                delivered_at_ms: now_ms(),
            };
            let mut s = served.lock();
            if s.closed {
                drop(s);
                q.requeue(vec![d]);
                return Err("link gone".to_owned());
            }
            // Settled by the id the other node chose (it requeues it by that id when the
            // answer does not reach it).
            s.delivered.insert(id, d);
        }
        Ok(out)
    }

    /// The queue a request names next (vhost, then name): one of this node's own.
    fn named_queue(&self, body: &mut In) -> Result<QueueRef, String> {
        let bad = || "malformed request".to_owned();
        let vhost = body.str().ok_or_else(bad)?;
        let queue = body.str().ok_or_else(bad)?;
        self.home()
            .and_then(|h| h.local_queue(&vhost, &queue))
            .ok_or_else(|| "not_found".to_owned())
    }

    fn serve_lengths(&self, _node: &str, mut body: In) -> Result<Bytes, String> {
        let q = self.named_queue(&mut body)?;
        let l = q.lengths();
        Ok(Out::new()
            .u64(l.ready)
            .u64(l.ready_bytes)
            .u64(l.in_memory)
            .u64(l.unacked)
            .u64(l.unacked_bytes)
            .u64(l.consumers)
            .done())
    }

    fn serve_purge(&self, _node: &str, mut body: In) -> Result<Bytes, String> {
        let q = self.named_queue(&mut body)?;
        let purged = q.purge().map_err(|_| "not_found".to_owned())?;
        Ok(Out::new().u32(purged).done())
    }
}

/// Sends the confirms of publishes taken for other nodes once they are safe: a batch at a
/// time, each batch waiting for one flush round (group commit).
async fn confirm_loop(me: Weak<Forwarder>) {
    loop {
        let Some(fwd) = me.upgrade() else { return };
        let batch = std::mem::take(&mut *fwd.confirming.lock());
        if batch.is_empty() {
            // Held for a second at most: a broker that goes ends this loop soon after.
            tokio::select! {
                () = fwd.confirm_wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let Some(storage) = fwd.home().map(|h| h.storage()) else {
            return;
        };
        let latest = batch.iter().fold(Ticket::Done, |t, c| t.and(c.ticket));
        latest.wait(&storage).await;
        let progress = Progress::of(&storage);
        let mut by_link: HashMap<(String, u64), Out> = HashMap::new();
        for c in batch {
            let ok = c.ok && c.ticket.is_done(progress);
            let out = by_link
                .remove(&(c.node.clone(), c.link))
                .unwrap_or_else(Out::new);
            by_link.insert((c.node, c.link), out.u64(c.entry).u8(u8::from(ok)));
        }
        for ((node, link), out) in by_link {
            let body = out.done();
            // The link's queue may be full for a moment; a link that went is the other
            // node's to account for (it nacks what it had forwarded on it).
            for _ in 0..250 {
                if fwd.cluster.link_to(&node) != Some(link) {
                    break;
                }
                if fwd
                    .cluster
                    .cast_on(&node, link, service::PUBLISHED, &body)
                    .is_some()
                {
                    break;
                }
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// A consumer on another node, as the home node's queue sees it: deliveries go over the link.
struct RemoteSink {
    forwarder: Weak<Forwarder>,
    node: String,
    /// The link the consumer was registered over: deliveries go on it only.
    link: u64,
    /// The consumer's id on its node.
    id: u64,
    served: Weak<Mutex<Served>>,
    /// Deliveries sent that its node has not yet handed to a channel.
    in_flight: AtomicU32,
    /// A dispatch is scheduled for when the link's queue has room again.
    retrying: Arc<AtomicBool>,
}

impl DeliverySink for RemoteSink {
    fn offer(
        &self,
        queue: &QueueRef,
        consumer: &Arc<Consumer>,
        msg: QueuedMessage,
    ) -> Result<(), QueuedMessage> {
        let (Some(fwd), Some(served)) = (self.forwarder.upgrade(), self.served.upgrade()) else {
            return Err(msg);
        };
        if self.in_flight.load(Ordering::Acquire) >= DELIVERY_WINDOW {
            return Err(msg);
        }
        let delivery = fwd.next_id();
        let body = Out::new()
            .u64(self.id)
            .u64(delivery)
            .u8(u8::from(msg.redelivered))
            .u32(msg.returned)
            .message(&msg.message)
            .done();
        // Recorded before it is sent: a settlement, or the link going, finds it.
        {
            let mut s = served.lock();
            if s.closed {
                return Err(msg);
            }
            if !consumer.no_ack {
                s.delivered.insert(
                    delivery,
                    Delivered {
                        queue: queue.clone(),
                        consumer: Some(consumer.clone()),
                        msg: msg.clone(),
                        delivered_at_ms: now_ms(),
                    },
                );
            }
        }
        if fwd
            .cluster
            .cast_on(&self.node, self.link, service::DELIVER, &body)
            .is_none()
        {
            let mine = consumer.no_ack || served.lock().delivered.remove(&delivery).is_some();
            if !mine {
                // The link's end took it back (requeued) meanwhile.
                return Ok(());
            }
            // The link's queue is full: tried again shortly, once for all its deliveries. A
            // link that went takes the consumer away.
            if fwd.cluster.link_to(&self.node) == Some(self.link)
                && !self.retrying.swap(true, Ordering::AcqRel)
            {
                let q = queue.clone();
                let retrying = self.retrying.clone();
                fwd.rt.spawn(async move {
                    tokio::time::sleep(RETRY).await;
                    retrying.store(false, Ordering::Release);
                    q.dispatch();
                });
            }
            return Err(msg);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn cancelled(&self, _consumer: &Arc<Consumer>) {
        // Its deliveries stay settleable; the consumer itself is gone.
        if let Some(served) = self.served.upgrade() {
            served.lock().consumers.remove(&self.id);
        }
        if let Some(fwd) = self.forwarder.upgrade() {
            let body = Out::new().u64(self.id).done();
            fwd.cast_surely(&self.node, self.link, service::CANCELLED, body);
        }
    }
}

/// A consumer of this node on a remote queue: what the home delivered, until a channel takes
/// it.
struct RemoteConsumer {
    id: u64,
    node: String,
    /// The link the consumer was registered over.
    link: u64,
    queue: Weak<RemoteQueue>,
    consumer: Arc<Consumer>,
    /// Accepted by the home (before: deliveries wait, consume-ok is not sent yet).
    active: AtomicBool,
    buffer: Mutex<Buffer>,
}

#[derive(Default)]
struct Buffer {
    messages: VecDeque<QueuedMessage>,
    /// The consumer ended here: what arrives now goes back to the home.
    closed: bool,
}

impl RemoteConsumer {
    /// Hands buffered deliveries to the channel while it takes them; gives the home credit
    /// for what it took.
    fn pump(&self, fwd: &Forwarder) {
        if !self.active.load(Ordering::Acquire) {
            return;
        }
        let Some(q) = self.queue.upgrade() else {
            return;
        };
        let handle = QueueRef::Remote(q);
        let mut taken = 0u32;
        {
            let mut buffer = self.buffer.lock();
            while let Some(msg) = buffer.messages.pop_front() {
                match self.consumer.sink.offer(&handle, &self.consumer, msg) {
                    Ok(()) => taken += 1,
                    Err(msg) => {
                        buffer.messages.push_front(msg);
                        break;
                    }
                }
            }
        }
        if taken > 0 {
            let body = Out::new().u64(self.id).u32(taken).done();
            fwd.cast_surely(&self.node, self.link, service::CREDIT, body);
        }
    }

    /// Ends the consumer here; returns the ids of what the home delivered and no channel
    /// took (for the home to take back).
    fn close(&self) -> Vec<u64> {
        self.active.store(false, Ordering::Release);
        let mut buffer = self.buffer.lock();
        buffer.closed = true;
        buffer.messages.drain(..).map(|m| m.seq).collect()
    }

    /// The consumer ends here because its home or its link went: its channel hears
    /// `basic.cancel`.
    fn cancel_locally(&self) {
        self.close();
        if let Some(q) = self.queue.upgrade() {
            q.consumers.lock().retain(|c| c.id != self.id);
        }
        self.consumer.sink.cancelled(&self.consumer);
    }
}

/// A durable classic queue whose home is another node.
pub struct RemoteQueue {
    pub(super) spec: QueueSpec,
    pub(super) vhost: Arc<str>,
    /// The home node.
    node: String,
    forwarder: Arc<Forwarder>,
    settings: Mutex<Arc<Settings>>,
    deleted: AtomicBool,
    consumers: Mutex<Vec<Arc<RemoteConsumer>>>,
}

impl std::fmt::Debug for RemoteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteQueue")
            .field("name", &self.spec.name)
            .field("vhost", &self.vhost)
            .field("node", &self.node)
            .finish()
    }
}

impl RemoteQueue {
    pub fn new(
        spec: QueueSpec,
        vhost: Arc<str>,
        node: String,
        forwarder: Arc<Forwarder>,
    ) -> Arc<Self> {
        let settings = Arc::new(Settings::new(&spec.arguments, None, None));
        Arc::new(Self {
            spec,
            vhost,
            node,
            forwarder,
            settings: Mutex::new(settings),
            deleted: AtomicBool::new(false),
            consumers: Mutex::new(Vec::new()),
        })
    }

    fn names(&self) -> Out {
        Out::new().str(&self.vhost).str(&self.spec.name)
    }
}

impl RemoteHome for RemoteQueue {
    fn spec(&self) -> &QueueSpec {
        &self.spec
    }

    fn vhost(&self) -> &Arc<str> {
        &self.vhost
    }

    /// The home node.
    fn node(&self) -> &str {
        &self.node
    }

    /// The home node when it cannot be reached now.
    fn unreachable_home(&self) -> Option<&str> {
        (!self.forwarder.reaches(&self.node)).then_some(self.node.as_str())
    }

    fn is_single_active_consumer(&self) -> bool {
        self.settings.lock().features.single_active_consumer
    }

    fn queue_type(&self) -> &'static str {
        QueueKind::of(&self.spec.arguments).as_str()
    }

    fn top_level(&self) -> u8 {
        top_level(&self.spec.arguments)
    }

    fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// The lengths the home node has now.
    fn lengths(&self) -> Result<QueueLengths, Unavailable> {
        let mut b = In(self
            .forwarder
            .call(&self.node, service::LENGTHS, self.names().done())?);
        let mut next = || {
            b.u64()
                .ok_or(Unavailable::Refused("malformed lengths".into()))
        };
        Ok(QueueLengths {
            ready: next()?,
            ready_bytes: next()?,
            in_memory: next()?,
            unacked: next()?,
            unacked_bytes: next()?,
            consumers: next()?,
        })
    }

    fn settings(&self) -> Arc<Settings> {
        self.settings.lock().clone()
    }

    fn set_policies(&self, policy: Option<Arc<Policy>>, operator: Option<Arc<Policy>>) {
        *self.settings.lock() = Arc::new(Settings::new(&self.spec.arguments, policy, operator));
    }

    fn publish(&self, message: &Message) -> Enqueued {
        if self.is_deleted() {
            return Enqueued::Deleted;
        }
        self.forwarder.publish(self, message)
    }

    /// Hands what homes delivered to channels that have room again.
    fn dispatch(&self) {
        let consumers = self.consumers.lock().clone();
        for rc in consumers {
            rc.pump(&self.forwarder);
        }
    }

    fn holds_publisher(&self) -> bool {
        self.forwarder.holds_publisher(&self.node)
    }

    fn backlog_drained(&self) -> tokio::sync::futures::Notified<'_> {
        self.forwarder.publish_room.notified()
    }

    fn get(&self, no_ack: bool) -> Result<Option<(QueuedMessage, u32)>, Unavailable> {
        let fwd = &self.forwarder;
        // The id is chosen here, so that a get whose answer is lost can be taken back.
        let id = fwd.next_id();
        let link = fwd.cluster.link_to(&self.node);
        let body = Out::new()
            .u64(id)
            .str(&self.vhost)
            .str(&self.spec.name)
            .u8(u8::from(no_ack))
            .done();
        let answer = fwd.call(&self.node, service::GET, body);
        let mut b = match answer {
            Ok(b) => In(b),
            Err(e) => {
                if let (Some(link), false) = (link, no_ack) {
                    fwd.settle_ids(&self.node, link, How::Requeue, [id]);
                }
                return Err(e);
            }
        };
        if b.u8() != Some(1) {
            return Ok(None);
        }
        let malformed = || Unavailable::Refused("malformed get".into());
        let (Some(remaining), Some(_), Some(redelivered), Some(returned)) =
            (b.u32(), b.u64(), b.u8(), b.u32())
        else {
            return Err(malformed());
        };
        let message = b.message().ok_or_else(malformed)?;
        Ok(Some((
            QueuedMessage {
                seq: id,
                message: Arc::new(message),
                redelivered: redelivered != 0,
                location: None,
                returned,
                level: 0,
            },
            remaining,
        )))
    }

    fn settle(&self, delivered: &[Delivered], acked: bool) {
        let how = if acked { How::Ack } else { How::Reject };
        self.forwarder.settle(&self.node, delivered, how);
    }

    fn requeue(&self, delivered: &[Delivered]) {
        self.forwarder.settle(&self.node, delivered, How::Requeue);
    }

    fn add_consumer(
        self: Arc<Self>,
        consumer: Arc<Consumer>,
        on_added: &mut dyn FnMut(),
    ) -> Result<(), ConsumeRefused> {
        if self.is_deleted() {
            return Err(ConsumeRefused::Deleted);
        }
        let fwd = &self.forwarder;
        let Some(link) = fwd.cluster.link_to(&self.node) else {
            return Err(ConsumeRefused::HomeDown);
        };
        let id = fwd.next_id();
        let rc = Arc::new(RemoteConsumer {
            id,
            node: self.node.clone(),
            link,
            queue: Arc::downgrade(&self),
            consumer: consumer.clone(),
            active: AtomicBool::new(false),
            buffer: Mutex::new(Buffer::default()),
        });
        // Known before the home can deliver to it.
        fwd.consumers.lock().insert(id, rc.clone());
        let flags = u8::from(consumer.no_ack) | (u8::from(consumer.exclusive) << 1);
        let body = Out::new()
            .u64(id)
            .str(&self.vhost)
            .str(&self.spec.name)
            .str(&consumer.tag)
            .u8(flags)
            .i32(consumer.priority)
            .u32(consumer.prefetch)
            .done();
        let answer = fwd.call(&self.node, service::CONSUME, body);
        if let Err(e) = answer {
            fwd.consumers.lock().remove(&id);
            let left = rc.close();
            // The home may have added it (an answer lost, or late): it forgets it, and takes
            // back what it sent.
            fwd.cancel_at_home(&self.node, link, id);
            fwd.settle_ids(&self.node, link, How::Requeue, left);
            return Err(match e {
                Unavailable::NotFound => ConsumeRefused::Deleted,
                Unavailable::Refused(reason) if reason == "exclusive" => {
                    ConsumeRefused::ExclusiveInUse
                }
                Unavailable::Refused(_) | Unavailable::HomeDown(_) => ConsumeRefused::HomeDown,
            });
        }
        self.consumers.lock().push(rc.clone());
        on_added();
        rc.active.store(true, Ordering::Release);
        rc.pump(fwd);
        // The link may have gone while the home answered: its end left the consumer, not yet
        // active, alone, so it is cancelled here.
        if fwd.cluster.link_to(&self.node) != Some(link)
            && fwd.consumers.lock().remove(&id).is_some()
        {
            rc.cancel_locally();
        }
        Ok(())
    }

    fn remove_consumer(&self, consumer: &Arc<Consumer>) {
        let rc = {
            let mut consumers = self.consumers.lock();
            let at = consumers
                .iter()
                .position(|c| Arc::ptr_eq(&c.consumer, consumer));
            at.map(|i| consumers.remove(i))
        };
        let Some(rc) = rc else { return };
        let fwd = &self.forwarder;
        // Cancelled at the home before the channel answers `cancel-ok` (as a queue of this
        // node would be): the home sends the consumer nothing once it answers, and what it
        // sent before is here by then (in order on the link). Then what no channel took goes
        // back.
        rc.active.store(false, Ordering::Release);
        let answered = fwd
            .call(
                &self.node,
                service::CANCEL_NOW,
                Out::new().u64(rc.id).done(),
            )
            .is_ok();
        fwd.consumers.lock().remove(&rc.id);
        let left = rc.close();
        if !answered {
            fwd.cancel_at_home(&self.node, rc.link, rc.id);
        }
        fwd.settle_ids(&self.node, rc.link, How::Requeue, left);
    }

    fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.consumers
            .lock()
            .iter()
            .map(|c| c.consumer.clone())
            .collect()
    }

    fn purge(&self) -> Result<u32, Unavailable> {
        let mut b = In(self
            .forwarder
            .call(&self.node, service::PURGE, self.names().done())?);
        b.u32()
            .ok_or_else(|| Unavailable::Refused("malformed purge".into()))
    }

    /// Whether `delete` with these conditions would delete the queue now (asked of the
    /// home; a home that cannot be asked cannot say the queue is empty or unused).
    fn may_delete(&self, if_unused: bool, if_empty: bool) -> Result<(), DeleteRefused> {
        if !if_unused && !if_empty {
            return Ok(());
        }
        let l = self.lengths().map_err(|_| DeleteRefused::HomeDown)?;
        if if_empty && l.ready > 0 {
            return Err(DeleteRefused::NotEmpty);
        }
        if if_unused && l.consumers > 0 {
            return Err(DeleteRefused::InUse);
        }
        Ok(())
    }

    /// Forgets the queue here (the home deletes its own when the deletion reaches it
    /// through the cluster's log); returns how many messages were ready at the home, as far
    /// as it says (0 when it cannot be asked).
    fn delete(&self, if_unused: bool, if_empty: bool) -> Result<u32, DeleteRefused> {
        self.may_delete(if_unused, if_empty)?;
        if self.deleted.swap(true, Ordering::AcqRel) {
            return Ok(0);
        }
        let ready = if self.unreachable_home().is_none() {
            self.lengths().map_or(0, |l| l.ready as u32)
        } else {
            0
        };
        let consumers = std::mem::take(&mut *self.consumers.lock());
        for rc in consumers {
            self.forwarder.consumers.lock().remove(&rc.id);
            rc.cancel_locally();
        }
        Ok(ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::ShortStr;

    #[test]
    fn fields_and_messages_cross_the_link_unchanged_and_short_bodies_fail_cleanly() {
        let m = Message {
            exchange: ShortStr::from("orders"),
            routing_key: ShortStr::from("eu.new"),
            properties: Bytes::from_static(b"\x10\x00\x02"),
            body: Bytes::from_static(b"hello"),
            persistent: true,
            arrived_ms: 1_700_000_000_000,
            expires_at_ms: Some(1_700_000_060_000),
        };
        let body = Out::new()
            .u64(7)
            .str("/")
            .str("q")
            .u8(1)
            .u32(3)
            .i32(-2)
            .message(&m)
            .done();
        let mut b = In(body.clone());
        assert_eq!(b.u64(), Some(7));
        assert_eq!(b.str().as_deref(), Some("/"));
        assert_eq!(b.str().as_deref(), Some("q"));
        assert_eq!((b.u8(), b.u32(), b.i32()), (Some(1), Some(3), Some(-2)));
        let got = b.message().expect("a message");
        assert_eq!(
            (
                &got.exchange,
                &got.routing_key,
                &got.properties,
                &got.body,
                got.persistent,
                got.arrived_ms,
                got.expires_at_ms
            ),
            (
                &m.exchange,
                &m.routing_key,
                &m.properties,
                &m.body,
                m.persistent,
                m.arrived_ms,
                m.expires_at_ms
            )
        );
        // Every prefix of it reads as far as it goes and then fails, never panics.
        for cut in 0..body.len() {
            let mut b = In(body.slice(..cut));
            let _ = (b.u64(), b.str(), b.str(), b.u8(), b.u32(), b.i32());
            assert!(b.message().is_none(), "a message cut at {cut}");
        }
        // A string whose length runs past the end, or that is not UTF-8.
        assert_eq!(In(Bytes::from_static(b"\x00\x09abc")).str(), None);
        assert_eq!(In(Bytes::from_static(b"\x00\x02\xff\xfe")).str(), None);
    }
}
