//! Output: the start line, one line per second and the summary, either as
//! PerfTest-like text or as JSON lines (one object each, stable field names)
//! for scripts that compare brokers side by side.
//!
//! The reporter also owns the run-wide histograms: every second it drains the
//! tasks' histograms into an interval histogram, prints its percentiles, and
//! folds it into the totals used by the summary.

use crate::cli::Config;
use crate::stats::{LatencyStats, Registry, Summary, Tick, Totals, new_histogram};
use hdrhistogram::Histogram;
use std::io::Write;
use std::time::Instant;

pub struct Reporter {
    json: bool,
    id: String,
    start: Instant,
    last_at: Instant,
    last: Totals,
    interval: Histogram<u64>,
    interval_confirm: Histogram<u64>,
    pub latency: Histogram<u64>,
    pub confirm_latency: Histogram<u64>,
}

impl Reporter {
    pub fn new(cfg: &Config) -> Self {
        let now = Instant::now();
        Self {
            json: cfg.json,
            id: cfg.id.clone(),
            start: now,
            last_at: now,
            last: Totals::default(),
            interval: new_histogram(),
            interval_confirm: new_histogram(),
            latency: new_histogram(),
            confirm_latency: new_histogram(),
        }
    }

    pub fn start_line(&self, cfg: &Config) {
        if self.json {
            let mut v = serde_json::json!({ "type": "start", "id": cfg.id });
            v["config"] = serde_json::to_value(cfg).unwrap_or_default();
            emit(&v.to_string());
        } else {
            let mut s = format!(
                "id: {}, starting: {} producer(s), {} consumer(s), {} queue(s) [{}], exchange {:?} ({}), {} B{}{}{}{}",
                cfg.id,
                cfg.producers,
                cfg.consumers,
                cfg.queues.len(),
                abbreviate(&cfg.queues),
                cfg.exchange,
                cfg.exchange_type.as_str(),
                cfg.size,
                if cfg.persistent { ", persistent" } else { "" },
                if cfg.confirm > 0 {
                    format!(", confirms {}", cfg.confirm)
                } else {
                    String::new()
                },
                if cfg.autoack {
                    ", autoack".to_string()
                } else {
                    format!(", manual ack every {}", cfg.multi_ack_every)
                },
                if cfg.qos > 0 {
                    format!(", qos {}", cfg.qos)
                } else {
                    String::new()
                },
            );
            if cfg.rate > 0.0 {
                s.push_str(&format!(", rate {} msg/s per producer", cfg.rate));
            }
            s.push_str(&format!(", broker {}", cfg.uri_display));
            emit(&s);
        }
    }

    /// Resets the clocks: the first interval starts now.
    pub fn begin(&mut self, registry: &Registry) {
        self.start = Instant::now();
        self.last_at = self.start;
        self.last = registry.totals();
    }

    pub fn note(&self, msg: &str) {
        if self.json {
            emit(&serde_json::json!({ "type": "note", "id": self.id, "message": msg }).to_string());
        } else {
            emit(&format!("id: {}, {}", self.id, msg));
        }
    }

    /// Prints the line for the interval that ends now.
    pub fn tick(&mut self, registry: &Registry) {
        let now = Instant::now();
        let totals = registry.totals();
        for l in &registry.consumer_latency {
            l.drain_into(&mut self.interval);
        }
        for l in &registry.confirm_latency {
            l.drain_into(&mut self.interval_confirm);
        }
        let stats = LatencyStats::from_histogram(&self.interval);
        let tick = Tick::build(
            &self.id,
            (now - self.start).as_secs_f64(),
            (now - self.last_at).as_secs_f64(),
            totals.since(self.last),
            totals,
            stats,
        );
        let _ = self.latency.add(&self.interval);
        let _ = self.confirm_latency.add(&self.interval_confirm);
        self.interval.reset();
        self.interval_confirm.reset();
        self.last = totals;
        self.last_at = now;
        if self.json {
            emit(&serde_json::to_string(&tick).unwrap_or_default());
        } else {
            emit(&format_tick(&tick));
        }
    }

    /// Prints a line for the current interval if it is at least `min` long.
    pub fn tick_if_at_least(&mut self, registry: &Registry, min: std::time::Duration) {
        if self.last_at.elapsed() >= min {
            self.tick(registry);
        }
    }

    /// Drains what the tasks recorded since the last tick into the totals
    /// (without printing a line).
    pub fn flush(&mut self, registry: &Registry) {
        for l in &registry.consumer_latency {
            l.drain_into(&mut self.latency);
        }
        for l in &registry.confirm_latency {
            l.drain_into(&mut self.confirm_latency);
        }
    }

    pub fn summary(&self, s: &Summary) {
        if self.json {
            emit(&serde_json::to_string(s).unwrap_or_default());
        } else {
            emit(&format_summary(s));
        }
    }
}

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn abbreviate(queues: &[String]) -> String {
    match queues.len() {
        0 => String::new(),
        1..=3 => queues.join(", "),
        n => format!("{} .. {}", queues[0], queues[n - 1]),
    }
}

