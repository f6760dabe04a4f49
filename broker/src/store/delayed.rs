//! The messages of a vhost's delayed exchanges (`x-delayed-message`) until they are due.
//!
//! Millions of messages may wait for hours, so they live on disk and memory holds a bounded
//! part of them:
//! - **The log** (`wal-G.log`, one *generation* G at a time): every scheduled message is
//!   appended to it and synced by the [`Flusher`] in its group-commit rounds, so a publisher's
//!   confirm of a persistent delayed message means it is on disk. Each message is also kept in
//!   memory (the *buffer*, ordered by due time) until the buffer passes its byte budget.
//! - **Runs** (`run-N.dat`): when the buffer is full (or the log long), its messages not due
//!   within a second are written, sorted by due time, to a new run file, and leave the
//!   buffer. A run is read from its front only: its next message, and with it those due
//!   within two seconds. So memory holds the buffer, a few numbers and one message per run,
//!   and the read-ahead of the runs whose messages are coming due: never anything per message
//!   waiting on disk. (Runs are not merged: a backlog of N bytes has about N divided by the
//!   buffer's budget of them, each costing a message in memory and none of them a file
//!   handle.)
//! - **The manifest** (`manifest.json`, replaced atomically) lists the runs, how far each has
//!   been delivered (only positions whose routed copies are on disk), and for each the
//!   *cutoff*: the run holds every message of log generations up to its `max_generation` due after
//!   its cutoff, the log keeps those due before it.
//!
//! A message delivered from the buffer gets a *done* record in the log once its routed copies
//! are on disk, so that recovery does not deliver it again. A log generation is deleted when
//! none of its messages waits any more (in the buffer or for its done record) and every
//! older one is gone; a run when it is delivered to the end and no log it covers is left.
//!
//! Recovery reads the manifest and the logs (never the runs beyond their read-ahead), puts
//! the persistent messages of the logs that no run holds and no done record settles back in
//! the buffer, writes them to a fresh log generation and deletes the old ones. Delivery is at
//! least once: a crash may repeat messages delivered in the last moments before it, and
//! never loses one that was confirmed.

use super::durability::{Progress, Ticket};
use super::flusher::{Flushable, Flusher};
use super::record::{self, RECORD_HEADER};
use crate::broker::message::Message;
use bytes::{BufMut, Bytes};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Instant;

const TAG_MESSAGE: u8 = 1;
const TAG_DONE: u8 = 2;
const FLAG_PERSISTENT: u8 = 1;
const MANIFEST: &str = "manifest.json";
/// Bookkeeping bytes counted for each buffered message besides its record.
const ENTRY_OVERHEAD: usize = 64;
/// A spill leaves in memory what comes due within this many milliseconds.
const SPILL_MARGIN_MS: u64 = 1000;
/// A run's messages due within this many milliseconds are read ahead together.
const NEAR_MS: u64 = 2000;
/// The smallest read of a run.
const MIN_READ: usize = 4096;

/// Tunables of a delayed-message store.
#[derive(Debug, Clone, Copy)]
pub struct DelayedOptions {
    /// Bytes of scheduled messages kept in memory before they are written to a run.
    pub memory_bytes: usize,
    /// A log generation longer than this is closed (its buffer written to a run).
    pub log_bytes: u64,
    /// Bytes read ahead from a run at a time.
    pub read_ahead: usize,
}

impl Default for DelayedOptions {
    fn default() -> Self {
        Self {
            memory_bytes: 16 * 1024 * 1024,
            log_bytes: 64 * 1024 * 1024,
            read_ahead: 64 * 1024,
        }
    }
}

/// A message to schedule.
#[derive(Debug)]
pub struct Scheduled<'a> {
    /// When it is due, milliseconds since the Unix epoch.
    pub due: u64,
    /// The delayed exchange that routes it then.
    pub exchange: &'a str,
    /// Its routing keys (the routing key, then any CC and BCC keys).
    pub keys: &'a [&'a [u8]],
    pub message: &'a Message,
    /// Survives a restart (a persistent message on a durable exchange).
    pub durable: bool,
}

/// Where a due message came from, to settle it once its routed copies are on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Buffer { generation: u64 },
    Run { id: u64 },
}

/// A message whose time has come.
#[derive(Debug)]
pub struct Due {
    pub seq: u64,
    pub due: u64,
    pub exchange: String,
    pub keys: Vec<Bytes>,
    pub message: Message,
    pub source: Source,
}

/// One scheduled message as memory holds it: its whole record.
#[derive(Debug, Clone)]
struct Entry {
    due: u64,
    seq: u64,
    record: Bytes,
}

#[derive(Debug, Clone)]
struct Buffered {
    entry: Entry,
    generation: u64,
}

impl PartialEq for Buffered {
    fn eq(&self, other: &Self) -> bool {
        (self.entry.due, self.entry.seq) == (other.entry.due, other.entry.seq)
    }
}
impl Eq for Buffered {}
impl PartialOrd for Buffered {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Buffered {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.entry.due, self.entry.seq).cmp(&(other.entry.due, other.entry.seq))
    }
}

/// A run as the manifest records it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunMeta {
    id: u64,
    len: u64,
    /// Delivered up to here, with the routed copies on disk.
    pos: u64,
    /// Messages after `pos`.
    remaining: u64,
    cutoff: u64,
    max_generation: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Manifest {
    next_seq: u64,
    next_run: u64,
    runs: Vec<RunMeta>,
}

#[derive(Debug)]
struct Run {
    meta: RunMeta,
    /// Where the next read-ahead starts.
    read_at: u64,
    /// Read ahead, in order, each with the offset just past its record.
    ahead: VecDeque<(Entry, u64)>,
    /// Taken, in order, waiting to be routed and for their copies to reach disk: (end offset,
    /// ticket of its copies — `None` until routed, sequence number).
    settling: VecDeque<(u64, Option<Ticket>, u64)>,
    /// Opened at recovery: its transient messages are gone.
    recovered: bool,
    /// Bytes the next read takes.
    chunk: usize,
}

impl Run {
    fn exhausted(&self) -> bool {
        self.ahead.is_empty() && self.read_at >= self.meta.len
    }
}

#[derive(Debug)]
struct Chunk {
    file: Arc<File>,
    offset: u64,
    data: Vec<u8>,
}

