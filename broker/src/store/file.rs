//! A queue's messages on disk.
//!
//! - Segment files (`NNNNNNNN.seg`) hold message records, appended in sequence order. A
//!   segment is deleted as soon as none of its messages is live; one kept alive by a few old
//!   messages (a consumer that never acks them) is compacted: those records are copied to the
//!   current segment and the old file deleted.
//! - Index files (`NNNNNNNNNNNNNNNN.idx`) hold one 32-byte slot per sequence number
//!   (`SLOTS_PER_INDEX` per file), saying where the record is and whether it was delivered or
//!   removed. Recovery reads only the index files, never the bodies, so a backlog of millions
//!   of messages recovers in seconds, and the queue needs no per-message state in memory for
//!   the part of its backlog that is on disk.
//!
//! Appends and slot changes go to memory; the [`Flusher`] writes and syncs them in rounds.

use super::flusher::{Flushable, Flusher};
use super::record::{
    self, FLAG_DELIVERED, FLAG_REMOVED, RECORD_HEADER, RecordError, RecordKind, SLOT_SIZE, Slot,
    SlotRead,
};
use super::{Location, QueueStore, ReadBatch, Recovered, Stored, StoredMessage};
use crate::broker::message::Message;
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

/// Slots per index file: 65536 × 32 bytes = 2 MiB.
pub const SLOTS_PER_INDEX: u64 = 65_536;
/// Slots read per index read when scanning.
const SCAN_CHUNK: u64 = 1024;

/// Tunables of a store.
#[derive(Debug, Clone, Copy)]
pub struct FileStoreOptions {
    /// A new segment is started when a record would take the current one past this size.
    pub segment_size: u32,
    /// A segment (other than the newest) whose live records take less than this fraction of
    /// it is compacted.
    pub compact_below: f64,
    /// Sync written files. A store that only ever pages messages of a non-durable queue
    /// (gone at restart anyway) skips it.
    pub sync: bool,
}

impl Default for FileStoreOptions {
    fn default() -> Self {
        Self {
            segment_size: 64 * 1024 * 1024,
            compact_below: 0.1,
            sync: true,
        }
    }
}

#[derive(Debug)]
struct Chunk {
    segment: u32,
    offset: u32,
    data: Vec<u8>,
}

#[derive(Debug, Clone)]
struct InFlight {
    chunks: Arc<Vec<Chunk>>,
    slots: Arc<BTreeMap<u64, Slot>>,
}

#[derive(Debug, Default)]
struct SegmentUse {
    live: u64,
    live_bytes: u64,
    /// Bytes written to the segment, live or not.
    total_bytes: u64,
}

#[derive(Debug, Default)]
struct State {
    /// Registered with the flusher for its next round.
    queued: bool,
    destroyed: bool,
    write_segment: u32,
    write_offset: u32,
    /// Records not yet written to their segment files.
    pending: Vec<Chunk>,
    /// Slots not yet written to their index files, newest version of each.
    pending_slots: BTreeMap<u64, Slot>,
    /// Taken by the flusher and being written; kept until synced (still readable, and
    /// written again if the round fails).
    in_flight: Option<InFlight>,
    segments: HashMap<u32, SegmentUse>,
    index_live: HashMap<u64, u64>,
    /// The highest sequence number appended (index files below it are complete).
    max_seq: Option<u64>,
    /// Files whose contents are all dead, deleted after the next sync.
    dead_segments: Vec<u32>,
    dead_indexes: Vec<u64>,
    /// Compacted records: the old segment of a sequence number, for removals that name it.
    moved: HashMap<u64, u32>,
    /// Sequence numbers below this were written before the store was opened: paged records
    /// among them are dead.
    opened_at: u64,
}

#[derive(Debug, Default)]
struct Files {
    segments: HashMap<u32, Arc<File>>,
    indexes: HashMap<u64, Arc<File>>,
    /// A file was created since the last sync: the directory needs one too.
    created: bool,
}

pub struct FileQueueStore {
    dir: PathBuf,
    flusher: Arc<Flusher>,
    me: Weak<FileQueueStore>,
    options: FileStoreOptions,
    state: Mutex<State>,
    files: Mutex<Files>,
}

