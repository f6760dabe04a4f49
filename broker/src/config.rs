//! Configuration: defaults < `warren.toml` < `WARREN_*` environment < command-line flags.
//! Every setting is declared once, in the `settings!` list below, which gives it its key in
//! the file, its `--flag`, its `WARREN_*` variable, its default and its `--help` text, so the
//! layers cannot drift apart. Unknown keys in the file refuse to start, so a typo never
//! silently falls back to a default.

use clap::Parser;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// How a setting's type is given in the file, the environment and on the command line: most
/// types as themselves; an optional setting (`Option<T>`) as its `T`, so that setting it in
/// any layer turns it on; a list of names as a comma-separated value (or a TOML array).
pub trait Layered: Sized {
    type Value: Clone + Send + Sync + 'static;
    fn from_value(value: Self::Value) -> Self;
}

macro_rules! layered_as_itself {
    ($($t:ty),*) => {
        $(impl Layered for $t {
            type Value = $t;
            fn from_value(value: $t) -> $t {
                value
            }
        })*
    };
}
layered_as_itself!(bool, u16, u32, u64, usize, f64, String, PathBuf, SocketAddr);

impl<T: Clone + Send + Sync + 'static> Layered for Option<T> {
    type Value = T;
    fn from_value(value: T) -> Self {
        Some(value)
    }
}

impl Layered for Vec<String> {
    type Value = NameList;
    fn from_value(value: NameList) -> Self {
        value.0
    }
}

/// A list of names: a TOML array in the file, comma-separated in the environment and on the
/// command line, where an empty value is the empty list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct NameList(pub Vec<String>);

impl std::str::FromStr for NameList {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(
            s.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect(),
        ))
    }
}

/// Declares every setting once. Each entry gives the setting's doc (its `--help` text), its
/// clap attributes (the flag `--<key-with-dashes>` and the variable `WARREN_<KEY>`; a test
/// holds every entry to that naming), its key and type in [`Config`], and its default.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        #[arg($($arg:tt)*)]
        $name:ident : $ty:ty = $default:expr;
    )*) => {
        /// The broker's settings, after every layer has been applied.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for Config {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// One layer of settings: the file (`warren.toml`), or the environment and flags
        /// (which clap merges, flags first). What a layer leaves unset comes from the one
        /// below it.
        #[derive(Debug, Clone, Default, PartialEq, Deserialize, clap::Args)]
        #[serde(default, deny_unknown_fields)]
        pub struct Settings {
            $(
                $(#[doc = $doc])*
                #[arg($($arg)*)]
                pub $name: Option<<$ty as Layered>::Value>,
            )*
        }

        impl Settings {
            /// These settings where they are set, `lower`'s elsewhere.
            pub fn over(self, lower: Settings) -> Settings {
                Settings { $( $name: self.$name.or(lower.$name), )* }
            }

            /// `base` with these settings applied on top.
            pub fn apply(self, mut base: Config) -> Config {
                $( if let Some(v) = self.$name { base.$name = Layered::from_value(v); } )*
                base
            }
        }

        /// Walks the declaration, so that tests cover every setting without listing them.
        #[cfg(test)]
        fn visit_settings(visitor: &mut impl tests::Visit) {
            $(
                visitor.visit::<<$ty as Layered>::Value>(
                    stringify!($name),
                    |config, value| config.$name == <$ty as Layered>::from_value(value),
                );
            )*
        }
    };
}