#[derive(Debug, Default)]
struct Inner {
    destroyed: bool,
    next_seq: u64,
    next_run: u64,
    /// The log generation appends go to.
    generation: u64,
    /// Its file, once something was written to it, and its length.
    log: Option<(Arc<File>, u64)>,
    /// Generations with a log file on disk.
    logs: std::collections::BTreeSet<u64>,
    /// Messages of each generation not yet settled (in the buffer or waiting for disk).
    outstanding: BTreeMap<u64, u64>,
    buffer: BinaryHeap<Reverse<Buffered>>,
    buffer_bytes: usize,
    /// Buffered messages taken and routed: (generation, sequence number, ticket of their
    /// copies).
    settling: VecDeque<(u64, u64, Ticket)>,
    runs: Vec<Run>,
    /// For the flusher: log bytes to write, and those of the round in progress.
    pending: Vec<Chunk>,
    in_flight: Vec<Chunk>,
    created: bool,
    created_in_flight: bool,
    registered: bool,
    spilling: bool,
    /// Counts changes to the list of runs; the manifest on disk has `saved_version` (logs
    /// go only once it lists every run).
    runs_version: u64,
    saved_version: u64,
    /// Positions moved since the last save (saved now and then).
    positions_moved: bool,
    saved_at: Option<Instant>,
}

/// The manifest to write, and the run list version it has.
struct Snapshot {
    manifest: Manifest,
    runs_version: u64,
}

pub struct DelayedStore {
    dir: Option<PathBuf>,
    /// Held while files are written or deleted (by `settle`, `spill` and `destroy`), so that
    /// a housekeeping job never touches the directory after `destroy` (a vhost re-created
    /// with the same name gets the same directory).
    io: Mutex<()>,
    flusher: Option<Arc<Flusher>>,
    options: DelayedOptions,
    me: Weak<DelayedStore>,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for DelayedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DelayedStore")
            .field("dir", &self.dir)
            .finish()
    }
}

fn log_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("wal-{generation:016x}.log"))
}

fn run_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("run-{id:016x}.dat"))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Numbered files of `dir` named `<prefix>-<hex>.<ext>`.
fn numbered(dir: &Path, prefix: &str, ext: &str) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(n) = name
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix('-'))
            .and_then(|r| r.strip_suffix(ext))
            .and_then(|r| r.strip_suffix('.'))
            .and_then(|r| u64::from_str_radix(r, 16).ok())
        else {
            continue;
        };
        out.push((n, path));
    }
    out.sort();
    Ok(out)
}

/// Encodes a scheduled message's record:
/// `crc32 u32 | len u32 | tag u8 | due u64 | seq u64 | flags u8 | exchange (u8 len + bytes) |
///  key count u16 | keys (u16 len + bytes each) | the message as a queue store record`.
/// (Routing keys are short strings, but CC and BCC keys are long strings.)
fn encode_message(seq: u64, s: &Scheduled<'_>) -> Bytes {
    let mut out = Vec::with_capacity(64 + s.message.size() + s.exchange.len());
    out.put_u32(0);
    out.put_u32(0);
    out.put_u8(TAG_MESSAGE);
    out.put_u64(s.due);
    out.put_u64(seq);
    out.put_u8(if s.durable { FLAG_PERSISTENT } else { 0 });
    let x = &s.exchange.as_bytes()[..s.exchange.len().min(255)];
    out.put_u8(x.len() as u8);
    out.put_slice(x);
    let keys = &s.keys[..s.keys.len().min(usize::from(u16::MAX))];
    out.put_u16(keys.len() as u16);
    for k in keys {
        let k = &k[..k.len().min(usize::from(u16::MAX))];
        out.put_u16(k.len() as u16);
        out.put_slice(k);
    }
    record::encode_record(&mut out, seq, s.message);
    seal(out)
}

fn encode_done(seq: u64) -> Bytes {
    let mut out = Vec::with_capacity(17);
    out.put_u32(0);
    out.put_u32(0);
    out.put_u8(TAG_DONE);
    out.put_u64(seq);
    seal(out)
}

fn seal(mut out: Vec<u8>) -> Bytes {
    let len = (out.len() - RECORD_HEADER) as u32;
    out[4..8].copy_from_slice(&len.to_be_bytes());
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_be_bytes());
    Bytes::from(out)
}

/// What a record in a log or run turned out to be.
enum Parsed {
    Message {
        due: u64,
        seq: u64,
        durable: bool,
        record: Bytes,
    },
    Done(u64),
    /// Cut short: the end of what was written.
    Truncated,
    Corrupt,
}

/// Parses the record at the start of `bytes`; returns it and its length.
fn parse(bytes: &Bytes) -> (Parsed, usize) {
    let Some(total) = record::record_len(bytes) else {
        return (Parsed::Truncated, 0);
    };
    if bytes.len() < total {
        return (Parsed::Truncated, 0);
    }
    if total < RECORD_HEADER + 9 {
        return (Parsed::Corrupt, total);
    }
    let crc = u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes"));
    if crc != crc32fast::hash(&bytes[4..total]) {
        return (Parsed::Corrupt, total);
    }
    let b = &bytes[RECORD_HEADER..total];
    let u64_at = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    match b[0] {
        TAG_DONE => (Parsed::Done(u64_at(1)), total),
        TAG_MESSAGE if b.len() >= 18 => (
            Parsed::Message {
                due: u64_at(1),
                seq: u64_at(9),
                durable: b[17] & FLAG_PERSISTENT != 0,
                record: bytes.slice(..total),
            },
            total,
        ),
        _ => (Parsed::Corrupt, total),
    }
}

/// Decodes a message record into what routing needs.
fn decode_due(record: &Bytes, source: Source) -> Option<Due> {
    let b = &record[RECORD_HEADER..];
    let due = u64::from_be_bytes(b.get(1..9)?.try_into().ok()?);
    let seq = u64::from_be_bytes(b.get(9..17)?.try_into().ok()?);
    let durable = *b.get(17)? & FLAG_PERSISTENT != 0;
    let mut at = RECORD_HEADER + 18;
    // A string after its length, of `width` bytes.
    let string = |at: &mut usize, width: usize| -> Option<Bytes> {
        let len = record.get(*at..*at + width)?;
        let n = len.iter().fold(0usize, |n, b| n << 8 | usize::from(*b));
        let s = record.get(*at + width..*at + width + n)?;
        let s = record.slice_ref(s);
        *at += width + n;
        Some(s)
    };
    let exchange = String::from_utf8_lossy(&string(&mut at, 1)?).into_owned();
    let count = u16::from_be_bytes(record.get(at..at + 2)?.try_into().ok()?) as usize;
    at += 2;
    let mut keys = Vec::with_capacity(count);
    for _ in 0..count {
        keys.push(string(&mut at, 2)?);
    }
    let (_, message) = record::decode_record(&record.slice(at..), durable).ok()?;
    Some(Due {
        seq,
        due,
        exchange,
        keys,
        message,
        source,
    })
}

