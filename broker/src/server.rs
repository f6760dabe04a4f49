//! The listeners: AMQP (and AMQPS) connections each served on a task of their own, the
//! management API and the Prometheus endpoint; and shutdown in order: stop accepting, tell
//! every connection to close (320 CONNECTION_FORCED), wait for them, flush and sync storage.

use crate::amqp::connection;
use crate::broker::Broker;
use crate::config::Config;
use crate::http::tls::{self, TlsListener};
use crate::http::{AppState, ListenerInfo, sampler::Sampler};
use axum::extract::DefaultBodyLimit;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// How long shutdown waits for connections to finish closing.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// The largest HTTP request body (definitions of a big node, published messages).
const HTTP_BODY_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Definitions(#[from] crate::store::DefinitionsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("cluster: {0}")]
    Cluster(std::io::Error),
}

/// A running broker.
#[derive(Debug)]
pub struct RunningBroker {
    pub broker: Arc<Broker>,
    /// The addresses the listeners bound (useful with port 0).
    pub amqp_addr: SocketAddr,
    pub amqps_addr: Option<SocketAddr>,
    pub management_addr: SocketAddr,
    pub management_tls_addr: Option<SocketAddr>,
    pub prometheus_addr: SocketAddr,
    /// Where the other nodes of the cluster reach this one.
    pub cluster_addr: SocketAddr,
    pub cluster: Arc<crate::cluster::Cluster>,
    shutdown: watch::Sender<bool>,
    acceptors: Vec<JoinHandle<()>>,
    http: Vec<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl RunningBroker {
    /// Stops accepting, closes every connection and waits for them to finish, then writes
    /// and syncs everything pending.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for a in self.acceptors {
            let _ = a.await;
        }
        for h in self.http {
            if tokio::time::timeout(SHUTDOWN_GRACE, async {
                let _ = (&mut { h }).await;
            })
            .await
            .is_err()
            {
                tracing::warn!("HTTP requests still running after the grace period");
            }
        }
        for b in self.background {
            b.abort();
        }
        // The flusher gives up a last round that fails; this bounds a write that hangs. A
        // thread of its own, not the runtime's blocking pool: dropping the runtime waits for
        // every blocking task without limit, so a hung write would still hold the process.
        let storage = self.broker.storage.clone();
        let (done, flushed) = tokio::sync::oneshot::channel();
        let started = std::thread::Builder::new()
            .name("warren-shutdown".into())
            .spawn(move || {
                storage.shutdown();
                let _ = done.send(());
            });
        match started {
            Ok(_) => {
                if tokio::time::timeout(SHUTDOWN_GRACE, flushed).await.is_err() {
                    tracing::error!(
                        "storage still writing after the grace period, stopping without it"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot start the last flush"),
        }
    }
}

/// Opens the data directory, binds the listeners and starts serving.
pub async fn start(config: Config) -> Result<RunningBroker, StartError> {
    // The TLS files are read first: a broker that cannot serve its TLS listeners fails
    // before it has touched its data directory.
    let tls = tls_settings(&config)?;
    let broker = Broker::open(config)?;
    serve(broker, tls).await
}

/// The TLS settings of the AMQPS and HTTPS listeners, if there are any.
fn tls_settings(config: &Config) -> Result<Option<Arc<rustls::ServerConfig>>, StartError> {
    if config.amqps_listen.is_some() || config.management_tls_listen.is_some() {
        tls::server_config(config)
            .map(Some)
            .map_err(StartError::Tls)
    } else {
        Ok(None)
    }
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr, source })?;
    Ok((listener, bound))
}

/// Starts serving an already opened broker.
pub async fn start_with(broker: Arc<Broker>) -> Result<RunningBroker, StartError> {
    let tls = tls_settings(&broker.config)?;
    serve(broker, tls).await
}

