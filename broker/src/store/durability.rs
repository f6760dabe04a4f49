//! Durability tickets: what a publish waits for before its message counts as safe (its
//! publisher confirm, a transaction's `commit-ok`, the management API's answer).
//!
//! Every enqueue returns a [`Ticket`]; the tickets of one publish (several queues, delayed
//! exchanges) combine into the one that resolves last. A ticket is a small `Copy` value, so
//! that a channel can keep one per unconfirmed message without allocating. Whether it has
//! resolved is checked against a [`Progress`], a snapshot of how far the broker's durability
//! has got, read once and checked against many tickets.
//!
//! A copy in a local queue is safe once the local flusher has synced the flush epoch it was
//! stamped with (group commit: one round serves every message of that epoch). A copy handed
//! to a queue on another node is safe once that node says so ([`Forwarded`]); it fails,
//! and its publisher is nacked, when that node refuses it or its link goes down first.

use super::Storage;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::num::NonZeroU64;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::watch;

/// When a message is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ticket {
    /// Nothing to wait for: transient, in no durable queue, or not taken at all.
    #[default]
    Done,
    /// Once the local flusher has synced this flush epoch (never 0).
    Flushed(NonZeroU64),
    /// Once the local flusher has synced `flushed` (0: nothing local) and the forwarded
    /// copies of [`Forwarded`] entry `remote` are safe on their nodes.
    Remote { flushed: u64, remote: NonZeroU64 },
}

impl Ticket {
    /// The ticket of a copy stamped with flush epoch `epoch` (0: none to wait for).
    pub const fn flushed(epoch: u64) -> Self {
        match NonZeroU64::new(epoch) {
            None => Ticket::Done,
            Some(epoch) => Ticket::Flushed(epoch),
        }
    }

    /// The ticket of a copy forwarded to another node, entry `remote` of [`FORWARDED`].
    pub const fn forwarded(remote: NonZeroU64) -> Self {
        Ticket::Remote { flushed: 0, remote }
    }

    /// The local flush epoch waited for (0: none).
    const fn epoch(self) -> u64 {
        match self {
            Ticket::Done => 0,
            Ticket::Flushed(e) => e.get(),
            Ticket::Remote { flushed, .. } => flushed,
        }
    }

    /// The ticket that resolves once both have: of one publish's copies, the latest.
    #[must_use]
    pub fn and(self, other: Ticket) -> Ticket {
        let flushed = self.epoch().max(other.epoch());
        let remote = match (self, other) {
            (Ticket::Remote { remote: a, .. }, Ticket::Remote { remote: b, .. }) => {
                Some(FORWARDED.both(a, b))
            }
            (Ticket::Remote { remote, .. }, _) | (_, Ticket::Remote { remote, .. }) => Some(remote),
            _ => None,
        };
        match remote {
            Some(remote) => Ticket::Remote { flushed, remote },
            None => Ticket::flushed(flushed),
        }
    }

    /// Whether the message is safe at `progress` (a forwarded copy: or has failed, which
    /// [`Ticket::failed`] then says).
    #[inline]
    pub fn is_done(self, progress: Progress) -> bool {
        match self {
            Ticket::Done => true,
            Ticket::Flushed(epoch) => epoch.get() <= progress.flushed,
            Ticket::Remote { flushed, remote } => {
                flushed <= progress.flushed && FORWARDED.is_settled(remote)
            }
        }
    }

    /// For a done ticket: whether a forwarded copy failed (the publisher is nacked). Asked
    /// once per ticket: the answer is forgotten as it is given.
    pub fn failed(self) -> bool {
        match self {
            Ticket::Remote { remote, .. } => FORWARDED.take_failure(remote),
            _ => false,
        }
    }

    /// Resolves once the message is safe. Asks for what it waits for to happen now (a flush
    /// round) rather than at the flusher's leisure. Resolves too, unsafe, once nothing is
    /// left that could make it safe (the flusher stopped, or stops while this waits): a
    /// caller that must know checks [`Ticket::is_done`] after. Resolves at once when there is
    /// nothing to wait for.
    pub async fn wait(self, storage: &Storage) {
        if let Ticket::Remote { remote, .. } = self {
            let mut changed = FORWARDED.changed.subscribe();
            let _ = changed.wait_for(|_| FORWARDED.is_settled(remote)).await;
        }
        let epoch = self.epoch();
        if epoch == 0 {
            return;
        }
        let Some(flusher) = storage.flusher() else {
            return;
        };
        let mut durable = flusher.subscribe();
        flusher.want(epoch);
        let _ = durable
            .wait_for(|d| *d >= epoch || flusher.is_stopped())
            .await;
    }
}

/// Copies of messages forwarded to queues on other nodes, until those nodes answer for them:
/// one entry per forwarded copy, and one per publish that combined several ([`Ticket::and`]),
/// settled when all its parts are. Process-wide, so that a ticket stays a small `Copy` value
/// checked without a reference to the broker.
pub static FORWARDED: LazyLock<Forwarded> = LazyLock::new(Forwarded::default);