impl DelayedStore {
    /// Opens the store in `dir` (memory only without one) and recovers what it holds.
    pub fn open(
        dir: Option<&Path>,
        flusher: Option<Arc<Flusher>>,
        options: DelayedOptions,
    ) -> io::Result<Arc<Self>> {
        let mut inner = Inner::default();
        if let (Some(dir), Some(_)) = (dir, &flusher) {
            recover(dir, &mut inner)?;
        }
        Ok(Arc::new_cyclic(|me| Self {
            dir: dir.filter(|_| flusher.is_some()).map(Path::to_path_buf),
            flusher,
            options,
            io: Mutex::new(()),
            me: me.clone(),
            inner: Mutex::new(inner),
        }))
    }

    /// Schedules a message; returns the flush epoch after which it is on disk (0: nothing
    /// to wait for).
    pub fn schedule(&self, s: Scheduled<'_>) -> io::Result<u64> {
        let mut st = self.inner.lock();
        if st.destroyed {
            return Err(io::Error::other("the vhost is being deleted"));
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let record = encode_message(seq, &s);
        let mut epoch = 0;
        if self.dir.is_some() {
            self.append(&mut st, &record)?;
            if s.durable
                && let Some(f) = &self.flusher
            {
                // A publisher waits for it: a round at once (group commit).
                epoch = f.current_epoch();
                f.want(epoch);
            }
        }
        let generation = st.generation;
        *st.outstanding.entry(generation).or_default() += 1;
        st.buffer_bytes += record.len() + ENTRY_OVERHEAD;
        st.buffer.push(Reverse(Buffered {
            entry: Entry {
                due: s.due,
                seq,
                record,
            },
            generation,
        }));
        Ok(epoch)
    }

    /// Appends a record to the current log generation (for the flusher to write).
    fn append(&self, st: &mut Inner, record: &[u8]) -> io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        if st.log.is_none() {
            let path = log_path(dir, st.generation);
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .read(true)
                .open(&path)?;
            st.log = Some((Arc::new(file), 0));
            st.logs.insert(st.generation);
            st.created = true;
        }
        let (file, len) = st.log.as_mut().expect("opened above");
        let offset = *len;
        *len += record.len() as u64;
        match st.pending.last_mut() {
            Some(c) if Arc::ptr_eq(&c.file, file) && c.offset + c.data.len() as u64 == offset => {
                c.data.extend_from_slice(record);
            }
            _ => {
                let file = file.clone();
                st.pending.push(Chunk {
                    file,
                    offset,
                    data: record.to_vec(),
                });
            }
        }
        if !st.registered
            && let Some(f) = &self.flusher
        {
            st.registered = true;
            let me: Weak<dyn Flushable> = self.me.clone();
            f.register(me);
        }
        Ok(())
    }

    /// Scheduled messages not yet delivered.
    pub fn len(&self) -> u64 {
        let st = self.inner.lock();
        st.buffer.len() as u64 + st.runs.iter().map(|r| r.meta.remaining).sum::<u64>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of scheduled messages held in memory.
    #[cfg(test)]
    fn memory_bytes(&self) -> usize {
        let st = self.inner.lock();
        st.buffer_bytes
            + st.runs
                .iter()
                .map(|r| r.ahead.iter().map(|(e, _)| e.record.len()).sum::<usize>())
                .sum::<usize>()
    }

    /// When the earliest message is due.
    pub fn next_due(&self) -> Option<u64> {
        let now = crate::broker::message::now_ms();
        let mut st = self.inner.lock();
        let mut next = st.buffer.peek().map(|b| b.0.entry.due);
        let st = &mut *st;
        for run in &mut st.runs {
            if let Some(due) = self.run_head(run, now) {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        next
    }

    /// The due time of a run's next message, reading ahead when needed.
    fn run_head(&self, run: &mut Run, now: u64) -> Option<u64> {
        if run.ahead.is_empty()
            && run.read_at < run.meta.len
            && let Err(e) = self.read_ahead(run, now)
        {
            tracing::error!(run = run.meta.id, error = %e, "cannot read delayed messages");
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof | io::ErrorKind::NotFound
            ) {
                // Shorter than the manifest says, or gone: what is left of it is lost.
                run.read_at = run.meta.len;
                run.meta.remaining = run.ahead.len() as u64;
            }
            return None;
        }
        run.ahead.front().map(|(e, _)| e.due)
    }

    /// Reads the next messages of a run into memory: those due within [`NEAR_MS`], and at
    /// least one. A run whose next message is far off costs that one message, so memory
    /// stays small however many runs a large backlog has; reads grow while the run's
    /// messages keep coming due together.
    fn read_ahead(&self, run: &mut Run, now: u64) -> io::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        // Opened for each read-ahead, not kept: a large backlog has many runs.
        let file = File::open(run_path(dir, run.meta.id))?;
        let near = now.saturating_add(NEAR_MS);
        while run.ahead.is_empty() && run.read_at < run.meta.len {
            let chunk = run
                .chunk
                .clamp(MIN_READ, self.options.read_ahead.max(MIN_READ));
            let want = (chunk as u64).min(run.meta.len - run.read_at);
            let mut buf = vec![0u8; want as usize];
            file.read_exact_at(&mut buf, run.read_at)?;
            // A record longer than the read-ahead is read whole.
            if let Some(len) = record::record_len(&buf)
                && len > buf.len()
            {
                let len = (len as u64).min(run.meta.len - run.read_at);
                buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, run.read_at)?;
            }
            let bytes = Bytes::from(buf);
            let mut at = 0usize;
            let mut stopped = false;
            while at < bytes.len() {
                let (parsed, len) = parse(&bytes.slice(at..));
                match parsed {
                    Parsed::Truncated => break,
                    Parsed::Corrupt if len > RECORD_HEADER => {
                        tracing::warn!(
                            run = run.meta.id,
                            offset = run.read_at + at as u64,
                            "corrupt delayed message skipped"
                        );
                        run.meta.remaining = run.meta.remaining.saturating_sub(1);
                    }
                    Parsed::Corrupt | Parsed::Done(_) => {
                        tracing::error!(
                            run = run.meta.id,
                            offset = run.read_at + at as u64,
                            "unreadable delayed-message run; the rest of it is skipped"
                        );
                        run.read_at = run.meta.len;
                        run.meta.remaining = 0;
                        return Ok(());
                    }
                    Parsed::Message {
                        due,
                        seq,
                        durable,
                        record,
                    } => {
                        let end = run.read_at + (at + len) as u64;
                        if due <= run.meta.cutoff {
                            // The log holds it.
                        } else if run.recovered && !durable {
                            run.meta.remaining = run.meta.remaining.saturating_sub(1);
                        } else if !run.ahead.is_empty() && due > near {
                            // Read again when it is nearer.
                            stopped = true;
                            break;
                        } else {
                            // A copy: a slice would keep the whole read in memory.
                            let record = Bytes::copy_from_slice(&record);
                            run.ahead.push_back((Entry { due, seq, record }, end));
                        }
                    }
                }
                at += len;
            }
            if at == 0 {
                // Not even one whole record: the run is damaged at its end.
                tracing::error!(
                    run = run.meta.id,
                    offset = run.read_at,
                    "delayed-message run cut short"
                );
                run.read_at = run.meta.len;
                run.meta.remaining = run.ahead.len() as u64;
                break;
            }
            run.read_at += at as u64;
            run.chunk = if stopped { MIN_READ } else { chunk * 2 };
        }
        Ok(())
    }

