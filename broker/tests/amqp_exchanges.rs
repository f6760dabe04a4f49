//! Exchanges: declaration, flags, equivalence, deletion, routing by type, exchange-to-exchange
//! bindings, alternate exchanges, predeclared exchanges, internal exchanges.

mod common;

use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeBindOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, ExchangeUnbindOptions, QueueBindOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, ExchangeKind};

async fn declare(
    ch: &Channel,
    name: &str,
    kind: ExchangeKind,
    options: ExchangeDeclareOptions,
) -> lapin::Result<()> {
    within(
        5,
        ch.exchange_declare(name.into(), kind, options, FieldTable::default()),
    )
    .await
}

async fn delete(ch: &Channel, name: &str) {
    within(5, ch.exchange_delete(name.into(), Default::default()))
        .await
        .expect("exchange.delete");
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    bind_args(ch, queue, exchange, key, FieldTable::default()).await
}

async fn bind_args(ch: &Channel, queue: &str, exchange: &str, key: &str, args: FieldTable) {
    within(
        5,
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            args,
        ),
    )
    .await
    .expect("queue.bind");
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    publish_props(ch, exchange, key, body, BasicProperties::default()).await
}

async fn publish_props(ch: &Channel, exchange: &str, key: &str, body: &[u8], p: BasicProperties) {
    within(
        5,
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            p,
        ),
    )
    .await
    .expect("basic.publish");
}

/// Bodies of every message in `queue`, in order (consumed with no-ack). Publishes on `ch` must
/// have been confirmed, or followed by a synchronous method, before this is reliable.
async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = within(
        5,
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get")
    {
        out.push(String::from_utf8(m.delivery.data).unwrap());
    }
    out
}

/// A channel in confirm mode, so every publish can be awaited until routed.
async fn confirm_channel(conn: &lapin::Connection) -> Channel {
    let ch = within(5, conn.create_channel()).await.expect("channel");
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    ch
}

async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    p: BasicProperties,
) {
    let confirm = within(
        5,
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            p,
        ),
    )
    .await
    .expect("basic.publish");
    let c = within(5, confirm).await.expect("confirm");
    assert!(c.is_ack(), "publish confirmed: {c:?}");
}

#[tokio::test]
async fn declare_each_exchange_type() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    for (label, kind) in [
        ("direct", ExchangeKind::Direct),
        ("fanout", ExchangeKind::Fanout),
        ("topic", ExchangeKind::Topic),
        ("headers", ExchangeKind::Headers),
    ] {
        let name = unique(&format!("x-{label}"));
        declare(&ch, &name, kind.clone(), Default::default())
            .await
            .expect("exchange.declare");
        // Redeclaring with the same type and flags is a no-op.
        declare(&ch, &name, kind, Default::default())
            .await
            .expect("equivalent redeclare");
        assert!(exchange_exists(&conn, &name).await);
        delete(&ch, &name).await;
        assert!(!exchange_exists(&conn, &name).await);
    }
}

#[tokio::test]
async fn declaring_an_unknown_exchange_type_is_refused() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let name = unique("x-badtype");
    let res = declare(
        &ch,
        &name,
        ExchangeKind::Custom("x-no-such-type".into()),
        Default::default(),
    )
    .await;
    assert_amqp_error(
        res,
        503,
        "COMMAND_INVALID - unknown exchange type 'x-no-such-type'",
    );
}

#[tokio::test]
async fn durable_auto_delete_and_internal_flags_are_part_of_equivalence() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let name = unique("x-flags");
    let flags = ExchangeDeclareOptions {
        durable: true,
        auto_delete: true,
        internal: true,
        ..Default::default()
    };
    declare(&ch, &name, ExchangeKind::Direct, flags)
        .await
        .expect("declare durable auto-delete internal");
    declare(&ch, &name, ExchangeKind::Direct, flags)
        .await
        .expect("equivalent redeclare");
    for (field, options, received, current) in [
        (
            "durable",
            ExchangeDeclareOptions {
                durable: false,
                ..flags
            },
            "false",
            "true",
        ),
        (
            "auto_delete",
            ExchangeDeclareOptions {
                auto_delete: false,
                ..flags
            },
            "false",
            "true",
        ),
        (
            "internal",
            ExchangeDeclareOptions {
                internal: false,
                ..flags
            },
            "false",
            "true",
        ),
    ] {
        let ch = within(5, conn.create_channel()).await.expect("channel");
        let res = declare(&ch, &name, ExchangeKind::Direct, options).await;
        assert_amqp_error(
            res,
            406,
            &format!(
                "PRECONDITION_FAILED - inequivalent arg '{field}' for exchange '{name}' in vhost '/': received '{received}' but current is '{current}'"
            ),
        );
    }
    let ch = within(5, conn.create_channel()).await.expect("channel");
    delete(&ch, &name).await;
}

