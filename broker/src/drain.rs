//! `warren-broker drain`: puts the running broker of the same settings into maintenance mode
//! through its management API on the loopback address, and returns once its clients are gone.
//! Kubernetes runs it as the broker container's preStop hook, before SIGTERM.
//!
//! The request is one fixed HTTP/1.1 POST to the local listener, written by hand rather than
//! pulling an HTTP client into the broker binary for it.

use crate::config::Config;
use base64::Engine;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where the broker's management API answers on this host.
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// What a drain did, as the broker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Client connections closed.
    pub closed: u64,
    /// Client connections still open when the broker stopped waiting for them.
    pub remaining: u64,
}

impl std::fmt::Display for Drained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        write!(
            f,
            "maintenance mode on: new clients are refused and readiness fails; closed {} client connection{}",
            self.closed,
            plural(self.closed)
        )?;
        if self.remaining > 0 {
            write!(
                f,
                "; {} connection{} still open",
                self.remaining,
                plural(self.remaining)
            )?;
        }
        Ok(())
    }
}

/// Asks the broker at `addr` to drain, as `user`; waits up to `timeout` for the answer.
pub async fn request(
    addr: SocketAddr,
    user: &str,
    password: &str,
    timeout: Duration,
) -> Result<Drained, String> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot reach the management API at {addr}: {e}"))?;
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let head = format!(
            "POST /api/warren/drain HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic {credentials}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let text = String::from_utf8_lossy(&answer);
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        if status != 200 {
            return Err(format!("the broker refused to drain: HTTP {status} {body}"));
        }
        let answer: serde_json::Value = serde_json::from_str(body)
            .map_err(|e| format!("{addr}: unexpected answer to a drain ({e}): {body}"))?;
        let count = |key: &str| answer[key].as_u64().unwrap_or(0);
        Ok(Drained {
            closed: count("closed"),
            remaining: count("remaining"),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer from {addr} within {timeout:?}"))?
}

/// Drains the broker that `config` describes, as its default user.
pub async fn run(config: &Config) -> Result<Drained, String> {
    request(
        local_address(config.management_listen),
        &config.default_user,
        &config.default_pass,
        Duration::from_secs(30),
    )
    .await
}