    /// Takes up to `max` messages due at `now`, earliest first.
    pub fn take_due(&self, now: u64, max: usize) -> Vec<Due> {
        let mut out = Vec::new();
        let mut st = self.inner.lock();
        let st = &mut *st;
        while out.len() < max {
            let mut best: Option<(u64, u64, Option<usize>)> = st
                .buffer
                .peek()
                .map(|b| (b.0.entry.due, b.0.entry.seq, None));
            for (i, run) in st.runs.iter_mut().enumerate() {
                if self.run_head(run, now).is_some() {
                    let (e, _) = run.ahead.front().expect("has a head");
                    if best.is_none_or(|(d, s, _)| (e.due, e.seq) < (d, s)) {
                        best = Some((e.due, e.seq, Some(i)));
                    }
                }
            }
            let Some((due, _, from)) = best else { break };
            if due > now {
                break;
            }
            let (entry, source) = match from {
                None => {
                    let b = st.buffer.pop().expect("peeked").0;
                    st.buffer_bytes -= b.entry.record.len() + ENTRY_OVERHEAD;
                    (
                        b.entry,
                        Source::Buffer {
                            generation: b.generation,
                        },
                    )
                }
                Some(i) => {
                    let run = &mut st.runs[i];
                    let (e, end) = run.ahead.pop_front().expect("has a head");
                    // Settled in order: the ticket is filled in by `routed`.
                    run.settling.push_back((end, None, e.seq));
                    (e, Source::Run { id: run.meta.id })
                }
            };
            match decode_due(&entry.record, source) {
                Some(d) => out.push(d),
                None => {
                    tracing::error!(seq = entry.seq, "undecodable delayed message dropped");
                    self.settle_one(st, source, entry.seq, Ticket::Done);
                }
            }
        }
        out
    }

    /// A taken message was routed; its copies are safe once `ticket` is done.
    pub fn routed(&self, due: &Due, ticket: Ticket) {
        let mut st = self.inner.lock();
        self.settle_one(&mut st, due.source, due.seq, ticket);
    }

    fn settle_one(&self, st: &mut Inner, source: Source, seq: u64, ticket: Ticket) {
        match source {
            Source::Buffer { generation } => st.settling.push_back((generation, seq, ticket)),
            Source::Run { id } => {
                if let Some(run) = st.runs.iter_mut().find(|r| r.meta.id == id)
                    && let Some(slot) = run.settling.iter_mut().rev().find(|s| s.2 == seq)
                {
                    slot.1 = Some(ticket);
                }
            }
        }
    }

    /// Whether taken messages wait for their copies to reach disk.
    pub fn settling(&self) -> bool {
        let st = self.inner.lock();
        !st.settling.is_empty() || st.runs.iter().any(|r| !r.settling.is_empty())
    }

    /// Whether [`DelayedStore::settle`] or [`DelayedStore::spill`] has work to do.
    pub fn needs_housekeeping(&self) -> bool {
        let st = self.inner.lock();
        let spill = self.dir.is_some() && !st.spilling && self.spill_due(&st);
        !st.destroyed
            && (spill
                || !st.settling.is_empty()
                || st
                    .runs
                    .iter()
                    .any(|r| !r.settling.is_empty() || r.exhausted())
                || st.positions_moved
                || st.runs_version != st.saved_version
                || st.logs.first().is_some_and(|g| {
                    *g < st.generation && st.outstanding.get(g).is_none_or(|n| *n == 0)
                }))
    }

