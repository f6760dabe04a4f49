//! The durable definitions as data: vhosts with their exchanges, queues, bindings, policies
//! and limits, users and permissions, as the snapshot file holds them and as metadata commands
//! change them. Plain values with their serde forms; reading and writing them is the
//! definitions store's, changing them the commands'.

use amq_protocol::types::FieldTable;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definitions {
    pub vhosts: BTreeMap<String, VhostDefinitions>,
    #[serde(default)]
    pub users: BTreeMap<String, UserDefinition>,
    #[serde(default)]
    pub permissions: Vec<PermissionDefinition>,
    /// The cluster name set through the management API or a definitions import (RabbitMQ's
    /// `cluster_name` global parameter); unset, the configuration's applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserDefinition {
    /// RabbitMQ's `rabbit_password_hashing_sha256` format.
    pub password_hash: String,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionDefinition {
    pub user: String,
    pub vhost: String,
    pub configure: String,
    pub write: String,
    pub read: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostDefinitions {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// `max-connections`, `max-queues`.
    #[serde(default)]
    pub limits: BTreeMap<String, i64>,
    /// The type of a queue declared without `x-queue-type` (none: classic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_queue_type: Option<String>,
    pub exchanges: BTreeMap<String, ExchangeDefinition>,
    pub queues: BTreeMap<String, QueueDefinition>,
    #[serde(default)]
    pub bindings: Bindings,
    #[serde(default)]
    pub policies: BTreeMap<String, PolicyDefinition>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub operator_policies: BTreeMap<String, PolicyDefinition>,
}

/// A policy, with RabbitMQ's field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDefinition {
    pub pattern: String,
    #[serde(rename = "apply-to")]
    pub apply_to: String,
    pub priority: i64,
    pub definition: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeDefinition {
    #[serde(rename = "type")]
    pub kind: String,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueDefinition {
    pub auto_delete: bool,
    pub arguments: FieldTable,
    /// The node whose disk holds the queue's messages; none: the node that reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingDefinition {
    pub source: String,
    pub destination: String,
    /// `queue` or `exchange`, as in RabbitMQ's definitions.
    pub destination_type: String,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// A vhost's durable bindings in the order they were made, each once, found by value in
/// O(log n) rather than by a scan. Written as a JSON array.
#[derive(Debug, Clone, Default)]
pub struct Bindings {
    /// Each binding's JSON text (which tells equal bindings, arguments included) to its place.
    index: HashMap<String, u64>,
    ordered: BTreeMap<u64, BindingDefinition>,
    next: u64,
}

impl Bindings {
    fn key(b: &BindingDefinition) -> String {
        // A binding's fields are strings and a table: this cannot fail.
        serde_json::to_string(b).unwrap_or_default()
    }

    /// Adds `b`; returns false if it was there.
    pub fn insert(&mut self, b: BindingDefinition) -> bool {
        let key = Self::key(&b);
        if self.index.contains_key(&key) {
            return false;
        }
        self.index.insert(key, self.next);
        self.ordered.insert(self.next, b);
        self.next += 1;
        true
    }

    /// Removes `b`; returns whether it was there.
    pub fn remove(&mut self, b: &BindingDefinition) -> bool {
        match self.index.remove(&Self::key(b)) {
            Some(at) => self.ordered.remove(&at).is_some(),
            None => false,
        }
    }

    /// Removes the bindings `gone` picks; returns how many.
    pub fn remove_where(&mut self, mut gone: impl FnMut(&BindingDefinition) -> bool) -> usize {
        let before = self.ordered.len();
        let index = &mut self.index;
        self.ordered.retain(|_, b| {
            let drop = gone(b);
            if drop {
                index.remove(&Self::key(b));
            }
            !drop
        });
        before - self.ordered.len()
    }

    pub fn contains(&self, b: &BindingDefinition) -> bool {
        self.index.contains_key(&Self::key(b))
    }

    pub fn iter(&self) -> impl Iterator<Item = &BindingDefinition> {
        self.ordered.values()
    }

    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }
}

impl PartialEq for Bindings {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl<'a> IntoIterator for &'a Bindings {
    type Item = &'a BindingDefinition;
    type IntoIter = std::collections::btree_map::Values<'a, u64, BindingDefinition>;
    fn into_iter(self) -> Self::IntoIter {
        self.ordered.values()
    }
}

impl FromIterator<BindingDefinition> for Bindings {
    fn from_iter<I: IntoIterator<Item = BindingDefinition>>(iter: I) -> Self {
        let mut all = Bindings::default();
        for b in iter {
            all.insert(b);
        }
        all
    }
}

impl Serialize for Bindings {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Bindings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Vec::<BindingDefinition>::deserialize(d)?
            .into_iter()
            .collect())
    }
}
