//! The Kubernetes side of the broker-side kinds (Vhost, Queue, Exchange, Binding): a finalizer
//! so deletion reaches the broker, the broker found from the Instance and its default-user
//! Secret, the `Ready` condition written to the status subresource, the backoff of each object
//! after failures, and which objects an Instance turning ready wakes. What to do is decided in
//! [`super::broker_object`].

use super::broker_object::{BrokerObject, finalize, reconcile as reconcile_object};
use super::conditions;
use crate::broker_api::{BrokerApi, BrokerError};
use crate::crd::status::ObjectStatus;
use crate::crd::{Binding, Exchange, Instance, Queue, Vhost};
use crate::metrics::{ErrorKind, OperatorMetrics};
use crate::resources::default_user_secret_name;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The finalizer that keeps a resource until its object is gone from the broker (or retained).
pub const FINALIZER: &str = "warren.dev/broker-object";

/// How often a Ready object is looked at again, to repair what was changed in the broker.
pub const RESYNC: Duration = Duration::from_secs(600);

/// A custom resource whose spec is a [`BrokerObject`].
pub trait BrokerResource:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Serialize
    + DeserializeOwned
    + Debug
    + Send
    + Sync
    + 'static
{
    type Object: BrokerObject + Send + Sync;
    fn object(&self) -> &Self::Object;
    fn object_status(&self) -> Option<&ObjectStatus>;
}

macro_rules! broker_resource {
    ($($kind:ty => $spec:ty),* $(,)?) => {$(
        impl BrokerResource for $kind {
            type Object = $spec;
            fn object(&self) -> &$spec {
                &self.spec
            }
            fn object_status(&self) -> Option<&ObjectStatus> {
                self.status.as_ref()
            }
        }
    )*};
}

broker_resource!(
    Vhost => crate::crd::vhost::VhostSpec,
    Queue => crate::crd::queue::QueueSpec,
    Exchange => crate::crd::exchange::ExchangeSpec,
    Binding => crate::crd::binding::BindingSpec,
);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Deleting from the broker failed: the finalizer stays and the deletion is retried.
    #[error(transparent)]
    Broker(BrokerError),
}

impl ErrorKind for Error {
    /// What failed inside the finalizer's frame: the API server (`kube`), the finalizer's own
    /// patch (`finalizer`), or the broker (its reason, `BrokerUnreachable`, ...).
    fn kind(&self) -> &'static str {
        use kube::runtime::finalizer::Error as F;
        match self {
            Self::Kube(_) => "kube",
            Self::Finalizer(e) => match e.as_ref() {
                F::ApplyFailed(e) | F::CleanupFailed(e) => e.kind(),
                F::AddFinalizer(_)
                | F::RemoveFinalizer(_)
                | F::UnnamedObject
                | F::InvalidFinalizer => "finalizer",
            },
            Self::Broker(e) => e.reason(),
        }
    }
}

/// What the broker-side controllers share.
pub struct Context {
    pub client: Client,
    /// The management API of an Instance, with `{instance}` and `{namespace}` filled in; in a
    /// cluster, its client Service.
    pub broker_url: String,
    /// Failed attempts per object since its last success, for the backoff.
    attempts: Mutex<HashMap<String, u32>>,
    /// Where reconciles that leave an object not Ready are counted.
    pub metrics: Arc<OperatorMetrics>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("broker_url", &self.broker_url)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(client: Client) -> Self {
        Self::with_broker_url(client, "http://{instance}.{namespace}.svc:15672")
    }

    pub fn with_broker_url(client: Client, broker_url: &str) -> Self {
        Self {
            client,
            broker_url: broker_url.to_owned(),
            attempts: Mutex::new(HashMap::new()),
            metrics: Arc::new(OperatorMetrics::default()),
        }
    }

    /// The same, counting into `metrics` (the process's registry).
    #[must_use]
    pub fn with_metrics(self, metrics: Arc<OperatorMetrics>) -> Self {
        Self { metrics, ..self }
    }