impl std::fmt::Debug for FileQueueStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileQueueStore")
            .field("dir", &self.dir)
            .finish()
    }
}

fn segment_name(n: u32) -> String {
    format!("{n:08x}.seg")
}

fn index_name(n: u64) -> String {
    format!("{n:016x}.idx")
}

fn list(dir: &Path, ext: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some(ext) {
            continue;
        }
        let Some(n) = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| u64::from_str_radix(s, 16).ok())
        else {
            continue;
        };
        out.push((n, path));
    }
    out.sort();
    Ok(out)
}

impl FileQueueStore {
    /// Opens (or creates) the store in `dir` and recovers what it holds: live persistent
    /// messages are kept, paged ones dropped, a torn record at the end of the newest segment
    /// truncated, damaged slots reported and skipped.
    pub fn open(
        dir: &Path,
        flusher: Arc<Flusher>,
        options: FileStoreOptions,
    ) -> io::Result<(Arc<Self>, Recovered)> {
        fs::create_dir_all(dir)?;
        let mut st = State::default();
        let mut recovered = Recovered::default();
        let mut first_live = None;
        let mut max_seq: Option<u64> = None;
        let mut delivered_max: Option<u64> = None;
        let indexes = list(dir, "idx")?;
        for (n, path) in &indexes {
            let bytes = fs::read(path)?;
            for (i, slot_bytes) in bytes.chunks(SLOT_SIZE).enumerate() {
                let seq = n * SLOTS_PER_INDEX + i as u64;
                match record::decode_slot(slot_bytes) {
                    SlotRead::Empty => {}
                    SlotRead::Corrupt => {
                        tracing::warn!(file = %path.display(), offset = i * SLOT_SIZE, "corrupt index slot skipped");
                    }
                    SlotRead::Valid(slot) if slot.seq != seq => {
                        tracing::warn!(file = %path.display(), offset = i * SLOT_SIZE, "index slot for another sequence number skipped");
                    }
                    SlotRead::Valid(slot) => {
                        max_seq = Some(max_seq.map_or(seq, |m| m.max(seq)));
                        if slot.kind != RecordKind::Persistent || slot.removed() {
                            continue;
                        }
                        recovered.count += 1;
                        recovered.bytes += u64::from(slot.body_len);
                        if slot.delivered() {
                            delivered_max = Some(seq);
                        }
                        first_live.get_or_insert(seq);
                        let u = st.segments.entry(slot.segment).or_default();
                        u.live += 1;
                        u.live_bytes += u64::from(slot.record_len);
                        *st.index_live.entry(*n).or_default() += 1;
                    }
                }
            }
        }
        let segments = list(dir, "seg")?;
        if let Some((n, path)) = segments.last() {
            truncate_torn_tail(*n as u32, path)?;
        }
        for (n, path) in &segments {
            if let Some(u) = st.segments.get_mut(&(*n as u32)) {
                u.total_bytes = fs::metadata(path)?.len();
            }
        }
        // Delete what holds nothing live. The newest index file may still get slots.
        let next_seq = max_seq.map_or(0, |m| m + 1);
        for (n, path) in &segments {
            if !st.segments.contains_key(&(*n as u32)) {
                fs::remove_file(path)?;
            }
        }
        for (n, path) in &indexes {
            if !st.index_live.contains_key(n) && (n + 1) * SLOTS_PER_INDEX <= next_seq {
                fs::remove_file(path)?;
            }
        }
        st.write_segment = segments.last().map_or(0, |(n, _)| *n as u32 + 1);
        st.max_seq = max_seq;
        st.opened_at = next_seq;
        recovered.next_seq = next_seq;
        recovered.first_seq = first_live.unwrap_or(next_seq);
        recovered.redelivered_below = delivered_max.map_or(0, |m| m + 1);
        let store = Arc::new_cyclic(|me| Self {
            dir: dir.to_path_buf(),
            flusher,
            me: me.clone(),
            options,
            state: Mutex::new(st),
            files: Mutex::new(Files::default()),
        });
        Ok((store, recovered))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn register(&self, st: &mut State) {
        if !st.queued {
            st.queued = true;
            let me: Weak<dyn Flushable> = self.me.clone();
            self.flusher.register(me);
        }
    }

    /// Appends a record to the pending data; returns its segment and offset.
    fn push_record(&self, st: &mut State, seq: u64, message: &Message) -> (u32, u32, u32) {
        let len = (RECORD_HEADER
            + 8
            + 1
            + message.exchange.len().min(255)
            + 1
            + message.routing_key.len().min(255)
            + 4
            + message.properties.len()
            + message.body.len()) as u64;
        if st.write_offset > 0
            && u64::from(st.write_offset) + len > u64::from(self.options.segment_size)
        {
            let full = st.write_segment;
            st.write_segment += 1;
            st.write_offset = 0;
            // Everything in it may be gone already (consumers keeping up): it was kept only
            // while it was still being written to.
            if st.segments.get(&full).is_some_and(|u| u.live == 0) {
                Self::retire_segment(st, full);
            }
        }
        let (segment, offset) = (st.write_segment, st.write_offset);
        st.segments.entry(segment).or_default().total_bytes += len;
        let contiguous = st.pending.last().is_some_and(|c| {
            c.segment == segment && c.offset as usize + c.data.len() == offset as usize
        });
        if !contiguous {
            st.pending.push(Chunk {
                segment,
                offset,
                data: Vec::with_capacity(64 * 1024),
            });
        }
        let chunk = st.pending.last_mut().expect("pushed above");
        let written = record::encode_record(&mut chunk.data, seq, message);
        st.write_offset = st.write_offset.saturating_add(written as u32);
        (segment, offset, written as u32)
    }

    fn set_slot(&self, st: &mut State, seq: u64, slot: Slot) {
        st.pending_slots.insert(seq, slot);
    }

    /// Bookkeeping when a live record stops being live.
    fn release(&self, st: &mut State, seq: u64, segment: u32, record_len: u32) {
        if let Some(u) = st.segments.get_mut(&segment) {
            u.live = u.live.saturating_sub(1);
            u.live_bytes = u.live_bytes.saturating_sub(u64::from(record_len));
            if u.live == 0 && segment != st.write_segment {
                Self::retire_segment(st, segment);
            }
        }
        let n = seq / SLOTS_PER_INDEX;
        if let Some(live) = st.index_live.get_mut(&n) {
            *live = live.saturating_sub(1);
            let complete = st.max_seq.is_some_and(|m| m >= (n + 1) * SLOTS_PER_INDEX);
            if *live == 0 && complete {
                self.retire_index(st, n);
            }
        }
    }

    /// A segment with nothing live left, and nothing more to come, is deleted after the next
    /// sync. What of it is still to be written need not be: written after the deletion, it
    /// would bring the file back for good.
    fn retire_segment(st: &mut State, n: u32) {
        st.segments.remove(&n);
        st.dead_segments.push(n);
        st.pending.retain(|c| c.segment != n);
    }

    /// An index file with no live slot left, and no slot still to come, is deleted.
    fn retire_index(&self, st: &mut State, n: u64) {
        st.index_live.remove(&n);
        st.dead_indexes.push(n);
        // Its slots need not be written any more.
        let range = n * SLOTS_PER_INDEX..(n + 1) * SLOTS_PER_INDEX;
        let doomed: Vec<u64> = st.pending_slots.range(range).map(|(s, _)| *s).collect();
        for s in doomed {
            st.pending_slots.remove(&s);
        }
    }

    fn segment_path(&self, n: u32) -> PathBuf {
        self.dir.join(segment_name(n))
    }

    fn index_path(&self, n: u64) -> PathBuf {
        self.dir.join(index_name(n))
    }

    fn segment_file(&self, files: &mut Files, n: u32) -> io::Result<Arc<File>> {
        if let Some(f) = files.segments.get(&n) {
            return Ok(f.clone());
        }
        let path = self.segment_path(n);
        let existed = path.exists();
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?,
        );
        files.created |= !existed;
        files.segments.insert(n, f.clone());
        Ok(f)
    }

