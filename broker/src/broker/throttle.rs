//! Per-vhost throttling, as ApsaraMQ offers it: limits on published messages per second
//! (`max-publish-rate`) and on declare/delete operations per second (`max-declare-rate`),
//! set like RabbitMQ's vhost limits. Past a limit the channel is closed with 530 and
//! `denied for too many requests`; the connection stays open.
//!
//! Each limit is a token bucket holding one second's worth: short bursts up to the rate pass,
//! a sustained rate above it does not. An unset limit costs one atomic load per operation.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The text of a throttled operation's channel close.
pub const TOO_MANY_REQUESTS: &str = "denied for too many requests";

/// One rate limit.
#[derive(Debug)]
pub struct Bucket {
    /// Operations per second; 0 is no limit.
    rate: AtomicU64,
    state: Mutex<(f64, Instant)>,
}

impl Default for Bucket {
    fn default() -> Self {
        Self {
            rate: AtomicU64::new(0),
            state: Mutex::new((0.0, Instant::now())),
        }
    }
}

impl Bucket {
    /// Sets the rate (`None` or a negative value: no limit); the bucket starts full.
    pub fn set_rate(&self, rate: Option<i64>) {
        let rate = rate.and_then(|r| u64::try_from(r).ok()).unwrap_or(0);
        *self.state.lock() = (rate as f64, Instant::now());
        self.rate.store(rate, Ordering::Release);
    }

    /// Takes one token if there is one.
    pub fn allow(&self) -> bool {
        let rate = self.rate.load(Ordering::Acquire);
        if rate == 0 {
            return true;
        }
        let rate = rate as f64;
        let mut st = self.state.lock();
        let now = Instant::now();
        let refill = now.duration_since(st.1).as_secs_f64() * rate;
        st.0 = (st.0 + refill).min(rate);
        st.1 = now;
        if st.0 >= 1.0 {
            st.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A vhost's throttles.
#[derive(Debug, Default)]
pub struct Throttle {
    pub publish: Bucket,
    pub declare: Bucket,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_passes_its_rate_and_refills_over_time() {
        let b = Bucket::default();
        assert!((0..10_000).all(|_| b.allow()), "no limit by default");
        b.set_rate(Some(5));
        assert_eq!((0..20).filter(|_| b.allow()).count(), 5);
        std::thread::sleep(std::time::Duration::from_millis(450));
        let refilled = (0..20).filter(|_| b.allow()).count();
        assert!((2..=3).contains(&refilled), "{refilled}");
        b.set_rate(None);
        assert!((0..100).all(|_| b.allow()));
    }
}
