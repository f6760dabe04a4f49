//! Routing and queues, with no I/O: vhosts hold exchanges, bindings and queues; queues hand
//! messages to consumers through the [`queue::DeliverySink`] the AMQP layer implements.

pub mod exchange;
pub mod headers;
pub mod message;
pub mod queue;
pub mod ready;
pub mod topic;
pub mod vhost;

use crate::alarms::Alarms;
use crate::auth::{User, Users, hash_password};
use crate::config::Config;
use crate::store::file::FileStoreOptions;
use crate::store::{DefinitionStore, DefinitionsError, Storage};
use parking_lot::RwLock;
use ready::Window;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use vhost::Vhost;

/// Maps keyed by names on the publish path (exchange and queue names, routing keys): foldhash,
/// randomly seeded per map like the standard hasher, but several times faster on short keys.
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The broker's shared state: one per process.
#[derive(Debug)]
pub struct Broker {
    pub config: Config,
    pub users: Users,
    pub storage: Arc<Storage>,
    pub alarms: Arc<Alarms>,
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
        })?;
        let broker = Self::with_store(config, store, Arc::new(storage));
        let durable: Vec<(String, String)> = broker
            .vhosts()
            .iter()
            .flat_map(|v| {
                v.queues()
                    .into_iter()
                    .filter(|q| q.spec.durable)
                    .map(|q| (v.name.to_string(), q.name().to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect();
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
        users.put(User {
            name: config.default_user.clone(),
            password_hash: hash_password(&config.default_pass),
            tags: vec!["administrator".into()],
        });
        let memory_limit = config.memory_high_watermark_bytes.unwrap_or_else(|| {
            (crate::alarms::total_memory() as f64 * config.memory_high_watermark) as u64
        });
        let alarms = Alarms::new(
            config.data_dir.clone(),
            memory_limit,
            config.disk_free_limit,
        );
        let broker = Self {
            config,
            users,
            storage: storage.clone(),
            alarms,
            vhosts: RwLock::new(HashMap::new()),
            next_connection_id: AtomicU64::new(1),
        };
        let defs = store.snapshot();
        let mut vhosts = broker.vhosts.write();
        vhosts.insert(
            "/".into(),
            Vhost::new("/", store.clone(), storage.clone(), window),
        );
        for (name, vdefs) in &defs.vhosts {
            let v = vhosts
                .entry(name.clone())
                .or_insert_with(|| Vhost::new(name, store.clone(), storage.clone(), window));
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

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}
