//! A queue: its ready messages, the count of its unacknowledged ones, and its consumers.
//!
//! The state sits behind one short-held mutex rather than in a task of its own. Publishing
//! connections enqueue and hand messages to consumers' channels in the same critical section,
//! so a message crosses one task boundary (to the consumer connection's writer) instead of two,
//! and counts (`declare-ok`, `purge-ok`, `delete-ok`, `get-ok`) are exact without a round trip.
//! No lock is ever held across an `.await`. Lock order: queue, then channel; never the reverse.

use super::dead_letter::{DeadLetterTarget, DeathReason};
use super::expiry::{Expirer, Timed};
use super::message::{Message, now_ms};
use super::policy::{Policy, QueueKind, effective_arguments};
use super::ready::{
    LazyStore, Levels, QueuedMessage, Window, delivered, forget, must_persist, with_delivery_count,
};
use super::stats::MessageStats;
use crate::store::durability::Ticket;
use crate::store::{RecordKind, Recovered, Storage};
use amq_protocol::types::{AMQPValue, FieldTable};
use parking_lot::Mutex;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

/// A queue, wherever it lives: the handle everything outside the queue module holds (its
/// operations are in `queue_ref`).
#[derive(Debug, Clone)]
pub enum QueueRef {
    /// A queue whose messages this process holds.
    Local(Arc<Queue>),
    /// A durable classic queue whose home is another node of the cluster.
    Remote(Arc<dyn RemoteHome>),
}

/// Why a forwarded operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unavailable {
    /// The home node cannot be reached.
    HomeDown(String),
    /// The home node does not have the queue (deleted meanwhile).
    NotFound,
    /// The home node refused, saying why.
    Refused(String),
}

/// A queue whose home is another node, as its handle uses it. Implemented above the queue (by
/// the forwarding over the cluster links), so that the handle is declared here without this
/// module depending on that one; a remote queue's every operation crosses the network, next
/// to which its dynamic dispatch costs nothing, while a local queue's stays static.
pub trait RemoteHome: Send + Sync + fmt::Debug {
    fn spec(&self) -> &QueueSpec;
    fn vhost(&self) -> &Arc<str>;
    /// The home node.
    fn node(&self) -> &str;
    /// The home node when it cannot be reached now.
    fn unreachable_home(&self) -> Option<&str>;
    fn is_single_active_consumer(&self) -> bool;
    fn queue_type(&self) -> &'static str;
    fn top_level(&self) -> u8;
    fn is_deleted(&self) -> bool;
    /// The lengths the home node has now.
    fn lengths(&self) -> Result<QueueLengths, Unavailable>;
    fn settings(&self) -> Arc<Settings>;
    fn set_policies(&self, policy: Option<Arc<Policy>>, operator: Option<Arc<Policy>>);
    fn publish(&self, message: &Message) -> Enqueued;
    /// Hands what the home delivered to channels that have room again.
    fn dispatch(&self);
    fn holds_publisher(&self) -> bool;
    fn backlog_drained(&self) -> tokio::sync::futures::Notified<'_>;
    fn get(&self, no_ack: bool) -> Result<Option<(QueuedMessage, u32)>, Unavailable>;
    fn settle(&self, delivered: &[Delivered], acked: bool);
    fn requeue(&self, delivered: &[Delivered]);
    fn add_consumer(
        self: Arc<Self>,
        consumer: Arc<Consumer>,
        on_added: &mut dyn FnMut(),
    ) -> Result<(), ConsumeRefused>;
    fn remove_consumer(&self, consumer: &Arc<Consumer>);
    fn consumers(&self) -> Vec<Arc<Consumer>>;
    fn purge(&self) -> Result<u32, Unavailable>;
    fn may_delete(&self, if_unused: bool, if_empty: bool) -> Result<(), DeleteRefused>;
    fn delete(&self, if_unused: bool, if_empty: bool) -> Result<u32, DeleteRefused>;
}

/// Where a queue hands messages for a consumer: implemented by the AMQP channel.
pub trait DeliverySink: Send + Sync {
    /// Offers one message to `consumer`. The sink takes it (assigning a delivery tag and, unless
    /// the consumer is no-ack, remembering it as unacknowledged) or gives it back when the
    /// channel cannot take more now (flow stopped, channel prefetch full, socket backed up).
    fn offer(
        &self,
        queue: &QueueRef,
        consumer: &Arc<Consumer>,
        msg: QueuedMessage,
    ) -> Result<(), QueuedMessage>;

    /// The queue cancelled the consumer (the queue was deleted).
    fn cancelled(&self, consumer: &Arc<Consumer>);
}

/// A consumer as the queue sees it.
pub struct Consumer {
    pub tag: Arc<str>,
    pub no_ack: bool,
    pub exclusive: bool,
    pub priority: i32,
    /// Per-consumer prefetch (`basic.qos` with global=false); 0 is unlimited.
    pub prefetch: u32,
    pub sink: Arc<dyn DeliverySink>,
    pub arguments: FieldTable,
    /// The connection the consumer is on (0: none), so that flow control never makes a
    /// connection wait for its own consumers.
    connection: u64,
    /// Deliveries not yet acknowledged; only changed under the queue's lock.
    unacked: AtomicU32,
    /// The dispatch pass in which this consumer last declined a message.
    skipped_in: AtomicU64,
}

impl Consumer {
    pub fn new(
        tag: Arc<str>,
        no_ack: bool,
        exclusive: bool,
        priority: i32,
        prefetch: u32,
        sink: Arc<dyn DeliverySink>,
        arguments: FieldTable,
    ) -> Self {
        Self {
            tag,
            no_ack,
            exclusive,
            priority,
            prefetch,
            sink,
            arguments,
            connection: 0,
            unacked: AtomicU32::new(0),
            skipped_in: AtomicU64::new(0),
        }
    }

    /// The consumer is on connection `id`.
    pub fn on_connection(mut self, id: u64) -> Self {
        self.connection = id;
        self
    }

    pub fn unacked(&self) -> u32 {
        self.unacked.load(Ordering::Relaxed)
    }

    fn has_credit(&self) -> bool {
        self.no_ack || self.prefetch == 0 || self.unacked() < self.prefetch
    }
}

impl fmt::Debug for Consumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("tag", &self.tag)
            .field("no_ack", &self.no_ack)
            .field("priority", &self.priority)
            .field("prefetch", &self.prefetch)
            .field("unacked", &self.unacked())
            .finish()
    }
}

/// What a channel remembers of a delivery until it is acknowledged or rejected.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub queue: QueueRef,
    /// `None` for `basic.get`.
    pub consumer: Option<Arc<Consumer>>,
    pub msg: QueuedMessage,
    /// When it was delivered (milliseconds since the Unix epoch), for the consumer timeout.
    pub delivered_at_ms: u64,
}

/// Why a consumer could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeRefused {
    /// An exclusive consumer exists, or one was asked for while others exist.
    ExclusiveInUse,
    Deleted,
    /// The queue's home node cannot be reached.
    HomeDown,
}

/// Why `queue.delete` refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteRefused {
    InUse,
    NotEmpty,
    /// The queue's home node cannot be reached to check the conditions.
    HomeDown,
}

