//! Changes to vhosts, users and permissions, as the management API makes them: each applied
//! in memory and written to the definitions before it is reported done.

use super::Broker;
use super::vhost::{Vhost, VhostMeta};
use crate::auth::{Permission, User, hash_password};
use crate::store::Command;
use std::sync::Arc;

/// Why an administrative change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
    /// The change could not be made now (no majority reachable, no answer in time); it may
    /// succeed later.
    #[error("{0}")]
    Unavailable(String),
}

impl From<crate::error::AmqpError> for AdminError {
    fn from(e: crate::error::AmqpError) -> Self {
        if e.is_transient() {
            Self::Unavailable(e.text)
        } else {
            Self::Internal(e.text)
        }
    }
}

/// How a user's password is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Password {
    Clear(String),
    /// Already hashed in RabbitMQ's SHA-256 format.
    Hash(String),
    /// No password: the user cannot log in with PLAIN/AMQPLAIN.
    None,
}

impl Broker {
    fn store_err(e: crate::store::DefinitionsError) -> AdminError {
        if let crate::store::DefinitionsError::Unavailable(reason) = e {
            return AdminError::Unavailable(reason);
        }
        tracing::error!(error = %e, "cannot write definitions");
        AdminError::Internal("cannot write definitions".into())
    }

    /// Creates a vhost, or updates its description and tags. Returns whether it was created.
    /// `default_queue_type`: `None` leaves an existing vhost's as it is, `Some(None)` takes it
    /// away.
    pub fn put_vhost(
        &self,
        name: &str,
        description: &str,
        tags: Vec<String>,
        default_queue_type: Option<Option<String>>,
    ) -> Result<bool, AdminError> {
        if let Some(v) = self.vhost(name) {
            let mut meta = v.meta();
            meta.description = description.to_owned();
            meta.tags = tags;
            if let Some(t) = default_queue_type {
                meta.default_queue_type = t;
            }
            v.set_meta(meta).map_err(AdminError::from)?;
            return Ok(false);
        }
        let v = Vhost::new(
            name,
            self.definitions.clone(),
            self.storage.clone(),
            self.window,
            self.churn.clone(),
            self.forwarder.clone(),
        );
        v.set_meta(VhostMeta {
            description: description.to_owned(),
            tags,
            limits: Default::default(),
            default_queue_type: default_queue_type.flatten(),
        })
        .map_err(AdminError::from)?;
        self.vhosts.write().insert(name.to_owned(), v);
        tracing::info!(vhost = name, "vhost created");
        Ok(true)
    }

    /// Deletes a vhost: its connections are closed (320, the socket dropped at once), its
    /// queues and their messages, exchanges, bindings and permissions removed.
    pub fn delete_vhost(&self, name: &str) -> Result<(), AdminError> {
        // The vhost leaves the node's sums and its queues' counters enter the retired ones in
        // one step under `retiring`, so a scrape never sees them twice or not at all.
        if self.vhost(name).is_none() {
            return Err(AdminError::NotFound(format!("vhost {name} not found")));
        }
        self.definitions
            .commit(Command::DeleteVhost {
                name: name.to_owned(),
            })
            .map_err(Self::store_err)?;
        let v = {
            let _retiring = self.churn.retiring.write();
            let Some(v) = self.vhosts.write().remove(name) else {
                return Err(AdminError::NotFound(format!("vhost {name} not found")));
            };
            v.retire_counters();
            v
        };
        for c in self.connections.in_vhost(name) {
            c.force_close_at_once(&format!("vhost '{name}' is down"));
        }
        v.remove_everything();
        self.users.clear_vhost(name);
        tracing::info!(vhost = name, "vhost deleted");
        Ok(())
    }

