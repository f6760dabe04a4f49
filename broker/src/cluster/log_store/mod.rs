//! The Raft log on disk: openraft's log storage ([`RaftLogStorage`]) for one Raft group, over
//! the log that all groups of a node share ([`RaftLog`], in `shared.rs`, its writer thread in
//! `shared/writer.rs`; the file format is in `segment.rs`).
//!
//! A node opens its log once, then one [`LogStore`] per group; the store goes to openraft
//! together with the group's state machine (a separate [`openraft::storage::RaftStateMachine`])
//! and its network:
//!
//! ```ignore
//! let log = RaftLog::open(&data_dir.join("raft"), RaftLogOptions::default())?;
//! let store = LogStore::<Config>::open(&log, METADATA_GROUP).await?;
//! let raft = openraft::Raft::new(node_id, raft_config, network, store, state_machine).await?;
//! ```
//!
//! Entries, votes and log ids are stored as JSON (openraft's own serde forms), so the store
//! works with any type config whose entries serialize. Votes are on disk before `save_vote`
//! returns; appended entries are readable at once and reported to openraft (its append
//! callback) when the batch they went out in is synced. Truncations, purges and the committed
//! log id are written in order with everything else but not waited for: anything openraft
//! waits for afterwards (a vote, an append) is synced after them, and losing the last of them
//! to a crash only means keeping or applying a little more log again.
//!
//! After a write or sync error the log takes nothing more (every call fails, and openraft
//! stops the group): what a failed `fsync` left on disk is unknown until the node restarts
//! and reads its files back.

mod segment;
mod shared;
#[cfg(test)]
mod tests;

pub use shared::{GroupId, LogStats, RaftLog, RaftLogError, RaftLogOptions};

use bytes::Bytes;
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{
    AnyError, LogId, OptionalSend, RaftLogId, RaftTypeConfig, StorageError, StorageIOError, Vote,
};
use segment::Kind;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::Part;
use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

/// The group that replicates the cluster's metadata (vhosts, users, exchanges, queues,
/// bindings, policies…).
pub const METADATA_GROUP: GroupId = 0;

/// What one bounded read returns at most (replication asks for ranges that can be large).
const READ_MAX_ENTRIES: usize = 4096;
const READ_MAX_BYTES: usize = 4 << 20;

/// One group's log, as openraft uses it. Only one store per group can be open at a time.
pub struct LogStore<C: RaftTypeConfig> {
    log: RaftLog,
    group: GroupId,
    vote: Option<Vote<C::NodeId>>,
    committed: Option<LogId<C::NodeId>>,
    last_purged: Option<LogId<C::NodeId>>,
    /// The last entry present (none when all were purged).
    last_log_id: Option<LogId<C::NodeId>>,
}

impl<C: RaftTypeConfig> Debug for LogStore<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("group", &self.group)
            .field("vote", &self.vote)
            .field("last_purged", &self.last_purged)
            .field("last_log_id", &self.last_log_id)
            .finish()
    }
}

impl<C: RaftTypeConfig> Drop for LogStore<C> {
    fn drop(&mut self) {
        self.log.release(self.group);
    }
}

/// Reads a group's entries for replication; any number can be in use at once.
pub struct LogReader<C: RaftTypeConfig> {
    log: RaftLog,
    group: GroupId,
    _config: PhantomData<C>,
}

impl<C: RaftTypeConfig> Debug for LogReader<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("group", &self.group)
            .finish()
    }
}

fn decode<T: DeserializeOwned>(
    group: GroupId,
    what: &'static str,
    payload: Option<Bytes>,
) -> Result<Option<T>, RaftLogError> {
    payload
        .map(|p| serde_json::from_slice(&p))
        .transpose()
        .map_err(|e| RaftLogError::BadPayload {
            group,
            what,
            message: e.to_string(),
        })
}

fn encode(value: &impl Serialize) -> Result<Bytes, io::Error> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(io::Error::from)
}

fn write_error<NID: openraft::NodeId>(e: io::Error) -> StorageError<NID> {
    StorageIOError::write_logs(AnyError::new(&e)).into()
}

impl<C> LogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    /// Opens `group` in `log`, with what the log holds of it (nothing for a new group).
    pub async fn open(log: &RaftLog, group: GroupId) -> Result<Self, RaftLogError> {
        let view = log.claim(group)?;
        // From here on, dropping the store gives the group back.
        let mut store = LogStore {
            log: log.clone(),
            group,
            vote: None,
            committed: None,
            last_purged: None,
            last_log_id: None,
        };
        store.vote = decode(group, "vote", view.vote)?;
        store.committed = decode(group, "committed log id", view.committed)?;
        store.last_purged = decode(group, "purged log id", view.purged)?;
        if let Some(index) = view.last_index {
            store.last_log_id =
                store
                    .entry_id(index)
                    .await
                    .map_err(|e| RaftLogError::BadPayload {
                        group,
                        what: "last entry",
                        message: e.to_string(),
                    })?;
        }
        Ok(store)
    }

    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The log id of the entry at `index`, if it is present.
    async fn entry_id(
        &self,
        index: u64,
    ) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        let entries = read::<C>(&self.log, self.group, index, index + 1, 1).await?;
        Ok(entries.first().map(|e| e.get_log_id().clone()))
    }
}

