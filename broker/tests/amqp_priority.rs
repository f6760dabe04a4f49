//! Priority queues (`x-max-priority`): higher priorities first and first in first out within a
//! priority, priorities above the maximum counted as the maximum, requeued messages back in
//! their place, each priority's head expiring on its own (RabbitMQ looks only at the head of
//! the whole queue), the order kept for backlogs paged to
//! disk and across a restart. With `WARREN_TEST_AMQP_URL` set, the tests that do not look
//! inside the broker run against RabbitMQ too.

mod common;

use common::*;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel};
use std::time::Duration;

async fn channel(b: &TestBroker) -> (lapin::Connection, Channel) {
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    (conn, ch)
}

async fn declare(ch: &Channel, name: &str, durable: bool, extra: &[(&str, AMQPValue)]) {
    let mut pairs = vec![("x-max-priority", AMQPValue::LongInt(5))];
    pairs.extend(extra.iter().cloned());
    within(
        5,
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable,
                ..Default::default()
            },
            args(&pairs),
        ),
    )
    .await
    .expect("queue.declare");
}

async fn publish(ch: &Channel, queue: &str, body: &str, props: BasicProperties) {
    let confirm = within(
        5,
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        ),
    )
    .await
    .expect("publish");
    assert!(within(5, confirm).await.expect("confirm").is_ack());
}

fn with_priority(p: Option<u8>) -> BasicProperties {
    match p {
        Some(p) => BasicProperties::default().with_priority(p),
        None => BasicProperties::default(),
    }
}

/// Takes every ready message with basic.get (no-ack), in the order the queue gives them.
async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = within(
        5,
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get")
    {
        out.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
    }
    out
}

