//! The simulated cluster network. Every port of a Service with a cluster IP gets a local
//! listener that forwards each connection to a ready pod the Service selects (kube-proxy's
//! job); cluster DNS names (`<svc>.<ns>.svc`, `<pod>.<svc>.<ns>.svc`) resolve to those local
//! stand-ins, and an HTTP proxy lets HTTP clients use the names unchanged.

use crate::kubelet::{Pods, serving};
use crate::store::{Filter, Selector, Store, deleting, name_of, namespace_of};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug)]
struct Forwarder {
    addr: SocketAddr,
    uid: String,
    task: JoinHandle<()>,
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The Service listeners, by (namespace, service, port).
#[derive(Debug, Default)]
pub struct Network {
    forwarders: Mutex<HashMap<(String, String, i64), Forwarder>>,
}

/// A ready pod of the Service, and the local port of `target` on it.
fn endpoint(store: &Store, pods: &Pods, ns: &str, svc: &str, port: i64) -> Option<SocketAddr> {
    let svc_rt = store.resource_type("", "v1", "services")?;
    let pod_rt = store.resource_type("", "v1", "pods")?;
    let service = store.get(&svc_rt, ns, svc).ok()?;
    let sp = service["spec"]["ports"]
        .as_array()?
        .iter()
        .find(|p| p["port"].as_i64() == Some(port))?
        .clone();
    let selector = Selector::from_labels(service["spec"]["selector"].as_object()?);
    if selector.is_empty() {
        return None;
    }
    let (candidates, _) = store.list(
        &pod_rt,
        &Filter {
            namespace: Some(ns.to_owned()),
            labels: selector,
            fields: Vec::new(),
        },
    );
    let ready: Vec<&Value> = candidates.iter().filter(|p| serving(p)).collect();
    if ready.is_empty() {
        return None;
    }
    use rand::Rng;
    let pod = ready[rand::rng().random_range(0..ready.len())];
    let running = pods.lock().unwrap_or_else(|e| e.into_inner());
    let rt = running.get(&(ns.to_owned(), name_of(pod).to_owned()))?;
    let container_port = match &sp["targetPort"] {
        Value::String(n) => *rt.port_names.get(n)?,
        Value::Number(n) => n.as_i64()? as i32,
        _ => port as i32,
    };
    Some(SocketAddr::from((
        [127, 0, 0, 1],
        *rt.ports.get(&container_port)?,
    )))
}

async fn forward(
    listener: TcpListener,
    store: Arc<Store>,
    pods: Pods,
    ns: String,
    svc: String,
    port: i64,
) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        let Some(backend) = endpoint(&store, &pods, &ns, &svc, port) else {
            // No ready endpoint: the connection is refused, as by kube-proxy's reject rule.
            drop(inbound);
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = TcpStream::connect(backend).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

impl Network {
    /// Opens listeners for new Service ports and closes those of deleted Services.
    pub async fn sync(&self, store: &Arc<Store>, pods: &Pods) {
        let svc_rt = store.resource_type("", "v1", "services").expect("built in");
        let (services, _) = store.list(&svc_rt, &Filter::default());
        let mut wanted = Vec::new();
        for s in services.iter().filter(|s| !deleting(s)) {
            if s["spec"]["clusterIP"] == "None" {
                continue;
            }
            for p in s["spec"]["ports"].as_array().into_iter().flatten() {
                if let Some(port) = p["port"].as_i64() {
                    let uid = crate::store::uid_of(s).to_owned();
                    wanted.push((
                        (namespace_of(s).to_owned(), name_of(s).to_owned(), port),
                        uid,
                    ));
                }
            }
        }
        let missing: Vec<_> = {
            let mut f = self.forwarders.lock().unwrap_or_else(|e| e.into_inner());
            f.retain(|k, v| wanted.iter().any(|(w, uid)| w == k && *uid == v.uid));
            wanted
                .into_iter()
                .filter(|(k, _)| !f.contains_key(k))
                .collect()
        };
        for ((ns, svc, port), uid) in missing {
            let Ok(listener) = TcpListener::bind("127.0.0.1:0").await else {
                continue;
            };
            let Ok(addr) = listener.local_addr() else {
                continue;
            };
            let task = tokio::spawn(forward(
                listener,
                store.clone(),
                pods.clone(),
                ns.clone(),
                svc.clone(),
                port,
            ));
            self.forwarders
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((ns, svc, port), Forwarder { addr, uid, task });
        }
    }

    /// The local address of a Service's port.
    pub fn service_addr(&self, namespace: &str, service: &str, port: i64) -> Option<SocketAddr> {
        self.forwarders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(namespace.to_owned(), service.to_owned(), port))
            .map(|f| f.addr)
    }

    /// Resolves a cluster DNS name and port to its local stand-in: a Service's listener, or a
    /// pod's own port for `<pod>.<headless service>.<ns>.svc`.
    pub fn resolve(&self, pods: &Pods, host: &str, port: i64) -> Option<SocketAddr> {
        let host = host.trim_end_matches('.');
        let host = host.strip_suffix(".cluster.local").unwrap_or(host);
        if host == "127.0.0.1" || host == "localhost" {
            return Some(SocketAddr::from((
                [127, 0, 0, 1],
                u16::try_from(port).ok()?,
            )));
        }
        let parts: Vec<&str> = host.split('.').collect();
        match parts.as_slice() {
            [svc, ns, "svc"] | [svc, ns] => self.service_addr(ns, svc, port),
            [pod, _svc, ns, "svc"] => {
                let running = pods.lock().unwrap_or_else(|e| e.into_inner());
                let rt = running.get(&((*ns).to_owned(), (*pod).to_owned()))?;
                let local = rt.ports.get(&i32::try_from(port).ok()?)?;
                Some(SocketAddr::from(([127, 0, 0, 1], *local)))
            }
            _ => None,
        }
    }
}

/// What the HTTP proxy needs.
#[derive(Debug, Clone)]
pub struct ProxyState {
    pub network: Arc<Network>,
    pub pods: Pods,
    pub client: reqwest::Client,
}

/// A forward HTTP proxy: `http://<cluster DNS name>:<port>/...` reaches the local stand-in.
pub fn proxy_router(state: ProxyState) -> Router {
    Router::new().fallback(proxy).with_state(state)
}

fn bad_gateway(why: String) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        [(header::CONTENT_TYPE, "text/plain")],
        format!("kube-sim proxy: {why}\n"),
    )
        .into_response()
}

