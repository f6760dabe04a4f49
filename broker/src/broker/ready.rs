//! A queue's ready messages: a bounded window in memory, the rest in the queue's store.
//!
//! The window holds the oldest ready messages. Once it is full, new messages go to the store
//! only (persistent ones are there already) and are counted as the *tail*; when the window
//! empties, the next batch is read back in order. Every message in the window is older than
//! every message in the tail (requeued messages return to the window, where they came from),
//! so the queue's order is kept. A backlog of millions costs disk, not memory.

use super::message::Message;
use crate::store::{Location, QueueStore, RecordKind, Recovered, Storage};
use amq_protocol::types::AMQPValue;
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};

/// A message in a queue, with its place in the queue's order.
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// Position in the queue's publish order; requeued messages go back to their place.
    pub seq: u64,
    pub message: Arc<Message>,
    pub redelivered: bool,
    /// Where the message is in the queue's store, if it was written there (persistent, or
    /// paged out of memory).
    pub location: Option<Location>,
    /// Times it came back unacknowledged (for `x-delivery-limit`; stored with a persistent
    /// message's index slot, so it survives a restart).
    pub returned: u32,
    /// Its priority level in a priority queue (0 otherwise): which list and store hold it.
    pub level: u8,
}

/// How much of a queue's backlog stays in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub messages: usize,
    pub bytes: u64,
}

/// How many times the window a queue lets consumers hold unacknowledged: its deliveries in
/// flight are bounded in memory as its backlog is, whatever prefetch its consumers asked for
/// (0, unlimited, included). More go out as acknowledgements come back.
const IN_FLIGHT_MESSAGES: usize = 16;
const IN_FLIGHT_BYTES: u64 = 4;

impl Window {
    /// The most a queue hands out unacknowledged at a time.
    pub fn in_flight(&self) -> Window {
        Window {
            messages: self.messages.saturating_mul(IN_FLIGHT_MESSAGES),
            bytes: self.bytes.saturating_mul(IN_FLIGHT_BYTES),
        }
    }
}

impl Default for Window {
    fn default() -> Self {
        Self {
            messages: 2048,
            bytes: 8 * 1024 * 1024,
        }
    }
}

/// A queue's store, created on first use for non-durable queues (most never page).
#[derive(Debug)]
pub struct LazyStore {
    storage: Arc<Storage>,
    store: OnceLock<Arc<dyn QueueStore>>,
}

impl LazyStore {
    pub fn opened(storage: Arc<Storage>, store: Arc<dyn QueueStore>) -> Self {
        let cell = OnceLock::new();
        let _ = cell.set(store);
        Self {
            storage,
            store: cell,
        }
    }

    pub fn deferred(storage: Arc<Storage>) -> Self {
        Self {
            storage,
            store: OnceLock::new(),
        }
    }

    pub fn get(&self) -> &Arc<dyn QueueStore> {
        self.store.get_or_init(|| match self.storage.open_transient() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot create a store for paging; keeping messages in memory");
                Arc::new(crate::store::memory::MemoryQueueStore::new())
            }
        })
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    pub fn existing(&self) -> Option<&Arc<dyn QueueStore>> {
        self.store.get()
    }
}

#[derive(Debug)]
pub struct ReadyList {
    mem: VecDeque<QueuedMessage>,
    mem_bytes: u64,
    /// Messages in the store only, from `cursor` up to `until`.
    tail: u64,
    tail_bytes: u64,
    cursor: u64,
    until: u64,
    /// Recovered messages below this sequence number come back marked redelivered.
    redelivered_below: u64,
    window: Window,
    /// The priority level this list holds (0 in a queue without priorities).
    level: u8,
}

impl ReadyList {
    pub fn new(window: Window) -> Self {
        Self {
            mem: VecDeque::new(),
            mem_bytes: 0,
            tail: 0,
            tail_bytes: 0,
            cursor: 0,
            until: 0,
            redelivered_below: 0,
            window,
            level: 0,
        }
    }

