//! Consuming and acknowledging: qos, consumers (no-ack, exclusive, tags, priorities,
//! cancellation), basic.get, ack/nack/reject, redelivery and recover.

mod common;

use common::*;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions, BasicRecoverOptions, BasicRejectOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};

async fn channel(conn: &Connection) -> Channel {
    within(5, conn.create_channel()).await.expect("channel")
}

/// Publishes `bodies` to `queue` from a confirm channel and waits for the confirms, so they are
/// all enqueued, in order, when this returns.
async fn fill(conn: &Connection, queue: &str, bodies: &[&str]) {
    let ch = channel(conn).await;
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    for b in bodies {
        publish_to(&ch, queue, b.as_bytes()).await;
    }
    within(5, ch.wait_for_confirms()).await.expect("confirms");
    let _ = ch.close(200, "OK".into()).await;
}

fn body(d: &Delivery) -> String {
    String::from_utf8(d.data.clone()).unwrap()
}

/// Receives `n` deliveries.
async fn take(consumer: &mut Consumer, n: usize) -> Vec<Delivery> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(next_delivery(consumer).await);
    }
    out
}

async fn get(ch: &Channel, queue: &str, no_ack: bool) -> Option<lapin::message::BasicGetMessage> {
    within(5, ch.basic_get(queue.into(), BasicGetOptions { no_ack }))
        .await
        .expect("basic.get")
}

/// Bodies of every ready message of `queue`, in order, removing them.
async fn drain(ch: &Channel, queue: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    while let Some(m) = get(ch, queue, true).await {
        out.push((body(&m.delivery), m.delivery.redelivered));
    }
    out
}

async fn qos(ch: &Channel, prefetch: u16, global: bool) {
    within(5, ch.basic_qos(prefetch, BasicQosOptions { global }))
        .await
        .expect("basic.qos");
}

#[tokio::test]
async fn prefetch_limits_unacked_deliveries_per_consumer() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2", "3", "4", "5"]).await;
    qos(&ch, 2, false).await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    let first = take(&mut consumer, 2).await;
    assert_eq!(first.iter().map(body).collect::<Vec<_>>(), ["1", "2"]);
    no_delivery(&mut consumer, 300).await;
    within(5, first[0].acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let third = next_delivery(&mut consumer).await;
    assert_eq!(body(&third), "3");
    no_delivery(&mut consumer, 300).await;
}

#[tokio::test]
async fn per_consumer_prefetch_applies_to_each_consumer_separately() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let qa = exclusive_queue(&ch, "").await;
    let qb = exclusive_queue(&ch, "").await;
    fill(&conn, &qa, &["a1", "a2", "a3"]).await;
    fill(&conn, &qb, &["b1", "b2", "b3"]).await;
    qos(&ch, 2, false).await;
    let mut ca = consume(&ch, &qa, Default::default()).await;
    let mut cb = consume(&ch, &qb, Default::default()).await;
    assert_eq!(
        take(&mut ca, 2).await.iter().map(body).collect::<Vec<_>>(),
        ["a1", "a2"]
    );
    assert_eq!(
        take(&mut cb, 2).await.iter().map(body).collect::<Vec<_>>(),
        ["b1", "b2"]
    );
    no_delivery(&mut ca, 300).await;
    no_delivery(&mut cb, 100).await;
}

