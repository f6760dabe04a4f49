//! Queues: declaration and its flags, server-named queues, arguments and equivalence, bindings,
//! purge/delete and their counts, exclusivity and auto-delete.

mod common;

use common::*;
use futures::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

async fn declare(
    ch: &Channel,
    name: &str,
    options: QueueDeclareOptions,
    args: FieldTable,
) -> lapin::Result<lapin::Queue> {
    within(5, ch.queue_declare(name.into(), options, args)).await
}

async fn channel(conn: &Connection) -> Channel {
    within(5, conn.create_channel()).await.expect("channel")
}

async fn delete_queue(ch: &Channel, name: &str) -> u32 {
    within(
        5,
        ch.queue_delete(name.into(), QueueDeleteOptions::default()),
    )
    .await
    .expect("queue.delete")
}

/// Publishes `n` messages to `queue` and waits for them to be confirmed.
async fn fill(conn: &Connection, queue: &str, n: usize) {
    let ch = channel(conn).await;
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    for i in 0..n {
        publish_to(&ch, queue, format!("m{i}").as_bytes()).await;
    }
    within(5, ch.wait_for_confirms()).await.expect("confirms");
    let _ = ch.close(200, "OK".into()).await;
}

fn locked_text(queue: &str) -> String {
    format!(
        "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in vhost '/'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration."
    )
}

fn int_arg(name: &str, v: i32) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(name.into(), AMQPValue::LongInt(v));
    t
}

#[tokio::test]
async fn declare_returns_the_name_and_zero_counts() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-plain");
    let q = declare(&ch, &name, Default::default(), FieldTable::default())
        .await
        .expect("declare");
    assert_eq!(q.name().as_str(), name);
    assert_eq!((q.message_count(), q.consumer_count()), (0, 0));
    assert_eq!(delete_queue(&ch, &name).await, 0);
}

#[tokio::test]
async fn durable_queue_redeclare_with_same_flags_succeeds() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-durable");
    let opts = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    declare(&ch, &name, opts, FieldTable::default())
        .await
        .expect("declare");
    declare(&ch, &name, opts, FieldTable::default())
        .await
        .expect("equivalent redeclare");
    delete_queue(&ch, &name).await;
}

#[tokio::test]
async fn passive_declare_of_a_missing_queue_fails_with_not_found() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-missing");
    let res = declare(
        &ch,
        &name,
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
        &format!("NOT_FOUND - no queue '{name}' in vhost '/'"),
    );
}

#[tokio::test]
async fn passive_declare_reports_message_and_consumer_counts() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = exclusive_queue(&ch, &unique("q-counts")).await;
    fill(&conn, &name, 3).await;
    let _c1 = within(
        5,
        ch.basic_consume(
            name.as_str().into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume");
    // The consumer gets the 3 messages (unacked): they no longer count as ready.
    let q = declare(
        &ch,
        &name,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare");
    assert_eq!(q.consumer_count(), 1);
    let other = channel(&conn).await;
    let name2 = exclusive_queue(&other, &unique("q-counts2")).await;
    fill(&conn, &name2, 2).await;
    let q2 = declare(
        &other,
        &name2,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("passive declare");
    assert_eq!((q2.message_count(), q2.consumer_count()), (2, 0));
}

#[tokio::test]
async fn declare_ok_reports_the_message_count_of_an_existing_queue() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-redeclare-count");
    declare(&ch, &name, Default::default(), FieldTable::default())
        .await
        .expect("declare");
    fill(&conn, &name, 4).await;
    let q = declare(&ch, &name, Default::default(), FieldTable::default())
        .await
        .expect("redeclare");
    assert_eq!((q.message_count(), q.consumer_count()), (4, 0));
    delete_queue(&ch, &name).await;
}

#[tokio::test]
async fn server_named_queue_is_amq_gen_followed_by_22_characters() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = declare(
        &ch,
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let name = q.name().to_string();
    let suffix = name
        .strip_prefix("amq.gen-")
        .unwrap_or_else(|| panic!("{name:?} starts with amq.gen-"));
    assert_eq!(suffix.len(), 22, "{name:?}");
    assert!(
        suffix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{name:?} is URL-safe base64"
    );
    let q2 = declare(
        &ch,
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    assert_ne!(q2.name().as_str(), name, "names are unique");
    // The server-named queue is a real queue: the default exchange routes to it.
    publish_confirmed_to(&conn, &name, b"hello").await;
    assert_eq!(ready_count(&ch, &name).await, 1);
}

#[tokio::test]
async fn queue_arguments_are_kept() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-args");
    let mut args = int_arg("x-max-length", 100);
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(60_000));
    args.insert("x-custom".into(), AMQPValue::LongString("anything".into()));
    declare(&ch, &name, Default::default(), args.clone())
        .await
        .expect("declare with arguments");
    declare(&ch, &name, Default::default(), args.clone())
        .await
        .expect("redeclare with the same arguments");
    // The stored x-message-ttl is compared with what a redeclare sends.
    let mut other_ttl = args.clone();
    other_ttl.insert("x-message-ttl".into(), AMQPValue::LongInt(1_000));
    let res = declare(&ch, &name, Default::default(), other_ttl).await;
    assert_amqp_error(
        res,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{name}' in vhost '/': received '1000' but current is '60000'"
        ),
    );
    let ch = channel(&conn).await;
    delete_queue(&ch, &name).await;
}

