//! `POST /api/exchanges/{vhost}/{name}/publish` and `POST /api/queues/{vhost}/{name}/get`:
//! messages in and out over HTTP, for tools and debugging. Errors that AMQP would report on a
//! channel come back as RabbitMQ words them here: 400 with `"<code> <NAME> - <text>"`.

use super::AppState;
use super::auth::Caller;
use super::body::Fields;
use super::error::{ApiError, ApiResult, ok};
use super::topology::{check, exchange_name};
use crate::amqp::codec;
use crate::amqp::publish::{cc_bcc_keys, without_bcc};
use crate::auth::Access;
use crate::broker::message::{Message, ShortStr};
use crate::broker::queue::Delivered;
use crate::broker::stats::MessageCounts;
use crate::broker::vhost::{Origin, RouteScratch, describe};
use crate::store::durability::Progress;
use crate::store::field_json::table_to_json;
use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::ShortString;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::time::Duration;

/// How long a publish of a persistent message waits for it to reach the disk.
const DURABLE_WAIT: Duration = Duration::from_secs(10);

const PROPERTY_KEYS: &[&str] = &[
    "content_type",
    "content_encoding",
    "headers",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
];

fn channel_error(code: u16, name: &str, text: String) -> ApiError {
    ApiError::bad_request(format!("{code} {name} - {text}"))
}

fn short(p: &Fields, key: &str) -> ApiResult<Option<ShortString>> {
    match p.stringish(key)? {
        None => Ok(None),
        Some(s) if s.len() > 255 => Err(ApiError::bad_request(format!(
            "property '{key}' is longer than 255 bytes"
        ))),
        Some(s) => Ok(Some(s.as_str().into())),
    }
}

fn octet(p: &Fields, key: &str) -> ApiResult<Option<u8>> {
    match p.raw(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if n.as_u64().is_some_and(|v| v <= 255) => {
            Ok(n.as_u64().map(|v| v as u8))
        }
        Some(_) => Err(ApiError::bad_request(json!(["not_int", key]))),
    }
}

fn properties_from_json(value: Option<&Value>, user: &str) -> ApiResult<BasicProperties> {
    let value = match value {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::Array(a)) if a.is_empty() => Value::Object(Map::new()),
        Some(v) => v.clone(),
    };
    if !value.is_object() {
        return Err(ApiError::bad_request(
            "field 'properties' must be an object",
        ));
    }
    let p = Fields::from_value(value, PROPERTY_KEYS)?;
    let mut props = BasicProperties::default();
    if let Some(v) = short(&p, "content_type")? {
        props = props.with_content_type(v);
    }
    if let Some(v) = short(&p, "content_encoding")? {
        props = props.with_content_encoding(v);
    }
    if p.has("headers") {
        props = props.with_headers(p.table("headers")?);
    }
    if let Some(v) = octet(&p, "delivery_mode")? {
        if !matches!(v, 1 | 2) {
            return Err(channel_error(
                406,
                "PRECONDITION_FAILED",
                format!("invalid message: {{delivery_mode_unknown,{v}}}"),
            ));
        }
        props = props.with_delivery_mode(v);
    }
    if let Some(v) = octet(&p, "priority")? {
        props = props.with_priority(v);
    }
    if let Some(v) = short(&p, "correlation_id")? {
        props = props.with_correlation_id(v);
    }
    if let Some(v) = short(&p, "reply_to")? {
        props = props.with_reply_to(v);
    }
    if let Some(v) = short(&p, "expiration")? {
        if v.as_str().parse::<u32>().is_err() {
            return Err(channel_error(
                406,
                "PRECONDITION_FAILED",
                format!("invalid expiration value '{}'", v.as_str()),
            ));
        }
        props = props.with_expiration(v);
    }
    if let Some(v) = short(&p, "message_id")? {
        props = props.with_message_id(v);
    }
    match p.raw("timestamp") {
        None | Some(Value::Null) => {}
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            props = props.with_timestamp(n.as_u64().unwrap_or_default());
        }
        Some(_) => return Err(ApiError::bad_request(json!(["not_int", "timestamp"]))),
    }
    if let Some(v) = short(&p, "type")? {
        props = props.with_type(v);
    }
    if let Some(v) = short(&p, "user_id")? {
        if v.as_str() != user {
            return Err(channel_error(
                406,
                "PRECONDITION_FAILED",
                format!(
                    "user_id property set to '{}' but authenticated user was '{user}'",
                    v.as_str()
                ),
            ));
        }
        props = props.with_user_id(v);
    }
    if let Some(v) = short(&p, "app_id")? {
        props = props.with_app_id(v);
    }
    if let Some(v) = short(&p, "cluster_id")? {
        props = props.with_cluster_id(v);
    }
    Ok(props)
}

