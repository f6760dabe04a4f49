//! Publishing: mandatory returns, immediate, content properties and header field types,
//! large and empty bodies, delivery metadata.

mod common;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, basic};
use common::raw::Raw;
use common::*;
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{
    AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString,
};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

async fn channel(conn: &Connection) -> Channel {
    within(5, conn.create_channel()).await.expect("channel")
}

async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = channel(conn).await;
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    ch
}

async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    options: BasicPublishOptions,
    body: &[u8],
    properties: BasicProperties,
) -> Confirmation {
    let confirm = within(
        30,
        ch.basic_publish(exchange.into(), key.into(), options, body, properties),
    )
    .await
    .expect("basic.publish");
    within(30, confirm).await.expect("confirm")
}

/// Publishes `body` with `properties` to a fresh queue and gets it back with basic.get.
async fn round_trip(
    conn: &Connection,
    body: &[u8],
    properties: BasicProperties,
) -> lapin::message::Delivery {
    let ch = channel(conn).await;
    let q = exclusive_queue(&ch, "").await;
    let pch = confirm_channel(conn).await;
    let c = publish_confirmed(&pch, "", &q, Default::default(), body, properties).await;
    assert!(c.is_ack(), "{c:?}");
    let m = within(
        30,
        ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get")
    .expect("a message");
    assert_eq!(m.message_count, 0);
    m.delivery
}

fn every_field_type() -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("inner-int".into(), AMQPValue::LongInt(-7));
    nested.insert("inner-str".into(), AMQPValue::LongString("deep".into()));
    let mut deeper = FieldTable::default();
    deeper.insert("bool".into(), AMQPValue::Boolean(false));
    nested.insert("inner-table".into(), AMQPValue::FieldTable(deeper));

    let array = FieldArray::from(vec![
        AMQPValue::LongInt(1),
        AMQPValue::LongString("two".into()),
        AMQPValue::Boolean(true),
        AMQPValue::Double(3.5),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongLongInt(-4)])),
        AMQPValue::FieldTable(nested.clone()),
        AMQPValue::Void,
    ]);

    let mut t = FieldTable::default();
    t.insert("bool-true".into(), AMQPValue::Boolean(true));
    t.insert("bool-false".into(), AMQPValue::Boolean(false));
    t.insert("i8".into(), AMQPValue::ShortShortInt(-128));
    t.insert("u8".into(), AMQPValue::ShortShortUInt(255));
    t.insert("i16".into(), AMQPValue::ShortInt(-32768));
    t.insert("u16".into(), AMQPValue::ShortUInt(65535));
    t.insert("i32".into(), AMQPValue::LongInt(i32::MIN));
    t.insert("u32".into(), AMQPValue::LongUInt(u32::MAX));
    t.insert("i64".into(), AMQPValue::LongLongInt(i64::MIN));
    t.insert("f32".into(), AMQPValue::Float(1.5e-3));
    t.insert("f64".into(), AMQPValue::Double(-2.25e100));
    t.insert(
        "decimal".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 3,
            value: 123_456,
        }),
    );
    t.insert(
        "long-string".into(),
        AMQPValue::LongString(LongString::from("ünïcödé and a long string ".repeat(20))),
    );
    t.insert("empty-string".into(), AMQPValue::LongString("".into()));
    t.insert("array".into(), AMQPValue::FieldArray(array));
    t.insert(
        "empty-array".into(),
        AMQPValue::FieldArray(FieldArray::default()),
    );
    t.insert("timestamp".into(), AMQPValue::Timestamp(1_700_000_000));
    t.insert("table".into(), AMQPValue::FieldTable(nested));
    t.insert(
        "empty-table".into(),
        AMQPValue::FieldTable(FieldTable::default()),
    );
    t.insert(
        "bytes".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 2, 0xfe, 0xff])),
    );
    t.insert("void".into(), AMQPValue::Void);
    t
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn mandatory_unroutable_publish_is_returned_with_no_route() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let key = unique("nobody-bound");
    let props = BasicProperties::default()
        .with_message_id("m-1".into())
        .with_content_type("text/plain".into());
    let c = publish_confirmed(
        &ch,
        "amq.direct",
        &key,
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"bounce",
        props.clone(),
    )
    .await;
    assert!(
        c.is_ack(),
        "an unroutable message is still confirmed: {c:?}"
    );
    let returned = c.take_message().expect("basic.return before the ack");
    assert_eq!(returned.reply_code, 312);
    assert_eq!(returned.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(returned.delivery.exchange.as_str(), "amq.direct");
    assert_eq!(returned.delivery.routing_key.as_str(), key);
    assert_eq!(returned.delivery.data, b"bounce");
    assert_eq!(returned.delivery.properties, props);
}

