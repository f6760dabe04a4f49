//! Harness for end-to-end tests: runs the real `warren-broker` binary as a child process on
//! 127.0.0.1 with ephemeral ports and a temporary data directory, and kills it when the test
//! ends, pass or fail.
#![deny(unsafe_code)]
#![deny(missing_debug_implementations)]

pub mod proxy;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Where cargo put the workspace's binaries for this test run (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// The broker binary; `cargo build -p warren-broker` makes it (the test command does).
pub fn broker_bin() -> PathBuf {
    if let Ok(p) = std::env::var("WARREN_BROKER_BIN") {
        return PathBuf::from(p);
    }
    let path = bin_dir().join("warren-broker");
    assert!(
        path.exists(),
        "{} not found: run `cargo build -p warren-broker` first (./test.sh does)",
        path.display()
    );
    path
}

/// The workspace root (for scripts such as tests/clients/run.sh). Read from the environment
/// `cargo test` sets, not baked in at compile time: cargo reuses a test binary built in
/// another checkout that shares the build cache (CI's fresh clone), and a baked-in path would
/// point at that other checkout.
pub fn workspace_root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

/// A `warren-broker` child process. Dropping it kills the process.
#[derive(Debug)]
pub struct BrokerProcess {
    child: Child,
    pub amqp_addr: SocketAddr,
    pub management_addr: SocketAddr,
    pub prometheus_addr: SocketAddr,
    /// Where the other nodes of a cluster reach this one.
    pub cluster_addr: SocketAddr,
    pub data_dir: PathBuf,
    _owned_dir: Option<tempfile::TempDir>,
    log: mpsc::Receiver<String>,
}

impl BrokerProcess {
    /// Starts a broker with a fresh temporary data directory.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temporary data directory");
        let path = dir.path().to_path_buf();
        let mut b = Self::start_in(&path, &[]);
        b._owned_dir = Some(dir);
        b
    }

    /// Starts a broker on `data_dir` (kept by the caller, e.g. across restarts) with extra flags.
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(broker_bin())
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--amqp-listen",
                "127.0.0.1:0",
                "--management-listen",
                "127.0.0.1:0",
                "--prometheus-listen",
                "127.0.0.1:0",
                "--cluster-listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn warren-broker");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut started = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while started.is_none() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    started = listen_addr(&line, "AMQP listener started", "amqp_addr").map(|a| {
                        (
                            a,
                            listen_addr(&line, "AMQP listener started", "management_addr"),
                            listen_addr(&line, "AMQP listener started", "prometheus_addr"),
                            listen_addr(&line, "AMQP listener started", "cluster_addr"),
                        )
                    })
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("warren-broker did not report its AMQP address in time");
                }
            }
        }
        let (amqp_addr, management_addr, prometheus_addr, cluster_addr) =
            started.expect("set above");
        Self {
            child,
            amqp_addr,
            management_addr: management_addr.expect("the log names the management address"),
            prometheus_addr: prometheus_addr.expect("the log names the Prometheus address"),
            cluster_addr: cluster_addr.expect("the log names the cluster address"),
            data_dir: data_dir.to_path_buf(),
            _owned_dir: None,
            log: rx,
        }
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp_addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Log lines printed so far.
    pub fn drain_log(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    /// SIGKILL, as a crash.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn terminate(mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `"amqp_addr":"127.0.0.1:1234"` out of a JSON log line carrying `message`.
fn listen_addr(line: &str, message: &str, field: &str) -> Option<SocketAddr> {
    if !line.contains(message) {
        return None;
    }
    let key = format!("\"{field}\":\"");
    let at = line.find(&key)? + key.len();
    let end = line[at..].find('"')? + at;
    line[at..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_bound_address_from_the_log() {
        let line = r#"{"timestamp":"x","level":"INFO","fields":{"message":"AMQP listener started","amqp_addr":"127.0.0.1:40123"},"target":"warren_broker::server"}"#;
        assert_eq!(
            listen_addr(line, "AMQP listener started", "amqp_addr"),
            Some("127.0.0.1:40123".parse().unwrap())
        );
        assert_eq!(
            listen_addr("{}", "AMQP listener started", "amqp_addr"),
            None
        );
    }
}
