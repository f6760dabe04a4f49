//! Delayed exchanges (`x-delayed-message`, the API of RabbitMQ's delayed-message plugin): a
//! message with a positive `x-delay` header is routed that many milliseconds after it was
//! published, by the exchange type `x-delayed-type` names, with `x-delay` negated; persistent
//! delayed messages on a durable exchange survive a restart; a backlog larger than the memory
//! budget goes to disk and still comes due in order. (The plugin is not part of RabbitMQ's
//! Debian package, so with `WARREN_TEST_AMQP_URL` set these tests return at once; `SIGKILL` is
//! in `tests/tests/crash.rs`.)

mod common;

use common::*;
use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer, ExchangeKind};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn channel(b: &TestBroker) -> (lapin::Connection, Channel) {
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    (conn, ch)
}

async fn declare_delayed(ch: &Channel, name: &str, kind: &str, durable: bool) {
    within(
        5,
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions {
                durable,
                ..Default::default()
            },
            args(&[("x-delayed-type", text(kind))]),
        ),
    )
    .await
    .expect("exchange.declare");
}

async fn bound_queue(ch: &Channel, name: &str, exchange: &str, key: &str, durable: bool) {
    let none = FieldTable::default;
    bound_queue_with(ch, name, exchange, key, durable, none(), none()).await;
}

/// A queue with `arguments`, bound with `binding` arguments.
async fn bound_queue_with(
    ch: &Channel,
    name: &str,
    exchange: &str,
    key: &str,
    durable: bool,
    arguments: FieldTable,
    binding: FieldTable,
) {
    within(
        5,
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable,
                ..Default::default()
            },
            arguments,
        ),
    )
    .await
    .expect("queue.declare");
    within(
        5,
        ch.queue_bind(
            name.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            binding,
        ),
    )
    .await
    .expect("queue.bind");
}

/// A connection and channel (with confirms), a delayed exchange routing as `kind` and a
/// queue bound to it with `key`, all durable or not.
async fn setup(
    b: &TestBroker,
    prefix: &str,
    kind: &str,
    key: &str,
    durable: bool,
) -> (lapin::Connection, Channel, String, String) {
    let (conn, ch) = channel(b).await;
    let (x, q) = (unique(prefix), unique("q"));
    declare_delayed(&ch, &x, kind, durable).await;
    bound_queue(&ch, &q, &x, key, durable).await;
    (conn, ch, x, q)
}

/// A no-ack consumer.
async fn auto_ack(ch: &Channel, queue: &str) -> Consumer {
    consume(
        ch,
        queue,
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await
}

fn delayed(ms: i64) -> BasicProperties {
    BasicProperties::default().with_headers(args(&[("x-delay", AMQPValue::LongLongInt(ms))]))
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &str, props: BasicProperties) {
    let confirm = within(
        5,
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            props,
        ),
    )
    .await
    .expect("publish");
    assert!(within(5, confirm).await.expect("confirm").is_ack());
}

async fn body_of(consumer: &mut Consumer) -> String {
    let d = next_delivery(consumer).await;
    String::from_utf8_lossy(&d.data).into_owned()
}

