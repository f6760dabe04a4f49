//! Byte-level tests of the handshake and of malformed input, over a raw socket, against the
//! reply codes and texts RabbitMQ 3.10 sends (see docs/rabbitmq-3.10-reference.md).

mod common;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, basic, channel, connection, queue};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use common::TestBroker;
use common::raw::{Close, HEADER, Raw, encode};
use std::time::Duration;
use tokio::io::AsyncReadExt;

fn close(code: u16, text: &str, class_id: u16, method_id: u16) -> Close {
    Close {
        code,
        text: text.to_owned(),
        class_id,
        method_id,
    }
}

fn declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: true,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

#[tokio::test]
async fn bad_protocol_header_is_answered_with_ours_and_closed() {
    let broker = TestBroker::start().await;
    for bad in [
        &b"AMQP\x00\x00\x08\x00"[..],
        b"HTTP/1.1",
        b"AMQP\x00\x01\x00\x00",
    ] {
        let mut raw = Raw::connect(&broker).await;
        raw.send(bad).await;
        let mut reply = [0u8; 8];
        raw.socket
            .read_exact(&mut reply)
            .await
            .expect("8 bytes back");
        assert_eq!(&reply, HEADER, "for {bad:?}");
        assert!(raw.closed().await, "socket closed after {bad:?}");
    }
}

#[tokio::test]
async fn handshake_offers_rabbitmq_capabilities_and_limits() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    raw.send(HEADER).await;
    let (ch, start) = raw.method().await.expect("connection.start");
    assert_eq!(ch, 0);
    let AMQPClass::Connection(connection::AMQPMethod::Start(start)) = start else {
        panic!("expected start");
    };
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    assert_eq!(start.mechanisms.as_bytes(), b"AMQPLAIN PLAIN");
    assert_eq!(start.locales.as_bytes(), b"en_US");
    for key in ["product", "version", "platform"] {
        assert!(
            start.server_properties.inner().contains_key(key),
            "server property {key}"
        );
    }
    let Some(AMQPValue::FieldTable(caps)) = start.server_properties.inner().get("capabilities")
    else {
        panic!("capabilities table");
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
            caps.inner().get(cap),
            Some(&AMQPValue::Boolean(true)),
            "capability {cap}"
        );
    }
    raw.start_ok("guest", "guest", true).await;
    let (_, tune) = raw.method().await.expect("tune");
    let AMQPClass::Connection(connection::AMQPMethod::Tune(tune)) = tune else {
        panic!("expected tune");
    };
    assert_eq!(
        (tune.channel_max, tune.frame_max, tune.heartbeat),
        (2047, 131072, 60)
    );
}

#[tokio::test]
async fn bad_credentials_close_with_403_when_the_client_asks_for_it() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    raw.send(HEADER).await;
    raw.method().await.expect("start");
    raw.start_ok("guest", "wrong", true).await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(
            403,
            "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile.",
            0,
            0
        )
    );
    assert!(raw.closed().await);
}

#[tokio::test]
async fn bad_credentials_without_the_capability_just_close_the_socket() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    raw.send(HEADER).await;
    raw.method().await.expect("start");
    raw.start_ok("nobody", "x", false).await;
    assert_eq!(raw.frame().await, None, "no frame, just a closed socket");
}

#[tokio::test]
async fn tune_ok_above_the_servers_frame_max_is_refused() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    raw.send(HEADER).await;
    raw.method().await.expect("start");
    raw.start_ok("guest", "guest", true).await;
    raw.method().await.expect("tune");
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 2047,
            frame_max: 131073,
            heartbeat: 0,
        })),
    )
    .await;
    let c = raw.expect_connection_close().await;
    assert_eq!(c.code, 530);
    assert_eq!(
        c.text,
        "NOT_ALLOWED - negotiated frame_max = 131073 is higher than the maximum allowed value (131072)"
    );
}

#[tokio::test]
async fn connection_open_to_a_missing_vhost_is_refused_with_530() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    raw.send(HEADER).await;
    raw.method().await.expect("start");
    raw.start_ok("guest", "guest", true).await;
    raw.method().await.expect("tune");
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 0,
        })),
    )
    .await;
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "no-such-vhost".into(),
        })),
    )
    .await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(530, "NOT_ALLOWED - vhost no-such-vhost not found", 10, 40)
    );
}

