//! Publishing on a channel: content assembly (method, header, body frames), the checks RabbitMQ
//! makes on a message, routing, mandatory returns, publisher confirms and transactions.
//!
//! The body of a message that arrives in one frame is that frame's buffer, not a copy; a body
//! split over several frames is joined once. The message's properties are passed on as the
//! publisher encoded them, and re-encoded only when the broker must change them (BCC removed,
//! direct reply-to address filled in).

use super::channel::{Channel, Confirms, ContentState, Session, Transaction, TxPublish};
use super::codec::{self, ContentHeader, PublishArgs};
use super::writer::Outbound;
use crate::auth::Access;
use crate::broker::exchange::Exchange;
use crate::broker::message::{Message, ShortStr, now_ms};
use crate::broker::stats::MessageStats;
use crate::broker::vhost::{Origin, PublishOutcome, REPLY_TO, describe};
use crate::error::{
    AmqpError, AmqpResult, FRAME_ERROR, NO_ROUTE, NOT_IMPLEMENTED, UNEXPECTED_FRAME,
    access_refused, not_found, precondition_failed,
};
use crate::store::durability::{Progress, Ticket};
use amq_protocol::protocol::{AMQPClass, tx};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;

const PUBLISH: (u16, u16) = (60, 40);

impl Confirms {
    /// Whether confirms are left unsent, waiting for their tickets. Not judged at a progress:
    /// a forwarded copy settles by itself at any moment, and a channel that stopped waiting
    /// because its ticket settled just after a flush would never be flushed again.
    pub fn waits_for_durability(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Sends every confirm that is settled at `progress`: runs of acks as one `multiple` ack,
    /// nacks one by one in their place.
    fn flush(&mut self, progress: Progress, channel: u16, send: &mut impl FnMut(Outbound)) {
        let mut ack_upto = None;
        while let Some(&(seq, ticket, nack)) = self.waiting.front() {
            if !ticket.is_done(progress) {
                break;
            }
            self.waiting.pop_front();
            // A copy forwarded to another node that refused or lost it is nacked.
            if nack || ticket.failed() {
                if let Some(upto) = ack_upto.take() {
                    self.send_ack(upto, channel, send);
                }
                send(Outbound::Nack {
                    channel,
                    delivery_tag: seq,
                    multiple: false,
                });
                self.sent_upto = seq;
            } else {
                ack_upto = Some(seq);
            }
        }
        if let Some(upto) = ack_upto {
            self.send_ack(upto, channel, send);
        }
    }

    fn send_ack(&mut self, upto: u64, channel: u16, send: &mut impl FnMut(Outbound)) {
        send(Outbound::Ack {
            channel,
            delivery_tag: upto,
            multiple: upto - self.sent_upto > 1,
        });
        self.sent_upto = upto;
    }
}

/// Bodies up to this size are copied out of the read buffer they arrived in.
const DETACH_BELOW: usize = 64 * 1024;

/// Copies a small message's properties and body into one allocation of its own. Frames are
/// cut from the connection's read buffer without copying, and a message kept in a queue would
/// otherwise keep that whole buffer alive; a large body is most of its buffer anyway.
fn detach(properties: Bytes, body: Bytes) -> (Bytes, Bytes) {
    if body.len() > DETACH_BELOW {
        return (Bytes::copy_from_slice(&properties), body);
    }
    let mut both = BytesMut::with_capacity(properties.len() + body.len());
    both.extend_from_slice(&properties);
    both.extend_from_slice(&body);
    let both = both.freeze();
    let at = properties.len();
    (both.slice(..at), both.slice(at..))
}

/// RabbitMQ's check of the `expiration` property: a non-negative integer of milliseconds.
fn check_expiration(text: &str) -> AmqpResult<u64> {
    let reason = match text.parse::<i64>() {
        Err(_) => "no_integer".to_owned(),
        Ok(n) if n < 0 => format!("{{value_negative,{n}}}"),
        Ok(n) if n > i64::from(u32::MAX) => format!("{{value_too_large,{n},{}}}", u32::MAX),
        Ok(n) => return Ok(n.unsigned_abs()),
    };
    Err(precondition_failed(format!(
        "invalid expiration '{text}': {reason}"
    )))
}

/// RabbitMQ's sender-selected distribution: the routing keys a message's `CC` and `BCC`
/// headers add, appended to `keys` (entries that are not strings are ignored); whether it has
/// a `BCC` header, which is taken out before the message is delivered. A `CC` or `BCC` that
/// is not an array makes the message invalid: the reason is RabbitMQ's.
pub fn cc_bcc_keys(headers: &FieldTable, keys: &mut Vec<Bytes>) -> Result<bool, String> {
    for name in ["CC", "BCC"] {
        match headers.inner().get(name) {
            None => {}
            Some(AMQPValue::FieldArray(routes)) => {
                for r in routes.as_slice() {
                    if let AMQPValue::LongString(k) = r {
                        keys.push(Bytes::copy_from_slice(k.as_bytes()));
                    }
                }
            }
            Some(other) => {
                return Err(format!(
                    "invalid message: {{unacceptable_type_in_header,\"{name}\",{}}}",
                    crate::broker::headers::type_name(other)
                ));
            }
        }
    }
    Ok(headers.inner().contains_key("BCC"))
}

/// The headers without `BCC`, as the message is delivered.
pub fn without_bcc(headers: &FieldTable) -> FieldTable {
    let mut kept = FieldTable::default();
    for (k, v) in headers.inner() {
        if k.as_str() != "BCC" {
            kept.insert(k.clone(), v.clone());
        }
    }
    kept
}

fn unexpected(text: impl Into<String>) -> AmqpError {
    AmqpError::new(UNEXPECTED_FRAME, text)
}

impl Channel {
    /// Whether a method frame may arrive now (not in the middle of a message's content).
    pub fn expect_method(&self) -> AmqpResult<()> {
        match &self.content {
            ContentState::Idle => Ok(()),
            ContentState::Header(_) => Err(unexpected(
                "expected content header for class 60, got non content header frame instead",
            )
            .on(PUBLISH.0, PUBLISH.1)),
            ContentState::Body { .. } => Err(unexpected(
                "expected content body, got non content body frame instead",
            )
            .on(PUBLISH.0, PUBLISH.1)),
        }
    }

