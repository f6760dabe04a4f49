//! `/api/exchanges`, `/api/queues`, `/api/bindings`: listing and changing a vhost's topology
//! through the same operations (and checks) as AMQP.

use super::AppState;
use super::auth::Caller;
use super::body::Fields;
use super::error::{ApiError, ApiResult, created_or_updated, no_content, ok};
use super::list::{Query, respond_with, stream};
use super::sampler::{Key, LENGTHS, QUEUE_STATS, queue_reading};
use crate::auth::Access;
use crate::auth::permissions::checked_name;
use crate::broker::exchange::{Binding, Destination, Exchange, ExchangeKind, ExchangeSpec};
use crate::broker::queue::QueueSpec;
use crate::broker::queue_ref::QueueRef;
use crate::broker::vhost::{DestinationKind, Vhost};
use crate::error::{ACCESS_REFUSED, AmqpError, NOT_FOUND};
use crate::store::field_json::table_to_json;
use amq_protocol::types::FieldTable;
use axum::body::Bytes;
use axum::extract::{Path, Query as QueryParams, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// An AMQP refusal as the management API reports it; what the broker could not answer now
/// (a node or a majority out of reach, no answer in time) is 503 whatever its AMQP code.
pub fn amqp_error(e: AmqpError) -> ApiError {
    if e.is_transient() {
        return ApiError::unavailable(e.text);
    }
    match e.code {
        ACCESS_REFUSED => ApiError::access_refused(),
        NOT_FOUND => ApiError::not_found_because(e.text),
        _ => ApiError::bad_request(e.text),
    }
}

/// The default exchange is `amq.default` in URLs.
pub fn exchange_name(url_name: &str) -> &str {
    if url_name == "amq.default" {
        ""
    } else {
        url_name
    }
}

/// The caller's permission for `access` on a resource, as AMQP checks it.
pub fn check(
    state: &AppState,
    caller: &Caller,
    vhost: &str,
    kind: &str,
    name: &str,
    access: Access,
) -> ApiResult<()> {
    if state
        .broker
        .users
        .allowed(caller.name(), vhost, access, checked_name(kind, name))
    {
        Ok(())
    } else {
        Err(ApiError::access_refused())
    }
}

/// The vhosts whose objects the caller may list: one (which must exist and be permitted) or
/// every permitted one.
fn vhosts_for(state: &AppState, caller: &Caller, one: Option<&str>) -> ApiResult<Vec<Arc<Vhost>>> {
    match one {
        Some(name) => {
            caller.require_vhost(state, name)?;
            Ok(state.broker.vhost(name).into_iter().collect())
        }
        None => Ok(state
            .broker
            .vhosts()
            .into_iter()
            .filter(|v| caller.may_use_vhost(state, &v.name))
            .collect()),
    }
}

fn vhost_for(state: &AppState, caller: &Caller, name: &str) -> ApiResult<Arc<Vhost>> {
    caller.require_vhost(state, name)?;
    state.broker.vhost(name).ok_or_else(ApiError::not_found)
}

// ---------------------------------------------------------------------------------- exchanges

pub fn exchange_object(vhost: &str, x: &Exchange) -> Value {
    let builtin = x.name().is_empty() || x.name().starts_with("amq.");
    let mut obj = json!({
        "arguments": table_to_json(&x.spec.arguments),
        "auto_delete": x.spec.auto_delete,
        "durable": x.spec.durable,
        "internal": x.spec.internal,
        "name": x.name(),
        "type": x.spec.kind.as_str(),
        "user_who_performed_action": if builtin { "rmq-internal" } else { "" },
        "vhost": vhost,
    });
    // As in RabbitMQ, `policy` is there only when one applies.
    if let (Some(p), Some(o)) = (x.policy(), obj.as_object_mut()) {
        o.insert("policy".into(), json!(p.name));
    }
    obj
}

async fn list_exchanges(
    state: &AppState,
    caller: &Caller,
    one: Option<&str>,
    query: &Query,
) -> ApiResult<Response> {
    let vhosts = vhosts_for(state, caller, one)?;
    let permit = state.heavy_list_permit().await?;
    let mut items: Vec<(Arc<str>, Arc<Exchange>)> = Vec::new();
    for v in vhosts {
        let vhost = v.name.clone();
        items.extend(v.exchanges().into_iter().map(|x| (vhost.clone(), x)));
    }
    respond_with(
        items,
        |(_, x)| x.name(),
        |(vhost, x)| exchange_object(vhost, x),
        query,
        Some(permit),
    )
}

pub async fn exchanges(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    list_exchanges(&state, &caller, None, &query).await
}

pub async fn exchanges_in(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    list_exchanges(&state, &caller, Some(&vhost), &query).await
}

pub async fn show_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let v = vhost_for(&state, &caller, &vhost)?;
    let x = v
        .exchange(exchange_name(&name))
        .ok_or_else(ApiError::not_found)?;
    let mut obj = exchange_object(&vhost, &x);
    obj["incoming"] = json!([]);
    obj["outgoing"] = json!([]);
    Ok(ok(obj))
}

