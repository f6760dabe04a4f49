//! Prometheus metrics with the names, types and labels of RabbitMQ's Prometheus plugin, so
//! existing dashboards and alerts work: `/metrics` sums queue, channel and connection
//! figures over the node (RabbitMQ's default), `/metrics/per-object` labels them by object.
//! The exposition format is the `prometheus` crate's text encoder.

use super::AppState;
use super::overview::{RABBITMQ_VERSION, max_fds};
use crate::broker::stats::MessageCounts;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(aggregated))
        .route("/metrics/per-object", get(per_object))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .fallback(|| async { (StatusCode::NOT_FOUND, "Unknown Registry") })
        .with_state(state)
}

/// Liveness for Kubernetes probes (no credentials, like the metrics): the broker answers.
async fn live() -> Response {
    health(StatusCode::OK, "ok")
}

/// Readiness: every vhost is up and the broker is not shutting down (then it answers 503, so
/// the Service stops sending it clients while it closes their connections).
async fn ready(State(state): State<AppState>) -> Response {
    if *state.stopping.borrow() {
        return health(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    if state
        .broker
        .draining
        .load(std::sync::atomic::Ordering::SeqCst)
    {
        return health(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining (maintenance mode)",
        );
    }
    if state.broker.vhosts().is_empty() {
        return health(StatusCode::SERVICE_UNAVAILABLE, "no virtual hosts");
    }
    health(StatusCode::OK, "ok")
}

fn health(status: StatusCode, what: &str) -> Response {
    let body = if status == StatusCode::OK {
        serde_json::json!({"status": "ok"})
    } else {
        serde_json::json!({"status": "failed", "reason": what})
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn aggregated(State(state): State<AppState>) -> Response {
    scrape(state, false).await
}

async fn per_object(State(state): State<AppState>) -> Response {
    scrape(state, true).await
}

async fn scrape(state: AppState, per_object: bool) -> Response {
    // A walk over every queue and channel: off the async workers.
    let text = tokio::task::spawn_blocking(move || render(&state, per_object)).await;
    match text {
        Ok(Ok(body)) => {
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Families under construction, in output order.
#[derive(Default)]
struct Families(Vec<MetricFamily>);

type Labels<'a> = &'a [(&'a str, &'a str)];

fn metric(labels: Labels, value: f64, kind: MetricType) -> Metric {
    let mut m = Metric::from_label(
        labels
            .iter()
            .map(|(k, v)| {
                let mut l = LabelPair::default();
                l.set_name((*k).to_owned());
                l.set_value((*v).to_owned());
                l
            })
            .collect(),
    );
    if kind == MetricType::COUNTER {
        let mut c = Counter::default();
        c.set_value(value);
        m.set_counter(c);
    } else {
        let mut g = Gauge::default();
        g.set_value(value);
        m.set_gauge(g);
    }
    m
}

impl Families {
    /// Adds a family; one with no samples is left out (the encoder refuses empty families).
    fn add(&mut self, name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) {
        if metrics.is_empty() {
            return;
        }
        let mut f = MetricFamily::default();
        f.set_name(name.to_owned());
        f.set_help(help.to_owned());
        f.set_field_type(kind);
        f.set_metric(metrics);
        self.0.push(f);
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.add(
            name,
            help,
            MetricType::GAUGE,
            vec![metric(&[], value, MetricType::GAUGE)],
        );
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.add(
            name,
            help,
            MetricType::COUNTER,
            vec![metric(&[], value as f64, MetricType::COUNTER)],
        );
    }
}

/// One object's values for a set of families.
struct Row {
    labels: Vec<(&'static str, String)>,
    values: Vec<f64>,
}

/// Families that are per object with `per_object`, summed otherwise: `specs` are (name, help,
/// type), and each row has one value per spec.
fn object_families(
    out: &mut Families,
    specs: &[(&str, &str, MetricType)],
    rows: &[Row],
    per_object: bool,
) {
    for (i, (name, help, kind)) in specs.iter().enumerate() {
        let metrics = if per_object {
            rows.iter()
                .map(|r| {
                    let labels: Vec<(&str, &str)> =
                        r.labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
                    metric(&labels, r.values[i], *kind)
                })
                .collect()
        } else {
            vec![metric(&[], rows.iter().map(|r| r.values[i]).sum(), *kind)]
        };
        out.add(name, help, *kind, metrics);
    }
}

use MetricType::{COUNTER, GAUGE};

const QUEUE_FAMILIES: &[(&str, &str, MetricType)] = &[
    (
        "rabbitmq_queue_messages_ready",
        "Messages ready to be delivered to consumers",
        GAUGE,
    ),
    (
        "rabbitmq_queue_messages_unacked",
        "Messages delivered to consumers but not yet acknowledged",
        GAUGE,
    ),
    (
        "rabbitmq_queue_messages",
        "Sum of ready and unacknowledged messages - total queue depth",
        GAUGE,
    ),
    ("rabbitmq_queue_consumers", "Consumers on a queue", GAUGE),
    (
        "rabbitmq_queue_messages_ram",
        "Ready and unacknowledged messages stored in memory",
        GAUGE,
    ),
    (
        "rabbitmq_queue_messages_ready_ram",
        "Ready messages stored in memory",
        GAUGE,
    ),
    (
        "rabbitmq_queue_messages_ready_bytes",
        "Size in bytes of ready messages",
        GAUGE,
    ),
    (
        "rabbitmq_queue_messages_paged_out",
        "Messages paged out to disk",
        GAUGE,
    ),
    (
        "rabbitmq_queue_messages_published_total",
        "Total number of messages published to queues",
        COUNTER,
    ),
    (
        "rabbitmq_queue_messages_delivered_total",
        "Total number of messages delivered from the queue to consumers and basic.get",
        COUNTER,
    ),
    (
        "rabbitmq_queue_messages_redelivered_total",
        "Total number of messages redelivered from the queue",
        COUNTER,
    ),
    (
        "rabbitmq_queue_messages_acked_total",
        "Total number of messages acknowledged from the queue",
        COUNTER,
    ),
    (
        "rabbitmq_queue_messages_bytes",
        "Size in bytes of ready and unacknowledged messages",
        GAUGE,
    ),
    (
        "rabbitmq_queue_messages_unacked_bytes",
        "Size in bytes of all unacknowledged messages",
        GAUGE,
    ),
];

const CHANNEL_GAUGES: &[(&str, &str, MetricType)] = &[
    (
        "rabbitmq_channel_consumers",
        "Consumers on a channel",
        GAUGE,
    ),
    (
        "rabbitmq_channel_messages_unacked",
        "Delivered but not yet acknowledged messages",
        GAUGE,
    ),
    (
        "rabbitmq_channel_messages_unconfirmed",
        "Published but not yet confirmed messages",
        GAUGE,
    ),
    (
        "rabbitmq_channel_messages_uncommitted",
        "Messages received in a transaction but not yet committed",
        GAUGE,
    ),
    (
        "rabbitmq_channel_acks_uncommitted",
        "Message acknowledgements in a transaction not yet committed",
        GAUGE,
    ),
    (
        "rabbitmq_consumer_prefetch",
        "Limit of unacknowledged messages for each consumer",
        GAUGE,
    ),
    (
        "rabbitmq_channel_prefetch",
        "Total limit of unacknowledged messages for all consumers on a channel",
        GAUGE,
    ),
];

/// A counter family: name, help, and the [`MessageCounts`] field it reads.
type CounterSpec = (&'static str, &'static str, fn(&MessageCounts) -> u64);

/// Channel counters and the [`MessageCounts`] field each one reads.
const CHANNEL_COUNTERS: &[CounterSpec] = &[
    (
        "rabbitmq_channel_messages_published_total",
        "Total number of messages published into an exchange on a channel",
        |c| c.publish,
    ),
    (
        "rabbitmq_channel_messages_confirmed_total",
        "Total number of messages published into an exchange and confirmed on the channel",
        |c| c.confirm,
    ),
    (
        "rabbitmq_channel_messages_unroutable_returned_total",
        "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
        |c| c.return_unroutable,
    ),
    (
        "rabbitmq_channel_messages_unroutable_dropped_total",
        "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
        |c| c.drop_unroutable,
    ),
    (
        "rabbitmq_channel_get_ack_total",
        "Total number of messages fetched with basic.get in manual acknowledgement mode",
        |c| c.get,
    ),
    (
        "rabbitmq_channel_get_total",
        "Total number of messages fetched with basic.get in automatic acknowledgement mode",
        |c| c.get_no_ack,
    ),
    (
        "rabbitmq_channel_messages_delivered_ack_total",
        "Total number of messages delivered to consumers in manual acknowledgement mode",
        |c| c.deliver,
    ),
    (
        "rabbitmq_channel_messages_delivered_total",
        "Total number of messages delivered to consumers in automatic acknowledgement mode",
        |c| c.deliver_no_ack,
    ),
    (
        "rabbitmq_channel_messages_redelivered_total",
        "Total number of messages redelivered to consumers",
        |c| c.redeliver,
    ),
    (
        "rabbitmq_channel_messages_acked_total",
        "Total number of messages acknowledged by consumers",
        |c| c.ack,
    ),
    (
        "rabbitmq_channel_get_empty_total",
        "Total number of times basic.get operations fetched no message",
        |c| c.get_empty,
    ),
];

const CONNECTION_FAMILIES: &[(&str, &str, MetricType)] = &[
    (
        "rabbitmq_connection_incoming_bytes_total",
        "Total number of bytes received on a connection",
        COUNTER,
    ),
    (
        "rabbitmq_connection_outgoing_bytes_total",
        "Total number of bytes sent on a connection",
        COUNTER,
    ),
    (
        "rabbitmq_connection_incoming_packets_total",
        "Total number of packets received on a connection",
        COUNTER,
    ),
    (
        "rabbitmq_connection_outgoing_packets_total",
        "Total number of packets sent on a connection",
        COUNTER,
    ),
    (
        "rabbitmq_connection_pending_packets",
        "Number of packets waiting to be sent on a connection",
        GAUGE,
    ),
    (
        "rabbitmq_connection_channels",
        "Channels on a connection",
        GAUGE,
    ),
];

/// The node-wide `rabbitmq_global_*` counters, with the field each reads.
const GLOBAL_COUNTERS: &[CounterSpec] = &[
    (
        "rabbitmq_global_messages_received_total",
        "Total number of messages received from publishers",
        |c| c.publish,
    ),
    (
        "rabbitmq_global_messages_received_confirm_total",
        "Total number of messages received from publishers expecting confirmations",
        |c| c.publish_confirm,
    ),
    (
        "rabbitmq_global_messages_routed_total",
        "Total number of messages routed to queues or streams",
        |c| c.routed,
    ),
    (
        "rabbitmq_global_messages_confirmed_total",
        "Total number of messages confirmed to publishers",
        |c| c.confirm,
    ),
    (
        "rabbitmq_global_messages_unroutable_dropped_total",
        "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
        |c| c.drop_unroutable,
    ),
    (
        "rabbitmq_global_messages_unroutable_returned_total",
        "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
        |c| c.return_unroutable,
    ),
];

/// Per queue type (all of Warren's queues are classic; the others are printed as 0, as
/// RabbitMQ prints every combination).
const GLOBAL_QUEUE_COUNTERS: &[CounterSpec] = &[
    (
        "rabbitmq_global_messages_delivered_total",
        "Total number of messages delivered to consumers",
        |c| c.deliver_get(),
    ),
    (
        "rabbitmq_global_messages_delivered_consume_auto_ack_total",
        "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment",
        |c| c.deliver_no_ack,
    ),
    (
        "rabbitmq_global_messages_delivered_consume_manual_ack_total",
        "Total number of messages delivered to consumers using basic.consume with manual acknowledgment",
        |c| c.deliver,
    ),
    (
        "rabbitmq_global_messages_delivered_get_auto_ack_total",
        "Total number of messages delivered to consumers using basic.get with automatic acknowledgment",
        |c| c.get_no_ack,
    ),
    (
        "rabbitmq_global_messages_delivered_get_manual_ack_total",
        "Total number of messages delivered to consumers using basic.get with manual acknowledgment",
        |c| c.get,
    ),
    (
        "rabbitmq_global_messages_redelivered_total",
        "Total number of messages redelivered to consumers",
        |c| c.redeliver,
    ),
    (
        "rabbitmq_global_messages_acknowledged_total",
        "Total number of messages acknowledged by consumers",
        |c| c.ack,
    ),
    (
        "rabbitmq_global_messages_get_empty_total",
        "Total number of times basic.get operations fetched no message",
        |c| c.get_empty,
    ),
];

const QUEUE_TYPES: &[&str] = &[
    "rabbit_classic_queue",
    "rabbit_quorum_queue",
    "rabbit_stream_queue",
];

/// Renders every family.
pub fn render(state: &AppState, per_object: bool) -> prometheus::Result<Vec<u8>> {
    let broker = &state.broker;
    let mut out = Families::default();
    let node = broker.config.node_name.as_str();
    let cluster = broker.cluster_name();

    // Identity and the node.
    out.add(
        "rabbitmq_build_info",
        "RabbitMQ & Erlang/OTP version info",
        GAUGE,
        vec![metric(
            &[
                ("rabbitmq_version", RABBITMQ_VERSION),
                ("prometheus_plugin_version", RABBITMQ_VERSION),
                ("prometheus_client_version", "warren"),
                ("erlang_version", "n/a"),
                ("warren_version", env!("CARGO_PKG_VERSION")),
            ],
            1.0,
            GAUGE,
        )],
    );
    out.add(
        "rabbitmq_identity_info",
        "RabbitMQ node & cluster identity info",
        GAUGE,
        vec![metric(
            &[
                ("rabbitmq_node", node),
                ("rabbitmq_cluster", cluster.as_str()),
                ("rabbitmq_cluster_permanent_id", node),
            ],
            1.0,
            GAUGE,
        )],
    );
    let started = broker
        .started
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64().floor());
    let uptime = broker.started.elapsed().map_or(0.0, |d| d.as_secs_f64());
    if !per_object {
        out.gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            started,
        );
        let alarms = broker.alarms.state();
        out.gauge(
            "rabbitmq_alarms_file_descriptor_limit",
            "is 1 if file descriptor limit alarm is in effect",
            0.0,
        );
        out.gauge(
            "rabbitmq_alarms_free_disk_space_watermark",
            "is 1 if free disk space watermark alarm is in effect",
            f64::from(u8::from(alarms.disk)),
        );
        out.gauge(
            "rabbitmq_alarms_memory_used_watermark",
            "is 1 if VM memory watermark alarm is in effect",
            f64::from(u8::from(alarms.memory)),
        );
    }
    let churn = broker.churn.read();
    out.counter(
        "rabbitmq_connections_opened_total",
        "Total number of connections opened",
        churn.connection_created,
    );
    out.counter(
        "rabbitmq_connections_closed_total",
        "Total number of connections closed or terminated",
        churn.connection_closed,
    );
    out.counter(
        "rabbitmq_channels_opened_total",
        "Total number of channels opened",
        churn.channel_created,
    );
    out.counter(
        "rabbitmq_channels_closed_total",
        "Total number of channels closed",
        churn.channel_closed,
    );
    out.counter(
        "rabbitmq_queues_declared_total",
        "Total number of queues declared",
        churn.queue_declared,
    );
    out.counter(
        "rabbitmq_queues_created_total",
        "Total number of queues created",
        churn.queue_created,
    );
    out.counter(
        "rabbitmq_queues_deleted_total",
        "Total number of queues deleted",
        churn.queue_deleted,
    );
    let readings = broker.alarms.readings();
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let connections = broker.connections.list();
    out.gauge(
        "rabbitmq_process_open_fds",
        "Open file descriptors",
        fds as f64,
    );
    out.gauge(
        "rabbitmq_process_open_tcp_sockets",
        "Open TCP sockets",
        connections.len() as f64,
    );
    out.gauge(
        "rabbitmq_process_resident_memory_bytes",
        "Memory used in bytes",
        crate::alarms::resident_memory() as f64,
    );
    out.gauge(
        "warren_memory_used_bytes",
        "Memory in use as the memory alarm counts it (bytes in pages holding live data; resident memory without allocator statistics)",
        readings.memory_used as f64,
    );
    out.gauge(
        "warren_delayed_messages",
        "Messages of delayed exchanges (x-delayed-message) waiting for their time",
        broker
            .vhosts()
            .iter()
            .map(|v| v.delayed_messages())
            .sum::<u64>() as f64,
    );
    out.gauge(
        "rabbitmq_disk_space_available_bytes",
        "Disk space available in bytes",
        crate::alarms::free_disk(&broker.config.data_dir).unwrap_or(readings.disk_free) as f64,
    );
    out.gauge(
        "rabbitmq_process_max_fds",
        "Open file descriptors limit",
        max_fds() as f64,
    );
    out.gauge(
        "rabbitmq_process_max_tcp_sockets",
        "Open TCP sockets limit",
        max_fds() as f64,
    );
    out.gauge(
        "rabbitmq_resident_memory_limit_bytes",
        "Memory high watermark in bytes",
        readings.memory_limit as f64,
    );
    out.gauge(
        "rabbitmq_disk_space_available_limit_bytes",
        "Free disk space low watermark in bytes",
        readings.disk_free_limit as f64,
    );
    out.gauge("rabbitmq_erlang_uptime_seconds", "Node uptime", uptime);

    // Queues, walked under the read side of `retiring`: a queue deleted meanwhile is either
    // walked or already in the retired counters, never both or neither.
    let retiring = broker.churn.retiring.read();
    let mut queue_rows = Vec::new();
    let mut queue_count = 0usize;
    let mut consumers_total = 0.0;
    // The node's sums keep the counters of deleted queues, so they never go down.
    let r = broker.churn.retired_queues.read();
    let mut sums = [0.0; QUEUE_FAMILIES.len()];
    for (sum, retired) in sums[8..]
        .iter_mut()
        .zip([r.publish, r.deliver_get(), r.redeliver, r.ack])
    {
        *sum = retired as f64;
    }
    for v in broker.vhosts() {
        for q in v.queues() {
            let l = q.lengths();
            let c = q.stats.read();
            queue_count += 1;
            consumers_total += l.consumers as f64;
            let values = [
                l.ready as f64,
                l.unacked as f64,
                (l.ready + l.unacked) as f64,
                l.consumers as f64,
                l.in_memory as f64,
                l.in_memory as f64,
                l.ready_bytes as f64,
                l.ready.saturating_sub(l.in_memory) as f64,
                c.publish as f64,
                c.deliver_get() as f64,
                c.redeliver as f64,
                c.ack as f64,
                (l.ready_bytes + l.unacked_bytes) as f64,
                l.unacked_bytes as f64,
            ];
            if per_object {
                queue_rows.push(Row {
                    labels: vec![
                        ("vhost", v.name.to_string()),
                        ("queue", q.name().to_owned()),
                    ],
                    values: values.to_vec(),
                });
            } else {
                for (sum, value) in sums.iter_mut().zip(values) {
                    *sum += value;
                }
            }
        }
    }
    if !per_object {
        queue_rows.push(Row {
            labels: Vec::new(),
            values: sums.to_vec(),
        });
    }
    drop(retiring);
    object_families(&mut out, QUEUE_FAMILIES, &queue_rows, per_object);

    // Channels and connections.
    let mut channel_rows = Vec::new();
    let mut counter_rows = Vec::new();
    let mut connection_rows = Vec::new();
    let mut channels_total = 0usize;
    for c in &connections {
        let chans = c.channels();
        channels_total += chans.len();
        if per_object {
            let [recv_oct, send_oct, recv_cnt, send_cnt] = c.traffic.read();
            connection_rows.push(Row {
                labels: vec![("channel", c.name())],
                values: vec![
                    recv_oct as f64,
                    send_oct as f64,
                    recv_cnt as f64,
                    send_cnt as f64,
                    0.0,
                    chans.len() as f64,
                ],
            });
        }
        for ch in chans {
            let s = ch.snapshot();
            let name = format!("{} ({})", c.name(), s.number);
            let consumer_prefetch: u32 = s.consumers.iter().map(|k| k.prefetch_count).sum();
            channel_rows.push(Row {
                labels: vec![("channel", name.clone())],
                values: vec![
                    s.consumers.len() as f64,
                    s.messages_unacknowledged as f64,
                    s.messages_unconfirmed as f64,
                    s.messages_uncommitted as f64,
                    s.acks_uncommitted as f64,
                    f64::from(consumer_prefetch),
                    f64::from(s.global_prefetch_count),
                ],
            });
            counter_rows.push((name, c.vhost.clone(), s.counts));
        }
    }
    object_families(&mut out, CHANNEL_GAUGES, &channel_rows, per_object);
    let totals = broker.connections.totals();
    for (name, help, read) in CHANNEL_COUNTERS {
        let metrics = if per_object {
            counter_rows
                .iter()
                .map(|(ch, vhost, counts)| {
                    metric(
                        &[("channel", ch), ("vhost", vhost)],
                        read(counts) as f64,
                        COUNTER,
                    )
                })
                .collect()
        } else {
            // The node's totals include channels that have closed: the sum never goes down.
            vec![metric(&[], read(&totals) as f64, COUNTER)]
        };
        out.add(name, help, COUNTER, metrics);
    }
    if !per_object {
        // Traffic of closed connections stays in the node's sums.
        let [recv_oct, send_oct, recv_cnt, send_cnt] = broker.connections.traffic_totals();
        connection_rows.push(Row {
            labels: Vec::new(),
            values: vec![
                recv_oct as f64,
                send_oct as f64,
                recv_cnt as f64,
                send_cnt as f64,
                0.0,
                channels_total as f64,
            ],
        });
    }
    object_families(&mut out, CONNECTION_FAMILIES, &connection_rows, per_object);

    out.gauge(
        "rabbitmq_connections",
        "Connections currently open",
        connections.len() as f64,
    );
    out.gauge(
        "rabbitmq_channels",
        "Channels currently open",
        channels_total as f64,
    );
    out.gauge(
        "rabbitmq_consumers",
        "Consumers currently connected",
        consumers_total,
    );
    out.gauge("rabbitmq_queues", "Queues available", queue_count as f64);

    // Node-wide counters.
    let amqp = [("protocol", "amqp091")];
    out.add(
        "rabbitmq_global_consumers",
        "Current number of consumers",
        GAUGE,
        vec![metric(&amqp, consumers_total, GAUGE)],
    );
    let publishers = channel_rows.len().min(
        counter_rows
            .iter()
            .filter(|(_, _, c)| c.publish > 0)
            .count(),
    );
    out.add(
        "rabbitmq_global_publishers",
        "Current number of publishers",
        GAUGE,
        vec![metric(&amqp, publishers as f64, GAUGE)],
    );
    for (name, help, read) in GLOBAL_COUNTERS {
        out.add(
            name,
            help,
            COUNTER,
            vec![metric(&amqp, read(&totals) as f64, COUNTER)],
        );
    }
    for (name, help, read) in GLOBAL_QUEUE_COUNTERS {
        let metrics = QUEUE_TYPES
            .iter()
            .map(|t| {
                let value = if *t == "rabbit_classic_queue" {
                    read(&totals)
                } else {
                    0
                };
                metric(
                    &[("protocol", "amqp091"), ("queue_type", t)],
                    value as f64,
                    COUNTER,
                )
            })
            .collect();
        out.add(name, help, COUNTER, metrics);
    }

    let mut buf = Vec::with_capacity(64 * 1024);
    TextEncoder::new().encode(&out.0, &mut buf)?;
    Ok(buf)
}