    /// The ready list of a queue whose store held `recovered` at start.
    pub fn recovered(window: Window, recovered: Recovered) -> Self {
        Self {
            tail: recovered.count,
            tail_bytes: recovered.bytes,
            cursor: recovered.first_seq,
            until: recovered.next_seq,
            redelivered_below: recovered.redelivered_below,
            ..Self::new(window)
        }
    }

    pub fn len(&self) -> usize {
        self.mem.len() + self.tail as usize
    }

    pub fn is_empty(&self) -> bool {
        self.mem.is_empty() && self.tail == 0
    }

    /// Body bytes of all ready messages (what `x-max-length-bytes` limits).
    pub fn bytes(&self) -> u64 {
        self.mem_bytes + self.tail_bytes
    }

    /// Some ready messages are in the store only: the backlog outgrew the window.
    pub fn paging(&self) -> bool {
        self.tail > 0
    }

    /// Ready messages held in memory.
    pub fn in_memory(&self) -> usize {
        self.mem.len()
    }

    fn window_full(&self) -> bool {
        self.mem.len() >= self.window.messages || self.mem_bytes >= self.window.bytes
    }

    /// Appends a message: to the window while it has room and nothing is in the tail, else to
    /// the store.
    pub fn push_back(&mut self, msg: QueuedMessage, store: &LazyStore) {
        if self.tail == 0 && !self.window_full() {
            self.mem_bytes += msg.message.body.len() as u64;
            self.mem.push_back(msg);
            return;
        }
        if msg.location.is_none() {
            store.get().append(msg.seq, &msg.message, RecordKind::Paged);
        }
        if self.tail == 0 {
            self.cursor = msg.seq;
        }
        self.tail += 1;
        self.tail_bytes += msg.message.body.len() as u64;
        self.until = msg.seq + 1;
    }

    /// The oldest ready message, reading the next batch from the store when the window is
    /// empty.
    pub fn front(&mut self, store: &LazyStore) -> Option<&QueuedMessage> {
        if self.mem.is_empty() && self.tail > 0 {
            self.refill(store);
        }
        self.mem.front()
    }

    /// Takes the oldest ready message, reading the next batch from the store when the
    /// window is empty.
    pub fn pop_front(&mut self, store: &LazyStore) -> Option<QueuedMessage> {
        if self.mem.is_empty() && self.tail > 0 {
            self.refill(store);
        }
        let msg = self.mem.pop_front()?;
        self.mem_bytes -= msg.message.body.len() as u64;
        Some(msg)
    }

    fn refill(&mut self, store: &LazyStore) {
        let batch = store.get().read(
            self.cursor,
            self.until,
            self.window.messages.max(1),
            self.window.bytes.max(1),
        );
        self.cursor = batch.next;
        self.tail = self.tail.saturating_sub(batch.dropped);
        for m in batch.messages {
            let len = m.message.body.len() as u64;
            self.tail = self.tail.saturating_sub(1);
            self.tail_bytes = self.tail_bytes.saturating_sub(len);
            self.mem_bytes += len;
            self.mem.push_back(QueuedMessage {
                seq: m.seq,
                redelivered: m.delivered || m.seq < self.redelivered_below,
                message: Arc::new(with_returns(m.message, m.returned)),
                location: Some(m.location),
                returned: u32::from(m.returned),
                level: self.level,
            });
        }
        if self.mem.is_empty() && self.cursor >= self.until && self.tail > 0 {
            tracing::warn!(
                missing = self.tail,
                "queue store holds fewer messages than counted"
            );
            self.tail = 0;
            self.tail_bytes = 0;
        }
    }