pub fn format_tick(t: &Tick) -> String {
    let lat = match (t.latency_median_us, t.latency_p95_us, t.latency_p99_us) {
        (Some(m), Some(p95), Some(p99)) => format!("{m}/{p95}/{p99} µs"),
        _ => "-".to_string(),
    };
    format!(
        "id: {}, time {:.3} s, sent: {} msg/s, confirmed: {} msg/s, nacked: {} msg/s, returned: {} msg/s, received: {} msg/s, latency median/95th/99th: {}",
        t.id,
        t.elapsed_s,
        t.sent_rate,
        t.confirmed_rate,
        t.nacked_rate,
        t.returned_rate,
        t.received_rate,
        lat
    )
}

fn format_latency(l: &Option<LatencyStats>) -> String {
    match l {
        Some(l) => format!(
            "min {}, median {}, 75th {}, 95th {}, 99th {}, max {} µs ({} samples)",
            l.min, l.median, l.p75, l.p95, l.p99, l.max, l.count
        ),
        None => "-".to_string(),
    }
}

pub fn format_summary(s: &Summary) -> String {
    let mut out = format!(
        "id: {}, summary (ended by {:?}): run {:.3} s, publishing {:.3} s, consuming {:.3} s\n",
        s.id, s.ended_by, s.duration_s, s.publish_duration_s, s.consume_duration_s
    );
    let mut row = |name: &str, total: u64, rate: f64| {
        out.push_str(&format!(
            "  {name:<10} {total:>12} msgs {rate:>14.1} msg/s\n"
        ));
    };
    row("sent", s.sent_total, s.sent_rate);
    row("confirmed", s.confirmed_total, s.confirmed_rate);
    row("nacked", s.nacked_total, s.nacked_rate);
    row("returned", s.returned_total, s.returned_rate);
    row("received", s.received_total, s.received_rate);
    out.push_str(&format!(
        "  consumer latency: {}\n",
        format_latency(&s.latency_us)
    ));
    if s.confirm_latency_us.is_some() {
        out.push_str(&format!(
            "  confirm latency:  {}\n",
            format_latency(&s.confirm_latency_us)
        ));
    }
    if let (Some(p), Some(d)) = (s.publish_phase, s.drain_phase) {
        out.push_str(&format!(
            "  backlog in:  {} msgs in {:.3} s = {:.1} msg/s\n",
            p.messages, p.duration_s, p.rate
        ));
        if let Some(b) = s.backlog {
            out.push_str(&format!("  backlog queued when draining began: {b} msgs"));
            match s.ingest_phase {
                Some(i) => out.push_str(&format!(
                    ", all in the queue(s) {:.3} s after start = {:.1} msg/s\n",
                    i.duration_s, i.rate
                )),
                None => out.push('\n'),
            }
        }
        out.push_str(&format!(
            "  backlog out: {} msgs in {:.3} s = {:.1} msg/s\n",
            d.messages, d.duration_s, d.rate
        ));
    }
    if let (Some(c), Some(p)) = (s.cpu_s, s.cpu_percent) {
        out.push_str(&format!(
            "  warren-perf CPU: {c:.2} s ({p:.1}% of one core)\n"
        ));
    }
    for e in &s.errors {
        out.push_str(&format!("  error: {e}\n"));
    }
    out.pop();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{EndedBy, RunFacts, Totals};

    #[test]
    fn text_lines() {
        let t = Tick::build(
            "S1",
            1.0,
            1.0,
            Totals {
                sent: 10,
                received: 9,
                ..Totals::default()
            },
            Totals::default(),
            None,
        );
        let line = format_tick(&t);
        assert!(line.starts_with("id: S1, time 1.000 s, sent: 10 msg/s"));
        assert!(line.ends_with("latency median/95th/99th: -"));

        let s = Summary::build(
            RunFacts {
                id: "S6".into(),
                run_s: 2.0,
                publish_s: 1.0,
                consume_s: 1.0,
                totals: Totals {
                    sent: 5,
                    received: 5,
                    ..Totals::default()
                },
                backlog: Some(5),
                ingest_s: Some(1.5),
                cpu_s: Some(1.0),
                errors: vec!["consumer 0: boom".into()],
            },
            EndedBy::Error,
            &new_histogram(),
            &new_histogram(),
        );
        let text = format_summary(&s);
        assert!(text.contains("backlog in:  5 msgs"));
        assert!(text.contains("backlog out: 5 msgs"));
        assert!(text.contains("error: consumer 0: boom"));
        assert!(text.contains("50.0% of one core"));
    }

    #[test]
    fn queue_lists_are_abbreviated() {
        let qs: Vec<String> = (1..=10).map(|i| format!("q-{i}")).collect();
        assert_eq!(abbreviate(&qs), "q-1 .. q-10");
        assert_eq!(abbreviate(&qs[..2]), "q-1, q-2");
    }
}
