//! Everything that touches disk. Only this module reads or writes files.
//!
//! - [`definitions`]: vhosts, exchanges, queues and bindings, written atomically.
//! - [`QueueStore`]: the seam between a queue and where its messages live. A queue writes a
//!   message to its store when it must survive a restart (persistent message, durable queue)
//!   or when the queue's in-memory window is full (paging); it reads them back in order as
//!   consumers catch up. [`file::FileQueueStore`] keeps them in segment files with a
//!   slot-per-message index; [`memory::MemoryQueueStore`] keeps them in memory (tests, and
//!   brokers without a data directory). Both pass the conformance suite in `conformance.rs`.
//! - [`delayed`]: the messages of delayed exchanges until they are due.
//! - [`flusher`]: group commit across all stores.

pub mod definitions;
pub mod delayed;
pub mod file;
pub mod flusher;
pub mod memory;
pub mod record;

#[cfg(test)]
mod conformance;

pub use definitions::{DefinitionStore, Definitions, DefinitionsError};
pub use record::RecordKind;

use crate::broker::message::Message;
use delayed::{DelayedOptions, DelayedStore};
use file::{FileQueueStore, FileStoreOptions};
use flusher::Flusher;
use memory::MemoryQueueStore;
use sha2::{Digest, Sha256};
use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Where a stored message is, as the queue remembers it: enough to rewrite its index slot
/// (mark it delivered or removed) without reading anything back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub kind: RecordKind,
    pub segment: u32,
    pub offset: u32,
    pub record_len: u32,
    pub body_len: u32,
}

/// The result of an append: where it went, and the flush epoch after which it is on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    pub location: Location,
    pub epoch: u64,
}

/// A message read back from a store.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub seq: u64,
    pub message: Message,
    pub location: Location,
    /// It was handed to a consumer before (its delivery was recorded).
    pub delivered: bool,
    /// Times it came back unacknowledged, as last recorded.
    pub returned: u16,
}

/// A batch read by [`QueueStore::read`].
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub messages: Vec<StoredMessage>,
    /// Where the next read should start.
    pub next: u64,
    /// Entries found damaged and dropped on the way (already logged with file and offset).
    pub dropped: u64,
}

/// What a store held when it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Live persistent messages.
    pub count: u64,
    /// Their body bytes.
    pub bytes: u64,
    /// The lowest live sequence number (where reading starts).
    pub first_seq: u64,
    /// One past the highest sequence number ever stored.
    pub next_seq: u64,
    /// Live messages below this sequence number were (probably) delivered before: the
    /// newest recorded delivery. They come back marked redelivered.
    pub redelivered_below: u64,
}

/// The messages of one queue that are not (only) in memory.
pub trait QueueStore: Send + Sync + Debug {
    /// Stores a message under its queue sequence number (increasing between calls).
    fn append(&self, seq: u64, message: &Message, kind: RecordKind) -> Stored;

    /// Records that the message was handed to a consumer, so that it comes back marked
    /// redelivered after a restart, and the times it came back unacknowledged so far (kept
    /// across restarts for `x-delivery-limit`).
    fn mark_delivered(&self, seq: u64, at: Location, returned: u16);

    /// Forgets a message: acknowledged, dropped or purged.
    fn remove(&self, seq: u64, at: Location);

    /// Reads, in sequence order from `from` (up to `until`, exclusive), at most `max` live
    /// messages and about `max_bytes` of bodies.
    fn read(&self, from: u64, until: u64, max: usize, max_bytes: u64) -> ReadBatch;

    /// Forgets every live message in `[from, until)`; returns how many there were.
    fn remove_range(&self, from: u64, until: u64) -> u64;

    /// Deletes the store and everything in it (the queue was deleted).
    fn destroy(&self);

    /// The newest flush epoch known to be on disk (messages stamped with an epoch up to it
    /// are durable).
    fn durable_epoch(&self) -> u64;
}

