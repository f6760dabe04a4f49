//! A producer: one connection, one channel, publishing timestamped bodies as
//! fast as allowed by the rate limit, the confirm window and the client
//! write pipeline.
//!
//! Backpressure is explicit so the client never buffers without bound: at
//! most `--publish-window` publishes are queued in lapin, and with confirms
//! at most `--confirm` messages are unconfirmed. Rate limiting follows an
//! absolute schedule and sleeps only when at least a millisecond ahead, so
//! 10,000 msg/s means bursts of ~10 messages per timer tick rather than
//! 10,000 sub-millisecond sleeps that the timer cannot honour.

use crate::control::{self, Event, Events, Pipeline, Signal};
use crate::stats::{Counters, Latency};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long outstanding writes and confirms are awaited once the run is stopping.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Without confirms, unroutable returns are collected this often (messages).
const RETURN_DRAIN_EVERY: u64 = 1_000;

pub struct ProducerSpec {
    pub id: usize,
    pub uri: String,
    pub exchange: String,
    pub routing_key: String,
    pub headers: Option<FieldTable>,
    pub size: usize,
    pub rate: f64,
    pub confirm: usize,
    pub persistent: bool,
    pub mandatory: bool,
    pub pmessages: Option<u64>,
    pub window: usize,
    /// `x-delay` range in milliseconds: each message gets one drawn uniformly, in its
    /// header and after the timestamp in its body.
    pub delay: Option<(u64, u64)>,
}

pub struct ProducerCtx {
    pub counters: Arc<Counters>,
    pub confirm_latency: Arc<Latency>,
    pub go: Signal,
    pub stop: Signal,
    pub events: Events,
}

/// Paces sends to `rate` msgs/s on an absolute schedule.
///
/// Message number `n` (0-based, counted from the last rebase) is due at
/// `n / rate` seconds. The producer sends while it is less than `min_sleep`
/// ahead of schedule and sleeps the whole lead otherwise; oversleeping is
/// made up by sending the overdue messages back to back, so the long-run
/// rate stays exact. A producer that falls more than `max_lag` behind
/// (a stalled broker) restarts the schedule instead of bursting to catch up.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    rate: f64,
    min_sleep: Duration,
    max_lag: Duration,
    base_sent: u64,
    base_elapsed: Duration,
}

impl RateLimiter {
    pub fn new(rate: f64) -> Self {
        Self {
            rate,
            min_sleep: Duration::from_millis(1),
            max_lag: Duration::from_secs(1),
            base_sent: 0,
            base_elapsed: Duration::ZERO,
        }
    }

    /// `sent` messages went out in `elapsed`; how long to wait before the
    /// next one (None: send now).
    pub fn pause(&mut self, sent: u64, elapsed: Duration) -> Option<Duration> {
        let n = sent.saturating_sub(self.base_sent);
        let due = self.base_elapsed + Duration::from_secs_f64(n as f64 / self.rate);
        if due > elapsed {
            let lead = due - elapsed;
            (lead >= self.min_sleep).then_some(lead)
        } else {
            if elapsed - due > self.max_lag {
                self.base_sent = sent;
                self.base_elapsed = elapsed;
            }
            None
        }
    }
}

pub async fn run(spec: ProducerSpec, ctx: ProducerCtx) -> Result<(), String> {
    let conn = control::connect(&spec.uri, &format!("warren-perf-producer-{}", spec.id)).await?;
    let result = publish(&conn, &spec, &ctx).await;
    control::close(&conn).await;
    result
}

type ConfirmOutcome = (lapin::Result<Confirmation>, u64);

/// A confirm paired with its message's send timestamp (one future type for
/// the confirm window).
async fn confirmed(confirm: PublisherConfirm, sent_ns: u64) -> ConfirmOutcome {
    (confirm.await, sent_ns)
}

struct Tally<'a> {
    counters: &'a Counters,
    latency: &'a Latency,
}

impl Tally<'_> {
    fn confirmation(&self, outcome: ConfirmOutcome) -> Result<(), String> {
        let (res, sent_ns) = outcome;
        let confirmation = res.map_err(|e| format!("publisher confirm failed: {e}"))?;
        match confirmation {
            Confirmation::Ack(returned) => {
                Counters::add(&self.counters.confirmed, 1);
                if returned.is_some() {
                    Counters::add(&self.counters.returned, 1);
                }
            }
            Confirmation::Nack(returned) => {
                Counters::add(&self.counters.nacked, 1);
                if returned.is_some() {
                    Counters::add(&self.counters.returned, 1);
                }
            }
            Confirmation::NotRequested => return Ok(()),
        }
        self.latency
            .record_ns(control::now_ns().saturating_sub(sent_ns));
        Ok(())
    }
}

