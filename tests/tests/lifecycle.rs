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

/// Runs `warren-broker` with text logs on a pipe and collects what it prints until the AMQP
/// listener is up.
fn text_log_until_started(data_dir: &std::path::Path) -> Vec<u8> {
    text_log_of_session(data_dir, |_| {}, "AMQP listener started")
}

/// Runs `warren-broker` with text logs on a pipe; once the AMQP listener is up, runs
/// `session` with its address, then collects what the broker prints until `until` (or
/// 30 s in all).
fn text_log_of_session(
    data_dir: &std::path::Path,
    session: impl FnOnce(&str),
    until: &str,
) -> Vec<u8> {
    use std::io::Read;
    let mut child = std::process::Command::new(warren_e2e::broker_bin())
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--amqp-listen=127.0.0.1:0",
            "--management-listen=127.0.0.1:0",
            "--prometheus-listen=127.0.0.1:0",
            "--cluster-listen=127.0.0.1:0",
            "--log-format=text",
        ])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn warren-broker");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let read_until = |out: &mut Vec<u8>, wanted: &str| {
        while !String::from_utf8_lossy(out).contains(wanted) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(chunk) => out.extend(chunk),
                Err(_) => return false,
            }
        }
        true
    };
    if read_until(&mut out, "AMQP listener started") {
        let text = String::from_utf8_lossy(&out).into_owned();
        let addr = text
            .split("amqp_addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_default()
            .to_owned();
        session(&addr);
        read_until(&mut out, until);
    }
    let _ = child.kill();
    let mut stderr = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut stderr);
    }
    let _ = child.wait();
    out.extend(stderr);
    out
}

#[test]
fn text_logs_on_a_pipe_carry_no_colour_codes_and_tell_of_the_default_user() {
    let data = tempfile::tempdir().expect("data dir");
    let out = text_log_until_started(data.path());
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("AMQP listener started"), "{text}");
    assert!(
        !out.contains(&0x1b),
        "escape sequences in piped logs: {text}"
    );
    assert!(
        text.contains("created the default user") && text.contains("user=guest"),
        "{text}"
    );
    // Only the first start creates it.
    let again = String::from_utf8_lossy(&text_log_until_started(data.path())).into_owned();
    assert!(!again.contains("created the default user"), "{again}");
}

/// What a client names its connection, or a queue it asks for, cannot forge log lines or send
/// escape sequences to the terminal: text logs show such values escaped.
#[test]
fn client_supplied_text_cannot_forge_log_lines_or_send_escape_sequences() {
    let data = tempfile::tempdir().expect("data dir");
    let out = text_log_of_session(
        data.path(),
        |addr| {
            runtime().block_on(async {
                let conn = tokio::time::timeout(
                    Duration::from_secs(10),
                    Connection::connect(
                        &format!("amqp://guest:guest@{addr}/%2f"),
                        ConnectionProperties::default()
                            .with_connection_name("worker\nFORGED-NAME\x1b[31m".into()),
                    ),
                )
                .await
                .expect("connect in time")
                .expect("connect");
                let ch = conn.create_channel().await.expect("channel");
                let passive = QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                let missing = ch
                    .queue_declare(
                        "q\nFORGED-TEXT\x1b[2J".into(),
                        passive,
                        FieldTable::default(),
                    )
                    .await;
                assert!(missing.is_err());
                conn.close(200, "bye".into()).await.expect("close");
            })
        },
        "connection closed",
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("connection closed"), "{text}");
    assert!(
        text.contains("FORGED-TEXT"),
        "the channel error is logged: {text}"
    );
    assert!(
        !text.lines().any(|l| l.starts_with("FORGED")
            || l.starts_with("\x1b")
            || l.starts_with(" in vhost")),
        "a client's text began a log line: {text}"
    );
    assert!(
        !out.contains(&0x1b),
        "escape sequences in the logs: {text:?}"
    );
}

/// Waits (bounded) for log lines containing every one of `wanted`, each in one line.
fn wait_for_log_lines(broker: &BrokerProcess, log: &mut Vec<String>, wanted: &[&[&str]]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        log.extend(broker.drain_log());
        let missing: Vec<_> = wanted
            .iter()
            .filter(|parts| !log.iter().any(|l| parts.iter().all(|p| l.contains(p))))
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no log line with {missing:?} in:\n{}",
            log.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn connections_channel_errors_api_changes_and_imports_are_logged() {
    let broker = BrokerProcess::start();
    let rt = runtime();
    let api = format!("http://{}", broker.management_addr);
    rt.block_on(async {
        let conn = tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(
                &broker.uri(),
                ConnectionProperties::default().with_connection_name("orders-worker".into()),
            ),
        )
        .await
        .expect("connect in time")
        .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let missing = ch
            .queue_declare("no-such-queue".into(), passive, FieldTable::default())
            .await;
        assert!(missing.is_err());
        let http = reqwest::Client::new();
        // Messages over HTTP change no definition: not logged as changes.
        for (path, body) in [
            (
                "/api/exchanges/%2F/amq.default/publish",
                r#"{"properties":{},"routing_key":"nowhere","payload":"x","payload_encoding":"string"}"#,
            ),
            (
                "/api/queues/%2F/imported-q/get",
                r#"{"count":1,"ackmode":"ack_requeue_true","encoding":"auto"}"#,
            ),
        ] {
            http.post(format!("{api}{path}"))
                .basic_auth("guest", Some("guest"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("POST");
        }
        let put = http
            .put(format!("{api}/api/vhosts/logged-vhost"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("PUT vhost");
        assert_eq!(put.status(), 201);
        let import = http
            .post(format!("{api}/api/definitions"))
            .basic_auth("guest", Some("guest"))
            .header("content-type", "application/json")
            .body(r#"{"queues":[{"name":"imported-q","vhost":"/","durable":true,"auto_delete":false,"arguments":{}}]}"#)
            .send()
            .await
            .expect("import");
        assert!(import.status().is_success(), "{}", import.status());
        conn.close(200, "bye".into()).await.expect("close");
    });
    let mut log = Vec::new();
    wait_for_log_lines(
        &broker,
        &mut log,
        &[
            &[
                "connection opened",
                "\"user\":\"guest\"",
                "\"vhost\":\"/\"",
                "orders-worker",
                "127.0.0.1:",
            ],
            &[
                "channel error",
                "\"code\":404",
                "no-such-queue",
                "\"channel\":1",
            ],
            &[
                "management API change",
                "\"method\":\"PUT\"",
                "/api/vhosts/logged-vhost",
                "\"user\":\"guest\"",
                "\"status\":201",
            ],
            &["definitions imported", "\"queues\":1", "duration_ms"],
            &["connection closed", "orders-worker"],
        ],
    );
    let messaging: Vec<_> = log
        .iter()
        .filter(|l| l.contains("management API") && (l.contains("/publish") || l.contains("/get")))
        .collect();
    assert!(messaging.is_empty(), "{messaging:?}");
}

#[test]
fn drain_says_how_many_clients_it_closed() {
    let broker = BrokerProcess::start();
    let rt = runtime();
    let conn = rt.block_on(connect(&broker.uri()));
    let out = std::process::Command::new(warren_e2e::broker_bin())
        .arg(format!("--management-listen={}", broker.management_addr))
        .arg("drain")
        .output()
        .expect("run warren-broker drain");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("closed 1 client connection"), "{stdout}");
    drop(conn);
}
