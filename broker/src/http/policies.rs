//! `/api/policies` and `/api/operator-policies`: RabbitMQ's policies (pattern, apply-to,
//! priority, definition), for `policymaker` and `administrator` users in the vhosts they may
//! use, and operator policies, for administrators. Setting or deleting one re-applies the
//! vhost's policies to its queues and exchanges at once.

use super::AppState;
use super::auth::Caller;
use super::body::Fields;
use super::error::{ApiError, ApiResult, created_or_updated, no_content, ok};
use crate::broker::policy::{Policy, PolicyKind, effective_definition, term};
use crate::broker::vhost::Vhost;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use serde_json::{Map, Value, json};
use std::sync::Arc;

/// A policy as RabbitMQ's API shows it.
pub fn policy_json(vhost: &str, p: &Policy) -> Value {
    json!({
        "vhost": vhost,
        "name": p.name,
        "pattern": p.pattern,
        "apply-to": p.apply_to.name(),
        "definition": p.definition,
        "priority": p.priority,
    })
}

fn vhost_policies(v: &Vhost, kind: PolicyKind) -> impl Iterator<Item = Value> + '_ {
    v.policies_of(kind)
        .into_iter()
        .map(move |p| policy_json(&v.name, &p))
}

/// Policies are read and written by `policymaker` and `administrator` users; operator
/// policies are read by them too but written by administrators only, as in RabbitMQ.
fn require_writer(caller: &Caller, kind: PolicyKind) -> ApiResult<()> {
    match kind {
        PolicyKind::Policy => caller.require_policymaker(),
        PolicyKind::Operator => caller.require_admin(),
    }
}

/// The vhost, if the caller may manage its policies: 404 when it does not exist, 401 when
/// the caller may not use it.
fn policy_vhost(state: &AppState, caller: &Caller, name: &str) -> ApiResult<Arc<Vhost>> {
    caller.require_policymaker()?;
    let v = state.broker.vhost(name).ok_or_else(ApiError::not_found)?;
    if !caller.is_admin() && !caller.may_use_vhost(state, name) {
        return Err(ApiError::not_authorised(
            "User not authorised to access object",
        ));
    }
    Ok(v)
}

fn list_all_of(state: &AppState, caller: &Caller, kind: PolicyKind) -> ApiResult<Response> {
    caller.require_policymaker()?;
    let mut all = Vec::new();
    for v in state.broker.vhosts() {
        if caller.is_admin() || caller.may_use_vhost(state, &v.name) {
            all.extend(vhost_policies(&v, kind));
        }
    }
    Ok(ok(Value::Array(all)))
}

fn list_vhost_of(
    state: &AppState,
    caller: &Caller,
    vhost: &str,
    kind: PolicyKind,
) -> ApiResult<Response> {
    let v = policy_vhost(state, caller, vhost)?;
    Ok(ok(Value::Array(vhost_policies(&v, kind).collect())))
}

fn show_of(
    state: &AppState,
    caller: &Caller,
    vhost: &str,
    name: &str,
    kind: PolicyKind,
) -> ApiResult<Response> {
    let v = policy_vhost(state, caller, vhost)?;
    let p = v.policy_of(kind, name).ok_or_else(ApiError::not_found)?;
    Ok(ok(policy_json(&v.name, &p)))
}

/// Reads a policy from a JSON object with RabbitMQ's fields (`vhost` and `name` in it are
/// ignored, as RabbitMQ ignores them in a PUT).
pub fn parse_policy(name: &str, f: &Fields) -> ApiResult<Policy> {
    parse_policy_of(name, f, PolicyKind::Policy)
}

/// An operator policy's fields, as in a definitions document's `operator_policy` parameter.
pub fn parse_operator_policy(name: &str, f: &Fields) -> ApiResult<Policy> {
    parse_policy_of(name, f, PolicyKind::Operator)
}