/// A directory name from a digest: its first 16 bytes in hex.
fn hex_name(digest: &[u8]) -> String {
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The name of a durable queue's store directory: a digest of its vhost, name and priority
/// level. Names may hold any character, NUL included, so each part is length-prefixed: no
/// two queues (or levels) can share a directory.
fn durable_dir_name(vhost: &str, queue: &str, level: u8) -> String {
    let mut h = Sha256::new();
    h.update(b"queue\0");
    h.update((vhost.len() as u64).to_be_bytes());
    h.update(vhost.as_bytes());
    h.update((queue.len() as u64).to_be_bytes());
    h.update(queue.as_bytes());
    h.update([level]);
    hex_name(&h.finalize())
}

/// The name the store directory had in earlier versions: vhost and queue joined by a NUL
/// (and a NUL and the level after them for a level above 0), which names could forge.
fn legacy_durable_dir_name(vhost: &str, queue: &str, level: u8) -> String {
    let mut h = Sha256::new();
    h.update(vhost.as_bytes());
    h.update([0]);
    h.update(queue.as_bytes());
    if level > 0 {
        h.update([0, level]);
    }
    hex_name(&h.finalize())
}

/// Who a store directory belongs to, as its `queue.json` says.
#[derive(serde::Deserialize)]
struct StoreOwner {
    vhost: String,
    queue: String,
    priority: u8,
}

/// Renames the store directories of earlier versions to their current names, so that their
/// messages are found. Each directory names its owner in `queue.json`; one whose name is not
/// the legacy name of that owner is left alone (it is not from an earlier version).
fn migrate_legacy_dirs(queues: &Path) -> io::Result<()> {
    let mut renamed = false;
    for entry in std::fs::read_dir(queues)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Ok(bytes) = std::fs::read(path.join("queue.json")) else {
            continue;
        };
        let Ok(owner) = serde_json::from_slice::<StoreOwner>(&bytes) else {
            continue;
        };
        let current = durable_dir_name(&owner.vhost, &owner.queue, owner.priority);
        if name == current
            || name != legacy_durable_dir_name(&owner.vhost, &owner.queue, owner.priority)
        {
            continue;
        }
        let target = queues.join(&current);
        if target.exists() {
            continue;
        }
        tracing::info!(from = %path.display(), to = %target.display(), "renaming a queue store to its current name");
        std::fs::rename(&path, &target)?;
        renamed = true;
    }
    if renamed {
        std::fs::File::open(queues)?.sync_all()?;
    }
    Ok(())
}

/// Where queues keep their messages: a data directory with a flusher, or memory only.
#[derive(Debug)]
pub struct Storage {
    dir: Option<PathBuf>,
    flusher: Option<Arc<Flusher>>,
    options: FileStoreOptions,
    delayed: DelayedOptions,
    next_transient: AtomicU64,
}

impl Storage {
    /// Messages in `data_dir`: `queues/` for durable queues, `transient/` (emptied at start)
    /// for the paged messages of non-durable queues.
    pub fn open(
        data_dir: &Path,
        flush_interval: Duration,
        options: FileStoreOptions,
    ) -> io::Result<Self> {
        let transient = data_dir.join("transient");
        if transient.exists() {
            std::fs::remove_dir_all(&transient)?;
        }
        std::fs::create_dir_all(data_dir.join("queues"))?;
        migrate_legacy_dirs(&data_dir.join("queues"))?;
        Ok(Self {
            dir: Some(data_dir.to_path_buf()),
            flusher: Some(Flusher::start(flush_interval)),
            options,
            delayed: DelayedOptions::default(),
            next_transient: AtomicU64::new(0),
        })
    }

    /// Sets the tunables of delayed-message stores.
    pub fn with_delayed_options(mut self, options: DelayedOptions) -> Self {
        self.delayed = options;
        self
    }

    /// Everything in memory: nothing survives a restart.
    pub fn in_memory() -> Self {
        Self {
            dir: None,
            flusher: None,
            options: FileStoreOptions::default(),
            delayed: DelayedOptions::default(),
            next_transient: AtomicU64::new(0),
        }
    }

    pub fn flusher(&self) -> Option<&Arc<Flusher>> {
        self.flusher.as_ref()
    }

    /// The directory of a durable queue's store; a priority queue has one per priority level
    /// (level 0 is the queue's own).
    fn durable_dir(&self, dir: &Path, vhost: &str, queue: &str, level: u8) -> PathBuf {
        dir.join("queues")
            .join(durable_dir_name(vhost, queue, level))
    }

    /// Opens the store of a durable queue and recovers its messages. With `fresh`, whatever
    /// a deleted queue of the same name left behind is removed first.
    pub fn open_durable(
        &self,
        vhost: &str,
        queue: &str,
        fresh: bool,
    ) -> io::Result<(Arc<dyn QueueStore>, Recovered)> {
        self.open_durable_level(vhost, queue, 0, fresh)
    }