#[tokio::test]
async fn max_length_argument_drops_the_oldest_messages() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-maxlen");
    declare(&ch, &name, Default::default(), int_arg("x-max-length", 2))
        .await
        .expect("declare with x-max-length");
    fill(&conn, &name, 5).await;
    // The default overflow behaviour, drop-head: the two newest messages remain.
    let mut bodies = Vec::new();
    while let Some(m) = within(
        5,
        ch.basic_get(name.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    {
        bodies.push(String::from_utf8(m.delivery.data).unwrap());
    }
    assert_eq!(bodies, ["m3", "m4"]);
    delete_queue(&ch, &name).await;
}

#[tokio::test]
async fn redeclare_with_a_different_durable_flag_fails_with_precondition_failed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-durable-mismatch");
    declare(&ch, &name, Default::default(), FieldTable::default())
        .await
        .expect("declare");
    let res = declare(
        &ch,
        &name,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    assert_amqp_error(
        res,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{name}' in vhost '/': received 'true' but current is 'false'"
        ),
    );
    let ch = channel(&conn).await;
    delete_queue(&ch, &name).await;
}

#[tokio::test]
async fn redeclare_with_a_different_auto_delete_flag_fails_with_precondition_failed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-autodel-mismatch");
    declare(&ch, &name, Default::default(), FieldTable::default())
        .await
        .expect("declare");
    let res = declare(
        &ch,
        &name,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    assert_amqp_error(
        res,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'auto_delete' for queue '{name}' in vhost '/': received 'true' but current is 'false'"
        ),
    );
    let ch = channel(&conn).await;
    delete_queue(&ch, &name).await;
}

#[tokio::test]
async fn redeclare_with_a_different_max_length_fails_with_precondition_failed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-maxlen-mismatch");
    declare(&ch, &name, Default::default(), int_arg("x-max-length", 10))
        .await
        .expect("declare");
    let res = declare(&ch, &name, Default::default(), int_arg("x-max-length", 11)).await;
    assert_amqp_error(
        res,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue '{name}' in vhost '/': received '11' but current is '10'"
        ),
    );
    let ch = channel(&conn).await;
    delete_queue(&ch, &name).await;
}

#[tokio::test]
async fn redeclare_without_a_max_length_it_was_declared_with_fails() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-maxlen-missing");
    declare(&ch, &name, Default::default(), int_arg("x-max-length", 10))
        .await
        .expect("declare");
    let res = declare(&ch, &name, Default::default(), FieldTable::default()).await;
    assert_amqp_error(
        res,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue '{name}' in vhost '/': received none but current is the value '10' of type 'signedint'"
        ),
    );
    let ch = channel(&conn).await;
    delete_queue(&ch, &name).await;
}

