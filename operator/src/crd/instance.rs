//! `Instance`: a Warren broker deployment (a StatefulSet of brokers with its config, Secret,
//! Services and PodDisruptionBudget), with the scale subresource so `kubectl scale` works.

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Instance",
    namespaced,
    cel,
    status = "InstanceStatus",
    shortname = "wi",
    category = "warren",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Up", type_ = "string", json_path = ".status.cluster.up"),
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.cluster.metadataLeader", priority = "1"),
    printcolumn(name = "AMQP", type_ = "string", json_path = ".status.endpoints.amqp", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("size(self.metadata.name) <= 52").message("an Instance name has at most 52 characters (its pods' names must fit 63)"),
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message("an Instance name is a DNS label starting with a letter (it names Services)")
)]
#[serde(rename_all = "camelCase")]
pub struct InstanceSpec {
    /// Brokers in the StatefulSet (with autoscaling, the starting point).
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 99))]
    pub replicas: i32,
    /// The broker's container image; the operator's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,
    /// CPU and memory of each broker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Fixed at creation: a StatefulSet's volume claim templates cannot change.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage cannot change after creation"))]
    pub storage: StorageSpec,
    /// AMQPS on 5671 and HTTPS for the management API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// A Secret with `username` and `password` for the default user; the operator generates
    /// one (never overwriting it) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_user_secret: Option<String>,
    /// Extra broker settings (keys of `warren.toml`, e.g. `heartbeat = 30`), added to what the
    /// operator writes; keys the operator owns (listeners, data directory, node name) are refused
    /// in the status.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "crate::crd::common::arguments_schema")]
    pub config: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub service: ServiceSpec,
    #[serde(default)]
    pub pod: PodOverrides,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingSpec>,
}

fn one() -> i32 {
    1
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// StorageClass of each broker's volume; the cluster's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Size of each broker's volume.
    #[serde(default = "ten_gibibytes")]
    pub size: Quantity,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            class_name: None,
            size: ten_gibibytes(),
        }
    }
}

fn ten_gibibytes() -> Quantity {
    Quantity("10Gi".into())
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// A `kubernetes.io/tls` Secret: `tls.crt`, `tls.key`, and `ca.crt` when `verifyPeer`.
    #[schemars(length(min = 1))]
    pub secret_name: String,
    /// Require client certificates signed by `ca.crt`.
    #[serde(default)]
    pub verify_peer: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default, rename = "type")]
    pub service_type: ServiceType,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

/// Scheduling and metadata of the broker pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Replaces the operator's preferred anti-affinity (one broker per node when possible).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
pub struct AutoscalingSpec {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 99))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 99))]
    pub max_replicas: i32,
    #[serde(default)]
    pub targets: ScalingTargets,
    /// How long a higher replica count must be wanted before scaling up.
    #[serde(default = "sixty")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_up_stabilization_seconds: i32,
    /// How long a lower replica count must be wanted before scaling down (and draining).
    #[serde(default = "three_hundred")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_stabilization_seconds: i32,
}

fn sixty() -> i32 {
    60
}

fn three_hundred() -> i32 {
    300
}

/// Per-broker load the autoscaler aims at; the replica count is the largest any target asks.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScalingTargets {
    /// Ready messages per broker (`rabbitmq_queue_messages_ready`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub messages_ready_per_replica: Option<i64>,
    /// Published messages per second per broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub publish_rate_per_replica: Option<i64>,
    /// Client connections per broker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub connections_per_replica: Option<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceStatus {
    /// `Ready`, `Reconciled` and `Scaling`, each with a reason and a message.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Broker pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Broker pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// What the operator (or the autoscaler) wants.
    #[serde(default)]
    pub desired_replicas: i32,
    /// Label selector of the broker pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoints: Option<Endpoints>,
    /// The Secret with the connection details (username, password, host, ports, URIs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<String>,
    /// The brokers' cluster as they report it: its members, which are up, and which leads
    /// the cluster's metadata. Null when there are no brokers (written as null, so that a
    /// status patch clears it).
    #[serde(default)]
    pub cluster: Option<ClusterStatus>,
}

/// The cluster the brokers of an Instance form.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterStatus {
    /// Each broker of the cluster, by node name.
    #[serde(default)]
    pub members: Vec<ClusterMember>,
    /// How many members are up, as `up/members` (e.g. `3/3`).
    #[serde(default)]
    pub up: String,
    /// The node that leads the cluster's metadata; null while no majority has elected one
    /// (or while no broker answers). Written as null rather than left out, so that a status
    /// patch clears a leader that is gone.
    #[serde(default)]
    pub metadata_leader: Option<String>,
    /// Why the cluster could not be asked, when it could not (the members are then as last
    /// seen, none of them known to be up); null once it answers again.
    #[serde(default)]
    pub unreachable: Option<String>,
}

/// A broker of the cluster.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClusterMember {
    pub name: String,
    /// It runs and the broker asked reaches it.
    pub up: bool,
}

/// Addresses of the client Service.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    pub amqp: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amqps: Option<String>,
    pub management: String,
    pub metrics: String,
}