fn properties_to_json(p: &BasicProperties) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_owned(), v);
        }
    };
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| json!(s.as_str()));
    put("content_type", s(p.content_type()));
    put("content_encoding", s(p.content_encoding()));
    put("headers", p.headers().as_ref().map(table_to_json));
    put("delivery_mode", p.delivery_mode().map(|v| json!(v)));
    put("priority", p.priority().map(|v| json!(v)));
    put("correlation_id", s(p.correlation_id()));
    put("reply_to", s(p.reply_to()));
    put("expiration", s(p.expiration()));
    put("message_id", s(p.message_id()));
    put("timestamp", p.timestamp().map(|v| json!(v)));
    put("type", s(p.kind()));
    put("user_id", s(p.user_id()));
    put("app_id", s(p.app_id()));
    put("cluster_id", s(p.cluster_id()));
    if m.is_empty() {
        // RabbitMQ shows a message without properties as an empty list.
        json!([])
    } else {
        Value::Object(m)
    }
}

pub async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let f = Fields::from_body(
        &body,
        &[
            "properties",
            "routing_key",
            "payload",
            "payload_encoding",
            "vhost",
            "name",
            "props",
        ],
    )?;
    f.require(&["properties", "routing_key", "payload", "payload_encoding"])?;
    caller.require_vhost(&state, &vhost)?;
    let v = state.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let name = exchange_name(&name).to_owned();
    check(&state, &caller, &vhost, "exchange", &name, Access::Write)?;
    let routing_key = f.stringish("routing_key")?.unwrap_or_default();
    if routing_key.len() > 255 {
        return Err(ApiError::bad_request(
            "routing_key is longer than 255 bytes",
        ));
    }
    let payload = f.string("payload")?.unwrap_or_default();
    let body = match f.string("payload_encoding")?.as_deref() {
        Some("string") => Bytes::from(payload.into_bytes()),
        Some("base64") => match B64.decode(payload.as_bytes()) {
            Ok(b) => Bytes::from(b),
            Err(_) => return Err(ApiError::bad_request(json!(["not_base64", payload]))),
        },
        other => {
            return Err(ApiError::bad_request(json!([
                "unsupported_encoding",
                other.unwrap_or("null")
            ])));
        }
    };
    if body.len() as u64 > state.broker.config.max_message_size {
        return Err(channel_error(
            406,
            "PRECONDITION_FAILED",
            format!(
                "message size {} is larger than configured max size {}",
                body.len(),
                state.broker.config.max_message_size
            ),
        ));
    }
    let mut props = properties_from_json(f.raw("properties"), caller.name())?;
    let Some(exchange) = v.exchange(&name) else {
        return Err(channel_error(
            404,
            "NOT_FOUND",
            format!("no {}", describe("exchange", &name, &vhost)),
        ));
    };
    if exchange.spec.internal {
        return Err(channel_error(
            403,
            "ACCESS_REFUSED",
            format!(
                "cannot publish to internal {}",
                describe("exchange", &name, &vhost)
            ),
        ));
    }
    let persistent = props.delivery_mode() == &Some(2);
    let mut headers = props.headers().clone();
    // RabbitMQ publishes through an AMQP channel: CC and BCC add routing keys, BCC is not
    // delivered.
    let mut keys = vec![Bytes::from(routing_key.clone().into_bytes())];
    if let Some(h) = &mut headers
        && cc_bcc_keys(h, &mut keys)
            .map_err(|text| channel_error(406, "PRECONDITION_FAILED", text))?
    {
        *h = without_bcc(h);
        props = props.with_headers(h.clone());
    }
    let arrived_ms = crate::broker::message::now_ms();
    let expires_at_ms = props
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<u64>().ok())
        .map(|ms| arrived_ms + ms);
    let message = Arc::new(Message {
        exchange: ShortStr::from_bytes(Bytes::from(name.into_bytes())),
        routing_key: ShortStr::from_bytes(keys[0].clone()),
        properties: codec::encode_properties(&props),
        body,
        persistent,
        arrived_ms,
        expires_at_ms,
    });
    let keys: Vec<&[u8]> = keys.iter().map(|k| &k[..]).collect();
    let outcome = v.publish(
        &exchange,
        &keys,
        headers.as_ref(),
        &message,
        Origin::Publisher,
        &mut RouteScratch::default(),
    );
    let connections = &state.broker.connections;
    if outcome.unstored {
        // The broker failed, not a queue limit: received, neither routed nor returned.
        connections.count_without_channel(&MessageCounts {
            publish: 1,
            publish_confirm: 1,
            ..MessageCounts::default()
        });
        return Err(ApiError::internal("cannot store the delayed message"));
    }
    // RabbitMQ publishes with confirms and `mandatory` on its plugin's channel: the node
    // counts a received message, routed or returned, and confirmed once it is safe unless
    // it was nacked.
    let routed = outcome.routed();
    connections.count_without_channel(&MessageCounts {
        publish: 1,
        publish_confirm: 1,
        routed: u64::from(routed),
        return_unroutable: u64::from(!routed),
        ..MessageCounts::default()
    });
    if outcome.rejected {
        // The words of RabbitMQ's management plugin on a nack.
        return Err(ApiError::bad_request(
            "rejected Unable to publish message. Check queue limits.",
        ));
    }
    // Answered once the message is safe, as a confirmed publish would be. The confirm is
    // counted when it is safe, by a task of its own: whether the caller still waits for the
    // answer does not change what happened to the message.
    let answer = Ok(ok(json!({"routed": outcome.taken > 0})));
    let ticket = outcome.ticket;
    let confirmed = |broker: &crate::broker::Broker| {
        broker.connections.count_without_channel(&MessageCounts {
            confirm: 1,
            ..MessageCounts::default()
        })
    };
    if ticket.is_done(Progress::of(&state.broker.storage)) {
        if ticket.failed() {
            // Its queue's home refused it, or could not be reached.
            return Err(ApiError::unavailable(
                "publish not confirmed: a queue's home node did not take the message",
            ));
        }
        confirmed(&state.broker);
        return answer;
    }
    let broker = state.broker.clone();
    let safe = tokio::spawn(async move {
        ticket.wait(&broker.storage).await;
        let done = ticket.is_done(Progress::of(&broker.storage)) && !ticket.failed();
        if done {
            confirmed(&broker);
        }
        done
    });
    // RabbitMQ's plugin waits for its confirm without a limit; an answer of success would
    // say the message is on disk when it is not.
    match tokio::time::timeout(DURABLE_WAIT, safe).await {
        Ok(Ok(true)) => answer,
        Ok(_) => Err(ApiError::unavailable(
            "publish not confirmed: the message cannot be written to disk now",
        )),
        Err(_) => Err(ApiError::unavailable(format!(
            "publish not confirmed: the message was not written to disk within {} seconds",
            DURABLE_WAIT.as_secs()
        ))),
    }
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let f = Fields::from_body(
        &body,
        &[
            "count", "ackmode", "encoding", "truncate", "vhost", "name", "requeue",
        ],
    )?;
    f.require(&["count", "ackmode", "encoding"])?;
    let count = f.integer("count")?.unwrap_or(1).max(0) as usize;
    let truncate = f.integer("truncate")?.map(|t| t.max(0) as usize);
    let ackmode = f.string("ackmode")?.unwrap_or_default();
    if !matches!(
        ackmode.as_str(),
        "ack_requeue_true" | "ack_requeue_false" | "reject_requeue_true" | "reject_requeue_false"
    ) {
        return Err(ApiError::bad_request(format!(
            "Unsupported ackmode '{ackmode}'. Please use ack_requeue_true, ack_requeue_false, reject_requeue_true or reject_requeue_false."
        )));
    }
    let base64_only = match f.string("encoding")?.as_deref() {
        Some("auto") => false,
        Some("base64") => true,
        _ => {
            return Err(ApiError::bad_request(
                "Unsupported encoding. Please use auto or base64.",
            ));
        }
    };
    let q = readable_queue(&state, &caller, &vhost, &name)?;
    let mut taken: Vec<Delivered> = Vec::new();
    let mut out = Vec::new();
    for _ in 0..count {
        let got = match q.get(false) {
            Ok(got) => got,
            // The home of a remote queue cannot be asked: what was taken goes back below.
            Err(_) if !taken.is_empty() => None,
            Err(_) => {
                return Err(super::topology::amqp_error(
                    crate::broker::vhost::home_down(&q),
                ));
            }
        };
        let Some((msg, remaining)) = got else {
            break;
        };
        let m = &msg.message;
        let full = &m.body[..];
        let shown = &full[..truncate.map_or(full.len(), |t| t.min(full.len()))];
        let (payload, encoding) = match std::str::from_utf8(shown) {
            Ok(text) if !base64_only => (text.to_owned(), "string"),
            _ => (B64.encode(shown), "base64"),
        };
        let properties = codec::decode_properties(&m.properties)
            .map_or_else(|| json!([]), |p| properties_to_json(&p));
        out.push(json!({
            "payload_bytes": full.len(),
            "redelivered": msg.redelivered,
            "exchange": m.exchange.to_str_lossy(),
            "routing_key": m.routing_key.to_str_lossy(),
            "message_count": remaining,
            "properties": properties,
            "payload": payload,
            "payload_encoding": encoding,
        }));
        taken.push(Delivered {
            delivered_at_ms: 0,
            queue: q.clone(),
            consumer: None,
            msg,
        });
    }
    if !taken.is_empty() {
        match ackmode.as_str() {
            "ack_requeue_false" => q.settle(&taken, true),
            "reject_requeue_false" => q.settle(&taken, false),
            _ => q.requeue(taken),
        }
    }
    Ok(ok(Value::Array(out)))
}

