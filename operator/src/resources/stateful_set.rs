//! The StatefulSet of brokers: one pod per replica with its own volume, the config from the
//! ConfigMap, the default user and the cluster secret from their Secrets, probes on the broker's health endpoints, a
//! non-root security context and, unless the Instance says otherwise, brokers spread over nodes.

use super::config_map::{config_file, warren_toml};
use super::secret::CLUSTER_SECRET_KEY;
use super::service::node_ports;
use super::{
    CONFIG_DIR, DATA_DIR, Defaults, TLS_DIR, cluster_secret_name, config_map_name,
    default_user_secret_name, headless_service_name, labels, name_of, namespace_of, owned_meta,
    selector_labels,
};
use crate::crd::Instance;
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecretKeySelector,
    SecretVolumeSource, SecurityContext, Volume, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// The annotation whose change rolls the pods when the config changes.
pub const CONFIG_HASH_ANNOTATION: &str = "warren.dev/config-hash";

/// The broker user and group in the image (not root).
const BROKER_UID: i64 = 1000;

/// A stable hash of the config (FNV-1a, 64 bits): the same text gives the same annotation in
/// every operator version, so an operator upgrade alone does not restart brokers.
fn config_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.to_owned()),
        ..EnvVar::default()
    }
}

fn env_from_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn env_from_secret(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.to_owned(),
                key: key.to_owned(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("prometheus".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Probe::default()
    }
}

/// Brokers of one Instance prefer different nodes, so losing a node loses one broker.
fn spread_over_nodes(instance: &Instance) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        topology_key: "kubernetes.io/hostname".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector_labels(instance)),
                            ..LabelSelector::default()
                        }),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// The StatefulSet with `replicas` brokers (the spec's count, or the autoscaler's).