fn parse_policy_of(name: &str, f: &Fields, kind: PolicyKind) -> ApiResult<Policy> {
    f.require(&["pattern", "definition"])?;
    let pattern = f
        .stringish("pattern")?
        .ok_or_else(|| ApiError::keys_missing(&["pattern"]))?;
    let definition = match f.raw("definition") {
        Some(Value::Object(d)) => d.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "field 'definition' must be a JSON object",
            ));
        }
    };
    let priority = match f.raw("priority") {
        None | Some(Value::Null) => 0,
        Some(v) => v.as_i64().ok_or_else(|| {
            ApiError::bad_request(format!(
                "Validation failed\n\npriority should be a number, actually was {}\n",
                term(v)
            ))
        })?,
    };
    let apply_to = f.string("apply-to")?.unwrap_or_else(|| "all".into());
    Policy::of_kind(kind, name, &pattern, &apply_to, priority, definition)
        .map_err(ApiError::bad_request)
}

fn put_of(
    state: &AppState,
    caller: &Caller,
    vhost: &str,
    name: &str,
    body: &[u8],
    kind: PolicyKind,
) -> ApiResult<Response> {
    require_writer(caller, kind)?;
    let v = state
        .broker
        .vhost(vhost)
        .ok_or_else(ApiError::vhost_not_found)?;
    if !caller.is_admin() && !caller.may_use_vhost(state, vhost) {
        return Err(ApiError::not_authorised(
            "User not authorised to access object",
        ));
    }
    let f = Fields::from_body(
        body,
        &[
            "pattern",
            "definition",
            "priority",
            "apply-to",
            "vhost",
            "name",
        ],
    )?;
    let policy = parse_policy_of(name, &f, kind)?;
    let created = v
        .set_policy_of(kind, policy)
        .map_err(|e| ApiError::internal(e.text))?;
    Ok(created_or_updated(created))
}

fn delete_of(
    state: &AppState,
    caller: &Caller,
    vhost: &str,
    name: &str,
    kind: PolicyKind,
) -> ApiResult<Response> {
    let v = policy_vhost(state, caller, vhost)?;
    if v.delete_policy_of(kind, name)
        .map_err(|e| ApiError::internal(e.text))?
    {
        Ok(no_content())
    } else {
        Err(ApiError::not_found())
    }
}

macro_rules! handlers {
    ($kind:expr, $list_all:ident, $list_vhost:ident, $show:ident, $put:ident, $delete:ident) => {
        pub async fn $list_all(
            State(state): State<AppState>,
            caller: Caller,
        ) -> ApiResult<Response> {
            list_all_of(&state, &caller, $kind)
        }

        pub async fn $list_vhost(
            State(state): State<AppState>,
            caller: Caller,
            Path(vhost): Path<String>,
        ) -> ApiResult<Response> {
            list_vhost_of(&state, &caller, &vhost, $kind)
        }

        pub async fn $show(
            State(state): State<AppState>,
            caller: Caller,
            Path((vhost, name)): Path<(String, String)>,
        ) -> ApiResult<Response> {
            show_of(&state, &caller, &vhost, &name, $kind)
        }

        pub async fn $put(
            State(state): State<AppState>,
            caller: Caller,
            Path((vhost, name)): Path<(String, String)>,
            body: Bytes,
        ) -> ApiResult<Response> {
            put_of(&state, &caller, &vhost, &name, &body, $kind)
        }

        pub async fn $delete(
            State(state): State<AppState>,
            caller: Caller,
            Path((vhost, name)): Path<(String, String)>,
        ) -> ApiResult<Response> {
            delete_of(&state, &caller, &vhost, &name, $kind)
        }
    };
}

handlers!(PolicyKind::Policy, list_all, list_vhost, show, put, delete);
handlers!(
    PolicyKind::Operator,
    list_all_operator,
    list_vhost_operator,
    show_operator,
    put_operator,
    delete_operator
);

/// What a queue object shows of its policies.
pub fn policy_fields(
    obj: &mut Map<String, Value>,
    policy: Option<&Policy>,
    operator: Option<&Policy>,
) {
    obj.insert(
        "policy".into(),
        policy.map_or(Value::Null, |p| json!(p.name)),
    );
    obj.insert(
        "operator_policy".into(),
        operator.map_or(Value::Null, |p| json!(p.name)),
    );
    obj.insert(
        "effective_policy_definition".into(),
        Value::Object(effective_definition(policy, operator)),
    );
}
