//! RabbitMQ extensions: sender-selected distribution (CC/BCC headers) and direct reply-to.

mod common;

use common::*;
use lapin::options::{BasicConsumeOptions, BasicGetOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

const REPLY_TO: &str = "amq.rabbitmq.reply-to";

async fn channel(conn: &Connection) -> Channel {
    within(5, conn.create_channel()).await.expect("channel")
}

async fn bound_queue(ch: &Channel, key: &str) -> String {
    let q = exclusive_queue(ch, "").await;
    within(
        5,
        ch.queue_bind(
            q.as_str().into(),
            "amq.direct".into(),
            key.into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("bind");
    q
}

fn key_list(keys: &[&str]) -> AMQPValue {
    AMQPValue::FieldArray(FieldArray::from(
        keys.iter()
            .map(|k| AMQPValue::LongString((*k).into()))
            .collect::<Vec<_>>(),
    ))
}

async fn get(ch: &Channel, queue: &str) -> Option<lapin::message::Delivery> {
    within(
        5,
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get")
    .map(|m| m.delivery)
}

async fn publish_confirmed(ch: &Channel, exchange: &str, key: &str, props: BasicProperties) {
    let c = within(
        5,
        ch.basic_publish(
            exchange.into(),
            key.into(),
            Default::default(),
            b"payload",
            props,
        ),
    )
    .await
    .expect("publish");
    assert!(within(5, c).await.expect("confirm").is_ack());
}

#[tokio::test]
async fn cc_header_routes_to_extra_queues_and_is_kept() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let (ka, kb, kc) = (unique("cc-a"), unique("cc-b"), unique("cc-c"));
    let qa = bound_queue(&ch, &ka).await;
    let qb = bound_queue(&ch, &kb).await;
    let qc = bound_queue(&ch, &kc).await;
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), key_list(&[&kb]));
    headers.insert("other".into(), AMQPValue::LongInt(1));
    let pch = channel(&conn).await;
    within(5, pch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    publish_confirmed(
        &pch,
        "amq.direct",
        &ka,
        BasicProperties::default().with_headers(headers.clone()),
    )
    .await;
    for q in [&qa, &qb] {
        let d = get(&ch, q).await.expect("a copy");
        assert_eq!(d.data, b"payload");
        assert_eq!(
            d.routing_key.as_str(),
            ka,
            "the routing key is the published one"
        );
        assert_eq!(
            d.properties.headers().clone().expect("headers"),
            headers,
            "CC is kept"
        );
    }
    assert!(get(&ch, &qc).await.is_none());
}

#[tokio::test]
async fn bcc_header_routes_to_extra_queues_and_is_stripped() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let (ka, kb, kc) = (unique("bcc-a"), unique("bcc-b"), unique("bcc-c"));
    let qa = bound_queue(&ch, &ka).await;
    let qb = bound_queue(&ch, &kb).await;
    let qc = bound_queue(&ch, &kc).await;
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), key_list(&[&kb]));
    headers.insert("BCC".into(), key_list(&[&kc]));
    headers.insert("other".into(), AMQPValue::LongString("kept".into()));
    let pch = channel(&conn).await;
    within(5, pch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    publish_confirmed(
        &pch,
        "amq.direct",
        &ka,
        BasicProperties::default().with_headers(headers),
    )
    .await;
    let mut expected = FieldTable::default();
    expected.insert("CC".into(), key_list(&[&kb]));
    expected.insert("other".into(), AMQPValue::LongString("kept".into()));
    for q in [&qa, &qb, &qc] {
        let d = get(&ch, q).await.expect("a copy");
        assert_eq!(d.routing_key.as_str(), ka);
        assert_eq!(
            d.properties.headers().clone().expect("headers"),
            expected,
            "BCC stripped, CC kept"
        );
    }
}

#[tokio::test]
async fn cc_header_reaches_queues_through_the_default_exchange() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let qa = exclusive_queue(&ch, "").await;
    let qb = exclusive_queue(&ch, "").await;
    let mut headers = FieldTable::default();
    headers.insert("BCC".into(), key_list(&[&qb]));
    let pch = channel(&conn).await;
    within(5, pch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    publish_confirmed(
        &pch,
        "",
        &qa,
        BasicProperties::default().with_headers(headers),
    )
    .await;
    for q in [&qa, &qb] {
        let d = get(&ch, q).await.expect("a copy");
        assert_eq!(d.routing_key.as_str(), qa);
        assert_eq!(
            d.properties.headers().clone(),
            Some(FieldTable::default()),
            "the BCC header is removed, leaving an empty table"
        );
    }
}

