//! The log that every Raft group of a node shares: one stream of records in segment files
//! (format in `segment.rs`), one writer thread, one fsync per batch.
//!
//! Callers never touch files. An append encodes its records into the pending batch under the
//! lock, which also decides where each record will land (segment and offset), so an entry is
//! indexed, and readable from the in-memory cache, before it is written. The writer thread
//! takes everything pending at once, writes it, syncs it, and only then runs the callbacks of
//! that batch: appends from any number of groups and callers arriving while one sync is under
//! way share the next one. Records reach the disk in the order they were queued, so a vote,
//! a truncation and the appends after them can never be reordered by a crash: what survives
//! is always a prefix of the stream.
//!
//! Each group's entries are indexed by log index (segment, offset, length), so a read goes to
//! the exact records it needs; recent entries also stay in a bounded cache, for replication.
//! Once entries are purged, whole segments that hold nothing still in use are deleted.

mod writer;

use super::segment::{self, Kind, ScanEnd};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

/// Names a Raft group within the shared log.
pub type GroupId = u64;

/// Runs once the records queued with it are on disk, or with the error that stopped them.
pub(super) type Done = Box<dyn FnOnce(io::Result<()>) + Send>;

/// Tuning of the shared log.
#[derive(Debug, Clone)]
pub struct RaftLogOptions {
    /// A segment is closed and a new one started once it would grow past this.
    pub segment_bytes: u64,
    /// Bytes of recently appended entries kept in memory for reading back.
    pub cache_bytes: usize,
}

impl Default for RaftLogOptions {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            cache_bytes: 16 << 20,
        }
    }
}

/// Counters of the writer's work.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Batches written (each ends with one sync of the file written last).
    pub batches: AtomicU64,
    /// Syncs of segment files and of the directory.
    pub fsyncs: AtomicU64,
    /// Entries appended.
    pub entries: AtomicU64,
    pub bytes: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum RaftLogError {
    #[error("raft log {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("raft log {}: damaged record at offset {offset}", path.display())]
    Damaged { path: PathBuf, offset: u64 },
    #[error("raft log {}: not a segment of this log (bad start record)", path.display())]
    NotASegment { path: PathBuf },
    #[error("raft group {0} is already open")]
    GroupInUse(GroupId),
    #[error("raft group {group}: unreadable {what}: {message}")]
    BadPayload {
        group: GroupId,
        what: &'static str,
        message: String,
    },
}

/// Where an entry's record is, and its payload while it is cached.
#[derive(Debug)]
struct Loc {
    segment: u32,
    offset: u64,
    len: u32,
    cached: Option<Bytes>,
}

/// What the log keeps of one group. Vote, committed and purged stay serialized: this layer
/// only stores them, and repeats them at the head of each new segment.
#[derive(Debug, Default)]
struct Group {
    vote: Option<Bytes>,
    committed: Option<Bytes>,
    purged: Option<(u64, Bytes)>,
    entries: BTreeMap<u64, Loc>,
}

impl Group {
    /// Drops entries from `index` on; returns the cached bytes they held.
    fn truncate(&mut self, index: u64) -> usize {
        if self
            .entries
            .keys()
            .next_back()
            .is_none_or(|last| *last < index)
        {
            return 0;
        }
        let gone = self.entries.split_off(&index);
        cached_bytes(gone.values())
    }

    /// Drops entries up to `index`; returns the cached bytes they held.
    fn purge(&mut self, index: u64) -> usize {
        let keep = match index.checked_add(1) {
            Some(next) => self.entries.split_off(&next),
            None => BTreeMap::new(),
        };
        let gone = std::mem::replace(&mut self.entries, keep);
        cached_bytes(gone.values())
    }
}

fn cached_bytes<'a>(locs: impl Iterator<Item = &'a Loc>) -> usize {
    locs.filter_map(|l| l.cached.as_ref()).map(Bytes::len).sum()
}

/// Records for one segment, written at `offset`.
#[derive(Debug)]
struct Chunk {
    segment: u32,
    offset: u64,
    bytes: Vec<u8>,
}

struct State {
    groups: HashMap<GroupId, Group>,
    /// Open segment files, for reading (the writer has its own handle on the active one).
    files: BTreeMap<u32, Arc<File>>,
    /// The segment new records go to, its length counting what is pending, and where its
    /// head (start record and group states) ends.
    active: u32,
    end: u64,
    head_end: u64,
    pending: Vec<Chunk>,
    done: Vec<Done>,
    /// Segments below this can be deleted once the pending records are on disk.
    delete_below: u32,
    /// Cached entries in the order they were appended: (group, index, segment, offset).
    cache: VecDeque<(GroupId, u64, u32, u64)>,
    cache_bytes: usize,
    /// Everything before this position (segment, offset) is on disk.
    durable: (u32, u64),
    /// Set when a write or sync failed: the files can no longer be trusted.
    failed: Option<String>,
    stop: bool,
    open_groups: HashSet<GroupId>,
}