    /// Settles what is on disk now (whose tickets are done): done records, run
    /// positions; then saves the manifest and deletes the logs and runs nothing needs. The
    /// file work happens outside the store's lock (blocking I/O: run it off the async
    /// threads), so that scheduling and taking due messages never wait for a sync.
    pub fn settle(&self) -> io::Result<()> {
        let progress = self
            .flusher
            .as_ref()
            .map_or(Progress::ALL, |f| Progress::flushed(f.durable_epoch()));
        let mut gone = Vec::new();
        let snapshot = {
            let mut st = self.inner.lock();
            let st = &mut *st;
            if st.destroyed {
                return Ok(());
            }
            let mut kept = VecDeque::new();
            while let Some((generation, seq, ticket)) = st.settling.pop_front() {
                if !ticket.is_done(progress) {
                    kept.push_back((generation, seq, ticket));
                    continue;
                }
                if self.dir.is_some()
                    && let Err(e) = self.append(st, &encode_done(seq))
                {
                    // Nothing is lost: this one and the rest are settled next time.
                    kept.push_back((generation, seq, ticket));
                    kept.append(&mut st.settling);
                    st.settling = kept;
                    return Err(e);
                }
                if let Some(n) = st.outstanding.get_mut(&generation) {
                    *n = n.saturating_sub(1);
                }
            }
            st.settling = kept;
            for run in &mut st.runs {
                while let Some(&(end, ticket, _)) = run.settling.front() {
                    if !ticket.is_some_and(|t| t.is_done(progress)) {
                        break;
                    }
                    run.settling.pop_front();
                    run.meta.pos = end;
                    run.meta.remaining = run.meta.remaining.saturating_sub(1);
                    st.positions_moved = true;
                }
                if run.exhausted() && run.settling.is_empty() && run.meta.pos < run.meta.len {
                    run.meta.pos = run.meta.len;
                    run.meta.remaining = 0;
                    st.positions_moved = true;
                }
            }
            if self.dir.is_none() {
                return Ok(());
            }
            // Runs delivered to the end leave the manifest once no log they cover is left;
            // their files go once the manifest without them is saved.
            let oldest_log = st.logs.first().copied();
            st.runs.retain(|r| {
                let done = r.exhausted() && r.settling.is_empty() && r.meta.pos >= r.meta.len;
                let covered = oldest_log.is_some_and(|g| g <= r.meta.max_generation);
                if done && !covered {
                    gone.push(r.meta.id);
                    false
                } else {
                    true
                }
            });
            if !gone.is_empty() {
                st.runs_version += 1;
            }
            let due_for_save = st.runs_version != st.saved_version
                || (st.positions_moved
                    && st
                        .saved_at
                        .is_none_or(|t| t.elapsed() >= std::time::Duration::from_millis(200)));
            due_for_save.then(|| self.snapshot(st))
        };
        let dir = self.dir.clone().expect("checked above");
        let _io = self.io.lock();
        if self.inner.lock().destroyed {
            return Ok(());
        }
        if let Some(snapshot) = snapshot {
            self.save(&dir, snapshot)?;
        }
        for id in gone {
            let _ = fs::remove_file(run_path(&dir, id));
        }
        // Logs go oldest first, once nothing of theirs waits and the manifest lists every
        // run that holds their messages.
        let deletable: Vec<u64> = {
            let mut st = self.inner.lock();
            let mut out = Vec::new();
            if st.runs_version == st.saved_version {
                while let Some(&generation) = st.logs.first() {
                    if generation >= st.generation
                        || st.outstanding.get(&generation).is_some_and(|n| *n > 0)
                    {
                        break;
                    }
                    st.logs.remove(&generation);
                    st.outstanding.remove(&generation);
                    out.push(generation);
                }
            }
            out
        };
        for (i, generation) in deletable.iter().enumerate() {
            if let Err(e) = fs::remove_file(log_path(&dir, *generation))
                && e.kind() != io::ErrorKind::NotFound
            {
                // Still on disk: it (and the newer ones not deleted) stays listed, so that
                // no run it covers goes before it.
                self.inner.lock().logs.extend(&deletable[i..]);
                return Err(e);
            }
        }
        Ok(())
    }

    /// The manifest as the store is now, to save outside the lock.
    fn snapshot(&self, st: &mut Inner) -> Snapshot {
        let manifest = Manifest {
            next_seq: st.next_seq,
            next_run: st.next_run,
            runs: st.runs.iter().map(|r| r.meta.clone()).collect(),
        };
        st.positions_moved = false;
        st.saved_at = Some(Instant::now());
        Snapshot {
            manifest,
            runs_version: st.runs_version,
        }
    }

    /// Writes a snapshot of the manifest atomically, newest wins; with `io` held.
    fn save(&self, dir: &Path, snapshot: Snapshot) -> io::Result<()> {
        if self.inner.lock().saved_version > snapshot.runs_version {
            // A newer snapshot is on disk already.
            return Ok(());
        }
        let written = (|| -> io::Result<()> {
            let tmp = dir.join("manifest.json.tmp");
            let bytes = serde_json::to_vec(&snapshot.manifest).map_err(io::Error::other)?;
            {
                let f = File::create(&tmp)?;
                f.write_all_at(&bytes, 0)?;
                f.sync_data()?;
            }
            fs::rename(&tmp, dir.join(MANIFEST))?;
            sync_dir(dir)
        })();
        let mut st = self.inner.lock();
        match written {
            Ok(()) => {
                st.saved_version = st.saved_version.max(snapshot.runs_version);
                Ok(())
            }
            Err(e) => {
                st.positions_moved = true;
                Err(e)
            }
        }
    }

    /// The buffer is over its budget, or the log generation past its length (delivered
    /// messages and their done records add up even when the buffer stays small).
    fn spill_due(&self, st: &Inner) -> bool {
        (!st.buffer.is_empty() && st.buffer_bytes > self.options.memory_bytes)
            || st
                .log
                .as_ref()
                .is_some_and(|(_, len)| *len > self.options.log_bytes)
    }

    /// Whether the buffer (or the log) has grown enough to be written to a run.
    pub fn wants_spill(&self) -> bool {
        if self.dir.is_none() {
            return false;
        }
        let st = self.inner.lock();
        !st.spilling && !st.destroyed && self.spill_due(&st)
    }

    /// Writes the buffer to a new run and closes the log generation (blocking I/O: run it
    /// off the async threads). Messages due by the time the run is installed stay in the
    /// buffer, and the run skips them.
    pub fn spill(&self) -> io::Result<()> {
        let Some(dir) = self.dir.clone() else {
            return Ok(());
        };
        let (id, max_generation, mut entries, soon) = {
            let mut st = self.inner.lock();
            if st.spilling || st.destroyed {
                return Ok(());
            }
            // What comes due while the run is written stays in memory anyway.
            let soon = crate::broker::message::now_ms() + SPILL_MARGIN_MS;
            let entries: Vec<Entry> = st
                .buffer
                .iter()
                .filter(|b| b.0.entry.due > soon)
                .map(|b| b.0.entry.clone())
                .collect();
            if entries.is_empty() {
                // Nothing to write (all of it comes due within the margin): closing a long
                // log generation is all there is to do.
                if st
                    .log
                    .as_ref()
                    .is_some_and(|(_, len)| *len > self.options.log_bytes)
                {
                    st.generation += 1;
                    st.log = None;
                }
                return Ok(());
            }
            st.spilling = true;
            let max_generation = st.generation;
            st.generation += 1;
            st.log = None;
            let id = st.next_run;
            st.next_run += 1;
            (id, max_generation, entries, soon)
        };
        let _io = self.io.lock();
        if self.inner.lock().destroyed {
            return Ok(());
        }
        entries.sort_by_key(|e| (e.due, e.seq));
        let written = (|| -> io::Result<u64> {
            let tmp = dir.join(format!("run-{id:016x}.tmp"));
            let file = File::create(&tmp)?;
            let mut at = 0u64;
            let mut batch = Vec::with_capacity(1 << 20);
            for e in &entries {
                batch.extend_from_slice(&e.record);
                if batch.len() >= 1 << 20 {
                    file.write_all_at(&batch, at)?;
                    at += batch.len() as u64;
                    batch.clear();
                }
            }
            file.write_all_at(&batch, at)?;
            at += batch.len() as u64;
            file.sync_data()?;
            fs::rename(&tmp, run_path(&dir, id))?;
            sync_dir(&dir)?;
            Ok(at)
        })();
        let mut st = self.inner.lock();
        st.spilling = false;
        let len = match written {
            Ok(len) => len,
            Err(e) => {
                // The messages stay in the buffer and the logs; a later spill tries again.
                let _ = fs::remove_file(dir.join(format!("run-{id:016x}.tmp")));
                return Err(e);
            }
        };
        if st.destroyed {
            return Ok(());
        }
        // The run holds every message of these generations due after the cutoff; those due
        // by then stay in the buffer (and the run skips them).
        let cutoff = crate::broker::message::now_ms().max(soon);
        let mut moved: BTreeMap<u64, u64> = BTreeMap::new();
        let mut freed = 0usize;
        let mut remaining = 0u64;
        st.buffer.retain(|b| {
            let goes = b.0.generation <= max_generation && b.0.entry.due > cutoff;
            if goes {
                *moved.entry(b.0.generation).or_default() += 1;
                freed += b.0.entry.record.len() + ENTRY_OVERHEAD;
                remaining += 1;
            }
            !goes
        });
        st.buffer_bytes -= freed;
        for (generation, n) in moved {
            if let Some(o) = st.outstanding.get_mut(&generation) {
                *o = o.saturating_sub(n);
            }
        }
        if remaining == 0 {
            // Everything was due by now: no run. The log generation still closed.
            drop(st);
            let _ = fs::remove_file(run_path(&dir, id));
            return Ok(());
        }
        st.runs.push(Run {
            meta: RunMeta {
                id,
                len,
                pos: 0,
                remaining,
                cutoff,
                max_generation,
            },
            read_at: 0,
            ahead: VecDeque::new(),
            settling: VecDeque::new(),
            recovered: false,
            chunk: MIN_READ,
        });
        st.runs_version += 1;
        let snapshot = self.snapshot(&mut st);
        drop(st);
        self.save(&dir, snapshot)
    }

