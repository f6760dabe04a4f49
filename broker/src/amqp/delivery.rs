//! The part of a channel that other tasks touch: queues hand it messages for its consumers
//! (assigning delivery tags and remembering unacknowledged deliveries under one short lock, so
//! tags go out in order), and acknowledgements take them back out.

use super::writer::{ConnectionOutput, Outbound};
use crate::broker::connections::{ChannelSnapshot, ChannelView, ConsumerSnapshot};
use crate::broker::queue::{Consumer, Delivered, DeliverySink};
use crate::broker::queue_ref::QueueRef;
use crate::broker::ready::QueuedMessage;
use crate::broker::stats::MessageStats;
use amq_protocol::protocol::{AMQPClass, basic};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// A consumer on this channel and the queue it consumes from.
#[derive(Debug, Clone)]
pub struct ChannelConsumer {
    pub queue: QueueRef,
    pub consumer: Arc<Consumer>,
}

#[derive(Debug)]
struct State {
    open: bool,
    next_tag: u64,
    /// In delivery-tag order.
    unacked: VecDeque<(u64, Delivered)>,
    /// `basic.qos` with global=true: a limit on unacked deliveries across the channel.
    prefetch_global: u32,
    /// What that limit counts, as RabbitMQ's limiter does: deliveries to consumers that
    /// acknowledge, until they are settled for good. `basic.get` deliveries do not count, and
    /// acks inside a transaction free nothing until it commits.
    limited: usize,
    consumers: HashMap<Arc<str>, ChannelConsumer>,
}

#[derive(Debug)]
pub struct ChannelShared {
    pub id: u16,
    out: Arc<ConnectionOutput>,
    /// Whether the client asked to be told of server-side cancels (`consumer_cancel_notify`).
    cancel_notify: bool,
    state: Mutex<State>,
    /// Message counters of this channel.
    pub stats: MessageStats,
    /// What the reader task knows of the channel, mirrored for the management API.
    pub mirror: ChannelMirror,
}

/// The reader-owned part of a channel's state that the management API shows.
#[derive(Debug, Default)]
pub struct ChannelMirror {
    pub confirm: AtomicBool,
    pub transactional: AtomicBool,
    pub prefetch_count: AtomicU32,
    pub unconfirmed: AtomicU64,
    pub uncommitted: AtomicU64,
    pub acks_uncommitted: AtomicU64,
}

/// An unknown delivery tag in an ack, nack or reject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownTag(pub u64);

impl ChannelShared {
    pub fn new(id: u16, out: Arc<ConnectionOutput>, cancel_notify: bool) -> Arc<Self> {
        Arc::new(Self {
            id,
            out,
            cancel_notify,
            state: Mutex::new(State {
                open: true,
                next_tag: 1,
                unacked: VecDeque::new(),
                prefetch_global: 0,
                limited: 0,
                consumers: HashMap::new(),
            }),
            stats: MessageStats::default(),
            mirror: ChannelMirror::default(),
        })
    }

    pub fn out(&self) -> &Arc<ConnectionOutput> {
        &self.out
    }

    pub fn has_consumer(&self, tag: &str) -> bool {
        self.state.lock().consumers.contains_key(tag)
    }

    pub fn add_consumer(&self, entry: ChannelConsumer) {
        let tag = entry.consumer.tag.clone();
        self.state.lock().consumers.insert(tag, entry);
    }

    pub fn remove_consumer(&self, tag: &str) -> Option<ChannelConsumer> {
        self.state.lock().consumers.remove(tag)
    }

    pub fn consumer_count(&self) -> usize {
        self.state.lock().consumers.len()
    }

    /// The queues this channel consumes from, each once.
    pub fn consumed_queues(&self) -> Vec<QueueRef> {
        let st = self.state.lock();
        let mut queues: Vec<QueueRef> = Vec::new();
        for c in st.consumers.values() {
            if !queues.contains(&c.queue) {
                queues.push(c.queue.clone());
            }
        }
        queues
    }

    pub fn set_prefetch_global(&self, count: u32) {
        self.state.lock().prefetch_global = count;
    }

    pub fn prefetch_global(&self) -> u32 {
        self.state.lock().prefetch_global
    }

    /// Deliveries to consumers were settled for good (acked, rejected, requeued): they no
    /// longer count against the channel-wide prefetch.
    pub fn released(&self, settled: &[(u64, Delivered)]) {
        let n = settled.iter().filter(|(_, d)| d.consumer.is_some()).count();
        if n > 0 {
            let mut st = self.state.lock();
            st.limited = st.limited.saturating_sub(n);
        }
    }

    pub fn unacked_count(&self) -> usize {
        self.state.lock().unacked.len()
    }

    /// The consumer timeout a delivery on this channel has overrun, if one has: its queue's
    /// `x-consumer-timeout`, else `default` (0: no timeout).
    pub fn overdue(&self, now_ms: u64, default: u64) -> Option<u64> {
        let st = self.state.lock();
        st.unacked.iter().find_map(|(_, d)| {
            let limit = d.queue.consumer_timeout().unwrap_or(default);
            (limit > 0 && now_ms.saturating_sub(d.delivered_at_ms) > limit).then_some(limit)
        })
    }

    /// Sends a `basic.get-ok` for `msg`, taken from `queue`, with the next delivery tag.
    pub fn deliver_get(&self, queue: &QueueRef, msg: QueuedMessage, remaining: u32, no_ack: bool) {
        let mut st = self.state.lock();
        let tag = st.next_tag;
        st.next_tag += 1;
        MessageStats::bump(if no_ack {
            &self.stats.get_no_ack
        } else {
            &self.stats.get
        });
        if msg.redelivered {
            MessageStats::bump(&self.stats.redeliver);
        }
        self.out.send(Outbound::GetOk {
            channel: self.id,
            delivery_tag: tag,
            redelivered: msg.redelivered,
            message_count: remaining,
            message: msg.message.clone(),
        });
        if !no_ack {
            st.unacked.push_back((
                tag,
                Delivered {
                    delivered_at_ms: crate::broker::message::now_ms(),
                    queue: queue.clone(),
                    consumer: None,
                    msg,
                },
            ));
        }
    }