#[tokio::test]
async fn passive_declare_of_a_missing_exchange_fails_with_not_found() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let name = unique("x-missing");
    let res = declare(
        &ch,
        &name,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
    )
    .await;
    assert_amqp_error(
        res,
        404,
        &format!("NOT_FOUND - no exchange '{name}' in vhost '/'"),
    );
    assert!(!ch.status().connected(), "a 404 closes the channel");
    assert!(conn.status().connected(), "but not the connection");
}

#[tokio::test]
async fn passive_declare_ignores_type_and_flags() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let name = unique("x-passive");
    declare(&ch, &name, ExchangeKind::Topic, Default::default())
        .await
        .expect("declare");
    declare(
        &ch,
        &name,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            passive: true,
            durable: true,
            ..Default::default()
        },
    )
    .await
    .expect("passive declare with another type and flags succeeds");
    delete(&ch, &name).await;
}

#[tokio::test]
async fn redeclare_with_a_different_type_fails_with_precondition_failed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let name = unique("x-type");
    declare(&ch, &name, ExchangeKind::Direct, Default::default())
        .await
        .expect("declare");
    let res = declare(&ch, &name, ExchangeKind::Fanout, Default::default()).await;
    assert_amqp_error(
        res,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{name}' in vhost '/': received 'fanout' but current is 'direct'"
        ),
    );
    let ch = within(5, conn.create_channel()).await.expect("channel");
    delete(&ch, &name).await;
}

#[tokio::test]
async fn declaring_an_amq_prefixed_exchange_is_refused() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let name = format!("amq.{}", unique("custom"));
    let res = declare(&ch, &name, ExchangeKind::Direct, Default::default()).await;
    assert_amqp_error(
        res,
        403,
        &format!("ACCESS_REFUSED - exchange name '{name}' contains reserved prefix 'amq.*'"),
    );
}

#[tokio::test]
async fn predeclared_exchanges_exist() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    for name in [
        "amq.direct",
        "amq.fanout",
        "amq.topic",
        "amq.headers",
        "amq.match",
    ] {
        assert!(exchange_exists(&conn, name).await, "{name} exists");
    }
}

#[tokio::test]
async fn redeclaring_a_predeclared_exchange_with_its_own_properties_succeeds() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        declare(
            &ch,
            name,
            kind,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_or_else(|e| panic!("redeclare {name}: {e:?}"));
    }
    let res = declare(&ch, "amq.direct", ExchangeKind::Direct, Default::default()).await;
    assert_amqp_error(
        res,
        406,
        "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'amq.direct' in vhost '/': received 'false' but current is 'true'",
    );
}

#[tokio::test]
async fn deleting_a_predeclared_exchange_is_refused() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let res = within(
        5,
        ch.exchange_delete("amq.direct".into(), Default::default()),
    )
    .await;
    assert_amqp_error(
        res,
        403,
        "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed",
    );
    assert!(exchange_exists(&conn, "amq.direct").await);
}

#[tokio::test]
async fn delete_removes_the_exchange_and_its_bindings() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let name = unique("x-del");
    declare(&ch, &name, ExchangeKind::Fanout, Default::default())
        .await
        .expect("declare");
    let q = exclusive_queue(&ch, "").await;
    bind(&ch, &q, &name, "").await;
    delete(&ch, &name).await;
    assert!(!exchange_exists(&conn, &name).await);
    // Recreated, it has no bindings left.
    declare(&ch, &name, ExchangeKind::Fanout, Default::default())
        .await
        .expect("declare again");
    let cch = confirm_channel(&conn).await;
    publish_confirmed(&cch, &name, "", b"after", BasicProperties::default()).await;
    assert_eq!(ready_count(&ch, &q).await, 0);
    delete(&ch, &name).await;
}

