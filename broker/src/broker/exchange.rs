//! Exchanges are data, not tasks: each holds a binding table shaped for its type, and routing
//! is a synchronous lookup run on the publishing connection's task under a read lock.

use super::fast_map::FastMap;
use super::headers::HeadersMatch;
use super::message::ShortStr;
use super::policy::Policy;
use super::queue_ref::QueueRef;
use super::topic::TopicTrie;
use amq_protocol::types::{AMQPValue, FieldTable};
use parking_lot::RwLock;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
    /// `x-delayed-message`: routes as its `x-delayed-type` argument says, after the delay a
    /// message's `x-delay` header asks for.
    Delayed,
}

impl ExchangeKind {
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "direct" => Self::Direct,
            "fanout" => Self::Fanout,
            "topic" => Self::Topic,
            "headers" => Self::Headers,
            "x-delayed-message" => Self::Delayed,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
            Self::Delayed => "x-delayed-message",
        }
    }

    /// How an exchange of this kind with these arguments routes: a delayed exchange as its
    /// `x-delayed-type` says (checked at declaration, with the plugin's errors).
    pub fn routing(self, arguments: &FieldTable) -> crate::error::AmqpResult<Self> {
        if self != Self::Delayed {
            return Ok(self);
        }
        let Some(name) = arguments
            .inner()
            .get("x-delayed-type")
            .and_then(super::headers::text)
        else {
            return Err(crate::error::precondition_failed(
                "Invalid argument, 'x-delayed-type' must be an existing exchange type",
            ));
        };
        match Self::parse(&name) {
            Some(Self::Delayed) => Err(crate::error::precondition_failed(
                "Invalid argument, 'x-delayed-message' can't be used for 'x-delayed-type'",
            )),
            Some(kind) => Ok(kind),
            // What RabbitMQ says of an exchange type it does not know.
            None => Err(crate::error::AmqpError::new(
                crate::error::COMMAND_INVALID,
                format!(
                    "{} exchange type '{name}'",
                    if name.starts_with("x-") {
                        "unknown"
                    } else {
                        "invalid"
                    }
                ),
            )),
        }
    }
}

/// The declared attributes of an exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// Where a binding leads.
#[derive(Clone)]
pub enum Destination {
    Queue(QueueRef),
    Exchange(Arc<Exchange>),
}

impl Destination {
    pub fn name(&self) -> &str {
        match self {
            Self::Queue(q) => q.name(),
            Self::Exchange(e) => &e.spec.name,
        }
    }

    pub fn is_queue(&self) -> bool {
        matches!(self, Self::Queue(_))
    }
}

impl PartialEq for Destination {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Queue(a), Self::Queue(b)) => a == b,
            (Self::Exchange(a), Self::Exchange(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Queue(q) => write!(f, "queue {:?}", q.name()),
            Self::Exchange(e) => write!(f, "exchange {:?}", e.spec.name),
        }
    }
}

/// One binding from this exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

#[derive(Debug)]
enum Table {
    Direct(FastMap<ShortStr, Vec<Destination>>),
    Fanout,
    Topic(TopicTrie<Destination>),
    Headers(Vec<(HeadersMatch, Destination)>),
}

#[derive(Debug)]
struct Routes {
    bindings: Vec<Binding>,
    table: Table,
}

pub struct Exchange {
    pub spec: ExchangeSpec,
    /// The `alternate-exchange` argument, if it names one.
    alternate: Option<String>,
    /// The policy that applies, and the alternate exchange it names.
    policy: RwLock<(Option<Arc<Policy>>, Option<String>)>,
    routes: RwLock<Routes>,
    deleted: AtomicBool,
}

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exchange")
            .field("name", &self.spec.name)
            .field("kind", &self.spec.kind)
            .finish()
    }
}

