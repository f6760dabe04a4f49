//! The management HTTP API (RabbitMQ's paths, fields and status codes, Basic auth, JSON) and
//! the Prometheus endpoint, both served with axum. Handlers read the broker's state directly
//! and change it through the same operations AMQP uses, so both see one set of rules.

pub mod auth;
mod body;
mod definitions;
mod error;
mod gather;
mod health;
mod list;
mod listings;
mod messages;
pub mod metrics;
mod overview;
mod peers;
mod policies;
pub mod sampler;
pub mod serve;
pub mod tls;
mod topology;
mod users;
mod vhosts;

use crate::broker::Broker;
use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use error::ApiError;
use sampler::Sampler;
use std::net::SocketAddr;
use std::sync::Arc;

/// A listener the node serves on, as `/api/overview` lists it.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    pub protocol: &'static str,
    pub addr: SocketAddr,
}

/// What every handler gets.
#[derive(Debug, Clone)]
pub struct AppState {
    pub broker: Arc<Broker>,
    pub sampler: Arc<Sampler>,
    pub listeners: Arc<Vec<ListenerInfo>>,
    /// True once the broker has begun to shut down (readiness then fails).
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Listings of many objects (queues, exchanges, bindings) being sent at once; more wait.
    pub heavy_lists: Arc<tokio::sync::Semaphore>,
    /// How long a listing waits for a place among them before it is answered 503 (the
    /// listeners' idle timeout, after which a stalled reader's listing has been ended).
    pub list_wait: std::time::Duration,
    /// Per-object and detailed Prometheus scrapes being rendered and sent at once (each
    /// holds every queue's metrics and then the whole text); more wait.
    pub heavy_scrapes: Arc<tokio::sync::Semaphore>,
    /// Held by the definitions import under way (one at a time).
    pub imports: Arc<tokio::sync::Mutex<()>>,
    /// This node's view of the cluster's nodes.
    pub cluster: Arc<crate::cluster::Cluster>,
}

/// Listings of many objects sent at once: each holds a handle on every object it lists until
/// its body has been sent.
pub const HEAVY_LISTS: usize = 4;

/// Per-object and detailed Prometheus scrapes rendered at once.
pub const HEAVY_SCRAPES: usize = 2;

impl AppState {
    /// A place among the [`HEAVY_LISTS`] listings being sent, waiting for one up to
    /// `list_wait`; past that the request is answered 503, so it never waits without end.
    pub async fn heavy_list_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        place(&self.heavy_lists, self.list_wait, "long listings").await
    }

    /// A place among the [`HEAVY_SCRAPES`], as [`heavy_list_permit`](Self::heavy_list_permit).
    pub async fn heavy_scrape_permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        place(&self.heavy_scrapes, self.list_wait, "per-object scrapes").await
    }
}

/// A permit of `places`, waiting at most `wait`; then 503 with a reason naming `what`.
async fn place(
    places: &Arc<tokio::sync::Semaphore>,
    wait: std::time::Duration,
    what: &str,
) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    match tokio::time::timeout(wait, places.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            format!("too many {what} are being sent at once; try again later"),
        )),
    }
}

/// Answers the cluster-wide listings of other nodes (queues, connections, channels,
/// consumers) with this node's own objects.
pub fn serve_listings(state: &AppState) {
    gather::serve(state, listings::own);
}

async fn not_found() -> Response {
    ApiError::not_found().into_response()
}

