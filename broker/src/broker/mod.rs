//! Routing and queues, with no I/O: vhosts hold exchanges, bindings and queues; queues hand
//! messages to consumers through the [`queue::DeliverySink`] the AMQP layer implements.
//! Everything outside the queue module holds a queue by its [`queue_ref::QueueRef`] handle.

pub mod admin;
pub mod connections;
pub mod dead_letter;
pub mod delayed;
pub mod exchange;
pub mod expiry;
pub mod fast_map;
pub mod headers;
pub mod message;
pub mod policy;
pub mod queue;
pub mod queue_ref;
pub mod ready;
pub mod stats;
pub mod throttle;
pub mod topic;
pub mod vhost;

use crate::alarms::Alarms;
use crate::auth::{Permission, User, Users, hash_password};
use crate::config::Config;
use crate::store::delayed::DelayedOptions;
use crate::store::file::FileStoreOptions;
use crate::store::{Command, DefinitionStore, DefinitionsError, Storage};
use parking_lot::RwLock;
use ready::Window;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use vhost::Vhost;

/// The broker's shared state: one per process.
#[derive(Debug)]
pub struct Broker {
    pub config: Config,
    pub users: Users,
    /// Durable definitions: vhosts, users, permissions, and each vhost's topology.
    pub definitions: Arc<DefinitionStore>,
    pub storage: Arc<Storage>,
    pub alarms: Arc<Alarms>,
    pub connections: connections::Connections,
    /// Objects created and closed since start.
    pub churn: Arc<stats::Churn>,
    /// When the broker started.
    pub started: std::time::SystemTime,
    /// Maintenance mode (a drain before the broker stops): client connections are closed and
    /// new ones refused, and readiness fails, so clients move to other brokers.
    pub draining: std::sync::atomic::AtomicBool,
    /// The cluster name when one was set (the `cluster_name` setting, else one stored by the
    /// management API or a definitions import); unset, the node name stands for it.
    cluster_name: RwLock<Option<String>>,
    /// Taken by a rename for its synced write, so that renames reach disk and memory in the
    /// same order while readers of the name are not held up.
    renaming: parking_lot::Mutex<()>,
    /// The in-memory window every queue gets.
    window: Window,
    vhosts: RwLock<HashMap<String, Arc<Vhost>>>,
    next_connection_id: AtomicU64,
}