    pub fn on_publish(&mut self, args: PublishArgs) -> AmqpResult<()> {
        self.expect_method()?;
        if args.immediate {
            return Err(AmqpError::new(NOT_IMPLEMENTED, "immediate=true").on(PUBLISH.0, PUBLISH.1));
        }
        self.content = ContentState::Header(args);
        Ok(())
    }

    pub fn on_header(&mut self, s: &mut Session, payload: Bytes) -> AmqpResult<()> {
        let args = match std::mem::take(&mut self.content) {
            ContentState::Header(args) => args,
            ContentState::Idle => {
                return Err(unexpected(
                    "expected method frame, got non method frame instead",
                ));
            }
            ContentState::Body { .. } => {
                return Err(unexpected(
                    "expected content body, got non content body frame instead",
                )
                .on(PUBLISH.0, PUBLISH.1));
            }
        };
        let header = codec::decode_content_header(&payload).ok_or_else(|| {
            AmqpError::new(FRAME_ERROR, "malformed content header frame").on(PUBLISH.0, PUBLISH.1)
        })?;
        if header.weight != 0 {
            // A non-zero weight: RabbitMQ does not see a content header at all.
            return Err(unexpected(
                "expected content header for class 60, got non content header frame instead",
            )
            .on(PUBLISH.0, PUBLISH.1));
        }
        if header.class_id != PUBLISH.0 {
            return Err(unexpected(format!(
                "expected content header for class 60, got one for class {} instead",
                header.class_id
            ))
            .on(PUBLISH.0, PUBLISH.1));
        }
        let max = s.broker.config.max_message_size;
        if header.body_size > max {
            // Refused from the header, before any of the body is buffered. The body frames
            // that follow are skipped by the closing channel.
            return Err(precondition_failed(format!(
                "message size {} is larger than configured max size {}",
                header.body_size, max
            ))
            .on(PUBLISH.0, PUBLISH.1));
        }
        if header.body_size == 0 {
            return self.publish(s, args, header, Bytes::new());
        }
        self.content = ContentState::Body {
            args,
            remaining: header.body_size,
            header,
            joined: None,
        };
        Ok(())
    }