#[tokio::test]
async fn higher_priorities_go_first_and_each_priority_keeps_its_order() {
    let b = TestBroker::start().await;
    let (_conn, ch) = channel(&b).await;
    let q = unique("prio");
    declare(&ch, &q, false, &[]).await;
    // Above the maximum (9 > 5) counts as the maximum; no priority is priority 0.
    let sent = [
        ("a", None),
        ("b", Some(1)),
        ("c", Some(5)),
        ("d", Some(9)),
        ("e", Some(3)),
        ("f", Some(5)),
        ("g", Some(0)),
        ("h", Some(1)),
    ];
    for (body, p) in sent {
        publish(&ch, &q, body, with_priority(p)).await;
    }
    assert_eq!(ready_count(&ch, &q).await, 8);
    assert_eq!(
        drain(&ch, &q).await,
        ["c", "d", "f", "e", "b", "h", "a", "g"]
    );
    // A consumer sees the same order.
    for (body, p) in sent {
        publish(&ch, &q, body, with_priority(p)).await;
    }
    let cch = within(5, _conn.create_channel()).await.unwrap();
    let mut consumer = consume(
        &cch,
        &q,
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..8 {
        got.push(String::from_utf8_lossy(&next_delivery(&mut consumer).await.data).into_owned());
    }
    assert_eq!(got, ["c", "d", "f", "e", "b", "h", "a", "g"]);
    b.stop().await;
}

#[tokio::test]
async fn a_requeued_message_goes_back_to_the_head_of_its_priority() {
    let b = TestBroker::start().await;
    let (conn, ch) = channel(&b).await;
    let q = unique("prio-requeue");
    declare(&ch, &q, false, &[]).await;
    for (body, p) in [("low1", 1), ("high1", 4), ("low2", 1), ("high2", 4)] {
        publish(&ch, &q, body, with_priority(Some(p))).await;
    }
    let cch = within(5, conn.create_channel()).await.unwrap();
    within(5, cch.basic_qos(1, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut consumer = consume(&cch, &q, BasicConsumeOptions::default()).await;
    let first = next_delivery(&mut consumer).await;
    assert_eq!(&first.data[..], b"high1");
    within(
        5,
        first.nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    for _ in 0..4 {
        let d = next_delivery(&mut consumer).await;
        got.push((String::from_utf8_lossy(&d.data).into_owned(), d.redelivered));
        within(5, d.ack(BasicAckOptions::default())).await.unwrap();
    }
    assert_eq!(
        got,
        [
            ("high1".to_owned(), true),
            ("high2".to_owned(), false),
            ("low1".to_owned(), false),
            ("low2".to_owned(), false),
        ]
    );
    b.stop().await;
}

#[tokio::test]
async fn each_priority_expires_from_its_own_head() {
    let b = TestBroker::start().await;
    let (_conn, ch) = channel(&b).await;
    let q = unique("prio-ttl");
    declare(&ch, &q, false, &[]).await;
    // The high-priority head lives long; the low-priority message behind it (in delivery
    // order) expires on time all the same.
    publish(
        &ch,
        &q,
        "high",
        with_priority(Some(5)).with_expiration("60000".into()),
    )
    .await;
    publish(
        &ch,
        &q,
        "low",
        with_priority(Some(1)).with_expiration("100".into()),
    )
    .await;
    if b.is_external() {
        // RabbitMQ looks only at the head of the whole queue: the expired message is still
        // counted, and dropped when the queue reaches it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(drain(&ch, &q).await, ["high"]);
        return;
    }
    let mut left = 2;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = ready_count(&ch, &q).await;
        if left == 1 {
            break;
        }
    }
    assert_eq!(left, 1, "the low-priority message should have expired");
    assert_eq!(drain(&ch, &q).await, ["high"]);
    b.stop().await;
}

#[tokio::test]
async fn a_length_limit_drops_from_the_head_the_next_delivery_would_take() {
    let b = TestBroker::start().await;
    let (_conn, ch) = channel(&b).await;
    let q = unique("prio-maxlen");
    declare(&ch, &q, false, &[("x-max-length", AMQPValue::LongInt(3))]).await;
    for (body, p) in [("a", 1), ("b", 5), ("c", 1), ("d", 3)] {
        publish(&ch, &q, body, with_priority(Some(p))).await;
    }
    // Four messages for three places: the head ("b", the highest priority) goes, as in
    // RabbitMQ.
    assert_eq!(drain(&ch, &q).await, ["d", "a", "c"]);
    b.stop().await;
}

#[tokio::test]
async fn a_paged_backlog_keeps_the_priority_order() {
    // A small window: most of each priority's backlog is paged to disk.
    let b = TestBroker::start_with(|c| c.queue_window_messages = 32).await;
    if b.is_external() {
        return;
    }
    let (_conn, ch) = channel(&b).await;
    let q = unique("prio-paged");
    declare(&ch, &q, false, &[]).await;
    let n = 1200;
    let mut expected: Vec<(u8, usize)> = Vec::new();
    for i in 0..n {
        // A fixed, well-mixed pattern of priorities 0..=6 (6 counts as 5).
        let p = ((i * 7 + i / 5) % 7) as u8;
        publish(&ch, &q, &format!("{i}"), with_priority(Some(p))).await;
        expected.push((p.min(5), i));
    }
    let queue = b.broker().vhost("/").unwrap().queue(&q).unwrap();
    let lengths = queue.lengths();
    assert_eq!(lengths.ready, n as u64);
    // Six levels share the 32-message window, at least 16 each.
    assert!(
        lengths.in_memory <= 6 * 16,
        "{} messages in memory",
        lengths.in_memory
    );
    expected.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let want: Vec<String> = expected.iter().map(|(_, i)| i.to_string()).collect();
    assert_eq!(drain(&ch, &q).await, want);
    b.stop().await;
}

#[tokio::test]
async fn persistent_messages_keep_their_priority_order_across_a_restart() {
    let b = TestBroker::start_with(|c| c.queue_window_messages = 16).await;
    if b.is_external() {
        return;
    }
    let (conn, ch) = channel(&b).await;
    let q = "prio-durable";
    declare(&ch, q, true, &[]).await;
    let mut expected = Vec::new();
    for i in 0..200usize {
        let p = (i % 4) as u8 * 2; // 0, 2, 4, 6 (6 counts as 5)
        publish(
            &ch,
            q,
            &format!("{i}"),
            with_priority(Some(p)).with_delivery_mode(2),
        )
        .await;
        expected.push((p.min(5), i));
    }
    drop(ch);
    drop(conn);
    let b = b.restart().await;
    let (_conn, ch) = channel(&b).await;
    assert_eq!(ready_count(&ch, q).await, 200);
    expected.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let want: Vec<String> = expected.iter().map(|(_, i)| i.to_string()).collect();
    assert_eq!(drain(&ch, q).await, want);
    // Deleting the queue deletes every level's store: a new queue of the same name is empty,
    // also after another restart.
    declare(&ch, q, true, &[]).await;
    publish(&ch, q, "x", with_priority(Some(4)).with_delivery_mode(2)).await;
    within(5, ch.queue_delete(q.into(), Default::default()))
        .await
        .unwrap();
    declare(&ch, q, true, &[]).await;
    let b = b.restart().await;
    let (_conn, ch) = channel(&b).await;
    assert_eq!(ready_count(&ch, q).await, 0);
    b.stop().await;
}