impl State {
    /// Queues a record, starting a new segment first when this one is full; returns where
    /// the record will be.
    fn push(
        &mut self,
        segment_bytes: u64,
        kind: Kind,
        group: GroupId,
        index: u64,
        payload: &[u8],
    ) -> (u32, u64, u32) {
        let len = (segment::HEADER + segment::FIXED + payload.len()) as u64;
        if self.end > self.head_end && self.end + len > segment_bytes {
            self.roll();
        }
        self.write(kind, group, index, payload)
    }

    fn write(&mut self, kind: Kind, group: GroupId, index: u64, payload: &[u8]) -> (u32, u64, u32) {
        let (segment, offset) = (self.active, self.end);
        let chunk = match self.pending.last_mut() {
            Some(c) if c.segment == segment => c,
            _ => {
                self.pending.push(Chunk {
                    segment,
                    offset,
                    bytes: Vec::new(),
                });
                self.pending.last_mut().expect("just pushed")
            }
        };
        let len = segment::encode(&mut chunk.bytes, kind, group, index, payload);
        self.end += len as u64;
        (segment, offset, len as u32)
    }

    /// Starts the next segment: its start record, then every group's state.
    fn roll(&mut self) {
        self.active += 1;
        self.end = 0;
        let active = self.active as u64;
        self.write(Kind::Start, 0, active, segment::MAGIC);
        let mut heads = Vec::new();
        for (id, g) in &self.groups {
            if let Some(v) = &g.vote {
                heads.push((Kind::Vote, *id, 0, v.clone()));
            }
            if let Some(c) = &g.committed {
                heads.push((Kind::Committed, *id, 0, c.clone()));
            }
            if let Some((index, p)) = &g.purged {
                heads.push((Kind::Purge, *id, *index, p.clone()));
            }
        }
        for (kind, group, index, payload) in heads {
            self.write(kind, group, index, &payload);
        }
        self.head_end = self.end;
    }

    /// The oldest segment still holding an entry of any group (or the active one).
    fn oldest_needed(&self) -> u32 {
        self.groups
            .values()
            .filter_map(|g| g.entries.values().next().map(|l| l.segment))
            .fold(self.active, u32::min)
    }

    /// Drops cached payloads beyond the budget (only of entries already on disk), and
    /// forgets cache slots of entries since removed.
    fn evict(&mut self, budget: usize) {
        while let Some(&(group, index, segment, offset)) = self.cache.front() {
            let loc = self
                .groups
                .get_mut(&group)
                .and_then(|g| g.entries.get_mut(&index))
                .filter(|l| l.segment == segment && l.offset == offset && l.cached.is_some());
            match loc {
                None => {}
                Some(_) if self.cache_bytes <= budget || (segment, offset) >= self.durable => break,
                Some(loc) => {
                    let bytes = loc.cached.take().map_or(0, |b| b.len());
                    self.cache_bytes -= bytes;
                }
            }
            self.cache.pop_front();
        }
    }

    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some(e) => Err(io::Error::other(e.clone())),
            None if self.stop => Err(io::Error::other("raft log closed")),
            None => Ok(()),
        }
    }
}

struct Shared {
    dir: PathBuf,
    options: RaftLogOptions,
    state: Mutex<State>,
    wake: Condvar,
    stats: LogStats,
    /// Held by a test to keep the writer from starting a batch.
    #[cfg(test)]
    pause: Mutex<()>,
}

/// Stops the writer when the last handle goes.
struct Handle {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.state.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
    }
}

/// The Raft log of a node, shared by all its groups. Cloning is cheap; the writer thread stops
/// (after writing what is pending) when the last clone is dropped.
#[derive(Clone)]
pub struct RaftLog {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for RaftLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftLog")
            .field("dir", &self.shared().dir)
            .finish()
    }
}

/// What a group had in the log when it was opened.
#[derive(Debug, Default)]
pub(super) struct GroupView {
    pub vote: Option<Bytes>,
    pub committed: Option<Bytes>,
    pub purged: Option<Bytes>,
    pub last_index: Option<u64>,
}

/// An entry to read: its payload, or where it is on disk.
#[derive(Debug)]
pub(super) enum Part {
    Cached(Bytes),
    Disk {
        file: Arc<File>,
        segment: u32,
        offset: u64,
        len: u32,
    },
}

