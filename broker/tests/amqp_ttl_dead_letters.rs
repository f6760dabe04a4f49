//! Message TTL (`x-message-ttl`, `expiration`), queue expiry (`x-expires`) and dead-lettering
//! (`x-dead-letter-exchange`, `x-dead-letter-routing-key`, the reasons rejected, expired and
//! maxlen, `x-death`, `x-first-death-*`, cycles), as RabbitMQ 3.10 does them. Run them against
//! RabbitMQ with `WARREN_TEST_AMQP_URL` to see the same results.

mod common;

use common::*;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use std::time::Duration;

async fn declare(ch: &Channel, name: &str, arguments: FieldTable) {
    within(
        5,
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                auto_delete: false,
                ..QueueDeclareOptions::default()
            },
            arguments,
        ),
    )
    .await
    .expect("queue.declare");
}

/// A queue and its dead-letter queue behind the default exchange: `q` dead-letters to `dlq`.
async fn with_dead_letters(ch: &Channel, q: &str, dlq: &str, extra: &[(&str, AMQPValue)]) {
    declare(ch, dlq, FieldTable::default()).await;
    let mut pairs = vec![
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(dlq)),
    ];
    pairs.extend_from_slice(extra);
    declare(ch, q, args(&pairs)).await;
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
    within(
        5,
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        ),
    )
    .await
    .expect("basic.publish");
}

async fn get(ch: &Channel, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    within(
        5,
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get")
}

/// Waits (at most 5 s) for a message in `queue`.
async fn get_within(ch: &Channel, queue: &str) -> lapin::message::BasicGetMessage {
    for _ in 0..100 {
        if let Some(m) = get(ch, queue).await {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no message in {queue} within 5 s");
}

fn header<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a AMQPValue> {
    props.headers().as_ref()?.inner().get(key)
}

fn as_text(v: Option<&AMQPValue>) -> Option<String> {
    match v? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The `x-death` entries, newest first.
fn deaths(props: &BasicProperties) -> Vec<FieldTable> {
    match header(props, "x-death") {
        Some(AMQPValue::FieldArray(a)) => a
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::FieldTable(t) => Some(t.clone()),
                _ => None,
            })
            .collect(),
        other => panic!("no x-death array: {other:?}"),
    }
}

fn count(entry: &FieldTable) -> i64 {
    match entry.inner().get("count") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        other => panic!("count is {other:?}"),
    }
}

async fn setup() -> (TestBroker, Connection, Channel) {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    (b, conn, ch)
}

#[tokio::test]
async fn expired_messages_are_dead_lettered_with_their_history() {
    let (_b, _conn, ch) = setup().await;
    let (q, dlq) = (unique("ttl"), unique("ttl-dlq"));
    with_dead_letters(&ch, &q, &dlq, &[("x-message-ttl", AMQPValue::LongInt(200))]).await;
    let props = BasicProperties::default().with_message_id("m-1".into());
    publish(&ch, "", &q, b"soon gone", props).await;
    assert_eq!(ready_count(&ch, &q).await, 1);
    // No consumer and no other traffic: the broker's timer expires it.
    let dead = get_within(&ch, &dlq).await;
    assert_eq!(ready_count(&ch, &q).await, 0);
    assert_eq!(dead.delivery.data, b"soon gone");
    assert_eq!(dead.delivery.exchange.as_str(), "");
    assert_eq!(dead.delivery.routing_key.as_str(), dlq);
    let p = &dead.delivery.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), Some("m-1"));
    let d = deaths(p);
    assert_eq!(d.len(), 1);
    assert_eq!(
        as_text(d[0].inner().get("reason")).as_deref(),
        Some("expired")
    );
    assert_eq!(as_text(d[0].inner().get("queue")), Some(q.clone()));
    assert_eq!(as_text(d[0].inner().get("exchange")).as_deref(), Some(""));
    assert_eq!(count(&d[0]), 1);
    assert!(matches!(
        d[0].inner().get("time"),
        Some(AMQPValue::Timestamp(_))
    ));
    assert_eq!(
        d[0].inner().get("routing-keys"),
        Some(&AMQPValue::FieldArray(FieldArray::from(vec![text(&q)])))
    );
    assert_eq!(
        as_text(header(p, "x-first-death-reason")).as_deref(),
        Some("expired")
    );
    assert_eq!(as_text(header(p, "x-first-death-queue")), Some(q.clone()));
    assert_eq!(
        as_text(header(p, "x-first-death-exchange")).as_deref(),
        Some("")
    );
}