    /// Looks at ready messages in queue order, oldest first, without taking them: the window,
    /// then the tail in the store, at most `budget` of them; `visit` returns false to stop.
    /// Returns how many were looked at.
    pub fn scan(
        &self,
        store: &LazyStore,
        budget: usize,
        mut visit: impl FnMut(&QueuedMessage) -> bool,
    ) -> usize {
        let mut seen = 0;
        for m in &self.mem {
            if seen == budget {
                return seen;
            }
            seen += 1;
            if !visit(m) {
                return seen;
            }
        }
        let Some(s) = store.existing().filter(|_| self.tail > 0) else {
            return seen;
        };
        let mut from = self.cursor;
        while seen < budget && from < self.until {
            let batch = s.read(from, self.until, (budget - seen).min(512), 8 * 1024 * 1024);
            if batch.messages.is_empty() {
                break;
            }
            from = batch.next;
            for m in batch.messages {
                seen += 1;
                let queued = QueuedMessage {
                    seq: m.seq,
                    redelivered: m.delivered || m.seq < self.redelivered_below,
                    message: Arc::new(with_returns(m.message, m.returned)),
                    location: Some(m.location),
                    returned: u32::from(m.returned),
                    level: self.level,
                };
                if !visit(&queued) || seen == budget {
                    return seen;
                }
            }
        }
        seen
    }

    /// Puts a message back where it was (it came from the window, so it goes back there).
    pub fn requeue(&mut self, msg: QueuedMessage) {
        self.mem_bytes += msg.message.body.len() as u64;
        match self.mem.front() {
            Some(front) if front.seq < msg.seq => {
                let at = self.mem.partition_point(|m| m.seq < msg.seq);
                self.mem.insert(at, msg);
            }
            _ => self.mem.push_front(msg),
        }
    }

    /// Drops every ready message, from memory and from the store; returns how many.
    pub fn clear(&mut self, store: &LazyStore) -> usize {
        let mut n = self.mem.len();
        if let Some(s) = store.existing() {
            for m in &self.mem {
                if let Some(at) = m.location {
                    s.remove(m.seq, at);
                }
            }
            if self.tail > 0 {
                s.remove_range(self.cursor, self.until);
            }
        }
        n += self.tail as usize;
        self.mem.clear();
        self.mem_bytes = 0;
        self.tail = 0;
        self.tail_bytes = 0;
        self.cursor = self.until;
        n
    }
}

/// Each priority level of a priority queue keeps at least this much of its window.
const MIN_LEVEL_WINDOW: Window = Window {
    messages: 16,
    bytes: 64 * 1024,
};

/// A queue's ready messages by priority level (`x-max-priority`): one [`ReadyList`] with its
/// own store per level, the highest level served first, first in first out within a level.
/// Each level pages to its own store, so a backlog of any priority mix stays on disk in
/// order. A queue without priorities has one level, which is just a [`ReadyList`].
#[derive(Debug)]
pub struct Levels {
    lists: Vec<ReadyList>,
}

impl Levels {
    /// The levels of a queue whose stores held `recovered` at start, one entry per level.
    /// The queue's window is shared out between its levels.
    pub fn new(window: Window, recovered: Vec<Recovered>) -> Self {
        let n = recovered.len().max(1);
        let share = if n == 1 {
            window
        } else {
            Window {
                messages: (window.messages / n).max(MIN_LEVEL_WINDOW.messages),
                bytes: (window.bytes / n as u64).max(MIN_LEVEL_WINDOW.bytes),
            }
        };
        let mut lists: Vec<ReadyList> = recovered
            .into_iter()
            .enumerate()
            .map(|(l, r)| ReadyList {
                level: u8::try_from(l).unwrap_or(u8::MAX),
                ..ReadyList::recovered(share, r)
            })
            .collect();
        if lists.is_empty() {
            lists.push(ReadyList::new(window));
        }
        Self { lists }
    }

