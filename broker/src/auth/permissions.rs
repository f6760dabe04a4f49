//! Per-vhost permissions, as RabbitMQ has them: three regular expressions per user and vhost,
//! matched against resource names for *configure* (declare, delete), *write* (publish, bind
//! to) and *read* (consume, get, purge, bind from) operations. The empty pattern grants
//! nothing. The default exchange is checked under the name `amq.default`.

use regex::Regex;
use std::fmt;

/// One of the three permission patterns.
#[derive(Clone)]
pub struct Pattern {
    source: String,
    regex: Option<Regex>,
}

impl Pattern {
    /// Compiles a pattern; an invalid regular expression is refused with its reason.
    pub fn new(source: &str) -> Result<Self, String> {
        let regex = if source.is_empty() {
            None
        } else {
            Some(Regex::new(source).map_err(|e| e.to_string())?)
        };
        Ok(Self {
            source: source.to_owned(),
            regex,
        })
    }

    /// Everything (`.*`).
    pub fn all() -> Self {
        Self::new(".*").expect("a valid pattern")
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether `name` matches (anywhere, as Erlang's `re:run` does; anchor with `^...$`).
    pub fn allows(&self, name: &str) -> bool {
        self.regex.as_ref().is_some_and(|r| r.is_match(name))
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

/// What an operation needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Configure,
    Write,
    Read,
}

/// A user's permissions in one vhost.
#[derive(Debug, Clone, PartialEq)]
pub struct Permission {
    pub configure: Pattern,
    pub write: Pattern,
    pub read: Pattern,
}

impl Permission {
    /// Full access (what the default user gets on the default vhost).
    pub fn all() -> Self {
        Self {
            configure: Pattern::all(),
            write: Pattern::all(),
            read: Pattern::all(),
        }
    }

    pub fn new(configure: &str, write: &str, read: &str) -> Result<Self, String> {
        Ok(Self {
            configure: Pattern::new(configure)?,
            write: Pattern::new(write)?,
            read: Pattern::new(read)?,
        })
    }

    pub fn allows(&self, access: Access, name: &str) -> bool {
        let pattern = match access {
            Access::Configure => &self.configure,
            Access::Write => &self.write,
            Access::Read => &self.read,
        };
        pattern.allows(name)
    }
}

/// The name a resource is checked under: the default exchange is `amq.default`.
pub fn checked_name<'a>(kind: &str, name: &'a str) -> &'a str {
    if kind == "exchange" && name.is_empty() {
        "amq.default"
    } else {
        name
    }
}

/// What declaring a queue needs beyond configure on it, in the order RabbitMQ checks it: a
/// new queue that names a dead-letter exchange needs read on itself and write on that
/// exchange, since its dead letters are published there on the declaring user's behalf.
/// Shared by AMQP and HTTP declarations, so neither lets a queue bypass the other's check.
pub fn dead_letter_checks(
    queue: &str,
    exists: bool,
    arguments: &amq_protocol::types::FieldTable,
) -> Vec<(&'static str, String, Access)> {
    use amq_protocol::types::AMQPValue;
    let dlx = match arguments.inner().get("x-dead-letter-exchange") {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(AMQPValue::ShortString(s)) => s.as_str().to_owned(),
        _ => return Vec::new(),
    };
    if exists {
        return Vec::new();
    }
    vec![
        ("queue", queue.to_owned(), Access::Read),
        ("exchange", dlx, Access::Write),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_anywhere_and_the_empty_one_matches_nothing() {
        let p = Permission::new("^app\\.", "", ".*").unwrap();
        assert!(p.allows(Access::Configure, "app.orders"));
        assert!(!p.allows(Access::Configure, "other.app.orders"));
        assert!(!p.allows(Access::Write, "anything"));
        assert!(!p.allows(Access::Write, ""));
        assert!(p.allows(Access::Read, ""));
        let unanchored = Pattern::new("orders").unwrap();
        assert!(unanchored.allows("my-orders-queue"));
    }

    #[test]
    fn invalid_patterns_are_refused() {
        assert!(Pattern::new("(").is_err());
    }

    #[test]
    fn the_default_exchange_is_checked_as_amq_default() {
        assert_eq!(checked_name("exchange", ""), "amq.default");
        assert_eq!(checked_name("queue", ""), "");
        assert_eq!(checked_name("exchange", "x"), "x");
    }
}
