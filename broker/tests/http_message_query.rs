//! Message query (Warren's, as ApsaraMQ offers it): ready messages looked up by `message_id`
//! or by publish time through the management API, left in the queue, with a bounded result.

mod common;

use common::http::Api;
use common::*;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel};
use serde_json::Value;

async fn publish_id(ch: &Channel, queue: &str, id: &str, body: &[u8]) {
    let confirm = within(
        5,
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_message_id(id.into()),
        ),
    )
    .await
    .unwrap();
    assert!(within(5, confirm).await.unwrap().is_ack());
}

fn bodies(answer: &Value) -> Vec<String> {
    answer["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn messages_are_found_by_id_and_by_publish_time_and_stay_in_the_queue() {
    // A small window: most of the queue is paged to disk, and the query reads it there too.
    let b = TestBroker::start_with(|c| c.queue_window_messages = 4).await;
    if b.is_external() {
        return;
    }
    let api = Api::new(&b);
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    let q = unique("query");
    within(
        5,
        ch.queue_declare(
            q.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    for i in 0..20 {
        publish_id(&ch, &q, &format!("id-{i}"), format!("early {i}").as_bytes()).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let middle = warren_broker::broker::message::now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    for i in 20..30 {
        publish_id(&ch, &q, &format!("id-{i}"), format!("late {i}").as_bytes()).await;
    }
    let path = |query: &str| format!("/api/warren/queues/%2F/{q}/messages?{query}");

    let by_id = api.json(&path("message_id=id-17")).await;
    assert_eq!(bodies(&by_id), ["early 17"], "{by_id}");
    assert_eq!(by_id["messages"][0]["properties"]["message_id"], "id-17");
    assert!(by_id["messages"][0]["published_at"].as_u64().unwrap() < middle);

    let late = api.json(&path(&format!("from={middle}&limit=100"))).await;
    assert_eq!(bodies(&late).len(), 10, "{late}");
    assert_eq!(bodies(&late)[0], "late 20");
    assert_eq!(late["complete"], true);

    let early = api.json(&path(&format!("to={middle}&limit=5"))).await;
    assert_eq!(
        bodies(&early),
        ["early 0", "early 1", "early 2", "early 3", "early 4"]
    );
    assert_eq!(early["complete"], false, "stopped at the limit");

    // Nothing was consumed.
    assert_eq!(ready_count(&ch, &q).await, 30);
    let none = api.json(&path("message_id=no-such-id")).await;
    assert_eq!(none["messages"], serde_json::json!([]));
    assert_eq!(none["complete"], true);
}

#[tokio::test]
async fn bad_queries_are_refused_with_a_reason() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return;
    }
    let api = Api::new(&b);
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let q = exclusive_queue(&ch, "").await;
    let path = |query: &str| format!("/api/warren/queues/%2F/{q}/messages?{query}");
    for (query, reason) in [
        ("", "give message_id"),
        ("from=yesterday", "from must be a non-negative integer"),
        ("message_id=x&limit=1000", "limit must be between 1 and 100"),
        ("message_id=x&colour=red", "unknown parameter 'colour'"),
    ] {
        let a = api.get(&path(query)).await;
        let why = a.error(400, "bad_request");
        assert!(why.as_str().unwrap().contains(reason), "{query}: {why}");
    }
    let missing = api
        .get("/api/warren/queues/%2F/no-such-queue/messages?message_id=x")
        .await;
    missing.status(404);
}