#[tokio::test]
async fn oversized_frame_is_refused_from_its_header_alone() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    // A method frame header announcing 1,000,000 bytes; the payload is never sent.
    raw.send(&[1, 0, 1, 0, 0x0F, 0x42, 0x40]).await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(
            501,
            "FRAME_ERROR - type 1, all octets = <<>>: {frame_too_large,1000000,131064}",
            0,
            0
        )
    );
    assert!(raw.closed().await);
}

#[tokio::test]
async fn bad_frame_end_octet_is_a_frame_error() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    // channel.open for channel 2 with 0x00 where 0xCE belongs.
    raw.send(&[1, 0, 2, 0, 0, 0, 5, 0, 20, 0, 10, 0, 0]).await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(
            501,
            "FRAME_ERROR - type 1, all octets = <<0,20,0,10,0>>: {invalid_frame_end_marker,0}",
            0,
            0
        )
    );
    assert!(raw.closed().await);
}

#[tokio::test]
async fn unknown_frame_type_is_a_frame_error() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.send(b"\x09\x00\x01\x00\x00\x00\x05hello\xce").await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(
            501,
            "FRAME_ERROR - type 9, all octets = <<\"hello\">>: unknown_frame",
            0,
            0
        )
    );
}

#[tokio::test]
async fn content_header_without_a_publish_is_an_unexpected_frame() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.send(&[
        2, 0, 1, 0, 0, 0, 14, 0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0xCE,
    ])
    .await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(
            505,
            "UNEXPECTED_FRAME - expected method frame, got non method frame instead",
            0,
            0
        )
    );
}

#[tokio::test]
async fn publish_followed_by_a_method_is_an_unexpected_frame() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "q".into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .await;
    raw.send_method(1, declare("x")).await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(
            505,
            "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead",
            60,
            40
        )
    );
}

#[tokio::test]
async fn method_on_an_unopened_channel_is_a_channel_error() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.send_method(7, declare("x")).await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(504, "CHANNEL_ERROR - expected 'channel.open'", 50, 10)
    );
}

#[tokio::test]
async fn second_channel_open_is_a_channel_error() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(504, "CHANNEL_ERROR - second 'channel.open' seen", 20, 10)
    );
}

#[tokio::test]
async fn channel_method_on_channel_zero_is_refused() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.send_method(0, declare("x")).await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(
            504,
            "CHANNEL_ERROR - unexpected method in connection state running",
            50,
            10
        )
    );
}

#[tokio::test]
async fn heartbeat_on_a_channel_other_than_zero_is_an_unexpected_frame() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.send(&[8, 0, 1, 0, 0, 0, 0, 0xCE]).await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(505, "UNEXPECTED_FRAME - type 8, all octets = <<>>", 0, 0)
    );
}

#[tokio::test]
async fn unknown_class_or_method_closes_the_connection_with_a_reason() {
    let broker = TestBroker::start().await;
    for (class, method) in [(99u16, 10u16), (60, 99)] {
        let mut raw = Raw::open(&broker).await;
        let mut payload = Vec::new();
        payload.extend_from_slice(&class.to_be_bytes());
        payload.extend_from_slice(&method.to_be_bytes());
        let mut frame = vec![1, 0, 1];
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        frame.push(0xCE);
        raw.send(&frame).await;
        let c = raw.expect_connection_close().await;
        assert_eq!((c.code, c.class_id, c.method_id), (540, class, method));
    }
}

#[tokio::test]
async fn truncated_method_arguments_cannot_be_decoded() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    // queue.declare whose queue name announces 5 bytes but carries 2.
    raw.send(&[1, 0, 1, 0, 0, 0, 9, 0, 50, 0, 10, 0, 0, 5, b'a', b'b', 0xCE])
        .await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(501, "FRAME_ERROR - cannot decode <<0,0,5,97,98>>", 50, 10)
    );
}

#[tokio::test]
async fn garbage_after_the_protocol_header_is_refused() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    raw.send(HEADER).await;
    raw.method().await.expect("start");
    raw.send(&[0xFF; 20]).await;
    // Read as a frame announcing 4 GiB: refused from its header, then closed.
    let mut closed = false;
    while let Some(frame) = raw.frame().await {
        if let AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) = frame
        {
            assert_eq!(c.reply_code, 501);
            closed = raw.closed().await;
            break;
        }
    }
    assert!(closed);
}