#[derive(Debug)]
pub struct Forwarded {
    next: AtomicU64,
    state: Mutex<ForwardedState>,
    /// Bumped whenever entries settle.
    changed: watch::Sender<u64>,
}

impl Default for Forwarded {
    fn default() -> Self {
        Self {
            // Random high bits: an answer meant for an earlier process never settles an entry
            // of this one.
            next: AtomicU64::new((rand::random::<u64>() >> 16) << 16 | 1),
            state: Mutex::new(ForwardedState::default()),
            changed: watch::Sender::new(0),
        }
    }
}

#[derive(Debug, Default)]
struct ForwardedState {
    open: HashMap<u64, Open>,
    /// Settled entries that failed, until their ticket is asked ([`Ticket::failed`]); the
    /// oldest are forgotten past [`FAILURES_KEPT`] (tickets nobody asks: publishes without
    /// confirms).
    failed: HashSet<u64>,
    failed_order: std::collections::VecDeque<u64>,
}

/// Failures of forwarded copies kept until asked.
const FAILURES_KEPT: usize = 100_000;

impl ForwardedState {
    fn fail(&mut self, id: u64) {
        if self.failed.insert(id) {
            self.failed_order.push_back(id);
        }
        while self.failed_order.len() > FAILURES_KEPT {
            if let Some(old) = self.failed_order.pop_front() {
                self.failed.remove(&old);
            }
        }
    }
}

#[derive(Debug, Default)]
struct Open {
    /// Parts not yet settled.
    parts: u32,
    failed: bool,
    /// Combined entries this one is a part of.
    within: Vec<u64>,
}

