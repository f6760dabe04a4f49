//! Everything that touches disk. Only this module reads or writes files.
//!
//! - [`definitions`]: vhosts, users, exchanges, queues, bindings, policies: a snapshot and a
//!   log of [`command::Command`]s.
//! - [`QueueStore`]: the seam between a queue and where its messages live. A queue writes a
//!   message to its store when it must survive a restart (persistent message, durable queue)
//!   or when the queue's in-memory window is full (paging); it reads them back in order as
//!   consumers catch up. [`file::FileQueueStore`] keeps them in segment files with a
//!   slot-per-message index; [`memory::MemoryQueueStore`] keeps them in memory (tests, and
//!   brokers without a data directory). Both pass the conformance suite in `conformance.rs`.
//! - [`delayed`]: the messages of delayed exchanges until they are due.
//! - [`flusher`]: group commit across all stores.
//! - [`durability`]: the tickets a publish waits on until its message is safe.

pub mod command;
pub mod definitions;
pub mod delayed;
pub mod document;
pub mod durability;
pub mod field_json;
pub mod file;
pub mod flusher;
pub mod memory;
pub mod model;
pub mod record;

#[cfg(test)]
mod conformance;

pub use command::Command;
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

/// Who a store directory belongs to, as its `queue.json` says. Versions before priority
/// queues wrote no `priority` (every store was level 0).
#[derive(serde::Deserialize)]
struct StoreOwner {
    vhost: String,
    queue: String,
    #[serde(default)]
    priority: u8,
}

/// The `(vhost, queue, level)` of every store the durable queues in `keep` (`(vhost, queue,
/// top level)`) have.
fn kept_levels(keep: &[(String, String, u8)]) -> impl Iterator<Item = (&str, &str, u8)> {
    keep.iter()
        .flat_map(|(v, q, top)| (0..=*top).map(move |l| (v.as_str(), q.as_str(), l)))
}

