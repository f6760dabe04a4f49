//! The autoscaler's decisions, as pure functions of what the brokers report and when.
//!
//! Each round the operator reads every broker's `/metrics` (RabbitMQ's Prometheus names),
//! sums the Instance's load, and asks each target how many brokers it wants:
//! `ceil(load / target per replica)`; the largest answer wins. Like Kubernetes' HPA, a change
//! must be wanted for a whole stabilization window before it happens: scaling up takes the
//! smallest recommendation of the up-window, scaling down the largest of the down-window. A
//! broker leaves only once drained: the highest ordinal first, and only when it holds no
//! messages (ready or unacknowledged), so scaling down never strands a message.

pub mod autoscaler;

use crate::crd::instance::{AutoscalingSpec, ScalingTargets};
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// What one broker reports, from the node sums of its `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BrokerLoad {
    pub messages_ready: f64,
    pub messages_unacked: f64,
    pub published_total: f64,
    pub connections: f64,
}

impl BrokerLoad {
    /// Messages the broker still holds.
    pub fn messages(&self) -> f64 {
        self.messages_ready + self.messages_unacked
    }
}

/// Reads a broker's load from the Prometheus text of `/metrics`; an error names what is
/// missing or malformed.
pub fn parse_metrics(text: &str) -> Result<BrokerLoad, String> {
    let mut load = BrokerLoad::default();
    let mut seen = [false; 4];
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find(['{', ' ']) {
            Some(i) if line.as_bytes()[i] == b'{' => {
                let close = line
                    .rfind('}')
                    .ok_or_else(|| format!("unclosed labels in {line:?}"))?;
                (&line[..i], &line[close + 1..])
            }
            Some(i) => (&line[..i], &line[i..]),
            None => return Err(format!("no value in {line:?}")),
        };
        let slot = match series {
            "rabbitmq_queue_messages_ready" => 0,
            "rabbitmq_queue_messages_unacked" => 1,
            "rabbitmq_global_messages_received_total" => 2,
            "rabbitmq_connections" => 3,
            _ => continue,
        };
        let value: f64 = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("bad value in {line:?}"))?;
        seen[slot] = true;
        let field = match slot {
            0 => &mut load.messages_ready,
            1 => &mut load.messages_unacked,
            2 => &mut load.published_total,
            _ => &mut load.connections,
        };
        *field += value;
    }
    let names = [
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_unacked",
        "rabbitmq_global_messages_received_total",
        "rabbitmq_connections",
    ];
    if let Some(i) = seen.iter().position(|s| !s) {
        return Err(format!("{} is missing from /metrics", names[i]));
    }
    Ok(load)
}

fn per_replica(total: f64, target: Option<i64>) -> i32 {
    match target {
        Some(t) if t > 0 => {
            let n = (total / t as f64).ceil();
            if n >= f64::from(i32::MAX) {
                i32::MAX
            } else {
                n.max(0.0) as i32
            }
        }
        _ => 0,
    }
}

/// The brokers the targets ask for, given the Instance's total ready messages, publish rate
/// (messages per second) and connections; at least one.
pub fn wanted_replicas(
    targets: &ScalingTargets,
    messages_ready: f64,
    publish_rate: f64,
    connections: f64,
) -> i32 {
    per_replica(messages_ready, targets.messages_ready_per_replica)
        .max(per_replica(publish_rate, targets.publish_rate_per_replica))
        .max(per_replica(connections, targets.connections_per_replica))
        .max(1)
}

/// The publish rate from two readings of each broker's received counter; a counter that went
/// down (the broker restarted) counts from zero.
pub fn publish_rate(
    before: &BTreeMap<String, (Duration, f64)>,
    now: &BTreeMap<String, (Duration, f64)>,
) -> f64 {
    now.iter()
        .filter_map(|(pod, (t, total))| {
            let (t0, total0) = before.get(pod)?;
            let dt = t.checked_sub(*t0)?.as_secs_f64();
            if dt <= 0.0 {
                return None;
            }
            let delta = if total >= total0 {
                total - total0
            } else {
                *total
            };
            Some(delta / dt)
        })
        .sum()
}

