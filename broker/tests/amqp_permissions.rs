//! Per-vhost permissions over AMQP: each of configure, write and read refused as RabbitMQ
//! refuses it (403 with its text), and a vhost without permissions refused at connection.open.
//! Warren-only: the user is created inside the in-process broker.

mod common;

use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use warren_broker::auth::{Permission, User, hash_password};

const USER: &str = "limited";

/// A broker with a user allowed to configure `app.*`, write `app.in` and read `app.out`.
async fn broker_with_limited_user() -> Option<(TestBroker, Connection)> {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return None;
    }
    let users = &broker.broker().users;
    users.put(User {
        name: USER.into(),
        password_hash: hash_password("secret"),
        tags: vec![],
    });
    users.set_permission(
        USER,
        "/",
        Permission::new("^app\\.", "^app\\.in$", "^app\\.out$").unwrap(),
    );
    let uri = format!("amqp://{USER}:secret@{}/%2f", broker.addr);
    let conn = within(
        5,
        Connection::connect(&uri, ConnectionProperties::default()),
    )
    .await
    .expect("limited user connects");
    Some((broker, conn))
}

fn refused(kind: &str, name: &str) -> String {
    format!("ACCESS_REFUSED - access to {kind} '{name}' in vhost '/' refused for user '{USER}'")
}

#[tokio::test]
async fn declaring_without_configure_permission_is_refused() {
    let Some((_broker, conn)) = broker_with_limited_user().await else {
        return;
    };
    let ch = within(5, conn.create_channel()).await.expect("channel");
    within(
        5,
        ch.queue_declare(
            "app.ok".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("allowed");
    let denied = within(
        5,
        ch.queue_declare(
            "other".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(denied, 403, &refused("queue", "other"));
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let denied = within(
        5,
        ch.exchange_declare(
            "other-x".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(denied, 403, &refused("exchange", "other-x"));
}

#[tokio::test]
async fn publishing_without_write_permission_is_refused() {
    let Some((_broker, conn)) = broker_with_limited_user().await else {
        return;
    };
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let mut errors = errors(&conn);
    within(
        5,
        ch.basic_publish(
            "amq.direct".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("sent");
    assert_eq!(
        errors.next().await,
        (403, refused("exchange", "amq.direct"))
    );
    // The default exchange is checked as amq.default.
    let ch = within(5, conn.create_channel()).await.expect("channel");
    within(
        5,
        ch.basic_publish(
            "".into(),
            "app.in".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("sent");
    assert_eq!(
        errors.next().await,
        (403, refused("exchange", "amq.default"))
    );
}

#[tokio::test]
async fn getting_and_binding_without_read_or_write_permission_is_refused() {
    let Some((broker, conn)) = broker_with_limited_user().await else {
        return;
    };
    // An admin declares the queues the limited user may not configure.
    let admin = broker.connect().await;
    let ach = within(5, admin.create_channel()).await.expect("channel");
    for q in ["app.out", "app.in"] {
        within(
            5,
            ach.queue_declare(
                q.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .expect("declare");
    }
    let ch = within(5, conn.create_channel()).await.expect("channel");
    within(
        5,
        ch.basic_get("app.out".into(), BasicGetOptions::default()),
    )
    .await
    .expect("read allowed on app.out");
    let denied = within(5, ch.basic_get("app.in".into(), BasicGetOptions::default())).await;
    assert_amqp_error(denied, 403, &refused("queue", "app.in"));
    // Binding needs write on the queue: app.out is readable, not writable.
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let denied = within(
        5,
        ch.queue_bind(
            "app.out".into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    assert_amqp_error(denied, 403, &refused("queue", "app.out"));
}

#[tokio::test]
async fn a_vhost_without_permissions_is_refused_at_connection_open() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    broker.broker().users.put(User {
        name: "nobody".into(),
        password_hash: hash_password("pw"),
        tags: vec![],
    });
    let uri = format!("amqp://nobody:pw@{}/%2f", broker.addr);
    let refused = within(
        5,
        Connection::connect(&uri, ConnectionProperties::default()),
    )
    .await;
    assert_amqp_error(
        refused,
        530,
        "NOT_ALLOWED - access to vhost '/' refused for user 'nobody'",
    );
}

#[tokio::test]
async fn declaring_a_queue_with_a_dead_letter_exchange_needs_read_on_it_and_write_on_the_exchange()
{
    let Some((broker, conn)) = broker_with_limited_user().await else {
        return;
    };
    let declare = |name: &'static str, dlx: &'static str| {
        let conn = &conn;
        async move {
            let ch = within(5, conn.create_channel()).await.expect("channel");
            within(
                5,
                ch.queue_declare(
                    name.into(),
                    QueueDeclareOptions::default(),
                    args(&[("x-dead-letter-exchange", text(dlx))]),
                ),
            )
            .await
        }
    };
    // Dead letters would be published to the exchange as this user: write is needed there.
    assert_amqp_error(
        declare("app.out", "app.dlx").await,
        403,
        &refused("exchange", "app.dlx"),
    );
    assert_amqp_error(
        declare("app.out", "").await,
        403,
        &refused("exchange", "amq.default"),
    );
    // Read on the queue is checked first.
    assert_amqp_error(
        declare("app.in", "app.dlx").await,
        403,
        &refused("queue", "app.in"),
    );
    declare("app.out", "app.in").await.expect("allowed");
    // Only a new queue is checked: redeclaring one that exists is not refused.
    let admin = broker.connect().await;
    let ch = within(5, admin.create_channel()).await.expect("channel");
    within(
        5,
        ch.queue_declare(
            "app.other".into(),
            QueueDeclareOptions::default(),
            args(&[("x-dead-letter-exchange", text("app.dlx"))]),
        ),
    )
    .await
    .expect("guest declares");
    declare("app.other", "app.dlx")
        .await
        .expect("redeclaring an existing queue");
}