impl Forwarded {
    /// A new entry for one forwarded copy.
    pub fn open(&self) -> NonZeroU64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.state.lock().open.insert(
            id,
            Open {
                parts: 1,
                ..Open::default()
            },
        );
        NonZeroU64::new(id).expect("ids are never 0")
    }

    /// Settles forwarded copies: `ok` false when the other node refused or lost them.
    pub fn settle(&self, entries: impl IntoIterator<Item = (u64, bool)>) {
        let mut st = self.state.lock();
        let mut todo: Vec<(u64, bool)> = entries.into_iter().collect();
        let any = !todo.is_empty();
        while let Some((id, ok)) = todo.pop() {
            let Some(open) = st.open.get_mut(&id) else {
                continue;
            };
            open.failed |= !ok;
            open.parts = open.parts.saturating_sub(1);
            if open.parts > 0 {
                continue;
            }
            let open = st.open.remove(&id).expect("present");
            if open.within.is_empty() {
                if open.failed {
                    st.fail(id);
                }
            } else {
                todo.extend(open.within.iter().map(|w| (*w, !open.failed)));
            }
        }
        drop(st);
        if any {
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// An entry settled once both `a` and `b` are, failed when either failed.
    fn both(&self, a: NonZeroU64, b: NonZeroU64) -> NonZeroU64 {
        if a == b {
            return a;
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut st = self.state.lock();
        let mut combined = Open {
            parts: 2,
            ..Open::default()
        };
        for part in [a.get(), b.get()] {
            match st.open.get_mut(&part) {
                Some(open) => open.within.push(id),
                None => {
                    combined.parts -= 1;
                    combined.failed |= st.failed.remove(&part);
                }
            }
        }
        if combined.parts > 0 {
            st.open.insert(id, combined);
        } else if combined.failed {
            st.fail(id);
        }
        NonZeroU64::new(id).expect("ids are never 0")
    }

    fn is_settled(&self, id: NonZeroU64) -> bool {
        !self.state.lock().open.contains_key(&id.get())
    }

    fn take_failure(&self, id: NonZeroU64) -> bool {
        self.state.lock().failed.remove(&id.get())
    }
}

/// How far durability has got: a ticket is done once its condition is met here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The newest flush epoch on disk.
    flushed: u64,
}

impl Progress {
    /// Everything is safe: a broker without a disk has nothing to wait for.
    pub const ALL: Progress = Progress { flushed: u64::MAX };

    /// Flush epochs up to `epoch` are on disk.
    pub const fn flushed(epoch: u64) -> Self {
        Progress { flushed: epoch }
    }

    /// Where `storage` has got now.
    pub fn of(storage: &Storage) -> Self {
        storage
            .flusher()
            .map_or(Progress::ALL, |f| Progress::flushed(f.durable_epoch()))
    }
}

/// Tells whoever holds tickets that are not done (a connection's confirms, a delayed store's
/// settling) when [`Progress`] may have moved on, to check them again.
#[derive(Debug)]
pub struct ProgressWatch {
    flushed: Option<watch::Receiver<u64>>,
    forwarded: watch::Receiver<u64>,
}

impl ProgressWatch {
    pub fn new(storage: &Storage) -> Self {
        Self {
            flushed: storage.flusher().map(|f| f.subscribe()),
            forwarded: FORWARDED.changed.subscribe(),
        }
    }

    /// Resolves when progress may have moved on since last time: a flush round, or forwarded
    /// copies settled. Never while nothing can move it.
    pub async fn changed(&mut self) {
        let flushed = async {
            match &mut self.flushed {
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = flushed => {}
            _ = self.forwarded.changed() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_done_once_its_epoch_is_flushed() {
        assert_eq!(Ticket::flushed(0), Ticket::Done);
        assert!(Ticket::Done.is_done(Progress::flushed(0)));
        let t = Ticket::flushed(5);
        assert!(!t.is_done(Progress::flushed(0)));
        assert!(!t.is_done(Progress::flushed(4)));
        assert!(t.is_done(Progress::flushed(5)));
        assert!(t.is_done(Progress::flushed(9)));
        assert!(t.is_done(Progress::ALL));
    }

    #[test]
    fn combined_tickets_resolve_with_the_latest() {
        let (a, b) = (Ticket::flushed(3), Ticket::flushed(7));
        assert_eq!(a.and(b), b);
        assert_eq!(b.and(a), b);
        assert_eq!(a.and(Ticket::Done), a);
        assert_eq!(Ticket::Done.and(b), b);
        assert_eq!(Ticket::Done.and(Ticket::Done), Ticket::Done);
        let both = a.and(b);
        assert!(!both.is_done(Progress::flushed(3)));
        assert!(both.is_done(Progress::flushed(7)));
    }

    #[test]
    fn a_ticket_is_small_and_copied() {
        fn copy<T: Copy>() {}
        copy::<Ticket>();
        assert!(std::mem::size_of::<Ticket>() <= 24);
    }

    #[test]
    fn a_forwarded_copy_is_done_when_its_node_answers_and_a_failure_is_told_once() {
        let (a, b) = (FORWARDED.open(), FORWARDED.open());
        let (ta, tb) = (Ticket::forwarded(a), Ticket::forwarded(b));
        assert!(!ta.is_done(Progress::ALL));
        FORWARDED.settle([(a.get(), true), (b.get(), false)]);
        assert!(ta.is_done(Progress::ALL) && tb.is_done(Progress::ALL));
        assert!(!ta.failed());
        assert!(tb.failed());
        assert!(!tb.failed(), "told once");
    }

    #[test]
    fn a_publish_to_local_and_forwarded_copies_waits_for_all_and_fails_with_any() {
        let (a, b) = (FORWARDED.open(), FORWARDED.open());
        let t = Ticket::flushed(4)
            .and(Ticket::forwarded(a))
            .and(Ticket::forwarded(b));
        assert!(matches!(t, Ticket::Remote { flushed: 4, .. }));
        FORWARDED.settle([(a.get(), true)]);
        assert!(!t.is_done(Progress::ALL), "b is still out");
        FORWARDED.settle([(b.get(), false)]);
        assert!(
            !t.is_done(Progress::flushed(3)),
            "the local copy is not on disk"
        );
        assert!(t.is_done(Progress::flushed(4)));
        assert!(t.failed());
        // Parts settled before they are combined count as well.
        let (c, d) = (FORWARDED.open(), FORWARDED.open());
        FORWARDED.settle([(c.get(), false), (d.get(), true)]);
        let t = Ticket::forwarded(c).and(Ticket::forwarded(d));
        assert!(t.is_done(Progress::ALL) && t.failed());
    }

    #[tokio::test]
    async fn waiting_needs_no_flusher_when_there_is_nothing_to_wait_for() {
        let storage = Storage::in_memory();
        Ticket::Done.wait(&storage).await;
        Ticket::flushed(3).wait(&storage).await;
        assert!(Ticket::flushed(3).is_done(Progress::of(&storage)));
    }

    #[tokio::test]
    async fn waiting_ends_once_the_flusher_has_stopped_though_the_ticket_is_not_done() {
        let data = tempfile::tempdir().unwrap();
        let storage = Storage::open(
            data.path(),
            std::time::Duration::from_secs(3600),
            Default::default(),
        )
        .unwrap();
        let flusher = storage.flusher().unwrap().clone();
        flusher.shutdown();
        assert!(flusher.is_stopped());
        // Nothing was pending, so no round ran: this epoch will never be on disk.
        let ticket = Ticket::flushed(flusher.current_epoch());
        tokio::time::timeout(std::time::Duration::from_secs(10), ticket.wait(&storage))
            .await
            .expect("the wait ended");
        assert!(!ticket.is_done(Progress::of(&storage)));
    }

    #[tokio::test]
    async fn waiting_asks_for_the_flush_round_and_resolves_with_it() {
        let data = tempfile::tempdir().unwrap();
        // A long interval: only the ticket's request makes the round run soon.
        let storage = Storage::open(
            data.path(),
            std::time::Duration::from_secs(3600),
            Default::default(),
        )
        .unwrap();
        let flusher = storage.flusher().unwrap().clone();
        let mut watch = ProgressWatch::new(&storage);
        let ticket = Ticket::flushed(flusher.current_epoch());
        assert!(!ticket.is_done(Progress::of(&storage)));
        tokio::time::timeout(std::time::Duration::from_secs(10), ticket.wait(&storage))
            .await
            .expect("the flush round ran");
        assert!(ticket.is_done(Progress::of(&storage)));
        tokio::time::timeout(std::time::Duration::from_secs(10), watch.changed())
            .await
            .expect("the watch saw the round");
        flusher.shutdown();
    }
}
