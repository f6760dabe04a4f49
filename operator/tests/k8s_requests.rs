//! Request shapes of the broker-side controllers against a mocked Kubernetes API server
//! (tower-test): the finalizer is added before anything else, status is written to the status
//! subresource with the `Ready` condition, and deletion honours each deletion policy before the
//! finalizer goes. One scenario reaches a real broker through the Instance's Secret.

mod common;

use common::Broker;
use common::k8s::{ApiServer, answer, mocked, next, not_found};
use http::{Method, StatusCode};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use warren_operator::controller::broker_resources::{Context, FINALIZER, reconcile};
use warren_operator::crd::Queue;

/// A Queue as the API server would return it.
fn queue(finalizers: &[&str], deleting: bool, policy: &str) -> Queue {
    let mut meta = json!({
        "name": "orders", "namespace": "shop", "uid": "u-1", "generation": 2,
        "resourceVersion": "7",
    });
    if !finalizers.is_empty() {
        meta["finalizers"] = json!(finalizers);
    }
    if deleting {
        meta["deletionTimestamp"] = json!("2026-11-25T00:00:00Z");
    }
    serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Queue", "metadata": meta,
        "spec": {
            "instanceRef": {"name": "demo"}, "vhost": "/", "name": "orders",
            "arguments": {"x-max-length": 10}, "deletionPolicy": policy,
        },
    }))
    .unwrap()
}

const QUEUE_PATH: &str = "/apis/warren.dev/v1alpha1/namespaces/shop/queues/orders";
const INSTANCE_PATH: &str = "/apis/warren.dev/v1alpha1/namespaces/shop/instances/demo";

#[tokio::test]
async fn the_finalizer_is_added_before_anything_is_declared() {
    let (client, mut server) = mocked();
    let ctx = Arc::new(Context::new(client));
    let q = Arc::new(queue(&[], false, "delete"));
    let run = tokio::spawn(reconcile(q.clone(), ctx));
    let (seen, send) = next(&mut server).await;
    let (method, path, body) = (seen.method, seen.path, seen.body);
    assert_eq!((method, path.as_str()), (Method::PATCH, QUEUE_PATH));
    // A JSON patch that adds exactly our finalizer, guarded by a test of the current list.
    let ops = body.as_array().unwrap();
    assert_eq!(ops[0]["op"], "test");
    assert_eq!(ops[1]["op"], "add");
    assert_eq!(ops[1]["path"], "/metadata/finalizers");
    assert_eq!(ops[1]["value"], json!([FINALIZER]));
    answer(
        send,
        StatusCode::OK,
        serde_json::to_value(queue(&[FINALIZER], false, "delete")).unwrap(),
    );
    let action = run.await.unwrap().unwrap();
    assert_eq!(action, kube::runtime::controller::Action::await_change());
}

#[tokio::test]
async fn without_its_instance_a_queue_is_not_ready_and_says_so() {
    let (client, mut server) = mocked();
    let ctx = Arc::new(Context::new(client));
    let q = Arc::new(queue(&[FINALIZER], false, "delete"));
    let run = tokio::spawn(reconcile(q, ctx));
    let (seen, send) = next(&mut server).await;
    let (method, path) = (seen.method, seen.path);
    assert_eq!((method, path.as_str()), (Method::GET, INSTANCE_PATH));
    answer(send, StatusCode::NOT_FOUND, not_found());
    let (seen, send) = next(&mut server).await;
    let (method, path, body) = (seen.method, seen.path, seen.body);
    assert_eq!(method, Method::PATCH);
    assert_eq!(path, format!("{QUEUE_PATH}/status"));
    let ready = &body["status"]["conditions"][0];
    assert_eq!(ready["type"], "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InstanceMissing");
    assert_eq!(ready["observedGeneration"], 2);
    assert_eq!(body["status"]["observedGeneration"], 2);
    answer(
        send,
        StatusCode::OK,
        serde_json::to_value(queue(&[FINALIZER], false, "delete")).unwrap(),
    );
    let action = run.await.unwrap().unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(5))
    );
}

