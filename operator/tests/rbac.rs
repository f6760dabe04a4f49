//! The operator's RBAC, as `manifests/install.yaml` (the chart's rendering) grants it, is
//! exactly the list below: each verb with the call of the operator that needs it. A change to
//! the chart's ClusterRole or Role that grants more (or less) fails here, so growing it is a
//! decision written down twice, not a slip.

use serde::Deserialize;
use serde_yaml::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// (API group, resource) → verbs.
type Grants = BTreeMap<(String, String), BTreeSet<String>>;

/// What the ClusterRole `warren-operator` may do, and why.
const CLUSTER_ROLE: &[(&str, &str, &[&str])] = &[
    // Every controller lists and watches Instances; the broker-side kinds get theirs
    // (Context::broker_api).
    ("warren.dev", "instances", &["get", "list", "watch"]),
    // Each broker-side controller watches its kind; the finalizer is added and removed with a
    // JSON patch (kube's finalizer helper).
    ("warren.dev", "vhosts", &["list", "watch", "patch"]),
    ("warren.dev", "queues", &["list", "watch", "patch"]),
    ("warren.dev", "exchanges", &["list", "watch", "patch"]),
    ("warren.dev", "bindings", &["list", "watch", "patch"]),
    // Status: a merge patch of the status subresource (patch_status).
    ("warren.dev", "instances/status", &["patch"]),
    ("warren.dev", "vhosts/status", &["patch"]),
    ("warren.dev", "queues/status", &["patch"]),
    ("warren.dev", "exchanges/status", &["patch"]),
    ("warren.dev", "bindings/status", &["patch"]),
    // No call: owner references with blockOwnerDeletion to an Instance, under the
    // OwnerReferencesPermissionEnforcement admission plugin.
    ("warren.dev", "instances/finalizers", &["update"]),
    // Owned objects: watched (Controller::owns), applied server-side (patch, and create when
    // the apply makes the object).
    ("", "configmaps", &["list", "watch", "create", "patch"]),
    ("", "services", &["list", "watch", "create", "patch"]),
    (
        "policy",
        "poddisruptionbudgets",
        &["list", "watch", "create", "patch"],
    ),
    // The autoscaler reads the StatefulSet's replicas (get).
    (
        "apps",
        "statefulsets",
        &["get", "list", "watch", "create", "patch"],
    ),
    // The default-user Secret: looked for, created once; read for the broker's credentials.
    ("", "secrets", &["get", "list", "watch", "create"]),
    // Events on an Instance (kube's Recorder: create, and patch for a series).
    ("events.k8s.io", "events", &["create", "patch"]),
];

/// What the Role `warren-operator-leader-election` (the operator's namespace only) may do:
/// read the Lease, create it, and take, renew or release it with a guarded replace.
const LEADER_ELECTION_ROLE: &[(&str, &str, &[&str])] = &[(
    "coordination.k8s.io",
    "leases",
    &["get", "create", "update"],
)];

fn install_yaml() -> Vec<Value> {
    // From the environment of this run, not compile time (see tests/crds.rs).
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .parent()
        .expect("operator/ sits in the workspace root")
        .to_path_buf();
    let text = std::fs::read_to_string(root.join("manifests/install.yaml")).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

fn object<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("manifests/install.yaml has no {kind} {name}"))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

/// The grants of a Role or ClusterRole, refusing what this list cannot express (wildcards,
/// resourceNames, nonResourceURLs).
fn grants(role: &Value) -> Grants {
    let mut out = Grants::new();
    for rule in role["rules"].as_sequence().expect("rules") {
        for key in ["resourceNames", "nonResourceURLs"] {
            assert!(rule.get(key).is_none(), "{key} in {rule:?}");
        }
        let verbs = strings(&rule["verbs"]);
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for word in verbs.iter().chain([&group, &resource]) {
                    assert!(!word.contains('*'), "a wildcard in {rule:?}");
                }
                let entry = out.entry((group.clone(), resource)).or_default();
                entry.extend(verbs.iter().cloned());
            }
        }
    }
    out
}

fn expected(list: &[(&str, &str, &[&str])]) -> Grants {
    list.iter()
        .map(|(g, r, verbs)| {
            (
                ((*g).to_owned(), (*r).to_owned()),
                verbs.iter().map(|v| (*v).to_owned()).collect(),
            )
        })
        .collect()
}

#[test]
fn the_cluster_role_grants_exactly_what_the_operator_uses() {
    let docs = install_yaml();
    let role = object(&docs, "ClusterRole", "warren-operator");
    assert_eq!(grants(role), expected(CLUSTER_ROLE));
}

#[test]
fn leases_are_granted_only_in_the_operators_namespace() {
    let docs = install_yaml();
    let role = object(&docs, "Role", "warren-operator-leader-election");
    assert_eq!(
        role["metadata"]["namespace"].as_str(),
        Some("warren-system")
    );
    assert_eq!(grants(role), expected(LEADER_ELECTION_ROLE));
    // Nothing cluster-wide on leases.
    let cluster = grants(object(&docs, "ClusterRole", "warren-operator"));
    assert!(
        !cluster.keys().any(|(g, _)| g == "coordination.k8s.io"),
        "{cluster:?}"
    );
}

#[test]
fn the_operator_deletes_nothing() {
    let docs = install_yaml();
    for (kind, name) in [
        ("ClusterRole", "warren-operator"),
        ("Role", "warren-operator-leader-election"),
    ] {
        for ((group, resource), verbs) in grants(object(&docs, kind, name)) {
            assert!(
                !verbs.contains("delete") && !verbs.contains("deletecollection"),
                "{kind} {name} lets the operator delete {resource}.{group}"
            );
        }
    }
}