#[tokio::test]
async fn global_prefetch_is_shared_by_the_consumers_of_a_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let qa = exclusive_queue(&ch, "").await;
    let qb = exclusive_queue(&ch, "").await;
    fill(&conn, &qa, &["a1", "a2", "a3"]).await;
    fill(&conn, &qb, &["b1", "b2", "b3"]).await;
    qos(&ch, 3, true).await;
    let mut ca = consume(&ch, &qa, Default::default()).await;
    let mut cb = consume(&ch, &qb, Default::default()).await;
    // Three unacked deliveries in all, however they are split between the two consumers.
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(1500);
    while tokio::time::Instant::now() < deadline {
        tokio::select! {
            Some(Ok(d)) = ca.next() => got.push(d),
            Some(Ok(d)) = cb.next() => got.push(d),
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    assert_eq!(
        got.len(),
        3,
        "deliveries: {:?}",
        got.iter().map(body).collect::<Vec<_>>()
    );
    within(5, got[0].acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let more = tokio::select! {
        Some(Ok(d)) = ca.next() => d,
        Some(Ok(d)) = cb.next() => d,
        _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => panic!("no delivery after ack"),
    };
    got.push(more);
    no_delivery(&mut ca, 300).await;
    no_delivery(&mut cb, 100).await;
}

#[tokio::test]
async fn no_ack_consumer_gets_messages_without_acknowledging() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    qos(&ch, 1, false).await;
    let mut consumer = consume(
        &ch,
        &q,
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    fill(&conn, &q, &["1", "2", "3"]).await;
    // Prefetch does not apply to no-ack consumers.
    let got = take(&mut consumer, 3).await;
    assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["1", "2", "3"]);
    within(5, ch.basic_cancel(consumer.tag(), Default::default()))
        .await
        .expect("cancel");
    within(5, ch.close(200, "OK".into())).await.expect("close");
    // Nothing comes back when the channel closes: they were acknowledged on delivery.
    let ch2 = channel(&conn).await;
    assert_eq!(ready_count(&ch2, &q).await, 0);
}

#[tokio::test]
async fn server_generates_amq_ctag_consumer_tags() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let c1 = consume(&ch, &q, Default::default()).await;
    let c2 = consume(&ch, &q, Default::default()).await;
    for tag in [c1.tag(), c2.tag()] {
        let suffix = tag
            .as_str()
            .strip_prefix("amq.ctag-")
            .unwrap_or_else(|| panic!("{tag:?} starts with amq.ctag-"));
        assert_eq!(suffix.len(), 22, "{tag:?}");
    }
    assert_ne!(c1.tag(), c2.tag());
    // The generated tag names the consumer: cancelling by it works.
    let mut c1 = c1;
    within(5, ch.basic_cancel(c1.tag(), Default::default()))
        .await
        .expect("cancel by generated tag");
    assert!(within(5, c1.next()).await.is_none());
    let mut c2 = c2;
    fill(&conn, &q, &["x"]).await;
    assert_eq!(body(&next_delivery(&mut c2).await), "x");
}

