//! Hostile input on the wire and in names: field tables nested deep enough to overflow a
//! recursive parser, before login and after, and what is accepted must read back after a
//! restart. Frames are built by hand here, since the generated encoder recurses too.

mod common;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, basic, connection, queue};
use common::TestBroker;
use common::http::Api;
use common::raw::{Close, HEADER, Raw};
use serde_json::{Value, json};

/// The deepest nesting the broker accepts (the outermost table is level 1).
const LIMIT: usize = 32;

fn close(code: u16, text: &str, class_id: u16, method_id: u16) -> Close {
    Close {
        code,
        text: text.to_owned(),
        class_id,
        method_id,
    }
}

fn too_deep(class_id: u16, method_id: u16) -> Close {
    close(
        501,
        "FRAME_ERROR - field table nested deeper than 32 levels",
        class_id,
        method_id,
    )
}

/// A field table nested `depth` levels deep: tables in tables, or arrays in arrays under the
/// outermost table. Built in one pass, outside in, so that 100,000 levels cost no recursion.
fn nested(depth: usize, arrays: bool) -> Vec<u8> {
    let entry = |level: usize| -> &'static [u8] {
        match (arrays, level) {
            (true, 1) => b"\x01kA",
            (true, _) => b"A",
            (false, _) => b"\x01kF",
        }
    };
    let mut lengths = vec![0u32; depth + 1];
    for level in (1..depth).rev() {
        lengths[level] = (entry(level).len() + 4) as u32 + lengths[level + 1];
    }
    let mut out = Vec::with_capacity(lengths[1] as usize + 4);
    for (level, length) in lengths.iter().enumerate().take(depth).skip(1) {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(entry(level));
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out
}

/// The same nesting as JSON, as the management API takes it.
fn nested_json(depth: usize, arrays: bool) -> Value {
    let mut v = if arrays { json!([]) } else { json!({}) };
    for _ in 2..depth {
        v = if arrays {
            json!([v])
        } else {
            json!({ "k": v })
        };
    }
    if depth > 1 { json!({ "k": v }) } else { v }
}

fn short(s: &str) -> Vec<u8> {
    let mut out = vec![s.len() as u8];
    out.extend_from_slice(s.as_bytes());
    out
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![kind];
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
    out
}

/// A method frame from its ids and its argument bytes.
fn method(channel: u16, class_id: u16, method_id: u16, parts: &[&[u8]]) -> Vec<u8> {
    let mut payload = class_id.to_be_bytes().to_vec();
    payload.extend_from_slice(&method_id.to_be_bytes());
    for p in parts {
        payload.extend_from_slice(p);
    }
    frame(1, channel, &payload)
}

fn start_ok(client_properties: &[u8]) -> Vec<u8> {
    let response = b"\0guest\0guest";
    let mut long = (response.len() as u32).to_be_bytes().to_vec();
    long.extend_from_slice(response);
    method(
        0,
        10,
        11,
        &[client_properties, &short("PLAIN"), &long, &short("en_US")],
    )
}

fn queue_declare(name: &str, durable: bool, arguments: &[u8]) -> Vec<u8> {
    let bits = if durable { 2 } else { 8 }; // durable, or auto-delete
    method(1, 50, 10, &[&[0, 0], &short(name), &[bits], arguments])
}

/// `basic.publish` to the default exchange with `headers`, and an empty body.
fn publish_with_headers(queue: &str, headers: &[u8]) -> Vec<u8> {
    let mut out = method(1, 60, 40, &[&[0, 0], &short(""), &short(queue), &[0]]);
    let mut header = vec![0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0];
    header.extend_from_slice(headers);
    out.extend_from_slice(&frame(2, 1, &header));
    out
}

/// Sends the protocol header and waits for `connection.start`.
async fn greeted(broker: &TestBroker) -> Raw {
    let mut raw = Raw::connect(broker).await;
    raw.send(HEADER).await;
    let (_, start) = raw.method().await.expect("connection.start");
    assert!(matches!(
        start,
        AMQPClass::Connection(connection::AMQPMethod::Start(_))
    ));
    raw
}

/// A broker whose frames can carry 100,000 levels of nesting.
async fn roomy_broker() -> TestBroker {
    TestBroker::start_with(|c| c.frame_max = 1 << 20).await
}