#[tokio::test]
async fn delayed_messages_arrive_after_their_delay_with_it_negated() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return; // RabbitMQ has no delayed exchanges without the plugin
    }
    let (_c, ch, x, q) = setup(&b, "delayed", "direct", "k", false).await;
    let mut consumer = auto_ack(&ch, &q).await;
    let start = Instant::now();
    publish(&ch, &x, "k", "late", delayed(600)).await;
    publish(&ch, &x, "k", "early", delayed(250)).await;
    publish(&ch, &x, "k", "now", BasicProperties::default()).await;
    publish(&ch, &x, "k", "zero", delayed(0)).await;
    publish(&ch, &x, "other-key", "unrouted", delayed(100)).await;
    // No delay, or a delay that is not positive: routed at once.
    assert_eq!(body_of(&mut consumer).await, "now");
    assert_eq!(body_of(&mut consumer).await, "zero");
    assert!(start.elapsed() < Duration::from_millis(200));
    let d = next_delivery(&mut consumer).await;
    let early_at = start.elapsed();
    assert_eq!(&d.data[..], b"early");
    let headers = d.properties.headers().clone().expect("headers");
    assert_eq!(
        headers.inner().get("x-delay"),
        Some(&AMQPValue::LongInt(-250)),
        "x-delay is negated on delivery, as the plugin does"
    );
    assert_eq!(body_of(&mut consumer).await, "late");
    let late_at = start.elapsed();
    assert!(
        early_at >= Duration::from_millis(245),
        "early after {early_at:?}"
    );
    assert!(
        late_at >= Duration::from_millis(595),
        "late after {late_at:?}"
    );
    // Generous bounds for a loaded CI machine; the benchmark measures the real accuracy.
    assert!(
        early_at < Duration::from_millis(1500),
        "early after {early_at:?}"
    );
    assert!(
        late_at < Duration::from_millis(1900),
        "late after {late_at:?}"
    );
    no_delivery(&mut consumer, 300).await;
    b.stop().await;
}

#[tokio::test]
async fn a_delayed_exchange_needs_an_existing_delayed_type() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return; // RabbitMQ has no delayed exchanges without the plugin
    }
    let conn = b.connect().await;
    let must = "PRECONDITION_FAILED - Invalid argument, 'x-delayed-type' must be an existing exchange type";
    let itself = "PRECONDITION_FAILED - Invalid argument, 'x-delayed-message' can't be used for 'x-delayed-type'";
    for (arguments, text_expected) in [
        (FieldTable::default(), must),
        (args(&[("x-delayed-type", AMQPValue::LongInt(1))]), must),
        (
            args(&[("x-delayed-type", text("x-delayed-message"))]),
            itself,
        ),
    ] {
        let ch = within(5, conn.create_channel()).await.expect("channel");
        let res = within(
            5,
            ch.exchange_declare(
                unique("bad").as_str().into(),
                ExchangeKind::Custom("x-delayed-message".into()),
                ExchangeDeclareOptions::default(),
                arguments,
            ),
        )
        .await;
        assert_amqp_error(res, 406, text_expected);
    }
    // A type RabbitMQ does not know closes the connection, as for any unknown exchange type.
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let res = within(
        5,
        ch.exchange_declare(
            unique("bad").as_str().into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions::default(),
            args(&[("x-delayed-type", text("nonsense"))]),
        ),
    )
    .await;
    assert_amqp_error(
        res,
        503,
        "COMMAND_INVALID - invalid exchange type 'nonsense'",
    );
    // Declared again with another delayed type: as in RabbitMQ, only `alternate-exchange` is
    // compared, and the exchange keeps routing as it did.
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let x = unique("delayed");
    declare_delayed(&ch, &x, "topic", false).await;
    declare_delayed(&ch, &x, "direct", false).await;
    // The management API shows its type and arguments.
    let http = common::http::Api::new(&b);
    let shown = http.json(&format!("/api/exchanges/%2f/{x}")).await;
    assert_eq!(shown["type"], "x-delayed-message");
    assert_eq!(shown["arguments"]["x-delayed-type"], "topic");
    let types = http.json("/api/overview").await;
    assert!(
        types["exchange_types"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == "x-delayed-message")
    );
    // And declares one, with the same check.
    http.put(
        &format!("/api/exchanges/%2f/{}", unique("http")),
        r#"{"type":"x-delayed-message","arguments":{"x-delayed-type":"headers"}}"#,
    )
    .await
    .status(201);
    let refused = http
        .put(
            &format!("/api/exchanges/%2f/{}", unique("http")),
            r#"{"type":"x-delayed-message"}"#,
        )
        .await;
    assert_eq!(refused.status.as_u16(), 400, "{}", refused.text);
    b.stop().await;
}

