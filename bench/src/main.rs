//! warren-perf: a PerfTest-style load generator for AMQP 0-9-1 brokers, used
//! to run the same scenarios against Warren and RabbitMQ side by side.
//!
//! This file is the coordinator: it declares the topology, starts the
//! producers and consumers (each on its own connection), releases them
//! together once all are connected so setup never pollutes the figures,
//! prints a line per second, decides when the run is over (time, message
//! counts, drained queues, Ctrl-C or a failed task), then prints the summary
//! and deletes what it declared. The exit code is non-zero if anything failed.

mod cli;
mod consumer;
mod control;
mod producer;
mod report;
mod stats;
mod topology;

use clap::Parser;
use cli::{Args, Config};
use control::{Event, Role, Signal};
use report::Reporter;
use stats::{EndedBy, Registry, RunFacts, Summary};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

/// Longest wait for every producer and consumer to connect.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long tasks get to wind down after the stop signal.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often queue depths are polled (drain detection, backlog settling).
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// Consecutive identical checks that mean "settled" / "drained".
const STABLE_CHECKS: u32 = 3;
/// Longest wait for the backlog to settle before draining anyway.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-perf: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-perf: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (json, id) = (cfg.json, cfg.id.clone());
    let code = match rt.block_on(run(cfg)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("warren-perf: error: {e}");
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "type": "error", "id": id, "message": e })
                );
            }
            ExitCode::FAILURE
        }
    };
    rt.shutdown_timeout(Duration::from_secs(1));
    code
}

/// Where a backlog run (`--drain-after-publish`) stands.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    /// Normal run, or backlog run still publishing.
    Running,
    /// Backlog run: producers done, waiting for queue depth to stop changing.
    Settling {
        since: Instant,
        last: Option<u64>,
        /// When the depth last changed (the broker's ingest end, ±CHECK_EVERY).
        changed_at: Instant,
        stable: u32,
    },
    /// Backlog run: consumers subscribed at `since`.
    Draining {
        since: Instant,
        backlog: u64,
        ingested_at: Instant,
    },
}

/// Drain detection: queue depth 0 and no delivery for a few checks.
#[derive(Default)]
struct DrainWatch {
    last_received: Option<u64>,
    stable: u32,
}

impl DrainWatch {
    fn observe(&mut self, depth: u64, received: u64) -> bool {
        if depth == 0 && self.last_received == Some(received) {
            self.stable += 1;
        } else {
            self.stable = 0;
        }
        self.last_received = Some(received);
        self.stable >= STABLE_CHECKS
    }
}

