//! Delayed exchanges (`x-delayed-message`, as RabbitMQ's delayed-message plugin has them): a
//! message published with a positive `x-delay` header waits that many milliseconds, then the
//! exchange routes it as its `x-delayed-type` says, with `x-delay` turned negative (so that it
//! is not delayed again on its way through other exchanges).
//!
//! Each vhost has one [`Delayer`]: its messages wait in a [`DelayedStore`] (on disk, see
//! there) and one task per vhost sleeps until the earliest is due, routes what is due, and
//! tells the store once the routed copies are on disk.

use super::message::now_ms;
use crate::store::Storage;
use crate::store::delayed::{DelayedStore, Due, Scheduled};
use crate::store::durability::{ProgressWatch, Ticket};
use amq_protocol::types::{AMQPValue, FieldTable};
use parking_lot::Mutex;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// Messages routed per pass of the timer task.
const BATCH: usize = 512;
/// The longest delay RabbitMQ's plugin takes, milliseconds: a longer one is no delay.
pub const MAX_DELAY: u64 = u32::MAX as u64;

/// The delay a message asks for, as the plugin reads its `x-delay` header: an integer, a
/// string of digits, or a float or decimal count (truncated); delayed only if it is positive
/// and at most [`MAX_DELAY`].
pub fn delay_of(headers: Option<&FieldTable>) -> Option<u64> {
    let v = headers?.inner().get("x-delay")?;
    let ms = match v {
        AMQPValue::Float(f) => f.trunc() as i64,
        AMQPValue::Double(f) => f.trunc() as i64,
        AMQPValue::DecimalValue(d) => {
            let value = d.value as i64;
            value / 10i64.pow(u32::from(d.scale.min(18)))
        }
        other => match super::headers::integer(other) {
            Some(n) => n,
            None => super::headers::text(other)?.trim().parse::<i64>().ok()?,
        },
    };
    u64::try_from(ms)
        .ok()
        .filter(|ms| (1..=MAX_DELAY).contains(ms))
}

/// The headers a due message is routed with: `x-delay` negated, as the plugin does.
pub fn negated(headers: &FieldTable) -> FieldTable {
    let mut out = headers.clone();
    if let Some(delay) = delay_of(Some(headers)) {
        let value = match i32::try_from(delay) {
            Ok(d) => AMQPValue::LongInt(-d),
            Err(_) => AMQPValue::LongLongInt(-(delay as i64)),
        };
        out.insert("x-delay".into(), value);
    }
    out
}

/// What a [`Delayer`] asks of the vhost whose messages it keeps: where they are stored, and to
/// route one whose time has come.
pub trait DelayedOwner: Send + Sync + 'static {
    fn name(&self) -> &str;

    fn storage(&self) -> &Storage;

    /// Routes a due message; returns the ticket done once its copies are on disk.
    fn deliver_due(&self, due: &Due) -> Ticket;
}

/// A vhost's delayed messages and their timer.
#[derive(Default)]
pub struct Delayer {
    store: Mutex<Option<Arc<DelayedStore>>>,
    /// The vhost is deleted: nothing is scheduled any more.
    destroyed: AtomicBool,
    wake: Arc<Notify>,
    started: AtomicBool,
    /// When the timer task wakes next (milliseconds since the Unix epoch); 0 while it is
    /// awake, so that a message scheduled meanwhile wakes it again.
    next_wake: Arc<AtomicU64>,
}

impl std::fmt::Debug for Delayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delayer").finish()
    }
}

