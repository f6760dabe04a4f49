//! `/api/definitions`: export and import in RabbitMQ's format, so definitions move between
//! RabbitMQ and Warren. An import is checked whole before anything is applied: what Warren
//! cannot honour (operator policies, topic permissions, other hashing algorithms, stream
//! queues, shovel and federation parameters, global parameters other than the cluster name,
//! bindings of objects that will not exist) is refused with a reason instead of being dropped.
//! One import runs at a time, on a blocking thread, and once begun it is applied whole even if
//! its client leaves.

use super::AppState;
use super::auth::Caller;
use super::body::{Fields, split_tags};
use super::error::{ApiError, ApiResult, no_content, ok};
use super::topology::exchange_name;
use super::users::{SHA256, check_hash, user_object};
use super::vhosts::admin_error;
use crate::broker::admin::Password;
use crate::broker::exchange::{ExchangeKind, ExchangeSpec};
use crate::broker::policy::{Policy, PolicyKind};
use crate::broker::queue::QueueSpec;
use crate::broker::vhost::{DestinationKind, Vhost};
use crate::store::document::{SNAPSHOT_GROUP_KEY, header, vhost_object};
use crate::store::field_json::table_to_json;
use amq_protocol::types::FieldTable;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};

/// A vhost's exchanges, queues and bindings as definitions; `with_vhost` adds the `vhost`
/// key to each (the whole-node export has it, a vhost's export does not).
fn topology(v: &Vhost, with_vhost: bool) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let tag = |mut o: Value| {
        if with_vhost {
            o["vhost"] = json!(v.name.as_ref());
        }
        o
    };
    let mut queues = v.queues();
    queues.sort_by(|a, b| a.name().cmp(b.name()));
    let qs = queues
        .iter()
        .filter(|q| q.owner().is_none())
        .map(|q| {
            tag(json!({
                "name": q.name(),
                "durable": q.durable(),
                "auto_delete": q.auto_delete(),
                "arguments": table_to_json(q.arguments()),
            }))
        })
        .collect();
    let mut exchanges = v.exchanges();
    exchanges.sort_by(|a, b| a.name().cmp(b.name()));
    let xs = exchanges
        .iter()
        .filter(|x| !x.name().is_empty() && !x.name().starts_with("amq."))
        .map(|x| {
            tag(json!({
                "name": x.name(),
                "type": x.spec.kind.as_str(),
                "durable": x.spec.durable,
                "auto_delete": x.spec.auto_delete,
                "internal": x.spec.internal,
                "arguments": table_to_json(&x.spec.arguments),
            }))
        })
        .collect();
    let mut bs = Vec::new();
    for x in &exchanges {
        if x.name().is_empty() {
            continue;
        }
        for b in x.bindings() {
            // Bindings to an exclusive queue go with it.
            if let crate::broker::exchange::Destination::Queue(q) = &b.destination
                && q.owner().is_some()
            {
                continue;
            }
            bs.push(tag(json!({
                "source": x.name(),
                "destination": b.destination.name(),
                "destination_type": if b.destination.is_queue() { "queue" } else { "exchange" },
                "routing_key": b.routing_key,
                "arguments": table_to_json(&b.arguments),
            })));
        }
    }
    (qs, xs, bs)
}

fn limits_parameter(v: &Vhost) -> Option<Value> {
    let limits = v.meta().limits;
    (!limits.is_empty()).then(|| {
        json!({"value": limits, "vhost": v.name.as_ref(), "component": "vhost-limits", "name": "limits"})
    })
}

pub async fn export(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require_admin()?;
    let b = &state.broker;
    let mut vhosts = b.vhosts();
    vhosts.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = header();
    out.insert(
        "users".into(),
        Value::Array(b.users.list().iter().map(user_object).collect()),
    );
    out.insert(
        "vhosts".into(),
        Value::Array(
            vhosts
                .iter()
                .map(|v| {
                    let meta = v.meta();
                    vhost_object(
                        &v.name,
                        &meta.description,
                        &meta.tags,
                        meta.default_queue_type.as_deref(),
                    )
                })
                .collect(),
        ),
    );
    out.insert(
        "permissions".into(),
        Value::Array(
            b.users
                .permissions()
                .iter()
                .map(|(u, v, p)| {
                    json!({"user": u, "vhost": v, "configure": p.configure.as_str(), "write": p.write.as_str(), "read": p.read.as_str()})
                })
                .collect(),
        ),
    );
    out.insert("topic_permissions".into(), json!([]));
    out.insert(
        "parameters".into(),
        Value::Array(vhosts.iter().filter_map(|v| limits_parameter(v)).collect()),
    );
    let cluster_name = b
        .cluster_name_if_set()
        .map(|name| json!({"name": "cluster_name", "value": name}));
    out.insert(
        "global_parameters".into(),
        json!(Vec::from_iter(cluster_name)),
    );
    out.insert(
        "policies".into(),
        Value::Array(
            vhosts
                .iter()
                .flat_map(|v| {
                    v.policies()
                        .into_iter()
                        .map(|p| super::policies::policy_json(&v.name, &p))
                })
                .collect(),
        ),
    );
    let (mut qs, mut xs, mut bs) = (Vec::new(), Vec::new(), Vec::new());
    for v in &vhosts {
        let (q, x, bi) = topology(v, true);
        qs.extend(q);
        xs.extend(x);
        bs.extend(bi);
    }
    out.insert("queues".into(), Value::Array(qs));
    out.insert("exchanges".into(), Value::Array(xs));
    out.insert("bindings".into(), Value::Array(bs));
    Ok(ok(Value::Object(out)))
}

