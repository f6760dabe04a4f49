//! Policies, as RabbitMQ has them: a name, a regular expression matched against queue and
//! exchange names, what kinds of object it applies to, a priority, and a definition of
//! settings. Each queue or exchange takes the one matching policy of highest priority (ties go
//! to the name that sorts first); a queue's own `x-` arguments win over its policy's keys.
//! Policies are re-applied to every queue and exchange of the vhost when they change.

use super::headers::integer;
use crate::amqp::codec::MAX_TABLE_DEPTH;
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use serde_json::{Map, Value};
use std::sync::Arc;

/// Policy keys Warren applies to queues, with the queue argument each stands for.
const QUEUE_KEYS: [(&str, &str); 9] = [
    ("message-ttl", "x-message-ttl"),
    ("expires", "x-expires"),
    ("max-length", "x-max-length"),
    ("max-length-bytes", "x-max-length-bytes"),
    ("overflow", "x-overflow"),
    ("dead-letter-exchange", "x-dead-letter-exchange"),
    ("dead-letter-routing-key", "x-dead-letter-routing-key"),
    ("delivery-limit", "x-delivery-limit"),
    ("consumer-timeout", "x-consumer-timeout"),
];

/// Keys RabbitMQ knows that have no effect in Warren (mirroring, queue modes and versions,
/// federation, streams): accepted, so definitions written for RabbitMQ import, and ignored.
const IGNORED_KEYS: [&str; 18] = [
    "dead-letter-strategy",
    "ha-mode",
    "ha-params",
    "ha-sync-mode",
    "ha-sync-batch-size",
    "ha-promote-on-shutdown",
    "ha-promote-on-failure",
    "queue-mode",
    "queue-version",
    "queue-master-locator",
    "queue-leader-locator",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "max-age",
    "stream-max-segment-size-bytes",
    "initial-cluster-size",
    "federation-upstream",
    "federation-upstream-set",
];

/// Keys an operator policy may set, as in RabbitMQ 3.10: limits and times, where the lower of
/// the operator policy's value and the queue's own (argument or policy) wins.
const OPERATOR_KEYS: [&str; 5] = [
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "delivery-limit",
];

/// Operator policy keys RabbitMQ knows that have no effect in Warren.
const OPERATOR_IGNORED_KEYS: [&str; 2] = ["max-in-memory-length", "max-in-memory-bytes"];

/// Policies or operator policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    Policy,
    Operator,
}

/// What a policy applies to (`apply-to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyTo {
    All,
    Queues,
    Exchanges,
    ClassicQueues,
    QuorumQueues,
    Streams,
}

impl ApplyTo {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "all" => ApplyTo::All,
            "queues" => ApplyTo::Queues,
            "exchanges" => ApplyTo::Exchanges,
            "classic_queues" => ApplyTo::ClassicQueues,
            "quorum_queues" => ApplyTo::QuorumQueues,
            "streams" => ApplyTo::Streams,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            ApplyTo::All => "all",
            ApplyTo::Queues => "queues",
            ApplyTo::Exchanges => "exchanges",
            ApplyTo::ClassicQueues => "classic_queues",
            ApplyTo::QuorumQueues => "quorum_queues",
            ApplyTo::Streams => "streams",
        }
    }
}

/// A queue's type, as `apply-to` tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    Classic,
    Quorum,
    Stream,
}

impl QueueKind {
    /// The type `x-queue-type` names, classic without it. Nothing is copied: the
    /// management API asks this of every queue it lists.
    pub fn of(arguments: &FieldTable) -> Self {
        let kind: &[u8] = match arguments.inner().get("x-queue-type") {
            Some(AMQPValue::LongString(s)) => s.as_bytes(),
            Some(AMQPValue::ShortString(s)) => s.as_str().as_bytes(),
            _ => b"",
        };
        match kind {
            b"quorum" => QueueKind::Quorum,
            b"stream" => QueueKind::Stream,
            _ => QueueKind::Classic,
        }
    }

    /// The type's name, as `x-queue-type` and the management API give it.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueKind::Classic => "classic",
            QueueKind::Quorum => "quorum",
            QueueKind::Stream => "stream",
        }
    }
}