/// The recommendations of the last rounds.
#[derive(Debug, Clone, Default)]
pub struct Recommender {
    history: VecDeque<(Duration, i32)>,
}

impl Recommender {
    /// Records what the targets want at `now`, keeping what windows up to `keep` need.
    pub fn record(&mut self, now: Duration, wanted: i32, keep: Duration) {
        self.history.push_back((now, wanted));
        // The newest recommendation older than `keep` is still in effect at the window's start.
        while self
            .history
            .get(1)
            .is_some_and(|(t, _)| now.saturating_sub(*t) >= keep)
        {
            self.history.pop_front();
        }
    }

    /// What was wanted through the last `secs` seconds: the recommendation in effect at the
    /// window's start and every one since; None until the history reaches back that far.
    fn window(&self, now: Duration, secs: i32) -> Option<Vec<i32>> {
        let start = now.checked_sub(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))?;
        let first = self.history.iter().rposition(|(t, _)| *t <= start)?;
        Some(self.history.iter().skip(first).map(|(_, n)| *n).collect())
    }

    /// The replica count to run at `now`, from `current`: within [min, max] at once; up when
    /// every recommendation of the up-window wants more (to the least of them); down when
    /// every recommendation of the down-window wants fewer (to the most of them).
    pub fn decide(&self, spec: &AutoscalingSpec, current: i32, now: Duration) -> i32 {
        let (min, max) = (spec.min_replicas.max(1), spec.max_replicas.max(1));
        if current < min {
            return min;
        }
        if current > max {
            return max;
        }
        if let Some(up) = self
            .window(now, spec.scale_up_stabilization_seconds)
            .and_then(|v| v.into_iter().min())
            .filter(|n| *n > current)
        {
            return up.min(max);
        }
        if let Some(down) = self
            .window(now, spec.scale_down_stabilization_seconds)
            .and_then(|v| v.into_iter().max())
            .filter(|n| *n < current)
        {
            return down.max(min);
        }
        current
    }
}