pub async fn export_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let Some(v) = state.broker.vhost(&vhost) else {
        return Err(ApiError::bad_request("vhost_not_found"));
    };
    let mut out = header();
    let (qs, xs, bs) = topology(&v, false);
    let mut parameters = Vec::new();
    if let Some(mut p) = limits_parameter(&v) {
        if let Some(o) = p.as_object_mut() {
            o.remove("vhost");
        }
        parameters.push(p);
    }
    out.insert("parameters".into(), Value::Array(parameters));
    out.insert(
        "policies".into(),
        Value::Array(
            v.policies()
                .into_iter()
                .map(|p| {
                    let mut p = super::policies::policy_json(&v.name, &p);
                    if let Some(o) = p.as_object_mut() {
                        o.remove("vhost");
                    }
                    p
                })
                .collect(),
        ),
    );
    out.insert("queues".into(), Value::Array(qs));
    out.insert("exchanges".into(), Value::Array(xs));
    out.insert("bindings".into(), Value::Array(bs));
    Ok(ok(Value::Object(out)))
}

// ------------------------------------------------------------------------------------- import

/// A vhost's default queue type as imported: `None` leaves it as it is, `Some(None)` takes it
/// away.
type DefaultQueueType = Option<Option<String>>;

#[derive(Debug, Default)]
struct Plan {
    /// Name, description, tags and default queue type.
    vhosts: Vec<(String, String, Vec<String>, DefaultQueueType)>,
    users: Vec<(String, Password, Vec<String>)>,
    permissions: Vec<(String, String, String, String, String)>,
    limits: Vec<(String, BTreeMap<String, i64>)>,
    exchanges: Vec<(String, ExchangeSpec)>,
    queues: Vec<(String, QueueSpec)>,
    bindings: Vec<(String, String, String, DestinationKind, String, FieldTable)>,
    policies: Vec<(String, Policy)>,
    operator_policies: Vec<(String, Policy)>,
    /// The `cluster_name` global parameter, if the document has one (whole imports only).
    cluster_name: Option<String>,
}

fn items<'a>(top: &'a Fields, key: &str) -> ApiResult<&'a [Value]> {
    match top.raw(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(ApiError::bad_request(format!("'{key}' must be a list"))),
    }
}

fn item(v: &Value, what: &str, allowed: &[&str]) -> ApiResult<Fields> {
    Fields::from_value(v.clone(), allowed).map_err(|e| match e {
        ApiError::Json { reason, .. } => ApiError::bad_request(format!(
            "in {what}: {}",
            reason
                .as_str()
                .map_or_else(|| reason.to_string(), str::to_owned)
        )),
        other => other,
    })
}

fn required_string(f: &Fields, what: &str, key: &str) -> ApiResult<String> {
    f.stringish(key)?
        .ok_or_else(|| ApiError::bad_request(format!("{what} has no '{key}'")))
}