#[tokio::test]
async fn client_chosen_consumer_tag_is_used() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let consumer = within(
        5,
        ch.basic_consume(
            q.as_str().into(),
            "my-tag".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume");
    assert_eq!(consumer.tag().as_str(), "my-tag");
}

#[tokio::test]
async fn reusing_a_consumer_tag_on_a_channel_closes_the_connection() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let _first = within(
        5,
        ch.basic_consume(
            q.as_str().into(),
            "dup".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume");
    let res = within(
        5,
        ch.basic_consume(
            q.as_str().into(),
            "dup".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res.map(|_| ()),
        530,
        "NOT_ALLOWED - attempt to reuse consumer tag 'dup'",
    );
}

#[tokio::test]
async fn exclusive_consume_is_refused_when_the_queue_has_a_consumer() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, &unique("q-excl-consume")).await;
    let _plain = consume(&ch, &q, Default::default()).await;
    let ch2 = channel(&conn).await;
    let res = within(
        5,
        ch2.basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res.map(|_| ()),
        403,
        &format!("ACCESS_REFUSED - queue '{q}' in vhost '/' in exclusive use"),
    );
}

#[tokio::test]
async fn consume_is_refused_when_the_queue_has_an_exclusive_consumer() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, &unique("q-has-excl")).await;
    let _excl = consume(
        &ch,
        &q,
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await;
    let ch2 = channel(&conn).await;
    let res = within(
        5,
        ch2.basic_consume(
            q.as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res.map(|_| ()),
        403,
        &format!("ACCESS_REFUSED - queue '{q}' in vhost '/' in exclusive use"),
    );
}

#[tokio::test]
async fn cancelling_an_exclusive_consumer_lets_others_consume() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let excl = consume(
        &ch,
        &q,
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await;
    within(5, ch.basic_cancel(excl.tag(), Default::default()))
        .await
        .expect("cancel");
    let mut other = consume(&ch, &q, Default::default()).await;
    fill(&conn, &q, &["after"]).await;
    assert_eq!(body(&next_delivery(&mut other).await), "after");
}

#[tokio::test]
async fn higher_priority_consumer_gets_messages_while_it_has_credit() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let q_ch = channel(&conn).await;
    let q = exclusive_queue(&q_ch, "").await;
    let high_ch = channel(&conn).await;
    let low_ch = channel(&conn).await;
    qos(&high_ch, 2, false).await;
    let mut args = FieldTable::default();
    args.insert("x-priority".into(), AMQPValue::LongInt(10));
    let mut low = within(
        5,
        low_ch.basic_consume(
            q.as_str().into(),
            "low".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume low");
    let mut high = within(
        5,
        high_ch.basic_consume(q.as_str().into(), "high".into(), Default::default(), args),
    )
    .await
    .expect("consume high");
    fill(&conn, &q, &["1", "2", "3", "4", "5"]).await;
    let h = take(&mut high, 2).await;
    assert_eq!(h.iter().map(body).collect::<Vec<_>>(), ["1", "2"]);
    let l = take(&mut low, 3).await;
    assert_eq!(l.iter().map(body).collect::<Vec<_>>(), ["3", "4", "5"]);
    no_delivery(&mut high, 200).await;
    // With credit again, the high-priority consumer gets the next message.
    within(5, h[0].acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    // A synchronous round trip on the same channel, so the ack is processed before "6".
    qos(&high_ch, 2, false).await;
    fill(&conn, &q, &["6"]).await;
    assert_eq!(body(&next_delivery(&mut high).await), "6");
    no_delivery(&mut low, 200).await;
}

#[tokio::test]
async fn client_cancel_stops_deliveries() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    fill(&conn, &q, &["before"]).await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(body(&d), "before");
    within(
        5,
        ch.basic_cancel(consumer.tag(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel");
    assert!(within(5, consumer.next()).await.is_none(), "stream ends");
    fill(&conn, &q, &["after"]).await;
    assert_eq!(ready_count(&ch, &q).await, 1, "stays in the queue");
    // The delivery made before the cancel can still be acknowledged.
    within(5, d.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack after cancel");
    within(5, ch.close(200, "OK".into())).await.expect("close");
    let ch2 = channel(&conn).await;
    assert_eq!(drain(&ch2, &q).await, [("after".to_string(), false)]);
}

#[tokio::test]
async fn cancelling_an_unknown_consumer_tag_is_a_no_op() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    within(5, ch.basic_cancel("no-such-tag".into(), Default::default()))
        .await
        .expect("basic.cancel of an unknown tag");
    assert!(ch.status().connected());
}

#[tokio::test]
async fn deleting_the_queue_sends_basic_cancel_to_its_consumers() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-cancel-notify");
    within(
        5,
        ch.queue_declare(
            name.as_str().into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare");
    let mut consumer = consume(&ch, &name, Default::default()).await;
    let other = broker.connect().await;
    let och = channel(&other).await;
    within(
        5,
        och.queue_delete(name.as_str().into(), Default::default()),
    )
    .await
    .expect("delete");
    let end = within(5, consumer.next()).await;
    assert!(end.is_none(), "consumer cancelled by the server: {end:?}");
    assert!(ch.status().connected(), "the channel stays open");
    exclusive_queue(&ch, "").await;
}

#[tokio::test]
async fn get_returns_the_message_and_the_remaining_count() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2", "3"]).await;
    let m = get(&ch, &q, false).await.expect("get-ok");
    assert_eq!(body(&m.delivery), "1");
    assert_eq!(m.message_count, 2);
    assert!(!m.delivery.redelivered);
    assert_eq!(m.delivery.exchange.as_str(), "");
    assert_eq!(m.delivery.routing_key.as_str(), q);
    within(5, m.delivery.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let m = get(&ch, &q, true).await.expect("get-ok");
    assert_eq!((body(&m.delivery), m.message_count), ("2".to_string(), 1));
    let m = get(&ch, &q, true).await.expect("get-ok");
    assert_eq!((body(&m.delivery), m.message_count), ("3".to_string(), 0));
}

#[tokio::test]
async fn get_on_an_empty_queue_returns_get_empty() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    assert!(get(&ch, &q, false).await.is_none());
    assert!(ch.status().connected());
}

#[tokio::test]
async fn get_on_a_missing_queue_fails_with_not_found() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-missing");
    let res = within(5, ch.basic_get(name.as_str().into(), Default::default())).await;
    assert_amqp_error(
        res.map(|_| ()),
        404,
        &format!("NOT_FOUND - no queue '{name}' in vhost '/'"),
    );
}

#[tokio::test]
async fn ack_removes_the_message() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2"]).await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    let got = take(&mut consumer, 2).await;
    within(5, got[0].acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    drop(consumer);
    within(5, ch.close(200, "OK".into())).await.expect("close");
    // Only the unacked one comes back.
    let ch2 = channel(&conn).await;
    assert_eq!(drain(&ch2, &q).await, [("2".to_string(), true)]);
}

#[tokio::test]
async fn ack_multiple_acknowledges_everything_up_to_the_tag() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2", "3", "4"]).await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    let got = take(&mut consumer, 4).await;
    within(
        5,
        ch.basic_ack(got[2].delivery_tag, BasicAckOptions { multiple: true }),
    )
    .await
    .expect("ack multiple");
    drop(consumer);
    within(5, ch.close(200, "OK".into())).await.expect("close");
    let ch2 = channel(&conn).await;
    assert_eq!(drain(&ch2, &q).await, [("4".to_string(), true)]);
}

#[tokio::test]
async fn nack_multiple_with_requeue_requeues_all_up_to_the_tag_as_redelivered() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2", "3", "4"]).await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    let got = take(&mut consumer, 4).await;
    assert!(got.iter().all(|d| !d.redelivered));
    within(
        5,
        ch.basic_nack(
            got[2].delivery_tag,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        ),
    )
    .await
    .expect("nack");
    let again = take(&mut consumer, 3).await;
    assert_eq!(again.iter().map(body).collect::<Vec<_>>(), ["1", "2", "3"]);
    assert!(again.iter().all(|d| d.redelivered), "redelivered flag set");
    assert!(
        again.iter().all(|d| d.delivery_tag > got[3].delivery_tag),
        "new tags"
    );
    no_delivery(&mut consumer, 200).await;
}

#[tokio::test]
async fn nack_without_requeue_discards_the_message() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2"]).await;
    let m = get(&ch, &q, false).await.expect("get-ok");
    within(
        5,
        m.delivery.acker.nack(BasicNackOptions {
            multiple: false,
            requeue: false,
        }),
    )
    .await
    .expect("nack");
    within(5, ch.close(200, "OK".into())).await.expect("close");
    let ch2 = channel(&conn).await;
    assert_eq!(drain(&ch2, &q).await, [("2".to_string(), false)]);
}

#[tokio::test]
async fn reject_with_requeue_sets_redelivered() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["only"]).await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    let d = next_delivery(&mut consumer).await;
    assert!(!d.redelivered);
    within(5, d.acker.reject(BasicRejectOptions { requeue: true }))
        .await
        .expect("reject");
    let again = next_delivery(&mut consumer).await;
    assert_eq!(body(&again), "only");
    assert!(again.redelivered);
}

