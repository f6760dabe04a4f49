//! Rates for the management API: every statistics interval (RabbitMQ's
//! `collect_statistics_interval`, 5 s by default) the sampler reads the counters of the node,
//! each vhost, queue, connection and channel, and keeps the per-second change since the
//! reading before. Objects that went away are dropped at the next reading.

use crate::broker::Broker;
use crate::broker::queue_ref::QueueRef;
use crate::broker::stats::MessageCounts;
use parking_lot::RwLock;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Named counter values of one object at one moment.
pub type Reading = Vec<(&'static str, u64)>;

#[derive(Debug, Clone)]
struct Entry {
    at: Instant,
    values: Reading,
    rates: Vec<f64>,
}

/// Which object a reading belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Node,
    Vhost(String),
    Queue(String, String),
    Connection(u64),
    Channel(u64, u16),
}

#[derive(Debug, Default)]
pub struct Sampler {
    entries: RwLock<HashMap<Key, Entry>>,
}

/// A message-counter reading with RabbitMQ's derived `deliver_get`.
pub fn counts_reading(c: &MessageCounts) -> Reading {
    let mut r: Reading = c.fields().to_vec();
    r.push(("deliver_get", c.deliver_get()));
    r
}

/// A queue's counters and lengths.
pub fn queue_reading(q: &QueueRef) -> Reading {
    let mut r = counts_reading(&q.message_counts());
    let l = q.lengths();
    let (ready, unacked) = (l.ready, l.unacked);
    r.push(("messages", ready + unacked));
    r.push(("messages_ready", ready));
    r.push(("messages_unacknowledged", unacked));
    r
}

/// The node's counters, lengths and churn.
pub fn node_reading(broker: &Broker) -> Reading {
    let mut r = counts_reading(&broker.connections.totals());
    let (mut ready, mut unacked) = (0, 0);
    for v in broker.vhosts() {
        for q in v.queues() {
            let l = q.lengths();
            ready += l.ready;
            unacked += l.unacked;
        }
    }
    r.push(("messages", ready + unacked));
    r.push(("messages_ready", ready));
    r.push(("messages_unacknowledged", unacked));
    r.extend(broker.churn.read().fields());
    r
}

impl Sampler {
    /// Reads every object's counters and updates the rates.
    pub fn sample(&self, broker: &Broker) {
        let now = Instant::now();
        let mut readings: Vec<(Key, Reading)> = vec![(Key::Node, node_reading(broker))];
        for v in broker.vhosts() {
            let mut vhost: HashMap<&'static str, u64> = HashMap::new();
            for q in v.queues() {
                let r = queue_reading(&q);
                for (k, n) in &r {
                    *vhost.entry(k).or_default() += n;
                }
                readings.push((Key::Queue(v.name.to_string(), q.name().to_owned()), r));
            }
            for c in broker.connections.in_vhost(&v.name) {
                *vhost.entry("recv_oct").or_default() += c.traffic.recv_oct.load(RELAXED);
                *vhost.entry("send_oct").or_default() += c.traffic.send_oct.load(RELAXED);
            }
            let mut r: Reading = vhost.into_iter().collect();
            r.sort_unstable();
            readings.push((Key::Vhost(v.name.to_string()), r));
        }
        for c in broker.connections.list() {
            readings.push((
                Key::Connection(c.id),
                vec![
                    ("recv_oct", c.traffic.recv_oct.load(RELAXED)),
                    ("send_oct", c.traffic.send_oct.load(RELAXED)),
                ],
            ));
            for ch in c.channels() {
                let s = ch.snapshot();
                readings.push((Key::Channel(c.id, s.number), counts_reading(&s.counts)));
            }
        }
        let mut entries = self.entries.write();
        let mut next = HashMap::with_capacity(readings.len());
        for (key, values) in readings {
            let rates = match entries.remove(&key) {
                Some(prev) => rates_between(&prev, now, &values),
                None => vec![0.0; values.len()],
            };
            next.insert(
                key,
                Entry {
                    at: now,
                    values,
                    rates,
                },
            );
        }
        *entries = next;
    }