/// Reads and checks a definitions document; `vhost` is the vhost of a vhost-level import.
fn plan(state: &AppState, body: &[u8], vhost: Option<&str>) -> ApiResult<Plan> {
    let value = serde_json::from_slice::<Value>(body)
        .map_err(|_| ApiError::bad_request("failed_to_parse_json"))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("failed_to_parse_json"));
    }
    let top = Fields::from_value(
        value,
        &[
            "rabbit_version",
            "rabbitmq_version",
            "product_name",
            "product_version",
            "users",
            "vhosts",
            "permissions",
            "topic_permissions",
            "parameters",
            "global_parameters",
            "policies",
            "queues",
            "exchanges",
            "bindings",
            // The cluster's own state in Warren's definitions snapshot; not imported.
            SNAPSHOT_GROUP_KEY,
        ],
    )?;
    let mut plan = Plan::default();
    for p in items(&top, "global_parameters")? {
        let f = item(p, "a global parameter", &["name", "value"])?;
        let name = required_string(&f, "a global parameter", "name")?;
        match name.as_str() {
            // Each RabbitMQ cluster's own identity: Warren has none to set, and importing
            // another cluster's would not make this node that cluster.
            "internal_cluster_id" => {}
            // Applied by a whole import; a vhost's import leaves the cluster alone.
            "cluster_name" => {
                let value = f.string("value")?.ok_or_else(|| {
                    ApiError::bad_request("the cluster_name global parameter needs a string value")
                })?;
                if vhost.is_none() {
                    plan.cluster_name = Some(value);
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "global parameter '{other}' is not supported by Warren"
                )));
            }
        }
    }
    if !items(&top, "topic_permissions")?.is_empty() {
        return Err(ApiError::bad_request(
            "topic permissions are not supported by Warren",
        ));
    }
    let mut known_vhosts: BTreeSet<String> = state
        .broker
        .vhosts()
        .iter()
        .map(|v| v.name.to_string())
        .collect();
    let mut known_users: BTreeSet<String> = state
        .broker
        .users
        .list()
        .into_iter()
        .map(|u| u.name)
        .collect();
    if vhost.is_none() {
        for v in items(&top, "vhosts")? {
            let f = item(
                v,
                "a vhost",
                &[
                    "name",
                    "description",
                    "tags",
                    "metadata",
                    "default_queue_type",
                    "limits",
                ],
            )?;
            let name = required_string(&f, "a vhost", "name")?;
            let meta = match f.raw("metadata") {
                Some(Value::Object(m)) => m.clone(),
                _ => Map::new(),
            };
            let description = f
                .string("description")?
                .or_else(|| {
                    meta.get("description")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or_default();
            let tags = match f.tags("tags")? {
                Some(t) => t,
                None => match meta.get("tags") {
                    Some(Value::Array(a)) => a
                        .iter()
                        .filter_map(|t| t.as_str().map(str::to_owned))
                        .collect(),
                    Some(Value::String(s)) => split_tags(s),
                    _ => Vec::new(),
                },
            };
            // Where RabbitMQ puts it: at the top (3.11 on) or in the metadata.
            let default_queue_type = match f.string("default_queue_type")? {
                Some(t) => Some(t),
                None => meta
                    .get("default_queue_type")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            };
            let default_queue_type = match default_queue_type {
                Some(t) => Some(super::vhosts::queue_type_setting(&t)?),
                None => None,
            };
            known_vhosts.insert(name.clone());
            plan.vhosts
                .push((name, description, tags, default_queue_type));
        }
        for u in items(&top, "users")? {
            let f = item(
                u,
                "a user",
                &[
                    "name",
                    "password_hash",
                    "password",
                    "hashing_algorithm",
                    "tags",
                    "limits",
                ],
            )?;
            let name = required_string(&f, "a user", "name")?;
            let Some(tags) = f.tags("tags")? else {
                return Err(ApiError::bad_request("tags_not_present"));
            };
            let password = match (f.string("password")?, f.string("password_hash")?) {
                (Some(p), None) => Password::Clear(p),
                (None, Some(h)) => {
                    check_hash(
                        &h,
                        Some(f.string("hashing_algorithm")?.as_deref().unwrap_or(SHA256)),
                    )?;
                    Password::Hash(h)
                }
                (None, None) => Password::Hash(String::new()),
                (Some(_), Some(_)) => {
                    return Err(ApiError::bad_request(
                        "both_password_and_password_hash_are_provided",
                    ));
                }
            };
            if !matches!(f.raw("limits"), None | Some(Value::Null))
                && !matches!(f.raw("limits"), Some(Value::Object(o)) if o.is_empty())
            {
                return Err(ApiError::bad_request(format!(
                    "user limits (of '{name}') are not supported by Warren"
                )));
            }
            known_users.insert(name.clone());
            plan.users.push((name, password, tags));
        }
        for p in items(&top, "permissions")? {
            let f = item(
                p,
                "a permission",
                &["user", "vhost", "configure", "write", "read"],
            )?;
            let user = required_string(&f, "a permission", "user")?;
            let v = required_string(&f, "a permission", "vhost")?;
            let [c, w, r] = ["configure", "write", "read"].map(|k| f.string(k));
            let (c, w, r) = (
                c?.unwrap_or_default(),
                w?.unwrap_or_default(),
                r?.unwrap_or_default(),
            );
            if !known_vhosts.contains(&v) {
                return Err(ApiError::bad_request(json!(["no_such_vhost", v])));
            }
            if !known_users.contains(&user) {
                return Err(ApiError::bad_request(json!(["no_such_user", user])));
            }
            if let Err(why) = crate::auth::Permission::new(&c, &w, &r) {
                return Err(ApiError::bad_request(json!(["invalid_regexp", why])));
            }
            plan.permissions.push((user, v, c, w, r));
        }
    }
    let vhost_of = |f: &Fields, what: &str| -> ApiResult<String> {
        let v = match vhost {
            Some(v) => v.to_owned(),
            None => required_string(f, what, "vhost")?,
        };
        if known_vhosts.contains(&v) {
            Ok(v)
        } else {
            Err(ApiError::bad_request(json!(["no_such_vhost", v])))
        }
    };
    for p in items(&top, "parameters")? {
        let f = item(p, "a parameter", &["value", "vhost", "component", "name"])?;
        let component = required_string(&f, "a parameter", "component")?;
        if component == "operator_policy" {
            // An operator policy, as RabbitMQ exports them (and Warren's snapshot holds them).
            let what = "an operator policy";
            let v = vhost_of(&f, what)?;
            let name = required_string(&f, what, "name")?;
            let value = item(
                f.raw("value").unwrap_or(&Value::Null),
                what,
                &["pattern", "apply-to", "definition", "priority"],
            )?;
            plan.operator_policies
                .push((v, super::policies::parse_operator_policy(&name, &value)?));
            continue;
        }
        if component != "vhost-limits" {
            return Err(ApiError::bad_request(format!(
                "runtime parameters of component '{component}' are not supported by Warren"
            )));
        }
        let v = vhost_of(&f, "a parameter")?;
        let mut limits = BTreeMap::new();
        if let Some(Value::Object(values)) = f.raw("value") {
            for (k, n) in values {
                let Some(n) = n.as_i64() else {
                    return Err(ApiError::bad_request(format!(
                        "limit {k} of vhost '{v}' must be an integer"
                    )));
                };
                if !crate::broker::vhost::VHOST_LIMITS.contains(&k.as_str()) {
                    return Err(ApiError::bad_request(format!(
                        "unknown limit '{k}' for vhost '{v}'"
                    )));
                }
                limits.insert(k.clone(), n);
            }
        }
        plan.limits.push((v, limits));
    }
    for p in items(&top, "policies")? {
        let what = "a policy";
        let f = item(
            p,
            what,
            &[
                "vhost",
                "name",
                "pattern",
                "apply-to",
                "definition",
                "priority",
            ],
        )?;
        let v = vhost_of(&f, what)?;
        let name = required_string(&f, what, "name")?;
        plan.policies
            .push((v, super::policies::parse_policy(&name, &f)?));
    }
    for x in items(&top, "exchanges")? {
        let f = item(
            x,
            "an exchange",
            &[
                "name",
                "vhost",
                "type",
                "durable",
                "auto_delete",
                "internal",
                "arguments",
                "argument_types",
            ],
        )?;
        let what = "an exchange";
        f.require(&[
            "name",
            "type",
            "durable",
            "auto_delete",
            "internal",
            "arguments",
        ])
        .map_err(|_| {
            ApiError::bad_request(format!(
                "{what} needs name, type, durable, auto_delete, internal and arguments"
            ))
        })?;
        let v = vhost_of(&f, what)?;
        let kind_name = required_string(&f, what, "type")?;
        let kind = ExchangeKind::parse(&kind_name)
            .ok_or_else(|| ApiError::bad_request(format!("invalid exchange type '{kind_name}'")))?;
        plan.exchanges.push((
            v,
            ExchangeSpec {
                name: required_string(&f, what, "name")?,
                kind,
                durable: f.boolean("durable")?.unwrap_or(false),
                auto_delete: f.boolean("auto_delete")?.unwrap_or(false),
                internal: f.boolean("internal")?.unwrap_or(false),
                arguments: f.arguments()?,
            },
        ));
    }
    for q in items(&top, "queues")? {
        let what = "a queue";
        let f = item(
            q,
            what,
            &[
                "name",
                "vhost",
                "durable",
                "auto_delete",
                "arguments",
                "argument_types",
                "type",
                // A queue's home in Warren's definitions snapshot: an import declares its
                // queues on the node it runs on.
                "node",
            ],
        )?;
        f.require(&["name", "durable", "auto_delete", "arguments"])
            .map_err(|_| {
                ApiError::bad_request(format!(
                    "{what} needs name, durable, auto_delete and arguments"
                ))
            })?;
        let v = vhost_of(&f, what)?;
        let name = required_string(&f, what, "name")?;
        let mut arguments = f.arguments()?;
        if let Some(t) = f.string("type")? {
            if !matches!(t.as_str(), "classic" | "quorum") {
                return Err(ApiError::bad_request(format!(
                    "queue '{name}' is of type '{t}'; Warren's queues are classic or quorum"
                )));
            }
            // A quorum queue's type stands in its arguments, as a declared one has it.
            if t == "quorum" && !arguments.inner().contains_key("x-queue-type") {
                arguments.insert(
                    "x-queue-type".into(),
                    amq_protocol::types::AMQPValue::LongString(t.into()),
                );
            }
        }
        let spec = QueueSpec {
            name,
            durable: f.boolean("durable")?.unwrap_or(false),
            exclusive: false,
            auto_delete: f.boolean("auto_delete")?.unwrap_or(false),
            arguments,
        };
        // What declaring it would refuse (a stream queue, a bad argument) refuses the import.
        crate::broker::vhost::validate_queue_arguments(&spec, &v).map_err(|e| {
            ApiError::bad_request(format!("queue '{}' in vhost '{v}': {}", spec.name, e.text))
        })?;
        plan.queues.push((v, spec));
    }
    let mut known_objects = Objects::new();
    if !items(&top, "bindings")?.is_empty() {
        for v in state.broker.vhosts() {
            let entry = known_objects.entry(v.name.to_string()).or_default();
            entry
                .0
                .extend(v.exchanges().iter().map(|x| x.name().to_owned()));
            entry
                .1
                .extend(v.queues().iter().map(|q| q.name().to_owned()));
        }
        for (v, x) in &plan.exchanges {
            let entry = known_objects.entry(v.clone()).or_default();
            entry.0.insert(x.name.clone());
        }
        for (v, q) in &plan.queues {
            known_objects
                .entry(v.clone())
                .or_default()
                .1
                .insert(q.name.clone());
        }
        // A vhost the import creates has the built-in exchanges.
        for (v, _, _, _) in &plan.vhosts {
            let entry = known_objects.entry(v.clone()).or_default();
            for x in [
                "amq.direct",
                "amq.fanout",
                "amq.headers",
                "amq.match",
                "amq.topic",
                "amq.rabbitmq.trace",
            ] {
                entry.0.insert(x.to_owned());
            }
        }
    }
    for b in items(&top, "bindings")? {
        let what = "a binding";
        let f = item(
            b,
            what,
            &[
                "source",
                "vhost",
                "destination",
                "destination_type",
                "routing_key",
                "arguments",
                "argument_types",
            ],
        )?;
        let v = vhost_of(&f, what)?;
        let kind = match required_string(&f, what, "destination_type")?.as_str() {
            "queue" => DestinationKind::Queue,
            "exchange" => DestinationKind::Exchange,
            other => {
                return Err(ApiError::bad_request(format!(
                    "invalid destination_type '{other}'"
                )));
            }
        };
        let source = exchange_name(&required_string(&f, what, "source")?).to_owned();
        let destination = required_string(&f, what, "destination")?;
        // A binding whose ends will not exist would be skipped: refuse it instead.
        let (exchanges, queues) = objects_of(&mut known_objects, &v);
        if source.is_empty() || !exchanges.contains(&source) {
            return Err(ApiError::bad_request(format!(
                "binding source exchange '{source}' does not exist in vhost '{v}'"
            )));
        }
        let (found, noun) = match kind {
            DestinationKind::Queue => (queues.contains(&destination), "queue"),
            DestinationKind::Exchange => (exchanges.contains(&destination), "exchange"),
        };
        if !found {
            return Err(ApiError::bad_request(format!(
                "binding destination {noun} '{destination}' does not exist in vhost '{v}'"
            )));
        }
        plan.bindings.push((
            v,
            source,
            destination,
            kind,
            f.stringish("routing_key")?.unwrap_or_default(),
            f.arguments()?,
        ));
    }
    for (name, _, _, _) in &plan.vhosts {
        ApiError::check_name("vhost", name)?;
    }
    for (_, x) in &plan.exchanges {
        ApiError::check_name("exchange", &x.name)?;
    }
    for (_, q) in &plan.queues {
        ApiError::check_name("queue", &q.name)?;
    }
    Ok(plan)
}

/// The exchanges and queues of a vhost once an import is applied: those it has and those the
/// import declares.
type Objects = BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>;

fn objects_of<'a>(known: &'a mut Objects, vhost: &str) -> &'a (BTreeSet<String>, BTreeSet<String>) {
    known.entry(vhost.to_owned()).or_default()
}