#[tokio::test]
async fn a_message_expiration_counts_and_is_removed_when_dead_lettered() {
    let (_b, _conn, ch) = setup().await;
    let (q, dlq) = (unique("exp"), unique("exp-dlq"));
    with_dead_letters(&ch, &q, &dlq, &[]).await;
    publish(
        &ch,
        "",
        &q,
        b"short",
        BasicProperties::default().with_expiration("150".into()),
    )
    .await;
    publish(&ch, "", &q, b"long", BasicProperties::default()).await;
    let dead = get_within(&ch, &dlq).await;
    assert_eq!(dead.delivery.data, b"short");
    let p = &dead.delivery.properties;
    assert_eq!(
        p.expiration(),
        &None,
        "the dead letter does not expire again"
    );
    let d = deaths(p);
    assert_eq!(
        as_text(d[0].inner().get("original-expiration")).as_deref(),
        Some("150")
    );
    // The message without expiration stays.
    assert_eq!(get(&ch, &q).await.unwrap().delivery.data, b"long");
}

#[tokio::test]
async fn ttl_zero_keeps_only_what_a_consumer_takes_at_once() {
    let (b, conn, ch) = setup().await;
    let (q, dlq) = (unique("ttl0"), unique("ttl0-dlq"));
    with_dead_letters(&ch, &q, &dlq, &[("x-message-ttl", AMQPValue::LongInt(0))]).await;
    publish(&ch, "", &q, b"nobody listens", BasicProperties::default()).await;
    assert_eq!(get_within(&ch, &dlq).await.delivery.data, b"nobody listens");
    assert_eq!(ready_count(&ch, &q).await, 0);
    let consumer_ch = within(5, conn.create_channel()).await.unwrap();
    let mut consumer = consume(&consumer_ch, &q, BasicConsumeOptions::default()).await;
    let publisher = b.connect().await;
    let pch = within(5, publisher.create_channel()).await.unwrap();
    publish(&pch, "", &q, b"taken", BasicProperties::default()).await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.data, b"taken");
    d.ack(BasicAckOptions::default()).await.unwrap();
}

