//! Cluster-wide listings: every node lists what it holds itself (its own queues, its client
//! connections, their channels and consumers), and a node asked for a listing merges its own
//! with what each linked node answers. Each object names its `node`.
//!
//! A queue is listed by its home node, which has its figures; a queue whose home cannot be
//! reached is listed by the node asked, with the state `down`, as RabbitMQ lists it.

use super::AppState;
use crate::cluster::rpc::Service;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// The service that answers listings for other nodes.
pub const GATHER: Service = 40;
/// How long a listing waits for another node's part.
const WAIT: Duration = Duration::from_secs(5);

/// What is listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Queues,
    Connections,
    Channels,
    Consumers,
    /// The node itself, as `/api/nodes` shows it.
    Node,
    /// What the node adds to the cluster's totals in `/api/overview`.
    Totals,
}

/// A listing asked of a node.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ask {
    pub kind: Kind,
    /// One vhost only.
    pub vhost: Option<String>,
    /// One queue only (with `vhost`), in detail.
    pub name: Option<String>,
}

/// What renders this node's own objects for a listing.
pub type Own = fn(&AppState, &Ask) -> Vec<Value>;

/// Answers other nodes' listings with this node's own objects, as `own` renders them.
pub fn serve(state: &AppState, own: Own) {
    // The cluster keeps its handlers: this one holds the broker and the cluster weakly, so
    // that a broker that stops is dropped.
    let weak = Held::of(state);
    state.cluster.handle(
        GATHER,
        Arc::new(move |_node: String, body: Bytes| {
            let state = weak.upgrade();
            Box::pin(async move {
                let state = state.ok_or("stopping")?;
                let ask: Ask =
                    serde_json::from_slice(&body).map_err(|e| format!("bad listing: {e}"))?;
                let items = own(&state, &ask);
                serde_json::to_vec(&items)
                    .map(Bytes::from)
                    .map_err(|e| e.to_string())
            })
        }),
    );
}

/// An [`AppState`] that holds the broker and the cluster weakly (its other parts hold
/// neither).
struct Held {
    broker: std::sync::Weak<crate::broker::Broker>,
    cluster: std::sync::Weak<crate::cluster::Cluster>,
    sampler: Arc<super::sampler::Sampler>,
    listeners: Arc<Vec<super::ListenerInfo>>,
    stopping: tokio::sync::watch::Receiver<bool>,
    heavy_lists: Arc<tokio::sync::Semaphore>,
    list_wait: Duration,
    heavy_scrapes: Arc<tokio::sync::Semaphore>,
    imports: Arc<tokio::sync::Mutex<()>>,
}

impl Held {
    fn of(s: &AppState) -> Self {
        Self {
            broker: Arc::downgrade(&s.broker),
            cluster: Arc::downgrade(&s.cluster),
            sampler: s.sampler.clone(),
            listeners: s.listeners.clone(),
            stopping: s.stopping.clone(),
            heavy_lists: s.heavy_lists.clone(),
            list_wait: s.list_wait,
            heavy_scrapes: s.heavy_scrapes.clone(),
            imports: s.imports.clone(),
        }
    }

    fn upgrade(&self) -> Option<AppState> {
        Some(AppState {
            broker: self.broker.upgrade()?,
            cluster: self.cluster.upgrade()?,
            sampler: self.sampler.clone(),
            listeners: self.listeners.clone(),
            stopping: self.stopping.clone(),
            heavy_lists: self.heavy_lists.clone(),
            list_wait: self.list_wait,
            heavy_scrapes: self.heavy_scrapes.clone(),
            imports: self.imports.clone(),
        })
    }
}

/// What the other linked nodes list of `kind` (in `vhost`, if given). A node that does not
/// answer in time is left out.
pub async fn from_peers(state: &AppState, kind: Kind, vhost: Option<&str>) -> Vec<Value> {
    ask_peers(
        state,
        &Ask {
            kind,
            vhost: vhost.map(str::to_owned),
            name: None,
        },
        state.cluster.linked(),
    )
    .await
}

/// Queue `name` of `vhost` as its home node `node` shows it, if it answers.
pub async fn queue_from(state: &AppState, node: &str, vhost: &str, name: &str) -> Option<Value> {
    let ask = Ask {
        kind: Kind::Queues,
        vhost: Some(vhost.to_owned()),
        name: Some(name.to_owned()),
    };
    ask_peers(state, &ask, vec![node.to_owned()])
        .await
        .into_iter()
        .next()
}

async fn ask_peers(state: &AppState, ask: &Ask, nodes: Vec<String>) -> Vec<Value> {
    let Ok(body) = serde_json::to_vec(ask) else {
        return Vec::new();
    };
    let mut calls = tokio::task::JoinSet::new();
    for node in nodes {
        let cluster = state.cluster.clone();
        let body = body.clone();
        calls.spawn(async move {
            match cluster.call(&node, GATHER, &body, WAIT).await {
                Ok(answer) => serde_json::from_slice::<Vec<Value>>(&answer).unwrap_or_default(),
                Err(e) => {
                    tracing::debug!(node, error = %e, "no listing from a node");
                    Vec::new()
                }
            }
        });
    }
    let mut out = Vec::new();
    while let Some(part) = calls.join_next().await {
        out.extend(part.unwrap_or_default());
    }
    out
}
