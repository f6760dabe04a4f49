//! Message counters, as RabbitMQ's management API names them (`message_stats`), kept by
//! queues and channels, and summed for the node. Counters only grow; rates are derived from
//! them by the sampler of the HTTP layer.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! message_counters {
    ($($(#[$doc:meta])* $field:ident),* $(,)?) => {
        /// Live counters, bumped with relaxed atomics on the message path.
        #[derive(Debug, Default)]
        pub struct MessageStats {
            $($(#[$doc])* pub $field: AtomicU64,)*
        }

        /// A reading of [`MessageStats`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct MessageCounts {
            $(pub $field: u64,)*
        }

        impl MessageStats {
            pub fn read(&self) -> MessageCounts {
                MessageCounts { $($field: self.$field.load(Ordering::Relaxed),)* }
            }

            /// Adds a reading (a closed channel's counters into the node's).
            pub fn absorb(&self, counts: &MessageCounts) {
                $(self.$field.fetch_add(counts.$field, Ordering::Relaxed);)*
            }
        }

        impl MessageCounts {
            /// Every counter with its RabbitMQ name.
            pub fn fields(&self) -> [(&'static str, u64); [$(stringify!($field)),*].len()] {
                [$((stringify!($field), self.$field)),*]
            }
        }

        impl std::ops::AddAssign for MessageCounts {
            fn add_assign(&mut self, other: Self) {
                $(self.$field += other.$field;)*
            }
        }
    };
}

message_counters! {
    /// Messages published (channel: by its client; queue: enqueued).
    publish,
    /// Publishes on channels in confirm mode.
    publish_confirm,
    /// Publishes routed to at least one queue.
    routed,
    /// Publisher confirms sent (acks and nacks).
    confirm,
    /// Unroutable publishes dropped (not mandatory).
    drop_unroutable,
    /// Unroutable mandatory publishes returned.
    return_unroutable,
    /// Deliveries to consumers that acknowledge.
    deliver,
    /// Deliveries to consumers in automatic-acknowledgement mode.
    deliver_no_ack,
    /// `basic.get`s that returned a message to be acknowledged.
    get,
    /// `basic.get`s with no-ack.
    get_no_ack,
    /// `basic.get`s on an empty queue.
    get_empty,
    /// Deliveries (of any kind) of messages delivered before.
    redeliver,
    /// Acknowledged deliveries.
    ack,
}

impl MessageStats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl MessageCounts {
    /// RabbitMQ's `deliver_get`: every delivery and get.
    pub fn deliver_get(&self) -> u64 {
        self.deliver + self.deliver_no_ack + self.get + self.get_no_ack
    }
}

/// Objects created and closed since the node started (RabbitMQ's churn rates).
#[derive(Debug, Default)]
pub struct Churn {
    pub connection_created: AtomicU64,
    pub connection_closed: AtomicU64,
    pub channel_created: AtomicU64,
    pub channel_closed: AtomicU64,
    pub queue_declared: AtomicU64,
    pub queue_created: AtomicU64,
    pub queue_deleted: AtomicU64,
    /// Counters of deleted queues, so the node's sums over queues never go down. A queue's
    /// counters move here under the write side of `retiring`; a scrape walks the queues under
    /// its read side, and sees each queue's counters exactly once.
    pub retired_queues: MessageStats,
    pub retiring: parking_lot::RwLock<()>,
}

/// A reading of [`Churn`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChurnCounts {
    pub connection_created: u64,
    pub connection_closed: u64,
    pub channel_created: u64,
    pub channel_closed: u64,
    pub queue_declared: u64,
    pub queue_created: u64,
    pub queue_deleted: u64,
}

impl Churn {
    pub fn read(&self) -> ChurnCounts {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ChurnCounts {
            connection_created: r(&self.connection_created),
            connection_closed: r(&self.connection_closed),
            channel_created: r(&self.channel_created),
            channel_closed: r(&self.channel_closed),
            queue_declared: r(&self.queue_declared),
            queue_created: r(&self.queue_created),
            queue_deleted: r(&self.queue_deleted),
        }
    }
}

impl ChurnCounts {
    pub fn fields(&self) -> [(&'static str, u64); 7] {
        [
            ("channel_closed", self.channel_closed),
            ("channel_created", self.channel_created),
            ("connection_closed", self.connection_closed),
            ("connection_created", self.connection_created),
            ("queue_created", self.queue_created),
            ("queue_declared", self.queue_declared),
            ("queue_deleted", self.queue_deleted),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_add_up_and_absorb() {
        let s = MessageStats::default();
        MessageStats::bump(&s.publish);
        MessageStats::bump(&s.deliver);
        MessageStats::bump(&s.get_no_ack);
        let mut total = s.read();
        total += s.read();
        assert_eq!(total.publish, 2);
        assert_eq!(total.deliver_get(), 4);
        let node = MessageStats::default();
        node.absorb(&total);
        assert_eq!(node.read(), total);
        assert!(total.fields().contains(&("publish", 2)));
    }
}
