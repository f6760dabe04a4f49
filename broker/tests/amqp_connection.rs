//! Connection-level behaviour: handshake, authentication, virtual hosts, channels.

mod common;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, connection};
use amq_protocol::types::AMQPValue;
use common::raw::{HEADER, Raw};
use common::*;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

#[tokio::test]
async fn connects_with_plain_and_opens_a_channel() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    assert!(conn.status().connected());
    assert_eq!(conn.status().username(), "guest");
    let ch = within(5, conn.create_channel()).await.expect("channel");
    assert!(ch.status().connected());
    let q = exclusive_queue(&ch, "").await;
    assert!(!q.is_empty());
    within(5, conn.close(200, "OK".into()))
        .await
        .expect("close");
}

#[tokio::test]
async fn server_properties_include_product_version_platform_and_capabilities() {
    // lapin does not expose the server properties of connection.start: read them raw.
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    raw.send(HEADER).await;
    let start = match raw.method().await {
        Some((0, AMQPClass::Connection(connection::AMQPMethod::Start(s)))) => s,
        other => panic!("expected connection.start, got {other:?}"),
    };
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    let mechanisms = start.mechanisms.to_string();
    assert!(
        mechanisms.split(' ').any(|m| m == "PLAIN"),
        "mechanisms {mechanisms:?}"
    );
    assert!(
        start.locales.to_string().split(' ').any(|l| l == "en_US"),
        "locales {:?}",
        start.locales
    );
    let props = start.server_properties.inner();
    for key in ["product", "version", "platform"] {
        match props.get(key) {
            Some(AMQPValue::LongString(s)) => assert!(!s.as_bytes().is_empty(), "{key} is empty"),
            other => panic!("server property {key}: expected a long string, got {other:?}"),
        }
    }
    let caps = match props.get("capabilities") {
        Some(AMQPValue::FieldTable(t)) => t.inner().clone(),
        other => panic!("capabilities: expected a table, got {other:?}"),
    };
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        assert_eq!(
            caps.get(cap),
            Some(&AMQPValue::Boolean(true)),
            "capability {cap}"
        );
    }
}

#[tokio::test]
async fn bad_credentials_are_refused_with_access_refused() {
    let broker = TestBroker::start().await;
    let uri = broker.uri_with_credentials("guest", "wrong-password");
    let res = within(
        10,
        Connection::connect(&uri, ConnectionProperties::default()),
    )
    .await;
    assert_amqp_error(
        res.map(|_| ()),
        403,
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.",
    );
}

#[tokio::test]
async fn unknown_user_is_refused_with_access_refused() {
    let broker = TestBroker::start().await;
    let uri = broker.uri_with_credentials(&unique("nobody"), "guest");
    let res = within(
        10,
        Connection::connect(&uri, ConnectionProperties::default()),
    )
    .await;
    assert_amqp_error(
        res.map(|_| ()),
        403,
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.",
    );
}

#[tokio::test]
async fn missing_vhost_is_refused_with_not_allowed() {
    let broker = TestBroker::start().await;
    let vhost = unique("no-such-vhost");
    let uri = broker.uri_with_vhost(&vhost);
    let res = within(
        10,
        Connection::connect(&uri, ConnectionProperties::default()),
    )
    .await;
    assert_amqp_error(
        res.map(|_| ()),
        530,
        &format!("NOT_ALLOWED - vhost {vhost} not found"),
    );
}

