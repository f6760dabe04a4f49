//! Publisher flow control: a publisher that outruns the consumers of a queue is held to their
//! pace once the queue's backlog spills to disk, and shows as `flow`; consumers that stop
//! taking, or that share the publisher's connection, never hold it. Warren-only: these look
//! inside the in-process broker.

mod common;

use common::*;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use warren_broker::broker::connections::ConnectionState;

/// Messages a queue keeps in memory in these tests.
const WINDOW: usize = 20;
const MESSAGES: usize = 1500;
const BODY: usize = 1024;

async fn broker(flow_control: bool) -> TestBroker {
    TestBroker::start_with(|c| {
        c.queue_window_messages = WINDOW;
        c.flow_control = flow_control;
    })
    .await
}

async fn channel(conn: &Connection) -> Channel {
    within(5, conn.create_channel()).await.expect("channel")
}

async fn declare(ch: &Channel, name: &str) {
    within(
        5,
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare");
}

/// A consumer that takes one message at a time and acks it after `pause`; it counts what it
/// took.
async fn slow_consumer(ch: Channel, queue: &str, pause: Duration) -> Arc<AtomicU64> {
    within(5, ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = consume(&ch, queue, BasicConsumeOptions::default()).await;
    let taken = Arc::new(AtomicU64::new(0));
    let count = taken.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            tokio::time::sleep(pause).await;
            if d.ack(BasicAckOptions::default()).await.is_err() {
                break;
            }
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    taken
}

/// Publishes `MESSAGES` bodies of `BODY` bytes to `queue` with confirms, and waits for them.
async fn publish_all(ch: &Channel, queue: &str, secs: u64) {
    publish_all_to(ch, "", queue, secs).await;
}

/// Publishes `MESSAGES` bodies of `BODY` bytes through `exchange` with confirms, and waits
/// for them.
async fn publish_all_to(ch: &Channel, exchange: &str, key: &str, secs: u64) {
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let body = vec![b'x'; BODY];
    within(secs, async {
        let mut confirms = Vec::with_capacity(MESSAGES);
        for _ in 0..MESSAGES {
            confirms.push(
                ch.basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default(),
                )
                .await
                .expect("publish"),
            );
        }
        for c in confirms {
            assert!(c.await.expect("confirm").is_ack());
        }
    })
    .await;
}

/// What a sampler saw while it ran: the longest ready backlog of the queue and whether any
/// connection showed `flow`.
struct Seen {
    max_ready: Arc<AtomicU64>,
    flow: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

fn sample(b: &TestBroker, queue: &str) -> Seen {
    let broker = b.broker().clone();
    let queue = queue.to_owned();
    let seen = Seen {
        max_ready: Arc::new(AtomicU64::new(0)),
        flow: Arc::new(AtomicBool::new(false)),
        stop: Arc::new(AtomicBool::new(false)),
    };
    let (max_ready, flow, stop) = (seen.max_ready.clone(), seen.flow.clone(), seen.stop.clone());
    tokio::spawn(async move {
        let q = broker
            .vhost("/")
            .and_then(|v| v.queue(&queue))
            .expect("queue");
        // Bounded: at most 60 s of samples.
        for _ in 0..12_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            max_ready.fetch_max(q.lengths().ready, Ordering::Relaxed);
            if broker
                .connections
                .list()
                .iter()
                .any(|c| c.state() == ConnectionState::Flow)
            {
                flow.store(true, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    seen
}

impl Seen {
    fn finish(self) -> (u64, bool) {
        self.stop.store(true, Ordering::Relaxed);
        (
            self.max_ready.load(Ordering::Relaxed),
            self.flow.load(Ordering::Relaxed),
        )
    }
}

/// Waits until the consumer has taken every message.
async fn all_taken(taken: &AtomicU64) {
    within(60, async {
        while taken.load(Ordering::Relaxed) < MESSAGES as u64 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// A publisher sends `MESSAGES` to a new queue as fast as it can while a consumer on another
/// connection takes them one by one. Returns the longest backlog seen and whether a
/// connection was shown in `flow`.
async fn fast_publisher_slow_consumer(b: &TestBroker, prefix: &str) -> (u64, bool) {
    let queue = unique(prefix);
    let publisher = b.connect().await;
    let ch = channel(&publisher).await;
    declare(&ch, &queue).await;
    let consumer_conn = b.connect().await;
    let taken = slow_consumer(
        channel(&consumer_conn).await,
        &queue,
        Duration::from_millis(1),
    )
    .await;
    let seen = sample(b, &queue);
    publish_all(&ch, &queue, 60).await;
    all_taken(&taken).await;
    seen.finish()
}

#[tokio::test]
async fn a_publisher_is_held_to_the_pace_of_active_consumers_once_the_backlog_pages() {
    let b = broker(true).await;
    if b.is_external() {
        return;
    }
    let (max_ready, flow) = fast_publisher_slow_consumer(&b, "flow").await;
    assert!(flow, "the publisher was never shown in flow");
    // Without flow control the backlog would reach most of the 1,500 messages (the next
    // test); held, it stays near the window plus what one read of the socket brings in
    // (64 KiB, ~60 of these messages) per publishing turn.
    assert!(
        max_ready < 400,
        "backlog reached {max_ready} messages despite flow control"
    );
    // The management API names the state as RabbitMQ does; once the consumer caught up the
    // publisher runs again.
    let http = http::Api::new(&b);
    let conns = http.json("/api/connections").await;
    let states: Vec<&str> = conns
        .as_array()
        .expect("connections")
        .iter()
        .map(|c| c["state"].as_str().expect("state"))
        .collect();
    assert_eq!(states, ["running", "running"]);
    b.stop().await;
}

#[tokio::test]
async fn without_flow_control_the_backlog_grows_on_disk() {
    let b = broker(false).await;
    if b.is_external() {
        return;
    }
    let (max_ready, flow) = fast_publisher_slow_consumer(&b, "noflow").await;
    assert!(!flow, "flow control is off");
    assert!(
        max_ready > 1000,
        "the publisher outran the consumer, so the backlog should have grown (max {max_ready})"
    );
    b.stop().await;
}

#[tokio::test]
async fn consumers_that_stop_taking_do_not_hold_the_publisher() {
    let b = broker(true).await;
    if b.is_external() {
        return;
    }
    let queue = unique("stalled");
    let publisher = b.connect().await;
    let ch = channel(&publisher).await;
    declare(&ch, &queue).await;
    // A consumer that takes one message and never acks it.
    let consumer_conn = b.connect().await;
    let cch = channel(&consumer_conn).await;
    within(5, cch.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut stuck = consume(&cch, &queue, BasicConsumeOptions::default()).await;
    // The backlog goes to disk, but the consumer takes nothing more, so nothing holds the
    // publisher.
    let seen = sample(&b, &queue);
    publish_all(&ch, &queue, 20).await;
    let _first = next_delivery(&mut stuck).await;
    let (_, flow) = seen.finish();
    assert!(!flow, "a consumer that takes nothing held the publisher");
    assert_eq!(ready_count(&ch, &queue).await, MESSAGES as u32 - 1);
    b.stop().await;
}

#[tokio::test]
async fn a_connection_is_never_held_for_its_own_consumers() {
    let b = broker(true).await;
    if b.is_external() {
        return;
    }
    let queue = unique("own");
    let conn = b.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, &queue).await;
    // The consumer is on the publisher's connection: holding the connection would also stop
    // its acks from being read.
    let taken = slow_consumer(channel(&conn).await, &queue, Duration::from_millis(1)).await;
    let seen = sample(&b, &queue);
    publish_all(&ch, &queue, 60).await;
    all_taken(&taken).await;
    let (max_ready, flow) = seen.finish();
    assert!(!flow, "a connection was held for its own consumer");
    assert!(max_ready > WINDOW as u64, "the backlog should have paged");
    b.stop().await;
}

#[tokio::test]
async fn every_queue_a_publish_reaches_is_looked_at() {
    let b = broker(true).await;
    if b.is_external() {
        return;
    }
    // A fanout to two queues: the first is consumed on the publishing connection (it can
    // never hold it), the second by a slow consumer elsewhere (it must).
    let (own, other) = (unique("fan-own"), unique("fan-other"));
    let exchange = unique("fan");
    let conn = b.connect().await;
    let ch = channel(&conn).await;
    within(
        5,
        ch.exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.declare");
    for q in [&own, &other] {
        declare(&ch, q).await;
        within(
            5,
            ch.queue_bind(
                q.as_str().into(),
                exchange.as_str().into(),
                "".into(),
                lapin::options::QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .expect("queue.bind");
    }
    let own_taken = slow_consumer(channel(&conn).await, &own, Duration::from_millis(1)).await;
    let consumer_conn = b.connect().await;
    let other_taken = slow_consumer(
        channel(&consumer_conn).await,
        &other,
        Duration::from_millis(1),
    )
    .await;
    let seen = sample(&b, &other);
    publish_all_to(&ch, &exchange, "", 60).await;
    all_taken(&other_taken).await;
    all_taken(&own_taken).await;
    let (max_ready, flow) = seen.finish();
    assert!(flow, "the second queue should have held the publisher");
    assert!(
        max_ready < 400,
        "the second queue's backlog reached {max_ready} despite flow control"
    );
    b.stop().await;
}
