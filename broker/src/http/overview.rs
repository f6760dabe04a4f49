//! `/api/overview`, `/api/whoami`, `/api/nodes`: the node as a whole.

use super::AppState;
use super::auth::Caller;
use super::body::Fields;
use super::error::{ApiError, ApiResult, no_content, ok};
use super::list::{Query, columns};
use super::sampler::{Key, LENGTHS, NODE_STATS, node_reading};
use crate::broker::queue_ref::QueueRef;
use axum::body::Bytes;
use axum::extract::{Path, Query as QueryParams, State};
use axum::response::Response;
use serde_json::{Map, Value, json};

pub use crate::store::document::RABBITMQ_VERSION;

pub fn exchange_types() -> Value {
    json!([
        {"name": "direct", "description": "AMQP direct exchange, as per the AMQP specification", "enabled": true},
        {"name": "fanout", "description": "AMQP fanout exchange, as per the AMQP specification", "enabled": true},
        {"name": "headers", "description": "AMQP headers exchange, as per the AMQP specification", "enabled": true},
        {"name": "topic", "description": "AMQP topic exchange, as per the AMQP specification", "enabled": true},
        {"name": "x-delayed-message", "description": "Delayed Message Exchange.", "enabled": true},
    ])
}

fn listeners(state: &AppState) -> Value {
    let node = &state.broker.config.node_name;
    Value::Array(
        state
            .listeners
            .iter()
            .map(|l| {
                json!({
                    "node": node,
                    "protocol": l.protocol,
                    "ip_address": l.addr.ip().to_string(),
                    "port": l.addr.port(),
                    "socket_opts": {},
                })
            })
            .collect(),
    )
}

/// The churn figures `/api/overview` shows.
const CHURN: &[&str] = &[
    "channel_closed",
    "channel_created",
    "connection_closed",
    "connection_created",
    "queue_created",
    "queue_declared",
    "queue_deleted",
];

/// What this node adds to the cluster's totals in `/api/overview`: what it alone holds (by
/// vhost: its non-durable and exclusive queues and transient exchanges, the consumers and
/// messages of the queues whose home it is; its client connections), and its rates.
pub(super) fn own_totals(state: &AppState) -> Value {
    let broker = &state.broker;
    let reading = node_reading(broker);
    let s = &state.sampler;
    let mut vhosts = Map::new();
    for v in broker.vhosts() {
        let (mut queues, mut consumers) = (0u64, 0u64);
        for q in v.queues() {
            if let QueueRef::Local(_) = q {
                consumers += u64::from(q.consumer_count());
                if !q.durable() || q.owner().is_some() {
                    queues += 1;
                }
            }
        }
        let exchanges = v.exchanges().iter().filter(|x| !x.spec.durable).count();
        vhosts.insert(
            v.name.to_string(),
            json!({"queues": queues, "exchanges": exchanges, "consumers": consumers}),
        );
    }
    // Connections and their channels by user (what decides who may see them).
    let mut by_user: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for c in broker.connections.list() {
        let (connections, channels) = by_user.entry(c.user.clone()).or_default();
        *connections += 1;
        *channels += c.channel_count() as u64;
    }
    let connections: Map<String, Value> = by_user
        .into_iter()
        .map(|(user, (n, ch))| (user, json!({"connections": n, "channels": ch})))
        .collect();
    let (mut queue_totals, mut churn) = (Map::new(), Map::new());
    s.put(&mut queue_totals, &Key::Node, &reading, LENGTHS);
    s.put(&mut churn, &Key::Node, &reading, CHURN);
    json!({
        "vhosts": vhosts,
        "connections": connections,
        "queue_totals": queue_totals,
        "message_stats": s.message_stats(&Key::Node, &reading, NODE_STATS),
        "churn_rates": churn,
    })
}

