//! Acceptance: `rabbitmq_http_client`, the Rust client of RabbitMQ's HTTP API that
//! `rabbitmqadmin` v2 is built on, drives a live `warren-broker` process. Every call goes
//! through the crate's own request and response types, so a missing field or a wrong type in
//! Warren's answers fails here as it would fail for the crate's users.

use rabbitmq_http_client::api::Client;
use rabbitmq_http_client::commons::{BindingDestinationType, ExchangeType};
use rabbitmq_http_client::error::Error as ClientError;
use rabbitmq_http_client::password_hashing::{base64_encoded_salted_password_hash_sha256, salt};
use rabbitmq_http_client::requests::{
    BindingDeletionParams, ExchangeParams, Permissions, QueueParams, UserParams, VirtualHostParams,
};
use serde_json::{Map, Value, json};
use warren_e2e::BrokerProcess;

type Api = Client<String, &'static str, &'static str>;

fn api(broker: &BrokerProcess) -> Api {
    Client::new(
        format!("http://{}/api", broker.management_addr),
        "guest",
        "guest",
    )
}

fn api_as(broker: &BrokerProcess, user: &'static str, password: &'static str) -> Api {
    Client::new(
        format!("http://{}/api", broker.management_addr),
        user,
        password,
    )
}

fn args(pairs: Value) -> Option<Map<String, Value>> {
    match pairs {
        Value::Object(m) => Some(m),
        _ => panic!("arguments are a JSON object"),
    }
}

fn is_not_found<T: std::fmt::Debug>(r: Result<T, rabbitmq_http_client::error::HttpClientError>) {
    match r {
        Err(ClientError::NotFound) => {}
        other => panic!("expected 404 Not Found, got {other:?}"),
    }
}

fn status_of<T: std::fmt::Debug>(
    r: Result<T, rabbitmq_http_client::error::HttpClientError>,
) -> u16 {
    match r {
        Err(ClientError::ClientErrorResponse { status_code, .. }) => status_code.as_u16(),
        Err(ClientError::NotFound) => 404,
        other => panic!("expected a client error, got {other:?}"),
    }
}

#[tokio::test]
async fn overview_whoami_and_nodes_describe_the_node() {
    let broker = BrokerProcess::start();
    let rc = api(&broker);

    let overview = rc.overview().await.expect("overview");
    assert_eq!(overview.rabbitmq_version, "3.10.8");
    assert_eq!(overview.product_name, "Warren");
    assert!(!overview.node.is_empty());
    // The default vhost's seven built-in exchanges.
    assert!(overview.object_totals.exchanges >= 7, "{overview:?}");
    assert_eq!(overview.object_totals.queues, 0);
    let amqp = overview
        .listeners
        .iter()
        .find(|l| l.protocol == "amqp")
        .expect("an AMQP listener");
    assert_eq!(amqp.port, u32::from(broker.amqp_addr.port()));
    assert!(
        overview
            .listeners
            .iter()
            .any(|l| l.protocol == "http" && l.port == u32::from(broker.management_addr.port())),
        "the management listener is listed: {:?}",
        overview.listeners
    );
    assert_eq!(rc.server_version().await.expect("version"), "3.10.8");

    let me = rc.current_user().await.expect("whoami");
    assert_eq!(me.name, "guest");
    assert!(me.tags.0.contains(&"administrator".to_string()), "{me:?}");

    let nodes = rc.list_nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1);
    let node = &nodes[0];
    assert_eq!(node.name, overview.node);
    assert!(!node.being_drained);
    assert!(node.processors >= 1);
    assert_eq!(node.os_pid, broker.pid());
    assert_eq!(node.rabbitmq_version(), "3.10.8");
    let same = rc.get_node_info(&node.name).await.expect("one node");
    assert_eq!(same.name, node.name);
}

