//! Durable definitions (vhosts, users, permissions, exchanges, queues, bindings, policies).
//!
//! Every change is a [`Command`] appended to `metadata.log` (one JSON line each) and synced
//! before its commit returns; committers that arrive while a sync runs share the next one. Now
//! and then the whole set is written to `definitions.json` (a temporary file, synced, renamed
//! over the old one, the directory synced) and the log starts again empty. Opening reads the
//! snapshot and replays the log over it; as commands are idempotent, a crash between writing a
//! snapshot and emptying the log replays commands the snapshot already holds, harmlessly.

use parking_lot::{Condvar, Mutex, MutexGuard};
use std::cell::RefCell;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use super::command::Command;
use super::command::apply;
pub use super::model::{
    BindingDefinition, Bindings, Definitions, ExchangeDefinition, PermissionDefinition,
    PolicyDefinition, QueueDefinition, UserDefinition, VhostDefinitions,
};

const FILE_NAME: &str = "definitions.json";
const LOG_NAME: &str = "metadata.log";
/// The log is folded into a new snapshot once it holds this many commands, or more bytes than
/// the snapshot (but at least [`MIN_COMPACT_BYTES`]).
const COMPACT_ENTRIES: u64 = 4096;
const MIN_COMPACT_BYTES: u64 = 64 * 1024;

/// Errors opening or writing the definitions, with the file they concern.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionsError {
    #[error("cannot read or write {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not a valid definitions file: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    /// The cluster could not commit the change now (no majority reachable, no leader, no
    /// answer in time); it may succeed later.
    #[error("{0}")]
    Unavailable(String),
    #[error("{path}, line {line}: not a valid command: {source}")]
    CorruptLog {
        path: PathBuf,
        line: usize,
        source: serde_json::Error,
    },
}

thread_local! {
    /// The stores whose commits on this thread wait for no sync (inside
    /// [`DefinitionStore::batch`]), each with the numbers of its first and last commands
    /// committed so (0: none yet).
    static DEFERRED: RefCell<Vec<(usize, u64, u64)>> = const { RefCell::new(Vec::new()) };
}

/// A replicated log the definitions are committed to: the cluster's metadata group.
pub trait MetaLog: Send + Sync + std::fmt::Debug {
    /// Commits `commands` as one entry: returns once a majority of the cluster has it and
    /// this node has applied it, or why it could not be done (the change may still be
    /// committed later when the error is a timeout).
    fn commit(&self, commands: Vec<Command>) -> Result<(), DefinitionsError>;
    /// The definitions as this node has applied them.
    fn definitions(&self) -> Definitions;
    /// This node's name.
    fn node(&self) -> &str;
}

thread_local! {
    /// Set while this thread applies changes that came through the cluster's log: they are
    /// committed already.
    static FROM_LOG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Commands of a [`DefinitionStore::batch`] on a replicated store, proposed together.
    static REPLICATED_BATCH: RefCell<Option<Vec<Command>>> = const { RefCell::new(None) };
}

/// The commands of an import proposed in one entry: large enough that an import of tens of
/// thousands of objects takes a few entries, small enough for a cluster link's frame.
pub const BATCH_ENTRY: usize = 2000;

/// The durable definitions, mirrored in memory and on disk.
#[derive(Debug)]
pub struct DefinitionStore {
    /// The cluster's metadata log, which holds the definitions when there is one.
    log: Option<std::sync::Arc<dyn MetaLog>>,
    /// `None` keeps everything in memory (tests, and brokers run without a data directory).
    disk: Option<Disk>,
    state: Mutex<State>,
    /// Signalled when a write of the log is over.
    written: Condvar,
}

#[derive(Debug)]
struct Disk {
    snapshot: PathBuf,
    log_path: PathBuf,
    /// Open for appending; written by one committer at a time (the one that set `syncing`).
    log: Mutex<fs::File>,
}