/// What has been applied so far, with `done` of the step under way.
fn progress(applied: &[String], done: usize, step: &str) -> Vec<String> {
    let mut p = applied.to_vec();
    p.push(format!("{done} {step}"));
    p
}

/// An error that stopped the import at `what`, naming what it had applied before.
fn stopped(e: ApiError, what: &str, applied: &[String]) -> ApiError {
    match e {
        ApiError::Json {
            status,
            error,
            reason,
        } => {
            let reason = reason
                .as_str()
                .map_or_else(|| reason.to_string(), str::to_owned);
            let before = if applied.is_empty() {
                "nothing".to_owned()
            } else {
                applied.join(", ")
            };
            ApiError::new(
                status,
                error,
                format!(
                    "definitions import stopped at {what}: {reason}; applied before it: {before}"
                ),
            )
        }
        other => other,
    }
}

/// Logs how far a big import has come: every few thousand objects, or every few seconds.
struct Progress {
    total: usize,
    done: usize,
    logged_done: usize,
    logged_at: std::time::Instant,
    started: std::time::Instant,
}

/// The queues of one vhost handed to it at a time in an import: each group is committed
/// together, so a big import takes few round trips of the cluster's log.
const QUEUE_GROUP: usize = 2000;

impl Progress {
    const EVERY_OBJECTS: usize = 5000;
    const EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    fn new(total: usize, started: std::time::Instant) -> Self {
        Self {
            total,
            done: 0,
            logged_done: 0,
            logged_at: started,
            started,
        }
    }