pub async fn put_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let f = Fields::from_body(
        &body,
        &[
            "name",
            "vhost",
            "type",
            "durable",
            "auto_delete",
            "internal",
            "arguments",
            "user_who_performed_action",
        ],
    )?;
    ApiError::check_name("exchange", &name)?;
    // As over AMQP (and in RabbitMQ), a declared name loses its line feeds and returns.
    let name = name.replace(['\n', '\r'], "");
    let kind_name = f.string("type")?.unwrap_or_else(|| "direct".into());
    let durable = f.boolean("durable")?.unwrap_or(false);
    let auto_delete = f.boolean("auto_delete")?.unwrap_or(false);
    let internal = f.boolean("internal")?.unwrap_or(false);
    let arguments = f.table("arguments")?;
    let Some(v) = state.broker.vhost(&vhost) else {
        return Err(ApiError::vhost_not_found());
    };
    caller.require_vhost(&state, &vhost)?;
    let name = exchange_name(&name);
    if name.is_empty() {
        return Err(ApiError::access_refused());
    }
    let kind = ExchangeKind::parse(&kind_name)
        .ok_or_else(|| ApiError::bad_request(format!("invalid exchange type '{kind_name}'")))?;
    check(&state, &caller, &vhost, "exchange", name, Access::Configure)?;
    let existed = v.exchange(name).is_some();
    v.declare_exchange(ExchangeSpec {
        name: name.to_owned(),
        kind,
        durable,
        auto_delete,
        internal,
        arguments,
    })
    .map_err(amqp_error)?;
    Ok(created_or_updated(!existed))
}

pub async fn delete_exchange(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    let v = vhost_for(&state, &caller, &vhost)?;
    let name = exchange_name(&name);
    if v.exchange(name).is_none() {
        return Err(ApiError::not_found());
    }
    check(&state, &caller, &vhost, "exchange", name, Access::Configure)?;
    let if_unused = query.get("if-unused").is_some_and(|v| v == "true");
    v.delete_exchange(name, if_unused).map_err(amqp_error)?;
    Ok(no_content())
}

// ------------------------------------------------------------------------------------- queues

