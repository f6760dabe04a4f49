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
//! Still to come, in the layout DESIGN.md gives: the Kubernetes side of the controllers (kube
//! runtime, server-side apply, finalizers) and `scaling/` (autoscaler).
#![deny(unsafe_code)]
#![deny(missing_debug_implementations)]

pub mod broker_api;
pub mod controller;
pub mod crd;
pub mod resources;
