//! A virtual host: its exchanges, queues and bindings, the rules for changing them (with
//! RabbitMQ's reply codes and texts), and routing across exchange-to-exchange bindings and
//! alternate exchanges.

use super::dead_letter::{self, DeathReason};
use super::delayed::{self, DelayedOwner, Delayer, delay_of};
use super::exchange::{Binding, Destination, Exchange, ExchangeKind, ExchangeSpec};
use super::expiry::Expirer;
use super::fast_map::FastMap;
use super::headers::{type_name, value_text, values_equal};
use super::message::{Message, now_ms};
use super::policy::{self, Policy, PolicyKind, QueueKind};
use super::queue::{DeleteRefused, Enqueued, Links, Queue, QueueOwner, QueueSpec, top_level};
use super::queue_ref::QueueRef;
use super::ready::{LazyStore, QueuedMessage, Window};
use super::remote::{Forwarder, RemoteQueue};
use super::stats::{Churn, MessageStats};
use super::throttle::{TOO_MANY_REQUESTS, Throttle};
use crate::amqp::codec;
use crate::error::{
    AmqpError, AmqpResult, access_refused, not_found, precondition_failed, resource_locked,
};
use crate::store::definitions::VhostDefinitions;
use crate::store::delayed::{Due, Scheduled};
use crate::store::durability::Ticket;
use crate::store::{Command, DefinitionStore};
use crate::store::{Recovered, Storage};
use amq_protocol::types::{AMQPValue, FieldTable};
use parking_lot::{Mutex, RwLock};
use std::borrow::Cow;
use std::sync::{Arc, Weak};

/// Queue arguments whose values must match when a queue is declared again (RabbitMQ's
/// `declare_args`); other arguments are kept but not compared.
const EQUIVALENT_QUEUE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-version",
    "x-single-active-consumer",
    "x-queue-type",
    "x-quorum-initial-group-size",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-initial-cluster-size",
    "x-queue-leader-locator",
];

/// The vhost limits: RabbitMQ's two, and Warren's throttles (operations per second).
pub const VHOST_LIMITS: &[&str] = &[
    "max-connections",
    "max-queues",
    "max-publish-rate",
    "max-declare-rate",
];

/// The channel close of a throttled operation: 530, the connection stays open.
pub fn too_many_requests() -> AmqpError {
    let mut e = AmqpError::new(crate::error::NOT_ALLOWED, TOO_MANY_REQUESTS);
    e.scope = crate::error::Scope::Channel;
    e
}

/// The exchanges every vhost starts with.
const SYSTEM_EXCHANGES: &[(&str, ExchangeKind, bool)] = &[
    ("", ExchangeKind::Direct, false),
    ("amq.direct", ExchangeKind::Direct, false),
    ("amq.fanout", ExchangeKind::Fanout, false),
    ("amq.topic", ExchangeKind::Topic, false),
    ("amq.headers", ExchangeKind::Headers, false),
    ("amq.match", ExchangeKind::Headers, false),
    ("amq.rabbitmq.trace", ExchangeKind::Topic, true),
];

/// Where a message handed to [`Vhost::publish`] comes from: what routing does differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A publisher (AMQP, the management API, the aliveness check): a message with a
    /// positive `x-delay` stops at the delayed exchanges it reaches, to be scheduled.
    Publisher,
    /// Dead-lettered for `reason`: as a publisher's, except that, unless it was rejected,
    /// queues it has already died in are left out (a cycle).
    DeadLetter(DeathReason),
    /// A delayed message now due: it passes through delayed exchanges.
    Due,
}

/// What became of a published message.
#[derive(Debug, Clone, Default)]
pub struct PublishOutcome {
    /// Queues it was routed to.
    pub queues: usize,
    /// Delayed exchanges that hold it until it is due.
    pub delayed: usize,
    /// Queues that took it, and delayed exchanges that scheduled it.
    pub taken: usize,
    /// A full queue with `x-overflow: reject-publish` refused it (the publisher is nacked).
    pub rejected: bool,
    /// A delayed exchange could not store it: a failure of the broker's disk rather than a
    /// limit (the publisher is nacked; the management API answers 500).
    pub unstored: bool,
    /// Done once every copy is safe.
    pub ticket: Ticket,
    /// Queues that took it with their backlog on disk and consumers taking from them: the
    /// publisher may be made to wait (flow control).
    pub backlogged: Vec<QueueRef>,
}

impl PublishOutcome {
    /// Whether it found a queue or a delayed exchange (else it is unroutable: returned to a
    /// mandatory publisher, dropped otherwise). Scheduled counts as routed: whether a queue
    /// takes it is known only when it is due (RabbitMQ's plugin returns every mandatory
    /// delayed message instead).
    pub fn routed(&self) -> bool {
        self.queues > 0 || self.delayed > 0
    }

    /// Whether the publisher is nacked.
    pub fn nacked(&self) -> bool {
        self.rejected || self.unstored
    }
}

/// Buffers routing reuses from one publish to the next: once they have grown to what a
/// topology needs, a publish allocates nothing for routing. A caller that publishes often (a
/// channel) keeps one; between publishes they are empty.
#[derive(Debug, Default)]
pub struct RouteScratch {
    /// The queues a message goes to.
    queues: Vec<QueueRef>,
    /// The bindings of one exchange that match.
    dests: Vec<Destination>,
    /// Exchanges still to route through (exchange-to-exchange bindings, alternate exchanges).
    work: Vec<Arc<Exchange>>,
    /// Exchanges routed through already: a cycle of bindings ends there.
    seen: Vec<Arc<Exchange>>,
}

/// The pseudo-queue of direct reply-to.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A binding's destination, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationKind {
    Queue,
    Exchange,
}

/// A queue a declaration made, or the one it found.
enum Prepared {
    Existing(QueueRef),
    /// Not reachable yet; `command` records it in the definitions, to be committed first.
    Made {
        queue: QueueRef,
        command: Option<Command>,
    },
}

pub struct Vhost {
    pub name: Arc<str>,
    exchanges: RwLock<FastMap<String, Arc<Exchange>>>,
    queues: RwLock<FastMap<String, QueueRef>>,
    /// Direct reply-to: the hidden queue behind each `amq.rabbitmq.reply-to.<key>` name.
    reply_queues: RwLock<FastMap<String, QueueRef>>,
    /// Serialises changes to the topology so that checks and changes are atomic.
    topology: Mutex<()>,
    store: Arc<DefinitionStore>,
    storage: Arc<Storage>,
    window: Window,
    meta: RwLock<VhostMeta>,
    churn: Arc<Churn>,
    /// This vhost, for the queues it links (dead letters, queue expiry).
    me: Weak<Vhost>,
    /// The timers of its queues (message TTLs, `x-expires`).
    expirer: Arc<Expirer<Queue>>,
    /// `max-publish-rate` and `max-declare-rate`.
    pub throttle: Throttle,
    /// Policies, by name.
    policies: RwLock<Vec<Arc<Policy>>>,
    operator_policies: RwLock<Vec<Arc<Policy>>>,
    /// The messages of its delayed exchanges, until they are due.
    delayer: Delayer,
    /// Reaches the queues whose home is another node (none: a broker with no cluster).
    forwarder: Option<Arc<Forwarder>>,
}

/// What a vhost is besides its topology: description, tags, limits and default queue type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VhostMeta {
    pub description: String,
    pub tags: Vec<String>,
    /// `max-connections`, `max-queues`: a negative value means no limit, as in RabbitMQ.
    pub limits: std::collections::BTreeMap<String, i64>,
    /// The type a queue declared without `x-queue-type` gets, where that type can have the
    /// queue's properties (none: classic, RabbitMQ's "undefined").
    pub default_queue_type: Option<String>,
}

impl VhostMeta {
    pub fn limit(&self, name: &str) -> Option<u64> {
        self.limits.get(name).and_then(|v| u64::try_from(*v).ok())
    }
}

impl std::fmt::Debug for Vhost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhost").field("name", &self.name).finish()
    }
}

/// `queue 'q' in vhost '/'`: how RabbitMQ names a resource in its texts.
pub fn describe(kind: &str, name: &str, vhost: &str) -> String {
    format!("{kind} '{name}' in vhost '{vhost}'")
}

fn bool_text(b: bool) -> &'static str {
    if b { "true" } else { "false" }
}

fn inequivalent(what: &str, key: &str, received: &str, current: &str) -> AmqpError {
    precondition_failed(format!(
        "inequivalent arg '{key}' for {what}: received {received} but current is {current}"
    ))
}