    /// Deletes everything (the vhost is being deleted).
    pub fn destroy(&self) {
        let _io = self.io.lock();
        let mut st = self.inner.lock();
        st.destroyed = true;
        st.buffer.clear();
        st.buffer_bytes = 0;
        st.runs.clear();
        st.pending.clear();
        st.settling.clear();
        if let Some(dir) = &self.dir {
            let _ = fs::remove_dir_all(dir);
        }
    }

    pub fn is_destroyed(&self) -> bool {
        self.inner.lock().destroyed
    }
}

/// Reads the manifest and the logs of `dir` into `st`: see the module's documentation.
fn recover(dir: &Path, st: &mut Inner) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let manifest: Manifest = match fs::read(dir.join(MANIFEST)) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: {e}", dir.join(MANIFEST).display()),
            )
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Manifest::default(),
        Err(e) => return Err(e),
    };
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "tmp") {
            fs::remove_file(&path)?;
        }
    }
    let listed: HashSet<u64> = manifest.runs.iter().map(|r| r.id).collect();
    for (id, path) in numbered(dir, "run", "dat")? {
        if !listed.contains(&id) {
            // A spill that did not finish: the logs still hold its messages.
            fs::remove_file(&path)?;
        }
    }
    // A run the manifest lists but the disk lacks holds nothing: its messages are read from
    // the logs, if they are still there.
    let runs: Vec<RunMeta> = manifest
        .runs
        .iter()
        .filter(|r| {
            let there = run_path(dir, r.id).exists();
            if !there {
                tracing::error!(
                    run = r.id,
                    "a delayed-message run listed in the manifest is missing"
                );
            }
            there
        })
        .cloned()
        .collect();
    let logs = numbered(dir, "wal", "log")?;
    let mut done = HashSet::new();
    let mut seen = HashSet::new();
    let mut found: Vec<(u64, u64, u64, Bytes)> = Vec::new();
    let mut max_seq = None::<u64>;
    let mut max_generation = manifest.runs.iter().map(|r| r.max_generation).max();
    for (generation, path) in &logs {
        max_generation = Some(max_generation.map_or(*generation, |m| m.max(*generation)));
        let bytes = Bytes::from(fs::read(path)?);
        let mut at = 0usize;
        while at < bytes.len() {
            let (parsed, len) = parse(&bytes.slice(at..));
            match parsed {
                Parsed::Truncated => break,
                Parsed::Corrupt => {
                    tracing::warn!(file = %path.display(), offset = at, "corrupt delayed-message record; the rest of the log is skipped");
                    break;
                }
                Parsed::Done(seq) => {
                    done.insert(seq);
                }
                Parsed::Message {
                    due,
                    seq,
                    durable,
                    record,
                } => {
                    max_seq = Some(max_seq.map_or(seq, |m| m.max(seq)));
                    let spilled = runs
                        .iter()
                        .any(|r| r.max_generation >= *generation && due > r.cutoff);
                    // A recovery cut short leaves a message in two logs: it is kept once.
                    if durable && !spilled && seen.insert(seq) {
                        // A copy: a slice would keep the whole log file in memory.
                        found.push((due, seq, *generation, Bytes::copy_from_slice(&record)));
                    }
                }
            }
            at += len;
        }
    }
    st.next_seq = manifest.next_seq.max(max_seq.map_or(0, |m| m + 1));
    st.next_run = manifest
        .next_run
        .max(manifest.runs.iter().map(|r| r.id + 1).max().unwrap_or(0));
    st.generation = max_generation.map_or(0, |g| g + 1);
    // What the logs still hold goes to a fresh generation, written and synced before the
    // old logs are deleted.
    let kept: Vec<(u64, u64, Bytes)> = found
        .into_iter()
        .filter(|(_, seq, _, _)| !done.contains(seq))
        .map(|(due, seq, _, record)| (due, seq, record))
        .collect();
    if !kept.is_empty() {
        let path = log_path(dir, st.generation);
        let file = File::create(&path)?;
        let mut at = 0u64;
        for (_, _, record) in &kept {
            file.write_all_at(record, at)?;
            at += record.len() as u64;
        }
        file.sync_data()?;
        sync_dir(dir)?;
        st.log = Some((
            Arc::new(OpenOptions::new().write(true).read(true).open(&path)?),
            at,
        ));
        st.logs.insert(st.generation);
    }
    for (_, path) in &logs {
        fs::remove_file(path)?;
    }
    if !logs.is_empty() {
        sync_dir(dir)?;
    }
    for (due, seq, record) in kept {
        st.buffer_bytes += record.len() + ENTRY_OVERHEAD;
        *st.outstanding.entry(st.generation).or_default() += 1;
        st.buffer.push(Reverse(Buffered {
            entry: Entry { due, seq, record },
            generation: st.generation,
        }));
    }
    if runs.len() != manifest.runs.len() {
        st.runs_version = 1;
    }
    for meta in runs {
        st.runs.push(Run {
            read_at: meta.pos,
            meta,
            ahead: VecDeque::new(),
            settling: VecDeque::new(),
            recovered: true,
            chunk: MIN_READ,
        });
    }
    Ok(())
}

