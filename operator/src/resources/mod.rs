//! The Kubernetes objects an Instance owns, each built by a pure function of the Instance (one
//! file per object, as RabbitMQ's cluster-operator does): no API calls here, so every builder
//! is unit-tested on its own. Names, labels and the owner reference come from this file.

pub mod config_map;
pub mod pdb;
pub mod secret;
pub mod service;
pub mod stateful_set;

use crate::crd::Instance;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use std::collections::BTreeMap;

/// Ports of a broker: RabbitMQ's own, so that clients, tools and dashboards made for RabbitMQ
/// find it where they expect.
pub const AMQP_PORT: i32 = 5672;
pub const AMQPS_PORT: i32 = 5671;
pub const MANAGEMENT_PORT: i32 = 15672;
pub const MANAGEMENT_TLS_PORT: i32 = 15671;
pub const METRICS_PORT: i32 = 15692;
/// Where the brokers of an Instance reach each other (RabbitMQ's inter-node port); on the
/// pods and the headless Service only, never the client Service.
pub const CLUSTER_PORT: i32 = 25672;

/// Where things are inside a broker pod.
pub const DATA_DIR: &str = "/var/lib/warren";
pub const CONFIG_DIR: &str = "/etc/warren";
pub const TLS_DIR: &str = "/etc/warren/tls";

/// What the builders need beyond the Instance: the operator's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    /// The broker image when an Instance names none.
    pub broker_image: String,
}

/// An Instance's name and namespace (a namespaced resource always has both once stored).
pub fn name_of(instance: &Instance) -> &str {
    instance.metadata.name.as_deref().unwrap_or_default()
}

pub fn namespace_of(instance: &Instance) -> &str {
    instance.metadata.namespace.as_deref().unwrap_or("default")
}

/// The names of the owned objects.
pub fn config_map_name(instance: &Instance) -> String {
    format!("{}-config", name_of(instance))
}

/// The Secret with the cluster secret the Instance's brokers prove to each other. Apart from
/// the default user's Secret, which applications mount: they have no business with it.
pub fn cluster_secret_name(instance: &Instance) -> String {
    format!("{}-cluster-secret", name_of(instance))
}

pub fn default_user_secret_name(instance: &Instance) -> String {
    instance
        .spec
        .default_user_secret
        .clone()
        .unwrap_or_else(|| format!("{}-default-user", name_of(instance)))
}

/// The node name of broker `ordinal` of an Instance (its pod's stable DNS name).
pub fn node_name(instance: &Instance, ordinal: i32) -> String {
    format!(
        "warren@{}-{ordinal}.{}.{}.svc",
        name_of(instance),
        headless_service_name(instance),
        namespace_of(instance)
    )
}

/// The headless Service that gives each broker a stable DNS name.
pub fn headless_service_name(instance: &Instance) -> String {
    format!("{}-nodes", name_of(instance))
}

/// The client Service, StatefulSet and PodDisruptionBudget share the Instance's name.
pub fn client_service_name(instance: &Instance) -> String {
    name_of(instance).to_owned()
}

/// The DNS names of the brokers, `<instance>-<n>.<instance>-nodes.<namespace>.svc`, one per
/// replica of the StatefulSet: `replicas` is the count applied to it (`spec.replicas`, or the
/// autoscaler's when it is on), not necessarily `spec.replicas`.
pub fn peer_hosts(instance: &Instance, replicas: i32) -> Vec<String> {
    let name = name_of(instance);
    let headless = headless_service_name(instance);
    let ns = namespace_of(instance);
    (0..replicas.max(0))
        .map(|n| format!("{name}-{n}.{headless}.{ns}.svc"))
        .collect()
}

/// The labels that select an Instance's broker pods. `component: broker` keeps them apart from
/// the operator's own pods (the chart labels those `component: operator`), even when an
/// Instance and the Helm release share a name.
pub fn selector_labels(instance: &Instance) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "warren".to_owned()),
        (
            "app.kubernetes.io/instance".to_owned(),
            name_of(instance).to_owned(),
        ),
        (
            "app.kubernetes.io/component".to_owned(),
            "broker".to_owned(),
        ),
    ])
}

/// The label selector string of the broker pods (the scale subresource reports it).
pub fn selector_string(instance: &Instance) -> String {
    selector_labels(instance)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels of every owned object: the selector labels plus who manages it.
pub fn labels(instance: &Instance) -> BTreeMap<String, String> {
    let mut labels = selector_labels(instance);
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "warren-operator".into(),
    );
    labels
}

/// The Instance as the controlling owner, so Kubernetes deletes what it owns with it.
pub fn owner_reference(instance: &Instance) -> OwnerReference {
    OwnerReference {
        api_version: Instance::api_version(&()).into_owned(),
        kind: Instance::kind(&()).into_owned(),
        name: name_of(instance).to_owned(),
        uid: instance.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Metadata of an owned object called `name`.
pub fn owned_meta(instance: &Instance, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(namespace_of(instance).to_owned()),
        labels: Some(labels(instance)),
        owner_references: Some(vec![owner_reference(instance)]),
        ..ObjectMeta::default()
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    use crate::crd::Instance;

    /// An Instance as the API server would hand it over: named, namespaced, with a uid.
    pub fn instance(spec_yaml: &str) -> Instance {
        let text = format!(
            "apiVersion: warren.dev/v1alpha1\nkind: Instance\nmetadata:\n  name: demo\n  namespace: shop\n  uid: 1234-abcd\n  generation: 3\nspec:\n{spec_yaml}"
        );
        serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"))
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::instance;
    use super::*;

    #[test]
    fn peers_are_the_stateful_set_pods_behind_the_headless_service() {
        let i = instance("  replicas: 3\n");
        assert_eq!(
            peer_hosts(&i, 3),
            [
                "demo-0.demo-nodes.shop.svc",
                "demo-1.demo-nodes.shop.svc",
                "demo-2.demo-nodes.shop.svc"
            ]
        );
    }

    #[test]
    fn peers_follow_the_applied_replica_count_not_the_spec() {
        // Autoscaled to 2 while the spec still says 5: only the two pods that exist are peers.
        let i = instance(
            "  replicas: 5\n  autoscaling:\n    enabled: true\n    minReplicas: 1\n    maxReplicas: 6\n",
        );
        assert_eq!(
            peer_hosts(&i, 2),
            ["demo-0.demo-nodes.shop.svc", "demo-1.demo-nodes.shop.svc"]
        );
        assert!(peer_hosts(&i, 0).is_empty());
        assert!(peer_hosts(&i, -1).is_empty());
    }

    #[test]
    fn owned_objects_point_at_the_instance_as_controller() {
        let i = instance("  replicas: 1\n");
        let meta = owned_meta(&i, "x".into());
        let owner = &meta.owner_references.unwrap()[0];
        assert_eq!(owner.kind, "Instance");
        assert_eq!(owner.api_version, "warren.dev/v1alpha1");
        assert_eq!(owner.uid, "1234-abcd");
        assert_eq!(owner.controller, Some(true));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(
            meta.labels.unwrap()["app.kubernetes.io/managed-by"],
            "warren-operator"
        );
        assert_eq!(
            selector_string(&i),
            "app.kubernetes.io/component=broker,app.kubernetes.io/instance=demo,app.kubernetes.io/name=warren"
        );
    }
}
