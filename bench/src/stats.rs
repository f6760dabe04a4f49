//! Measurement: per-task counters, latency histograms and the pure arithmetic
//! that turns them into per-second figures and the end-of-run summary.
//!
//! Each producer and consumer owns its counters and histogram (no shared hot
//! cache line between tasks); the reporter sums them once a second. Keeping
//! the summary maths free of I/O lets the unit tests pin down rates and
//! percentiles exactly.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Largest latency recorded (1 hour, in ns); larger values are clamped.
const MAX_LATENCY_NS: u64 = 3_600_000_000_000;

/// Counters of one producer or consumer.
#[derive(Default, Debug)]
pub struct Counters {
    pub sent: AtomicU64,
    pub confirmed: AtomicU64,
    pub nacked: AtomicU64,
    pub returned: AtomicU64,
    pub received: AtomicU64,
    /// Wall-clock ns (see `control::now_ns`) of the latest delivery.
    pub last_receive_ns: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Running totals, summed over tasks.
#[derive(Default, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub sent: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub returned: u64,
    pub received: u64,
}

impl Totals {
    pub fn since(self, earlier: Totals) -> Totals {
        Totals {
            sent: self.sent.saturating_sub(earlier.sent),
            confirmed: self.confirmed.saturating_sub(earlier.confirmed),
            nacked: self.nacked.saturating_sub(earlier.nacked),
            returned: self.returned.saturating_sub(earlier.returned),
            received: self.received.saturating_sub(earlier.received),
        }
    }
}

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid histogram bounds")
}

/// A latency histogram (ns) written by one task and drained by the reporter.
pub struct Latency(Mutex<Histogram<u64>>);

impl Default for Latency {
    fn default() -> Self {
        Self(Mutex::new(new_histogram()))
    }
}

impl Latency {
    pub fn record_ns(&self, ns: u64) {
        self.lock().saturating_record(ns.min(MAX_LATENCY_NS));
    }

    /// Adds what was recorded since the last drain to `into`, then resets.
    pub fn drain_into(&self, into: &mut Histogram<u64>) {
        let mut h = self.lock();
        if !h.is_empty() {
            // Same bounds on both sides: cannot fail.
            let _ = into.add(&*h);
            h.reset();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Histogram<u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything the reporter reads.
#[derive(Default)]
pub struct Registry {
    pub counters: Vec<Arc<Counters>>,
    pub consumer_latency: Vec<Arc<Latency>>,
    pub confirm_latency: Vec<Arc<Latency>>,
}

impl Registry {
    pub fn new_counters(&mut self) -> Arc<Counters> {
        let c = Arc::new(Counters::default());
        self.counters.push(c.clone());
        c
    }

    pub fn new_consumer_latency(&mut self) -> Arc<Latency> {
        let l = Arc::new(Latency::default());
        self.consumer_latency.push(l.clone());
        l
    }

    pub fn new_confirm_latency(&mut self) -> Arc<Latency> {
        let l = Arc::new(Latency::default());
        self.confirm_latency.push(l.clone());
        l
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for c in &self.counters {
            t.sent += c.sent.load(Ordering::Relaxed);
            t.confirmed += c.confirmed.load(Ordering::Relaxed);
            t.nacked += c.nacked.load(Ordering::Relaxed);
            t.returned += c.returned.load(Ordering::Relaxed);
            t.received += c.received.load(Ordering::Relaxed);
        }
        t
    }

    pub fn last_receive_ns(&self) -> u64 {
        self.counters
            .iter()
            .map(|c| c.last_receive_ns.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0)
    }
}

/// Latency percentiles in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LatencyStats {
    pub count: u64,
    pub min: u64,
    pub median: u64,
    pub p75: u64,
    pub p95: u64,
    pub p99: u64,
    pub max: u64,
}

impl LatencyStats {
    /// None when nothing was recorded.
    pub fn from_histogram(h: &Histogram<u64>) -> Option<LatencyStats> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns / 1_000;
        Some(LatencyStats {
            count: h.len(),
            min: us(h.min()),
            median: us(h.value_at_quantile(0.5)),
            p75: us(h.value_at_quantile(0.75)),
            p95: us(h.value_at_quantile(0.95)),
            p99: us(h.value_at_quantile(0.99)),
            max: us(h.max()),
        })
    }
}

/// msgs/s, 0 when the duration is 0.
pub fn rate(count: u64, secs: f64) -> f64 {
    if secs > 0.0 { count as f64 / secs } else { 0.0 }
}

/// Rounds to 3 decimals for output.
pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One interval line.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tick {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
    pub elapsed_s: f64,
    pub sent_rate: u64,
    pub confirmed_rate: u64,
    pub nacked_rate: u64,
    pub returned_rate: u64,
    pub received_rate: u64,
    pub sent_total: u64,
    pub received_total: u64,
    pub latency_count: u64,
    pub latency_median_us: Option<u64>,
    pub latency_p95_us: Option<u64>,
    pub latency_p99_us: Option<u64>,
}

impl Tick {
    pub fn build(
        id: &str,
        elapsed_s: f64,
        interval_s: f64,
        delta: Totals,
        totals: Totals,
        latency: Option<LatencyStats>,
    ) -> Tick {
        let r = |n: u64| rate(n, interval_s).round() as u64;
        Tick {
            kind: "tick",
            id: id.to_string(),
            elapsed_s: round3(elapsed_s),
            sent_rate: r(delta.sent),
            confirmed_rate: r(delta.confirmed),
            nacked_rate: r(delta.nacked),
            returned_rate: r(delta.returned),
            received_rate: r(delta.received),
            sent_total: totals.sent,
            received_total: totals.received,
            latency_count: latency.map_or(0, |l| l.count),
            latency_median_us: latency.map(|l| l.median),
            latency_p95_us: latency.map(|l| l.p95),
            latency_p99_us: latency.map(|l| l.p99),
        }
    }
}

/// A phase of a backlog run.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Phase {
    pub messages: u64,
    pub duration_s: f64,
    pub rate: f64,
}