#[tokio::test]
async fn delete_if_unused_fails_when_the_exchange_has_bindings() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let name = unique("x-inuse");
    declare(&ch, &name, ExchangeKind::Direct, Default::default())
        .await
        .expect("declare");
    let q = exclusive_queue(&ch, "").await;
    bind(&ch, &q, &name, "k").await;
    let res = within(
        5,
        ch.exchange_delete(
            name.as_str().into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert_amqp_error(
        res,
        406,
        &format!("PRECONDITION_FAILED - exchange '{name}' in vhost '/' in use"),
    );
    assert!(exchange_exists(&conn, &name).await, "still there");
    let ch = within(5, conn.create_channel()).await.expect("channel");
    delete(&ch, &name).await;
}

#[tokio::test]
async fn delete_if_unused_succeeds_without_bindings() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let name = unique("x-unused");
    declare(&ch, &name, ExchangeKind::Direct, Default::default())
        .await
        .expect("declare");
    within(
        5,
        ch.exchange_delete(
            name.as_str().into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await
    .expect("delete if-unused");
    assert!(!exchange_exists(&conn, &name).await);
}

#[tokio::test]
async fn deleting_a_missing_exchange_succeeds() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    within(
        5,
        ch.exchange_delete(unique("x-never").as_str().into(), Default::default()),
    )
    .await
    .expect("exchange.delete of a missing exchange is ok");
    assert!(ch.status().connected());
}

#[tokio::test]
async fn direct_exchange_routes_by_exact_routing_key() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let x = unique("x-direct");
    declare(&ch, &x, ExchangeKind::Direct, Default::default())
        .await
        .expect("declare");
    let qa = exclusive_queue(&ch, "").await;
    let qb = exclusive_queue(&ch, "").await;
    bind(&ch, &qa, &x, "a").await;
    bind(&ch, &qb, &x, "b").await;
    bind(&ch, &qb, &x, "a").await;
    let cch = confirm_channel(&conn).await;
    for (key, body) in [("a", "1"), ("b", "2"), ("A", "3"), ("a.b", "4"), ("", "5")] {
        publish_confirmed(&cch, &x, key, body.as_bytes(), BasicProperties::default()).await;
    }
    assert_eq!(drain(&ch, &qa).await, ["1"]);
    assert_eq!(drain(&ch, &qb).await, ["1", "2"]);
    delete(&ch, &x).await;
}

#[tokio::test]
async fn fanout_exchange_routes_to_every_bound_queue_ignoring_the_key() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let x = unique("x-fanout");
    declare(&ch, &x, ExchangeKind::Fanout, Default::default())
        .await
        .expect("declare");
    let qa = exclusive_queue(&ch, "").await;
    let qb = exclusive_queue(&ch, "").await;
    bind(&ch, &qa, &x, "").await;
    bind(&ch, &qb, &x, "whatever").await;
    let cch = confirm_channel(&conn).await;
    publish_confirmed(&cch, &x, "any.key", b"1", BasicProperties::default()).await;
    assert_eq!(drain(&ch, &qa).await, ["1"]);
    assert_eq!(drain(&ch, &qb).await, ["1"]);
    delete(&ch, &x).await;
}

#[tokio::test]
async fn topic_exchange_matches_star_and_hash_wildcards() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let x = unique("x-topic");
    declare(&ch, &x, ExchangeKind::Topic, Default::default())
        .await
        .expect("declare");
    let star = exclusive_queue(&ch, "").await;
    let hash = exclusive_queue(&ch, "").await;
    let exact = exclusive_queue(&ch, "").await;
    let all = exclusive_queue(&ch, "").await;
    bind(&ch, &star, &x, "a.*.c").await;
    bind(&ch, &hash, &x, "a.#").await;
    bind(&ch, &exact, &x, "a.b.c").await;
    bind(&ch, &all, &x, "#").await;
    let cch = confirm_channel(&conn).await;
    for key in ["a.b.c", "a", "a.b", "a.x.c", "a.b.c.d", "b.c", ""] {
        publish_confirmed(&cch, &x, key, key.as_bytes(), BasicProperties::default()).await;
    }
    assert_eq!(drain(&ch, &star).await, ["a.b.c", "a.x.c"]);
    assert_eq!(
        drain(&ch, &hash).await,
        ["a.b.c", "a", "a.b", "a.x.c", "a.b.c.d"]
    );
    assert_eq!(drain(&ch, &exact).await, ["a.b.c"]);
    assert_eq!(
        drain(&ch, &all).await,
        ["a.b.c", "a", "a.b", "a.x.c", "a.b.c.d", "b.c", ""]
    );
    delete(&ch, &x).await;
}