/// The management API's routes.
pub fn management_router(state: AppState) -> Router {
    Router::new()
        .route("/api/overview", get(overview::overview))
        .route(
            "/api/cluster-name",
            get(overview::cluster_name).put(overview::put_cluster_name),
        )
        .route("/api/whoami", get(overview::whoami))
        .route("/api/extensions", get(overview::extensions))
        .route("/api/nodes", get(overview::nodes))
        .route("/api/nodes/{node}", get(overview::node))
        .route(
            "/api/warren/drain",
            axum::routing::post(peers::drain).delete(peers::revive),
        )
        .route("/api/vhosts", get(vhosts::list))
        .route(
            "/api/vhosts/{vhost}",
            get(vhosts::show).put(vhosts::put).delete(vhosts::delete),
        )
        .route(
            "/api/vhosts/{vhost}/permissions",
            get(users::vhost_permissions),
        )
        .route(
            "/api/vhosts/{vhost}/connections",
            get(peers::vhost_connections),
        )
        .route("/api/vhosts/{vhost}/channels", get(peers::vhost_channels))
        .route("/api/vhost-limits", get(vhosts::limits_all))
        .route("/api/vhost-limits/{vhost}", get(vhosts::limits_of))
        .route(
            "/api/vhost-limits/{vhost}/{name}",
            put(vhosts::put_limit).delete(vhosts::delete_limit),
        )
        .route("/api/users", get(users::list))
        .route(
            "/api/users/without-permissions",
            get(users::without_permissions),
        )
        .route("/api/users/bulk-delete", post(users::bulk_delete))
        .route(
            "/api/users/{user}",
            get(users::show).put(users::put).delete(users::delete),
        )
        .route(
            "/api/users/{user}/permissions",
            get(users::user_permissions),
        )
        .route("/api/user-limits", get(users::limits_all))
        .route("/api/user-limits/{user}", get(users::limits_of))
        .route("/api/permissions", get(users::permissions))
        .route(
            "/api/permissions/{vhost}/{user}",
            get(users::show_permission)
                .put(users::put_permission)
                .delete(users::delete_permission),
        )
        .route("/api/exchanges", get(topology::exchanges))
        .route("/api/exchanges/{vhost}", get(topology::exchanges_in))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(topology::show_exchange)
                .put(topology::put_exchange)
                .delete(topology::delete_exchange),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/source",
            get(topology::exchange_bindings_source),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/destination",
            get(topology::exchange_bindings_destination),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/publish",
            post(messages::publish),
        )
        .route("/api/queues", get(topology::queues))
        .route("/api/queues/{vhost}", get(topology::queues_in))
        .route(
            "/api/queues/{vhost}/{name}",
            get(topology::show_queue)
                .put(topology::put_queue)
                .delete(topology::delete_queue),
        )
        .route(
            "/api/queues/{vhost}/{name}/bindings",
            get(topology::queue_bindings),
        )
        .route(
            "/api/queues/{vhost}/{name}/contents",
            delete(topology::purge_queue),
        )
        .route("/api/queues/{vhost}/{name}/get", post(messages::get))
        .route(
            "/api/warren/queues/{vhost}/{name}/messages",
            get(messages::query),
        )
        .route("/api/bindings", get(topology::bindings))
        .route("/api/bindings/{vhost}", get(topology::bindings_in))
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}",
            get(topology::bindings_between).post(topology::bind),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{kind}/{destination}/{props}",
            get(topology::show_binding).delete(topology::unbind),
        )
        .route("/api/connections", get(peers::connections))
        .route(
            "/api/connections/{name}",
            get(peers::show_connection).delete(peers::close_connection),
        )
        .route(
            "/api/connections/username/{user}",
            get(peers::user_connections).delete(peers::close_user_connections),
        )
        .route(
            "/api/connections/{name}/channels",
            get(peers::connection_channels),
        )
        .route("/api/channels", get(peers::channels))
        .route("/api/channels/{name}", get(peers::show_channel))
        .route("/api/consumers", get(peers::consumers))
        .route("/api/consumers/{vhost}", get(peers::consumers_in))
        .route(
            "/api/definitions",
            get(definitions::export).post(definitions::import),
        )
        .route(
            "/api/definitions/{vhost}",
            get(definitions::export_vhost).post(definitions::import_vhost),
        )
        .route("/api/policies", get(policies::list_all))
        .route("/api/policies/{vhost}", get(policies::list_vhost))
        .route(
            "/api/policies/{vhost}/{name}",
            get(policies::show)
                .put(policies::put)
                .delete(policies::delete),
        )
        .route("/api/operator-policies", get(policies::list_all_operator))
        .route(
            "/api/operator-policies/{vhost}",
            get(policies::list_vhost_operator),
        )
        .route(
            "/api/operator-policies/{vhost}/{name}",
            get(policies::show_operator)
                .put(policies::put_operator)
                .delete(policies::delete_operator),
        )
        .route("/api/parameters", get(overview::empty_list))
        .route("/api/global-parameters", get(overview::global_parameters))
        .route("/api/topic-permissions", get(overview::empty_list))
        .route("/api/feature-flags", get(overview::empty_list))
        .route("/api/healthchecks/node", get(health::node))
        .route("/api/healthchecks/node/{node}", get(health::named_node))
        .route("/api/health/checks/alarms", get(health::alarms))
        .route("/api/health/checks/local-alarms", get(health::local_alarms))
        .route(
            "/api/health/checks/virtual-hosts",
            get(health::virtual_hosts),
        )
        .route(
            "/api/health/checks/port-listener/{port}",
            get(health::port_listener),
        )
        .route(
            "/api/health/checks/protocol-listener/{protocol}",
            get(health::protocol_listener),
        )
        .route(
            "/api/health/checks/node-is-quorum-critical",
            get(health::quorum_critical),
        )
        .route(
            "/api/health/checks/node-is-mirror-sync-critical",
            get(health::single_node),
        )
        .route("/api/aliveness-test/{vhost}", get(health::aliveness))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(serve::drain_unread_body))
        // Outside the draining, so that a body that stopped arriving is logged with its 408.
        .layer(axum::middleware::from_fn(log_changes))
        .with_state(state)
}

/// Logs each request that may change something (every method but GET, HEAD and OPTIONS):
/// who asked for what, and how it ended. Reads are not logged: monitoring polls them.
/// Publishing and getting messages over HTTP (POSTs that change no definition, and that
/// tools may make in a loop) are logged at debug level only.
async fn log_changes(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use axum::http::Method;
    let method = request.method().clone();
    if matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    // Names are percent-encoded, so a `/` always separates segments.
    let messaging = method == Method::POST
        && matches!(
            path.split('/').collect::<Vec<_>>()[..],
            ["", "api", "exchanges", _, _, "publish"] | ["", "api", "queues", _, _, "get"]
        );
    let user = basic_user(request.headers()).unwrap_or_default();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    if messaging {
        tracing::debug!(%method, path, user, status, "management API message operation");
    } else {
        tracing::info!(%method, path, user, status, "management API change");
    }
    response
}

/// The user name of an HTTP Basic `Authorization` header (never the password).
fn basic_user(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?;
    let credentials = auth::basic_credentials(value).ok()?;
    Some(credentials.user().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_waiting_too_long_for_a_place_is_answered_503() {
        let places = Arc::new(tokio::sync::Semaphore::new(1));
        let held = place(&places, std::time::Duration::from_millis(10), "things")
            .await
            .unwrap();
        let refused = place(&places, std::time::Duration::from_millis(10), "things")
            .await
            .unwrap_err()
            .into_response();
        assert_eq!(
            refused.status(),
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        );
        drop(held);
        assert!(
            place(&places, std::time::Duration::from_millis(10), "things")
                .await
                .is_ok()
        );
    }
}