/// Adds `from`'s numbers to `into`'s, key by key (nested objects too: counts and their
/// `_details` rates); what `into` lacks is copied.
fn add_figures(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => add_figures(a, b),
            (Some(Value::Number(a)), Value::Number(b)) => {
                *a = match (a.as_u64(), b.as_u64()) {
                    (Some(x), Some(y)) => x.saturating_add(y).into(),
                    _ => serde_json::Number::from_f64(
                        a.as_f64().unwrap_or(0.0) + b.as_f64().unwrap_or(0.0),
                    )
                    .unwrap_or_else(|| 0.into()),
                };
            }
            (None, _) => {
                into.insert(k.clone(), v.clone());
            }
            _ => {}
        }
    }
}

/// The cluster's totals as `caller` may see them, from every node's [`own_totals`]: the
/// objects of the vhosts it sees and the connections it may see, the figures of every node.
fn cluster_totals(state: &AppState, caller: &Caller, parts: &[Value]) -> Value {
    let sees = |v: &str| caller.sees_vhost(state, v);
    // What every node holds alike: durable queues and exchanges, from the cluster's log.
    let (mut queues, mut exchanges, mut consumers) = (0u64, 0u64, 0u64);
    for v in state.broker.vhosts().iter().filter(|v| sees(&v.name)) {
        let queues_here = v.queues();
        queues += queues_here
            .iter()
            .filter(|q| q.durable() && q.owner().is_none())
            .count() as u64;
        exchanges += v.exchanges().iter().filter(|x| x.spec.durable).count() as u64;
    }
    let (mut connections, mut channels) = (0u64, 0u64);
    let mut figures = Map::new();
    for part in parts {
        let count = |o: &Value, key: &str| o[key].as_u64().unwrap_or(0);
        if let Some(vhosts) = part["vhosts"].as_object() {
            for (_, o) in vhosts.iter().filter(|(name, _)| sees(name)) {
                queues += count(o, "queues");
                exchanges += count(o, "exchanges");
                consumers += count(o, "consumers");
            }
        }
        if let Some(by_user) = part["connections"].as_object() {
            for (_, c) in by_user
                .iter()
                .filter(|(user, _)| caller.sees_connection(user))
            {
                connections += count(c, "connections");
                channels += count(c, "channels");
            }
        }
        for key in ["queue_totals", "message_stats", "churn_rates"] {
            let mine = figures
                .entry(key)
                .or_insert_with(|| Value::Object(Map::new()));
            if let (Value::Object(into), Some(from)) = (mine, part[key].as_object()) {
                add_figures(into, from);
            }
        }
    }
    figures.insert(
        "object_totals".into(),
        json!({
            "channels": channels,
            "connections": connections,
            "consumers": consumers,
            "exchanges": exchanges,
            "queues": queues,
        }),
    );
    Value::Object(figures)
}

/// `/api/overview`: the cluster's totals, whichever node answers (a node that does not
/// answer in time is left out of them).
pub async fn overview(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    let broker = &state.broker;
    let mut parts = vec![own_totals(&state)];
    parts.extend(super::gather::from_peers(&state, super::gather::Kind::Totals, None).await);
    let totals = cluster_totals(&state, &caller, &parts);
    let body = json!({
        "management_version": RABBITMQ_VERSION,
        "rates_mode": "basic",
        "sample_retention_policies": {"global": [600, 3600, 28800, 86400], "basic": [600, 3600], "detailed": [600]},
        "exchange_types": exchange_types(),
        "product_version": env!("CARGO_PKG_VERSION"),
        "product_name": "Warren",
        "rabbitmq_version": RABBITMQ_VERSION,
        "cluster_name": broker.cluster_name(),
        // Warren's own: the Raft group that holds the cluster's definitions, as this node
        // sees it (null for a broker that keeps nothing on disk).
        "cluster_metadata": broker.metadata.as_ref().map(|m| {
            let s = m.status();
            json!({
                "leader": s.leader,
                "voters": s.voters,
                "learners": s.learners,
                "role": s.role,
                "term": s.term,
                "applied_index": s.applied,
            })
        }),
        "erlang_version": "n/a",
        "erlang_full_version": "n/a",
        "release_series_support_status": "supported",
        "disable_stats": false,
        "enable_queue_totals": false,
        "message_stats": totals["message_stats"],
        "churn_rates": totals["churn_rates"],
        "queue_totals": totals["queue_totals"],
        "object_totals": totals["object_totals"],
        "statistics_db_event_queue": 0,
        "node": broker.config.node_name,
        "listeners": listeners(&state),
        "contexts": [],
    });
    Ok(ok(columns(body, &query)))
}

