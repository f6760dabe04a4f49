//! A published message as the broker keeps it: one allocation shared by every queue it is routed
//! to, with the body and the encoded properties as `Bytes` straight from the publisher's frames.

use bytes::Bytes;
use std::borrow::{Borrow, Cow};
use std::fmt;

/// An AMQP short string kept as bytes: routing keys and exchange names taken from the wire
/// without copying. AMQP does not require them to be UTF-8, so neither do we.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShortStr(Bytes);

impl ShortStr {
    pub const fn from_static(s: &'static str) -> Self {
        Self(Bytes::from_static(s.as_bytes()))
    }

    pub fn from_bytes(bytes: Bytes) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The text, with any invalid UTF-8 replaced (for messages and logs).
    pub fn to_str_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }

    /// The text if it is valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl From<&str> for ShortStr {
    fn from(s: &str) -> Self {
        Self(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for ShortStr {
    fn from(s: String) -> Self {
        Self(Bytes::from(s.into_bytes()))
    }
}

impl Borrow<[u8]> for ShortStr {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.to_str_lossy())
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_str_lossy())
    }
}

/// A message as routed to queues. Cheap to share: queues hold `Arc<Message>`.
#[derive(Debug, Clone)]
pub struct Message {
    /// The exchange it was published to.
    pub exchange: ShortStr,
    pub routing_key: ShortStr,
    /// Property flags and list, exactly as they go in a content header frame.
    pub properties: Bytes,
    pub body: Bytes,
    /// `delivery_mode == 2`.
    pub persistent: bool,
    /// When the broker took it, in milliseconds since the Unix epoch: TTLs count from here
    /// (0 when unknown, for a message stored before Warren recorded it).
    pub arrived_ms: u64,
    /// When its `expiration` property makes it expire, in milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Message {
    /// Bytes this message costs beyond its bookkeeping: what flow control counts.
    pub fn size(&self) -> usize {
        self.body.len() + self.properties.len()
    }

    /// The message enters its queues at `now` rather than when it arrived (a transaction's
    /// commit): its TTLs, the queue's and its own `expiration`, count from `now`, as in
    /// RabbitMQ, where they count from when a queue takes the message.
    pub fn enters_at(&mut self, now: u64) {
        if let Some(expires) = self.expires_at_ms {
            self.expires_at_ms = Some(expires + now.saturating_sub(self.arrived_ms));
        }
        self.arrived_ms = self.arrived_ms.max(now);
    }
}