impl Flushable for DelayedStore {
    fn write_pending(&self) -> io::Result<Vec<Arc<File>>> {
        let (chunks, created) = {
            let mut st = self.inner.lock();
            st.registered = false;
            if st.destroyed {
                return Ok(Vec::new());
            }
            let chunks = std::mem::take(&mut st.pending);
            let created = std::mem::take(&mut st.created);
            (chunks, created)
        };
        let mut files: Vec<Arc<File>> = Vec::new();
        let result = (|| -> io::Result<()> {
            for c in &chunks {
                c.file.write_all_at(&c.data, c.offset)?;
                if let Some(f) = &self.flusher {
                    f.wrote(c.data.len() as u64);
                }
                if !files.iter().any(|f| Arc::ptr_eq(f, &c.file)) {
                    files.push(c.file.clone());
                }
            }
            if created && let Some(dir) = &self.dir {
                files.push(Arc::new(File::open(dir)?));
            }
            Ok(())
        })();
        let mut st = self.inner.lock();
        st.in_flight = chunks;
        if created {
            // Kept until the round succeeds, for `failed`.
            st.created_in_flight = true;
        }
        drop(st);
        result.map(|()| files)
    }

    fn after_sync(&self) {
        let mut st = self.inner.lock();
        st.in_flight.clear();
        st.created_in_flight = false;
    }