#[tokio::test]
async fn rejected_messages_are_dead_lettered_under_the_dead_letter_routing_key() {
    let (_b, _conn, ch) = setup().await;
    let dlx = unique("dlx");
    within(
        5,
        ch.exchange_declare(
            dlx.as_str().into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    let (q, dlq) = (unique("rej"), unique("rej-dlq"));
    declare(&ch, &dlq, FieldTable::default()).await;
    within(
        5,
        ch.queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "dead".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    declare(
        &ch,
        &q,
        args(&[
            ("x-dead-letter-exchange", text(&dlx)),
            ("x-dead-letter-routing-key", text("dead")),
        ]),
    )
    .await;
    let mut cc = FieldTable::default();
    cc.insert(
        "CC".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![text("elsewhere")])),
    );
    publish(
        &ch,
        "",
        &q,
        b"one",
        BasicProperties::default().with_headers(cc),
    )
    .await;
    publish(&ch, "", &q, b"two", BasicProperties::default()).await;
    publish(&ch, "", &q, b"three", BasicProperties::default()).await;
    let mut consumer = consume(&ch, &q, BasicConsumeOptions::default()).await;
    let one = next_delivery(&mut consumer).await;
    one.reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let two = next_delivery(&mut consumer).await;
    two.nack(BasicNackOptions {
        requeue: false,
        multiple: false,
    })
    .await
    .unwrap();
    let three = next_delivery(&mut consumer).await;
    three
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    let first = get_within(&ch, &dlq).await;
    assert_eq!(first.delivery.data, b"one");
    assert_eq!(first.delivery.exchange.as_str(), dlx);
    assert_eq!(first.delivery.routing_key.as_str(), "dead");
    let p = &first.delivery.properties;
    assert!(header(p, "CC").is_none(), "the routing key replaces CC");
    let d = deaths(p);
    assert_eq!(
        as_text(d[0].inner().get("reason")).as_deref(),
        Some("rejected")
    );
    assert_eq!(
        d[0].inner().get("routing-keys"),
        Some(&AMQPValue::FieldArray(FieldArray::from(vec![
            text(&q),
            text("elsewhere")
        ])))
    );
    assert_eq!(get_within(&ch, &dlq).await.delivery.data, b"two");
    // Requeued, not dead-lettered.
    let again = next_delivery(&mut consumer).await;
    assert_eq!(
        (again.data.as_slice(), again.redelivered),
        (&b"three"[..], true)
    );
    again.ack(BasicAckOptions::default()).await.unwrap();
    assert!(get(&ch, &dlq).await.is_none());
}

#[tokio::test]
async fn length_limits_dead_letter_what_they_drop_and_reject_publish_dlx_nacks_too() {
    let (_b, _conn, ch) = setup().await;
    let (q, dlq) = (unique("maxlen"), unique("maxlen-dlq"));
    with_dead_letters(&ch, &q, &dlq, &[("x-max-length", AMQPValue::LongInt(1))]).await;
    publish(&ch, "", &q, b"first", BasicProperties::default()).await;
    publish(&ch, "", &q, b"second", BasicProperties::default()).await;
    let dropped = get_within(&ch, &dlq).await;
    assert_eq!(dropped.delivery.data, b"first");
    let d = deaths(&dropped.delivery.properties);
    assert_eq!(
        as_text(d[0].inner().get("reason")).as_deref(),
        Some("maxlen")
    );
    assert_eq!(get(&ch, &q).await.unwrap().delivery.data, b"second");

    let (q2, dlq2) = (unique("rpdlx"), unique("rpdlx-dlq"));
    with_dead_letters(
        &ch,
        &q2,
        &dlq2,
        &[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", text("reject-publish-dlx")),
        ],
    )
    .await;
    let confirms = within(5, ch.confirm_select(ConfirmSelectOptions::default())).await;
    confirms.unwrap();
    let ok = within(
        5,
        ch.basic_publish(
            "".into(),
            q2.as_str().into(),
            BasicPublishOptions::default(),
            b"kept",
            BasicProperties::default(),
        ),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    assert!(ok.is_ack());
    let refused = within(
        5,
        ch.basic_publish(
            "".into(),
            q2.as_str().into(),
            BasicPublishOptions::default(),
            b"refused",
            BasicProperties::default(),
        ),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    assert!(refused.is_nack(), "the publisher is told");
    let dead = get_within(&ch, &dlq2).await;
    assert_eq!(dead.delivery.data, b"refused");
    let d = deaths(&dead.delivery.properties);
    assert_eq!(
        as_text(d[0].inner().get("reason")).as_deref(),
        Some("maxlen")
    );
    assert_eq!(get(&ch, &q2).await.unwrap().delivery.data, b"kept");
}

#[tokio::test]
async fn an_automatic_cycle_drops_the_message_and_a_rejection_lets_it_go_round() {
    let (_b, _conn, ch) = setup().await;
    // A queue that dead-letters expired messages to itself: one pass, then dropped.
    let selfish = unique("cycle");
    declare(
        &ch,
        &selfish,
        args(&[
            ("x-message-ttl", AMQPValue::LongInt(50)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&selfish)),
        ]),
    )
    .await;
    publish(&ch, "", &selfish, b"round", BasicProperties::default()).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(ready_count(&ch, &selfish).await, 0, "dropped, not looping");

    // a rejects to b, b expires back to a: a rejection is in every cycle, so it goes round,
    // and x-death counts each queue and reason once.
    let (a, bq) = (unique("a"), unique("b"));
    declare(
        &ch,
        &a,
        args(&[
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&bq)),
        ]),
    )
    .await;
    declare(
        &ch,
        &bq,
        args(&[
            ("x-message-ttl", AMQPValue::LongInt(50)),
            ("x-dead-letter-exchange", text("")),
            ("x-dead-letter-routing-key", text(&a)),
        ]),
    )
    .await;
    publish(&ch, "", &a, b"loop", BasicProperties::default()).await;
    for round in 1..=2 {
        let m = loop {
            if let Some(m) = within(
                5,
                ch.basic_get(a.as_str().into(), BasicGetOptions { no_ack: false }),
            )
            .await
            .unwrap()
            {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if round == 2 {
            let d = deaths(&m.delivery.properties);
            assert_eq!(d.len(), 2, "{d:?}");
            assert_eq!(as_text(d[0].inner().get("queue")), Some(bq.clone()));
            assert_eq!(
                as_text(d[0].inner().get("reason")).as_deref(),
                Some("expired")
            );
            assert_eq!(as_text(d[1].inner().get("queue")), Some(a.clone()));
            assert_eq!(
                as_text(d[1].inner().get("reason")).as_deref(),
                Some("rejected")
            );
            assert_eq!(count(&d[0]), 1);
            assert_eq!(count(&d[1]), 1);
            m.ack(BasicAckOptions::default()).await.unwrap();
            break;
        }
        m.reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn unused_queues_expire_and_use_keeps_them() {
    let (_b, conn, ch) = setup().await;
    let idle = unique("idle");
    let expires = args(&[("x-expires", AMQPValue::LongInt(400))]);
    declare(&ch, &idle, expires.clone()).await;
    publish(&ch, "", &idle, b"goes with it", BasicProperties::default()).await;
    let used = unique("used");
    declare(&ch, &used, expires.clone()).await;
    let consumer_ch = within(5, conn.create_channel()).await.unwrap();
    let _consumer = consume(&consumer_ch, &used, BasicConsumeOptions::default()).await;
    let touched = unique("touched");
    declare(&ch, &touched, expires.clone()).await;
    // Redeclared every 150 ms for 900 ms: never unused for 400 ms.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        declare(&ch, &touched, expires.clone()).await;
    }
    assert!(
        !queue_exists(&conn, &idle).await,
        "unused for x-expires: deleted"
    );
    assert!(queue_exists(&conn, &used).await, "a consumer keeps it");
    assert!(queue_exists(&conn, &touched).await, "redeclaring keeps it");
}

#[tokio::test]
async fn expiry_reaches_messages_paged_to_disk() {
    let b = TestBroker::start_with(|c| c.queue_window_messages = 8).await;
    if b.is_external() {
        return;
    }
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let q = unique("paged");
    declare(&ch, &q, args(&[("x-message-ttl", AMQPValue::LongInt(200))])).await;
    for i in 0..100 {
        publish(
            &ch,
            "",
            &q,
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let q2 = q.clone();
    eventually("every paged message to expire", || {
        let ch = ch.clone();
        let q = q2.clone();
        async move { ready_count(&ch, &q).await == 0 }
    })
    .await;
}

#[tokio::test]
async fn a_persistent_message_keeps_its_expiry_across_a_restart() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return;
    }
    let q = unique("durable-ttl");
    {
        let conn = b.connect().await;
        let ch = within(5, conn.create_channel()).await.unwrap();
        within(
            5,
            ch.queue_declare(
                q.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                args(&[("x-message-ttl", AMQPValue::LongInt(3000))]),
            ),
        )
        .await
        .unwrap();
        let pch = within(5, conn.create_channel()).await.unwrap();
        within(5, pch.confirm_select(ConfirmSelectOptions::default()))
            .await
            .unwrap();
        let confirm = within(
            5,
            pch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                b"on disk",
                BasicProperties::default().with_delivery_mode(2),
            ),
        )
        .await
        .unwrap();
        assert!(within(5, confirm).await.unwrap().is_ack());
        conn.close(200, "bye".into()).await.unwrap();
    }
    let published = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let b = b.restart().await;
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    assert_eq!(ready_count(&ch, &q).await, 1, "not expired yet");
    let left = Duration::from_millis(3600).saturating_sub(published.elapsed());
    tokio::time::sleep(left).await;
    // Counted from the publish, not from the restart (that would be 4.8 s or later).
    assert_eq!(ready_count(&ch, &q).await, 0);
}

#[tokio::test]
async fn a_missing_dead_letter_exchange_drops_the_message() {
    let (_b, _conn, ch) = setup().await;
    let q = unique("nodlx");
    declare(
        &ch,
        &q,
        args(&[
            ("x-dead-letter-exchange", text("no-such-exchange")),
            ("x-message-ttl", AMQPValue::LongInt(50)),
        ]),
    )
    .await;
    publish(&ch, "", &q, b"lost", BasicProperties::default()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ready_count(&ch, &q).await, 0);
}

#[tokio::test]
async fn a_passive_declare_renews_the_expiry_lease() {
    let (_b, conn, _ch) = setup().await;
    let q = unique("lease");
    let ch = within(5, conn.create_channel()).await.unwrap();
    declare(&ch, &q, args(&[("x-expires", AMQPValue::LongInt(1000))])).await;
    // Looked at passively every 400 ms for 2 s: never unused for 1 s.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            queue_exists(&conn, &q).await,
            "a passive declare keeps the queue"
        );
    }
    within(5, ch.queue_delete(q.as_str().into(), Default::default()))
        .await
        .unwrap();
}