/// What the definitions hold now, and where the log stands.
#[derive(Debug, Default)]
struct State {
    defs: Definitions,
    /// Commands applied and not yet written to the log, as JSON lines.
    pending: Vec<u8>,
    pending_entries: u64,
    /// The number of the last command applied, and of the last one whose write is over (on
    /// disk, or failed).
    appended: u64,
    resolved: u64,
    /// A committer is writing the log; the others wait for it.
    syncing: bool,
    /// Commands whose write failed (first, last), with the error; the latest few.
    failed: Vec<(u64, u64, io::ErrorKind, String)>,
    /// What the log file holds.
    log_entries: u64,
    log_bytes: u64,
    snapshot_bytes: u64,
    /// After a snapshot failed: the log size at which one is tried again.
    retry_snapshot_at: u64,
}

/// What a definitions directory holds.
struct Loaded {
    defs: Definitions,
    snapshot_bytes: u64,
    log_entries: u64,
    /// The log's length up to its last whole command.
    log_bytes: u64,
}

impl Disk {
    fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DefinitionsError + '_ {
        move |source| DefinitionsError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Reads the snapshot and replays the log over it.
    fn load(&self) -> Result<Loaded, DefinitionsError> {
        let (mut defs, snapshot_bytes) = match fs::read(&self.snapshot) {
            Ok(bytes) => (
                serde_json::from_slice(&bytes).map_err(|source| DefinitionsError::Corrupt {
                    path: self.snapshot.clone(),
                    source,
                })?,
                bytes.len() as u64,
            ),
            Err(e) if e.kind() == io::ErrorKind::NotFound => (Definitions::default(), 0),
            Err(e) => return Err(Self::io_err(&self.snapshot)(e)),
        };
        let log = match fs::read(&self.log_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Self::io_err(&self.log_path)(e)),
        };
        let (commands, log_bytes) = parse_log(&log, &self.log_path)?;
        for c in &commands {
            apply(&mut defs, c);
        }
        Ok(Loaded {
            defs,
            snapshot_bytes,
            log_entries: commands.len() as u64,
            log_bytes,
        })
    }

    fn append(&self, lines: &[u8]) -> io::Result<()> {
        let mut log = self.log.lock();
        log.write_all(lines)?;
        log.sync_data()
    }

    /// Writes `defs` as the new snapshot and empties the log. Returns the snapshot's size.
    fn snapshot(&self, defs: &Definitions) -> Result<u64, DefinitionsError> {
        let bytes = write_atomically(&self.snapshot, defs)?;
        let log = self.log.lock();
        log.set_len(0)
            .and_then(|()| log.sync_all())
            .map_err(Self::io_err(&self.log_path))?;
        Ok(bytes)
    }
}

/// The commands of a log, and the length of the part that holds them. The last line, torn by
/// a crash in the middle of an append (it was never reported written), is left out with a
/// warning; any other line that is not a command is an error.
fn parse_log(log: &[u8], path: &Path) -> Result<(Vec<Command>, u64), DefinitionsError> {
    let mut commands = Vec::new();
    let mut whole = 0;
    let mut start = 0;
    let mut line = 0;
    while start < log.len() {
        line += 1;
        let end = log[start..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|at| start + at + 1);
        let text = &log[start..end.unwrap_or(log.len())];
        if text.iter().all(u8::is_ascii_whitespace) {
            match end {
                Some(e) => {
                    start = e;
                    whole = e;
                    continue;
                }
                None => break,
            }
        }
        let last = end.is_none_or(|e| log[e..].iter().all(u8::is_ascii_whitespace));
        match (serde_json::from_slice::<Command>(text), end) {
            (Ok(c), Some(e)) => {
                commands.push(c);
                start = e;
                whole = e;
            }
            (Err(source), Some(_)) if !last => {
                return Err(DefinitionsError::CorruptLog {
                    path: path.to_path_buf(),
                    line,
                    source,
                });
            }
            _ => {
                tracing::warn!(path = %path.display(), line, "ignoring the log's torn last line (the broker stopped while writing it)");
                break;
            }
        }
    }
    Ok((commands, whole as u64))
}

impl State {
    /// How the writes of commands `from` to `to` ended: the first failure among them.
    fn outcome(&self, from: u64, to: u64, log_path: &Path) -> Result<(), DefinitionsError> {
        match self
            .failed
            .iter()
            .find(|(first, last, ..)| *first <= to && from <= *last)
        {
            Some((_, _, kind, text)) => Err(DefinitionsError::Io {
                path: log_path.to_path_buf(),
                source: io::Error::new(*kind, text.clone()),
            }),
            None => Ok(()),
        }
    }

