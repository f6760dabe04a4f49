//! Policies through the management API, at work on queues and exchanges over AMQP: length
//! limits, TTL with dead-lettering and alternate exchanges set by policy; the highest
//! priority wins; queue arguments win over policy keys; changes apply at once; policies
//! survive a restart and travel in the definitions. With `WARREN_TEST_AMQP_URL` and
//! `WARREN_TEST_HTTP_URL` set, the same tests run against RabbitMQ.

mod common;

use common::http::Api;
use common::*;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};
use serde_json::{Value, json};
use std::time::Duration;

async fn setup(b: &TestBroker) -> (Api, lapin::Connection, Channel) {
    let api = Api::new(b);
    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    (api, conn, ch)
}

async fn declare(ch: &Channel, name: &str, args: FieldTable) {
    within(
        5,
        ch.queue_declare(name.into(), QueueDeclareOptions::default(), args),
    )
    .await
    .expect("queue.declare");
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &str) {
    let confirm = within(
        5,
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            BasicProperties::default(),
        ),
    )
    .await
    .expect("publish");
    within(5, confirm).await.expect("confirm");
}

async fn get_body(ch: &Channel, queue: &str) -> Option<String> {
    within(
        5,
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .expect("basic.get")
    .map(|m| String::from_utf8_lossy(&m.delivery.data).into_owned())
}

fn path(vhost_and_name: &str) -> String {
    format!("/api/policies/%2F/{vhost_and_name}")
}

async fn put_policy(api: &Api, name: &str, body: Value) -> u16 {
    let answer = api.put(&path(name), &body.to_string()).await;
    let status = answer.status.as_u16();
    assert!(matches!(status, 201 | 204), "{}: {}", status, answer.text);
    status
}

/// Waits for a queue's ready count (the management API may lag on RabbitMQ; AMQP does not).
async fn ready_is(ch: &Channel, queue: &str, want: u32) {
    let mut got = 0;
    for _ in 0..50 {
        got = ready_count(ch, queue).await;
        if got == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("queue {queue} has {got} ready messages, expected {want}");
}

#[tokio::test]
async fn policies_are_set_listed_shown_and_deleted() {
    let b = TestBroker::start().await;
    let api = Api::new(&b);
    let name = unique("crud");
    let body = json!({"pattern": "^crud\\.", "definition": {"max-length": 10}, "apply-to": "queues", "priority": 3});
    assert_eq!(put_policy(&api, &name, body).await, 201);
    let shown = api.json(&path(&name)).await;
    assert_eq!(
        shown,
        json!({"vhost": "/", "name": name, "pattern": "^crud\\.", "apply-to": "queues", "definition": {"max-length": 10}, "priority": 3})
    );
    let all = api.json("/api/policies").await;
    assert!(all.as_array().unwrap().contains(&shown), "{all}");
    let in_vhost = api.json("/api/policies/%2F").await;
    assert!(in_vhost.as_array().unwrap().contains(&shown), "{in_vhost}");
    // Defaults: priority 0, apply-to all. A second PUT replaces it.
    let body = json!({"pattern": "^crud-other\\.", "definition": {"max-length": 1}});
    assert_eq!(put_policy(&api, &name, body).await, 204);
    let shown = api.json(&path(&name)).await;
    assert_eq!(shown["apply-to"], "all");
    assert_eq!(shown["priority"], 0);
    api.delete(&path(&name)).await.status(204);
    api.get(&path(&name)).await.error(404, "Object Not Found");
    api.delete(&path(&name))
        .await
        .error(404, "Object Not Found");
    b.stop().await;
}

#[tokio::test]
async fn bad_policies_are_refused_with_a_reason() {
    let b = TestBroker::start().await;
    let api = Api::new(&b);
    let name = unique("bad");
    for (body, says) in [
        (
            json!({"definition": {"max-length": 1}}),
            "[{key_missing,pattern}]",
        ),
        (json!({"pattern": ".*"}), "[{key_missing,definition}]"),
        (
            json!({"pattern": ".*", "definition": {"max-lenght": 1}}),
            "are not recognised policy settings",
        ),
        (
            json!({"pattern": ".*", "definition": {"max-length": -1}}),
            "-1 is not a valid maximum length",
        ),
        (
            json!({"pattern": ".*", "definition": {"message-ttl": -1}}),
            "-1 is not a valid message TTL",
        ),
        (
            json!({"pattern": ".*", "definition": {"overflow": "sideways"}}),
            "is not a valid overflow value",
        ),
        (
            json!({"pattern": ".*", "definition": {"max-length": 1}, "apply-to": "topics"}),
            "apply-to 'topics' unrecognised",
        ),
        (
            json!({"pattern": ".*", "definition": {"max-length": 1}, "priority": "5"}),
            "priority should be a number",
        ),
        (
            json!({"pattern": "(", "definition": {"max-length": 1}}),
            "pattern should be regular expression but is invalid",
        ),
        (
            json!({"pattern": ".*", "definition": {}}),
            "no policy provided",
        ),
    ] {
        let reason = api
            .put(&path(&name), &body.to_string())
            .await
            .error(400, "bad_request");
        // RabbitMQ writes < and > in its reasons as HTML entities.
        let reason = reason
            .as_str()
            .expect("a text reason")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
        assert!(
            reason.contains(says),
            "{body}: {reason:?} should say {says}"
        );
    }
    api.get(&path(&name)).await.error(404, "Object Not Found");
    b.stop().await;
}

#[tokio::test]
async fn a_length_policy_applies_at_once_and_arguments_win_over_it() {
    let b = TestBroker::start().await;
    let (api, _conn, ch) = setup(&b).await;
    let prefix = unique("len");
    let (limited, own, other) = (
        format!("{prefix}.a"),
        format!("{prefix}.own"),
        format!("x{prefix}"),
    );
    declare(&ch, &limited, FieldTable::default()).await;
    declare(&ch, &own, args(&[("x-max-length", AMQPValue::LongInt(4))])).await;
    let overflow = format!("{prefix}.overflow");
    declare(
        &ch,
        &overflow,
        args(&[("x-overflow", text("reject-publish"))]),
    )
    .await;
    declare(&ch, &other, FieldTable::default()).await;
    for q in [&limited, &own, &other, &overflow] {
        for i in 0..6 {
            publish(&ch, "", q, &format!("m{i}")).await;
        }
    }
    ready_is(&ch, &own, 4).await;
    ready_is(&ch, &overflow, 6).await;
    let name = unique("maxlen");
    let pattern = format!("^{}\\.", regex_escape(&prefix));
    put_policy(
        &api,
        &name,
        json!({"pattern": pattern, "definition": {"max-length": 2}, "apply-to": "queues"}),
    )
    .await;
    // Applied to the queue already there: the oldest go (drop-head).
    ready_is(&ch, &limited, 2).await;
    assert_eq!(get_body(&ch, &limited).await.as_deref(), Some("m4"));
    // With a limit of its own too, the lower one applies, as in RabbitMQ; a queue the
    // pattern misses keeps everything.
    ready_is(&ch, &own, 2).await;
    ready_is(&ch, &other, 6).await;
    // A queue that refuses publishes when full keeps what it holds under a lower limit, as in
    // RabbitMQ, and for keys other than limits and times its argument wins: a policy asking
    // for drop-head does not make it drop.
    let put_overflow = unique("overflow");
    put_policy(
        &api,
        &put_overflow,
        json!({"pattern": format!("^{}\\.overflow$", regex_escape(&prefix)), "definition": {"max-length": 1, "overflow": "drop-head"}, "priority": 5}),
    )
    .await;
    ready_is(&ch, &overflow, 6).await;
    publish(&ch, "", &overflow, "refused").await;
    ready_is(&ch, &overflow, 6).await;
    assert_eq!(get_body(&ch, &overflow).await.as_deref(), Some("m0"));
    api.delete(&path(&put_overflow)).await.status(204);
    let q = queue_with_policy(&api, &limited, &name).await;
    assert_eq!(q["effective_policy_definition"], json!({"max-length": 2}));
    // New publishes are held to it too.
    for i in 0..3 {
        publish(&ch, "", &limited, &format!("n{i}")).await;
    }
    ready_is(&ch, &limited, 2).await;
    // Deleted: the limit goes with it.
    api.delete(&path(&name)).await.status(204);
    for i in 0..3 {
        publish(&ch, "", &limited, &format!("p{i}")).await;
    }
    ready_is(&ch, &limited, 5).await;
    queue_where(&api, &limited, |q| {
        q["effective_policy_definition"] == json!({}) && q["policy"].is_null()
    })
    .await;
    b.stop().await;
}

#[tokio::test]
async fn the_highest_priority_policy_applies_and_changes_are_reapplied() {
    let b = TestBroker::start().await;
    let (api, _conn, ch) = setup(&b).await;
    let prefix = unique("prio");
    let queue = format!("{prefix}.q");
    declare(&ch, &queue, FieldTable::default()).await;
    let pattern = format!("^{}\\.", regex_escape(&prefix));
    let (low, high) = (format!("{prefix}-low"), format!("{prefix}-high"));
    put_policy(
        &api,
        &low,
        json!({"pattern": pattern, "definition": {"max-length": 5}, "priority": 1}),
    )
    .await;
    put_policy(
        &api,
        &high,
        json!({"pattern": pattern, "definition": {"max-length": 1}, "priority": 2}),
    )
    .await;
    for i in 0..6 {
        publish(&ch, "", &queue, &format!("m{i}")).await;
    }
    ready_is(&ch, &queue, 1).await;
    queue_with_policy(&api, &queue, &high).await;
    // The higher one goes: the lower one applies from then on.
    api.delete(&path(&high)).await.status(204);
    for i in 0..6 {
        publish(&ch, "", &queue, &format!("n{i}")).await;
    }
    ready_is(&ch, &queue, 5).await;
    // A policy edited in place applies at once too.
    put_policy(
        &api,
        &low,
        json!({"pattern": pattern, "definition": {"max-length": 3}, "priority": 1}),
    )
    .await;
    ready_is(&ch, &queue, 3).await;
    api.delete(&path(&low)).await.status(204);
    b.stop().await;
}

#[tokio::test]
async fn ttl_and_dead_lettering_come_from_a_policy() {
    let b = TestBroker::start().await;
    let (api, _conn, ch) = setup(&b).await;
    let prefix = unique("ttl");
    let (queue, dlq, dlx) = (
        format!("{prefix}.work"),
        format!("{prefix}-dead"),
        format!("{prefix}-dlx"),
    );
    within(
        5,
        ch.exchange_declare(
            dlx.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("exchange.declare");
    declare(&ch, &dlq, FieldTable::default()).await;
    within(
        5,
        ch.queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.bind");
    let name = unique("ttl-policy");
    put_policy(
        &api,
        &name,
        json!({"pattern": format!("^{}\\.", regex_escape(&prefix)), "definition": {"message-ttl": 200, "dead-letter-exchange": dlx}, "apply-to": "queues"}),
    )
    .await;
    declare(&ch, &queue, FieldTable::default()).await;
    publish(&ch, "", &queue, "expiring").await;
    ready_is(&ch, &dlq, 1).await;
    ready_is(&ch, &queue, 0).await;
    let m = within(
        5,
        ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true }),
    )
    .await
    .unwrap()
    .expect("a dead letter");
    let headers = m.delivery.properties.headers().clone().expect("headers");
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("no x-death: {headers:?}");
    };
    let Some(AMQPValue::FieldTable(death)) = deaths.as_slice().first() else {
        panic!("x-death is empty");
    };
    assert_eq!(
        death.inner().get("reason"),
        Some(&AMQPValue::LongString("expired".into()))
    );
    api.delete(&path(&name)).await.status(204);
    b.stop().await;
}

#[tokio::test]
async fn a_ttl_policy_applies_to_messages_published_after_it() {
    let b = TestBroker::start().await;
    let (api, _conn, ch) = setup(&b).await;
    let prefix = unique("ttl-after");
    let queue = format!("{prefix}.q");
    declare(&ch, &queue, FieldTable::default()).await;
    publish(&ch, "", &queue, "before").await;
    let name = unique("ttl-after");
    put_policy(
        &api,
        &name,
        json!({"pattern": format!("^{}\\.", regex_escape(&prefix)), "definition": {"message-ttl": 100}, "apply-to": "queues"}),
    )
    .await;
    publish(&ch, "", &queue, "after").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // As in RabbitMQ: the older message does not expire; the one published under the TTL
    // does, once it is at the head.
    assert_eq!(get_body(&ch, &queue).await.as_deref(), Some("before"));
    ready_is(&ch, &queue, 0).await;
    api.delete(&path(&name)).await.status(204);
    b.stop().await;
}

#[tokio::test]
async fn an_operator_policy_caps_the_limits_of_queues_and_their_policies() {
    let b = TestBroker::start().await;
    let (api, _conn, ch) = setup(&b).await;
    let prefix = unique("op");
    let queue = format!("{prefix}.q");
    let pattern = format!("^{}\\.", regex_escape(&prefix));
    declare(
        &ch,
        &queue,
        args(&[("x-max-length", AMQPValue::LongInt(100))]),
    )
    .await;
    let (name, op) = (unique("op-policy"), unique("op-cap"));
    put_policy(
        &api,
        &name,
        json!({"pattern": pattern, "definition": {"max-length": 50, "message-ttl": 60000}, "apply-to": "queues"}),
    )
    .await;
    let op_path = format!("/api/operator-policies/%2F/{op}");
    let body = json!({"pattern": pattern, "definition": {"max-length": 3}, "apply-to": "queues"});
    api.put(&op_path, &body.to_string()).await.status(201);
    for i in 0..6 {
        publish(&ch, "", &queue, &format!("m{i}")).await;
    }
    ready_is(&ch, &queue, 3).await;
    let q = queue_where(&api, &queue, |q| q["operator_policy"] == json!(op)).await;
    assert_eq!(q["policy"], json!(name));
    assert_eq!(
        q["effective_policy_definition"],
        json!({"max-length": 3, "message-ttl": 60000})
    );
    let listed = api.json("/api/operator-policies/%2F").await;
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == json!(op) && p["definition"] == json!({"max-length": 3})),
        "{listed}"
    );
    // Policymakers read operator policies but only administrators write them.
    let pm = unique("pm");
    api.put(
        &format!("/api/users/{pm}"),
        r#"{"password":"pw","tags":"policymaker"}"#,
    )
    .await
    .status(201);
    api.put(
        &format!("/api/permissions/%2F/{pm}"),
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )
    .await
    .status(201);
    let as_pm = api.as_user(&pm, "pw");
    as_pm.get("/api/operator-policies").await.status(200);
    assert_eq!(
        as_pm
            .put(&op_path, &body.to_string())
            .await
            .error(401, "not_authorised"),
        "Not administrator user"
    );
    api.delete(&format!("/api/users/{pm}")).await.status(204);
    // Only limits and times: other keys are refused.
    let reason = api
        .put(
            &format!("/api/operator-policies/%2F/{}", unique("op-bad")),
            &json!({"pattern": ".*", "definition": {"dead-letter-exchange": "x"}}).to_string(),
        )
        .await
        .error(400, "bad_request");
    let reason = reason
        .as_str()
        .unwrap()
        .replace("&lt;", "<")
        .replace("&gt;", ">");
    assert!(
        reason.contains("are not recognised policy settings"),
        "{reason}"
    );
    // Deleted: the policy's own limit applies again.
    api.delete(&op_path).await.status(204);
    for i in 0..60 {
        publish(&ch, "", &queue, &format!("n{i}")).await;
    }
    ready_is(&ch, &queue, 50).await;
    api.delete(&path(&name)).await.status(204);
    b.stop().await;
}

