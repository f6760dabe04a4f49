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
pub mod remote;
pub mod stats;
pub mod throttle;
pub mod topic;
pub mod vhost;

use crate::alarms::Alarms;
use crate::auth::{Permission, User, Users, hash_password};
use crate::cluster::Cluster;
use crate::cluster::meta_state::Proposal;
use crate::cluster::metadata::Metadata;
use crate::config::Config;
use crate::store::definitions::Definitions;
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
    /// The links to the other nodes (none for a broker that keeps nothing on disk).
    pub cluster: Option<Arc<Cluster>>,
    /// This node's member of the cluster's metadata group, which holds the definitions.
    pub metadata: Option<Metadata>,
    /// Serves this node's queues to the other nodes and theirs to this node's clients.
    pub forwarder: Option<Arc<remote::Forwarder>>,
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
    /// The definitions are the cluster's: this node's member of its metadata group opens
    /// here (a node given no peers is a cluster of one, formed now if it is new).
    pub fn open(config: Config) -> Result<Arc<Self>, DefinitionsError> {
        let io = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| DefinitionsError::Io { path, source }
        };
        let cluster = Cluster::new(&config).map_err(io(&config.data_dir))?;
        let group_dir = config.data_dir.join("metadata");
        let metadata = Metadata::open(cluster.clone(), &group_dir).map_err(io(&group_dir))?;
        let store = Arc::new(DefinitionStore::replicated(Arc::new(metadata.clone())));
        let formed_here = metadata.form_alone_if_first();
        if formed_here {
            seed(&config, &store, &metadata)?;
        }
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
        let defined: Vec<(String, String, u8)> = metadata.state().with_definitions(|d| {
            d.vhosts
                .iter()
                .flat_map(|(v, defs)| {
                    defs.queues
                        .iter()
                        .map(|(q, def)| (v.clone(), q.clone(), queue::top_level(&def.arguments)))
                })
                .collect()
        });
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
        let (applied, entries) = std::sync::mpsc::channel::<(u64, Proposal)>();
        // The live objects are made from the definitions outside the state machine's lock;
        // entries applied meanwhile wait in the channel.
        let defs = metadata.follow(
            |defs, _| defs.clone(),
            Box::new(move |index, proposal| {
                let _ = applied.send((index, proposal));
            }),
        );
        let forwarder = remote::Forwarder::new(cluster.clone(), metadata.runtime().clone());
        let mut broker = Self::with_store(
            config,
            store,
            Arc::new(storage),
            defs,
            Some(forwarder.clone()),
        );
        broker.cluster = Some(cluster);
        broker.metadata = Some(metadata.clone());
        let broker = Arc::new(broker);
        let home: Arc<dyn remote::Home> = broker.clone();
        forwarder.start(Arc::downgrade(&home));
        spawn_applier(&broker, entries)?;
        if !formed_here {
            spawn_seeder(&broker);
        }
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
        if !metadata.caught_up() {
            // Entries this node committed before it stopped are not applied yet (they wait
            // for the cluster): stores that look stale may be those of their queues.
            tracing::info!(
                "the cluster's definitions are not all applied yet: stale queue stores are left for a later start"
            );
            return Ok(broker);
        }
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
        let store = Arc::new(DefinitionStore::in_memory());
        let mut defs = store.snapshot();
        if defs.users.is_empty() {
            for c in default_user(&config) {
                store
                    .commit(c)
                    .expect("an in-memory store takes every command");
            }
            defs = store.snapshot();
        }
        Arc::new(Self::with_store(
            config,
            store,
            Arc::new(Storage::in_memory()),
            defs,
            None,
        ))
    }

    fn with_store(
        config: Config,
        store: Arc<DefinitionStore>,
        storage: Arc<Storage>,
        defs: Definitions,
        forwarder: Option<Arc<remote::Forwarder>>,
    ) -> Self {
        let window = Window {
            messages: config.queue_window_messages,
            bytes: config.queue_window_bytes,
        };
        let users = Users::new(config.loopback_users.clone());
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
            cluster: None,
            metadata: None,
            forwarder: forwarder.clone(),
            window,
            vhosts: RwLock::new(HashMap::new()),
            next_connection_id: AtomicU64::new(1),
            draining: std::sync::atomic::AtomicBool::new(false),
        };
        let mut vhosts = broker.vhosts.write();
        vhosts.insert(
            "/".into(),
            Vhost::new(
                "/",
                store.clone(),
                storage.clone(),
                window,
                churn.clone(),
                forwarder.clone(),
            ),
        );
        for (name, vdefs) in &defs.vhosts {
            let v = vhosts.entry(name.clone()).or_insert_with(|| {
                Vhost::new(
                    name,
                    store.clone(),
                    storage.clone(),
                    window,
                    churn.clone(),
                    forwarder.clone(),
                )
            });
            v.restore(vdefs);
        }
        drop(vhosts);
        broker
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

    /// Why this node cannot serve clients yet as part of its cluster, if it cannot: it has
    /// not joined a formed cluster, or the cluster's definitions are not seeded (no user).
    pub fn cluster_not_ready(&self) -> Option<&'static str> {
        let metadata = self.metadata.as_ref()?;
        let state = metadata.state();
        if !state.has_membership() {
            return Some("not yet part of a formed cluster (waiting for its peers)");
        }
        if state.with_definitions(|d| d.users.is_empty()) {
            return Some("the cluster's definitions are not seeded yet");
        }
        None
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Makes a change to this node's live objects with the methods a local change uses: a
    /// change committed by another node (inside [`DefinitionStore::from_log`], which skips
    /// their commits), or one to commit from here (seeding a new cluster).
    fn apply_command(&self, command: &Command) {
        use crate::broker::exchange::{ExchangeKind, ExchangeSpec};
        use crate::broker::policy::{Policy, PolicyKind};
        use crate::broker::queue::QueueSpec;
        use crate::broker::vhost::DestinationKind;
        let vhost = |name: &str| self.vhost(name).ok_or_else(|| format!("no vhost {name}"));
        let result: Result<(), String> = match command {
            Command::PutVhost {
                name,
                description,
                tags,
                default_queue_type,
            } => self
                .put_vhost(
                    name,
                    description,
                    tags.clone(),
                    Some(default_queue_type.clone()),
                )
                .map(drop)
                .map_err(|e| e.to_string()),
            Command::DeleteVhost { name } => match self.delete_vhost(name) {
                Err(admin::AdminError::NotFound(_)) => Ok(()),
                other => other.map_err(|e| e.to_string()),
            },
            Command::SetVhostLimit { vhost, name, value } => self
                .set_vhost_limit(vhost, name, Some(*value))
                .map_err(|e| e.to_string()),
            Command::ClearVhostLimit { vhost, name } => self
                .set_vhost_limit(vhost, name, None)
                .map_err(|e| e.to_string()),
            Command::PutUser {
                name,
                password_hash,
                tags,
            } => self
                .put_user(
                    name,
                    admin::Password::Hash(password_hash.clone()),
                    tags.clone(),
                )
                .map(drop)
                .map_err(|e| e.to_string()),
            Command::DeleteUser { name } => match self.delete_user(name) {
                Err(admin::AdminError::NotFound(_)) => Ok(()),
                other => other.map_err(|e| e.to_string()),
            },
            Command::SetPermission {
                user,
                vhost,
                configure,
                write,
                read,
            } => self
                .set_permission(user, vhost, configure, write, read)
                .map(drop)
                .map_err(|e| e.to_string()),
            Command::ClearPermission { user, vhost } => match self.clear_permission(user, vhost) {
                Err(admin::AdminError::NotFound(_)) => Ok(()),
                other => other.map_err(|e| e.to_string()),
            },
            Command::DeclareExchange {
                vhost: v,
                name,
                kind,
                auto_delete,
                internal,
                arguments,
            } => ExchangeKind::parse(kind)
                .ok_or_else(|| format!("unknown exchange type {kind}"))
                .and_then(|kind| {
                    vhost(v)?
                        .declare_exchange(ExchangeSpec {
                            name: name.clone(),
                            kind,
                            durable: true,
                            auto_delete: *auto_delete,
                            internal: *internal,
                            arguments: arguments.clone(),
                        })
                        .map(drop)
                        .map_err(|e| e.text)
                }),
            Command::DeleteExchange { vhost: v, name } => vhost(v).and_then(|v| {
                v.delete_exchange(name, false)
                    .or_else(|e| {
                        if e.code == crate::error::NOT_FOUND {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| e.text)
            }),
            Command::DeclareQueue {
                vhost: v,
                name,
                auto_delete,
                arguments,
                node,
            } => vhost(v).and_then(|v| {
                v.import_queue(
                    QueueSpec {
                        name: name.clone(),
                        durable: true,
                        exclusive: false,
                        auto_delete: *auto_delete,
                        arguments: arguments.clone(),
                    },
                    node.as_deref(),
                )
                .map(drop)
                .map_err(|e| e.text)
            }),
            Command::DeleteQueue { vhost: v, name } => vhost(v).and_then(|v| {
                v.delete_queue(name, false, false, 0)
                    .map(drop)
                    .map_err(|e| e.text)
            }),
            Command::Bind {
                vhost: v,
                source,
                destination,
                destination_type,
                routing_key,
                arguments,
            }
            | Command::Unbind {
                vhost: v,
                source,
                destination,
                destination_type,
                routing_key,
                arguments,
            } => vhost(v).and_then(|v| {
                let kind = if destination_type == "exchange" {
                    DestinationKind::Exchange
                } else {
                    DestinationKind::Queue
                };
                let bound = if matches!(command, Command::Bind { .. }) {
                    v.bind(source, destination, kind, routing_key, arguments, 0)
                } else {
                    v.unbind(source, destination, kind, routing_key, arguments, 0)
                };
                bound.map_err(|e| e.text)
            }),
            Command::PutPolicy {
                vhost: v,
                name,
                pattern,
                apply_to,
                priority,
                definition,
            }
            | Command::PutOperatorPolicy {
                vhost: v,
                name,
                pattern,
                apply_to,
                priority,
                definition,
            } => {
                let kind = if matches!(command, Command::PutPolicy { .. }) {
                    PolicyKind::Policy
                } else {
                    PolicyKind::Operator
                };
                vhost(v).and_then(|v| {
                    let policy = Policy::of_kind(
                        kind,
                        name,
                        pattern,
                        apply_to,
                        *priority,
                        definition.clone(),
                    )?;
                    v.set_policy_of(kind, policy).map(drop).map_err(|e| e.text)
                })
            }
            Command::DeletePolicy { vhost: v, name }
            | Command::DeleteOperatorPolicy { vhost: v, name } => {
                let kind = if matches!(command, Command::DeletePolicy { .. }) {
                    PolicyKind::Policy
                } else {
                    PolicyKind::Operator
                };
                vhost(v).and_then(|v| v.delete_policy_of(kind, name).map(drop).map_err(|e| e.text))
            }
            Command::SetClusterName { name } => {
                if self.config.cluster_name.is_none() {
                    *self.cluster_name.write() = Some(name.clone());
                }
                Ok(())
            }
        };
        if let Err(reason) = result {
            tracing::warn!(change = %command.what(), %reason, "a change committed by another node could not be made here");
        }
    }
}

/// The default user, with every permission on the default vhost, as RabbitMQ creates it on a
/// new node.
fn default_user(config: &Config) -> [Command; 2] {
    [
        Command::PutUser {
            name: config.default_user.clone(),
            password_hash: hash_password(&config.default_pass),
            tags: vec!["administrator".into()],
        },
        Command::SetPermission {
            user: config.default_user.clone(),
            vhost: "/".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        },
    ]
}

/// What a new cluster's definitions need: those an earlier version kept in this node's data
/// directory, and the default user when there is no user at all (none: nothing).
fn seed_commands(
    config: &Config,
    metadata: &Metadata,
) -> Result<Option<Vec<Command>>, DefinitionsError> {
    let mut commands = Vec::new();
    if let Some(legacy) = DefinitionStore::read_legacy(&config.data_dir)? {
        commands = crate::store::command::commands_of(&legacy);
        tracing::info!(
            commands = commands.len(),
            "importing the definitions an earlier version kept into the cluster's metadata"
        );
    }
    let no_users = metadata.state().with_definitions(|d| d.users.is_empty());
    if no_users
        && !commands
            .iter()
            .any(|c| matches!(c, Command::PutUser { .. }))
    {
        commands.extend(default_user(config));
    }
    Ok((!commands.is_empty()).then_some(commands))
}

/// Seeds the definitions of a node that forms a cluster of one, before its live objects are
/// made from them.
fn seed(
    config: &Config,
    store: &DefinitionStore,
    metadata: &Metadata,
) -> Result<(), DefinitionsError> {
    if let Some(commands) = seed_commands(config, metadata)? {
        let ((), stored) = store.batch(|| {
            for c in commands {
                let _ = store.commit(c);
            }
        });
        stored?;
        DefinitionStore::retire_legacy(&config.data_dir)?;
        told_of_default_user(config, metadata);
    }
    Ok(())
}

/// The log line of a new cluster's default user, once it is committed.
fn told_of_default_user(config: &Config, metadata: &Metadata) {
    let made = metadata
        .state()
        .with_definitions(|d| d.users.contains_key(&config.default_user));
    if made {
        tracing::info!(
            user = %config.default_user,
            "first start: created the default user, an administrator with every permission on vhost /"
        );
    }
}

/// Makes the changes other nodes commit to this node's live objects, in log order, on a
/// thread of its own (never on Raft's: a change waits for locks that a local declaration
/// holds while it waits for Raft).
fn spawn_applier(
    broker: &Arc<Broker>,
    entries: std::sync::mpsc::Receiver<(u64, Proposal)>,
) -> Result<(), DefinitionsError> {
    let weak = Arc::downgrade(broker);
    std::thread::Builder::new()
        .name("warren-metadata".into())
        .spawn(move || {
            while let Ok((_, proposal)) = entries.recv() {
                let Some(broker) = weak.upgrade() else {
                    return;
                };
                let Some(metadata) = &broker.metadata else {
                    return;
                };
                if metadata.made_here(&proposal) {
                    continue;
                }
                DefinitionStore::from_log(|| {
                    for c in &proposal.commands {
                        broker.apply_command(c);
                    }
                });
            }
        })
        .map(drop)
        .map_err(|source| DefinitionsError::Io {
            path: broker.config.data_dir.clone(),
            source,
        })
}

/// Seeds the definitions once the cluster has formed (a node with peers cannot before).
fn spawn_seeder(broker: &Arc<Broker>) {
    let weak = Arc::downgrade(broker);
    let _ = std::thread::Builder::new()
        .name("warren-seed".into())
        .spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_millis(100));
                let Some(broker) = weak.upgrade() else {
                    return;
                };
                let Some(metadata) = &broker.metadata else {
                    return;
                };
                if !metadata.has_leader() {
                    continue;
                }
                let commands = match seed_commands(&broker.config, metadata) {
                    Ok(Some(commands)) => commands,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the definitions to seed");
                        return;
                    }
                };
                // Made to the live objects here as they are committed.
                let ((), stored) = broker.definitions.batch(|| {
                    for c in &commands {
                        broker.apply_command(c);
                    }
                });
                match stored.and_then(|()| DefinitionStore::retire_legacy(&broker.config.data_dir))
                {
                    Ok(()) => {
                        told_of_default_user(&broker.config, metadata);
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot seed the definitions yet"),
                }
            }
        });
}