settings! {
    /// Where definitions and messages live.
    #[arg(long, env = "WARREN_DATA_DIR")]
    data_dir: PathBuf = PathBuf::from("./warren-data");
    /// AMQP 0-9-1 listener.
    #[arg(long, env = "WARREN_AMQP_LISTEN")]
    amqp_listen: SocketAddr = "0.0.0.0:5672".parse().expect("valid default address");
    /// AMQP 0-9-1 over TLS (AMQPS); needs `tls_cert_file` and `tls_key_file`.
    #[arg(long, env = "WARREN_AMQPS_LISTEN")]
    amqps_listen: Option<SocketAddr> = None;
    /// Management HTTP API listener (also `--mgmt-listen`).
    #[arg(long, env = "WARREN_MANAGEMENT_LISTEN", visible_alias = "mgmt-listen")]
    management_listen: SocketAddr = "0.0.0.0:15672".parse().expect("valid default address");
    /// Management HTTP API over TLS (HTTPS); needs `tls_cert_file` and `tls_key_file`.
    #[arg(long, env = "WARREN_MANAGEMENT_TLS_LISTEN")]
    management_tls_listen: Option<SocketAddr> = None;
    /// Prometheus metrics listener (`/metrics`, `/metrics/per-object`, `/metrics/detailed`;
    /// also `--metrics-listen`).
    #[arg(long, env = "WARREN_PROMETHEUS_LISTEN", visible_alias = "metrics-listen")]
    prometheus_listen: SocketAddr = "0.0.0.0:15692".parse().expect("valid default address");
    /// Milliseconds an HTTP connection (management API, HTTPS, Prometheus) may take to send
    /// its next request's headers, idle time between keep-alive requests included; then it is
    /// closed.
    #[arg(long, env = "WARREN_HTTP_IDLE_TIMEOUT_MS")]
    http_idle_timeout_ms: u64 = 60_000;
    /// HTTP connections each HTTP listener serves at once; more wait to be accepted, so idle
    /// or slow HTTP clients cannot use up the descriptors AMQP clients need.
    #[arg(long, env = "WARREN_HTTP_MAX_CONNECTIONS")]
    http_max_connections: usize = 256;
    /// PEM certificate chain for the TLS listeners, the server's certificate first; with it
    /// (and its key) the cluster links use TLS too, so every node of the cluster needs one.
    #[arg(long, env = "WARREN_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf> = None;
    /// PEM private key of that certificate.
    #[arg(long, env = "WARREN_TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf> = None;
    /// PEM CA certificates that client certificates, and the certificates of cluster peers,
    /// are verified against.
    #[arg(long, env = "WARREN_TLS_CA_FILE")]
    tls_ca_file: Option<PathBuf> = None;
    /// Require a client certificate signed by `tls_ca_file` (RabbitMQ's `fail_if_no_peer_cert`).
    #[arg(long, env = "WARREN_TLS_VERIFY_PEER")]
    tls_verify_peer: bool = false;
    /// How often the management API's rates are computed, milliseconds (RabbitMQ's
    /// `collect_statistics_interval`).
    #[arg(long, env = "WARREN_STATS_INTERVAL_MS")]
    stats_interval_ms: u64 = 5000;
    /// This node's name, as reported to clients and tools; unique within a cluster.
    #[arg(long, env = "WARREN_NODE_NAME")]
    node_name: String = "warren@localhost".into();
    /// Listener for the other nodes of the cluster (RabbitMQ's inter-node port).
    #[arg(long, env = "WARREN_CLUSTER_LISTEN")]
    cluster_listen: SocketAddr = "0.0.0.0:25672".parse().expect("valid default address");
    /// The cluster addresses (`host:port`; the port defaults to 25672) of the cluster's
    /// nodes, this node's own included or not; comma-separated on the command line and in the
    /// environment. Empty, with no `peers_file`: a cluster of one.
    #[arg(long, env = "WARREN_PEERS")]
    peers: Vec<String> = Vec::new();
    /// A file with more peers, one `host` or `host:port` per line, read again while the broker
    /// runs so that nodes added to it are found.
    #[arg(long, env = "WARREN_PEERS_FILE")]
    peers_file: Option<PathBuf> = None;
    /// The secret the cluster's nodes prove to each other (RabbitMQ's Erlang cookie); best
    /// given in the environment, where it stays out of `ps`. Unset, with no
    /// `cluster_secret_file`: one is generated on first start into `.cluster-secret` in the
    /// data directory.
    #[arg(long, env = "WARREN_CLUSTER_SECRET", hide_env_values = true)]
    cluster_secret: Option<String> = None;
    /// A file holding the cluster secret (surrounding white space ignored).
    #[arg(long, env = "WARREN_CLUSTER_SECRET_FILE")]
    cluster_secret_file: Option<PathBuf> = None;
    /// The cluster's name, as reported to clients and tools (`/api/overview`, the
    /// `rabbitmq_identity_info` metric); unset, the node's name, as in RabbitMQ. A name set
    /// through the management API or a definitions import is kept across restarts unless
    /// this setting is given.
    #[arg(long, env = "WARREN_CLUSTER_NAME")]
    cluster_name: Option<String> = None;
    /// Largest frame the broker accepts or sends, bytes (clients may negotiate lower).
    #[arg(long, env = "WARREN_FRAME_MAX")]
    frame_max: u32 = 131_072;
    /// Most channels per connection (clients may negotiate lower).
    #[arg(long, env = "WARREN_CHANNEL_MAX")]
    channel_max: u16 = 2047;
    /// Heartbeat interval the broker proposes, seconds (0 disables).
    #[arg(long, env = "WARREN_HEARTBEAT")]
    heartbeat: u16 = 60;
    /// Milliseconds a delivery may stay unacknowledged before its channel is closed with 406
    /// (RabbitMQ's `consumer_timeout`; 0 disables). A queue's `x-consumer-timeout` overrides it.
    #[arg(long, env = "WARREN_CONSUMER_TIMEOUT")]
    consumer_timeout: u64 = 1_800_000;
    /// Publisher flow control: a connection publishing to a queue whose backlog has spilled
    /// to disk while its consumers are taking messages stops being read until the consumers
    /// bring the backlog back into memory (RabbitMQ's connection state `flow`). Off, publishers
    /// are never slowed and the backlog grows on disk.
    #[arg(long, env = "WARREN_FLOW_CONTROL")]
    flow_control: bool = true;
    /// Largest message body accepted, bytes (RabbitMQ's `max_message_size`).
    #[arg(long, env = "WARREN_MAX_MESSAGE_SIZE")]
    max_message_size: u64 = 128 * 1024 * 1024;
    /// Seconds a client has to complete the AMQP handshake.
    #[arg(long, env = "WARREN_HANDSHAKE_TIMEOUT")]
    handshake_timeout: u64 = 10;
    /// The user created on first start, as RabbitMQ's `default_user` (an existing data
    /// directory keeps its users).
    #[arg(long, env = "WARREN_DEFAULT_USER")]
    default_user: String = "guest".into();
    /// That user's password; given in the environment, it stays out of `ps`.
    #[arg(long, env = "WARREN_DEFAULT_PASS", hide_env_values = true)]
    default_pass: String = "guest".into();
    /// Users that may only connect from loopback addresses (RabbitMQ's `loopback_users`);
    /// comma-separated on the command line and in the environment, empty for none.
    #[arg(long, env = "WARREN_LOOPBACK_USERS")]
    loopback_users: Vec<String> = vec!["guest".into()];
    /// Log format, `text` or `json`; the level comes from `RUST_LOG` (default `info`).
    #[arg(long, env = "WARREN_LOG_FORMAT")]
    log_format: String = "text".into();
    /// Ready messages a queue keeps in memory; the rest wait in its store on disk.
    #[arg(long, env = "WARREN_QUEUE_WINDOW_MESSAGES")]
    queue_window_messages: usize = 2048;
    /// Body bytes a queue keeps in memory.
    #[arg(long, env = "WARREN_QUEUE_WINDOW_BYTES")]
    queue_window_bytes: u64 = 8 * 1024 * 1024;
    /// Longest wait, in milliseconds, before acks and paged messages are written. Persistent
    /// messages a publisher waits for are written at once (group commit).
    #[arg(long, env = "WARREN_FLUSH_INTERVAL_MS")]
    flush_interval_ms: u64 = 5;
    /// Size at which a queue's segment file is closed and a new one started, bytes.
    #[arg(long, env = "WARREN_SEGMENT_SIZE")]
    segment_size: u32 = 64 * 1024 * 1024;
    /// Bytes of a vhost's delayed messages kept in memory; beyond them the messages are
    /// written, sorted by due time, to run files and read back as they come due.
    #[arg(long, env = "WARREN_DELAYED_MEMORY_BYTES")]
    delayed_memory_bytes: u64 = 16 * 1024 * 1024;
    /// Memory alarm: above this fraction of the machine's memory, publishers are blocked.
    #[arg(long, env = "WARREN_MEMORY_HIGH_WATERMARK")]
    memory_high_watermark: f64 = 0.4;
    /// Memory alarm as an absolute limit in bytes; overrides the fraction when set.
    #[arg(long, env = "WARREN_MEMORY_HIGH_WATERMARK_BYTES")]
    memory_high_watermark_bytes: Option<u64> = None;
    /// Disk alarm: below this much free space in the data directory, publishers are
    /// blocked, bytes.
    #[arg(long, env = "WARREN_DISK_FREE_LIMIT")]
    disk_free_limit: u64 = 50_000_000;
}