#[derive(Debug)]
struct QueueState {
    ready: Levels,
    /// The next sequence number of each priority level.
    next_seq: Vec<u64>,
    unacked: u64,
    /// Body bytes of the unacknowledged messages.
    unacked_bytes: u64,
    /// The most handed out unacknowledged at a time ([`Window::in_flight`]): without it, a
    /// consumer with unlimited prefetch that does not ack would pull the whole backlog from
    /// disk into memory.
    in_flight: Window,
    /// Sorted by priority, highest first; round-robin within a priority.
    consumers: Vec<Arc<Consumer>>,
    dispatch_pass: u64,
    had_consumer: bool,
    /// A message here may expire (the queue has a TTL, or a message came with `expiration`):
    /// the head is looked at for expiry.
    may_expire: bool,
    /// What the arguments and the policy make of the queue.
    settings: Arc<Settings>,
    /// The message TTLs the queue has had, oldest first, with when each took effect (ms
    /// since the epoch): a message keeps the TTL in force when it arrived, as in RabbitMQ,
    /// where a policy's TTL applies to messages published after it.
    ttls: Vec<(u64, Option<u64>)>,
}

/// Most TTL changes a queue remembers; messages older than the oldest use it.
const TTL_HISTORY: usize = 16;

/// The TTL a message that arrived at `arrived_ms` has in a queue that had `ttls`.
fn ttl_in(ttls: &[(u64, Option<u64>)], arrived_ms: u64) -> Option<u64> {
    ttls.iter()
        .rev()
        .find(|(from, _)| *from <= arrived_ms)
        .or(ttls.first())
        .and_then(|(_, ttl)| *ttl)
}

/// When `m` expires in a queue that had `ttls`: the queue's TTL from its arrival, or its own
/// `expiration`, whichever comes first.
fn expiry_in(ttls: &[(u64, Option<u64>)], m: &Message) -> Option<u64> {
    let by_queue = Some(m.arrived_ms)
        .filter(|a| *a > 0)
        .and_then(|a| ttl_in(ttls, a))
        .map(|ttl| m.arrived_ms.saturating_add(ttl));
    match (by_queue, m.expires_at_ms) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A queue's effective settings: its arguments merged with its policy's and operator
/// policy's keys ([`effective_arguments`]). Replaced whenever policies change.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub features: Features,
    pub limits: Limits,
    /// The policy that applies, if one does.
    pub policy: Option<Arc<Policy>>,
    /// The operator policy that applies, if one does.
    pub operator: Option<Arc<Policy>>,
}

impl Settings {
    pub fn new(
        arguments: &FieldTable,
        policy: Option<Arc<Policy>>,
        operator: Option<Arc<Policy>>,
    ) -> Self {
        let effective = effective_arguments(arguments, policy.as_deref(), operator.as_deref());
        Self {
            features: Features::from_arguments(&effective),
            limits: Limits::from_arguments(&effective),
            policy,
            operator,
        }
    }
}

/// The highest priority level a queue with these arguments has: `x-max-priority`, at most
/// 255; 0 without it.
pub fn top_level(args: &FieldTable) -> u8 {
    argument_u64(args, "x-max-priority").map_or(0, |n| u8::try_from(n).unwrap_or(u8::MAX))
}

/// Messages a queue gave up on, and why: dead letters once the lock is released.
type Dead = Vec<(QueuedMessage, DeathReason)>;

fn argument_u64(args: &FieldTable, key: &str) -> Option<u64> {
    args.inner()
        .get(key)
        .and_then(super::headers::integer)
        .and_then(|n| u64::try_from(n).ok())
}

fn argument_text(args: &FieldTable, key: &str) -> Option<String> {
    args.inner().get(key).and_then(super::headers::text)
}

/// Lifetimes and dead-lettering, from `x-message-ttl`, `x-expires`, `x-dead-letter-exchange`
/// and `x-dead-letter-routing-key`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Features {
    /// Milliseconds a message may wait in the queue.
    pub message_ttl: Option<u64>,
    /// Milliseconds the queue may go unused before it is deleted.
    pub expires: Option<u64>,
    pub dead_letter: Option<DeadLetterTarget>,
    /// `x-delivery-limit`: a message returned more often than this is dead-lettered (reason
    /// `delivery_limit`) or dropped.
    pub delivery_limit: Option<u64>,
    /// `x-single-active-consumer`: only the first consumer gets messages; the next takes over
    /// when it goes.
    pub single_active_consumer: bool,
    /// `x-consumer-timeout`: milliseconds a delivery of this queue may stay unacknowledged
    /// (instead of the broker's `consumer_timeout`).
    pub consumer_timeout: Option<u64>,
}

impl Features {
    pub fn from_arguments(args: &FieldTable) -> Self {
        Self {
            message_ttl: argument_u64(args, "x-message-ttl"),
            expires: argument_u64(args, "x-expires").filter(|e| *e > 0),
            dead_letter: argument_text(args, "x-dead-letter-exchange").map(|exchange| {
                DeadLetterTarget {
                    exchange,
                    routing_key: argument_text(args, "x-dead-letter-routing-key"),
                }
            }),
            delivery_limit: argument_u64(args, "x-delivery-limit"),
            consumer_timeout: argument_u64(args, "x-consumer-timeout"),
            single_active_consumer: matches!(
                args.inner().get("x-single-active-consumer"),
                Some(AMQPValue::Boolean(true))
            ),
        }
    }
}

/// What a queue asks of the vhost that holds it. Called only when messages die or the queue
/// expires, never to publish, deliver or acknowledge, so the queue holds it as a trait object.
pub trait QueueOwner: Send + Sync {
    /// Routes the messages `from` gave up on to its dead-letter exchange.
    fn dead_letter(&self, from: &QueueRef, dead: Vec<(QueuedMessage, DeathReason)>);

    /// Deletes `q`, unused for its `x-expires`, if it is still the queue of that name.
    fn expire_queue(&self, q: &QueueRef);
}

/// What a queue reaches beyond itself: its vhost (where dead letters are routed, and which
/// deletes the queue when it expires) and the vhost's timers.
#[derive(Debug, Clone)]
pub struct Links {
    pub vhost: Weak<dyn QueueOwner>,
    pub expirer: Arc<Expirer<Queue>>,
}

/// Length limits from `x-max-length`, `x-max-length-bytes` and `x-overflow`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub max_length: Option<u64>,
    pub max_bytes: Option<u64>,
    /// `x-overflow` is `reject-publish` (or `reject-publish-dlx`): refuse new messages
    /// instead of dropping the oldest.
    pub reject_publish: bool,
    /// `reject-publish-dlx`: a refused message is dead-lettered too.
    pub dead_letter_rejected: bool,
}

impl Limits {
    pub fn from_arguments(args: &FieldTable) -> Self {
        let int = |key: &str| argument_u64(args, key);
        let overflow = argument_text(args, "x-overflow");
        Self {
            max_length: int("x-max-length"),
            max_bytes: int("x-max-length-bytes"),
            reject_publish: matches!(
                overflow.as_deref(),
                Some("reject-publish" | "reject-publish-dlx")
            ),
            dead_letter_rejected: overflow.as_deref() == Some("reject-publish-dlx"),
        }
    }

    fn over(&self, ready: &Levels) -> bool {
        self.max_length.is_some_and(|m| ready.len() as u64 > m)
            || self.max_bytes.is_some_and(|m| ready.bytes() > m)
    }

    fn full_for(&self, ready: &Levels, body: u64) -> bool {
        self.max_length.is_some_and(|m| ready.len() as u64 >= m)
            || self.max_bytes.is_some_and(|m| ready.bytes() + body > m)
    }
}