impl Broker {
    /// Opens the data directory and recovers the durable definitions and messages in it.
    pub fn open(config: Config) -> Result<Arc<Self>, DefinitionsError> {
        let store = Arc::new(DefinitionStore::open(&config.data_dir)?);
        let storage = Storage::open(
            &config.data_dir,
            Duration::from_millis(config.flush_interval_ms),
            FileStoreOptions {
                segment_size: config.segment_size,
                ..FileStoreOptions::default()
            },
        )
        .map_err(|source| DefinitionsError::Io {
            path: config.data_dir.clone(),
            source,
        })?
        .with_delayed_options(DelayedOptions {
            memory_bytes: usize::try_from(config.delayed_memory_bytes).unwrap_or(usize::MAX),
            ..DelayedOptions::default()
        });
        // Before any queue opens its store: the stores of earlier versions get their current
        // names, found by way of the definitions.
        let defined: Vec<(String, String, u8)> = store
            .snapshot()
            .vhosts
            .iter()
            .flat_map(|(v, defs)| {
                defs.queues
                    .iter()
                    .map(|(q, def)| (v.clone(), q.clone(), queue::top_level(&def.arguments)))
            })
            .collect();
        let renamed = storage
            .migrate_legacy(&defined)
            .map_err(|source| DefinitionsError::Io {
                path: config.data_dir.clone(),
                source,
            })?;
        if renamed > 0 {
            // One-way: an earlier version would take the renamed stores for those of deleted
            // queues and delete them.
            tracing::warn!(
                stores = renamed,
                data_dir = %config.data_dir.display(),
                "queue stores renamed to the current layout; an earlier version started on this data directory would delete them and their messages"
            );
        }
        let broker = Self::with_store(config, store, Arc::new(storage));
        let durable: Vec<(String, String, u8)> = broker
            .vhosts()
            .iter()
            .flat_map(|v| {
                v.queues()
                    .into_iter()
                    .filter(|q| q.durable())
                    .map(|q| (v.name.to_string(), q.name().to_owned(), q.top_level()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let vhosts: Vec<String> = broker.vhosts().iter().map(|v| v.name.to_string()).collect();
        broker
            .storage
            .remove_stale_delayed(&vhosts)
            .map_err(|source| DefinitionsError::Io {
                path: broker.config.data_dir.clone(),
                source,
            })?;
        broker
            .storage
            .remove_stale(&durable)
            .map_err(|source| DefinitionsError::Io {
                path: broker.config.data_dir.clone(),
                source,
            })?;
        Ok(broker)
    }

    /// A broker that keeps nothing on disk.
    pub fn in_memory(config: Config) -> Arc<Self> {
        Self::with_store(
            config,
            Arc::new(DefinitionStore::in_memory()),
            Arc::new(Storage::in_memory()),
        )
    }

    fn with_store(config: Config, store: Arc<DefinitionStore>, storage: Arc<Storage>) -> Arc<Self> {
        let window = Window {
            messages: config.queue_window_messages,
            bytes: config.queue_window_bytes,
        };
        let users = Users::new(config.loopback_users.clone());
        let mut defs = store.snapshot();
        if defs.users.is_empty() {
            // A new node: the default user, with every permission on the default vhost, as
            // RabbitMQ creates it on first start.
            let user = Command::PutUser {
                name: config.default_user.clone(),
                password_hash: hash_password(&config.default_pass),
                tags: vec!["administrator".into()],
            };
            let permission = Command::SetPermission {
                user: config.default_user.clone(),
                vhost: "/".into(),
                configure: ".*".into(),
                write: ".*".into(),
                read: ".*".into(),
            };
            match store.commit(user).and_then(|()| store.commit(permission)) {
                Ok(()) => tracing::info!(
                    user = %config.default_user,
                    "first start: created the default user, an administrator with every permission on vhost /"
                ),
                Err(e) => tracing::error!(error = %e, "cannot store the default user"),
            }
            defs = store.snapshot();
        }
        for (name, u) in &defs.users {
            users.put(User {
                name: name.clone(),
                password_hash: u.password_hash.clone(),
                tags: u.tags.clone(),
            });
        }
        for p in &defs.permissions {
            match Permission::new(&p.configure, &p.write, &p.read) {
                Ok(permission) => users.set_permission(&p.user, &p.vhost, permission),
                Err(e) => {
                    tracing::warn!(user = %p.user, vhost = %p.vhost, error = %e, "skipping a stored permission with an invalid pattern")
                }
            }
        }
        let memory_limit = config.memory_high_watermark_bytes.unwrap_or_else(|| {
            (crate::alarms::total_memory() as f64 * config.memory_high_watermark) as u64
        });
        let alarms = Alarms::new(
            config.data_dir.clone(),
            memory_limit,
            config.disk_free_limit,
        );
        if let Some(flusher) = storage.flusher() {
            // Free disk is checked as fast as the stores use it, not only on the timer.
            let alarms = Arc::downgrade(&alarms);
            flusher.observe_writes(Box::new(move |bytes| {
                if let Some(a) = alarms.upgrade() {
                    a.disk_written(bytes);
                }
            }));
        }
        let churn = Arc::new(stats::Churn::default());
        // As RabbitMQ: the configured name applies at every start; one set at run time lasts
        // until the next start that configures another.
        let cluster_name = config.cluster_name.clone().or(defs.cluster_name.clone());
        let broker = Self {
            cluster_name: RwLock::new(cluster_name),
            renaming: parking_lot::Mutex::new(()),
            churn: churn.clone(),
            started: std::time::SystemTime::now(),
            config,
            users,
            definitions: store.clone(),
            storage: storage.clone(),
            alarms,
            connections: connections::Connections::default(),
            window,
            vhosts: RwLock::new(HashMap::new()),
            next_connection_id: AtomicU64::new(1),
            draining: std::sync::atomic::AtomicBool::new(false),
        };
        let mut vhosts = broker.vhosts.write();
        vhosts.insert(
            "/".into(),
            Vhost::new("/", store.clone(), storage.clone(), window, churn.clone()),
        );
        for (name, vdefs) in &defs.vhosts {
            let v = vhosts.entry(name.clone()).or_insert_with(|| {
                Vhost::new(name, store.clone(), storage.clone(), window, churn.clone())
            });
            v.restore(vdefs);
        }
        drop(vhosts);
        Arc::new(broker)
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<Vhost>> {
        self.vhosts.read().get(name).cloned()
    }

    pub fn vhosts(&self) -> Vec<Arc<Vhost>> {
        self.vhosts.read().values().cloned().collect()
    }

    /// The cluster's name as clients and tools see it.
    pub fn cluster_name(&self) -> String {
        self.cluster_name
            .read()
            .clone()
            .unwrap_or_else(|| self.config.node_name.clone())
    }

    /// The cluster name when one was set, for a definitions export.
    pub fn cluster_name_if_set(&self) -> Option<String> {
        self.cluster_name.read().clone()
    }

    /// Renames the cluster, durably (RabbitMQ's `set_cluster_name`).
    pub fn set_cluster_name(&self, name: &str) -> Result<(), DefinitionsError> {
        let _renaming = self.renaming.lock();
        self.definitions.commit(Command::SetClusterName {
            name: name.to_owned(),
        })?;
        *self.cluster_name.write() = Some(name.to_owned());
        Ok(())
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}