#[tokio::test]
async fn ttls_count_from_when_the_delay_ends() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return; // RabbitMQ has no delayed exchanges without the plugin
    }
    let (_c, ch) = channel(&b).await;
    let x = unique("delayed");
    let q = unique("q");
    declare_delayed(&ch, &x, "direct", false).await;
    let ttl = args(&[("x-message-ttl", AMQPValue::LongInt(400))]);
    bound_queue_with(&ch, &q, &x, "k", false, ttl, FieldTable::default()).await;
    // Delays longer than the TTLs: the messages must still be there right after their delay.
    publish(&ch, &x, "k", "queue-ttl", delayed(600)).await;
    publish(
        &ch,
        &x,
        "k",
        "own-ttl",
        delayed(600).with_expiration("300".into()),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(750)).await;
    assert_eq!(ready_count(&ch, &q).await, 2, "not expired on arrival");
    // And they do expire, counting from their arrival.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(ready_count(&ch, &q).await, 0);
    b.stop().await;
}

#[tokio::test]
async fn delays_past_the_longest_are_no_delay_and_headers_routing_works() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return; // RabbitMQ has no delayed exchanges without the plugin
    }
    let (_c, ch) = channel(&b).await;
    let x = unique("delayed-headers");
    let q = unique("q");
    declare_delayed(&ch, &x, "headers", false).await;
    let matching = args(&[("x-match", text("all")), ("kind", text("order"))]);
    bound_queue_with(&ch, &q, &x, "", false, FieldTable::default(), matching).await;
    let mut consumer = auto_ack(&ch, &q).await;
    let with = |delay: i64, kind: &str| {
        BasicProperties::default().with_headers(args(&[
            ("x-delay", AMQPValue::LongLongInt(delay)),
            ("kind", text(kind)),
        ]))
    };
    let start = Instant::now();
    // Longer than 2^32-1 ms: routed at once, as the plugin does.
    publish(&ch, &x, "", "too-long", with(1 << 33, "order")).await;
    publish(&ch, &x, "", "matching", with(200, "order")).await;
    publish(&ch, &x, "", "not-matching", with(100, "invoice")).await;
    assert_eq!(body_of(&mut consumer).await, "too-long");
    assert!(start.elapsed() < Duration::from_millis(150));
    assert_eq!(body_of(&mut consumer).await, "matching");
    assert!(start.elapsed() >= Duration::from_millis(195));
    no_delivery(&mut consumer, 300).await;
    // The management API's publish delays too.
    let http = common::http::Api::new(&b);
    let answer = http
        .post(
            &format!("/api/exchanges/%2f/{x}/publish"),
            r#"{"routing_key":"","payload":"by-http","payload_encoding":"string","properties":{"headers":{"x-delay":300,"kind":"order"}}}"#,
        )
        .await;
    assert_eq!(answer.status.as_u16(), 200, "{}", answer.text);
    assert_eq!(answer.json()["routed"], true);
    let sent = Instant::now();
    assert_eq!(body_of(&mut consumer).await, "by-http");
    assert!(sent.elapsed() >= Duration::from_millis(250));
    b.stop().await;
}

#[tokio::test]
async fn deleting_a_vhost_deletes_its_delayed_messages() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return; // RabbitMQ has no delayed exchanges without the plugin
    }
    let http = common::http::Api::new(&b);
    let vhost = unique("vh");
    http.put(&format!("/api/vhosts/{vhost}"), "{}")
        .await
        .status(201);
    http.put(
        &format!("/api/permissions/{vhost}/guest"),
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )
    .await;
    let conn = TestBroker::connect_uri(&b.uri_with_vhost(&vhost)).await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let x = unique("delayed");
    declare_delayed(&ch, &x, "direct", true).await;
    publish(&ch, &x, "k", "waits", delayed(60_000).with_delivery_mode(2)).await;
    let root = b.data_dir().join("delayed");
    let dirs = || std::fs::read_dir(&root).map_or(0, |d| d.count());
    assert_eq!(dirs(), 1, "the vhost's delayed messages are on disk");
    http.delete(&format!("/api/vhosts/{vhost}"))
        .await
        .status(204);
    assert_eq!(dirs(), 0, "and gone with the vhost");
    b.stop().await;
}

