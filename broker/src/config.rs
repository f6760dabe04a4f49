//! Configuration: defaults < `warren.toml` < `WARREN_*` environment < command-line flags.
//! Unknown keys in the file refuse to start, so a typo never silently falls back to a default.

use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The broker's settings, after every layer has been applied.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where definitions and messages live.
    pub data_dir: PathBuf,
    /// AMQP 0-9-1 listener.
    pub amqp_listen: SocketAddr,
    /// AMQP 0-9-1 over TLS (AMQPS); needs `tls_cert_file` and `tls_key_file`.
    pub amqps_listen: Option<SocketAddr>,
    /// Management HTTP API listener.
    pub management_listen: SocketAddr,
    /// Management HTTP API over TLS (HTTPS); needs `tls_cert_file` and `tls_key_file`.
    pub management_tls_listen: Option<SocketAddr>,
    /// Prometheus metrics listener (`/metrics`, `/metrics/per-object`, `/metrics/detailed`).
    pub prometheus_listen: SocketAddr,
    /// Milliseconds an HTTP connection (management API, HTTPS, Prometheus) may take to send
    /// its next request's headers, idle time between keep-alive requests included; then it is
    /// closed.
    pub http_idle_timeout_ms: u64,
    /// HTTP connections each HTTP listener serves at once; more wait to be accepted, so idle
    /// or slow HTTP clients cannot use up the descriptors AMQP clients need.
    pub http_max_connections: usize,
    /// PEM certificate chain for the TLS listeners, the server's certificate first.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of that certificate.
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates that client certificates are verified against.
    pub tls_ca_file: Option<PathBuf>,
    /// Require a client certificate signed by `tls_ca_file` (RabbitMQ's `fail_if_no_peer_cert`).
    pub tls_verify_peer: bool,
    /// How often the management API's rates are computed, milliseconds (RabbitMQ's
    /// `collect_statistics_interval`).
    pub stats_interval_ms: u64,
    /// This node's name, as reported to clients and tools.
    pub node_name: String,
    /// Largest frame the broker accepts or sends, bytes (clients may negotiate lower).
    pub frame_max: u32,
    /// Most channels per connection (clients may negotiate lower).
    pub channel_max: u16,
    /// Heartbeat interval the broker proposes, seconds (0 disables).
    pub heartbeat: u16,
    /// Milliseconds a delivery may stay unacknowledged before its channel is closed with 406
    /// (RabbitMQ's `consumer_timeout`; 0 disables). A queue's `x-consumer-timeout` overrides it.
    pub consumer_timeout: u64,
    /// Publisher flow control: a connection publishing to a queue whose backlog has spilled
    /// to disk while its consumers are taking messages stops being read until the consumers
    /// bring the backlog back into memory (RabbitMQ's connection state `flow`). Off, publishers
    /// are never slowed and the backlog grows on disk.
    pub flow_control: bool,
    /// Largest message body accepted, bytes (RabbitMQ's `max_message_size`).
    pub max_message_size: u64,
    /// Seconds a client has to complete the AMQP handshake.
    pub handshake_timeout: u64,
    /// The user created on first start, as RabbitMQ's `default_user`.
    pub default_user: String,
    pub default_pass: String,
    /// Users that may only connect from loopback addresses (RabbitMQ's `loopback_users`).
    pub loopback_users: Vec<String>,
    /// `text` or `json`.
    pub log_format: String,
    /// Ready messages a queue keeps in memory; the rest wait in its store on disk.
    pub queue_window_messages: usize,
    /// Body bytes a queue keeps in memory.
    pub queue_window_bytes: u64,
    /// Longest wait, in milliseconds, before acks and paged messages are written. Persistent
    /// messages a publisher waits for are written at once (group commit).
    pub flush_interval_ms: u64,
    /// Size at which a queue's segment file is closed and a new one started, bytes.
    pub segment_size: u32,
    /// Bytes of a vhost's delayed messages kept in memory; beyond them the messages are
    /// written, sorted by due time, to run files and read back as they come due.
    pub delayed_memory_bytes: u64,
    /// Memory alarm: above this fraction of the machine's memory, publishers are blocked.
    pub memory_high_watermark: f64,
    /// Memory alarm as an absolute limit in bytes; overrides the fraction when set.
    pub memory_high_watermark_bytes: Option<u64>,
    /// Disk alarm: below this much free space in the data directory, publishers are
    /// blocked, bytes.
    pub disk_free_limit: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./warren-data"),
            amqp_listen: "0.0.0.0:5672".parse().expect("valid default address"),
            amqps_listen: None,
            management_listen: "0.0.0.0:15672".parse().expect("valid default address"),
            management_tls_listen: None,
            prometheus_listen: "0.0.0.0:15692".parse().expect("valid default address"),
            http_idle_timeout_ms: 60_000,
            http_max_connections: 256,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            tls_verify_peer: false,
            stats_interval_ms: 5000,
            node_name: "warren@localhost".into(),
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60,
            consumer_timeout: 1_800_000,
            flow_control: true,
            max_message_size: 128 * 1024 * 1024,
            handshake_timeout: 10,
            default_user: "guest".into(),
            default_pass: "guest".into(),
            loopback_users: vec!["guest".into()],
            log_format: "text".into(),
            queue_window_messages: 2048,
            queue_window_bytes: 8 * 1024 * 1024,
            flush_interval_ms: 5,
            segment_size: 64 * 1024 * 1024,
            delayed_memory_bytes: 16 * 1024 * 1024,
            memory_high_watermark: 0.4,
            memory_high_watermark_bytes: None,
            disk_free_limit: 50_000_000,
        }
    }
}