#[tokio::test]
async fn redeclare_adding_a_max_length_fails() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-maxlen-added");
    declare(&ch, &name, Default::default(), FieldTable::default())
        .await
        .expect("declare");
    let res = declare(&ch, &name, Default::default(), int_arg("x-max-length", 10)).await;
    assert_amqp_error(
        res,
        406,
        &format!(
            "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue '{name}' in vhost '/': received the value '10' of type 'signedint' but current is none"
        ),
    );
    let ch = channel(&conn).await;
    delete_queue(&ch, &name).await;
}

#[tokio::test]
async fn bind_routes_messages_and_unbind_stops_them() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let key = unique("rk");
    within(
        5,
        ch.queue_bind(
            q.as_str().into(),
            "amq.direct".into(),
            key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("bind");
    let pch = channel(&conn).await;
    within(5, pch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let publish = |body: &'static [u8]| {
        let pch = pch.clone();
        let key = key.clone();
        async move {
            let c = within(
                5,
                pch.basic_publish(
                    "amq.direct".into(),
                    key.as_str().into(),
                    Default::default(),
                    body,
                    BasicProperties::default(),
                ),
            )
            .await
            .expect("publish");
            assert!(within(5, c).await.expect("confirm").is_ack());
        }
    };
    publish(b"bound").await;
    assert_eq!(ready_count(&ch, &q).await, 1);
    within(
        5,
        ch.queue_unbind(
            q.as_str().into(),
            "amq.direct".into(),
            key.as_str().into(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("unbind");
    publish(b"unbound").await;
    assert_eq!(ready_count(&ch, &q).await, 1);
}

#[tokio::test]
async fn binding_a_missing_queue_fails_with_not_found() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-nobind");
    let res = within(
        5,
        ch.queue_bind(
            name.as_str().into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(
        res,
        404,
        &format!("NOT_FOUND - no queue '{name}' in vhost '/'"),
    );
}

#[tokio::test]
async fn purge_returns_the_number_of_messages_removed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, 7).await;
    let purged = within(
        5,
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default()),
    )
    .await
    .expect("purge");
    assert_eq!(purged, 7);
    assert_eq!(ready_count(&ch, &q).await, 0);
    let again = within(
        5,
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default()),
    )
    .await
    .expect("purge");
    assert_eq!(again, 0);
}

#[tokio::test]
async fn purge_leaves_unacked_messages_alone() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, 3).await;
    let got = within(
        5,
        ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }),
    )
    .await
    .expect("get")
    .expect("message");
    let purged = within(
        5,
        ch.queue_purge(q.as_str().into(), QueuePurgeOptions::default()),
    )
    .await
    .expect("purge");
    assert_eq!(purged, 2, "the unacked message is not purged");
    assert_eq!(got.delivery.data, b"m0");
    // Closing the channel requeues the unacked one.
    within(5, ch.close(200, "OK".into())).await.expect("close");
    let ch = channel(&conn).await;
    assert_eq!(ready_count(&ch, &q).await, 1);
}

#[tokio::test]
async fn delete_returns_the_number_of_messages_deleted() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-delete-count");
    declare(&ch, &name, Default::default(), FieldTable::default())
        .await
        .expect("declare");
    fill(&conn, &name, 5).await;
    assert_eq!(delete_queue(&ch, &name).await, 5);
    assert!(!queue_exists(&conn, &name).await);
}

#[tokio::test]
async fn deleting_a_missing_queue_returns_zero() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    assert_eq!(delete_queue(&ch, &unique("q-never")).await, 0);
    assert!(ch.status().connected());
}

#[tokio::test]
async fn delete_if_unused_fails_when_the_queue_has_consumers() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, &unique("q-inuse")).await;
    let _consumer = consume(&ch, &q, Default::default()).await;
    let dch = channel(&conn).await;
    let res = within(
        5,
        dch.queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert_amqp_error(
        res,
        406,
        &format!("PRECONDITION_FAILED - queue '{q}' in vhost '/' in use"),
    );
    assert_eq!(ready_count(&ch, &q).await, 0, "queue still exists");
}

