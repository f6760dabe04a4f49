//! The operator as a process: the controllers of every kind wired to the cluster, and an HTTP
//! listener with `/metrics` (reconciliations, errors and reconcile durations by kind),
//! `/healthz` and `/readyz`.

use crate::controller::broker_resources::{self, BrokerResource, Context};
use crate::controller::instance::{self, InstanceContext};
use crate::crd::{Binding, Exchange, Instance, Queue, Vhost};
use crate::resources::Defaults;
use crate::scaling::autoscaler::Autoscaler;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::{Controller, Error as ControllerError};
use kube::runtime::watcher;
use kube::{Api, Client};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The operator's own metrics.
#[derive(Debug, Clone)]
pub struct OperatorMetrics {
    registry: Registry,
    reconciliations: IntCounterVec,
    failures: IntCounterVec,
    durations: HistogramVec,
}

/// Upper bounds, in seconds, of the reconcile duration buckets: from a reconcile that finds
/// nothing to do (a few milliseconds) to one that waits on a slow API server or broker.
const RECONCILE_DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Default for OperatorMetrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "warren_operator_reconciliations_total",
                "Reconciliations run, by kind",
            ),
            &["kind"],
        )
        .expect("a valid metric");
        let failures = IntCounterVec::new(
            Opts::new(
                "warren_operator_reconcile_errors_total",
                "Reconciliations that failed, by kind and error",
            ),
            &["kind", "error"],
        )
        .expect("a valid metric");
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "warren_operator_reconcile_duration_seconds",
                "Time taken by one call of the reconcile function, by kind",
            )
            .buckets(RECONCILE_DURATION_BUCKETS.to_vec()),
            &["kind"],
        )
        .expect("a valid metric");
        registry
            .register(Box::new(reconciliations.clone()))
            .expect("registered once");
        registry
            .register(Box::new(failures.clone()))
            .expect("registered once");
        registry
            .register(Box::new(durations.clone()))
            .expect("registered once");
        Self {
            registry,
            reconciliations,
            failures,
            durations,
        }
    }
}

impl OperatorMetrics {
    /// Counts one reconciliation of `kind`, failed with `error` when given.
    pub fn record(&self, kind: &str, error: Option<&str>) {
        self.reconciliations.with_label_values(&[kind]).inc();
        if let Some(e) = error {
            self.failures.with_label_values(&[kind, e]).inc();
        }
    }

    /// Records that one call of the reconcile function of `kind` took `elapsed`.
    pub fn observe_duration(&self, kind: &str, elapsed: Duration) {
        self.durations
            .with_label_values(&[kind])
            .observe(elapsed.as_secs_f64());
    }

    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of metrics");
        out
    }
}

#[derive(Clone)]
struct ProbeState {
    metrics: Arc<OperatorMetrics>,
    ready: watch::Receiver<bool>,
}

/// `/metrics`, `/healthz` (the process answers) and `/readyz` (200 once `ready` is set: the
/// process reaches the cluster and leads or stands by).
pub fn probe_router(metrics: Arc<OperatorMetrics>, ready: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(ProbeState { metrics, ready })
}

async fn metrics_page(State(s): State<ProbeState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(s): State<ProbeState>) -> Response {
    if *s.ready.borrow() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
}

/// The label of a controller error.
fn error_kind<E: std::fmt::Display, Q>(e: &ControllerError<E, Q>) -> String {
    match e {
        ControllerError::ObjectNotFound(_) => "object_not_found".into(),
        ControllerError::ReconcilerFailed(_, _) => "reconcile".into(),
        ControllerError::QueueError(_) => "watch".into(),
        ControllerError::RunnerError(_) => "runner".into(),
    }
}

/// Runs `reconcile` and records how long it took under `kind`. A reconcile cancelled before it
/// finishes (at shutdown) is not recorded.
async fn timed<F: Future>(
    metrics: Arc<OperatorMetrics>,
    kind: Arc<str>,
    reconcile: F,
) -> F::Output {
    let started = Instant::now();
    let result = reconcile.await;
    metrics.observe_duration(&kind, started.elapsed());
    result
}

fn broker_controller<K: BrokerResource>(
    client: &Client,
    ctx: Arc<Context>,
    metrics: Arc<OperatorMetrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> impl Future<Output = ()> + Send {
    let kind: Arc<str> = K::kind(&()).into();
    let timing = (metrics.clone(), kind.clone());
    Controller::new(Api::<K>::all(client.clone()), watcher::Config::default())
        .graceful_shutdown_on(shutdown)
        .run(
            move |obj, ctx| {
                let (metrics, kind) = timing.clone();
                timed(metrics, kind, broker_resources::reconcile::<K>(obj, ctx))
            },
            broker_resources::error_policy::<K>,
            ctx,
        )
        .for_each(move |result| {
            let error = result.as_ref().err().map(error_kind);
            metrics.record(&kind, error.as_deref());
            async {}
        })
}

/// Runs every controller until `shutdown` resolves.
pub async fn run_controllers(
    client: Client,
    defaults: Defaults,
    broker_url: Option<String>,
    autoscaler: Autoscaler,
    metrics: Arc<OperatorMetrics>,
    shutdown: watch::Receiver<bool>,
) {
    let stop = move || {
        let mut rx = shutdown.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let ctx = Arc::new(match &broker_url {
        Some(url) => Context::with_broker_url(client.clone(), url),
        None => Context::new(client.clone()),
    });
    let instance_ctx = Arc::new(InstanceContext {
        client: client.clone(),
        defaults,
        autoscaler,
    });
    let m = metrics.clone();
    let timing = (metrics.clone(), Arc::<str>::from("Instance"));
    let instances = Controller::new(
        Api::<Instance>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<StatefulSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<ConfigMap>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<PodDisruptionBudget>::all(client.clone()),
        watcher::Config::default(),
    )
    .graceful_shutdown_on(stop())
    .run(
        move |obj, ctx| {
            let (metrics, kind) = timing.clone();
            timed(metrics, kind, instance::reconcile(obj, ctx))
        },
        instance::error_policy,
        instance_ctx,
    )
    .for_each(move |result| {
        let error = result.as_ref().err().map(error_kind);
        m.record("Instance", error.as_deref());
        async {}
    });
    tokio::join!(
        instances,
        broker_controller::<Vhost>(&client, ctx.clone(), metrics.clone(), stop()),
        broker_controller::<Queue>(&client, ctx.clone(), metrics.clone(), stop()),
        broker_controller::<Exchange>(&client, ctx.clone(), metrics.clone(), stop()),
        broker_controller::<Binding>(&client, ctx, metrics, stop()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn timed_passes_the_result_through_and_records_failures_too() {
        let metrics = Arc::new(OperatorMetrics::default());
        let ok = timed(metrics.clone(), "Queue".into(), async { Ok::<u8, &str>(7) }).await;
        let err = timed(metrics.clone(), "Queue".into(), async {
            Err::<u8, &str>("down")
        })
        .await;
        assert_eq!((ok, err), (Ok(7), Err("down")));
        let page = String::from_utf8(metrics.render()).unwrap();
        assert!(
            page.contains("warren_operator_reconcile_duration_seconds_count{kind=\"Queue\"} 2"),
            "{page}"
        );
    }
}