pub fn stateful_set(
    instance: &Instance,
    defaults: &Defaults,
    replicas: i32,
) -> Result<StatefulSet, super::config_map::ConfigError> {
    let spec = &instance.spec;
    let name = name_of(instance);
    let secret = default_user_secret_name(instance);
    let node_name = format!(
        "warren@$(POD_NAME).{}.{}.svc",
        headless_service_name(instance),
        namespace_of(instance)
    );
    let container_ports = node_ports(instance)
        .into_iter()
        .map(|p| ContainerPort {
            name: p.name,
            container_port: p.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        })
        .collect();
    let mut mounts = vec![
        VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "config".into(),
            mount_path: CONFIG_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(instance),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    if let Some(tls) = &spec.tls {
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls.secret_name.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let container = Container {
        name: "warren".into(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| defaults.broker_image.clone()),
        ),
        args: Some(vec!["--config".into(), config_file()]),
        env: Some(vec![
            env_from_field("POD_NAME", "metadata.name"),
            env_from_field("POD_NAMESPACE", "metadata.namespace"),
            env("WARREN_NODE_NAME", &node_name),
            env_from_secret("WARREN_DEFAULT_USER", &secret, "username"),
            env_from_secret("WARREN_DEFAULT_PASS", &secret, "password"),
            env_from_secret(
                "WARREN_CLUSTER_SECRET",
                &cluster_secret_name(instance),
                CLUSTER_SECRET_KEY,
            ),
        ]),
        ports: Some(container_ports),
        resources: spec.resources.clone(),
        readiness_probe: Some(probe("/health/ready", 5, 3)),
        // Recovering a large data directory comes before the probes answer: up to 30 minutes.
        startup_probe: Some(probe("/health/live", 5, 360)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..probe("/health/live", 10, 6)
        }),
        // Before SIGTERM: maintenance mode, so clients leave for the other brokers and the
        // Service stops sending new ones (readiness fails) before the broker stops.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec![
                        "warren-broker".into(),
                        "--config".into(),
                        config_file(),
                        "drain".into(),
                    ]),
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    let mut annotations = spec.pod.annotations.clone();
    annotations.insert(
        CONFIG_HASH_ANNOTATION.into(),
        config_hash(&warren_toml(instance)?),
    );
    let pod = PodSpec {
        containers: vec![container],
        volumes: Some(volumes),
        affinity: Some(
            spec.pod
                .affinity
                .clone()
                .unwrap_or_else(|| spread_over_nodes(instance)),
        ),
        tolerations: (!spec.pod.tolerations.is_empty()).then(|| spec.pod.tolerations.clone()),
        node_selector: (!spec.pod.node_selector.is_empty()).then(|| spec.pod.node_selector.clone()),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(BROKER_UID),
            run_as_group: Some(BROKER_UID),
            fs_group: Some(BROKER_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        // SIGTERM closes client connections and syncs: give it time.
        termination_grace_period_seconds: Some(60),
        ..PodSpec::default()
    };
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(labels(instance)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: spec.storage.class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    spec.storage.size.clone(),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    Ok(StatefulSet {
        metadata: owned_meta(instance, name.to_owned()),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(headless_service_name(instance)),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(instance)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(instance)),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![claim]),
            // Deleting the Instance deletes its brokers' data, as it deletes their Secret: a new
            // Instance of the same name starts clean, never with data whose users it cannot log
            // in as. Scaling down keeps a broker's volume for when it comes back.
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some("Delete".into()),
                    when_scaled: Some("Retain".into()),
                },
            ),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::fixtures::instance;

    fn defaults() -> Defaults {
        Defaults {
            broker_image: "warren-broker:test".into(),
        }
    }

    fn pod(s: &StatefulSet) -> &PodSpec {
        s.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn brokers_get_their_volume_config_credentials_and_probes() {
        let i = instance("  replicas: 3\n  storage:\n    className: fast\n    size: 20Gi\n");
        let s = stateful_set(&i, &defaults(), 3).unwrap();
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.service_name.as_deref(), Some("demo-nodes"));
        let retention = spec
            .persistent_volume_claim_retention_policy
            .as_ref()
            .unwrap();
        assert_eq!(retention.when_deleted.as_deref(), Some("Delete"));
        assert_eq!(retention.when_scaled.as_deref(), Some("Retain"));
        let claim = &spec.volume_claim_templates.as_ref().unwrap()[0];
        let claim_spec = claim.spec.as_ref().unwrap();
        assert_eq!(claim_spec.storage_class_name.as_deref(), Some("fast"));
        assert_eq!(
            claim_spec
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"]
                .0,
            "20Gi"
        );
        let c = &pod(&s).containers[0];
        assert_eq!(c.image.as_deref(), Some("warren-broker:test"));
        assert_eq!(
            c.args.as_deref().unwrap(),
            ["--config", "/etc/warren/warren.toml"]
        );
        let env: BTreeMap<_, _> = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e))
            .collect();
        assert_eq!(
            env["WARREN_NODE_NAME"].value.as_deref(),
            Some("warren@$(POD_NAME).demo-nodes.shop.svc")
        );
        let cookie = env["WARREN_CLUSTER_SECRET"].value_from.as_ref().unwrap();
        let key = cookie.secret_key_ref.as_ref().unwrap();
        assert_eq!(
            (key.name.as_str(), key.key.as_str()),
            ("demo-cluster-secret", "secret")
        );
        let pass = env["WARREN_DEFAULT_PASS"].value_from.as_ref().unwrap();
        let key = pass.secret_key_ref.as_ref().unwrap();
        assert_eq!(
            (key.name.as_str(), key.key.as_str()),
            ("demo-default-user", "password")
        );
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/health/ready"));
        let startup = c.startup_probe.as_ref().unwrap();
        assert_eq!(startup.failure_threshold, Some(360));
        assert_eq!(ready.port, IntOrString::String("prometheus".into()));
        // Liveness: the broker's own liveness endpoint, patient enough (6 × 10 s) that a busy
        // broker is not restarted, and only after the startup probe has passed.
        let live = c.liveness_probe.as_ref().unwrap();
        let live_get = live.http_get.as_ref().unwrap();
        assert_eq!(live_get.path.as_deref(), Some("/health/live"));
        assert_eq!(live_get.port, IntOrString::String("prometheus".into()));
        assert_eq!(
            (
                live.initial_delay_seconds,
                live.period_seconds,
                live.failure_threshold,
                live.timeout_seconds
            ),
            (Some(10), Some(10), Some(6), Some(5))
        );
        let pre_stop = c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap();
        assert_eq!(
            pre_stop.exec.as_ref().unwrap().command.as_deref().unwrap(),
            [
                "warren-broker",
                "--config",
                "/etc/warren/warren.toml",
                "drain"
            ]
        );
        let mounts: Vec<_> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(
            mounts,
            [("data", "/var/lib/warren"), ("config", "/etc/warren")]
        );
    }

    #[test]
    fn brokers_run_as_non_root_with_a_read_only_root() {
        let s = stateful_set(&instance("  replicas: 1\n"), &defaults(), 1).unwrap();
        let p = pod(&s);
        assert_eq!(
            p.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        let c = p.containers[0].security_context.as_ref().unwrap();
        assert_eq!(c.read_only_root_filesystem, Some(true));
        assert_eq!(c.allow_privilege_escalation, Some(false));
        assert_eq!(
            c.capabilities.as_ref().unwrap().drop.as_deref().unwrap(),
            ["ALL"]
        );
    }

    #[test]
    fn brokers_prefer_different_nodes_unless_the_instance_says_otherwise() {
        let s = stateful_set(&instance("  replicas: 3\n"), &defaults(), 3).unwrap();
        let anti = pod(&s)
            .affinity
            .as_ref()
            .unwrap()
            .pod_anti_affinity
            .as_ref()
            .unwrap();
        let term = &anti
            .preferred_during_scheduling_ignored_during_execution
            .as_ref()
            .unwrap()[0];
        assert_eq!(
            term.pod_affinity_term.topology_key,
            "kubernetes.io/hostname"
        );
        let custom = instance(
            "  pod:\n    affinity:\n      nodeAffinity: {}\n    nodeSelector:\n      disk: ssd\n    tolerations:\n    - key: dedicated\n      operator: Exists\n    annotations:\n      team: shop\n",
        );
        let s = stateful_set(&custom, &defaults(), 1).unwrap();
        let p = pod(&s);
        assert!(p.affinity.as_ref().unwrap().pod_anti_affinity.is_none());
        assert_eq!(p.node_selector.as_ref().unwrap()["disk"], "ssd");
        assert_eq!(
            p.tolerations.as_ref().unwrap()[0].key.as_deref(),
            Some("dedicated")
        );
        let annotations = s
            .spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap();
        assert_eq!(annotations["team"], "shop");
    }

    #[test]
    fn a_config_change_changes_the_pod_template() {
        let hash = |yaml: &str| {
            let s = stateful_set(&instance(yaml), &defaults(), 1).unwrap();
            s.spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()[CONFIG_HASH_ANNOTATION]
                .clone()
        };
        assert_eq!(hash("  replicas: 1\n"), hash("  replicas: 1\n"));
        // Scaling is not a config change: the replica count (and the peers) leave it alone.
        assert_eq!(hash("  replicas: 1\n"), hash("  replicas: 4\n"));
        assert_ne!(
            hash("  replicas: 1\n"),
            hash("  config:\n    heartbeat: 5\n")
        );
    }

    #[test]
    fn tls_mounts_the_certificate_secret() {
        let s = stateful_set(
            &instance("  tls:\n    secretName: demo-tls\n"),
            &defaults(),
            1,
        )
        .unwrap();
        let p = pod(&s);
        let tls = p
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "tls")
            .unwrap();
        assert_eq!(
            tls.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("demo-tls")
        );
        let ports: Vec<_> = p.containers[0]
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| p.container_port)
            .collect();
        assert!(ports.contains(&5671) && ports.contains(&15671));
    }
}
