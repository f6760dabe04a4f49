//! The ConfigMap with each broker's `warren.toml` and the list of its peers.

use super::{
    AMQP_PORT, AMQPS_PORT, CLUSTER_PORT, CONFIG_DIR, DATA_DIR, MANAGEMENT_PORT,
    MANAGEMENT_TLS_PORT, METRICS_PORT, TLS_DIR, config_map_name, owned_meta, peer_hosts,
};
use crate::crd::Instance;
use k8s_openapi::api::core::v1::ConfigMap;
use serde_json::Value;
use std::collections::BTreeMap;

/// The ConfigMap key (and file, beside `warren.toml`) with the peer list.
pub const PEERS_KEY: &str = "peers";

/// Keys of `warren.toml` the operator sets itself: `spec.config` may not change them.
pub const OWNED_KEYS: &[&str] = &[
    "data_dir",
    "amqp_listen",
    "amqps_listen",
    "management_listen",
    "management_tls_listen",
    "prometheus_listen",
    "cluster_listen",
    "peers",
    "peers_file",
    "cluster_secret",
    "cluster_secret_file",
    "node_name",
    "tls_cert_file",
    "tls_key_file",
    "tls_ca_file",
    "tls_verify_peer",
    "default_user",
    "default_pass",
];

/// Why `spec.config` cannot be used; reported in the Instance's `Reconciled` condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("spec.config.{0} is set by the operator and cannot be overridden")]
    Owned(String),
    #[error("spec.config.{key}: {why}")]
    Value { key: String, why: &'static str },
    /// The broker would refuse the file (unknown key, bad value): it would not start.
    #[error("spec.config: the broker refuses it: {0}")]
    Refused(String),
}

/// The `warren.toml` of the Instance's brokers. Each broker's node name and the default user's
/// password come from the environment (see the StatefulSet), not from this file.
pub fn warren_toml(instance: &Instance) -> Result<String, ConfigError> {
    let mut t = toml::Table::new();
    let mut put = |k: &str, v: toml::Value| {
        t.insert(k.to_owned(), v);
    };
    let listen = |port: i32| toml::Value::String(format!("0.0.0.0:{port}"));
    put("data_dir", toml::Value::String(DATA_DIR.into()));
    put("amqp_listen", listen(AMQP_PORT));
    put("management_listen", listen(MANAGEMENT_PORT));
    put("prometheus_listen", listen(METRICS_PORT));
    put("cluster_listen", listen(CLUSTER_PORT));
    // The peer list this ConfigMap carries, mounted beside this file; the brokers read it
    // again as replicas come and go.
    put(
        "peers_file",
        toml::Value::String(format!("{CONFIG_DIR}/{PEERS_KEY}")),
    );
    put("log_format", toml::Value::String("json".into()));
    // One name for all the Instance's brokers, so dashboards group their pods as one cluster
    // (`rabbitmq_identity_info{rabbitmq_cluster}`); `spec.config` may give another.
    put(
        "cluster_name",
        toml::Value::String(instance.metadata.name.clone().unwrap_or_default()),
    );
    if let Some(tls) = &instance.spec.tls {
        put("amqps_listen", listen(AMQPS_PORT));
        put("management_tls_listen", listen(MANAGEMENT_TLS_PORT));
        put(
            "tls_cert_file",
            toml::Value::String(format!("{TLS_DIR}/tls.crt")),
        );
        put(
            "tls_key_file",
            toml::Value::String(format!("{TLS_DIR}/tls.key")),
        );
        if tls.verify_peer {
            put(
                "tls_ca_file",
                toml::Value::String(format!("{TLS_DIR}/ca.crt")),
            );
            put("tls_verify_peer", toml::Value::Boolean(true));
        }
    }
    // The generated default user may connect from anywhere; `guest` stays loopback-only.
    put(
        "loopback_users",
        toml::Value::Array(vec![toml::Value::String("guest".into())]),
    );
    for (key, value) in &instance.spec.config {
        if OWNED_KEYS.contains(&key.as_str()) {
            return Err(ConfigError::Owned(key.clone()));
        }
        t.insert(key.clone(), to_toml(key, value)?);
    }
    let body = toml::to_string(&t).expect("a table of plain values serializes");
    // Checked with the broker's own loader: a typo here would stop every broker from starting.
    let checked = warren_broker::Config::from_toml(&body, std::path::Path::new("warren.toml"))
        .and_then(|c| c.validate());
    if let Err(e) = checked {
        return Err(ConfigError::Refused(e.to_string()));
    }
    Ok(format!(
        "# Written by warren-operator from Instance {}; edits here are reverted.\n{body}",
        instance.metadata.name.as_deref().unwrap_or_default()
    ))
}

fn to_toml(key: &str, value: &Value) -> Result<toml::Value, ConfigError> {
    let bad = |why| ConfigError::Value {
        key: key.to_owned(),
        why,
    };
    Ok(match value {
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None => toml::Value::Float(n.as_f64().ok_or_else(|| bad("number out of range"))?),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        Value::Array(items) => toml::Value::Array(
            items
                .iter()
                .map(|v| to_toml(key, v))
                .collect::<Result<_, _>>()?,
        ),
        Value::Null => return Err(bad("null is not a setting")),
        Value::Object(_) => return Err(bad("tables are not settings")),
    })
}

