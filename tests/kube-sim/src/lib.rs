//! kube-sim: a **test harness** that imitates enough of a Kubernetes cluster for Warren's
//! operator to run against it end to end. It is not Kubernetes: see README.md for what it does
//! and what it leaves out.
//!
//! - [`store`]: the objects, resourceVersions, watches, finalizers, garbage collection;
//! - [`api`]: the REST paths, the status and scale subresources;
//! - [`kubelet`]: StatefulSets → pods → real `warren-broker` processes with readiness;
//! - [`network`]: Services forwarded to ready pods, cluster DNS names through an HTTP proxy.
#![deny(unsafe_code)]

pub mod api;
pub mod kubelet;
pub mod network;
pub mod store;

use kubelet::{KubeletConfig, Pods};
use network::{Network, ProxyState};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How a simulated cluster runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The program run for every container of a `warren-broker` image.
    pub broker_binary: PathBuf,
    /// Where pods, their logs and volumes live.
    pub dir: PathBuf,
}

/// A running simulated cluster: API server, controllers, kubelet and network. Dropping it
/// stops everything and kills every pod's process.
#[derive(Debug)]
pub struct KubeSim {
    store: Arc<Store>,
    pods: Pods,
    network: Arc<Network>,
    api_addr: SocketAddr,
    proxy_addr: SocketAddr,
    config: KubeletConfig,
    tasks: Vec<JoinHandle<()>>,
}

impl KubeSim {
    /// Starts the API server and the HTTP proxy on ephemeral ports of 127.0.0.1, and the loop
    /// of controllers and kubelet.
    pub async fn start(config: Config) -> std::io::Result<Self> {
        std::fs::create_dir_all(&config.dir)?;
        let store = Arc::new(Store::default());
        let pods: Pods = Pods::default();
        let network = Arc::new(Network::default());
        let api_listener = TcpListener::bind("127.0.0.1:0").await?;
        let api_addr = api_listener.local_addr()?;
        let proxy_listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy_addr = proxy_listener.local_addr()?;
        let kubelet = KubeletConfig {
            broker_binary: config.broker_binary,
            dir: config.dir,
            probe_period: Duration::from_millis(500),
            max_grace: Duration::from_secs(15),
        };
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn({
            let router = api::router(store.clone());
            async move {
                let _ = axum::serve(api_listener, router).await;
            }
        }));
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(std::io::Error::other)?;
        tasks.push(tokio::spawn({
            let router = network::proxy_router(ProxyState {
                network: network.clone(),
                pods: pods.clone(),
                client,
            });
            async move {
                let _ = axum::serve(proxy_listener, router).await;
            }
        }));
        tasks.push(tokio::spawn({
            let (store, pods, network, kubelet) = (
                store.clone(),
                pods.clone(),
                network.clone(),
                kubelet.clone(),
            );
            async move {
                loop {
                    store.collect_garbage();
                    kubelet::reconcile_stateful_sets(&store);
                    kubelet::sync_pods(&store, &kubelet, &pods);
                    network.sync(&store, &pods).await;
                    kubelet::reclaim_volumes(&store, &kubelet);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }));
        Ok(Self {
            store,
            pods,
            network,
            api_addr,
            proxy_addr,
            config: kubelet,
            tasks,
        })
    }

    /// The API server's URL.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// The HTTP proxy through which cluster DNS names resolve (set it as `HTTP_PROXY`).
    pub fn proxy_url(&self) -> String {
        format!("http://{}", self.proxy_addr)
    }

    /// A kubeconfig for the API server (no credentials: the harness checks none).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-sim\n  cluster:\n    server: {}\nusers:\n- name: kube-sim\n  user: {{}}\ncontexts:\n- name: kube-sim\n  context:\n    cluster: kube-sim\n    user: kube-sim\n    namespace: default\ncurrent-context: kube-sim\n",
            self.api_url()
        )
    }

    /// The objects, for a test to look at directly.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The local address of a Service's port, once the Service exists.
    pub fn service_addr(&self, namespace: &str, service: &str, port: u16) -> Option<SocketAddr> {
        self.network
            .service_addr(namespace, service, i64::from(port))
    }

    /// A cluster DNS name and port as a local address.
    pub fn resolve(&self, host: &str, port: u16) -> Option<SocketAddr> {
        self.network.resolve(&self.pods, host, i64::from(port))
    }

    /// The running pod processes: (namespace, pod, pid).
    pub fn processes(&self) -> Vec<(String, String, u32)> {
        let pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = pods
            .iter()
            .filter_map(|((ns, name), rt)| Some((ns.clone(), name.clone(), rt.pid()?)))
            .collect();
        out.sort();
        out
    }

    /// The directory of a volume claim (the pod's data as its process sees it).
    pub fn claim_dir(&self, namespace: &str, claim: &str) -> PathBuf {
        kubelet::claim_dir(&self.config, namespace, claim)
    }

    /// The log of a pod's container.
    pub fn pod_log(&self, namespace: &str, pod: &str) -> String {
        let dir = self.config.dir.join("pods").join(namespace);
        let mut out = String::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{pod}-"))
            {
                out.push_str(
                    &std::fs::read_to_string(e.path().join("container.log")).unwrap_or_default(),
                );
            }
        }
        out
    }
}

impl Drop for KubeSim {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        // Dropping each pod's runtime kills its process.
        self.pods.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}