/// What `warren-broker` does besides running a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Subcommand)]
pub enum Command {
    /// Put the running broker of these settings into maintenance mode (close its clients,
    /// refuse new ones, fail readiness) and return once its clients are gone: the preStop
    /// hook of a broker pod.
    Drain,
}

/// The command line: a subcommand, the file to read, and every setting as a flag (each also
/// read from its `WARREN_*` variable when the flag is not given).
#[derive(Debug, Default, Parser)]
#[command(
    name = "warren-broker",
    version,
    about = "A RabbitMQ-compatible AMQP 0-9-1 broker",
    long_about = "A RabbitMQ-compatible AMQP 0-9-1 broker.\n\nEvery setting comes from, \
                  lowest first: its default, the file given by --config, its WARREN_* \
                  environment variable, its flag."
)]
pub struct Flags {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML file with settings (see warren.example.toml).
    #[arg(long, env = "WARREN_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
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
        Ok(Self::settings_from_toml(text, path)?.apply(Self::default()))
    }

    fn settings_from_toml(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Builds the configuration from the flags (and environment, which clap has merged into
    /// them), reading the file they name first.
    pub fn load(flags: Flags) -> Result<Self, ConfigError> {
        let config = Self::layered(flags)?;
        config.validate()?;
        Ok(config)
    }

    /// Every layer applied, not yet validated.
    fn layered(flags: Flags) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::settings_from_toml(&text, path)?
            }
            None => Settings::default(),
        };
        Ok(flags.settings.over(file).apply(Self::default()))
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
    use clap::CommandFactory;

    #[test]
    fn file_values_override_defaults_and_flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warren.toml");
        std::fs::write(&path, "heartbeat = 30\nframe_max = 8192\n").unwrap();
        let config = Config::load(Flags {
            config: Some(path),
            settings: Settings {
                heartbeat: Some(5),
                ..Settings::default()
            },
            ..Flags::default()
        })
        .unwrap();
        assert_eq!(config.heartbeat, 5);
        assert_eq!(config.frame_max, 8192);
        assert_eq!(config.channel_max, 2047);
    }

    #[test]
    fn listener_flags_have_short_aliases() {
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
    fn loopback_users_are_a_comma_separated_flag_and_empty_means_none() {
        let parse = |value: &str| {
            let flags =
                Flags::try_parse_from(["warren-broker", &format!("--loopback-users={value}")])
                    .unwrap();
            Config::load(flags).unwrap().loopback_users
        };
        assert_eq!(parse("guest, ops"), vec!["guest", "ops"]);
        assert!(parse("").is_empty());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("hearbeat = 30\n", Path::new("w.toml")).unwrap_err();
        assert!(err.to_string().contains("hearbeat"), "{err}");
    }

    #[test]
    fn a_frame_max_below_the_minimum_is_refused() {
        let err = Config::load(Flags {
            settings: Settings {
                frame_max: Some(1000),
                ..Settings::default()
            },
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

    /// Every key of the declaration, in order.
    fn keys() -> Vec<&'static str> {
        struct Keys(Vec<&'static str>);
        impl Visit for Keys {
            fn visit<V: Sample>(&mut self, key: &'static str, _: fn(&Config, V) -> bool) {
                self.0.push(key);
            }
        }
        let mut keys = Keys(Vec::new());
        visit_settings(&mut keys);
        keys.0
    }

    fn flag(key: &str) -> String {
        format!("--{}", key.replace('_', "-"))
    }

    fn variable(key: &str) -> String {
        format!("WARREN_{}", key.to_uppercase())
    }

    #[test]
    fn every_setting_has_a_flag_and_a_variable_named_after_its_key() {
        let command = Flags::command();
        for key in keys() {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == key)
                .unwrap_or_else(|| panic!("{key} has no flag"));
            assert_eq!(
                arg.get_long().map(|l| format!("--{l}")),
                Some(flag(key)),
                "{key}"
            );
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(variable(key).as_str()),
                "{key}"
            );
        }
    }

    #[test]
    fn the_readme_and_the_example_file_list_every_setting() {
        let readme = include_str!("../../README.md");
        let example = include_str!("../../warren.example.toml");
        for key in keys() {
            assert!(readme.contains(&flag(key)), "README.md lacks {}", flag(key));
            assert!(
                readme.contains(&variable(key)),
                "README.md lacks {}",
                variable(key)
            );
            assert!(
                example.lines().any(|l| {
                    let l = l.trim_start_matches(['#', ' ']);
                    l.starts_with(key) && l[key.len()..].trim_start().starts_with('=')
                }),
                "warren.example.toml lacks {key}"
            );
        }
    }

    /// The settings table of README.md, made from the declaration; the defaults are the
    /// values of warren.example.toml, which `the_example_file_is_the_defaults` holds to them.
    fn settings_table() -> String {
        let example: toml::Table =
            toml::from_str(include_str!("../../warren.example.toml")).unwrap();
        let command = Flags::command();
        let mut table = String::from(
            "| setting | flag | environment variable | default | what it sets |\n|---|---|---|---|---|\n",
        );
        for key in keys() {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == key)
                .expect("checked by every_setting_has_a_flag_and_a_variable_named_after_its_key");
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let default = example
                .get(key)
                .map_or_else(|| "unset".to_owned(), |v| format!("`{v}`"));
            table += &format!(
                "| `{key}` | `{}` | `{}` | {default} | {} |\n",
                flag(key),
                variable(key),
                help.replace('\n', " ")
            );
        }
        table
    }

    #[test]
    fn the_readme_settings_table_is_made_from_the_declaration() {
        let readme = include_str!("../../README.md");
        let start = "<!-- settings table: made from broker/src/config.rs -->\n";
        let end = "<!-- end of settings table -->";
        let at = readme
            .find(start)
            .expect("README.md has the settings table")
            + start.len();
        let len = readme[at..].find(end).expect("the table ends");
        let expected = settings_table();
        assert!(
            readme[at..at + len] == expected,
            "README.md's settings table is out of date; it should read:\n{expected}"
        );
    }

    /// What [`visit_settings`] hands each setting to.
    pub(super) trait Visit {
        fn visit<V: Sample>(&mut self, key: &'static str, holds: fn(&Config, V) -> bool);
    }

    /// Two distinct values of a setting's type, written for the command line (and the
    /// environment) and for the file.
    pub(super) trait Sample: Clone + 'static {
        fn pair() -> [Self; 2];
        fn text(&self) -> String;
        fn toml(&self) -> String {
            self.text()
        }
    }

    macro_rules! numbers {
        ($($t:ty),*) => {
            $(impl Sample for $t {
                fn pair() -> [Self; 2] {
                    [7001 as $t, 7002 as $t]
                }
                fn text(&self) -> String {
                    self.to_string()
                }
            })*
        };
    }
    numbers!(u16, u32, u64, usize);

    impl Sample for f64 {
        fn pair() -> [Self; 2] {
            [0.25, 0.75]
        }
        fn text(&self) -> String {
            self.to_string()
        }
    }

    impl Sample for bool {
        fn pair() -> [Self; 2] {
            [true, false]
        }
        fn text(&self) -> String {
            self.to_string()
        }
    }

    macro_rules! strings {
        ($($t:ty: $a:literal, $b:literal);*) => {
            $(impl Sample for $t {
                fn pair() -> [Self; 2] {
                    [$a.parse().unwrap(), $b.parse().unwrap()]
                }
                fn text(&self) -> String {
                    self.to_string()
                }
                fn toml(&self) -> String {
                    format!("{:?}", self.to_string())
                }
            })*
        };
    }
    strings!(String: "alpha", "beta"; SocketAddr: "127.0.0.1:7001", "127.0.0.1:7002");

    impl Sample for PathBuf {
        fn pair() -> [Self; 2] {
            ["/layers/a".into(), "/layers/b".into()]
        }
        fn text(&self) -> String {
            self.display().to_string()
        }
        fn toml(&self) -> String {
            format!("{:?}", self.text())
        }
    }

    impl Sample for NameList {
        fn pair() -> [Self; 2] {
            [
                NameList(vec!["ann".into(), "bob".into()]),
                NameList(vec!["cy".into()]),
            ]
        }
        fn text(&self) -> String {
            self.0.join(",")
        }
        fn toml(&self) -> String {
            format!("{:?}", self.0)
        }
    }

    /// One run of the layers, every setting at once: `X` differs from the default and `Y`
    /// from `X`. Layer 1 sets X in the file; layer 2 adds Y in the environment; layer 3 adds
    /// X as a flag. The value expected is the one of the highest layer.
    type Check = Box<dyn Fn(&Config) -> bool>;

    struct Plan {
        layers: u8,
        file: String,
        env: Vec<(String, String)>,
        args: Vec<String>,
        checks: Vec<(&'static str, Check)>,
    }

    impl Visit for Plan {
        fn visit<V: Sample>(&mut self, key: &'static str, holds: fn(&Config, V) -> bool) {
            let [a, b] = V::pair();
            let (x, y) = if holds(&Config::default(), a.clone()) {
                (b, a)
            } else {
                (a, b)
            };
            self.file += &format!("{key} = {}\n", x.toml());
            if self.layers >= 2 {
                self.env.push((variable(key), y.text()));
            }
            if self.layers >= 3 {
                self.args.push(format!("{}={}", flag(key), x.text()));
            }
            let expected = if self.layers == 2 { y } else { x };
            self.checks
                .push((key, Box::new(move |c| holds(c, expected.clone()))));
        }
    }

    fn plan(layers: u8) -> Plan {
        let mut plan = Plan {
            layers,
            file: String::new(),
            env: Vec::new(),
            args: Vec::new(),
            checks: Vec::new(),
        };
        visit_settings(&mut plan);
        plan
    }

    const LAYERS: &str = "WARREN_TEST_CONFIG_LAYERS";
    const THIS_TEST: &str =
        "config::tests::every_setting_is_read_from_the_file_then_the_environment_then_flags";

    /// The environment is process-wide, so each run happens in a child process (this test
    /// binary again, running only this test) with its variables set.
    #[test]
    fn every_setting_is_read_from_the_file_then_the_environment_then_flags() {
        if let Some(layers) = std::env::var_os(LAYERS) {
            let plan = plan(layers.to_str().unwrap().parse().unwrap());
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("warren.toml");
            std::fs::write(&path, &plan.file).unwrap();
            let config_flag = format!("--config={}", path.display());
            let argv = ["warren-broker", config_flag.as_str()]
                .into_iter()
                .chain(plan.args.iter().map(String::as_str));
            let config = Config::layered(Flags::try_parse_from(argv).unwrap()).unwrap();
            let wrong: Vec<_> = plan
                .checks
                .iter()
                .filter(|(_, holds)| !holds(&config))
                .map(|(key, _)| *key)
                .collect();
            assert!(
                wrong.is_empty(),
                "not taken from the right layer: {wrong:?}"
            );
            return;
        }
        for layers in 1..=3 {
            let plan = plan(layers);
            let mut child = std::process::Command::new(std::env::current_exe().unwrap());
            child.args([THIS_TEST, "--exact", "--test-threads=1", "--nocapture"]);
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("WARREN_") {
                    child.env_remove(name);
                }
            }
            child.env(LAYERS, layers.to_string()).envs(plan.env);
            let out = child.output().unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "layers {layers}: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
