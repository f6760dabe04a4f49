//! The operator's own Prometheus metrics: reconciliations, their errors by the error's kind,
//! resources left not ready (a reconcile that worked but could not make the object Ready), and
//! reconcile durations.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};
use std::time::Duration;

/// The operator's own metrics.
#[derive(Debug, Clone)]
pub struct OperatorMetrics {
    registry: Registry,
    reconciliations: IntCounterVec,
    failures: IntCounterVec,
    not_ready: IntCounterVec,
    durations: HistogramVec,
}

/// Upper bounds, in seconds, of the reconcile duration buckets: from a reconcile that finds
/// nothing to do (a few milliseconds) to one that waits on a slow API server or broker.
const RECONCILE_DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        let registry = Registry::new();
        let reconciliations = counter(
            &registry,
            "warren_operator_reconciliations_total",
            "Reconciliations run, by kind",
            &["kind"],
        );
        let failures = counter(
            &registry,
            "warren_operator_reconcile_errors_total",
            "Reconciliations that failed, by kind and the error's kind",
            &["kind", "error"],
        );
        // Not errors: the reconcile did its work and wrote the reason into the Ready condition
        // (the broker refused, the Instance is missing, ...). Counted apart so an alert can tell
        // "the operator is failing" from "the resources ask for something that cannot be".
        let not_ready = counter(
            &registry,
            "warren_operator_resource_not_ready_total",
            "Reconciliations that left a resource not Ready, by kind and the condition's reason",
            &["kind", "reason"],
        );
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
            .register(Box::new(durations.clone()))
            .expect("registered once");
        Self {
            registry,
            reconciliations,
            failures,
            not_ready,
            durations,
        }
    }
}

impl OperatorMetrics {
    /// Counts one reconciliation of `kind`, failed with an error of kind `error` when given.
    pub fn record(&self, kind: &str, error: Option<&str>) {
        self.reconciliations.with_label_values(&[kind]).inc();
        if let Some(e) = error {
            self.failures.with_label_values(&[kind, e]).inc();
        }
    }

    /// Counts one reconciliation of `kind` that left its resource not Ready for `reason` (the
    /// reason of its `Ready` condition).
    pub fn not_ready(&self, kind: &str, reason: &str) {
        self.not_ready.with_label_values(&[kind, reason]).inc();
    }

    /// Records that one call of the reconcile function of `kind` took `elapsed`.
    pub fn observe_duration(&self, kind: &str, elapsed: Duration) {
        self.durations
            .with_label_values(&[kind])
            .observe(elapsed.as_secs_f64());
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of metrics");
        out
    }
}

/// An error of a reconciler, as the error metric labels it.
pub trait ErrorKind {
    /// A short, stable label: `kube`, `finalizer`, or the broker's reason.
    fn kind(&self) -> &'static str;
}
