//! Errors as data: a reply code, its text, the method that caused it, whether it closes the
//! channel or the whole connection, and its cause. The connection turns one into a close frame;
//! the management API into a status and a JSON reason.

use std::fmt;

pub const REPLY_SUCCESS: u16 = 200;
pub const CONTENT_TOO_LARGE: u16 = 311;
pub const NO_ROUTE: u16 = 312;
pub const NO_CONSUMERS: u16 = 313;
pub const CONNECTION_FORCED: u16 = 320;
pub const INVALID_PATH: u16 = 402;
pub const ACCESS_REFUSED: u16 = 403;
pub const NOT_FOUND: u16 = 404;
pub const RESOURCE_LOCKED: u16 = 405;
pub const PRECONDITION_FAILED: u16 = 406;
pub const FRAME_ERROR: u16 = 501;
pub const SYNTAX_ERROR: u16 = 502;
pub const COMMAND_INVALID: u16 = 503;
pub const CHANNEL_ERROR: u16 = 504;
pub const UNEXPECTED_FRAME: u16 = 505;
pub const RESOURCE_ERROR: u16 = 506;
pub const NOT_ALLOWED: u16 = 530;
pub const NOT_IMPLEMENTED: u16 = 540;
pub const INTERNAL_ERROR: u16 = 541;

/// The spec's name for a reply code, which RabbitMQ puts in front of every reply text.
pub fn reply_name(code: u16) -> &'static str {
    match code {
        REPLY_SUCCESS => "REPLY_SUCCESS",
        CONTENT_TOO_LARGE => "CONTENT_TOO_LARGE",
        NO_ROUTE => "NO_ROUTE",
        NO_CONSUMERS => "NO_CONSUMERS",
        CONNECTION_FORCED => "CONNECTION_FORCED",
        INVALID_PATH => "INVALID_PATH",
        ACCESS_REFUSED => "ACCESS_REFUSED",
        NOT_FOUND => "NOT_FOUND",
        RESOURCE_LOCKED => "RESOURCE_LOCKED",
        PRECONDITION_FAILED => "PRECONDITION_FAILED",
        FRAME_ERROR => "FRAME_ERROR",
        SYNTAX_ERROR => "SYNTAX_ERROR",
        COMMAND_INVALID => "COMMAND_INVALID",
        CHANNEL_ERROR => "CHANNEL_ERROR",
        UNEXPECTED_FRAME => "UNEXPECTED_FRAME",
        RESOURCE_ERROR => "RESOURCE_ERROR",
        NOT_ALLOWED => "NOT_ALLOWED",
        NOT_IMPLEMENTED => "NOT_IMPLEMENTED",
        INTERNAL_ERROR => "INTERNAL_ERROR",
        _ => "UNKNOWN",
    }
}

/// Whether an error ends a channel or the whole connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Channel,
    Connection,
}

/// Why something was not done. The protocol's own refusals (a missing queue, an inequivalent
/// declaration, a denied permission) say what is wrong with the request; the other causes say
/// that the broker could not answer it now (a node or a majority out of reach, another node
/// leading, no answer in time), so the same request may succeed later or elsewhere. The edges
/// choose their replies by cause: AMQP keeps the code, HTTP answers 503 for these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Cause {
    /// The request itself is refused, with the code saying why.
    #[default]
    Refused,
    /// What the request needs is out of reach: the node holding a queue is down, or no
    /// majority of the cluster can be reached to agree on a change.
    Unavailable,
    /// Another node leads what the request changes, and the request could not be handed to it.
    NotLeader,
    /// No answer came in time; the change may or may not have been made.
    TimedOut,
}

/// A protocol error, ready to become a `channel.close` or `connection.close`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpError {
    pub code: u16,
    /// The explanation, without the `NAME - ` prefix that [`AmqpError::reply_text`] adds.
    pub text: String,
    pub class_id: u16,
    pub method_id: u16,
    pub scope: Scope,
    /// The channel the error happened on (0 for the connection itself).
    pub channel: u16,
    pub cause: Cause,
}

