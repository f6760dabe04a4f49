//! Queue micro-benchmarks, without I/O: a non-durable `Queue` (`Queue::in_memory`) and a trivial
//! `DeliverySink`.
//!
//! * `backlog`: publish N messages to a queue with no consumer, then `get` them one by one
//!   (manual ack) and `settle` them, one ack per message or one per 100 (`multiple=true`).
//!   1,000 messages fit in the queue's in-memory window (2,048 messages by default); of 10,000,
//!   the ones beyond the window are paged to the queue's store (here the in-memory store that
//!   `Queue::in_memory` uses) and read back in batches.
//! * `dispatch`: publish 10,000 messages to a queue with one consumer whose sink accepts
//!   everything, so each publish goes straight through the dispatch path. No-ack, and manual
//!   ack where the sink keeps what it was given and the deliveries are settled in runs of 100.
//!
//! Each message is a fresh `Arc<Message>` (as every publish makes one) whose body shares one
//! 16-byte buffer. Throughput is in messages.
//!
//! `cargo bench -p warren-broker --bench queue`

use amq_protocol::types::FieldTable;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use parking_lot::Mutex;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use warren_broker::broker::message::Message;
use warren_broker::broker::queue::{Consumer, Delivered, DeliverySink, Enqueued, Queue, QueueSpec};
use warren_broker::broker::queue_ref::QueueRef;
use warren_broker::broker::ready::QueuedMessage;

const N: usize = 10_000;
const ACK_EVERY: usize = 100;

fn queue() -> QueueRef {
    QueueRef::from(Queue::in_memory(
        QueueSpec {
            name: "bench".into(),
            durable: false,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
        },
        "/".into(),
        None,
    ))
}

fn message(body: &Bytes) -> Arc<Message> {
    Arc::new(Message {
        exchange: "".into(),
        routing_key: "bench".into(),
        properties: Bytes::from_static(&[0, 0]),
        body: body.clone(),
        persistent: false,
        arrived_ms: 0,
        expires_at_ms: None,
    })
}

/// Takes every message. With `keep`, remembers the deliveries (as a channel remembers unacked
/// ones) so that they can be settled; otherwise drops them (no-ack).
struct Sink {
    keep: bool,
    unacked: Mutex<Vec<Delivered>>,
}

impl DeliverySink for Sink {
    fn offer(
        &self,
        queue: &QueueRef,
        consumer: &Arc<Consumer>,
        msg: QueuedMessage,
    ) -> Result<(), QueuedMessage> {
        if self.keep {
            self.unacked.lock().push(Delivered {
                delivered_at_ms: 0,
                queue: queue.clone(),
                consumer: Some(consumer.clone()),
                msg,
            });
        } else {
            black_box(msg);
        }
        Ok(())
    }

    fn cancelled(&self, _consumer: &Arc<Consumer>) {}
}

fn with_consumer(no_ack: bool) -> (QueueRef, Arc<Sink>) {
    let q = queue();
    let sink = Arc::new(Sink {
        keep: !no_ack,
        unacked: Mutex::new(Vec::with_capacity(N)),
    });
    let consumer = Arc::new(Consumer::new(
        "amq.ctag-bench".into(),
        no_ack,
        false,
        0,
        0,
        sink.clone(),
        FieldTable::default(),
    ));
    q.add_consumer(consumer, || ()).expect("consumer added");
    (q, sink)
}

fn backlog(c: &mut Criterion) {
    let body = Bytes::from(vec![0x5a; 16]);
    let mut group = c.benchmark_group("queue/backlog");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    let cases = [
        ("1k_ack_each", 1_000, 1),
        ("10k_ack_each", N, 1),
        ("10k_ack_100", N, ACK_EVERY),
    ];
    for (name, n, ack_every) in cases {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(name, |b| {
            b.iter_batched(
                queue,
                |q| {
                    for _ in 0..n {
                        let r = q.publish(message(&body));
                        debug_assert!(!matches!(r, Enqueued::Rejected | Enqueued::Deleted));
                    }
                    let mut run = Vec::with_capacity(ack_every);
                    while let Ok(Some((msg, _left))) = q.get(false) {
                        run.push(Delivered {
                            delivered_at_ms: 0,
                            queue: q.clone(),
                            consumer: None,
                            msg,
                        });
                        if run.len() == ack_every {
                            q.settle(&run, true);
                            run.clear();
                        }
                    }
                    q.settle(&run, true);
                    debug_assert_eq!(q.unacked_count(), 0);
                    q
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

fn dispatch(c: &mut Criterion) {
    let body = Bytes::from(vec![0x5a; 16]);
    let mut group = c.benchmark_group("queue/dispatch_1_consumer");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .throughput(Throughput::Elements(N as u64));
    group.bench_function("no_ack", |b| {
        b.iter_batched(
            || with_consumer(true),
            |(q, sink)| {
                for _ in 0..N {
                    q.publish(message(&body));
                }
                debug_assert_eq!(q.message_count(), 0);
                (q, sink)
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("manual_ack_100", |b| {
        b.iter_batched(
            || with_consumer(false),
            |(q, sink)| {
                for i in 1..=N {
                    q.publish(message(&body));
                    if i % ACK_EVERY == 0 {
                        let run = std::mem::take(&mut *sink.unacked.lock());
                        q.settle(&run, true);
                    }
                }
                debug_assert_eq!(q.unacked_count(), 0);
                (q, sink)
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, backlog, dispatch);
criterion_main!(benches);