    fn index_file(&self, files: &mut Files, n: u64, create: bool) -> io::Result<Option<Arc<File>>> {
        if let Some(f) = files.indexes.get(&n) {
            return Ok(Some(f.clone()));
        }
        let path = self.index_path(n);
        let existed = path.exists();
        if !existed && !create {
            return Ok(None);
        }
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?,
        );
        files.created |= !existed;
        files.indexes.insert(n, f.clone());
        Ok(Some(f))
    }

    /// The slot of `seq`: pending version first, else from disk.
    fn read_slots(
        &self,
        st: &State,
        files: &mut Files,
        from: u64,
        to: u64,
    ) -> io::Result<Vec<(u64, SlotRead)>> {
        let n = from / SLOTS_PER_INDEX;
        debug_assert_eq!((to - 1) / SLOTS_PER_INDEX, n, "one index file per read");
        let mut disk = vec![0u8; ((to - from) as usize) * SLOT_SIZE];
        if let Some(f) = self.index_file(files, n, false)? {
            let offset = (from % SLOTS_PER_INDEX) * SLOT_SIZE as u64;
            let got = read_at_most(&f, &mut disk, offset)?;
            disk[got..].fill(0);
        }
        let mut out = Vec::with_capacity((to - from) as usize);
        for (i, seq) in (from..to).enumerate() {
            let slot = match st.pending_slots.get(&seq) {
                Some(s) => SlotRead::Valid(*s),
                None => {
                    let at = i * SLOT_SIZE;
                    match record::decode_slot(&disk[at..at + SLOT_SIZE]) {
                        SlotRead::Valid(s) if s.seq != seq => SlotRead::Corrupt,
                        other => other,
                    }
                }
            };
            out.push((seq, slot));
        }
        Ok(out)
    }

    /// Reads one record, from pending data if it is not written yet.
    fn read_record(
        &self,
        st: &State,
        files: &mut Files,
        slot: &Slot,
    ) -> Result<Bytes, RecordError> {
        let sources = st
            .pending
            .iter()
            .chain(st.in_flight.iter().flat_map(|f| f.chunks.iter()));
        for c in sources {
            if c.segment == slot.segment
                && slot.offset >= c.offset
                && (slot.offset - c.offset) as usize + slot.record_len as usize <= c.data.len()
            {
                let at = (slot.offset - c.offset) as usize;
                return Ok(Bytes::copy_from_slice(
                    &c.data[at..at + slot.record_len as usize],
                ));
            }
        }
        let f = self
            .segment_file_for_read(files, slot.segment)
            .map_err(|_| RecordError::Truncated)?;
        let mut buf = vec![0u8; slot.record_len as usize];
        let got = read_at_most(&f, &mut buf, u64::from(slot.offset))
            .map_err(|_| RecordError::Truncated)?;
        if got < buf.len() {
            return Err(RecordError::Truncated);
        }
        Ok(Bytes::from(buf))
    }

    fn segment_file_for_read(&self, files: &mut Files, n: u32) -> io::Result<Arc<File>> {
        if let Some(f) = files.segments.get(&n) {
            return Ok(f.clone());
        }
        let f = Arc::new(File::open(self.segment_path(n))?);
        files.segments.insert(n, f.clone());
        Ok(f)
    }

    /// Copies the live records of mostly-dead segments into the current one, so that the old
    /// files can go. Runs after a flush round, outside the queue's lock.
    fn compact(&self) {
        let candidates: Vec<u32> = {
            let st = self.state.lock();
            // Worth it only for a segment of some size that is mostly dead.
            let big = u64::from(self.options.segment_size) / 4;
            st.segments
                .iter()
                .filter(|(n, u)| {
                    **n + 1 < st.write_segment
                        && u.live > 0
                        && u.total_bytes >= big
                        && (u.live_bytes as f64) < u.total_bytes as f64 * self.options.compact_below
                })
                .map(|(n, _)| *n)
                .collect()
        };
        for segment in candidates {
            if let Err(e) = self.compact_segment(segment) {
                tracing::warn!(dir = %self.dir.display(), segment, error = %e, "compaction failed");
            }
        }
    }

    fn compact_segment(&self, segment: u32) -> io::Result<()> {
        // Parse the old segment without holding the lock.
        let bytes = Bytes::from(fs::read(self.segment_path(segment))?);
        let mut records = Vec::new();
        let mut at = 0usize;
        while at + RECORD_HEADER <= bytes.len() {
            let Some(len) = record::record_len(&bytes[at..]) else {
                break;
            };
            if at + len > bytes.len() {
                break;
            }
            if let Ok((seq, message)) = record::decode_record(&bytes.slice(at..at + len), true) {
                records.push((seq, at as u32, message));
            }
            at += len;
        }
        // Compaction appends old records to newer segments, so a segment's records are not
        // always in sequence order.
        records.sort_by_key(|r| r.0);
        let mut st = self.state.lock();
        if st.destroyed || !st.segments.contains_key(&segment) {
            return Ok(());
        }
        let mut files = self.files.lock();
        let mut moved_any = false;
        for group in records.chunk_by(|a, b| a.0 / SLOTS_PER_INDEX == b.0 / SLOTS_PER_INDEX) {
            let (first, last) = (group[0].0, group[group.len() - 1].0);
            let slots = self.read_slots(&st, &mut files, first, last + 1)?;
            for (seq, offset, message) in group {
                let Some((_, SlotRead::Valid(slot))) = slots.get((seq - first) as usize) else {
                    continue;
                };
                // Live only if its slot still points here and is not removed.
                let dead_paged = slot.kind == RecordKind::Paged && *seq < st.opened_at;
                if slot.removed() || dead_paged || slot.segment != segment || slot.offset != *offset
                {
                    continue;
                }
                let (new_segment, new_offset, new_len) = self.push_record(&mut st, *seq, message);
                let moved = Slot {
                    segment: new_segment,
                    offset: new_offset,
                    record_len: new_len,
                    ..*slot
                };
                self.set_slot(&mut st, *seq, moved);
                let u = st.segments.entry(new_segment).or_default();
                u.live += 1;
                u.live_bytes += u64::from(new_len);
                st.moved.insert(*seq, new_segment);
                moved_any = true;
            }
        }
        drop(files);
        Self::retire_segment(&mut st, segment);
        if moved_any || !st.dead_segments.is_empty() {
            self.register(&mut st);
        }
        tracing::debug!(dir = %self.dir.display(), segment, "segment compacted");
        Ok(())
    }
}