impl RaftLog {
    /// Opens (or creates) the log in `dir`: replays every segment, cuts a torn tail off the
    /// last one, and starts a new segment for what is written from now on.
    pub fn open(dir: &Path, options: RaftLogOptions) -> Result<RaftLog, RaftLogError> {
        let io_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RaftLogError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let segments = segment::list(dir).map_err(io_err(dir))?;
        let mut groups: HashMap<GroupId, Group> = HashMap::new();
        let mut files = BTreeMap::new();
        for (i, (number, path)) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let mut started = None;
            let end = segment::scan(path, |record, offset, len| {
                if started.is_none() {
                    started = Some(
                        record.kind == Kind::Start
                            && record.index == *number as u64
                            && record.payload == segment::MAGIC,
                    );
                } else if started == Some(true) {
                    replay(&mut groups, record, *number, offset, len);
                }
            })
            .map_err(io_err(path))?
            .map_err(|d| RaftLogError::Damaged {
                path: path.clone(),
                offset: d.offset,
            })?;
            if let ScanEnd::TornTail(offset) = end {
                if !last {
                    return Err(RaftLogError::Damaged {
                        path: path.clone(),
                        offset,
                    });
                }
                tracing::warn!(file = %path.display(), offset, "raft log: cutting a write torn by a crash");
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io_err(path))?;
                f.set_len(offset)
                    .and_then(|()| f.sync_all())
                    .map_err(io_err(path))?;
            }
            match started {
                Some(true) => {
                    files.insert(*number, Arc::new(File::open(path).map_err(io_err(path))?));
                }
                // The crash came as the segment was being started: nothing in it counts.
                None if last => std::fs::remove_file(path).map_err(io_err(path))?,
                _ => return Err(RaftLogError::NotASegment { path: path.clone() }),
            }
        }
        let active = segments.last().map_or(0, |(n, _)| *n);
        let mut state = State {
            groups,
            files,
            active,
            end: 0,
            head_end: 0,
            pending: Vec::new(),
            done: Vec::new(),
            delete_below: 0,
            cache: VecDeque::new(),
            cache_bytes: 0,
            durable: (active + 1, 0),
            failed: None,
            stop: false,
            open_groups: HashSet::new(),
        };
        // Never append to a segment found on disk: its head may be incomplete.
        state.roll();
        state.delete_below = state.oldest_needed();
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            options,
            state: Mutex::new(state),
            wake: Condvar::new(),
            stats: LogStats::default(),
            #[cfg(test)]
            pause: Mutex::new(()),
        });
        let worker = shared.clone();
        let writer = std::thread::Builder::new()
            .name("warren-raft-log".into())
            .spawn(move || worker.run())
            .map_err(io_err(dir))?;
        Ok(RaftLog {
            handle: Arc::new(Handle {
                shared,
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    pub fn stats(&self) -> &LogStats {
        &self.shared().stats
    }

    pub fn dir(&self) -> &Path {
        &self.shared().dir
    }

    /// Keeps the writer from starting a batch while the guard is held.
    #[cfg(test)]
    pub(super) fn pause_writer(&self) -> parking_lot::MutexGuard<'_, ()> {
        self.shared().pause.lock()
    }

    /// Takes a group for one user (its log store) and tells what the log holds of it.
    pub(super) fn claim(&self, group: GroupId) -> Result<GroupView, RaftLogError> {
        let mut st = self.shared().state.lock();
        if !st.open_groups.insert(group) {
            return Err(RaftLogError::GroupInUse(group));
        }
        let g = st.groups.entry(group).or_default();
        Ok(GroupView {
            vote: g.vote.clone(),
            committed: g.committed.clone(),
            purged: g.purged.as_ref().map(|(_, p)| p.clone()),
            last_index: g.entries.keys().next_back().copied(),
        })
    }

    pub(super) fn release(&self, group: GroupId) {
        self.shared().state.lock().open_groups.remove(&group);
    }

    /// Queues entries (index and payload) of a group; `done` runs once they are on disk. An
    /// entry replaces any entry at its index or after. They are readable when this returns.
    pub(super) fn append(
        &self,
        group: GroupId,
        entries: impl IntoIterator<Item = (u64, Bytes)>,
        done: Done,
    ) -> io::Result<()> {
        let shared = self.shared();
        let mut st = shared.state.lock();
        st.check()?;
        let mut count = 0;
        for (index, payload) in entries {
            let freed = st.groups.entry(group).or_default().truncate(index);
            st.cache_bytes -= freed;
            let (segment, offset, len) = st.push(
                shared.options.segment_bytes,
                Kind::Entry,
                group,
                index,
                &payload,
            );
            st.cache_bytes += payload.len();
            st.cache.push_back((group, index, segment, offset));
            let loc = Loc {
                segment,
                offset,
                len,
                cached: Some(payload),
            };
            st.groups
                .entry(group)
                .or_default()
                .entries
                .insert(index, loc);
            count += 1;
        }
        st.done.push(done);
        drop(st);
        shared.stats.entries.fetch_add(count, Ordering::Relaxed);
        shared.wake.notify_one();
        Ok(())
    }

    /// Queues a group's new vote or committed log id; `done`, if any, runs once it is on disk.
    pub(super) fn save(
        &self,
        group: GroupId,
        kind: Kind,
        payload: Bytes,
        done: Option<Done>,
    ) -> io::Result<()> {
        let shared = self.shared();
        let mut st = shared.state.lock();
        st.check()?;
        st.push(shared.options.segment_bytes, kind, group, 0, &payload);
        let g = st.groups.entry(group).or_default();
        match kind {
            Kind::Vote => g.vote = Some(payload),
            _ => g.committed = Some(payload),
        }
        st.done.extend(done);
        drop(st);
        shared.wake.notify_one();
        Ok(())
    }

    /// Removes a group's entries from `index` on.
    pub(super) fn truncate(&self, group: GroupId, index: u64) -> io::Result<()> {
        let shared = self.shared();
        let mut st = shared.state.lock();
        st.check()?;
        let freed = st.groups.entry(group).or_default().truncate(index);
        st.cache_bytes -= freed;
        st.push(
            shared.options.segment_bytes,
            Kind::Truncate,
            group,
            index,
            &[],
        );
        drop(st);
        shared.wake.notify_one();
        Ok(())
    }

    /// Removes a group's entries up to `index`; `payload` is the purged log id. Segments left
    /// with nothing in use are deleted once this is on disk.
    pub(super) fn purge(&self, group: GroupId, index: u64, payload: Bytes) -> io::Result<()> {
        let shared = self.shared();
        let mut st = shared.state.lock();
        st.check()?;
        st.push(
            shared.options.segment_bytes,
            Kind::Purge,
            group,
            index,
            &payload,
        );
        let g = st.groups.entry(group).or_default();
        let freed = g.purge(index);
        g.purged = Some((index, payload));
        st.cache_bytes -= freed;
        st.delete_below = st.delete_below.max(st.oldest_needed());
        drop(st);
        shared.wake.notify_one();
        Ok(())
    }

    /// Finds a group's entries in `start..end`, at most `max_entries` of them and (after the
    /// first) about `max_bytes`.
    pub(super) fn locate(
        &self,
        group: GroupId,
        start: u64,
        end: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Vec<Part> {
        let st = self.shared().state.lock();
        let Some(g) = st.groups.get(&group) else {
            return Vec::new();
        };
        let mut parts = Vec::new();
        let mut bytes = 0usize;
        for (_, loc) in g.entries.range(start..end.max(start)) {
            if parts.len() >= max_entries || (bytes >= max_bytes && !parts.is_empty()) {
                break;
            }
            bytes += loc.len as usize;
            parts.push(match (&loc.cached, st.files.get(&loc.segment)) {
                (Some(payload), _) => Part::Cached(payload.clone()),
                (None, Some(file)) => Part::Disk {
                    file: file.clone(),
                    segment: loc.segment,
                    offset: loc.offset,
                    len: loc.len,
                },
                // Not cached means on disk, and a segment on disk is open: cannot happen.
                (None, None) => break,
            });
        }
        parts
    }

    /// Reads the payloads of `parts` (blocking, when some are on disk).
    pub(super) fn load(&self, parts: Vec<Part>) -> io::Result<Vec<Bytes>> {
        parts
            .into_iter()
            .map(|part| match part {
                Part::Cached(b) => Ok(b),
                Part::Disk {
                    file,
                    segment,
                    offset,
                    len,
                } => {
                    let path = self.dir().join(segment::file_name(segment));
                    segment::entry_payload(&file, &path, offset, len).map(Bytes::from)
                }
            })
            .collect()
    }
}

/// Applies a record read back at startup to the groups' state.
fn replay(
    groups: &mut HashMap<GroupId, Group>,
    record: segment::Record,
    segment: u32,
    offset: u64,
    len: u32,
) {
    if record.kind == Kind::Start {
        return;
    }
    let g = groups.entry(record.group).or_default();
    let index = record.index;
    match record.kind {
        Kind::Start => {}
        Kind::Entry => {
            g.truncate(index);
            g.entries.insert(
                index,
                Loc {
                    segment,
                    offset,
                    len,
                    cached: None,
                },
            );
        }
        Kind::Vote => g.vote = Some(record.payload.into()),
        Kind::Committed => g.committed = Some(record.payload.into()),
        Kind::Purge => {
            g.purge(index);
            g.purged = Some((index, record.payload.into()));
        }
        Kind::Truncate => {
            g.truncate(index);
        }
    }
}
