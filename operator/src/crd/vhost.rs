//! `Vhost`: a virtual host in an Instance's broker, with its limits.

use super::common::{DeletionPolicy, InstanceRef};
use super::status::ObjectStatus;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Vhost",
    namespaced,
    cel,
    status = "ObjectStatus",
    shortname = "wvh",
    category = "warren",
    printcolumn(
        name = "Instance",
        type_ = "string",
        json_path = ".spec.instanceRef.name"
    ),
    printcolumn(name = "Vhost", type_ = "string", json_path = ".spec.name"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct VhostSpec {
    #[x_kube(validation = Rule::new("self == oldSelf").message("instanceRef is immutable"))]
    pub instance_ref: InstanceRef,
    /// The vhost's name in the broker.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("name is immutable"))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<VhostLimits>,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// RabbitMQ's vhost limits; absent means no limit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VhostLimits {
    /// Most client connections open to the vhost at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_connections: Option<i64>,
    /// Most queues in the vhost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub max_queues: Option<i64>,
}
