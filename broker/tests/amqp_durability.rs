//! Definitions across a clean restart on the same data directory. Warren only: these tests are
//! skipped when `WARREN_TEST_AMQP_URL` points at another broker, which they cannot restart.

mod common;

use common::*;
use lapin::options::{
    ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};

async fn channel(conn: &Connection) -> Channel {
    within(5, conn.create_channel()).await.expect("channel")
}

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind, durable: bool) {
    within(
        5,
        ch.exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                durable,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.declare");
}

async fn declare_queue(ch: &Channel, name: &str, durable: bool, args: FieldTable) {
    within(
        5,
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable,
                ..Default::default()
            },
            args,
        ),
    )
    .await
    .expect("queue.declare");
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) {
    within(
        5,
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.bind");
}

/// Publishes through `exchange` with `key`, confirmed.
async fn publish(conn: &Connection, exchange: &str, key: &str) {
    let ch = channel(conn).await;
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let c = within(
        5,
        ch.basic_publish(
            exchange.into(),
            key.into(),
            Default::default(),
            b"after-restart",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish");
    assert!(within(5, c).await.expect("confirm").is_ack());
}

async fn restart(broker: TestBroker, conn: Connection) -> (TestBroker, Connection) {
    within(5, conn.close(200, "OK".into()))
        .await
        .expect("close");
    let broker = within(30, broker.restart()).await;
    let conn = broker.connect().await;
    (broker, conn)
}

#[tokio::test]
async fn durable_exchanges_queues_and_bindings_survive_a_clean_restart() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        eprintln!("skipped: cannot restart an external broker");
        return;
    }
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let x = unique("dur-x");
    let q = unique("dur-q");
    declare_exchange(&ch, &x, ExchangeKind::Topic, true).await;
    declare_queue(&ch, &q, true, FieldTable::default()).await;
    bind(&ch, &q, &x, "orders.#").await;

    let (broker, conn) = restart(broker, conn).await;
    assert!(
        exchange_exists(&conn, &x).await,
        "durable exchange survives"
    );
    assert!(queue_exists(&conn, &q).await, "durable queue survives");
    // Same type and flags: an equivalent redeclare succeeds, a different type does not.
    let ch = channel(&conn).await;
    declare_exchange(&ch, &x, ExchangeKind::Topic, true).await;
    declare_queue(&ch, &q, true, FieldTable::default()).await;
    let res = within(
        5,
        ch.exchange_declare(
            x.as_str().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{x}' in vhost '/': received 'direct' but current is 'topic'"
        ),
    );
    // The binding survives: routing through it reaches the queue.
    publish(&conn, &x, "orders.new").await;
    let ch = channel(&conn).await;
    assert_eq!(ready_count(&ch, &q).await, 1);
    broker.stop().await;
}

#[tokio::test]
async fn exchange_to_exchange_bindings_survive_a_clean_restart() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        eprintln!("skipped: cannot restart an external broker");
        return;
    }
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let src = unique("dur-src");
    let dst = unique("dur-dst");
    let q = unique("dur-q");
    declare_exchange(&ch, &src, ExchangeKind::Direct, true).await;
    declare_exchange(&ch, &dst, ExchangeKind::Fanout, true).await;
    declare_queue(&ch, &q, true, FieldTable::default()).await;
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

    let (broker, conn) = restart(broker, conn).await;
    publish(&conn, &src, "k").await;
    let ch = channel(&conn).await;
    assert_eq!(ready_count(&ch, &q).await, 1);
    broker.stop().await;
}

#[tokio::test]
async fn queue_arguments_survive_a_clean_restart() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        eprintln!("skipped: cannot restart an external broker");
        return;
    }
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = unique("dur-args");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(10));
    declare_queue(&ch, &q, true, args.clone()).await;

    let (broker, conn) = restart(broker, conn).await;
    let ch = channel(&conn).await;
    declare_queue(&ch, &q, true, args).await;
    let mut other = FieldTable::default();
    other.insert("x-max-length".into(), AMQPValue::LongInt(11));
    let res = within(
        5,
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            other,
        ),
    )
    .await;
    assert_amqp_error(
        res,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue '{q}' in vhost '/': received '11' but current is '10'"
        ),
    );
    broker.stop().await;
}

#[tokio::test]
async fn non_durable_exchanges_and_queues_do_not_survive_a_restart() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        eprintln!("skipped: cannot restart an external broker");
        return;
    }
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let durable_x = unique("dur-x");
    let transient_x = unique("trans-x");
    let durable_q = unique("dur-q");
    let transient_q = unique("trans-q");
    declare_exchange(&ch, &durable_x, ExchangeKind::Fanout, true).await;
    declare_exchange(&ch, &transient_x, ExchangeKind::Fanout, false).await;
    declare_queue(&ch, &durable_q, true, FieldTable::default()).await;
    declare_queue(&ch, &transient_q, false, FieldTable::default()).await;
    // A binding from a durable exchange to a transient queue goes with the queue.
    bind(&ch, &transient_q, &durable_x, "").await;
    bind(&ch, &durable_q, &durable_x, "").await;

    let (broker, conn) = restart(broker, conn).await;
    assert!(exchange_exists(&conn, &durable_x).await);
    assert!(
        !exchange_exists(&conn, &transient_x).await,
        "transient exchange gone"
    );
    assert!(queue_exists(&conn, &durable_q).await);
    assert!(
        !queue_exists(&conn, &transient_q).await,
        "transient queue gone"
    );
    publish(&conn, &durable_x, "").await;
    let ch = channel(&conn).await;
    assert_eq!(ready_count(&ch, &durable_q).await, 1);
    broker.stop().await;
}

#[tokio::test]
async fn deleted_durable_definitions_stay_deleted_after_a_restart() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        eprintln!("skipped: cannot restart an external broker");
        return;
    }
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let x = unique("dur-x");
    let q = unique("dur-q");
    let kept_q = unique("dur-kept");
    declare_exchange(&ch, &x, ExchangeKind::Direct, true).await;
    declare_queue(&ch, &q, true, FieldTable::default()).await;
    declare_queue(&ch, &kept_q, true, FieldTable::default()).await;
    bind(&ch, &kept_q, &x, "a").await;
    bind(&ch, &kept_q, &x, "b").await;
    within(
        5,
        ch.queue_unbind(
            kept_q.as_str().into(),
            x.as_str().into(),
            "a".into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbind");
    within(5, ch.queue_delete(q.as_str().into(), Default::default()))
        .await
        .expect("queue.delete");

    let (broker, conn) = restart(broker, conn).await;
    assert!(
        !queue_exists(&conn, &q).await,
        "deleted queue stays deleted"
    );
    publish(&conn, &x, "a").await;
    let ch = channel(&conn).await;
    assert_eq!(
        ready_count(&ch, &kept_q).await,
        0,
        "removed binding stays removed"
    );
    publish(&conn, &x, "b").await;
    assert_eq!(ready_count(&ch, &kept_q).await, 1, "remaining binding kept");
    within(5, ch.exchange_delete(x.as_str().into(), Default::default()))
        .await
        .expect("exchange.delete");

    let (broker, conn) = restart(broker, conn).await;
    assert!(
        !exchange_exists(&conn, &x).await,
        "deleted exchange stays deleted"
    );
    broker.stop().await;
}
