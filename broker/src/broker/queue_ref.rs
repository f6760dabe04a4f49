//! The operations of the handle by which everything outside the queue module holds a queue: vhosts' maps,
//! exchange bindings, channels' deliveries and consumers, flow control, dead-lettering and
//! the management API.
//!
//! It is an enum rather than a trait object so that what is behind a handle can change
//! (a queue on this node, a queue whose home is another node, and later one replicated
//! across nodes) without a change in every layer that holds one, and without dynamic
//! dispatch or boxing on a local queue's message path: each method is one `match`, inlined.
//! A remote queue is reached through the [`RemoteHome`] trait its forwarding implements
//! (every one of its operations crosses the network anyway), so the queue module need not
//! depend on the forwarding built above it. A handle is at most three words (pinned by a test
//! here).
//!
//! The enum itself is declared beside the queue it wraps, which hands its own handle down to
//! consumers and dead-lettering; the operations here build on the queue, not the other way.
//!
//! Two handles are equal when they stand for the same queue (the same allocation, not the
//! same name: a queue deleted and declared again is another queue), which is what callers
//! that deduplicate or key by queue mean.

use super::message::Message;
use super::policy::Policy;
pub use super::queue::QueueRef;
use super::queue::{
    ConsumeRefused, Consumer, DeleteRefused, Delivered, Enqueued, Links, Queue, QueueLengths,
    QueueSpec, Settings,
};
use super::queue::{RemoteHome, Unavailable};
use super::ready::QueuedMessage;
use super::stats::MessageCounts;
use amq_protocol::types::FieldTable;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Weak};

impl From<Arc<Queue>> for QueueRef {
    #[inline]
    fn from(q: Arc<Queue>) -> Self {
        Self::Local(q)
    }
}

impl PartialEq for QueueRef {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.addr() == other.addr()
    }
}

impl Eq for QueueRef {}

impl Hash for QueueRef {
    #[inline]
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.addr().hash(state);
    }
}

impl QueueRef {
    /// The identity of the queue behind the handle, for equality and hashing; never
    /// dereferenced.
    #[inline]
    fn addr(&self) -> usize {
        match self {
            Self::Local(q) => Arc::as_ptr(q) as usize,
            Self::Remote(q) => Arc::as_ptr(q) as *const () as usize,
        }
    }

    /// A handle that does not keep the queue alive (a connection's list of queues to wake).
    #[inline]
    pub fn downgrade(&self) -> WeakQueueRef {
        match self {
            Self::Local(q) => WeakQueueRef::Local(Arc::downgrade(q)),
            Self::Remote(q) => WeakQueueRef::Remote(Arc::downgrade(q)),
        }
    }

    #[inline]
    pub fn name(&self) -> &str {
        match self {
            Self::Local(q) => q.name(),
            Self::Remote(q) => &q.spec().name,
        }
    }

    /// The vhost the queue is in.
    #[inline]
    pub fn vhost(&self) -> &Arc<str> {
        match self {
            Self::Local(q) => &q.vhost,
            Self::Remote(q) => q.vhost(),
        }
    }

    /// The declared attributes.
    #[inline]
    pub fn spec(&self) -> &QueueSpec {
        match self {
            Self::Local(q) => &q.spec,
            Self::Remote(q) => q.spec(),
        }
    }

    #[inline]
    pub fn durable(&self) -> bool {
        self.spec().durable
    }

    #[inline]
    pub fn auto_delete(&self) -> bool {
        self.spec().auto_delete
    }

    /// The declared arguments (without what policies add: see [`QueueRef::settings`]).
    #[inline]
    pub fn arguments(&self) -> &FieldTable {
        &self.spec().arguments
    }

    /// The connection that owns an exclusive queue.
    #[inline]
    pub fn owner(&self) -> Option<u64> {
        match self {
            Self::Local(q) => q.owner,
            Self::Remote(_) => None,
        }
    }

    /// `x-single-active-consumer` was declared.
    #[inline]
    pub fn is_single_active_consumer(&self) -> bool {
        match self {
            Self::Local(q) => q.single_active_consumer,
            Self::Remote(q) => q.is_single_active_consumer(),
        }
    }