    /// Sets (value ≥ 0) or clears (`None`) a vhost limit (`max-connections`, `max-queues`).
    pub fn set_vhost_limit(
        &self,
        vhost: &str,
        limit: &str,
        value: Option<i64>,
    ) -> Result<(), AdminError> {
        if !crate::broker::vhost::VHOST_LIMITS.contains(&limit) {
            return Err(AdminError::BadRequest(format!("unknown limit {limit}")));
        }
        let v = self
            .vhost(vhost)
            .ok_or_else(|| AdminError::NotFound(format!("vhost {vhost} not found")))?;
        let mut meta = v.meta();
        match value {
            Some(n) => meta.limits.insert(limit.to_owned(), n),
            None => meta.limits.remove(limit),
        };
        v.set_meta(meta).map_err(AdminError::from)
    }

    /// Creates or updates a user. Returns whether it was created.
    pub fn put_user(
        &self,
        name: &str,
        password: Password,
        tags: Vec<String>,
    ) -> Result<bool, AdminError> {
        let existing = self.users.get(name);
        let password_hash = match password {
            Password::Clear(p) => hash_password(&p),
            Password::Hash(h) => h,
            Password::None => existing
                .as_ref()
                .map(|u| u.password_hash.clone())
                .unwrap_or_default(),
        };
        self.definitions
            .commit(Command::PutUser {
                name: name.to_owned(),
                password_hash: password_hash.clone(),
                tags: tags.clone(),
            })
            .map_err(Self::store_err)?;
        self.users.put(User {
            name: name.to_owned(),
            password_hash,
            tags,
        });
        Ok(existing.is_none())
    }

    pub fn delete_user(&self, name: &str) -> Result<(), AdminError> {
        if self.users.get(name).is_none() {
            return Err(AdminError::NotFound(format!("user {name} not found")));
        }
        self.definitions
            .commit(Command::DeleteUser {
                name: name.to_owned(),
            })
            .map_err(Self::store_err)?;
        self.users.remove(name);
        Ok(())
    }

