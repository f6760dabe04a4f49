//! Routing and queues, with no I/O: vhosts hold exchanges, bindings and queues; queues hand
//! messages to consumers through the [`queue::DeliverySink`] the AMQP layer implements.

pub mod exchange;
pub mod headers;
pub mod message;
pub mod queue;
pub mod topic;
pub mod vhost;

use crate::auth::{User, Users, hash_password};
use crate::config::Config;
use crate::store::{DefinitionStore, DefinitionsError};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use vhost::Vhost;

/// The broker's shared state: one per process.
#[derive(Debug)]
pub struct Broker {
    pub config: Config,
    pub users: Users,
    vhosts: RwLock<HashMap<String, Arc<Vhost>>>,
    next_connection_id: AtomicU64,
}

impl Broker {
    /// Opens the data directory and recovers the durable definitions in it.
    pub fn open(config: Config) -> Result<Arc<Self>, DefinitionsError> {
        let store = Arc::new(DefinitionStore::open(&config.data_dir)?);
        Ok(Self::with_store(config, store))
    }

    /// A broker that keeps nothing on disk.
    pub fn in_memory(config: Config) -> Arc<Self> {
        Self::with_store(config, Arc::new(DefinitionStore::in_memory()))
    }

    fn with_store(config: Config, store: Arc<DefinitionStore>) -> Arc<Self> {
        let users = Users::new(config.loopback_users.clone());
        users.put(User {
            name: config.default_user.clone(),
            password_hash: hash_password(&config.default_pass),
            tags: vec!["administrator".into()],
        });
        let broker = Self {
            config,
            users,
            vhosts: RwLock::new(HashMap::new()),
            next_connection_id: AtomicU64::new(1),
        };
        let defs = store.snapshot();
        let mut vhosts = broker.vhosts.write();
        vhosts.insert("/".into(), Vhost::new("/", store.clone()));
        for (name, vdefs) in &defs.vhosts {
            let v = vhosts
                .entry(name.clone())
                .or_insert_with(|| Vhost::new(name, store.clone()));
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
