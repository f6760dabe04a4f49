//! The Instance reconciler: the default-user Secret (created once, never overwritten), then the
//! owned objects applied with server-side apply under one field manager (so hand edits of
//! fields the operator owns are repaired), then a status that follows the StatefulSet's real
//! readiness.

use super::conditions::{self, READY, RECONCILED, SCALING, condition};
use crate::broker_api::ClusterView;
use crate::crd::Instance;
use crate::crd::instance::{ClusterMember, ClusterStatus, Endpoints, InstanceStatus};
use crate::metrics::ErrorKind;
use crate::resources::config_map::config_map;
use crate::resources::pdb::pod_disruption_budget;
use crate::resources::secret::{cluster_secret, default_user_secret};
use crate::resources::service::{client_service, headless_service};
use crate::resources::stateful_set::stateful_set;
use crate::resources::{
    AMQP_PORT, AMQPS_PORT, Defaults, MANAGEMENT_PORT, METRICS_PORT, client_service_name,
    cluster_secret_name, default_user_secret_name, name_of, namespace_of, selector_string,
};
use crate::scaling::autoscaler::Autoscaler;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};
use rand::Rng;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

/// The field manager of everything the operator applies.
pub const FIELD_MANAGER: &str = "warren-operator";

/// How often a settled Instance is looked at again.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How often while brokers are starting or scaling.
pub const WATCH_CLOSELY: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

impl ErrorKind for Error {
    fn kind(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
        }
    }
}

/// What the Instance controller needs.
pub struct InstanceContext {
    pub client: Client,
    pub defaults: Defaults,
    pub autoscaler: Autoscaler,
    /// Reaches the brokers' management API (what a scale-down would take away); none: a
    /// scale-down is not checked.
    pub brokers: Option<Arc<super::broker_resources::Context>>,
    /// Where Events about Instances go.
    pub recorder: Option<Recorder>,
}

impl InstanceContext {
    pub fn new(client: Client, defaults: Defaults) -> Self {
        Self {
            client,
            defaults,
            autoscaler: Autoscaler::default(),
            brokers: None,
            recorder: None,
        }
    }
}

impl std::fmt::Debug for InstanceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceContext")
            .field("defaults", &self.defaults)
            .field("autoscaler", &self.autoscaler)
            .finish_non_exhaustive()
    }
}

