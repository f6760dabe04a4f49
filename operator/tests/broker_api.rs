//! `BrokerApi` against a real broker (in-process, on 127.0.0.1 with ephemeral ports): what the
//! operator declares is what the broker then has, repeated declarations are harmless, deleting
//! what is gone succeeds, and refusals come back with the broker's reason.

mod common;

use common::Broker;
use serde_json::json;
use warren_operator::broker_api::{BrokerApi, BrokerError};
use warren_operator::crd::binding::{BindingSpec, DestinationType};
use warren_operator::crd::common::{DeletionPolicy, InstanceRef};
use warren_operator::crd::exchange::{ExchangeSpec, ExchangeType};
use warren_operator::crd::queue::{QueueSpec, QueueType};
use warren_operator::crd::vhost::VhostLimits;

fn queue(vhost: &str, name: &str) -> QueueSpec {
    QueueSpec {
        instance_ref: InstanceRef {
            name: "demo".into(),
        },
        vhost: vhost.into(),
        name: name.into(),
        queue_type: QueueType::Classic,
        durable: true,
        auto_delete: false,
        arguments: [("x-max-length".to_owned(), json!(100))].into(),
        deletion_policy: DeletionPolicy::Delete,
    }
}

#[tokio::test]
async fn vhosts_and_their_limits_are_declared_updated_and_deleted() {
    let b = Broker::start().await;
    let api = b.api();
    api.check().await.unwrap();
    let limits = VhostLimits {
        max_connections: Some(10),
        max_queues: Some(5),
    };
    api.declare_vhost("orders/eu", Some(&limits)).await.unwrap();
    api.declare_vhost("orders/eu", Some(&limits)).await.unwrap();
    let (status, _) = b.get("/api/vhosts/orders%2Feu").await;
    assert_eq!(status, 200);
    let (_, l) = b.get("/api/vhost-limits/orders%2Feu").await;
    assert_eq!(
        l[0]["value"],
        json!({"max-connections": 10, "max-queues": 5})
    );
    // Dropping a limit from the spec clears it in the broker.
    let fewer = VhostLimits {
        max_connections: None,
        max_queues: Some(7),
    };
    api.declare_vhost("orders/eu", Some(&fewer)).await.unwrap();
    let (_, l) = b.get("/api/vhost-limits/orders%2Feu").await;
    assert_eq!(l[0]["value"], json!({"max-queues": 7}));
    api.delete_vhost("orders/eu").await.unwrap();
    api.delete_vhost("orders/eu").await.unwrap();
    assert_eq!(b.get("/api/vhosts/orders%2Feu").await.0, 404);
}

#[tokio::test]
async fn queues_exchanges_and_bindings_reach_the_broker_as_declared() {
    let b = Broker::start().await;
    let api = b.api();
    let q = queue("/", "orders.created");
    api.declare_queue(&q).await.unwrap();
    api.declare_queue(&q).await.unwrap();
    let (_, got) = b.get("/api/queues/%2F/orders.created").await;
    assert_eq!(got["durable"], true);
    assert_eq!(got["arguments"], json!({"x-max-length": 100}));
    let x = ExchangeSpec {
        instance_ref: InstanceRef {
            name: "demo".into(),
        },
        vhost: "/".into(),
        name: "orders".into(),
        exchange_type: ExchangeType::Topic,
        durable: true,
        auto_delete: false,
        internal: false,
        arguments: Default::default(),
        deletion_policy: DeletionPolicy::Delete,
    };
    api.declare_exchange(&x).await.unwrap();
    let (_, got) = b.get("/api/exchanges/%2F/orders").await;
    assert_eq!(got["type"], "topic");
    let binding = BindingSpec {
        instance_ref: InstanceRef {
            name: "demo".into(),
        },
        vhost: "/".into(),
        source: "orders".into(),
        destination: "orders.created".into(),
        destination_type: DestinationType::Queue,
        routing_key: "order.created.#".into(),
        arguments: [("x-match".to_owned(), json!("all"))].into(),
        deletion_policy: DeletionPolicy::Delete,
    };
    api.declare_binding(&binding).await.unwrap();
    api.declare_binding(&binding).await.unwrap();
    let (_, list) = b.get("/api/bindings/%2F/e/orders/q/orders.created").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["routing_key"], "order.created.#");
    // A second binding with another key stays when the first is deleted.
    let other = BindingSpec {
        routing_key: "order.cancelled".into(),
        arguments: Default::default(),
        ..binding.clone()
    };
    api.declare_binding(&other).await.unwrap();
    api.delete_binding(&binding).await.unwrap();
    api.delete_binding(&binding).await.unwrap();
    let (_, list) = b.get("/api/bindings/%2F/e/orders/q/orders.created").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["routing_key"], "order.cancelled");
    api.delete_binding(&other).await.unwrap();
    api.delete_exchange("/", "orders").await.unwrap();
    api.delete_queue("/", "orders.created").await.unwrap();
    api.delete_queue("/", "orders.created").await.unwrap();
    assert_eq!(b.get("/api/queues/%2F/orders.created").await.0, 404);
    assert_eq!(b.get("/api/exchanges/%2F/orders").await.0, 404);
}

#[tokio::test]
async fn refusals_carry_the_brokers_reason_and_say_whether_to_retry() {
    let b = Broker::start().await;
    let api = b.api();
    // A vhost that does not exist (yet): retried, as a Vhost resource may create it.
    let err = api.declare_queue(&queue("nowhere", "q")).await.unwrap_err();
    assert_eq!(err.reason(), "BrokerObjectMissing", "{err}");
    assert!(err.is_transient());
    assert!(err.to_string().contains("vhost_not_found"), "{err}");
    // A queue that exists with other arguments: not retried until the spec changes.
    api.declare_queue(&queue("/", "q")).await.unwrap();
    let mut changed = queue("/", "q");
    changed.arguments.insert("x-max-length".into(), json!(5));
    let err = api.declare_queue(&changed).await.unwrap_err();
    assert_eq!(err.reason(), "BrokerRefused", "{err}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("inequivalent arg"), "{err}");
    // Wrong credentials and an unreachable broker.
    let addr = b.management_addr();
    let wrong = BrokerApi::new(&format!("http://{addr}"), "guest", "nope");
    assert_eq!(
        wrong.check().await.unwrap_err().reason(),
        "BrokerCredentialsRejected"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = closed.local_addr().unwrap();
    drop(closed);
    let err = BrokerApi::new(&format!("http://{gone}"), "guest", "guest")
        .check()
        .await
        .unwrap_err();
    assert!(matches!(err, BrokerError::Unreachable { .. }), "{err}");
    assert!(err.is_transient());
}