    pub fn len(&self) -> usize {
        self.lists.iter().map(ReadyList::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.lists.iter().all(ReadyList::is_empty)
    }

    pub fn bytes(&self) -> u64 {
        self.lists.iter().map(ReadyList::bytes).sum()
    }

    pub fn in_memory(&self) -> usize {
        self.lists.iter().map(ReadyList::in_memory).sum()
    }

    /// Some level's backlog outgrew its window.
    pub fn paging(&self) -> bool {
        self.lists.iter().any(ReadyList::paging)
    }

    /// Appends a message to its level.
    pub fn push_back(&mut self, msg: QueuedMessage, stores: &[LazyStore]) {
        let l = usize::from(msg.level);
        self.lists[l].push_back(msg, &stores[l]);
    }

    /// The highest level with a message, reading its next batch from its store if needed.
    pub fn top(&mut self, stores: &[LazyStore]) -> Option<usize> {
        (0..self.lists.len())
            .rev()
            .find(|&l| self.lists[l].front(&stores[l]).is_some())
    }

    /// Takes the next message to deliver.
    pub fn pop_front(&mut self, stores: &[LazyStore]) -> Option<QueuedMessage> {
        let l = self.top(stores)?;
        self.lists[l].pop_front(&stores[l])
    }

    /// Puts a message back where it was, in its level.
    pub fn requeue(&mut self, msg: QueuedMessage) {
        let l = usize::from(msg.level);
        self.lists[l].requeue(msg);
    }

    /// Drops every ready message; returns how many.
    pub fn clear(&mut self, stores: &[LazyStore]) -> usize {
        self.lists
            .iter_mut()
            .zip(stores)
            .map(|(list, store)| list.clear(store))
            .sum()
    }

    /// Looks at ready messages in delivery order (highest level first), as
    /// [`ReadyList::scan`].
    pub fn scan(
        &self,
        stores: &[LazyStore],
        budget: usize,
        mut visit: impl FnMut(&QueuedMessage) -> bool,
    ) -> usize {
        let mut seen = 0;
        let mut stopped = false;
        for (list, store) in self.lists.iter().zip(stores).rev() {
            if stopped || seen >= budget {
                break;
            }
            seen += list.scan(store, budget - seen, |m| {
                let go = visit(m);
                stopped = !go;
                go
            });
        }
        seen
    }

    /// Each level, lowest first.
    pub fn lists_mut(&mut self) -> &mut [ReadyList] {
        &mut self.lists
    }
}

/// Forgets a message in the store, if it is there (acknowledged, dropped, consumed no-ack).
pub fn forget(store: &LazyStore, seq: u64, location: Option<Location>) {
    if let (Some(at), Some(s)) = (location, store.existing()) {
        s.remove(seq, at);
    }
}

/// Records a delivery (or a return) of a stored persistent message, for the redelivered flag
/// and the count of returns after a restart.
pub fn delivered(store: &LazyStore, seq: u64, location: Option<Location>, returned: u32) {
    if let (Some(at), Some(s)) = (location, store.existing())
        && at.kind == RecordKind::Persistent
    {
        s.mark_delivered(seq, at, u16::try_from(returned).unwrap_or(u16::MAX));
    }
}

/// A message read back from a store with its count of returns in `x-delivery-count`.
fn with_returns(message: super::message::Message, returned: u16) -> super::message::Message {
    if returned == 0 {
        return message;
    }
    with_delivery_count(&message, u32::from(returned))
}

/// The message with the `x-delivery-count` header (times it was returned), as quorum queues
/// report it.
pub(crate) fn with_delivery_count(m: &Message, count: u32) -> Message {
    let props = crate::amqp::codec::decode_properties(&m.properties).unwrap_or_default();
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        "x-delivery-count".into(),
        AMQPValue::LongLongInt(i64::from(count)),
    );
    Message {
        properties: crate::amqp::codec::encode_properties(&props.with_headers(headers)),
        ..m.clone()
    }
}

/// Whether a message must be in the store before it is confirmed.
pub fn must_persist(durable_queue: bool, message: &Message) -> bool {
    durable_queue && message.persistent
}
