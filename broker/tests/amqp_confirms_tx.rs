//! Publisher confirms and transactions.

mod common;

use common::*;
use lapin::options::{BasicAckOptions, BasicGetOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};

async fn channel(conn: &Connection) -> Channel {
    within(5, conn.create_channel()).await.expect("channel")
}

async fn confirm_select(ch: &Channel) -> lapin::Result<()> {
    within(5, ch.confirm_select(ConfirmSelectOptions::default())).await
}

async fn get_body(ch: &Channel, queue: &str) -> Option<(String, bool)> {
    within(
        5,
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get")
    .map(|m| {
        (
            String::from_utf8(m.delivery.data).unwrap(),
            m.delivery.redelivered,
        )
    })
}

#[tokio::test]
async fn confirm_select_then_every_publish_is_acked() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let qch = channel(&conn).await;
    let q = exclusive_queue(&qch, "").await;
    let ch = channel(&conn).await;
    confirm_select(&ch).await.expect("confirm.select");
    let mut confirms = Vec::new();
    for i in 0..100 {
        let c = within(
            5,
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                Default::default(),
                format!("{i}").as_bytes(),
                BasicProperties::default(),
            ),
        )
        .await
        .expect("publish");
        confirms.push(c);
    }
    for c in confirms {
        assert_eq!(
            within(5, c).await.expect("confirm"),
            Confirmation::Ack(None)
        );
    }
    assert_eq!(ready_count(&qch, &q).await, 100);
}

#[tokio::test]
async fn unroutable_publish_in_confirm_mode_is_acked() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    confirm_select(&ch).await.expect("confirm.select");
    let c = within(
        5,
        ch.basic_publish(
            "amq.fanout".into(),
            "".into(),
            Default::default(),
            b"nowhere",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish");
    assert_eq!(
        within(5, c).await.expect("confirm"),
        Confirmation::Ack(None)
    );
}

#[tokio::test]
async fn publish_without_confirm_select_is_not_confirmed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = exclusive_queue(&ch, "").await;
    let c = within(
        5,
        ch.basic_publish(
            "".into(),
            q.as_str().into(),
            Default::default(),
            b"x",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish");
    assert_eq!(
        within(5, c).await.expect("confirm"),
        Confirmation::NotRequested
    );
}

#[tokio::test]
async fn confirm_select_twice_is_allowed() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    confirm_select(&ch).await.expect("confirm.select");
    confirm_select(&ch).await.expect("confirm.select again");
    assert!(ch.status().connected());
}

#[tokio::test]
async fn confirm_select_on_a_transactional_channel_fails() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    within(5, ch.tx_select()).await.expect("tx.select");
    assert_amqp_error(
        confirm_select(&ch).await,
        406,
        "PRECONDITION_FAILED - cannot switch from tx to confirm mode",
    );
}

#[tokio::test]
async fn tx_select_on_a_confirm_channel_fails() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    confirm_select(&ch).await.expect("confirm.select");
    assert_amqp_error(
        within(5, ch.tx_select()).await,
        406,
        "PRECONDITION_FAILED - cannot switch from confirm to tx mode",
    );
}

#[tokio::test]
async fn tx_commit_without_tx_select_fails() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    assert_amqp_error(
        within(5, ch.tx_commit()).await,
        406,
        "PRECONDITION_FAILED - channel is not transactional",
    );
}

#[tokio::test]
async fn tx_rollback_without_tx_select_fails() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    assert_amqp_error(
        within(5, ch.tx_rollback()).await,
        406,
        "PRECONDITION_FAILED - channel is not transactional",
    );
}

#[tokio::test]
async fn tx_holds_publishes_until_commit() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let qch = channel(&conn).await;
    let q = exclusive_queue(&qch, "").await;
    let ch = channel(&conn).await;
    within(5, ch.tx_select()).await.expect("tx.select");
    publish_to(&ch, &q, b"1").await;
    publish_to(&ch, &q, b"2").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(ready_count(&qch, &q).await, 0, "nothing before commit");
    within(5, ch.tx_commit()).await.expect("tx.commit");
    assert_eq!(get_body(&qch, &q).await, Some(("1".into(), false)));
    assert_eq!(get_body(&qch, &q).await, Some(("2".into(), false)));
    // The channel stays transactional: the next publish waits for the next commit.
    publish_to(&ch, &q, b"3").await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(ready_count(&qch, &q).await, 0);
    within(5, ch.tx_commit()).await.expect("tx.commit");
    assert_eq!(get_body(&qch, &q).await, Some(("3".into(), false)));
}