/// A queue as `/api/queues` shows it; `detailed` adds what the single-queue view has.
pub fn queue_object(state: &AppState, vhost: &str, q: &QueueRef, detailed: bool) -> Value {
    let reading = queue_reading(q);
    let key = Key::Queue(vhost.to_owned(), q.name().to_owned());
    let s = &state.sampler;
    let consumers = q.consumers();
    let active = !consumers.is_empty();
    let mut obj = Map::new();
    obj.insert("arguments".into(), table_to_json(q.arguments()));
    obj.insert("auto_delete".into(), json!(q.auto_delete()));
    obj.insert("durable".into(), json!(q.durable()));
    obj.insert("exclusive".into(), json!(q.owner().is_some()));
    obj.insert(
        "exclusive_consumer_tag".into(),
        consumers
            .iter()
            .find(|c| c.exclusive)
            .map_or(Value::Null, |c| json!(c.tag.as_ref())),
    );
    obj.insert("consumers".into(), json!(consumers.len()));
    obj.insert(
        "consumer_capacity".into(),
        json!(if active { 1.0 } else { 0.0 }),
    );
    obj.insert(
        "consumer_utilisation".into(),
        json!(if active { 1.0 } else { 0.0 }),
    );
    let settings = q.settings();
    super::policies::policy_fields(
        &mut obj,
        settings.policy.as_deref(),
        settings.operator.as_deref(),
    );
    obj.insert(
        "single_active_consumer_tag".into(),
        q.single_active_consumer()
            .map_or(Value::Null, |c| json!(c.tag.as_ref())),
    );
    obj.insert("head_message_timestamp".into(), Value::Null);
    obj.insert("name".into(), json!(q.name()));
    obj.insert(
        "node".into(),
        json!(q.home().unwrap_or(&state.broker.config.node_name)),
    );
    // Listed here only when its home cannot be reached (its home lists it otherwise).
    let state_text = if q.unreachable_home().is_some() {
        "down"
    } else {
        "running"
    };
    obj.insert("state".into(), json!(state_text));
    obj.insert("type".into(), json!(q.queue_type()));
    obj.insert("vhost".into(), json!(vhost));
    let in_memory = q.messages_in_memory() as u64;
    let lengths = q.lengths();
    let ready = lengths.ready;
    // Body bytes, as RabbitMQ counts them.
    obj.insert(
        "message_bytes".into(),
        json!(lengths.ready_bytes + lengths.unacked_bytes),
    );
    obj.insert("message_bytes_ready".into(), json!(lengths.ready_bytes));
    obj.insert(
        "message_bytes_unacknowledged".into(),
        json!(lengths.unacked_bytes),
    );
    obj.insert("messages_ram".into(), json!(in_memory));
    obj.insert("messages_ready_ram".into(), json!(in_memory));
    obj.insert(
        "messages_paged_out".into(),
        json!(ready.saturating_sub(in_memory)),
    );
    obj.insert(
        "backing_queue_status".into(),
        json!({"mode": "default", "len": ready, "version": 2}),
    );
    s.put(&mut obj, &key, &reading, LENGTHS);
    obj.insert(
        "message_stats".into(),
        s.message_stats(&key, &reading, QUEUE_STATS),
    );
    if let Some(owner) = q.owner()
        && let Some(c) = state
            .broker
            .connections
            .list()
            .into_iter()
            .find(|c| c.id == owner)
    {
        obj.insert(
            "owner_pid_details".into(),
            json!({"name": c.name(), "peer_host": c.peer.ip().to_string(), "peer_port": c.peer.port()}),
        );
    }
    if detailed {
        let details: Vec<Value> = super::peers::consumer_objects(state, Some(vhost))
            .into_iter()
            .filter(|c| c["queue"]["name"] == q.name())
            .collect();
        obj.insert("consumer_details".into(), Value::Array(details));
        obj.insert("deliveries".into(), json!([]));
        obj.insert("incoming".into(), json!([]));
    }
    Value::Object(obj)
}

async fn list_queues(
    state: &AppState,
    caller: &Caller,
    one: Option<&str>,
    query: &Query,
) -> ApiResult<Response> {
    let vhosts = vhosts_for(state, caller, one)?;
    let permit = state.heavy_list_permit().await?;
    // This node's own queues, and those whose home cannot be reached; the other nodes list
    // theirs.
    let mut items: Vec<Listed> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for v in &vhosts {
        let vhost = v.name.clone();
        names.insert(vhost.to_string());
        items.extend(
            v.queues()
                .into_iter()
                .filter(|q| q.home().is_none() || q.unreachable_home().is_some())
                .map(|q| Listed::Here(vhost.clone(), q)),
        );
    }
    let from_peers = super::gather::from_peers(state, super::gather::Kind::Queues, one).await;
    items.extend(from_peers.into_iter().filter_map(|o| {
        let vhost = o["vhost"].as_str()?;
        if !names.contains(vhost) {
            return None;
        }
        let name = o["name"].as_str()?.to_owned();
        Some(Listed::There(name, o))
    }));
    let state = state.clone();
    respond_with(
        items,
        Listed::name,
        move |item| match item {
            Listed::Here(vhost, q) => queue_object(&state, vhost, q, false),
            Listed::There(_, o) => o.clone(),
        },
        query,
        Some(permit),
    )
}

/// A queue in a listing: one of this node's, or as another node listed it.
enum Listed {
    Here(Arc<str>, QueueRef),
    There(String, Value),
}