impl Exchange {
    pub fn new(spec: ExchangeSpec) -> Arc<Self> {
        let routing = spec
            .kind
            .routing(&spec.arguments)
            .unwrap_or(ExchangeKind::Direct);
        let table = match routing {
            ExchangeKind::Direct | ExchangeKind::Delayed => Table::Direct(FastMap::default()),
            ExchangeKind::Fanout => Table::Fanout,
            ExchangeKind::Topic => Table::Topic(TopicTrie::default()),
            ExchangeKind::Headers => Table::Headers(Vec::new()),
        };
        let alternate = match spec.arguments.inner().get("alternate-exchange") {
            Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into()),
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
            _ => None,
        };
        Arc::new(Self {
            spec,
            alternate,
            policy: RwLock::new((None, None)),
            routes: RwLock::new(Routes {
                bindings: Vec::new(),
                table,
            }),
            deleted: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Where unroutable messages go: the `alternate-exchange` argument, else the policy's.
    pub fn alternate(&self) -> Option<String> {
        match &self.alternate {
            Some(a) => Some(a.clone()),
            None => self.policy.read().1.clone(),
        }
    }

    pub fn policy(&self) -> Option<Arc<Policy>> {
        self.policy.read().0.clone()
    }

    pub fn set_policy(&self, policy: Option<Arc<Policy>>) {
        let alternate = policy.as_ref().and_then(|p| p.alternate_exchange());
        *self.policy.write() = (policy, alternate);
    }

    /// A delayed exchange (`x-delayed-message`).
    pub fn is_delayed(&self) -> bool {
        self.spec.kind == ExchangeKind::Delayed
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    pub(crate) fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
    }

    /// Checks a binding's arguments before it is made (only the headers type has rules).
    pub fn validate_binding(&self, arguments: &FieldTable) -> Result<(), String> {
        if matches!(self.routes.read().table, Table::Headers(_)) {
            HeadersMatch::from_arguments(arguments)?;
        }
        Ok(())
    }

    /// Whether an identical binding exists.
    pub fn has_binding(&self, binding: &Binding) -> bool {
        self.routes.read().bindings.contains(binding)
    }

    /// Adds a binding; returns false if an identical one exists.
    pub fn bind(&self, binding: Binding) -> bool {
        let mut routes = self.routes.write();
        if routes.bindings.contains(&binding) {
            return false;
        }
        let dest = binding.destination.clone();
        match &mut routes.table {
            Table::Direct(map) => map
                .entry(ShortStr::from(binding.routing_key.as_str()))
                .or_default()
                .push(dest),
            Table::Fanout => {}
            Table::Topic(trie) => trie.insert(binding.routing_key.as_bytes(), dest),
            Table::Headers(list) => {
                if let Ok(m) = HeadersMatch::from_arguments(&binding.arguments) {
                    list.push((m, dest));
                }
            }
        }
        routes.bindings.push(binding);
        true
    }

    /// Removes a binding; returns false if there was none.
    pub fn unbind(&self, binding: &Binding) -> bool {
        let mut routes = self.routes.write();
        let Some(at) = routes.bindings.iter().position(|b| b == binding) else {
            return false;
        };
        routes.bindings.remove(at);
        self.rebuild_entry(&mut routes, binding);
        true
    }

    /// Removes every binding to `destination`; returns how many there were.
    pub fn unbind_destination(&self, destination: &Destination) -> usize {
        let mut routes = self.routes.write();
        let (gone, kept): (Vec<Binding>, Vec<Binding>) = std::mem::take(&mut routes.bindings)
            .into_iter()
            .partition(|b| &b.destination == destination);
        routes.bindings = kept;
        for b in &gone {
            self.rebuild_entry(&mut routes, b);
        }
        gone.len()
    }

    /// After `removed` left the binding list, fixes the lookup table: a destination stays in
    /// a slot while any remaining binding still puts it there.
    fn rebuild_entry(&self, routes: &mut Routes, removed: &Binding) {
        let still = |b: &Binding| b.destination == removed.destination;
        match &mut routes.table {
            Table::Direct(map) => {
                let key = ShortStr::from(removed.routing_key.as_str());
                let keep = routes
                    .bindings
                    .iter()
                    .any(|b| still(b) && b.routing_key == removed.routing_key);
                if !keep && let Some(list) = map.get_mut(&key) {
                    list.retain(|d| d != &removed.destination);
                    if list.is_empty() {
                        map.remove(&key);
                    }
                }
            }
            Table::Fanout => {}
            Table::Topic(trie) => {
                let keep = routes
                    .bindings
                    .iter()
                    .any(|b| still(b) && b.routing_key == removed.routing_key);
                if !keep {
                    trie.remove(removed.routing_key.as_bytes(), &removed.destination);
                }
            }
            Table::Headers(list) => {
                if let Ok(m) = HeadersMatch::from_arguments(&removed.arguments)
                    && let Some(at) = list
                        .iter()
                        .position(|(lm, d)| lm == &m && d == &removed.destination)
                {
                    list.remove(at);
                }
            }
        }
    }

    pub fn bindings(&self) -> Vec<Binding> {
        self.routes.read().bindings.clone()
    }

    /// How many bindings it has, without copying them.
    pub fn binding_count(&self) -> usize {
        self.routes.read().bindings.len()
    }

    pub fn has_bindings(&self) -> bool {
        !self.routes.read().bindings.is_empty()
    }

    /// Appends the destinations matching `routing_key` (and `headers`, for the headers type).
    /// May repeat a destination; the caller de-duplicates.
    pub fn route(
        &self,
        routing_key: &[u8],
        headers: Option<&FieldTable>,
        out: &mut Vec<Destination>,
    ) {
        let routes = self.routes.read();
        match &routes.table {
            Table::Direct(map) => {
                if let Some(list) = map.get(routing_key) {
                    out.extend(list.iter().cloned());
                }
            }
            Table::Fanout => out.extend(routes.bindings.iter().map(|b| b.destination.clone())),
            Table::Topic(trie) => trie.route(routing_key, &mut |d| out.push(d.clone())),
            Table::Headers(list) => {
                for (m, d) in list {
                    if m.matches(headers) {
                        out.push(d.clone());
                    }
                }
            }
        }
    }
}