/// What `warren-broker` does besides running a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Put the running broker of these settings into maintenance mode (close its clients,
    /// refuse new ones, fail readiness) and return once its clients are gone: the preStop
    /// hook of a broker pod.
    Drain,
}

/// Command-line flags; each can also come from `WARREN_<FLAG>` in the environment.
#[derive(Debug, Default, Parser)]
#[command(
    name = "warren-broker",
    version,
    about = "A RabbitMQ-compatible AMQP 0-9-1 broker"
)]
pub struct Flags {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML file with settings (see warren.example.toml).
    #[arg(long, env = "WARREN_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "WARREN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "WARREN_AMQP_LISTEN")]
    pub amqp_listen: Option<SocketAddr>,
    #[arg(long, env = "WARREN_AMQPS_LISTEN")]
    pub amqps_listen: Option<SocketAddr>,
    /// Also `--mgmt-listen`, the name DESIGN.md gives it.
    #[arg(long, env = "WARREN_MANAGEMENT_LISTEN", visible_alias = "mgmt-listen")]
    pub management_listen: Option<SocketAddr>,
    #[arg(long, env = "WARREN_MANAGEMENT_TLS_LISTEN")]
    pub management_tls_listen: Option<SocketAddr>,
    /// Also `--metrics-listen`, the name DESIGN.md gives it.
    #[arg(
        long,
        env = "WARREN_PROMETHEUS_LISTEN",
        visible_alias = "metrics-listen"
    )]
    pub prometheus_listen: Option<SocketAddr>,
    #[arg(long, env = "WARREN_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    #[arg(long, env = "WARREN_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    #[arg(long, env = "WARREN_TLS_CA_FILE")]
    pub tls_ca_file: Option<PathBuf>,
    #[arg(long, env = "WARREN_TLS_VERIFY_PEER")]
    pub tls_verify_peer: Option<bool>,
    #[arg(long, env = "WARREN_STATS_INTERVAL_MS")]
    pub stats_interval_ms: Option<u64>,
    #[arg(long, env = "WARREN_NODE_NAME")]
    pub node_name: Option<String>,
    /// The user created on first start (an existing data directory keeps its users).
    #[arg(long, env = "WARREN_DEFAULT_USER")]
    pub default_user: Option<String>,
    /// Its password; from the environment, it stays out of `ps`.
    #[arg(long, env = "WARREN_DEFAULT_PASS", hide_env_values = true)]
    pub default_pass: Option<String>,
    #[arg(long, env = "WARREN_FRAME_MAX")]
    pub frame_max: Option<u32>,
    #[arg(long, env = "WARREN_CHANNEL_MAX")]
    pub channel_max: Option<u16>,
    #[arg(long, env = "WARREN_HEARTBEAT")]
    pub heartbeat: Option<u16>,
    #[arg(long, env = "WARREN_CONSUMER_TIMEOUT")]
    pub consumer_timeout: Option<u64>,
    #[arg(long, env = "WARREN_FLOW_CONTROL")]
    pub flow_control: Option<bool>,
    #[arg(long, env = "WARREN_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<u64>,
    #[arg(long, env = "WARREN_LOG_FORMAT")]
    pub log_format: Option<String>,
    #[arg(long, env = "WARREN_QUEUE_WINDOW_MESSAGES")]
    pub queue_window_messages: Option<usize>,
    #[arg(long, env = "WARREN_QUEUE_WINDOW_BYTES")]
    pub queue_window_bytes: Option<u64>,
    #[arg(long, env = "WARREN_FLUSH_INTERVAL_MS")]
    pub flush_interval_ms: Option<u64>,
    #[arg(long, env = "WARREN_SEGMENT_SIZE")]
    pub segment_size: Option<u32>,
    #[arg(long, env = "WARREN_DELAYED_MEMORY_BYTES")]
    pub delayed_memory_bytes: Option<u64>,
    #[arg(long, env = "WARREN_MEMORY_HIGH_WATERMARK")]
    pub memory_high_watermark: Option<f64>,
    #[arg(long, env = "WARREN_MEMORY_HIGH_WATERMARK_BYTES")]
    pub memory_high_watermark_bytes: Option<u64>,
    #[arg(long, env = "WARREN_DISK_FREE_LIMIT")]
    pub disk_free_limit: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration in {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Parses a TOML document on top of the defaults.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Builds the configuration from the flags (and environment, which clap has merged into
    /// them), reading the file they name first.
    pub fn load(flags: Flags) -> Result<Self, ConfigError> {
        let mut config = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::from_toml(&text, path)?
            }
            None => Self::default(),
        };
        let Flags {
            command: _,
            config: _,
            data_dir,
            amqp_listen,
            amqps_listen,
            management_listen,
            management_tls_listen,
            prometheus_listen,
            tls_cert_file,
            tls_key_file,
            tls_ca_file,
            tls_verify_peer,
            stats_interval_ms,
            node_name,
            default_user,
            default_pass,
            frame_max,
            channel_max,
            heartbeat,
            consumer_timeout,
            flow_control,
            max_message_size,
            log_format,
            queue_window_messages,
            queue_window_bytes,
            flush_interval_ms,
            segment_size,
            delayed_memory_bytes,
            memory_high_watermark,
            memory_high_watermark_bytes,
            disk_free_limit,
        } = flags;
        macro_rules! apply {
            ($($field:ident),*) => { $(if let Some(v) = $field { config.$field = v; })* };
        }
        apply!(
            data_dir,
            amqp_listen,
            management_listen,
            prometheus_listen,
            tls_verify_peer,
            stats_interval_ms,
            node_name,
            default_user,
            default_pass,
            frame_max,
            channel_max,
            heartbeat,
            consumer_timeout,
            flow_control,
            max_message_size,
            log_format,
            queue_window_messages,
            queue_window_bytes,
            flush_interval_ms,
            segment_size,
            delayed_memory_bytes,
            memory_high_watermark,
            disk_free_limit
        );
        macro_rules! apply_optional {
            ($($field:ident),*) => { $(if $field.is_some() { config.$field = $field; })* };
        }
        apply_optional!(
            memory_high_watermark_bytes,
            amqps_listen,
            management_tls_listen,
            tls_cert_file,
            tls_key_file,
            tls_ca_file
        );
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.frame_max != 0 && self.frame_max < crate::amqp::codec::FRAME_MIN_SIZE {
            return Err(ConfigError::Invalid(format!(
                "frame_max {} is below the AMQP minimum of 4096",
                self.frame_max
            )));
        }
        if self.channel_max == 0 {
            return Err(ConfigError::Invalid(
                "channel_max must be at least 1".into(),
            ));
        }
        if self.queue_window_messages == 0 || self.queue_window_bytes == 0 {
            return Err(ConfigError::Invalid(
                "queue_window_messages and queue_window_bytes must be at least 1".into(),
            ));
        }
        if self.delayed_memory_bytes < 65_536 {
            return Err(ConfigError::Invalid(
                "delayed_memory_bytes must be at least 65536".into(),
            ));
        }
        if self.segment_size < 4096 {
            return Err(ConfigError::Invalid(
                "segment_size must be at least 4096".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.memory_high_watermark) {
            return Err(ConfigError::Invalid(
                "memory_high_watermark is a fraction between 0 and 1".into(),
            ));
        }
        let tls_listener = self.amqps_listen.is_some() || self.management_tls_listen.is_some();
        if tls_listener && (self.tls_cert_file.is_none() || self.tls_key_file.is_none()) {
            return Err(ConfigError::Invalid(
                "amqps_listen and management_tls_listen need tls_cert_file and tls_key_file".into(),
            ));
        }
        if self.tls_verify_peer && self.tls_ca_file.is_none() {
            return Err(ConfigError::Invalid(
                "tls_verify_peer needs tls_ca_file to verify client certificates against".into(),
            ));
        }
        if self.http_idle_timeout_ms == 0 || self.http_max_connections == 0 {
            return Err(ConfigError::Invalid(
                "http_idle_timeout_ms and http_max_connections must be at least 1".into(),
            ));
        }
        if self.stats_interval_ms < 100 {
            return Err(ConfigError::Invalid(
                "stats_interval_ms must be at least 100".into(),
            ));
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(ConfigError::Invalid(format!(
                "log_format must be \"text\" or \"json\", not {:?}",
                self.log_format
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_override_defaults_and_flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warren.toml");
        std::fs::write(&path, "heartbeat = 30\nframe_max = 8192\n").unwrap();
        let config = Config::load(Flags {
            config: Some(path),
            heartbeat: Some(5),
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(config.heartbeat, 5);
        assert_eq!(config.frame_max, 8192);
        assert_eq!(config.channel_max, 2047);
    }

    #[test]
    fn listener_flags_take_the_names_design_md_gives_them_too() {
        use clap::Parser;
        let flags = Flags::try_parse_from([
            "warren-broker",
            "--mgmt-listen",
            "127.0.0.1:1",
            "--metrics-listen",
            "127.0.0.1:2",
        ])
        .unwrap();
        let config = Config::load(flags).unwrap();
        assert_eq!(config.management_listen, "127.0.0.1:1".parse().unwrap());
        assert_eq!(config.prometheus_listen, "127.0.0.1:2".parse().unwrap());
    }

    #[test]
    fn the_default_user_comes_from_the_environment_too() {
        use clap::Parser;
        let flags = Flags::try_parse_from([
            "warren-broker",
            "--default-user",
            "admin",
            "--default-pass",
            "s3cret",
        ])
        .unwrap();
        let config = Config::load(flags).unwrap();
        assert_eq!(
            (config.default_user.as_str(), config.default_pass.as_str()),
            ("admin", "s3cret")
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("hearbeat = 30\n", Path::new("w.toml")).unwrap_err();
        assert!(err.to_string().contains("hearbeat"), "{err}");
    }

    #[test]
    fn a_frame_max_below_the_minimum_is_refused() {
        let err = Config::load(Flags {
            frame_max: Some(1000),
            ..Flags::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("4096"));
    }

    #[test]
    fn the_example_file_is_the_defaults() {
        let text = include_str!("../../warren.example.toml");
        let config = Config::from_toml(text, Path::new("warren.example.toml")).unwrap();
        assert_eq!(config, Config::default());
    }
}
