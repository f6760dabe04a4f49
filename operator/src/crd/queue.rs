//! `Queue`: a queue in a vhost of an Instance's broker. What identifies the queue and what
//! RabbitMQ refuses to change on redeclaration (name, vhost, type, durable, arguments) is
//! immutable, enforced by the API server with CEL rules.

use super::common::{Arguments, DeletionPolicy, InstanceRef, arguments_schema, default_vhost, yes};
use super::status::ObjectStatus;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Queue",
    namespaced,
    cel,
    status = "ObjectStatus",
    shortname = "wq",
    category = "warren",
    printcolumn(
        name = "Instance",
        type_ = "string",
        json_path = ".spec.instanceRef.name"
    ),
    printcolumn(name = "Vhost", type_ = "string", json_path = ".spec.vhost"),
    printcolumn(name = "Queue", type_ = "string", json_path = ".spec.name"),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
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
pub struct QueueSpec {
    #[x_kube(validation = Rule::new("self == oldSelf").message("instanceRef is immutable"))]
    pub instance_ref: InstanceRef,
    /// The vhost the queue lives in.
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("vhost is immutable"))]
    pub vhost: String,
    /// The queue's name in the broker; `amq.` names are reserved, as in RabbitMQ.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("name is immutable"))]
    #[x_kube(validation = Rule::new("!self.startsWith('amq.')").message("names starting with 'amq.' are reserved"))]
    pub name: String,
    #[serde(default, rename = "type")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("type is immutable"))]
    pub queue_type: QueueType,
    #[serde(default = "yes")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("durable is immutable"))]
    pub durable: bool,
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("autoDelete is immutable"))]
    pub auto_delete: bool,
    /// Queue arguments (`x-max-length`, `x-message-ttl`, …).
    #[serde(default, skip_serializing_if = "Arguments::is_empty")]
    #[schemars(schema_with = "arguments_schema", extend("default" = {}))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("arguments are immutable"))]
    pub arguments: Arguments,
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}
