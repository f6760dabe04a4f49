//! The HTTP face of the store: Kubernetes REST paths, list and watch, the status and scale
//! subresources, and errors as `Status` objects.

use crate::store::{
    ApiError, Filter, Part, PatchKind, ResourceType, Result, Selector, Store, at_path, set_path,
};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a watch with bookmarks waits idle before it sends one.
pub const BOOKMARK_EVERY: Duration = Duration::from_secs(10);

/// The router of the fake API server.
pub fn router(store: Arc<Store>) -> Router {
    router_with(store, BOOKMARK_EVERY)
}

/// The same, with bookmarks after `bookmark_every` of quiet (a test need not wait 10 s).
pub fn router_with(store: Arc<Store>, bookmark_every: Duration) -> Router {
    Router::new().fallback(handle).with_state(ApiState {
        store,
        bookmark_every,
    })
}

#[derive(Debug, Clone)]
struct ApiState {
    store: Arc<Store>,
    bookmark_every: Duration,
}

fn reply(code: StatusCode, body: &Value) -> Response {
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(e: &ApiError) -> Response {
    reply(
        StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &e.to_status(),
    )
}

/// A request's target: the type, the namespace, the name and the subresource.
#[derive(Debug)]
struct Target {
    rt: ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_path(store: &Store, path: &str) -> Result<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return Err(ApiError::new(404, "NotFound", format!("no route {path}"))),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, more @ ..] => (Some((*ns).to_owned()), {
            let mut v = vec![*plural];
            v.extend_from_slice(more);
            v
        }),
        other => (None, other.to_vec()),
    };
    let plural = rest
        .first()
        .ok_or_else(|| ApiError::new(404, "NotFound", format!("no route {path}")))?;
    let rt = store.resource_type(group, version, plural).ok_or_else(|| {
        ApiError::new(
            404,
            "NotFound",
            format!(
                "the server could not find the requested resource ({group}/{version} {plural})"
            ),
        )
    })?;
    Ok(Target {
        rt,
        namespace,
        name: rest.get(1).map(|s| (*s).to_owned()),
        sub: rest.get(2).map(|s| (*s).to_owned()),
    })
}

async fn handle(
    State(ApiState {
        store,
        bookmark_every,
    }): State<ApiState>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if uri.path() == "/version" {
        return reply(
            StatusCode::OK,
            &json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-sim", "platform": "linux/amd64"}),
        );
    }
    if uri.path() == "/healthz" || uri.path() == "/readyz" || uri.path() == "/livez" {
        return "ok".into_response();
    }
    let target = match parse_path(&store, uri.path()) {
        Ok(t) => t,
        Err(e) => return error(&e),
    };
    let result = serve(
        &store,
        bookmark_every,
        &method,
        target,
        &query,
        &headers,
        &body,
    )
    .await;
    match result {
        Ok(r) => r,
        Err(e) => error(&e),
    }
}

fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Value> {
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("yaml"));
    match serde_json::from_slice(body) {
        Ok(v) => Ok(v),
        Err(_) if yaml => serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body is not YAML: {e}"))),
        Err(e) => Err(ApiError::bad_request(format!("the body is not JSON: {e}"))),
    }
}