    /// The management API of Instance `instance` in `namespace`, with the default user's
    /// credentials; `None` while the Instance or its Secret does not exist.
    pub async fn broker_api(
        &self,
        namespace: &str,
        instance: &str,
    ) -> Result<Option<BrokerApi>, kube::Error> {
        let instances: Api<Instance> = Api::namespaced(self.client.clone(), namespace);
        let Some(i) = instances.get_opt(instance).await? else {
            return Ok(None);
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let Some(secret) = secrets.get_opt(&default_user_secret_name(&i)).await? else {
            return Ok(None);
        };
        let field = |key: &str| {
            secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
        };
        let (Some(user), Some(password)) = (field("username"), field("password")) else {
            return Ok(None);
        };
        let url = self
            .broker_url
            .replace("{instance}", instance)
            .replace("{namespace}", namespace);
        Ok(Some(BrokerApi::new(&url, &user, &password)))
    }

    fn attempt(&self, key: &str) -> u32 {
        self.attempts
            .lock()
            .expect("not poisoned")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    fn record(&self, key: &str, failed: bool) {
        let mut attempts = self.attempts.lock().expect("not poisoned");
        if failed {
            *attempts.entry(key.to_owned()).or_default() += 1;
        } else {
            attempts.remove(key);
        }
    }

    /// Forgets the failures of `objects`: their next failure backs off from the start again.
    fn fresh_start<K: BrokerResource>(&self, objects: &[ObjectRef<K>]) {
        let mut attempts = self.attempts.lock().expect("not poisoned");
        for o in objects {
            attempts.remove(&key(
                o.namespace.as_deref().unwrap_or_default(),
                &o.name,
                &K::kind(&()),
            ));
        }
    }
}

fn key(namespace: &str, name: &str, kind: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

fn key_of<K: BrokerResource>(obj: &K) -> String {
    key(
        &obj.namespace().unwrap_or_default(),
        &obj.name_any(),
        &K::kind(&()),
    )
}

/// Whether an Instance says its brokers are ready (its `Ready` condition is true).
pub fn instance_ready(instance: &Instance) -> bool {
    instance
        .status
        .as_ref()
        .and_then(|s| conditions::find(&s.conditions, conditions::READY))
        .is_some_and(|c| c.status == "True")
}

/// The objects of `objects` that live in `instance`'s broker: same namespace, and their
/// `spec.instanceRef.name` names it. Only for a ready Instance: until then a reconcile could
/// only fail again, and each failure would lengthen the object's backoff.
pub fn objects_of_instance<K: BrokerResource>(
    instance: &Instance,
    objects: &[Arc<K>],
) -> Vec<ObjectRef<K>> {
    if !instance_ready(instance) {
        return Vec::new();
    }
    let (namespace, name) = (instance.namespace(), instance.name_any());
    objects
        .iter()
        .filter(|o| o.namespace() == namespace && o.object().instance() == name)
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// What the watch of Instances triggers: the reconcile of every object of an Instance that is
/// (or has just become) ready, each with a fresh backoff. An object made before its Instance
/// may have backed off for minutes; the Instance turning ready is the change it waited for.
pub fn on_instance_change<K: BrokerResource>(
    ctx: &Context,
    instance: &Instance,
    objects: &[Arc<K>],
) -> Vec<ObjectRef<K>> {
    let refs = objects_of_instance(instance, objects);
    ctx.fresh_start(&refs);
    refs
}

/// Reconciles one resource: adds the finalizer first, then declares the object and writes
/// `Ready`; when the resource is being deleted, honours its deletion policy, then lets it go.
pub async fn reconcile<K: BrokerResource>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = obj.namespace().unwrap_or_else(|| "default".into());
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Event::Apply(o) => apply(&api, o.as_ref(), &namespace, &ctx).await,
            Event::Cleanup(o) => cleanup(o.as_ref(), &namespace, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

async fn apply<K: BrokerResource>(
    api: &Api<K>,
    obj: &K,
    namespace: &str,
    ctx: &Context,
) -> Result<Action, Error> {
    let broker = ctx.broker_api(namespace, obj.object().instance()).await?;
    let key = key_of(obj);
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let generation = obj.meta().generation;
    let outcome = reconcile_object(
        obj.object(),
        broker.as_ref(),
        generation,
        ctx.attempt(&key),
        &now,
    )
    .await;
    ctx.record(&key, outcome.retry_after.is_some());
    if outcome.ready.status != "True" {
        ctx.metrics.not_ready(&K::kind(&()), &outcome.ready.reason);
    }
    let mut conditions = obj
        .object_status()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    conditions::set(&mut conditions, outcome.ready);
    let status = ObjectStatus {
        conditions,
        observed_generation: generation,
    };
    api.patch_status(
        &obj.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await?;
    Ok(Action::requeue(outcome.retry_after.unwrap_or(RESYNC)))
}

async fn cleanup<K: BrokerResource>(
    obj: &K,
    namespace: &str,
    ctx: &Context,
) -> Result<Action, Error> {
    let broker = match obj.object().deletion_policy() {
        crate::crd::common::DeletionPolicy::Retain => None,
        crate::crd::common::DeletionPolicy::Delete => {
            ctx.broker_api(namespace, obj.object().instance()).await?
        }
    };
    finalize(obj.object(), broker.as_ref())
        .await
        .map_err(Error::Broker)?;
    ctx.record(&key_of(obj), false);
    Ok(Action::await_change())
}

/// After an error the controller looks again in 30 s (a failed deletion keeps its finalizer
/// until then).
pub fn error_policy<K: BrokerResource>(obj: Arc<K>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(
        kind = %K::kind(&()),
        name = %obj.name_any(),
        error = %err,
        error_kind = err.kind(),
        "reconcile failed"
    );
    Action::requeue(Duration::from_secs(30))
}
