//! Prometheus metrics with the names, types and labels of RabbitMQ's Prometheus plugin, so
//! existing dashboards and alerts work: `/metrics` sums queue, channel and connection
//! figures over the node (RabbitMQ's default), `/metrics/per-object` labels them by object,
//! and `/metrics/detailed` serves the families a scrape asks for (`family=`), its queue
//! families limited to the vhosts it names (`vhost=`), with the `rabbitmq_detailed_` names.
//! The exposition format is the `prometheus` crate's text encoder.

use super::AppState;
use super::overview::{RABBITMQ_VERSION, max_fds};
use crate::broker::stats::MessageCounts;
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{Encoder, TextEncoder};

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(aggregated))
        .route("/metrics/per-object", get(per_object))
        .route("/metrics/detailed", get(detailed))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .fallback(|| async { (StatusCode::NOT_FOUND, "Unknown Registry") })
        .layer(axum::middleware::from_fn(super::serve::drain_unread_body))
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
    if let Some(why) = state.broker.cluster_not_ready() {
        return health(StatusCode::SERVICE_UNAVAILABLE, why);
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

/// `/metrics/detailed?family=…&vhost=…`: the named families (unknown ones are ignored, as in
/// RabbitMQ); with `vhost=`, the queue families only list those vhosts' queues.
async fn detailed(State(state): State<AppState>, RawQuery(query): RawQuery) -> Response {
    let mut families = Vec::new();
    let mut vhosts = Vec::new();
    for pair in query.as_deref().unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = value.replace('+', " ");
        let value = percent_encoding::percent_decode_str(&value)
            .decode_utf8_lossy()
            .into_owned();
        match key {
            "family" => families.push(value),
            "vhost" => vhosts.push(value),
            _ => {}
        }
    }
    // Every listed queue's metrics and then the whole text are held: a few at a time.
    let permit = match state.heavy_scrape_permit().await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    encoded(
        tokio::task::spawn_blocking(move || render_detailed(&state, &families, &vhosts)).await,
        Some(permit),
    )
}

async fn scrape(state: AppState, per_object: bool) -> Response {
    // Per object, every queue's metrics and then the whole text are held: a few at a time.
    let permit = if per_object {
        match state.heavy_scrape_permit().await {
            Ok(p) => Some(p),
            Err(e) => return e.into_response(),
        }
    } else {
        None
    };
    // A walk over every queue and channel: off the async workers.
    encoded(
        tokio::task::spawn_blocking(move || render(&state, per_object)).await,
        permit,
    )
}

