//! Single active consumer (`x-single-active-consumer`) with failover, and delivery limits
//! (`x-delivery-limit`, with `x-delivery-count` and dead-lettering for reason
//! `delivery_limit`). The delivery-limit test uses a quorum queue so that it runs unchanged
//! against RabbitMQ (`WARREN_TEST_AMQP_URL`), where only quorum queues have the limit; Warren
//! applies it to classic queues too.

mod common;

use common::*;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use std::time::Duration;

async fn declare(ch: &Channel, name: &str, durable: bool, arguments: FieldTable) {
    within(
        5,
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable,
                ..QueueDeclareOptions::default()
            },
            arguments,
        ),
    )
    .await
    .expect("queue.declare");
}

async fn publish(ch: &Channel, queue: &str, body: &[u8]) {
    within(
        5,
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        ),
    )
    .await
    .expect("basic.publish");
}

#[tokio::test]
async fn only_the_first_consumer_gets_messages_until_it_goes() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let q = unique("sac");
    declare(
        &ch,
        &q,
        false,
        args(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await;
    let first_ch = within(5, conn.create_channel()).await.unwrap();
    let second_ch = within(5, conn.create_channel()).await.unwrap();
    let mut first = within(
        5,
        first_ch.basic_consume(
            q.as_str().into(),
            "first".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    let mut second = within(
        5,
        second_ch.basic_consume(
            q.as_str().into(),
            "second".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    for i in 0..6 {
        publish(&ch, &q, format!("m{i}").as_bytes()).await;
    }
    for i in 0..6 {
        let d = next_delivery(&mut first).await;
        assert_eq!(d.data, format!("m{i}").as_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    no_delivery(&mut second, 200).await;
    // The active consumer goes, with a message unacknowledged: the next one takes over and
    // gets it back first.
    publish(&ch, &q, b"held").await;
    let held = next_delivery(&mut first).await;
    assert_eq!(held.data, b"held");
    within(
        5,
        first_ch.basic_cancel("first".into(), BasicCancelOptions::default()),
    )
    .await
    .unwrap();
    within(5, first_ch.close(200, "bye".into())).await.unwrap();
    let d = next_delivery(&mut second).await;
    assert_eq!((d.data.as_slice(), d.redelivered), (&b"held"[..], true));
    d.ack(BasicAckOptions::default()).await.unwrap();
    publish(&ch, &q, b"after").await;
    let d = next_delivery(&mut second).await;
    assert_eq!(d.data, b"after");
    d.ack(BasicAckOptions::default()).await.unwrap();
}

#[tokio::test]
async fn the_management_api_shows_which_consumer_is_active() {
    let b = TestBroker::start_with(|c| c.stats_interval_ms = 100).await;
    if b.is_external() {
        return;
    }
    let api = common::http::Api::new(&b);
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let q = unique("sac-api");
    declare(
        &ch,
        &q,
        false,
        args(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await;
    // Kept: dropping a lapin consumer cancels it.
    let mut consumers = Vec::new();
    for tag in ["one", "two"] {
        consumers.push(
            within(
                5,
                ch.basic_consume(
                    q.as_str().into(),
                    tag.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await
            .unwrap(),
        );
    }
    let path = format!("/api/queues/%2F/{q}");
    let mut queue = api.json(&path).await;
    for _ in 0..50 {
        if queue["consumers"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        queue = api.json(&path).await;
    }
    assert_eq!(queue["single_active_consumer_tag"], "one", "{queue}");
    let listed = api.json("/api/consumers").await;
    let status = |tag: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["consumer_tag"] == tag && c["queue"]["name"] == q.as_str())
            .map(|c| (c["active"].clone(), c["activity_status"].clone()))
            .unwrap()
    };
    assert_eq!(status("one"), (true.into(), "single_active".into()));
    assert_eq!(status("two"), (false.into(), "waiting".into()));
}

/// The next message of `queue` (basic.get, no-ack), polled for until it arrives.
async fn get_eventually(ch: &Channel, queue: &str) -> lapin::message::BasicGetMessage {
    loop {
        if let Some(m) = within(
            5,
            ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .unwrap()
        {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_message_returned_past_its_delivery_limit_is_dead_lettered() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let (q, dlq) = (unique("limit"), unique("limit-dlq"));
    declare(&ch, &dlq, false, FieldTable::default()).await;
    declare(
        &ch,
        &q,
        true,
        args(&[
            ("x-queue-type", text("quorum")),
            ("x-delivery-limit", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&dlq)),
        ]),
    )
    .await;
    publish(&ch, &q, b"poison").await;
    let mut consumer = consume(&ch, &q, BasicConsumeOptions::default()).await;
    let mut counts = Vec::new();
    for _ in 0..3 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(d.data, b"poison");
        counts.push(
            d.properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-delivery-count").cloned()),
        );
        d.nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    }
    // Delivered three times (the limit is two returns), then dead-lettered.
    no_delivery(&mut consumer, 300).await;
    let count = |v: &Option<AMQPValue>| match v {
        Some(AMQPValue::LongLongInt(n)) => Some(*n),
        Some(AMQPValue::LongInt(n)) => Some(i64::from(*n)),
        Some(AMQPValue::ShortShortUInt(n)) => Some(i64::from(*n)),
        _ => None,
    };
    assert_eq!(count(&counts[1]), Some(1));
    assert_eq!(count(&counts[2]), Some(2));
    let dead = get_eventually(&ch, &dlq).await;
    assert_eq!(dead.delivery.data, b"poison");
    let deaths = match dead
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death").cloned())
    {
        Some(AMQPValue::FieldArray(a)) => a,
        other => panic!("no x-death: {other:?}"),
    };
    let reason = match &deaths.as_slice()[0] {
        AMQPValue::FieldTable(t) => t.inner().get("reason").cloned(),
        other => panic!("{other:?}"),
    };
    assert_eq!(reason, Some(text("delivery_limit")));
}

#[tokio::test]
async fn a_delivery_left_unacknowledged_past_the_consumer_timeout_closes_its_channel() {
    let b = TestBroker::start_with(|c| c.consumer_timeout = 400).await;
    if b.is_external() {
        return;
    }
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let q = unique("slow");
    declare(&ch, &q, false, FieldTable::default()).await;
    publish(&ch, &q, b"forgotten").await;
    let consumer_ch = within(5, conn.create_channel()).await.unwrap();
    let id = consumer_ch.id();
    let mut closed = errors(&conn);
    let mut consumer = consume(&consumer_ch, &q, BasicConsumeOptions::default()).await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.data, b"forgotten");
    let (code, text) = closed.next().await;
    assert_eq!(code, 406);
    assert_eq!(
        text,
        format!(
            "PRECONDITION_FAILED - delivery acknowledgement on channel {id} timed out. Timeout value used: 400 ms. This timeout value can be configured, see consumers doc guide to learn more"
        )
    );
    // The delivery went back to the queue; the connection and its other channels carry on.
    let again = within(
        5,
        ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .unwrap()
    .expect("the message is back in the queue");
    assert!(again.delivery.redelivered);
    assert!(conn.status().connected());
}

#[tokio::test]
async fn a_queue_consumer_timeout_overrides_the_brokers() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return;
    }
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let (strict, lenient) = (unique("strict"), unique("lenient"));
    declare(
        &ch,
        &strict,
        false,
        args(&[("x-consumer-timeout", AMQPValue::LongInt(300))]),
    )
    .await;
    declare(&ch, &lenient, false, FieldTable::default()).await;
    publish(&ch, &strict, b"s").await;
    publish(&ch, &lenient, b"l").await;
    let lenient_ch = within(5, conn.create_channel()).await.unwrap();
    let mut kept = consume(&lenient_ch, &lenient, BasicConsumeOptions::default()).await;
    let _held = next_delivery(&mut kept).await;
    let strict_ch = within(5, conn.create_channel()).await.unwrap();
    let mut closed = errors(&conn);
    let mut c = consume(&strict_ch, &strict, BasicConsumeOptions::default()).await;
    let _late = next_delivery(&mut c).await;
    let (code, text) = closed.next().await;
    assert_eq!(code, 406, "{text}");
    assert!(text.contains("Timeout value used: 300 ms"), "{text}");
    assert!(
        text.contains(&format!("on channel {} ", strict_ch.id())),
        "{text}"
    );
    // The broker's own timeout (30 minutes) still holds for the other channel.
    closed.none_within(300).await;
    assert!(lenient_ch.status().connected());
}

#[tokio::test]
async fn the_count_of_returns_survives_a_restart() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return; // restarts an in-process broker
    }
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let (q, dlq) = (unique("limit"), unique("limit-dlq"));
    declare(&ch, &dlq, true, FieldTable::default()).await;
    declare(
        &ch,
        &q,
        true,
        args(&[
            ("x-delivery-limit", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&dlq)),
        ]),
    )
    .await;
    let confirm = within(
        5,
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions::default(),
            b"poison",
            BasicProperties::default().with_delivery_mode(2),
        ),
    )
    .await
    .unwrap();
    within(5, confirm).await.unwrap();
    let get = |ch: Channel, q: String| async move {
        within(
            5,
            ch.basic_get(q.as_str().into(), BasicGetOptions::default()),
        )
        .await
        .unwrap()
        .expect("a message")
    };
    // Returned twice: the limit is reached, not passed.
    for _ in 0..2 {
        let m = get(ch.clone(), q.clone()).await;
        m.delivery
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .unwrap();
    }
    drop(ch);
    drop(conn);
    let b = b.restart().await;
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let m = get(ch.clone(), q.clone()).await;
    let count = m
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count").cloned());
    assert_eq!(
        count,
        Some(AMQPValue::LongLongInt(2)),
        "the count came back"
    );
    assert!(m.delivery.redelivered);
    // One more return passes the limit, as it would have without the restart.
    m.delivery
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    let dead = get_eventually(&ch, &dlq).await;
    assert_eq!(dead.delivery.data, b"poison");
    assert_eq!(ready_count(&ch, &q).await, 0);
    b.stop().await;
}