impl Phase {
    pub fn new(messages: u64, duration_s: f64) -> Phase {
        Phase {
            messages,
            duration_s: round3(duration_s),
            rate: round3(rate(messages, duration_s)),
        }
    }
}

/// Why the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EndedBy {
    /// --time elapsed.
    Time,
    /// Every producer and consumer reached its message count (or drained).
    Complete,
    /// Ctrl-C.
    Interrupted,
    /// A task failed.
    Error,
}

/// What the coordinator measured; input of [`Summary::build`].
#[derive(Clone, Debug, Default)]
pub struct RunFacts {
    pub id: String,
    pub run_s: f64,
    pub publish_s: f64,
    pub consume_s: f64,
    pub totals: Totals,
    /// Backlog mode: messages queued when the drain started.
    pub backlog: Option<u64>,
    /// Backlog mode: from start until the queue depth reached that backlog
    /// (the broker's side of publishing; ±0.1 s).
    pub ingest_s: Option<f64>,
    pub cpu_s: Option<f64>,
    pub errors: Vec<String>,
}

/// End-of-run summary; one JSON object with --json.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
    pub ended_by: EndedBy,
    pub duration_s: f64,
    pub publish_duration_s: f64,
    pub consume_duration_s: f64,
    pub sent_total: u64,
    pub sent_rate: f64,
    pub confirmed_total: u64,
    pub confirmed_rate: f64,
    pub nacked_total: u64,
    pub nacked_rate: f64,
    pub returned_total: u64,
    pub returned_rate: f64,
    pub received_total: u64,
    pub received_rate: f64,
    pub latency_us: Option<LatencyStats>,
    pub confirm_latency_us: Option<LatencyStats>,
    pub publish_phase: Option<Phase>,
    pub backlog: Option<u64>,
    pub ingest_phase: Option<Phase>,
    pub drain_phase: Option<Phase>,
    pub cpu_s: Option<f64>,
    pub cpu_percent: Option<f64>,
    pub errors: Vec<String>,
}

impl Summary {
    /// Send-side rates are over the publishing time, the received rate over
    /// the consuming time (they differ with --pmessages or in backlog mode).
    pub fn build(
        f: RunFacts,
        ended_by: EndedBy,
        latency: &Histogram<u64>,
        confirm_latency: &Histogram<u64>,
    ) -> Summary {
        let t = f.totals;
        let p = |n: u64| round3(rate(n, f.publish_s));
        let drain = f.backlog.is_some();
        Summary {
            kind: "summary",
            id: f.id,
            ended_by,
            duration_s: round3(f.run_s),
            publish_duration_s: round3(f.publish_s),
            consume_duration_s: round3(f.consume_s),
            sent_total: t.sent,
            sent_rate: p(t.sent),
            confirmed_total: t.confirmed,
            confirmed_rate: p(t.confirmed),
            nacked_total: t.nacked,
            nacked_rate: p(t.nacked),
            returned_total: t.returned,
            returned_rate: p(t.returned),
            received_total: t.received,
            received_rate: round3(rate(t.received, f.consume_s)),
            latency_us: LatencyStats::from_histogram(latency),
            confirm_latency_us: LatencyStats::from_histogram(confirm_latency),
            publish_phase: drain.then(|| Phase::new(t.sent, f.publish_s)),
            backlog: f.backlog,
            ingest_phase: match (f.backlog, f.ingest_s) {
                (Some(b), Some(s)) => Some(Phase::new(b, s)),
                _ => None,
            },
            drain_phase: drain.then(|| Phase::new(t.received, f.consume_s)),
            cpu_s: f.cpu_s.map(round3),
            cpu_percent: f
                .cpu_s
                .filter(|_| f.run_s > 0.0)
                .map(|c| (c / f.run_s * 1000.0).round() / 10.0),
            errors: f.errors,
        }
    }
}

/// CPU time (user + system) this process has used, in seconds. Linux only.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_proc_stat_cpu(&stat, 100.0)
}