#[tokio::test]
async fn vhosts_are_created_listed_shown_and_deleted() {
    let broker = BrokerProcess::start();
    let rc = api(&broker);

    let params = VirtualHostParams::named("orders")
        .with_description("order processing")
        .with_tags(vec!["production", "eu"]);
    rc.create_vhost(&params).await.expect("create vhost");

    let all = rc.list_vhosts().await.expect("list vhosts");
    let names: Vec<&str> = all.iter().map(|v| v.name.as_str()).collect();
    assert!(
        names.contains(&"/") && names.contains(&"orders"),
        "{names:?}"
    );

    let v = rc.get_vhost("orders").await.expect("get vhost");
    assert_eq!(v.name, "orders");
    assert_eq!(v.description.as_deref(), Some("order processing"));
    let mut tags = v.tags.expect("tags").0;
    tags.sort();
    assert_eq!(tags, vec!["eu".to_string(), "production".to_string()]);

    // The creator may use it at once (RabbitMQ grants the creating user full permissions).
    let p = rc
        .get_permissions("orders", "guest")
        .await
        .expect("creator");
    assert_eq!(
        (p.configure, p.write, p.read),
        (".*".into(), ".*".into(), ".*".into())
    );

    // Updating keeps the vhost and changes its metadata.
    rc.update_vhost(&VirtualHostParams::named("orders").with_description("orders v2"))
        .await
        .expect("update vhost");
    let v = rc.get_vhost("orders").await.expect("get vhost");
    assert_eq!(v.description.as_deref(), Some("orders v2"));

    rc.delete_vhost("orders", false)
        .await
        .expect("delete vhost");
    is_not_found(rc.get_vhost("orders").await);
    is_not_found(rc.delete_vhost("orders", false).await);
    rc.delete_vhost("orders", true)
        .await
        .expect("idempotent delete of a missing vhost");
    let names: Vec<String> = rc
        .list_vhosts()
        .await
        .expect("list vhosts")
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, vec!["/".to_string()]);
}

#[tokio::test]
async fn users_with_a_password_hash_log_in_and_users_without_one_do_not() {
    let broker = BrokerProcess::start();
    let rc = api(&broker);

    // The crate sends a salted SHA-256 hash computed on the client, as RabbitMQ expects.
    let hash = base64_encoded_salted_password_hash_sha256(&salt(), "s3cret");
    rc.create_user(&UserParams::new("alice", &hash, "monitoring,management"))
        .await
        .expect("create alice");
    // An empty hash: a user who cannot log in with a password.
    rc.create_user(&UserParams::without_tags("bob", ""))
        .await
        .expect("create bob");

    let users = rc.list_users().await.expect("list users");
    let alice = users.iter().find(|u| u.name == "alice").expect("alice");
    let mut tags = alice.tags.0.clone();
    tags.sort();
    assert_eq!(
        tags,
        vec!["management".to_string(), "monitoring".to_string()]
    );
    assert!(users.iter().any(|u| u.name == "bob" && u.tags.0.is_empty()));
    assert!(users.iter().any(|u| u.name == "guest"));

    let shown = rc.get_user("alice").await.expect("get alice");
    assert_eq!(
        shown.password_hash.map(|h| h.to_string()),
        Some(hash.clone()),
        "the stored hash is the one given"
    );

    // Alice logs in with the password behind the hash; bob cannot log in at all.
    let as_alice = api_as(&broker, "alice", "s3cret");
    let me = as_alice.current_user().await.expect("alice logs in");
    assert_eq!(me.name, "alice");
    assert_eq!(
        status_of(api_as(&broker, "alice", "wrong").current_user().await),
        401
    );
    assert_eq!(
        status_of(api_as(&broker, "bob", "").current_user().await),
        401
    );

    // Neither has permissions yet.
    let without: Vec<String> = rc
        .list_users_without_permissions()
        .await
        .expect("without permissions")
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert!(without.contains(&"alice".to_string()) && without.contains(&"bob".to_string()));

    // Re-declaring changes the password (a new hash) and the tags.
    let hash2 = base64_encoded_salted_password_hash_sha256(&salt(), "n3w");
    rc.create_user(&UserParams::administrator("alice", &hash2))
        .await
        .expect("update alice");
    let me = api_as(&broker, "alice", "n3w")
        .current_user()
        .await
        .expect("new password");
    assert_eq!(me.tags.0, vec!["administrator".to_string()]);

    rc.delete_user("alice", false).await.expect("delete alice");
    is_not_found(rc.get_user("alice").await);
    is_not_found(rc.delete_user("alice", false).await);
    rc.delete_users(vec!["bob"]).await.expect("bulk delete");
    let left: Vec<String> = rc
        .list_users()
        .await
        .expect("list users")
        .into_iter()
        .map(|u| u.name)
        .collect();
    assert_eq!(left, vec!["guest".to_string()]);
}