    /// The declared type (`x-queue-type`; classic without it).
    #[inline]
    pub fn queue_type(&self) -> &'static str {
        match self {
            Self::Local(q) => q.queue_type(),
            Self::Remote(q) => q.queue_type(),
        }
    }

    /// The highest priority level: `x-max-priority`, 0 for a queue without priorities.
    #[inline]
    pub fn top_level(&self) -> u8 {
        match self {
            Self::Local(q) => q.top_level(),
            Self::Remote(q) => q.top_level(),
        }
    }

    #[inline]
    pub fn is_deleted(&self) -> bool {
        match self {
            Self::Local(q) => q.is_deleted(),
            Self::Remote(q) => q.is_deleted(),
        }
    }

    /// The node the queue's messages are on, when it is another.
    #[inline]
    pub fn home(&self) -> Option<&str> {
        match self {
            Self::Local(_) => None,
            Self::Remote(q) => Some(q.node()),
        }
    }

    /// The home node, when it is another and cannot be reached now.
    #[inline]
    pub fn unreachable_home(&self) -> Option<&str> {
        match self {
            Self::Local(_) => None,
            Self::Remote(q) => q.unreachable_home(),
        }
    }

    /// Lengths and consumers at one moment, asked of the home node for a remote queue
    /// (whose [`QueueRef::lengths`] counts only what this node holds: nothing).
    pub fn lengths_now(&self) -> Result<QueueLengths, Unavailable> {
        match self {
            Self::Local(q) => Ok(q.lengths()),
            Self::Remote(q) => q.lengths(),
        }
    }

    /// The queue's message counters now.
    #[inline]
    pub fn message_counts(&self) -> MessageCounts {
        match self {
            Self::Local(q) => q.stats.read(),
            Self::Remote(_) => MessageCounts::default(),
        }
    }

    /// Lengths and consumers at one moment.
    #[inline]
    pub fn lengths(&self) -> QueueLengths {
        match self {
            Self::Local(q) => q.lengths(),
            Self::Remote(_) => QueueLengths::default(),
        }
    }

    /// Ready messages.
    #[inline]
    pub fn message_count(&self) -> u32 {
        match self {
            Self::Local(q) => q.message_count(),
            Self::Remote(_) => 0,
        }
    }

    /// Ready messages held in memory.
    #[inline]
    pub fn messages_in_memory(&self) -> usize {
        match self {
            Self::Local(q) => q.messages_in_memory(),
            Self::Remote(_) => 0,
        }
    }

    #[inline]
    pub fn consumer_count(&self) -> u32 {
        match self {
            Self::Local(q) => q.consumer_count(),
            Self::Remote(q) => q.consumers().len() as u32,
        }
    }

    #[inline]
    pub fn unacked_count(&self) -> u64 {
        match self {
            Self::Local(q) => q.unacked_count(),
            Self::Remote(_) => 0,
        }
    }

    /// Connects the queue to its vhost and the vhost's timers.
    #[inline]
    pub fn link(&self, links: Links) {
        match self {
            Self::Local(q) => q.link(links),
            Self::Remote(_) => drop(links),
        }
    }

    /// Expires what a recovered queue held past its time (once its vhost is back).
    #[inline]
    pub fn expire_recovered(&self) {
        match self {
            Self::Local(q) => q.expire_recovered(),
            Self::Remote(_) => {}
        }
    }

    /// The effective settings (arguments with policies applied).
    #[inline]
    pub fn settings(&self) -> Arc<Settings> {
        match self {
            Self::Local(q) => q.settings(),
            Self::Remote(q) => q.settings(),
        }
    }

    /// `x-consumer-timeout`, from the arguments or the policy.
    #[inline]
    pub fn consumer_timeout(&self) -> Option<u64> {
        match self {
            Self::Local(q) => q.consumer_timeout(),
            Self::Remote(q) => q.settings().features.consumer_timeout,
        }
    }

    /// Applies a policy and an operator policy (or none) on top of the arguments.
    #[inline]
    pub fn set_policies(&self, policy: Option<Arc<Policy>>, operator: Option<Arc<Policy>>) {
        match self {
            Self::Local(q) => q.set_policies(self, policy, operator),
            Self::Remote(q) => q.set_policies(policy, operator),
        }
    }

    /// The queue was used: `x-expires` counts from now.
    #[inline]
    pub fn touch(&self) {
        match self {
            Self::Local(q) => q.touch(),
            Self::Remote(_) => {}
        }
    }

    /// Offers a routed message to the queue.
    #[inline]
    pub fn publish(&self, message: Arc<Message>) -> Enqueued {
        match self {
            Self::Local(q) => q.publish(self, message),
            Self::Remote(q) => q.publish(&message),
        }
    }

    /// Hands out ready messages to consumers with room.
    #[inline]
    pub fn dispatch(&self) {
        match self {
            Self::Local(q) => q.dispatch(self),
            Self::Remote(q) => q.dispatch(),
        }
    }

    /// Flow control: whether a publisher on connection `publisher` should wait.
    #[inline]
    pub fn holds_publisher(&self, publisher: u64) -> bool {
        match self {
            Self::Local(q) => q.holds_publisher(publisher),
            Self::Remote(q) => q.holds_publisher(),
        }
    }

    /// Resolves when the backlog is back in memory (taken before `holds_publisher`).
    #[inline]
    pub fn backlog_drained(&self) -> tokio::sync::futures::Notified<'_> {
        match self {
            Self::Local(q) => q.backlog_drained(),
            Self::Remote(q) => q.backlog_drained(),
        }
    }

    /// `basic.get`: the next ready message and how many remain after it (an error when the
    /// home of a remote queue cannot be asked).
    #[inline]
    pub fn get(&self, no_ack: bool) -> Result<Option<(QueuedMessage, u32)>, Unavailable> {
        match self {
            Self::Local(q) => Ok(q.get(self, no_ack)),
            Self::Remote(q) => q.get(no_ack),
        }
    }

    /// Acknowledged (`acked`) or rejected without requeue deliveries of this queue.
    #[inline]
    pub fn settle(&self, delivered: &[Delivered], acked: bool) {
        match self {
            Self::Local(q) => q.settle(self, delivered, acked),
            Self::Remote(q) => q.settle(delivered, acked),
        }
    }

    /// Puts deliveries back in their places, marked redelivered.
    #[inline]
    pub fn requeue(&self, delivered: Vec<Delivered>) {
        match self {
            Self::Local(q) => q.requeue(self, delivered),
            Self::Remote(q) => q.requeue(&delivered),
        }
    }

    /// Adds a consumer; `on_added` runs before any message is handed to it.
    #[inline]
    pub fn add_consumer(
        &self,
        consumer: Arc<Consumer>,
        on_added: impl FnOnce(),
    ) -> Result<(), ConsumeRefused> {
        match self {
            Self::Local(q) => q.add_consumer(self, consumer, on_added),
            Self::Remote(q) => {
                let mut on_added = Some(on_added);
                q.clone().add_consumer(consumer, &mut || {
                    if let Some(f) = on_added.take() {
                        f();
                    }
                })
            }
        }
    }

    /// Removes a consumer; true when an auto-delete queue is left without consumers.
    #[inline]
    pub fn remove_consumer(&self, consumer: &Arc<Consumer>) -> bool {
        match self {
            Self::Local(q) => q.remove_consumer(self, consumer),
            Self::Remote(q) => {
                // The home deletes an auto-delete queue its last consumer left.
                q.remove_consumer(consumer);
                false
            }
        }
    }

    /// Message query: up to `limit` ready messages `wanted` picks, left in the queue.
    #[inline]
    pub fn find(
        &self,
        limit: usize,
        budget: usize,
        wanted: impl Fn(&Message) -> bool,
    ) -> (Vec<QueuedMessage>, bool) {
        match self {
            Self::Local(q) => q.find(limit, budget, wanted),
            Self::Remote(_) => (Vec::new(), false),
        }
    }

    /// The consumer that gets messages in a single-active-consumer queue.
    #[inline]
    pub fn single_active_consumer(&self) -> Option<Arc<Consumer>> {
        match self {
            Self::Local(q) => q.single_active_consumer(),
            Self::Remote(_) => None,
        }
    }

    #[inline]
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        match self {
            Self::Local(q) => q.consumers(),
            Self::Remote(q) => q.consumers(),
        }
    }

    /// Drops all ready messages; returns how many (an error when the home of a remote queue
    /// cannot be asked).
    #[inline]
    pub fn purge(&self) -> Result<u32, Unavailable> {
        match self {
            Self::Local(q) => Ok(q.purge()),
            Self::Remote(q) => q.purge(),
        }
    }

    /// Whether `delete` with these conditions would delete the queue now.
    #[inline]
    pub fn may_delete(&self, if_unused: bool, if_empty: bool) -> Result<(), DeleteRefused> {
        match self {
            Self::Local(q) => q.may_delete(if_unused, if_empty),
            Self::Remote(q) => q.may_delete(if_unused, if_empty),
        }
    }

    /// Deletes the queue's messages and cancels its consumers; returns how many were ready.
    #[inline]
    pub fn delete(&self, if_unused: bool, if_empty: bool) -> Result<u32, DeleteRefused> {
        match self {
            Self::Local(q) => q.delete(if_unused, if_empty),
            Self::Remote(q) => q.delete(if_unused, if_empty),
        }
    }
}

