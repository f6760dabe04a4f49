//! Request shapes of the broker-side controllers against a mocked Kubernetes API server
//! (tower-test): the finalizer is added before anything else, status is written to the status
//! subresource with the `Ready` condition, and deletion honours each deletion policy before the
//! finalizer goes. One scenario reaches a real broker through the Instance's Secret. Failures
//! back off longer each time, per object, until a success or the Instance becoming ready.

mod common;

use common::Broker;
use common::k8s::{ApiServer, answer, mocked, next, not_found};
use http::{Method, StatusCode};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use warren_operator::controller::broker_resources::{
    Context, FINALIZER, objects_of_instance, on_instance_change, reconcile,
};
use warren_operator::crd::{Instance, Queue};

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

/// Runs one reconcile of `q` whose Instance does not exist; returns the requeue it asked for.
async fn reconcile_without_instance(
    server: &mut ApiServer,
    ctx: &Arc<Context>,
    q: &Arc<Queue>,
) -> kube::runtime::controller::Action {
    let run = tokio::spawn(reconcile(q.clone(), ctx.clone()));
    let (seen, send) = next(server).await;
    assert_eq!(
        (seen.method, seen.path.as_str()),
        (Method::GET, INSTANCE_PATH)
    );
    answer(send, StatusCode::NOT_FOUND, not_found());
    let (seen, send) = next(server).await;
    assert_eq!(seen.path, format!("{QUEUE_PATH}/status"));
    answer(
        send,
        StatusCode::OK,
        serde_json::to_value(q.as_ref()).unwrap(),
    );
    run.await.unwrap().unwrap()
}

fn requeue(secs: u64) -> kube::runtime::controller::Action {
    kube::runtime::controller::Action::requeue(Duration::from_secs(secs))
}

/// An Instance `name` in `namespace`, its `Ready` condition `ready`.
fn instance(namespace: &str, name: &str, ready: bool) -> Instance {
    serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Instance",
        "metadata": {"name": name, "namespace": namespace, "uid": "i-1"},
        "spec": {},
        "status": {"conditions": [{
            "type": "Ready", "status": if ready { "True" } else { "False" },
            "reason": "x", "message": "", "lastTransitionTime": "2026-11-25T00:00:00Z",
        }]},
    }))
    .unwrap()
}

#[tokio::test]
async fn failures_back_off_longer_each_time_and_a_success_starts_over() {
    let broker = Broker::start().await;
    let (client, mut server) = mocked();
    let url = format!("http://{}", broker.management_addr());
    let ctx = Arc::new(Context::with_broker_url(client, &url));
    let q = Arc::new(queue(&[FINALIZER], false, "delete"));
    // Each failure doubles the wait: 5 s, 10 s, 20 s.
    for secs in [5, 10, 20] {
        assert_eq!(
            reconcile_without_instance(&mut server, &ctx, &q).await,
            requeue(secs)
        );
    }
    // Another object's failures are its own.
    let mut other = queue(&[FINALIZER], false, "delete");
    other.metadata.name = Some("other".into());
    let run = tokio::spawn(reconcile(Arc::new(other.clone()), ctx.clone()));
    let (_, send) = next(&mut server).await;
    answer(send, StatusCode::NOT_FOUND, not_found());
    let (seen, send) = next(&mut server).await;
    assert!(seen.path.ends_with("/queues/other/status"), "{}", seen.path);
    answer(send, StatusCode::OK, serde_json::to_value(&other).unwrap());
    assert_eq!(run.await.unwrap().unwrap(), requeue(5));
    // A success: the periodic resync, and the count starts over.
    let run = tokio::spawn(reconcile(q.clone(), ctx.clone()));
    serve_instance_and_secret(&mut server).await;
    let (seen, send) = next(&mut server).await;
    assert_eq!(seen.body["status"]["conditions"][0]["status"], "True");
    answer(
        send,
        StatusCode::OK,
        serde_json::to_value(q.as_ref()).unwrap(),
    );
    assert_eq!(run.await.unwrap().unwrap(), requeue(600));
    assert_eq!(
        reconcile_without_instance(&mut server, &ctx, &q).await,
        requeue(5)
    );
    assert_eq!(
        reconcile_without_instance(&mut server, &ctx, &q).await,
        requeue(10)
    );
    // Every reconcile that left the queue not Ready was counted with its reason.
    let page = String::from_utf8(ctx.metrics.render()).unwrap();
    let line =
        "warren_operator_resource_not_ready_total{kind=\"Queue\",reason=\"InstanceMissing\"} 6";
    assert!(page.contains(line), "missing {line} in\n{page}");
}

#[tokio::test]
async fn an_instance_becoming_ready_wakes_its_objects_with_a_fresh_backoff() {
    let (client, mut server) = mocked();
    let ctx = Arc::new(Context::new(client));
    let q = Arc::new(queue(&[FINALIZER], false, "delete"));
    for secs in [5, 10, 20, 40] {
        assert_eq!(
            reconcile_without_instance(&mut server, &ctx, &q).await,
            requeue(secs)
        );
    }
    let mut elsewhere = queue(&[FINALIZER], false, "delete");
    elsewhere.metadata.namespace = Some("other".into());
    let mut of_another = queue(&[FINALIZER], false, "delete");
    of_another.metadata.name = Some("audit".into());
    of_another.spec.instance_ref.name = "legacy".into();
    let objects = [q.clone(), Arc::new(elsewhere), Arc::new(of_another)];
    // Not ready yet: nothing to wake, and the backoff stays.
    assert!(objects_of_instance(&instance("shop", "demo", false), &objects).is_empty());
    assert!(on_instance_change(&ctx, &instance("shop", "demo", false), &objects).is_empty());
    assert_eq!(
        reconcile_without_instance(&mut server, &ctx, &q).await,
        requeue(80)
    );
    // Ready: exactly the objects in its namespace that name it, each starting over.
    let woken = on_instance_change(&ctx, &instance("shop", "demo", true), &objects);
    let names: Vec<_> = woken
        .iter()
        .map(|r| (r.namespace.as_deref(), r.name.as_str()))
        .collect();
    assert_eq!(names, [(Some("shop"), "orders")]);
    assert_eq!(
        reconcile_without_instance(&mut server, &ctx, &q).await,
        requeue(5)
    );
}