#[tokio::test]
async fn tx_rollback_discards_publishes() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let qch = channel(&conn).await;
    let q = exclusive_queue(&qch, "").await;
    let ch = channel(&conn).await;
    within(5, ch.tx_select()).await.expect("tx.select");
    publish_to(&ch, &q, b"dropped").await;
    within(5, ch.tx_rollback()).await.expect("tx.rollback");
    publish_to(&ch, &q, b"kept").await;
    within(5, ch.tx_commit()).await.expect("tx.commit");
    assert_eq!(get_body(&qch, &q).await, Some(("kept".into(), false)));
    assert_eq!(get_body(&qch, &q).await, None);
}

#[tokio::test]
async fn closing_a_transactional_channel_discards_uncommitted_publishes() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let qch = channel(&conn).await;
    let q = exclusive_queue(&qch, "").await;
    let ch = channel(&conn).await;
    within(5, ch.tx_select()).await.expect("tx.select");
    publish_to(&ch, &q, b"never").await;
    within(5, ch.close(200, "OK".into())).await.expect("close");
    assert_eq!(ready_count(&qch, &q).await, 0);
}

#[tokio::test]
async fn tx_holds_acks_until_commit() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let qch = channel(&conn).await;
    let q = exclusive_queue(&qch, "").await;
    publish_confirmed_to(&conn, &q, b"m").await;
    let ch = channel(&conn).await;
    within(5, ch.tx_select()).await.expect("tx.select");
    let m = within(
        5,
        ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }),
    )
    .await
    .expect("get")
    .expect("a message");
    within(5, m.delivery.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    // Not committed: closing the channel still requeues the message.
    within(5, ch.close(200, "OK".into())).await.expect("close");
    assert_eq!(get_body(&qch, &q).await, Some(("m".into(), true)));
}

#[tokio::test]
async fn tx_commit_applies_acks() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let qch = channel(&conn).await;
    let q = exclusive_queue(&qch, "").await;
    publish_confirmed_to(&conn, &q, b"m").await;
    let ch = channel(&conn).await;
    within(5, ch.tx_select()).await.expect("tx.select");
    let m = within(
        5,
        ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }),
    )
    .await
    .expect("get")
    .expect("a message");
    within(5, m.delivery.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    within(5, ch.tx_commit()).await.expect("tx.commit");
    within(5, ch.close(200, "OK".into())).await.expect("close");
    assert_eq!(get_body(&qch, &q).await, None, "acked for good");
}

#[tokio::test]
async fn tx_rollback_discards_acks_and_channel_close_then_requeues() {
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let qch = channel(&conn).await;
    let q = exclusive_queue(&qch, "").await;
    publish_confirmed_to(&conn, &q, b"m").await;
    let ch = channel(&conn).await;
    within(5, ch.tx_select()).await.expect("tx.select");
    let m = within(
        5,
        ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: false }),
    )
    .await
    .expect("get")
    .expect("a message");
    within(5, m.delivery.acker.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    within(5, ch.tx_rollback()).await.expect("tx.rollback");
    // The message is still unacked (not back in the queue) until the channel closes.
    assert_eq!(ready_count(&qch, &q).await, 0);
    within(5, ch.tx_commit()).await.expect("empty tx.commit");
    assert_eq!(ready_count(&qch, &q).await, 0);
    within(5, ch.close(200, "OK".into())).await.expect("close");
    assert_eq!(get_body(&qch, &q).await, Some(("m".into(), true)));
}

#[tokio::test]
async fn publish_refused_by_a_full_reject_publish_queue_is_nacked() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let broker = TestBroker::start().await;
    let conn = broker.connect().await;
    let ch = channel(&conn).await;
    let q = unique("q-reject-publish");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    within(
        5,
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            args,
        ),
    )
    .await
    .expect("declare");
    confirm_select(&ch).await.expect("confirm.select");
    let mut outcomes = Vec::new();
    for body in ["fits", "refused", "refused too"] {
        let c = within(
            5,
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                Default::default(),
                body.as_bytes(),
                BasicProperties::default(),
            ),
        )
        .await
        .expect("publish");
        outcomes.push(within(5, c).await.expect("confirm"));
    }
    assert_eq!(outcomes[0], Confirmation::Ack(None));
    assert!(matches!(outcomes[1], Confirmation::Nack(_)));
    assert!(matches!(outcomes[2], Confirmation::Nack(_)));
    assert_eq!(get_body(&ch, &q).await, Some(("fits".into(), false)));
}