/// Returns Ok(true) when every task succeeded.
async fn run(cfg: Config) -> Result<bool, String> {
    let mut reporter = Reporter::new(&cfg);
    reporter.start_line(&cfg);
    let cpu_at_start = stats::process_cpu_seconds();

    let setup_conn = control::connect(&cfg.uri, "warren-perf-setup").await?;
    let setup = setup_conn
        .create_channel()
        .await
        .map_err(|e| format!("opening the setup channel failed: {e}"))?;
    let (declared, warnings) = topology::setup(&cfg, &setup).await?;
    for w in warnings {
        reporter.note(&format!("warning: {w}"));
    }

    let stop = Signal::new();
    let publish_go = Signal::new();
    let consume_go = Signal::new();
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut registry = Registry::default();

    for j in 0..cfg.consumers {
        let spec = consumer::ConsumerSpec {
            id: j,
            uri: cfg.uri.clone(),
            queue: cfg.consumer_queue(j).to_string(),
            autoack: cfg.autoack,
            multi_ack_every: cfg.multi_ack_every,
            qos: cfg.qos,
            cmessages: cfg.cmessages,
            window: cfg.publish_window,
            delayed: cfg.delay.is_some(),
        };
        let ctx = consumer::ConsumerCtx {
            counters: registry.new_counters(),
            latency: registry.new_consumer_latency(),
            go: consume_go.clone(),
            stop: stop.clone(),
            events: tx.clone(),
        };
        let events = tx.clone();
        tokio::spawn(async move {
            let r = consumer::run(spec, ctx).await;
            let _ = events.send(Event::Finished(Role::Consumer, j, r));
        });
    }
    for i in 0..cfg.producers {
        let queue = cfg.producer_queue(i).to_string();
        let spec = producer::ProducerSpec {
            id: i,
            uri: cfg.uri.clone(),
            exchange: cfg.exchange.clone(),
            routing_key: cfg.producer_routing_key(i),
            headers: topology::publish_headers(&cfg, &queue),
            size: cfg.size,
            rate: cfg.rate,
            confirm: cfg.confirm,
            persistent: cfg.persistent,
            mandatory: cfg.mandatory,
            pmessages: cfg.pmessages,
            window: cfg.publish_window,
            delay: cfg.delay,
        };
        let ctx = producer::ProducerCtx {
            counters: registry.new_counters(),
            confirm_latency: registry.new_confirm_latency(),
            go: publish_go.clone(),
            stop: stop.clone(),
            events: tx.clone(),
        };
        let events = tx.clone();
        tokio::spawn(async move {
            let r = producer::run(spec, ctx).await;
            let _ = events.send(Event::Finished(Role::Producer, i, r));
        });
    }
    drop(tx);

    let mut errors: Vec<String> = Vec::new();
    let mut finished = 0usize;
    let total_tasks = cfg.producers + cfg.consumers;
    let mut producers_left = cfg.producers;
    let mut consumers_left = cfg.consumers;
    let mut producers_done_at: Option<Instant> = None;

    // Every task connected (or one failed).
    let setup_deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
    let mut ready = 0usize;
    let mut subscribed = 0usize;
    let mut awaiting_subscriptions = false;
    let mut aborted = false;
    loop {
        if ready == total_tasks && !awaiting_subscriptions {
            if cfg.drain_after_publish || cfg.consumers == 0 {
                break;
            }
            consume_go.set();
            awaiting_subscriptions = true;
        }
        if awaiting_subscriptions && subscribed == cfg.consumers {
            break;
        }
        match tokio::time::timeout_at(setup_deadline, rx.recv()).await {
            Ok(Some(Event::Ready)) => ready += 1,
            Ok(Some(Event::Subscribed)) => subscribed += 1,
            Ok(Some(Event::Finished(role, id, result))) => {
                finished += 1;
                if let Err(e) = result {
                    errors.push(format!("{role} {id}: {e}"));
                }
                aborted = true;
                break;
            }
            Ok(None) => {
                aborted = true;
                break;
            }
            Err(_) => {
                errors.push(format!(
                    "setup: not every producer and consumer was ready within {}s",
                    SETUP_TIMEOUT.as_secs()
                ));
                aborted = true;
                break;
            }
        }
    }

    let mut ended_by = EndedBy::Complete;
    let mut stage = Stage::Running;
    let mut drain_watch = DrainWatch::default();
    let consumed_queues = cfg.consumed_queues();
    reporter.begin(&registry);
    let start = Instant::now();
    let start_wall_ns = control::now_ns();

    if aborted {
        ended_by = EndedBy::Error;
    } else {
        publish_go.set();
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        // Burst (not Delay): a late tick does not push the later ones back,
        // so the line due at the --time deadline still comes before it.
        tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
        let mut check = tokio::time::interval(CHECK_EVERY);
        check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let deadline = cfg
            .time
            .map(|t| tokio::time::Instant::now() + Duration::from_secs_f64(t));
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        let producer_only_end = cfg.pmessages.is_some() || cfg.producers == 0;

        loop {
            tokio::select! {
                // Ticks first so the line due at the deadline is printed.
                biased;
                _ = tick.tick() => reporter.tick(&registry),
                _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                    ended_by = EndedBy::Time;
                    break;
                }
                _ = &mut ctrl_c => {
                    ended_by = EndedBy::Interrupted;
                    break;
                }
                ev = rx.recv() => match ev {
                    Some(Event::Finished(role, id, result)) => {
                        finished += 1;
                        if let Err(e) = result {
                            errors.push(format!("{role} {id}: {e}"));
                            ended_by = EndedBy::Error;
                            break;
                        }
                        match role {
                            Role::Producer => {
                                producers_left -= 1;
                                if producers_left == 0 {
                                    producers_done_at = Some(Instant::now());
                                }
                            }
                            Role::Consumer => consumers_left -= 1,
                        }
                    }
                    Some(_) => {}
                    None => break,
                },
                _ = check.tick() => {
                    let producers_done = producers_left == 0;
                    match stage {
                        Stage::Running if cfg.drain_after_publish && producers_done => {
                            let now = Instant::now();
                            stage = Stage::Settling { since: now, last: None, changed_at: now, stable: 0 };
                        }
                        Stage::Running => {
                            // Unbounded producers stop once bounded consumers are done.
                            if cfg.consumers > 0 && consumers_left == 0 && !producer_only_end {
                                break;
                            }
                            if producers_done && cfg.consumers > 0 && consumers_left > 0
                                && cfg.cmessages.is_none() && cfg.producers > 0
                            {
                                let depth = topology::depth(&setup, &consumed_queues).await;
                                let depth = match depth {
                                    Ok(d) => d,
                                    Err(e) => { errors.push(e); ended_by = EndedBy::Error; break; }
                                };
                                if drain_watch.observe(depth, registry.totals().received) {
                                    break;
                                }
                            }
                        }
                        Stage::Settling { since, last, changed_at, stable } => {
                            let depth = match topology::depth(&setup, &consumed_queues).await {
                                Ok(d) => d,
                                Err(e) => { errors.push(e); ended_by = EndedBy::Error; break; }
                            };
                            let (stable, changed_at) = if last == Some(depth) {
                                (stable + 1, changed_at)
                            } else {
                                (0, Instant::now())
                            };
                            if stable >= STABLE_CHECKS - 1 || since.elapsed() > SETTLE_TIMEOUT {
                                reporter.note(&format!(
                                    "backlog: {depth} messages in {} queue(s) after publishing; draining",
                                    consumed_queues.len()
                                ));
                                stage = Stage::Draining { since: Instant::now(), backlog: depth, ingested_at: changed_at };
                                consume_go.set();
                            } else {
                                stage = Stage::Settling { since, last: Some(depth), changed_at, stable };
                            }
                        }
                        Stage::Draining { .. } => {
                            // Not `received >= backlog`: messages still in
                            // flight to the broker when draining began would
                            // be left behind. Wait for an empty, quiet queue;
                            // the drain time ends at the last delivery anyway.
                            let received = registry.totals().received;
                            let depth = match topology::depth(&setup, &consumed_queues).await {
                                Ok(d) => d,
                                Err(e) => { errors.push(e); ended_by = EndedBy::Error; break; }
                            };
                            if drain_watch.observe(depth, received) {
                                break;
                            }
                        }
                    }
                    let all_done = producers_done && consumers_left == 0;
                    if all_done && (!cfg.drain_after_publish || matches!(stage, Stage::Draining { .. })) {
                        break;
                    }
                }
            }
        }
    }
    let end = Instant::now();
    if !aborted {
        // The last, partial interval (a run that completed between ticks).
        reporter.tick_if_at_least(&registry, Duration::from_millis(100));
    }

    // Stop everything and wait for the tasks to close their connections.
    stop.set();
    publish_go.set();
    consume_go.set();
    let shutdown_deadline = tokio::time::Instant::now() + SHUTDOWN_TIMEOUT;
    while finished < total_tasks {
        match tokio::time::timeout_at(shutdown_deadline, rx.recv()).await {
            Ok(Some(Event::Finished(role, id, result))) => {
                finished += 1;
                if let Err(e) = result {
                    errors.push(format!("{role} {id}: {e}"));
                    ended_by = EndedBy::Error;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(_) => {
                errors.push(format!(
                    "{} task(s) did not stop within {}s",
                    total_tasks - finished,
                    SHUTDOWN_TIMEOUT.as_secs()
                ));
                ended_by = EndedBy::Error;
                break;
            }
        }
    }
    reporter.flush(&registry);
    let totals = registry.totals();

    // Durations: publishing ends when the last producer finished; consuming
    // ends at the last delivery unless the clock or an error cut the run.
    let run_s = (end - start).as_secs_f64();
    let publish_s = producers_done_at.map_or(run_s, |t| (t.min(end) - start).as_secs_f64());
    let (consume_start, backlog, ingest_s) = match stage {
        Stage::Draining {
            since,
            backlog,
            ingested_at,
        } => (
            since,
            Some(backlog),
            Some((ingested_at - start).as_secs_f64()),
        ),
        _ if cfg.drain_after_publish => (end, Some(0), None),
        _ => (start, None, None),
    };
    let last_rx = registry.last_receive_ns();
    let consume_end = if ended_by == EndedBy::Complete && last_rx > start_wall_ns {
        (start + Duration::from_nanos(last_rx - start_wall_ns)).min(end)
    } else {
        end
    };
    let consume_s = consume_end
        .saturating_duration_since(consume_start)
        .as_secs_f64();

    let cpu_s = match (cpu_at_start, stats::process_cpu_seconds()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    for e in &errors {
        eprintln!("warren-perf: {e}");
    }
    let ok = errors.is_empty();
    let summary = Summary::build(
        RunFacts {
            id: cfg.id.clone(),
            run_s,
            publish_s,
            consume_s,
            totals,
            backlog,
            ingest_s,
            cpu_s,
            errors,
        },
        ended_by,
        &reporter.latency,
        &reporter.confirm_latency,
    );
    reporter.summary(&summary);

    if !cfg.keep {
        for w in topology::cleanup(&setup, &declared).await {
            reporter.note(&format!("warning: {w}"));
        }
    }
    let _ = setup_conn.close(200, "warren-perf done".into()).await;
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drained_means_empty_and_quiet_for_several_checks() {
        let mut w = DrainWatch::default();
        assert!(!w.observe(0, 10)); // first look: no history
        assert!(!w.observe(0, 10));
        assert!(!w.observe(0, 10));
        assert!(w.observe(0, 10));
        // Deliveries still arriving, or messages still queued, reset it.
        let mut w = DrainWatch::default();
        for received in [1, 2, 3, 4] {
            assert!(!w.observe(0, received));
        }
        for _ in 0..5 {
            assert!(!w.observe(7, 4));
        }
        assert!(!w.observe(0, 4));
        assert!(!w.observe(0, 4));
        assert!(w.observe(0, 4));
    }
}