#[tokio::test]
async fn the_delayed_type_decides_the_routing() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return; // RabbitMQ has no delayed exchanges without the plugin
    }
    let (_c, ch, x, q) = setup(&b, "delayed-topic", "topic", "orders.*", false).await;
    let mut consumer = auto_ack(&ch, &q).await;
    publish(&ch, &x, "orders.created", "match", delayed(100)).await;
    publish(&ch, &x, "users.created", "no-match", delayed(50)).await;
    // CC keys are kept with the message and routed when it is due.
    let cc = BasicProperties::default().with_headers(args(&[
        ("x-delay", AMQPValue::LongInt(150)),
        ("CC", AMQPValue::FieldArray(vec![text("orders.cc")].into())),
    ]));
    publish(&ch, &x, "nowhere", "by-cc", cc).await;
    assert_eq!(body_of(&mut consumer).await, "match");
    assert_eq!(body_of(&mut consumer).await, "by-cc");
    no_delivery(&mut consumer, 300).await;
    b.stop().await;
}

#[tokio::test]
async fn mandatory_delayed_messages_are_not_returned_and_a_deleted_exchange_drops_them() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return; // RabbitMQ has no delayed exchanges without the plugin
    }
    let (_c, ch, x, q) = setup(&b, "delayed", "direct", "k", false).await;
    let mut returns = 0;
    let confirm = within(
        5,
        ch.basic_publish(
            x.as_str().into(),
            "k".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"kept",
            delayed(100),
        ),
    )
    .await
    .expect("publish");
    let confirmation = within(5, confirm).await.expect("confirm");
    assert!(confirmation.is_ack());
    if confirmation.take_message().is_some() {
        returns += 1;
    }
    assert_eq!(returns, 0, "a scheduled message counts as routed");
    publish(&ch, &x, "k", "dropped", delayed(400)).await;
    let mut consumer = auto_ack(&ch, &q).await;
    assert_eq!(body_of(&mut consumer).await, "kept");
    within(
        5,
        ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default()),
    )
    .await
    .expect("exchange.delete");
    no_delivery(&mut consumer, 700).await;
    b.stop().await;
}

#[tokio::test]
async fn dead_letters_wait_their_delay_in_a_delayed_exchange() {
    // The retry-with-backoff pattern: rejected messages go to a delayed exchange, which
    // brings them back after their x-delay.
    let b = TestBroker::start().await;
    if b.is_external() {
        return; // RabbitMQ has no delayed exchanges without the plugin
    }
    let (_c, ch) = channel(&b).await;
    let x = unique("retry");
    let work = unique("work");
    let later = unique("later");
    declare_delayed(&ch, &x, "fanout", false).await;
    within(
        5,
        ch.queue_declare(
            work.as_str().into(),
            QueueDeclareOptions::default(),
            args(&[("x-dead-letter-exchange", text(&x))]),
        ),
    )
    .await
    .expect("queue.declare");
    bound_queue(&ch, &later, &x, "", false).await;
    publish(&ch, "", &work, "retry-me", delayed(400)).await;
    let mut worker = consume(&ch, &work, BasicConsumeOptions::default()).await;
    let d = next_delivery(&mut worker).await;
    let rejected_at = Instant::now();
    within(
        5,
        ch.basic_nack(
            d.delivery_tag,
            BasicNackOptions {
                requeue: false,
                ..Default::default()
            },
        ),
    )
    .await
    .expect("nack");
    let mut retries = auto_ack(&ch, &later).await;
    let d = next_delivery(&mut retries).await;
    assert_eq!(&d.data[..], b"retry-me");
    let waited = rejected_at.elapsed();
    assert!(
        waited >= Duration::from_millis(380),
        "came back after {waited:?}"
    );
    let headers = d.properties.headers().clone().expect("headers");
    assert!(headers.inner().contains_key("x-death"));
    b.stop().await;
}

