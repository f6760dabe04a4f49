//! The management HTTP API against a live broker: every endpoint, with RabbitMQ 3.10's status
//! codes, fields and error bodies (see docs/rabbitmq-3.10-management-reference.md), and its
//! effects seen over AMQP.

mod common;

use common::http::Api;
use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ConnectionProperties};
use serde_json::{Value, json};
use std::time::Duration;

async fn broker() -> (TestBroker, Api) {
    let b = TestBroker::start_with(|c| c.stats_interval_ms = 100).await;
    let api = Api::new(&b);
    (b, api)
}

// ------------------------------------------------------------------------------ authentication

#[tokio::test]
async fn requests_without_valid_credentials_are_refused_as_rabbitmq_refuses_them() {
    let (_b, api) = broker().await;
    let a = api.anonymous().get("/api/overview").await;
    a.status(401);
    assert_eq!(
        a.headers["www-authenticate"],
        "Basic realm=\"RabbitMQ Management\""
    );
    assert!(a.text.is_empty());
    let a = api.as_user("guest", "wrong").get("/api/overview").await;
    assert_eq!(a.error(401, "not_authorized"), "Login failed");
    assert!(a.headers.contains_key("www-authenticate"));
    let a = api.as_user("nobody", "x").get("/api/queues").await;
    assert_eq!(a.error(401, "not_authorized"), "Login failed");
    let a = api
        .anonymous()
        .send(
            reqwest::Method::GET,
            "/api/overview",
            None,
            &[("authorization", "Basic !!!notb64")],
        )
        .await;
    a.status(400);
    // Routing comes before authentication: an unknown path is 404 even without credentials.
    let a = api.anonymous().get("/api/no-such-thing").await;
    assert_eq!(a.error(404, "Object Not Found"), "Not Found");
}

#[tokio::test]
async fn tags_decide_what_a_user_may_do() {
    let (b, api) = broker().await;
    for (user, tags) in [("plain", ""), ("mgmt", "management"), ("mon", "monitoring")] {
        api.put(
            &format!("/api/users/{user}"),
            &json!({"password": "pw", "tags": tags}).to_string(),
        )
        .await
        .status(201);
    }
    api.put("/api/vhosts/mine", "").await.status(201);
    api.put("/api/vhosts/other", "").await.status(201);
    api.put(
        "/api/permissions/mine/mgmt",
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )
    .await
    .status(201);
    let plain = api.as_user("plain", "pw");
    assert_eq!(
        plain.get("/api/whoami").await.error(401, "not_authorised"),
        "Not management user"
    );
    let mgmt = api.as_user("mgmt", "pw");
    assert_eq!(
        mgmt.json("/api/whoami").await,
        json!({"name": "mgmt", "tags": ["management"]})
    );
    assert_eq!(
        mgmt.get("/api/users").await.error(401, "not_authorised"),
        "Not administrator user"
    );
    assert_eq!(
        mgmt.get("/api/nodes").await.error(401, "not_authorised"),
        "Not monitor user"
    );
    assert_eq!(
        mgmt.put("/api/vhosts/x", "")
            .await
            .error(401, "not_authorised"),
        "Not administrator user"
    );
    let names: Vec<Value> = mgmt
        .json("/api/vhosts")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("mine")]);
    assert_eq!(
        mgmt.get("/api/queues/other")
            .await
            .error(401, "not_authorised"),
        "User not authorised to access virtual host"
    );
    mgmt.put("/api/queues/mine/q", "{}").await.status(201);
    let mon = api.as_user("mon", "pw");
    assert_eq!(mon.json("/api/vhosts").await.as_array().unwrap().len(), 3);
    mon.json("/api/nodes").await;
    // The guest user may only log in from loopback; this request comes from 127.0.0.1.
    assert!(!b.is_external());
}

// ------------------------------------------------------------------------------------ overview

#[tokio::test]
async fn overview_whoami_and_nodes_describe_the_node() {
    let (b, api) = broker().await;
    let o = api.json("/api/overview").await;
    assert_eq!(o["rabbitmq_version"], "3.10.8");
    assert_eq!(o["product_name"], "Warren");
    assert_eq!(o["object_totals"]["exchanges"], 7);
    assert_eq!(o["object_totals"]["queues"], 0);
    let listeners = o["listeners"].as_array().unwrap();
    assert!(
        listeners
            .iter()
            .any(|l| l["protocol"] == "amqp" && l["port"] == b.running().amqp_addr.port())
    );
    assert_eq!(
        api.json("/api/whoami").await,
        json!({"name": "guest", "tags": ["administrator"]})
    );
    let nodes = api.json("/api/nodes").await;
    let node = &nodes[0];
    assert_eq!(node["name"], o["node"]);
    assert!(node["mem_used"].as_u64().unwrap() > 0);
    assert!(node["fd_total"].as_u64().unwrap() > 0);
    assert_eq!(node["running"], true);
    let name = node["name"].as_str().unwrap();
    api.json(&format!("/api/nodes/{name}")).await;
    api.get("/api/nodes/nosuch@node")
        .await
        .error(404, "Object Not Found");
    let cols = api
        .json("/api/overview?columns=rabbitmq_version,object_totals.queues")
        .await;
    assert_eq!(
        cols,
        json!({"rabbitmq_version": "3.10.8", "object_totals": {"queues": 0}})
    );
    let a = api.post("/api/overview", "{}").await;
    assert_eq!(a.status.as_u16(), 405);
}