    /// One more object of `step` applied.
    fn one(&mut self, step: &str) {
        self.many(step, 1);
    }

    /// `n` more objects of `step` applied.
    fn many(&mut self, step: &str, n: usize) {
        self.done += n;
        if self.done - self.logged_done >= Self::EVERY_OBJECTS
            || self.logged_at.elapsed() >= Self::EVERY
        {
            tracing::info!(
                done = self.done,
                total = self.total,
                step,
                elapsed_ms = self.started.elapsed().as_millis() as u64,
                "definitions import under way"
            );
            self.logged_done = self.done;
            self.logged_at = std::time::Instant::now();
        }
    }
}

fn apply(state: &AppState, caller: &Caller, plan: Plan) -> ApiResult<()> {
    let b = &state.broker;
    let started = std::time::Instant::now();
    let counts = (
        plan.vhosts.len(),
        plan.users.len(),
        plan.permissions.len(),
        plan.policies.len() + plan.operator_policies.len(),
        plan.exchanges.len(),
        plan.queues.len(),
        plan.bindings.len(),
    );
    let mut progress_log = Progress::new(
        counts.0 + counts.1 + counts.2 + counts.3 + counts.4 + counts.5 + counts.6,
        started,
    );
    // The plan was checked whole, but a storage error can still stop it half-way: the error
    // then says what had been applied before it.
    let mut applied: Vec<String> = Vec::new();
    if let Some(name) = &plan.cluster_name {
        b.set_cluster_name(name).map_err(|e| {
            stopped(
                ApiError::internal(e.to_string()),
                "the cluster name",
                &applied,
            )
        })?;
        applied.push("the cluster name".into());
    }
    let mut done = 0;
    for (name, description, tags, default_queue_type) in plan.vhosts {
        let what = format!("vhost {name}");
        if b.put_vhost(&name, &description, tags, default_queue_type)
            .map_err(|e| stopped(admin_error(e), &what, &progress(&applied, done, "vhosts")))?
        {
            b.set_permission(caller.name(), &name, ".*", ".*", ".*")
                .map_err(|e| stopped(admin_error(e), &what, &progress(&applied, done, "vhosts")))?;
        }
        done += 1;
        progress_log.one("vhosts");
    }
    applied.push(format!("{done} vhosts"));
    done = 0;
    for (name, password, tags) in plan.users {
        b.put_user(&name, password, tags).map_err(|e| {
            stopped(
                admin_error(e),
                &format!("user {name}"),
                &progress(&applied, done, "users"),
            )
        })?;
        done += 1;
        progress_log.one("users");
    }
    applied.push(format!("{done} users"));
    done = 0;
    for (user, vhost, c, w, r) in plan.permissions {
        b.set_permission(&user, &vhost, &c, &w, &r).map_err(|e| {
            stopped(
                admin_error(e),
                &format!("the permissions of {user} in vhost {vhost}"),
                &progress(&applied, done, "permissions"),
            )
        })?;
        done += 1;
        progress_log.one("permissions");
    }
    applied.push(format!("{done} permissions"));
    for (vhost, limits) in plan.limits {
        for (k, n) in limits {
            b.set_vhost_limit(&vhost, &k, Some(n)).map_err(|e| {
                stopped(
                    admin_error(e),
                    &format!("limit {k} of vhost {vhost}"),
                    &applied,
                )
            })?;
        }
    }
    applied.push("the vhost limits".into());
    for (kind, one, what, policies) in [
        (PolicyKind::Policy, "policy", "policies", plan.policies),
        (
            PolicyKind::Operator,
            "operator policy",
            "operator policies",
            plan.operator_policies,
        ),
    ] {
        done = 0;
        for (vhost, policy) in policies {
            if let Some(v) = b.vhost(&vhost) {
                let at = format!("{one} {} in vhost {vhost}", policy.name);
                v.set_policy_of(kind, policy).map_err(|e| {
                    stopped(
                        ApiError::internal(e.text),
                        &at,
                        &progress(&applied, done, what),
                    )
                })?;
            }
            done += 1;
            progress_log.one("policies");
        }
        applied.push(format!("{done} {what}"));
    }
    // As RabbitMQ: an object that exists already with other attributes is left as it is.
    for (vhost, spec) in plan.exchanges {
        if let Some(v) = b.vhost(&vhost) {
            let name = spec.name.clone();
            if let Err(e) = v.declare_exchange(spec) {
                tracing::warn!(%vhost, exchange = %name, error = %e, "definitions import: exchange left as it is");
            }
        }
        progress_log.one("exchanges");
    }
    // Queues are declared a group at a time (one commit per group), in the document's order.
    let mut queues = plan.queues.into_iter().peekable();
    while let Some((vhost, first)) = queues.next() {
        let mut group = vec![first];
        while group.len() < QUEUE_GROUP
            && let Some((_, spec)) = queues.next_if(|(v, _)| *v == vhost)
        {
            group.push(spec);
        }
        let Some(v) = b.vhost(&vhost) else {
            progress_log.many("queues", group.len());
            continue;
        };
        let n = group.len();
        for (name, declared) in v.import_queues(group) {
            if let Err(e) = declared {
                tracing::warn!(%vhost, queue = %name, error = %e, "definitions import: queue left as it is");
            }
        }
        progress_log.many("queues", n);
    }
    for (vhost, source, destination, kind, key, args) in plan.bindings {
        if let Some(v) = b.vhost(&vhost)
            && let Err(e) = v.bind(&source, &destination, kind, &key, &args, 0)
        {
            tracing::warn!(%vhost, %source, %destination, error = %e, "definitions import: binding skipped");
        }
        progress_log.one("bindings");
    }
    let (vhosts, users, permissions, policies, exchanges, queues, bindings) = counts;
    tracing::info!(
        user = caller.name(),
        vhosts,
        users,
        permissions,
        policies,
        exchanges,
        queues,
        bindings,
        duration_ms = started.elapsed().as_millis() as u64,
        "definitions imported"
    );
    Ok(())
}

