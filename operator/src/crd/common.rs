//! What every Warren kind shares: the reference to its Instance, what happens in the broker
//! when the resource is deleted, and RabbitMQ-style argument tables.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// The Instance (in the same namespace) whose broker holds the object.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InstanceRef {
    /// Name of the Instance.
    #[schemars(length(min = 1, max = 52))]
    pub name: String,
}

/// What deleting the resource does to the object in the broker.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DeletionPolicy {
    /// The object is deleted from the broker (with its messages, for a queue).
    #[default]
    Delete,
    /// The object stays in the broker; only the Kubernetes resource goes.
    Retain,
}

/// Arguments of a queue, exchange or binding (`x-max-length`, `alternate-exchange`, …): any JSON
/// value per key, passed to the broker as RabbitMQ's management API takes them.
pub type Arguments = BTreeMap<String, Value>;

/// The schema of [`Arguments`]: an object whose values are kept as given (a structural schema
/// needs the extension to allow values of any type).
pub fn arguments_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    json!({
        "type": "object",
        "additionalProperties": {"x-kubernetes-preserve-unknown-fields": true},
    })
    .try_into()
    .expect("a JSON object is a schema")
}

/// The vhost every kind defaults to, as in RabbitMQ.
pub fn default_vhost() -> String {
    "/".to_owned()
}

pub fn yes() -> bool {
    true
}