/// What became of a message offered to a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Taken; the message is safe once `ticket` is done.
    /// `backlogged`: the queue's backlog has spilled to disk while it has consumers, so the
    /// publisher may be asked to wait (flow control).
    Accepted { ticket: Ticket, backlogged: bool },
    /// Refused by `x-overflow: reject-publish`; the publisher is nacked.
    Rejected,
    /// The queue was deleted meanwhile.
    Deleted,
}

/// A queue's lengths, read together.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueLengths {
    pub ready: u64,
    pub ready_bytes: u64,
    /// Ready messages held in memory (the rest are paged out to the store).
    pub in_memory: u64,
    pub unacked: u64,
    pub unacked_bytes: u64,
    pub consumers: u64,
}

/// The declared attributes of a queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub name: String,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

pub struct Queue {
    pub(super) spec: QueueSpec,
    /// `x-single-active-consumer` (an argument only: no policy sets it).
    pub(super) single_active_consumer: bool,
    /// Mirrors of settings read without the lock: `x-consumer-timeout` and `x-expires`
    /// (`u64::MAX`: none).
    consumer_timeout: AtomicU64,
    expires: AtomicU64,
    links: OnceLock<Links>,
    /// The deadline the vhost's timers hold for this queue (`u64::MAX`: none).
    timer_at: AtomicU64,
    /// When the queue was last used (declared, consumed from, got from), for `x-expires`.
    last_used: AtomicU64,
    pub(super) vhost: Arc<str>,
    /// The connection that owns an exclusive queue.
    pub(super) owner: Option<u64>,
    /// The highest priority level (`x-max-priority`; 0 for a queue without priorities).
    top: u8,
    /// The store of each priority level, where its messages go when they must be on disk.
    stores: Box<[LazyStore]>,
    state: Mutex<QueueState>,
    deleted: AtomicBool,
    /// Counters for the management API and metrics.
    pub(super) stats: MessageStats,
    flow: Flow,
}

/// How long after its consumers last took a paged message a queue still holds publishers
/// back: consumers that stopped taking (prefetch full, stuck) release them.
const FLOW_ACTIVE_MS: u64 = 250;

/// Milliseconds on a clock that never steps back (flow control must not hold a publisher
/// because the wall clock moved).
fn monotonic_ms() -> u64 {
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    // The clock starts an hour back, so that 0 ("never") is always long ago.
    let start = START.get_or_init(|| {
        std::time::Instant::now()
            .checked_sub(std::time::Duration::from_secs(3600))
            .unwrap_or_else(std::time::Instant::now)
    });
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Publisher flow control of one queue.
#[derive(Debug, Default)]
struct Flow {
    /// When consumers last took a message while the backlog was on disk ([`monotonic_ms`]).
    paged_delivery_ms: AtomicU64,
    /// A publisher waits for `drained`.
    waiting: AtomicBool,
    /// Told when the backlog is back in memory.
    drained: tokio::sync::Notify,
}

impl fmt::Debug for Queue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("vhost", &self.vhost)
            .field("name", &self.spec.name)
            .finish()
    }
}

/// Methods that may hand messages to consumers' channels or dead letters to the vhost take
/// `me`, the [`QueueRef`] callers hold for this queue, to pass it on as it is: one handle per
/// delivery, cloned only where a channel keeps it, as before there were handles.
impl Queue {
    /// A queue with nothing in it. `store` is where its messages go when they must be on
    /// disk; for a non-durable queue it is created on first use.
    pub fn new(
        spec: QueueSpec,
        vhost: Arc<str>,
        owner: Option<u64>,
        store: LazyStore,
        window: Window,
    ) -> Arc<Self> {
        Self::recovered(spec, vhost, owner, store, window, Recovered::default())
    }

    /// A queue whose store held `recovered` messages at start. The other levels of a priority
    /// queue page to stores created on first use (the vhost gives durable priority queues a
    /// durable store per level through [`Queue::recovered_levels`]).
    pub fn recovered(
        spec: QueueSpec,
        vhost: Arc<str>,
        owner: Option<u64>,
        store: LazyStore,
        window: Window,
        recovered: Recovered,
    ) -> Arc<Self> {
        Self::recovered_levels(spec, vhost, owner, vec![(store, recovered)], window)
    }

    /// A queue whose levels' stores held these messages at start, one entry per priority
    /// level (one for a queue without priorities).
    pub fn recovered_levels(
        spec: QueueSpec,
        vhost: Arc<str>,
        owner: Option<u64>,
        levels: Vec<(LazyStore, Recovered)>,
        window: Window,
    ) -> Arc<Self> {
        let settings = Settings::new(&spec.arguments, None, None);
        let top = top_level(&spec.arguments);
        let mut levels = levels;
        // One store per level, whatever the caller could open: the levels' indices must stay
        // the priorities they stand for.
        while levels.len() <= usize::from(top) {
            let Some(storage) = levels.first().map(|(s, _)| s.storage().clone()) else {
                break;
            };
            levels.push((LazyStore::deferred(storage), Recovered::default()));
        }
        levels.truncate(usize::from(top) + 1);
        let recovered_any = levels.iter().any(|(_, r)| r.count > 0);
        let may_expire = settings.features.message_ttl.is_some() || recovered_any;
        let next_seq = levels.iter().map(|(_, r)| r.next_seq).collect();
        let (stores, recovered): (Vec<LazyStore>, Vec<Recovered>) = levels.into_iter().unzip();
        Arc::new(Self {
            single_active_consumer: settings.features.single_active_consumer,
            consumer_timeout: AtomicU64::new(
                settings.features.consumer_timeout.unwrap_or(u64::MAX),
            ),
            expires: AtomicU64::new(settings.features.expires.unwrap_or(u64::MAX)),
            links: OnceLock::new(),
            timer_at: AtomicU64::new(u64::MAX),
            last_used: AtomicU64::new(now_ms()),
            spec,
            vhost,
            owner,
            top,
            stores: stores.into_boxed_slice(),
            state: Mutex::new(QueueState {
                ready: Levels::new(window, recovered),
                next_seq,
                unacked: 0,
                unacked_bytes: 0,
                in_flight: window.in_flight(),
                consumers: Vec::new(),
                dispatch_pass: 0,
                had_consumer: false,
                may_expire,
                ttls: vec![(0, settings.features.message_ttl)],
                settings: Arc::new(settings),
            }),
            deleted: AtomicBool::new(false),
            stats: MessageStats::default(),
            flow: Flow::default(),
        })
    }

    /// A queue that keeps everything in memory (tests).
    pub fn in_memory(spec: QueueSpec, vhost: Arc<str>, owner: Option<u64>) -> Arc<Self> {
        Self::new(
            spec,
            vhost,
            owner,
            LazyStore::deferred(Arc::new(Storage::in_memory())),
            Window::default(),
        )
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The declared type, `x-queue-type` (classic without it). Every queue works as a
    /// classic one (nothing is replicated), but reports the type it was declared with.
    pub fn queue_type(&self) -> &'static str {
        QueueKind::of(&self.spec.arguments).as_str()
    }

    /// The highest priority level: `x-max-priority`, 0 for a queue without priorities.
    pub fn top_level(&self) -> u8 {
        self.top
    }

    fn store(&self, level: u8) -> &LazyStore {
        &self.stores[usize::from(level)]
    }