/// One policy, checked.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub pattern: String,
    /// RabbitMQ's patterns are PCRE: lookaround (`^(?!amq\.).*`, from its own docs) must work.
    regex: fancy_regex::Regex,
    pub apply_to: ApplyTo,
    pub priority: i64,
    pub definition: Map<String, Value>,
}

impl PartialEq for Policy {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.pattern == other.pattern
            && self.apply_to == other.apply_to
            && self.priority == other.priority
            && self.definition == other.definition
    }
}

impl Policy {
    /// Checks a policy as RabbitMQ does; the error is the reason the management API gives.
    pub fn new(
        name: &str,
        pattern: &str,
        apply_to: &str,
        priority: i64,
        definition: Map<String, Value>,
    ) -> Result<Self, String> {
        let regex = fancy_regex::Regex::new(pattern).map_err(|e| {
            format!(
                "Validation failed\n\npattern should be regular expression but is invalid: {}\n",
                e.to_string().replace('\n', " ")
            )
        })?;
        let apply_to = ApplyTo::parse(apply_to).ok_or_else(|| {
            format!(
                "Validation failed\n\napply-to '{apply_to}' unrecognised; should be 'queues', 'exchanges', 'all', 'classic_queues', 'quorum_queues' or 'streams'\n"
            )
        })?;
        validate_definition(&definition)
            .map_err(|reason| format!("Validation failed\n\n{reason}\n"))?;
        Ok(Self {
            name: name.to_owned(),
            pattern: pattern.to_owned(),
            regex,
            apply_to,
            priority,
            definition,
        })
    }

    /// An operator policy: only RabbitMQ's operator keys are accepted.
    pub fn new_operator(
        name: &str,
        pattern: &str,
        apply_to: &str,
        priority: i64,
        definition: Map<String, Value>,
    ) -> Result<Self, String> {
        let unknown: Vec<(&String, &Value)> = definition
            .iter()
            .filter(|(k, _)| {
                !OPERATOR_KEYS.contains(&k.as_str()) && !OPERATOR_IGNORED_KEYS.contains(&k.as_str())
            })
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "Validation failed\n\n{}\n",
                not_recognised(unknown)
            ));
        }
        Self::new(name, pattern, apply_to, priority, definition)
    }

    /// A policy or an operator policy, as `kind` says.
    pub fn of_kind(
        kind: PolicyKind,
        name: &str,
        pattern: &str,
        apply_to: &str,
        priority: i64,
        definition: Map<String, Value>,
    ) -> Result<Self, String> {
        match kind {
            PolicyKind::Policy => Self::new(name, pattern, apply_to, priority, definition),
            PolicyKind::Operator => {
                Self::new_operator(name, pattern, apply_to, priority, definition)
            }
        }
    }

    pub fn applies_to_queue(&self, name: &str, kind: QueueKind) -> bool {
        let kind_ok = match self.apply_to {
            ApplyTo::All | ApplyTo::Queues => true,
            ApplyTo::Exchanges => false,
            ApplyTo::ClassicQueues => kind == QueueKind::Classic,
            ApplyTo::QuorumQueues => kind == QueueKind::Quorum,
            ApplyTo::Streams => kind == QueueKind::Stream,
        };
        kind_ok && self.is_match(name)
    }

    /// A pattern that cannot be decided (the backtracking limit) matches nothing.
    fn is_match(&self, name: &str) -> bool {
        self.regex.is_match(name).unwrap_or(false)
    }

    pub fn applies_to_exchange(&self, name: &str) -> bool {
        matches!(self.apply_to, ApplyTo::All | ApplyTo::Exchanges) && self.is_match(name)
    }

    /// The queue arguments this policy stands for (only the keys Warren applies).
    pub fn queue_arguments(&self) -> FieldTable {
        let mut out = FieldTable::default();
        for (key, argument) in QUEUE_KEYS {
            if let Some(v) = self.definition.get(key).and_then(as_amqp) {
                out.insert(argument.into(), v);
            }
        }
        out
    }

    /// The `alternate-exchange` an exchange gets from this policy.
    pub fn alternate_exchange(&self) -> Option<String> {
        self.definition
            .get("alternate-exchange")
            .and_then(Value::as_str)
            .map(str::to_owned)
    }
}

