//! `/api/connections`, `/api/channels`, `/api/consumers`: who is connected and what their
//! channels are doing. Monitors see everyone; other users see their own.

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiResult, no_content, ok};
use super::gather::{Kind, from_peers};
use super::list::{Query, respond};
use super::sampler::{CONSUMER_STATS, Key, PUBLISHER_STATS, counts_reading};
use crate::broker::connections::{ChannelSnapshot, ConnectionInfo};
use crate::store::field_json::table_to_json;
use amq_protocol::types::AMQPValue;
use axum::extract::{Path, Query as QueryParams, State};
use axum::http::HeaderMap;
use axum::response::Response;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::Ordering;

fn visible_connections(state: &AppState, caller: &Caller) -> Vec<Arc<ConnectionInfo>> {
    state
        .broker
        .connections
        .list()
        .into_iter()
        .filter(|c| caller.sees_connection(&c.user))
        .collect()
}

pub fn connection_object(state: &AppState, c: &ConnectionInfo, detailed: bool) -> Value {
    let key = Key::Connection(c.id);
    let t = &c.traffic;
    let reading = vec![
        ("recv_oct", t.recv_oct.load(Ordering::Relaxed)),
        ("send_oct", t.send_oct.load(Ordering::Relaxed)),
    ];
    // Lists show absent TLS details as null, the single view as "" (as RabbitMQ does).
    let none = if detailed { json!("") } else { Value::Null };
    let (ssl_protocol, ssl_cipher) = match &c.tls {
        Some((p, s)) => (json!(p), json!(s)),
        None => (none.clone(), none.clone()),
    };
    let mut obj = Map::new();
    obj.insert("auth_mechanism".into(), json!(c.auth_mechanism));
    obj.insert("channel_max".into(), json!(c.channel_max));
    obj.insert("channels".into(), json!(c.channel_count()));
    obj.insert(
        "client_properties".into(),
        table_to_json(&c.client_properties),
    );
    obj.insert("connected_at".into(), json!(c.connected_at));
    obj.insert("frame_max".into(), json!(c.frame_max));
    obj.insert("host".into(), json!(c.local.ip().to_string()));
    obj.insert("name".into(), json!(c.name()));
    obj.insert("node".into(), json!(state.broker.config.node_name));
    obj.insert("peer_cert_issuer".into(), none.clone());
    obj.insert("peer_cert_subject".into(), none.clone());
    obj.insert("peer_cert_validity".into(), none.clone());
    obj.insert("peer_host".into(), json!(c.peer.ip().to_string()));
    obj.insert("peer_port".into(), json!(c.peer.port()));
    obj.insert("port".into(), json!(c.local.port()));
    obj.insert("protocol".into(), json!("AMQP 0-9-1"));
    obj.insert("recv_cnt".into(), json!(t.recv_cnt.load(Ordering::Relaxed)));
    obj.insert("send_cnt".into(), json!(t.send_cnt.load(Ordering::Relaxed)));
    obj.insert("send_pend".into(), json!(0));
    obj.insert("ssl".into(), json!(c.tls.is_some()));
    obj.insert("ssl_cipher".into(), ssl_cipher);
    obj.insert("ssl_hash".into(), none.clone());
    obj.insert("ssl_key_exchange".into(), none);
    obj.insert("ssl_protocol".into(), ssl_protocol);
    obj.insert("state".into(), json!(c.state().name()));
    obj.insert("timeout".into(), json!(c.heartbeat));
    obj.insert("type".into(), json!("network"));
    obj.insert("user".into(), json!(c.user));
    obj.insert("user_who_performed_action".into(), json!(c.user));
    obj.insert("vhost".into(), json!(c.vhost));
    if let Some(AMQPValue::LongString(n)) = c.client_properties.inner().get("connection_name") {
        obj.insert(
            "user_provided_name".into(),
            json!(String::from_utf8_lossy(n.as_bytes())),
        );
    }
    state
        .sampler
        .put(&mut obj, &key, &reading, &["recv_oct", "send_oct"]);
    Value::Object(obj)
}

