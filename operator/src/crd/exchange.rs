//! `Exchange`: an exchange in a vhost of an Instance's broker. Its identity and the properties
//! RabbitMQ refuses to change on redeclaration are immutable.

use super::common::{Arguments, DeletionPolicy, InstanceRef, arguments_schema, default_vhost, yes};
use super::status::ObjectStatus;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Exchange",
    namespaced,
    cel,
    status = "ObjectStatus",
    shortname = "wx",
    category = "warren",
    printcolumn(
        name = "Instance",
        type_ = "string",
        json_path = ".spec.instanceRef.name"
    ),
    printcolumn(name = "Vhost", type_ = "string", json_path = ".spec.vhost"),
    printcolumn(name = "Exchange", type_ = "string", json_path = ".spec.name"),
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
pub struct ExchangeSpec {
    #[x_kube(validation = Rule::new("self == oldSelf").message("instanceRef is immutable"))]
    pub instance_ref: InstanceRef,
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("vhost is immutable"))]
    pub vhost: String,
    /// The exchange's name in the broker; `amq.` names are reserved, as in RabbitMQ.
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("name is immutable"))]
    #[x_kube(validation = Rule::new("!self.startsWith('amq.')").message("names starting with 'amq.' are reserved"))]
    pub name: String,
    #[serde(default, rename = "type")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("type is immutable"))]
    pub exchange_type: ExchangeType,
    #[serde(default = "yes")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("durable is immutable"))]
    pub durable: bool,
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("autoDelete is immutable"))]
    pub auto_delete: bool,
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("internal is immutable"))]
    pub internal: bool,
    /// Exchange arguments (`alternate-exchange`, …).
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
pub enum ExchangeType {
    #[default]
    Direct,
    Fanout,
    Topic,
    Headers,
}
