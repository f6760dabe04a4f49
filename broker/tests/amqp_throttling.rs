//! Per-vhost throttling (Warren's vhost limits `max-publish-rate` and `max-declare-rate`, as
//! ApsaraMQ offers it): past a limit the channel is closed with 530 and `denied for too many
//! requests`, the connection stays open, and the limit survives a restart.

mod common;

use common::http::Api;
use common::*;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use serde_json::json;

const DENIED: &str = "NOT_ALLOWED - denied for too many requests";

async fn limited(limit: &str, value: i64) -> (TestBroker, Api) {
    let b = TestBroker::start().await;
    let api = Api::new(&b);
    api.put(
        &format!("/api/vhost-limits/%2F/{limit}"),
        &json!({"value": value}).to_string(),
    )
    .await
    .status(204);
    (b, api)
}

async fn publish_many(conn: &Connection, n: usize) -> Option<(u16, String)> {
    let ch = within(5, conn.create_channel()).await.unwrap();
    let mut closed = errors(conn);
    for i in 0..n {
        let sent = ch
            .basic_publish(
                "".into(),
                "nowhere".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await;
        if sent.is_err() {
            break;
        }
    }
    Some(closed.next().await)
}

#[tokio::test]
async fn publishing_faster_than_the_vhost_allows_closes_the_channel_with_530() {
    let (b, api) = limited("max-publish-rate", 20).await;
    if b.is_external() {
        return;
    }
    let limits = api.json("/api/vhost-limits/%2F").await;
    assert_eq!(limits[0]["value"]["max-publish-rate"], 20, "{limits}");
    let conn = b.connect().await;
    let closed = publish_many(&conn, 200).await;
    assert_eq!(closed, Some((530, DENIED.to_owned())));
    // The connection stays open, and within the rate publishing works (once the second's
    // worth of publishes is back).
    assert!(conn.status().connected());
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let q = exclusive_queue(&ch, "").await;
    publish_to(&ch, &q, b"within the limit").await;
    assert_eq!(ready_count(&ch, &q).await, 1);
    // Lifted: no limit.
    api.delete("/api/vhost-limits/%2F/max-publish-rate")
        .await
        .status(204);
    let ch = within(5, conn.create_channel()).await.unwrap();
    for _ in 0..200 {
        publish_to(&ch, &q, b"x").await;
    }
    assert_eq!(ready_count(&ch, &q).await, 201);
}

#[tokio::test]
async fn declaring_faster_than_the_vhost_allows_closes_the_channel_and_the_limit_is_kept() {
    let (b, _api) = limited("max-declare-rate", 5).await;
    if b.is_external() {
        return;
    }
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let mut closed = errors(&conn);
    let mut declared = 0;
    for i in 0..50 {
        let r = ch
            .queue_declare(
                format!("{}-{i}", unique("thr")).as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        if r.is_err() {
            break;
        }
        declared += 1;
    }
    assert!((5..=6).contains(&declared), "{declared} declares passed");
    assert_eq!(closed.next().await, (530, DENIED.to_owned()));
    assert!(conn.status().connected());
    // Kept in the definitions: a restart keeps throttling.
    drop(conn);
    let b = b.restart().await;
    let api = Api::new(&b);
    let limits = api.json("/api/vhost-limits/%2F").await;
    assert_eq!(limits[0]["value"]["max-declare-rate"], 5, "{limits}");
}