async fn proxy(State(s): State<ProxyState>, req: Request) -> Response {
    let uri = req.uri().clone();
    let authority = uri.authority().map(ToString::to_string).or_else(|| {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
    });
    let Some(authority) = authority else {
        return bad_gateway("the request names no host".into());
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h.to_owned(), p.parse::<i64>().unwrap_or(80)),
        None => (authority.clone(), 80),
    };
    let Some(addr) = s.network.resolve(&s.pods, &host, port) else {
        return bad_gateway(format!("{host}:{port} resolves to nothing ready"));
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let method = req.method().clone();
    let mut headers = req.headers().clone();
    headers.remove(header::HOST);
    headers.remove("proxy-connection");
    headers.remove("proxy-authorization");
    let Ok(body) = axum::body::to_bytes(req.into_body(), 64 << 20).await else {
        return bad_gateway("the request body cannot be read".into());
    };
    let sent = s
        .client
        .request(method, format!("http://{addr}{path}"))
        .headers(headers)
        .body(body)
        .send()
        .await;
    match sent {
        Err(e) => bad_gateway(format!("{host}:{port} ({addr}): {e}")),
        Ok(r) => {
            let mut out = Response::builder().status(r.status());
            for (k, v) in r.headers() {
                if k != header::TRANSFER_ENCODING && k != header::CONNECTION {
                    out = out.header(k, v);
                }
            }
            let bytes = r.bytes().await.unwrap_or_default();
            out.body(Body::from(bytes)).expect("a valid response")
        }
    }
}