impl AmqpError {
    /// An error whose scope follows from its code: the spec's "soft" codes (3xx and 403-406)
    /// close the channel, the "hard" ones close the connection.
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        let scope = match code {
            CONTENT_TOO_LARGE | NO_ROUTE | NO_CONSUMERS | ACCESS_REFUSED | NOT_FOUND
            | RESOURCE_LOCKED | PRECONDITION_FAILED => Scope::Channel,
            _ => Scope::Connection,
        };
        Self {
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
            scope,
            channel: 0,
            cause: Cause::Refused,
        }
    }

    /// A queue whose home node is down or out of reach, in RabbitMQ's words: the channel is
    /// closed with 404, and the queue is there again once its node is.
    pub fn queue_down(vhost: &str, queue: &str, node: &str) -> Self {
        Self {
            cause: Cause::Unavailable,
            ..Self::new(
                NOT_FOUND,
                format!(
                    "home node '{node}' of durable queue '{queue}' in vhost '{vhost}' is down or inaccessible"
                ),
            )
        }
    }

    /// A change that needs a majority of the cluster while none is reachable. As RabbitMQ
    /// answers a declaration its cluster cannot complete, the connection is closed with 541,
    /// which sends clients to reconnect, through a load balancer to a node that can serve them.
    pub fn no_majority(what: &str) -> Self {
        Self {
            cause: Cause::Unavailable,
            ..Self::new(
                INTERNAL_ERROR,
                format!("cannot {what}: no majority of the cluster is reachable"),
            )
        }
    }

    /// A change that only the leader of what it changes can make, when it could not be
    /// handed to the leader (`None`: no leader is known).
    pub fn not_leader(what: &str, leader: Option<&str>) -> Self {
        let text = match leader {
            Some(node) => format!("cannot {what}: node '{node}' leads it and cannot be reached"),
            None => format!("cannot {what}: no leader is known"),
        };
        Self {
            cause: Cause::NotLeader,
            ..Self::new(INTERNAL_ERROR, text)
        }
    }

    /// A request with no answer in time: the change may or may not have been made, so the
    /// connection is closed with 541 rather than the request reported done or refused.
    pub fn timed_out(what: &str) -> Self {
        Self {
            cause: Cause::TimedOut,
            ..Self::new(INTERNAL_ERROR, format!("cannot {what}: timed out"))
        }
    }

    /// Whether the request may succeed later or on another node (the broker, not the
    /// request, stood in the way).
    pub fn is_transient(&self) -> bool {
        self.cause != Cause::Refused
    }

    /// Records the channel the error happened on.
    pub fn in_channel(mut self, channel: u16) -> Self {
        self.channel = channel;
        self
    }

    /// Records which method the error answers (the close frame's class and method ids).
    pub fn on(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 && self.method_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }

    /// Forces the error to close the connection, whatever its code.
    pub fn connection_level(mut self) -> Self {
        self.scope = Scope::Connection;
        self
    }

    /// The text as RabbitMQ sends it: `NOT_FOUND - no queue 'q' in vhost '/'`; a text longer
    /// than a short string can hold is cut to 252 bytes followed by `...`, as RabbitMQ does.
    pub fn reply_text(&self) -> String {
        let mut text = format!("{} - {}", reply_name(self.code), self.text);
        if text.len() > 255 {
            let mut cut = 252;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("...");
        }
        text
    }
}

impl fmt::Display for AmqpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.reply_text())
    }
}

impl std::error::Error for AmqpError {}

pub type AmqpResult<T> = Result<T, AmqpError>;

pub fn not_found(text: impl Into<String>) -> AmqpError {
    AmqpError::new(NOT_FOUND, text)
}

pub fn precondition_failed(text: impl Into<String>) -> AmqpError {
    AmqpError::new(PRECONDITION_FAILED, text)
}

pub fn access_refused(text: impl Into<String>) -> AmqpError {
    AmqpError::new(ACCESS_REFUSED, text)
}

pub fn resource_locked(text: impl Into<String>) -> AmqpError {
    AmqpError::new(RESOURCE_LOCKED, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_codes_close_the_channel_and_hard_codes_the_connection() {
        assert_eq!(AmqpError::new(NOT_FOUND, "x").scope, Scope::Channel);
        assert_eq!(
            AmqpError::new(PRECONDITION_FAILED, "x").scope,
            Scope::Channel
        );
        assert_eq!(AmqpError::new(FRAME_ERROR, "x").scope, Scope::Connection);
        assert_eq!(
            AmqpError::new(NOT_IMPLEMENTED, "x").scope,
            Scope::Connection
        );
    }

    #[test]
    fn cluster_causes_keep_rabbitmq_codes_and_say_they_are_transient() {
        let down = AmqpError::queue_down("/", "q", "warren@n1");
        assert_eq!((down.code, down.scope), (NOT_FOUND, Scope::Channel));
        assert_eq!(
            down.reply_text(),
            "NOT_FOUND - home node 'warren@n1' of durable queue 'q' in vhost '/' is down or inaccessible"
        );
        for e in [
            AmqpError::no_majority("declare queue 'q' in vhost '/'"),
            AmqpError::not_leader("declare queue 'q' in vhost '/'", Some("warren@n2")),
            AmqpError::not_leader("declare queue 'q' in vhost '/'", None),
            AmqpError::timed_out("declare queue 'q' in vhost '/'"),
        ] {
            assert_eq!(
                (e.code, e.scope),
                (INTERNAL_ERROR, Scope::Connection),
                "{e}"
            );
            assert!(e.is_transient(), "{e}");
            assert!(e.text.contains("queue 'q'"), "{e}");
        }
        assert_eq!(
            AmqpError::not_leader("x", Some("warren@n2")).cause,
            Cause::NotLeader
        );
        assert_eq!(AmqpError::timed_out("x").cause, Cause::TimedOut);
        assert!(!AmqpError::new(NOT_FOUND, "no queue").is_transient());
        // Context added at the edge keeps the cause.
        let e = AmqpError::timed_out("x").in_channel(3).on(50, 10);
        assert_eq!(e.cause, Cause::TimedOut);
    }

    #[test]
    fn reply_text_is_prefixed_and_fits_a_short_string() {
        let e = AmqpError::new(NOT_FOUND, "no queue 'q' in vhost '/'");
        assert_eq!(e.reply_text(), "NOT_FOUND - no queue 'q' in vhost '/'");
        let long = AmqpError::new(NOT_FOUND, "y".repeat(300));
        assert_eq!(long.reply_text().len(), 255);
        assert!(long.reply_text().ends_with("yyy..."));
        let multibyte = AmqpError::new(NOT_FOUND, "é".repeat(300));
        assert!(multibyte.reply_text().len() <= 255);
    }
}