#[tokio::test]
async fn a_retained_queue_lets_go_of_its_finalizer_without_touching_the_broker() {
    let (client, mut server) = mocked();
    let ctx = Arc::new(Context::new(client));
    let q = Arc::new(queue(&["other", FINALIZER], true, "retain"));
    let run = tokio::spawn(reconcile(q, ctx));
    // No lookup of the Instance: straight to removing our finalizer (index 1), guarded.
    let (seen, send) = next(&mut server).await;
    let (method, path, body) = (seen.method, seen.path, seen.body);
    assert_eq!((method, path.as_str()), (Method::PATCH, QUEUE_PATH));
    assert_eq!(
        body,
        json!([
            {"op": "test", "path": "/metadata/finalizers/1", "value": FINALIZER},
            {"op": "remove", "path": "/metadata/finalizers/1"},
        ])
    );
    answer(
        send,
        StatusCode::OK,
        serde_json::to_value(queue(&["other"], true, "retain")).unwrap(),
    );
    run.await.unwrap().unwrap();
}

/// Answers the Instance and Secret lookups so the controller reaches `broker`.
async fn serve_instance_and_secret(server: &mut ApiServer) {
    let (seen, send) = next(server).await;
    let (method, path) = (seen.method, seen.path);
    assert_eq!((method, path.as_str()), (Method::GET, INSTANCE_PATH));
    answer(
        send,
        StatusCode::OK,
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Instance",
               "metadata": {"name": "demo", "namespace": "shop", "uid": "i-1"}, "spec": {}}),
    );
    let (seen, send) = next(server).await;
    let (method, path) = (seen.method, seen.path);
    assert_eq!(
        (method, path.as_str()),
        (
            Method::GET,
            "/api/v1/namespaces/shop/secrets/demo-default-user"
        )
    );
    // guest/guest, base64 as the API server sends Secret data.
    answer(
        send,
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "demo-default-user", "namespace": "shop"},
               "data": {"username": "Z3Vlc3Q=", "password": "Z3Vlc3Q="}}),
    );
}

#[tokio::test]
async fn a_queue_is_declared_in_the_instances_broker_then_deleted_with_its_resource() {
    let broker = Broker::start().await;
    let (client, mut server) = mocked();
    let url = format!("http://{}", broker.management_addr());
    let ctx = Arc::new(Context::with_broker_url(client, &url));
    let q = Arc::new(queue(&[FINALIZER], false, "delete"));
    let run = tokio::spawn(reconcile(q, ctx.clone()));
    serve_instance_and_secret(&mut server).await;
    let (seen, send) = next(&mut server).await;
    let (method, path, body) = (seen.method, seen.path, seen.body);
    assert_eq!(
        (method, path),
        (Method::PATCH, format!("{QUEUE_PATH}/status"))
    );
    let ready = &body["status"]["conditions"][0];
    assert_eq!(
        (ready["status"].as_str(), ready["reason"].as_str()),
        (Some("True"), Some("Declared"))
    );
    answer(
        send,
        StatusCode::OK,
        serde_json::to_value(queue(&[FINALIZER], false, "delete")).unwrap(),
    );
    let action = run.await.unwrap().unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(600))
    );
    let (status, got) = broker.get("/api/queues/%2F/orders").await;
    assert_eq!(status, 200);
    assert_eq!(got["arguments"], json!({"x-max-length": 10}));
    // Deleted with policy delete: gone from the broker, then the finalizer goes.
    let run = tokio::spawn(reconcile(
        Arc::new(queue(&[FINALIZER], true, "delete")),
        ctx,
    ));
    serve_instance_and_secret(&mut server).await;
    let (seen, send) = next(&mut server).await;
    let (method, path, body) = (seen.method, seen.path, seen.body);
    assert_eq!((method, path.as_str()), (Method::PATCH, QUEUE_PATH));
    assert_eq!(
        body[1],
        json!({"op": "remove", "path": "/metadata/finalizers/0"})
    );
    assert_eq!(
        broker.get("/api/queues/%2F/orders").await.0,
        404,
        "deleted before the finalizer went"
    );
    answer(
        send,
        StatusCode::OK,
        serde_json::to_value(queue(&[], true, "delete")).unwrap(),
    );
    run.await.unwrap().unwrap();
}
