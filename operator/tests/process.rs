//! The operator as a process: its probes and metrics (errors labelled by their own kind), and a
//! clear failure without a cluster.

use kube::runtime::controller::Error as ControllerError;
use kube::runtime::finalizer::Error as FinalizerError;
use kube::runtime::reflector::ObjectRef;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use warren_operator::broker_api::BrokerError;
use warren_operator::controller::{broker_resources, instance};
use warren_operator::crd::Queue;
use warren_operator::process::{OperatorMetrics, error_kind, probe_router};

#[tokio::test]
async fn probes_and_metrics_answer_and_readiness_waits_for_the_controllers() {
    let metrics = Arc::new(OperatorMetrics::default());
    let (ready_tx, ready_rx) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server =
        tokio::spawn(axum::serve(listener, probe_router(metrics.clone(), ready_rx)).into_future());
    let get = |path: &str| reqwest::get(format!("http://{addr}{path}"));
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 503);
    ready_tx.send(true).unwrap();
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    metrics.record("Queue", None);
    metrics.record("Queue", Some("BrokerUnreachable"));
    metrics.not_ready("Queue", "BrokerRefused");
    metrics.not_ready("Queue", "BrokerRefused");
    metrics.record("Instance", None);
    metrics.observe_duration("Queue", Duration::from_millis(3));
    metrics.observe_duration("Queue", Duration::from_millis(200));
    metrics.observe_duration("Queue", Duration::from_secs(60));
    metrics.observe_duration("Instance", Duration::from_millis(40));
    let page = get("/metrics").await.unwrap().text().await.unwrap();
    assert!(
        page.contains("warren_operator_reconciliations_total{kind=\"Queue\"} 2"),
        "{page}"
    );
    assert!(
        page.contains(
            "warren_operator_reconcile_errors_total{error=\"BrokerUnreachable\",kind=\"Queue\"} 1"
        ),
        "{page}"
    );
    assert!(
        page.contains(
            "warren_operator_resource_not_ready_total{kind=\"Queue\",reason=\"BrokerRefused\"} 2"
        ),
        "{page}"
    );
    assert!(page.contains("# TYPE warren_operator_reconciliations_total counter"));
    assert!(
        page.contains("# TYPE warren_operator_reconcile_duration_seconds histogram"),
        "{page}"
    );
    for line in [
        "warren_operator_reconcile_duration_seconds_count{kind=\"Queue\"} 3",
        "warren_operator_reconcile_duration_seconds_count{kind=\"Instance\"} 1",
        // Cumulative buckets: 3 ms falls in the first, 200 ms by 0.25 s, 60 s only in +Inf.
        "warren_operator_reconcile_duration_seconds_bucket{kind=\"Queue\",le=\"0.005\"} 1",
        "warren_operator_reconcile_duration_seconds_bucket{kind=\"Queue\",le=\"0.25\"} 2",
        "warren_operator_reconcile_duration_seconds_bucket{kind=\"Queue\",le=\"30\"} 2",
        "warren_operator_reconcile_duration_seconds_bucket{kind=\"Queue\",le=\"+Inf\"} 3",
        "warren_operator_reconcile_duration_seconds_sum{kind=\"Queue\"} 60.2",
    ] {
        assert!(page.contains(line), "missing {line} in\n{page}");
    }
    server.abort();
}

#[test]
fn without_a_cluster_run_fails_with_a_reason_not_a_panic() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_warren-operator"))
        .args(["run", "--metrics-listen", "127.0.0.1:0"])
        .env("HOME", home.path())
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the Kubernetes API"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn failed<E>(e: E) -> ControllerError<E, std::io::Error> {
    ControllerError::ReconcilerFailed(e, Box::new(ObjectRef::<Queue>::new("orders").erase()))
}

fn api_error(code: u16) -> kube::Error {
    kube::Error::Api(
        kube::core::Status::failure("boom", "InternalError")
            .with_code(code)
            .boxed(),
    )
}

#[test]
fn reconcile_errors_are_labelled_by_their_own_kind() {
    use broker_resources::Error;
    let unreachable = BrokerError::Unreachable {
        url: "http://demo.shop.svc:15672".into(),
        why: "connection refused".into(),
    };
    let refused = BrokerError::Refused {
        what: "queue 'orders'".into(),
        status: 400,
        reason: "inequivalent arg".into(),
    };
    let in_finalizer = |e: FinalizerError<Error>| failed(Error::Finalizer(Box::new(e)));
    // What failed inside the finalizer's frame, not the frame.
    assert_eq!(
        error_kind(&in_finalizer(FinalizerError::ApplyFailed(Error::Kube(
            api_error(500)
        )))),
        "kube"
    );
    assert_eq!(
        error_kind(&in_finalizer(FinalizerError::CleanupFailed(Error::Broker(
            unreachable
        )))),
        "BrokerUnreachable"
    );
    assert_eq!(
        error_kind(&in_finalizer(FinalizerError::CleanupFailed(Error::Broker(
            refused
        )))),
        "BrokerRefused"
    );
    assert_eq!(
        error_kind(&in_finalizer(FinalizerError::AddFinalizer(api_error(409)))),
        "finalizer"
    );
    assert_eq!(
        error_kind(&in_finalizer(FinalizerError::RemoveFinalizer(api_error(
            409
        )))),
        "finalizer"
    );
    assert_eq!(
        error_kind(&failed(instance::Error::Kube(api_error(500)))),
        "kube"
    );
    assert_eq!(
        error_kind(&ControllerError::<instance::Error, _>::QueueError(
            std::io::Error::other("watch ended")
        )),
        "watch"
    );
}
