//! Request shapes of the Instance controller against a mocked Kubernetes API server: the
//! default-user Secret is created only when absent, the owned objects are applied with
//! server-side apply under the operator's field manager, and the status follows the
//! StatefulSet; a config the brokers would refuse is reported and nothing is applied.

mod common;

use common::k8s::{ApiServer, Seen, answer, mocked, next};
use http::{Method, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;
use warren_operator::controller::instance::{FIELD_MANAGER, InstanceContext, reconcile};
use warren_operator::crd::Instance;
use warren_operator::resources::Defaults;

fn instance(spec: Value) -> Instance {
    serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1", "kind": "Instance",
        "metadata": {"name": "demo", "namespace": "shop", "uid": "i-1", "generation": 4},
        "spec": spec,
    }))
    .unwrap()
}

fn context() -> (Arc<InstanceContext>, ApiServer) {
    let (client, handle) = mocked();
    let ctx = InstanceContext::new(
        client,
        Defaults {
            broker_image: "warren-broker:test".into(),
        },
    );
    (Arc::new(ctx), handle)
}

const SECRET: &str = "/api/v1/namespaces/shop/secrets/demo-default-user";
const CLUSTER_SECRET: &str = "/api/v1/namespaces/shop/secrets/demo-cluster-secret";

/// Answers the lookup of the cluster secret as existing: nothing is created.
async fn cluster_secret_exists(server: &mut ApiServer) {
    let (s, send) = next(server).await;
    assert_eq!((&s.method, s.path.as_str()), (&Method::GET, CLUSTER_SECRET));
    answer(
        send,
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-cluster-secret", "namespace": "shop"}, "data": {"secret": "Yw=="}}),
    );
}

/// Answers the server-side applies of the owned objects, in order, echoing each back (with a
/// StatefulSet status of `ready` ready brokers of `replicas`).
async fn serve_applies(server: &mut ApiServer, replicas: i32, ready: i32) -> Vec<Seen> {
    let mut seen = Vec::new();
    for path in [
        "/api/v1/namespaces/shop/configmaps/demo-config",
        "/api/v1/namespaces/shop/services/demo-nodes",
        "/api/v1/namespaces/shop/services/demo",
        "/apis/apps/v1/namespaces/shop/statefulsets/demo",
        "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/demo",
    ] {
        let (s, send) = next(server).await;
        assert_eq!((&s.method, s.path.as_str()), (&Method::PATCH, path));
        assert!(
            s.query.contains(&format!("fieldManager={FIELD_MANAGER}")),
            "{}",
            s.query
        );
        assert!(s.query.contains("force=true"), "{}", s.query);
        let mut echo = s.body.clone();
        if path.contains("statefulsets") {
            echo["status"] = json!({"replicas": replicas, "readyReplicas": ready});
        }
        answer(send, StatusCode::OK, echo);
        seen.push(s);
    }
    seen
}

