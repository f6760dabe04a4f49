//! The custom resources as a user writes them: minimal manifests get RabbitMQ's defaults, the
//! examples in `manifests/` parse, and the CEL rules the API server enforces (immutable fields,
//! reserved names, autoscaling bounds) hold, evaluated here with kube's CEL interpreter.

use warren_operator::crd::binding::DestinationType;
use warren_operator::crd::common::DeletionPolicy;
use warren_operator::crd::exchange::ExchangeType;
use warren_operator::crd::queue::QueueType;
use warren_operator::crd::{Binding, Exchange, Instance, Queue, Vhost};

fn from_yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_yaml::from_str(text).unwrap_or_else(|e| panic!("{e}:\n{text}"))
}

fn queue(extra: &str) -> Queue {
    from_yaml(&format!(
        "apiVersion: warren.dev/v1alpha1\nkind: Queue\nmetadata:\n  name: q\nspec:\n  instanceRef:\n    name: demo\n  name: orders\n{extra}"
    ))
}

#[test]
fn a_minimal_queue_gets_rabbitmqs_defaults() {
    let q = queue("");
    assert_eq!(q.spec.vhost, "/");
    assert_eq!(q.spec.queue_type, QueueType::Classic);
    assert!(q.spec.durable);
    assert!(!q.spec.auto_delete);
    assert!(q.spec.arguments.is_empty());
    assert_eq!(q.spec.deletion_policy, DeletionPolicy::Delete);
    assert!(q.validate_cel().is_ok());
}

#[test]
fn a_minimal_instance_gets_one_replica_and_ten_gibibytes() {
    let i: Instance = from_yaml(
        "apiVersion: warren.dev/v1alpha1\nkind: Instance\nmetadata:\n  name: demo\nspec: {}\n",
    );
    assert_eq!(i.spec.replicas, 1);
    assert_eq!(i.spec.storage.size.0, "10Gi");
    assert!(i.spec.autoscaling.is_none());
    assert!(i.validate_cel().is_ok());
}

#[test]
fn the_identity_of_a_queue_cannot_change() {
    let old = queue("  arguments:\n    x-max-length: 10\n");
    for (field, changed) in [
        ("name", {
            let mut q = old.clone();
            q.spec.name = "other".into();
            q
        }),
        ("vhost", {
            let mut q = old.clone();
            q.spec.vhost = "v".into();
            q
        }),
        ("type", {
            let mut q = old.clone();
            q.spec.queue_type = QueueType::Quorum;
            q
        }),
        ("durable", {
            let mut q = old.clone();
            q.spec.durable = false;
            q
        }),
        ("arguments", {
            let mut q = old.clone();
            q.spec
                .arguments
                .insert("x-max-length".into(), serde_json::json!(20));
            q
        }),
    ] {
        let err = changed
            .validate_cel_update(&old)
            .expect_err(&format!("changing {field} is refused"));
        assert!(err.to_string().contains("immutable"), "{field}: {err}");
    }
    // The deletion policy may change.
    let mut retained = old.clone();
    retained.spec.deletion_policy = DeletionPolicy::Retain;
    assert!(retained.validate_cel_update(&old).is_ok());
}

#[test]
fn amq_names_are_reserved_for_queues_and_exchanges() {
    let q = queue("").tap(|q| q.spec.name = "amq.mine".into());
    let err = q.validate_cel().expect_err("amq. is reserved");
    assert!(err.to_string().contains("reserved"), "{err}");
    assert!(
        queue("")
            .tap(|q| q.spec.name = "amqp".into())
            .validate_cel()
            .is_ok()
    );
    let x: Exchange = from_yaml(
        "apiVersion: warren.dev/v1alpha1\nkind: Exchange\nmetadata:\n  name: x\nspec:\n  instanceRef:\n    name: demo\n  name: amq.custom\n",
    );
    assert_eq!(x.spec.exchange_type, ExchangeType::Direct);
    assert!(x.validate_cel().is_err());
}

#[test]
fn autoscaling_bounds_must_be_ordered() {
    let i: Instance = from_yaml(
        "apiVersion: warren.dev/v1alpha1\nkind: Instance\nmetadata:\n  name: demo\nspec:\n  autoscaling:\n    enabled: true\n    minReplicas: 5\n    maxReplicas: 3\n",
    );
    let err = i.validate_cel().expect_err("min above max");
    assert!(err.to_string().contains("minReplicas"), "{err}");
    let a = i.spec.autoscaling.as_ref().unwrap();
    assert_eq!(a.scale_up_stabilization_seconds, 60);
    assert_eq!(a.scale_down_stabilization_seconds, 300);
}

#[test]
fn instance_names_leave_room_for_pod_names() {
    let long = "a".repeat(53);
    let i: Instance = from_yaml(&format!(
        "apiVersion: warren.dev/v1alpha1\nkind: Instance\nmetadata:\n  name: {long}\nspec: {{}}\n"
    ));
    assert!(i.validate_cel().is_err());
}

#[test]
fn bindings_and_vhosts_are_immutable_but_their_deletion_policy() {
    let b: Binding = from_yaml(
        "apiVersion: warren.dev/v1alpha1\nkind: Binding\nmetadata:\n  name: b\nspec:\n  instanceRef:\n    name: demo\n  source: orders\n  destination: orders.created\n  routingKey: order.created.#\n",
    );
    assert_eq!(b.spec.destination_type, DestinationType::Queue);
    let mut changed = b.clone();
    changed.spec.routing_key = "other".into();
    assert!(changed.validate_cel_update(&b).is_err());
    let v: Vhost = from_yaml(
        "apiVersion: warren.dev/v1alpha1\nkind: Vhost\nmetadata:\n  name: v\nspec:\n  instanceRef:\n    name: demo\n  name: orders\n  limits:\n    maxQueues: 10\n",
    );
    let mut renamed = v.clone();
    renamed.spec.name = "x".into();
    assert!(renamed.validate_cel_update(&v).is_err());
    let mut relimited = v.clone();
    relimited.spec.limits.as_mut().unwrap().max_queues = Some(20);
    assert!(relimited.validate_cel_update(&v).is_ok());
}

/// `value.tap(|v| ...)`: a changed copy, for short test fixtures.
trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl<T> Tap for T {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

#[test]
fn storage_is_fixed_at_creation_and_names_must_be_dns_labels() {
    let old: Instance = from_yaml(
        "apiVersion: warren.dev/v1alpha1\nkind: Instance\nmetadata:\n  name: demo\nspec:\n  storage:\n    size: 10Gi\n",
    );
    let mut bigger = old.clone();
    bigger.spec.storage.size.0 = "20Gi".into();
    let err = bigger
        .validate_cel_update(&old)
        .expect_err("storage is fixed");
    assert!(err.to_string().contains("storage"), "{err}");
    let mut scaled = old.clone();
    scaled.spec.replicas = 5;
    assert!(scaled.validate_cel_update(&old).is_ok());
    for bad in ["demo.v2", "1abc", "Demo"] {
        let i: Instance = from_yaml(&format!(
            "apiVersion: warren.dev/v1alpha1\nkind: Instance\nmetadata:\n  name: \"{bad}\"\nspec: {{}}\n"
        ));
        assert!(i.validate_cel().is_err(), "{bad} is not a DNS label");
    }
}