async fn serve(
    store: &Arc<Store>,
    bookmark_every: Duration,
    method: &Method,
    t: Target,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response> {
    let ns = t.namespace.clone().unwrap_or_default();
    if t.rt.namespaced && t.name.is_some() && t.namespace.is_none() {
        return Err(ApiError::bad_request(format!(
            "{} are namespaced: the path needs /namespaces/{{namespace}}",
            t.rt.plural
        )));
    }
    let part = match t.sub.as_deref() {
        None => Part::Main,
        Some("status") if t.rt.status => Part::Status,
        Some("scale") if t.rt.scale.is_some() => {
            return scale(store, method, &t, &ns, headers, body);
        }
        Some(other) => {
            return Err(ApiError::new(
                404,
                "NotFound",
                format!("{} has no subresource {other}", t.rt.plural),
            ));
        }
    };
    match (method, &t.name) {
        (&Method::GET, None) => {
            let filter = Filter {
                namespace: t.namespace.clone(),
                labels: Selector::parse(query.get("labelSelector").map_or("", String::as_str))?,
                fields: Filter::parse_fields(
                    query.get("fieldSelector").map_or("", String::as_str),
                )?,
            };
            if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                return watch(store, &t.rt, filter, query, bookmark_every);
            }
            let (items, rv) = store.list(&t.rt, &filter);
            Ok(reply(
                StatusCode::OK,
                &json!({
                    "apiVersion": t.rt.api_version(),
                    "kind": format!("{}List", t.rt.kind),
                    "metadata": {"resourceVersion": rv.to_string()},
                    "items": items,
                }),
            ))
        }
        (&Method::GET, Some(name)) => Ok(reply(StatusCode::OK, &store.get(&t.rt, &ns, name)?)),
        (&Method::POST, None) => {
            let obj = store.create(&t.rt, &ns, parse_body(headers, body)?)?;
            Ok(reply(StatusCode::CREATED, &obj))
        }
        (&Method::PUT, Some(name)) => {
            let obj = store.replace(&t.rt, &ns, name, part, parse_body(headers, body)?)?;
            Ok(reply(StatusCode::OK, &obj))
        }
        (&Method::PATCH, Some(name)) => {
            let kind = patch_kind(headers)?;
            let existed = store.get(&t.rt, &ns, name).is_ok();
            let obj = store.patch(&t.rt, &ns, name, part, kind, parse_body(headers, body)?)?;
            let code = if existed {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok(reply(code, &obj))
        }
        (&Method::DELETE, Some(name)) => {
            let obj = store.delete(&t.rt, &ns, name)?;
            Ok(reply(StatusCode::OK, &obj))
        }
        _ => Err(ApiError::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported here"),
        )),
    }
}

fn patch_kind(headers: &HeaderMap) -> Result<PatchKind> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    Ok(match ct.split(';').next().unwrap_or_default().trim() {
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            PatchKind::Merge
        }
        "application/json-patch+json" => PatchKind::Json,
        "application/apply-patch+yaml" | "application/apply-patch+json" => PatchKind::Apply,
        other => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!("the patch content type {other:?} is not supported"),
            ));
        }
    })
}

