//! Request shapes of the broker-side controllers against a mocked Kubernetes API server
//! (tower-test): the finalizer is added before anything else, status is written to the status
//! subresource with the `Ready` condition, and deletion honours each deletion policy before the
//! finalizer goes. One scenario reaches a real broker through the Instance's Secret.

mod common;

use common::Broker;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use tower_test::mock::{self, Handle};
use warren_operator::controller::broker_resources::{Context, FINALIZER, reconcile};
use warren_operator::crd::Queue;

type ApiServer = Handle<Request<Body>, Response<Body>>;

fn mocked() -> (Client, ApiServer) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(service, "default"), handle)
}

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

/// The next request: its method, path and JSON body (null when none), and a way to answer.
async fn next(
    server: &mut ApiServer,
) -> (Method, String, Value, mock::SendResponse<Response<Body>>) {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), server.next_request())
        .await
        .expect("a request within 5 s")
        .expect("the client is alive");
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (method, path, body, send)
}

fn answer(send: mock::SendResponse<Response<Body>>, status: StatusCode, body: Value) {
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&body).unwrap()))
            .unwrap(),
    );
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": "not found", "reason": "NotFound", "code": 404})
}

const QUEUE_PATH: &str = "/apis/warren.dev/v1alpha1/namespaces/shop/queues/orders";
const INSTANCE_PATH: &str = "/apis/warren.dev/v1alpha1/namespaces/shop/instances/demo";

#[tokio::test]
async fn the_finalizer_is_added_before_anything_is_declared() {
    let (client, mut server) = mocked();
    let ctx = Arc::new(Context::new(client));
    let q = Arc::new(queue(&[], false, "delete"));
    let run = tokio::spawn(reconcile(q.clone(), ctx));
    let (method, path, body, send) = next(&mut server).await;
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
    let (method, path, _, send) = next(&mut server).await;
    assert_eq!((method, path.as_str()), (Method::GET, INSTANCE_PATH));
    answer(send, StatusCode::NOT_FOUND, not_found());
    let (method, path, body, send) = next(&mut server).await;
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
    let (method, path, body, send) = next(&mut server).await;
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
    let (method, path, _, send) = next(server).await;
    assert_eq!((method, path.as_str()), (Method::GET, INSTANCE_PATH));
    answer(
        send,
        StatusCode::OK,
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Instance",
               "metadata": {"name": "demo", "namespace": "shop", "uid": "i-1"}, "spec": {}}),
    );
    let (method, path, _, send) = next(server).await;
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
    let (method, path, body, send) = next(&mut server).await;
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
    let (method, path, body, send) = next(&mut server).await;
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