#[tokio::test]
async fn a_new_instance_gets_its_secret_objects_and_a_status() {
    let (ctx, mut server) = context();
    let obj = Arc::new(instance(json!({"replicas": 3})));
    let run = tokio::spawn(reconcile(obj, ctx));
    let (s, send) = next(&mut server).await;
    assert_eq!((&s.method, s.path.as_str()), (&Method::GET, SECRET));
    answer(
        send,
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404}),
    );
    let (s, send) = next(&mut server).await;
    assert_eq!(
        (&s.method, s.path.as_str()),
        (&Method::POST, "/api/v1/namespaces/shop/secrets")
    );
    let password = s.body["stringData"]["password"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(password.len(), 32);
    assert_eq!(s.body["metadata"]["ownerReferences"][0]["kind"], "Instance");
    answer(send, StatusCode::CREATED, s.body.clone());
    // The brokers' shared secret: a Secret of its own, made once, never the default user's.
    let (s, send) = next(&mut server).await;
    assert_eq!((&s.method, s.path.as_str()), (&Method::GET, CLUSTER_SECRET));
    answer(
        send,
        StatusCode::NOT_FOUND,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "reason": "NotFound", "code": 404}),
    );
    let (s, send) = next(&mut server).await;
    assert_eq!(
        (&s.method, s.path.as_str()),
        (&Method::POST, "/api/v1/namespaces/shop/secrets")
    );
    assert_eq!(s.body["metadata"]["name"], "demo-cluster-secret");
    let cookie = s.body["stringData"]["secret"].as_str().unwrap().to_owned();
    assert_eq!(cookie.len(), 32);
    assert_ne!(cookie, password);
    assert_eq!(s.body["metadata"]["ownerReferences"][0]["kind"], "Instance");
    answer(send, StatusCode::CREATED, s.body.clone());
    let applied = serve_applies(&mut server, 1, 0).await;
    let sts = &applied[3].body;
    assert_eq!(sts["kind"], "StatefulSet");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(applied[0].body["kind"], "ConfigMap");
    let (s, send) = next(&mut server).await;
    assert_eq!(
        (&s.method, s.path.as_str()),
        (
            &Method::PATCH,
            "/apis/warren.dev/v1alpha1/namespaces/shop/instances/demo/status"
        )
    );
    let status = &s.body["status"];
    assert_eq!(status["observedGeneration"], 4);
    assert_eq!(status["desiredReplicas"], 3);
    assert_eq!(status["replicas"], 1);
    assert_eq!(status["connectionSecret"], "demo-default-user");
    assert_eq!(status["endpoints"]["amqp"], "amqp://demo.shop.svc:5672");
    assert_eq!(
        status["selector"],
        "app.kubernetes.io/component=broker,app.kubernetes.io/instance=demo,app.kubernetes.io/name=warren"
    );
    let by_type = |t: &str| {
        status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == t)
            .cloned()
            .unwrap()
    };
    assert_eq!(by_type("Reconciled")["status"], "True");
    assert_eq!(by_type("Ready")["reason"], "BrokersStarting");
    assert_eq!(by_type("Scaling")["reason"], "ScalingUp");
    answer(
        send,
        StatusCode::OK,
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Instance", "metadata": {"name": "demo", "namespace": "shop"}, "spec": {}}),
    );
    let action = run.await.unwrap().unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(10))
    );
}

#[tokio::test]
async fn an_existing_secret_is_never_overwritten_and_ready_brokers_make_it_ready() {
    let (ctx, mut server) = context();
    let obj = Arc::new(instance(json!({"replicas": 2})));
    let run = tokio::spawn(reconcile(obj, ctx));
    let (s, send) = next(&mut server).await;
    assert_eq!((&s.method, s.path.as_str()), (&Method::GET, SECRET));
    answer(
        send,
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-default-user", "namespace": "shop"}, "data": {"username": "dQ==", "password": "cA=="}}),
    );
    // No POST: straight to the applies.
    cluster_secret_exists(&mut server).await;
    serve_applies(&mut server, 2, 2).await;
    let (s, send) = next(&mut server).await;
    assert!(s.path.ends_with("/instances/demo/status"));
    let ready = s.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap();
    assert_eq!(ready["status"], "True");
    assert_eq!(ready["message"], "2 of 2 brokers ready");
    answer(
        send,
        StatusCode::OK,
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Instance", "metadata": {"name": "demo", "namespace": "shop"}, "spec": {}}),
    );
    let action = run.await.unwrap().unwrap();
    assert_eq!(
        action,
        kube::runtime::controller::Action::requeue(Duration::from_secs(300))
    );
}

#[tokio::test]
async fn a_config_the_brokers_would_refuse_is_reported_and_nothing_is_applied() {
    let (ctx, mut server) = context();
    let obj = Arc::new(instance(
        json!({"replicas": 1, "config": {"heartbeats": 30}}),
    ));
    let run = tokio::spawn(reconcile(obj, ctx));
    let (_, send) = next(&mut server).await;
    answer(
        send,
        StatusCode::OK,
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "demo-default-user", "namespace": "shop"}}),
    );
    cluster_secret_exists(&mut server).await;
    let (s, send) = next(&mut server).await;
    assert!(
        s.path.ends_with("/instances/demo/status"),
        "nothing applied first: {}",
        s.path
    );
    let reconciled = &s.body["status"]["conditions"][0];
    assert_eq!(reconciled["type"], "Reconciled");
    assert_eq!(reconciled["status"], "False");
    assert_eq!(reconciled["reason"], "InvalidConfig");
    assert!(
        reconciled["message"]
            .as_str()
            .unwrap()
            .contains("heartbeats"),
        "{reconciled}"
    );
    answer(
        send,
        StatusCode::OK,
        json!({"apiVersion": "warren.dev/v1alpha1", "kind": "Instance", "metadata": {"name": "demo", "namespace": "shop"}, "spec": {}}),
    );
    run.await.unwrap().unwrap();
}