fn read_at_most(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Cuts the newest segment after its last valid record: a write interrupted by a crash leaves
/// a partial record there. A damaged record followed by valid ones is corruption, not a torn
/// tail: it is reported and left for reads to skip.
fn truncate_torn_tail(n: u32, path: &Path) -> io::Result<()> {
    let bytes = Bytes::from(fs::read(path)?);
    let mut at = 0usize;
    let mut last_good_end = 0usize;
    while at + RECORD_HEADER <= bytes.len() {
        let rest = bytes.slice(at..);
        match record::decode_record(&rest, false) {
            Ok(_) => {
                at += record::record_len(&rest).expect("decoded");
                last_good_end = at;
            }
            Err(RecordError::Corrupt) => {
                tracing::warn!(file = %path.display(), offset = at, "corrupt message record");
                // Skip it by its length, to look for valid records behind it.
                match record::record_len(&rest) {
                    Some(len) if len > RECORD_HEADER => at += len,
                    _ => break,
                }
            }
            Err(RecordError::Truncated) => break,
        }
    }
    if last_good_end < bytes.len() {
        tracing::warn!(file = %path.display(), segment = n, offset = last_good_end, cut = bytes.len() - last_good_end, "torn record at the end of a segment truncated");
        let f = OpenOptions::new().write(true).open(path)?;
        f.set_len(last_good_end as u64)?;
        f.sync_all()?;
    }
    Ok(())
}

impl QueueStore for FileQueueStore {
    fn append(&self, seq: u64, message: &Message, kind: RecordKind) -> Stored {
        let mut st = self.state.lock();
        if st.destroyed {
            return Stored {
                location: Location {
                    kind,
                    segment: 0,
                    offset: 0,
                    record_len: 0,
                    body_len: 0,
                },
                epoch: 0,
            };
        }
        let (segment, offset, record_len) = self.push_record(&mut st, seq, message);
        let location = Location {
            kind,
            segment,
            offset,
            record_len,
            body_len: message.body.len() as u32,
        };
        self.set_slot(
            &mut st,
            seq,
            Slot {
                kind,
                flags: 0,
                returned: 0,
                seq,
                segment,
                offset,
                record_len,
                body_len: location.body_len,
            },
        );
        let u = st.segments.entry(segment).or_default();
        u.live += 1;
        u.live_bytes += u64::from(record_len);
        *st.index_live.entry(seq / SLOTS_PER_INDEX).or_default() += 1;
        let before = st.max_seq;
        st.max_seq = Some(st.max_seq.map_or(seq, |m| m.max(seq)));
        // The first slot of a new index file completes the ones before it: those whose
        // slots are all removed already go now.
        if let Some(before) = before
            && seq / SLOTS_PER_INDEX > before / SLOTS_PER_INDEX
        {
            let current = seq / SLOTS_PER_INDEX;
            let emptied: Vec<u64> = st
                .index_live
                .iter()
                .filter(|(n, live)| **n < current && **live == 0)
                .map(|(n, _)| *n)
                .collect();
            for n in emptied {
                self.retire_index(&mut st, n);
            }
        }
        self.register(&mut st);
        // Read under the lock: a round that has not taken this store's data yet is still
        // this epoch's (see flusher.rs).
        let epoch = self.flusher.current_epoch();
        if kind == RecordKind::Persistent {
            self.flusher.want(epoch);
        }
        Stored { location, epoch }
    }

    fn mark_delivered(&self, seq: u64, at: Location, returned: u16) {
        let mut st = self.state.lock();
        if st.destroyed || at.kind != RecordKind::Persistent {
            return;
        }
        let slot = match st.pending_slots.get(&seq) {
            Some(s) => Slot {
                flags: s.flags | FLAG_DELIVERED,
                returned,
                ..*s
            },
            // A compacted record moved: `at` is stale, so the slot on disk says where it is.
            None if st.moved.contains_key(&seq) => {
                let mut files = self.files.lock();
                match self.read_slots(&st, &mut files, seq, seq + 1) {
                    Ok(slots) => match slots.first() {
                        Some((_, SlotRead::Valid(s))) if !s.removed() => Slot {
                            flags: s.flags | FLAG_DELIVERED,
                            returned,
                            ..*s
                        },
                        _ => return,
                    },
                    Err(e) => {
                        tracing::warn!(dir = %self.dir.display(), seq, error = %e, "cannot read a moved message's slot; its delivery is not recorded");
                        return;
                    }
                }
            }
            None => Slot {
                kind: at.kind,
                flags: FLAG_DELIVERED,
                returned,
                seq,
                segment: at.segment,
                offset: at.offset,
                record_len: at.record_len,
                body_len: at.body_len,
            },
        };
        self.set_slot(&mut st, seq, slot);
        self.register(&mut st);
    }

    fn remove(&self, seq: u64, at: Location) {
        let mut st = self.state.lock();
        if st.destroyed {
            return;
        }
        let segment = st.moved.remove(&seq).unwrap_or(at.segment);
        let slot = match st.pending_slots.get(&seq) {
            Some(s) => Slot {
                flags: s.flags | FLAG_REMOVED,
                ..*s
            },
            None => Slot {
                kind: at.kind,
                flags: FLAG_REMOVED,
                returned: 0,
                seq,
                segment,
                offset: at.offset,
                record_len: at.record_len,
                body_len: at.body_len,
            },
        };
        let record_len = slot.record_len;
        self.set_slot(&mut st, seq, slot);
        self.release(&mut st, seq, segment, record_len);
        self.register(&mut st);
    }

    fn read(&self, from: u64, until: u64, max: usize, max_bytes: u64) -> ReadBatch {
        let mut batch = ReadBatch {
            next: from,
            ..ReadBatch::default()
        };
        let mut st = self.state.lock();
        if st.destroyed {
            batch.next = until;
            return batch;
        }
        let mut files = self.files.lock();
        let mut bytes = 0u64;
        let mut seq = from;
        'scan: while seq < until && batch.messages.len() < max && bytes < max_bytes {
            let end = until
                .min((seq / SLOTS_PER_INDEX + 1) * SLOTS_PER_INDEX)
                .min(seq + SCAN_CHUNK);
            let slots = match self.read_slots(&st, &mut files, seq, end) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(dir = %self.dir.display(), error = %e, "cannot read index");
                    break;
                }
            };
            for (s, slot) in slots {
                if batch.messages.len() >= max || bytes >= max_bytes {
                    batch.next = s;
                    break 'scan;
                }
                match slot {
                    SlotRead::Empty => {}
                    SlotRead::Corrupt => {
                        tracing::warn!(file = %self.index_path(s / SLOTS_PER_INDEX).display(), offset = (s % SLOTS_PER_INDEX) * SLOT_SIZE as u64, "corrupt index slot skipped");
                    }
                    SlotRead::Valid(slot) if slot.removed() => {}
                    SlotRead::Valid(slot) if slot.kind == RecordKind::Paged && s < st.opened_at => {
                    }
                    SlotRead::Valid(slot) => match self.read_record(&st, &mut files, &slot) {
                        Ok(raw) => {
                            match record::decode_record(&raw, slot.kind == RecordKind::Persistent) {
                                Ok((rseq, message)) if rseq == s => {
                                    bytes += message.body.len() as u64;
                                    batch.messages.push(StoredMessage {
                                        seq: s,
                                        message,
                                        location: Location {
                                            kind: slot.kind,
                                            segment: slot.segment,
                                            offset: slot.offset,
                                            record_len: slot.record_len,
                                            body_len: slot.body_len,
                                        },
                                        delivered: slot.delivered(),
                                        returned: slot.returned,
                                    });
                                }
                                _ => {
                                    tracing::warn!(file = %self.segment_path(slot.segment).display(), offset = slot.offset, "corrupt message record skipped");
                                    self.drop_damaged(&mut st, s, slot);
                                    batch.dropped += 1;
                                }
                            }
                        }
                        Err(_) => {
                            tracing::warn!(file = %self.segment_path(slot.segment).display(), offset = slot.offset, "missing or truncated message record skipped");
                            self.drop_damaged(&mut st, s, slot);
                            batch.dropped += 1;
                        }
                    },
                }
            }
            seq = end;
            batch.next = seq;
        }
        batch
    }

    fn remove_range(&self, from: u64, until: u64) -> u64 {
        let mut st = self.state.lock();
        if st.destroyed {
            return 0;
        }
        let mut files = self.files.lock();
        let mut removed = 0;
        let mut seq = from;
        while seq < until {
            let end = until
                .min((seq / SLOTS_PER_INDEX + 1) * SLOTS_PER_INDEX)
                .min(seq + SCAN_CHUNK);
            let Ok(slots) = self.read_slots(&st, &mut files, seq, end) else {
                break;
            };
            for (s, slot) in slots {
                if let SlotRead::Valid(slot) = slot
                    && !slot.removed()
                    && !(slot.kind == RecordKind::Paged && s < st.opened_at)
                {
                    let segment = st.moved.remove(&s).unwrap_or(slot.segment);
                    self.set_slot(
                        &mut st,
                        s,
                        Slot {
                            flags: slot.flags | FLAG_REMOVED,
                            ..slot
                        },
                    );
                    self.release(&mut st, s, segment, slot.record_len);
                    removed += 1;
                }
            }
            seq = end;
        }
        drop(files);
        if removed > 0 {
            self.register(&mut st);
        }
        removed
    }

    fn destroy(&self) {
        let mut st = self.state.lock();
        st.destroyed = true;
        st.pending.clear();
        st.pending_slots.clear();
        st.in_flight = None;
        let mut files = self.files.lock();
        files.segments.clear();
        files.indexes.clear();
        if let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %self.dir.display(), error = %e, "cannot delete queue store");
        }
    }

    fn durable_epoch(&self) -> u64 {
        self.flusher.durable_epoch()
    }
}