#[tokio::test]
async fn mandatory_publish_to_a_missing_queue_via_the_default_exchange_is_returned() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let key = unique("no-such-queue");
    let c = publish_confirmed(
        &ch,
        "",
        &key,
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"x",
        BasicProperties::default(),
    )
    .await;
    let returned = c.take_message().expect("returned");
    assert_eq!(
        (returned.reply_code, returned.reply_text.as_str()),
        (312, "NO_ROUTE")
    );
    assert_eq!(returned.delivery.exchange.as_str(), "");
    assert_eq!(returned.delivery.routing_key.as_str(), key);
}

#[tokio::test]
async fn mandatory_routable_publish_is_not_returned() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let qch = channel(&conn).await;
    let q = exclusive_queue(&qch, "").await;
    let ch = confirm_channel(&conn).await;
    let c = publish_confirmed(
        &ch,
        "",
        &q,
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"x",
        BasicProperties::default(),
    )
    .await;
    assert_eq!(c, Confirmation::Ack(None));
    assert_eq!(ready_count(&qch, &q).await, 1);
}

#[tokio::test]
async fn non_mandatory_unroutable_publish_is_dropped_and_confirmed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = confirm_channel(&conn).await;
    let c = publish_confirmed(
        &ch,
        "amq.direct",
        &unique("nobody-bound"),
        Default::default(),
        b"x",
        BasicProperties::default(),
    )
    .await;
    assert_eq!(c, Confirmation::Ack(None));
    assert!(ch.status().connected());
}

#[tokio::test]
async fn publish_with_immediate_closes_the_connection_with_not_implemented() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let qch = channel(&conn).await;
    let q = exclusive_queue(&qch, "").await;
    let ch = channel(&conn).await;
    let mut errs = errors(&conn);
    within(
        5,
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            BasicPublishOptions {
                immediate: true,
                ..Default::default()
            },
            b"now",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish sent");
    assert_eq!(
        errs.next().await,
        (540, "NOT_IMPLEMENTED - immediate=true".to_string())
    );
    eventually("the connection is closed", || async {
        !conn.status().connected()
    })
    .await;
}

#[tokio::test]
async fn all_content_properties_round_trip_exactly() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let mut headers = FieldTable::default();
    headers.insert("h".into(), AMQPValue::LongString("v".into()));
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-42".into())
        .with_reply_to("reply-queue".into())
        .with_expiration("600000".into())
        .with_message_id("msg-42".into())
        .with_timestamp(1_700_000_123)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("warren-tests".into())
        .with_cluster_id("cluster-x".into());
    let d = round_trip(&conn, b"{}", props.clone()).await;
    assert_eq!(d.properties, props);
    assert_eq!(d.data, b"{}");
}

#[tokio::test]
async fn absent_content_properties_stay_absent() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let d = round_trip(&conn, b"bare", BasicProperties::default()).await;
    assert_eq!(d.properties, BasicProperties::default());
}

#[tokio::test]
async fn headers_of_every_field_type_round_trip_exactly() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let headers = every_field_type();
    let d = round_trip(
        &conn,
        b"typed",
        BasicProperties::default().with_headers(headers.clone()),
    )
    .await;
    let got = d.properties.headers().clone().expect("headers");
    for (k, v) in headers.inner() {
        assert_eq!(got.inner().get(k), Some(v), "header {k}");
    }
    assert_eq!(got, headers);
}

#[tokio::test]
async fn headers_round_trip_to_a_consumer_too() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    let pch = confirm_channel(&conn).await;
    let headers = every_field_type();
    publish_confirmed(
        &pch,
        "",
        &q,
        Default::default(),
        b"typed",
        BasicProperties::default().with_headers(headers.clone()),
    )
    .await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.properties.headers().clone().expect("headers"), headers);
}

#[tokio::test]
async fn user_id_that_is_not_the_authenticated_user_is_refused() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let qch = channel(&conn).await;
    let q = exclusive_queue(&qch, "").await;
    let ch = channel(&conn).await;
    let mut errs = errors(&conn);
    within(
        5,
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            Default::default(),
            b"spoof",
            BasicProperties::default().with_user_id("not-guest".into()),
        ),
    )
    .await
    .expect("publish sent");
    assert_eq!(
        errs.next().await,
        (
            406,
            "PRECONDITION_FAILED - user_id property set to 'not-guest' but authenticated user was 'guest'"
                .to_string()
        )
    );
    assert_eq!(ready_count(&qch, &q).await, 0);
}

#[tokio::test]
async fn one_megabyte_body_is_split_and_reassembled() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let frame_max = conn.configuration().frame_max() as usize;
    let body = pattern(1024 * 1024);
    assert!(body.len() > frame_max, "bigger than frame_max {frame_max}");
    let d = round_trip(&conn, &body, BasicProperties::default()).await;
    assert_eq!(d.data.len(), body.len());
    assert!(d.data == body, "body reassembled byte for byte");
}