/// utime + stime (fields 14 and 15) of a /proc/<pid>/stat line, in seconds.
pub fn parse_proc_stat_cpu(stat: &str, ticks_per_sec: f64) -> Option<f64> {
    // The command name (field 2) may contain spaces: fields restart after ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' the first field is field 3 (state); utime is 14 -> index 11.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(values_us: &[u64]) -> Histogram<u64> {
        let mut h = new_histogram();
        for v in values_us {
            h.record(v * 1_000).unwrap();
        }
        h
    }

    #[test]
    fn totals_delta() {
        let a = Totals {
            sent: 10,
            confirmed: 8,
            nacked: 1,
            returned: 0,
            received: 5,
        };
        let b = Totals {
            sent: 25,
            confirmed: 20,
            nacked: 1,
            returned: 2,
            received: 9,
        };
        assert_eq!(
            b.since(a),
            Totals {
                sent: 15,
                confirmed: 12,
                nacked: 0,
                returned: 2,
                received: 4
            }
        );
        assert_eq!(a.since(b).sent, 0);
    }

    #[test]
    fn latency_percentiles_in_micros() {
        let values: Vec<u64> = (1..=100).collect();
        let s = LatencyStats::from_histogram(&hist(&values)).unwrap();
        assert_eq!(s.count, 100);
        assert_eq!(s.min, 1);
        assert_eq!(s.median, 50);
        assert_eq!(s.p75, 75);
        assert_eq!(s.p95, 95);
        assert_eq!(s.p99, 99);
        assert_eq!(s.max, 100);
        assert!(LatencyStats::from_histogram(&new_histogram()).is_none());
    }

    #[test]
    fn latency_recorder_drains() {
        let l = Latency::default();
        l.record_ns(5_000);
        l.record_ns(u64::MAX);
        let mut into = new_histogram();
        l.drain_into(&mut into);
        assert_eq!(into.len(), 2);
        assert!(into.max() >= MAX_LATENCY_NS - MAX_LATENCY_NS / 1000);
        let mut again = new_histogram();
        l.drain_into(&mut again);
        assert!(again.is_empty());
    }

    #[test]
    fn tick_rates_use_the_real_interval() {
        let delta = Totals {
            sent: 1_500,
            received: 1_200,
            ..Totals::default()
        };
        let t = Tick::build("S1", 1.5, 1.5, delta, delta, None);
        assert_eq!(t.sent_rate, 1_000);
        assert_eq!(t.received_rate, 800);
        assert_eq!(t.latency_median_us, None);
        let json = serde_json::to_value(&t).unwrap();
        assert_eq!(json["type"], "tick");
        assert_eq!(json["received_rate"], 800);
        assert!(json["latency_p99_us"].is_null());
    }

    #[test]
    fn summary_rates_and_phases() {
        let facts = RunFacts {
            id: "S6".into(),
            run_s: 12.0,
            publish_s: 4.0,
            consume_s: 2.0,
            totals: Totals {
                sent: 100_000,
                confirmed: 100_000,
                received: 100_000,
                ..Totals::default()
            },
            backlog: Some(100_000),
            ingest_s: Some(5.0),
            cpu_s: Some(6.0),
            errors: vec![],
        };
        let s = Summary::build(
            facts,
            EndedBy::Complete,
            &hist(&[10, 20, 30]),
            &new_histogram(),
        );
        assert_eq!(s.sent_rate, 25_000.0);
        assert_eq!(s.confirmed_rate, 25_000.0);
        assert_eq!(s.received_rate, 50_000.0);
        assert_eq!(s.publish_phase, Some(Phase::new(100_000, 4.0)));
        assert_eq!(s.drain_phase.unwrap().rate, 50_000.0);
        assert_eq!(s.ingest_phase.unwrap().rate, 20_000.0);
        assert_eq!(s.latency_us.unwrap().median, 20);
        assert!(s.confirm_latency_us.is_none());
        assert_eq!(s.cpu_percent, Some(50.0));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["type"], "summary");
        assert_eq!(json["ended_by"], "complete");
        assert_eq!(json["latency_us"]["p99"], 30);
        assert_eq!(json["drain_phase"]["messages"], 100_000);
    }

    #[test]
    fn summary_without_time_has_no_nan() {
        let s = Summary::build(
            RunFacts::default(),
            EndedBy::Error,
            &new_histogram(),
            &new_histogram(),
        );
        assert_eq!(s.sent_rate, 0.0);
        assert_eq!(s.received_rate, 0.0);
        assert!(s.publish_phase.is_none());
        assert!(s.cpu_percent.is_none());
        assert!(serde_json::to_string(&s).is_ok());
    }

    #[test]
    fn proc_stat_parsing() {
        let line =
            "1234 (warren perf) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 100 0 0";
        assert_eq!(parse_proc_stat_cpu(line, 100.0), Some(3.0));
        assert_eq!(parse_proc_stat_cpu("garbage", 100.0), None);
    }
}