    /// The per-second rate of `name` for `key`, 0.0 before two readings.
    pub fn rate(&self, key: &Key, name: &str) -> f64 {
        let entries = self.entries.read();
        entries
            .get(key)
            .and_then(|e| {
                e.values
                    .iter()
                    .position(|(n, _)| *n == name)
                    .and_then(|i| e.rates.get(i).copied())
            })
            .unwrap_or(0.0)
    }

    /// Samples every `interval` until the broker's shutdown.
    pub fn spawn(
        self: &Arc<Self>,
        broker: Arc<Broker>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let sampler = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (s, b) = (sampler.clone(), broker.clone());
                // A walk over every queue: off the async workers.
                if tokio::task::spawn_blocking(move || s.sample(&b))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        })
    }

    /// Adds `name` and `name_details: {rate}` to `obj` for each of `names`.
    pub fn put(&self, obj: &mut Map<String, Value>, key: &Key, reading: &Reading, names: &[&str]) {
        for name in names {
            let value = reading
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, v)| *v);
            obj.insert((*name).to_owned(), value.into());
            obj.insert(
                format!("{name}_details"),
                json!({"rate": self.rate(key, name)}),
            );
        }
    }

    /// A `message_stats` object with `names`, or `{}` when none of them has moved yet (as
    /// RabbitMQ shows an object no message has touched).
    pub fn message_stats(&self, key: &Key, reading: &Reading, names: &[&str]) -> Value {
        let mut obj = Map::new();
        if reading.iter().any(|(n, v)| *v > 0 && names.contains(n)) {
            self.put(&mut obj, key, reading, names);
        }
        Value::Object(obj)
    }
}

const RELAXED: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;

fn rates_between(prev: &Entry, now: Instant, values: &Reading) -> Vec<f64> {
    let secs = now.duration_since(prev.at).as_secs_f64();
    values
        .iter()
        .map(|(name, v)| {
            let before = prev
                .values
                .iter()
                .find(|(n, _)| n == name)
                .map_or(*v, |(_, b)| *b);
            if secs <= 0.0 {
                0.0
            } else {
                (*v as f64 - before as f64) / secs
            }
        })
        .collect()
}

/// `message_stats` keys of a queue.
pub const QUEUE_STATS: &[&str] = &[
    "ack",
    "deliver",
    "deliver_get",
    "deliver_no_ack",
    "get",
    "get_empty",
    "get_no_ack",
    "publish",
    "redeliver",
];

/// `message_stats` keys of the node (overview).
pub const NODE_STATS: &[&str] = &[
    "ack",
    "confirm",
    "deliver",
    "deliver_get",
    "deliver_no_ack",
    "drop_unroutable",
    "get",
    "get_empty",
    "get_no_ack",
    "publish",
    "redeliver",
    "return_unroutable",
];

/// `message_stats` keys of a publishing channel.
pub const PUBLISHER_STATS: &[&str] =
    &["confirm", "drop_unroutable", "publish", "return_unroutable"];

/// `message_stats` keys of a consuming channel.
pub const CONSUMER_STATS: &[&str] = &[
    "ack",
    "deliver",
    "deliver_get",
    "deliver_no_ack",
    "get",
    "get_empty",
    "get_no_ack",
    "redeliver",
];

/// Queue-length keys.
pub const LENGTHS: &[&str] = &["messages", "messages_ready", "messages_unacknowledged"];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_changes() {
        let prev = Entry {
            at: Instant::now(),
            values: vec![("publish", 10), ("ack", 5)],
            rates: vec![0.0, 0.0],
        };
        let later = prev.at + Duration::from_secs(2);
        let rates = rates_between(&prev, later, &vec![("publish", 30), ("ack", 5), ("new", 7)]);
        assert_eq!(rates, vec![10.0, 0.0, 0.0]);
    }
}