#[tokio::test]
async fn an_exchange_policy_sets_an_alternate_exchange() {
    let b = TestBroker::start().await;
    let (api, _conn, ch) = setup(&b).await;
    let prefix = unique("ae");
    let (main, ae, caught) = (
        format!("{prefix}.main"),
        format!("{prefix}-ae"),
        format!("{prefix}-caught"),
    );
    for (x, kind) in [(&main, ExchangeKind::Direct), (&ae, ExchangeKind::Fanout)] {
        within(
            5,
            ch.exchange_declare(
                x.as_str().into(),
                kind,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .expect("exchange.declare");
    }
    declare(&ch, &caught, FieldTable::default()).await;
    within(
        5,
        ch.queue_bind(
            caught.as_str().into(),
            ae.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.bind");
    let pattern = format!("^{}\\.", regex_escape(&prefix));
    // A policy for queues only does not touch exchanges.
    let queues_only = unique("ae-queues");
    put_policy(
        &api,
        &queues_only,
        json!({"pattern": pattern, "definition": {"alternate-exchange": ae}, "apply-to": "queues"}),
    )
    .await;
    publish(&ch, &main, "nowhere", "lost").await;
    ready_is(&ch, &caught, 0).await;
    let name = unique("ae-policy");
    put_policy(
        &api,
        &name,
        json!({"pattern": pattern, "definition": {"alternate-exchange": ae}, "apply-to": "exchanges"}),
    )
    .await;
    publish(&ch, &main, "nowhere", "caught").await;
    ready_is(&ch, &caught, 1).await;
    let x = api
        .json(&format!("/api/exchanges/%2F/{}", urlencode(&main)))
        .await;
    assert_eq!(x["policy"], json!(name));
    for p in [&queues_only, &name] {
        api.delete(&path(p)).await.status(204);
    }
    b.stop().await;
}

#[tokio::test]
async fn policies_survive_a_restart_and_travel_in_the_definitions() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return;
    }
    let (api, conn, ch) = setup(&b).await;
    let queue = "kept.q";
    within(
        5,
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .unwrap();
    put_policy(
        &api,
        "keep",
        json!({"pattern": "^kept\\.", "definition": {"max-length": 2}, "apply-to": "queues", "priority": 7}),
    )
    .await;
    let cap =
        json!({"pattern": "^kept\\.", "definition": {"message-ttl": 600000}, "apply-to": "queues"});
    api.put("/api/operator-policies/%2F/cap", &cap.to_string())
        .await
        .status(201);
    let exported = api.json("/api/definitions").await;
    let policy = json!({"vhost": "/", "name": "keep", "pattern": "^kept\\.", "apply-to": "queues", "definition": {"max-length": 2}, "priority": 7});
    assert_eq!(exported["policies"], json!([policy]));
    drop(ch);
    drop(conn);
    let b = b.restart().await;
    let (api, _conn, ch) = setup(&b).await;
    assert_eq!(api.json("/api/policies/%2F/keep").await, policy);
    let kept = api.json("/api/operator-policies/%2F/cap").await;
    assert_eq!(kept["definition"], json!({"message-ttl": 600000}));
    for i in 0..5 {
        publish(&ch, "", queue, &format!("m{i}")).await;
    }
    ready_is(&ch, queue, 2).await;
    // Imported definitions bring their policies.
    api.delete("/api/policies/%2F/keep").await.status(204);
    api.post(
        "/api/definitions",
        &json!({"policies": [{"vhost": "/", "name": "imported", "pattern": "^kept\\.", "apply-to": "all", "definition": {"max-length": 1}, "priority": 0}]}).to_string(),
    )
    .await
    .status(204);
    ready_is(&ch, queue, 1).await;
    b.stop().await;
}

/// The queue's management object once it names `policy` (RabbitMQ's statistics lag).
async fn queue_with_policy(api: &Api, queue: &str, policy: &str) -> Value {
    queue_where(api, queue, |q| q["policy"] == json!(policy)).await
}

/// The queue's management object once `wanted` holds of it, within 10 s.
async fn queue_where(api: &Api, queue: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let mut q = Value::Null;
    for _ in 0..100 {
        q = api
            .json(&format!("/api/queues/%2F/{}", urlencode(queue)))
            .await;
        if wanted(&q) {
            return q;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("queue {queue} never got there: {q}");
}

/// Escapes the regex metacharacters a unique name may hold.
fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if "\\.+*?()|[]{}^$".contains(c) {
                vec!['\\', c]
            } else {
                vec![c]
            }
        })
        .collect()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