#[tokio::test]
async fn client_properties_nested_past_the_limit_are_refused_before_login() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return; // RabbitMQ sets no limit
    }
    let mut raw = greeted(&broker).await;
    raw.send(&start_ok(&nested(LIMIT, false))).await;
    let (_, tune) = raw.method().await.expect("connection.tune");
    assert!(matches!(
        tune,
        AMQPClass::Connection(connection::AMQPMethod::Tune(_))
    ));
    // Past the limit, and as far past it as a frame before tuning (128 KiB) allows.
    for (depth, arrays) in [(LIMIT + 1, false), (LIMIT + 1, true), (26_000, true)] {
        let mut raw = greeted(&broker).await;
        raw.send(&start_ok(&nested(depth, arrays))).await;
        assert_eq!(
            raw.expect_connection_close().await,
            too_deep(10, 11),
            "{depth} levels"
        );
    }
    // The broker is still there.
    Raw::open(&broker).await;
}

#[tokio::test]
async fn arguments_nested_past_the_limit_are_refused() {
    let broker = roomy_broker().await;
    if broker.is_external() {
        return;
    }
    let mut raw = Raw::open(&broker).await;
    raw.send(&queue_declare("nest-ok", false, &nested(LIMIT, true)))
        .await;
    let (_, ok) = raw.method().await.expect("queue.declare-ok");
    assert!(matches!(
        ok,
        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(_))
    ));
    let deep = nested(100_000, true);
    let deep_tables = nested(100_000, false);
    let cases: Vec<(Vec<u8>, u16, u16)> = vec![
        (
            queue_declare("nest", false, &nested(LIMIT + 1, false)),
            50,
            10,
        ),
        (queue_declare("nest", false, &deep), 50, 10),
        (queue_declare("nest", false, &deep_tables), 50, 10),
        (
            method(
                1,
                40,
                10,
                &[&[0, 0], &short("nest-x"), &short("headers"), &[0], &deep],
            ),
            40,
            10,
        ),
        (
            method(
                1,
                50,
                20,
                &[
                    &[0, 0],
                    &short("nest-ok"),
                    &short("amq.headers"),
                    &short(""),
                    &[0],
                    &deep_tables,
                ],
            ),
            50,
            20,
        ),
        (
            method(
                1,
                50,
                50,
                &[
                    &[0, 0],
                    &short("nest-ok"),
                    &short("amq.headers"),
                    &short(""),
                    &deep,
                ],
            ),
            50,
            50,
        ),
        (
            method(
                1,
                40,
                30,
                &[
                    &[0, 0],
                    &short("amq.fanout"),
                    &short("amq.headers"),
                    &short(""),
                    &[0],
                    &deep,
                ],
            ),
            40,
            30,
        ),
        (
            method(
                1,
                60,
                20,
                &[&[0, 0], &short("nest-ok"), &short(""), &[0], &deep],
            ),
            60,
            20,
        ),
    ];
    for (bytes, class_id, method_id) in cases {
        let mut raw = Raw::open(&broker).await;
        raw.send(&bytes).await;
        assert_eq!(
            raw.expect_connection_close().await,
            too_deep(class_id, method_id)
        );
    }
}

#[tokio::test]
async fn message_headers_nested_past_the_limit_are_refused() {
    let broker = roomy_broker().await;
    if broker.is_external() {
        return;
    }
    let mut raw = Raw::open(&broker).await;
    raw.send(&queue_declare("nest-h", false, &nested(1, false)))
        .await;
    raw.method().await.expect("queue.declare-ok");
    raw.send(&publish_with_headers("nest-h", &nested(LIMIT, true)))
        .await;
    raw.send(&method(1, 60, 70, &[&[0, 0], &short("nest-h"), &[1]]))
        .await;
    let (_, got) = raw.method().await.expect("basic.get-ok");
    assert!(
        matches!(got, AMQPClass::Basic(basic::AMQPMethod::GetOk(_))),
        "{got:?}"
    );
    let Some(AMQPFrame::Header(1, header)) = raw.frame().await else {
        panic!("expected the message's content header");
    };
    assert!(header.properties.headers().is_some());
    for (depth, arrays) in [(LIMIT + 1, false), (100_000, true), (100_000, false)] {
        let mut raw = Raw::open(&broker).await;
        raw.send(&publish_with_headers("nest-h", &nested(depth, arrays)))
            .await;
        assert_eq!(
            raw.expect_connection_close().await,
            close(501, "FRAME_ERROR - malformed content header frame", 60, 40),
            "{depth} levels"
        );
    }
}

