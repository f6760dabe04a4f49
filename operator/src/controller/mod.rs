//! Reconcilers. What they decide lives in pure or broker-only functions (tested without a
//! cluster); the Kubernetes glue (watches, finalizers, status patches) calls them.
//!
//! - [`conditions`]: status conditions, set as Kubernetes conventions want.
//! - [`broker_object`]: the generic reconciler of Vhost, Queue, Exchange and Binding.
//! - [`broker_resources`]: its Kubernetes side (finalizer, credentials, status).
//! - [`instance`]: the Instance reconciler (Secret, owned objects by server-side apply,
//!   status from the StatefulSet).

pub mod broker_object;
pub mod broker_resources;
pub mod conditions;
pub mod instance;