/// The scale subresource: reads and writes the replicas at the type's paths.
fn scale(
    store: &Store,
    method: &Method,
    t: &Target,
    ns: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Response> {
    let name = t.name.as_deref().unwrap_or_default();
    let paths = t.rt.scale.clone().expect("checked by the caller");
    let view = |obj: &Value| {
        let selector = match &paths.label_selector {
            Some(p) => at_path(obj, p).clone(),
            None => {
                // A StatefulSet's selector, as a string.
                let labels = obj["spec"]["selector"]["matchLabels"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_default();
                json!(labels)
            }
        };
        json!({
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {
                "name": obj["metadata"]["name"],
                "namespace": obj["metadata"]["namespace"],
                "uid": obj["metadata"]["uid"],
                "resourceVersion": obj["metadata"]["resourceVersion"],
                "creationTimestamp": obj["metadata"]["creationTimestamp"],
            },
            "spec": {"replicas": at_path(obj, &paths.spec_replicas).as_i64().unwrap_or(0)},
            "status": {
                "replicas": paths.status_replicas.as_deref().map_or(0, |p| at_path(obj, p).as_i64().unwrap_or(0)),
                "selector": selector,
            },
        })
    };
    let current = store.get(&t.rt, ns, name)?;
    let replicas = match *method {
        Method::GET => return Ok(reply(StatusCode::OK, &view(&current))),
        Method::PUT => {
            let s = parse_body(headers, body)?;
            if let Some(rv) = s["metadata"]["resourceVersion"].as_str()
                && !rv.is_empty()
                && Some(rv) != current["metadata"]["resourceVersion"].as_str()
            {
                return Err(ApiError::new(
                    409,
                    "Conflict",
                    "the object has been modified",
                ));
            }
            s["spec"]["replicas"].clone()
        }
        Method::PATCH => {
            let mut s = view(&current);
            let patch = parse_body(headers, body)?;
            match patch_kind(headers)? {
                PatchKind::Json => {
                    let ops: json_patch::Patch = serde_json::from_value(patch)
                        .map_err(|e| ApiError::bad_request(format!("bad JSON patch: {e}")))?;
                    json_patch::patch(&mut s, &ops)
                        .map_err(|e| ApiError::new(422, "Invalid", e.to_string()))?;
                }
                _ => json_patch::merge(&mut s, &patch),
            }
            s["spec"]["replicas"].clone()
        }
        _ => {
            return Err(ApiError::new(
                405,
                "MethodNotAllowed",
                "GET, PUT or PATCH a scale",
            ));
        }
    };
    let Some(n) = replicas.as_i64().filter(|n| *n >= 0) else {
        return Err(ApiError::new(
            422,
            "Invalid",
            "spec.replicas: Invalid value: must be a non-negative integer",
        ));
    };
    let mut patch = json!({});
    set_path(&mut patch, &paths.spec_replicas, json!(n));
    let updated = store.patch(&t.rt, ns, name, Part::Main, PatchKind::Merge, patch)?;
    Ok(reply(StatusCode::OK, &view(&updated)))
}

/// A watch: the missed changes since `resourceVersion` (or, without one, every object as
/// ADDED), then live ones, as newline-delimited JSON, until `timeoutSeconds`.
fn watch(
    store: &Arc<Store>,
    rt: &ResourceType,
    filter: Filter,
    query: &HashMap<String, String>,
    bookmark_every: Duration,
) -> Result<Response> {
    let since = query
        .get("resourceVersion")
        .filter(|v| !v.is_empty() && v.as_str() != "0")
        .map(|v| {
            v.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("bad resourceVersion {v:?}")))
        })
        .transpose()?;
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .unwrap_or(1800);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    let (backlog, rx) = store.subscribe(since)?;
    let id = rt.id();
    let mut initial: Vec<Value> = Vec::new();
    if since.is_none() {
        // Taken after subscribing: an object may appear in both, as real watches allow.
        let (items, _) = store.list(rt, &filter);
        initial = items
            .into_iter()
            .map(|o| json!({"type": "ADDED", "object": o}))
            .collect();
    }
    let wanted = {
        let id = id.clone();
        let filter = filter.clone();
        move |e: &crate::store::Event| e.resource == id && filter.matches(&e.object)
    };
    let missed: Vec<Value> = backlog
        .iter()
        .filter(|e| wanted(e))
        .map(|e| json!({"type": e.kind, "object": e.object}))
        .collect();
    let api_version = rt.api_version();
    let kind = rt.kind.clone();
    let store = store.clone();
    let live = futures::stream::unfold(
        (
            rx,
            tokio::time::Instant::now() + Duration::from_secs(timeout),
        ),
        move |(mut rx, deadline)| {
            let wanted = wanted.clone();
            let (api_version, kind, store) = (api_version.clone(), kind.clone(), store.clone());
            async move {
                loop {
                    let next = tokio::time::timeout_at(
                        deadline.min(tokio::time::Instant::now() + bookmark_every),
                        rx.recv(),
                    )
                    .await;
                    match next {
                        Ok(Ok(e)) if wanted(&e) => {
                            return Some((
                                json!({"type": e.kind, "object": e.object}),
                                (rx, deadline),
                            ));
                        }
                        Ok(Ok(_)) => {}
                        // Fell behind or the server stops: end the watch; the client resumes.
                        Ok(Err(_)) => return None,
                        Err(_) if tokio::time::Instant::now() >= deadline => return None,
                        Err(_) if bookmarks => {
                            let rv = store.resource_version().to_string();
                            let bookmark = json!({"type": "BOOKMARK", "object": {
                                "apiVersion": api_version, "kind": kind,
                                "metadata": {"resourceVersion": rv}
                            }});
                            return Some((bookmark, (rx, deadline)));
                        }
                        Err(_) => {}
                    }
                }
            }
        },
    );
    let stream = futures::stream::iter(initial.into_iter().chain(missed))
        .chain(live)
        .map(|v| Ok::<_, std::convert::Infallible>(Bytes::from(format!("{v}\n"))));
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(stream))
        .expect("a valid response"))
}
