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

/// `basic.publish` of a persistent message to the default exchange, as raw frames.
fn persistent_publish_frames(channel: u16, routing_key: &str, body: &[u8]) -> Vec<u8> {
    use amq_protocol::frame::AMQPFrame;
    use amq_protocol::protocol::{AMQPClass, basic};
    let mut bytes = common::raw::encode(&AMQPFrame::Method(
        channel,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: routing_key.into(),
            mandatory: false,
            immediate: false,
        })),
    ));
    // Content header: class 60, weight 0, body size, flags with delivery-mode only, mode 2.
    bytes.push(2);
    bytes.extend_from_slice(&channel.to_be_bytes());
    bytes.extend_from_slice(&15u32.to_be_bytes());
    bytes.extend_from_slice(&[0, 60, 0, 0]);
    bytes.extend_from_slice(&(body.len() as u64).to_be_bytes());
    bytes.extend_from_slice(&[0x10, 0x00, 2, 0xCE]);
    bytes.push(3);
    bytes.extend_from_slice(&channel.to_be_bytes());
    bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
    bytes.extend_from_slice(body);
    bytes.push(0xCE);
    bytes
}

#[tokio::test]
async fn a_commit_ok_never_overtakes_an_earlier_commit_waiting_for_the_disk() {
    use amq_protocol::frame::AMQPFrame;
    use amq_protocol::protocol::{AMQPClass, queue, tx};
    use amq_protocol::types::FieldTable as RawTable;
    use common::raw::{Raw, encode};
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let flusher = broker.broker().storage.flusher().expect("a disk").clone();
    let mut raw = Raw::open(&broker).await;
    let q = unique("tx-commit-order");
    raw.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: q.as_str().into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: RawTable::default(),
        })),
    )
    .await;
    within(5, raw.method()).await.expect("declare-ok");
    raw.send_method(1, AMQPClass::Tx(tx::AMQPMethod::Select(tx::Select {})))
        .await;
    within(5, raw.method()).await.expect("select-ok");
    let commit = encode(&AMQPFrame::Method(
        1,
        AMQPClass::Tx(tx::AMQPMethod::Commit(tx::Commit {})),
    ));
    let is_commit_ok = |m: Option<(u16, AMQPClass)>| {
        matches!(m, Some((1, AMQPClass::Tx(tx::AMQPMethod::CommitOk(_)))))
    };

    // A commit with a persistent message, then an empty one, in one write: both are
    // answered, the first once a flush round has put its message on disk.
    let rounds = flusher
        .stats
        .rounds
        .load(std::sync::atomic::Ordering::SeqCst);
    let mut pipelined = persistent_publish_frames(1, &q, b"one");
    pipelined.extend_from_slice(&commit);
    pipelined.extend_from_slice(&commit);
    raw.send(&pipelined).await;
    assert!(is_commit_ok(within(10, raw.method()).await));
    assert!(
        flusher
            .stats
            .rounds
            .load(std::sync::atomic::Ordering::SeqCst)
            > rounds,
        "the first commit-ok came before its message was on disk"
    );
    assert!(is_commit_ok(within(10, raw.method()).await));

    // With the flusher stopped the first commit can never be answered: nor may the empty
    // commit behind it, which the client would take for the first's answer.
    flusher.shutdown();
    raw.send(&pipelined).await;
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), raw.method()).await;
    assert!(early.is_err(), "answered out of order: {early:?}");
}