    pub fn on_body(&mut self, s: &mut Session, payload: Bytes) -> AmqpResult<()> {
        let ContentState::Body {
            remaining,
            joined,
            header,
            ..
        } = &mut self.content
        else {
            return Err(match self.content {
                ContentState::Header(_) => unexpected(
                    "expected content header for class 60, got non content header frame instead",
                )
                .on(PUBLISH.0, PUBLISH.1),
                _ => unexpected("expected method frame, got non method frame instead"),
            });
        };
        let len = payload.len() as u64;
        if len > *remaining {
            return Err(AmqpError::new(
                FRAME_ERROR,
                format!(
                    "content body frame of {len} bytes exceeds the {} bytes left of the declared body size",
                    *remaining
                ),
            )
            .on(PUBLISH.0, PUBLISH.1));
        }
        *remaining -= len;
        let body = if *remaining == 0 && joined.is_none() {
            // The whole body in one frame: keep the frame's buffer.
            payload
        } else {
            let buf = joined.get_or_insert_with(|| {
                BytesMut::with_capacity(header.body_size.min(1 << 20) as usize)
            });
            buf.extend_from_slice(&payload);
            if *remaining > 0 {
                return Ok(());
            }
            buf.split().freeze()
        };
        let ContentState::Body { args, header, .. } = std::mem::take(&mut self.content) else {
            unreachable!("matched above")
        };
        self.publish(s, args, header, body)
    }

    /// A whole message has arrived: check it, route it, and settle its confirm.
    fn publish(
        &mut self,
        s: &mut Session,
        args: PublishArgs,
        header: ContentHeader,
        body: Bytes,
    ) -> AmqpResult<()> {
        let seq = self.confirms.as_mut().map(|c| {
            c.last_seq += 1;
            c.last_seq
        });
        self.publish_checked(s, args, header, body, seq)
            .map_err(|e| e.on(PUBLISH.0, PUBLISH.1))
    }