/// RabbitMQ's `assert_args_equivalence` for the listed keys.
fn check_args_equivalent(
    what: &str,
    current: &FieldTable,
    requested: &FieldTable,
    keys: &[&str],
) -> AmqpResult<()> {
    let classic = AMQPValue::LongString("classic".into());
    for key in keys {
        let mut have = current.inner().get(*key);
        let mut want = requested.inner().get(*key);
        if *key == "x-queue-type" {
            // An absent queue type means classic.
            if have.is_none() && want.is_some_and(|w| values_equal(w, &classic)) {
                have = want;
            }
            if want.is_none() && have.is_some_and(|h| values_equal(h, &classic)) {
                want = have;
            }
        }
        match (have, want) {
            (None, None) => {}
            (Some(h), Some(w)) if type_name(h) == type_name(w) && values_equal(h, w) => {}
            (Some(h), Some(w)) if values_equal(h, w) && is_same_class(h, w) => {}
            (Some(h), Some(w)) => {
                return Err(inequivalent(
                    what,
                    key,
                    &format!("'{}'", value_text(w)),
                    &format!("'{}'", value_text(h)),
                ));
            }
            (h, w) => {
                let show = |v: Option<&AMQPValue>| match v {
                    None => "none".to_owned(),
                    Some(v) => format!("the value '{}' of type '{}'", value_text(v), type_name(v)),
                };
                return Err(inequivalent(what, key, &show(w), &show(h)));
            }
        }
    }
    Ok(())
}

fn is_same_class(a: &AMQPValue, b: &AMQPValue) -> bool {
    let class = |v: &AMQPValue| match v {
        AMQPValue::ShortShortInt(_)
        | AMQPValue::ShortShortUInt(_)
        | AMQPValue::ShortInt(_)
        | AMQPValue::ShortUInt(_)
        | AMQPValue::LongInt(_)
        | AMQPValue::LongUInt(_)
        | AMQPValue::LongLongInt(_) => "int",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "float",
        other => type_name(other),
    };
    class(a) == class(b)
}

