//! The one place the operator talks to a broker: its management HTTP API (RabbitMQ's), with the
//! Instance's default-user credentials. Declarations are idempotent, as the API's PUTs are, so
//! a reconcile may repeat them; deletions of what is already gone succeed.

use crate::crd::binding::{BindingSpec, DestinationType};
use crate::crd::exchange::{ExchangeSpec, ExchangeType};
use crate::crd::queue::{QueueSpec, QueueType};
use crate::crd::vhost::VhostLimits;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

/// Characters kept as they are in a path segment; everything else (`/` in `%2F` above all) is
/// encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `s` percent-encoded for a URI path segment or userinfo.
pub(crate) fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// Why a call failed, in the words a status condition uses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// No answer (connection refused, timeout): the broker is starting or gone. Retried.
    #[error("the broker at {url} cannot be reached: {why}")]
    Unreachable { url: String, why: String },
    /// The broker answered with an error: the declaration is wrong (or conflicts with what the
    /// broker has) and retrying the same will not help until something changes.
    #[error("the broker refused {what} ({status}): {reason}")]
    Refused {
        what: String,
        status: u16,
        reason: String,
    },
    /// The broker answered something that is not its API.
    #[error("unexpected answer from the broker to {what}: {why}")]
    Invalid { what: String, why: String },
}

impl BrokerError {
    /// The `reason` of a status condition.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "BrokerUnreachable",
            Self::Refused { status: 401, .. } => "BrokerCredentialsRejected",
            Self::Refused { status: 404, .. } => "BrokerObjectMissing",
            Self::Refused { .. } => "BrokerRefused",
            Self::Invalid { .. } => "BrokerAnswerInvalid",
        }
    }

    /// Whether the same call may succeed later without a change to the resource.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            // A missing vhost (or source) may be declared by another resource meanwhile.
            Self::Refused { status, .. } => *status == 404 || *status >= 500,
            Self::Invalid { .. } => true,
        }
    }
}

/// A queue as the cluster lists it: where it lives and what it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOnNode {
    pub vhost: String,
    pub name: String,
    pub node: String,
    pub durable: bool,
    pub messages: u64,
}

/// The cluster as one broker sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterView {
    /// Every member with whether it is up.
    pub members: Vec<(String, bool)>,
    /// The node that leads the cluster's metadata, if one does.
    pub metadata_leader: Option<String>,
}

/// A client of one broker's management API.
#[derive(Debug, Clone)]
pub struct BrokerApi {
    client: reqwest::Client,
    base: String,
    user: String,
    password: String,
}