/// Reads a group's entries in `start..end` (at most `max_entries`, and a few MiB), going to
/// disk on a blocking thread for those no longer cached.
async fn read<C>(
    log: &RaftLog,
    group: GroupId,
    start: u64,
    end: u64,
    max_entries: usize,
) -> Result<Vec<C::Entry>, StorageError<C::NodeId>>
where
    C: RaftTypeConfig,
    C::Entry: DeserializeOwned,
{
    let read_error = |e: &dyn std::error::Error| -> StorageError<C::NodeId> {
        StorageIOError::read_logs(AnyError::error(e)).into()
    };
    let max_bytes = if max_entries == usize::MAX {
        usize::MAX
    } else {
        READ_MAX_BYTES
    };
    let parts = log.locate(group, start, end, max_entries, max_bytes);
    let loaded = if parts.iter().all(|p| matches!(p, Part::Cached(_))) {
        log.load(parts)
    } else {
        let log = log.clone();
        tokio::task::spawn_blocking(move || log.load(parts))
            .await
            .map_err(|e| read_error(&e))?
    };
    let payloads = loaded.map_err(|e| read_error(&e))?;
    payloads
        .iter()
        .map(|p| serde_json::from_slice(p))
        .collect::<Result<_, _>>()
        .map_err(|e| read_error(&e))
}

/// `range` as `start..end`.
fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e.saturating_add(1),
        Bound::Excluded(e) => *e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl<C> RaftLogReader<C> for LogReader<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        let (start, end) = bounds(&range);
        read::<C>(&self.log, self.group, start, end, usize::MAX).await
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        read::<C>(&self.log, self.group, start, end, READ_MAX_ENTRIES).await
    }
}

impl<C> RaftLogReader<C> for LogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        let (start, end) = bounds(&range);
        read::<C>(&self.log, self.group, start, end, usize::MAX).await
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<C::Entry>, StorageError<C::NodeId>> {
        read::<C>(&self.log, self.group, start, end, READ_MAX_ENTRIES).await
    }
}

impl<C> RaftLogStorage<C> for LogStore<C>
where
    C: RaftTypeConfig,
    C::Entry: Serialize + DeserializeOwned,
{
    type LogReader = LogReader<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<C::NodeId>> {
        Ok(LogState {
            last_purged_log_id: self.last_purged.clone(),
            last_log_id: self
                .last_log_id
                .clone()
                .or_else(|| self.last_purged.clone()),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader {
            log: self.log.clone(),
            group: self.group,
            _config: PhantomData,
        }
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let vote_error = |e: &io::Error| -> StorageError<C::NodeId> {
            StorageIOError::write_vote(AnyError::new(e)).into()
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let done: shared::Done = Box::new(move |r| {
            let _ = tx.send(r);
        });
        let payload = encode(vote).map_err(|e| vote_error(&e))?;
        self.log
            .save(self.group, Kind::Vote, payload, Some(done))
            .map_err(|e| vote_error(&e))?;
        rx.await
            .unwrap_or_else(|_| Err(io::Error::other("raft log closed")))
            .map_err(|e| vote_error(&e))?;
        self.vote = Some(vote.clone());
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<C::NodeId>>, StorageError<C::NodeId>> {
        Ok(self.vote.clone())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> Result<(), StorageError<C::NodeId>> {
        let payload = encode(&committed).map_err(write_error)?;
        self.log
            .save(self.group, Kind::Committed, payload, None)
            .map_err(write_error)?;
        self.committed = committed;
        Ok(())
    }

    async fn read_committed(
        &mut self,
    ) -> Result<Option<LogId<C::NodeId>>, StorageError<C::NodeId>> {
        Ok(self.committed.clone())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<C::NodeId>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut items = Vec::new();
        let mut last = None;
        for entry in entries {
            let id = entry.get_log_id().clone();
            items.push((id.index, encode(&entry).map_err(write_error)?));
            last = Some(id);
        }
        let done: shared::Done = Box::new(move |r| callback.log_io_completed(r));
        self.log
            .append(self.group, items, done)
            .map_err(write_error)?;
        if last.is_some() {
            self.last_log_id = last;
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        self.log
            .truncate(self.group, log_id.index)
            .map_err(write_error)?;
        self.last_log_id = match log_id.index.checked_sub(1) {
            Some(prev) => self.entry_id(prev).await?,
            None => None,
        };
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> Result<(), StorageError<C::NodeId>> {
        let payload = encode(&log_id).map_err(write_error)?;
        self.log
            .purge(self.group, log_id.index, payload)
            .map_err(write_error)?;
        if self
            .last_log_id
            .as_ref()
            .is_some_and(|last| last.index <= log_id.index)
        {
            self.last_log_id = None;
        }
        self.last_purged = Some(log_id);
        Ok(())
    }
}