fn channel_name(c: &ConnectionInfo, number: u16) -> String {
    format!("{} ({number})", c.name())
}

fn channel_details(state: &AppState, c: &ConnectionInfo, number: u16) -> Value {
    json!({
        "connection_name": c.name(),
        "name": channel_name(c, number),
        "node": state.broker.config.node_name,
        "number": number,
        "peer_host": c.peer.ip().to_string(),
        "peer_port": c.peer.port(),
        "user": c.user,
    })
}

fn consumer_object(state: &AppState, c: &ConnectionInfo, s: &ChannelSnapshot, i: usize) -> Value {
    let k = &s.consumers[i];
    // A single-active-consumer queue: one consumer is active, the others wait.
    let queue = state.broker.vhost(&c.vhost).and_then(|v| v.queue(&k.queue));
    // The timeout this consumer's deliveries are held to (RabbitMQ 3.13+ lists it, and
    // rabbitmqadmin v2 requires it): the queue's `x-consumer-timeout`, else the node's; 0 is none.
    let consumer_timeout = queue
        .as_ref()
        .and_then(|q| q.consumer_timeout())
        .unwrap_or(state.broker.config.consumer_timeout);
    let (active, status) = match queue.filter(|q| q.is_single_active_consumer()) {
        Some(q) => match q.single_active_consumer() {
            Some(a) if *a.tag == *k.tag => (true, "single_active"),
            _ => (false, "waiting"),
        },
        None => (true, "up"),
    };
    json!({
        "arguments": table_to_json(&k.arguments),
        "ack_required": k.ack_required,
        "active": active,
        "activity_status": status,
        "channel_details": channel_details(state, c, s.number),
        "consumer_tag": k.tag,
        "consumer_timeout": consumer_timeout,
        "exclusive": k.exclusive,
        "prefetch_count": k.prefetch_count,
        "queue": {"name": k.queue, "vhost": c.vhost},
    })
}

fn channel_object(
    state: &AppState,
    c: &ConnectionInfo,
    s: &ChannelSnapshot,
    detailed: bool,
) -> Value {
    let key = Key::Channel(c.id, s.number);
    let reading = counts_reading(&s.counts);
    let mut stats = state.sampler.message_stats(&key, &reading, PUBLISHER_STATS);
    if let (Value::Object(all), Value::Object(consumed)) = (
        &mut stats,
        state.sampler.message_stats(&key, &reading, CONSUMER_STATS),
    ) {
        all.extend(consumed);
    }
    let mut obj = json!({
        "acks_uncommitted": s.acks_uncommitted,
        "confirm": s.confirm,
        "connection_details": {
            "name": c.name(),
            "peer_host": c.peer.ip().to_string(),
            "peer_port": c.peer.port(),
        },
        "consumer_count": s.consumers.len(),
        "global_prefetch_count": s.global_prefetch_count,
        "message_stats": stats,
        "messages_unacknowledged": s.messages_unacknowledged,
        "messages_uncommitted": s.messages_uncommitted,
        "messages_unconfirmed": s.messages_unconfirmed,
        "name": channel_name(c, s.number),
        "node": state.broker.config.node_name,
        "number": s.number,
        "pending_raft_commands": 0,
        "prefetch_count": s.prefetch_count,
        "state": "running",
        "transactional": s.transactional,
        "user": c.user,
        "user_who_performed_action": c.user,
        "vhost": c.vhost,
    });
    if detailed {
        let consumers: Vec<Value> = (0..s.consumers.len())
            .map(|i| consumer_object(state, c, s, i))
            .collect();
        obj["consumer_details"] = Value::Array(consumers);
        obj["deliveries"] = json!([]);
        obj["publishes"] = json!([]);
    }
    obj
}

/// Every consumer the state knows of, optionally in one vhost.
pub fn consumer_objects(state: &AppState, vhost: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    for c in state.broker.connections.list() {
        if vhost.is_some_and(|v| v != c.vhost) {
            continue;
        }
        for ch in c.channels() {
            let s = ch.snapshot();
            out.extend((0..s.consumers.len()).map(|i| consumer_object(state, &c, &s, i)));
        }
    }
    out
}