#[tokio::test]
async fn permissions_are_declared_listed_shown_and_cleared() {
    let broker = BrokerProcess::start();
    let rc = api(&broker);
    rc.create_vhost(&VirtualHostParams::named("app"))
        .await
        .expect("vhost");
    let hash = base64_encoded_salted_password_hash_sha256(&salt(), "pw");
    rc.create_user(&UserParams::new("carol", &hash, "management"))
        .await
        .expect("user");

    rc.declare_permissions(&Permissions {
        user: "carol",
        vhost: "app",
        configure: "^carol-.*",
        write: ".*",
        read: "^(carol-.*|amq\\.default)$",
    })
    .await
    .expect("declare permissions");

    let p = rc.get_permissions("app", "carol").await.expect("get");
    assert_eq!(p.user, "carol");
    assert_eq!(p.vhost, "app");
    assert_eq!(p.configure, "^carol-.*");
    assert_eq!(p.write, ".*");
    assert_eq!(p.read, "^(carol-.*|amq\\.default)$");

    let all = rc.list_permissions().await.expect("list");
    assert!(all.contains(&p), "{all:?}");
    assert!(
        all.iter().any(|q| q.user == "guest" && q.vhost == "/"),
        "{all:?}"
    );
    let in_app = rc.list_permissions_in("app").await.expect("in vhost");
    let mut users: Vec<&str> = in_app.iter().map(|p| p.user.as_str()).collect();
    users.sort();
    assert_eq!(users, vec!["carol", "guest"]);
    let of_carol = rc.list_permissions_of("carol").await.expect("of user");
    assert_eq!(of_carol, vec![p.clone()]);

    // The permissions are enforced: carol may declare her own queues only.
    let as_carol = api_as(&broker, "carol", "pw");
    as_carol
        .declare_queue(
            "app",
            &QueueParams::new_durable_classic_queue("carol-q", None),
        )
        .await
        .expect("carol declares carol-q");
    assert_eq!(
        status_of(
            as_carol
                .declare_queue(
                    "app",
                    &QueueParams::new_durable_classic_queue("other", None)
                )
                .await
        ),
        401
    );

    // Refused for a user or vhost that does not exist.
    let refused = rc
        .declare_permissions(&Permissions::full_access("nobody", "app"))
        .await;
    assert_eq!(status_of(refused), 400);

    rc.clear_permissions("app", "carol", false)
        .await
        .expect("clear");
    is_not_found(rc.get_permissions("app", "carol").await);
    is_not_found(rc.clear_permissions("app", "carol", false).await);
    rc.clear_permissions("app", "carol", true)
        .await
        .expect("idempotent clear");
    assert!(
        rc.list_permissions_of("carol")
            .await
            .expect("of user")
            .is_empty()
    );
}

#[tokio::test]
async fn exchanges_are_declared_listed_shown_and_deleted() {
    let broker = BrokerProcess::start();
    let rc = api(&broker);

    let builtin: Vec<String> = rc
        .list_exchanges_in("/")
        .await
        .expect("list")
        .into_iter()
        .map(|x| x.name)
        .collect();
    for name in ["", "amq.direct", "amq.fanout", "amq.topic", "amq.headers"] {
        assert!(builtin.contains(&name.to_string()), "{name} in {builtin:?}");
    }

    rc.declare_exchange(
        "/",
        &ExchangeParams::durable_topic("events", args(json!({"alternate-exchange": "amq.fanout"}))),
    )
    .await
    .expect("declare topic");
    rc.declare_exchange("/", &ExchangeParams::fanout("fan", false, true, None))
        .await
        .expect("declare fanout");

    let x = rc.get_exchange_info("/", "events").await.expect("get");
    assert_eq!(x.name, "events");
    assert_eq!(x.vhost, "/");
    assert_eq!(x.exchange_type, "topic");
    assert!(x.durable && !x.auto_delete);
    assert_eq!(
        x.arguments.get("alternate-exchange"),
        Some(&json!("amq.fanout"))
    );

    let fan = rc.get_exchange_info("/", "fan").await.expect("get fan");
    assert_eq!(fan.exchange_type, "fanout");
    assert!(!fan.durable && fan.auto_delete);

    let all = rc.list_exchanges().await.expect("list all");
    assert!(all.iter().any(|x| x.name == "events" && x.vhost == "/"));
    let in_root = rc.list_exchanges_in("/").await.expect("list in /");
    assert_eq!(in_root.len(), builtin.len() + 2);

    // Redeclaring with another type is a 400, as RabbitMQ's inequivalent-arguments refusal.
    let clash = rc
        .declare_exchange("/", &ExchangeParams::durable_direct("events", None))
        .await;
    assert_eq!(status_of(clash), 400);
    assert_eq!(
        rc.get_exchange_info("/", "events")
            .await
            .expect("unchanged")
            .exchange_type,
        "topic"
    );

    rc.delete_exchanges("/", &["events", "fan"], false)
        .await
        .expect("delete");
    is_not_found(rc.get_exchange_info("/", "events").await);
    is_not_found(rc.delete_exchange("/", "events", false).await);
    rc.delete_exchange("/", "events", true)
        .await
        .expect("idempotent delete");
    assert_eq!(
        rc.list_exchanges_in("/").await.expect("list").len(),
        builtin.len()
    );
    is_not_found(rc.list_exchanges_in("no-such-vhost").await);
}

