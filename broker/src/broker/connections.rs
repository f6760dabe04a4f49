//! The open client connections, as the management API and vhost deletion see them: who is
//! connected to what, and a way to close a connection from outside (320 CONNECTION_FORCED).

use amq_protocol::types::FieldTable;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::sync::watch;

/// One open connection.
#[derive(Debug)]
pub struct ConnectionInfo {
    pub id: u64,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub user: String,
    pub vhost: String,
    /// Milliseconds since the Unix epoch.
    pub connected_at: u64,
    pub client_properties: FieldTable,
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
    pub channels: AtomicUsize,
    pub recv_oct: AtomicU64,
    pub send_oct: AtomicU64,
    /// Set to a reason to make the connection close itself with 320.
    close: watch::Sender<Option<String>>,
}

impl ConnectionInfo {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        peer: SocketAddr,
        local: SocketAddr,
        user: String,
        vhost: String,
        client_properties: FieldTable,
        channel_max: u16,
        frame_max: u32,
        heartbeat: u16,
    ) -> (Arc<Self>, watch::Receiver<Option<String>>) {
        let (close, closed) = watch::channel(None);
        let connected_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        (
            Arc::new(Self {
                id,
                peer,
                local,
                user,
                vhost,
                connected_at,
                client_properties,
                channel_max,
                frame_max,
                heartbeat,
                channels: AtomicUsize::new(0),
                recv_oct: AtomicU64::new(0),
                send_oct: AtomicU64::new(0),
                close,
            }),
            closed,
        )
    }

    /// RabbitMQ's name for a connection: `peer -> local`.
    pub fn name(&self) -> String {
        format!("{} -> {}", self.peer, self.local)
    }

    pub fn channel_count(&self) -> usize {
        self.channels.load(Ordering::Relaxed)
    }

    /// Asks the connection to close with 320 CONNECTION_FORCED and `reason`.
    pub fn force_close(&self, reason: &str) {
        self.close.send_replace(Some(reason.to_owned()));
    }
}

#[derive(Debug, Default)]
pub struct Connections {
    open: RwLock<HashMap<u64, Arc<ConnectionInfo>>>,
}

impl Connections {
    pub fn add(&self, info: Arc<ConnectionInfo>) {
        self.open.write().insert(info.id, info);
    }

    pub fn remove(&self, id: u64) {
        self.open.write().remove(&id);
    }

    pub fn list(&self) -> Vec<Arc<ConnectionInfo>> {
        let mut all: Vec<_> = self.open.read().values().cloned().collect();
        all.sort_by_key(|c| c.id);
        all
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<ConnectionInfo>> {
        self.open
            .read()
            .values()
            .find(|c| c.name() == name)
            .cloned()
    }

    pub fn in_vhost(&self, vhost: &str) -> Vec<Arc<ConnectionInfo>> {
        self.list()
            .into_iter()
            .filter(|c| c.vhost == vhost)
            .collect()
    }

    pub fn count(&self) -> usize {
        self.open.read().len()
    }
}