#[tokio::test]
async fn many_channels_on_one_connection_work_independently() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let mut channels = Vec::new();
    for _ in 0..64 {
        channels.push(within(5, conn.create_channel()).await.expect("channel"));
    }
    let mut ids: Vec<u16> = channels.iter().map(|c| c.id()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 64, "channel ids are distinct");
    // Each channel gets its own queue and message; one failing channel leaves the others open.
    let mut queues = Vec::new();
    for (i, ch) in channels.iter().enumerate() {
        let q = exclusive_queue(ch, "").await;
        within(5, ch.confirm_select(Default::default()))
            .await
            .expect("confirm.select");
        let confirm = within(
            5,
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                Default::default(),
                format!("m{i}").as_bytes(),
                Default::default(),
            ),
        )
        .await
        .expect("publish");
        assert!(within(5, confirm).await.expect("confirm").is_ack());
        queues.push(q);
    }
    let missing = unique("missing");
    let res = channels[10]
        .queue_declare(
            missing.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert_amqp_error(
        res,
        404,
        &format!("NOT_FOUND - no queue '{missing}' in vhost '/'"),
    );
    for (i, (ch, q)) in channels.iter().zip(&queues).enumerate() {
        if i == 10 {
            assert!(
                !ch.status().connected(),
                "channel 10 was closed by the error"
            );
            continue;
        }
        let got = within(
            5,
            ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .expect("basic.get")
        .expect("a message");
        assert_eq!(got.delivery.data, format!("m{i}").into_bytes());
    }
    assert!(conn.status().connected());
}

#[tokio::test]
async fn channel_max_is_negotiated_down_to_the_client_request() {
    let broker = TestBroker::start().await;
    let conn = broker.connect_with_query("channel_max=3").await;
    assert_eq!(conn.configuration().channel_max(), 3);
    let mut channels = Vec::new();
    for _ in 0..3 {
        channels.push(within(5, conn.create_channel()).await.expect("channel"));
    }
    for ch in &channels {
        exclusive_queue(ch, "").await;
    }
}

#[tokio::test]
async fn opening_a_channel_above_the_negotiated_channel_max_closes_the_connection() {
    // lapin refuses this client-side, so speak the protocol directly.
    let broker = TestBroker::start().await;
    let (mut raw, _start, tune) = Raw::handshake(&broker, Some(2), None).await;
    assert!(tune.channel_max == 0 || tune.channel_max >= 2);
    // The limit is on open channels, not on channel numbers.
    raw.open_channel(100).await;
    raw.open_channel(1).await;
    raw.send_method(
        3,
        AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::Open(
            amq_protocol::protocol::channel::Open {},
        )),
    )
    .await;
    match raw.frame().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(close)))) => {
            assert_eq!(
                (close.reply_code, close.reply_text.as_str()),
                (
                    530,
                    "NOT_ALLOWED - number of channels opened (2) has reached the negotiated channel_max (2)"
                )
            );
        }
        other => panic!("expected connection.close, got {other:?}"),
    }
}

#[tokio::test]
async fn closing_a_connection_releases_its_exclusive_queues() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let ch = within(5, owner.create_channel()).await.expect("channel");
    let q = exclusive_queue(&ch, &unique("conn-excl")).await;
    publish_confirmed_to(&owner, &q, b"x").await;
    assert_eq!(ready_count(&ch, &q).await, 1);
    within(5, owner.close(200, "OK".into()))
        .await
        .expect("close");
    let other = broker.connect().await;
    eventually("the exclusive queue is deleted", || async {
        !queue_exists(&other, &q).await
    })
    .await;
}

/// After the client's close is answered, the socket stays open for the client to drop:
/// whatever else it sends meanwhile is ignored (only a further close is answered), and
/// once it drops the socket the broker ends the connection too.
#[tokio::test]
async fn a_lingering_socket_ignores_frames_and_ends_when_the_client_drops_it() {
    use amq_protocol::protocol::{channel, queue};
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    let close = AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
        reply_code: 200,
        reply_text: "bye".into(),
        class_id: 0,
        method_id: 0,
    }));
    raw.send_method(0, close.clone()).await;
    let (ch, m) = within(5, raw.method()).await.expect("close-ok");
    assert_eq!(ch, 0);
    assert!(
        matches!(m, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))),
        "expected close-ok, got {m:?}"
    );
    // A channel, a declare on the closed channel: nothing is answered.
    raw.send_method(
        2,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    raw.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: unique("lingering").as_str().into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    raw.send_method(0, close).await;
    let (ch, m) = within(5, raw.method()).await.expect("a second close-ok");
    assert_eq!(ch, 0);
    assert!(
        matches!(m, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))),
        "only the close is answered, got {m:?}"
    );
    use tokio::io::AsyncWriteExt;
    raw.socket.shutdown().await.expect("shutdown");
    assert!(
        within(5, raw.frame()).await.is_none(),
        "the broker ends the socket once the client has dropped it"
    );
}