#[tokio::test]
async fn classic_queues_are_declared_counted_purged_and_deleted() {
    let broker = BrokerProcess::start();
    let rc = api(&broker);

    let params = QueueParams::new_durable_classic_queue(
        "jobs",
        args(json!({"x-message-ttl": 60000, "x-max-length": 100})),
    );
    rc.declare_queue("/", &params).await.expect("declare");
    // Declaring again with the same arguments is fine.
    rc.declare_queue("/", &params).await.expect("redeclare");
    rc.declare_queue("/", &QueueParams::new_transient_autodelete("scratch", None))
        .await
        .expect("declare transient");

    let q = rc.get_queue_info("/", "jobs").await.expect("get");
    assert_eq!(q.name, "jobs");
    assert_eq!(q.vhost, "/");
    assert_eq!(q.queue_type, "classic");
    assert!(q.durable && !q.auto_delete && !q.exclusive);
    assert_eq!(q.arguments.get("x-message-ttl"), Some(&json!(60000)));
    assert_eq!(q.arguments.get("x-max-length"), Some(&json!(100)));
    assert_eq!(q.arguments.get("x-queue-type"), Some(&json!("classic")));
    assert_eq!(q.message_count, 0);
    assert_eq!(q.consumer_count, 0);
    assert_eq!(q.state, "running");

    let scratch = rc.get_queue_info("/", "scratch").await.expect("scratch");
    assert!(!scratch.durable && scratch.auto_delete);

    let listed = rc.list_queues_in("/").await.expect("list");
    let mut names: Vec<&str> = listed.iter().map(|q| q.name.as_str()).collect();
    names.sort();
    assert_eq!(names, vec!["jobs", "scratch"]);
    assert_eq!(rc.list_queues().await.expect("list all").len(), 2);
    let classic = rc.list_classic_queues_in("/").await.expect("classic");
    assert_eq!(classic.len(), 2);

    for i in 0..3 {
        let routed = rc
            .publish_message("/", "amq.default", "jobs", &format!("job {i}"), Map::new())
            .await
            .expect("publish");
        assert!(routed.routed);
    }
    let q = rc.get_queue_info("/", "jobs").await.expect("get");
    assert_eq!(q.message_count, 3);
    assert_eq!(q.unacknowledged_message_count, 0);
    assert!(q.message_bytes >= 15, "{q:?}");

    rc.purge_queue("/", "jobs").await.expect("purge");
    let q = rc.get_queue_info("/", "jobs").await.expect("get");
    assert_eq!(q.message_count, 0);

    // A clash of arguments is refused and the queue keeps its own.
    let clash = rc
        .declare_queue(
            "/",
            &QueueParams::new_durable_classic_queue("jobs", args(json!({"x-message-ttl": 1}))),
        )
        .await;
    assert_eq!(status_of(clash), 400);

    rc.delete_queues("/", &["jobs", "scratch"], false)
        .await
        .expect("delete");
    is_not_found(rc.get_queue_info("/", "jobs").await);
    is_not_found(rc.delete_queue("/", "jobs", false).await);
    rc.delete_queue("/", "jobs", true)
        .await
        .expect("idempotent delete");
    assert!(rc.list_queues_in("/").await.expect("list").is_empty());
}