impl Delayer {
    /// The store, opened (and recovered) on first use.
    fn store(&self, storage: &Storage, vhost: &str) -> io::Result<Arc<DelayedStore>> {
        let mut slot = self.store.lock();
        if let Some(s) = &*slot {
            return Ok(s.clone());
        }
        if self.destroyed.load(Ordering::Acquire) {
            return Err(io::Error::other("the vhost is deleted"));
        }
        let s = storage.open_delayed(vhost)?;
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Opens the store if an earlier run left one, so that its messages are delivered.
    pub fn recover<V: DelayedOwner>(&self, storage: &Storage, vhost: &Arc<V>) {
        if !storage.has_delayed(vhost.name()) {
            return;
        }
        match self.store(storage, vhost.name()) {
            Ok(store) => {
                let n = store.len();
                if n > 0 {
                    tracing::info!(vhost = %vhost.name(), messages = n, "delayed messages recovered");
                }
                self.start(vhost, &store);
            }
            Err(e) => {
                tracing::error!(vhost = %vhost.name(), error = %e, "cannot open the delayed-message store");
            }
        }
    }

    /// Schedules a message; returns the ticket done once it is on disk.
    pub fn schedule<V: DelayedOwner>(
        &self,
        storage: &Storage,
        vhost: &Arc<V>,
        scheduled: Scheduled<'_>,
    ) -> io::Result<Ticket> {
        let store = self.store(storage, vhost.name())?;
        let due = scheduled.due;
        let epoch = store.schedule(scheduled)?;
        self.start(vhost, &store);
        let wake_at = self.next_wake.load(Ordering::Acquire);
        if wake_at == 0 || due < wake_at || store.wants_spill() {
            self.wake.notify_one();
        }
        Ok(Ticket::flushed(epoch))
    }

    /// Messages waiting.
    pub fn len(&self) -> u64 {
        self.store.lock().as_ref().map_or(0, |s| s.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Deletes every waiting message (the vhost is deleted).
    pub fn destroy(&self) {
        let mut slot = self.store.lock();
        self.destroyed.store(true, Ordering::Release);
        if let Some(s) = slot.take() {
            s.destroy();
        }
        drop(slot);
        self.wake.notify_one();
    }

    fn start<V: DelayedOwner>(&self, vhost: &Arc<V>, store: &Arc<DelayedStore>) {
        super::expiry::spawn_once(&self.started, || {
            run(
                Arc::downgrade(vhost),
                store.clone(),
                self.wake.clone(),
                self.next_wake.clone(),
            )
        });
    }
}

/// The timer task of one vhost's delayed messages. It only takes and routes what is due;
/// settling, saving the manifest and spilling (file work) run on the blocking pool, one job at
/// a time.
async fn run<V: DelayedOwner>(
    vhost: Weak<V>,
    store: Arc<DelayedStore>,
    wake: Arc<Notify>,
    next_wake: Arc<AtomicU64>,
) {
    let mut durable = vhost.upgrade().map(|v| ProgressWatch::new(v.storage()));
    let housekeeping = Arc::new(AtomicBool::new(false));
    loop {
        if store.is_destroyed() {
            return;
        }
        next_wake.store(0, Ordering::Release);
        let taken = {
            let Some(v) = vhost.upgrade() else { return };
            let due = store.take_due(now_ms(), BATCH);
            for d in &due {
                let ticket = v.deliver_due(d);
                store.routed(d, ticket);
            }
            due.len()
        };
        if store.needs_housekeeping() && !housekeeping.swap(true, Ordering::AcqRel) {
            let (s, flag) = (store.clone(), housekeeping.clone());
            tokio::task::spawn_blocking(move || {
                // Cleared however the job ends, so that a failure does not stop the next.
                let _running = Running(flag);
                if let Err(e) = s.settle() {
                    tracing::error!(error = %e, "cannot record delivered delayed messages");
                }
                if s.wants_spill()
                    && let Err(e) = s.spill()
                {
                    tracing::error!(error = %e, "cannot write delayed messages to disk");
                }
            });
        }
        if taken == BATCH {
            tokio::task::yield_now().await;
            continue;
        }
        let now = now_ms();
        let next = store.next_due();
        // At least every 100 ms while there is housekeeping, and every second to notice that
        // the vhost is gone.
        let longest = if store.needs_housekeeping() {
            100
        } else {
            1000
        };
        let wait = next
            .map_or(longest, |at| at.saturating_sub(now))
            .min(longest);
        next_wake.store(now + wait, Ordering::Release);
        if wait == 0 {
            continue;
        }
        let settling = store.settling();
        let sleep = tokio::time::sleep(Duration::from_millis(wait));
        match (&mut durable, settling) {
            (Some(d), true) => {
                tokio::select! {
                    _ = sleep => {}
                    _ = wake.notified() => {}
                    _ = d.changed() => {}
                }
            }
            _ => {
                tokio::select! {
                    _ = sleep => {}
                    _ = wake.notified() => {}
                }
            }
        }
    }
}

/// Clears its flag when dropped.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(v: AMQPValue) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-delay".into(), v);
        t
    }

    #[test]
    fn delays_are_read_as_the_plugin_reads_them() {
        assert_eq!(delay_of(Some(&headers(AMQPValue::LongInt(500)))), Some(500));
        // Past the plugin's longest delay: no delay at all, as the plugin routes it.
        assert_eq!(
            delay_of(Some(&headers(AMQPValue::LongLongInt(1 << 40)))),
            None
        );
        assert_eq!(
            delay_of(Some(&headers(AMQPValue::LongUInt(u32::MAX)))),
            Some(MAX_DELAY)
        );
        assert_eq!(
            delay_of(Some(&headers(AMQPValue::LongString("250".into())))),
            Some(250)
        );
        assert_eq!(delay_of(Some(&headers(AMQPValue::Double(99.6)))), Some(99));
        let decimal = amq_protocol::types::DecimalValue {
            scale: 1,
            value: 2505,
        };
        assert_eq!(
            delay_of(Some(&headers(AMQPValue::DecimalValue(decimal)))),
            Some(250)
        );
        assert_eq!(delay_of(Some(&headers(AMQPValue::LongInt(0)))), None);
        assert_eq!(delay_of(Some(&headers(AMQPValue::LongInt(-5)))), None);
        assert_eq!(
            delay_of(Some(&headers(AMQPValue::LongString("soon".into())))),
            None
        );
        assert_eq!(delay_of(None), None);
    }

    #[test]
    fn a_due_message_has_its_delay_negated() {
        let h = negated(&headers(AMQPValue::ShortUInt(300)));
        assert_eq!(h.inner().get("x-delay"), Some(&AMQPValue::LongInt(-300)));
        assert_eq!(delay_of(Some(&h)), None);
    }
}