/// Publishes `body` to `queue` with `expiration` (milliseconds, as text).
async fn publish_expiring(ch: &Channel, queue: &str, body: &[u8], expiration: &str) {
    publish(
        ch,
        "",
        queue,
        body,
        BasicProperties::default().with_expiration(expiration.into()),
    )
    .await;
}

#[tokio::test]
async fn a_late_consumer_gets_no_message_whose_expiration_ran_out_behind_a_live_one() {
    let (_b, conn, ch) = setup().await;
    let q = unique("late");
    declare(&ch, &q, FieldTable::default()).await;
    publish_expiring(&ch, &q, b"one", "5000").await;
    publish_expiring(&ch, &q, b"two", "100").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let consumer_ch = within(5, conn.create_channel()).await.unwrap();
    let mut consumer = consume(
        &consumer_ch,
        &q,
        BasicConsumeOptions {
            no_ack: true,
            ..BasicConsumeOptions::default()
        },
    )
    .await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"one");
    no_delivery(&mut consumer, 300).await;
    assert_eq!(ready_count(&ch, &q).await, 0);
}

#[tokio::test]
async fn a_late_consumer_or_get_finds_no_message_past_the_queue_ttl() {
    let (_b, conn, ch) = setup().await;
    let q = unique("late-ttl");
    declare(&ch, &q, args(&[("x-message-ttl", AMQPValue::LongInt(100))])).await;
    for body in [&b"a"[..], b"b", b"c"] {
        publish(&ch, "", &q, body, BasicProperties::default()).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let consumer_ch = within(5, conn.create_channel()).await.unwrap();
    let mut consumer = consume(&consumer_ch, &q, BasicConsumeOptions::default()).await;
    no_delivery(&mut consumer, 300).await;
    let q2 = unique("late-ttl-get");
    declare(
        &ch,
        &q2,
        args(&[("x-message-ttl", AMQPValue::LongInt(100))]),
    )
    .await;
    publish(&ch, "", &q2, b"gone", BasicProperties::default()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(get(&ch, &q2).await.is_none());
}

#[tokio::test]
async fn a_message_expires_behind_the_head_before_a_get_reaches_it() {
    let (_b, _conn, ch) = setup().await;
    let q = unique("behind");
    declare(&ch, &q, FieldTable::default()).await;
    publish_expiring(&ch, &q, b"one", "5000").await;
    publish_expiring(&ch, &q, b"two", "100").await;
    publish(&ch, "", &q, b"three", BasicProperties::default()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&ch, &q).await.unwrap().delivery.data, b"one");
    assert_eq!(get(&ch, &q).await.unwrap().delivery.data, b"three");
    assert!(get(&ch, &q).await.is_none());
}

/// A transaction publishes "one", waits past the TTL (400 ms), publishes "two" and commits:
/// the TTL counts from the commit, when the messages enter the queue, so "one" is there to
/// get.
async fn transactional_publish_then_get(per_message: bool) {
    let (_b, _conn, ch) = setup().await;
    let q = unique("tx-ttl");
    let arguments = if per_message {
        FieldTable::default()
    } else {
        args(&[("x-message-ttl", AMQPValue::LongInt(400))])
    };
    declare(&ch, &q, arguments).await;
    let props = if per_message {
        BasicProperties::default().with_expiration("400".into())
    } else {
        BasicProperties::default()
    };
    within(5, ch.tx_select()).await.unwrap();
    publish(&ch, "", &q, b"one", props.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish(&ch, "", &q, b"two", props).await;
    within(5, ch.tx_commit()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(30)).await;
    let first = get(&ch, &q).await.expect("a message");
    assert_eq!(first.delivery.data, b"one");
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(get(&ch, &q).await.is_none(), "both expired by now");
}

#[tokio::test]
async fn a_per_message_ttl_counts_from_the_commit_of_a_transaction() {
    transactional_publish_then_get(true).await;
}

#[tokio::test]
async fn a_queue_ttl_counts_from_the_commit_of_a_transaction() {
    transactional_publish_then_get(false).await;
}

/// An `x-death` entry as RabbitMQ before 3.5 wrote them: one entry per death, no count.
fn legacy_death(queue: &str) -> AMQPValue {
    let mut t = FieldTable::default();
    t.insert("reason".into(), text("expired"));
    t.insert("queue".into(), text(queue));
    t.insert("exchange".into(), text("old-exchange"));
    t.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![text("k")])),
    );
    AMQPValue::FieldTable(t)
}