#[tokio::test]
async fn queue_and_exchange_to_exchange_bindings_are_declared_listed_and_deleted() {
    let broker = BrokerProcess::start();
    let rc = api(&broker);
    rc.create_vhost(&VirtualHostParams::named("routing"))
        .await
        .expect("vhost");
    let vh = "routing";
    rc.declare_exchange(vh, &ExchangeParams::durable_topic("ingress", None))
        .await
        .expect("ingress");
    rc.declare_exchange(vh, &ExchangeParams::durable_fanout("audit", None))
        .await
        .expect("audit");
    rc.declare_queue(vh, &QueueParams::new_durable_classic_queue("orders", None))
        .await
        .expect("orders");
    rc.declare_queue(
        vh,
        &QueueParams::new_durable_classic_queue("audit-log", None),
    )
    .await
    .expect("audit-log");

    rc.bind_queue(
        vh,
        "orders",
        "ingress",
        Some("order.*"),
        args(json!({"x-tag": "o"})),
    )
    .await
    .expect("bind queue");
    rc.bind_exchange(vh, "audit", "ingress", Some("#"), None)
        .await
        .expect("bind exchange to exchange");
    rc.bind_queue(vh, "audit-log", "audit", None, None)
        .await
        .expect("bind audit-log");

    let all = rc.list_bindings_in(vh).await.expect("list");
    // Each queue's implicit binding to the default exchange is listed first, as RabbitMQ does.
    assert_eq!(all.len(), 5, "{all:?}");
    assert!(
        all.iter()
            .any(|b| b.source.is_empty() && b.destination == "orders" && b.routing_key == "orders")
    );
    let to_orders = all
        .iter()
        .find(|b| b.source == "ingress" && b.destination == "orders")
        .expect("ingress -> orders");
    assert_eq!(to_orders.destination_type, BindingDestinationType::Queue);
    assert_eq!(to_orders.routing_key, "order.*");
    assert_eq!(to_orders.arguments.get("x-tag"), Some(&json!("o")));
    assert!(to_orders.properties_key.is_some());
    assert!(rc.list_bindings().await.expect("all").len() >= 5);

    let of_orders = rc.list_queue_bindings(vh, "orders").await.expect("queue");
    assert_eq!(of_orders.len(), 2, "default and ingress: {of_orders:?}");
    let from_ingress = rc
        .list_exchange_bindings_with_source(vh, "ingress")
        .await
        .expect("source");
    assert_eq!(from_ingress.len(), 2);
    let into_audit = rc
        .list_exchange_bindings_with_destination(vh, "audit")
        .await
        .expect("destination");
    assert_eq!(into_audit.len(), 1);
    assert_eq!(into_audit[0].source, "ingress");
    assert_eq!(
        into_audit[0].destination_type,
        BindingDestinationType::Exchange
    );
    assert_eq!(into_audit[0].routing_key, "#");

    // Routing follows the bindings: ingress -> orders by key, ingress -> audit -> audit-log.
    let routed = rc
        .publish_message(vh, "ingress", "order.created", "o1", Map::new())
        .await
        .expect("publish");
    assert!(routed.routed);
    assert_eq!(
        rc.get_queue_info(vh, "orders")
            .await
            .expect("q")
            .message_count,
        1
    );
    assert_eq!(
        rc.get_queue_info(vh, "audit-log")
            .await
            .expect("q")
            .message_count,
        1
    );

    // Deletion finds the binding by its properties and removes exactly it.
    rc.delete_binding(
        &BindingDeletionParams {
            virtual_host: vh,
            source: "ingress",
            destination: "orders",
            destination_type: BindingDestinationType::Queue,
            routing_key: "order.*",
            arguments: args(json!({"x-tag": "o"})),
        },
        false,
    )
    .await
    .expect("delete queue binding");
    rc.delete_binding(
        &BindingDeletionParams::from_binding_info(&into_audit[0]),
        false,
    )
    .await
    .expect("delete exchange binding");
    let left = rc.list_bindings_in(vh).await.expect("list");
    assert_eq!(
        left.len(),
        3,
        "two implicit and audit -> audit-log: {left:?}"
    );
    assert!(!left.iter().any(|b| b.source == "ingress"));
    let routed = rc
        .publish_message(vh, "ingress", "order.created", "o2", Map::new())
        .await
        .expect("publish");
    assert!(!routed.routed, "no binding left from ingress");

    // Binding to something missing is a 404.
    let missing = rc
        .bind_queue(vh, "no-such-queue", "ingress", None, None)
        .await;
    assert_eq!(status_of(missing), 404);
}

#[tokio::test]
async fn messages_published_through_the_api_are_got_back() {
    let broker = BrokerProcess::start();
    let rc = api(&broker);
    rc.declare_queue("/", &QueueParams::new_durable_classic_queue("inbox", None))
        .await
        .expect("queue");

    let mut props = Map::new();
    props.insert("content_type".into(), json!("text/plain"));
    props.insert("delivery_mode".into(), json!(2));
    props.insert("correlation_id".into(), json!("c-1"));
    props.insert("headers".into(), json!({"source": "api-test"}));
    let routed = rc
        .publish_message("/", "amq.default", "inbox", "hello warren", props)
        .await
        .expect("publish");
    assert!(routed.routed);
    rc.publish_message("/", "amq.default", "inbox", "second", Map::new())
        .await
        .expect("publish");
    let unroutable = rc
        .publish_message("/", "amq.default", "nowhere", "lost", Map::new())
        .await
        .expect("publish unroutable");
    assert!(!unroutable.routed);

    // Peek: requeued, so still there.
    let peek = rc
        .get_messages("/", "inbox", 1, "ack_requeue_true")
        .await
        .expect("peek");
    assert_eq!(peek.len(), 1);
    assert_eq!(peek[0].payload, "hello warren");
    assert_eq!(
        rc.get_queue_info("/", "inbox")
            .await
            .expect("q")
            .message_count,
        2
    );

    let got = rc
        .get_messages("/", "inbox", 10, "ack_requeue_false")
        .await
        .expect("get");
    assert_eq!(got.len(), 2);
    let first = &got[0];
    assert_eq!(first.payload, "hello warren");
    assert_eq!(first.payload_encoding, "string");
    assert_eq!(first.payload_bytes, 12);
    assert_eq!(first.exchange, "");
    assert_eq!(first.routing_key, "inbox");
    assert!(first.redelivered, "it was requeued by the peek");
    assert_eq!(first.message_count, 1, "messages left after this one");
    assert_eq!(
        first.properties.0.get("content_type"),
        Some(&json!("text/plain"))
    );
    assert_eq!(first.properties.0.get("delivery_mode"), Some(&json!(2)));
    assert_eq!(
        first.properties.0.get("correlation_id"),
        Some(&json!("c-1"))
    );
    assert_eq!(
        first.properties.0.get("headers"),
        Some(&json!({"source": "api-test"}))
    );
    assert_eq!(got[1].payload, "second");
    assert_eq!(got[1].message_count, 0);

    assert!(
        rc.get_messages("/", "inbox", 5, "ack_requeue_false")
            .await
            .expect("get from empty")
            .is_empty()
    );
    assert_eq!(
        rc.get_queue_info("/", "inbox")
            .await
            .expect("q")
            .message_count,
        0
    );
    is_not_found(
        rc.get_messages("/", "no-such-queue", 1, "ack_requeue_false")
            .await,
    );
}

