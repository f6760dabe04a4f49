//! The broker as an operator runs it: a real process, stopped with SIGTERM and started again
//! on the same data directory.

use futures::StreamExt;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use std::time::Duration;
use warren_e2e::BrokerProcess;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn connect(uri: &str) -> Connection {
    tokio::time::timeout(
        Duration::from_secs(10),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

#[test]
fn sigterm_closes_clients_with_320_and_exits_cleanly() {
    let broker = BrokerProcess::start();
    let rt = runtime();
    let conn = rt.block_on(connect(&broker.uri()));
    let mut events = conn.events_listener();
    let started = std::time::Instant::now();
    // The client keeps running while the broker shuts down, so it reads the close.
    let status = rt
        .block_on(async { tokio::task::spawn_blocking(move || broker.terminate()).await })
        .expect("terminate");
    let took = started.elapsed();
    assert_eq!(status, Some(0), "clean exit on SIGTERM");
    assert!(took < Duration::from_secs(10), "exit took {took:?}");
    let close = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(event) = events.next().await {
                if let lapin::Event::Error(e) = event
                    && let lapin::ErrorKind::ProtocolError(p) = e.kind()
                {
                    return Some((p.get_id(), p.get_message().to_string()));
                }
            }
            None
        })
        .await
        .expect("the client learns the connection is closed")
    });
    assert_eq!(
        close,
        Some((
            320,
            "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'"
                .to_owned()
        )),
        "closed as RabbitMQ closes on shutdown"
    );
    assert!(!conn.status().connected());
}

#[test]
fn durable_topology_and_persistent_messages_survive_a_restart_and_transient_ones_do_not() {
    let data = tempfile::tempdir().expect("data dir");
    let rt = runtime();
    let first = BrokerProcess::start_in(data.path(), &[]);
    rt.block_on(async {
        let conn = connect(&first.uri()).await;
        let ch = conn.create_channel().await.expect("channel");
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare("kept".into(), durable, FieldTable::default())
            .await
            .expect("durable queue");
        ch.queue_declare(
            "gone".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("transient queue");
        ch.exchange_declare(
            "kept-x".into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("durable exchange");
        ch.queue_bind(
            "kept".into(),
            "kept-x".into(),
            "a.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
        ch.confirm_select(Default::default())
            .await
            .expect("confirms");
        for (body, mode) in [(&b"persistent"[..], 2), (&b"transient"[..], 1)] {
            ch.basic_publish(
                "".into(),
                "kept".into(),
                Default::default(),
                body,
                lapin::BasicProperties::default().with_delivery_mode(mode),
            )
            .await
            .expect("publish")
            .await
            .expect("confirmed");
        }
        conn.close(200, "bye".into()).await.expect("close");
    });
    assert_eq!(first.terminate(), Some(0));
    let second = BrokerProcess::start_in(data.path(), &[]);
    rt.block_on(async {
        let conn = connect(&second.uri()).await;
        let ch = conn.create_channel().await.expect("channel");
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let kept = ch
            .queue_declare("kept".into(), passive, FieldTable::default())
            .await
            .expect("durable queue is back");
        assert_eq!(
            kept.message_count(),
            1,
            "only the persistent message is back"
        );
        let got = ch
            .basic_get(
                "kept".into(),
                lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("get")
            .expect("the persistent message");
        assert_eq!(got.delivery.data, b"persistent");
        // The binding is back: a message published to the exchange reaches the queue.
        ch.basic_publish(
            "kept-x".into(),
            "a.b".into(),
            Default::default(),
            b"routed",
            Default::default(),
        )
        .await
        .expect("publish");
        let mut got = None;
        for _ in 0..50 {
            got = ch
                .basic_get("kept".into(), Default::default())
                .await
                .expect("get");
            if got.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(got.expect("routed message").delivery.data, b"routed");
        let missing = ch
            .queue_declare("gone".into(), passive, FieldTable::default())
            .await;
        assert!(missing.is_err(), "transient queue is gone");
    });
}