/// Renames the store directories of earlier versions to their current names, so that their
/// messages are found. It goes by the definitions (`keep`, as [`Storage::remove_stale`]), not
/// by what the directories say of themselves: `queue.json` may be missing, empty, truncated or
/// in an older format. It is read only when the legacy names of two kept queues coincide
/// (names could forge them), to tell whose the directory is; when it cannot tell, the
/// directory is left where it is (and [`Storage::remove_stale`] keeps it). Returns how many
/// directories were renamed. One directory listing: cheap enough to run at every start.
fn migrate_legacy_dirs(queues: &Path, keep: &[(String, String, u8)]) -> io::Result<usize> {
    let mut present = std::collections::HashSet::new();
    for entry in std::fs::read_dir(queues)? {
        if let Ok(name) = entry?.file_name().into_string() {
            present.insert(name);
        }
    }
    if present.is_empty() {
        return Ok(0);
    }
    let current: std::collections::HashSet<String> = kept_levels(keep)
        .map(|(v, q, l)| durable_dir_name(v, q, l))
        .collect();
    // Legacy directories on disk whose current name is missing, with the queue levels that
    // could own them.
    let mut claims: std::collections::BTreeMap<String, Vec<(&str, &str, u8)>> = Default::default();
    for (v, q, l) in kept_levels(keep) {
        let legacy = legacy_durable_dir_name(v, q, l);
        if present.contains(&legacy) && !current.contains(&legacy) {
            claims.entry(legacy).or_default().push((v, q, l));
        }
    }
    let mut renamed = 0;
    for (legacy, owners) in claims {
        let path = queues.join(&legacy);
        let owner = if let [only] = owners[..] {
            Some(only)
        } else {
            std::fs::read(path.join("queue.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<StoreOwner>(&b).ok())
                .and_then(|o| {
                    owners
                        .iter()
                        .copied()
                        .find(|&(v, q, l)| v == o.vhost && q == o.queue && l == o.priority)
                })
        };
        let Some((vhost, queue, level)) = owner else {
            tracing::warn!(dir = %path.display(), "a queue store of an earlier version could belong to several queues and says to none of them; left where it is");
            continue;
        };
        let target = queues.join(durable_dir_name(vhost, queue, level));
        if present.contains(&durable_dir_name(vhost, queue, level)) {
            tracing::warn!(dir = %path.display(), current = %target.display(), "a queue store of an earlier version is left where it is: the queue already has a store under its current name");
            continue;
        }
        tracing::info!(from = %path.display(), to = %target.display(), "renaming a queue store to its current name");
        std::fs::rename(&path, &target)?;
        renamed += 1;
    }
    if renamed > 0 {
        std::fs::File::open(queues)?.sync_all()?;
    }
    Ok(renamed)
}

/// Writes a store's `queue.json` (who it belongs to) unless it already says so: replaced
/// whole through a synced temporary file, so that a crash leaves the old or the new text. A
/// new store's is written without a sync (one per declared queue made imports of many queues
/// slow): a crash can only leave it missing or empty, which its readers accept, and it is read
/// only for the directories of earlier versions, which a new store never is.
fn write_owner(dir: &Path, id: &str) -> io::Result<()> {
    let path = dir.join("queue.json");
    match std::fs::read(&path) {
        Ok(old) if old == id.as_bytes() => return Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return std::fs::write(&path, id),
        _ => {}
    }
    let tmp = dir.join("queue.json.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(id.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)
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
        Ok(Self {
            dir: Some(data_dir.to_path_buf()),
            flusher: Some(Flusher::start(flush_interval)),
            options,
            delayed: DelayedOptions::default(),
            next_transient: AtomicU64::new(0),
        })
    }

    /// Renames the stores that earlier versions kept under other directory names, for the
    /// durable queues in `keep` (`(vhost, queue, top level)`, as [`Storage::remove_stale`]).
    /// Must run before any of them is opened. Returns how many were renamed.
    pub fn migrate_legacy(&self, keep: &[(String, String, u8)]) -> io::Result<usize> {
        match &self.dir {
            Some(dir) => migrate_legacy_dirs(&dir.join("queues"), keep),
            None => Ok(0),
        }
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
                write_owner(&path, &id)?;
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
    /// level from 0 to its top one). A directory under the name an earlier version gave a kept
    /// queue is not deleted (its messages may be that queue's): it is reported.
    pub fn remove_stale(&self, keep: &[(String, String, u8)]) -> io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        let keep_dirs: std::collections::HashSet<PathBuf> = kept_levels(keep)
            .map(|(v, q, l)| self.durable_dir(dir, v, q, l))
            .collect();
        let legacy: std::collections::HashSet<PathBuf> = kept_levels(keep)
            .map(|(v, q, l)| dir.join("queues").join(legacy_durable_dir_name(v, q, l)))
            .collect();
        for entry in std::fs::read_dir(dir.join("queues"))? {
            let path = entry?.path();
            if keep_dirs.contains(&path) {
                continue;
            }
            if legacy.contains(&path) {
                tracing::warn!(dir = %path.display(), "a queue store of an earlier version could not be renamed to its current name; kept, its messages are not recovered");
                continue;
            }
            tracing::info!(dir = %path.display(), "removing the store of a deleted queue");
            std::fs::remove_dir_all(&path)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn keep(queues: &[(&str, &str)]) -> Vec<(String, String, u8)> {
        queues
            .iter()
            .map(|(v, q)| (v.to_string(), q.to_string(), 0))
            .collect()
    }

    /// Two kept queues whose legacy names coincide: the directory's `queue.json` says whose
    /// it is; when it cannot, the directory stays, and is not deleted as stale.
    #[test]
    fn colliding_legacy_directories_go_by_queue_json_and_are_never_deleted() {
        let data = tempfile::tempdir().unwrap();
        let storage =
            Storage::open(data.path(), Duration::from_millis(5), Default::default()).unwrap();
        let queues = data.path().join("queues");
        // `/` + `a\0b` and `/\0a` + `b` had the same directory.
        let kept = keep(&[("/", "a\0b"), ("/\0a", "b")]);
        let legacy = queues.join(legacy_durable_dir_name("/", "a\0b", 0));
        assert_eq!(legacy, queues.join(legacy_durable_dir_name("/\0a", "b", 0)));
        std::fs::create_dir(&legacy).unwrap();
        std::fs::write(legacy.join("queue.json"), "").unwrap();
        assert_eq!(storage.migrate_legacy(&kept).unwrap(), 0);
        storage.remove_stale(&kept).unwrap();
        assert!(legacy.exists(), "an undecided legacy directory is kept");

        std::fs::write(
            legacy.join("queue.json"),
            r#"{"vhost":"/\u0000a","queue":"b"}"#,
        )
        .unwrap();
        assert_eq!(storage.migrate_legacy(&kept).unwrap(), 1);
        assert!(queues.join(durable_dir_name("/\0a", "b", 0)).exists());
        assert!(!legacy.exists());
        storage.shutdown();
    }
}