#[tokio::test]
async fn management_api_refuses_arguments_nested_past_the_limit() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let api = Api::new(&broker);
    api.put("/api/queues/%2F/nest-q", "{}").await.status(201);
    for arrays in [false, true] {
        let deep = nested_json(LIMIT + 1, arrays);
        let expected =
            "invalid value for 'k' in 'arguments': tables and arrays nested deeper than 32 levels";
        let body = json!({ "arguments": deep });
        let answer = api
            .put("/api/queues/%2F/nest-http", &body.to_string())
            .await;
        assert_eq!(answer.error(400, "bad_request"), expected);
        let body = json!({ "type": "headers", "arguments": deep });
        let answer = api
            .put("/api/exchanges/%2F/nest-http", &body.to_string())
            .await;
        assert_eq!(answer.error(400, "bad_request"), expected);
        let body = json!({ "routing_key": "", "arguments": deep });
        let answer = api
            .post(
                "/api/bindings/%2F/e/amq.headers/q/nest-q",
                &body.to_string(),
            )
            .await;
        assert_eq!(answer.error(400, "bad_request"), expected);
    }
    for path in ["/api/queues/%2F/nest-http", "/api/exchanges/%2F/nest-http"] {
        api.get(path).await.status(404);
    }
}

/// A durable queue declared with arguments at the limit, over AMQP and over HTTP, is back
/// after a restart with the same arguments.
#[tokio::test]
async fn arguments_at_the_limit_survive_a_restart() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let mut raw = Raw::open(&broker).await;
    for (name, arrays) in [("deep-amqp-t", false), ("deep-amqp-a", true)] {
        raw.send(&queue_declare(name, true, &nested(LIMIT, arrays)))
            .await;
        raw.method().await.expect("queue.declare-ok");
    }
    drop(raw);
    let api = Api::new(&broker);
    for (name, arrays) in [("deep-http-t", false), ("deep-http-a", true)] {
        let body = json!({ "durable": true, "arguments": nested_json(LIMIT, arrays) });
        api.put(&format!("/api/queues/%2F/{name}"), &body.to_string())
            .await
            .status(201);
    }
    // 61 levels of tables once made a definitions file that no restart could read.
    let mut raw = Raw::open(&broker).await;
    raw.send(&queue_declare("deep-61", true, &nested(61, false)))
        .await;
    assert_eq!(raw.expect_connection_close().await, too_deep(50, 10));
    let body = json!({ "durable": true, "arguments": nested_json(61, false) });
    api.put("/api/queues/%2F/deep-61", &body.to_string())
        .await
        .error(400, "bad_request");
    let broker = broker.restart().await;
    let api = Api::new(&broker);
    api.get("/api/queues/%2F/deep-61").await.status(404);
    for (name, arrays) in [
        ("deep-amqp-t", false),
        ("deep-amqp-a", true),
        ("deep-http-t", false),
        ("deep-http-a", true),
    ] {
        let q = api.json(&format!("/api/queues/%2F/{name}")).await;
        assert_eq!(q["arguments"], nested_json(LIMIT, arrays), "{name}");
    }
}

/// A NaN or infinite float in arguments, or a policy value nested past the limit, once made a
/// definitions file that no restart could read: they are refused.
#[tokio::test]
async fn what_definitions_json_cannot_hold_is_refused() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    for bad in [f64::NAN, f64::INFINITY] {
        let mut arguments = 11u32.to_be_bytes().to_vec();
        arguments.extend_from_slice(&[1, b'n', b'd']);
        arguments.extend_from_slice(&bad.to_be_bytes());
        let mut raw = Raw::open(&broker).await;
        raw.send(&queue_declare("nan", true, &arguments)).await;
        let close = raw.expect_connection_close().await;
        assert_eq!(
            (close.code, close.class_id, close.method_id),
            (501, 50, 10),
            "{close:?}"
        );
        assert!(
            close.text.starts_with("FRAME_ERROR - cannot decode"),
            "{close:?}"
        );
    }
    let api = Api::new(&broker);
    let body =
        json!({ "pattern": "^p", "definition": { "ha-params": nested_json(LIMIT + 1, true) } });
    let reason = api
        .put("/api/policies/%2F/deep", &body.to_string())
        .await
        .error(400, "bad_request");
    assert_eq!(
        reason,
        "Validation failed\n\n<<\"ha-params\">> nests lists and objects deeper than 32 levels\n"
    );
    let body = json!({ "pattern": "^p", "definition": { "ha-params": nested_json(LIMIT, true) } });
    api.put("/api/policies/%2F/deep", &body.to_string())
        .await
        .status(201);
    let broker = broker.restart().await;
    let api = Api::new(&broker);
    api.get("/api/policies/%2F/deep").await.status(200);
    api.get("/api/queues/%2F/nan").await.status(404);
}

