//! Messages on disk, seen through AMQP: what survives a restart, redelivery flags and order
//! after one, confirms that wait for the disk, paging of large backlogs, and the alarms.
//! Warren-only: these look inside the in-process broker or restart it.

mod common;

use common::*;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::time::Duration;

async fn channel(conn: &Connection) -> Channel {
    within(5, conn.create_channel()).await.expect("channel")
}

async fn declare(ch: &Channel, name: &str, durable: bool) {
    within(
        5,
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare");
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Publishes with confirms and waits for every ack.
async fn publish_confirmed(ch: &Channel, queue: &str, bodies: &[String], props: BasicProperties) {
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let mut confirms = Vec::new();
    for b in bodies {
        let c = within(
            5,
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b.as_bytes(),
                props.clone(),
            ),
        )
        .await
        .expect("publish");
        confirms.push(c);
    }
    for c in confirms {
        assert_eq!(
            within(10, c).await.expect("confirm"),
            Confirmation::Ack(None)
        );
    }
}

async fn get_all(ch: &Channel, queue: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    while let Some(m) = within(
        5,
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    {
        out.push((
            String::from_utf8(m.delivery.data).unwrap(),
            m.delivery.redelivered,
        ));
    }
    out
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test]
async fn persistent_messages_survive_a_restart_and_transient_ones_do_not() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "durable-q", true).await;
    declare(&ch, "transient-q", false).await;
    publish_confirmed(&ch, "durable-q", &names("p", 3), persistent()).await;
    let transient_ch = channel(&conn).await;
    publish_confirmed(
        &transient_ch,
        "durable-q",
        &names("t", 2),
        BasicProperties::default(),
    )
    .await;
    publish_confirmed(&transient_ch, "transient-q", &names("x", 2), persistent()).await;
    drop(conn);
    let broker = broker.restart().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let got: Vec<String> = get_all(&ch, "durable-q")
        .await
        .into_iter()
        .map(|g| g.0)
        .collect();
    assert_eq!(got, ["p0", "p1", "p2"]);
    assert!(!queue_exists(&conn, "transient-q").await);
}

#[tokio::test]
async fn after_a_restart_acked_messages_are_gone_and_unacked_ones_return_redelivered_in_order() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "redelivery", true).await;
    publish_confirmed(&ch, "redelivery", &names("m", 5), persistent()).await;
    let cch = channel(&conn).await;
    within(5, cch.basic_qos(3, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = consume(&cch, "redelivery", BasicConsumeOptions::default()).await;
    let first = next_delivery(&mut consumer).await;
    let second = next_delivery(&mut consumer).await;
    let third = next_delivery(&mut consumer).await;
    assert_eq!(second.data, b"m1");
    // Cancelled before the acks free its credit, so m3 and m4 are never delivered.
    within(
        5,
        cch.basic_cancel(
            consumer.tag(),
            lapin::options::BasicCancelOptions::default(),
        ),
    )
    .await
    .expect("cancel");
    for d in [&first, &third] {
        within(5, d.acker.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    // A round trip on the channel makes sure the acks were processed.
    within(5, cch.basic_qos(3, BasicQosOptions::default()))
        .await
        .expect("qos");
    drop(consumer);
    drop(conn);
    let broker = broker.restart().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    assert_eq!(
        get_all(&ch, "redelivery").await,
        [
            ("m1".to_string(), true),
            ("m3".to_string(), false),
            ("m4".to_string(), false)
        ]
    );
}

#[tokio::test]
async fn confirms_of_persistent_messages_wait_for_a_sync() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "synced", true).await;
    let flusher = broker
        .broker()
        .storage
        .flusher()
        .expect("a data directory")
        .clone();
    let rounds_before = flusher
        .stats
        .rounds
        .load(std::sync::atomic::Ordering::Relaxed);
    publish_confirmed(&ch, "synced", &names("s", 20), persistent()).await;
    let rounds = flusher
        .stats
        .rounds
        .load(std::sync::atomic::Ordering::Relaxed)
        - rounds_before;
    assert!(rounds >= 1, "at least one flush round before the confirms");
    assert!(flusher.durable_epoch() >= 1);
}

#[tokio::test]
async fn a_large_backlog_stays_on_disk_with_a_bounded_window_in_memory() {
    let broker = TestBroker::start_with(|c| {
        c.queue_window_messages = 50;
        c.queue_window_bytes = 1 << 20;
    })
    .await;
    if broker.is_external() {
        return;
    }
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    declare(&ch, "backlog", false).await;
    declare(&ch, "durable-backlog", true).await;
    let bodies = names("b", 2000);
    publish_confirmed(&ch, "backlog", &bodies, BasicProperties::default()).await;
    let ch2 = channel(&conn).await;
    publish_confirmed(&ch2, "durable-backlog", &bodies, persistent()).await;
    let vhost = broker.broker().vhost("/").expect("default vhost");
    for name in ["backlog", "durable-backlog"] {
        let q = vhost.queue(name).expect("queue");
        assert_eq!(q.message_count(), 2000, "{name}");
        assert!(
            q.messages_in_memory() <= 50,
            "{name}: {} messages in memory",
            q.messages_in_memory()
        );
        // Consumed back in publish order, nothing lost or repeated.
        let mut consumer = consume(
            &ch,
            name,
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
        )
        .await;
        for expected in &bodies {
            let d = next_delivery(&mut consumer).await;
            assert_eq!(String::from_utf8_lossy(&d.data), *expected, "{name}");
            assert!(q.messages_in_memory() <= 50 + 1);
        }
    }
}

#[tokio::test]
async fn the_disk_alarm_blocks_publishers_while_consumers_drain() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let publisher = broker.connect().await;
    let pch = channel(&publisher).await;
    declare(&pch, "alarmed", false).await;
    publish_confirmed(
        &pch,
        "alarmed",
        &names("before", 3),
        BasicProperties::default(),
    )
    .await;
    let alarms = broker.broker().alarms.clone();
    alarms.set_disk_free_limit(u64::MAX);
    assert!(alarms.state().disk);
    // The publisher's next publish is not processed while the alarm is on.
    let pending = tokio::spawn({
        let pch = pch.clone();
        async move {
            pch.basic_publish(
                "".into(),
                "alarmed".into(),
                BasicPublishOptions::default(),
                b"during",
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "no confirm while blocked");
    // A consumer on another connection still drains.
    let consumer_conn = broker.connect().await;
    let cch = channel(&consumer_conn).await;
    let drained = get_all(&cch, "alarmed").await;
    assert_eq!(drained.len(), 3);
    alarms.set_disk_free_limit(0);
    let confirm = within(5, pending).await.expect("task").expect("confirm");
    assert_eq!(confirm, Confirmation::Ack(None));
    eventually("the message published during the alarm arrives", || {
        let cch = cch.clone();
        async move { ready_count(&cch, "alarmed").await == 1 }
    })
    .await;
}