pub async fn cluster_name(State(state): State<AppState>, _caller: Caller) -> Response {
    ok(json!({"name": state.broker.cluster_name()}))
}

/// `/api/global-parameters`: the cluster name, when one was set, as RabbitMQ lists it.
pub async fn global_parameters(State(state): State<AppState>, _caller: Caller) -> Response {
    let name = state.broker.cluster_name_if_set();
    ok(json!(Vec::from_iter(
        name.map(|n| json!({"name": "cluster_name", "value": n}))
    )))
}

/// Renames the cluster (administrators only), as RabbitMQ: `{"name": …}`, 204 No Content.
pub async fn put_cluster_name(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let f = Fields::from_body(&body, &["name"])?;
    f.require(&["name"])?;
    let name = f
        .string("name")?
        .ok_or_else(|| ApiError::bad_request("name must be a string"))?;
    state
        .broker
        .set_cluster_name(&name)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(no_content())
}

pub async fn whoami(_state: State<AppState>, caller: Caller) -> Response {
    ok(json!({"name": caller.user.name, "tags": caller.user.tags}))
}

pub async fn extensions(_state: State<AppState>, _caller: Caller) -> Response {
    ok(json!([]))
}

/// Lists Warren has no objects for (parameters, feature flags): always empty.
pub async fn empty_list(_state: State<AppState>, _caller: Caller) -> Response {
    ok(json!([]))
}

fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

pub fn max_fds() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

pub(super) fn node_object(state: &AppState) -> Value {
    let broker = &state.broker;
    let r = broker.alarms.readings();
    let alarms = broker.alarms.state();
    let uptime = broker.started.elapsed().map_or(0, |d| d.as_millis() as u64);
    let sockets = broker.connections.count();
    json!({
        "name": broker.config.node_name,
        "type": "disc",
        "running": true,
        "being_drained": broker.draining.load(std::sync::atomic::Ordering::SeqCst),
        "os_pid": std::process::id().to_string(),
        "uptime": uptime,
        "processors": std::thread::available_parallelism().map_or(1, |n| n.get()),
        "mem_used": r.memory_used,
        "mem_limit": r.memory_limit,
        "mem_alarm": alarms.memory,
        "disk_free": r.disk_free,
        "disk_free_limit": r.disk_free_limit,
        "disk_free_alarm": alarms.disk,
        "fd_used": open_fds(),
        "fd_total": max_fds(),
        "sockets_used": sockets,
        "sockets_total": max_fds(),
        "proc_used": 0,
        "proc_total": 0,
        "run_queue": 0,
        "rates_mode": "basic",
        // The members it cannot reach while it is cut off from the majority (a minority).
        "partitions": broker
            .metadata
            .as_ref()
            .filter(|m| !m.majority_reachable())
            .map(|m| m.unreachable_voters())
            .unwrap_or_default(),
        // The OTP applications RabbitMQ lists; clients read the node's version from `rabbit`'s.
        "applications": [
            {"name": "rabbit", "description": "RabbitMQ", "version": RABBITMQ_VERSION},
            {"name": "rabbitmq_management", "description": "RabbitMQ Management Console", "version": RABBITMQ_VERSION},
            {"name": "rabbitmq_prometheus", "description": "Prometheus metrics for RabbitMQ", "version": RABBITMQ_VERSION},
        ],
        // What Warren serves of RabbitMQ's plugins: this API and the Prometheus endpoint.
        "enabled_plugins": ["rabbitmq_management", "rabbitmq_prometheus"],
        "contexts": [],
        "exchange_types": exchange_types(),
        "listeners": listeners(state),
    })
}