/// Reads the document and applies it, one import at a time: a second import while one runs
/// gets 409. The (size-limited) body is read before the lock is tried, so a client slow to
/// send its document holds up no other import; checking and applying run on a blocking
/// thread and finish even if the client has gone.
async fn run_import(
    state: AppState,
    caller: Caller,
    request: Request,
    vhost: Option<String>,
) -> ApiResult<Response> {
    let body = match Bytes::from_request(request, &()).await {
        Ok(body) => body,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    let Ok(lock) = state.imports.clone().try_lock_owned() else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            "another definitions import is in progress; try again once it has finished",
        ));
    };
    let applied = tokio::task::spawn_blocking(move || {
        let _lock = lock;
        let plan = plan(&state, &body, vhost.as_deref())?;
        // The import's changes reach the definitions log together, with one sync at the end.
        let store = state.broker.definitions.clone();
        let (applied, stored) = store.batch(|| apply(&state, &caller, plan));
        applied?;
        stored.map_err(|e| {
            tracing::error!(error = %e, "definitions import: cannot write definitions");
            ApiError::internal("definitions import: cannot write definitions")
        })
    })
    .await;
    match applied {
        Ok(result) => result.map(|()| no_content()),
        Err(e) => Err(ApiError::internal(format!(
            "definitions import failed: {e}"
        ))),
    }
}