/// A password for the generated default user: 32 letters and digits.
/// Creates the Secret `name` with `make` unless it exists.
async fn create_once(
    secrets: &Api<Secret>,
    name: &str,
    make: impl FnOnce() -> Secret,
) -> Result<(), kube::Error> {
    if secrets.get_opt(name).await?.is_some() {
        return Ok(());
    }
    match secrets.create(&PostParams::default(), &make()).await {
        Ok(_) => Ok(()),
        // Made meanwhile (by us on another pass, or by the user): theirs stands.
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

pub fn generate_password() -> String {
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect()
}

async fn apply<K>(client: &Client, namespace: &str, object: &K) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let name = object.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
}

/// Reconciles one Instance.
pub async fn reconcile(obj: Arc<Instance>, ctx: Arc<InstanceContext>) -> Result<Action, Error> {
    let client = &ctx.client;
    let ns = namespace_of(&obj).to_owned();
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let generation = obj.meta().generation;
    let autoscaling = obj.spec.autoscaling.as_ref().filter(|a| a.enabled);
    let (desired, held) = match autoscaling {
        None => (obj.spec.replicas.max(0), None),
        Some(a) => {
            // The autoscaler starts from what runs (or from spec.replicas, within its range).
            let sets: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
            let current = match sets.get_opt(name_of(&obj)).await? {
                Some(s) => s.spec.and_then(|s| s.replicas).unwrap_or(1),
                None => obj
                    .spec
                    .replicas
                    .clamp(a.min_replicas.max(1), a.max_replicas.max(1)),
            };
            let d = ctx.autoscaler.round(&obj, a, current).await;
            (d.replicas, d.held)
        }
    };
    let mut status = obj.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.desired_replicas = desired;
    // A scale-down waits while the brokers that would go are the home of durable queues or
    // hold messages: the brokers keep running as they are, and the user is told why.
    let running = match ctx.brokers {
        Some(_) => running_replicas(client, &ns, &obj).await?,
        None => None,
    };
    let refused = match running {
        Some(current) if desired > 0 && desired < current => {
            let why = scale_down_refusal(&ctx, &obj, current, desired).await;
            why.map(|why| (current, why))
        }
        _ => None,
    };
    let desired = refused.as_ref().map_or(desired, |(current, _)| *current);
    status.selector = Some(selector_string(&obj));

    // The Secrets first: brokers read the default user and the cluster secret from them, and
    // neither is ever overwritten (a new cluster secret would split the brokers whose data
    // directories joined with the old one).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret_name = default_user_secret_name(&obj);
    create_once(&secrets, &secret_name, || {
        default_user_secret(&obj, &generate_password())
    })
    .await?;
    create_once(&secrets, &cluster_secret_name(&obj), || {
        cluster_secret(&obj, &generate_password())
    })
    .await?;
    status.connection_secret = Some(secret_name);

    let config = match config_map(&obj, desired) {
        Ok(c) => c,
        Err(e) => {
            // Nothing is applied with a config the brokers would refuse: they keep running
            // with the last good one.
            conditions::set(
                &mut status.conditions,
                condition(
                    RECONCILED,
                    false,
                    "InvalidConfig",
                    e.to_string(),
                    generation,
                    &now,
                ),
            );
            write_status(client, &obj, &status).await?;
            return Ok(Action::requeue(RESYNC));
        }
    };
    let sts =
        stateful_set(&obj, &ctx.defaults, desired).expect("the config was checked just above");
    apply::<ConfigMap>(client, &ns, &config).await?;
    apply::<Service>(client, &ns, &headless_service(&obj)).await?;
    apply::<Service>(client, &ns, &client_service(&obj)).await?;
    let applied = apply::<StatefulSet>(client, &ns, &sts).await?;
    apply::<PodDisruptionBudget>(client, &ns, &pod_disruption_budget(&obj)).await?;
    conditions::set(
        &mut status.conditions,
        condition(
            RECONCILED,
            true,
            "Applied",
            "the broker StatefulSet, its config, Services and budget are applied",
            generation,
            &now,
        ),
    );

    let sts_status = applied.status.unwrap_or_default();
    status.replicas = sts_status.replicas;
    status.ready_replicas = sts_status.ready_replicas.unwrap_or(0);
    let settled = observe(&mut status, desired, generation, &now);
    if let Some((reason, message)) = held {
        let scaling = reason == "Draining";
        conditions::set(
            &mut status.conditions,
            condition(SCALING, scaling, reason, message, generation, &now),
        );
    }
    if let Some((_, why)) = &refused {
        conditions::set(
            &mut status.conditions,
            condition(
                SCALING,
                false,
                SCALE_DOWN_REFUSED,
                why.clone(),
                generation,
                &now,
            ),
        );
        if let Some(recorder) = &ctx.recorder {
            let event = Event {
                type_: EventType::Warning,
                reason: SCALE_DOWN_REFUSED.to_owned(),
                note: Some(why.clone()),
                action: "Scale".to_owned(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &obj.object_ref(&())).await {
                tracing::warn!(instance = %name_of(&obj), error = %e, "cannot record an Event");
            }
        }
    }
    status.endpoints = Some(endpoints(&obj));
    if desired == 0 {
        // No brokers, no cluster to show.
        status.cluster = None;
    } else if let Some(seen) = ask_cluster(&ctx, &obj).await {
        status.cluster = cluster_status(status.cluster.take(), seen);
    }
    write_status(client, &obj, &status).await?;
    Ok(Action::requeue(if autoscaling.is_some() {
        ctx.autoscaler.interval
    } else if settled && refused.is_none() {
        RESYNC
    } else {
        WATCH_CLOSELY
    }))
}

/// The reason of the `Scaling` condition and of the Warning Event when a scale-down waits.
pub const SCALE_DOWN_REFUSED: &str = "ScaleDownRefused";

/// The brokers the StatefulSet runs now, if it exists.
async fn running_replicas(
    client: &Client,
    ns: &str,
    obj: &Instance,
) -> Result<Option<i32>, kube::Error> {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    Ok(sets
        .get_opt(name_of(obj))
        .await?
        .map(|s| s.spec.and_then(|s| s.replicas).unwrap_or(1)))
}

/// Why a scale-down from `current` to `desired` brokers must wait, asked of the brokers; a
/// cluster that cannot be asked makes it wait too (nothing is taken away unseen).
async fn scale_down_refusal(
    ctx: &InstanceContext,
    obj: &Instance,
    current: i32,
    desired: i32,
) -> Option<String> {
    let brokers = ctx.brokers.as_ref()?;
    let api = match brokers.broker_api(namespace_of(obj), name_of(obj)).await {
        Ok(Some(api)) => api,
        // No credentials yet: no broker has served anything.
        Ok(None) => return None,
        Err(e) => {
            return Some(format!(
                "scaling down from {current} to {desired} brokers waits: the Instance's credentials cannot be read ({e})"
            ));
        }
    };
    match api.queues_by_node().await {
        Ok(queues) => refusal(obj, current, desired, &queues),
        Err(e) => Some(format!(
            "scaling down from {current} to {desired} brokers waits: the brokers cannot be asked what the ones that would go hold ({e})"
        )),
    }
}

/// The cluster as the brokers report it, or why they could not be asked; `None` when there
/// is no one to ask (no broker API, or no credentials yet).
async fn ask_cluster(ctx: &InstanceContext, obj: &Instance) -> Option<Result<ClusterView, String>> {
    let brokers = ctx.brokers.as_ref()?;
    match brokers.broker_api(namespace_of(obj), name_of(obj)).await {
        Ok(Some(api)) => Some(api.cluster().await.map_err(|e| e.to_string())),
        Ok(None) => None,
        Err(e) => Some(Err(format!(
            "the Instance's credentials cannot be read ({e})"
        ))),
    }
}

/// The status's cluster from what the brokers said: a cluster that cannot be asked keeps
/// the members last seen, none known to be up, with the reason.
pub fn cluster_status(
    previous: Option<ClusterStatus>,
    seen: Result<ClusterView, String>,
) -> Option<ClusterStatus> {
    let (members, metadata_leader, unreachable) = match seen {
        Ok(view) => (view.members, view.metadata_leader, None),
        Err(why) => {
            let previous = previous?;
            let members = previous
                .members
                .into_iter()
                .map(|m| (m.name, false))
                .collect();
            (members, None, Some(why))
        }
    };
    let up = members.iter().filter(|(_, up)| *up).count();
    Some(ClusterStatus {
        up: format!("{up}/{}", members.len()),
        members: members
            .into_iter()
            .map(|(name, up)| ClusterMember { name, up })
            .collect(),
        metadata_leader,
        unreachable,
    })
}

/// Why a scale-down from `current` to `desired` brokers must wait, given the cluster's queues:
/// a broker that would go is the home of a durable queue (its messages and the queue itself
/// would be unavailable until it came back) or holds messages.
pub fn refusal(
    obj: &Instance,
    current: i32,
    desired: i32,
    queues: &[crate::broker_api::QueueOnNode],
) -> Option<String> {
    let mut held = Vec::new();
    for ordinal in desired..current {
        let node = crate::resources::node_name(obj, ordinal);
        let mine: Vec<_> = queues
            .iter()
            .filter(|q| q.node == node && (q.durable || q.messages > 0))
            .collect();
        if mine.is_empty() {
            continue;
        }
        let messages: u64 = mine.iter().map(|q| q.messages).sum();
        let first = &mine[0];
        held.push(format!(
            "{}-{ordinal} is the home of {} queue(s) holding {messages} message(s) (e.g. '{}' in vhost '{}')",
            name_of(obj),
            mine.len(),
            first.name,
            first.vhost
        ));
    }
    (!held.is_empty()).then(|| {
        format!(
            "scaling down from {current} to {desired} brokers is refused: {}; delete those queues or move their messages, and it goes on",
            held.join("; ")
        )
    })
}

/// Sets `Ready` and `Scaling` from the replica counts; true when nothing is changing.
pub fn observe(
    status: &mut InstanceStatus,
    desired: i32,
    generation: Option<i64>,
    now: &Time,
) -> bool {
    let ready = status.ready_replicas;
    let all_ready = desired > 0 && ready >= desired;
    let (reason, message) = if desired == 0 {
        (
            "ScaledToZero",
            "the Instance asks for no brokers".to_owned(),
        )
    } else if all_ready {
        (
            "AllBrokersReady",
            format!("{ready} of {desired} brokers ready"),
        )
    } else {
        (
            "BrokersStarting",
            format!("{ready} of {desired} brokers ready"),
        )
    };
    conditions::set(
        &mut status.conditions,
        condition(READY, all_ready, reason, message, generation, now),
    );
    let current = status.replicas;
    let (scaling, reason) = match current.cmp(&desired) {
        std::cmp::Ordering::Less => (true, "ScalingUp"),
        std::cmp::Ordering::Greater => (true, "ScalingDown"),
        std::cmp::Ordering::Equal => (false, "Stable"),
    };
    conditions::set(
        &mut status.conditions,
        condition(
            SCALING,
            scaling,
            reason,
            format!("{current} brokers, {desired} wanted"),
            generation,
            now,
        ),
    );
    !scaling && (all_ready || desired == 0)
}

/// Where clients reach the Instance: its client Service.
pub fn endpoints(obj: &Instance) -> Endpoints {
    let host = format!("{}.{}.svc", client_service_name(obj), namespace_of(obj));
    Endpoints {
        amqp: format!("amqp://{host}:{AMQP_PORT}"),
        amqps: obj
            .spec
            .tls
            .as_ref()
            .map(|_| format!("amqps://{host}:{AMQPS_PORT}")),
        management: format!("http://{host}:{MANAGEMENT_PORT}"),
        metrics: format!("http://{host}:{METRICS_PORT}/metrics"),
    }
}

async fn write_status(
    client: &Client,
    obj: &Instance,
    status: &InstanceStatus,
) -> Result<(), Error> {
    let api: Api<Instance> = Api::namespaced(client.clone(), namespace_of(obj));
    api.patch_status(
        name_of(obj),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// After an error the Instance is looked at again in 15 s.
pub fn error_policy(obj: Arc<Instance>, err: &Error, _ctx: Arc<InstanceContext>) -> Action {
    tracing::warn!(
        instance = %name_of(&obj),
        error = %err,
        error_kind = err.kind(),
        "reconcile failed"
    );
    Action::requeue(Duration::from_secs(15))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn now() -> Time {
        Time(Timestamp::from_second(100).unwrap())
    }

    #[test]
    fn ready_follows_the_ready_brokers_and_scaling_the_replica_counts() {
        let mut s = InstanceStatus {
            replicas: 3,
            ready_replicas: 1,
            ..InstanceStatus::default()
        };
        assert!(!observe(&mut s, 3, Some(1), &now()));
        let ready = conditions::find(&s.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "BrokersStarting")
        );
        assert_eq!(ready.message, "1 of 3 brokers ready");
        s.ready_replicas = 3;
        assert!(observe(&mut s, 3, Some(1), &now()));
        assert_eq!(
            conditions::find(&s.conditions, READY).unwrap().status,
            "True"
        );
        assert_eq!(
            conditions::find(&s.conditions, SCALING).unwrap().reason,
            "Stable"
        );
        assert!(!observe(&mut s, 5, Some(2), &now()));
        let scaling = conditions::find(&s.conditions, SCALING).unwrap();
        assert_eq!(
            (scaling.status.as_str(), scaling.reason.as_str()),
            ("True", "ScalingUp")
        );
        assert_eq!(
            conditions::find(&s.conditions, READY).unwrap().status,
            "False"
        );
    }

    #[test]
    fn a_scale_down_waits_for_the_durable_queues_and_messages_of_the_brokers_that_would_go() {
        use crate::broker_api::QueueOnNode;
        let i = crate::resources::fixtures::instance("  replicas: 3\n");
        let q = |node: &str, name: &str, durable: bool, messages: u64| QueueOnNode {
            vhost: "/".into(),
            name: name.into(),
            node: format!("warren@demo-{node}.demo-nodes.shop.svc"),
            durable,
            messages,
        };
        // On a broker that stays, or empty and transient on one that goes: no reason to wait.
        let fine = [q("0", "a", true, 9), q("2", "scratch", false, 0)];
        assert_eq!(refusal(&i, 3, 2, &fine), None);
        // A durable queue's home, or messages, on a broker that goes.
        let why = refusal(
            &i,
            3,
            1,
            &[q("2", "orders", true, 0), q("1", "tmp", false, 4)],
        )
        .expect("refused");
        assert!(why.contains("from 3 to 1 brokers is refused"), "{why}");
        assert!(
            why.contains("demo-1 is the home of 1 queue(s) holding 4 message(s) (e.g. 'tmp'"),
            "{why}"
        );
        assert!(
            why.contains("demo-2 is the home of 1 queue(s) holding 0 message(s) (e.g. 'orders'"),
            "{why}"
        );
        // Only the brokers above the new count go.
        assert_eq!(refusal(&i, 3, 2, &[q("1", "orders", true, 5)]), None);
    }

    #[test]
    fn the_status_shows_the_cluster_and_keeps_its_members_when_it_cannot_be_asked() {
        let seen = ClusterView {
            members: vec![
                ("warren@demo-0".into(), true),
                ("warren@demo-1".into(), false),
                ("warren@demo-2".into(), true),
            ],
            metadata_leader: Some("warren@demo-2".into()),
        };
        let status = cluster_status(None, Ok(seen)).expect("a cluster");
        assert_eq!(status.up, "2/3");
        assert_eq!(status.metadata_leader.as_deref(), Some("warren@demo-2"));
        assert!(!status.members[1].up && status.members[2].up);
        assert_eq!(status.unreachable, None);
        let lost = cluster_status(Some(status), Err("connection refused".into()))
            .expect("the members last seen");
        assert_eq!(lost.up, "0/3");
        assert_eq!(lost.members.len(), 3);
        assert!(lost.members.iter().all(|m| !m.up));
        assert_eq!(lost.metadata_leader, None);
        assert_eq!(lost.unreachable.as_deref(), Some("connection refused"));
        // Never seen: nothing to show.
        assert_eq!(cluster_status(None, Err("refused".into())), None);
        // A status patch (a JSON merge patch) clears what is gone: the reason once the
        // cluster answers again, the leader once there is none.
        let back = cluster_status(
            Some(lost),
            Ok(ClusterView {
                members: vec![("warren@demo-0".into(), true)],
                metadata_leader: None,
            }),
        )
        .expect("a cluster");
        let patch = serde_json::to_value(&back).unwrap();
        assert_eq!(patch["unreachable"], serde_json::Value::Null);
        assert!(patch.as_object().unwrap().contains_key("unreachable"));
        assert!(patch.as_object().unwrap().contains_key("metadataLeader"));
    }

    #[test]
    fn passwords_are_long_and_different() {
        let (a, b) = (generate_password(), generate_password());
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }
}