    fn publish_checked(
        &mut self,
        s: &mut Session,
        args: PublishArgs,
        header: ContentHeader,
        body: Bytes,
        seq: Option<u64>,
    ) -> AmqpResult<()> {
        if !s.vhost.throttle.publish.allow() {
            return Err(crate::broker::vhost::too_many_requests());
        }
        let exchange = self.exchange_for(s, &args.exchange)?;
        if exchange.spec.internal {
            return Err(access_refused(format!(
                "cannot publish to internal {}",
                describe("exchange", exchange.name(), &s.vhost.name)
            )));
        }
        let malformed = || AmqpError::new(FRAME_ERROR, "malformed content header frame");
        let mut headers = header.headers().map_err(|_| malformed())?;
        let mut reply_to = None;
        if header.bytes(&header.scan.reply_to) == Some(REPLY_TO.as_bytes()) {
            let Some((key, _)) = &self.reply_to else {
                return Err(precondition_failed("fast reply consumer does not exist"));
            };
            reply_to = Some(format!("{REPLY_TO}.{key}"));
        }
        if let Some(user_id) = header.bytes(&header.scan.user_id)
            && user_id != s.user.as_bytes()
        {
            return Err(precondition_failed(format!(
                "user_id property set to '{}' but authenticated user was '{}'",
                String::from_utf8_lossy(user_id),
                s.user
            )));
        }
        let arrived_ms = now_ms();
        let expires_at_ms = match header.bytes(&header.scan.expiration) {
            Some(expiration) => {
                Some(arrived_ms + check_expiration(&String::from_utf8_lossy(expiration))?)
            }
            None => None,
        };
        // CC and BCC add routing keys; most messages have none, and then nothing is allocated.
        let mut extra_keys: Vec<Bytes> = Vec::new();
        let mut strip_bcc = false;
        if let Some(h) = &headers {
            strip_bcc = cc_bcc_keys(h, &mut extra_keys).map_err(precondition_failed)?;
        }
        if let Some(mode) = header.scan.delivery_mode
            && !matches!(mode, 1 | 2)
        {
            return Err(precondition_failed(format!(
                "invalid message: {{delivery_mode_unknown,{mode}}}"
            )));
        }
        let persistent = header.scan.delivery_mode == Some(2);
        let raw = if reply_to.is_some() || strip_bcc {
            // The rare publish whose properties the broker changes: decode, edit, encode.
            let mut props = header.properties().ok_or_else(malformed)?;
            if let Some(r) = reply_to {
                props = props.with_reply_to(r.into());
            }
            if strip_bcc && let Some(h) = headers.as_mut() {
                *h = without_bcc(h);
                props = props.with_headers(h.clone());
            }
            codec::encode_properties(&props)
        } else {
            header.raw_properties
        };
        let (properties, body) = detach(raw, body);
        let routing_key = args.routing_key;
        let message = Arc::new(Message {
            exchange: ShortStr::from_bytes(args.exchange),
            routing_key: ShortStr::from_bytes(routing_key.clone()),
            properties,
            body,
            persistent,
            arrived_ms,
            expires_at_ms,
        });
        if let Some(tx) = &mut self.tx {
            let mut keys = vec![routing_key];
            keys.extend(extra_keys);
            self.shared
                .mirror
                .uncommitted
                .fetch_add(1, Ordering::Relaxed);
            tx.publishes.push(TxPublish {
                exchange,
                keys,
                headers,
                mandatory: args.mandatory,
                message,
            });
            return Ok(());
        }
        let outcome = if extra_keys.is_empty() {
            let keys = [&routing_key[..]];
            self.route(
                s,
                &exchange,
                &keys,
                headers.as_ref(),
                args.mandatory,
                message,
            )
        } else {
            let mut keys: Vec<&[u8]> = vec![&routing_key[..]];
            keys.extend(extra_keys.iter().map(|k| &k[..]));
            self.route(
                s,
                &exchange,
                &keys,
                headers.as_ref(),
                args.mandatory,
                message,
            )
        };
        let nacked = outcome.nacked();
        if !outcome.backlogged.is_empty() {
            s.note_backlogged(outcome.backlogged);
        }
        if let (Some(c), Some(seq)) = (&mut self.confirms, seq) {
            c.waiting.push_back((seq, outcome.ticket, nacked));
            MessageStats::bump(&self.shared.stats.publish_confirm);
            self.shared
                .mirror
                .unconfirmed
                .store(c.waiting.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The exchange a publish names, with the last one looked up kept at hand: most channels
    /// publish to one exchange.
    /// The write permission is checked first, as RabbitMQ does (403 before 404); the cache
    /// holds the check until users or permissions change.
    fn exchange_for(&mut self, s: &Session, name: &Bytes) -> AmqpResult<Arc<Exchange>> {
        let generation = s.broker.users.generation();
        if let Some((cached, x, checked)) = &self.exchange_cache
            && cached == name
            && *checked == generation
            && !x.is_deleted()
        {
            return Ok(x.clone());
        }
        let text = String::from_utf8_lossy(name);
        s.check("exchange", &text, Access::Write)?;
        let Ok(text) = std::str::from_utf8(name) else {
            return Err(not_found(format!(
                "no {}",
                describe("exchange", &String::from_utf8_lossy(name), &s.vhost.name)
            )));
        };
        let x = s.vhost.existing_exchange(text)?;
        self.exchange_cache = Some((name.clone(), x.clone(), generation));
        Ok(x)
    }

    fn route(
        &mut self,
        s: &Session,
        exchange: &Arc<Exchange>,
        keys: &[&[u8]],
        headers: Option<&FieldTable>,
        mandatory: bool,
        message: Arc<Message>,
    ) -> PublishOutcome {
        let outcome = s.vhost.publish(
            exchange,
            keys,
            headers,
            &message,
            Origin::Publisher,
            &mut self.route_buf,
        );
        let routed = outcome.routed();
        let stats = &self.shared.stats;
        MessageStats::bump(&stats.publish);
        MessageStats::bump(if routed {
            &stats.routed
        } else if mandatory {
            &stats.return_unroutable
        } else {
            &stats.drop_unroutable
        });
        if !routed && mandatory {
            s.out.send(Outbound::Return {
                channel: self.id(),
                reply_code: NO_ROUTE,
                reply_text: "NO_ROUTE",
                message,
            });
        }
        outcome
    }

    /// Sends the confirms (and a transaction's commit-ok) that are settled at `progress`.
    pub fn flush_confirms(&mut self, s: &Session, progress: Progress) {
        let channel = self.id();
        if let Some(c) = &mut self.confirms {
            let before = c.waiting.len();
            c.flush(progress, channel, &mut |o| s.out.send(o));
            let sent = before - c.waiting.len();
            if sent > 0 {
                let m = &self.shared;
                m.stats.confirm.fetch_add(sent as u64, Ordering::Relaxed);
                m.mirror
                    .unconfirmed
                    .store(c.waiting.len() as u64, Ordering::Relaxed);
            }
        }
        while let Some(&ticket) = self.commits_waiting.front() {
            if !ticket.is_done(progress) {
                break;
            }
            self.commits_waiting.pop_front();
            s.out.method(
                channel,
                AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})),
            );
        }
    }