/// A queue the caller may read messages from (get, query).
fn readable_queue(
    state: &AppState,
    caller: &Caller,
    vhost: &str,
    name: &str,
) -> ApiResult<crate::broker::queue_ref::QueueRef> {
    caller.require_vhost(state, vhost)?;
    let v = state.broker.vhost(vhost).ok_or_else(ApiError::not_found)?;
    check(state, caller, vhost, "queue", name, Access::Read)?;
    v.existing_queue(name, 0).map_err(|e| match e.code {
        crate::error::NOT_FOUND => ApiError::not_found_because(e.reply_text()),
        _ => ApiError::bad_request(e.reply_text()),
    })
}

/// The most messages a query returns, and the most it looks at.
const QUERY_LIMIT: usize = 100;
const QUERY_SCAN: usize = 100_000;

/// `GET /api/warren/queues/{vhost}/{name}/messages` (Warren's message query, as ApsaraMQ
/// offers it): ready messages by `message_id`, or by publish time (`from` and `to`, in
/// milliseconds since the Unix epoch), without consuming them. At most `limit` (default 20,
/// at most 100) are returned, and at most 100,000 messages looked at; `complete` says whether
/// the whole queue was.
pub async fn query(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(params): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Response> {
    for key in params.keys() {
        if !matches!(key.as_str(), "message_id" | "from" | "to" | "limit") {
            return Err(ApiError::bad_request(format!(
                "unknown parameter '{key}': use message_id, from, to and limit"
            )));
        }
    }
    let number = |key: &str| -> ApiResult<Option<u64>> {
        params
            .get(key)
            .map(|v| {
                v.parse::<u64>().map_err(|_| {
                    ApiError::bad_request(format!("{key} must be a non-negative integer"))
                })
            })
            .transpose()
    };
    let (from, to) = (number("from")?, number("to")?);
    let message_id = params.get("message_id").cloned();
    if message_id.is_none() && from.is_none() && to.is_none() {
        return Err(ApiError::bad_request(
            "give message_id, or a publish-time range with from and/or to",
        ));
    }
    let limit = number("limit")?.map_or(20, |l| l as usize);
    if limit == 0 || limit > QUERY_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {QUERY_LIMIT}"
        )));
    }
    let q = readable_queue(&state, &caller, &vhost, &name)?;
    let (found, complete) = q.find(limit, QUERY_SCAN, |m| {
        let at = m.arrived_ms;
        if from.is_some_and(|f| at < f) || to.is_some_and(|t| at > t) {
            return false;
        }
        match &message_id {
            None => true,
            Some(id) => codec::decode_properties(&m.properties)
                .and_then(|p| p.message_id().clone())
                .is_some_and(|m| m.as_str() == id),
        }
    });
    let messages: Vec<Value> = found
        .iter()
        .map(|msg| {
            let m = &msg.message;
            let (payload, encoding) = match std::str::from_utf8(&m.body) {
                Ok(text) => (text.to_owned(), "string"),
                Err(_) => (B64.encode(&m.body), "base64"),
            };
            json!({
                "payload_bytes": m.body.len(),
                "redelivered": msg.redelivered,
                "exchange": m.exchange.to_str_lossy(),
                "routing_key": m.routing_key.to_str_lossy(),
                "properties": codec::decode_properties(&m.properties)
                    .map_or_else(|| json!([]), |p| properties_to_json(&p)),
                "payload": payload,
                "payload_encoding": encoding,
                "published_at": m.arrived_ms,
            })
        })
        .collect();
    Ok(ok(json!({"messages": messages, "complete": complete})))
}