impl Vhost {
    pub fn new(
        name: &str,
        store: Arc<DefinitionStore>,
        storage: Arc<Storage>,
        window: Window,
        churn: Arc<Churn>,
        forwarder: Option<Arc<Forwarder>>,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| {
            Self::build(name, store, storage, window, churn, forwarder, me.clone())
        })
    }

    fn build(
        name: &str,
        store: Arc<DefinitionStore>,
        storage: Arc<Storage>,
        window: Window,
        churn: Arc<Churn>,
        forwarder: Option<Arc<Forwarder>>,
        me: Weak<Vhost>,
    ) -> Self {
        let vhost = Self {
            me,
            expirer: Arc::new(Expirer::default()),
            throttle: Throttle::default(),
            churn,
            name: name.into(),
            exchanges: RwLock::new(FastMap::default()),
            queues: RwLock::new(FastMap::default()),
            reply_queues: RwLock::new(FastMap::default()),
            topology: Mutex::new(()),
            store,
            storage,
            window,
            meta: RwLock::new(VhostMeta::default()),
            policies: RwLock::new(Vec::new()),
            operator_policies: RwLock::new(Vec::new()),
            delayer: Delayer::default(),
            forwarder,
        };
        {
            let mut exchanges = vhost.exchanges.write();
            for (name, kind, internal) in SYSTEM_EXCHANGES {
                exchanges.insert(
                    (*name).to_owned(),
                    Exchange::new(ExchangeSpec {
                        name: (*name).to_owned(),
                        kind: *kind,
                        durable: true,
                        auto_delete: false,
                        internal: *internal,
                        arguments: FieldTable::default(),
                    }),
                );
            }
        }
        vhost
    }

    /// Connects a new queue to this vhost's dead-letter routing and timers.
    fn link(&self, q: &QueueRef) {
        q.link(Links {
            vhost: self.me.clone(),
            expirer: self.expirer.clone(),
        });
    }

    pub fn meta(&self) -> VhostMeta {
        self.meta.read().clone()
    }

    /// Changes description, tags or limits, in memory and in the definitions.
    pub fn set_meta(&self, meta: VhostMeta) -> AmqpResult<()> {
        let _t = self.topology.lock();
        let vhost = self.name.to_string();
        let mut commands = vec![Command::PutVhost {
            name: vhost.clone(),
            description: meta.description.clone(),
            tags: meta.tags.clone(),
            default_queue_type: meta.default_queue_type.clone(),
        }];
        let before = self.meta.read().limits.clone();
        for (name, value) in &meta.limits {
            if before.get(name) != Some(value) {
                commands.push(Command::SetVhostLimit {
                    vhost: vhost.clone(),
                    name: name.clone(),
                    value: *value,
                });
            }
        }
        for name in before.keys().filter(|k| !meta.limits.contains_key(*k)) {
            commands.push(Command::ClearVhostLimit {
                vhost: vhost.clone(),
                name: name.clone(),
            });
        }
        // One change: committed whole or not at all.
        let what = format!("change vhost '{vhost}'");
        self.store
            .commit_all(commands)
            .map_err(|e| definitions_error(&what, e))?;
        self.apply_throttles(&meta);
        *self.meta.write() = meta;
        Ok(())
    }

    fn apply_throttles(&self, meta: &VhostMeta) {
        self.throttle
            .publish
            .set_rate(meta.limits.get("max-publish-rate").copied());
        self.throttle
            .declare
            .set_rate(meta.limits.get("max-declare-rate").copied());
    }

    /// A declare or delete, counted against `max-declare-rate`.
    pub fn throttle_declare(&self) -> AmqpResult<()> {
        if self.throttle.declare.allow() {
            Ok(())
        } else {
            Err(too_many_requests())
        }
    }

    /// Recreates durable exchanges, queues and bindings from stored definitions.
    pub fn restore(&self, defs: &VhostDefinitions) {
        let meta = VhostMeta {
            description: defs.description.clone(),
            tags: defs.tags.clone(),
            limits: defs.limits.clone(),
            default_queue_type: defs.default_queue_type.clone(),
        };
        self.apply_throttles(&meta);
        *self.meta.write() = meta;
        let _t = self.topology.lock();
        for (kind, stored) in [
            (PolicyKind::Policy, &defs.policies),
            (PolicyKind::Operator, &defs.operator_policies),
        ] {
            let mut policies = self.policy_list(kind).write();
            for (name, p) in stored {
                let (pattern, def) = (&p.pattern, p.definition.clone());
                match Policy::of_kind(kind, name, pattern, &p.apply_to, p.priority, def) {
                    Ok(policy) => policies.push(Arc::new(policy)),
                    Err(reason) => {
                        tracing::warn!(vhost = %self.name, policy = %name, %reason, "skipping stored policy");
                    }
                }
            }
        }
        for (name, x) in &defs.exchanges {
            let Some(kind) = ExchangeKind::parse(&x.kind) else {
                tracing::warn!(vhost = %self.name, exchange = %name, kind = %x.kind, "skipping stored exchange of unknown type");
                continue;
            };
            self.exchanges
                .write()
                .entry(name.clone())
                .or_insert_with(|| {
                    Exchange::new(ExchangeSpec {
                        name: name.clone(),
                        kind,
                        durable: true,
                        auto_delete: x.auto_delete,
                        internal: x.internal,
                        arguments: x.arguments.clone(),
                    })
                });
        }
        let mut restored = Vec::new();
        for (name, q) in &defs.queues {
            if self.queues.read().contains_key(name) {
                continue;
            }
            let spec = QueueSpec {
                name: name.clone(),
                durable: true,
                exclusive: false,
                auto_delete: q.auto_delete,
                arguments: q.arguments.clone(),
            };
            if let Some(forwarder) = self.elsewhere(q.node.as_deref()) {
                let remote = QueueRef::Remote(RemoteQueue::new(
                    spec,
                    self.name.clone(),
                    q.node.clone().unwrap_or_default(),
                    forwarder.clone(),
                ));
                self.queues.write().insert(name.clone(), remote);
                continue;
            }
            let (store, recovered) = match self.storage.open_durable(&self.name, name, false) {
                Ok(opened) => opened,
                Err(e) => {
                    tracing::error!(vhost = %self.name, queue = %name, error = %e, "cannot open the queue's store; its messages are not recovered");
                    continue;
                }
            };
            if recovered.count > 0 {
                tracing::info!(vhost = %self.name, queue = %name, messages = recovered.count, "recovered messages");
            }
            // A priority queue keeps each level in a store of its own.
            let mut levels = vec![(LazyStore::opened(self.storage.clone(), store), recovered)];
            for l in 1..=top_level(&q.arguments) {
                // Opened (created if missing) now, as at declaration.
                let level = match self.storage.open_durable_level(&self.name, name, l, false) {
                    Ok((s, r)) => {
                        if r.count > 0 {
                            tracing::info!(vhost = %self.name, queue = %name, level = l, messages = r.count, "recovered messages");
                        }
                        (LazyStore::opened(self.storage.clone(), s), r)
                    }
                    Err(e) => {
                        // The store is left on disk as it is; the level pages to memory
                        // until the next start.
                        tracing::error!(vhost = %self.name, queue = %name, level = l, error = %e, "cannot open a priority level's store; its messages are not recovered");
                        (
                            LazyStore::deferred(self.storage.clone()),
                            Recovered::default(),
                        )
                    }
                };
                levels.push(level);
            }
            let queue = QueueRef::from(Queue::recovered_levels(
                spec,
                self.name.clone(),
                None,
                levels,
                self.window,
            ));
            self.queues.write().insert(name.clone(), queue.clone());
            restored.push(queue);
        }
        for b in &defs.bindings {
            let Some(source) = self.exchange(&b.source) else {
                continue;
            };
            let destination = if b.destination_type == "exchange" {
                self.exchange(&b.destination).map(Destination::Exchange)
            } else {
                self.queue(&b.destination).map(Destination::Queue)
            };
            if let Some(destination) = destination {
                source.bind(Binding {
                    destination,
                    routing_key: b.routing_key.clone(),
                    arguments: b.arguments.clone(),
                });
            }
        }
        // Linked once their dead letters have exchanges and bindings to go to.
        for q in &restored {
            self.link(q);
        }
        self.reapply_policies();
        for q in &restored {
            q.expire_recovered();
        }
        if let Some(me) = self.me.upgrade() {
            self.delayer.recover(&self.storage, &me);
        }
    }

    fn policy_list(&self, kind: PolicyKind) -> &RwLock<Vec<Arc<Policy>>> {
        match kind {
            PolicyKind::Policy => &self.policies,
            PolicyKind::Operator => &self.operator_policies,
        }
    }

    /// The policies (or operator policies), sorted by name.
    pub fn policies_of(&self, kind: PolicyKind) -> Vec<Arc<Policy>> {
        let mut all = self.policy_list(kind).read().clone();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The policies, sorted by name.
    pub fn policies(&self) -> Vec<Arc<Policy>> {
        self.policies_of(PolicyKind::Policy)
    }

    pub fn policy_of(&self, kind: PolicyKind, name: &str) -> Option<Arc<Policy>> {
        self.policy_list(kind)
            .read()
            .iter()
            .find(|p| p.name == name)
            .cloned()
    }

    pub fn policy(&self, name: &str) -> Option<Arc<Policy>> {
        self.policy_of(PolicyKind::Policy, name)
    }

    /// Adds or replaces a policy, in the definitions too, and applies the policies again to
    /// every queue and exchange. Returns whether it is new.
    pub fn set_policy(&self, policy: Policy) -> AmqpResult<bool> {
        self.set_policy_of(PolicyKind::Policy, policy)
    }

    /// Adds or replaces a policy or an operator policy; see [`Vhost::set_policy`].
    pub fn set_policy_of(&self, kind: PolicyKind, policy: Policy) -> AmqpResult<bool> {
        let _t = self.topology.lock();
        let (vhost, name) = (self.name.to_string(), policy.name.clone());
        let (pattern, priority) = (policy.pattern.clone(), policy.priority);
        let (apply_to, definition) = (policy.apply_to.name().to_owned(), policy.definition.clone());
        self.persist(match kind {
            PolicyKind::Policy => Command::PutPolicy {
                vhost,
                name,
                pattern,
                apply_to,
                priority,
                definition,
            },
            PolicyKind::Operator => Command::PutOperatorPolicy {
                vhost,
                name,
                pattern,
                apply_to,
                priority,
                definition,
            },
        })?;
        let created = {
            let mut policies = self.policy_list(kind).write();
            let before = policies.len();
            policies.retain(|p| p.name != policy.name);
            let created = policies.len() == before;
            policies.push(Arc::new(policy));
            created
        };
        self.reapply_policies();
        Ok(created)
    }

    /// Removes a policy and applies the rest again. Returns whether it existed.
    pub fn delete_policy(&self, name: &str) -> AmqpResult<bool> {
        self.delete_policy_of(PolicyKind::Policy, name)
    }

    /// Removes a policy or an operator policy; see [`Vhost::delete_policy`].
    pub fn delete_policy_of(&self, kind: PolicyKind, name: &str) -> AmqpResult<bool> {
        let _t = self.topology.lock();
        if self.policy_of(kind, name).is_none() {
            return Ok(false);
        }
        let (vhost, name_owned) = (self.name.to_string(), name.to_owned());
        self.persist(match kind {
            PolicyKind::Policy => Command::DeletePolicy {
                vhost,
                name: name_owned,
            },
            PolicyKind::Operator => Command::DeleteOperatorPolicy {
                vhost,
                name: name_owned,
            },
        })?;
        self.policy_list(kind).write().retain(|p| p.name != name);
        self.reapply_policies();
        Ok(true)
    }

    /// The policy of `kind` a queue of this name and these arguments gets.
    fn policy_for_queue(
        &self,
        kind: PolicyKind,
        name: &str,
        arguments: &FieldTable,
    ) -> Option<Arc<Policy>> {
        let policies = self.policy_list(kind).read();
        if policies.is_empty() {
            return None;
        }
        let queue_kind = QueueKind::of(arguments);
        policy::choose(&policies, |p| p.applies_to_queue(name, queue_kind)).cloned()
    }

    /// The policy and operator policy a queue gets.
    fn policies_for_queue(
        &self,
        name: &str,
        arguments: &FieldTable,
    ) -> (Option<Arc<Policy>>, Option<Arc<Policy>>) {
        (
            self.policy_for_queue(PolicyKind::Policy, name, arguments),
            self.policy_for_queue(PolicyKind::Operator, name, arguments),
        )
    }

    /// Gives every queue and exchange the policies that now apply to it (callers hold the
    /// topology lock). Objects whose policies did not change are left alone.
    fn reapply_policies(&self) {
        let queues: Vec<QueueRef> = self.queues.read().values().cloned().collect();
        for q in queues {
            let (policy, operator) = self.policies_for_queue(q.name(), q.arguments());
            let now = q.settings();
            if !same_policy(now.policy.as_ref(), policy.as_ref())
                || !same_policy(now.operator.as_ref(), operator.as_ref())
            {
                q.set_policies(policy, operator);
            }
        }
        let exchanges: Vec<Arc<Exchange>> = self.exchanges.read().values().cloned().collect();
        let policies = self.policies.read().clone();
        for x in exchanges {
            if x.name().is_empty() || x.name().starts_with("amq.") {
                continue;
            }
            let wanted = policy::choose(&policies, |p| p.applies_to_exchange(x.name())).cloned();
            if !same_policy(x.policy().as_ref(), wanted.as_ref()) {
                x.set_policy(wanted);
            }
        }
    }

    fn describe(&self, kind: &str, name: &str) -> String {
        describe(kind, name, &self.name)
    }

    fn persist(&self, command: Command) -> AmqpResult<()> {
        // A durable queue is on disk before anyone can use it, even in a definitions import:
        // a message confirmed on it must not meet a restart that takes its store for a
        // deleted queue's. What an import defers (exchanges, bindings, users, policies) loses
        // no message if a crash takes it.
        let what = command.what();
        let committed = if matches!(command, Command::DeclareQueue { .. }) {
            self.store.commit_now(command)
        } else {
            self.store.commit(command)
        };
        committed.map_err(|e| definitions_error(&what, e))
    }

    pub fn exchange(&self, name: &str) -> Option<Arc<Exchange>> {
        self.exchanges.read().get(name).cloned()
    }

    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        self.exchanges.read().values().cloned().collect()
    }

    pub fn queue(&self, name: &str) -> Option<QueueRef> {
        self.queues.read().get(name).cloned()
    }

    pub fn queues(&self) -> Vec<QueueRef> {
        self.queues.read().values().cloned().collect()
    }

    /// An exchange that must exist: 404 otherwise.
    pub fn existing_exchange(&self, name: &str) -> AmqpResult<Arc<Exchange>> {
        self.exchange(name)
            .ok_or_else(|| not_found(format!("no {}", self.describe("exchange", name))))
    }

    /// A queue that must exist and that `connection` may use (an exclusive queue belongs to
    /// the connection that declared it): 404 or 405 otherwise.
    pub fn existing_queue(&self, name: &str, connection: u64) -> AmqpResult<QueueRef> {
        let q = self
            .queue(name)
            .ok_or_else(|| not_found(format!("no {}", self.describe("queue", name))))?;
        self.check_exclusive_access(&q, connection)?;
        if q.unreachable_home().is_some() {
            return Err(home_down(&q));
        }
        Ok(q)
    }

    /// The forwarder for a queue whose home is `node`, when that is another node.
    fn elsewhere(&self, node: Option<&str>) -> Option<&Arc<Forwarder>> {
        let f = self.forwarder.as_ref()?;
        (node.is_some_and(|n| !n.is_empty() && n != f.node())).then_some(f)
    }

    fn check_exclusive_access(&self, q: &QueueRef, connection: u64) -> AmqpResult<()> {
        match q.owner() {
            Some(owner) if owner != connection => Err(self.locked(q.name())),
            _ => Ok(()),
        }
    }

    fn locked(&self, name: &str) -> AmqpError {
        resource_locked(format!(
            "cannot obtain exclusive access to locked {}. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
            self.describe("queue", name)
        ))
    }

    pub fn declare_exchange(&self, spec: ExchangeSpec) -> AmqpResult<Arc<Exchange>> {
        let _t = self.topology.lock();
        if let Some(x) = self.exchange(&spec.name) {
            let what = self.describe("exchange", &spec.name);
            let cur = &x.spec;
            if cur.kind != spec.kind {
                return Err(inequivalent(
                    &what,
                    "type",
                    &format!("'{}'", spec.kind.as_str()),
                    &format!("'{}'", cur.kind.as_str()),
                ));
            }
            for (key, have, want) in [
                ("durable", cur.durable, spec.durable),
                ("auto_delete", cur.auto_delete, spec.auto_delete),
                ("internal", cur.internal, spec.internal),
            ] {
                if have != want {
                    return Err(inequivalent(
                        &what,
                        key,
                        &format!("'{}'", bool_text(want)),
                        &format!("'{}'", bool_text(have)),
                    ));
                }
            }
            // As in RabbitMQ, also for a delayed exchange: its `x-delayed-type` is not
            // compared.
            check_args_equivalent(
                &what,
                &cur.arguments,
                &spec.arguments,
                &["alternate-exchange"],
            )?;
            return Ok(x);
        }
        if spec.name.starts_with("amq.") {
            return Err(access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                spec.name
            )));
        }
        spec.kind.routing(&spec.arguments)?;
        if spec.durable {
            self.persist(Command::DeclareExchange {
                vhost: self.name.to_string(),
                name: spec.name.clone(),
                kind: spec.kind.as_str().to_owned(),
                auto_delete: spec.auto_delete,
                internal: spec.internal,
                arguments: spec.arguments.clone(),
            })?;
        }
        let x = Exchange::new(spec);
        {
            let policies = self.policies.read();
            if let Some(p) = policy::choose(&policies, |p| p.applies_to_exchange(x.name())) {
                x.set_policy(Some(p.clone()));
            }
        }
        self.exchanges
            .write()
            .insert(x.spec.name.clone(), x.clone());
        Ok(x)
    }

    /// `exchange.delete`. A missing exchange is not an error (as in RabbitMQ).
    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> AmqpResult<()> {
        if name.is_empty() {
            return Err(access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if name.starts_with("amq.") {
            return Err(access_refused(format!(
                "deletion of system {} not allowed",
                self.describe("exchange", name)
            )));
        }
        let _t = self.topology.lock();
        let Some(x) = self.exchange(name) else {
            return Ok(());
        };
        if if_unused && x.has_bindings() {
            return Err(precondition_failed(format!(
                "{} in use",
                self.describe("exchange", name)
            )));
        }
        self.remove_exchange_locked(&x)
    }

    fn remove_exchange_locked(&self, x: &Arc<Exchange>) -> AmqpResult<()> {
        x.mark_deleted();
        self.exchanges.write().remove(x.name());
        let dest = Destination::Exchange(x.clone());
        let mut emptied = Vec::new();
        for other in self.exchanges() {
            if other.unbind_destination(&dest) > 0
                && other.spec.auto_delete
                && !other.has_bindings()
            {
                emptied.push(other);
            }
        }
        for b in x.bindings() {
            x.unbind(&b);
        }
        self.persist(Command::DeleteExchange {
            vhost: self.name.to_string(),
            name: x.name().to_owned(),
        })?;
        for e in emptied {
            self.remove_exchange_locked(&e)?;
        }
        Ok(())
    }

    /// The vhost's default queue type, if it has one that can have the queue's properties (a
    /// quorum queue is durable, neither exclusive nor auto-delete).
    fn default_type_for(&self, spec: &QueueSpec) -> Option<String> {
        let t = self.meta.read().default_queue_type.clone()?;
        if t == "quorum" && quorum_refuses(spec).is_some() {
            return None;
        }
        Some(t)
    }

    /// The spec with the vhost's default queue type as its `x-queue-type` when it names none,
    /// as RabbitMQ 3.10 declares it.
    fn with_default_type(&self, mut spec: QueueSpec) -> QueueSpec {
        if spec.arguments.inner().contains_key("x-queue-type") {
            return spec;
        }
        if let Some(t) = self.default_type_for(&spec) {
            spec.arguments
                .insert("x-queue-type".into(), AMQPValue::LongString(t.into()));
        }
        spec
    }

    /// `queue.declare` (not passive). Returns the queue and whether it was created.
    pub fn declare_queue(&self, spec: QueueSpec, connection: u64) -> AmqpResult<(QueueRef, bool)> {
        self.declare_queue_with(spec, connection, true, None)
    }

    /// A queue of imported definitions, declared as `declare_queue` does but without the
    /// vhost's default queue type: RabbitMQ 3.10 imports a queue without `x-queue-type` as a
    /// classic one, whatever its vhost's default. `home`: the node whose disk holds its
    /// messages (none: this one).
    pub fn import_queue(
        &self,
        spec: QueueSpec,
        home: Option<&str>,
    ) -> AmqpResult<(QueueRef, bool)> {
        self.declare_queue_with(spec, 0, false, home)
    }

    /// A definitions import's queues, declared as [`Vhost::import_queue`] does but many at a
    /// time: the durable ones of each group are committed to the definitions together (one
    /// entry of the cluster's log, one sync) before any of them can be used. Returns each
    /// queue's name with what declaring it gave.
    pub fn import_queues(&self, specs: Vec<QueueSpec>) -> Vec<(String, AmqpResult<()>)> {
        /// Queues made under one hold of the topology lock and committed together (in one
        /// entry of the cluster's log).
        const GROUP: usize = 500;
        const _: () = assert!(GROUP <= crate::store::definitions::BATCH_ENTRY);
        let mut out = Vec::with_capacity(specs.len());
        let mut specs = specs.into_iter().peekable();
        while specs.peek().is_some() {
            let _t = self.topology.lock();
            let mut made: Vec<(String, QueueRef)> = Vec::new();
            let mut commands = Vec::new();
            let mut names = std::collections::HashSet::new();
            while made.len() < GROUP {
                // A name seen twice in one group waits for the next, which sees the first.
                let Some(spec) = specs.next_if(|s| !names.contains(&s.name)) else {
                    break;
                };
                let name = spec.name.clone();
                match self.prepare_queue(spec, 0, false, None, made.len()) {
                    Ok(Prepared::Made { queue, command }) => {
                        names.insert(name.clone());
                        commands.extend(command);
                        made.push((name, queue));
                    }
                    Ok(Prepared::Existing(_)) => out.push((name, Ok(()))),
                    Err(e) => out.push((name, Err(e))),
                }
            }
            let what = format!("{} queues in vhost '{}'", commands.len(), self.name);
            match self.store.commit_all_now(commands) {
                Ok(()) => {
                    for (name, queue) in made {
                        self.install_queue(queue);
                        out.push((name, Ok(())));
                    }
                }
                Err(e) => {
                    let e = definitions_error(&what, e);
                    out.extend(made.into_iter().map(|(name, _)| (name, Err(e.clone()))));
                }
            }
        }
        out
    }

    fn declare_queue_with(
        &self,
        spec: QueueSpec,
        connection: u64,
        default_type: bool,
        home: Option<&str>,
    ) -> AmqpResult<(QueueRef, bool)> {
        let _t = self.topology.lock();
        match self.prepare_queue(spec, connection, default_type, home, 0)? {
            Prepared::Existing(q) => Ok((q, false)),
            Prepared::Made { queue, command } => {
                if let Some(command) = command {
                    self.persist(command)?;
                }
                self.install_queue(queue.clone());
                Ok((queue, true))
            }
        }
    }

    /// Checks a declaration against the queue of that name, if any, and otherwise makes the
    /// queue (its stores open when it is durable), not yet reachable: with the command that
    /// records it when it must be committed before it is. `pending`: queues made and not yet
    /// installed, counted against the vhost's limit. The caller holds the topology lock.
    fn prepare_queue(
        &self,
        spec: QueueSpec,
        connection: u64,
        default_type: bool,
        home: Option<&str>,
        pending: usize,
    ) -> AmqpResult<Prepared> {
        // A declaration another node made, applied here from the cluster's log, is that
        // node's churn.
        if !DefinitionStore::applying_from_log() {
            MessageStats::bump(&self.churn.queue_declared);
        }
        let owner = spec.exclusive.then_some(connection);
        if let Some(q) = self.queue(&spec.name) {
            if q.owner() != owner {
                return Err(self.locked(&spec.name));
            }
            let what = self.describe("queue", &spec.name);
            for (key, have, want) in [
                ("durable", q.durable(), spec.durable),
                ("auto_delete", q.auto_delete(), spec.auto_delete),
            ] {
                if have != want {
                    return Err(inequivalent(
                        &what,
                        key,
                        &format!("'{}'", bool_text(want)),
                        &format!("'{}'", bool_text(have)),
                    ));
                }
            }
            // The queue is compared with what the client sent: in a vhost with a default
            // type, a declaration without one is of the queue's own type, whatever the
            // default was when the queue was made (or is now).
            let mut sent = Cow::Borrowed(&spec.arguments);
            if default_type
                && !spec.arguments.inner().contains_key("x-queue-type")
                && self.default_type_for(&spec).is_some()
                && let Some(t) = q.arguments().inner().get("x-queue-type")
            {
                sent.to_mut().insert("x-queue-type".into(), t.clone());
            }
            check_args_equivalent(&what, q.arguments(), &sent, EQUIVALENT_QUEUE_ARGS)?;
            if q.unreachable_home().is_some() {
                return Err(home_down(&q));
            }
            q.touch();
            return Ok(Prepared::Existing(q));
        }
        let spec = if default_type {
            self.with_default_type(spec)
        } else {
            spec
        };
        validate_queue_arguments(&spec, &self.name)?;
        if let Some(max) = self.meta.read().limit("max-queues")
            && (self.queues.read().len() + pending) as u64 >= max
        {
            return Err(precondition_failed(format!(
                "cannot declare queue '{}': queue limit in vhost '{}' ({max}) is reached",
                spec.name, self.name
            )));
        }
        if spec.durable
            && owner.is_none()
            && let Some(forwarder) = self.elsewhere(home)
        {
            // Another node's queue, known here through the cluster's log: its messages stay
            // on its home node, which this node reaches over the cluster link.
            let home = home.unwrap_or_default().to_owned();
            let (policy, operator) = self.policies_for_queue(&spec.name, &spec.arguments);
            let q = QueueRef::Remote(RemoteQueue::new(
                spec,
                self.name.clone(),
                home,
                forwarder.clone(),
            ));
            if policy.is_some() || operator.is_some() {
                q.set_policies(policy, operator);
            }
            return Ok(Prepared::Made {
                queue: q,
                command: None,
            });
        }
        let mut command = None;
        let levels = if spec.durable && owner.is_none() {
            // Every priority level's store is created now, fresh (whatever a deleted queue of
            // the same name left is removed): a persistent message is never confirmed by a
            // level that could not get a store on disk. A declaration that comes through the
            // cluster's log may be one this node made before it restarted: its store is
            // recovered, not emptied.
            let fresh = !DefinitionStore::applying_from_log();
            let stores = (0..=top_level(&spec.arguments))
                .map(|l| {
                    self.storage
                        .open_durable_level(&self.name, &spec.name, l, fresh)
                        .map(|(s, r)| (LazyStore::opened(self.storage.clone(), s), r))
                })
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(|e| {
                    tracing::error!(vhost = %self.name, queue = %spec.name, error = %e, "cannot create the queue's store");
                    AmqpError::new(crate::error::INTERNAL_ERROR, "cannot create the queue's store")
                })?;
            command = Some(Command::DeclareQueue {
                vhost: self.name.to_string(),
                name: spec.name.clone(),
                auto_delete: spec.auto_delete,
                arguments: spec.arguments.clone(),
                node: self.store.node().map(str::to_owned),
            });
            stores
        } else {
            vec![(
                LazyStore::deferred(self.storage.clone()),
                Recovered::default(),
            )]
        };
        let (policy, operator) = self.policies_for_queue(&spec.name, &spec.arguments);
        let q = QueueRef::from(Queue::recovered_levels(
            spec,
            self.name.clone(),
            owner,
            levels,
            self.window,
        ));
        if policy.is_some() || operator.is_some() {
            q.set_policies(policy, operator);
        }
        Ok(Prepared::Made { queue: q, command })
    }

    /// Makes a prepared queue reachable: in the vhost's map, and linked to its timers and
    /// dead-letter routing when its messages are here.
    fn install_queue(&self, q: QueueRef) {
        self.link(&q);
        self.queues.write().insert(q.name().to_owned(), q.clone());
        if q.message_count() > 0 {
            // Recovered from its store (a declaration applied from the cluster's log).
            q.expire_recovered();
        }
        if !DefinitionStore::applying_from_log() {
            MessageStats::bump(&self.churn.queue_created);
        }
    }

    /// `queue.delete`: returns the number of ready messages deleted. A missing queue is not
    /// an error (RabbitMQ answers delete-ok with 0).
    pub fn delete_queue(
        &self,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        connection: u64,
    ) -> AmqpResult<u32> {
        let _t = self.topology.lock();
        let Some(q) = self.queue(name) else {
            return Ok(0);
        };
        self.check_exclusive_access(&q, connection)?;
        q.may_delete(if_unused, if_empty).map_err(|why| {
            let what = self.describe("queue", name);
            match why {
                DeleteRefused::InUse => precondition_failed(format!("{what} in use")),
                DeleteRefused::NotEmpty => precondition_failed(format!("{what} not empty")),
                DeleteRefused::HomeDown => home_down(&q),
            }
        })?;
        // Committed before anything goes: a delete the cluster refuses leaves the queue whole.
        self.persist_deleted(&q)?;
        let count = q.delete(false, false).unwrap_or(0);
        self.forget_queue_locked(&q)?;
        Ok(count)
    }

    /// Deletes a queue whatever its state: auto-delete after the last consumer, exclusive
    /// queues when their connection closes.
    pub fn remove_queue(&self, q: &QueueRef) {
        let _t = self.topology.lock();
        if let Err(e) = self.persist_deleted(q) {
            tracing::error!(queue = q.name(), error = %e, "cannot remove queue");
            return;
        }
        if q.delete(false, false).is_ok()
            && let Err(e) = self.forget_queue_locked(q)
        {
            tracing::error!(queue = q.name(), error = %e, "cannot remove queue");
        }
    }

    /// Commits the deletion of `q` when it is durable and still the queue of its name.
    fn persist_deleted(&self, q: &QueueRef) -> AmqpResult<()> {
        let current = self.queues.read().get(q.name()).is_some_and(|cur| cur == q);
        if current && q.durable() && q.owner().is_none() {
            self.persist(Command::DeleteQueue {
                vhost: self.name.to_string(),
                name: q.name().to_owned(),
            })?;
        }
        Ok(())
    }

    fn forget_queue_locked(&self, q: &QueueRef) -> AmqpResult<()> {
        {
            let _retiring = self.churn.retiring.write();
            let mut queues = self.queues.write();
            if queues.get(q.name()).is_some_and(|cur| cur == q) {
                queues.remove(q.name());
                if !DefinitionStore::applying_from_log() {
                    MessageStats::bump(&self.churn.queue_deleted);
                }
                self.churn.retired_queues.absorb(&q.message_counts());
            }
        }
        let dest = Destination::Queue(q.clone());
        let mut emptied = Vec::new();
        for x in self.exchanges() {
            if x.unbind_destination(&dest) > 0 && x.spec.auto_delete && !x.has_bindings() {
                emptied.push(x);
            }
        }
        for x in emptied {
            self.remove_exchange_locked(&x)?;
        }
        Ok(())
    }

    fn resolve_binding(
        &self,
        source: &str,
        destination: &str,
        kind: DestinationKind,
        connection: u64,
    ) -> AmqpResult<(Arc<Exchange>, Destination)> {
        if source.is_empty() || (kind == DestinationKind::Exchange && destination.is_empty()) {
            return Err(access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        let src = self.exchange(source);
        let dst = match kind {
            DestinationKind::Queue => self.queue(destination).map(Destination::Queue),
            DestinationKind::Exchange => self.exchange(destination).map(Destination::Exchange),
        };
        let (Some(src), Some(dst)) = (src, dst) else {
            return Err(match self.exchange(source) {
                None => not_found(format!("no {}", self.describe("exchange", source))),
                Some(_) => {
                    let k = match kind {
                        DestinationKind::Queue => "queue",
                        DestinationKind::Exchange => "exchange",
                    };
                    not_found(format!("no {}", self.describe(k, destination)))
                }
            });
        };
        if let Destination::Queue(q) = &dst {
            self.check_exclusive_access(q, connection)?;
        }
        Ok((src, dst))
    }

    pub fn bind(
        &self,
        source: &str,
        destination: &str,
        kind: DestinationKind,
        routing_key: &str,
        arguments: &FieldTable,
        connection: u64,
    ) -> AmqpResult<()> {
        let _t = self.topology.lock();
        let (src, dst) = self.resolve_binding(source, destination, kind, connection)?;
        src.validate_binding(arguments)
            .map_err(precondition_failed)?;
        let durable = src.spec.durable
            && match &dst {
                Destination::Queue(q) => q.durable() && q.owner().is_none(),
                Destination::Exchange(x) => x.spec.durable,
            };
        let binding = Binding {
            destination: dst,
            routing_key: routing_key.to_owned(),
            arguments: arguments.clone(),
        };
        if src.has_binding(&binding) {
            return Ok(());
        }
        // Committed before it routes: a binding the cluster refuses is not made here.
        if durable {
            self.persist(binding_command(
                &self.name,
                true,
                source,
                destination,
                kind,
                routing_key,
                arguments,
            ))?;
        }
        src.bind(binding);
        Ok(())
    }

    pub fn unbind(
        &self,
        source: &str,
        destination: &str,
        kind: DestinationKind,
        routing_key: &str,
        arguments: &FieldTable,
        connection: u64,
    ) -> AmqpResult<()> {
        let _t = self.topology.lock();
        let (src, dst) = match self.resolve_binding(source, destination, kind, connection) {
            Ok(found) => found,
            // Unbinding from or to something that does not exist succeeds, as in RabbitMQ.
            Err(e) if e.code == crate::error::NOT_FOUND => return Ok(()),
            Err(e) => return Err(e),
        };
        let binding = Binding {
            destination: dst,
            routing_key: routing_key.to_owned(),
            arguments: arguments.clone(),
        };
        if src.has_binding(&binding) {
            self.persist(binding_command(
                &self.name,
                false,
                source,
                destination,
                kind,
                routing_key,
                arguments,
            ))?;
            src.unbind(&binding);
            if src.spec.auto_delete && !src.has_bindings() {
                self.remove_exchange_locked(&src)?;
            }
        }
        Ok(())
    }

    /// A queue outside the vhost's namespace (the hidden queue of direct reply-to).
    pub fn hidden_queue(&self, spec: QueueSpec, owner: Option<u64>) -> QueueRef {
        let q = QueueRef::from(Queue::new(
            spec,
            self.name.clone(),
            owner,
            LazyStore::deferred(self.storage.clone()),
            self.window,
        ));
        self.link(&q);
        q
    }

    /// A queue unused for its `x-expires` goes, messages and all, as in RabbitMQ.
    pub fn expire_queue(&self, q: &QueueRef) {
        if self.queue(q.name()).is_some_and(|current| &current == q) {
            tracing::info!(vhost = %self.name, queue = q.name(), "queue expired (x-expires)");
            self.remove_queue(q);
        }
    }

    /// Routes the messages `from` gave up on to its dead-letter exchange. A missing exchange
    /// drops them, as in RabbitMQ; so does a cycle of queues with no rejection in it.
    pub fn dead_letter(&self, from: &QueueRef, dead: Vec<(QueuedMessage, DeathReason)>) {
        let settings = from.settings();
        let Some(target) = &settings.features.dead_letter else {
            return;
        };
        let Some(exchange) = self.exchange(&target.exchange) else {
            tracing::debug!(vhost = %self.name, queue = from.name(), exchange = %target.exchange, "dead-letter exchange missing; dead letters dropped");
            return;
        };
        let now = now_ms();
        let mut scratch = RouteScratch::default();
        for (queued, reason) in dead {
            let letter =
                dead_letter::dead_letter(&queued.message, from.name(), reason, target, now);
            let keys: Vec<&[u8]> = letter.keys.iter().map(|k| &k[..]).collect();
            self.publish(
                &exchange,
                &keys,
                Some(&letter.headers),
                &Arc::new(letter.message),
                Origin::DeadLetter(reason),
                &mut scratch,
            );
        }
    }

    /// Moves every queue's counters into the node's retired counters, as the vhost leaves the
    /// node (the caller holds the write side of `churn.retiring` and has taken the vhost out of
    /// the broker's map). Counts made after this are not kept: the queues are going.
    pub fn retire_counters(&self) {
        for q in self.queues.read().values() {
            self.churn.retired_queues.absorb(&q.message_counts());
        }
    }

    /// Deletes every queue (and its stored messages) and forgets every exchange: the vhost
    /// is being deleted (after [`Vhost::retire_counters`]).
    pub fn remove_everything(&self) {
        let _t = self.topology.lock();
        let queues: Vec<_> = self.queues.write().drain().map(|(_, q)| q).collect();
        self.churn
            .queue_deleted
            .fetch_add(queues.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for q in queues {
            let _ = q.delete(false, false);
        }
        for (_, x) in self.exchanges.write().drain() {
            x.mark_deleted();
        }
        self.reply_queues.write().clear();
        self.delayer.destroy();
    }

    /// Registers the hidden queue of a direct reply-to consumer under `key`.
    pub fn add_reply_queue(&self, key: &str, q: QueueRef) {
        self.reply_queues.write().insert(key.to_owned(), q);
    }

    pub fn remove_reply_queue(&self, key: &str) {
        self.reply_queues.write().remove(key);
    }

    /// The hidden queue behind a generated direct reply-to name (`amq.rabbitmq.reply-to.KEY`)
    /// whose consumer is still there.
    pub fn reply_queue(&self, name: &str) -> Option<QueueRef> {
        name.strip_prefix(REPLY_TO)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|k| self.reply_queues.read().get(k).cloned())
    }

    /// Finds the queues a message published to `exchange` goes to, following
    /// exchange-to-exchange bindings and alternate exchanges, each queue once; they are left
    /// in `scratch.queues`.
    /// `keys` is the routing key followed by any CC and BCC keys. With `delayed`, a message
    /// with a positive `x-delay` stops at the delayed exchanges it reaches, listed there, to
    /// be scheduled; without, it is routed through them (it is due).
    pub fn route(
        &self,
        exchange: &Arc<Exchange>,
        keys: &[&[u8]],
        headers: Option<&FieldTable>,
        scratch: &mut RouteScratch,
        mut delayed: Option<&mut Vec<Arc<Exchange>>>,
    ) {
        let RouteScratch {
            queues: out,
            dests,
            work,
            seen,
        } = scratch;
        work.clear();
        seen.clear();
        work.push(exchange.clone());
        while let Some(x) = work.pop() {
            if seen.iter().any(|s| Arc::ptr_eq(s, &x)) {
                continue;
            }
            if x.name().is_empty() {
                self.route_default(keys, out);
            } else if x.is_delayed()
                && let Some(d) = delayed.as_deref_mut()
                && delay_of(headers).is_some()
            {
                d.push(x.clone());
            } else {
                dests.clear();
                for key in keys {
                    x.route(key, headers, dests);
                }
                if dests.is_empty()
                    && let Some(ae) = x.alternate().and_then(|n| self.exchange(&n))
                {
                    work.push(ae);
                }
                for d in dests.drain(..) {
                    match d {
                        Destination::Queue(q) => {
                            if !out.contains(&q) {
                                out.push(q);
                            }
                        }
                        Destination::Exchange(e) => work.push(e),
                    }
                }
            }
            seen.push(x);
        }
        // Not kept alive until the next publish.
        seen.clear();
    }

    /// The default exchange: every queue is bound under its own name.
    fn route_default(&self, keys: &[&[u8]], out: &mut Vec<QueueRef>) {
        for key in keys {
            let Ok(name) = std::str::from_utf8(key) else {
                continue;
            };
            let q = if name.starts_with(REPLY_TO) {
                self.reply_queue(name)
            } else {
                self.queue(name)
            };
            if let Some(q) = q
                && !out.contains(&q)
            {
                out.push(q);
            }
        }
    }

    /// Publishes a message to `exchange`: the one way a message enters queues. Routes it
    /// (see [`Vhost::route`]; `keys` is the routing key followed by any CC and BCC keys),
    /// schedules it at the delayed exchanges it stops at, and hands it to its queues.
    /// `scratch` holds buffers the caller keeps from one publish to the next, so that routing
    /// allocates nothing; they are left empty. What differs by caller (permissions, mandatory
    /// returns, counters, confirms) stays with the caller.
    pub fn publish(
        &self,
        exchange: &Arc<Exchange>,
        keys: &[&[u8]],
        headers: Option<&FieldTable>,
        message: &Arc<Message>,
        origin: Origin,
        scratch: &mut RouteScratch,
    ) -> PublishOutcome {
        scratch.queues.clear();
        // Allocates only when the message reaches a delayed exchange.
        let mut delayed = Vec::new();
        let hold = (origin != Origin::Due).then_some(&mut delayed);
        self.route(exchange, keys, headers, scratch, hold);
        let queues = &mut scratch.queues;
        if let Origin::DeadLetter(reason) = origin
            && reason != DeathReason::Rejected
            && let Some(h) = headers
        {
            queues.retain(|q| !dead_letter::is_cycle(h, q.name()));
        }
        let mut outcome = self.enqueue(queues, message);
        queues.clear();
        if !delayed.is_empty() {
            outcome.delayed = delayed.len();
            match self.schedule_delayed(&delayed, keys, headers, message) {
                Some(ticket) => {
                    outcome.taken += delayed.len();
                    outcome.ticket = outcome.ticket.and(ticket);
                }
                None => outcome.unstored = true,
            }
        }
        outcome
    }

    /// Delivers a routed message to its queues.
    fn enqueue(&self, queues: &[QueueRef], message: &Arc<Message>) -> PublishOutcome {
        let mut outcome = PublishOutcome {
            queues: queues.len(),
            ..PublishOutcome::default()
        };
        for q in queues {
            match q.publish(message.clone()) {
                Enqueued::Accepted { ticket, backlogged } => {
                    outcome.taken += 1;
                    outcome.ticket = outcome.ticket.and(ticket);
                    if backlogged {
                        outcome.backlogged.push(q.clone());
                    }
                }
                Enqueued::Rejected => outcome.rejected = true,
                Enqueued::Deleted => {}
            }
        }
        outcome
    }

    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// Schedules a message that reached delayed exchanges (see [`Vhost::route`]); returns
    /// the ticket done once it is on disk, or `None` when it could not be stored (a disk
    /// that cannot take it: logged, and the publisher is nacked).
    fn schedule_delayed(
        &self,
        exchanges: &[Arc<Exchange>],
        keys: &[&[u8]],
        headers: Option<&FieldTable>,
        message: &Message,
    ) -> Option<Ticket> {
        let Some(delay) = delay_of(headers) else {
            return Some(Ticket::Done);
        };
        let me = self.me.upgrade()?;
        let due = now_ms().max(message.arrived_ms) + delay;
        let mut ticket = Ticket::Done;
        for x in exchanges {
            let scheduled = Scheduled {
                due,
                exchange: x.name(),
                keys,
                message,
                durable: message.persistent && x.spec.durable,
            };
            match self.delayer.schedule(&self.storage, &me, scheduled) {
                Ok(t) => ticket = ticket.and(t),
                Err(e) => {
                    tracing::error!(vhost = %self.name, exchange = x.name(), error = %e, "cannot store a delayed message");
                    return None;
                }
            }
        }
        Some(ticket)
    }

    /// Routes a delayed message whose time has come; returns the ticket done once its copies
    /// are on disk. Its exchange gone, it is dropped.
    pub fn deliver_due(&self, due: &Due) -> Ticket {
        let Some(x) = self.exchange(&due.exchange).filter(|x| x.is_delayed()) else {
            tracing::debug!(vhost = %self.name, exchange = %due.exchange, "delayed exchange gone; its due message is dropped");
            return Ticket::Done;
        };
        let mut message = due.message.clone();
        // It enters its queues now: TTLs (the queue's and its own `expiration`) count from
        // here, as RabbitMQ counts them from when the plugin hands the message on.
        let now = now_ms();
        if let Some(expires) = message.expires_at_ms {
            message.expires_at_ms = Some(expires + now.saturating_sub(message.arrived_ms));
        }
        message.arrived_ms = now;
        let mut props = codec::decode_properties(&message.properties).unwrap_or_default();
        let headers = props.headers().as_ref().map(delayed::negated);
        if let Some(h) = &headers {
            props = props.with_headers(h.clone());
            message.properties = codec::encode_properties(&props);
        }
        let keys: Vec<&[u8]> = due.keys.iter().map(|k| &k[..]).collect();
        self.publish(
            &x,
            &keys,
            headers.as_ref(),
            &Arc::new(message),
            Origin::Due,
            &mut RouteScratch::default(),
        )
        .ticket
    }

    /// Delayed messages waiting in this vhost.
    pub fn delayed_messages(&self) -> u64 {
        self.delayer.len()
    }
}

impl QueueOwner for Vhost {
    fn dead_letter(&self, from: &QueueRef, dead: Vec<(QueuedMessage, DeathReason)>) {
        Vhost::dead_letter(self, from, dead);
    }

    fn expire_queue(&self, q: &QueueRef) {
        Vhost::expire_queue(self, q);
    }
}

impl DelayedOwner for Vhost {
    fn name(&self) -> &str {
        &self.name
    }

    fn storage(&self) -> &Storage {
        &self.storage
    }

    fn deliver_due(&self, due: &Due) -> Ticket {
        Vhost::deliver_due(self, due)
    }
}

/// The reply for a change the definitions could not take.
/// 404 for a queue whose home node cannot be reached, as RabbitMQ answers for a durable
/// queue whose node is down.
pub fn home_down(q: &QueueRef) -> AmqpError {
    not_found(format!(
        "home node '{}' of durable {} is down or inaccessible",
        q.home().unwrap_or_default(),
        describe("queue", q.name(), q.vhost())
    ))
}

/// Ready messages and consumers for `queue.declare-ok`, asked of the home node for a queue
/// on another.
pub fn declare_counts(q: &QueueRef) -> AmqpResult<(u32, u32)> {
    match q.lengths_now() {
        Ok(l) => Ok((
            u32::try_from(l.ready).unwrap_or(u32::MAX),
            u32::try_from(l.consumers).unwrap_or(u32::MAX),
        )),
        Err(_) => Err(home_down(q)),
    }
}

pub fn definitions_error(what: &str, e: crate::store::DefinitionsError) -> AmqpError {
    match e {
        crate::store::DefinitionsError::Unavailable(reason) => AmqpError {
            cause: crate::error::Cause::Unavailable,
            ..AmqpError::new(
                crate::error::INTERNAL_ERROR,
                format!("cannot {what}: {reason}"),
            )
        },
        e => {
            tracing::error!(error = %e, "cannot write definitions");
            AmqpError::new(crate::error::INTERNAL_ERROR, "cannot write definitions")
        }
    }
}

/// The command that stores (`bind`) or removes a durable binding.
fn binding_command(
    vhost: &str,
    bind: bool,
    source: &str,
    destination: &str,
    kind: DestinationKind,
    routing_key: &str,
    arguments: &FieldTable,
) -> Command {
    let (vhost, source, destination) =
        (vhost.to_owned(), source.to_owned(), destination.to_owned());
    let destination_type = match kind {
        DestinationKind::Queue => "queue",
        DestinationKind::Exchange => "exchange",
    }
    .to_owned();
    let (routing_key, arguments) = (routing_key.to_owned(), arguments.clone());
    if bind {
        Command::Bind {
            vhost,
            source,
            destination,
            destination_type,
            routing_key,
            arguments,
        }
    } else {
        Command::Unbind {
            vhost,
            source,
            destination,
            destination_type,
            routing_key,
            arguments,
        }
    }
}

/// The largest TTL or expiry RabbitMQ accepts, in milliseconds.
const MAX_EXPIRY: i64 = u32::MAX as i64;

/// Checks the queue arguments RabbitMQ checks when a queue is created, with its texts
/// (`invalid arg 'x-max-length' for queue 'q' in vhost '/': {value_negative,-1}`).
pub(crate) fn validate_queue_arguments(spec: &QueueSpec, vhost: &str) -> AmqpResult<()> {
    let what = describe("queue", &spec.name, vhost);
    let invalid = |key: &str, detail: String| {
        precondition_failed(format!("invalid arg '{key}' for {what}: {detail}"))
    };
    let integer = |key: &str, v: &AMQPValue| {
        super::headers::integer(v)
            .ok_or_else(|| invalid(key, format!("\"expected integer, got {}\"", type_name(v))))
    };
    // A time in milliseconds: not negative, not past RabbitMQ's maximum, and for x-expires
    // not zero either.
    let expiry = |key: &str, value: &AMQPValue, zero_ok: bool| -> AmqpResult<()> {
        let n = integer(key, value)?;
        if n == 0 && !zero_ok {
            return Err(invalid(key, "{value_zero,0}".into()));
        }
        if n < 0 {
            return Err(invalid(key, format!("{{value_negative,{n}}}")));
        }
        if n > MAX_EXPIRY {
            return Err(invalid(
                key,
                format!("{{value_too_large,{n},{MAX_EXPIRY}}}"),
            ));
        }
        Ok(())
    };
    let args = spec.arguments.inner();
    let queue_type = match args.get("x-queue-type") {
        None => "classic".to_owned(),
        Some(v) => match super::headers::text(v) {
            Some(t) if matches!(t.as_str(), "classic" | "quorum") => t,
            Some(t) => {
                return Err(invalid(
                    "x-queue-type",
                    format!("\"unsupported queue type '{t}'\""),
                ));
            }
            None => {
                return Err(invalid(
                    "x-queue-type",
                    format!("{{unacceptable_type,{}}}", type_name(v)),
                ));
            }
        },
    };
    for (key, value) in args {
        let key = key.as_str();
        match key {
            "x-max-length" | "x-max-length-bytes" | "x-delivery-limit" | "x-consumer-timeout" => {
                let n = integer(key, value)?;
                if n < 0 {
                    return Err(invalid(key, format!("{{value_negative,{n}}}")));
                }
            }
            "x-max-in-memory-length" | "x-max-in-memory-bytes" if queue_type == "classic" => {
                return Err(precondition_failed(format!(
                    "invalid arg '{key}' for {what} of queue type rabbit_classic_queue"
                )));
            }
            "x-message-ttl" => expiry(key, value, true)?,
            "x-expires" => expiry(key, value, false)?,
            "x-max-priority" => {
                let n = integer(key, value)?;
                if n < 0 {
                    return Err(invalid(key, format!("{{value_negative,{n}}}")));
                }
                if n > 255 {
                    return Err(invalid(key, format!("{{max_value_exceeded,{n}}}")));
                }
            }
            "x-dead-letter-exchange" | "x-dead-letter-routing-key"
                if super::headers::text(value).is_none() =>
            {
                return Err(precondition_failed(format!(
                    "invalid type '{}' for arg '{key}' in {what}",
                    type_name(value)
                )));
            }
            "x-dead-letter-routing-key" if !args.contains_key("x-dead-letter-exchange") => {
                return Err(invalid(key, "routing_key_but_no_dlx_defined".into()));
            }
            "x-overflow" => match super::headers::text(value).as_deref() {
                Some("drop-head" | "reject-publish" | "reject-publish-dlx") => {}
                _ => return Err(invalid(key, "invalid_overflow".into())),
            },
            "x-queue-mode" => match super::headers::text(value).as_deref() {
                Some("default" | "lazy") => {}
                Some(other) => {
                    return Err(invalid(
                        key,
                        format!("\"unsupported queue mode '{other}'\""),
                    ));
                }
                None => {
                    return Err(invalid(
                        key,
                        format!("{{unacceptable_type,{}}}", type_name(value)),
                    ));
                }
            },
            "x-single-active-consumer" if !matches!(value, AMQPValue::Boolean(_)) => {
                return Err(invalid(
                    key,
                    format!("{{unacceptable_type,{}}}", type_name(value)),
                ));
            }
            _ => {}
        }
    }
    if queue_type == "quorum"
        && let Some(p) = quorum_refuses(spec)
    {
        return Err(precondition_failed(format!(
            "invalid property '{p}' for {what}"
        )));
    }
    Ok(())
}

/// The property a quorum queue cannot have that `spec` has, in RabbitMQ's words, if any.
fn quorum_refuses(spec: &QueueSpec) -> Option<&'static str> {
    if !spec.durable {
        Some("non-durable")
    } else if spec.exclusive {
        Some("exclusive-owner")
    } else if spec.auto_delete {
        Some("auto-delete")
    } else {
        None
    }
}

/// Whether two policy choices are the same policy, in the same version.
fn same_policy(a: Option<&Arc<Policy>>, b: Option<&Arc<Policy>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::ShortStr;
    use bytes::Bytes;

    fn exchange(v: &Vhost, name: &str, kind: ExchangeKind) -> Arc<Exchange> {
        v.declare_exchange(ExchangeSpec {
            name: name.to_owned(),
            kind,
            durable: false,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        })
        .expect("declared")
    }

    fn queue(v: &Vhost, name: &str) -> QueueRef {
        let spec = QueueSpec {
            name: name.to_owned(),
            durable: false,
            exclusive: false,
            auto_delete: false,
            arguments: FieldTable::default(),
        };
        v.declare_queue(spec, 0).expect("declared").0
    }

    fn bind(v: &Vhost, source: &str, destination: &str, kind: DestinationKind, key: &str) {
        v.bind(source, destination, kind, key, &FieldTable::default(), 0)
            .expect("bound");
    }

    fn message() -> Arc<Message> {
        Arc::new(Message {
            exchange: ShortStr::from_bytes(Bytes::new()),
            routing_key: ShortStr::from_bytes(Bytes::from_static(b"k")),
            properties: Bytes::from_static(&[0, 0]),
            body: Bytes::from_static(b"m"),
            persistent: false,
            arrived_ms: now_ms(),
            expires_at_ms: None,
        })
    }

    /// Where each buffer's memory is and how much it holds: unchanged means not reallocated.
    fn buffers(s: &RouteScratch) -> [(usize, usize); 4] {
        [
            (s.queues.as_ptr() as usize, s.queues.capacity()),
            (s.dests.as_ptr() as usize, s.dests.capacity()),
            (s.work.as_ptr() as usize, s.work.capacity()),
            (s.seen.as_ptr() as usize, s.seen.capacity()),
        ]
    }

    #[test]
    fn routing_reuses_its_buffers_and_goes_round_a_cycle_of_exchanges_once() {
        let broker = crate::broker::Broker::in_memory(crate::Config::default());
        let v = broker.vhost("/").expect("the default vhost");
        let a = exchange(&v, "a", ExchangeKind::Direct);
        exchange(&v, "b", ExchangeKind::Fanout);
        let (qa, qb) = (queue(&v, "qa"), queue(&v, "qb"));
        bind(&v, "a", "qa", DestinationKind::Queue, "k");
        bind(&v, "a", "b", DestinationKind::Exchange, "k");
        bind(&v, "b", "qb", DestinationKind::Queue, "");
        bind(&v, "b", "a", DestinationKind::Exchange, "");
        bind(&v, "b", "qa", DestinationKind::Queue, "");
        let mut scratch = RouteScratch::default();
        let outcome = v.publish(
            &a,
            &[b"k"],
            None,
            &message(),
            Origin::Publisher,
            &mut scratch,
        );
        assert_eq!(outcome.queues, 2);
        assert_eq!((qa.lengths().ready, qb.lengths().ready), (1, 1));
        let grown = buffers(&scratch);
        assert!(grown.iter().all(|&(_, capacity)| capacity > 0));
        for _ in 0..3 {
            let outcome = v.publish(
                &a,
                &[b"k"],
                None,
                &message(),
                Origin::Publisher,
                &mut scratch,
            );
            assert_eq!(outcome.queues, 2);
            assert_eq!(
                buffers(&scratch),
                grown,
                "a publish reallocated routing's buffers"
            );
        }
        assert_eq!((qa.lengths().ready, qb.lengths().ready), (4, 4));
        // Nothing is kept between publishes: no exchange or queue stays alive through them.
        assert!(scratch.queues.is_empty() && scratch.work.is_empty() && scratch.seen.is_empty());
    }

    /// A metadata log that counts its entries and keeps nothing else.
    #[derive(Debug, Default)]
    struct CountingLog {
        entries: parking_lot::Mutex<Vec<usize>>,
    }

    impl crate::store::definitions::MetaLog for CountingLog {
        fn commit(
            &self,
            commands: Vec<Command>,
        ) -> Result<(), crate::store::definitions::DefinitionsError> {
            self.entries.lock().push(commands.len());
            Ok(())
        }
        fn definitions(&self) -> crate::store::definitions::Definitions {
            crate::store::definitions::Definitions::default()
        }
        fn node(&self) -> &str {
            "n1"
        }
    }

    fn durable(name: &str, arguments: FieldTable) -> QueueSpec {
        QueueSpec {
            name: name.to_owned(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments,
        }
    }

    #[test]
    fn an_import_commits_its_queues_a_group_at_a_time_and_judges_each_as_a_declaration() {
        let log = Arc::new(CountingLog::default());
        let store = Arc::new(DefinitionStore::replicated(log.clone()));
        let broker = Arc::new(crate::broker::Broker::with_store(
            crate::Config::default(),
            store,
            Arc::new(crate::store::Storage::in_memory()),
            crate::store::definitions::Definitions::default(),
            None,
        ));
        broker.put_vhost("v", "", Vec::new(), None).expect("vhost");
        let v = broker.vhost("v").expect("the vhost");
        // One existing queue that the import declares again as it is, one that it declares
        // otherwise.
        v.import_queue(durable("same", FieldTable::default()), None)
            .expect("declared");
        let mut lazy = FieldTable::default();
        lazy.insert("x-max-length".into(), AMQPValue::LongLongInt(5));
        v.import_queue(durable("other", lazy), None)
            .expect("declared");
        log.entries.lock().clear();
        let mut specs: Vec<QueueSpec> = (0..1200)
            .map(|i| durable(&format!("q{i}"), FieldTable::default()))
            .collect();
        specs.insert(10, durable("q3", FieldTable::default()));
        specs.push(durable("same", FieldTable::default()));
        specs.push(durable("other", FieldTable::default()));
        let mut bad = FieldTable::default();
        bad.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("stream".into()),
        );
        specs.push(durable("bad", bad));
        let outcome = v.import_queues(specs);
        assert_eq!(outcome.len(), 1204);
        let failed: Vec<&str> = outcome
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(failed, ["other", "bad"]);
        // The repeated q3 ended its group; the next found it declared.
        assert!(
            outcome
                .iter()
                .filter(|(n, _)| n == "q3")
                .all(|(_, r)| r.is_ok())
        );
        assert_eq!(*log.entries.lock(), [10, 500, 500, 190]);
        assert_eq!(v.queues().len(), 1202);
        // The vhost's queue limit counts the queues of a group not yet installed.
        broker
            .set_vhost_limit("v", "max-queues", Some(1205))
            .expect("limit");
        let outcome = v.import_queues(
            (0..5)
                .map(|i| durable(&format!("more{i}"), FieldTable::default()))
                .collect(),
        );
        let refused: Vec<&str> = outcome
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(refused, ["more3", "more4"]);
    }
}