#[tokio::test]
async fn reject_without_requeue_discards_the_message() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2"]).await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    let got = take(&mut consumer, 2).await;
    within(
        5,
        got[0].acker.reject(BasicRejectOptions { requeue: false }),
    )
    .await
    .expect("reject");
    no_delivery(&mut consumer, 300).await;
    drop(consumer);
    within(5, ch.close(200, "OK".into())).await.expect("close");
    let ch2 = channel(&conn).await;
    assert_eq!(drain(&ch2, &q).await, [("2".to_string(), true)]);
}

#[tokio::test]
async fn requeued_message_keeps_its_original_position() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2", "3"]).await;
    let first = get(&ch, &q, false).await.expect("get-ok");
    assert_eq!(body(&first.delivery), "1");
    within(
        5,
        first
            .delivery
            .acker
            .reject(BasicRejectOptions { requeue: true }),
    )
    .await
    .expect("reject");
    assert_eq!(
        drain(&ch, &q).await,
        [
            ("1".to_string(), true),
            ("2".to_string(), false),
            ("3".to_string(), false)
        ]
    );
}

#[tokio::test]
async fn requeued_messages_keep_their_order_among_themselves() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2", "3", "4"]).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(get(&ch, &q, false).await.expect("get-ok"));
    }
    // Reject out of order: positions come from the queue, not from the reject order.
    for i in [2, 0, 1] {
        within(
            5,
            got[i]
                .delivery
                .acker
                .reject(BasicRejectOptions { requeue: true }),
        )
        .await
        .expect("reject");
    }
    assert_eq!(
        drain(&ch, &q).await,
        [
            ("1".to_string(), true),
            ("2".to_string(), true),
            ("3".to_string(), true),
            ("4".to_string(), false)
        ]
    );
}