    /// Takes the deliveries an ack, nack or reject names: `tag` alone, or with `multiple`
    /// every delivery up to it (and with tag 0, all of them), as RabbitMQ does. With
    /// `release`, they are settled for good and leave the channel-wide prefetch under the
    /// same lock (as [`ChannelShared::released`] would, one lock less per ack).
    pub fn take_unacked(
        &self,
        tag: u64,
        multiple: bool,
        release: bool,
    ) -> Result<Vec<(u64, Delivered)>, UnknownTag> {
        let mut st = self.state.lock();
        let taken: Vec<(u64, Delivered)> = if multiple && tag == 0 {
            st.unacked.drain(..).collect()
        } else {
            let at = st
                .unacked
                .binary_search_by_key(&tag, |(t, _)| *t)
                .map_err(|_| UnknownTag(tag))?;
            if multiple {
                st.unacked.drain(..=at).collect()
            } else {
                st.unacked.remove(at).into_iter().collect()
            }
        };
        if release {
            let n = taken.iter().filter(|(_, d)| d.consumer.is_some()).count();
            st.limited = st.limited.saturating_sub(n);
        }
        Ok(taken)
    }

    /// Puts deliveries back among the unacknowledged ones (a rolled-back transaction).
    pub fn restore_unacked(&self, entries: Vec<(u64, Delivered)>) {
        let mut st = self.state.lock();
        for entry in entries {
            let at = st.unacked.partition_point(|(t, _)| *t < entry.0);
            st.unacked.insert(at, entry);
        }
    }

    /// Closes the channel to deliveries and hands back its consumers and unacked deliveries.
    pub fn shut(&self) -> (Vec<ChannelConsumer>, Vec<(u64, Delivered)>) {
        let mut st = self.state.lock();
        st.open = false;
        st.limited = 0;
        let consumers = st.consumers.drain().map(|(_, c)| c).collect();
        let unacked = st.unacked.drain(..).collect();
        (consumers, unacked)
    }
}

impl ChannelView for ChannelShared {
    fn snapshot(&self) -> ChannelSnapshot {
        let (unacked, global, consumers) = {
            let st = self.state.lock();
            let consumers = st
                .consumers
                .values()
                .map(|c| ConsumerSnapshot {
                    queue: c.queue.name().to_owned(),
                    tag: c.consumer.tag.to_string(),
                    ack_required: !c.consumer.no_ack,
                    exclusive: c.consumer.exclusive,
                    prefetch_count: c.consumer.prefetch,
                    arguments: c.consumer.arguments.clone(),
                })
                .collect();
            (st.unacked.len() as u64, st.prefetch_global, consumers)
        };
        let m = &self.mirror;
        ChannelSnapshot {
            number: self.id,
            prefetch_count: m.prefetch_count.load(Ordering::Relaxed),
            global_prefetch_count: global,
            confirm: m.confirm.load(Ordering::Relaxed),
            transactional: m.transactional.load(Ordering::Relaxed),
            messages_unacknowledged: unacked,
            messages_unconfirmed: m.unconfirmed.load(Ordering::Relaxed),
            messages_uncommitted: m.uncommitted.load(Ordering::Relaxed),
            acks_uncommitted: m.acks_uncommitted.load(Ordering::Relaxed),
            consumers,
            counts: self.stats.read(),
        }
    }

    fn stats(&self) -> &MessageStats {
        &self.stats
    }
}

impl DeliverySink for ChannelShared {
    fn offer(
        &self,
        queue: &QueueRef,
        consumer: &Arc<Consumer>,
        msg: QueuedMessage,
    ) -> Result<(), QueuedMessage> {
        let mut st = self.state.lock();
        if !st.open {
            return Err(msg);
        }
        // A full channel-wide window holds back no-ack consumers too (they do not count
        // against it), as RabbitMQ's limiter does.
        if st.prefetch_global != 0 && st.limited >= st.prefetch_global as usize {
            return Err(msg);
        }
        if self.out.defer_delivery(queue) {
            return Err(msg);
        }
        let tag = st.next_tag;
        st.next_tag += 1;
        MessageStats::bump(if consumer.no_ack {
            &self.stats.deliver_no_ack
        } else {
            &self.stats.deliver
        });
        if msg.redelivered {
            MessageStats::bump(&self.stats.redeliver);
        }
        self.out.send(Outbound::Deliver {
            channel: self.id,
            consumer_tag: consumer.tag.clone(),
            delivery_tag: tag,
            redelivered: msg.redelivered,
            message: msg.message.clone(),
        });
        if !consumer.no_ack {
            st.limited += 1;
            st.unacked.push_back((
                tag,
                Delivered {
                    delivered_at_ms: crate::broker::message::now_ms(),
                    queue: queue.clone(),
                    consumer: Some(consumer.clone()),
                    msg,
                },
            ));
        }
        Ok(())
    }

    fn cancelled(&self, consumer: &Arc<Consumer>) {
        let mut st = self.state.lock();
        let ours = st
            .consumers
            .get(&consumer.tag)
            .is_some_and(|c| Arc::ptr_eq(&c.consumer, consumer));
        if !ours {
            return;
        }
        st.consumers.remove(&consumer.tag);
        if st.open && self.cancel_notify {
            self.out.method(
                self.id,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: consumer.tag.as_ref().into(),
                    nowait: true,
                })),
            );
        }
    }
}