    /// Whether confirms or a commit-ok are left unsent on this channel, waiting for their
    /// tickets (see [`Confirms::waits_for_durability`]).
    pub fn waits_for_durability(&self) -> bool {
        self.confirms
            .as_ref()
            .is_some_and(Confirms::waits_for_durability)
            || !self.commits_waiting.is_empty()
    }

    /// Applies a transaction; returns the ticket done once its messages are safe, which
    /// `commit-ok` waits for.
    pub(super) fn commit(&mut self, s: &mut Session, tx: Transaction) -> Ticket {
        let mut ticket = Ticket::Done;
        let now = now_ms();
        for p in tx.publishes {
            let keys: Vec<&[u8]> = p.keys.iter().map(|k| &k[..]).collect();
            let mut message = p.message;
            // Its queues take it now: TTLs count from the commit.
            Arc::make_mut(&mut message).enters_at(now);
            let outcome = self.route(
                s,
                &p.exchange,
                &keys,
                p.headers.as_ref(),
                p.mandatory,
                message,
            );
            ticket = ticket.and(outcome.ticket);
            if !outcome.backlogged.is_empty() {
                s.note_backlogged(outcome.backlogged);
            }
        }
        for (how, taken) in tx.settles {
            self.apply_settle(how, taken, false);
        }
        ticket
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Publishes in confirm mode with these tickets (and nacks), as `publish_checked` does.
    fn confirms(publishes: &[(Ticket, bool)]) -> Confirms {
        let mut c = Confirms::default();
        for &(ticket, nack) in publishes {
            c.last_seq += 1;
            c.waiting.push_back((c.last_seq, ticket, nack));
        }
        c
    }

    /// The confirms sent at `progress`: ("ack" or "nack", delivery tag, multiple).
    fn flush(c: &mut Confirms, progress: Progress) -> Vec<(&'static str, u64, bool)> {
        let mut sent = Vec::new();
        c.flush(progress, 1, &mut |o| {
            sent.push(match o {
                Outbound::Ack {
                    delivery_tag,
                    multiple,
                    ..
                } => ("ack", delivery_tag, multiple),
                Outbound::Nack {
                    delivery_tag,
                    multiple,
                    ..
                } => ("nack", delivery_tag, multiple),
                other => panic!("not a confirm: {other:?}"),
            })
        });
        sent
    }

    #[test]
    fn a_later_publish_is_not_confirmed_before_an_earlier_one() {
        // The second and third are safe before the first.
        let mut c = confirms(&[
            (Ticket::flushed(5), false),
            (Ticket::Done, false),
            (Ticket::flushed(3), false),
        ]);
        assert!(c.waits_for_durability());
        assert_eq!(flush(&mut c, Progress::flushed(3)), []);
        assert_eq!(flush(&mut c, Progress::flushed(4)), []);
        // All three at once, as one ack with `multiple`.
        assert_eq!(flush(&mut c, Progress::flushed(5)), [("ack", 3, true)]);
        assert!(!c.waits_for_durability());
        assert_eq!(flush(&mut c, Progress::ALL), []);
    }

    #[test]
    fn acks_coalesce_and_nacks_go_out_in_their_place() {
        let mut c = confirms(&[
            (Ticket::Done, false),
            (Ticket::Done, false),
            (Ticket::flushed(2), true),
            (Ticket::Done, false),
            (Ticket::flushed(4), false),
            (Ticket::Done, true),
        ]);
        // The nack waits for its own ticket (other queues took it) and everything before.
        assert_eq!(flush(&mut c, Progress::flushed(1)), [("ack", 2, true)]);
        assert_eq!(
            flush(&mut c, Progress::flushed(2)),
            [("nack", 3, false), ("ack", 4, false)]
        );
        assert_eq!(
            flush(&mut c, Progress::flushed(4)),
            [("ack", 5, false), ("nack", 6, false)]
        );
        assert!(c.waiting.is_empty());
        assert_eq!(c.sent_upto, 6);
    }

    #[test]
    fn cc_and_bcc_add_routing_keys_and_bcc_is_taken_out() {
        use amq_protocol::types::{FieldArray, LongString};
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes()));
        let mut h = FieldTable::default();
        h.insert(
            "CC".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![text("a"), AMQPValue::LongInt(1)])),
        );
        h.insert("BCC".into(), AMQPValue::FieldArray(vec![text("b")].into()));
        h.insert("x".into(), text("y"));
        let mut keys = Vec::new();
        assert_eq!(cc_bcc_keys(&h, &mut keys), Ok(true));
        assert_eq!(keys, [Bytes::from("a"), Bytes::from("b")]);
        let kept = without_bcc(&h);
        assert!(!kept.inner().contains_key("BCC"));
        assert!(kept.inner().contains_key("CC") && kept.inner().contains_key("x"));

        let mut keys = Vec::new();
        assert_eq!(cc_bcc_keys(&FieldTable::default(), &mut keys), Ok(false));
        assert!(keys.is_empty());
        let mut bad = FieldTable::default();
        bad.insert("CC".into(), text("a"));
        assert_eq!(
            cc_bcc_keys(&bad, &mut keys),
            Err("invalid message: {unacceptable_type_in_header,\"CC\",longstr}".to_owned())
        );
    }

    #[test]
    fn a_run_of_acks_after_a_nack_counts_from_it() {
        let mut c = confirms(&[
            (Ticket::Done, true),
            (Ticket::flushed(7), false),
            (Ticket::flushed(7), false),
        ]);
        assert_eq!(flush(&mut c, Progress::flushed(6)), [("nack", 1, false)]);
        assert_eq!(flush(&mut c, Progress::flushed(7)), [("ack", 3, true)]);
    }
}
