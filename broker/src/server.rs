//! The listener: accepts AMQP connections and serves each on its own task, and shuts down in
//! order: stop accepting, tell every connection to close (320 CONNECTION_FORCED), wait for them.

use crate::amqp::connection;
use crate::broker::Broker;
use crate::config::Config;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long shutdown waits for connections to finish closing.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Definitions(#[from] crate::store::DefinitionsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running broker.
#[derive(Debug)]
pub struct RunningBroker {
    pub broker: Arc<Broker>,
    /// The address the AMQP listener bound (useful with port 0).
    pub amqp_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    acceptor: tokio::task::JoinHandle<()>,
    monitor: tokio::task::JoinHandle<()>,
}

impl RunningBroker {
    /// Stops accepting, closes every connection and waits for them to finish.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.acceptor.await;
        self.monitor.abort();
        // Everything the connections left pending is written and synced before we return.
        let storage = self.broker.storage.clone();
        let _ = tokio::task::spawn_blocking(move || storage.shutdown()).await;
    }
}

/// Opens the data directory, binds the listeners and starts serving.
pub async fn start(config: Config) -> Result<RunningBroker, StartError> {
    let broker = Broker::open(config)?;
    start_with(broker).await
}

/// Starts serving an already opened broker.
pub async fn start_with(broker: Arc<Broker>) -> Result<RunningBroker, StartError> {
    let addr = broker.config.amqp_listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { addr, source })?;
    let amqp_addr = listener
        .local_addr()
        .map_err(|source| StartError::Listen { addr, source })?;
    tracing::info!(%amqp_addr, "AMQP listener started");
    let (shutdown, watcher) = watch::channel(false);
    broker.alarms.check();
    let monitor = broker.alarms.spawn_monitor(Duration::from_secs(1));
    let acceptor = tokio::spawn(accept_loop(listener, broker.clone(), watcher));
    Ok(RunningBroker {
        broker,
        amqp_addr,
        shutdown,
        acceptor,
        monitor,
    })
}

async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    connections.spawn(connection::serve_tcp(stream, peer, broker.clone(), shutdown.clone()));
                }
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
    drop(listener);
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
    tracing::info!("AMQP listener stopped");
}