#[tokio::test]
async fn persistent_delayed_messages_survive_a_restart() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return; // RabbitMQ has no delayed exchanges without the plugin
    }
    let (c, ch) = channel(&b).await;
    let x = unique("delayed");
    let q = unique("q");
    declare_delayed(&ch, &x, "direct", true).await;
    bound_queue(&ch, &q, &x, "k", true).await;
    for i in 0..20 {
        let props = delayed(1500).with_delivery_mode(2);
        publish(&ch, &x, "k", &format!("p{i}"), props).await;
    }
    for i in 0..5 {
        publish(&ch, &x, "k", &format!("t{i}"), delayed(1500)).await;
    }
    drop(ch);
    drop(c);
    let b = b.restart().await;
    let (_c, ch) = channel(&b).await;
    let mut consumer = auto_ack(&ch, &q).await;
    let mut got = Vec::new();
    for _ in 0..20 {
        got.push(body_of(&mut consumer).await);
    }
    let expected: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
    assert_eq!(got, expected, "persistent ones, in publish order");
    // Transient delayed messages are gone with the restart, as transient messages are.
    no_delivery(&mut consumer, 500).await;
    b.stop().await;
}

#[tokio::test]
async fn a_backlog_beyond_memory_goes_to_disk_and_comes_due_in_order() {
    let b = TestBroker::start_with(|c| c.delayed_memory_bytes = 64 * 1024).await;
    if b.is_external() {
        return; // RabbitMQ has no delayed exchanges without the plugin
    }
    let (_c, ch, x, q) = setup(&b, "delayed", "direct", "k", true).await;
    const N: u64 = 2000;
    let mut confirms = Vec::new();
    for i in 0..N {
        // Delays between 1.5 and 3.5 s, interleaved so that each run holds a spread.
        let delay = 1500 + (i * 7919) % 2000;
        let due = now_ms() + delay;
        let body = format!("{i}:{due}:{}", "x".repeat(100));
        let props = delayed(delay as i64).with_delivery_mode(2);
        confirms.push(
            within(
                5,
                ch.basic_publish(
                    x.as_str().into(),
                    "k".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                ),
            )
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        assert!(within(10, c).await.expect("confirm").is_ack());
    }
    // Spilled: run files on disk, and the store holds far less than the backlog in memory.
    let runs = std::fs::read_dir(b.data_dir().join("delayed"))
        .unwrap()
        .flat_map(|d| std::fs::read_dir(d.unwrap().path()).unwrap())
        .filter(|f| {
            f.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("run-")
        })
        .count();
    assert!(runs >= 2, "expected runs on disk, found {runs}");
    // Every one of them is counted as waiting.
    let url = format!("http://{}/metrics", b.running().prometheus_addr);
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let waiting = text
        .lines()
        .find_map(|l| l.strip_prefix("warren_delayed_messages "))
        .expect("warren_delayed_messages in /metrics");
    assert_eq!(waiting.trim().parse::<f64>().unwrap(), N as f64);
    let mut consumer = auto_ack(&ch, &q).await;
    let mut last_due = 0;
    let mut seen = std::collections::HashSet::new();
    let mut late = 0;
    while (seen.len() as u64) < N {
        let d = within(10, consumer.next())
            .await
            .expect("consumer open")
            .expect("delivery");
        let arrived = now_ms();
        let text = String::from_utf8_lossy(&d.data).into_owned();
        let mut parts = text.split(':');
        let id: u64 = parts.next().unwrap().parse().unwrap();
        let due: u64 = parts.next().unwrap().parse().unwrap();
        assert!(seen.insert(id), "message {id} delivered twice");
        // The test reads its clock before each publish and the broker on arrival: pipelined
        // publishes reach it a few milliseconds apart from what the test's clock says.
        assert!(
            due + 50 >= last_due,
            "message {id} due {due} came after one due {last_due}"
        );
        // The due time is taken by the broker a moment after the test's clock read.
        assert!(
            arrived + 5 >= due,
            "message {id} arrived {}ms early",
            due - arrived
        );
        if arrived > due + 1000 {
            late += 1;
        }
        last_due = last_due.max(due);
    }
    assert_eq!(late, 0, "messages more than a second late");
    b.stop().await;
}