#[tokio::test]
async fn cc_header_that_is_not_an_array_is_refused() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let pch = channel(&conn).await;
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), AMQPValue::LongString("x".into()));
    let mut errs = errors(&conn);
    within(
        5,
        pch.basic_publish(
            "".into(),
            q.as_str().into(),
            Default::default(),
            b"bad",
            BasicProperties::default().with_headers(headers),
        ),
    )
    .await
    .expect("publish sent");
    assert_eq!(
        errs.next().await,
        (
            406,
            "PRECONDITION_FAILED - invalid message: {unacceptable_type_in_header,\"CC\",longstr}"
                .to_string()
        )
    );
}

#[tokio::test]
async fn direct_reply_to_rpc_round_trip() {
    let broker = TestBroker::start().await;
    let client = broker.connect().await;
    let server = broker.connect().await;
    let service_ch = channel(&server).await;
    let service = exclusive_queue(&service_ch, "").await;
    let mut requests = consume(
        &service_ch,
        &service,
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;

    let ch = channel(&client).await;
    let mut replies = within(
        5,
        ch.basic_consume(
            REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume amq.rabbitmq.reply-to");
    within(
        5,
        ch.basic_publish(
            "".into(),
            service.as_str().into(),
            Default::default(),
            b"ping",
            BasicProperties::default()
                .with_reply_to(REPLY_TO.into())
                .with_correlation_id("c-1".into()),
        ),
    )
    .await
    .expect("publish request");

    let request = next_delivery(&mut requests).await;
    assert_eq!(request.data, b"ping");
    let reply_to = request
        .properties
        .reply_to()
        .clone()
        .expect("reply_to")
        .to_string();
    assert!(
        reply_to.starts_with("amq.rabbitmq.reply-to.") && reply_to.len() > REPLY_TO.len() + 1,
        "reply_to rewritten to a routable name: {reply_to:?}"
    );
    within(
        5,
        service_ch.basic_publish(
            "".into(),
            reply_to.as_str().into(),
            Default::default(),
            b"pong",
            BasicProperties::default().with_correlation_id("c-1".into()),
        ),
    )
    .await
    .expect("publish reply");

    let reply = next_delivery(&mut replies).await;
    assert_eq!(reply.data, b"pong");
    assert_eq!(reply.exchange.as_str(), "");
    assert_eq!(reply.routing_key.as_str(), reply_to);
    assert_eq!(
        reply
            .properties
            .correlation_id()
            .clone()
            .map(|s| s.to_string()),
        Some("c-1".to_string())
    );
}

#[tokio::test]
async fn consuming_reply_to_without_no_ack_fails() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let res = within(
        5,
        ch.basic_consume(
            REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res.map(|_| ()),
        406,
        "PRECONDITION_FAILED - reply consumer cannot acknowledge",
    );
}

#[tokio::test]
async fn publishing_with_reply_to_without_a_reply_consumer_fails() {
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
            b"request",
            BasicProperties::default().with_reply_to(REPLY_TO.into()),
        ),
    )
    .await
    .expect("publish sent");
    assert_eq!(
        errs.next().await,
        (
            406,
            "PRECONDITION_FAILED - fast reply consumer does not exist".to_string()
        )
    );
    assert_eq!(
        ready_count(&qch, &q).await,
        0,
        "the request is not enqueued"
    );
}

#[tokio::test]
async fn reply_to_consumer_on_another_channel_does_not_count() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let qch = channel(&conn).await;
    let q = exclusive_queue(&qch, "").await;
    let reply_ch = channel(&conn).await;
    let _replies = within(
        5,
        reply_ch.basic_consume(
            REPLY_TO.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume reply-to");
    let ch = channel(&conn).await;
    let mut errs = errors(&conn);
    within(
        5,
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            Default::default(),
            b"request",
            BasicProperties::default().with_reply_to(REPLY_TO.into()),
        ),
    )
    .await
    .expect("publish sent");
    assert_eq!(
        errs.next().await,
        (
            406,
            "PRECONDITION_FAILED - fast reply consumer does not exist".to_string()
        )
    );
}

#[tokio::test]
async fn a_second_reply_to_consumer_on_the_same_channel_fails() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let opts = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let _first = within(
        5,
        ch.basic_consume(REPLY_TO.into(), "".into(), opts, FieldTable::default()),
    )
    .await
    .expect("first reply-to consumer");
    let res = within(
        5,
        ch.basic_consume(REPLY_TO.into(), "".into(), opts, FieldTable::default()),
    )
    .await;
    assert_amqp_error(
        res.map(|_| ()),
        406,
        "PRECONDITION_FAILED - reply consumer already set",
    );
}

