//! `Binding`: a binding from an exchange to a queue or another exchange. A binding is its
//! whole spec (source, destination, key, arguments), so every field but the deletion policy is
//! immutable: a different binding is a different resource.

use super::common::{Arguments, DeletionPolicy, InstanceRef, arguments_schema, default_vhost};
use super::status::ObjectStatus;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "warren.dev",
    version = "v1alpha1",
    kind = "Binding",
    namespaced,
    cel,
    status = "ObjectStatus",
    shortname = "wb",
    category = "warren",
    printcolumn(
        name = "Instance",
        type_ = "string",
        json_path = ".spec.instanceRef.name"
    ),
    printcolumn(name = "Vhost", type_ = "string", json_path = ".spec.vhost"),
    printcolumn(name = "Source", type_ = "string", json_path = ".spec.source"),
    printcolumn(
        name = "Destination",
        type_ = "string",
        json_path = ".spec.destination"
    ),
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
pub struct BindingSpec {
    #[x_kube(validation = Rule::new("self == oldSelf").message("instanceRef is immutable"))]
    pub instance_ref: InstanceRef,
    #[serde(default = "default_vhost")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("vhost is immutable"))]
    pub vhost: String,
    /// The exchange messages come from (`""` is the default exchange, which takes no bindings).
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("source is immutable"))]
    pub source: String,
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("destination is immutable"))]
    pub destination: String,
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("destinationType is immutable"))]
    pub destination_type: DestinationType,
    #[serde(default)]
    #[schemars(length(max = 255))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("routingKey is immutable"))]
    pub routing_key: String,
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
pub enum DestinationType {
    #[default]
    Queue,
    Exchange,
}