/// The scrape's text, with `permit` held until it has been handed over whole.
fn encoded(
    text: Result<prometheus::Result<Vec<u8>>, tokio::task::JoinError>,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Response {
    match text {
        Ok(Ok(body)) => {
            let body = axum::body::Body::new(Scraped {
                text: Some(body.into()),
                _permit: permit,
            });
            ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// A scrape's text, holding its place until the body is done.
struct Scraped {
    text: Option<axum::body::Bytes>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl http_body::Body for Scraped {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        std::task::Poll::Ready(this.text.take().map(|t| Ok(http_body::Frame::data(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.text.is_none()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.text.as_ref().map_or(0, |t| t.len() as u64))
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
    /// Adds a family; one with no samples is left out (the encoder refuses empty families),
    /// and so is one already added (two detailed families can share a metric).
    fn add(&mut self, name: &str, help: &str, kind: MetricType, metrics: Vec<Metric>) {
        if metrics.is_empty() || self.0.iter().any(|f| f.name() == name) {
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

/// The two families every endpoint starts with.
fn identity(out: &mut Families, node: &str, cluster: &str) {
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
                ("rabbitmq_cluster", cluster),
                ("rabbitmq_cluster_permanent_id", node),
            ],
            1.0,
            GAUGE,
        )],
    );
}

/// Renders every family.
pub fn render(state: &AppState, per_object: bool) -> prometheus::Result<Vec<u8>> {
    let broker = &state.broker;
    let mut out = Families::default();
    let node = broker.config.node_name.as_str();
    identity(&mut out, node, &broker.cluster_name());
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
            let c = q.message_counts();
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

// ----------------------------------------------------------------------------- /metrics/detailed

/// A queue's figures, as the detailed queue families read them.
struct QueueSample {
    lengths: crate::broker::queue::QueueLengths,
}

type QueueSpec = (
    &'static str,
    &'static str,
    MetricType,
    fn(&QueueSample) -> f64,
);

fn consumer_capacity(q: &QueueSample) -> f64 {
    if q.lengths.consumers > 0 { 1.0 } else { 0.0 }
}

/// The detailed queue families and their metrics, in RabbitMQ's order. Erlang's own figures
/// (process reductions and memory) have no counterpart and are left out.
const DETAILED_QUEUE_FAMILIES: &[(&str, &[QueueSpec])] = &[
    (
        "queue_coarse_metrics",
        &[
            (
                "rabbitmq_detailed_queue_messages_ready",
                "Messages ready to be delivered to consumers",
                GAUGE,
                |q| q.lengths.ready as f64,
            ),
            (
                "rabbitmq_detailed_queue_messages_unacked",
                "Messages delivered to consumers but not yet acknowledged",
                GAUGE,
                |q| q.lengths.unacked as f64,
            ),
            (
                "rabbitmq_detailed_queue_messages",
                "Sum of ready and unacknowledged messages - total queue depth",
                GAUGE,
                |q| (q.lengths.ready + q.lengths.unacked) as f64,
            ),
        ],
    ),
    (
        "queue_consumer_count",
        &[(
            "rabbitmq_detailed_queue_consumers",
            "Consumers on a queue",
            GAUGE,
            |q| q.lengths.consumers as f64,
        )],
    ),
    (
        "queue_metrics",
        &[
            (
                "rabbitmq_detailed_queue_consumers",
                "Consumers on a queue",
                GAUGE,
                |q| q.lengths.consumers as f64,
            ),
            (
                "rabbitmq_detailed_queue_consumer_capacity",
                "Consumer capacity",
                GAUGE,
                consumer_capacity,
            ),
            (
                "rabbitmq_detailed_queue_consumer_utilisation",
                "Same as consumer capacity",
                GAUGE,
                consumer_capacity,
            ),
            (
                "rabbitmq_detailed_queue_messages_ram",
                "Ready and unacknowledged messages stored in memory",
                GAUGE,
                |q| q.lengths.in_memory as f64,
            ),
            (
                "rabbitmq_detailed_queue_messages_ready_ram",
                "Ready messages stored in memory",
                GAUGE,
                |q| q.lengths.in_memory as f64,
            ),
            (
                "rabbitmq_detailed_queue_messages_bytes",
                "Size in bytes of ready and unacknowledged messages",
                GAUGE,
                |q| (q.lengths.ready_bytes + q.lengths.unacked_bytes) as f64,
            ),
            (
                "rabbitmq_detailed_queue_messages_ready_bytes",
                "Size in bytes of ready messages",
                GAUGE,
                |q| q.lengths.ready_bytes as f64,
            ),
            (
                "rabbitmq_detailed_queue_messages_unacked_bytes",
                "Size in bytes of all unacknowledged messages",
                GAUGE,
                |q| q.lengths.unacked_bytes as f64,
            ),
            (
                "rabbitmq_detailed_queue_messages_paged_out",
                "Messages paged out to disk",
                GAUGE,
                |q| q.lengths.ready.saturating_sub(q.lengths.in_memory) as f64,
            ),
        ],
    ),
];

/// `rabbitmq_detailed_` + a name of the aggregated endpoint.
fn detailed_name(name: &str) -> String {
    format!(
        "rabbitmq_detailed_{}",
        name.strip_prefix("rabbitmq_").unwrap_or(name)
    )
}

/// Renders the families `families` names; `vhosts`, if not empty, limits the queue families.
pub fn render_detailed(
    state: &AppState,
    families: &[String],
    vhosts: &[String],
) -> prometheus::Result<Vec<u8>> {
    let broker = &state.broker;
    let mut out = Families::default();
    identity(
        &mut out,
        broker.config.node_name.as_str(),
        &broker.cluster_name(),
    );
    let wants = |family: &str| families.iter().any(|f| f == family);

    if wants("connection_churn_metrics") {
        let churn = broker.churn.read();
        for (name, help, value) in [
            (
                "connections_opened_total",
                "Total number of connections opened",
                churn.connection_created,
            ),
            (
                "connections_closed_total",
                "Total number of connections closed or terminated",
                churn.connection_closed,
            ),
            (
                "channels_opened_total",
                "Total number of channels opened",
                churn.channel_created,
            ),
            (
                "channels_closed_total",
                "Total number of channels closed",
                churn.channel_closed,
            ),
            (
                "queues_declared_total",
                "Total number of queues declared",
                churn.queue_declared,
            ),
            (
                "queues_created_total",
                "Total number of queues created",
                churn.queue_created,
            ),
            (
                "queues_deleted_total",
                "Total number of queues deleted",
                churn.queue_deleted,
            ),
        ] {
            out.counter(&format!("rabbitmq_detailed_{name}"), help, value);
        }
    }
    if wants("node_coarse_metrics") {
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        let readings = broker.alarms.readings();
        out.gauge(
            "rabbitmq_detailed_process_open_fds",
            "Open file descriptors",
            fds as f64,
        );
        out.gauge(
            "rabbitmq_detailed_process_open_tcp_sockets",
            "Open TCP sockets",
            broker.connections.list().len() as f64,
        );
        out.gauge(
            "rabbitmq_detailed_process_resident_memory_bytes",
            "Memory used in bytes",
            crate::alarms::resident_memory() as f64,
        );
        out.gauge(
            "rabbitmq_detailed_disk_space_available_bytes",
            "Disk space available in bytes",
            crate::alarms::free_disk(&broker.config.data_dir).unwrap_or(readings.disk_free) as f64,
        );
    }
    if wants("node_metrics") {
        let readings = broker.alarms.readings();
        out.gauge(
            "rabbitmq_detailed_process_max_fds",
            "Open file descriptors limit",
            max_fds() as f64,
        );
        out.gauge(
            "rabbitmq_detailed_process_max_tcp_sockets",
            "Open TCP sockets limit",
            max_fds() as f64,
        );
        out.gauge(
            "rabbitmq_detailed_resident_memory_limit_bytes",
            "Memory high watermark in bytes",
            readings.memory_limit as f64,
        );
        out.gauge(
            "rabbitmq_detailed_disk_space_available_limit_bytes",
            "Free disk space low watermark in bytes",
            readings.disk_free_limit as f64,
        );
        out.gauge(
            "rabbitmq_detailed_erlang_uptime_seconds",
            "Node uptime",
            broker.started.elapsed().map_or(0.0, |d| d.as_secs_f64()),
        );
    }

    let queue_families: Vec<&[QueueSpec]> = DETAILED_QUEUE_FAMILIES
        .iter()
        .filter(|(family, _)| wants(family))
        .map(|(_, specs)| *specs)
        .collect();
    if !queue_families.is_empty() {
        let mut samples = Vec::new();
        for v in broker.vhosts() {
            if !vhosts.is_empty() && !vhosts.iter().any(|n| *n == *v.name) {
                continue;
            }
            for q in v.queues() {
                samples.push((
                    v.name.to_string(),
                    q.name().to_owned(),
                    QueueSample {
                        lengths: q.lengths(),
                    },
                ));
            }
        }
        for specs in queue_families {
            for (name, help, kind, read) in specs {
                let metrics = samples
                    .iter()
                    .map(|(vhost, queue, sample)| {
                        metric(&[("vhost", vhost), ("queue", queue)], read(sample), *kind)
                    })
                    .collect();
                out.add(name, help, *kind, metrics);
            }
        }
    }

    let (want_channels, want_coarse, want_connections) = (
        wants("channel_metrics"),
        wants("connection_coarse_metrics"),
        wants("connection_metrics"),
    );
    if want_channels || want_coarse || want_connections {
        let mut channel_rows = Vec::new();
        let mut coarse_rows = Vec::new();
        let mut connection_rows = Vec::new();
        for c in broker.connections.list() {
            let chans = c.channels();
            let [recv_oct, send_oct, recv_cnt, send_cnt] = c.traffic.read();
            coarse_rows.push(Row {
                labels: vec![("channel", c.name())],
                values: vec![recv_oct as f64, send_oct as f64],
            });
            connection_rows.push(Row {
                labels: vec![("channel", c.name())],
                values: vec![recv_cnt as f64, send_cnt as f64, 0.0, chans.len() as f64],
            });
            if want_channels {
                for ch in chans {
                    let s = ch.snapshot();
                    let consumer_prefetch: u32 = s.consumers.iter().map(|k| k.prefetch_count).sum();
                    channel_rows.push(Row {
                        labels: vec![("channel", format!("{} ({})", c.name(), s.number))],
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
                }
            }
        }
        let detailed = |specs: &[(&str, &'static str, MetricType)]| -> Vec<(String, &'static str, MetricType)> {
            specs.iter().map(|(n, h, k)| (detailed_name(n), *h, *k)).collect()
        };
        if want_channels {
            let specs = detailed(CHANNEL_GAUGES);
            let specs: Vec<(&str, &str, MetricType)> =
                specs.iter().map(|(n, h, k)| (n.as_str(), *h, *k)).collect();
            object_families(&mut out, &specs, &channel_rows, true);
        }
        if want_coarse {
            let specs = detailed(&CONNECTION_FAMILIES[..2]);
            let specs: Vec<(&str, &str, MetricType)> =
                specs.iter().map(|(n, h, k)| (n.as_str(), *h, *k)).collect();
            object_families(&mut out, &specs, &coarse_rows, true);
        }
        if want_connections {
            let specs = detailed(&CONNECTION_FAMILIES[2..]);
            let specs: Vec<(&str, &str, MetricType)> =
                specs.iter().map(|(n, h, k)| (n.as_str(), *h, *k)).collect();
            object_families(&mut out, &specs, &connection_rows, true);
        }
    }

    if wants("vhost_status") {
        let metrics = broker
            .vhosts()
            .iter()
            .map(|v| metric(&[("vhost", &*v.name)], 1.0, GAUGE))
            .collect();
        out.add(
            "rabbitmq_cluster_vhost_status",
            "Whether a given vhost is running",
            GAUGE,
            metrics,
        );
    }
    let (want_bindings, want_names) = (wants("exchange_bindings"), wants("exchange_names"));
    if want_bindings || want_names {
        let mut bindings = Vec::new();
        let mut names = Vec::new();
        for v in broker.vhosts() {
            for x in v.exchanges() {
                // As RabbitMQ: the default exchange and the internal trace exchange are not listed.
                if x.name().is_empty() || x.name().starts_with("amq.rabbitmq.") {
                    continue;
                }
                let labels = [
                    ("vhost", &*v.name),
                    ("exchange", x.name()),
                    ("type", x.spec.kind.as_str()),
                ];
                if want_bindings {
                    bindings.push(metric(&labels, x.binding_count() as f64, GAUGE));
                }
                if want_names {
                    names.push(metric(&labels, 1.0, GAUGE));
                }
            }
        }
        out.add(
            "rabbitmq_cluster_exchange_bindings",
            "Number of bindings for an exchange. This value is cluster-wide.",
            GAUGE,
            bindings,
        );
        out.add(
            "rabbitmq_cluster_exchange_name",
            "Enumerates exchanges without any additional info. This value is cluster-wide. A cheaper alternative to `exchange_bindings`",
            GAUGE,
            names,
        );
    }

    let mut buf = Vec::with_capacity(16 * 1024);
    TextEncoder::new().encode(&out.0, &mut buf)?;
    Ok(buf)
}