    /// The level a message goes to: its priority, at most the queue's top level.
    fn level_of(&self, message: &Message) -> u8 {
        if self.top == 0 {
            return 0;
        }
        // Admitted messages only: the headers were checked when the message came in.
        crate::amqp::codec::locate_properties(&message.properties)
            .and_then(|s| s.priority)
            .unwrap_or(0)
            .min(self.top)
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Lengths and consumers at one moment, under one lock.
    pub fn lengths(&self) -> QueueLengths {
        let st = self.state.lock();
        QueueLengths {
            ready: st.ready.len() as u64,
            ready_bytes: st.ready.bytes(),
            in_memory: st.ready.in_memory() as u64,
            unacked: st.unacked,
            unacked_bytes: st.unacked_bytes,
            consumers: st.consumers.len() as u64,
        }
    }

    /// Ready messages.
    pub fn message_count(&self) -> u32 {
        self.state.lock().ready.len() as u32
    }

    /// Ready messages held in memory (the rest are in the store).
    pub fn messages_in_memory(&self) -> usize {
        self.state.lock().ready.in_memory()
    }

    pub fn consumer_count(&self) -> u32 {
        self.state.lock().consumers.len() as u32
    }

    pub fn unacked_count(&self) -> u64 {
        self.state.lock().unacked
    }

    /// Connects the queue to its vhost and the vhost's timers (done by the vhost that
    /// creates it; a queue without links expires messages only when it is used, and drops
    /// its dead letters).
    pub fn link(self: &Arc<Self>, links: Links) {
        let _ = self.links.set(links);
        self.touch();
    }

    /// Recovered messages expire on time, used or not: the head of each level is looked at
    /// now (as RabbitMQ does when it recovers a queue), so that what expired while the broker
    /// was down is dead-lettered at once. Called once the vhost has its exchanges, bindings
    /// and policies back, for the dead letters to find their way. A queue with neither a TTL
    /// nor a dead-letter exchange is not read now (that would bring a window of every such
    /// queue into memory at start): its expired messages go when it is next used, and no
    /// consumer or `basic.get` ever sees them.
    pub fn expire_recovered(self: &Arc<Self>) {
        let next = {
            let mut st = self.state.lock();
            let features = &st.settings.features;
            if features.message_ttl.is_none() && features.dead_letter.is_none() {
                return;
            }
            self.next_expiry_locked(&mut st)
        };
        if let Some(at) = next {
            self.schedule(at);
        }
    }

    /// The effective settings now.
    pub fn settings(&self) -> Arc<Settings> {
        self.state.lock().settings.clone()
    }

    /// `x-consumer-timeout`, from the arguments or the policy.
    pub fn consumer_timeout(&self) -> Option<u64> {
        Some(self.consumer_timeout.load(Ordering::Relaxed)).filter(|t| *t != u64::MAX)
    }

    fn expires(&self) -> Option<u64> {
        Some(self.expires.load(Ordering::Relaxed)).filter(|t| *t != u64::MAX)
    }

    /// Applies `policy` and `operator` (or none) on top of the queue's arguments, at once: a lower length
    /// limit drops (or dead-letters) the oldest messages, a new TTL applies to the messages
    /// published from now on, and a new `expires` starts counting.
    pub(super) fn set_policies(
        self: &Arc<Self>,
        me: &QueueRef,
        policy: Option<Arc<Policy>>,
        operator: Option<Arc<Policy>>,
    ) {
        let settings = Settings::new(&self.spec.arguments, policy, operator);
        let features = &settings.features;
        self.consumer_timeout.store(
            features.consumer_timeout.unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.expires
            .store(features.expires.unwrap_or(u64::MAX), Ordering::Relaxed);
        let mut dead = Vec::new();
        let next = {
            let mut st = self.state.lock();
            if self.is_deleted() {
                return;
            }
            st.may_expire |= features.message_ttl.is_some();
            if st.ttls.last().map(|(_, t)| *t) != Some(features.message_ttl) {
                if st.ttls.len() == TTL_HISTORY {
                    st.ttls.remove(0);
                }
                st.ttls.push((now_ms(), features.message_ttl));
            }
            st.settings = Arc::new(settings);
            self.trim_locked(&mut st, &mut dead);
            self.dispatch_locked(me, &mut st, &mut dead)
        };
        self.after(me, dead, next);
        self.touch();
    }

    /// Drops the oldest ready messages while the queue is over its length limits. A queue that
    /// refuses publishes when full (`reject-publish`) keeps what it holds, as in RabbitMQ.
    fn trim_locked(&self, st: &mut QueueState, dead: &mut Dead) {
        let limits = st.settings.limits;
        if limits.reject_publish {
            return;
        }
        let dead_letter = st.settings.features.dead_letter.is_some();
        while limits.over(&st.ready) {
            match st.ready.pop_front(&self.stores) {
                Some(dropped) => {
                    forget(self.store(dropped.level), dropped.seq, dropped.location);
                    if dead_letter {
                        dead.push((dropped, DeathReason::Maxlen));
                    }
                }
                None => break,
            }
        }
    }

    /// The queue was used: `x-expires` counts from now.
    pub fn touch(self: &Arc<Self>) {
        let now = now_ms();
        self.last_used.store(now, Ordering::Relaxed);
        if let Some(expires) = self.expires() {
            self.schedule(now + expires);
        }
    }

    /// Drops the expired messages at the head of the queue (RabbitMQ expires messages when
    /// they reach the head) and returns when the new head expires first.
    fn expire_locked(&self, st: &mut QueueState, now: u64, dead: &mut Dead) -> Option<u64> {
        if !st.may_expire {
            return None;
        }
        let mut next: Option<u64> = None;
        // Each priority level expires from its own head, as in RabbitMQ.
        for l in 0..self.stores.len() {
            if let Some(at) = self.expire_level_locked(st, l, now, dead) {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        next
    }

    /// Drops the expired messages at the head of priority level `l`; returns when its new
    /// head expires.
    fn expire_level_locked(
        &self,
        st: &mut QueueState,
        l: usize,
        now: u64,
        dead: &mut Dead,
    ) -> Option<u64> {
        let dead_letter = st.settings.features.dead_letter.is_some();
        let store = &self.stores[l];
        let QueueState { ready, ttls, .. } = st;
        let list = &mut ready.lists_mut()[l];
        loop {
            let at = expiry_in(ttls, &list.front(store)?.message);
            if at.is_none_or(|at| at > now) {
                return at;
            }
            let m = list.pop_front(store)?;
            forget(store, m.seq, m.location);
            if dead_letter {
                dead.push((m, DeathReason::Expired));
            }
        }
    }

    /// Takes the next message to deliver, once the expired messages at the head of its level
    /// are dropped (and those of the levels below, as far as that empties the way to them).
    fn pop_live_locked(
        &self,
        st: &mut QueueState,
        now: u64,
        dead: &mut Dead,
    ) -> Option<QueuedMessage> {
        loop {
            let l = st.ready.top(&self.stores)?;
            self.expire_level_locked(st, l, now, dead);
            if let Some(m) = st.ready.lists_mut()[l].pop_front(&self.stores[l]) {
                return Some(m);
            }
        }
    }

    /// When the message now at the head of a level expires first.
    fn next_expiry_locked(&self, st: &mut QueueState) -> Option<u64> {
        if !st.may_expire {
            return None;
        }
        let mut next: Option<u64> = None;
        let QueueState { ready, ttls, .. } = st;
        for (l, store) in self.stores.iter().enumerate() {
            let Some(front) = ready.lists_mut()[l].front(store) else {
                continue;
            };
            if let Some(at) = expiry_in(ttls, &front.message) {
                next = Some(next.map_or(at, |n| n.min(at)));
            }
        }
        next
    }

    /// Asks the vhost's timers to look at the queue at `at`, unless they will sooner.
    fn schedule(self: &Arc<Self>, at: u64) {
        let Some(links) = self.links.get() else {
            return;
        };
        if self.timer_at.fetch_min(at, Ordering::AcqRel) > at {
            links.expirer.schedule(at, self);
        }
    }

    /// After the lock: the next deadline to the timers, the dead letters to the vhost.
    fn after(self: &Arc<Self>, me: &QueueRef, dead: Dead, next: Option<u64>) {
        if let Some(at) = next {
            self.schedule(at);
        }
        if dead.is_empty() {
            return;
        }
        if let Some(vhost) = self.links.get().and_then(|l| l.vhost.upgrade()) {
            vhost.dead_letter(me, dead);
        }
    }

    /// A deadline came: expire messages at the head, and the queue itself when it has gone
    /// unused for `x-expires`.
    pub fn on_timer(self: &Arc<Self>) {
        self.timer_at.store(u64::MAX, Ordering::Release);
        // The handle consumers' channels and the vhost know the queue by (the timers hold
        // the queue itself: they drive only queues of this process).
        let me = QueueRef::Local(self.clone());
        let now = now_ms();
        let mut dead = Vec::new();
        let (mut next, idle) = {
            let mut st = self.state.lock();
            if self.is_deleted() {
                return;
            }
            self.expire_locked(&mut st, now, &mut dead);
            self.deliver_locked(&me, &mut st, now, &mut dead);
            (self.next_expiry_locked(&mut st), st.consumers.is_empty())
        };
        if let Some(expires) = self.expires()
            && idle
        {
            let due = self
                .last_used
                .load(Ordering::Relaxed)
                .saturating_add(expires);
            if due <= now {
                self.after(&me, dead, None);
                if let Some(vhost) = self.links.get().and_then(|l| l.vhost.upgrade()) {
                    vhost.expire_queue(&me);
                }
                return;
            }
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        self.after(&me, dead, next);
    }

    /// Appends a message and hands out what consumers can take, then applies the length
    /// limits: the oldest ready messages are dropped (`drop-head`, the default), or with
    /// `reject-publish` a full queue refuses the new one. A persistent message on a durable
    /// queue is written to the store first; the returned ticket says when it is on disk.
    /// Expired messages at the head go first, and a message that expires at once (TTL 0) is
    /// kept only if a consumer took it.
    pub(super) fn publish(self: &Arc<Self>, me: &QueueRef, message: Arc<Message>) -> Enqueued {
        let mut dead = Vec::new();
        let (outcome, next) = {
            let mut st = self.state.lock();
            if self.is_deleted() {
                return Enqueued::Deleted;
            }
            let expiring = st.may_expire || message.expires_at_ms.is_some();
            let now = if expiring { now_ms() } else { 0 };
            if expiring {
                st.may_expire = true;
                self.expire_locked(&mut st, now, &mut dead);
            }
            let limits = st.settings.limits;
            if limits.reject_publish && limits.full_for(&st.ready, message.body.len() as u64) {
                if limits.dead_letter_rejected && st.settings.features.dead_letter.is_some() {
                    let refused = QueuedMessage {
                        seq: 0,
                        message,
                        redelivered: false,
                        location: None,
                        returned: 0,
                        level: 0,
                    };
                    dead.push((refused, DeathReason::Maxlen));
                }
                (Enqueued::Rejected, None)
            } else {
                let level = self.level_of(&message);
                let seq = st.next_seq[usize::from(level)];
                st.next_seq[usize::from(level)] += 1;
                MessageStats::bump(&self.stats.publish);
                let (location, ticket) = if must_persist(self.spec.durable, &message) {
                    let stored =
                        self.store(level)
                            .get()
                            .append(seq, &message, RecordKind::Persistent);
                    (Some(stored.location), Ticket::flushed(stored.epoch))
                } else {
                    (None, Ticket::Done)
                };
                st.ready.push_back(
                    QueuedMessage {
                        seq,
                        message,
                        redelivered: false,
                        location,
                        returned: 0,
                        level,
                    },
                    &self.stores,
                );
                self.deliver_locked(me, &mut st, now, &mut dead);
                let backlogged = st.ready.paging() && !st.consumers.is_empty();
                if limits.max_length.is_some() || limits.max_bytes.is_some() {
                    self.trim_locked(&mut st, &mut dead);
                }
                let next = if expiring {
                    self.expire_locked(&mut st, now, &mut dead)
                } else {
                    None
                };
                (Enqueued::Accepted { ticket, backlogged }, next)
            }
        };
        if !dead.is_empty() || next.is_some() {
            self.after(me, dead, next);
        }
        outcome
    }

    fn count_delivery(&self, redelivered: bool, get: bool, no_ack: bool) {
        let s = &self.stats;
        MessageStats::bump(match (get, no_ack) {
            (false, false) => &s.deliver,
            (false, true) => &s.deliver_no_ack,
            (true, false) => &s.get,
            (true, true) => &s.get_no_ack,
        });
        if redelivered {
            MessageStats::bump(&s.redeliver);
        }
    }

    /// Hands out ready messages to consumers with credit: call after anything that may have
    /// given a consumer or channel room.
    pub(super) fn dispatch(self: &Arc<Self>, me: &QueueRef) {
        let mut dead = Vec::new();
        let next = {
            let mut st = self.state.lock();
            self.dispatch_locked(me, &mut st, &mut dead)
        };
        self.after(me, dead, next);
    }

    /// Drops expired messages at the head, hands out what consumers can take, and returns
    /// when the new head expires.
    fn dispatch_locked(
        self: &Arc<Self>,
        me: &QueueRef,
        st: &mut QueueState,
        dead: &mut Dead,
    ) -> Option<u64> {
        if !st.may_expire {
            self.deliver_locked(me, st, 0, dead);
            return None;
        }
        let now = now_ms();
        self.expire_locked(st, now, dead);
        self.deliver_locked(me, st, now, dead);
        self.next_expiry_locked(st)
    }

    /// Hands out ready messages to consumers with credit. In a queue whose messages may
    /// expire, each new head is looked at first: as in RabbitMQ, a consumer never gets a
    /// message whose time ran out behind the one before it. `now` is the time of the caller's
    /// look at the head (any value when messages cannot expire).
    fn deliver_locked(
        self: &Arc<Self>,
        me: &QueueRef,
        st: &mut QueueState,
        now: u64,
        dead: &mut Dead,
    ) {
        if st.consumers.is_empty() || st.ready.is_empty() {
            return;
        }
        st.dispatch_pass += 1;
        let pass = st.dispatch_pass;
        let mut declined = 0;
        // With a single active consumer, only the first registered one is offered messages.
        let candidates = if self.single_active_consumer {
            1
        } else {
            st.consumers.len()
        };
        let mut handed = 0;
        while declined < candidates && !st.ready.is_empty() {
            let mut chosen = None;
            let in_flight_full = st.unacked >= st.in_flight.messages as u64
                || st.unacked_bytes >= st.in_flight.bytes;
            for (i, c) in st.consumers.iter().enumerate().take(candidates) {
                if c.skipped_in.load(Ordering::Relaxed) == pass {
                    continue;
                }
                if !c.has_credit() || (in_flight_full && !c.no_ack) {
                    c.skipped_in.store(pass, Ordering::Relaxed);
                    declined += 1;
                    continue;
                }
                chosen = Some(i);
                break;
            }
            let Some(i) = chosen else { break };
            // The first head was looked at by the caller (and a message that expires at once
            // goes to a consumer that takes it now); the ones after it are looked at here,
            // only at the level the next message comes from.
            let consumer = st.consumers[i].clone();
            let popped = if st.may_expire && handed > 0 {
                self.pop_live_locked(st, now, dead)
            } else {
                st.ready.pop_front(&self.stores)
            };
            let Some(msg) = popped else {
                break;
            };
            let (seq, location, redelivered, returned) =
                (msg.seq, msg.location, msg.redelivered, msg.returned);
            let store = self.store(msg.level);
            let body_len = msg.message.body.len() as u64;
            match consumer.sink.offer(me, &consumer, msg) {
                Ok(()) => {
                    self.count_delivery(redelivered, false, consumer.no_ack);
                    handed += 1;
                    if consumer.no_ack {
                        forget(store, seq, location);
                    } else {
                        st.unacked += 1;
                        st.unacked_bytes += body_len;
                        consumer.unacked.fetch_add(1, Ordering::Relaxed);
                        delivered(store, seq, location, returned);
                    }
                    if !self.single_active_consumer {
                        rotate_within_priority(&mut st.consumers, i);
                    }
                }
                Err(msg) => {
                    st.ready.requeue(msg);
                    consumer.skipped_in.store(pass, Ordering::Relaxed);
                    declined += 1;
                }
            }
        }
        if handed > 0 {
            if st.ready.paging() {
                self.flow
                    .paged_delivery_ms
                    .store(monotonic_ms(), Ordering::Relaxed);
            } else if self.flow.waiting.load(Ordering::Relaxed)
                && self.flow.waiting.swap(false, Ordering::AcqRel)
            {
                self.flow.drained.notify_waiters();
            }
        }
    }

    /// Flow control: whether a publisher on connection `publisher` should wait before sending
    /// more here. It should while the backlog is on disk and consumers (none of them on that
    /// connection, which could not ack while it waits) are taking messages from it.
    pub fn holds_publisher(&self, publisher: u64) -> bool {
        if self.is_deleted() {
            return false;
        }
        {
            let st = self.state.lock();
            if !st.ready.paging() || st.consumers.iter().any(|c| c.connection == publisher) {
                return false;
            }
        }
        monotonic_ms().saturating_sub(self.flow.paged_delivery_ms.load(Ordering::Relaxed))
            < FLOW_ACTIVE_MS
    }

    /// Resolves when the backlog is back in memory; get it before `holds_publisher` so the
    /// wake-up cannot be missed (a `Notified` hears `notify_waiters` from its creation on).
    pub fn backlog_drained(&self) -> tokio::sync::futures::Notified<'_> {
        let drained = self.flow.drained.notified();
        self.flow.waiting.store(true, Ordering::Release);
        drained
    }

    /// `basic.get`: the next ready message and how many remain after it.
    pub(super) fn get(
        self: &Arc<Self>,
        me: &QueueRef,
        no_ack: bool,
    ) -> Option<(QueuedMessage, u32)> {
        self.touch();
        let mut dead = Vec::new();
        let mut next = None;
        let got = self.get_locked(no_ack, &mut dead, &mut next);
        self.after(me, dead, next);
        got
    }

    /// Takes the next ready message; `next` gets when the new head expires.
    fn get_locked(
        &self,
        no_ack: bool,
        dead: &mut Dead,
        next: &mut Option<u64>,
    ) -> Option<(QueuedMessage, u32)> {
        let mut st = self.state.lock();
        if st.may_expire {
            self.expire_locked(&mut st, now_ms(), dead);
        }
        let Some(msg) = st.ready.pop_front(&self.stores) else {
            MessageStats::bump(&self.stats.get_empty);
            return None;
        };
        self.count_delivery(msg.redelivered, true, no_ack);
        if no_ack {
            forget(self.store(msg.level), msg.seq, msg.location);
        } else {
            st.unacked += 1;
            st.unacked_bytes += msg.message.body.len() as u64;
            delivered(self.store(msg.level), msg.seq, msg.location, msg.returned);
        }
        *next = self.next_expiry_locked(&mut st);
        Some((msg, st.ready.len() as u32))
    }

    /// Acknowledged (`acked`) or rejected without requeue deliveries of this queue.
    pub(super) fn settle(self: &Arc<Self>, me: &QueueRef, delivered: &[Delivered], acked: bool) {
        if acked {
            self.stats
                .ack
                .fetch_add(delivered.len() as u64, Ordering::Relaxed);
        }
        let mut dead = Vec::new();
        let next = {
            let mut st = self.state.lock();
            for d in delivered {
                release(&mut st, d);
                forget(self.store(d.msg.level), d.msg.seq, d.msg.location);
                if !acked && st.settings.features.dead_letter.is_some() && !self.is_deleted() {
                    dead.push((d.msg.clone(), DeathReason::Rejected));
                }
            }
            self.dispatch_locked(me, &mut st, &mut dead)
        };
        self.after(me, dead, next);
    }

    /// Puts deliveries back in their original places, marked redelivered.
    pub(super) fn requeue(self: &Arc<Self>, me: &QueueRef, delivered: Vec<Delivered>) {
        let mut dead = Vec::new();
        let next = {
            let mut st = self.state.lock();
            self.requeue_locked(&mut st, delivered, &mut dead);
            // Requeued messages count against the length limits as new ones do: with
            // drop-head, what goes is the head, where they went back (as in RabbitMQ).
            self.trim_locked(&mut st, &mut dead);
            self.dispatch_locked(me, &mut st, &mut dead)
        };
        self.after(me, dead, next);
    }

    fn requeue_locked(&self, st: &mut QueueState, delivered: Vec<Delivered>, dead: &mut Dead) {
        for d in delivered {
            release(st, &d);
            if !self.is_deleted() {
                let mut msg = d.msg;
                msg.redelivered = true;
                if let Some(limit) = st.settings.features.delivery_limit {
                    msg.returned = msg.returned.saturating_add(1);
                    if u64::from(msg.returned) > limit {
                        forget(self.store(msg.level), msg.seq, msg.location);
                        if st.settings.features.dead_letter.is_some() {
                            dead.push((msg, DeathReason::DeliveryLimit));
                        }
                        continue;
                    }
                    msg.message = Arc::new(with_delivery_count(&msg.message, msg.returned));
                    // Kept on disk too, so that a restart does not reset the count.
                    super::ready::delivered(
                        self.store(msg.level),
                        msg.seq,
                        msg.location,
                        msg.returned,
                    );
                }
                st.may_expire |= msg.message.expires_at_ms.is_some();
                st.ready.requeue(msg);
            }
        }
    }

    /// Adds a consumer. `on_added` runs once the consumer is accepted and before any message
    /// is handed to it (the channel sends `basic.consume-ok` there).
    pub(super) fn add_consumer(
        self: &Arc<Self>,
        me: &QueueRef,
        consumer: Arc<Consumer>,
        on_added: impl FnOnce(),
    ) -> Result<(), ConsumeRefused> {
        let mut st = self.state.lock();
        if self.is_deleted() {
            return Err(ConsumeRefused::Deleted);
        }
        if st.consumers.iter().any(|c| c.exclusive)
            || (consumer.exclusive && !st.consumers.is_empty())
        {
            return Err(ConsumeRefused::ExclusiveInUse);
        }
        // Priority order, first come first within a priority; a single-active-consumer queue
        // keeps registration order only (the first is the active one).
        let at = if self.single_active_consumer {
            st.consumers.len()
        } else {
            st.consumers
                .partition_point(|c| c.priority >= consumer.priority)
        };
        st.consumers.insert(at, consumer);
        st.had_consumer = true;
        on_added();
        let mut dead = Vec::new();
        let next = self.dispatch_locked(me, &mut st, &mut dead);
        drop(st);
        self.after(me, dead, next);
        Ok(())
    }

    /// Removes a consumer; returns true when this leaves an auto-delete queue with no
    /// consumers, so that the caller deletes the queue.
    pub(super) fn remove_consumer(
        self: &Arc<Self>,
        me: &QueueRef,
        consumer: &Arc<Consumer>,
    ) -> bool {
        let mut dead = Vec::new();
        let mut next = None;
        let (auto_delete, idle) = {
            let mut st = self.state.lock();
            let was_active = st
                .consumers
                .first()
                .is_some_and(|c| Arc::ptr_eq(c, consumer));
            st.consumers.retain(|c| !Arc::ptr_eq(c, consumer));
            let idle = st.consumers.is_empty();
            if was_active && self.single_active_consumer && !idle {
                // The next consumer takes over, of the messages that have not expired.
                next = self.dispatch_locked(me, &mut st, &mut dead);
            }
            (
                self.spec.auto_delete && st.had_consumer && idle && !self.is_deleted(),
                idle,
            )
        };
        if !dead.is_empty() || next.is_some() {
            self.after(me, dead, next);
        }
        if idle && !auto_delete {
            // Unused from now: `x-expires` starts counting.
            self.touch();
        }
        auto_delete
    }

    /// Message query: up to `limit` ready messages that `wanted` picks, in queue order, left
    /// in the queue; at most `budget` messages are looked at. Returns them and whether every
    /// ready message was looked at.
    pub fn find(
        &self,
        limit: usize,
        budget: usize,
        wanted: impl Fn(&Message) -> bool,
    ) -> (Vec<QueuedMessage>, bool) {
        let st = self.state.lock();
        let mut found = Vec::new();
        let seen = st.ready.scan(&self.stores, budget, |m| {
            if wanted(&m.message) {
                found.push(m.clone());
            }
            found.len() < limit
        });
        let complete = found.len() < limit && seen >= st.ready.len();
        (found, complete)
    }

    /// The consumer that gets messages in a single-active-consumer queue.
    pub fn single_active_consumer(&self) -> Option<Arc<Consumer>> {
        if !self.single_active_consumer {
            return None;
        }
        self.state.lock().consumers.first().cloned()
    }

    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.state.lock().consumers.clone()
    }

    /// Drops all ready messages; returns how many.
    pub fn purge(&self) -> u32 {
        self.state.lock().ready.clear(&self.stores) as u32
    }

    /// Marks the queue deleted, cancels its consumers and drops its ready messages, returning
    /// how many there were. Unacknowledged deliveries are dropped when settled.
    /// Whether `delete` with these conditions would delete the queue now.
    pub fn may_delete(&self, if_unused: bool, if_empty: bool) -> Result<(), DeleteRefused> {
        Self::deletable(&self.state.lock(), if_unused, if_empty)
    }

    fn deletable(st: &QueueState, if_unused: bool, if_empty: bool) -> Result<(), DeleteRefused> {
        if if_empty && !st.ready.is_empty() {
            return Err(DeleteRefused::NotEmpty);
        }
        if if_unused && !st.consumers.is_empty() {
            return Err(DeleteRefused::InUse);
        }
        Ok(())
    }

    pub fn delete(&self, if_unused: bool, if_empty: bool) -> Result<u32, DeleteRefused> {
        let consumers;
        let count;
        {
            let mut st = self.state.lock();
            Self::deletable(&st, if_unused, if_empty)?;
            if self.deleted.swap(true, Ordering::AcqRel) {
                return Ok(0);
            }
            consumers = std::mem::take(&mut st.consumers);
            count = st.ready.len() as u32;
            for store in self.stores.iter().filter_map(LazyStore::existing) {
                store.destroy();
            }
        }
        // Outside the queue lock: the channel takes its own lock to forget the consumer.
        for c in consumers {
            c.sink.cancelled(&c);
        }
        Ok(count)
    }
}

/// A delivery is no longer unacknowledged (acked, rejected or returned).
fn release(st: &mut QueueState, d: &Delivered) {
    st.unacked = st.unacked.saturating_sub(1);
    st.unacked_bytes = st
        .unacked_bytes
        .saturating_sub(d.msg.message.body.len() as u64);
    if let Some(c) = &d.consumer {
        c.unacked.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Timed for Queue {
    fn on_timer(self: &Arc<Self>) {
        Queue::on_timer(self);
    }
}

/// Moves the consumer at `i` behind the others of its priority, for round-robin.
fn rotate_within_priority(consumers: &mut [Arc<Consumer>], i: usize) {
    let priority = consumers[i].priority;
    let mut end = i;
    while end + 1 < consumers.len() && consumers[end + 1].priority == priority {
        end += 1;
    }
    if end > i {
        consumers[i..=end].rotate_left(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    /// A sink that takes up to `room` messages and records them.
    struct Recorder {
        room: Mutex<usize>,
        got: Mutex<Vec<(Arc<str>, u64, bool)>>,
        cancelled: Mutex<Vec<Arc<str>>>,
    }

    impl Recorder {
        fn new(room: usize) -> Arc<Self> {
            Arc::new(Self {
                room: Mutex::new(room),
                got: Mutex::new(Vec::new()),
                cancelled: Mutex::new(Vec::new()),
            })
        }
    }

    impl DeliverySink for Recorder {
        fn offer(
            &self,
            _queue: &QueueRef,
            consumer: &Arc<Consumer>,
            msg: QueuedMessage,
        ) -> Result<(), QueuedMessage> {
            let mut room = self.room.lock();
            if *room == 0 {
                return Err(msg);
            }
            *room -= 1;
            self.got
                .lock()
                .push((consumer.tag.clone(), msg.seq, msg.redelivered));
            Ok(())
        }

        fn cancelled(&self, consumer: &Arc<Consumer>) {
            self.cancelled.lock().push(consumer.tag.clone());
        }
    }

    fn queue() -> QueueRef {
        QueueRef::from(Queue::in_memory(
            QueueSpec {
                name: "q".into(),
                durable: false,
                exclusive: false,
                auto_delete: false,
                arguments: FieldTable::default(),
            },
            "/".into(),
            None,
        ))
    }

    fn msg() -> Arc<Message> {
        Arc::new(Message {
            exchange: "".into(),
            routing_key: "q".into(),
            properties: Bytes::from_static(&[0, 0]),
            body: Bytes::from_static(b"x"),
            persistent: false,
            arrived_ms: 0,
            expires_at_ms: None,
        })
    }

    fn consumer(tag: &str, priority: i32, prefetch: u32, sink: &Arc<Recorder>) -> Arc<Consumer> {
        Arc::new(Consumer::new(
            tag.into(),
            false,
            false,
            priority,
            prefetch,
            sink.clone(),
            FieldTable::default(),
        ))
    }

    #[test]
    fn a_priority_queue_has_a_store_for_every_level_whatever_was_opened() {
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-priority".into(), AMQPValue::LongInt(3));
        let spec = QueueSpec {
            name: "p".into(),
            durable: false,
            exclusive: false,
            auto_delete: false,
            arguments,
        };
        let storage = Arc::new(Storage::in_memory());
        // Only level 0 could be opened: the others get stores of their own all the same.
        let q = QueueRef::from(Queue::recovered_levels(
            spec,
            "/".into(),
            None,
            vec![(LazyStore::deferred(storage), Recovered::default())],
            Window::default(),
        ));
        assert_eq!(q.top_level(), 3);
        let props = crate::amqp::codec::encode_properties(
            &amq_protocol::protocol::BasicProperties::default().with_priority(3),
        );
        let high = Arc::new(Message {
            properties: props,
            ..(*msg()).clone()
        });
        assert!(matches!(q.publish(msg()), Enqueued::Accepted { .. }));
        assert!(matches!(q.publish(high), Enqueued::Accepted { .. }));
        let (first, _) = q.get(true).unwrap().expect("a message");
        assert_eq!(first.level, 3);
    }

    #[test]
    fn round_robin_between_equal_consumers() {
        let q = queue();
        let sink = Recorder::new(100);
        q.add_consumer(consumer("a", 0, 0, &sink), || ()).unwrap();
        q.add_consumer(consumer("b", 0, 0, &sink), || ()).unwrap();
        for _ in 0..4 {
            q.publish(msg());
        }
        let tags: Vec<_> = sink.got.lock().iter().map(|g| g.0.to_string()).collect();
        assert_eq!(tags, ["a", "b", "a", "b"]);
    }

    #[test]
    fn higher_priority_consumers_go_first_until_they_are_full() {
        let q = queue();
        let sink = Recorder::new(100);
        q.add_consumer(consumer("low", 0, 0, &sink), || ()).unwrap();
        q.add_consumer(consumer("high", 5, 2, &sink), || ())
            .unwrap();
        for _ in 0..3 {
            q.publish(msg());
        }
        let tags: Vec<_> = sink.got.lock().iter().map(|g| g.0.to_string()).collect();
        assert_eq!(tags, ["high", "high", "low"]);
    }

    #[test]
    fn prefetch_limits_unacked_and_settle_releases_more() {
        let q = queue();
        let sink = Recorder::new(100);
        let c = consumer("a", 0, 1, &sink);
        q.add_consumer(c.clone(), || ()).unwrap();
        q.publish(msg());
        q.publish(msg());
        assert_eq!(sink.got.lock().len(), 1);
        assert_eq!(q.message_count(), 1);
        let first = QueuedMessage {
            seq: 0,
            message: msg(),
            redelivered: false,
            location: None,
            returned: 0,
            level: 0,
        };
        q.settle(
            &[Delivered {
                delivered_at_ms: 0,
                queue: q.clone(),
                consumer: Some(c),
                msg: first,
            }],
            true,
        );
        assert_eq!(sink.got.lock().len(), 2);
        assert_eq!(q.message_count(), 0);
    }

    #[test]
    fn requeued_messages_return_to_their_place_marked_redelivered() {
        let q = queue();
        for _ in 0..3 {
            q.publish(msg());
        }
        let (m0, _) = q.get(false).unwrap().unwrap();
        let (m1, left) = q.get(false).unwrap().unwrap();
        assert_eq!(left, 1);
        let d = |m: QueuedMessage| Delivered {
            delivered_at_ms: 0,
            queue: q.clone(),
            consumer: None,
            msg: m,
        };
        q.requeue(vec![d(m1), d(m0)]);
        let order: Vec<_> = (0..3)
            .map(|_| {
                let (m, _) = q.get(true).unwrap().unwrap();
                (m.seq, m.redelivered)
            })
            .collect();
        assert_eq!(order, [(0, true), (1, true), (2, false)]);
        assert_eq!(q.unacked_count(), 0);
    }

    #[test]
    fn a_full_channel_gives_the_message_back() {
        let q = queue();
        let full = Recorder::new(0);
        let open = Recorder::new(10);
        q.add_consumer(consumer("full", 0, 0, &full), || ())
            .unwrap();
        q.add_consumer(consumer("open", 0, 0, &open), || ())
            .unwrap();
        q.publish(msg());
        q.publish(msg());
        assert_eq!(open.got.lock().len(), 2);
        assert_eq!(q.message_count(), 0);
    }

    fn limited(args: &[(&str, AMQPValue)]) -> QueueRef {
        let mut arguments = FieldTable::default();
        for (k, v) in args {
            arguments.insert((*k).into(), v.clone());
        }
        QueueRef::from(Queue::in_memory(
            QueueSpec {
                name: "q".into(),
                durable: false,
                exclusive: false,
                auto_delete: false,
                arguments,
            },
            "/".into(),
            None,
        ))
    }

    #[test]
    fn max_length_drops_the_oldest_ready_messages() {
        let q = limited(&[("x-max-length", AMQPValue::LongInt(2))]);
        for _ in 0..5 {
            assert_eq!(
                q.publish(msg()),
                Enqueued::Accepted {
                    ticket: Ticket::Done,
                    backlogged: false
                }
            );
        }
        let seqs: Vec<_> = (0..2)
            .map(|_| q.get(true).unwrap().unwrap().0.seq)
            .collect();
        assert_eq!(seqs, [3, 4]);
    }

    #[test]
    fn max_length_bytes_counts_bodies() {
        let q = limited(&[("x-max-length-bytes", AMQPValue::LongInt(2))]);
        for _ in 0..3 {
            q.publish(msg());
        }
        assert_eq!(q.message_count(), 2);
    }

    #[test]
    fn reject_publish_refuses_when_full() {
        let q = limited(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", AMQPValue::LongString("reject-publish".into())),
        ]);
        assert_eq!(
            q.publish(msg()),
            Enqueued::Accepted {
                ticket: Ticket::Done,
                backlogged: false
            }
        );
        assert_eq!(q.publish(msg()), Enqueued::Rejected);
        assert_eq!(q.message_count(), 1);
    }

    #[test]
    fn exclusive_consumers_exclude_others() {
        let q = queue();
        let sink = Recorder::new(10);
        let mut ex = Consumer::new(
            "x".into(),
            false,
            true,
            0,
            0,
            sink.clone(),
            FieldTable::default(),
        );
        ex.exclusive = true;
        q.add_consumer(Arc::new(ex), || ()).unwrap();
        assert_eq!(
            q.add_consumer(consumer("b", 0, 0, &sink), || ()),
            Err(ConsumeRefused::ExclusiveInUse)
        );
    }

    #[test]
    fn delete_cancels_consumers_and_counts_ready_messages() {
        let q = queue();
        let sink = Recorder::new(0);
        q.add_consumer(consumer("a", 0, 0, &sink), || ()).unwrap();
        q.publish(msg());
        q.publish(msg());
        assert_eq!(q.delete(true, false), Err(DeleteRefused::InUse));
        assert_eq!(q.delete(true, true), Err(DeleteRefused::NotEmpty));
        assert_eq!(q.delete(false, false), Ok(2));
        assert_eq!(sink.cancelled.lock().len(), 1);
        assert_eq!(q.publish(msg()), Enqueued::Deleted);
    }
}