#[tokio::test]
async fn x_death_entries_of_older_brokers_are_merged_by_queue_and_reason() {
    let (_b, _conn, ch) = setup().await;
    let (q, dlq) = (unique("merge"), unique("merge-dlq"));
    with_dead_letters(&ch, &q, &dlq, &[("x-message-ttl", AMQPValue::LongInt(20))]).await;
    let (old_a, old_b) = (unique("old-a"), unique("old-b"));
    let mut entries = Vec::new();
    for _ in 0..3 {
        entries.push(legacy_death(&old_a));
    }
    entries.push(legacy_death(&old_b));
    entries.push(legacy_death(&old_a));
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(entries)),
    );
    publish(
        &ch,
        "",
        &q,
        b"old",
        BasicProperties::default().with_headers(headers),
    )
    .await;
    let dead = get_within(&ch, &dlq).await;
    let d = deaths(&dead.delivery.properties);
    let summary: Vec<(String, i64)> = d
        .iter()
        .map(|e| (as_text(e.inner().get("queue")).unwrap(), count(e)))
        .collect();
    // The new death first, then the old ones grouped, each group counting its entries (in
    // the reverse order of their first appearance, as RabbitMQ groups them).
    assert_eq!(
        summary,
        vec![(q.clone(), 1), (old_b.clone(), 1), (old_a.clone(), 4)]
    );
}