async fn serve(
    broker: Arc<Broker>,
    tls_config: Option<Arc<rustls::ServerConfig>>,
) -> Result<RunningBroker, StartError> {
    let config = broker.config.clone();
    let handshake = Duration::from_secs(config.handshake_timeout);
    let (amqp, amqp_addr) = bind(config.amqp_listen).await?;
    let (management, management_addr) = bind(config.management_listen).await?;
    let (prometheus, prometheus_addr) = bind(config.prometheus_listen).await?;
    let (cluster_listener, cluster_addr) = bind(config.cluster_listen).await?;
    let cluster = match &broker.cluster {
        Some(c) => c.clone(),
        None => crate::cluster::Cluster::new(&config).map_err(StartError::Cluster)?,
    };
    let mut listeners = vec![
        ListenerInfo {
            protocol: "amqp",
            addr: amqp_addr,
        },
        ListenerInfo {
            protocol: "http",
            addr: management_addr,
        },
        ListenerInfo {
            protocol: "http/prometheus",
            addr: prometheus_addr,
        },
        ListenerInfo {
            protocol: "clustering",
            addr: cluster_addr,
        },
    ];
    let mut amqps = None;
    if let (Some(addr), Some(tls)) = (config.amqps_listen, &tls_config) {
        let (l, bound) = bind(addr).await?;
        let l = TlsListener::new(l, tls.clone(), handshake)
            .map_err(|source| StartError::Listen { addr, source })?;
        listeners.push(ListenerInfo {
            protocol: "amqp/ssl",
            addr: bound,
        });
        amqps = Some((l, bound));
    }
    let mut management_tls = None;
    if let (Some(addr), Some(tls)) = (config.management_tls_listen, &tls_config) {
        // Its handshakes are made under the HTTPS listener's connection cap, not here.
        let (l, bound) = bind(addr).await?;
        listeners.push(ListenerInfo {
            protocol: "https",
            addr: bound,
        });
        management_tls = Some((l, tls.clone(), bound));
    }

    let (shutdown, watcher) = watch::channel(false);
    broker.alarms.check();
    let sampler = Arc::new(Sampler::default());
    sampler.sample(&broker);
    // The links (and Raft over them) run on the cluster's own runtime when there is one.
    let mut background = match &broker.metadata {
        Some(m) => {
            let _on = m.runtime().enter();
            let links = cluster.start(cluster_listener, watcher.clone());
            m.start(watcher.clone());
            links
        }
        None => cluster.start(cluster_listener, watcher.clone()),
    };
    background.extend([
        broker.alarms.spawn_monitor(Duration::from_secs(1)),
        sampler.spawn(
            broker.clone(),
            Duration::from_millis(config.stats_interval_ms),
        ),
    ]);
    let state = AppState {
        broker: broker.clone(),
        sampler,
        listeners: Arc::new(listeners),
        stopping: watcher.clone(),
        heavy_lists: Arc::new(tokio::sync::Semaphore::new(crate::http::HEAVY_LISTS)),
        list_wait: Duration::from_millis(config.http_idle_timeout_ms),
        heavy_scrapes: Arc::new(tokio::sync::Semaphore::new(crate::http::HEAVY_SCRAPES)),
        imports: Arc::new(tokio::sync::Mutex::new(())),
        cluster: cluster.clone(),
    };
    // Other nodes' cluster-wide listings ask this node for its own objects.
    crate::http::serve_listings(&state);

    let mut acceptors = vec![tokio::spawn(accept_loop(
        Incoming::Tcp(amqp),
        broker.clone(),
        watcher.clone(),
    ))];
    let amqps_addr = amqps.as_ref().map(|(_, a)| *a);
    if let Some((l, _)) = amqps {
        acceptors.push(tokio::spawn(accept_loop(
            Incoming::Tls(l),
            broker.clone(),
            watcher.clone(),
        )));
    }

    let api =
        crate::http::management_router(state.clone()).layer(DefaultBodyLimit::max(HTTP_BODY_LIMIT));
    let limits = crate::http::serve::Limits {
        idle_timeout: Duration::from_millis(config.http_idle_timeout_ms),
        max_connections: config.http_max_connections,
    };
    let mut http = vec![tokio::spawn(crate::http::serve::serve(
        management,
        api.clone(),
        limits,
        watcher.clone(),
    ))];
    let management_tls_addr = management_tls.as_ref().map(|(_, _, a)| *a);
    if let Some((l, tls, _)) = management_tls {
        http.push(tokio::spawn(crate::http::serve::serve_tls(
            l,
            tls,
            api,
            limits,
            watcher.clone(),
        )));
    }
    http.push(tokio::spawn(crate::http::serve::serve(
        prometheus,
        crate::http::metrics::router(state),
        limits,
        watcher.clone(),
    )));
    tracing::info!(
        %amqp_addr,
        %management_addr,
        %prometheus_addr,
        %cluster_addr,
        amqps_addr = amqps_addr.map(|a| a.to_string()),
        management_tls_addr = management_tls_addr.map(|a| a.to_string()),
        "AMQP listener started"
    );
    Ok(RunningBroker {
        broker,
        amqp_addr,
        amqps_addr,
        management_addr,
        management_tls_addr,
        prometheus_addr,
        cluster_addr,
        cluster,
        shutdown,
        acceptors,
        http,
        background,
    })
}

enum Incoming {
    Tcp(TcpListener),
    Tls(TlsListener),
}

async fn accept_loop(
    mut incoming: Incoming,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = async {
                match &mut incoming {
                    Incoming::Tcp(l) => l.accept().await.map(|(s, peer)| {
                        let _ = s.set_nodelay(true);
                        (Some(s), None, peer)
                    }),
                    Incoming::Tls(l) => match l.next().await {
                        Some((s, peer)) => Ok((None, Some(s), peer)),
                        None => std::future::pending().await,
                    },
                }
            } => match accepted {
                // In maintenance mode the listener takes no new clients (RabbitMQ suspends it).
                Ok(_) if broker.draining.load(std::sync::atomic::Ordering::SeqCst) => {}
                Ok((Some(tcp), _, peer)) => {
                    connections.spawn(connection::serve_tcp(tcp, peer, broker.clone(), shutdown.clone()));
                }
                Ok((None, Some(tls), peer)) => {
                    let local = tls.get_ref().0.local_addr().unwrap_or(peer);
                    let details = tls::describe(&tls);
                    connections.spawn(connection::serve(tls, peer, local, broker.clone(), shutdown.clone(), Some(details)));
                }
                Ok(_) => {}
                Err(e) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    drop(incoming);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = connections.len(),
            "connections still open after the grace period, aborting them"
        );
        connections.shutdown().await;
    }
    tracing::info!("listener stopped");
}
