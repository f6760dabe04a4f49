//! Durability tickets: what a publish waits for before its message counts as safe (its
//! publisher confirm, a transaction's `commit-ok`, the management API's answer).
//!
//! Every enqueue returns a [`Ticket`]; the tickets of one publish (several queues, delayed
//! exchanges) combine into the one that resolves last. A ticket is a small `Copy` value, so
//! that a channel can keep one per unconfirmed message without allocating. Whether it has
//! resolved is checked against a [`Progress`], a snapshot of how far the broker's durability
//! has got, read once and checked against many tickets.
//!
//! Today a message is safe once the local flusher has synced the flush epoch its copies were
//! stamped with (group commit: one round serves every message of that epoch).

use super::Storage;
use std::num::NonZeroU64;
use tokio::sync::watch;

/// When a message is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ticket {
    /// Nothing to wait for: transient, in no durable queue, or not taken at all.
    #[default]
    Done,
    /// Once the local flusher has synced this flush epoch. Never 0, which keeps the ticket
    /// in 8 bytes.
    Flushed(NonZeroU64),
}

impl Ticket {
    /// The ticket of a copy stamped with flush epoch `epoch` (0: none to wait for).
    pub const fn flushed(epoch: u64) -> Self {
        match NonZeroU64::new(epoch) {
            None => Ticket::Done,
            Some(epoch) => Ticket::Flushed(epoch),
        }
    }

    /// The ticket that resolves once both have: of one publish's copies, the latest.
    #[must_use]
    pub const fn and(self, other: Ticket) -> Ticket {
        match (self, other) {
            (Ticket::Done, t) | (t, Ticket::Done) => t,
            (Ticket::Flushed(a), Ticket::Flushed(b)) => {
                Ticket::Flushed(if a.get() > b.get() { a } else { b })
            }
        }
    }

    /// Whether the message is safe at `progress`.
    #[inline]
    pub const fn is_done(self, progress: Progress) -> bool {
        match self {
            Ticket::Done => true,
            Ticket::Flushed(epoch) => epoch.get() <= progress.flushed,
        }
    }

    /// Resolves once the message is safe. Asks for what it waits for to happen now (a flush
    /// round) rather than at the flusher's leisure. Resolves too, unsafe, once nothing is
    /// left that could make it safe (the flusher stopped, or stops while this waits): a
    /// caller that must know checks [`Ticket::is_done`] after. Resolves at once when there is
    /// nothing to wait for.
    pub async fn wait(self, storage: &Storage) {
        let Ticket::Flushed(epoch) = self else {
            return;
        };
        let epoch = epoch.get();
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
}

impl ProgressWatch {
    pub fn new(storage: &Storage) -> Self {
        Self {
            flushed: storage.flusher().map(|f| f.subscribe()),
        }
    }

    /// Resolves when progress may have moved on since last time; never, when nothing can move
    /// it (a broker without a disk, whose tickets are all done, or a stopped flusher once it
    /// has said it stopped).
    pub async fn changed(&mut self) {
        match &mut self.flushed {
            Some(rx) => {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
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
        assert_eq!(std::mem::size_of::<Ticket>(), 8);
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