/// Publishes `n` persistent messages to `queue` through the default exchange, with priorities
/// 0 to 5 in turn, and waits for every confirm.
async fn publish_persistent(conn: &lapin::Connection, queue: &str, n: usize) {
    use lapin::BasicProperties;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirm.select");
    let mut confirms = Vec::new();
    for i in 0..n {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority((i % 6) as u8);
        let c = ch
            .basic_publish("".into(), queue.into(), Default::default(), b"m", props)
            .await
            .expect("basic.publish");
        confirms.push(c);
    }
    for c in confirms {
        let c = common::within(5, c).await.expect("confirm");
        assert!(c.is_ack(), "{c:?}");
    }
}

async fn declare_durable(ch: &lapin::Channel, name: &str, arguments: lapin::types::FieldTable) {
    ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        arguments,
    )
    .await
    .expect("queue.declare");
}

fn max_priority(n: i32) -> lapin::types::FieldTable {
    common::args(&[("x-max-priority", lapin::types::AMQPValue::LongInt(n))])
}

/// Store directories are named from the vhost, the queue and the priority level: names that
/// would join to the same bytes must not share one.
#[tokio::test]
async fn queues_whose_names_join_alike_keep_their_messages_apart() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_durable(&ch, "a\0q", Default::default()).await;
    publish_persistent(&conn, "a\0q", 100).await;
    declare_durable(&ch, "p", max_priority(5)).await;
    publish_persistent(&conn, "p", 100).await;
    // Queue `q` in vhost `/\0a`, and queues named after the levels of `p`.
    let api = Api::new(&broker);
    api.put("/api/vhosts/%2F%00a", "{}").await.status(201);
    api.put("/api/queues/%2F%00a/q", r#"{"durable":true}"#)
        .await
        .status(201);
    for level in 1..=5u8 {
        declare_durable(&ch, &format!("p\0{}", level as char), Default::default()).await;
    }
    let _ = conn.close(200, "OK".into()).await;
    let broker = broker.restart().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(common::ready_count(&ch, "a\0q").await, 100);
    assert_eq!(common::ready_count(&ch, "p").await, 100);
    for level in 1..=5u8 {
        assert_eq!(
            common::ready_count(&ch, &format!("p\0{}", level as char)).await,
            0
        );
    }
}

/// The store directory name that versions before length-prefixed names gave a queue.
fn legacy_dir_name(vhost: &str, queue: &str, level: u8) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(vhost.as_bytes());
    h.update([0]);
    h.update(queue.as_bytes());
    if level > 0 {
        h.update([0, level]);
    }
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A data directory written by an earlier version, whose store directories have the old
/// names, still has its messages after the upgrade, whatever their `queue.json` says: in
/// the format of versions before priority queues (no `priority`), or empty (cut short by
/// a crash).
#[tokio::test]
async fn stores_under_legacy_directory_names_are_recovered() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_durable(&ch, "plain", Default::default()).await;
    publish_persistent(&conn, "plain", 100).await;
    declare_durable(&ch, "prio", max_priority(5)).await;
    publish_persistent(&conn, "prio", 100).await;
    let _ = conn.close(200, "OK".into()).await;
    let broker = broker
        .restart_editing(|data| {
            let queues = data.join("queues");
            let mut renamed = 0;
            for entry in std::fs::read_dir(&queues).unwrap() {
                let path = entry.unwrap().path();
                let owner: Value =
                    serde_json::from_slice(&std::fs::read(path.join("queue.json")).unwrap())
                        .unwrap();
                let legacy = legacy_dir_name(
                    owner["vhost"].as_str().unwrap(),
                    owner["queue"].as_str().unwrap(),
                    owner["priority"].as_u64().unwrap() as u8,
                );
                let level = owner["priority"].as_u64().unwrap();
                let old_format = if level == 0 && owner["queue"] == "prio" {
                    // What versions before priority queues wrote.
                    format!(
                        "{{\"vhost\":{},\"queue\":{}}}\n",
                        owner["vhost"], owner["queue"]
                    )
                } else {
                    String::new()
                };
                std::fs::write(path.join("queue.json"), old_format).unwrap();
                std::fs::rename(&path, queues.join(legacy)).unwrap();
                renamed += 1;
            }
            assert!(
                renamed >= 2,
                "one store for `plain`, one or more for `prio`"
            );
        })
        .await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(common::ready_count(&ch, "plain").await, 100);
    assert_eq!(common::ready_count(&ch, "prio").await, 100);
    // And once more: the renamed stores are found under their current names.
    let _ = conn.close(200, "OK".into()).await;
    let broker = broker.restart().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(common::ready_count(&ch, "prio").await, 100);
}