/// Builds a vhost with one of everything the definitions carry.
async fn populate(rc: &Api, vh: &str) {
    rc.create_vhost(&VirtualHostParams::named(vh).with_description("exported"))
        .await
        .expect("vhost");
    let hash = base64_encoded_salted_password_hash_sha256(&salt(), "dpw");
    rc.create_user(&UserParams::new("dave", &hash, "management"))
        .await
        .expect("user");
    rc.declare_permissions(&Permissions {
        user: "dave",
        vhost: vh,
        configure: "^dave-",
        write: ".*",
        read: ".*",
    })
    .await
    .expect("permissions");
    rc.declare_exchange(
        vh,
        &ExchangeParams::new("events", ExchangeType::Topic, true, false, None),
    )
    .await
    .expect("exchange");
    rc.declare_exchange(vh, &ExchangeParams::durable_fanout("copies", None))
        .await
        .expect("exchange");
    rc.declare_queue(
        vh,
        &QueueParams::new_durable_classic_queue("orders", args(json!({"x-max-length": 10}))),
    )
    .await
    .expect("queue");
    rc.bind_queue(vh, "orders", "events", Some("order.#"), None)
        .await
        .expect("binding");
    rc.bind_exchange(vh, "copies", "events", Some("#"), None)
        .await
        .expect("e2e binding");
}

fn assert_topology(
    queues: &[(String, bool, Option<Value>)],
    exchanges: &[(String, String)],
    bindings: &[(String, String, String)],
) {
    assert_eq!(
        queues,
        &[("orders".to_string(), true, Some(json!(10)))],
        "queues"
    );
    let mut xs = exchanges.to_vec();
    xs.sort();
    assert_eq!(
        xs,
        vec![
            ("copies".to_string(), "fanout".to_string()),
            ("events".to_string(), "topic".to_string()),
        ]
    );
    let mut bs = bindings.to_vec();
    bs.sort();
    assert_eq!(
        bs,
        vec![
            ("events".into(), "copies".into(), "#".into()),
            ("events".into(), "orders".into(), "order.#".into()),
        ]
    );
}