#[tokio::test]
async fn five_megabyte_body_is_split_and_reassembled() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let body = pattern(5 * 1024 * 1024);
    let d = round_trip(&conn, &body, BasicProperties::default()).await;
    assert_eq!(d.data.len(), body.len());
    assert!(d.data == body, "body reassembled byte for byte");
}

#[tokio::test]
async fn large_body_reaches_a_consumer_intact() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    let pch = confirm_channel(&conn).await;
    let bodies: Vec<Vec<u8>> = [300_000usize, 131_064, 131_065, 1]
        .iter()
        .map(|&n| pattern(n))
        .collect();
    for b in &bodies {
        publish_confirmed(
            &pch,
            "",
            &q,
            Default::default(),
            b,
            BasicProperties::default(),
        )
        .await;
    }
    for b in &bodies {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(d.data.len(), b.len());
        assert!(&d.data == b);
    }
}

#[tokio::test]
async fn deliveries_respect_a_small_negotiated_frame_max() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = unique("q-small-frames");
    within(
        5,
        ch.queue_declare(q.as_str().into(), Default::default(), FieldTable::default()),
    )
    .await
    .expect("declare");
    let body = pattern(50_000);
    let pch = confirm_channel(&conn).await;
    publish_confirmed(
        &pch,
        "",
        &q,
        Default::default(),
        &body,
        BasicProperties::default(),
    )
    .await;

    // Read it back over a connection that negotiated the minimum frame size, 4096.
    let (mut raw, _start, _tune) = Raw::handshake(&broker, None, Some(4096)).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: q.as_str().into(),
            no_ack: true,
        })),
    )
    .await;
    match raw.frame().await.expect("a frame") {
        AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetOk(_))) => {}
        other => panic!("expected basic.get-ok, got {other:?}"),
    }
    let size = match raw.frame().await.expect("a frame") {
        AMQPFrame::Header(1, h) => h.body_size as usize,
        other => panic!("expected a content header, got {other:?}"),
    };
    assert_eq!(size, body.len());
    let mut got = Vec::new();
    let mut frames = 0;
    while got.len() < size {
        match raw.frame().await.expect("a frame") {
            AMQPFrame::Body(1, data) => {
                assert!(
                    data.len() <= 4096 - 8,
                    "body frame of {} bytes exceeds frame_max 4096",
                    data.len()
                );
                got.extend_from_slice(&data);
                frames += 1;
            }
            other => panic!("expected a body frame, got {other:?}"),
        }
    }
    assert!(frames >= 13, "{frames} body frames");
    assert!(got == body);
    within(5, ch.queue_delete(q.as_str().into(), Default::default()))
        .await
        .expect("delete");
}

#[tokio::test]
async fn empty_body_round_trips() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let props = BasicProperties::default().with_message_id("empty".into());
    let d = round_trip(&conn, b"", props.clone()).await;
    assert!(d.data.is_empty());
    assert_eq!(d.properties, props);
}

#[tokio::test]
async fn empty_body_reaches_a_consumer() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    publish_to(&ch, &q, b"").await;
    publish_to(&ch, &q, b"after").await;
    assert!(next_delivery(&mut consumer).await.data.is_empty());
    assert_eq!(next_delivery(&mut consumer).await.data, b"after");
}

#[tokio::test]
async fn delivery_carries_consumer_exchange_and_routing_key() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let key = unique("rk");
    within(
        5,
        ch.queue_bind(
            q.as_str().into(),
            "amq.topic".into(),
            ShortString::from(key.as_str()),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("bind");
    let mut consumer = consume(&ch, &q, Default::default()).await;
    let pch = confirm_channel(&conn).await;
    publish_confirmed(
        &pch,
        "amq.topic",
        &key,
        Default::default(),
        b"x",
        BasicProperties::default(),
    )
    .await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.exchange.as_str(), "amq.topic");
    assert_eq!(d.routing_key.as_str(), key);
    assert!(!d.redelivered);
    assert_eq!(
        d.delivery_tag, 1,
        "the first delivery on a channel has tag 1"
    );
}

#[tokio::test]
async fn messages_from_one_publisher_arrive_in_order() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let mut consumer = consume(&ch, &q, Default::default()).await;
    let pch = channel(&conn).await;
    for i in 0..500 {
        publish_to(&pch, &q, format!("{i}").as_bytes()).await;
    }
    for i in 0..500 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(d.data, format!("{i}").into_bytes());
        assert_eq!(d.delivery_tag, i + 1);
    }
}
