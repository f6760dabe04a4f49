//! `/api/vhosts` and `/api/vhost-limits`.

use super::AppState;
use super::auth::Caller;
use super::body::Fields;
use super::error::{ApiError, ApiResult, created_or_updated, no_content, ok};
use super::list::{Query, respond};
use super::sampler::{Key, LENGTHS, QUEUE_STATS};
use crate::broker::admin::AdminError;
use crate::broker::vhost::Vhost;
use axum::body::Bytes;
use axum::extract::{Path, Query as QueryParams, State};
use axum::response::Response;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

pub fn admin_error(e: AdminError) -> ApiError {
    match e {
        AdminError::NotFound(_) => ApiError::not_found(),
        AdminError::BadRequest(reason) => ApiError::bad_request(reason),
        AdminError::Internal(reason) => ApiError::internal(reason),
        AdminError::Unavailable(reason) => ApiError::unavailable(reason),
    }
}

fn vhost_object(state: &AppState, v: &Vhost) -> Value {
    let meta = v.meta();
    let node = &state.broker.config.node_name;
    let mut obj = Map::new();
    obj.insert("name".into(), json!(v.name.as_ref()));
    obj.insert("description".into(), json!(meta.description));
    obj.insert("tags".into(), json!(meta.tags));
    obj.insert(
        "default_queue_type".into(),
        json!(meta.default_queue_type.as_deref().unwrap_or("undefined")),
    );
    let mut metadata = json!({"description": meta.description, "tags": meta.tags});
    if let Some(t) = &meta.default_queue_type {
        metadata["default_queue_type"] = json!(t);
    }
    obj.insert("metadata".into(), metadata);
    obj.insert("tracing".into(), json!(false));
    obj.insert("cluster_state".into(), json!({node.as_str(): "running"}));
    // Lengths and message counters summed over the vhost's queues; traffic over its connections.
    let key = Key::Vhost(v.name.to_string());
    let mut totals: HashMap<&'static str, u64> = HashMap::new();
    for q in v.queues() {
        for (k, n) in super::sampler::queue_reading(&q) {
            *totals.entry(k).or_default() += n;
        }
    }
    for c in state.broker.connections.in_vhost(&v.name) {
        *totals.entry("recv_oct").or_default() += c.traffic.recv_oct.load(RELAXED);
        *totals.entry("send_oct").or_default() += c.traffic.send_oct.load(RELAXED);
    }
    let reading: Vec<(&'static str, u64)> = totals.into_iter().collect();
    let s = &state.sampler;
    s.put(&mut obj, &key, &reading, LENGTHS);
    s.put(&mut obj, &key, &reading, &["recv_oct", "send_oct"]);
    obj.insert(
        "message_stats".into(),
        s.message_stats(&key, &reading, QUEUE_STATS),
    );
    Value::Object(obj)
}

const RELAXED: std::sync::atomic::Ordering = std::sync::atomic::Ordering::Relaxed;

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    let items = state
        .broker
        .vhosts()
        .iter()
        .filter(|v| caller.sees_vhost(&state, &v.name))
        .map(|v| vhost_object(&state, v))
        .collect();
    respond(items, &query)
}

pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let v = state.broker.vhost(&name).ok_or_else(ApiError::not_found)?;
    if !caller.sees_vhost(&state, &name) {
        return Err(ApiError::not_authorised("Not administrator user"));
    }
    Ok(ok(vhost_object(&state, &v)))
}

pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let f = Fields::from_body(
        &body,
        &[
            "name",
            "description",
            "tags",
            "tracing",
            "default_queue_type",
            "defaultqueuetype",
        ],
    )?;
    if f.boolean("tracing")? == Some(true) {
        return Err(ApiError::bad_request(
            "tracing (the firehose) is not supported by Warren",
        ));
    }
    // Given as `undefined` (or empty), the default is taken away; not given, it is kept.
    let mut default_queue_type: Option<Option<String>> = None;
    for key in ["default_queue_type", "defaultqueuetype"] {
        if let Some(t) = f.string(key)? {
            let setting = queue_type_setting(&t)?;
            default_queue_type = Some(default_queue_type.flatten().or(setting));
        }
    }
    ApiError::check_name("vhost", &name)?;
    let description = f.string("description")?.unwrap_or_default();
    let tags = f.tags("tags")?.unwrap_or_default();
    let created = state
        .broker
        .put_vhost(&name, &description, tags, default_queue_type)
        .map_err(admin_error)?;
    if created {
        // As RabbitMQ: the user who creates a vhost may use it.
        state
            .broker
            .set_permission(caller.name(), &name, ".*", ".*", ".*")
            .map_err(admin_error)?;
    }
    Ok(created_or_updated(created))
}

