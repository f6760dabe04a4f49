//! Group commit. Stores append to memory; one flusher thread writes what every store has
//! pending and syncs the files, so a single round of `fdatasync` covers everything that arrived
//! meanwhile from every connection. Publisher confirms wait for the round that covers them:
//! the durability ticket of a message (`durability.rs`) names that round.
//!
//! Rounds are numbered by *epochs*. An append is stamped with the current epoch while its store
//! is locked; a round first advances the epoch, then takes each dirty store's pending data under
//! the same lock, so everything stamped with the old epoch is in the round. When the round's
//! syncs have returned, the old epoch is published as durable.
//!
//! The bytes each round writes are reported to an observer (the disk alarm), so that free space
//! is checked as fast as it is used rather than on a timer; after the round is published as
//! durable, so that the check does not delay confirms. A failing disk is logged when it
//! starts failing and when it recovers, not on every retry; at shutdown, one last round is
//! tried and what it cannot write is given up, so that a full disk cannot hold the process.

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

/// Told how many bytes a round wrote.
pub type WriteObserver = Box<dyn Fn(u64) + Send + Sync>;

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
    /// Bytes written by the round in progress (stores add theirs).
    round_bytes: AtomicU64,
    observer: Mutex<Option<WriteObserver>>,
    /// The thread has stopped: no epoch will become durable any more.
    stopped: std::sync::atomic::AtomicBool,
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
            round_bytes: AtomicU64::new(0),
            observer: Mutex::new(None),
            stopped: std::sync::atomic::AtomicBool::new(false),
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

    /// Whether the thread has stopped (shut down), so that nothing more becomes durable.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Told of every round made durable, and once more when the thread stops.
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

    /// Sets what is told the bytes each round writes.
    pub fn observe_writes(&self, observer: WriteObserver) {
        *self.observer.lock() = Some(observer);
    }

    /// Counts bytes a store wrote in the round in progress; call from `write_pending`.
    pub fn wrote(&self, bytes: u64) {
        self.round_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Writes and syncs everything pending, then stops the thread. If that last round fails
    /// (a full disk), what it could not write is lost: logged once, and the thread stops all
    /// the same.
    pub fn shutdown(&self) {
        self.state.lock().stop = true;
        self.wake.notify_one();
        if let Some(handle) = self.thread.lock().take() {
            let _ = handle.join();
        }
    }

    fn run(&self) {
        self.run_rounds();
        // Whoever waits for an epoch stops waiting: it will never be durable.
        self.stopped.store(true, Ordering::SeqCst);
        self.durable.send_modify(|_| {});
    }

    fn run_rounds(&self) {
        // Whether the last round failed: a failing disk is logged once, not on every retry.
        let mut failing = false;
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
            let (epoch, dirty) = dirty;
            match self.round(epoch, &dirty) {
                Ok(()) => {
                    if std::mem::take(&mut failing) {
                        tracing::info!("writing messages to disk works again");
                    }
                }
                Err(e) => {
                    let mut st = self.state.lock();
                    if st.stop {
                        tracing::error!(error = %e, "cannot write messages to disk at shutdown: stopping without them");
                        return;
                    }
                    if !std::mem::replace(&mut failing, true) {
                        tracing::error!(error = %e, "cannot write messages to disk: retrying until it works");
                    }
                    // Tried again after a pause (a full disk also raises the disk alarm
                    // meanwhile), or once more at once if a shutdown comes.
                    let retry = std::time::Instant::now() + Duration::from_millis(100);
                    while !st.stop && !self.wake.wait_until(&mut st, retry).timed_out() {}
                    st.dirty.extend(dirty);
                }
            }
        }
    }

    /// Writes and syncs what the stores have pending. On failure, nothing of the round is
    /// durable: the stores have taken their data back, and `dirty` is to be tried again.
    fn round(&self, epoch: u64, dirty: &[Weak<dyn Flushable>]) -> io::Result<()> {
        let mut stores: Vec<Arc<dyn Flushable>> = dirty.iter().filter_map(Weak::upgrade).collect();
        // A store registered twice (again after a failed round) is written once: a second
        // `write_pending` would find nothing and forget what the first took.
        stores.sort_by_key(|s| Arc::as_ptr(s).cast::<()>() as usize);
        stores.dedup_by(|a, b| Arc::ptr_eq(a, b));
        let mut files = Vec::new();
        let mut error = None;
        for store in &stores {
            match store.write_pending() {
                Ok(f) => files.extend(f),
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        if let Err(e) = sync_all(&files) {
            error.get_or_insert(e);
        }
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        self.stats
            .fsyncs
            .fetch_add(files.len() as u64, Ordering::Relaxed);
        if let Some(e) = error {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            for store in &stores {
                store.failed();
            }
            self.report_written();
            return Err(e);
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
        // Told once the round is durable: publishers' confirms do not wait for the check.
        self.report_written();
        Ok(())
    }

    /// Tells the observer what the round wrote.
    fn report_written(&self) {
        let written = self.round_bytes.swap(0, Ordering::Relaxed);
        if written > 0
            && let Some(observe) = &*self.observer.lock()
        {
            observe(written);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose every write fails, as on a full disk.
    struct FullDisk;

    impl Flushable for FullDisk {
        fn write_pending(&self) -> io::Result<Vec<Arc<File>>> {
            Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "No space left on device",
            ))
        }
        fn after_sync(&self) {}
        fn failed(&self) {}
    }

    #[test]
    fn shutdown_gives_up_a_last_round_that_cannot_write() {
        let flusher = Flusher::start(Duration::from_millis(5));
        let full: Arc<dyn Flushable> = Arc::new(FullDisk);
        flusher.register(Arc::downgrade(&full));
        flusher.hurry();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while flusher.stats.errors.load(Ordering::Relaxed) < 2 {
            assert!(std::time::Instant::now() < deadline, "no round failed");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (done, stopped) = std::sync::mpsc::channel();
        let stopping = flusher.clone();
        std::thread::spawn(move || {
            stopping.shutdown();
            let _ = done.send(());
        });
        assert!(
            stopped.recv_timeout(Duration::from_secs(5)).is_ok(),
            "the flusher stops although its last round failed"
        );
    }

    #[test]
    fn a_round_is_durable_before_its_bytes_are_reported() {
        struct Wrote(Arc<Flusher>);
        impl Flushable for Wrote {
            fn write_pending(&self) -> io::Result<Vec<Arc<File>>> {
                self.0.wrote(1000);
                Ok(Vec::new())
            }
            fn after_sync(&self) {}
            fn failed(&self) {}
        }
        let flusher = Flusher::start(Duration::from_millis(5));
        // An observer that takes its time (a slow disk check): held until released.
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = Mutex::new(held);
        flusher.observe_writes(Box::new(move |_| {
            let _ = held.lock().recv_timeout(Duration::from_secs(10));
        }));
        let store: Arc<dyn Flushable> = Arc::new(Wrote(flusher.clone()));
        let epoch = flusher.current_epoch();
        flusher.register(Arc::downgrade(&store));
        flusher.want(epoch);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut durable = false;
        while std::time::Instant::now() < deadline {
            if flusher.durable_epoch() >= epoch {
                durable = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = release.send(());
        flusher.shutdown();
        assert!(
            durable,
            "the round was published as durable while its observer ran"
        );
    }

    #[test]
    fn each_round_reports_the_bytes_it_wrote() {
        struct Wrote(Arc<Flusher>);
        impl Flushable for Wrote {
            fn write_pending(&self) -> io::Result<Vec<Arc<File>>> {
                self.0.wrote(1000);
                Ok(Vec::new())
            }
            fn after_sync(&self) {}
            fn failed(&self) {}
        }
        let flusher = Flusher::start(Duration::from_millis(5));
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        flusher.observe_writes(Box::new(move |n| {
            counter.fetch_add(n, Ordering::Relaxed);
        }));
        let store: Arc<dyn Flushable> = Arc::new(Wrote(flusher.clone()));
        for _ in 0..3 {
            let epoch = flusher.current_epoch();
            flusher.register(Arc::downgrade(&store));
            flusher.want(epoch);
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while flusher.durable_epoch() < epoch {
                assert!(std::time::Instant::now() < deadline, "no round ran");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        flusher.shutdown();
        assert_eq!(seen.load(Ordering::Relaxed), 3000);
    }
}