pub async fn connections(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    let mut items: Vec<Value> = visible_connections(&state, &caller)
        .iter()
        .map(|c| connection_object(&state, c, false))
        .collect();
    items.extend(visible(
        &caller,
        from_peers(&state, Kind::Connections, None).await,
    ));
    respond(items, &query)
}

/// Of the objects other nodes listed, those `caller` sees (its own, or all for a monitor).
fn visible(caller: &Caller, items: Vec<Value>) -> Vec<Value> {
    items
        .into_iter()
        .filter(|o| caller.sees_connection(o["user"].as_str().unwrap_or_default()))
        .collect()
}

pub async fn vhost_connections(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    caller.require_vhost(&state, &vhost)?;
    let mut items: Vec<Value> = visible_connections(&state, &caller)
        .iter()
        .filter(|c| c.vhost == vhost)
        .map(|c| connection_object(&state, c, false))
        .collect();
    items.extend(visible(
        &caller,
        from_peers(&state, Kind::Connections, Some(&vhost)).await,
    ));
    respond(items, &query)
}

fn find_connection(
    state: &AppState,
    caller: &Caller,
    name: &str,
) -> ApiResult<Arc<ConnectionInfo>> {
    let c = state
        .broker
        .connections
        .by_name(name)
        .ok_or_else(ApiError::not_found)?;
    if !caller.sees_connection(&c.user) {
        return Err(ApiError::not_authorised(
            "User not authorised to access object",
        ));
    }
    Ok(c)
}

pub async fn show_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let c = find_connection(&state, &caller, &name)?;
    Ok(ok(connection_object(&state, &c, true)))
}

pub async fn close_connection(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let c = find_connection(&state, &caller, &name)?;
    if !caller.is_admin() && c.user != caller.name() {
        return Err(ApiError::not_authorised(
            "User not authorised to access object",
        ));
    }
    let reason = headers
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .filter(|r| !r.is_empty())
        .unwrap_or("Closed via management plugin");
    c.force_close(reason);
    Ok(no_content())
}

/// RabbitMQ's reason when maintenance mode closes client connections.
pub const DRAIN_REASON: &str = "Node was put into maintenance mode";