#[tokio::test]
async fn headers_exchange_matches_all_and_any() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let x = unique("x-headers");
    declare(&ch, &x, ExchangeKind::Headers, Default::default())
        .await
        .expect("declare");
    let q_all = exclusive_queue(&ch, "").await;
    let q_any = exclusive_queue(&ch, "").await;
    let mut all = FieldTable::default();
    all.insert("x-match".into(), AMQPValue::LongString("all".into()));
    all.insert("format".into(), AMQPValue::LongString("pdf".into()));
    all.insert("type".into(), AMQPValue::LongString("report".into()));
    bind_args(&ch, &q_all, &x, "", all).await;
    let mut any = FieldTable::default();
    any.insert("x-match".into(), AMQPValue::LongString("any".into()));
    any.insert("format".into(), AMQPValue::LongString("pdf".into()));
    any.insert("type".into(), AMQPValue::LongString("report".into()));
    bind_args(&ch, &q_any, &x, "", any).await;

    let cch = confirm_channel(&conn).await;
    let headers = |pairs: &[(&str, &str)]| {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), AMQPValue::LongString((*v).into()));
        }
        BasicProperties::default().with_headers(t)
    };
    publish_confirmed(
        &cch,
        &x,
        "",
        b"both",
        headers(&[("format", "pdf"), ("type", "report")]),
    )
    .await;
    publish_confirmed(
        &cch,
        &x,
        "",
        b"one",
        headers(&[("format", "pdf"), ("type", "log")]),
    )
    .await;
    publish_confirmed(&cch, &x, "", b"none", headers(&[("format", "zip")])).await;
    publish_confirmed(&cch, &x, "", b"no-headers", BasicProperties::default()).await;
    publish_confirmed(
        &cch,
        &x,
        "",
        b"extra",
        headers(&[("format", "pdf"), ("type", "report"), ("size", "big")]),
    )
    .await;
    assert_eq!(drain(&ch, &q_all).await, ["both", "extra"]);
    assert_eq!(drain(&ch, &q_any).await, ["both", "one", "extra"]);
    delete(&ch, &x).await;
}

