//! `/api/users`, `/api/permissions` and `/api/whoami`'s relatives: administrators only.

use super::AppState;
use super::auth::Caller;
use super::body::Fields;
use super::error::{ApiError, ApiResult, created_or_updated, no_content, ok};
use super::vhosts::admin_error;
use crate::auth::{Permission, User};
use crate::broker::admin::Password;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

pub use crate::store::document::SHA256;

pub fn user_object(u: &User) -> Value {
    json!({
        "name": u.name,
        "password_hash": u.password_hash,
        "hashing_algorithm": SHA256,
        "tags": u.tags,
        "limits": {},
    })
}

fn permission_object(user: &str, vhost: &str, p: &Permission) -> Value {
    json!({
        "user": user,
        "vhost": vhost,
        "configure": p.configure.as_str(),
        "write": p.write.as_str(),
        "read": p.read.as_str(),
    })
}

pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require_admin()?;
    let users: Vec<Value> = state.broker.users.list().iter().map(user_object).collect();
    Ok(ok(Value::Array(users)))
}

pub async fn without_permissions(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let with: Vec<String> = state
        .broker
        .users
        .permissions()
        .into_iter()
        .map(|(u, _, _)| u)
        .collect();
    let users: Vec<Value> = state
        .broker
        .users
        .list()
        .iter()
        .filter(|u| !with.contains(&u.name))
        .map(user_object)
        .collect();
    Ok(ok(Value::Array(users)))
}

pub async fn show(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let user = state
        .broker
        .users
        .get(&name)
        .ok_or_else(ApiError::not_found)?;
    Ok(ok(user_object(&user)))
}

/// Checks a hash given as `password_hash`: base64 of a 4-byte salt and a SHA-256 digest, or
/// empty for "no password".
pub fn check_hash(hash: &str, algorithm: Option<&str>) -> ApiResult<()> {
    if let Some(a) = algorithm
        && a != SHA256
    {
        return Err(ApiError::bad_request(format!(
            "hashing algorithm '{a}' is not supported; Warren stores {SHA256} hashes"
        )));
    }
    if hash.is_empty() {
        return Ok(());
    }
    match B64.decode(hash) {
        Err(_) => Err(ApiError::bad_request(json!(["not_base64", hash]))),
        Ok(bytes) if bytes.len() != 4 + 32 => Err(ApiError::bad_request(format!(
            "password_hash is not a {SHA256} hash (4 bytes of salt and 32 of SHA-256, base64-encoded)"
        ))),
        Ok(_) => Ok(()),
    }
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
            "password",
            "password_hash",
            "hashing_algorithm",
            "tags",
            "limits",
        ],
    )?;
    let Some(tags) = f.tags("tags")? else {
        return Err(ApiError::bad_request("tags_not_present"));
    };
    if f.has("limits") && !matches!(f.raw("limits"), Some(Value::Object(o)) if o.is_empty()) {
        return Err(ApiError::bad_request(
            "user limits are not supported by Warren",
        ));
    }
    let password = match (f.string("password")?, f.string("password_hash")?) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "both_password_and_password_hash_are_provided",
            ));
        }
        (Some(p), None) => Password::Clear(p),
        (None, Some(h)) => {
            check_hash(&h, f.string("hashing_algorithm")?.as_deref())?;
            Password::Hash(h)
        }
        // As RabbitMQ: a user given no password has none (it cannot log in with one).
        (None, None) => Password::Hash(String::new()),
    };
    let created = state
        .broker
        .put_user(&name, password, tags)
        .map_err(admin_error)?;
    Ok(created_or_updated(created))
}

pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    state.broker.delete_user(&name).map_err(admin_error)?;
    Ok(no_content())
}

/// `GET /api/user-limits`: Warren has no per-user limits, so none are ever set.
pub async fn limits_all(State(_state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require_admin()?;
    Ok(ok(json!([])))
}

/// `GET /api/user-limits/{user}`: an empty list for a user, 404 for no such user.
pub async fn limits_of(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    if state.broker.users.get(&name).is_none() {
        return Err(ApiError::not_found());
    }
    Ok(ok(json!([])))
}

pub async fn bulk_delete(
    State(state): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let f = Fields::from_body(&body, &["users"])?;
    f.require(&["users"])?;
    let Some(Value::Array(names)) = f.raw("users") else {
        return Err(ApiError::bad_request(
            "field 'users' must be a list of user names",
        ));
    };
    for n in names {
        let Value::String(name) = n else {
            return Err(ApiError::bad_request(
                "field 'users' must be a list of user names",
            ));
        };
        if state.broker.delete_user(name).is_err() {
            return Err(ApiError::bad_request(json!(["no_such_user", name])));
        }
    }
    Ok(no_content())
}

pub async fn user_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    if state.broker.users.get(&name).is_none() {
        return Err(ApiError::not_found());
    }
    let items: Vec<Value> = state
        .broker
        .users
        .permissions()
        .iter()
        .filter(|(u, _, _)| *u == name)
        .map(|(u, v, p)| permission_object(u, v, p))
        .collect();
    Ok(ok(Value::Array(items)))
}

pub async fn vhost_permissions(
    State(state): State<AppState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    if state.broker.vhost(&vhost).is_none() {
        return Err(ApiError::not_found());
    }
    let items: Vec<Value> = state
        .broker
        .users
        .permissions()
        .iter()
        .filter(|(_, v, _)| *v == vhost)
        .map(|(u, v, p)| {
            json!({
                "vhost": v,
                "user": u,
                "configure": p.configure.as_str(),
                "write": p.write.as_str(),
                "read": p.read.as_str(),
            })
        })
        .collect();
    Ok(ok(Value::Array(items)))
}

pub async fn permissions(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require_admin()?;
    let items: Vec<Value> = state
        .broker
        .users
        .permissions()
        .iter()
        .map(|(u, v, p)| permission_object(u, v, p))
        .collect();
    Ok(ok(Value::Array(items)))
}

pub async fn show_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let p = state
        .broker
        .users
        .permission(&user, &vhost)
        .ok_or_else(ApiError::not_found)?;
    Ok(ok(permission_object(&user, &vhost, &p)))
}

pub async fn put_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let f = Fields::from_body(&body, &["user", "vhost", "configure", "write", "read"])?;
    f.require(&["configure", "write", "read"])?;
    let configure = f.string("configure")?.unwrap_or_default();
    let write = f.string("write")?.unwrap_or_default();
    let read = f.string("read")?.unwrap_or_default();
    if state.broker.users.get(&user).is_none() || state.broker.vhost(&vhost).is_none() {
        return Err(ApiError::bad_request("vhost_or_user_not_found"));
    }
    for pattern in [&configure, &write, &read] {
        if let Err(why) = Permission::new(pattern, "", "") {
            return Err(ApiError::bad_request(json!([
                "invalid_regexp",
                pattern,
                why
            ])));
        }
    }
    let created = state
        .broker
        .set_permission(&user, &vhost, &configure, &write, &read)
        .map_err(admin_error)?;
    Ok(created_or_updated(created))
}

pub async fn delete_permission(
    State(state): State<AppState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    state
        .broker
        .clear_permission(&user, &vhost)
        .map_err(admin_error)?;
    Ok(no_content())
}