#[tokio::test]
async fn delete_if_empty_fails_when_the_queue_has_messages() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, &unique("q-notempty")).await;
    fill(&conn, &q, 1).await;
    let dch = channel(&conn).await;
    let res = within(
        5,
        dch.queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        ),
    )
    .await;
    assert_amqp_error(
        res,
        406,
        &format!("PRECONDITION_FAILED - queue '{q}' in vhost '/' not empty"),
    );
    assert_eq!(ready_count(&ch, &q).await, 1, "queue still exists");
}

#[tokio::test]
async fn delete_if_empty_counts_only_ready_messages() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    fill(&conn, &q, 1).await;
    let m = within(
        5,
        ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }),
    )
    .await
    .expect("get")
    .expect("a message");
    assert_eq!(m.delivery.data, b"m0");
    let n = within(
        5,
        ch.queue_delete(
            q.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        ),
    )
    .await
    .expect("an unacked message does not make the queue non-empty");
    assert_eq!(n, 0);
    assert!(!queue_exists(&conn, &q).await);
}

#[tokio::test]
async fn delete_if_unused_and_if_empty_succeed_on_an_idle_empty_queue() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-idle");
    declare(&ch, &name, Default::default(), FieldTable::default())
        .await
        .expect("declare");
    let n = within(
        5,
        ch.queue_delete(
            name.as_str().into(),
            QueueDeleteOptions {
                if_unused: true,
                if_empty: true,
                ..Default::default()
            },
        ),
    )
    .await
    .expect("delete");
    assert_eq!(n, 0);
    assert!(!queue_exists(&conn, &name).await);
}

#[tokio::test]
async fn exclusive_queue_declared_from_another_connection_is_locked() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let ch = channel(&owner).await;
    let q = exclusive_queue(&ch, &unique("q-excl")).await;
    let other = broker.connect().await;
    let och = channel(&other).await;
    let res = declare(
        &och,
        &q,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    assert_amqp_error(res, 405, &locked_text(&q));
    let och = channel(&other).await;
    let res = declare(
        &och,
        &q,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await;
    assert_amqp_error(res, 405, &locked_text(&q));
}

#[tokio::test]
async fn exclusive_queue_consumed_from_another_connection_is_locked() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let ch = channel(&owner).await;
    let q = exclusive_queue(&ch, &unique("q-excl-consume")).await;
    let other = broker.connect().await;
    let och = channel(&other).await;
    let res = within(
        5,
        och.basic_consume(
            q.as_str().into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(res.map(|_| ()), 405, &locked_text(&q));
}

#[tokio::test]
async fn exclusive_queue_read_deleted_or_purged_from_another_connection_is_locked() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let ch = channel(&owner).await;
    let q = exclusive_queue(&ch, &unique("q-excl-ops")).await;
    fill(&owner, &q, 1).await;
    let other = broker.connect().await;
    let och = channel(&other).await;
    let res = within(
        5,
        och.basic_get(q.as_str().into(), BasicGetOptions::default()),
    )
    .await;
    assert_amqp_error(res.map(|_| ()), 405, &locked_text(&q));
    let och = channel(&other).await;
    let res = within(5, och.queue_purge(q.as_str().into(), Default::default())).await;
    assert_amqp_error(res, 405, &locked_text(&q));
    let och = channel(&other).await;
    let res = within(5, och.queue_delete(q.as_str().into(), Default::default())).await;
    assert_amqp_error(res, 405, &locked_text(&q));
    assert_eq!(ready_count(&ch, &q).await, 1, "untouched");
}

#[tokio::test]
async fn exclusive_queue_can_be_published_to_from_another_connection() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let ch = channel(&owner).await;
    let q = exclusive_queue(&ch, &unique("q-excl-pub")).await;
    let other = broker.connect().await;
    fill(&other, &q, 2).await;
    assert_eq!(ready_count(&ch, &q).await, 2);
}