#[tokio::test]
async fn acking_an_unknown_delivery_tag_closes_the_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let mut errs = errors(&conn);
    within(5, ch.basic_ack(42, BasicAckOptions::default()))
        .await
        .expect("ack sent");
    assert_eq!(
        errs.next().await,
        (
            406,
            "PRECONDITION_FAILED - unknown delivery tag 42".to_string()
        )
    );
    assert!(conn.status().connected(), "only the channel is closed");
}

#[tokio::test]
async fn acking_a_delivery_tag_twice_closes_the_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1"]).await;
    let m = get(&ch, &q, false).await.expect("get-ok");
    let tag = m.delivery.delivery_tag;
    let mut errs = errors(&conn);
    within(5, ch.basic_ack(tag, BasicAckOptions::default()))
        .await
        .expect("ack");
    within(5, ch.basic_ack(tag, BasicAckOptions::default()))
        .await
        .expect("second ack sent");
    assert_eq!(
        errs.next().await,
        (
            406,
            format!("PRECONDITION_FAILED - unknown delivery tag {tag}")
        )
    );
}

#[tokio::test]
async fn rejecting_an_unknown_delivery_tag_closes_the_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let mut errs = errors(&conn);
    within(5, ch.basic_reject(7, BasicRejectOptions { requeue: true }))
        .await
        .expect("reject sent");
    assert_eq!(
        errs.next().await,
        (
            406,
            "PRECONDITION_FAILED - unknown delivery tag 7".to_string()
        )
    );
}

#[tokio::test]
async fn acking_a_no_ack_delivery_closes_the_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1"]).await;
    let m = get(&ch, &q, true).await.expect("get-ok");
    let tag = m.delivery.delivery_tag;
    let mut errs = errors(&conn);
    within(5, ch.basic_ack(tag, BasicAckOptions::default()))
        .await
        .expect("ack sent");
    assert_eq!(
        errs.next().await,
        (
            406,
            format!("PRECONDITION_FAILED - unknown delivery tag {tag}")
        )
    );
}

#[tokio::test]
async fn recover_with_requeue_redelivers_unacked_messages() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2"]).await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    let got = take(&mut consumer, 2).await;
    within(5, got[0].acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    within(5, ch.basic_recover(BasicRecoverOptions { requeue: true }))
        .await
        .expect("recover");
    let again = next_delivery(&mut consumer).await;
    assert_eq!(body(&again), "2");
    assert!(again.redelivered);
    no_delivery(&mut consumer, 200).await;
}

#[tokio::test]
async fn closing_a_channel_requeues_its_unacked_messages() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2", "3"]).await;
    let cch = channel(&conn).await;
    let mut consumer = consume(&cch, &q, Default::default()).await;
    let got = take(&mut consumer, 3).await;
    within(5, got[1].acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    assert_eq!(ready_count(&ch, &q).await, 0);
    within(5, cch.close(200, "OK".into())).await.expect("close");
    assert_eq!(
        drain(&ch, &q).await,
        [("1".to_string(), true), ("3".to_string(), true)]
    );
}

#[tokio::test]
async fn closing_a_connection_requeues_its_unacked_messages() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = unique("q-conn-requeue");
    within(
        5,
        ch.queue_declare(q.as_str().into(), Default::default(), FieldTable::default()),
    )
    .await
    .expect("declare");
    fill(&conn, &q, &["1", "2"]).await;
    let consumer_conn = broker.connect().await;
    let cch = channel(&consumer_conn).await;
    let mut consumer = consume(&cch, &q, Default::default()).await;
    take(&mut consumer, 2).await;
    within(5, consumer_conn.close(200, "OK".into()))
        .await
        .expect("close");
    eventually("the unacked messages are back", || async {
        ready_count(&ch, &q).await == 2
    })
    .await;
    assert_eq!(
        drain(&ch, &q).await,
        [("1".to_string(), true), ("2".to_string(), true)]
    );
    within(5, ch.queue_delete(q.as_str().into(), Default::default()))
        .await
        .expect("delete");
}