/// The ConfigMap: `warren.toml`, and `peers` with one broker DNS name per line (for clustering,
/// which reads it from `/etc/warren/peers`), one per replica of the StatefulSet (`replicas`, the
/// count applied to it). The peers are not part of the config hash: a scale does not restart
/// the brokers.
pub fn config_map(instance: &Instance, replicas: i32) -> Result<ConfigMap, ConfigError> {
    let mut data = BTreeMap::new();
    data.insert("warren.toml".to_owned(), warren_toml(instance)?);
    data.insert(
        PEERS_KEY.to_owned(),
        peer_hosts(instance, replicas).join("\n") + "\n",
    );
    Ok(ConfigMap {
        metadata: owned_meta(instance, config_map_name(instance)),
        data: Some(data),
        ..ConfigMap::default()
    })
}

/// Where the ConfigMap is mounted in a broker pod.
pub fn config_file() -> String {
    format!("{CONFIG_DIR}/warren.toml")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::fixtures::instance;

    #[test]
    fn the_config_listens_on_rabbitmqs_ports_and_lists_the_peers() {
        let cm = config_map(&instance("  replicas: 2\n"), 2).unwrap();
        let data = cm.data.unwrap();
        let config: toml::Table = toml::from_str(&data["warren.toml"]).unwrap();
        assert_eq!(config["amqp_listen"].as_str(), Some("0.0.0.0:5672"));
        assert_eq!(config["management_listen"].as_str(), Some("0.0.0.0:15672"));
        assert_eq!(config["prometheus_listen"].as_str(), Some("0.0.0.0:15692"));
        assert_eq!(config["data_dir"].as_str(), Some("/var/lib/warren"));
        assert!(!config.contains_key("amqps_listen"));
        assert_eq!(config["cluster_name"].as_str(), Some("demo"));
        assert_eq!(config["cluster_listen"].as_str(), Some("0.0.0.0:25672"));
        assert_eq!(config["peers_file"].as_str(), Some("/etc/warren/peers"));
        assert_eq!(
            data["peers"],
            "demo-0.demo-nodes.shop.svc\ndemo-1.demo-nodes.shop.svc\n"
        );
        assert_eq!(cm.metadata.name.as_deref(), Some("demo-config"));
    }

    #[test]
    fn the_peers_are_the_replicas_applied_to_the_stateful_set() {
        // The autoscaler runs 3 brokers of an Instance whose spec still says 1.
        let autoscaled = instance(
            "  replicas: 1\n  autoscaling:\n    enabled: true\n    minReplicas: 1\n    maxReplicas: 5\n",
        );
        let data = config_map(&autoscaled, 3).unwrap().data.unwrap();
        assert_eq!(
            data["peers"],
            "demo-0.demo-nodes.shop.svc\ndemo-1.demo-nodes.shop.svc\ndemo-2.demo-nodes.shop.svc\n"
        );
    }

    #[test]
    fn tls_adds_the_tls_listeners_and_the_mounted_files() {
        let text = warren_toml(&instance(
            "  tls:\n    secretName: demo-tls\n    verifyPeer: true\n",
        ))
        .unwrap();
        let config: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(config["amqps_listen"].as_str(), Some("0.0.0.0:5671"));
        assert_eq!(
            config["management_tls_listen"].as_str(),
            Some("0.0.0.0:15671")
        );
        assert_eq!(
            config["tls_cert_file"].as_str(),
            Some("/etc/warren/tls/tls.crt")
        );
        assert_eq!(
            config["tls_ca_file"].as_str(),
            Some("/etc/warren/tls/ca.crt")
        );
        assert_eq!(config["tls_verify_peer"].as_bool(), Some(true));
    }

    #[test]
    fn extra_settings_keep_their_types_and_owned_keys_are_refused() {
        let text = warren_toml(&instance(
            "  config:\n    heartbeat: 30\n    memory_high_watermark: 0.6\n    log_format: text\n",
        ))
        .unwrap();
        let config: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(config["heartbeat"].as_integer(), Some(30));
        assert_eq!(config["memory_high_watermark"].as_float(), Some(0.6));
        assert_eq!(config["log_format"].as_str(), Some("text"));
        let renamed = warren_toml(&instance("  config:\n    cluster_name: shop-events\n")).unwrap();
        let renamed: toml::Table = toml::from_str(&renamed).unwrap();
        assert_eq!(renamed["cluster_name"].as_str(), Some("shop-events"));
        assert_eq!(
            warren_toml(&instance("  config:\n    amqp_listen: 0.0.0.0:1\n")).unwrap_err(),
            ConfigError::Owned("amqp_listen".into())
        );
        let err = warren_toml(&instance("  config:\n    heartbeat: {a: 1}\n")).unwrap_err();
        assert!(err.to_string().contains("spec.config.heartbeat"), "{err}");
        // What the broker would refuse is refused here, with its words.
        let err = warren_toml(&instance("  config:\n    heartbeats: 30\n")).unwrap_err();
        assert!(matches!(err, ConfigError::Refused(_)), "{err}");
        assert!(err.to_string().contains("heartbeats"), "{err}");
        let err = warren_toml(&instance("  config:\n    log_format: xml\n")).unwrap_err();
        assert!(err.to_string().contains("log_format"), "{err}");
    }

    #[test]
    fn the_broker_accepts_what_the_operator_writes() {
        // The broker refuses unknown keys and bad values: parse the file as it will.
        let text = warren_toml(&instance(
            "  tls:\n    secretName: t\n    verifyPeer: true\n  config:\n    heartbeat: 30\n",
        ))
        .unwrap();
        let config =
            warren_broker::Config::from_toml(&text, std::path::Path::new("warren.toml")).unwrap();
        assert_eq!(config.heartbeat, 30);
        assert_eq!(config.cluster_name.as_deref(), Some("demo"));
        assert_eq!(config.amqp_listen, "0.0.0.0:5672".parse().unwrap());
        assert!(config.tls_verify_peer);
        assert!(config.validate().is_ok());
    }
}
