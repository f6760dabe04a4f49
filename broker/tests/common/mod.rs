//! Test harness: a broker started in-process on 127.0.0.1 with an ephemeral port and an empty
//! temporary data directory, stopped when the test ends. Set `WARREN_TEST_AMQP_URL` to run the
//! same tests against another broker (for instance RabbitMQ, to check what it does).
#![allow(dead_code)]

use lapin::{Connection, ConnectionProperties};
use std::time::Duration;
use warren_broker::{Config, RunningBroker};

pub struct TestBroker {
    pub uri: String,
    pub addr: std::net::SocketAddr,
    running: Option<RunningBroker>,
    _data: Option<tempfile::TempDir>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a broker after `tune` has adjusted its configuration.
    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        if let Ok(uri) = std::env::var("WARREN_TEST_AMQP_URL") {
            let addr = external_addr(&uri);
            return Self {
                uri,
                addr,
                running: None,
                _data: None,
            };
        }
        let data = tempfile::tempdir().expect("temporary data directory");
        let mut config = Config {
            data_dir: data.path().to_path_buf(),
            amqp_listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        tune(&mut config);
        let running = warren_broker::start(config).await.expect("broker starts");
        let addr = running.amqp_addr;
        Self {
            uri: format!("amqp://guest:guest@{addr}/%2f"),
            addr,
            running: Some(running),
            _data: Some(data),
        }
    }

    pub fn is_external(&self) -> bool {
        self.running.is_none()
    }

    pub async fn connect(&self) -> Connection {
        tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(&self.uri, ConnectionProperties::default()),
        )
        .await
        .expect("connect in time")
        .expect("connect")
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

fn external_addr(uri: &str) -> std::net::SocketAddr {
    let rest = uri.split("://").nth(1).unwrap_or(uri);
    let host = rest.rsplit('@').next().unwrap_or(rest);
    let host = host.split('/').next().unwrap_or(host);
    use std::net::ToSocketAddrs;
    host.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .expect("WARREN_TEST_AMQP_URL has a host:port")
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    let n: u64 = rand::random();
    format!("{prefix}-{n:016x}")
}

/// Awaits a future with a deadline, so a broken broker fails a test instead of hanging it.
pub async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("timed out")
}