    fn snapshot_due(&self) -> bool {
        let big = self.log_entries >= COMPACT_ENTRIES
            || self.log_bytes >= self.snapshot_bytes.max(MIN_COMPACT_BYTES);
        big && self.log_bytes >= self.retry_snapshot_at
    }
}

/// Rounds of log writes a committer makes, at most, to empty what others appended meanwhile
/// before it takes a snapshot; under a steady stream of commits the snapshot waits for a later
/// committer.
const SNAPSHOT_ROUNDS: usize = 4;

impl DefinitionStore {
    pub fn in_memory() -> Self {
        Self {
            log: None,
            disk: None,
            state: Mutex::new(State::default()),
            written: Condvar::new(),
        }
    }

    /// Opens the definitions in `dir`, creating the directory if needed: the snapshot with the
    /// log replayed over it. A torn last line of the log is cut off.
    pub fn open(dir: &Path) -> Result<Self, DefinitionsError> {
        fs::create_dir_all(dir).map_err(Disk::io_err(dir))?;
        let log_path = dir.join(LOG_NAME);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(Disk::io_err(&log_path))?;
        let disk = Disk {
            snapshot: dir.join(FILE_NAME),
            log_path,
            log: Mutex::new(log),
        };
        let loaded = disk.load()?;
        {
            let log = disk.log.lock();
            let len = log.metadata().map_err(Disk::io_err(&disk.log_path))?.len();
            if len > loaded.log_bytes {
                log.set_len(loaded.log_bytes)
                    .and_then(|()| log.sync_all())
                    .map_err(Disk::io_err(&disk.log_path))?;
            }
        }
        if loaded.log_entries > 0 {
            tracing::info!(
                commands = loaded.log_entries,
                "definitions: replayed the metadata log"
            );
        }
        Ok(Self {
            log: None,
            disk: Some(disk),
            state: Mutex::new(State {
                defs: loaded.defs,
                snapshot_bytes: loaded.snapshot_bytes,
                log_entries: loaded.log_entries,
                log_bytes: loaded.log_bytes,
                ..State::default()
            }),
            written: Condvar::new(),
        })
    }

    /// Runs `f`, which makes changes that came through the cluster's log to this node's live
    /// objects: its commits are no-ops, the changes being committed already.
    pub fn from_log<R>(f: impl FnOnce() -> R) -> R {
        struct Reset(bool);
        impl Drop for Reset {
            fn drop(&mut self) {
                FROM_LOG.set(self.0);
            }
        }
        let _reset = Reset(FROM_LOG.replace(true));
        f()
    }

    /// Whether this thread is applying changes that came through the cluster's log.
    pub fn applying_from_log() -> bool {
        FROM_LOG.get()
    }

    /// Definitions kept by the cluster's metadata log: every change is committed there.
    pub fn replicated(log: std::sync::Arc<dyn MetaLog>) -> Self {
        Self {
            log: Some(log),
            ..Self::in_memory()
        }
    }

    /// What an earlier version kept in `dir` (a snapshot and the log of changes after it),
    /// if anything.
    pub fn read_legacy(dir: &Path) -> Result<Option<Definitions>, DefinitionsError> {
        let (snapshot, log_path) = (dir.join(FILE_NAME), dir.join(LOG_NAME));
        if !snapshot.exists() && !log_path.exists() {
            return Ok(None);
        }
        Ok(Some(Self::open(dir)?.snapshot()))
    }