/// `POST /api/warren/drain` (administrators; Warren's own, as RabbitMQ drains only from its
/// CLI): maintenance mode. New clients are refused, readiness fails, every client connection
/// is closed with 320 and RabbitMQ's reason, and the node leaves the cluster's metadata group
/// (joining it again when it restarts), so that the others keep a majority without it. Once
/// the clients are gone (or after 10 s) it answers `{"closed": n, "remaining": m}`:
/// connections closed, and any still open.
/// Run before a broker stops (the StatefulSet's preStop) so clients move elsewhere first.
pub async fn drain(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    if !caller.is_admin() {
        return Err(ApiError::not_authorised("Not administrator user"));
    }
    let broker = &state.broker;
    broker
        .draining
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let clients = broker.connections.list();
    tracing::info!(
        user = caller.name(),
        connections = clients.len(),
        "maintenance mode: closing client connections"
    );
    for c in &clients {
        c.force_close(DRAIN_REASON);
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while broker.connections.count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Out of the cluster's metadata group while it is gone, so that the others keep their
    // majority (it joins again when it comes back).
    if let Some(m) = &broker.metadata
        && let Err(e) = m.leave().await
    {
        tracing::warn!(error = %e, "maintenance mode: cannot leave the cluster's metadata group");
    }
    // What `warren-broker drain` reports: the clients told to leave, and any still here.
    let remaining = broker.connections.count();
    let closed = clients.len().saturating_sub(remaining);
    Ok(ok(json!({"closed": closed, "remaining": remaining})))
}

/// `DELETE /api/warren/drain`: leaves maintenance mode (RabbitMQ's `revive`).
pub async fn revive(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    if !caller.is_admin() {
        return Err(ApiError::not_authorised("Not administrator user"));
    }
    state
        .broker
        .draining
        .store(false, std::sync::atomic::Ordering::SeqCst);
    tracing::info!("maintenance mode: off");
    Ok(no_content())
}

/// `GET /api/connections/username/{user}`: a user's connections, in RabbitMQ's short form.
pub async fn user_connections(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult<Response> {
    if !caller.sees_connection(&user) {
        return Err(ApiError::not_authorised(
            "User not authorised to access object",
        ));
    }
    let node = &state.broker.config.node_name;
    let items: Vec<Value> = state
        .broker
        .connections
        .list()
        .iter()
        .filter(|c| c.user == user)
        .map(|c| json!({"name": c.name(), "vhost": c.vhost, "user": c.user, "node": node}))
        .collect();
    Ok(ok(Value::Array(items)))
}

/// `DELETE /api/connections/username/{user}`: closes every connection of the user, with the
/// `X-Reason` header as the reason, as closing one does.
pub async fn close_user_connections(
    State(state): State<AppState>,
    caller: Caller,
    Path(user): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if !caller.is_admin() && user != caller.name() {
        return Err(ApiError::not_authorised(
            "User not authorised to access object",
        ));
    }
    let reason = headers
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .filter(|r| !r.is_empty())
        .unwrap_or("Closed via management plugin");
    for c in state.broker.connections.list() {
        if c.user == user {
            c.force_close(reason);
        }
    }
    Ok(no_content())
}

pub fn channel_items_of(state: &AppState, conns: &[Arc<ConnectionInfo>]) -> Vec<Value> {
    let mut items = Vec::new();
    for c in conns {
        for ch in c.channels() {
            items.push(channel_object(state, c, &ch.snapshot(), false));
        }
    }
    items
}

pub async fn channels(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    let conns = visible_connections(&state, &caller);
    let mut items = channel_items_of(&state, &conns);
    items.extend(visible(
        &caller,
        from_peers(&state, Kind::Channels, None).await,
    ));
    respond(items, &query)
}

pub async fn vhost_channels(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    caller.require_vhost(&state, &vhost)?;
    let conns: Vec<_> = visible_connections(&state, &caller)
        .into_iter()
        .filter(|c| c.vhost == vhost)
        .collect();
    let mut items = channel_items_of(&state, &conns);
    items.extend(visible(
        &caller,
        from_peers(&state, Kind::Channels, Some(&vhost)).await,
    ));
    respond(items, &query)
}

pub async fn connection_channels(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    let c = find_connection(&state, &caller, &name)?;
    respond(channel_items_of(&state, &[c]), &query)
}

pub async fn show_channel(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    // "<connection name> (<number>)"
    let (conn_name, number) = name
        .rsplit_once(" (")
        .and_then(|(c, n)| Some((c, n.strip_suffix(')')?.parse::<u16>().ok()?)))
        .ok_or_else(ApiError::not_found)?;
    let c = find_connection(&state, &caller, conn_name)?;
    let ch = c
        .channels()
        .into_iter()
        .map(|ch| ch.snapshot())
        .find(|s| s.number == number)
        .ok_or_else(ApiError::not_found)?;
    Ok(ok(channel_object(&state, &c, &ch, true)))
}

pub async fn consumers(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let mut all = consumer_objects(&state, None);
    all.extend(from_peers(&state, Kind::Consumers, None).await);
    let items: Vec<Value> = all
        .into_iter()
        .filter(|c| {
            let vhost = c["queue"]["vhost"].as_str().unwrap_or_default();
            caller.may_use_vhost(&state, vhost)
        })
        .collect();
    Ok(ok(Value::Array(items)))
}

pub async fn consumers_in(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Response> {
    caller.require_vhost(&state, &vhost)?;
    let mut items = consumer_objects(&state, Some(&vhost));
    items.extend(from_peers(&state, Kind::Consumers, Some(&vhost)).await);
    Ok(ok(Value::Array(items)))
}