    /// Sets a user's permissions in a vhost. Returns whether they were new.
    pub fn set_permission(
        &self,
        user: &str,
        vhost: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<bool, AdminError> {
        if self.users.get(user).is_none() {
            return Err(AdminError::BadRequest(format!(
                "user {user} does not exist"
            )));
        }
        if self.vhost(vhost).is_none() {
            return Err(AdminError::BadRequest(format!(
                "vhost {vhost} does not exist"
            )));
        }
        let permission = Permission::new(configure, write, read).map_err(AdminError::BadRequest)?;
        let created = self.users.permission(user, vhost).is_none();
        self.definitions
            .commit(Command::SetPermission {
                user: user.to_owned(),
                vhost: vhost.to_owned(),
                configure: configure.to_owned(),
                write: write.to_owned(),
                read: read.to_owned(),
            })
            .map_err(Self::store_err)?;
        self.users.set_permission(user, vhost, permission);
        Ok(created)
    }

    pub fn clear_permission(&self, user: &str, vhost: &str) -> Result<(), AdminError> {
        if self.users.permission(user, vhost).is_none() {
            return Err(AdminError::NotFound(format!(
                "no permissions for {user} in {vhost}"
            )));
        }
        self.definitions
            .commit(Command::ClearPermission {
                user: user.to_owned(),
                vhost: vhost.to_owned(),
            })
            .map_err(Self::store_err)?;
        self.users.clear_permission(user, vhost);
        Ok(())
    }

    pub fn vhost_or_404(&self, name: &str) -> Result<Arc<Vhost>, AdminError> {
        self.vhost(name)
            .ok_or_else(|| AdminError::NotFound(format!("vhost {name} not found")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::exchange::{ExchangeKind, ExchangeSpec};
    use crate::broker::policy::{Policy, PolicyKind};
    use crate::broker::queue::QueueSpec;
    use crate::broker::vhost::DestinationKind;
    use crate::config::Config;
    use amq_protocol::types::FieldTable;

    fn open(dir: &std::path::Path) -> Arc<Broker> {
        Broker::open(Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        })
        .expect("broker opens")
    }

    fn queue(name: &str) -> QueueSpec {
        QueueSpec {
            name: name.into(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
        }
    }

    /// Every kind of change, made as the management API and AMQP make them, is found again
    /// by a broker opened on the same directory (through the metadata log).
    #[test]
    fn metadata_changes_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let b = open(dir.path());
            assert!(
                b.put_vhost("v", "d", vec!["t".into()], Some(Some("quorum".into())))
                    .unwrap()
            );
            b.set_vhost_limit("v", "max-queues", Some(7)).unwrap();
            b.set_vhost_limit("v", "max-connections", Some(3)).unwrap();
            b.set_vhost_limit("v", "max-connections", None).unwrap();
            b.put_user("u", Password::Clear("p".into()), vec!["management".into()])
                .unwrap();
            b.put_user("gone", Password::None, vec![]).unwrap();
            b.set_permission("u", "v", ".*", "", "^q").unwrap();
            b.delete_user("gone").unwrap();
            b.set_cluster_name("named").unwrap();
            let v = b.vhost("v").unwrap();
            v.declare_exchange(ExchangeSpec {
                name: "x".into(),
                kind: ExchangeKind::Topic,
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: FieldTable::default(),
            })
            .unwrap();
            for q in ["q1", "q2", "q3"] {
                v.declare_queue(queue(q), 1).unwrap();
            }
            v.bind(
                "x",
                "q1",
                DestinationKind::Queue,
                "a",
                &FieldTable::default(),
                1,
            )
            .unwrap();
            v.bind(
                "x",
                "q2",
                DestinationKind::Queue,
                "b",
                &FieldTable::default(),
                1,
            )
            .unwrap();
            v.unbind(
                "x",
                "q2",
                DestinationKind::Queue,
                "b",
                &FieldTable::default(),
                1,
            )
            .unwrap();
            v.bind(
                "x",
                "q3",
                DestinationKind::Queue,
                "c",
                &FieldTable::default(),
                1,
            )
            .unwrap();
            v.delete_queue("q3", false, false, 1).unwrap();
            let mut definition = serde_json::Map::new();
            definition.insert("max-length".into(), serde_json::json!(5));
            for (kind, name) in [(PolicyKind::Policy, "p"), (PolicyKind::Operator, "o")] {
                let p = Policy::of_kind(kind, name, "^q", "queues", 1, definition.clone());
                v.set_policy_of(kind, p.unwrap()).unwrap();
            }
            let p = Policy::new("gone", "^x", "all", 0, definition).unwrap();
            v.set_policy(p).unwrap();
            v.delete_policy("gone").unwrap();
            assert!(b.put_vhost("w", "", vec![], None).unwrap());
            b.delete_vhost("w").unwrap();
            b.storage.shutdown();
        }
        let b = open(dir.path());
        assert!(b.vhost("w").is_none());
        let v = b.vhost("v").expect("vhost v");
        let meta = v.meta();
        assert_eq!(
            (meta.description.as_str(), meta.tags.clone()),
            ("d", vec!["t".into()])
        );
        assert_eq!(meta.default_queue_type.as_deref(), Some("quorum"));
        assert_eq!(meta.limits, [("max-queues".to_owned(), 7)].into());
        assert!(b.users.get("u").is_some() && b.users.get("gone").is_none());
        assert!(b.users.permission("u", "v").is_some());
        assert_eq!(b.cluster_name(), "named");
        let mut queues: Vec<String> = v.queues().iter().map(|q| q.name().to_owned()).collect();
        queues.sort();
        assert_eq!(queues, ["q1", "q2"]);
        let keys: Vec<String> = v
            .exchange("x")
            .expect("exchange x")
            .bindings()
            .iter()
            .map(|b| b.routing_key.clone())
            .collect();
        assert_eq!(keys, ["a"]);
        assert!(v.policy("p").is_some() && v.policy("gone").is_none());
        assert!(v.policy_of(PolicyKind::Operator, "o").is_some());
    }
}