/// Names longer than an AMQP short string are refused over HTTP, as RabbitMQ refuses long
/// queue names; exchange and vhost names too, since no AMQP client could use them.
#[tokio::test]
async fn management_api_refuses_names_longer_than_amqp_allows() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let api = Api::new(&broker);
    let long = "n".repeat(256);
    let cases = [
        ("queue", format!("/api/queues/%2F/{long}"), "{}".to_owned()),
        (
            "exchange",
            format!("/api/exchanges/%2F/{long}"),
            r#"{"type":"direct"}"#.to_owned(),
        ),
        ("vhost", format!("/api/vhosts/{long}"), "{}".to_owned()),
    ];
    for (what, path, body) in &cases {
        let reason = api.put(path, body).await.error(400, "bad_request");
        assert_eq!(
            reason,
            format!("{what} should be less than 255 bytes, actually was 256\n")
        );
        api.get(path).await.status(404);
    }
    let huge = "q".repeat(10_000);
    api.put(&format!("/api/queues/%2F/{huge}"), "{}")
        .await
        .error(400, "bad_request");
    // 255 bytes is a name AMQP can carry.
    let most = "m".repeat(255);
    api.put(&format!("/api/queues/%2F/{most}"), "{}")
        .await
        .status(201);
    // So is a definitions import.
    let defs = json!({
        "queues": [{ "name": long, "vhost": "/", "durable": true, "auto_delete": false,
                     "arguments": {} }]
    });
    let reason = api
        .post("/api/definitions", &defs.to_string())
        .await
        .error(400, "bad_request");
    assert_eq!(
        reason,
        "queue should be less than 255 bytes, actually was 256\n"
    );
}

