//! Timers of a vhost's queues: when the message at a queue's head expires (`x-message-ttl`,
//! `expiration`) and when an unused queue expires (`x-expires`). One task per vhost sleeps
//! until the earliest deadline; each queue keeps at most one deadline it cares about, and a
//! deadline that fires early or late costs one look at the queue, never a wrong answer.
//!
//! The timers know what they wake only as [`Timed`] (queues implement it), so that they
//! depend on nothing above them.

use parking_lot::Mutex;
use std::cmp::Ordering as CmpOrdering;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// What the timers wake: a queue, held weakly, whose deadline came.
pub trait Timed: Send + Sync + 'static {
    /// A deadline this was scheduled for came (or one earlier than it: look again).
    fn on_timer(self: &Arc<Self>);
}

struct Entry<T> {
    at: u64,
    queue: Weak<T>,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at && Weak::ptr_eq(&self.queue, &other.queue)
    }
}

impl<T> Eq for Entry<T> {}

impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Entry<T> {
    /// Reversed, so that the heap's top is the earliest deadline.
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other
            .at
            .cmp(&self.at)
            .then_with(|| other.queue.as_ptr().cmp(&self.queue.as_ptr()))
    }
}

/// Spawns the task `task` makes, once: the first call that finds a runtime sets `started`.
/// Without a runtime (some unit tests) nothing is spawned and a later call tries again.
pub(crate) fn spawn_once<F>(started: &AtomicBool, task: impl FnOnce() -> F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    if started.load(Ordering::Acquire) {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if started.swap(true, Ordering::AcqRel) {
        return;
    }
    handle.spawn(task());
}

/// The deadlines of one vhost's queues.
pub struct Expirer<T> {
    heap: Mutex<BinaryHeap<Entry<T>>>,
    wake: Arc<Notify>,
    started: AtomicBool,
}

impl<T> std::fmt::Debug for Expirer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expirer")
            .field("deadlines", &self.heap.lock().len())
            .finish()
    }
}

impl<T> Default for Expirer<T> {
    fn default() -> Self {
        Self {
            heap: Mutex::new(BinaryHeap::new()),
            wake: Arc::new(Notify::new()),
            started: AtomicBool::new(false),
        }
    }
}

impl<T: Timed> Expirer<T> {
    /// Looks at `queue` again at `at` (milliseconds since the Unix epoch).
    pub fn schedule(self: &Arc<Self>, at: u64, queue: &Arc<T>) {
        let earliest = {
            let mut heap = self.heap.lock();
            let earliest = heap.peek().is_none_or(|top| at < top.at);
            heap.push(Entry {
                at,
                queue: Arc::downgrade(queue),
            });
            earliest
        };
        self.start();
        if earliest {
            self.wake.notify_one();
        }
    }

    /// The timer task, started with the first deadline (a vhost without TTLs has none). Without
    /// a runtime (some unit tests) queues still expire messages when they are next used.
    fn start(self: &Arc<Self>) {
        spawn_once(&self.started, || {
            run(Arc::downgrade(self), self.wake.clone())
        });
    }

    /// Takes the queues whose deadline has come; returns them and the next deadline.
    fn due(&self, now: u64) -> (Vec<Arc<T>>, Option<u64>) {
        let mut heap = self.heap.lock();
        let mut due = Vec::new();
        while heap.peek().is_some_and(|top| top.at <= now) {
            let e = heap.pop().expect("peeked");
            due.extend(e.queue.upgrade());
        }
        // A queue with several deadlines due is looked at once.
        due.sort_by_key(Arc::as_ptr);
        due.dedup_by(|a, b| Arc::ptr_eq(a, b));
        (due, heap.peek().map(|top| top.at))
    }
}

async fn run<T: Timed>(me: Weak<Expirer<T>>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(expirer) = me.upgrade() else { return };
            let (due, next) = expirer.due(super::message::now_ms());
            drop(expirer);
            for q in due {
                q.on_timer();
            }
            next
        };
        let now = super::message::now_ms();
        // Wake at the next deadline or when an earlier one arrives; at least once a second to
        // notice that the vhost is gone.
        let wait = next.map_or(1000, |at| at.saturating_sub(now)).min(1000);
        if wait > 0 {
            let _ = tokio::time::timeout(Duration::from_millis(wait), wake.notified()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Probe(u8);

    impl Timed for Probe {
        fn on_timer(self: &Arc<Self>) {}
    }

    #[test]
    fn due_targets_come_out_once_each_and_dropped_ones_not_at_all() {
        let expirer = Arc::new(Expirer::<Probe>::default());
        let (a, b, gone) = (Arc::new(Probe(1)), Arc::new(Probe(2)), Arc::new(Probe(3)));
        expirer.schedule(10, &a);
        expirer.schedule(20, &a);
        expirer.schedule(15, &b);
        expirer.schedule(100, &b);
        expirer.schedule(5, &gone);
        drop(gone);
        let (due, next) = expirer.due(20);
        let mut woken: Vec<u8> = due.iter().map(|p| p.0).collect();
        woken.sort_unstable();
        assert_eq!(woken, [1, 2]);
        assert_eq!(next, Some(100));
        let (due, next) = expirer.due(99);
        assert!(due.is_empty());
        assert_eq!(next, Some(100));
        let (due, next) = expirer.due(100);
        assert_eq!(due.len(), 1);
        assert!(Arc::ptr_eq(&due[0], &b));
        assert_eq!(next, None);
    }
}