#[tokio::test]
async fn messages_are_delivered_round_robin_to_consumers_of_equal_priority() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let c1_ch = channel(&conn).await;
    let c2_ch = channel(&conn).await;
    let mut c1 = consume(&c1_ch, &q, Default::default()).await;
    let mut c2 = consume(&c2_ch, &q, Default::default()).await;
    fill(&conn, &q, &["1", "2", "3", "4"]).await;
    let a = take(&mut c1, 2).await;
    let b = take(&mut c2, 2).await;
    assert_eq!(a.iter().map(body).collect::<Vec<_>>(), ["1", "3"]);
    assert_eq!(b.iter().map(body).collect::<Vec<_>>(), ["2", "4"]);
}

#[tokio::test]
async fn ack_multiple_with_tag_zero_acknowledges_everything_outstanding() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, &["1", "2", "3"]).await;
    let cch = channel(&conn).await;
    for _ in 0..3 {
        get(&cch, &q, false).await.expect("get-ok");
    }
    within(5, cch.basic_ack(0, BasicAckOptions { multiple: true }))
        .await
        .expect("ack multiple 0");
    within(5, cch.close(200, "OK".into())).await.expect("close");
    assert_eq!(drain(&ch, &q).await, Vec::<(String, bool)>::new());
}

#[tokio::test]
async fn recover_without_requeue_closes_the_connection_with_not_implemented() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let res = within(5, ch.basic_recover(BasicRecoverOptions { requeue: false })).await;
    assert_amqp_error(res, 540, "NOT_IMPLEMENTED - requeue=false");
    eventually("the connection is closed", || async {
        !conn.status().connected()
    })
    .await;
}

/// Waits for `n` deliveries from any of `consumers`.
async fn take_any(
    consumers: &mut futures::stream::SelectAll<Consumer>,
    n: usize,
    case: &str,
) -> Vec<Delivery> {
    let mut out = Vec::new();
    for i in 0..n {
        let d = tokio::time::timeout(std::time::Duration::from_secs(5), consumers.next())
            .await
            .unwrap_or_else(|_| panic!("{case}: delivery {} of {n} never came", i + 1))
            .expect("consumers end")
            .expect("delivery");
        out.push(d);
    }
    out
}

/// Asserts that none of `consumers` gets a delivery for a little while.
async fn none_to_any(consumers: &mut futures::stream::SelectAll<Consumer>, case: &str) {
    let got = tokio::time::timeout(std::time::Duration::from_millis(150), consumers.next()).await;
    if let Ok(Some(Ok(d))) = got {
        panic!("{case}: unexpected delivery {:?}", body(&d));
    }
}

async fn ack(ch: &Channel, tag: u64, multiple: bool) {
    within(5, ch.basic_ack(tag, BasicAckOptions { multiple }))
        .await
        .expect("basic.ack");
}

