//! The generic reconciler of broker-side kinds against a real broker: a declaration makes the
//! object Ready, a refusal says why and backs off, a missing Instance waits, and deletion
//! honours `deletionPolicy`.

mod common;

use common::Broker;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use std::time::Duration;
use warren_operator::controller::broker_object::{finalize, reconcile};
use warren_operator::crd::common::{DeletionPolicy, InstanceRef};
use warren_operator::crd::queue::{QueueSpec, QueueType};
use warren_operator::crd::vhost::VhostSpec;

fn now() -> Time {
    Time(Timestamp::now())
}

fn queue(name: &str, max_length: i64, policy: DeletionPolicy) -> QueueSpec {
    QueueSpec {
        instance_ref: InstanceRef {
            name: "demo".into(),
        },
        vhost: "/".into(),
        name: name.into(),
        queue_type: QueueType::Classic,
        durable: true,
        auto_delete: false,
        arguments: [("x-max-length".to_owned(), json!(max_length))].into(),
        deletion_policy: policy,
    }
}

#[tokio::test]
async fn a_declared_queue_is_ready_and_a_conflicting_one_says_why() {
    let b = Broker::start().await;
    let api = b.api();
    let q = queue("orders", 10, DeletionPolicy::Delete);
    let out = reconcile(&q, Some(&api), Some(1), 0, &now()).await;
    assert_eq!(out.ready.status, "True", "{:?}", out.ready);
    assert_eq!(out.ready.reason, "Declared");
    assert_eq!(out.ready.observed_generation, Some(1));
    assert_eq!(out.retry_after, None);
    assert_eq!(b.get("/api/queues/%2F/orders").await.0, 200);
    // The same queue declared elsewhere with other arguments: the broker refuses, and only a
    // change of the spec can help, so the retry is slow.
    let other = queue("orders", 20, DeletionPolicy::Delete);
    let out = reconcile(&other, Some(&api), Some(2), 0, &now()).await;
    assert_eq!(out.ready.status, "False");
    assert_eq!(out.ready.reason, "BrokerRefused");
    assert!(
        out.ready.message.contains("inequivalent arg"),
        "{}",
        out.ready.message
    );
    assert_eq!(out.retry_after, Some(Duration::from_secs(300)));
}

#[tokio::test]
async fn objects_wait_for_their_instance_and_their_vhost() {
    let b = Broker::start().await;
    let api = b.api();
    let q = queue("q", 1, DeletionPolicy::Delete);
    let out = reconcile(&q, None, Some(1), 0, &now()).await;
    assert_eq!(out.ready.reason, "InstanceMissing");
    assert!(
        out.ready.message.contains("'demo'"),
        "{}",
        out.ready.message
    );
    assert_eq!(out.retry_after, Some(Duration::from_secs(5)));
    // A queue in a vhost that no Vhost resource has made yet: retried with a growing delay,
    // and Ready once the vhost exists.
    let in_orders = QueueSpec {
        vhost: "orders".into(),
        ..q.clone()
    };
    let out = reconcile(&in_orders, Some(&api), Some(1), 3, &now()).await;
    assert_eq!(out.ready.reason, "BrokerObjectMissing");
    assert_eq!(out.retry_after, Some(Duration::from_secs(40)));
    let vhost = VhostSpec {
        instance_ref: q.instance_ref.clone(),
        name: "orders".into(),
        limits: None,
        deletion_policy: DeletionPolicy::Retain,
    };
    assert_eq!(
        reconcile(&vhost, Some(&api), Some(1), 0, &now())
            .await
            .ready
            .status,
        "True"
    );
    assert_eq!(
        reconcile(&in_orders, Some(&api), Some(1), 4, &now())
            .await
            .ready
            .status,
        "True"
    );
    assert_eq!(b.get("/api/queues/orders/q").await.0, 200);
}

#[tokio::test]
async fn deletion_honours_the_deletion_policy() {
    let b = Broker::start().await;
    let api = b.api();
    let kept = queue("kept", 1, DeletionPolicy::Retain);
    let gone = queue("gone", 1, DeletionPolicy::Delete);
    for q in [&kept, &gone] {
        assert_eq!(
            reconcile(q, Some(&api), None, 0, &now()).await.ready.status,
            "True"
        );
    }
    finalize(&kept, Some(&api)).await.unwrap();
    finalize(&gone, Some(&api)).await.unwrap();
    assert_eq!(b.get("/api/queues/%2F/kept").await.0, 200);
    assert_eq!(b.get("/api/queues/%2F/gone").await.0, 404);
    // Deleting again, or without an Instance left, lets the finalizer go.
    finalize(&gone, Some(&api)).await.unwrap();
    finalize(&gone, None).await.unwrap();
}