pub async fn import(
    State(state): State<AppState>,
    caller: Caller,
    request: Request,
) -> ApiResult<Response> {
    caller.require_admin()?;
    run_import(state, caller, request, None).await
}

pub async fn import_vhost(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
    request: Request,
) -> ApiResult<Response> {
    caller.require_admin()?;
    if state.broker.vhost(&vhost).is_none() {
        return Err(ApiError::vhost_not_found());
    }
    run_import(state, caller, request, Some(vhost)).await
}

#[cfg(test)]
mod import_errors {
    use super::*;

    #[test]
    fn an_import_stopped_part_way_says_where_and_what_was_applied() {
        let applied = progress(&["the cluster name".to_owned()], 2, "vhosts");
        let e = stopped(ApiError::internal("disk full"), "vhost v3", &applied);
        let ApiError::Json { reason, .. } = e else {
            panic!("{e:?}");
        };
        assert_eq!(
            reason,
            "definitions import stopped at vhost v3: disk full; applied before it: the cluster name, 2 vhosts"
        );
    }
}

#[cfg(test)]
mod one_import_at_a_time {
    use super::*;
    use crate::config::Config;
    use crate::http::sampler::Sampler;
    use std::sync::Arc;
    use std::time::Duration;

    fn state(data: &std::path::Path) -> AppState {
        let config = Config {
            data_dir: data.to_path_buf(),
            ..Config::default()
        };
        let cluster = crate::cluster::Cluster::new(&config).expect("cluster secret");
        let broker = crate::broker::Broker::open(config).expect("broker opens");
        let (_, stopping) = tokio::sync::watch::channel(false);
        AppState {
            broker,
            sampler: Arc::new(Sampler::default()),
            listeners: Arc::new(Vec::new()),
            stopping,
            heavy_lists: Arc::new(tokio::sync::Semaphore::new(crate::http::HEAVY_LISTS)),
            list_wait: Duration::from_secs(1),
            heavy_scrapes: Arc::new(tokio::sync::Semaphore::new(crate::http::HEAVY_SCRAPES)),
            imports: Arc::new(tokio::sync::Mutex::new(())),
            cluster,
        }
    }

    fn import_of_one_queue() -> Request {
        Request::new(axum::body::Body::from(
            r#"{"queues":[{"name":"q","vhost":"/","durable":true,"auto_delete":false,"arguments":{}}]}"#,
        ))
    }

    #[tokio::test]
    async fn an_import_while_another_runs_is_refused_with_409_and_applies_nothing() {
        let data = tempfile::tempdir().unwrap();
        let state = state(data.path());
        let caller = Caller {
            user: state.broker.users.get("guest").expect("the default user"),
        };
        let running = state.imports.clone().try_lock_owned().unwrap();
        let refused = run_import(state.clone(), caller.clone(), import_of_one_queue(), None)
            .await
            .expect_err("refused while another import runs");
        assert_eq!(refused.status(), StatusCode::CONFLICT);
        assert!(state.broker.vhost("/").unwrap().queue("q").is_none());
        drop(running);
        let done = run_import(state.clone(), caller, import_of_one_queue(), None)
            .await
            .expect("applied once the other import is over");
        assert_eq!(done.status(), StatusCode::NO_CONTENT);
        assert!(state.broker.vhost("/").unwrap().queue("q").is_some());
    }