#[tokio::test]
async fn silent_client_is_disconnected_after_two_heartbeat_intervals() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    raw.send(HEADER).await;
    raw.method().await.expect("start");
    raw.start_ok("guest", "guest", true).await;
    raw.method().await.expect("tune");
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 2047,
            frame_max: 131072,
            heartbeat: 1,
        })),
    )
    .await;
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    )
    .await;
    raw.method().await.expect("open-ok");
    let started = std::time::Instant::now();
    let mut heartbeats = 0;
    while let Some(frame) = raw.frame().await {
        assert_eq!(frame, AMQPFrame::Heartbeat, "only heartbeats while idle");
        heartbeats += 1;
    }
    let silent_for = started.elapsed();
    assert!(
        heartbeats >= 2,
        "the server sends heartbeats ({heartbeats})"
    );
    assert!(
        silent_for >= Duration::from_millis(1900) && silent_for < Duration::from_secs(8),
        "disconnected after {silent_for:?}"
    );
}

#[tokio::test]
async fn malformed_input_on_one_connection_does_not_disturb_another() {
    let broker = TestBroker::start().await;
    let mut good = Raw::open(&broker).await;
    // A spread of malformed inputs, each on its own connection.
    let inputs: Vec<Vec<u8>> = vec![
        vec![0xCE; 64],
        vec![1, 0, 1, 0, 0, 0, 0, 0xCE],
        vec![2, 0, 0, 0, 0, 0, 3, 1, 2, 3, 0xCE],
        vec![3, 0, 1, 0, 0, 0, 1, 0, 0xCE],
        vec![1, 0xFF, 0xFF, 0, 0, 0, 4, 0, 60, 0, 40, 0xCE],
        (0..=255u8).collect(),
    ];
    for input in inputs {
        let mut bad = Raw::open(&broker).await;
        bad.send(&input).await;
        assert!(bad.closed().await, "broker closes on {input:?}");
    }
    good.send_method(1, declare("")).await;
    let (_, ok) = good
        .method()
        .await
        .expect("declare-ok on the healthy connection");
    assert!(matches!(
        ok,
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))
    ));
}

#[tokio::test]
async fn amqplain_login_is_accepted() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::connect(&broker).await;
    raw.send(HEADER).await;
    raw.method().await.expect("start");
    // AMQPLAIN's response: field-table entries without the table's length prefix.
    let mut response = Vec::new();
    for (k, v) in [("LOGIN", "guest"), ("PASSWORD", "guest")] {
        response.push(k.len() as u8);
        response.extend_from_slice(k.as_bytes());
        response.push(b'S');
        response.extend_from_slice(&(v.len() as u32).to_be_bytes());
        response.extend_from_slice(v.as_bytes());
    }
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "AMQPLAIN".into(),
            response: LongString::from(response),
            locale: "en_US".into(),
        })),
    )
    .await;
    let (_, tune) = raw
        .method()
        .await
        .expect("tune after a good AMQPLAIN login");
    assert!(matches!(
        tune,
        AMQPClass::Connection(connection::AMQPMethod::Tune(_))
    ));
}

#[tokio::test]
async fn channel_flow_active_true_is_acknowledged_and_active_false_closes_with_540() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    raw.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: true })),
    )
    .await;
    let (ch, ok) = raw.method().await.expect("flow-ok");
    assert_eq!(ch, 1);
    assert_eq!(
        ok,
        AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
            active: true
        }))
    );
    // RabbitMQ does not let a client pause its deliveries: the whole connection goes.
    raw.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Flow(channel::Flow { active: false })),
    )
    .await;
    assert_eq!(
        raw.expect_connection_close().await,
        close(540, "NOT_IMPLEMENTED - active=false", 20, 20)
    );
}

fn connection_close() -> Vec<u8> {
    encode(&AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    ))
}

async fn expect_close_ok(raw: &mut Raw, what: &str) {
    let got = raw.method().await;
    assert!(
        matches!(
            got,
            Some((0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))))
        ),
        "{what}: expected connection.close-ok, got {got:?}"
    );
}

/// Several threads of a client may close one connection at once, each sending its own
/// `connection.close` and waiting for its own `close-ok`: RabbitMQ answers every one of them
/// and ignores anything else sent after the first, until the client drops the socket.
#[tokio::test]
async fn every_connection_close_of_a_client_gets_its_close_ok() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    let mut bytes = connection_close();
    bytes.extend_from_slice(&connection_close());
    raw.send(&bytes).await;
    expect_close_ok(&mut raw, "first close").await;
    expect_close_ok(&mut raw, "second close in the same write").await;
    // Frames after the close are ignored; a later close is still answered.
    let mut bytes = encode(&AMQPFrame::Method(
        2,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    ));
    bytes.extend_from_slice(&encode(&AMQPFrame::Method(1, declare("after-close"))));
    bytes.extend_from_slice(&connection_close());
    raw.send(&bytes).await;
    expect_close_ok(&mut raw, "close after other frames").await;
}