/// A [`QueueRef`] that does not keep its queue alive.
#[derive(Debug, Clone)]
pub enum WeakQueueRef {
    Local(Weak<Queue>),
    Remote(Weak<dyn RemoteHome>),
}

impl WeakQueueRef {
    /// The handle, if the queue is still there.
    #[inline]
    pub fn upgrade(&self) -> Option<QueueRef> {
        match self {
            Self::Local(q) => q.upgrade().map(QueueRef::Local),
            Self::Remote(q) => q.upgrade().map(QueueRef::Remote),
        }
    }

    /// Whether this stands for the same queue as `q`.
    #[inline]
    pub fn is(&self, q: &QueueRef) -> bool {
        match self {
            Self::Local(w) => w.as_ptr() as usize == q.addr(),
            Self::Remote(w) => w.as_ptr() as *const () as usize == q.addr(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;
    use std::mem::size_of;

    fn queue(name: &str) -> QueueRef {
        let spec = QueueSpec {
            name: name.into(),
            durable: false,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
        };
        QueueRef::from(Queue::in_memory(spec, "/".into(), None))
    }

    /// A handle costs at most a tag and a wide pointer: a later variant that makes it wider is a choice to
    /// make knowingly, not by accident.
    #[test]
    fn a_handle_is_at_most_three_words() {
        let word = size_of::<Arc<Queue>>();
        assert!(size_of::<QueueRef>() <= 3 * word);
        assert!(size_of::<Option<QueueRef>>() <= 3 * word);
        assert!(size_of::<WeakQueueRef>() <= 3 * word);
    }

    #[test]
    fn handles_are_equal_when_they_stand_for_the_same_queue() {
        let a = queue("a");
        let same_name = queue("a");
        assert_eq!(a, a.clone());
        assert_ne!(
            a, same_name,
            "another queue of the same name is another queue"
        );
        let state = std::collections::hash_map::RandomState::new();
        assert_eq!(state.hash_one(&a), state.hash_one(a.clone()));
        assert_ne!(state.hash_one(&a), state.hash_one(&same_name));
    }

    #[test]
    fn a_weak_handle_follows_its_queue() {
        let a = queue("a");
        let weak = a.downgrade();
        assert!(weak.is(&a));
        assert!(!weak.is(&queue("b")));
        assert_eq!(weak.upgrade(), Some(a.clone()));
        drop(a);
        assert_eq!(weak.upgrade(), None);
    }

    #[test]
    fn accessors_read_the_declared_attributes() {
        let a = queue("orders");
        assert_eq!(a.name(), "orders");
        assert_eq!(&**a.vhost(), "/");
        assert!(!a.durable() && !a.auto_delete());
        assert_eq!(a.owner(), None);
        assert!(!a.is_single_active_consumer());
        assert_eq!(a.queue_type(), "classic");
        assert_eq!(a.message_count(), 0);
    }
}