#[tokio::test]
async fn definitions_export_and_import_into_a_fresh_broker() {
    let source = BrokerProcess::start();
    let rc = api(&source);
    populate(&rc, "shop").await;

    let defs = rc
        .export_cluster_wide_definitions_as_data()
        .await
        .expect("export as data");
    assert_eq!(defs.server_version.as_deref(), Some("3.10.8"));
    assert!(defs.users.iter().any(|u| u.name == "dave"));
    assert!(defs.virtual_hosts.iter().any(|v| v.name == "shop"));
    assert!(
        defs.permissions
            .iter()
            .any(|p| p.user == "dave" && p.vhost == "shop" && p.configure == "^dave-")
    );
    assert!(defs.policies.is_empty() && defs.parameters.is_empty());
    let in_shop = |vh: &String| vh == "shop";
    assert_topology(
        &defs
            .queues
            .iter()
            .filter(|q| in_shop(&q.vhost))
            .map(|q| {
                (
                    q.name.clone(),
                    q.durable,
                    q.arguments.get("x-max-length").cloned(),
                )
            })
            .collect::<Vec<_>>(),
        &defs
            .exchanges
            .iter()
            .filter(|x| in_shop(&x.vhost))
            .map(|x| (x.name.clone(), x.exchange_type.clone()))
            .collect::<Vec<_>>(),
        &defs
            .bindings
            .iter()
            .filter(|b| in_shop(&b.vhost))
            .map(|b| {
                (
                    b.source.clone(),
                    b.destination.clone(),
                    b.routing_key.clone(),
                )
            })
            .collect::<Vec<_>>(),
    );

    // The exported document, as text, imports into another broker unchanged.
    let text = rc
        .export_cluster_wide_definitions_as_string()
        .await
        .expect("export as text");
    let document: Value = serde_json::from_str(&text).expect("JSON");
    let target = BrokerProcess::start();
    let rt = api(&target);
    rt.import_cluster_wide_definitions(document)
        .await
        .expect("import");

    let v = rt.get_vhost("shop").await.expect("vhost imported");
    assert_eq!(v.description.as_deref(), Some("exported"));
    let dave = rt.get_user("dave").await.expect("user imported");
    assert_eq!(dave.tags.0, vec!["management".to_string()]);
    // The password hash came along: dave logs in with his password on the new broker.
    api_as(&target, "dave", "dpw")
        .current_user()
        .await
        .expect("dave logs in on the target");
    let p = rt
        .get_permissions("shop", "dave")
        .await
        .expect("permissions");
    assert_eq!(p.configure, "^dave-");
    let q = rt.get_queue_info("shop", "orders").await.expect("queue");
    assert!(q.durable);
    assert_eq!(q.arguments.get("x-max-length"), Some(&json!(10)));
    let x = rt
        .get_exchange_info("shop", "events")
        .await
        .expect("exchange");
    assert_eq!(x.exchange_type, "topic");
    let bindings = rt
        .list_exchange_bindings_with_source("shop", "events")
        .await
        .expect("bindings");
    assert_eq!(bindings.len(), 2, "{bindings:?}");
    let routed = rt
        .publish_message("shop", "events", "order.new", "x", Map::new())
        .await
        .expect("publish on the target");
    assert!(routed.routed);
}

#[tokio::test]
async fn vhost_definitions_export_and_import_into_another_vhost() {
    let broker = BrokerProcess::start();
    let rc = api(&broker);
    populate(&rc, "blue").await;

    let defs = rc
        .export_vhost_definitions_as_data("blue")
        .await
        .expect("export vhost as data");
    assert_topology(
        &defs
            .queues
            .iter()
            .map(|q| {
                (
                    q.name.clone(),
                    q.durable,
                    q.arguments.get("x-max-length").cloned(),
                )
            })
            .collect::<Vec<_>>(),
        &defs
            .exchanges
            .iter()
            .map(|x| (x.name.clone(), x.exchange_type.clone()))
            .collect::<Vec<_>>(),
        &defs
            .bindings
            .iter()
            .map(|b| {
                (
                    b.source.clone(),
                    b.destination.clone(),
                    b.routing_key.clone(),
                )
            })
            .collect::<Vec<_>>(),
    );

    let text = rc
        .export_vhost_definitions_as_string("blue")
        .await
        .expect("export vhost as text");
    rc.create_vhost(&VirtualHostParams::named("green"))
        .await
        .expect("green");
    rc.import_vhost_definitions("green", serde_json::from_str(&text).expect("JSON"))
        .await
        .expect("import into green");

    let green = rc
        .export_vhost_definitions_as_data("green")
        .await
        .expect("export green");
    assert_topology(
        &green
            .queues
            .iter()
            .map(|q| {
                (
                    q.name.clone(),
                    q.durable,
                    q.arguments.get("x-max-length").cloned(),
                )
            })
            .collect::<Vec<_>>(),
        &green
            .exchanges
            .iter()
            .map(|x| (x.name.clone(), x.exchange_type.clone()))
            .collect::<Vec<_>>(),
        &green
            .bindings
            .iter()
            .map(|b| {
                (
                    b.source.clone(),
                    b.destination.clone(),
                    b.routing_key.clone(),
                )
            })
            .collect::<Vec<_>>(),
    );
    let q = rc.get_queue_info("green", "orders").await.expect("queue");
    assert_eq!(q.vhost, "green");
    // The source vhost is untouched.
    assert!(rc.get_queue_info("blue", "orders").await.is_ok());
}