/// One round of the Java client's QoS permutations: a window of `limit` deliveries over
/// consumers of `queues` queues (channel-wide with `global`, else each consumer's own). The window holds exactly `limit`, a
/// `basic.get` does not count against it, and acks inside a transaction free it only at
/// commit (a rollback puts them back; acking them again and committing frees it at once).
async fn channel_prefetch_round(
    conn: &Connection,
    global: bool,
    limit: u16,
    multiple: bool,
    tx: bool,
    queues: usize,
) {
    let case =
        format!("global {global}, limit {limit}, multiple {multiple}, tx {tx}, {queues} queue(s)");
    let ch = channel(conn).await;
    qos(&ch, limit, global).await;
    let mut names = Vec::new();
    let mut consumers = futures::stream::SelectAll::new();
    for _ in 0..queues {
        let q = exclusive_queue(&ch, "").await;
        consumers.push(consume(&ch, &q, Default::default()).await);
        names.push(q);
    }
    let bodies: Vec<String> = (0..2 * usize::from(limit) + queues + 1)
        .map(|i| i.to_string())
        .collect();
    let bodies: Vec<&str> = bodies.iter().map(String::as_str).collect();
    for q in &names {
        fill(conn, q, &bodies).await;
    }
    if tx {
        within(5, ch.tx_select()).await.expect("tx.select");
    }
    let first = take_any(&mut consumers, limit.into(), &case).await;
    none_to_any(&mut consumers, &case).await;
    let mut got = Vec::new();
    for q in &names {
        let m = get(&ch, q, false).await.expect("get-ok beyond the window");
        got.push(m.delivery.delivery_tag);
    }
    let last = first
        .iter()
        .map(|d| d.delivery_tag)
        .max()
        .expect("deliveries");
    if multiple {
        ack(&ch, last, true).await;
    } else {
        for d in &first {
            ack(&ch, d.delivery_tag, false).await;
        }
    }
    if tx {
        none_to_any(&mut consumers, &case).await;
        within(5, ch.tx_rollback()).await.expect("tx.rollback");
        none_to_any(&mut consumers, &case).await;
        ack(&ch, last, true).await;
        within(5, ch.tx_commit()).await.expect("tx.commit");
    }
    take_any(&mut consumers, limit.into(), &case).await;
    none_to_any(&mut consumers, &case).await;
    for tag in got {
        ack(&ch, tag, false).await;
    }
    if tx {
        within(5, ch.tx_commit()).await.expect("tx.commit");
    }
    none_to_any(&mut consumers, &case).await;
    within(5, ch.close(200, "OK".into())).await.expect("close");
}

#[tokio::test]
async fn channel_prefetch_window_counts_consumer_deliveries_not_gets() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    for limit in [1, 2] {
        for multiple in [false, true] {
            for queues in [1, 2] {
                channel_prefetch_round(&conn, true, limit, multiple, false, queues).await;
            }
        }
    }
}

#[tokio::test]
async fn channel_prefetch_window_is_freed_by_committed_acks_after_a_rollback() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    for limit in [1, 2] {
        for multiple in [false, true] {
            for queues in [1, 2] {
                channel_prefetch_round(&conn, true, limit, multiple, true, queues).await;
            }
        }
    }
}

#[tokio::test]
async fn consumer_prefetch_window_is_freed_by_committed_acks_after_a_rollback() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    for limit in [1, 2] {
        for multiple in [false, true] {
            channel_prefetch_round(&conn, false, limit, multiple, true, 1).await;
        }
    }
}

#[tokio::test]
async fn a_full_channel_prefetch_window_holds_back_no_ack_consumers_too() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    qos(&ch, 1, true).await;
    let qa = exclusive_queue(&ch, "").await;
    let mut acking = consume(&ch, &qa, Default::default()).await;
    fill(&conn, &qa, &["a1", "a2"]).await;
    let a1 = next_delivery(&mut acking).await;
    assert_eq!(body(&a1), "a1");
    let qb = exclusive_queue(&ch, "").await;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut free = consume(&ch, &qb, no_ack).await;
    fill(&conn, &qb, &["b1"]).await;
    no_delivery(&mut free, 500).await;
    no_delivery(&mut acking, 50).await;
    // Room again: a2 fills the window at once (b1 may get through first, or must wait).
    ack(&ch, a1.delivery_tag, false).await;
    let a2 = next_delivery(&mut acking).await;
    assert_eq!(body(&a2), "a2");
    ack(&ch, a2.delivery_tag, false).await;
    assert_eq!(body(&next_delivery(&mut free).await), "b1");
}

#[tokio::test]
async fn no_ack_deliveries_do_not_count_against_the_channel_prefetch() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let qa = exclusive_queue(&ch, "").await;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut free = consume(&ch, &qa, no_ack).await;
    qos(&ch, 1, true).await;
    fill(&conn, &qa, &["a1", "a2"]).await;
    let got = take(&mut free, 2).await;
    assert_eq!(got.iter().map(body).collect::<Vec<_>>(), ["a1", "a2"]);
    // A consumer that acknowledges, started later on the channel, still has the whole window.
    let qb = exclusive_queue(&ch, "").await;
    let mut acking = consume(&ch, &qb, Default::default()).await;
    fill(&conn, &qb, &["b1", "b2"]).await;
    assert_eq!(body(&next_delivery(&mut acking).await), "b1");
    no_delivery(&mut acking, 300).await;
}
