//! The operator as a process: the controllers of every kind wired to the cluster (the
//! broker-side kinds also watch Instances, so an Instance turning ready wakes its objects), and
//! an HTTP listener with `/metrics` (see [`crate::metrics`]), `/healthz` and `/readyz`.

use crate::controller::broker_resources::{self, BrokerResource, Context};
use crate::controller::instance::{self, InstanceContext};
use crate::crd::{Binding, Exchange, Instance, Queue, Vhost};
use crate::metrics::ErrorKind;
pub use crate::metrics::OperatorMetrics;
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
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

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

/// The `error` label of a controller error: the reconciler's own kind of error (`kube`,
/// `finalizer`, the broker's reason), or what went wrong around the reconciler.
pub fn error_kind<E: ErrorKind, Q>(e: &ControllerError<E, Q>) -> &'static str {
    match e {
        ControllerError::ReconcilerFailed(e, _) => e.kind(),
        ControllerError::ObjectNotFound(_) => "object_not_found",
        ControllerError::QueueError(_) => "watch",
        ControllerError::RunnerError(_) => "runner",
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
    let controller = Controller::new(Api::<K>::all(client.clone()), watcher::Config::default());
    // An object waits for its Instance (missing, or brokers not ready) with a growing backoff;
    // the Instance becoming ready wakes it at once. The controller's own cache says which
    // objects name the Instance.
    let objects = controller.store();
    let on_instance = ctx.clone();
    controller
        .watches(
            Api::<Instance>::all(client.clone()),
            watcher::Config::default(),
            move |instance| {
                broker_resources::on_instance_change(&on_instance, &instance, &objects.state())
            },
        )
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
            metrics.record(&kind, error);
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
    let ctx = Arc::new(
        match &broker_url {
            Some(url) => Context::with_broker_url(client.clone(), url),
            None => Context::new(client.clone()),
        }
        .with_metrics(metrics.clone()),
    );
    let instance_ctx = Arc::new(InstanceContext {
        client: client.clone(),
        defaults,
        autoscaler,
        brokers: Some(ctx.clone()),
        recorder: Some(kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: "warren-operator".into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        )),
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
        m.record("Instance", error);
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