#[tokio::test]
async fn exchange_to_exchange_binding_routes_messages() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let src = unique("x-src");
    let dst = unique("x-dst");
    declare(&ch, &src, ExchangeKind::Topic, Default::default())
        .await
        .expect("declare src");
    declare(&ch, &dst, ExchangeKind::Fanout, Default::default())
        .await
        .expect("declare dst");
    let q = exclusive_queue(&ch, "").await;
    bind(&ch, &q, &dst, "").await;
    within(
        5,
        ch.exchange_bind(
            dst.as_str().into(),
            src.as_str().into(),
            "orders.*".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.bind");
    let cch = confirm_channel(&conn).await;
    publish_confirmed(
        &cch,
        &src,
        "orders.new",
        b"routed",
        BasicProperties::default(),
    )
    .await;
    publish_confirmed(
        &cch,
        &src,
        "billing.new",
        b"not-routed",
        BasicProperties::default(),
    )
    .await;
    let got = within(
        5,
        ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get")
    .expect("a message");
    assert_eq!(got.delivery.data, b"routed");
    assert_eq!(
        got.delivery.exchange.as_str(),
        src,
        "exchange is the one published to"
    );
    assert_eq!(got.delivery.routing_key.as_str(), "orders.new");
    assert_eq!(drain(&ch, &q).await, Vec::<String>::new());
    delete(&ch, &src).await;
    delete(&ch, &dst).await;
}

#[tokio::test]
async fn exchange_unbind_stops_routing() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let src = unique("x-src");
    let dst = unique("x-dst");
    declare(&ch, &src, ExchangeKind::Direct, Default::default())
        .await
        .expect("declare src");
    declare(&ch, &dst, ExchangeKind::Fanout, Default::default())
        .await
        .expect("declare dst");
    let q = exclusive_queue(&ch, "").await;
    bind(&ch, &q, &dst, "").await;
    within(
        5,
        ch.exchange_bind(
            dst.as_str().into(),
            src.as_str().into(),
            "k".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.bind");
    let cch = confirm_channel(&conn).await;
    publish_confirmed(&cch, &src, "k", b"before", BasicProperties::default()).await;
    within(
        5,
        ch.exchange_unbind(
            dst.as_str().into(),
            src.as_str().into(),
            "k".into(),
            ExchangeUnbindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.unbind");
    publish_confirmed(&cch, &src, "k", b"after", BasicProperties::default()).await;
    assert_eq!(drain(&ch, &q).await, ["before"]);
    delete(&ch, &src).await;
    delete(&ch, &dst).await;
}

#[tokio::test]
async fn exchange_binding_cycles_deliver_once() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let a = unique("x-cycle-a");
    let b = unique("x-cycle-b");
    declare(&ch, &a, ExchangeKind::Fanout, Default::default())
        .await
        .expect("declare a");
    declare(&ch, &b, ExchangeKind::Fanout, Default::default())
        .await
        .expect("declare b");
    for (dst, src) in [(&b, &a), (&a, &b)] {
        within(
            5,
            ch.exchange_bind(
                dst.as_str().into(),
                src.as_str().into(),
                "".into(),
                ExchangeBindOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .expect("exchange.bind");
    }
    let q = exclusive_queue(&ch, "").await;
    bind(&ch, &q, &a, "").await;
    bind(&ch, &q, &b, "").await;
    let cch = confirm_channel(&conn).await;
    publish_confirmed(&cch, &a, "", b"once", BasicProperties::default()).await;
    assert_eq!(drain(&ch, &q).await, ["once"]);
    delete(&ch, &a).await;
    delete(&ch, &b).await;
}

#[tokio::test]
async fn alternate_exchange_receives_unroutable_messages() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let ae = unique("x-ae");
    let main = unique("x-main");
    declare(&ch, &ae, ExchangeKind::Fanout, Default::default())
        .await
        .expect("declare ae");
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(ae.as_str().into()),
    );
    within(
        5,
        ch.exchange_declare(
            main.as_str().into(),
            ExchangeKind::Direct,
            Default::default(),
            args,
        ),
    )
    .await
    .expect("declare with alternate-exchange");
    let routed = exclusive_queue(&ch, "").await;
    let unrouted = exclusive_queue(&ch, "").await;
    bind(&ch, &routed, &main, "known").await;
    bind(&ch, &unrouted, &ae, "").await;
    let cch = confirm_channel(&conn).await;
    publish_confirmed(&cch, &main, "known", b"r", BasicProperties::default()).await;
    publish_confirmed(&cch, &main, "unknown", b"u", BasicProperties::default()).await;
    // Mandatory publishes that reach the alternate exchange's queue are not returned.
    let confirm = within(
        5,
        cch.basic_publish(
            main.as_str().into(),
            "unknown2".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"m",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish");
    let c = within(5, confirm).await.expect("confirm");
    assert_eq!(c, lapin::Confirmation::Ack(None));
    assert_eq!(drain(&ch, &routed).await, ["r"]);
    let got = within(
        5,
        ch.basic_get(unrouted.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    .expect("a message");
    assert_eq!(got.delivery.data, b"u");
    assert_eq!(
        got.delivery.exchange.as_str(),
        main,
        "exchange is the one published to"
    );
    assert_eq!(got.delivery.routing_key.as_str(), "unknown");
    assert_eq!(drain(&ch, &unrouted).await, ["m"]);
    delete(&ch, &main).await;
    delete(&ch, &ae).await;
}

#[tokio::test]
async fn auto_delete_exchange_is_deleted_when_its_last_binding_is_removed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let x = unique("x-autodel");
    declare(
        &ch,
        &x,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare");
    let q = exclusive_queue(&ch, "").await;
    bind(&ch, &q, &x, "a").await;
    bind(&ch, &q, &x, "b").await;
    let unbind = |key: &'static str| {
        let ch = ch.clone();
        let (q, x) = (q.clone(), x.clone());
        async move {
            within(
                5,
                ch.queue_unbind(
                    q.as_str().into(),
                    x.as_str().into(),
                    key.into(),
                    FieldTable::default(),
                ),
            )
            .await
            .expect("queue.unbind");
        }
    };
    unbind("a").await;
    assert!(exchange_exists(&conn, &x).await, "one binding left");
    unbind("b").await;
    assert!(
        !exchange_exists(&conn, &x).await,
        "deleted with its last binding"
    );
}

#[tokio::test]
async fn auto_delete_exchange_is_deleted_when_its_last_bound_queue_is_deleted() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let x = unique("x-autodel-q");
    declare(
        &ch,
        &x,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare");
    let q = exclusive_queue(&ch, "").await;
    bind(&ch, &q, &x, "").await;
    within(5, ch.queue_delete(q.as_str().into(), Default::default()))
        .await
        .expect("queue.delete");
    assert!(!exchange_exists(&conn, &x).await);
}

#[tokio::test]
async fn auto_delete_exchange_that_never_had_bindings_is_kept() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let x = unique("x-autodel-unused");
    declare(
        &ch,
        &x,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(exchange_exists(&conn, &x).await);
    delete(&ch, &x).await;
}

#[tokio::test]
async fn publishing_to_an_internal_exchange_is_refused() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let x = unique("x-internal");
    declare(
        &ch,
        &x,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare internal");
    let pch = within(5, conn.create_channel()).await.expect("channel");
    let mut errs = errors(&conn);
    publish(&pch, &x, "", b"nope").await;
    assert_eq!(
        errs.next().await,
        (
            403,
            format!("ACCESS_REFUSED - cannot publish to internal exchange '{x}' in vhost '/'")
        )
    );
    delete(&ch, &x).await;
}

#[tokio::test]
async fn internal_exchange_receives_through_an_exchange_binding() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let front = unique("x-front");
    let internal = unique("x-internal");
    declare(&ch, &front, ExchangeKind::Fanout, Default::default())
        .await
        .expect("declare front");
    declare(
        &ch,
        &internal,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            ..Default::default()
        },
    )
    .await
    .expect("declare internal");
    within(
        5,
        ch.exchange_bind(
            internal.as_str().into(),
            front.as_str().into(),
            "".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.bind");
    let q = exclusive_queue(&ch, "").await;
    bind(&ch, &q, &internal, "").await;
    let cch = confirm_channel(&conn).await;
    publish_confirmed(&cch, &front, "", b"via-front", BasicProperties::default()).await;
    assert_eq!(drain(&ch, &q).await, ["via-front"]);
    delete(&ch, &front).await;
    delete(&ch, &internal).await;
}

#[tokio::test]
async fn publishing_to_a_missing_exchange_closes_the_channel_with_not_found() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let x = unique("x-nowhere");
    let mut errs = errors(&conn);
    publish(&ch, &x, "k", b"lost").await;
    assert_eq!(
        errs.next().await,
        (404, format!("NOT_FOUND - no exchange '{x}' in vhost '/'"))
    );
    assert!(conn.status().connected());
}

#[tokio::test]
async fn binding_to_a_missing_exchange_fails_with_not_found() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let q = exclusive_queue(&ch, "").await;
    let x = unique("x-nowhere");
    let res = within(
        5,
        ch.queue_bind(
            q.as_str().into(),
            x.as_str().into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res,
        404,
        &format!("NOT_FOUND - no exchange '{x}' in vhost '/'"),
    );
}

#[tokio::test]
async fn binding_a_queue_to_the_default_exchange_is_refused() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let q = exclusive_queue(&ch, "").await;
    let res = within(
        5,
        ch.queue_bind(
            q.as_str().into(),
            ShortString::from(""),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res,
        403,
        "ACCESS_REFUSED - operation not permitted on the default exchange",
    );
}

#[tokio::test]
async fn unbinding_a_missing_binding_succeeds() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let q = exclusive_queue(&ch, "").await;
    within(
        5,
        ch.queue_unbind(
            q.as_str().into(),
            "amq.direct".into(),
            unique("never-bound").as_str().into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.unbind of a binding that does not exist");
    assert!(ch.status().connected());
}