impl FileQueueStore {
    fn drop_damaged(&self, st: &mut State, seq: u64, slot: Slot) {
        self.set_slot(
            st,
            seq,
            Slot {
                flags: slot.flags | FLAG_REMOVED,
                ..slot
            },
        );
        self.release(st, seq, slot.segment, slot.record_len);
        self.register(st);
    }
}

impl Flushable for FileQueueStore {
    fn write_pending(&self) -> io::Result<Vec<Arc<File>>> {
        let InFlight { chunks, slots } = {
            let mut st = self.state.lock();
            st.queued = false;
            if st.destroyed {
                return Ok(Vec::new());
            }
            let taken = InFlight {
                chunks: Arc::new(std::mem::take(&mut st.pending)),
                slots: Arc::new(std::mem::take(&mut st.pending_slots)),
            };
            st.in_flight = Some(taken.clone());
            taken
        };
        let mut files = self.files.lock();
        let mut to_sync: Vec<Arc<File>> = Vec::new();
        let add = |f: Arc<File>, to_sync: &mut Vec<Arc<File>>| {
            if !to_sync.iter().any(|g| Arc::ptr_eq(g, &f)) {
                to_sync.push(f);
            }
        };
        for c in chunks.iter() {
            let f = self.segment_file(&mut files, c.segment)?;
            f.write_all_at(&c.data, u64::from(c.offset))?;
            self.flusher.wrote(c.data.len() as u64);
            add(f, &mut to_sync);
        }
        // Consecutive slots of one index file go out in one write.
        let mut run: Vec<u8> = Vec::new();
        let mut run_start: Option<u64> = None;
        let flush_run = |start: u64,
                         run: &mut Vec<u8>,
                         files: &mut Files,
                         to_sync: &mut Vec<Arc<File>>|
         -> io::Result<()> {
            if run.is_empty() {
                return Ok(());
            }
            let n = start / SLOTS_PER_INDEX;
            if let Some(f) = self.index_file(files, n, true)? {
                f.write_all_at(run, (start % SLOTS_PER_INDEX) * SLOT_SIZE as u64)?;
                add(f, to_sync);
            }
            run.clear();
            Ok(())
        };
        for (seq, slot) in slots.iter() {
            let next = run_start.map(|s| s + (run.len() / SLOT_SIZE) as u64);
            let same_file = run_start.is_some_and(|s| s / SLOTS_PER_INDEX == seq / SLOTS_PER_INDEX);
            if next != Some(*seq) || !same_file {
                if let Some(start) = run_start {
                    flush_run(start, &mut run, &mut files, &mut to_sync)?;
                }
                run_start = Some(*seq);
            }
            run.extend_from_slice(&slot.encode());
        }
        if let Some(start) = run_start {
            flush_run(start, &mut run, &mut files, &mut to_sync)?;
        }
        if std::mem::take(&mut files.created) {
            to_sync.push(Arc::new(File::open(&self.dir)?));
        }
        if !self.options.sync {
            to_sync.clear();
        }
        Ok(to_sync)
    }

