//! Group commit. Stores append to memory; one flusher thread writes what every store has
//! pending and syncs the files, so a single round of `fdatasync` covers everything that arrived
//! meanwhile from every connection. Publisher confirms wait for the round that covers them.
//!
//! Rounds are numbered by *epochs*. An append is stamped with the current epoch while its store
//! is locked; a round first advances the epoch, then takes each dirty store's pending data under
//! the same lock, so everything stamped with the old epoch is in the round. When the round's
//! syncs have returned, the old epoch is published as durable.

use parking_lot::{Condvar, Mutex};
use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::watch;

/// A store with data for the flusher.
pub trait Flushable: Send + Sync {
    /// Writes what is pending (no sync) and returns the files that now need syncing.
    fn write_pending(&self) -> io::Result<Vec<Arc<File>>>;
    /// Runs after the files returned by `write_pending` are synced (reclaiming space).
    fn after_sync(&self);
    /// The round failed: keep what `write_pending` took, to write it again next round.
    fn failed(&self);
}

#[derive(Default)]
struct State {
    dirty: Vec<Weak<dyn Flushable>>,
    stop: bool,
}

/// Counters for metrics and benchmarks.
#[derive(Debug, Default)]
pub struct FlushStats {
    pub rounds: AtomicU64,
    pub fsyncs: AtomicU64,
    pub errors: AtomicU64,
}

pub struct Flusher {
    /// The epoch appends are stamped with now.
    epoch: AtomicU64,
    /// The newest epoch a publisher waits for: rounds run back to back until it is durable.
    /// A level, not an edge, so no request can be lost between rounds.
    wanted: AtomicU64,
    state: Mutex<State>,
    wake: Condvar,
    durable: watch::Sender<u64>,
    /// Longest wait before writing non-urgent data (acks, paged messages).
    interval: Duration,
    pub stats: FlushStats,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher")
            .field("epoch", &self.epoch.load(Ordering::Relaxed))
            .field("durable", &*self.durable.borrow())
            .finish()
    }
}

impl Flusher {
    pub fn start(interval: Duration) -> Arc<Self> {
        let (durable, _) = watch::channel(0);
        let flusher = Arc::new(Self {
            epoch: AtomicU64::new(1),
            wanted: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            durable,
            interval,
            stats: FlushStats::default(),
            thread: Mutex::new(None),
        });
        let worker = flusher.clone();
        let handle = std::thread::Builder::new()
            .name("warren-flusher".into())
            .spawn(move || worker.run())
            .expect("can start the flusher thread");
        *flusher.thread.lock() = Some(handle);
        flusher
    }

    /// The epoch an append made now belongs to; call with the store's lock held.
    pub fn current_epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// The newest epoch whose data is on disk.
    pub fn durable_epoch(&self) -> u64 {
        *self.durable.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.durable.subscribe()
    }

    /// Adds a store to the next round; call with the store's lock held.
    pub fn register(&self, store: Weak<dyn Flushable>) {
        let mut st = self.state.lock();
        st.dirty.push(store);
        drop(st);
        self.wake.notify_one();
    }

    /// Asks for rounds to run at once until `epoch` is durable (a publisher waits for it).
    pub fn want(&self, epoch: u64) {
        if self.wanted.fetch_max(epoch, Ordering::SeqCst) < epoch {
            // Taking the lock orders this with the flusher's check-then-wait.
            let _st = self.state.lock();
            self.wake.notify_one();
        }
    }

    /// Asks for a round now, covering everything appended so far.
    pub fn hurry(&self) {
        self.want(self.current_epoch());
    }

    /// Writes and syncs everything pending, then stops the thread.
    pub fn shutdown(&self) {
        self.state.lock().stop = true;
        self.wake.notify_one();
        if let Some(handle) = self.thread.lock().take() {
            let _ = handle.join();
        }
    }

    fn run(&self) {
        loop {
            let dirty = {
                let mut st = self.state.lock();
                loop {
                    let wanted = self.wanted.load(Ordering::SeqCst) > self.durable_epoch();
                    if wanted || (st.stop && !st.dirty.is_empty()) {
                        break;
                    }
                    if st.stop {
                        return;
                    }
                    if st.dirty.is_empty() {
                        self.wake.wait(&mut st);
                    } else if self.wake.wait_for(&mut st, self.interval).timed_out() {
                        break;
                    }
                }
                // Appends from now on belong to the next round.
                let round = self.epoch.fetch_add(1, Ordering::SeqCst);
                (round, std::mem::take(&mut st.dirty))
            };
            self.round(dirty.0, dirty.1);
        }
    }

    fn round(&self, epoch: u64, dirty: Vec<Weak<dyn Flushable>>) {
        let mut stores: Vec<Arc<dyn Flushable>> = dirty.iter().filter_map(Weak::upgrade).collect();
        // A store registered twice (again after a failed round) is written once: a second
        // `write_pending` would find nothing and forget what the first took.
        stores.sort_by_key(|s| Arc::as_ptr(s).cast::<()>() as usize);
        stores.dedup_by(|a, b| Arc::ptr_eq(a, b));
        let mut files = Vec::new();
        let mut failed = false;
        for store in &stores {
            match store.write_pending() {
                Ok(f) => files.extend(f),
                Err(e) => {
                    failed = true;
                    tracing::error!(error = %e, "cannot write messages to disk");
                }
            }
        }
        if let Err(e) = sync_all(&files) {
            failed = true;
            tracing::error!(error = %e, "cannot sync messages to disk");
        }
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        self.stats
            .fsyncs
            .fetch_add(files.len() as u64, Ordering::Relaxed);
        if failed {
            // Nothing of this round is durable: the stores take their data back and the
            // round is tried again (a full disk also raises the disk alarm meanwhile).
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            for store in &stores {
                store.failed();
            }
            std::thread::sleep(Duration::from_millis(100));
            self.state.lock().dirty.extend(dirty);
            return;
        }
        self.durable.send_replace(epoch);
        for store in &stores {
            // Reclaiming space is housekeeping: a bug there must not stop the flusher.
            let done =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| store.after_sync()));
            if done.is_err() {
                tracing::error!("reclaiming a queue store's space failed");
            }
        }
    }
}

/// Syncs the files, in parallel when there are several (the device overlaps them).
fn sync_all(files: &[Arc<File>]) -> io::Result<()> {
    match files {
        [] => Ok(()),
        [one] => one.sync_data(),
        many => std::thread::scope(|scope| {
            let handles: Vec<_> = many
                .iter()
                .map(|f| scope.spawn(move || f.sync_data()))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(io::Error::other("sync thread panicked")))
                })
                .collect::<io::Result<Vec<()>>>()
                .map(|_| ())
        }),
    }
}