#[tokio::test]
async fn exclusive_queue_is_deleted_when_its_connection_closes() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let ch = channel(&owner).await;
    let name = exclusive_queue(&ch, &unique("q-excl-gone")).await;
    fill(&owner, &name, 2).await;
    within(5, owner.close(200, "OK".into()))
        .await
        .expect("close");
    // The name is free again: another connection declares its own, empty, exclusive queue.
    let other = broker.connect().await;
    let och = channel(&other).await;
    let mut declared = None;
    for _ in 0..50 {
        match declare(
            &och,
            &name,
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        {
            Ok(q) => {
                declared = Some(q);
                break;
            }
            Err(e) => {
                assert_eq!(amqp_error(&e).map(|(c, _)| c), Some(405), "{e:?}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    let q = declared.expect("exclusive queue released after its connection closed");
    assert_eq!(q.message_count(), 0, "a new, empty queue");
}

#[tokio::test]
async fn exclusive_queue_survives_its_declaring_channel_closing() {
    let broker = TestBroker::start().await;
    let owner = broker.connect().await;
    let ch = channel(&owner).await;
    let name = exclusive_queue(&ch, &unique("q-excl-chan")).await;
    within(5, ch.close(200, "OK".into()))
        .await
        .expect("close channel");
    let ch2 = channel(&owner).await;
    assert_eq!(
        ready_count(&ch2, &name).await,
        0,
        "still there for the connection"
    );
}

#[tokio::test]
async fn auto_delete_queue_is_deleted_after_its_last_consumer_is_cancelled() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-autodel");
    declare(
        &ch,
        &name,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    // Dropping a lapin consumer cancels it: keep both alive.
    let mut consumers = Vec::new();
    for tag in ["c1", "c2"] {
        consumers.push(
            within(
                5,
                ch.basic_consume(
                    name.as_str().into(),
                    tag.into(),
                    Default::default(),
                    FieldTable::default(),
                ),
            )
            .await
            .expect("consume"),
        );
    }
    within(
        5,
        ch.basic_cancel("c1".into(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel c1");
    assert!(queue_exists(&conn, &name).await, "one consumer left");
    within(
        5,
        ch.basic_cancel("c2".into(), BasicCancelOptions::default()),
    )
    .await
    .expect("cancel c2");
    eventually("the auto-delete queue is deleted", || async {
        !queue_exists(&conn, &name).await
    })
    .await;
}

#[tokio::test]
async fn auto_delete_queue_is_deleted_when_its_consumer_channel_closes() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-autodel-chan");
    declare(
        &ch,
        &name,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let cch = channel(&conn).await;
    let _c = consume(&cch, &name, Default::default()).await;
    within(5, cch.close(200, "OK".into())).await.expect("close");
    eventually("the auto-delete queue is deleted", || async {
        !queue_exists(&conn, &name).await
    })
    .await;
}

#[tokio::test]
async fn auto_delete_queue_that_never_had_consumers_is_kept() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-autodel-idle");
    declare(
        &ch,
        &name,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    fill(&conn, &name, 1).await;
    let got = within(
        5,
        ch.basic_get(name.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get");
    assert!(got.is_some());
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(
        queue_exists(&conn, &name).await,
        "basic.get is not a consumer"
    );
    delete_queue(&ch, &name).await;
}

#[tokio::test]
async fn declaring_an_amq_prefixed_queue_is_refused() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = format!("amq.{}", unique("x"));
    let res = declare(&ch, &name, Default::default(), FieldTable::default()).await;
    assert_amqp_error(
        res,
        403,
        &format!("ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'"),
    );
}

#[tokio::test]
async fn passive_declare_of_a_missing_amq_prefixed_queue_fails_with_not_found() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = format!("amq.{}", unique("x"));
    let res = declare(
        &ch,
        &name,
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
        &format!("NOT_FOUND - no queue '{name}' in vhost '/'"),
    );
}

#[tokio::test]
async fn deleting_a_queue_cancels_its_consumers_and_drops_its_messages() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-delete-consumers");
    declare(&ch, &name, Default::default(), FieldTable::default())
        .await
        .expect("declare");
    let cch = channel(&conn).await;
    within(5, cch.basic_qos(1, Default::default()))
        .await
        .expect("qos");
    let mut consumer = consume(&cch, &name, Default::default()).await;
    fill(&conn, &name, 3).await;
    let first = next_delivery(&mut consumer).await;
    assert_eq!(first.data, b"m0");
    let dch = channel(&conn).await;
    let n = delete_queue(&dch, &name).await;
    assert_eq!(n, 2, "ready messages are counted, the unacked one is not");
    let end = within(5, consumer.next()).await;
    assert!(end.is_none(), "consumer cancelled by the server: {end:?}");
}

/// All ready messages of `queue`, taken with `basic.get`.
async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut bodies = Vec::new();
    while let Some(m) = within(
        5,
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("get")
    {
        bodies.push(String::from_utf8(m.delivery.data).unwrap());
    }
    bodies
}

/// Fills a queue of `x-max-length` `max`, takes its messages unacknowledged, fills it again
/// and requeues what it took: the length limit still holds, and (drop-head) the requeued
/// messages, back at the head, are what it drops. Returns the queue's messages and the
/// dead-letter queue's, if `dead_letters`.
async fn requeue_into_a_full_queue(max: i32, dead_letters: bool) -> (Vec<String>, Vec<String>) {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let name = unique("q-requeue-full");
    let dlq = unique("q-requeue-full-dlq");
    let mut arguments = int_arg("x-max-length", max);
    if dead_letters {
        declare(&ch, &dlq, Default::default(), FieldTable::default())
            .await
            .expect("declare the dead-letter queue");
        arguments.insert("x-dead-letter-exchange".into(), text(""));
        arguments.insert("x-dead-letter-routing-key".into(), text(&dlq));
    }
    declare(&ch, &name, Default::default(), arguments)
        .await
        .expect("declare with x-max-length");
    let publish_all = |prefix: &'static str| {
        let (ch, name) = (ch.clone(), name.clone());
        async move {
            for i in 0..max {
                publish_to(&ch, &name, format!("{prefix}{i}").as_bytes()).await;
            }
        }
    };
    publish_all("old").await;
    let mut tags = Vec::new();
    for _ in 0..max {
        let m = within(
            5,
            ch.basic_get(name.as_str().into(), BasicGetOptions { no_ack: false }),
        )
        .await
        .expect("get")
        .expect("a message");
        tags.push(m.delivery.delivery_tag);
    }
    publish_all("new").await;
    let nack = |tag: u64, multiple: bool| {
        ch.basic_nack(
            tag,
            lapin::options::BasicNackOptions {
                multiple,
                requeue: true,
            },
        )
    };
    within(5, nack(tags[0], false)).await.expect("nack");
    if max > 1 {
        within(5, nack(tags[tags.len() - 1], true))
            .await
            .expect("nack multiple");
    }
    let kept = drain(&ch, &name).await;
    let dead = if dead_letters {
        // Dead letters are routed after the nack's work: wait (bounded) for them.
        for _ in 0..50 {
            if ready_count(&ch, &dlq).await >= max as u32 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        drain(&ch, &dlq).await
    } else {
        Vec::new()
    };
    let _ = delete_queue(&ch, &name).await;
    if dead_letters {
        let _ = delete_queue(&ch, &dlq).await;
    }
    (kept, dead)
}

#[tokio::test]
async fn requeueing_into_a_full_queue_keeps_its_length_limit() {
    for max in 1..=3 {
        let (kept, _) = requeue_into_a_full_queue(max, false).await;
        let expected: Vec<String> = (0..max).map(|i| format!("new{i}")).collect();
        assert_eq!(kept, expected, "x-max-length {max}");
    }
}

#[tokio::test]
async fn requeueing_into_a_full_queue_dead_letters_the_requeued_messages() {
    for max in 1..=3 {
        let (kept, dead) = requeue_into_a_full_queue(max, true).await;
        let new: Vec<String> = (0..max).map(|i| format!("new{i}")).collect();
        let old: Vec<String> = (0..max).map(|i| format!("old{i}")).collect();
        assert_eq!(kept, new, "x-max-length {max}");
        assert_eq!(dead, old, "x-max-length {max}: the requeued messages");
    }
}