async fn publish(
    conn: &lapin::Connection,
    spec: &ProducerSpec,
    ctx: &ProducerCtx,
) -> Result<(), String> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening channel failed: {e}"))?;
    if spec.confirm > 0 {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| format!("confirm.select failed: {e}"))?;
    }
    let _ = ctx.events.send(Event::Ready);
    tokio::select! {
        _ = ctx.go.wait() => {}
        _ = ctx.stop.wait() => return Ok(()),
    }

    let mut props = BasicProperties::default();
    if spec.persistent {
        props = props.with_delivery_mode(2);
    }
    if let Some(h) = &spec.headers {
        props = props.with_headers(h.clone());
    }
    let opts = BasicPublishOptions {
        mandatory: spec.mandatory,
        immediate: false,
    };
    let exchange = ShortString::from(spec.exchange.as_str());
    let routing_key = ShortString::from(spec.routing_key.as_str());
    let tally = Tally {
        counters: &ctx.counters,
        latency: &ctx.confirm_latency,
    };
    let confirming = spec.confirm > 0;

    let mut body = vec![0u8; spec.size];
    let mut limiter = (spec.rate > 0.0).then(|| RateLimiter::new(spec.rate));
    let mut writes: Pipeline<(PublisherConfirm, u64)> = Pipeline::new(spec.window);
    let mut written: Vec<(PublisherConfirm, u64)> = Vec::new();
    let mut confirms = FuturesUnordered::new();
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut delays = SplitMix64(spec.id as u64 ^ control::now_ns());

    // Every wait below also watches the stop signal: a broker that stops
    // reading (flow control, alarms) must not keep the run from ending.
    'publishing: loop {
        if ctx.stop.is_set() || spec.pmessages.is_some_and(|n| sent >= n) {
            break;
        }
        if let Some(limiter) = limiter.as_mut()
            && let Some(lead) = limiter.pause(sent, start.elapsed())
        {
            tokio::select! {
                _ = tokio::time::sleep(lead) => {}
                _ = ctx.stop.wait() => break 'publishing,
            }
            continue;
        }
        if confirming {
            // Count what is already confirmed, then wait while the window is full.
            while let Some(Some(outcome)) = confirms.next().now_or_never() {
                tally.confirmation(outcome)?;
            }
            while writes.len() + confirms.len() >= spec.confirm {
                if !writes.is_empty() {
                    let w = tokio::select! {
                        w = writes.next() => w,
                        _ = ctx.stop.wait() => break 'publishing,
                    };
                    if let Some(w) = w {
                        let (confirm, ts) = w.map_err(|e| format!("publish failed: {e}"))?;
                        confirms.push(confirmed(confirm, ts));
                    }
                } else {
                    let outcome = tokio::select! {
                        o = confirms.next() => o,
                        _ = ctx.stop.wait() => break 'publishing,
                    };
                    if let Some(outcome) = outcome {
                        tally.confirmation(outcome)?;
                    }
                }
            }
        }
        while writes.is_full() {
            let w = tokio::select! {
                w = writes.next() => w,
                _ = ctx.stop.wait() => break 'publishing,
            };
            if let Some(w) = w {
                written.push(w.map_err(|e| format!("publish failed: {e}"))?);
            }
        }

        let ts = control::now_ns();
        body[..8].copy_from_slice(&ts.to_be_bytes());
        let props = match spec.delay {
            None => props.clone(),
            Some((min, max)) => {
                let delay = min + delays.next() % (max - min + 1);
                body[8..16].copy_from_slice(&delay.to_be_bytes());
                let mut headers = spec.headers.clone().unwrap_or_default();
                headers.insert("x-delay".into(), AMQPValue::LongLongInt(delay as i64));
                props.clone().with_headers(headers)
            }
        };
        if spec.window == 1 {
            // Plain path: await the write, no per-message allocation.
            let publish =
                channel.basic_publish(exchange.clone(), routing_key.clone(), opts, &body, props);
            let confirm = tokio::select! {
                c = publish => c.map_err(|e| format!("publish failed: {e}"))?,
                _ = ctx.stop.wait() => break 'publishing,
            };
            written.push((confirm, ts));
        } else {
            let fut = publish_owned(
                channel.clone(),
                exchange.clone(),
                routing_key.clone(),
                opts,
                body.clone(),
                props,
                ts,
            );
            writes
                .push(fut, &mut written)
                .await
                .map_err(|e| format!("publish failed: {e}"))?;
        }
        sent += 1;
        Counters::add(&ctx.counters.sent, 1);
        for (confirm, ts) in written.drain(..) {
            if confirming {
                confirms.push(confirmed(confirm, ts));
            }
        }
        if spec.mandatory && !confirming && sent.is_multiple_of(RETURN_DRAIN_EVERY) {
            count_returns(&channel, &ctx.counters).await?;
        }
    }

    // Finish: the remaining writes and confirms are awaited in full after
    // --pmessages, and for a grace period only once the run is stopping.
    let finish = async {
        while let Some(w) = writes.next().await {
            let (confirm, ts) = w.map_err(|e| format!("publish failed: {e}"))?;
            if confirming {
                confirms.push(confirmed(confirm, ts));
            }
        }
        while let Some(outcome) = confirms.next().await {
            tally.confirmation(outcome)?;
        }
        // Close the channel before the connection: RabbitMQ handles
        // channel.close after every publish before it, while a bare
        // connection.close can drop the last unconfirmed messages still in
        // flight inside the broker.
        channel
            .close(200, "warren-perf done".into())
            .await
            .map_err(|e| format!("closing the channel failed: {e}"))?;
        // Every basic.return came before the close-ok.
        if spec.mandatory && !confirming {
            count_returns(&channel, &ctx.counters).await?;
        }
        Ok(())
    };
    tokio::pin!(finish);
    let outcome = tokio::select! {
        r = &mut finish => Some(r),
        _ = ctx.stop.wait() => None,
    };
    let outcome = match outcome {
        Some(r) => r,
        None => tokio::time::timeout(STOP_GRACE, &mut finish)
            .await
            .unwrap_or(Ok(())),
    };
    match outcome {
        // Once stopping, a connection torn down under us is expected.
        Err(e) if ctx.stop.is_set() => {
            tracing::debug!(producer = spec.id, "while stopping: {e}");
            Ok(())
        }
        other => other,
    }
}