    /// Opens the store of one priority level of a durable queue, as [`Storage::open_durable`].
    pub fn open_durable_level(
        &self,
        vhost: &str,
        queue: &str,
        level: u8,
        fresh: bool,
    ) -> io::Result<(Arc<dyn QueueStore>, Recovered)> {
        match (&self.dir, &self.flusher) {
            (Some(dir), Some(flusher)) => {
                let path = self.durable_dir(dir, vhost, queue, level);
                if fresh && path.exists() {
                    std::fs::remove_dir_all(&path)?;
                }
                let (store, recovered) =
                    FileQueueStore::open(&path, flusher.clone(), self.options)?;
                let id = format!(
                    "{{\"vhost\":{},\"queue\":{},\"priority\":{level}}}\n",
                    serde_json::Value::from(vhost),
                    serde_json::Value::from(queue)
                );
                std::fs::write(path.join("queue.json"), id)?;
                Ok((store, recovered))
            }
            _ => Ok((Arc::new(MemoryQueueStore::new()), Recovered::default())),
        }
    }

    /// A store for paging a non-durable queue's messages; gone after a restart.
    pub fn open_transient(&self) -> io::Result<Arc<dyn QueueStore>> {
        match (&self.dir, &self.flusher) {
            (Some(dir), Some(flusher)) => {
                let n = self.next_transient.fetch_add(1, Ordering::Relaxed);
                let path = dir.join("transient").join(format!("{n:016x}"));
                let options = FileStoreOptions {
                    sync: false,
                    ..self.options
                };
                let (store, _) = FileQueueStore::open(&path, flusher.clone(), options)?;
                Ok(store)
            }
            _ => Ok(Arc::new(MemoryQueueStore::new())),
        }
    }

    /// The directory of a vhost's delayed messages.
    fn delayed_dir(dir: &Path, vhost: &str) -> PathBuf {
        dir.join("delayed")
            .join(hex_name(&Sha256::digest(vhost.as_bytes())))
    }

    /// Opens a vhost's delayed-message store and recovers what it holds.
    pub fn open_delayed(&self, vhost: &str) -> io::Result<Arc<DelayedStore>> {
        let dir = self.dir.as_ref().map(|d| Self::delayed_dir(d, vhost));
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir)?;
            let id = format!("{{\"vhost\":{}}}\n", serde_json::Value::from(vhost));
            std::fs::write(dir.join("vhost.json"), id)?;
        }
        DelayedStore::open(dir.as_deref(), self.flusher.clone(), self.delayed)
    }

    /// Whether a vhost has delayed messages on disk from before this start.
    pub fn has_delayed(&self, vhost: &str) -> bool {
        self.dir
            .as_ref()
            .is_some_and(|d| Self::delayed_dir(d, vhost).exists())
    }

    /// Deletes the delayed-message stores of vhosts that no longer exist.
    pub fn remove_stale_delayed(&self, vhosts: &[String]) -> io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let root = dir.join("delayed");
        if !root.exists() {
            return Ok(());
        }
        let keep: std::collections::HashSet<PathBuf> =
            vhosts.iter().map(|v| Self::delayed_dir(dir, v)).collect();
        for entry in std::fs::read_dir(&root)? {
            let path = entry?.path();
            if keep.contains(&path) || !path.is_dir() {
                continue;
            }
            tracing::info!(dir = %path.display(), "removing the delayed messages of a deleted vhost");
            if let Err(e) = std::fs::remove_dir_all(&path) {
                tracing::warn!(dir = %path.display(), error = %e, "cannot remove the delayed messages of a deleted vhost");
            }
        }
        Ok(())
    }

    /// Deletes the stores of durable queues that no longer exist (`keep` lists the
    /// `(vhost, queue, top level)` of those that do: a priority queue keeps a store for each
    /// level from 0 to its top one).
    pub fn remove_stale(&self, keep: &[(String, String, u8)]) -> io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let keep: std::collections::HashSet<PathBuf> = keep
            .iter()
            .flat_map(|(v, q, top)| (0..=*top).map(move |l| self.durable_dir(dir, v, q, l)))
            .collect();
        for entry in std::fs::read_dir(dir.join("queues"))? {
            let path = entry?.path();
            if !keep.contains(&path) {
                tracing::info!(dir = %path.display(), "removing the store of a deleted queue");
                std::fs::remove_dir_all(&path)?;
            }
        }
        Ok(())
    }

    /// Writes and syncs everything pending (clean shutdown).
    pub fn shutdown(&self) {
        if let Some(f) = &self.flusher {
            f.shutdown();
        }
    }
}
