//! Leader election with a coordination.k8s.io Lease, so two operator replicas are safe: only
//! the holder reconciles. The holder renews the Lease well inside its duration; another replica
//! takes it over only once it has expired, or at once when the holder released it on a
//! graceful shutdown (as client-go's `ReleaseOnCancel`). Every write carries the
//! resourceVersion it read, so two replicas racing for the same Lease cannot both win (the API
//! server refuses the second with 409).

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Api;
use kube::api::PostParams;
use std::time::Duration;

/// A Lease named `name` held as `identity` (the pod's name).
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock")
            .field("name", &self.name)
            .field("identity", &self.identity)
            .field("duration", &self.duration)
            .finish_non_exhaustive()
    }
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl LeaseLock {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
        }
    }

    /// How often the holder renews: a third of the duration, so two renewals may fail before
    /// anyone else may take over.
    pub fn renew_every(&self) -> Duration {
        self.duration / 3
    }

    /// Takes the Lease if it is free, expired or already ours (renewing it); true when this
    /// replica holds it afterwards.
    pub async fn try_acquire(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let held_for =
            SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(seconds)));
        // No holder (or the empty one a released Lease has) is free, whatever the times say.
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let expired = match (holder, &spec.renew_time) {
            (None, _) | (_, None) => true,
            (Some(_), Some(renewed)) => renewed.0.checked_add(held_for).is_ok_and(|end| end < now),
        };
        if !ours && !expired {
            return Ok(false);
        }
        let next = LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time: if ours {
                spec.acquire_time.clone()
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!ours)),
            ..spec
        };
        self.write(Lease {
            metadata: current.metadata,
            spec: Some(next),
        })
        .await
    }

    /// Writes the Lease over the version it was read at. False when it changed since: by
    /// another replica, so this one neither took it nor has it to give up.
    async fn write(&self, lease: Lease) -> Result<bool, kube::Error> {
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up, when this replica holds it, so another takes over at once instead of
    /// waiting out the duration: what client-go's leader election does with `ReleaseOnCancel`
    /// (an empty holder, a duration of 1 s, the transitions kept). True when it was released
    /// here; false when another replica holds it (then there is nothing to give up).
    pub async fn release(&self, now: Timestamp) -> Result<bool, kube::Error> {
        let Some(current) = self.api.get_opt(&self.name).await? else {
            return Ok(false);
        };
        let spec = current.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        self.write(Lease {
            metadata: current.metadata,
            spec: Some(LeaseSpec {
                holder_identity: Some(String::new()),
                lease_duration_seconds: Some(1),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: spec.lease_transitions,
                ..spec
            }),
        })
        .await
    }
}