/// A small, fast pseudo-random sequence for the delays (statistical quality is plenty).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn publish_owned(
    channel: Channel,
    exchange: ShortString,
    routing_key: ShortString,
    opts: BasicPublishOptions,
    body: Vec<u8>,
    props: BasicProperties,
    ts: u64,
) -> futures::future::BoxFuture<'static, lapin::Result<(PublisherConfirm, u64)>> {
    async move {
        let confirm = channel
            .basic_publish(exchange, routing_key, opts, &body, props)
            .await?;
        Ok((confirm, ts))
    }
    .boxed()
}

/// Without confirms lapin keeps basic.return messages until asked.
async fn count_returns(channel: &Channel, counters: &Counters) -> Result<(), String> {
    let returned = channel
        .wait_for_confirms()
        .await
        .map_err(|e| format!("collecting returned messages failed: {e}"))?;
    Counters::add(&counters.returned, returned.len() as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_until_a_millisecond_ahead() {
        let mut l = RateLimiter::new(10_000.0);
        // 10k/s: message n is due at n * 100 µs.
        assert_eq!(l.pause(0, Duration::ZERO), None);
        assert_eq!(l.pause(9, Duration::ZERO), None); // 0.9 ms ahead: keep sending
        let lead = l.pause(10, Duration::ZERO).unwrap(); // 1 ms ahead: sleep
        assert_eq!(lead, Duration::from_millis(1));
        let lead = l.pause(20, Duration::from_micros(500)).unwrap();
        assert_eq!(lead, Duration::from_micros(1_500));
        // Behind schedule: send at once.
        assert_eq!(l.pause(20, Duration::from_millis(5)), None);
    }

    /// Simulates a coarse timer (sleeps round up to the next ms, plus 0.3 ms
    /// of wake-up jitter) and instantaneous sends: the long-run rate must
    /// still be exact and bursts short.
    #[test]
    fn long_run_rate_is_exact_with_a_coarse_timer() {
        for rate in [10_000.0, 1_000.0, 33_333.0, 250.0] {
            let mut l = RateLimiter::new(rate);
            let mut now = Duration::ZERO;
            let mut sent = 0u64;
            let mut sleeps = 0u64;
            let mut burst = 0u64;
            let mut max_burst = 0u64;
            let horizon = Duration::from_secs(10);
            while now < horizon {
                match l.pause(sent, now) {
                    Some(lead) => {
                        let ms = lead.as_secs_f64() * 1000.0;
                        now += Duration::from_secs_f64(ms.ceil() / 1000.0 + 0.000_3);
                        sleeps += 1;
                        burst = 0;
                    }
                    None => {
                        sent += 1;
                        burst += 1;
                        max_burst = max_burst.max(burst);
                    }
                }
            }
            let expected = rate * now.as_secs_f64();
            let err = (sent as f64 - expected).abs() / expected;
            assert!(err < 0.002, "rate {rate}: sent {sent}, expected {expected}");
            // Far fewer sleeps than messages at high rates, never more.
            assert!(
                sleeps <= sent,
                "rate {rate}: {sleeps} sleeps for {sent} msgs"
            );
            // Bursts stay within ~3 ms worth of messages.
            assert!(
                (max_burst as f64) <= (rate * 0.003).max(1.0) + 1.0,
                "rate {rate}: burst {max_burst}"
            );
        }
    }

    #[test]
    fn rebases_after_a_long_stall() {
        let mut l = RateLimiter::new(1_000.0);
        assert_eq!(l.pause(0, Duration::ZERO), None);
        // Broker stalled 5 s: no 5,000-message catch-up burst afterwards.
        // The schedule restarts from the stalled message instead.
        assert_eq!(l.pause(1, Duration::from_secs(5)), None);
        assert_eq!(
            l.pause(2, Duration::from_secs(5)),
            Some(Duration::from_millis(1))
        );
        assert_eq!(
            l.pause(3, Duration::from_secs(5)),
            Some(Duration::from_millis(2))
        );
    }
}