/// How far a scale-down may go now: brokers leave from the highest ordinal, each only once it
/// holds no messages. `messages[i]` is what broker `i` holds. Returns the new count and, when
/// it stops short of `target`, the ordinal that still holds messages.
pub fn drain_to(current: i32, target: i32, messages: &[f64]) -> (i32, Option<(i32, f64)>) {
    let mut n = current;
    while n > target {
        let held = messages
            .get(usize::try_from(n - 1).unwrap_or(0))
            .copied()
            .unwrap_or(0.0);
        if held > 0.0 {
            return (n, Some((n - 1, held)));
        }
        n -= 1;
    }
    (n, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(min: i32, max: i32, up: i32, down: i32) -> AutoscalingSpec {
        AutoscalingSpec {
            enabled: true,
            min_replicas: min,
            max_replicas: max,
            targets: ScalingTargets::default(),
            scale_up_stabilization_seconds: up,
            scale_down_stabilization_seconds: down,
        }
    }

    const METRICS: &str = "# HELP rabbitmq_queue_messages_ready Messages ready\n\
        # TYPE rabbitmq_queue_messages_ready gauge\n\
        rabbitmq_queue_messages_ready 250\n\
        rabbitmq_queue_messages_unacked 5\n\
        rabbitmq_queue_messages 255\n\
        rabbitmq_global_messages_received_total{protocol=\"amqp091\"} 1000\n\
        rabbitmq_connections 3\n";

    #[test]
    fn the_load_comes_from_rabbitmq_names_and_missing_ones_are_named() {
        let load = parse_metrics(METRICS).unwrap();
        assert_eq!(
            load,
            BrokerLoad {
                messages_ready: 250.0,
                messages_unacked: 5.0,
                published_total: 1000.0,
                connections: 3.0
            }
        );
        assert_eq!(load.messages(), 255.0);
        let err = parse_metrics("rabbitmq_connections 1\n").unwrap_err();
        assert!(err.contains("rabbitmq_queue_messages_ready"), "{err}");
        assert!(parse_metrics("rabbitmq_connections x\n").is_err());
    }

    #[test]
    fn the_busiest_target_decides() {
        let t = ScalingTargets {
            messages_ready_per_replica: Some(100),
            publish_rate_per_replica: Some(1000),
            connections_per_replica: Some(10),
        };
        assert_eq!(wanted_replicas(&t, 0.0, 0.0, 0.0), 1);
        assert_eq!(wanted_replicas(&t, 250.0, 0.0, 0.0), 3);
        assert_eq!(wanted_replicas(&t, 250.0, 4500.0, 0.0), 5);
        assert_eq!(wanted_replicas(&t, 0.0, 0.0, 61.0), 7);
        assert_eq!(
            wanted_replicas(&ScalingTargets::default(), 1e9, 1e9, 1e9),
            1
        );
    }

    #[test]
    fn publish_rates_come_from_counters_and_survive_restarts() {
        let at = |s: u64| Duration::from_secs(s);
        let before = BTreeMap::from([
            ("a".to_owned(), (at(10), 100.0)),
            ("b".to_owned(), (at(10), 50.0)),
        ]);
        let now = BTreeMap::from([
            ("a".to_owned(), (at(20), 300.0)),
            ("b".to_owned(), (at(20), 20.0)),
            ("c".to_owned(), (at(20), 999.0)),
        ]);
        // a: 200 in 10 s; b restarted: 20 in 10 s; c is new: no rate yet.
        assert!((publish_rate(&before, &now) - 22.0).abs() < 1e-9);
    }

    #[test]
    fn scaling_up_and_down_waits_for_its_window() {
        let s = spec(1, 5, 10, 60);
        let at = |secs: u64| Duration::from_secs(secs);
        let keep = at(60);
        let mut r = Recommender::default();
        r.record(at(0), 1, keep);
        assert_eq!(r.decide(&s, 1, at(0)), 1);
        // Wanted more only from t=5: up once the whole 10 s window wants it.
        for t in 5..=14 {
            r.record(at(t), 4, keep);
            assert_eq!(r.decide(&s, 1, at(t)), 1, "t={t}");
        }
        r.record(at(15), 4, keep);
        assert_eq!(r.decide(&s, 1, at(15)), 4);
        // A brief dip does not scale down; a whole minute of less does, to the window's max.
        r.record(at(16), 1, keep);
        assert_eq!(r.decide(&s, 4, at(16)), 4);
        for t in 17..=76 {
            r.record(at(t), if t < 30 { 2 } else { 1 }, keep);
        }
        assert_eq!(r.decide(&s, 4, at(76)), 2);
        r.record(at(90), 1, keep);
        assert_eq!(r.decide(&s, 2, at(90)), 1);
        // Never past max, never under min, and brought into range at once.
        r.record(at(91), 50, keep);
        assert_eq!(r.decide(&spec(1, 5, 0, 60), 2, at(91)), 5);
        assert_eq!(r.decide(&spec(3, 5, 0, 0), 1, at(91)), 3);
        assert_eq!(r.decide(&spec(1, 2, 0, 0), 4, at(91)), 2);
    }

    #[test]
    fn a_broker_leaves_only_once_it_holds_nothing() {
        assert_eq!(drain_to(3, 1, &[10.0, 0.0, 0.0]), (1, None));
        assert_eq!(drain_to(3, 1, &[10.0, 4.0, 0.0]), (2, Some((1, 4.0))));
        assert_eq!(drain_to(3, 1, &[0.0, 0.0, 7.0]), (3, Some((2, 7.0))));
        assert_eq!(drain_to(2, 2, &[5.0, 5.0]), (2, None));
    }
}
