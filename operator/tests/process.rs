//! The operator as a process: its probes and metrics, and a clear failure without a cluster.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use warren_operator::process::{OperatorMetrics, probe_router};

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
    metrics.record("Queue", Some("reconcile"));
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
            "warren_operator_reconcile_errors_total{error=\"reconcile\",kind=\"Queue\"} 1"
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