    /// Moves an earlier version's files aside once their definitions are in the cluster's
    /// log, so that they are not imported again.
    pub fn retire_legacy(dir: &Path) -> Result<(), DefinitionsError> {
        for name in [FILE_NAME, LOG_NAME] {
            let path = dir.join(name);
            match fs::rename(&path, dir.join(format!("{name}.imported"))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Disk::io_err(&path)(e)),
            }
        }
        Ok(())
    }

    /// The node whose definitions these are, in a cluster.
    pub fn node(&self) -> Option<&str> {
        self.log.as_deref().map(MetaLog::node)
    }

    pub fn snapshot(&self) -> Definitions {
        match &self.log {
            Some(log) => log.definitions(),
            None => self.state.lock().defs.clone(),
        }
    }

    /// Commits the commands a replicated batch on this thread holds (if any): after them,
    /// `and` (one more command) when given.
    fn flush_replicated(
        &self,
        log: &dyn MetaLog,
        and: Vec<Command>,
    ) -> Result<(), DefinitionsError> {
        let mut commands = REPLICATED_BATCH
            .with(|b| b.borrow_mut().as_mut().map(std::mem::take))
            .unwrap_or_default();
        commands.extend(and);
        let mut result = Ok(());
        let mut rest = commands.as_slice();
        while !rest.is_empty() {
            let (entry, after) = rest.split_at(rest.len().min(BATCH_ENTRY));
            rest = after;
            if let Err(e) = log.commit(entry.to_vec()) {
                result = Err(e);
            }
        }
        result
    }

    /// Applies `command` and, if it changed anything, has it on disk before returning (inside
    /// [`DefinitionStore::batch`] on this thread: by the end of the batch). The cost is that of
    /// the command, not of all the definitions.
    pub fn commit(&self, command: Command) -> Result<(), DefinitionsError> {
        self.commit_with(command, true)
    }

    /// Commits `commands` at once, as [`DefinitionStore::commit_now`] does each (a batch's
    /// earlier commands before them): on a replicated store, in one entry of the cluster's
    /// log, so that they are committed all or none; at most [`BATCH_ENTRY`] of them.
    pub fn commit_all_now(&self, commands: Vec<Command>) -> Result<(), DefinitionsError> {
        match &self.log {
            Some(_) if FROM_LOG.get() => Ok(()),
            Some(_) if commands.is_empty() => Ok(()),
            Some(log) => {
                // The batch's earlier commands first, on their own: `commands` then go in one
                // entry of their own (callers keep them under [`BATCH_ENTRY`]), committed
                // whole or not at all.
                self.flush_replicated(log.as_ref(), Vec::new())?;
                debug_assert!(commands.len() <= BATCH_ENTRY);
                log.commit(commands)
            }
            None => commands.into_iter().try_for_each(|c| self.commit_now(c)),
        }
    }

    /// Commits `commands` as one change: on a replicated store, one entry of the cluster's log,
    /// committed together or not at all (inside [`DefinitionStore::batch`] on this thread,
    /// they join the batch, as [`DefinitionStore::commit`]'s do).
    pub fn commit_all(&self, commands: Vec<Command>) -> Result<(), DefinitionsError> {
        match &self.log {
            Some(_) if FROM_LOG.get() => Ok(()),
            Some(log) => {
                let rest = REPLICATED_BATCH.with(|b| match b.borrow_mut().as_mut() {
                    Some(batch) => {
                        batch.extend(commands);
                        None
                    }
                    None => Some(commands),
                });
                rest.map_or(Ok(()), |commands| log.commit(commands))
            }
            None => commands.into_iter().try_for_each(|c| self.commit(c)),
        }
    }

    /// Like [`DefinitionStore::commit`], but on disk before returning even inside a batch
    /// (with whatever the batch appended before it): for a change that must not be seen
    /// before it is durable, such as a queue that will hold confirmed messages, whose store a
    /// restart would otherwise take for a deleted queue's.
    pub fn commit_now(&self, command: Command) -> Result<(), DefinitionsError> {
        self.commit_with(command, false)
    }

    fn commit_with(&self, command: Command, may_defer: bool) -> Result<(), DefinitionsError> {
        if let Some(log) = &self.log {
            if FROM_LOG.get() {
                return Ok(());
            }
            let deferred = may_defer
                && REPLICATED_BATCH.with(|b| match b.borrow_mut().as_mut() {
                    Some(batch) => {
                        batch.push(command.clone());
                        true
                    }
                    None => false,
                });
            if deferred {
                return Ok(());
            }
            return self.flush_replicated(log.as_ref(), vec![command]);
        }
        let Some(disk) = &self.disk else {
            apply(&mut self.state.lock().defs, &command);
            return Ok(());
        };
        let mut line =
            serde_json::to_vec(&command).map_err(|source| DefinitionsError::Corrupt {
                path: disk.log_path.clone(),
                source,
            })?;
        line.push(b'\n');
        let mut state = self.state.lock();
        if !apply(&mut state.defs, &command) {
            // Nothing to add, but what made it so may be another caller's change not yet on
            // disk: done only once that is (and failed if that failed).
            let seq = state.appended;
            if seq > state.resolved && !(may_defer && self.in_batch()) {
                return self.wait(disk, state, seq);
            }
            return Ok(());
        }
        state.pending.extend_from_slice(&line);
        state.pending_entries += 1;
        state.appended += 1;
        let seq = state.appended;
        if may_defer && self.defer(seq) {
            return Ok(());
        }
        self.wait(disk, state, seq)
    }

    /// Runs `f`, whose commits on this thread are applied and appended at once but synced
    /// together at the end: one sync for a whole definitions import. Other threads' commits
    /// still wait for theirs (which covers what this one appended before them). The second
    /// result says whether the batch reached disk.
    pub fn batch<R>(&self, f: impl FnOnce() -> R) -> (R, Result<(), DefinitionsError>) {
        if let Some(log) = &self.log {
            let outer = REPLICATED_BATCH.with(|b| {
                let mut b = b.borrow_mut();
                let outer = b.is_some();
                if !outer {
                    *b = Some(Vec::new());
                }
                outer
            });
            if outer {
                return (f(), Ok(()));
            }
            // Whatever `f` does (a panic included), the batch ends here.
            struct End;
            impl Drop for End {
                fn drop(&mut self) {
                    REPLICATED_BATCH.with(|b| b.borrow_mut().take());
                }
            }
            let end = End;
            let out = f();
            let stored = self.flush_replicated(log.as_ref(), Vec::new());
            drop(end);
            return (out, stored);
        }
        let key = self.key();
        if DEFERRED.with(|d| d.borrow().iter().any(|(k, ..)| *k == key)) {
            return (f(), Ok(()));
        }
        let deferring = Deferring::start(key);
        let out = f();
        let (first, last) = deferring.finish();
        let synced = match &self.disk {
            Some(disk) if last > 0 => self
                .wait(disk, self.state.lock(), last)
                .and_then(|()| self.state.lock().outcome(first, last, &disk.log_path)),
            _ => Ok(()),
        };
        (out, synced)
    }

    fn key(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// Whether this thread is in a batch of this store.
    fn in_batch(&self) -> bool {
        let key = self.key();
        DEFERRED.with(|d| d.borrow().iter().any(|(k, ..)| *k == key))
    }

    /// Whether this thread is in a batch of this store; if so, notes `seq` as its last command.
    fn defer(&self, seq: u64) -> bool {
        let key = self.key();
        DEFERRED.with(|d| {
            d.borrow_mut()
                .iter_mut()
                .find(|(k, ..)| *k == key)
                .map(|(_, first, last)| {
                    if *first == 0 {
                        *first = seq;
                    }
                    *last = seq;
                })
                .is_some()
        })
    }

    /// Waits until command `seq` is written, writing it (and whatever else is pending) when no
    /// other committer is.
    fn wait(
        &self,
        disk: &Disk,
        mut state: MutexGuard<'_, State>,
        seq: u64,
    ) -> Result<(), DefinitionsError> {
        loop {
            if state.resolved >= seq {
                return state.outcome(seq, seq, &disk.log_path);
            }
            if state.syncing {
                self.written.wait(&mut state);
                continue;
            }
            state.syncing = true;
            if self.write_round(disk, &mut state) && state.snapshot_due() {
                self.take_snapshot(disk, &mut state);
            }
            state.syncing = false;
            self.written.notify_all();
        }
    }

    /// Writes and syncs what is pending (the caller set `syncing`). Returns whether it worked.
    fn write_round(&self, disk: &Disk, state: &mut MutexGuard<'_, State>) -> bool {
        let lines = std::mem::take(&mut state.pending);
        let entries = std::mem::take(&mut state.pending_entries);
        let through = state.appended;
        let written = MutexGuard::unlocked(state, || disk.append(&lines));
        match written {
            Ok(()) => {
                state.resolved = through;
                state.log_entries += entries;
                state.log_bytes += lines.len() as u64;
                true
            }
            Err(e) => {
                self.fail(disk, state, e);
                false
            }
        }
    }

    /// A write of the log failed: every command not yet written fails with it, the log is cut
    /// back to its last whole command, and the definitions are read back so that memory
    /// matches the disk again (callers change nothing more when their commit fails).
    fn fail(&self, disk: &Disk, state: &mut State, e: io::Error) {
        tracing::error!(path = %disk.log_path.display(), error = %e, "cannot write the metadata log");
        let (first, last) = (state.resolved + 1, state.appended);
        state.failed.push((first, last, e.kind(), e.to_string()));
        if state.failed.len() > 16 {
            // A failure is never forgotten (a batch checks its whole range only at its end):
            // the two oldest ranges become one. A command written between them may then be
            // reported failed to a caller that checks that late, which is the safe side.
            let (oldest, ..) = state.failed.remove(0);
            state.failed[0].0 = oldest;
        }
        state.pending.clear();
        state.pending_entries = 0;
        state.resolved = last;
        if let Err(e) = disk.log.lock().set_len(state.log_bytes) {
            tracing::error!(path = %disk.log_path.display(), error = %e, "cannot cut the metadata log back");
        }
        match disk.load() {
            Ok(loaded) => {
                state.defs = loaded.defs;
                state.log_entries = loaded.log_entries;
                state.log_bytes = loaded.log_bytes;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the definitions back after a failed write")
            }
        }
    }

    /// Folds the log into a new snapshot (the caller set `syncing`). What others appended
    /// meanwhile is written first, so that the snapshot holds only commands on disk.
    fn take_snapshot(&self, disk: &Disk, state: &mut MutexGuard<'_, State>) {
        for _ in 0..SNAPSHOT_ROUNDS {
            if state.pending.is_empty() {
                break;
            }
            if !self.write_round(disk, state) {
                return;
            }
            // Those waiting for the round just written need not wait for the snapshot.
            self.written.notify_all();
        }
        if !state.pending.is_empty() {
            return;
        }
        let defs = state.defs.clone();
        let started = std::time::Instant::now();
        match MutexGuard::unlocked(state, || disk.snapshot(&defs)) {
            Ok(bytes) => {
                tracing::debug!(
                    bytes,
                    commands = state.log_entries,
                    duration_ms = started.elapsed().as_millis() as u64,
                    "definitions: wrote a snapshot and emptied the log"
                );
                state.snapshot_bytes = bytes;
                state.log_entries = 0;
                state.log_bytes = 0;
                state.retry_snapshot_at = 0;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write a definitions snapshot; the log keeps growing");
                state.retry_snapshot_at = state.log_bytes.saturating_mul(2);
            }
        }
    }
}