impl Listed {
    fn name(&self) -> &str {
        match self {
            Listed::Here(_, q) => q.name(),
            Listed::There(name, _) => name,
        }
    }
}

pub async fn queues(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    list_queues(&state, &caller, None, &query).await
}

pub async fn queues_in(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    list_queues(&state, &caller, Some(&vhost), &query).await
}

pub async fn show_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let v = vhost_for(&state, &caller, &vhost)?;
    let q = v.queue(&name).ok_or_else(ApiError::not_found)?;
    // A queue whose home is another node: as its home shows it, when it answers.
    if let Some(home) = q.home()
        && q.unreachable_home().is_none()
        && let Some(o) = super::gather::queue_from(&state, home, &vhost, &name).await
    {
        return Ok(ok(o));
    }
    Ok(ok(queue_object(&state, &vhost, &q, true)))
}

pub async fn put_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let f = Fields::from_body(
        &body,
        &[
            "name",
            "vhost",
            "durable",
            "auto_delete",
            "exclusive",
            "arguments",
            "node",
        ],
    )?;
    ApiError::check_name("queue", &name)?;
    let name = name.replace(['\n', '\r'], "");
    let durable = f.boolean("durable")?.unwrap_or(false);
    let auto_delete = f.boolean("auto_delete")?.unwrap_or(false);
    if f.boolean("exclusive")? == Some(true) {
        return Err(ApiError::bad_request(
            "exclusive queues belong to an AMQP connection and cannot be declared over HTTP",
        ));
    }
    let arguments = f.table("arguments")?;
    let Some(v) = state.broker.vhost(&vhost) else {
        return Err(ApiError::vhost_not_found());
    };
    caller.require_vhost(&state, &vhost)?;
    if name.starts_with("amq.") {
        return Err(ApiError::access_refused());
    }
    check(&state, &caller, &vhost, "queue", &name, Access::Configure)?;
    let exists = v.queue(&name).is_some();
    for (kind, resource, access) in
        crate::auth::permissions::dead_letter_checks(&name, exists, &arguments)
    {
        check(&state, &caller, &vhost, kind, &resource, access)?;
    }
    let (_, created) = v
        .declare_queue(
            QueueSpec {
                name,
                durable,
                exclusive: false,
                auto_delete,
                arguments,
            },
            0,
        )
        .map_err(amqp_error)?;
    Ok(created_or_updated(created))
}

pub async fn delete_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    QueryParams(query): QueryParams<Query>,
) -> ApiResult<Response> {
    let v = vhost_for(&state, &caller, &vhost)?;
    if v.queue(&name).is_none() {
        return Err(ApiError::not_found());
    }
    check(&state, &caller, &vhost, "queue", &name, Access::Configure)?;
    let flag = |k: &str| query.get(k).is_some_and(|v| v == "true");
    v.delete_queue(&name, flag("if-unused"), flag("if-empty"), 0)
        .map_err(amqp_error)?;
    Ok(no_content())
}

pub async fn purge_queue(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let v = vhost_for(&state, &caller, &vhost)?;
    if v.queue(&name).is_none() {
        return Err(ApiError::not_found());
    }
    check(&state, &caller, &vhost, "queue", &name, Access::Read)?;
    let q = v.existing_queue(&name, 0).map_err(amqp_error)?;
    q.purge()
        .map_err(|_| amqp_error(crate::broker::vhost::home_down(&q)))?;
    Ok(no_content())
}

// ----------------------------------------------------------------------------------- bindings

/// RabbitMQ's `properties_key`: the routing key, URL-quoted, and a hash of the arguments.
/// The hash is Warren's own (RabbitMQ hashes the Erlang term); clients treat it as opaque.
pub fn properties_key(routing_key: &str, arguments: &FieldTable) -> String {
    let quoted = quote_plus(routing_key).replace('~', "%7E");
    if arguments.inner().is_empty() {
        if routing_key.is_empty() {
            return "~".into();
        }
        return quoted;
    }
    let canonical = table_to_json(arguments).to_string();
    let digest = Sha256::digest(canonical.as_bytes());
    format!("{quoted}~{}", URL_SAFE_NO_PAD.encode(&digest[..4]))
}