impl BrokerApi {
    /// `base` is like `http://demo.shop.svc:15672`.
    pub fn new(base: &str, user: &str, password: &str) -> Self {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .build()
            .expect("a client without TLS options builds");
        Self {
            client,
            base: base.trim_end_matches('/').to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        what: &str,
    ) -> Result<(StatusCode, Value), BrokerError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .client
            .request(method, &url)
            .basic_auth(&self.user, Some(&self.password));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|e| BrokerError::Unreachable {
            url: self.base.clone(),
            why: e.to_string(),
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| BrokerError::Unreachable {
            url: self.base.clone(),
            why: e.to_string(),
        })?;
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|e| BrokerError::Invalid {
                what: what.to_owned(),
                why: format!("{status}: {e}"),
            })?
        };
        if status.is_success() {
            return Ok((status, value));
        }
        let reason = match &value {
            Value::Object(o) => match o.get("reason") {
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
                None => value.to_string(),
            },
            _ => status.canonical_reason().unwrap_or("error").to_owned(),
        };
        Err(BrokerError::Refused {
            what: what.to_owned(),
            status: status.as_u16(),
            reason,
        })
    }

    /// A deletion: gone already is fine.
    async fn delete(&self, path: &str, what: &str) -> Result<(), BrokerError> {
        match self.call(Method::DELETE, path, None, what).await {
            Ok(_) => Ok(()),
            Err(BrokerError::Refused { status: 404, .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every queue of the cluster with its node and ready and unacknowledged messages
    /// (`/api/queues`, which lists the whole cluster from any node).
    pub async fn queues_by_node(&self) -> Result<Vec<QueueOnNode>, BrokerError> {
        let what = "the queues";
        let (_, v) = self
            .call(
                Method::GET,
                "/api/queues?columns=name,vhost,node,durable,messages",
                None,
                what,
            )
            .await?;
        let list = v.as_array().ok_or_else(|| BrokerError::Invalid {
            what: what.to_owned(),
            why: "not a list".to_owned(),
        })?;
        Ok(list
            .iter()
            .map(|q| QueueOnNode {
                vhost: q["vhost"].as_str().unwrap_or_default().to_owned(),
                name: q["name"].as_str().unwrap_or_default().to_owned(),
                node: q["node"].as_str().unwrap_or_default().to_owned(),
                durable: q["durable"].as_bool().unwrap_or(false),
                messages: q["messages"].as_u64().unwrap_or(0),
            })
            .collect())
    }

    /// The cluster's members and which are up (`/api/nodes`), and its metadata leader
    /// (`/api/overview`).
    pub async fn cluster(&self) -> Result<ClusterView, BrokerError> {
        let what = "the nodes";
        let (_, nodes) = self
            .call(Method::GET, "/api/nodes?columns=name,running", None, what)
            .await?;
        let nodes = nodes.as_array().ok_or_else(|| BrokerError::Invalid {
            what: what.to_owned(),
            why: "not a list".to_owned(),
        })?;
        let (_, overview) = self
            .call(
                Method::GET,
                "/api/overview?columns=cluster_metadata",
                None,
                "the overview",
            )
            .await?;
        Ok(ClusterView {
            members: nodes
                .iter()
                .filter_map(|n| Some((n["name"].as_str()?.to_owned(), n["running"] == true)))
                .collect(),
            metadata_leader: overview["cluster_metadata"]["leader"]
                .as_str()
                .map(str::to_owned),
        })
    }

    /// The broker answers and the credentials work (`/api/overview`).
    pub async fn check(&self) -> Result<Value, BrokerError> {
        Ok(self
            .call(Method::GET, "/api/overview", None, "the overview")
            .await?
            .1)
    }

    /// Creates the vhost if absent and sets its limits (absent limits are cleared).
    pub async fn declare_vhost(
        &self,
        name: &str,
        limits: Option<&VhostLimits>,
    ) -> Result<(), BrokerError> {
        let what = format!("vhost '{name}'");
        let v = seg(name);
        self.call(
            Method::PUT,
            &format!("/api/vhosts/{v}"),
            Some(json!({})),
            &what,
        )
        .await?;
        let limits = limits.cloned().unwrap_or_default();
        for (key, value) in [
            ("max-connections", limits.max_connections),
            ("max-queues", limits.max_queues),
        ] {
            let path = format!("/api/vhost-limits/{v}/{key}");
            match value {
                Some(n) => {
                    self.call(Method::PUT, &path, Some(json!({"value": n})), &what)
                        .await?;
                }
                None => self.delete(&path, &what).await?,
            }
        }
        Ok(())
    }

    pub async fn delete_vhost(&self, name: &str) -> Result<(), BrokerError> {
        self.delete(
            &format!("/api/vhosts/{}", seg(name)),
            &format!("vhost '{name}'"),
        )
        .await
    }

    pub async fn declare_queue(&self, spec: &QueueSpec) -> Result<(), BrokerError> {
        let mut arguments = serde_json::Map::from_iter(spec.arguments.clone());
        if spec.queue_type == QueueType::Quorum {
            arguments.insert("x-queue-type".into(), json!("quorum"));
        }
        let body = json!({
            "durable": spec.durable,
            "auto_delete": spec.auto_delete,
            "arguments": arguments,
        });
        self.call(
            Method::PUT,
            &format!("/api/queues/{}/{}", seg(&spec.vhost), seg(&spec.name)),
            Some(body),
            &format!("queue '{}' in vhost '{}'", spec.name, spec.vhost),
        )
        .await
        .map(drop)
    }

    pub async fn delete_queue(&self, vhost: &str, name: &str) -> Result<(), BrokerError> {
        self.delete(
            &format!("/api/queues/{}/{}", seg(vhost), seg(name)),
            &format!("queue '{name}' in vhost '{vhost}'"),
        )
        .await
    }

    pub async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<(), BrokerError> {
        let kind = match spec.exchange_type {
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Topic => "topic",
            ExchangeType::Headers => "headers",
        };
        let body = json!({
            "type": kind,
            "durable": spec.durable,
            "auto_delete": spec.auto_delete,
            "internal": spec.internal,
            "arguments": spec.arguments,
        });
        self.call(
            Method::PUT,
            &format!("/api/exchanges/{}/{}", seg(&spec.vhost), seg(&spec.name)),
            Some(body),
            &format!("exchange '{}' in vhost '{}'", spec.name, spec.vhost),
        )
        .await
        .map(drop)
    }

    pub async fn delete_exchange(&self, vhost: &str, name: &str) -> Result<(), BrokerError> {
        self.delete(
            &format!("/api/exchanges/{}/{}", seg(vhost), seg(name)),
            &format!("exchange '{name}' in vhost '{vhost}'"),
        )
        .await
    }

    fn binding_path(spec: &BindingSpec) -> String {
        let kind = match spec.destination_type {
            DestinationType::Queue => "q",
            DestinationType::Exchange => "e",
        };
        format!(
            "/api/bindings/{}/e/{}/{kind}/{}",
            seg(&spec.vhost),
            seg(&spec.source),
            seg(&spec.destination)
        )
    }

    fn binding_what(spec: &BindingSpec) -> String {
        format!(
            "binding of '{}' to '{}' with key '{}' in vhost '{}'",
            spec.source, spec.destination, spec.routing_key, spec.vhost
        )
    }

    /// Binding twice is harmless in RabbitMQ: the same binding stays one binding.
    pub async fn declare_binding(&self, spec: &BindingSpec) -> Result<(), BrokerError> {
        let body = json!({"routing_key": spec.routing_key, "arguments": spec.arguments});
        self.call(
            Method::POST,
            &Self::binding_path(spec),
            Some(body),
            &Self::binding_what(spec),
        )
        .await
        .map(drop)
    }

    /// Finds the binding's `properties_key` among the bindings between its source and
    /// destination, then deletes it; none matching is success.
    pub async fn delete_binding(&self, spec: &BindingSpec) -> Result<(), BrokerError> {
        let what = Self::binding_what(spec);
        let path = Self::binding_path(spec);
        let list = match self.call(Method::GET, &path, None, &what).await {
            Ok((_, list)) => list,
            Err(BrokerError::Refused { status: 404, .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        let wanted = Value::Object(serde_json::Map::from_iter(spec.arguments.clone()));
        let key = list.as_array().into_iter().flatten().find_map(|b| {
            let same = b["routing_key"] == spec.routing_key.as_str()
                && (b["arguments"] == wanted
                    || (spec.arguments.is_empty() && b["arguments"].is_null()));
            same.then(|| b["properties_key"].as_str().map(str::to_owned))
                .flatten()
        });
        match key {
            Some(props) => self.delete(&format!("{path}/{}", seg(&props)), &what).await,
            None => Ok(()),
        }
    }
}
