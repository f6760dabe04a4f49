//! Durable definitions (vhosts, exchanges, queues, bindings), written atomically: the whole set
//! goes to a temporary file that is synced and then renamed over the old one, and the directory
//! is synced, so after a crash the file holds either the old set or the new one, whole.

use amq_protocol::types::FieldTable;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "definitions.json";

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
    pub bindings: Vec<BindingDefinition>,
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

/// Errors opening or writing the definitions, with the file they concern.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionsError {
    #[error("cannot read or write {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid definitions file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The durable definitions, mirrored in memory and on disk.
#[derive(Debug)]
pub struct DefinitionStore {
    /// `None` keeps everything in memory (tests, and brokers run without a data directory).
    path: Option<PathBuf>,
    current: Mutex<Definitions>,
}

impl DefinitionStore {
    pub fn in_memory() -> Self {
        Self {
            path: None,
            current: Mutex::new(Definitions::default()),
        }
    }

    /// Opens the definitions in `dir`, creating the directory if needed.
    pub fn open(dir: &Path) -> Result<Self, DefinitionsError> {
        let io_err = |source| DefinitionsError::Io {
            path: dir.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_err)?;
        let path = dir.join(FILE_NAME);
        let current = match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| DefinitionsError::Corrupt {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Definitions::default(),
            Err(source) => {
                return Err(DefinitionsError::Io {
                    path: path.clone(),
                    source,
                });
            }
        };
        Ok(Self {
            path: Some(path),
            current: Mutex::new(current),
        })
    }

    pub fn snapshot(&self) -> Definitions {
        self.current.lock().clone()
    }

    /// Applies `change` and, if it changed anything, writes the result before returning.
    pub fn update(&self, change: impl FnOnce(&mut Definitions)) -> Result<(), DefinitionsError> {
        let mut current = self.current.lock();
        let before = current.clone();
        change(&mut current);
        if *current == before {
            return Ok(());
        }
        if let Some(path) = &self.path
            && let Err(e) = write_atomically(path, &current)
        {
            *current = before;
            return Err(e);
        }
        Ok(())
    }
}

fn write_atomically(path: &Path, defs: &Definitions) -> Result<(), DefinitionsError> {
    let io_err = |source| DefinitionsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(defs).map_err(|source| DefinitionsError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    let tmp = path.with_extension("json.tmp");
    let mut file = fs::File::create(&tmp).map_err(io_err)?;
    file.write_all(&bytes).map_err(io_err)?;
    file.sync_data().map_err(io_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let store = DefinitionStore::open(dir.path()).unwrap();
        store
            .update(|d| {
                d.vhosts.entry("/".into()).or_default().queues.insert(
                    "q".into(),
                    QueueDefinition {
                        auto_delete: false,
                        arguments: FieldTable::default(),
                    },
                );
            })
            .unwrap();
        let again = DefinitionStore::open(dir.path()).unwrap();
        assert_eq!(again.snapshot(), store.snapshot());
        assert!(again.snapshot().vhosts["/"].queues.contains_key("q"));
    }

    /// A table nested as deep as the wire accepts, levels alternating between tables and
    /// arrays (or all tables), around the leaf that takes the most JSON levels.
    fn deepest(alternate: bool) -> FieldTable {
        use crate::amqp::codec::MAX_TABLE_DEPTH;
        use amq_protocol::types::{AMQPValue, DecimalValue, FieldArray};
        let mut value = AMQPValue::DecimalValue(DecimalValue { scale: 2, value: 7 });
        for level in (2..=MAX_TABLE_DEPTH).rev() {
            value = if alternate && level % 2 == 0 {
                AMQPValue::FieldArray(FieldArray::from(vec![value]))
            } else {
                let mut t = FieldTable::default();
                t.insert("k".into(), value);
                AMQPValue::FieldTable(t)
            };
        }
        let mut top = FieldTable::default();
        top.insert("k".into(), value);
        top
    }

    #[test]
    fn arguments_nested_to_the_wire_limit_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = DefinitionStore::open(dir.path()).unwrap();
        store
            .update(|d| {
                let v = d.vhosts.entry("/".into()).or_default();
                for (name, alternate) in [("q", true), ("r", false)] {
                    v.queues.insert(
                        name.into(),
                        QueueDefinition {
                            auto_delete: false,
                            arguments: deepest(alternate),
                        },
                    );
                    v.exchanges.insert(
                        name.into(),
                        ExchangeDefinition {
                            kind: "headers".into(),
                            auto_delete: false,
                            internal: false,
                            arguments: deepest(alternate),
                        },
                    );
                    v.bindings.push(BindingDefinition {
                        source: name.into(),
                        destination: name.into(),
                        destination_type: "queue".into(),
                        routing_key: String::new(),
                        arguments: deepest(alternate),
                    });
                }
            })
            .unwrap();
        let again = DefinitionStore::open(dir.path()).unwrap();
        assert_eq!(again.snapshot(), store.snapshot());
    }

    #[test]
    fn a_corrupt_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        let err = DefinitionStore::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains(FILE_NAME), "{err}");
    }
}