    fn after_sync(&self) {
        let (segments, indexes) = {
            let mut st = self.state.lock();
            st.in_flight = None;
            if st.destroyed {
                return;
            }
            (
                std::mem::take(&mut st.dead_segments),
                std::mem::take(&mut st.dead_indexes),
            )
        };
        {
            let mut files = self.files.lock();
            for n in &segments {
                files.segments.remove(n);
                let _ = fs::remove_file(self.segment_path(*n));
            }
            for n in &indexes {
                files.indexes.remove(n);
                let _ = fs::remove_file(self.index_path(*n));
            }
        }
        self.compact();
    }

    fn failed(&self) {
        let mut st = self.state.lock();
        if let Some(InFlight { chunks, slots }) = st.in_flight.take() {
            let mut chunks = Arc::try_unwrap(chunks).unwrap_or_else(|shared| {
                shared
                    .iter()
                    .map(|c| Chunk {
                        segment: c.segment,
                        offset: c.offset,
                        data: c.data.clone(),
                    })
                    .collect()
            });
            chunks.append(&mut st.pending);
            // Not those of segments retired meanwhile (see `retire_segment`).
            let live = &st.segments;
            chunks.retain(|c| live.contains_key(&c.segment));
            st.pending = chunks;
            for (seq, slot) in slots.iter() {
                st.pending_slots.entry(*seq).or_insert(*slot);
            }
        }
        st.queued = false;
    }
}