/// Erlang's `quote_plus`: letters, digits and `-_.` kept, space as `+`, the rest `%XX`.
fn quote_plus(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// What a path segment keeps unencoded (RFC 3986's unreserved characters).
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes a path segment.
fn encode_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

fn binding_object(
    vhost: &str,
    source: &str,
    destination: &str,
    destination_type: &str,
    routing_key: &str,
    arguments: &FieldTable,
) -> Value {
    json!({
        "source": source,
        "vhost": vhost,
        "destination": destination,
        "destination_type": destination_type,
        "routing_key": routing_key,
        "arguments": table_to_json(arguments),
        "properties_key": properties_key(routing_key, arguments),
    })
}

fn implicit_binding(vhost: &str, q: &QueueRef) -> Value {
    binding_object(
        vhost,
        "",
        q.name(),
        "queue",
        q.name(),
        &FieldTable::default(),
    )
}

/// An exchange's bindings whose destination type and destination `keep` accepts.
fn exchange_bindings(
    vhost: &str,
    x: &Exchange,
    keep: &dyn Fn(&str, &str, &str) -> bool,
) -> Vec<Value> {
    x.bindings()
        .iter()
        .filter_map(|b| {
            let kind = if b.destination.is_queue() {
                "queue"
            } else {
                "exchange"
            };
            keep(x.name(), kind, b.destination.name()).then(|| {
                binding_object(
                    vhost,
                    x.name(),
                    b.destination.name(),
                    kind,
                    &b.routing_key,
                    &b.arguments,
                )
            })
        })
        .collect()
}

/// The bindings of a vhost, the default exchange's implicit ones first, whose source,
/// destination type and destination `keep` accepts: only those are rendered, so finding one
/// queue's bindings does not render every binding of the vhost.
fn vhost_bindings(v: &Vhost, keep: &dyn Fn(&str, &str, &str) -> bool) -> Vec<Value> {
    let mut queues = v.queues();
    queues.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out: Vec<Value> = queues
        .iter()
        .filter(|q| keep("", "queue", q.name()))
        .map(|q| implicit_binding(&v.name, q))
        .collect();
    let mut exchanges = v.exchanges();
    exchanges.sort_by(|a, b| a.name().cmp(b.name()));
    for x in exchanges {
        out.extend(exchange_bindings(&v.name, &x, keep));
    }
    out
}

/// What a bindings listing renders as it is sent: a queue's implicit binding to the default
/// exchange, or an exchange's bindings.
enum BindingsOf {
    Implicit(Arc<str>, QueueRef),
    Explicit(Arc<str>, Arc<Exchange>, Binding),
}

/// Every binding of the vhosts, each vhost's default-exchange bindings first, rendered only as
/// the body is sent. Each binding is an item of its own, taken from its exchange only when
/// the body gets there, so an exchange with very many bindings is sent in many pieces.
async fn stream_bindings(state: &AppState, vhosts: Vec<Arc<Vhost>>) -> ApiResult<Response> {
    let permit = state.heavy_list_permit().await?;
    let mut implicit = Vec::new();
    let mut explicit = Vec::new();
    for v in vhosts {
        let vhost = v.name.clone();
        let mut queues = v.queues();
        queues.sort_by(|a, b| a.name().cmp(b.name()));
        let mut exchanges = v.exchanges();
        exchanges.sort_by(|a, b| a.name().cmp(b.name()));
        implicit.push((vhost.clone(), queues));
        explicit.push((vhost, exchanges));
    }
    // Vhost by vhost: its implicit bindings, then its exchanges' bindings.
    let items =
        implicit
            .into_iter()
            .zip(explicit)
            .flat_map(|((vhost, queues), (same, exchanges))| {
                let implicit = queues
                    .into_iter()
                    .map(move |q| BindingsOf::Implicit(vhost.clone(), q));
                let explicit = exchanges.into_iter().flat_map(move |x| {
                    let vhost = same.clone();
                    x.bindings()
                        .into_iter()
                        .map(move |b| BindingsOf::Explicit(vhost.clone(), x.clone(), b))
                });
                implicit.chain(explicit)
            });
    Ok(stream(
        items,
        Box::new(|item: &BindingsOf, out: &mut dyn FnMut(Value)| match item {
            BindingsOf::Implicit(vhost, q) => out(implicit_binding(vhost, q)),
            BindingsOf::Explicit(vhost, x, b) => {
                let kind = if b.destination.is_queue() {
                    "queue"
                } else {
                    "exchange"
                };
                out(binding_object(
                    vhost,
                    x.name(),
                    b.destination.name(),
                    kind,
                    &b.routing_key,
                    &b.arguments,
                ));
            }
        }),
        Some(permit),
    ))
}

pub async fn bindings(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    let vhosts = vhosts_for(&state, &caller, None)?;
    stream_bindings(&state, vhosts).await
}

pub async fn bindings_in(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Response> {
    let v = vhost_for(&state, &caller, &vhost)?;
    stream_bindings(&state, vec![v]).await
}

fn filtered(v: &Vhost, keep: &dyn Fn(&str, &str, &str) -> bool) -> Value {
    Value::Array(vhost_bindings(v, keep))
}

pub async fn exchange_bindings_source(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let v = vhost_for(&state, &caller, &vhost)?;
    let name = exchange_name(&name).to_owned();
    Ok(ok(filtered(&v, &|source, _, _| source == name)))
}

pub async fn exchange_bindings_destination(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let v = vhost_for(&state, &caller, &vhost)?;
    let name = exchange_name(&name).to_owned();
    Ok(ok(filtered(&v, &|_, kind, destination| {
        kind == "exchange" && destination == name
    })))
}

pub async fn queue_bindings(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let v = vhost_for(&state, &caller, &vhost)?;
    if v.queue(&name).is_none() {
        return Err(ApiError::not_found());
    }
    Ok(ok(filtered(&v, &|_, kind, destination| {
        kind == "queue" && destination == name
    })))
}

fn destination_kind(kind: &str) -> ApiResult<(DestinationKind, &'static str)> {
    match kind {
        "q" => Ok((DestinationKind::Queue, "queue")),
        "e" => Ok((DestinationKind::Exchange, "exchange")),
        _ => Err(ApiError::not_found()),
    }
}

type BindingPath = (String, String, String, String);

pub async fn bindings_between(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, destination)): Path<BindingPath>,
) -> ApiResult<Response> {
    let (_, type_name) = destination_kind(&kind)?;
    let v = vhost_for(&state, &caller, &vhost)?;
    let source = exchange_name(&source).to_owned();
    Ok(ok(filtered(&v, &|s, kind, d| {
        s == source && kind == type_name && d == destination
    })))
}

