//! The generic reconciler of the kinds that live in a broker (Vhost, Queue, Exchange, Binding):
//! declare the object through the management API and say how that went in a `Ready`
//! condition; on deletion, honour `deletionPolicy`. The Kubernetes side (watch, finalizer,
//! status patch) calls these; they hold the decisions, so they are tested against a real
//! broker without a cluster.

use super::conditions::{READY, condition};
use crate::broker_api::{BrokerApi, BrokerError};
use crate::crd::binding::BindingSpec;
use crate::crd::common::DeletionPolicy;
use crate::crd::exchange::ExchangeSpec;
use crate::crd::queue::QueueSpec;
use crate::crd::vhost::VhostSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use std::future::Future;
use std::time::Duration;

/// What a broker-side kind must say about itself.
pub trait BrokerObject {
    /// The Instance whose broker holds it.
    fn instance(&self) -> &str;
    fn deletion_policy(&self) -> DeletionPolicy;
    /// How the object is named in messages (`queue 'q' in vhost '/'`).
    fn describe(&self) -> String;
    /// Declares it (idempotent).
    fn apply(&self, api: &BrokerApi) -> impl Future<Output = Result<(), BrokerError>> + Send;
    /// Deletes it (gone already is success).
    fn remove(&self, api: &BrokerApi) -> impl Future<Output = Result<(), BrokerError>> + Send;
}

impl BrokerObject for VhostSpec {
    fn instance(&self) -> &str {
        &self.instance_ref.name
    }
    fn deletion_policy(&self) -> DeletionPolicy {
        self.deletion_policy
    }
    fn describe(&self) -> String {
        format!("vhost '{}'", self.name)
    }
    async fn apply(&self, api: &BrokerApi) -> Result<(), BrokerError> {
        api.declare_vhost(&self.name, self.limits.as_ref()).await
    }
    async fn remove(&self, api: &BrokerApi) -> Result<(), BrokerError> {
        api.delete_vhost(&self.name).await
    }
}

impl BrokerObject for QueueSpec {
    fn instance(&self) -> &str {
        &self.instance_ref.name
    }
    fn deletion_policy(&self) -> DeletionPolicy {
        self.deletion_policy
    }
    fn describe(&self) -> String {
        format!("queue '{}' in vhost '{}'", self.name, self.vhost)
    }
    async fn apply(&self, api: &BrokerApi) -> Result<(), BrokerError> {
        api.declare_queue(self).await
    }
    async fn remove(&self, api: &BrokerApi) -> Result<(), BrokerError> {
        api.delete_queue(&self.vhost, &self.name).await
    }
}

impl BrokerObject for ExchangeSpec {
    fn instance(&self) -> &str {
        &self.instance_ref.name
    }
    fn deletion_policy(&self) -> DeletionPolicy {
        self.deletion_policy
    }
    fn describe(&self) -> String {
        format!("exchange '{}' in vhost '{}'", self.name, self.vhost)
    }
    async fn apply(&self, api: &BrokerApi) -> Result<(), BrokerError> {
        api.declare_exchange(self).await
    }
    async fn remove(&self, api: &BrokerApi) -> Result<(), BrokerError> {
        api.delete_exchange(&self.vhost, &self.name).await
    }
}

impl BrokerObject for BindingSpec {
    fn instance(&self) -> &str {
        &self.instance_ref.name
    }
    fn deletion_policy(&self) -> DeletionPolicy {
        self.deletion_policy
    }
    fn describe(&self) -> String {
        format!(
            "binding of '{}' to '{}' in vhost '{}'",
            self.source, self.destination, self.vhost
        )
    }
    async fn apply(&self, api: &BrokerApi) -> Result<(), BrokerError> {
        api.declare_binding(self).await
    }
    async fn remove(&self, api: &BrokerApi) -> Result<(), BrokerError> {
        api.delete_binding(self).await
    }
}

/// What a reconcile decided: the `Ready` condition to write and when to look again.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub ready: Condition,
    /// `None`: only when something changes (the spec, or a periodic resync).
    pub retry_after: Option<Duration>,
}

/// How long to wait before the `attempt`-th retry (0-based) after a failure: doubling from 5 s
/// up to 5 minutes for transient failures; 5 minutes at once when the broker refused the
/// declaration (only a change will help, and a change triggers a reconcile anyway).
pub fn backoff(attempt: u32, transient: bool) -> Duration {
    const CAP: Duration = Duration::from_secs(300);
    if !transient {
        return CAP;
    }
    Duration::from_secs(5)
        .checked_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .map_or(CAP, |d| d.min(CAP))
}

/// Declares `object` and says how it went. `api` is `None` when the Instance (or its
/// credentials) cannot be found: the object waits for it.
pub async fn reconcile<O: BrokerObject>(
    object: &O,
    api: Option<&BrokerApi>,
    generation: Option<i64>,
    attempt: u32,
    now: &Time,
) -> Outcome {
    let Some(api) = api else {
        return Outcome {
            ready: condition(
                READY,
                false,
                "InstanceMissing",
                format!(
                    "Instance '{}' does not exist in this namespace, or has no credentials yet",
                    object.instance()
                ),
                generation,
                now,
            ),
            retry_after: Some(backoff(attempt, true)),
        };
    };
    match object.apply(api).await {
        Ok(()) => Outcome {
            ready: condition(
                READY,
                true,
                "Declared",
                format!("{} is declared in the broker", object.describe()),
                generation,
                now,
            ),
            retry_after: None,
        },
        Err(e) => Outcome {
            ready: condition(READY, false, e.reason(), e.to_string(), generation, now),
            retry_after: Some(backoff(attempt, e.is_transient())),
        },
    }
}

/// What deleting the resource does in the broker: with `retain` nothing; with `delete` the
/// object goes. Without an Instance there is no broker to clean, so the finalizer may go.
pub async fn finalize<O: BrokerObject>(
    object: &O,
    api: Option<&BrokerApi>,
) -> Result<(), BrokerError> {
    match (object.deletion_policy(), api) {
        (DeletionPolicy::Retain, _) | (_, None) => Ok(()),
        (DeletionPolicy::Delete, Some(api)) => object.remove(api).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transient_failures_back_off_by_doubling_up_to_five_minutes() {
        let secs: Vec<u64> = (0..8).map(|a| backoff(a, true).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(backoff(u32::MAX, true).as_secs(), 300);
        assert_eq!(backoff(0, false).as_secs(), 300);
    }
}