#[tokio::test]
async fn persistent_messages_that_expired_while_the_broker_was_down_are_dead_lettered() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return;
    }
    // Names that sort the dead-letter queue last: it is recovered after the queues that
    // dead-letter to it.
    let tag = unique("down");
    let (by_expiration, by_queue_ttl, dlq) = (
        format!("a-exp-{tag}"),
        format!("a-ttl-{tag}"),
        format!("z-dlq-{tag}"),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    {
        let conn = b.connect().await;
        let ch = within(5, conn.create_channel()).await.unwrap();
        within(
            5,
            ch.queue_declare(dlq.as_str().into(), durable, FieldTable::default()),
        )
        .await
        .unwrap();
        for (q, ttl) in [(&by_expiration, None), (&by_queue_ttl, Some(300))] {
            let mut pairs = vec![
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(&dlq)),
            ];
            if let Some(ttl) = ttl {
                pairs.push(("x-message-ttl", AMQPValue::LongInt(ttl)));
            }
            within(
                5,
                ch.queue_declare(q.as_str().into(), durable, args(&pairs)),
            )
            .await
            .unwrap();
        }
        within(5, ch.confirm_select(ConfirmSelectOptions::default()))
            .await
            .unwrap();
        for (q, props) in [
            (
                &by_expiration,
                BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_expiration("300".into()),
            ),
            (
                &by_queue_ttl,
                BasicProperties::default().with_delivery_mode(2),
            ),
        ] {
            let confirm = within(
                5,
                ch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    q.as_bytes(),
                    props,
                ),
            )
            .await
            .unwrap();
            assert!(within(5, confirm).await.unwrap().is_ack());
        }
        conn.close(200, "bye".into()).await.unwrap();
    }
    // Down for longer than the TTLs.
    let b = b.restart_after(Duration::from_millis(600)).await;
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let mut dead = Vec::new();
    for _ in 0..2 {
        let m = get_within(&ch, &dlq).await;
        let d = deaths(&m.delivery.properties);
        assert_eq!(
            as_text(d[0].inner().get("reason")).as_deref(),
            Some("expired")
        );
        dead.push(String::from_utf8(m.delivery.data).unwrap());
    }
    dead.sort();
    assert_eq!(dead, vec![by_expiration.clone(), by_queue_ttl.clone()]);
    assert_eq!(ready_count(&ch, &by_expiration).await, 0);
    assert_eq!(ready_count(&ch, &by_queue_ttl).await, 0);
}