/// This thread's batch of a store, ended when dropped (also by a panic).
struct Deferring {
    key: usize,
}

impl Deferring {
    fn start(key: usize) -> Self {
        DEFERRED.with(|d| d.borrow_mut().push((key, 0, 0)));
        Self { key }
    }

    /// Ends the batch; returns the numbers of its first and last commands (0: none).
    fn finish(self) -> (u64, u64) {
        let range = self.end();
        std::mem::forget(self);
        range
    }

    fn end(&self) -> (u64, u64) {
        DEFERRED.with(|d| {
            let mut d = d.borrow_mut();
            match d.iter().position(|(k, ..)| *k == self.key) {
                Some(at) => {
                    let (_, first, last) = d.swap_remove(at);
                    (first, last)
                }
                None => (0, 0),
            }
        })
    }
}

impl Drop for Deferring {
    fn drop(&mut self) {
        self.end();
    }
}

/// Writes `defs` atomically. Returns the number of bytes written.
fn write_atomically(path: &Path, defs: &Definitions) -> Result<u64, DefinitionsError> {
    let io_err = |source| DefinitionsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(defs).map_err(|source| DefinitionsError::Corrupt {
        path: path.to_path_buf(),
        source,
    })?;
    let tmp = path.with_extension("json.tmp");
    let mut file = fs::File::create(&tmp).map_err(io_err)?;
    file.write_all(&bytes).map_err(io_err)?;
    file.sync_data().map_err(io_err)?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err)?;
    }
    Ok(bytes.len() as u64)
}

#[cfg(test)]
mod tests;
