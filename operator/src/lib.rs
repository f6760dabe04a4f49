//! Warren's Kubernetes operator.
//!
//! - [`crd`]: the custom resources (`Instance`, `Vhost`, `Queue`, `Exchange`, `Binding`) and
//!   their generated CustomResourceDefinitions.
//!
//! - [`resources`]: pure builders of the objects an Instance owns (ConfigMap, Secret, Services,
//!   StatefulSet, PodDisruptionBudget).
//!
//! - [`broker_api`]: the one place that talks to a broker (its management API).
//! - [`controller`]: what the reconcilers decide (conditions, the generic reconciler of the
//!   broker-side kinds).
//!
//! - [`process`]: the controllers wired to the cluster, and the operator's probes.
//! - [`metrics`]: the operator's own metrics (reconciliations, errors, not-ready resources).
//!
//! - [`lease`]: leader election with a Lease, so two replicas are safe.
//!
//! - [`scaling`]: the autoscaler (decisions from broker metrics, stabilization, drain).
#![deny(unsafe_code)]
#![deny(missing_debug_implementations)]

pub mod broker_api;
pub mod controller;
pub mod crd;
pub mod lease;
pub mod metrics;
pub mod process;
pub mod resources;
pub mod scaling;