#[tokio::test]
async fn an_amqp_clients_connection_and_channel_are_listed_and_closed() {
    use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{Connection, ConnectionProperties};

    let broker = BrokerProcess::start();
    let rc = api(&broker);
    let conn = Connection::connect(&broker.uri(), ConnectionProperties::default())
        .await
        .expect("AMQP connection");
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(5, BasicQosOptions::default())
        .await
        .expect("qos");
    ch.queue_declare(
        "work".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue");
    let _consumer = ch
        .basic_consume(
            "work".into(),
            "worker-1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");

    let conns = rc.list_connections().await.expect("connections");
    assert_eq!(conns.len(), 1);
    let c = &conns[0];
    assert_eq!(c.username, "guest");
    assert_eq!(c.protocol, "AMQP 0-9-1");
    assert_eq!(c.server_port, Some(u32::from(broker.amqp_addr.port())));
    assert_eq!(c.channel_count, 1);
    assert_eq!(c.client_properties.product, "lapin");
    assert_eq!(
        rc.get_connection_info(&c.name).await.expect("one").name,
        c.name
    );

    let channels = rc.list_channels_on(&c.name).await.expect("channels");
    assert_eq!(channels.len(), 1);
    assert_eq!(channels[0].vhost, "/");
    assert_eq!(channels[0].consumer_count, 1);
    assert_eq!(channels[0].prefetch_count, 5);
    assert_eq!(channels[0].connection_details.name, c.name);
    assert_eq!(rc.list_channels().await.expect("all channels").len(), 1);
    let q = rc.get_queue_info("/", "work").await.expect("queue");
    assert_eq!(q.consumer_count, 1);

    // Consumers carry `consumer_timeout`, which the crate (and rabbitmqadmin v2) requires.
    let consumers = rc.list_consumers().await.expect("consumers");
    assert_eq!(consumers.len(), 1);
    assert_eq!(consumers[0].consumer_tag, "worker-1");
    assert_eq!(consumers[0].queue.name, "work");
    assert_eq!(consumers[0].prefetch_count, 5);
    assert_eq!(consumers[0].delivery_ack_timeout, 1_800_000);
    let details = consumers[0]
        .channel_details
        .as_ref()
        .expect("channel details");
    assert_eq!(details.connection_name, c.name);
    assert_eq!(rc.list_consumers_in("/").await.expect("in /").len(), 1);

    // Every other list endpoint decodes into the crate's types with objects present.
    rc.create_vhost(&VirtualHostParams::named("lists"))
        .await
        .expect("vhost");
    rc.declare_policy(&rabbitmq_http_client::requests::PolicyParams {
        vhost: "/",
        name: "lengths",
        pattern: "^work$",
        apply_to: rabbitmq_http_client::commons::PolicyTarget::Queues,
        priority: 1,
        definition: args(json!({"max-length": 100})).expect("an object"),
    })
    .await
    .expect("policy");
    assert_eq!(rc.list_policies().await.expect("policies").len(), 1);
    assert_eq!(
        rc.list_policies_in("/").await.expect("policies in /").len(),
        1
    );
    rc.list_operator_policies()
        .await
        .expect("operator policies");
    assert!(rc.list_vhosts().await.expect("vhosts").len() >= 2);
    rc.list_users().await.expect("users");
    rc.list_permissions().await.expect("permissions");
    rc.list_nodes().await.expect("nodes");
    assert!(!rc.list_exchanges().await.expect("exchanges").is_empty());
    assert_eq!(rc.list_queues().await.expect("queues").len(), 1);
    assert!(!rc.list_bindings().await.expect("bindings").is_empty());
    rc.list_all_vhost_limits().await.expect("vhost limits");
    rc.list_all_user_limits().await.expect("user limits");
    let page = rabbitmq_http_client::commons::PaginationParams::first_page(2);
    assert_eq!(
        rc.list_exchanges_paged(&page).await.expect("a page").len(),
        2
    );
    assert_eq!(rc.list_queues_paged(&page).await.expect("a page").len(), 1);
    assert_eq!(
        rc.list_connections_paged(&page)
            .await
            .expect("a page")
            .len(),
        1
    );
    assert_eq!(
        rc.list_channels_paged(&page).await.expect("a page").len(),
        1
    );
    // As in RabbitMQ 3.10, `/api/users` is not paged (so `list_users_paged` cannot decode it).
    rc.list_vhosts_paged(&page).await.expect("a page");

    let of_guest = rc
        .list_user_connections("guest")
        .await
        .expect("a user's connections");
    assert_eq!(of_guest.len(), 1);
    assert_eq!(of_guest[0].name, c.name);
    assert_eq!(of_guest[0].vhost, "/");
    assert!(
        rc.list_user_connections("nobody")
            .await
            .expect("none")
            .is_empty()
    );

    rc.close_user_connections("guest", Some("closed by the test"), false)
        .await
        .expect("close");
    tokio::time::timeout(std::time::Duration::from_secs(5), async {
        while conn.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the client learns its connection was closed");
    let mut left = rc.list_connections().await.expect("connections");
    for _ in 0..100 {
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        left = rc.list_connections().await.expect("connections");
    }
    assert!(left.is_empty(), "{left:?}");
}