    /// The import's changes are committed to the cluster's metadata when it answers, and a
    /// broker opened on the same directory has them all.
    #[tokio::test]
    async fn an_import_is_on_disk_when_it_answers() {
        let data = tempfile::tempdir().unwrap();
        let first = state(data.path());
        let caller = Caller {
            user: first.broker.users.get("guest").expect("the default user"),
        };
        let body = r##"{
            "queues": [
                {"name":"a","vhost":"/","durable":true,"auto_delete":false,"arguments":{}},
                {"name":"b","vhost":"/","durable":true,"auto_delete":false,"arguments":{}}
            ],
            "exchanges": [{"name":"x","vhost":"/","type":"topic","durable":true,
                "auto_delete":false,"internal":false,"arguments":{}}],
            "bindings": [
                {"source":"x","vhost":"/","destination":"a","destination_type":"queue",
                    "routing_key":"k.*","arguments":{}},
                {"source":"x","vhost":"/","destination":"b","destination_type":"queue",
                    "routing_key":"#","arguments":{}}
            ]
        }"##;
        let request = Request::new(axum::body::Body::from(body));
        let done = run_import(first.clone(), caller, request, None)
            .await
            .unwrap();
        assert_eq!(done.status(), StatusCode::NO_CONTENT);
        // Committed to the cluster's metadata (a group of one here) when it answers.
        let committed = first.broker.metadata.as_ref().expect("on disk").state();
        committed.with_definitions(|d| {
            let v = &d.vhosts["/"];
            assert!(v.queues.contains_key("a") && v.queues.contains_key("b"));
            assert!(v.exchanges.contains_key("x"));
            assert_eq!(v.bindings.len(), 2);
        });
        first.broker.storage.shutdown();
        drop(first);
        let again = state(data.path());
        let v = again.broker.vhost("/").unwrap();
        assert!(v.queue("a").is_some() && v.queue("b").is_some());
        assert_eq!(v.exchange("x").expect("exchange x").bindings().len(), 2);
    }

    /// The definitions snapshot of a cluster's metadata is a document an import takes: with
    /// the types of its arguments.
    #[tokio::test]
    async fn a_definitions_snapshot_imports_with_its_argument_types() {
        use amq_protocol::types::AMQPValue;
        let data = tempfile::tempdir().unwrap();
        let state = state(data.path());
        let caller = Caller {
            user: state.broker.users.get("guest").expect("the default user"),
        };
        let mut d = crate::store::definitions::Definitions::default();
        let mut args = FieldTable::default();
        args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(5));
        let mut v = crate::store::definitions::VhostDefinitions::default();
        v.queues.insert(
            "typed".into(),
            crate::store::definitions::QueueDefinition {
                auto_delete: false,
                arguments: args.clone(),
                node: Some("warren@elsewhere".into()),
            },
        );
        let mut definition = serde_json::Map::new();
        definition.insert("max-length".into(), serde_json::json!(100));
        v.operator_policies.insert(
            "cap".into(),
            crate::store::definitions::PolicyDefinition {
                pattern: "^typed$".into(),
                apply_to: "queues".into(),
                priority: 1,
                definition,
            },
        );
        v.limits.insert("max-queues".into(), 50);
        d.vhosts.insert("/".into(), v);
        let hash = {
            use sha2::Digest;
            let salt = [1u8, 2, 3, 4];
            let digest = sha2::Sha256::new()
                .chain_update(salt)
                .chain_update(b"pw")
                .finalize();
            let mut bytes = salt.to_vec();
            bytes.extend_from_slice(&digest);
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
        };
        d.users.insert(
            "app".into(),
            crate::store::definitions::UserDefinition {
                password_hash: hash,
                tags: vec!["monitoring".into()],
            },
        );
        let mut doc = crate::store::document::to_document(&d);
        doc.insert(
            SNAPSHOT_GROUP_KEY.into(),
            serde_json::json!({"last_applied": null}),
        );
        let body = serde_json::to_vec(&doc).unwrap();
        let done = run_import(state.clone(), caller, Request::new(body.into()), None)
            .await
            .unwrap();
        assert_eq!(done.status(), StatusCode::NO_CONTENT);
        let v = state.broker.vhost("/").unwrap();
        let q = v.queue("typed").unwrap();
        assert_eq!(q.arguments(), &args);
        assert_eq!(v.policies_of(PolicyKind::Operator).len(), 1);
        assert_eq!(v.meta().limits.get("max-queues"), Some(&50));
        assert!(state.broker.users.get("app").is_some());
    }
}
