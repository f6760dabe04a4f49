//! `/api/health/checks/*`, RabbitMQ 3.10's older `/api/healthchecks/node` and
//! `/api/aliveness-test/{vhost}`: 200 `{"status":"ok"}` or 503
//! `{"status":"failed", ...}`, for load balancers and probes.

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ApiResult, json_response, ok};
use crate::auth::Access;
use crate::broker::message::{Message, ShortStr};
use crate::broker::queue::{Delivered, QueueSpec};
use crate::broker::vhost::{Origin, RouteScratch};
use amq_protocol::types::FieldTable;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde_json::{Value, json};
use std::sync::Arc;

fn failed(body: Value) -> Response {
    json_response(StatusCode::SERVICE_UNAVAILABLE, &body)
}

fn alarm_check(state: &AppState, scope: &str) -> Response {
    let a = state.broker.alarms.state();
    let node = &state.broker.config.node_name;
    let mut alarms = Vec::new();
    if a.memory {
        alarms.push(json!({"node": node, "resource": "memory"}));
    }
    if a.disk {
        alarms.push(json!({"node": node, "resource": "disk space"}));
    }
    if alarms.is_empty() {
        ok(json!({"status": "ok"}))
    } else {
        failed(json!({
            "alarms": alarms,
            "reason": format!("There are alarms in effect {scope}"),
            "status": "failed",
        }))
    }
}

pub async fn alarms(State(state): State<AppState>, _caller: Caller) -> Response {
    alarm_check(&state, "in the cluster")
}

pub async fn local_alarms(State(state): State<AppState>, _caller: Caller) -> Response {
    alarm_check(&state, "on the node")
}

/// Every vhost of a Warren node runs while the node does.
pub async fn virtual_hosts(_state: State<AppState>, _caller: Caller) -> Response {
    ok(json!({"status": "ok"}))
}

/// RabbitMQ 3.10's `/api/healthchecks/node`: a running node is healthy.
pub async fn node(_state: State<AppState>, _caller: Caller) -> Response {
    ok(json!({"status": "ok"}))
}

/// `/api/healthchecks/node/{node}`: 404 for a node that is not this one, as RabbitMQ answers
/// for a node it does not know.
pub async fn named_node(
    State(state): State<AppState>,
    _caller: Caller,
    Path(node): Path<String>,
) -> ApiResult<Response> {
    if node != state.broker.config.node_name {
        return Err(ApiError::not_found());
    }
    Ok(ok(json!({"status": "ok"})))
}

pub async fn single_node(_state: State<AppState>, _caller: Caller) -> Response {
    ok(json!({"status": "ok", "reason": "single node cluster"}))
}

/// `node-is-quorum-critical`: 503 when shutting this node down would leave the cluster's
/// metadata group (what every declaration is committed to) without a reachable majority; ok
/// for a single node cluster, as RabbitMQ answers.
pub async fn quorum_critical(State(state): State<AppState>, _caller: Caller) -> Response {
    let Some(metadata) = &state.broker.metadata else {
        return ok(json!({"status": "ok", "reason": "single node cluster"}));
    };
    let (voters, reached) = metadata.reach();
    if voters <= 1 {
        return ok(json!({"status": "ok", "reason": "single node cluster"}));
    }
    if (reached - 1) * 2 > voters {
        return ok(json!({"status": "ok"}));
    }
    failed(json!({
        "status": "failed",
        "reason": format!(
            "the cluster's metadata would lose its majority if node {} were shut down ({reached} of {voters} members reachable)",
            state.broker.config.node_name
        ),
        "queues": [],
    }))
}

pub async fn port_listener(
    State(state): State<AppState>,
    _caller: Caller,
    Path(port): Path<String>,
) -> ApiResult<Response> {
    let port: u16 = port
        .parse()
        .map_err(|_| ApiError::bad_request("Invalid port"))?;
    let ports: Vec<u16> = state.listeners.iter().map(|l| l.addr.port()).collect();
    if ports.contains(&port) {
        Ok(ok(json!({"status": "ok", "port": port})))
    } else {
        Ok(failed(json!({
            "status": "failed",
            "reason": "No active listener",
            "missing": port,
            "ports": ports,
        })))
    }
}

pub async fn protocol_listener(
    State(state): State<AppState>,
    _caller: Caller,
    Path(protocol): Path<String>,
) -> Response {
    let wanted = match protocol.as_str() {
        "amqp091" | "amqp0.9.1" | "amqp0-9-1" => "amqp",
        other => other,
    };
    let protocols: Vec<&str> = state.listeners.iter().map(|l| l.protocol).collect();
    if protocols.contains(&wanted) {
        ok(json!({"status": "ok", "protocol": protocol}))
    } else {
        failed(json!({
            "status": "failed",
            "reason": "No active listener",
            "missing": protocol,
            "protocols": protocols,
        }))
    }
}

/// RabbitMQ's aliveness test: declares the queue `aliveness-test` in the vhost, publishes a
/// message to it and gets it back.
pub async fn aliveness(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Response> {
    let v = state.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    const QUEUE: &str = "aliveness-test";
    for access in [Access::Configure, Access::Write, Access::Read] {
        super::topology::check(&state, &caller, &vhost, "queue", QUEUE, access)?;
    }
    let declared = v.declare_queue(
        QueueSpec {
            name: QUEUE.into(),
            durable: false,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
        },
        0,
    );
    // The queue exists in a form the test cannot use (another connection's exclusive queue,
    // other arguments): the check fails with the broker's reason, it is not a server error.
    let q = match declared {
        Ok((q, _)) => q,
        Err(e) => return Ok(failed(json!({"status": "failed", "reason": e.text}))),
    };
    let message = Arc::new(Message {
        exchange: ShortStr::from_bytes(Bytes::new()),
        routing_key: ShortStr::from_bytes(Bytes::from_static(QUEUE.as_bytes())),
        properties: Bytes::from_static(&[0, 0]),
        body: Bytes::from_static(b"test_message"),
        persistent: false,
        arrived_ms: crate::broker::message::now_ms(),
        expires_at_ms: None,
    });
    // Through the default exchange, as RabbitMQ's test publishes it.
    if let Some(default) = v.exchange("") {
        v.publish(
            &default,
            &[QUEUE.as_bytes()],
            None,
            &message,
            Origin::Publisher,
            &mut RouteScratch::default(),
        );
    }
    // Whatever comes back before the test message is consumed (RabbitMQ's test gets with
    // no-ack too), so a stray message left in the queue does not stay there or fail every
    // later check. The test message is the last one in the queue: at most `ready` gets.
    let mut left = q.lengths().ready;
    while left > 0 {
        let Ok(Some((msg, _))) = q.get(false) else {
            break;
        };
        left -= 1;
        let matched = msg.message.body == message.body;
        q.settle(
            &[Delivered {
                delivered_at_ms: 0,
                queue: q.clone(),
                consumer: None,
                msg,
            }],
            true,
        );
        if matched {
            return Ok(ok(json!({"status": "ok"})));
        }
    }
    Ok(failed(
        json!({"status": "failed", "reason": "the test message did not come back"}),
    ))
}
