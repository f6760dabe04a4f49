//! The autoscaler's rounds: read every broker's `/metrics`, keep each Instance's history of
//! recommendations and counter readings, and decide its replica count (see the module above
//! for the rules).

use super::{BrokerLoad, Recommender, drain_to, parse_metrics, publish_rate, wanted_replicas};
use crate::crd::Instance;
use crate::crd::instance::AutoscalingSpec;
use crate::resources::{name_of, namespace_of};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A broker's metrics by default: its own DNS name through the headless Service.
pub const DEFAULT_METRICS_URL: &str = "http://{pod}.{instance}-nodes.{namespace}.svc:15692/metrics";

/// The outcome of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The brokers to run.
    pub replicas: i32,
    /// Why the count is held where the targets alone would move it: `(reason, message)`.
    pub held: Option<(&'static str, String)>,
}

#[derive(Debug, Default)]
struct InstanceHistory {
    recommender: Recommender,
    counters: BTreeMap<String, (Duration, f64)>,
}

/// The autoscaler of every Instance that asks for one.
#[derive(Debug)]
pub struct Autoscaler {
    started: Instant,
    /// How often an autoscaled Instance is looked at.
    pub interval: Duration,
    metrics_url: String,
    http: reqwest::Client,
    history: Mutex<HashMap<String, InstanceHistory>>,
}

impl Default for Autoscaler {
    fn default() -> Self {
        Self::new(Duration::from_secs(15), DEFAULT_METRICS_URL)
    }
}

impl Autoscaler {
    /// `metrics_url` has `{pod}`, `{instance}` and `{namespace}`.
    pub fn new(interval: Duration, metrics_url: &str) -> Self {
        Self {
            started: Instant::now(),
            interval,
            metrics_url: metrics_url.to_owned(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .connect_timeout(Duration::from_secs(3))
                .build()
                .expect("a client without TLS options builds"),
            history: Mutex::new(HashMap::new()),
        }
    }

    async fn read(&self, instance: &Instance, pod: &str) -> Result<BrokerLoad, String> {
        let url = self
            .metrics_url
            .replace("{pod}", pod)
            .replace("{instance}", name_of(instance))
            .replace("{namespace}", namespace_of(instance));
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("{pod}: {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{pod}: {url}: HTTP {}", response.status()));
        }
        let text = response
            .text()
            .await
            .map_err(|e| format!("{pod}: {url}: {e}"))?;
        parse_metrics(&text).map_err(|e| format!("{pod}: {e}"))
    }

    /// Forgets an Instance (deleted).
    pub fn forget(&self, uid: &str) {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    /// One round for an Instance running `current` brokers.
    pub async fn round(
        &self,
        instance: &Instance,
        spec: &AutoscalingSpec,
        current: i32,
    ) -> Decision {
        let uid = instance.metadata.uid.clone().unwrap_or_default();
        let min = spec.min_replicas.max(1);
        let pods: Vec<String> = (0..current.max(0))
            .map(|i| format!("{}-{i}", name_of(instance)))
            .collect();
        let reads = futures::future::join_all(pods.iter().map(|p| self.read(instance, p))).await;
        let now = self.started.elapsed();
        let mut loads = Vec::with_capacity(reads.len());
        for r in reads {
            match r {
                Ok(l) => loads.push(l),
                Err(why) => {
                    // No decision on partial data; only a count outside [min, max] moves
                    // (up at once; down still waits for the drain below).
                    let replicas = if current < min { min } else { current };
                    return Decision {
                        replicas,
                        held: Some(("MetricsUnavailable", why)),
                    };
                }
            }
        }
        let counters: BTreeMap<String, (Duration, f64)> = pods
            .iter()
            .zip(&loads)
            .map(|(p, l)| (p.clone(), (now, l.published_total)))
            .collect();
        let ready: f64 = loads.iter().map(|l| l.messages_ready).sum();
        let connections: f64 = loads.iter().map(|l| l.connections).sum();
        let target = {
            let mut all = self.history.lock().unwrap_or_else(|e| e.into_inner());
            let h = all.entry(uid).or_default();
            let rate = publish_rate(&h.counters, &counters);
            h.counters = counters;
            let wanted = wanted_replicas(&spec.targets, ready, rate, connections);
            let keep = Duration::from_secs(
                u64::try_from(
                    spec.scale_up_stabilization_seconds
                        .max(spec.scale_down_stabilization_seconds),
                )
                .unwrap_or(0),
            ) + self.interval * 2;
            h.recommender.record(now, wanted, keep);
            h.recommender.decide(spec, current, now)
        };
        if target >= current {
            return Decision {
                replicas: target,
                held: None,
            };
        }
        let held: Vec<f64> = loads.iter().map(BrokerLoad::messages).collect();
        match drain_to(current, target, &held) {
            (n, None) => Decision {
                replicas: n,
                held: None,
            },
            (n, Some((ordinal, messages))) => Decision {
                replicas: n,
                held: Some((
                    "Draining",
                    format!(
                        "{} brokers wanted; {}-{ordinal} still holds {messages} messages and leaves once they are consumed",
                        target,
                        name_of(instance)
                    ),
                )),
            },
        }
    }
}