/// The policy that applies: the highest priority among those that match, then the name that
/// sorts first.
pub fn choose(policies: &[Arc<Policy>], matches: impl Fn(&Policy) -> bool) -> Option<&Arc<Policy>> {
    policies.iter().filter(|p| matches(p)).min_by(|a, b| {
        b.priority
            .cmp(&a.priority)
            .then_with(|| a.name.cmp(&b.name))
    })
}

/// Queue arguments that, set both ways, take the lower of the argument and the policy's
/// value, as in RabbitMQ; for the other keys the argument wins.
const LOWER_WINS: [&str; 6] = [
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-delivery-limit",
    "x-consumer-timeout",
];

/// A queue's arguments with its policy's keys merged in: where the arguments have the key
/// too, the argument wins, except for the limits and times of [`LOWER_WINS`]. An operator
/// policy's keys then apply where they are lower, or absent.
pub fn effective_arguments(
    arguments: &FieldTable,
    policy: Option<&Policy>,
    operator: Option<&Policy>,
) -> FieldTable {
    let mut out = with_policy(arguments, policy);
    if let Some(op) = operator {
        for (key, value) in op.queue_arguments().inner() {
            let lower = match out.inner().get(key) {
                None => true,
                Some(current) => matches!(
                    (integer(value), integer(current)),
                    (Some(new), Some(old)) if new < old
                ),
            };
            if lower {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    out
}

/// What the management API shows as a queue's `effective_policy_definition`: the policy's
/// definition, with the operator policy's keys where they are lower, or absent.
pub fn effective_definition(
    policy: Option<&Policy>,
    operator: Option<&Policy>,
) -> Map<String, Value> {
    let mut out = policy.map(|p| p.definition.clone()).unwrap_or_default();
    if let Some(op) = operator {
        for (key, value) in &op.definition {
            let keep = matches!(
                (out.get(key).and_then(Value::as_i64), value.as_i64()),
                (Some(old), Some(new)) if old <= new
            );
            if !keep {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    out
}

fn with_policy(arguments: &FieldTable, policy: Option<&Policy>) -> FieldTable {
    let Some(policy) = policy else {
        return arguments.clone();
    };
    let mut out = arguments.clone();
    for (key, value) in policy.queue_arguments().inner() {
        match arguments.inner().get(key) {
            None => {
                out.insert(key.clone(), value.clone());
            }
            Some(own) if LOWER_WINS.contains(&key.as_str()) => {
                if let (Some(a), Some(b)) = (integer(own), integer(value))
                    && b < a
                {
                    out.insert(key.clone(), value.clone());
                }
            }
            Some(_) => {}
        }
    }
    out
}

fn as_amqp(v: &Value) -> Option<AMQPValue> {
    match v {
        Value::String(s) => Some(AMQPValue::LongString(LongString::from(s.as_bytes()))),
        Value::Number(n) => n.as_i64().map(AMQPValue::LongLongInt),
        Value::Bool(b) => Some(AMQPValue::Boolean(*b)),
        _ => None,
    }
}

/// A JSON value as RabbitMQ's reasons print Erlang terms: numbers as they are, strings as
/// binaries (`<<"x">>`).
pub fn term(v: &Value) -> String {
    match v {
        Value::String(s) => format!("<<\"{s}\">>"),
        other => other.to_string(),
    }
}

/// RabbitMQ's reason for keys it does not know, sorted: `[{<<"foo">>,1}] are not recognised
/// policy settings`.
fn not_recognised(mut unknown: Vec<(&String, &Value)>) -> String {
    unknown.sort_by(|a, b| a.0.cmp(b.0));
    format!(
        "[{}] are not recognised policy settings",
        unknown
            .iter()
            .map(|(k, v)| format!("{{<<\"{k}\">>,{}}}", term(v)))
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// RabbitMQ's checks of a definition's values, with its reasons.
fn validate_definition(definition: &Map<String, Value>) -> Result<(), String> {
    if definition.is_empty() {
        return Err("no policy provided".into());
    }
    let unknown: Vec<(&String, &Value)> = definition
        .iter()
        .filter(|(k, _)| {
            k.as_str() != "alternate-exchange"
                && !QUEUE_KEYS.iter().any(|(key, _)| key == k)
                && !IGNORED_KEYS.contains(&k.as_str())
        })
        .collect();
    if !unknown.is_empty() {
        return Err(not_recognised(unknown));
    }
    for (key, value) in definition {
        // Keys whose values Warren ignores take any JSON; each must still read back from
        // definitions.json, whose parser stops at 128 levels.
        if json_depth(value) > MAX_TABLE_DEPTH {
            return Err(format!(
                "{} nests lists and objects deeper than {MAX_TABLE_DEPTH} levels",
                term(&Value::String(key.clone()))
            ));
        }
        let (ok, what) = match key.as_str() {
            "message-ttl" => (non_negative(value), "message TTL"),
            "expires" => (value.as_i64().is_some_and(|n| n >= 1), "queue expiry"),
            "max-length" => (non_negative(value), "maximum length"),
            "max-length-bytes" => (non_negative(value), "maximum length in bytes"),
            "delivery-limit" => (non_negative(value), "delivery limit"),
            "consumer-timeout" => (non_negative(value), "consumer timeout"),
            "overflow" => (
                matches!(
                    value.as_str(),
                    Some("drop-head" | "reject-publish" | "reject-publish-dlx")
                ),
                "overflow value",
            ),
            "dead-letter-exchange" => (value.is_string(), "dead letter exchange name"),
            "dead-letter-routing-key" => (value.is_string(), "dead letter routing key"),
            "alternate-exchange" => (value.is_string(), "alternate exchange name"),
            _ => (true, ""),
        };
        if !ok {
            return Err(format!("{} is not a valid {what}", term(value)));
        }
    }
    Ok(())
}

/// How many levels of lists and objects a value nests (0 for a scalar).
fn json_depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(json_depth).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(json_depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn non_negative(v: &Value) -> bool {
    v.as_i64().is_some_and(|n| n >= 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, pattern: &str, apply_to: &str, priority: i64, def: Value) -> Policy {
        let Value::Object(def) = def else {
            panic!("definition")
        };
        Policy::new(name, pattern, apply_to, priority, def).expect("valid policy")
    }

    #[test]
    fn the_highest_priority_wins_then_the_first_name() {
        let ps: Vec<Arc<Policy>> = vec![
            Arc::new(policy("b", "^q", "all", 1, json!({"max-length": 1}))),
            Arc::new(policy("a", "^q", "all", 1, json!({"max-length": 2}))),
            Arc::new(policy("z", "^q", "queues", 5, json!({"max-length": 3}))),
            Arc::new(policy(
                "x",
                "^q",
                "exchanges",
                9,
                json!({"alternate-exchange": "ae"}),
            )),
        ];
        let chosen = choose(&ps, |p| p.applies_to_queue("q1", QueueKind::Classic));
        assert_eq!(chosen.map(|p| p.name.as_str()), Some("z"));
        let chosen = choose(&ps[..2], |p| p.applies_to_queue("q1", QueueKind::Classic));
        assert_eq!(chosen.map(|p| p.name.as_str()), Some("a"));
        let chosen = choose(&ps, |p| p.applies_to_exchange("q-x"));
        assert_eq!(chosen.map(|p| p.name.as_str()), Some("x"));
        assert!(choose(&ps, |p| p.applies_to_queue("other", QueueKind::Classic)).is_none());
    }

    #[test]
    fn patterns_are_pcre_like_with_lookaround() {
        let p = policy("p", r"^(?!amq\.).*", "all", 0, json!({"max-length": 1}));
        assert!(p.applies_to_queue("orders", QueueKind::Classic));
        assert!(!p.applies_to_queue("amq.gen-1", QueueKind::Classic));
    }

    #[test]
    fn an_operator_policy_caps_what_the_queue_and_its_policy_set() {
        let p = policy(
            "p",
            ".*",
            "all",
            0,
            json!({"max-length": 50, "message-ttl": 10}),
        );
        let Value::Object(def) = json!({"max-length": 20, "message-ttl": 500, "expires": 9000})
        else {
            panic!()
        };
        let op = Policy::new_operator("op", ".*", "queues", 0, def).expect("operator policy");
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(100));
        let eff = effective_arguments(&args, Some(&p), Some(&op));
        let m = eff.inner();
        assert_eq!(m.get("x-max-length"), Some(&AMQPValue::LongLongInt(20)));
        assert_eq!(m.get("x-message-ttl"), Some(&AMQPValue::LongLongInt(10)));
        assert_eq!(m.get("x-expires"), Some(&AMQPValue::LongLongInt(9000)));
        assert_eq!(
            Value::Object(effective_definition(Some(&p), Some(&op))),
            json!({"max-length": 20, "message-ttl": 10, "expires": 9000})
        );
        let Value::Object(bad) = json!({"dead-letter-exchange": "x"}) else {
            panic!()
        };
        assert!(
            Policy::new_operator("op", ".*", "queues", 0, bad)
                .unwrap_err()
                .contains("are not recognised policy settings")
        );
    }

    #[test]
    fn apply_to_tells_queue_types_apart() {
        let p = policy("p", ".*", "quorum_queues", 0, json!({"max-length": 1}));
        assert!(p.applies_to_queue("q", QueueKind::Quorum));
        assert!(!p.applies_to_queue("q", QueueKind::Classic));
        assert!(!p.applies_to_exchange("q"));
    }

    #[test]
    fn arguments_win_over_the_policy() {
        let p = policy(
            "p",
            ".*",
            "all",
            0,
            json!({"max-length": 5, "message-ttl": 100, "dead-letter-exchange": "dlx", "ha-mode": "all"}),
        );
        let mut args = FieldTable::default();
        args.insert("x-max-length".into(), AMQPValue::LongInt(9));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("own".into()),
        );
        let eff = effective_arguments(&args, Some(&p), None);
        let m = eff.inner();
        // Limits: the lower wins; the dead-letter exchange: the argument wins.
        assert_eq!(m.get("x-max-length"), Some(&AMQPValue::LongLongInt(5)));
        assert_eq!(
            m.get("x-dead-letter-exchange"),
            Some(&AMQPValue::LongString("own".into()))
        );
        args.insert("x-max-length".into(), AMQPValue::LongInt(3));
        let eff = effective_arguments(&args, Some(&p), None);
        assert_eq!(
            eff.inner().get("x-max-length"),
            Some(&AMQPValue::LongInt(3))
        );
        let m = eff.inner();
        assert_eq!(m.get("x-message-ttl"), Some(&AMQPValue::LongLongInt(100)));
        assert_eq!(m.len(), 3, "ignored keys add nothing");
    }

    #[test]
    fn bad_definitions_are_refused_with_a_reason() {
        let bad = |def: Value| {
            let Value::Object(def) = def else { panic!() };
            Policy::new("p", ".*", "all", 0, def).unwrap_err()
        };
        // RabbitMQ 3.10's reasons (it escapes < and > as HTML entities; Warren does not).
        assert_eq!(bad(json!({})), "Validation failed\n\nno policy provided\n");
        assert_eq!(
            bad(json!({"max-lenght": 1, "foo": "x"})),
            "Validation failed\n\n[{<<\"foo\">>,<<\"x\">>},{<<\"max-lenght\">>,1}] are not recognised policy settings\n"
        );
        let mut deep = json!(1);
        for _ in 0..33 {
            deep = json!([deep]);
        }
        assert_eq!(
            bad(json!({ "ha-params": deep })),
            "Validation failed\n\n<<\"ha-params\">> nests lists and objects deeper than 32 levels\n"
        );
        assert_eq!(
            bad(json!({"message-ttl": -1})),
            "Validation failed\n\n-1 is not a valid message TTL\n"
        );
        assert_eq!(
            bad(json!({"expires": 0})),
            "Validation failed\n\n0 is not a valid queue expiry\n"
        );
        assert_eq!(
            bad(json!({"max-length-bytes": "x"})),
            "Validation failed\n\n<<\"x\">> is not a valid maximum length in bytes\n"
        );
        assert_eq!(
            bad(json!({"overflow": "sideways"})),
            "Validation failed\n\n<<\"sideways\">> is not a valid overflow value\n"
        );
        assert_eq!(
            bad(json!({"dead-letter-exchange": 5})),
            "Validation failed\n\n5 is not a valid dead letter exchange name\n"
        );
        let Value::Object(def) = json!({"max-length": 1}) else {
            panic!()
        };
        assert!(Policy::new("p", "(", "all", 0, def.clone()).is_err());
        assert!(Policy::new("p", ".*", "everything", 0, def).is_err());
    }
}