#[tokio::test]
async fn message_counters_and_rates_follow_traffic() {
    let (b, api) = broker().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        "rates".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for _ in 0..20 {
        ch.basic_publish(
            "".into(),
            "rates".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    ch.basic_publish(
        "".into(),
        "nowhere".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let get = ch
        .basic_get("rates".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .unwrap();
    get.ack(BasicAckOptions::default()).await.unwrap();
    eventually("node counters", || async {
        let o = api.json("/api/overview").await;
        let m = &o["message_stats"];
        m["publish"] == 21
            && m["confirm"] == 21
            && m["drop_unroutable"] == 1
            && m["get"] == 1
            && m["ack"] == 1
            && o["queue_totals"]["messages"] == 19
            && o["object_totals"]["connections"] == 1
            && o["object_totals"]["channels"] == 1
    })
    .await;
    let q = api.json("/api/queues/%2F/rates").await;
    assert_eq!(q["message_stats"]["publish"], 20);
    assert_eq!(q["message_stats"]["get"], 1);
    assert_eq!(q["message_stats"]["deliver_get"], 1);
    assert_eq!(q["messages_ready"], 19);
    // Publishing steadily shows a rate above zero within a few sampling intervals.
    let publisher = async {
        for _ in 0..40 {
            ch.basic_publish(
                "".into(),
                "rates".into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default(),
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let watcher = async {
        let mut seen = 0.0f64;
        for _ in 0..60 {
            let q = api.json("/api/queues/%2F/rates").await;
            seen = seen.max(
                q["message_stats"]["publish_details"]["rate"]
                    .as_f64()
                    .unwrap(),
            );
            if seen > 0.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        seen
    };
    let ((), rate) = tokio::join!(publisher, watcher);
    assert!(rate > 0.0, "publish rate stayed at {rate}");
    let chans = api.json("/api/channels").await;
    assert_eq!(chans[0]["confirm"], true);
    assert!(chans[0]["message_stats"]["publish"].as_u64().unwrap() >= 21);
}

// -------------------------------------------------------------------------------------- vhosts

#[tokio::test]
async fn vhosts_are_created_updated_listed_and_deleted() {
    let (b, api) = broker().await;
    api.put("/api/vhosts/v1", "").await.status(201);
    api.put("/api/vhosts/v1", r#"{"description":"d","tags":"a,b"}"#)
        .await
        .status(204);
    let v = api.json("/api/vhosts/v1").await;
    assert_eq!(v["description"], "d");
    assert_eq!(v["tags"], json!(["a", "b"]));
    assert_eq!(
        v["metadata"],
        json!({"description": "d", "tags": ["a", "b"]})
    );
    assert_eq!(v["tracing"], false);
    // As RabbitMQ: PUT replaces the metadata.
    api.put("/api/vhosts/v1", r#"{"tags":["x"]}"#)
        .await
        .status(204);
    let v = api.json("/api/vhosts/v1").await;
    assert_eq!(
        (v["description"].clone(), v["tags"].clone()),
        (json!(""), json!(["x"]))
    );
    // The creator may use the new vhost.
    let p = api.json("/api/permissions/v1/guest").await;
    assert_eq!(p["configure"], ".*");
    let names: Vec<String> = api
        .json("/api/vhosts")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec!["/", "v1"]);

    // Deleting a vhost closes its connections and removes its queues. The socket is dropped
    // right after the 320 (see below), so the client may see the close or only the reset.
    api.put("/api/queues/v1/q", r#"{"durable":true}"#)
        .await
        .status(201);
    let conn = TestBroker::connect_uri(&b.uri_with_vhost("v1")).await;
    api.delete("/api/vhosts/v1").await.status(204);
    eventually("the vhost's connection is closed", || async {
        !conn.status().connected()
    })
    .await;
    api.get("/api/vhosts/v1")
        .await
        .error(404, "Object Not Found");
    api.get("/api/queues/v1")
        .await
        .error(404, "Object Not Found");
    api.delete("/api/vhosts/v1")
        .await
        .error(404, "Object Not Found");
    api.get("/api/permissions/v1/guest")
        .await
        .error(404, "Object Not Found");
}

/// RabbitMQ 3.10 closes the connections of a deleted vhost with 320 and drops their sockets
/// at once, before the deletion is answered: a client that then closes its channel and its
/// connection finds them closed already, instead of a 320 arriving in answer to its close.
#[tokio::test]
async fn deleting_a_vhost_drops_its_connections_before_it_is_answered() {
    use amq_protocol::protocol::{AMQPClass, queue};
    let (b, api) = broker().await;
    let vhost = unique("warren-test-gone");
    api.put(&format!("/api/vhosts/{vhost}"), "{}")
        .await
        .status(201);
    api.put(
        &format!("/api/permissions/{vhost}/guest"),
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )
    .await
    .status(204);
    let mut raw = common::raw::Raw::open_in(&b, &vhost).await;
    raw.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "durable".into(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    raw.method().await.expect("declare-ok");
    raw.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
            queue: "durable".into(),
            if_unused: false,
            if_empty: false,
            nowait: false,
        })),
    )
    .await;
    raw.method().await.expect("delete-ok");
    api.delete(&format!("/api/permissions/{vhost}/guest"))
        .await
        .status(204);
    api.delete(&format!("/api/vhosts/{vhost}"))
        .await
        .status(204);
    let (ch, close) = within(5, raw.method()).await.expect("connection.close");
    let AMQPClass::Connection(amq_protocol::protocol::connection::AMQPMethod::Close(close)) = close
    else {
        panic!("expected connection.close, got {close:?}");
    };
    // RabbitMQ races two notices here and says either; Warren says "is down".
    let down = format!("CONNECTION_FORCED - vhost '{vhost}' is down");
    let deleted = format!("CONNECTION_FORCED - vhost '{vhost}' is deleted");
    assert_eq!((ch, close.reply_code), (0, 320));
    let text = close.reply_text.as_str();
    assert!(text == down || text == deleted, "{text}");
    if !b.is_external() {
        assert_eq!(text, down);
    }
    // No close-ok is awaited: the socket is already closed.
    assert!(within(5, raw.frame()).await.is_none(), "socket closed");
}

/// A queue declared over HTTP with a dead-letter exchange needs what it needs over AMQP:
/// read on itself and write on the exchange its dead letters go to.
#[tokio::test]
async fn declaring_a_queue_with_a_dead_letter_exchange_over_http_needs_read_and_write() {
    let (b, api) = broker().await;
    if b.is_external() {
        return;
    }
    let vhost = unique("warren-test-dlx");
    let user = unique("dlx-user");
    api.put(&format!("/api/vhosts/{vhost}"), "{}")
        .await
        .status(201);
    api.put(
        &format!("/api/users/{user}"),
        &json!({"password": "pw", "tags": "management"}).to_string(),
    )
    .await
    .status(201);
    api.put(
        &format!("/api/permissions/{vhost}/{user}"),
        r#"{"configure":"^app\\.","write":"^app\\.in$","read":"^app\\.out$"}"#,
    )
    .await
    .status(201);
    let limited = api.as_user(&user, "pw");
    let declare = |queue: &str, dlx: &str| {
        let path = format!("/api/queues/{vhost}/{queue}");
        let body = json!({"arguments": {"x-dead-letter-exchange": dlx}}).to_string();
        let limited = &limited;
        async move { limited.put(&path, &body).await }
    };
    // No write on the exchange, then no read on the queue.
    declare("app.out", "app.dlx")
        .await
        .error(401, "not_authorised");
    declare("app.in", "app.in")
        .await
        .error(401, "not_authorised");
    api.get(&format!("/api/queues/{vhost}/app.out"))
        .await
        .status(404);
    declare("app.out", "app.in").await.status(201);
    api.delete(&format!("/api/vhosts/{vhost}"))
        .await
        .status(204);
    api.delete(&format!("/api/users/{user}")).await.status(204);
}

#[tokio::test]
async fn bad_bodies_get_400_with_a_reason() {
    let (_b, api) = broker().await;
    assert_eq!(
        api.put("/api/vhosts/v", "{not json")
            .await
            .error(400, "bad_request"),
        "not_json"
    );
    assert_eq!(
        api.put("/api/vhosts/v", "[1,2]")
            .await
            .error(400, "bad_request"),
        "not_json"
    );
    let r = api
        .put("/api/vhosts/v", "\"s\"")
        .await
        .error(400, "bad_request");
    assert!(r.as_str().unwrap().contains("doubly-JSON-encoded"));
    assert_eq!(
        api.put("/api/vhosts/v", r#"{"tracing":"yes"}"#)
            .await
            .error(400, "bad_request"),
        json!(["not_boolean", "yes"])
    );
    // Unknown fields are refused (RabbitMQ ignores them; a misspelt field is a mistake).
    let r = api
        .put("/api/queues/%2F/q", r#"{"durabel":true}"#)
        .await
        .error(400, "bad_request");
    assert!(r.as_str().unwrap().contains("'durabel'"), "{r}");
    // Wrong types: 400, not RabbitMQ's 500.
    let r = api
        .put("/api/users/u", r#"{"password":5,"tags":""}"#)
        .await
        .error(400, "bad_request");
    assert!(r.as_str().unwrap().contains("password"), "{r}");
    let r = api
        .put("/api/exchanges/%2F/x", r#"{"arguments":"x"}"#)
        .await
        .error(400, "bad_request");
    assert!(r.as_str().unwrap().contains("arguments"), "{r}");
    let r = api
        .put("/api/vhosts/v", r#"{"tags":5}"#)
        .await
        .error(400, "bad_request");
    assert!(r.as_str().unwrap().contains("tags"), "{r}");
    // Nothing was created by the refused requests.
    api.get("/api/vhosts/v")
        .await
        .error(404, "Object Not Found");
    api.get("/api/users/u").await.error(404, "Object Not Found");
}

#[tokio::test]
async fn vhost_limits_are_set_listed_enforced_and_cleared() {
    let (b, api) = broker().await;
    api.put("/api/vhosts/lim", "").await.status(201);
    assert_eq!(api.json("/api/vhost-limits").await, json!([]));
    api.put("/api/vhost-limits/lim/max-connections", r#"{"value":1}"#)
        .await
        .status(204);
    api.put("/api/vhost-limits/lim/max-queues", r#"{"value":1}"#)
        .await
        .status(204);
    assert_eq!(
        api.json("/api/vhost-limits/lim").await,
        json!([{"vhost": "lim", "value": {"max-connections": 1, "max-queues": 1}}])
    );
    assert_eq!(
        api.put("/api/vhost-limits/lim/max-queues", "{}")
            .await
            .error(400, "bad_request"),
        "[{key_missing,value}]"
    );
    let r = api
        .put("/api/vhost-limits/lim/max-queues", r#"{"value":"abc"}"#)
        .await
        .error(400, "bad_request");
    assert!(r.as_str().unwrap().contains("should be a number"), "{r}");
    let r = api
        .put("/api/vhost-limits/lim/max-bogus", r#"{"value":1}"#)
        .await
        .error(400, "bad_request");
    assert!(r.as_str().unwrap().contains("Unrecognised terms"), "{r}");
    assert_eq!(
        api.put("/api/vhost-limits/missing/max-queues", r#"{"value":1}"#)
            .await
            .error(404, "not_found"),
        "vhost_not_found"
    );
    // Enforced over AMQP.
    let uri = b.uri_with_vhost("lim");
    let first = TestBroker::connect_uri(&uri).await;
    let second = lapin::Connection::connect(&uri, ConnectionProperties::default()).await;
    let Err(err) = second else {
        panic!("a second connection over the limit was accepted")
    };
    assert_eq!(
        amqp_error(&err),
        Some((
            530,
            "NOT_ALLOWED - access to vhost 'lim' refused for user 'guest': connection limit (1) is reached".into()
        ))
    );
    let ch = first.create_channel().await.unwrap();
    ch.queue_declare(
        "one".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    assert_amqp_error(
        ch.queue_declare(
            "two".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
        406,
        "PRECONDITION_FAILED - cannot declare queue 'two': queue limit in vhost 'lim' (1) is reached",
    );
    api.delete("/api/vhost-limits/lim/max-queues")
        .await
        .status(204);
    api.delete("/api/vhost-limits/lim/max-connections")
        .await
        .status(204);
    api.delete("/api/vhost-limits/lim/max-connections")
        .await
        .status(204);
    assert_eq!(api.json("/api/vhost-limits/lim").await, json!([]));
    let ch = first.create_channel().await.unwrap();
    ch.queue_declare(
        "two".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

// ------------------------------------------------------------------------- users, permissions

/// RabbitMQ's SHA-256 scheme: base64(salt ++ sha256(salt ++ password)).
fn rabbit_hash(salt: [u8; 4], password: &str) -> String {
    use base64::Engine;
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&h.finalize());
    base64::engine::general_purpose::STANDARD.encode(out)
}

#[tokio::test]
async fn users_are_created_with_passwords_or_hashes_and_can_log_in() {
    let (b, api) = broker().await;
    api.put(
        "/api/users/alice",
        r#"{"password":"s3cret","tags":"monitoring,management"}"#,
    )
    .await
    .status(201);
    let u = api.json("/api/users/alice").await;
    assert_eq!(u["tags"], json!(["monitoring", "management"]));
    assert_eq!(u["hashing_algorithm"], "rabbit_password_hashing_sha256");
    assert_eq!(u["limits"], json!({}));
    let hash = u["password_hash"].as_str().unwrap();
    use base64::Engine;
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(hash)
            .unwrap()
            .len(),
        36
    );
    api.put(
        "/api/permissions/%2F/alice",
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )
    .await
    .status(201);
    TestBroker::connect_uri(&b.uri_with_credentials("alice", "s3cret")).await;
    // A hash made elsewhere (as RabbitMQ makes them) logs in with its password.
    let hash = rabbit_hash([1, 2, 3, 4], "from-rabbit");
    api.put(
        "/api/users/bob",
        &json!({"password_hash": hash, "tags": ""}).to_string(),
    )
    .await
    .status(201);
    api.put(
        "/api/permissions/%2F/bob",
        r#"{"configure":"","write":"","read":""}"#,
    )
    .await
    .status(201);
    TestBroker::connect_uri(&b.uri_with_credentials("bob", "from-rabbit")).await;
    assert_eq!(api.json("/api/users/bob").await["password_hash"], hash);
    // Errors as RabbitMQ words them.
    assert_eq!(
        api.put("/api/users/c", r#"{"password":"p"}"#)
            .await
            .error(400, "bad_request"),
        "tags_not_present"
    );
    assert_eq!(
        api.put(
            "/api/users/c",
            r#"{"password":"p","password_hash":"abc","tags":""}"#
        )
        .await
        .error(400, "bad_request"),
        "both_password_and_password_hash_are_provided"
    );
    assert_eq!(
        api.put(
            "/api/users/c",
            r#"{"password_hash":"notbase64!!","tags":""}"#
        )
        .await
        .error(400, "bad_request"),
        json!(["not_base64", "notbase64!!"])
    );
    let r = api
        .put(
            "/api/users/c",
            &json!({"password_hash": hash, "hashing_algorithm": "rabbit_password_hashing_md5", "tags": ""}).to_string(),
        )
        .await
        .error(400, "bad_request");
    assert!(r.as_str().unwrap().contains("not supported"), "{r}");
    // Updating changes the password; the old one stops working.
    api.put(
        "/api/users/alice",
        r#"{"password":"new","tags":"management"}"#,
    )
    .await
    .status(204);
    let old = lapin::Connection::connect(
        &b.uri_with_credentials("alice", "s3cret"),
        ConnectionProperties::default(),
    )
    .await;
    assert!(old.is_err());
    TestBroker::connect_uri(&b.uri_with_credentials("alice", "new")).await;
    let names: Vec<Value> = api
        .json("/api/users")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("alice"), json!("bob"), json!("guest")]);
    api.delete("/api/users/bob").await.status(204);
    api.delete("/api/users/bob")
        .await
        .error(404, "Object Not Found");
    api.put("/api/users/x1", r#"{"password":"p","tags":""}"#)
        .await
        .status(201);
    assert_eq!(
        api.post("/api/users/bulk-delete", r#"{"users":["x1","nope"]}"#)
            .await
            .error(400, "bad_request"),
        json!(["no_such_user", "nope"])
    );
    api.get("/api/users/x1")
        .await
        .error(404, "Object Not Found");
    let without: Vec<Value> = api
        .json("/api/users/without-permissions")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].clone())
        .collect();
    assert!(without.is_empty(), "{without:?}");
}

#[tokio::test]
async fn permissions_are_set_read_enforced_and_cleared() {
    let (b, api) = broker().await;
    api.put("/api/users/pu", r#"{"password":"pw","tags":""}"#)
        .await
        .status(201);
    let path = "/api/permissions/%2F/pu";
    api.get(path).await.error(404, "Object Not Found");
    assert_eq!(
        api.put(path, r#"{"configure":".*","write":".*"}"#)
            .await
            .error(400, "bad_request"),
        "[{key_missing,read}]"
    );
    assert_eq!(
        api.put(path, "{}").await.error(400, "bad_request"),
        "[{key_missing,configure},{key_missing,write},{key_missing,read}]"
    );
    let r = api
        .put(path, r#"{"configure":"(","write":"","read":""}"#)
        .await
        .error(400, "bad_request");
    assert_eq!(r[0], "invalid_regexp");
    assert_eq!(
        api.put(
            "/api/permissions/nope/pu",
            r#"{"configure":"","write":"","read":""}"#
        )
        .await
        .error(400, "bad_request"),
        "vhost_or_user_not_found"
    );
    api.put(path, r#"{"configure":"^own-","write":".*","read":".*"}"#)
        .await
        .status(201);
    api.put(path, r#"{"configure":"^own-","write":".*","read":".*"}"#)
        .await
        .status(204);
    assert_eq!(
        api.json(path).await,
        json!({"user": "pu", "vhost": "/", "configure": "^own-", "write": ".*", "read": ".*"})
    );
    assert_eq!(
        api.json("/api/users/pu/permissions")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert!(
        api.json("/api/vhosts/%2F/permissions")
            .await
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["user"] == "pu")
    );
    // Enforced over AMQP: configure is refused outside ^own-.
    let conn = TestBroker::connect_uri(&b.uri_with_credentials("pu", "pw")).await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "own-q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    assert_amqp_error(
        ch.queue_declare(
            "other".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
        403,
        "ACCESS_REFUSED - access to queue 'other' in vhost '/' refused for user 'pu'",
    );
    api.delete(path).await.status(204);
    api.delete(path).await.error(404, "Object Not Found");
    let refused = lapin::Connection::connect(
        &b.uri_with_credentials("pu", "pw"),
        ConnectionProperties::default(),
    )
    .await;
    assert!(refused.is_err());
}

// ----------------------------------------------------------------------------------- exchanges

#[tokio::test]
async fn exchanges_are_declared_shown_and_deleted_with_rabbitmq_rules() {
    let (_b, api) = broker().await;
    let x = "/api/exchanges/%2F/ex1";
    api.put(
        x,
        r#"{"type":"topic","durable":true,"auto_delete":false,"internal":false,"arguments":{}}"#,
    )
    .await
    .status(201);
    api.put(x, r#"{"type":"topic","durable":true}"#)
        .await
        .status(204);
    assert_eq!(
        api.put(x, r#"{"type":"direct","durable":true}"#)
            .await
            .error(400, "bad_request"),
        "inequivalent arg 'type' for exchange 'ex1' in vhost '/': received 'direct' but current is 'topic'"
    );
    assert_eq!(
        api.put(x, r#"{"type":"topic","durable":false}"#)
            .await
            .error(400, "bad_request"),
        "inequivalent arg 'durable' for exchange 'ex1' in vhost '/': received 'false' but current is 'true'"
    );
    assert_eq!(
        api.put("/api/exchanges/%2F/ex2", r#"{"type":"bogus"}"#)
            .await
            .error(400, "bad_request"),
        "invalid exchange type 'bogus'"
    );
    assert_eq!(
        api.put("/api/exchanges/%2F/amq.foo", r#"{"type":"direct"}"#)
            .await
            .error(401, "not_authorised"),
        "Access refused."
    );
    assert_eq!(
        api.put("/api/exchanges/missing/x", "{}")
            .await
            .error(404, "not_found"),
        "vhost_not_found"
    );
    api.put("/api/exchanges/%2F/ex3", "{}").await.status(201);
    let e = api.json("/api/exchanges/%2F/ex3").await;
    assert_eq!(
        (
            e["type"].clone(),
            e["durable"].clone(),
            e["incoming"].clone()
        ),
        (json!("direct"), json!(false), json!([]))
    );
    api.put(
        "/api/exchanges/%2F/hx",
        r#"{"type":"headers","auto_delete":true,"internal":true,"arguments":{"alternate-exchange":"amq.fanout","x-foo":5}}"#,
    )
    .await
    .status(201);
    let h = api.json("/api/exchanges/%2F/hx").await;
    assert_eq!(
        h["arguments"],
        json!({"alternate-exchange": "amq.fanout", "x-foo": 5})
    );
    assert_eq!(h["internal"], true);
    let d = api.json("/api/exchanges/%2F/amq.default").await;
    assert_eq!(d["name"], "");
    let names: Vec<Value> = api
        .json("/api/exchanges/%2F")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].clone())
        .collect();
    assert_eq!(names[0], "");
    assert!(names.contains(&json!("amq.topic")) && names.contains(&json!("ex1")));
    // if-unused, system exchanges, missing ones.
    api.put("/api/queues/%2F/xq", "{}").await.status(201);
    api.post("/api/bindings/%2F/e/ex1/q/xq", r#"{"routing_key":"a.#"}"#)
        .await
        .status(201);
    assert_eq!(
        api.send(
            reqwest::Method::DELETE,
            "/api/exchanges/%2F/ex1?if-unused=true",
            None,
            &[]
        )
        .await
        .error(400, "bad_request"),
        "exchange 'ex1' in vhost '/' in use"
    );
    assert_eq!(
        api.delete("/api/exchanges/%2F/amq.direct")
            .await
            .error(401, "not_authorised"),
        "Access refused."
    );
    api.delete(x).await.status(204);
    api.delete(x).await.error(404, "Object Not Found");
    api.get("/api/exchanges/missing")
        .await
        .error(404, "Object Not Found");
}

// -------------------------------------------------------------------------------------- queues

#[tokio::test]
async fn queues_are_declared_inspected_purged_and_deleted() {
    let (b, api) = broker().await;
    let q = "/api/queues/%2F/q1";
    api.put(q, r#"{"durable":true,"auto_delete":false,"arguments":{}}"#)
        .await
        .status(201);
    api.put(q, r#"{"durable":true}"#).await.status(204);
    assert_eq!(
        api.put(q, r#"{"durable":false}"#)
            .await
            .error(400, "bad_request"),
        "inequivalent arg 'durable' for queue 'q1' in vhost '/': received 'false' but current is 'true'"
    );
    assert_eq!(
        api.put(q, r#"{"durable":true,"arguments":{"x-max-length":10}}"#)
            .await
            .error(400, "bad_request"),
        "inequivalent arg 'x-max-length' for queue 'q1' in vhost '/': received the value '10' of type 'long' but current is none"
    );
    assert_eq!(
        api.put(
            "/api/queues/%2F/bad",
            r#"{"arguments":{"x-max-length":"abc"}}"#
        )
        .await
        .error(400, "bad_request"),
        "invalid arg 'x-max-length' for queue 'bad' in vhost '/': \"expected integer, got longstr\""
    );
    assert_eq!(
        api.put(
            "/api/queues/%2F/bad",
            r#"{"arguments":{"x-message-ttl":-1}}"#
        )
        .await
        .error(400, "bad_request"),
        "invalid arg 'x-message-ttl' for queue 'bad' in vhost '/': {value_negative,-1}"
    );
    assert_eq!(
        api.put("/api/queues/%2F/amq.q", "{}")
            .await
            .error(401, "not_authorised"),
        "Access refused."
    );
    assert_eq!(
        api.put("/api/queues/missing/q", "{}")
            .await
            .error(404, "not_found"),
        "vhost_not_found"
    );
    // A queue declared over HTTP is the same queue AMQP sees; its counts show here.
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    for i in 0..5u8 {
        ch.basic_publish(
            "".into(),
            "q1".into(),
            BasicPublishOptions::default(),
            &[i],
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    ch.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let _consumer = ch
        .basic_consume(
            "q1".into(),
            "ctag-1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    eventually("counts", || async {
        let o = api.json(q).await;
        o["messages"] == 5
            && o["messages_ready"] == 3
            && o["messages_unacknowledged"] == 2
            && o["consumers"] == 1
    })
    .await;
    let o = api.json(q).await;
    assert_eq!(o["durable"], true);
    assert_eq!(o["type"], "classic");
    assert_eq!(o["state"], "running");
    let details = &o["consumer_details"][0];
    assert_eq!(details["consumer_tag"], "ctag-1");
    assert_eq!(details["prefetch_count"], 2);
    assert_eq!(details["queue"], json!({"name": "q1", "vhost": "/"}));
    assert_eq!(o["message_stats"]["publish"], 5);
    assert_eq!(o["message_stats"]["deliver"], 2);
    // One-byte bodies: three ready, two out with the consumer.
    assert_eq!(o["message_bytes"], 5);
    assert_eq!(o["message_bytes_ready"], 3);
    assert_eq!(o["message_bytes_unacknowledged"], 2);
    // Lists: sort, columns, pagination.
    api.put("/api/queues/%2F/a-first", "{}").await.status(201);
    let list = api.json("/api/queues?columns=name,messages").await;
    assert_eq!(
        list,
        json!([{"name": "a-first", "messages": 0}, {"name": "q1", "messages": 5}])
    );
    let sorted = api
        .json("/api/queues/%2F?sort=messages&sort_reverse=true&columns=name")
        .await;
    assert_eq!(sorted[0]["name"], "q1");
    let page = api.json("/api/queues?page=2&page_size=1").await;
    assert_eq!(page["items"][0]["name"], "q1");
    assert_eq!(
        (page["page_count"].clone(), page["total_count"].clone()),
        (json!(2), json!(2))
    );
    assert_eq!(
        api.get("/api/queues?page=9&page_size=1")
            .await
            .error(400, "page_out_of_range"),
        "Page out of range, page: 9 page size: 1, len: 2"
    );
    // Delete with conditions, purge.
    let del = |query: &'static str| {
        let api = &api;
        async move {
            api.send(reqwest::Method::DELETE, &format!("{q}{query}"), None, &[])
                .await
        }
    };
    assert_eq!(
        del("?if-unused=true").await.error(400, "bad_request"),
        "queue 'q1' in vhost '/' in use"
    );
    conn.close(200, "bye".into()).await.unwrap();
    eventually("requeued", || async {
        api.json(q).await["messages_ready"] == 5
    })
    .await;
    assert_eq!(
        del("?if-empty=true").await.error(400, "bad_request"),
        "queue 'q1' in vhost '/' not empty"
    );
    api.delete(&format!("{q}/contents")).await.status(204);
    assert_eq!(api.json(q).await["messages"], 0);
    del("?if-empty=true").await.status(204);
    api.get(q).await.error(404, "Object Not Found");
    api.delete(q).await.error(404, "Object Not Found");
    api.delete(&format!("{q}/contents"))
        .await
        .error(404, "Object Not Found");
}

#[tokio::test]
async fn exclusive_queues_of_a_connection_are_locked_to_http_too() {
    let (b, api) = broker().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "excl".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let o = api.json("/api/queues/%2F/excl").await;
    assert_eq!(o["exclusive"], true);
    assert!(
        o["owner_pid_details"]["name"]
            .as_str()
            .unwrap()
            .contains(" -> ")
    );
    let r = api
        .put("/api/queues/%2F/excl", "{}")
        .await
        .error(400, "bad_request");
    assert!(
        r.as_str()
            .unwrap()
            .starts_with("cannot obtain exclusive access to locked queue 'excl'")
    );
    let r = api
        .delete("/api/queues/%2F/excl")
        .await
        .error(400, "bad_request");
    assert!(
        r.as_str()
            .unwrap()
            .starts_with("cannot obtain exclusive access")
    );
    let defs = api.json("/api/definitions").await;
    assert!(
        defs["queues"].as_array().unwrap().is_empty(),
        "exclusive queues are not exported"
    );
}

// ------------------------------------------------------------------------------------ bindings

#[tokio::test]
async fn bindings_are_created_listed_found_by_properties_key_and_deleted() {
    let (b, api) = broker().await;
    api.put("/api/exchanges/%2F/bx", r#"{"type":"topic"}"#)
        .await
        .status(201);
    api.put("/api/exchanges/%2F/bx2", r#"{"type":"fanout"}"#)
        .await
        .status(201);
    api.put("/api/queues/%2F/bq", "{}").await.status(201);
    let a = api
        .post(
            "/api/bindings/%2F/e/bx/q/bq",
            r#"{"routing_key":"a.#","arguments":{}}"#,
        )
        .await;
    a.status(201);
    assert_eq!(a.headers["location"], "bq/a.%2523");
    assert!(a.text.is_empty());
    // Idempotent.
    api.post("/api/bindings/%2F/e/bx/q/bq", r#"{"routing_key":"a.#"}"#)
        .await
        .status(201);
    let a = api.post("/api/bindings/%2F/e/bx/q/bq", "").await;
    assert_eq!(a.headers["location"], "bq/~");
    api.post(
        "/api/bindings/%2F/e/bx/q/bq",
        r#"{"routing_key":"k","arguments":{"x-foo":"bar"}}"#,
    )
    .await
    .status(201);
    api.post("/api/bindings/%2F/e/bx/e/bx2", r#"{"routing_key":"e.#"}"#)
        .await
        .status(201);
    let between = api.json("/api/bindings/%2F/e/bx/q/bq").await;
    let between = between.as_array().unwrap();
    assert_eq!(between.len(), 3);
    let with_args = between.iter().find(|b| b["routing_key"] == "k").unwrap();
    let props = with_args["properties_key"].as_str().unwrap().to_owned();
    assert!(props.starts_with("k~"), "{props}");
    let one = api
        .json(&format!(
            "/api/bindings/%2F/e/bx/q/bq/{}",
            urlencode(&props)
        ))
        .await;
    assert_eq!(one["arguments"], json!({"x-foo": "bar"}));
    api.get("/api/bindings/%2F/e/bx/q/bq/k~nope")
        .await
        .error(404, "Object Not Found");
    // The default exchange's implicit bindings are listed.
    let all = api.json("/api/bindings/%2F").await;
    assert!(all.as_array().unwrap().iter().any(|b| b["source"] == ""
        && b["destination"] == "bq"
        && b["routing_key"] == "bq"
        && b["properties_key"] == "bq"));
    let src = api.json("/api/exchanges/%2F/bx/bindings/source").await;
    assert_eq!(src.as_array().unwrap().len(), 4);
    let dst = api
        .json("/api/exchanges/%2F/bx2/bindings/destination")
        .await;
    assert_eq!(dst.as_array().unwrap().len(), 1);
    assert_eq!(
        api.json("/api/queues/%2F/bq/bindings")
            .await
            .as_array()
            .unwrap()
            .len(),
        4
    );
    // Routing follows: a message for a.b reaches bq.
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    publish_confirmed(&ch, "bx", "a.b").await;
    assert_eq!(ready_count(&ch, "bq").await, 1);
    // Errors.
    assert_eq!(
        api.post("/api/bindings/%2F/e/bx/q/missing", "{}")
            .await
            .error(404, "not_found"),
        "no queue 'missing' in vhost '/'"
    );
    assert_eq!(
        api.post("/api/bindings/%2F/e/missing/q/bq", "{}")
            .await
            .error(404, "not_found"),
        "no exchange 'missing' in vhost '/'"
    );
    assert_eq!(
        api.post("/api/bindings/%2F/e/amq.default/q/bq", "{}")
            .await
            .error(401, "not_authorised"),
        "Access refused."
    );
    assert_eq!(
        api.delete("/api/bindings/%2F/e/amq.default/q/bq/bq")
            .await
            .error(401, "not_authorised"),
        "Access refused."
    );
    // Delete.
    api.delete("/api/bindings/%2F/e/bx/q/bq/a.%2523")
        .await
        .status(204);
    api.delete("/api/bindings/%2F/e/bx/q/bq/a.%2523")
        .await
        .error(404, "Object Not Found");
    api.delete(&format!(
        "/api/bindings/%2F/e/bx/q/bq/{}",
        urlencode(&props)
    ))
    .await
    .status(204);
    publish_confirmed(&ch, "bx", "a.c").await;
    assert_eq!(ready_count(&ch, "bq").await, 1);
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn publish_confirmed(ch: &lapin::Channel, exchange: &str, key: &str) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .ok();
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        b"m",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

// ------------------------------------------------------------------------------ publish and get

#[tokio::test]
async fn messages_are_published_and_got_over_http() {
    let (b, api) = broker().await;
    api.put("/api/queues/%2F/pq", r#"{"durable":true}"#)
        .await
        .status(201);
    let publish = |body: Value| {
        let api = &api;
        async move {
            api.post("/api/exchanges/%2F/amq.default/publish", &body.to_string())
                .await
        }
    };
    let a = publish(json!({"properties":{"delivery_mode":2,"headers":{"k":1},"content_type":"text/plain","user_id":"guest"},"routing_key":"pq","payload":"hello","payload_encoding":"string"})).await;
    assert_eq!(a.status(200).json(), json!({"routed": true}));
    let a = publish(
        json!({"properties":{},"routing_key":"pq","payload":"/w==","payload_encoding":"base64"}),
    )
    .await;
    assert_eq!(a.json(), json!({"routed": true}));
    let a = publish(
        json!({"properties":{},"routing_key":"nowhere","payload":"x","payload_encoding":"string"}),
    )
    .await;
    assert_eq!(a.json(), json!({"routed": false}));
    // Errors.
    assert_eq!(
        publish(json!({"routing_key":"pq","payload":"x","payload_encoding":"string"}))
            .await
            .error(400, "bad_request"),
        "[{key_missing,properties}]"
    );
    assert_eq!(
        publish(
            json!({"properties":{},"routing_key":"pq","payload":"!!!","payload_encoding":"base64"})
        )
        .await
        .error(400, "bad_request"),
        json!(["not_base64", "!!!"])
    );
    assert_eq!(
        publish(
            json!({"properties":{},"routing_key":"pq","payload":"x","payload_encoding":"bogus"})
        )
        .await
        .error(400, "bad_request"),
        json!(["unsupported_encoding", "bogus"])
    );
    assert_eq!(
        publish(json!({"properties":{"user_id":"other"},"routing_key":"pq","payload":"x","payload_encoding":"string"}))
            .await
            .error(400, "bad_request"),
        "406 PRECONDITION_FAILED - user_id property set to 'other' but authenticated user was 'guest'"
    );
    assert_eq!(
        publish(json!({"properties":{"delivery_mode":"x"},"routing_key":"pq","payload":"x","payload_encoding":"string"}))
            .await
            .error(400, "bad_request"),
        json!(["not_int", "delivery_mode"])
    );
    assert_eq!(
        api.post(
            "/api/exchanges/%2F/missing/publish",
            r#"{"properties":{},"routing_key":"","payload":"x","payload_encoding":"string"}"#
        )
        .await
        .error(400, "bad_request"),
        "404 NOT_FOUND - no exchange 'missing' in vhost '/'"
    );
    api.put(
        "/api/exchanges/%2F/internal-x",
        r#"{"type":"fanout","internal":true}"#,
    )
    .await
    .status(201);
    assert_eq!(
        api.post(
            "/api/exchanges/%2F/internal-x/publish",
            r#"{"properties":{},"routing_key":"","payload":"x","payload_encoding":"string"}"#
        )
        .await
        .error(400, "bad_request"),
        "403 ACCESS_REFUSED - cannot publish to internal exchange 'internal-x' in vhost '/'"
    );
    // Get: requeue keeps them, with redelivered set next time.
    let get = |body: Value| {
        let api = &api;
        async move { api.post("/api/queues/%2F/pq/get", &body.to_string()).await }
    };
    let got = get(json!({"count":5,"ackmode":"ack_requeue_true","encoding":"auto","truncate":3}))
        .await
        .status(200)
        .json();
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0]["payload"], "hel");
    assert_eq!(got[0]["payload_bytes"], 5);
    assert_eq!(got[0]["message_count"], 1);
    assert_eq!(got[0]["redelivered"], false);
    assert_eq!(
        got[0]["properties"],
        json!({"delivery_mode": 2, "headers": {"k": 1}, "content_type": "text/plain", "user_id": "guest"})
    );
    assert_eq!(
        (
            got[1]["payload"].clone(),
            got[1]["payload_encoding"].clone()
        ),
        (json!("/w=="), json!("base64"))
    );
    assert_eq!(got[1]["properties"], json!([]));
    let again = get(json!({"count":1,"ackmode":"ack_requeue_false","encoding":"base64"}))
        .await
        .json();
    assert_eq!(again[0]["redelivered"], true);
    assert_eq!(again[0]["payload"], "aGVsbG8=");
    assert_eq!(api.json("/api/queues/%2F/pq").await["messages"], 1);
    get(json!({"count":1,"ackmode":"reject_requeue_false","encoding":"auto"}))
        .await
        .status(200);
    assert_eq!(
        get(json!({"count":1,"ackmode":"ack_requeue_true","encoding":"auto"}))
            .await
            .json(),
        json!([])
    );
    assert_eq!(
        get(json!({"count":1,"ackmode":"ack_requeue_true"}))
            .await
            .error(400, "bad_request"),
        "[{key_missing,encoding}]"
    );
    assert_eq!(
        get(json!({"count":1,"ackmode":"ack_requeue_true","encoding":"bogus"}))
            .await
            .error(400, "bad_request"),
        "Unsupported encoding. Please use auto or base64."
    );
    let r = get(json!({"count":1,"ackmode":"bogus","encoding":"auto"}))
        .await
        .error(400, "bad_request");
    assert!(r.as_str().unwrap().contains("ackmode"));
    assert_eq!(
        api.post(
            "/api/queues/%2F/missing/get",
            r#"{"count":1,"ackmode":"ack_requeue_true","encoding":"auto"}"#
        )
        .await
        .error(404, "not_found"),
        "NOT_FOUND - no queue 'missing' in vhost '/'"
    );
    // A persistent message published over HTTP survives a restart.
    publish(json!({"properties":{"delivery_mode":2},"routing_key":"pq","payload":"kept","payload_encoding":"string"}))
        .await
        .status(200);
    let b = b.restart().await;
    let api = Api::new(&b);
    let got = api
        .post(
            "/api/queues/%2F/pq/get",
            r#"{"count":1,"ackmode":"ack_requeue_false","encoding":"auto"}"#,
        )
        .await
        .json();
    assert_eq!(got[0]["payload"], "kept");
}

/// RabbitMQ's management plugin publishes through an AMQP channel: `CC` and `BCC` headers add
/// routing keys, `BCC` is not delivered, and one that is not an array is refused.
#[tokio::test]
async fn a_publish_over_http_follows_cc_and_bcc() {
    let (_b, api) = broker().await;
    for q in ["ccb-main", "ccb-cc", "ccb-bcc"] {
        api.put(&format!("/api/queues/%2F/{q}"), "{}")
            .await
            .status(201);
    }
    let publish = |body: Value| {
        let api = &api;
        async move {
            api.post("/api/exchanges/%2F/amq.default/publish", &body.to_string())
                .await
        }
    };
    let a = publish(json!({"properties":{"headers":{"CC":["ccb-cc", 1],"BCC":["ccb-bcc"],"x":"y"}},"routing_key":"ccb-main","payload":"hi","payload_encoding":"string"})).await;
    assert_eq!(a.status(200).json(), json!({"routed": true}));
    for q in ["ccb-main", "ccb-cc", "ccb-bcc"] {
        let got = api
            .post(
                &format!("/api/queues/%2F/{q}/get"),
                r#"{"count":5,"ackmode":"ack_requeue_false","encoding":"auto"}"#,
            )
            .await
            .status(200)
            .json();
        let got = got.as_array().unwrap();
        assert_eq!(got.len(), 1, "{q}: {got:?}");
        assert_eq!(got[0]["routing_key"], "ccb-main");
        assert_eq!(
            got[0]["properties"],
            json!({"headers": {"CC": ["ccb-cc", 1], "x": "y"}}),
            "{q}"
        );
    }
    // Routed by BCC alone.
    let a = publish(json!({"properties":{"headers":{"BCC":["ccb-bcc"]}},"routing_key":"nowhere","payload":"hi","payload_encoding":"string"})).await;
    assert_eq!(a.status(200).json(), json!({"routed": true}));
    assert_eq!(api.json("/api/queues/%2F/ccb-bcc").await["messages"], 1);
    assert_eq!(
        publish(json!({"properties":{"headers":{"BCC":"ccb-bcc"}},"routing_key":"ccb-main","payload":"hi","payload_encoding":"string"}))
            .await
            .error(400, "bad_request"),
        "406 PRECONDITION_FAILED - invalid message: {unacceptable_type_in_header,\"BCC\",longstr}"
    );
}

// ------------------------------------------------------------- connections, channels, consumers

#[tokio::test]
async fn connections_channels_and_consumers_are_listed_and_connections_closed() {
    let (b, api) = broker().await;
    let conn = lapin::Connection::connect(
        &b.uri,
        ConnectionProperties::default().with_connection_name("my-app".into()),
    )
    .await
    .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "cq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_qos(7, BasicQosOptions::default()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-priority".into(), AMQPValue::LongInt(5));
    let _c = ch
        .basic_consume(
            "cq".into(),
            "tag-9".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .unwrap();
    let conns = api.json("/api/connections").await;
    let c = &conns[0];
    assert_eq!(c["user_provided_name"], "my-app");
    assert_eq!(c["user"], "guest");
    assert_eq!(c["vhost"], "/");
    assert_eq!(c["protocol"], "AMQP 0-9-1");
    assert_eq!(c["auth_mechanism"], "PLAIN");
    assert_eq!(c["channels"], 1);
    assert_eq!(c["ssl"], false);
    assert_eq!(c["ssl_protocol"], Value::Null);
    assert!(c["recv_oct"].as_u64().unwrap() > 0 && c["send_oct"].as_u64().unwrap() > 0);
    assert_eq!(c["client_properties"]["connection_name"], "my-app");
    let name = c["name"].as_str().unwrap().to_owned();
    let one = api
        .json(&format!("/api/connections/{}", urlencode(&name)))
        .await;
    assert_eq!(one["ssl_protocol"], "");
    let chans = api.json("/api/channels").await;
    assert_eq!(chans[0]["name"], format!("{name} (1)"));
    assert_eq!(chans[0]["consumer_count"], 1);
    assert_eq!(chans[0]["prefetch_count"], 7);
    let chan = api
        .json(&format!(
            "/api/channels/{}",
            urlencode(&format!("{name} (1)"))
        ))
        .await;
    assert_eq!(chan["consumer_details"][0]["consumer_tag"], "tag-9");
    assert_eq!(
        api.json(&format!("/api/connections/{}/channels", urlencode(&name)))
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let consumers = api.json("/api/consumers/%2F").await;
    assert_eq!(consumers[0]["consumer_tag"], "tag-9");
    assert_eq!(consumers[0]["arguments"], json!({"x-priority": 5}));
    assert_eq!(consumers[0]["prefetch_count"], 7);
    assert_eq!(consumers[0]["ack_required"], true);
    assert_eq!(consumers[0]["channel_details"]["connection_name"], name);
    assert_eq!(
        api.json("/api/consumers").await.as_array().unwrap().len(),
        1
    );
    assert_eq!(
        api.json("/api/vhosts/%2F/connections")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        api.json("/api/vhosts/%2F/channels")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // Closing with a reason: the client sees 320 and that reason.
    let mut errs = errors(&conn);
    api.send(
        reqwest::Method::DELETE,
        &format!("/api/connections/{}", urlencode(&name)),
        None,
        &[("x-reason", "maintenance")],
    )
    .await
    .status(204);
    assert_eq!(
        within(5, errs.next()).await,
        (320, "CONNECTION_FORCED - maintenance".into())
    );
    eventually("gone", || async {
        api.json("/api/connections")
            .await
            .as_array()
            .unwrap()
            .is_empty()
    })
    .await;
    api.get(&format!("/api/connections/{}", urlencode(&name)))
        .await
        .error(404, "Object Not Found");
    // Without a reason: RabbitMQ's default text.
    let conn = b.connect().await;
    let mut errs = errors(&conn);
    let name = api.json("/api/connections").await[0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    api.delete(&format!("/api/connections/{}", urlencode(&name)))
        .await
        .status(204);
    assert_eq!(
        within(5, errs.next()).await,
        (
            320,
            "CONNECTION_FORCED - Closed via management plugin".into()
        )
    );
}

// ---------------------------------------------------------------------------------- definitions

#[tokio::test]
async fn definitions_export_and_import_round_trip_between_brokers() {
    let (_b, api) = broker().await;
    api.put("/api/vhosts/dv", r#"{"description":"defs"}"#)
        .await
        .status(201);
    api.put("/api/users/du", r#"{"password":"pw","tags":"management"}"#)
        .await
        .status(201);
    api.put(
        "/api/permissions/dv/du",
        r#"{"configure":".*","write":".*","read":"^r"}"#,
    )
    .await
    .status(201);
    api.put("/api/vhost-limits/dv/max-queues", r#"{"value":10}"#)
        .await
        .status(204);
    api.put("/api/exchanges/dv/dx", r#"{"type":"topic","durable":true}"#)
        .await
        .status(201);
    api.put(
        "/api/queues/dv/dq",
        r#"{"durable":true,"arguments":{"x-max-length":5}}"#,
    )
    .await
    .status(201);
    api.post("/api/bindings/dv/e/dx/q/dq", r#"{"routing_key":"k.*"}"#)
        .await
        .status(201);
    let defs = api.json("/api/definitions").await;
    for key in [
        "rabbit_version",
        "rabbitmq_version",
        "product_name",
        "product_version",
        "users",
        "vhosts",
        "permissions",
        "topic_permissions",
        "parameters",
        "global_parameters",
        "policies",
        "queues",
        "exchanges",
        "bindings",
    ] {
        assert!(defs.get(key).is_some(), "no {key} in {defs}");
    }
    assert_eq!(
        defs["queues"],
        json!([{"name": "dq", "vhost": "dv", "durable": true, "auto_delete": false, "arguments": {"x-max-length": 5}}])
    );
    assert_eq!(
        defs["bindings"],
        json!([{"source": "dx", "vhost": "dv", "destination": "dq", "destination_type": "queue", "routing_key": "k.*", "arguments": {}}])
    );
    assert_eq!(defs["exchanges"].as_array().unwrap().len(), 1);
    assert_eq!(
        defs["parameters"],
        json!([{"value": {"max-queues": 10}, "vhost": "dv", "component": "vhost-limits", "name": "limits"}])
    );
    let vhost_defs = api.json("/api/definitions/dv").await;
    assert_eq!(vhost_defs["queues"][0].get("vhost"), None);

    // Into a fresh broker: everything comes back, and the user logs in with its password.
    let (b2, api2) = broker().await;
    api2.post("/api/definitions", &defs.to_string())
        .await
        .status(204);
    let defs2 = api2.json("/api/definitions").await;
    for key in [
        "users",
        "vhosts",
        "queues",
        "exchanges",
        "bindings",
        "parameters",
    ] {
        assert_eq!(defs2[key], defs[key], "{key}");
    }
    let mut perms2 = defs2["permissions"].as_array().unwrap().clone();
    let mut perms = defs["permissions"].as_array().unwrap().clone();
    perms.sort_by_key(|p| p.to_string());
    perms2.sort_by_key(|p| p.to_string());
    assert_eq!(perms2, perms);
    let conn = TestBroker::connect_uri(&format!("amqp://du:pw@{}/dv", b2.addr)).await;
    drop(conn);
    // Importing the same document again changes nothing.
    api2.post("/api/definitions", &defs.to_string())
        .await
        .status(204);
    assert_eq!(
        api2.json("/api/definitions").await["queues"],
        defs["queues"]
    );
}

#[tokio::test]
async fn definitions_exported_by_rabbitmq_import_and_their_users_log_in() {
    let (b, api) = broker().await;
    // Shaped as RabbitMQ 3.10.8 exports them; the hash is RabbitMQ's own for "guest".
    let rabbit = json!({
        "rabbit_version": "3.10.8",
        "rabbitmq_version": "3.10.8",
        "product_name": "RabbitMQ",
        "product_version": "3.10.8",
        "users": [{"name": "from-rabbit", "password_hash": "tNw9BXnU5veYiV/gu8OUTGBmm7uRqk2TBKso8QfEeRBHaum6", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["management"], "limits": {}}],
        "vhosts": [{"name": "rv"}],
        "permissions": [{"user": "from-rabbit", "vhost": "rv", "configure": ".*", "write": ".*", "read": ".*"}],
        "topic_permissions": [],
        "parameters": [{"value": {"max-connections": 100}, "vhost": "rv", "component": "vhost-limits", "name": "limits"}],
        "global_parameters": [{"name": "internal_cluster_id", "value": "rabbitmq-cluster-id-x"}],
        "policies": [],
        "queues": [{"name": "rq", "vhost": "rv", "durable": true, "auto_delete": false, "arguments": {"x-queue-type": "classic"}}],
        "exchanges": [{"name": "rx", "vhost": "rv", "type": "direct", "durable": true, "auto_delete": false, "internal": false, "arguments": {}}],
        "bindings": [{"source": "rx", "vhost": "rv", "destination": "rq", "destination_type": "queue", "routing_key": "r", "arguments": {}}]
    });
    api.post("/api/definitions", &rabbit.to_string())
        .await
        .status(204);
    let conn = TestBroker::connect_uri(&format!("amqp://from-rabbit:guest@{}/rv", b.addr)).await;
    let ch = conn.create_channel().await.unwrap();
    publish_confirmed(&ch, "rx", "r").await;
    assert_eq!(ready_count(&ch, "rq").await, 1);
    assert_eq!(
        api.json("/api/vhost-limits/rv").await[0]["value"],
        json!({"max-connections": 100})
    );
}

#[tokio::test]
async fn definitions_that_cannot_be_honoured_are_refused_whole() {
    let (_b, api) = broker().await;
    assert_eq!(
        api.post("/api/definitions", "{bad")
            .await
            .error(400, "bad_request"),
        "failed_to_parse_json"
    );
    assert_eq!(
        api.post("/api/definitions", "[]")
            .await
            .error(400, "bad_request"),
        "failed_to_parse_json"
    );
    // A bad policy refuses the whole import, before anything is applied.
    let r = api
        .post(
            "/api/definitions",
            r#"{"vhosts":[{"name":"never"}],"policies":[{"vhost":"/","name":"p","pattern":".*","apply-to":"queues","definition":{"max-length":-1},"priority":0}]}"#,
        )
        .await
        .error(400, "bad_request");
    assert!(
        r.as_str().unwrap().contains("not a valid maximum length"),
        "{r}"
    );
    assert_eq!(
        api.post(
            "/api/definitions",
            r#"{"vhosts":[{"name":"never"}],"queues":[{"name":"q","vhost":"nope","durable":true,"auto_delete":false,"arguments":{}}]}"#
        )
        .await
        .error(400, "bad_request"),
        json!(["no_such_vhost", "nope"])
    );
    assert_eq!(
        api.post(
            "/api/definitions",
            r#"{"users":[{"name":"u","password":"p"}]}"#
        )
        .await
        .error(400, "bad_request"),
        "tags_not_present"
    );
    let r = api
        .post(
            "/api/definitions",
            r#"{"queues":[{"name":"qq","vhost":"/","durable":true,"auto_delete":false,"arguments":{},"type":"stream"}]}"#,
        )
        .await
        .error(400, "bad_request");
    assert!(r.as_str().unwrap().contains("stream"), "{r}");
    // Nothing of the refused documents was applied.
    api.get("/api/vhosts/never")
        .await
        .error(404, "Object Not Found");
    api.get("/api/users/u").await.error(404, "Object Not Found");
    // A vhost's own import.
    api.put("/api/vhosts/iv", "").await.status(201);
    api.post(
        "/api/definitions/iv",
        r#"{"queues":[{"name":"iq","durable":true,"auto_delete":false,"arguments":{}}],"exchanges":[],"bindings":[],"policies":[]}"#,
    )
    .await
    .status(204);
    api.json("/api/queues/iv/iq").await;
    assert_eq!(
        api.post("/api/definitions/missing", "{}")
            .await
            .error(404, "not_found"),
        "vhost_not_found"
    );
}

// --------------------------------------------------------------------------------------- health

#[tokio::test]
async fn health_checks_report_alarms_listeners_and_aliveness() {
    let (b, api) = broker().await;
    assert_eq!(
        api.json("/api/health/checks/alarms").await,
        json!({"status": "ok"})
    );
    assert_eq!(
        api.json("/api/health/checks/virtual-hosts").await,
        json!({"status": "ok"})
    );
    let port = b.running().amqp_addr.port();
    assert_eq!(
        api.json(&format!("/api/health/checks/port-listener/{port}"))
            .await,
        json!({"status": "ok", "port": port})
    );
    let a = api.get("/api/health/checks/port-listener/1").await;
    a.status(503);
    assert_eq!(a.json()["status"], "failed");
    assert_eq!(
        api.get("/api/health/checks/port-listener/abc")
            .await
            .error(400, "bad_request"),
        "Invalid port"
    );
    api.json("/api/health/checks/protocol-listener/amqp").await;
    api.get("/api/health/checks/protocol-listener/mqtt")
        .await
        .status(503);
    assert_eq!(
        api.json("/api/aliveness-test/%2F").await,
        json!({"status": "ok"})
    );
    let q = api.json("/api/queues/%2F/aliveness-test").await;
    assert_eq!(q["messages"], 0, "the test message is consumed: {q}");
    // A stray message ahead of the test message is consumed with it.
    api.post(
        "/api/exchanges/%2F/amq.default/publish",
        r#"{"properties":{},"routing_key":"aliveness-test","payload":"stray","payload_encoding":"string"}"#,
    )
    .await
    .status(200);
    assert_eq!(
        api.json("/api/aliveness-test/%2F").await,
        json!({"status": "ok"})
    );
    let q = api.json("/api/queues/%2F/aliveness-test").await;
    assert_eq!(q["messages"], 0, "{q}");
    // An `aliveness-test` queue the check cannot use fails it with the reason (503), not 500.
    {
        let conn = b.connect().await;
        let ch = conn.create_channel().await.unwrap();
        ch.queue_delete("aliveness-test".into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        ch.queue_declare(
            "aliveness-test".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        let a = api.get("/api/aliveness-test/%2F").await;
        a.status(503);
        assert_eq!(a.json()["status"], "failed");
        assert!(
            a.json()["reason"].as_str().unwrap().contains("exclusive"),
            "{}",
            a.text
        );
        conn.close(200, "bye".into()).await.unwrap();
    }
    eventually("the exclusive queue goes with its connection", || async {
        api.get("/api/aliveness-test/%2F").await.status.as_u16() == 200
    })
    .await;
    api.get("/api/aliveness-test/missing")
        .await
        .error(404, "Object Not Found");
    // A memory alarm fails the alarm checks with 503.
    b.broker().alarms.set_memory_limit(1);
    let a = api.get("/api/health/checks/alarms").await;
    a.status(503);
    assert_eq!(
        a.json(),
        json!({"alarms": [{"node": b.broker().config.node_name, "resource": "memory"}], "reason": "There are alarms in effect in the cluster", "status": "failed"})
    );
    api.get("/api/health/checks/local-alarms").await.status(503);
    b.broker().alarms.set_memory_limit(u64::MAX);
    api.json("/api/health/checks/alarms").await;
}

#[tokio::test]
async fn the_older_node_health_check_answers_as_in_rabbitmq_3_10() {
    let (_b, api) = broker().await;
    assert_eq!(
        api.json("/api/healthchecks/node").await,
        json!({"status": "ok"})
    );
    let node = api.json("/api/overview").await["node"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        api.json(&format!("/api/healthchecks/node/{}", urlencode(&node)))
            .await,
        json!({"status": "ok"})
    );
    assert_eq!(
        api.get("/api/healthchecks/node/rabbit@nowhere")
            .await
            .error(404, "Object Not Found"),
        "Not Found"
    );
    api.anonymous()
        .get("/api/healthchecks/node")
        .await
        .status(401);
}

#[tokio::test]
async fn a_drain_closes_clients_refuses_new_ones_and_fails_readiness_until_revived() {
    let (b, api) = broker().await;
    let conn = b.connect().await;
    let mut closed = errors(&conn);
    let node = api.json("/api/nodes").await[0].clone();
    assert_eq!(node["being_drained"], false);
    // Only administrators may drain.
    api.put(
        "/api/users/mon",
        &json!({"password": "pw", "tags": "monitoring"}).to_string(),
    )
    .await
    .status(201);
    let refused = api.as_user("mon", "pw").post("/api/warren/drain", "").await;
    assert_eq!(
        refused.error(401, "not_authorised"),
        "Not administrator user"
    );
    // `warren-broker drain` makes this request; it returns once the clients are gone.
    let mgmt = b.running().management_addr;
    let wrong = warren_broker::drain::request(mgmt, "guest", "nope", Duration::from_secs(5)).await;
    assert!(wrong.unwrap_err().contains("HTTP 401"));
    let drained = warren_broker::drain::request(mgmt, "guest", "guest", Duration::from_secs(15))
        .await
        .unwrap();
    // It says what it did: the one client closed, none left.
    assert_eq!((drained.closed, drained.remaining), (1, 0));
    assert!(
        drained.to_string().ends_with("closed 1 client connection"),
        "{drained}"
    );
    assert_eq!(
        closed.next().await,
        (
            320,
            "CONNECTION_FORCED - Node was put into maintenance mode".into()
        )
    );
    assert_eq!(b.broker().connections.count(), 0);
    assert_eq!(api.json("/api/nodes").await[0]["being_drained"], true);
    let ready = format!("http://{}/health/ready", b.running().prometheus_addr);
    let answer = reqwest::get(&ready).await.unwrap();
    assert_eq!(answer.status(), 503);
    assert_eq!(
        answer.json::<Value>().await.unwrap()["reason"],
        "draining (maintenance mode)"
    );
    let attempt = tokio::time::timeout(
        Duration::from_secs(5),
        lapin::Connection::connect(&b.uri, ConnectionProperties::default()),
    )
    .await
    .expect("refused at once, not hung");
    assert!(attempt.is_err(), "no new clients while draining");
    // Revived: clients come back, readiness too.
    api.delete("/api/warren/drain").await.status(204);
    assert_eq!(reqwest::get(&ready).await.unwrap().status(), 200);
    let again = b.connect().await;
    assert!(again.status().connected());
    assert_eq!(api.json("/api/nodes").await[0]["being_drained"], false);
}

// ------------------------------------------------------- what Warren has none of, answered so

#[tokio::test]
async fn endpoints_for_features_warren_lacks_answer_empty_or_with_a_reason() {
    let (b, api) = broker().await;
    assert_eq!(
        api.json("/api/cluster-name").await,
        json!({"name": b.broker().config.node_name})
    );
    for path in [
        "/api/extensions",
        "/api/feature-flags",
        "/api/policies",
        "/api/policies/%2F",
        "/api/operator-policies",
        "/api/operator-policies/%2F",
        "/api/parameters",
        "/api/global-parameters",
        "/api/topic-permissions",
        "/api/user-limits",
        "/api/user-limits/guest",
    ] {
        assert_eq!(api.json(path).await, json!([]), "{path}");
        api.anonymous().get(path).await.status(401);
    }
    for path in [
        "/api/health/checks/node-is-quorum-critical",
        "/api/health/checks/node-is-mirror-sync-critical",
    ] {
        assert_eq!(api.json(path).await["status"], "ok", "{path}");
    }
    api.get("/api/policies/nowhere")
        .await
        .error(404, "Object Not Found");
    let policy = r#"{"pattern":".*","definition":{"max-length":10},"apply-to":"queues"}"#;
    assert_eq!(
        api.put("/api/policies/nowhere/p", policy)
            .await
            .error(404, "not_found"),
        "vhost_not_found"
    );
    api.get("/api/user-limits/nobody")
        .await
        .error(404, "Object Not Found");
    api.get("/api/policies/%2F/ha")
        .await
        .error(404, "Object Not Found");
    api.delete("/api/policies/%2F/ha")
        .await
        .error(404, "Object Not Found");
    // Policies and operator policies are set (tests/http_policies.rs has them at work).
    api.put("/api/policies/%2F/limit", policy).await.status(201);
    api.put("/api/operator-policies/%2F/limit", policy)
        .await
        .status(201);
    api.delete("/api/operator-policies/%2F/limit")
        .await
        .status(204);
    api.put(
        "/api/users/plain",
        r#"{"password":"pw","tags":"management"}"#,
    )
    .await
    .status(201);
    assert_eq!(
        api.as_user("plain", "pw")
            .put("/api/policies/%2F/limit", policy)
            .await
            .error(401, "not_authorised"),
        "User not authorised to access object"
    );
    // A policymaker without access to the vhost is refused.
    api.put("/api/users/pm", r#"{"password":"pw","tags":"policymaker"}"#)
        .await
        .status(201);
    assert_eq!(
        api.as_user("pm", "pw")
            .put("/api/policies/%2F/limit", policy)
            .await
            .error(401, "not_authorised"),
        "User not authorised to access object"
    );
    api.put(
        "/api/permissions/%2F/pm",
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )
    .await
    .status(201);
    api.as_user("pm", "pw")
        .put("/api/policies/%2F/limit", policy)
        .await
        .status(204);
    api.as_user("pm", "pw")
        .delete("/api/policies/%2F/limit")
        .await
        .status(204);
    // A user's connections, listed and closed by user name.
    let conn = b.connect().await;
    let mine = api.json("/api/connections/username/guest").await;
    assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
    assert_eq!(mine[0]["user"], "guest");
    assert_eq!(mine[0]["vhost"], "/");
    assert_eq!(api.json("/api/connections/username/plain").await, json!([]));
    let mut errs = errors(&conn);
    api.delete("/api/connections/username/guest")
        .await
        .status(204);
    let (code, text) = errs.next().await;
    assert_eq!(code, 320);
    assert!(text.contains("Closed via management plugin"), "{text}");
}

// ------------------------------------------------------------------------ HTTP connections

/// One HTTP/1.1 request on a raw connection; the answer's status and body (by
/// `content-length`; chunked bodies are returned undecoded).
async fn raw_request(
    socket: &mut tokio::net::TcpStream,
    head: &str,
    body: Option<(&str, Duration)>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    socket.write_all(head.as_bytes()).await.unwrap();
    if let Some((body, pause)) = body {
        // The body comes after a pause, as from a client that writes it separately.
        socket.flush().await.unwrap();
        tokio::time::sleep(pause).await;
        socket.write_all(body.as_bytes()).await.unwrap();
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let header_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = within(5, socket.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "connection closed without a response");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..header_end]).to_string();
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    while buf.len() < header_end + length {
        let n = within(5, socket.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "connection closed in the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    (
        status,
        String::from_utf8_lossy(&buf[header_end..header_end + length]).to_string(),
    )
}

const AUTH: &str = "Authorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n";

#[tokio::test]
async fn a_keep_alive_connection_carries_the_next_request_after_a_delete_with_a_body() {
    let (b, api) = broker().await;
    api.put("/api/exchanges/%2F/ka-x", r#"{"type":"direct"}"#)
        .await
        .status(201);
    api.put("/api/exchanges/%2F/ka-x2", r#"{"type":"direct"}"#)
        .await
        .status(201);
    api.put("/api/queues/%2F/ka-q", "{}").await.status(201);
    api.post("/api/bindings/%2F/e/ka-x/q/ka-q", r#"{"routing_key":"k"}"#)
        .await
        .status(201);
    api.post("/api/bindings/%2F/e/ka-x/e/ka-x2", r#"{"routing_key":"e"}"#)
        .await
        .status(201);
    let addr = if b.is_external() {
        api.base.trim_start_matches("http://").to_owned()
    } else {
        b.running().management_addr.to_string()
    };
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let body = r#"{"vhost":"/","source":"ka-x","destination":"ka-q","destination_type":"q","properties_key":"k"}"#;
    let head = format!(
        "DELETE /api/bindings/%2F/e/ka-x/q/ka-q/k HTTP/1.1\r\nHost: {addr}\r\n{AUTH}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (status, _) =
        raw_request(&mut socket, &head, Some((body, Duration::from_millis(100)))).await;
    assert_eq!(status, 204);
    let head = format!("GET /api/whoami HTTP/1.1\r\nHost: {addr}\r\n{AUTH}\r\n");
    let (status, text) = raw_request(&mut socket, &head, None).await;
    assert_eq!(status, 200);
    assert!(text.contains("guest"), "{text}");
    // An exchange-to-exchange unbind, then a refused request with a body: still one connection.
    let body = r#"{"properties_key":"e"}"#;
    let head = format!(
        "DELETE /api/bindings/%2F/e/ka-x/e/ka-x2/e HTTP/1.1\r\nHost: {addr}\r\n{AUTH}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (status, _) =
        raw_request(&mut socket, &head, Some((body, Duration::from_millis(100)))).await;
    assert_eq!(status, 204);
    let head = format!(
        "PUT /api/queues/%2F/ka-q2 HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic Z3Vlc3Q6bm9wZQ==\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n"
    );
    let (status, _) =
        raw_request(&mut socket, &head, Some(("{}", Duration::from_millis(100)))).await;
    assert_eq!(status, 401);
    let head = format!("GET /api/whoami HTTP/1.1\r\nHost: {addr}\r\n{AUTH}\r\n");
    assert_eq!(raw_request(&mut socket, &head, None).await.0, 200);
    for path in [
        "/api/queues/%2F/ka-q",
        "/api/exchanges/%2F/ka-x",
        "/api/exchanges/%2F/ka-x2",
    ] {
        api.delete(path).await;
    }
}

#[tokio::test]
async fn idle_http_connections_are_closed_and_past_the_cap_wait_while_amqp_still_accepts() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = TestBroker::start_with(|c| {
        c.http_idle_timeout_ms = 1000;
        c.http_max_connections = 2;
    })
    .await;
    if b.is_external() {
        return;
    }
    let addr = b.running().management_addr;
    // Two idle connections fill the cap.
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // A third is not served while they are open...
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET /api/whoami HTTP/1.1\r\nHost: {addr}\r\n{AUTH}\r\n");
    third.write_all(head.as_bytes()).await.unwrap();
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), third.read(&mut byte))
            .await
            .is_err(),
        "a connection past the cap is not answered while the cap is full"
    );
    // ...but AMQP clients still connect.
    let conn = b.connect().await;
    assert!(conn.status().connected());
    // The idle connections are closed by the broker after the timeout (end of stream)...
    for s in &mut idle {
        let n = within(5, s.read(&mut byte)).await.unwrap_or(0);
        assert_eq!(n, 0, "an idle connection is closed");
    }
    // ...and the waiting one is then served.
    let mut rest = Vec::new();
    let mut chunk = [0u8; 1024];
    while !String::from_utf8_lossy(&rest).contains("guest") {
        let n = within(5, third.read(&mut chunk)).await.unwrap();
        assert!(
            n > 0,
            "closed without an answer: {}",
            String::from_utf8_lossy(&rest)
        );
        rest.extend_from_slice(&chunk[..n]);
    }
    assert!(String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"));
    // A connection that starts a request and never finishes its headers is closed too.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /api/whoami HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    within(5, slow.read_to_end(&mut answer)).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    // So is one whose body stops arriving: 408 with a reason, and nothing is applied.
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PUT /api/vhosts/stalled HTTP/1.1\r\nHost: {addr}\r\n{AUTH}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    within(5, stalled.read_to_end(&mut answer)).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("stopped arriving"), "{text}");
    common::http::Api::new(&b)
        .get("/api/vhosts/stalled")
        .await
        .error(404, "Object Not Found");
    conn.close(200, "bye".into()).await.unwrap();
}

// ------------------------------------------------------------------------------- big lists

#[tokio::test]
async fn a_long_queue_list_is_streamed_and_pages_have_rabbitmqs_shape() {
    let (b, api) = broker().await;
    let vhost = unique("big-list");
    api.put(&format!("/api/vhosts/{vhost}"), "{}")
        .await
        .status(201);
    // An empty vhost: no pages, as in RabbitMQ.
    let empty = api
        .json(&format!("/api/queues/{vhost}?page=1&page_size=100"))
        .await;
    assert_eq!(
        empty,
        json!({"filtered_count": 0, "item_count": 0, "items": [], "page": 1, "page_count": 0, "page_size": 100, "total_count": 0})
    );
    let conn = TestBroker::connect_uri(&b.uri_with_vhost(&vhost)).await;
    let ch = conn.create_channel().await.unwrap();
    const QUEUES: usize = 300;
    for i in 0..QUEUES {
        ch.queue_declare(
            format!("q{i:04}").as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    // The whole list is sent in pieces as it is rendered, not built first with a length.
    let a = api.get(&format!("/api/queues/{vhost}")).await;
    a.status(200);
    assert_eq!(a.headers["content-type"], "application/json");
    if !b.is_external() {
        assert!(a.headers.get("content-length").is_none(), "{:?}", a.headers);
        assert_eq!(a.headers["transfer-encoding"], "chunked");
    }
    let all = a.json();
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), QUEUES);
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted by name");
    // Columns and sorting apply to the streamed list too.
    let reversed = api
        .json(&format!(
            "/api/queues/{vhost}?columns=name&sort=name&sort_reverse=true"
        ))
        .await;
    assert_eq!(reversed[0], json!({"name": format!("q{:04}", QUEUES - 1)}));
    // A page, with RabbitMQ 3.10's fields.
    let page = api
        .json(&format!(
            "/api/queues/{vhost}?page=1&page_size=100&name=q01&use_regex=false"
        ))
        .await;
    let mut keys: Vec<&str> = page
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "filtered_count",
            "item_count",
            "items",
            "page",
            "page_count",
            "page_size",
            "total_count"
        ]
    );
    assert_eq!(page["total_count"], QUEUES);
    assert_eq!(
        page["filtered_count"], 100,
        "q0100..q0199: {}",
        page["filtered_count"]
    );
    assert_eq!(page["page_count"], 1);
    let page = api
        .json(&format!("/api/queues/{vhost}?page=2&page_size=100"))
        .await;
    assert_eq!(page["item_count"], 100);
    assert_eq!(page["page_count"], 3);
    assert_eq!(page["items"][0]["name"], "q0100");
    // Exchanges and bindings stream the same way.
    let bindings = api.json(&format!("/api/bindings/{vhost}")).await;
    assert_eq!(bindings.as_array().unwrap().len(), QUEUES);
    let exchanges = api.json(&format!("/api/exchanges/{vhost}")).await;
    assert_eq!(exchanges.as_array().unwrap().len(), 7);
    conn.close(200, "bye".into()).await.unwrap();
    api.delete(&format!("/api/vhosts/{vhost}"))
        .await
        .status(204);
}

// ---------------------------------------------------------------------------------- queue types

/// The type and arguments `/api/queues/{vhost}/{name}` reports.
async fn queue_type_of(api: &Api, vhost: &str, name: &str) -> (Value, Value) {
    let o = api.json(&format!("/api/queues/{vhost}/{name}")).await;
    (o["type"].clone(), o["arguments"].clone())
}

#[tokio::test]
async fn a_queue_reports_the_type_it_was_declared_with_or_its_vhost_default() {
    let (b, api) = broker().await;
    let vhost = unique("dqt");
    // `defaultqueuetype`, the key RabbitMQ 3.10 reads when it creates a vhost.
    api.put(
        &format!("/api/vhosts/{vhost}"),
        r#"{"defaultqueuetype":"quorum"}"#,
    )
    .await
    .status(201);
    let v = api.json(&format!("/api/vhosts/{vhost}")).await;
    assert_eq!(v["default_queue_type"], "quorum");
    assert_eq!(v["metadata"]["default_queue_type"], "quorum");
    let conn = TestBroker::connect_uri(&b.uri_with_vhost(&vhost)).await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let declared: [(&str, QueueDeclareOptions, FieldTable); 5] = [
        (
            "declared-quorum",
            durable,
            args(&[("x-queue-type", text("quorum"))]),
        ),
        ("plain", durable, FieldTable::default()),
        (
            "declared-classic",
            durable,
            args(&[("x-queue-type", text("classic"))]),
        ),
        (
            "transient",
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
        (
            "auto-delete",
            QueueDeclareOptions {
                auto_delete: true,
                ..durable
            },
            FieldTable::default(),
        ),
    ];
    for (name, options, arguments) in declared {
        within(5, ch.queue_declare(name.into(), options, arguments))
            .await
            .unwrap_or_else(|e| panic!("declare {name}: {e}"));
    }
    // Redeclared without arguments, the queue that took the default type is the same queue.
    within(
        5,
        ch.queue_declare("plain".into(), durable, FieldTable::default()),
    )
    .await
    .expect("an equivalent redeclaration");
    for (name, kind, arguments) in [
        (
            "declared-quorum",
            "quorum",
            json!({"x-queue-type": "quorum"}),
        ),
        ("plain", "quorum", json!({"x-queue-type": "quorum"})),
        (
            "declared-classic",
            "classic",
            json!({"x-queue-type": "classic"}),
        ),
        // A quorum queue cannot be transient or auto-delete: these stay classic.
        ("transient", "classic", json!({})),
        ("auto-delete", "classic", json!({})),
    ] {
        assert_eq!(
            queue_type_of(&api, &vhost, name).await,
            (json!(kind), arguments),
            "{name}"
        );
    }
    let listed = api.json(&format!("/api/queues/{vhost}")).await;
    let plain = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "plain")
        .expect("listed");
    assert_eq!(plain["type"], "quorum");
    let defs = api.json(&format!("/api/definitions/{vhost}")).await;
    let exported = defs["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "plain")
        .expect("exported");
    assert_eq!(exported["arguments"], json!({"x-queue-type": "quorum"}));
    let _ = conn.close(200, "bye".into()).await;
    api.delete(&format!("/api/vhosts/{vhost}"))
        .await
        .status(204);
}

// ---------------------------------------------------------------------- definitions imports

#[tokio::test]
async fn definitions_with_stream_queues_global_parameters_or_dangling_bindings_are_refused_whole() {
    let (_b, api) = broker().await;
    let refused = |body: Value| {
        let api = &api;
        async move {
            let r = api
                .post("/api/definitions", &body.to_string())
                .await
                .error(400, "bad_request");
            r.as_str().unwrap().to_owned()
        }
    };
    let vhost = json!([{"name": "never-applied"}]);
    let r = refused(json!({
        "vhosts": vhost,
        "queues": [{"name": "s", "vhost": "never-applied", "durable": true, "auto_delete": false, "arguments": {"x-queue-type": "stream"}}],
    }))
    .await;
    assert!(r.contains("'s'") && r.contains("stream"), "{r}");
    let r = refused(json!({
        "vhosts": vhost,
        "global_parameters": [
            {"name": "internal_cluster_id", "value": "rabbitmq-cluster-id-x"},
            {"name": "cluster_name", "value": "another-cluster"},
            {"name": "some_setting", "value": 1},
        ],
    }))
    .await;
    assert!(r.contains("some_setting"), "{r}");
    // Refused whole: the cluster name it carried is not applied either.
    assert_ne!(
        api.json("/api/cluster-name").await,
        json!({"name": "another-cluster"})
    );
    let r = refused(json!({
        "vhosts": vhost,
        "exchanges": [{"name": "x", "vhost": "never-applied", "type": "direct", "durable": true, "auto_delete": false, "internal": false, "arguments": {}}],
        "bindings": [{"source": "x", "vhost": "never-applied", "destination": "missing", "destination_type": "queue", "routing_key": "", "arguments": {}}],
    }))
    .await;
    assert!(r.contains("'missing'"), "{r}");
    api.get("/api/vhosts/never-applied")
        .await
        .error(404, "Object Not Found");
    // Bindings between objects the document declares, or that exist, are applied.
    api.post(
        "/api/definitions",
        &json!({
            "vhosts": [{"name": "applied"}],
            "global_parameters": [{"name": "internal_cluster_id", "value": "rabbitmq-cluster-id-x"}],
            "queues": [{"name": "q", "vhost": "applied", "durable": true, "auto_delete": false, "arguments": {}}],
            "bindings": [{"source": "amq.direct", "vhost": "applied", "destination": "q", "destination_type": "queue", "routing_key": "k", "arguments": {}}],
        })
        .to_string(),
    )
    .await
    .status(204);
    let bindings = api.json("/api/queues/applied/q/bindings").await;
    assert_eq!(bindings.as_array().unwrap().len(), 2, "{bindings}");
}

#[tokio::test]
async fn a_vhost_default_queue_type_is_kept_exported_and_imported() {
    let (b, api) = broker().await;
    if b.is_external() {
        // RabbitMQ 3.10 reads only `defaultqueuetype`, and exports vhosts by name only.
        return;
    }
    api.put("/api/vhosts/dq", r#"{"default_queue_type":"quorum"}"#)
        .await
        .status(201);
    // A PUT without it keeps it.
    api.put("/api/vhosts/dq", r#"{"description":"d"}"#)
        .await
        .status(204);
    let v = api.json("/api/vhosts/dq").await;
    assert_eq!(v["default_queue_type"], "quorum");
    assert_eq!(
        v["metadata"],
        json!({"description": "d", "tags": [], "default_queue_type": "quorum"})
    );
    assert_eq!(
        api.json("/api/vhosts/%2F").await["default_queue_type"],
        "undefined"
    );
    let r = api
        .put("/api/vhosts/ds", r#"{"default_queue_type":"stream"}"#)
        .await
        .error(400, "bad_request");
    assert!(r.as_str().unwrap().contains("stream"), "{r}");
    let defs = api.json("/api/definitions").await;
    let dq = defs["vhosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "dq")
        .expect("exported")
        .clone();
    assert_eq!(dq["metadata"]["default_queue_type"], "quorum");
    // Imported from the metadata, as RabbitMQ exports it, and applied to declarations.
    api.post(
        "/api/definitions",
        r#"{"vhosts":[{"name":"imported","metadata":{"description":"","tags":[],"default_queue_type":"quorum"}}]}"#,
    )
    .await
    .status(204);
    assert_eq!(
        api.json("/api/vhosts/imported").await["default_queue_type"],
        "quorum"
    );
    api.put("/api/queues/imported/q", r#"{"durable":true}"#)
        .await
        .status(201);
    assert_eq!(
        queue_type_of(&api, "imported", "q").await,
        (json!("quorum"), json!({"x-queue-type": "quorum"}))
    );
    // Kept across a restart.
    let b = b.restart().await;
    let api = Api::new(&b);
    assert_eq!(
        api.json("/api/vhosts/dq").await["default_queue_type"],
        "quorum"
    );
    assert_eq!(queue_type_of(&api, "imported", "q").await.0, "quorum");
}

#[tokio::test]
async fn imported_queues_do_not_take_the_vhost_default_queue_type() {
    let (_b, api) = broker().await;
    let vhost = unique("dqt-import");
    api.put(
        &format!("/api/vhosts/{vhost}"),
        r#"{"defaultqueuetype":"quorum"}"#,
    )
    .await
    .status(201);
    let queue = |name: &str, extra: Value| {
        let mut q = json!({"name": name, "vhost": vhost, "durable": true,
            "auto_delete": false, "arguments": {}});
        for (k, v) in extra.as_object().unwrap() {
            q[k] = v.clone();
        }
        q
    };
    let defs = json!({"queues": [
        queue("typed-classic", json!({"type": "classic"})),
        queue("untyped", json!({})),
        queue("argued-classic", json!({"arguments": {"x-queue-type": "classic"}})),
    ]});
    api.post("/api/definitions", &defs.to_string())
        .await
        .status(204);
    // As RabbitMQ 3.10 imports them: classic, whatever the vhost's default.
    for (name, arguments) in [
        ("typed-classic", json!({})),
        ("untyped", json!({})),
        ("argued-classic", json!({"x-queue-type": "classic"})),
    ] {
        assert_eq!(
            queue_type_of(&api, &vhost, name).await,
            (json!("classic"), arguments),
            "{name}"
        );
    }
    api.delete(&format!("/api/vhosts/{vhost}"))
        .await
        .status(204);
}

#[tokio::test]
async fn a_vhost_default_queue_type_can_change_and_be_taken_away() {
    let (b, api) = broker().await;
    if b.is_external() {
        // RabbitMQ 3.10 keeps an existing vhost's default queue type as it is.
        return;
    }
    let vhost = unique("dqt-change");
    api.put(&format!("/api/vhosts/{vhost}"), "{}")
        .await
        .status(201);
    let conn = TestBroker::connect_uri(&b.uri_with_vhost(&vhost)).await;
    let ch = within(5, conn.create_channel()).await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let declare = |name: &'static str| {
        let ch = ch.clone();
        async move {
            within(
                5,
                ch.queue_declare(name.into(), durable, FieldTable::default()),
            )
            .await
            .unwrap_or_else(|e| panic!("declare {name}: {e}"));
        }
    };
    declare("before").await;
    api.put(
        &format!("/api/vhosts/{vhost}"),
        r#"{"default_queue_type":"quorum"}"#,
    )
    .await
    .status(204);
    // A queue made before the default is redeclared as it is; a new one takes the default.
    declare("before").await;
    declare("during").await;
    declare("during").await;
    api.put(
        &format!("/api/vhosts/{vhost}"),
        r#"{"default_queue_type":"undefined"}"#,
    )
    .await
    .status(204);
    assert_eq!(
        api.json(&format!("/api/vhosts/{vhost}")).await["default_queue_type"],
        "undefined"
    );
    declare("after").await;
    for (name, kind) in [
        ("before", "classic"),
        ("during", "quorum"),
        ("after", "classic"),
    ] {
        assert_eq!(queue_type_of(&api, &vhost, name).await.0, kind, "{name}");
    }
    let _ = conn.close(200, "bye".into()).await;
    api.delete(&format!("/api/vhosts/{vhost}"))
        .await
        .status(204);
}

// ------------------------------------------------------------------------------ cluster name

async fn identity_line(b: &TestBroker) -> String {
    let url = format!("http://{}/metrics", b.running().prometheus_addr);
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    text.lines()
        .find(|l| l.starts_with("rabbitmq_identity_info{"))
        .expect("rabbitmq_identity_info")
        .to_owned()
}

#[tokio::test]
async fn the_cluster_name_setting_shows_in_overview_cluster_name_metrics_and_exports() {
    let b = TestBroker::start_with(|c| c.cluster_name = Some("orders".into())).await;
    let api = Api::new(&b);
    assert_eq!(
        api.json("/api/cluster-name").await,
        json!({"name": "orders"})
    );
    let overview = api.json("/api/overview").await;
    assert_eq!(overview["cluster_name"], "orders");
    assert_eq!(overview["node"], b.broker().config.node_name);
    let identity = identity_line(&b).await;
    assert!(
        identity.contains(r#"rabbitmq_cluster="orders""#),
        "{identity}"
    );
    assert!(
        identity.contains(&format!(
            r#"rabbitmq_node="{}""#,
            b.broker().config.node_name
        )),
        "{identity}"
    );
    let export = api.json("/api/definitions").await;
    assert_eq!(
        export["global_parameters"],
        json!([{"name": "cluster_name", "value": "orders"}])
    );
}

#[tokio::test]
async fn put_cluster_name_renames_the_cluster_for_administrators_and_lasts_across_restarts() {
    let (b, api) = broker().await;
    // Unset, the node name stands for it, as in RabbitMQ; exports carry no cluster name.
    assert_eq!(
        api.json("/api/cluster-name").await["name"],
        b.broker().config.node_name
    );
    assert_eq!(
        api.json("/api/definitions").await["global_parameters"],
        json!([])
    );
    api.put(
        "/api/users/mon",
        &json!({"password": "pw", "tags": "monitoring"}).to_string(),
    )
    .await
    .status(201);
    api.as_user("mon", "pw")
        .put("/api/cluster-name", r#"{"name":"nope"}"#)
        .await
        .status(401);
    assert_eq!(
        api.put("/api/cluster-name", "{}")
            .await
            .error(400, "bad_request"),
        "[{key_missing,name}]"
    );
    api.put("/api/cluster-name", r#"{"name":"shop"}"#)
        .await
        .status(204);
    assert_eq!(api.json("/api/cluster-name").await, json!({"name": "shop"}));
    assert_eq!(
        api.json("/api/global-parameters").await,
        json!([{"name": "cluster_name", "value": "shop"}])
    );
    let b = b.restart().await;
    let api = Api::new(&b);
    assert_eq!(api.json("/api/overview").await["cluster_name"], "shop");
    assert!(
        identity_line(&b)
            .await
            .contains(r#"rabbitmq_cluster="shop""#)
    );
}

#[tokio::test]
async fn a_definitions_import_sets_the_cluster_name_from_its_global_parameters() {
    let (_b, api) = broker().await;
    let doc = json!({
        "global_parameters": [
            {"name": "internal_cluster_id", "value": "rabbitmq-cluster-id-x"},
            {"name": "cluster_name", "value": "imported"},
        ],
    });
    api.post("/api/definitions", &doc.to_string())
        .await
        .status(204);
    assert_eq!(
        api.json("/api/cluster-name").await,
        json!({"name": "imported"})
    );
    let bad = json!({"global_parameters": [{"name": "cluster_name", "value": 7}]});
    api.post("/api/definitions", &bad.to_string())
        .await
        .status(400);
    assert_eq!(
        api.json("/api/cluster-name").await,
        json!({"name": "imported"})
    );
}

#[tokio::test]
async fn clients_that_stop_reading_long_lists_do_not_block_other_lists() {
    use tokio::io::AsyncWriteExt;
    let b = TestBroker::start_with(|c| c.http_idle_timeout_ms = 1000).await;
    if b.is_external() {
        return;
    }
    // A list far larger than what the sockets buffer for a client that reads nothing.
    let vhost = b.broker().vhost("/").unwrap();
    for i in 0..20000 {
        vhost
            .declare_queue(
                warren_broker::broker::queue::QueueSpec {
                    name: format!("stalled.list.queue.{i:05}"),
                    durable: false,
                    exclusive: false,
                    auto_delete: false,
                    arguments: FieldTable::default(),
                },
                0,
            )
            .unwrap();
    }
    let addr = b.running().management_addr;
    // As many clients as there are listing places ask for it and never read the answer.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        let head = format!("GET /api/queues HTTP/1.1\r\nHost: {addr}\r\n{AUTH}\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        stalled.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another listing is still answered: once the stalled ones have timed out, or with 503.
    let api = Api::new(&b);
    let a = within(10, api.get("/api/queues?columns=name")).await;
    let status = a.status.as_u16();
    assert!(status == 200 || status == 503, "{status}");
    if status == 503 {
        assert!(a.json()["reason"].is_string());
    }
    drop(stalled);
}

#[tokio::test]
async fn a_page_far_past_the_end_is_out_of_range_as_in_rabbitmq() {
    let (_b, api) = broker().await;
    for page in ["9223372036854775807", "99999999999999999999999"] {
        let reason = api
            .get(&format!("/api/exchanges?page={page}&page_size=100"))
            .await
            .error(400, "page_out_of_range");
        let reason = reason.as_str().unwrap();
        assert!(
            reason.starts_with(&format!(
                "Page out of range, page: {page} page size: 100, len: "
            )),
            "{reason}"
        );
    }
}

#[tokio::test]
async fn a_definitions_document_still_arriving_does_not_hold_up_other_imports() {
    use tokio::io::AsyncWriteExt;
    let (b, api) = broker().await;
    if b.is_external() {
        return;
    }
    let addr = b.running().management_addr;
    // One client starts an import and sends its document slowly...
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/definitions HTTP/1.1\r\nHost: {addr}\r\n{AUTH}Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...while another's complete document is imported.
    let vhost = unique("import-beside-slow");
    let defs = json!({"vhosts": [{"name": vhost}]});
    api.post("/api/definitions", &defs.to_string())
        .await
        .status(204);
    api.get(&format!("/api/vhosts/{vhost}")).await.status(200);
    api.delete(&format!("/api/vhosts/{vhost}")).await;
    drop(slow);
}

#[tokio::test]
async fn a_refused_request_with_a_large_or_expected_body_is_answered_at_once_and_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = TestBroker::start().await;
    if b.is_external() {
        return;
    }
    let addr = b.running().management_addr;
    for extra in [
        "Content-Length: 50000000\r\n",
        "Content-Length: 100\r\nExpect: 100-continue\r\n",
    ] {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "PUT /api/queues/%2F/never HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic Z3Vlc3Q6bm9wZQ==\r\nContent-Type: application/json\r\n{extra}\r\n"
        );
        socket.write_all(head.as_bytes()).await.unwrap();
        // The body is never sent: the refusal comes without waiting for it (or asking for
        // it with 100 Continue), and the connection is closed after it.
        let mut answer = Vec::new();
        within(2, socket.read_to_end(&mut answer)).await.unwrap();
        let text = String::from_utf8_lossy(&answer).to_ascii_lowercase();
        assert!(text.starts_with("http/1.1 401"), "{extra}: {text}");
        assert!(text.contains("connection: close"), "{extra}: {text}");
    }
    b.stop().await;
}

#[tokio::test]
async fn an_exchange_with_many_bindings_is_listed_in_pieces() {
    let (b, api) = broker().await;
    if b.is_external() {
        return;
    }
    let vhost = unique("many-bindings");
    api.put(&format!("/api/vhosts/{vhost}"), "{}")
        .await
        .status(201);
    api.put(&format!("/api/exchanges/{vhost}/x"), r#"{"type":"direct"}"#)
        .await
        .status(201);
    api.put(&format!("/api/queues/{vhost}/q"), "{}")
        .await
        .status(201);
    let v = b.broker().vhost(&vhost).unwrap();
    const BINDINGS: usize = 2000;
    for i in 0..BINDINGS {
        v.bind(
            "x",
            "q",
            warren_broker::broker::vhost::DestinationKind::Queue,
            &format!("key.{i:05}"),
            &FieldTable::default(),
            0,
        )
        .unwrap();
    }
    // One exchange's bindings are not rendered in one piece: the body is sent in chunks of
    // a few tens of kilobytes.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = b.running().management_addr;
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET /api/bindings/{vhost} HTTP/1.1\r\nHost: {addr}\r\n{AUTH}Connection: close\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    within(10, socket.read_to_end(&mut raw)).await.unwrap();
    let header_end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&raw[..header_end]).to_ascii_lowercase();
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let (mut rest, mut body, mut sizes) = (&raw[header_end..], Vec::new(), Vec::new());
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap(), 16).unwrap();
        if size == 0 {
            break;
        }
        sizes.push(size);
        body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
        rest = &rest[line_end + 2 + size + 2..];
    }
    assert!(sizes.len() > 2, "{sizes:?}");
    assert!(sizes.iter().all(|&s| s < 100_000), "{sizes:?}");
    let all: Value = serde_json::from_slice(&body).unwrap();
    let all = all.as_array().unwrap();
    assert_eq!(
        all.len(),
        BINDINGS + 1,
        "the default binding and the explicit ones"
    );
    assert_eq!(all[0]["source"], "");
    assert_eq!(all[1]["routing_key"], "key.00000");
    api.delete(&format!("/api/vhosts/{vhost}")).await;
}