#[tokio::test]
async fn a_queue_matched_by_both_routing_key_and_cc_gets_one_copy() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let (ka, kb) = (unique("cc-dup-a"), unique("cc-dup-b"));
    let q = bound_queue(&ch, &ka).await;
    within(
        5,
        ch.queue_bind(
            q.as_str().into(),
            "amq.direct".into(),
            kb.as_str().into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("second bind");
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), key_list(&[&kb, &ka]));
    let pch = channel(&conn).await;
    within(5, pch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    publish_confirmed(
        &pch,
        "amq.direct",
        &ka,
        BasicProperties::default().with_headers(headers),
    )
    .await;
    assert_eq!(ready_count(&ch, &q).await, 1);
}

#[tokio::test]
async fn mandatory_publish_routed_only_by_bcc_is_not_returned() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let kb = unique("bcc-only");
    let q = bound_queue(&ch, &kb).await;
    let mut headers = FieldTable::default();
    headers.insert("BCC".into(), key_list(&[&kb]));
    let pch = channel(&conn).await;
    within(5, pch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let c = within(
        5,
        pch.basic_publish(
            "amq.direct".into(),
            unique("nobody").as_str().into(),
            lapin::options::BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"payload",
            BasicProperties::default().with_headers(headers),
        ),
    )
    .await
    .expect("publish");
    assert_eq!(
        within(5, c).await.expect("confirm"),
        lapin::Confirmation::Ack(None)
    );
    assert_eq!(ready_count(&ch, &q).await, 1);
}

/// The Java client's DirectReplyTo round trip: the requester reads its own request with
/// basic.get, declares the generated reply-to name passively from another channel (it exists,
/// with its one consumer), and a confirmed reply reaches the reply consumer. A forged name
/// does not exist.
#[tokio::test]
async fn generated_reply_to_name_can_be_declared_passively_and_answered() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut replies = within(
        5,
        ch.basic_consume(REPLY_TO.into(), "".into(), no_ack, FieldTable::default()),
    )
    .await
    .expect("consume amq.rabbitmq.reply-to");
    let service = exclusive_queue(&ch, "").await;
    within(
        5,
        ch.basic_publish(
            "".into(),
            service.as_str().into(),
            Default::default(),
            b"request",
            BasicProperties::default().with_reply_to(REPLY_TO.into()),
        ),
    )
    .await
    .expect("publish request");
    let request = get(&ch, &service).await.expect("the request");
    let reply_to = request
        .properties
        .reply_to()
        .clone()
        .expect("reply_to")
        .to_string();

    let other = channel(&conn).await;
    let ok = within(
        5,
        other.queue_declare(
            reply_to.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("passive declare of the generated name");
    assert_eq!(ok.name().as_str(), reply_to);
    assert_eq!((ok.message_count(), ok.consumer_count()), (0, 1));

    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let confirm = within(
        5,
        ch.basic_publish(
            "".into(),
            reply_to.as_str().into(),
            Default::default(),
            b"response",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish reply");
    assert!(within(5, confirm).await.expect("confirm").is_ack());
    assert_eq!(next_delivery(&mut replies).await.data, b"response");

    let forged = format!("{}xxxxx", &reply_to[..reply_to.len() - 5]);
    let res = within(
        5,
        other.queue_declare(
            forged.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res,
        404,
        &format!("NOT_FOUND - no queue '{forged}' in vhost '/'"),
    );
}

/// RabbitMQ answers a declare of a generated reply-to name the same whether it is passive or
/// not: the name exists while its consumer is there (no messages, one consumer), and any
/// other name under `amq.rabbitmq.reply-to` does not (404, not 403 for the reserved prefix).
#[tokio::test]
async fn generated_reply_to_name_is_matched_by_a_declare_that_is_not_passive() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let _replies = within(
        5,
        ch.basic_consume(REPLY_TO.into(), "".into(), no_ack, FieldTable::default()),
    )
    .await
    .expect("consume amq.rabbitmq.reply-to");
    let service = exclusive_queue(&ch, "").await;
    within(
        5,
        ch.basic_publish(
            "".into(),
            service.as_str().into(),
            Default::default(),
            b"request",
            BasicProperties::default().with_reply_to(REPLY_TO.into()),
        ),
    )
    .await
    .expect("publish request");
    let request = get(&ch, &service).await.expect("the request");
    let reply_to = request
        .properties
        .reply_to()
        .clone()
        .expect("reply_to")
        .to_string();
    let other = channel(&conn).await;
    let ok = within(
        5,
        other.queue_declare(
            reply_to.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare of the generated name");
    assert_eq!(ok.name().as_str(), reply_to);
    assert_eq!((ok.message_count(), ok.consumer_count()), (0, 1));
    let unknown = format!("{REPLY_TO}.no-such-key");
    let res = within(
        5,
        other.queue_declare(
            unknown.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res,
        404,
        &format!("NOT_FOUND - no queue '{unknown}' in vhost '/'"),
    );
}