/// A vhost's `default_queue_type` as given: classic or quorum (`undefined` or empty: none).
pub fn queue_type_setting(t: &str) -> ApiResult<Option<String>> {
    match t {
        "classic" | "quorum" => Ok(Some(t.to_owned())),
        "undefined" | "" => Ok(None),
        _ => Err(ApiError::bad_request(format!(
            "default queue type '{t}' is not supported; Warren's queues are classic or quorum"
        ))),
    }
}

pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let connections = state.broker.connections.in_vhost(&name);
    state.broker.delete_vhost(&name).map_err(admin_error)?;
    // As RabbitMQ answers: once the vhost's connections are closed, so that a client told of
    // the deletion has already been told of its connection's end.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    for c in connections {
        let _ = tokio::time::timeout_at(deadline, c.ended()).await;
    }
    Ok(no_content())
}

fn limits_entry(v: &Vhost) -> Option<Value> {
    let meta = v.meta();
    if meta.limits.is_empty() {
        return None;
    }
    Some(json!({"vhost": v.name.as_ref(), "value": meta.limits}))
}

pub async fn limits_all(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let mut vhosts = state.broker.vhosts();
    vhosts.sort_by(|a, b| a.name.cmp(&b.name));
    let items: Vec<Value> = vhosts
        .iter()
        .filter(|v| caller.sees_vhost(&state, &v.name))
        .filter_map(|v| limits_entry(v))
        .collect();
    Ok(ok(Value::Array(items)))
}

pub async fn limits_of(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    let v = state.broker.vhost(&name).ok_or_else(ApiError::not_found)?;
    if !caller.sees_vhost(&state, &name) {
        return Err(ApiError::not_authorised("Not administrator user"));
    }
    Ok(ok(Value::Array(limits_entry(&v).into_iter().collect())))
}

pub async fn put_limit(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, limit)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let f = Fields::from_body(&body, &["value"])?;
    f.require(&["value"])?;
    if !crate::broker::vhost::VHOST_LIMITS.contains(&limit.as_str()) {
        return Err(ApiError::bad_request(format!(
            "Validation failed\n\nUnrecognised terms [{{<<\"{limit}\">>,{}}}] in limits\n",
            f.raw("value").map(Value::to_string).unwrap_or_default()
        )));
    }
    let value = match f.raw("value") {
        Some(Value::Number(n)) if n.as_i64().is_some() => n.as_i64().unwrap_or(-1),
        other => {
            let shown = match other {
                Some(Value::String(s)) => format!("<<\"{s}\">>"),
                Some(v) => v.to_string(),
                None => "undefined".into(),
            };
            return Err(ApiError::bad_request(format!(
                "Validation failed\n\n{limit} should be a number, actually was {shown}\n"
            )));
        }
    };
    if state.broker.vhost(&vhost).is_none() {
        return Err(ApiError::vhost_not_found());
    }
    state
        .broker
        .set_vhost_limit(&vhost, &limit, Some(value))
        .map_err(admin_error)?;
    Ok(no_content())
}

pub async fn delete_limit(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, limit)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    if state.broker.vhost(&vhost).is_none() {
        return Err(ApiError::vhost_not_found());
    }
    if !crate::broker::vhost::VHOST_LIMITS.contains(&limit.as_str()) {
        return Ok(no_content());
    }
    state
        .broker
        .set_vhost_limit(&vhost, &limit, None)
        .map_err(admin_error)?;
    Ok(no_content())
}