impl remote::Home for Broker {
    fn local_queue(&self, vhost: &str, name: &str) -> Option<queue_ref::QueueRef> {
        self.vhost(vhost)?
            .queue(name)
            .filter(|q| matches!(q, queue_ref::QueueRef::Local(_)))
    }

    fn remove_queue(&self, q: &queue_ref::QueueRef) {
        if let Some(v) = self.vhost(q.vhost()) {
            v.remove_queue(q);
        }
    }

    fn storage(&self) -> Arc<Storage> {
        self.storage.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::FieldTable;

    #[test]
    fn definitions_of_an_earlier_version_are_imported_once_at_the_first_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What an earlier version wrote: a snapshot and a log of changes after it.
            let legacy = DefinitionStore::open(dir.path()).unwrap();
            for c in [
                Command::PutUser {
                    name: "old".into(),
                    password_hash: hash_password("pw"),
                    tags: vec!["administrator".into()],
                },
                Command::DeclareQueue {
                    vhost: "/".into(),
                    name: "kept".into(),
                    auto_delete: false,
                    arguments: FieldTable::default(),
                    node: None,
                },
            ] {
                legacy.commit(c).unwrap();
            }
        }
        let config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        let broker = Broker::open(config.clone()).unwrap();
        assert!(broker.users.get("old").is_some());
        assert!(broker.vhost("/").unwrap().queue("kept").is_some());
        // Its users came along: no default user is made beside them.
        assert!(broker.users.get(&config.default_user).is_none());
        assert!(!dir.path().join("metadata.log").exists());
        assert!(dir.path().join("metadata.log.imported").exists());
        broker.storage.shutdown();
        drop(broker);
        let again = Broker::open(config).unwrap();
        assert!(again.vhost("/").unwrap().queue("kept").is_some());
        assert!(again.users.get("old").is_some());
    }
}