/// A `channel.close` racing the connection's close: the connection's close-ok still comes.
#[tokio::test]
async fn connection_close_after_a_channel_close_gets_its_close_ok() {
    let broker = TestBroker::start().await;
    let mut raw = Raw::open(&broker).await;
    let mut bytes = connection_close();
    bytes.extend_from_slice(&encode(&AMQPFrame::Method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    )));
    bytes.extend_from_slice(&connection_close());
    raw.send(&bytes).await;
    expect_close_ok(&mut raw, "first close").await;
    expect_close_ok(&mut raw, "close after channel.close").await;
}

fn publish_frames(channel: u16, routing_key: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = encode(&AMQPFrame::Method(
        channel,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: routing_key.into(),
            mandatory: false,
            immediate: false,
        })),
    ));
    let mut header = vec![2u8];
    header.extend_from_slice(&channel.to_be_bytes());
    header.extend_from_slice(&14u32.to_be_bytes());
    header.extend_from_slice(&[0, 60, 0, 0]);
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0xCE]);
    bytes.extend_from_slice(&header);
    bytes.push(3);
    bytes.extend_from_slice(&channel.to_be_bytes());
    bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
    bytes.extend_from_slice(body);
    bytes.push(0xCE);
    bytes
}

#[tokio::test]
async fn an_alarm_blocks_a_publisher_with_connection_blocked_and_unblocks_it_after() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let mut raw = Raw::open(&broker).await;
    let q = common::unique("blocked");
    raw.send_method(1, declare(&q)).await;
    raw.method().await.expect("declare-ok");
    raw.send(&publish_frames(1, &q, b"first")).await;
    // A round trip: the first publish is handled before the alarm goes on.
    raw.send_method(1, declare(&q)).await;
    raw.method().await.expect("declare-ok");
    let alarms = broker.broker().alarms.clone();
    alarms.set_memory_limit(1);
    raw.send(&publish_frames(1, &q, b"second")).await;
    let (ch, blocked) = raw.method().await.expect("connection.blocked");
    assert_eq!(ch, 0);
    assert_eq!(
        blocked,
        AMQPClass::Connection(connection::AMQPMethod::Blocked(connection::Blocked {
            reason: "low on memory".into()
        }))
    );
    let vhost = broker.broker().vhost("/").expect("vhost");
    assert_eq!(
        vhost.queue(&q).expect("queue").message_count(),
        1,
        "the second publish waits"
    );
    alarms.set_memory_limit(0);
    let (_, unblocked) = raw.method().await.expect("connection.unblocked");
    assert_eq!(
        unblocked,
        AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {}))
    );
    raw.send_method(1, declare(&q)).await;
    let (_, m) = raw.method().await.expect("declare-ok");
    let AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) = m else {
        panic!("expected declare-ok, got {m:?}");
    };
    assert_eq!(
        ok.message_count, 2,
        "the second publish went through after the alarm"
    );
}

#[tokio::test]
async fn a_message_over_the_size_limit_is_refused_from_its_header_before_the_body() {
    let broker = TestBroker::start_with(|c| c.max_message_size = 1024).await;
    if broker.is_external() {
        return;
    }
    let mut raw = Raw::open(&broker).await;
    // The method and the content header announcing 2048 bytes; no body is ever sent.
    let frames = publish_frames(1, "anywhere", &[0u8; 2048]);
    let header_end = frames.len() - (2048 + 8);
    raw.send(&frames[..header_end]).await;
    let (ch, m) = raw.method().await.expect("channel.close");
    assert_eq!(ch, 1);
    let AMQPClass::Channel(channel::AMQPMethod::Close(c)) = m else {
        panic!("expected channel.close, got {m:?}");
    };
    assert_eq!(c.reply_code, 406);
    assert_eq!(
        c.reply_text.as_str(),
        "PRECONDITION_FAILED - message size 2048 is larger than configured max size 1024"
    );
    assert_eq!((c.class_id, c.method_id), (60, 40));
}