    fn failed(&self) {
        let mut st = self.inner.lock();
        let mut chunks = std::mem::take(&mut st.in_flight);
        chunks.append(&mut st.pending);
        st.pending = chunks;
        if std::mem::take(&mut st.created_in_flight) {
            st.created = true;
        }
        // The flusher tries the round again with this store in it.
        st.registered = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn message(body: &str, persistent: bool) -> Message {
        Message {
            exchange: "delayed".into(),
            routing_key: "key".into(),
            properties: Bytes::from_static(&[0x10, 0x00, 2]),
            body: Bytes::copy_from_slice(body.as_bytes()),
            persistent,
            arrived_ms: 1,
            expires_at_ms: None,
        }
    }

    fn schedule(store: &DelayedStore, due: u64, body: &str, durable: bool) -> u64 {
        let m = message(body, durable);
        let keys: [&[u8]; 2] = [b"key", b"cc"];
        store
            .schedule(Scheduled {
                due,
                exchange: "delayed",
                keys: &keys,
                message: &m,
                durable,
            })
            .unwrap()
    }

    fn wait_durable(flusher: &Flusher, epoch: u64) {
        flusher.want(epoch);
        let start = Instant::now();
        while flusher.durable_epoch() < epoch {
            assert!(start.elapsed() < Duration::from_secs(10), "flush timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn bodies(due: &[Due]) -> Vec<String> {
        due.iter()
            .map(|d| String::from_utf8_lossy(&d.message.body).into_owned())
            .collect()
    }

    /// Takes everything due by `now`, settling it as routed with nothing to wait for.
    fn drain(store: &DelayedStore, now: u64) -> Vec<String> {
        let due = store.take_due(now, usize::MAX);
        for d in &due {
            store.routed(d, Ticket::Done);
        }
        store.settle().unwrap();
        bodies(&due)
    }

    fn small() -> DelayedOptions {
        DelayedOptions {
            memory_bytes: 1024,
            log_bytes: 1 << 20,
            read_ahead: 256,
        }
    }

    #[test]
    fn records_keep_exchange_keys_and_message() {
        let store = DelayedStore::open(None, None, DelayedOptions::default()).unwrap();
        schedule(&store, 10, "a", true);
        let due = store.take_due(10, 10);
        assert_eq!(due.len(), 1);
        let d = &due[0];
        assert_eq!(d.exchange, "delayed");
        assert_eq!(
            d.keys,
            vec![Bytes::from_static(b"key"), Bytes::from_static(b"cc")]
        );
        assert_eq!(&d.message.body[..], b"a");
        assert_eq!(d.message.routing_key.as_bytes(), b"key");
        assert!(d.message.persistent);
        assert_eq!(d.due, 10);
    }

    #[test]
    fn messages_come_due_in_time_order_then_publish_order() {
        let store = DelayedStore::open(None, None, DelayedOptions::default()).unwrap();
        schedule(&store, 300, "c", false);
        schedule(&store, 100, "a", false);
        schedule(&store, 300, "d", false);
        schedule(&store, 200, "b", false);
        assert_eq!(store.next_due(), Some(100));
        assert!(drain(&store, 99).is_empty());
        assert_eq!(drain(&store, 200), ["a", "b"]);
        assert_eq!(store.len(), 2);
        assert_eq!(drain(&store, 1000), ["c", "d"]);
        assert!(store.is_empty());
    }

    #[test]
    fn spilled_runs_and_the_buffer_merge_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let flusher = Flusher::start(Duration::from_millis(1));
        let store = DelayedStore::open(Some(dir.path()), Some(flusher.clone()), small()).unwrap();
        // Far in the future, so that nothing is due when the runs are installed.
        let base = crate::broker::message::now_ms() + 3_600_000;
        let mut expected = Vec::new();
        for i in 0..200u64 {
            // Dues interleave across spills: i*7 mod 200 visits every slot once.
            let due = base + (i * 7) % 200;
            schedule(&store, due, &format!("m{:03}", (i * 7) % 200), true);
            if store.wants_spill() {
                store.spill().unwrap();
            }
        }
        for i in 0..200u64 {
            expected.push(format!("m{i:03}"));
        }
        let runs = numbered(dir.path(), "run", "dat").unwrap().len();
        assert!(runs >= 3, "expected several runs, got {runs}");
        assert!(
            store.memory_bytes() <= 2048,
            "memory {}",
            store.memory_bytes()
        );
        // Looking for the next due message reads one message of each run: with everything an
        // hour away, nothing more is near.
        assert_eq!(store.next_due(), Some(base));
        let per_run = store.inner.lock().runs.iter().map(|r| r.ahead.len()).max();
        assert_eq!(per_run, Some(1));
        assert_eq!(store.len(), 200);
        let mut got = Vec::new();
        let mut now = base;
        while got.len() < 200 && now < base + 400 {
            got.extend(drain(&store, now));
            // Read-ahead stays small: one chunk per run at most.
            assert!(store.memory_bytes() <= 2048 + runs * 512);
            now += 1;
        }
        assert_eq!(got, expected);
        // Everything delivered and settled: runs and old logs are gone.
        store.settle().unwrap();
        assert_eq!(numbered(dir.path(), "run", "dat").unwrap().len(), 0);
        assert!(numbered(dir.path(), "wal", "log").unwrap().len() <= 1);
        flusher.shutdown();
    }

    #[test]
    fn a_crash_keeps_every_persistent_message_not_settled() {
        let dir = tempfile::tempdir().unwrap();
        let flusher = Flusher::start(Duration::from_millis(1));
        let base = crate::broker::message::now_ms() + 3_600_000;
        {
            let store =
                DelayedStore::open(Some(dir.path()), Some(flusher.clone()), small()).unwrap();
            let mut epoch = 0;
            for i in 0..100u64 {
                epoch = epoch.max(schedule(&store, base + i, &format!("p{i:03}"), true));
                schedule(&store, base + i, &format!("t{i:03}"), false);
                if store.wants_spill() {
                    store.spill().unwrap();
                }
            }
            wait_durable(&flusher, epoch);
            // The first 30 persistent ones (and their transient twins) are delivered and
            // settled; the store is then dropped without more ado, as by kill -9.
            let mut delivered = 0;
            let mut now = base;
            while delivered < 60 {
                delivered += drain(&store, now).len();
                now += 1;
            }
            let e = flusher.current_epoch();
            wait_durable(&flusher, e);
            // Positions are saved at most every 200 ms; a save is forced by waiting.
            std::thread::sleep(Duration::from_millis(250));
            store.settle().unwrap();
            let e = flusher.current_epoch();
            wait_durable(&flusher, e);
        }
        let store = DelayedStore::open(Some(dir.path()), Some(flusher.clone()), small()).unwrap();
        let got = drain(&store, base + 1000);
        let expected: Vec<String> = (30..100).map(|i| format!("p{i:03}")).collect();
        assert_eq!(got, expected);
        assert!(store.is_empty());
        flusher.shutdown();
    }

    #[test]
    fn unconfirmed_spill_leftovers_and_torn_logs_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let flusher = Flusher::start(Duration::from_millis(1));
        let base = crate::broker::message::now_ms() + 3_600_000;
        {
            let store = DelayedStore::open(
                Some(dir.path()),
                Some(flusher.clone()),
                DelayedOptions::default(),
            )
            .unwrap();
            let mut epoch = 0;
            for i in 0..10u64 {
                epoch = schedule(&store, base + i, &format!("m{i}"), true);
            }
            wait_durable(&flusher, epoch);
        }
        // A run file no manifest lists (a spill cut short), and half a record at the log's end.
        fs::write(dir.path().join("run-00000000000000aa.dat"), b"junk").unwrap();
        let (_, log) = numbered(dir.path(), "wal", "log").unwrap().pop().unwrap();
        let mut bytes = fs::read(&log).unwrap();
        let torn = encode_done(3);
        bytes.extend_from_slice(&torn[..torn.len() - 2]);
        fs::write(&log, bytes).unwrap();
        let store = DelayedStore::open(Some(dir.path()), Some(flusher.clone()), small()).unwrap();
        assert!(!dir.path().join("run-00000000000000aa.dat").exists());
        let got = drain(&store, base + 100);
        assert_eq!(got.len(), 10, "{got:?}");
        flusher.shutdown();
    }

    #[test]
    fn a_spill_keeps_what_comes_due_soon_and_recovery_finds_everything_once() {
        let dir = tempfile::tempdir().unwrap();
        let flusher = Flusher::start(Duration::from_millis(1));
        let now = crate::broker::message::now_ms();
        {
            let store =
                DelayedStore::open(Some(dir.path()), Some(flusher.clone()), small()).unwrap();
            let mut epoch = 0;
            for i in 0..40u64 {
                // Half due within the spill margin, half an hour away.
                let due = if i % 2 == 0 {
                    now + 200
                } else {
                    now + 1_800_000 + i
                };
                epoch = epoch.max(schedule(&store, due, &format!("m{i:02}"), true));
            }
            wait_durable(&flusher, epoch);
            assert!(store.wants_spill());
            store.spill().unwrap();
            // The far half went to a run, the near half stayed in memory.
            assert_eq!(numbered(dir.path(), "run", "dat").unwrap().len(), 1);
            assert_eq!(store.inner.lock().buffer.len(), 20);
            assert_eq!(store.len(), 40);
            // Dropped here without settling anything, as by kill -9.
        }
        let store = DelayedStore::open(Some(dir.path()), Some(flusher.clone()), small()).unwrap();
        assert_eq!(store.len(), 40);
        let mut got = drain(&store, now + 3_600_000);
        got.sort();
        let expected: Vec<String> = (0..40).map(|i| format!("m{i:02}")).collect();
        assert_eq!(got, expected, "each once");
        flusher.shutdown();
    }

    #[test]
    fn a_long_log_is_closed_and_deleted_once_delivered() {
        let dir = tempfile::tempdir().unwrap();
        let flusher = Flusher::start(Duration::from_millis(1));
        let options = DelayedOptions {
            memory_bytes: 1 << 20,
            log_bytes: 4096,
            read_ahead: 4096,
        };
        let store = DelayedStore::open(Some(dir.path()), Some(flusher.clone()), options).unwrap();
        let now = crate::broker::message::now_ms();
        for round in 0..10u64 {
            let mut epoch = 0;
            for i in 0..20u64 {
                epoch = schedule(&store, now, &format!("r{round}-{i}"), true);
            }
            wait_durable(&flusher, epoch);
            assert_eq!(drain(&store, now).len(), 20);
            if store.wants_spill() {
                store.spill().unwrap();
            }
            store.settle().unwrap();
            wait_durable(&flusher, flusher.current_epoch());
        }
        store.settle().unwrap();
        // Closed by size again and again; what is delivered leaves no log behind.
        assert!(store.inner.lock().generation >= 3);
        assert!(numbered(dir.path(), "wal", "log").unwrap().len() <= 1);
        assert_eq!(numbered(dir.path(), "run", "dat").unwrap().len(), 0);
        drop(store);
        let store = DelayedStore::open(Some(dir.path()), Some(flusher.clone()), options).unwrap();
        assert!(
            store.is_empty(),
            "done records keep delivered messages from coming back"
        );
        flusher.shutdown();
    }
}