/// A user name travels in SASL PLAIN's long string, not a short string: one over 255 bytes
/// is accepted over HTTP and in a definitions import, and logs in, as with RabbitMQ.
#[tokio::test]
async fn user_names_longer_than_a_short_string_are_accepted_and_log_in() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let api = Api::new(&broker);
    let user = "u".repeat(300);
    api.put(
        &format!("/api/users/{user}"),
        r#"{"password":"p","tags":""}"#,
    )
    .await
    .status(201);
    api.put(
        &format!("/api/permissions/%2F/{user}"),
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )
    .await
    .status(201);
    let conn = TestBroker::connect_uri(&broker.uri_with_credentials(&user, "p")).await;
    assert!(conn.status().connected());
    let _ = conn.close(200, "OK".into()).await;
    let imported = "i".repeat(300);
    let defs = json!({
        "users": [{ "name": imported, "password_hash": "tNw9BXnU5veYiV/gu8OUTGBmm7uRqk2TBKso8QfEeRBHaum6", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": "" }]
    });
    api.post("/api/definitions", &defs.to_string())
        .await
        .status(204);
    api.get(&format!("/api/users/{imported}")).await.status(200);
}

/// RabbitMQ drops `\n` and `\r` from the exchange and queue names of declare, delete, bind
/// and unbind, but not from those of publish, get, consume or purge.
#[tokio::test]
async fn line_feeds_and_returns_are_dropped_from_declared_names() {
    use common::{assert_amqp_error, exchange_exists, queue_exists, unique};
    use lapin::ExchangeKind;
    use lapin::options::*;
    use lapin::types::FieldTable;
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let x = unique("exchange");
    let q = unique("queue");
    ch.exchange_declare(
        format!("{x}\n_test\n").as_str().into(),
        ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange.declare");
    for name in [format!("{x}_test"), format!("\r{x}_test")] {
        ch.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive exchange.declare");
    }
    let x = format!("{x}_test");
    let ok = ch
        .queue_declare(
            format!("{q}\r\n").as_str().into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("queue.declare");
    assert_eq!(ok.name().as_str(), q);
    ch.queue_declare(
        format!("\n{q}").as_str().into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive queue.declare");
    ch.queue_bind(
        format!("{q}\n").as_str().into(),
        format!("{x}\r").as_str().into(),
        "k".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue.bind");
    ch.queue_unbind(
        format!("\r{q}").as_str().into(),
        format!("\n{x}").as_str().into(),
        "k".into(),
        FieldTable::default(),
    )
    .await
    .expect("queue.unbind");
    ch.exchange_bind(
        format!("{x}\n").as_str().into(),
        "amq.direct\r".into(),
        "k".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange.bind");
    ch.exchange_unbind(
        format!("\n{x}").as_str().into(),
        "\namq.direct".into(),
        "k".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange.unbind");
    // Publish, get, consume and purge take the name as it is.
    let no_queue = format!("NOT_FOUND - no queue '{q}\n' in vhost '/'");
    let ch2 = conn.create_channel().await.unwrap();
    assert_amqp_error(
        ch2.basic_get(format!("{q}\n").as_str().into(), Default::default())
            .await,
        404,
        &no_queue,
    );
    let ch2 = conn.create_channel().await.unwrap();
    assert_amqp_error(
        ch2.queue_purge(format!("{q}\n").as_str().into(), Default::default())
            .await,
        404,
        &no_queue,
    );
    let ch2 = conn.create_channel().await.unwrap();
    assert_amqp_error(
        ch2.basic_consume(
            format!("{q}\n").as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
        404,
        &no_queue,
    );
    let publisher = broker.connect().await;
    let mut errs = common::errors(&publisher);
    let ch2 = publisher.create_channel().await.unwrap();
    ch2.basic_publish(
        format!("{x}\n").as_str().into(),
        "k".into(),
        Default::default(),
        b"m",
        Default::default(),
    )
    .await
    .expect("basic.publish is sent");
    assert_eq!(
        errs.next().await,
        (404, format!("NOT_FOUND - no exchange '{x}\n' in vhost '/'"))
    );
    // Delete finds the stripped names.
    ch.queue_delete(format!("{q}\n").as_str().into(), Default::default())
        .await
        .expect("queue.delete");
    ch.exchange_delete(format!("{x}\r").as_str().into(), Default::default())
        .await
        .expect("exchange.delete");
    assert!(!queue_exists(&conn, &q).await);
    assert!(!exchange_exists(&conn, &x).await);
}

/// Over HTTP too, a declared queue or exchange loses its line feeds and returns, and so do
/// the names a binding is made between; deletes take names as they are (RabbitMQ 3.10 does
/// the same).
#[tokio::test]
async fn management_api_drops_line_feeds_from_declared_names() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let api = Api::new(&broker);
    api.put("/api/queues/%2F/http%0Aq%0D", "{}")
        .await
        .status(201);
    api.get("/api/queues/%2F/httpq").await.status(200);
    api.put("/api/exchanges/%2F/http%0Ax", r#"{"type":"fanout"}"#)
        .await
        .status(201);
    api.get("/api/exchanges/%2F/httpx").await.status(200);
    api.post(
        "/api/bindings/%2F/e/http%0Ax/q/http%0Dq%0A",
        r#"{"routing_key":"k"}"#,
    )
    .await
    .status(201);
    api.get("/api/bindings/%2F/e/httpx/q/httpq/k")
        .await
        .status(200);
    api.delete("/api/bindings/%2F/e/http%0Ax/q/httpq/k")
        .await
        .status(404);
    api.delete("/api/queues/%2F/http%0Aq").await.status(404);
    api.delete("/api/exchanges/%2F/http%0Ax").await.status(404);
    api.delete("/api/queues/%2F/httpq").await.status(204);
}