pub async fn nodes(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    caller.require_monitor()?;
    // Each running node reports its own figures.
    let reported = super::gather::from_peers(&state, super::gather::Kind::Node, None).await;
    let nodes = members(&state)
        .into_iter()
        .map(|n| {
            if n.name == state.broker.config.node_name {
                node_object(&state)
            } else {
                reported
                    .iter()
                    .find(|o| o["name"] == n.name.as_str())
                    .filter(|_| n.running)
                    .cloned()
                    .unwrap_or_else(|| peer_object(&n))
            }
        })
        .collect();
    super::list::respond(nodes, &query)
}

/// The cluster's nodes as RabbitMQ lists them: the members of the cluster's metadata group
/// (running or not) and the nodes linked with this one (a node joining); a node that left the
/// group and is gone is not listed. Without a metadata group, every node ever linked.
fn members(state: &AppState) -> Vec<crate::cluster::NodeStatus> {
    let mut nodes = state.cluster.nodes();
    let Some(group) = state.broker.metadata.as_ref().map(|m| m.status()) else {
        return nodes;
    };
    let member = |name: &str| {
        group
            .voters
            .iter()
            .chain(&group.learners)
            .any(|m| m == name)
    };
    nodes.retain(|n| n.running || member(&n.name));
    for name in group.voters.iter().chain(&group.learners) {
        if !nodes.iter().any(|n| &n.name == name) {
            nodes.push(crate::cluster::NodeStatus {
                name: name.clone(),
                running: false,
                address: None,
            });
        }
    }
    nodes
}

pub async fn node(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.require_monitor()?;
    if name == state.broker.config.node_name {
        return Ok(ok(node_object(&state)));
    }
    let peer = members(&state)
        .into_iter()
        .find(|n| n.name == name)
        .ok_or_else(ApiError::not_found)?;
    if peer.running {
        let reported = super::gather::from_peers(&state, super::gather::Kind::Node, None).await;
        if let Some(o) = reported.into_iter().find(|o| o["name"] == name.as_str()) {
            return Ok(ok(o));
        }
    }
    Ok(ok(peer_object(&peer)))
}

/// Another node of the cluster that did not report its own figures (it is down, or did not
/// answer in time), as far as this node knows it: its name and whether its link is up. The
/// other fields are there, zero, so that clients decoding RabbitMQ's node objects read these
/// too.
fn peer_object(node: &crate::cluster::NodeStatus) -> Value {
    json!({
        "name": node.name,
        "type": "disc",
        "running": node.running,
        "being_drained": false,
        "os_pid": "",
        "uptime": 0,
        "processors": 0,
        "mem_used": 0,
        "mem_limit": 0,
        "mem_alarm": false,
        "disk_free": 0,
        "disk_free_limit": 0,
        "disk_free_alarm": false,
        "fd_used": 0,
        "fd_total": 0,
        "sockets_used": 0,
        "sockets_total": 0,
        "proc_used": 0,
        "proc_total": 0,
        "run_queue": 0,
        "rates_mode": "basic",
        "partitions": [],
        "applications": [
            {"name": "rabbit", "description": "RabbitMQ", "version": RABBITMQ_VERSION},
        ],
        "enabled_plugins": ["rabbitmq_management", "rabbitmq_prometheus"],
        "contexts": [],
        "exchange_types": exchange_types(),
        "listeners": [],
        "cluster_links": [],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_nodes_add_up_counts_and_rates_alike() {
        let mut total = json!({"publish": 3, "publish_details": {"rate": 1.5}})
            .as_object()
            .cloned()
            .unwrap();
        let other = json!({"publish": 4, "publish_details": {"rate": 0.25}, "ack": 2});
        add_figures(&mut total, other.as_object().unwrap());
        assert_eq!(
            Value::Object(total),
            json!({"publish": 7, "publish_details": {"rate": 1.75}, "ack": 2})
        );
    }
}