#[tokio::test]
async fn a_second_death_in_the_same_queue_for_the_same_reason_keeps_the_first_entry() {
    let (_b, _conn, ch) = setup().await;
    // q dead-letters through a fanout exchange back to itself.
    let (x, q) = (unique("again-x"), unique("again"));
    within(
        5,
        ch.exchange_declare(
            x.as_str().into(),
            lapin::ExchangeKind::Fanout,
            lapin::options::ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    declare(&ch, &q, args(&[("x-dead-letter-exchange", text(&x))])).await;
    within(
        5,
        ch.queue_bind(
            q.as_str().into(),
            x.as_str().into(),
            "".into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    publish(&ch, "", &q, b"again", BasicProperties::default()).await;
    let mut last = None;
    for _ in 0..3 {
        let m = loop {
            if let Some(m) = within(
                5,
                ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }),
            )
            .await
            .unwrap()
            {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        last = Some(m.delivery.properties.clone());
        m.reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
    }
    let d = deaths(&last.unwrap());
    assert_eq!(d.len(), 1);
    assert_eq!(count(&d[0]), 2);
    // The entry of the first death, counted: its exchange is the one the message was first
    // published to, not the dead-letter exchange it came back through.
    assert_eq!(as_text(d[0].inner().get("exchange")).as_deref(), Some(""));
    within(5, ch.queue_delete(q.as_str().into(), Default::default()))
        .await
        .unwrap();
    within(5, ch.exchange_delete(x.as_str().into(), Default::default()))
        .await
        .unwrap();
}

/// A channel with room for `prefetch` unacknowledged messages.
async fn channel_with_prefetch(conn: &Connection, prefetch: u16) -> Channel {
    let ch = within(5, conn.create_channel()).await.unwrap();
    within(5, ch.basic_qos(prefetch, BasicQosOptions::default()))
        .await
        .expect("basic.qos");
    ch
}

#[tokio::test]
async fn a_prefetching_consumer_gets_no_message_expired_between_live_ones() {
    let (_b, conn, ch) = setup().await;
    let q = unique("prefetch");
    declare(&ch, &q, FieldTable::default()).await;
    publish_expiring(&ch, &q, b"one", "5000").await;
    publish_expiring(&ch, &q, b"two", "100").await;
    publish(&ch, "", &q, b"three", BasicProperties::default()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let consumer_ch = channel_with_prefetch(&conn, 10).await;
    let mut consumer = consume(&consumer_ch, &q, BasicConsumeOptions::default()).await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"one");
    assert_eq!(next_delivery(&mut consumer).await.data, b"three");
    no_delivery(&mut consumer, 300).await;
}

#[tokio::test]
async fn a_prefetching_consumer_of_a_priority_queue_gets_no_message_expired_behind_a_live_one() {
    let (_b, conn, ch) = setup().await;
    let q = unique("prefetch-prio");
    declare(&ch, &q, args(&[("x-max-priority", AMQPValue::LongInt(5))])).await;
    let with = |priority: u8, expiration: Option<&str>| {
        let props = BasicProperties::default().with_priority(priority);
        match expiration {
            Some(e) => props.with_expiration(e.into()),
            None => props,
        }
    };
    // Each level's head lives; an expired message waits behind it in levels 5 and 1.
    for (body, priority, expiration) in [
        (&b"high-long"[..], 5, Some("5000")),
        (b"high-short", 5, Some("100")),
        (b"low-long", 1, Some("5000")),
        (b"low-short", 1, Some("100")),
        (b"low-live", 1, None),
        (b"zero-live", 0, None),
    ] {
        publish(&ch, "", &q, body, with(priority, expiration)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let consumer_ch = channel_with_prefetch(&conn, 10).await;
    let mut consumer = consume(&consumer_ch, &q, BasicConsumeOptions::default()).await;
    for body in [&b"high-long"[..], b"low-long", b"low-live", b"zero-live"] {
        assert_eq!(next_delivery(&mut consumer).await.data, body);
    }
    no_delivery(&mut consumer, 300).await;
}

#[tokio::test]
async fn a_single_active_consumer_taking_over_leaves_the_next_message_to_expire_on_time() {
    let (b, conn, ch) = setup().await;
    if b.is_external() {
        // RabbitMQ 3.10 hands the next consumer nothing at a basic.cancel (only at the queue's
        // next publish, ack or requeue), so there is no takeover to look at.
        return;
    }
    let q = unique("sac-ttl");
    let dlq = unique("sac-ttl-dlq");
    with_dead_letters(
        &ch,
        &q,
        &dlq,
        &[("x-single-active-consumer", AMQPValue::Boolean(true))],
    )
    .await;
    let first_ch = channel_with_prefetch(&conn, 1).await;
    let mut first = consume(&first_ch, &q, BasicConsumeOptions::default()).await;
    publish(&ch, "", &q, b"held", BasicProperties::default()).await;
    assert_eq!(next_delivery(&mut first).await.data, b"held");
    // Behind a message that never expires, one that does: no deadline for it yet.
    publish(&ch, "", &q, b"next", BasicProperties::default()).await;
    publish_expiring(&ch, &q, b"short", "300").await;
    let second_ch = channel_with_prefetch(&conn, 1).await;
    let mut second = consume(&second_ch, &q, BasicConsumeOptions::default()).await;
    no_delivery(&mut second, 100).await;
    within(
        5,
        first_ch.basic_cancel(first.tag(), BasicCancelOptions::default()),
    )
    .await
    .expect("basic.cancel");
    // The takeover: the second consumer gets "next", and "short", now at the head, expires
    // while that consumer holds it.
    assert_eq!(next_delivery(&mut second).await.data, b"next");
    let dead = get_within(&ch, &dlq).await;
    assert_eq!(dead.delivery.data, b"short");
    no_delivery(&mut second, 100).await;
}