pub async fn show_binding(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> ApiResult<Response> {
    let (_, type_name) = destination_kind(&kind)?;
    let v = vhost_for(&state, &caller, &vhost)?;
    let source = exchange_name(&source).to_owned();
    find_binding(&v, &source, type_name, &destination, &props)
        .map(ok)
        .ok_or_else(ApiError::not_found)
}

fn find_binding(
    v: &Vhost,
    source: &str,
    type_name: &str,
    destination: &str,
    props: &str,
) -> Option<Value> {
    vhost_bindings(v, &|s, kind, d| {
        s == source && kind == type_name && d == destination
    })
    .into_iter()
    .find(|b| b["properties_key"] == props)
}

pub async fn bind(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, destination)): Path<BindingPath>,
    body: Bytes,
) -> ApiResult<Response> {
    let (dkind, type_name) = destination_kind(&kind)?;
    let f = Fields::from_body(
        &body,
        &[
            "routing_key",
            "arguments",
            "source",
            "destination",
            "destination_type",
            "vhost",
            "properties_key",
        ],
    )?;
    let routing_key = f.stringish("routing_key")?.unwrap_or_default();
    let arguments = f.table("arguments")?;
    let v = vhost_for(&state, &caller, &vhost)?;
    // As AMQP's queue.bind and exchange.bind (and RabbitMQ's API, which uses them), line
    // feeds and returns are dropped from the names; the routing key keeps them.
    let source = source.replace(['\n', '\r'], "");
    let destination = destination.replace(['\n', '\r'], "");
    let source = exchange_name(&source);
    if source.is_empty() {
        return Err(ApiError::access_refused());
    }
    // As AMQP checks a bind: write on the destination, read on the source.
    check(
        &state,
        &caller,
        &vhost,
        type_name,
        &destination,
        Access::Write,
    )?;
    check(&state, &caller, &vhost, "exchange", source, Access::Read)?;
    v.bind(source, &destination, dkind, &routing_key, &arguments, 0)
        .map_err(amqp_error)?;
    let location = format!(
        "{}/{}",
        encode_segment(&destination),
        encode_segment(&properties_key(&routing_key, &arguments))
    );
    let mut response = StatusCode::CREATED.into_response();
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

pub async fn unbind(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, source, kind, destination, props)): Path<(String, String, String, String, String)>,
) -> ApiResult<Response> {
    let (dkind, type_name) = destination_kind(&kind)?;
    let v = vhost_for(&state, &caller, &vhost)?;
    let source = exchange_name(&source).to_owned();
    let binding = find_binding(&v, &source, type_name, &destination, &props)
        .ok_or_else(ApiError::not_found)?;
    if source.is_empty() {
        return Err(ApiError::access_refused());
    }
    check(
        &state,
        &caller,
        &vhost,
        type_name,
        &destination,
        Access::Write,
    )?;
    check(&state, &caller, &vhost, "exchange", &source, Access::Read)?;
    let routing_key = binding["routing_key"].as_str().unwrap_or_default();
    let arguments = match &binding["arguments"] {
        Value::Object(o) => crate::store::field_json::json_to_table(o).unwrap_or_default(),
        _ => FieldTable::default(),
    };
    // The stored arguments are matched by value; find the binding's own table.
    let arguments = v
        .exchange(&source)
        .and_then(|x| {
            x.bindings().into_iter().find(|b| {
                b.destination.name() == destination
                    && matches!(
                        (&b.destination, dkind),
                        (Destination::Queue(_), DestinationKind::Queue)
                            | (Destination::Exchange(_), DestinationKind::Exchange)
                    )
                    && b.routing_key == routing_key
                    && properties_key(&b.routing_key, &b.arguments) == props
            })
        })
        .map_or(arguments, |b| b.arguments);
    v.unbind(&source, &destination, dkind, routing_key, &arguments, 0)
        .map_err(amqp_error)?;
    Ok(no_content())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_keep_their_status_and_transient_failures_are_503() {
        let status = |e: AmqpError| amqp_error(e).status();
        assert_eq!(
            status(crate::error::not_found("no queue 'q' in vhost '/'")),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(crate::error::precondition_failed("inequivalent arg")),
            StatusCode::BAD_REQUEST
        );
        for e in [
            AmqpError::queue_down("/", "q", "warren@n1"),
            AmqpError::no_majority("declare queue 'q' in vhost '/'"),
            AmqpError::not_leader("declare queue 'q' in vhost '/'", None),
            AmqpError::timed_out("declare queue 'q' in vhost '/'"),
        ] {
            assert_eq!(status(e), StatusCode::SERVICE_UNAVAILABLE);
        }
        let admin = |e: AmqpError| crate::http::vhosts::admin_error(e.into()).status();
        assert_eq!(
            admin(AmqpError::timed_out("create vhost 'v'")),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            admin(AmqpError::new(
                crate::error::INTERNAL_ERROR,
                "cannot write definitions"
            )),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn properties_keys_quote_as_rabbitmq() {
        let none = FieldTable::default();
        assert_eq!(properties_key("", &none), "~");
        assert_eq!(properties_key("rk.1", &none), "rk.1");
        assert_eq!(properties_key("a.#", &none), "a.%23");
        assert_eq!(properties_key("a b/c~d%e", &none), "a+b%2Fc%7Ed%25e");
        let mut args = FieldTable::default();
        args.insert("k".into(), amq_protocol::types::AMQPValue::LongLongInt(1));
        let key = properties_key("rk", &args);
        assert!(key.starts_with("rk~") && key.len() == 3 + 6, "{key}");
        assert_eq!(key, properties_key("rk", &args.clone()));
    }

    #[test]
    fn location_segments_are_percent_encoded() {
        assert_eq!(encode_segment("a.%23"), "a.%2523");
        assert_eq!(encode_segment("probe-bq"), "probe-bq");
        assert_eq!(encode_segment("~"), "~");
        assert_eq!(encode_segment("a+b%2Fc%7Ed%25e"), "a%2Bb%252Fc%257Ed%2525e");
    }
}
