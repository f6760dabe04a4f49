//! A channel as its connection's reader task drives it: method handlers for the exchange,
//! queue, basic, tx and confirm classes, with RabbitMQ's checks, reply codes and texts.
//! The publishing state a channel holds (content being assembled, confirms, a transaction) is
//! declared here; publishing itself (content assembly, routing, confirms, transactions) lives
//! in `publish.rs`, which builds on this file.

use super::codec::{ContentHeader, PublishArgs};
use super::delivery::{ChannelConsumer, ChannelShared, UnknownTag};
use super::writer::ConnectionOutput;
use crate::auth::Access;
use crate::auth::permissions::{checked_name, dead_letter_checks};
use crate::broker::Broker;
use crate::broker::exchange::{Exchange, ExchangeKind, ExchangeSpec};
use crate::broker::message::Message;
use crate::broker::queue::{ConsumeRefused, Consumer, Delivered, QueueSpec};
use crate::broker::queue_ref::QueueRef;
use crate::broker::stats::MessageStats;
use crate::broker::vhost::{
    DestinationKind, REPLY_TO, RouteScratch, Vhost, declare_counts, describe, home_down,
};
use crate::error::{
    AmqpError, AmqpResult, COMMAND_INVALID, NOT_ALLOWED, NOT_IMPLEMENTED, access_refused,
    not_found, precondition_failed,
};
use crate::store::durability::{Progress, Ticket};
use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, exchange, queue, tx};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// What channels need to know about their connection.
#[derive(Debug)]
pub struct Session {
    pub connection_id: u64,
    pub broker: Arc<Broker>,
    pub vhost: Arc<Vhost>,
    pub user: String,
    pub out: Arc<ConnectionOutput>,
    /// The client's `consumer_cancel_notify` capability.
    pub cancel_notify: bool,
    /// Exclusive queues declared on this connection, deleted when it closes.
    pub exclusive_queues: Vec<QueueRef>,
    /// Queues this connection published to whose backlog is on disk while consumers take
    /// from them: flow control looks at them before reading more from the client.
    pub flow: Vec<QueueRef>,
}

/// Most queues a connection remembers for flow control between two reads.
const FLOW_QUEUES: usize = 8;

impl Session {
    /// Remembers queues a publish found backlogged, for flow control.
    pub fn note_backlogged(&mut self, queues: Vec<QueueRef>) {
        for q in queues {
            if self.flow.len() < FLOW_QUEUES && !self.flow.contains(&q) {
                self.flow.push(q);
            }
        }
    }
}

impl Session {
    /// RabbitMQ's permission check: 403 `access to queue 'q' in vhost '/' refused for user
    /// 'u'` unless the user's pattern for `access` matches the resource.
    pub fn check(&self, kind: &str, name: &str, access: Access) -> AmqpResult<()> {
        let name = checked_name(kind, name);
        if self
            .broker
            .users
            .allowed(&self.user, &self.vhost.name, access, name)
        {
            return Ok(());
        }
        Err(access_refused(format!(
            "access to {kind} '{name}' in vhost '{}' refused for user '{}'",
            self.vhost.name, self.user
        )))
    }

    /// How far durability has got: which tickets are done.
    pub fn progress(&self) -> Progress {
        Progress::of(&self.broker.storage)
    }
}

/// RabbitMQ's server-generated names: a prefix and 16 random bytes in URL-safe base64.
pub fn generated_name(prefix: &str) -> String {
    let bytes: [u8; 16] = rand::random();
    format!("{prefix}-{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// How a settled delivery ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ack,
    Reject { requeue: bool },
}

/// Where the channel is in receiving a message's frames. One lives in each channel, so the
/// size of the `Body` variant costs nothing, while boxing it would cost an allocation per
/// message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Default)]
pub enum ContentState {
    #[default]
    Idle,
    /// `basic.publish` seen; the content header comes next.
    Header(PublishArgs),
    /// Header seen; body frames until `remaining` is zero.
    Body {
        args: PublishArgs,
        header: ContentHeader,
        /// Body frames joined, once there is more than one.
        joined: Option<BytesMut>,
        remaining: u64,
    },
}

/// Publisher confirm bookkeeping. A message is confirmed once it is routed and its durability
/// ticket is done (if it went to a durable queue as a persistent message, once the flush round
/// that covers it has synced it to disk). Confirms go out in publish order, as few
/// `basic.ack`s with `multiple` as possible: a message whose ticket is done waits for those
/// published before it.
#[derive(Debug, Default)]
pub struct Confirms {
    /// Sequence number of the last message published in confirm mode.
    pub(super) last_seq: u64,
    /// Published and not yet confirmed, in order: (sequence number, the ticket it waits for,
    /// whether it is nacked).
    pub(super) waiting: VecDeque<(u64, Ticket, bool)>,
    /// Every message up to this one has been acked or nacked to the client.
    pub(super) sent_upto: u64,
}

/// A message published inside a transaction, routed at commit.
#[derive(Debug)]
pub struct TxPublish {
    pub(super) exchange: Arc<Exchange>,
    pub(super) keys: Vec<Bytes>,
    pub(super) headers: Option<FieldTable>,
    pub(super) mandatory: bool,
    pub(super) message: Arc<Message>,
}

/// What a transaction holds until commit.
#[derive(Debug, Default)]
pub struct Transaction {
    pub(super) publishes: Vec<TxPublish>,
    pub settles: Vec<(Settle, Vec<(u64, Delivered)>)>,
}

pub struct Channel {
    pub shared: Arc<ChannelShared>,
    /// The broker sent `channel.close` and waits for `close-ok`; frames are ignored meanwhile.
    pub closing: bool,
    pub(super) content: ContentState,
    pub(super) confirms: Option<Confirms>,
    pub(super) tx: Option<Transaction>,
    /// `basic.qos` with global=false: the prefetch given to consumers created afterwards.
    consumer_prefetch: u32,
    /// The spec's "most recently declared queue", used when a queue name is left empty.
    last_queue: Option<String>,
    /// Direct reply-to: the key of this channel's reply consumer, and its hidden queue.
    pub(super) reply_to: Option<(String, QueueRef)>,
    /// Routing's buffers, kept so that a publish allocates nothing for routing.
    pub(super) route_buf: RouteScratch,
    /// Committed transactions whose `commit-ok` waits for these tickets.
    pub(super) commits_waiting: std::collections::VecDeque<Ticket>,
    /// The exchange last published to, by name, and the users generation its write
    /// permission was checked at.
    pub(super) exchange_cache: Option<(bytes::Bytes, Arc<crate::broker::exchange::Exchange>, u64)>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("id", &self.shared.id)
            .finish()
    }
}

/// The `x-dead-letter-exchange` argument, when it is text.
fn int_arg(args: &FieldTable, key: &str) -> Option<i64> {
    Some(match args.inner().get(key)? {
        AMQPValue::ShortShortInt(x) => (*x).into(),
        AMQPValue::ShortShortUInt(x) => (*x).into(),
        AMQPValue::ShortInt(x) => (*x).into(),
        AMQPValue::ShortUInt(x) => (*x).into(),
        AMQPValue::LongInt(x) => (*x).into(),
        AMQPValue::LongUInt(x) => (*x).into(),
        AMQPValue::LongLongInt(x) => *x,
        _ => return None,
    })
}

impl Channel {
    pub fn new(id: u16, session: &Session) -> Self {
        Self {
            shared: ChannelShared::new(id, session.out.clone(), session.cancel_notify),
            closing: false,
            content: ContentState::Idle,
            confirms: None,
            tx: None,
            consumer_prefetch: 0,
            last_queue: None,
            reply_to: None,
            route_buf: RouteScratch::default(),
            commits_waiting: std::collections::VecDeque::new(),
            exchange_cache: None,
        }
    }

    pub fn id(&self) -> u16 {
        self.shared.id
    }

    fn reply(&self, method: AMQPClass) {
        self.shared.out().method(self.id(), method);
    }

    /// Handles a method other than `basic.publish` (see `publish.rs`) and `channel.open`/
    /// `channel.close`, which the connection handles.
    pub fn handle_method(&mut self, s: &mut Session, method: AMQPClass) -> AmqpResult<()> {
        let ids = (method.get_amqp_class_id(), method.get_amqp_method_id());
        self.dispatch(s, method).map_err(|e| e.on(ids.0, ids.1))
    }

    fn dispatch(&mut self, s: &mut Session, method: AMQPClass) -> AmqpResult<()> {
        match method {
            AMQPClass::Channel(channel::AMQPMethod::Flow(m)) => {
                // RabbitMQ never pauses deliveries for a client: `active=false` closes the
                // connection with 540, and clients (and their test suites) expect that.
                if !m.active {
                    return Err(AmqpError::new(NOT_IMPLEMENTED, "active=false"));
                }
                self.reply(AMQPClass::Channel(channel::AMQPMethod::FlowOk(
                    channel::FlowOk { active: true },
                )));
                Ok(())
            }
            AMQPClass::Exchange(m) => self.exchange_method(s, m),
            AMQPClass::Queue(m) => self.queue_method(s, m),
            AMQPClass::Basic(m) => self.basic_method(s, m),
            AMQPClass::Tx(m) => self.tx_method(s, m),
            AMQPClass::Confirm(confirm::AMQPMethod::Select(m)) => {
                if self.tx.is_some() {
                    return Err(precondition_failed("cannot switch from tx to confirm mode"));
                }
                if self.confirms.is_none() {
                    self.confirms = Some(Confirms::default());
                    self.shared.mirror.confirm.store(true, Ordering::Relaxed);
                }
                if !m.nowait {
                    self.reply(AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(
                        confirm::SelectOk {},
                    )));
                }
                Ok(())
            }
            AMQPClass::Access(_) => {
                // access.request is obsolete; RabbitMQ answers it with an empty ticket.
                self.reply(AMQPClass::Access(
                    amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    ),
                ));
                Ok(())
            }
            other => Err(unexpected_reply_method(other)),
        }
    }

    /// A queue name from a method, with the empty name meaning the last declared queue.
    fn queue_name(&self, name: &str) -> AmqpResult<String> {
        if !name.is_empty() {
            return Ok(name.to_owned());
        }
        self.last_queue
            .clone()
            .ok_or_else(|| not_found("no previously declared queue"))
    }

    fn exchange_method(&mut self, s: &mut Session, mut m: exchange::AMQPMethod) -> AmqpResult<()> {
        use exchange::AMQPMethod as M;
        match &mut m {
            M::Declare(d) => strip_cr_lf(&mut d.exchange),
            M::Delete(d) => strip_cr_lf(&mut d.exchange),
            M::Bind(b) => {
                strip_cr_lf(&mut b.destination);
                strip_cr_lf(&mut b.source);
            }
            M::Unbind(b) => {
                strip_cr_lf(&mut b.destination);
                strip_cr_lf(&mut b.source);
            }
            _ => {}
        }
        let vhost = s.vhost.clone();
        if matches!(&m, M::Declare(d) if !d.passive) || matches!(m, M::Delete(_)) {
            vhost.throttle_declare()?;
        }
        match m {
            M::Declare(d) => {
                let name = d.exchange.as_str();
                if d.passive {
                    if name.is_empty() {
                        return Err(access_refused(
                            "operation not permitted on the default exchange",
                        ));
                    }
                    vhost.existing_exchange(name)?;
                } else {
                    let kind = ExchangeKind::parse(d.kind.as_str()).ok_or_else(|| {
                        // RabbitMQ says "unknown" for plugin types it has not loaded.
                        let which = if d.kind.as_str().starts_with("x-") {
                            "unknown"
                        } else {
                            "invalid"
                        };
                        AmqpError::new(
                            COMMAND_INVALID,
                            format!("{which} exchange type '{}'", d.kind.as_str()),
                        )
                    })?;
                    if name.is_empty() {
                        return Err(access_refused(
                            "operation not permitted on the default exchange",
                        ));
                    }
                    s.check("exchange", name, Access::Configure)?;
                    if let Some(v) = d.arguments.inner().get("alternate-exchange")
                        && !matches!(v, AMQPValue::LongString(_))
                    {
                        return Err(precondition_failed(format!(
                            "invalid type '{}' for arg 'alternate-exchange' in {}",
                            crate::broker::headers::type_name(v),
                            describe("exchange", name, &vhost.name)
                        )));
                    }
                    if let Some(AMQPValue::LongString(ae)) =
                        d.arguments.inner().get("alternate-exchange")
                        && vhost.exchange(name).is_none()
                    {
                        s.check("exchange", name, Access::Read)?;
                        s.check(
                            "exchange",
                            &String::from_utf8_lossy(ae.as_bytes()),
                            Access::Write,
                        )?;
                    }
                    vhost.declare_exchange(ExchangeSpec {
                        name: name.to_owned(),
                        kind,
                        durable: d.durable,
                        auto_delete: d.auto_delete,
                        internal: d.internal,
                        arguments: d.arguments,
                    })?;
                }
                if !d.nowait {
                    self.reply(AMQPClass::Exchange(M::DeclareOk(exchange::DeclareOk {})));
                }
            }
            M::Delete(d) => {
                let name = d.exchange.as_str();
                // The default and system exchanges are refused first, as in RabbitMQ.
                if !name.is_empty() && !name.starts_with("amq.") {
                    s.check("exchange", name, Access::Configure)?;
                }
                vhost.delete_exchange(name, d.if_unused)?;
                if !d.nowait {
                    self.reply(AMQPClass::Exchange(M::DeleteOk(exchange::DeleteOk {})));
                }
            }
            M::Bind(b) => {
                binding_permitted(s, "exchange", b.destination.as_str(), b.source.as_str())?;
                vhost.bind(
                    b.source.as_str(),
                    b.destination.as_str(),
                    DestinationKind::Exchange,
                    b.routing_key.as_str(),
                    &b.arguments,
                    s.connection_id,
                )?;
                if !b.nowait {
                    self.reply(AMQPClass::Exchange(M::BindOk(exchange::BindOk {})));
                }
            }
            M::Unbind(b) => {
                binding_permitted(s, "exchange", b.destination.as_str(), b.source.as_str())?;
                vhost.unbind(
                    b.source.as_str(),
                    b.destination.as_str(),
                    DestinationKind::Exchange,
                    b.routing_key.as_str(),
                    &b.arguments,
                    s.connection_id,
                )?;
                if !b.nowait {
                    self.reply(AMQPClass::Exchange(M::UnbindOk(exchange::UnbindOk {})));
                }
            }
            other => return Err(unexpected_reply_method(AMQPClass::Exchange(other))),
        }
        Ok(())
    }

    fn queue_method(&mut self, s: &mut Session, mut m: queue::AMQPMethod) -> AmqpResult<()> {
        use queue::AMQPMethod as M;
        match &mut m {
            M::Declare(d) => strip_cr_lf(&mut d.queue),
            M::Delete(d) => strip_cr_lf(&mut d.queue),
            M::Bind(b) => {
                strip_cr_lf(&mut b.queue);
                strip_cr_lf(&mut b.exchange);
            }
            M::Unbind(b) => {
                strip_cr_lf(&mut b.queue);
                strip_cr_lf(&mut b.exchange);
            }
            _ => {}
        }
        let vhost = s.vhost.clone();
        if matches!(&m, M::Declare(d) if !d.passive) || matches!(m, M::Delete(_)) {
            vhost.throttle_declare()?;
        }
        match m {
            M::Declare(d) => {
                if d.queue.as_str() == REPLY_TO {
                    // The pseudo-queue of direct reply-to always "exists", with one consumer.
                    self.reply_declare_ok(REPLY_TO, 0, 1, d.nowait);
                    return Ok(());
                }
                if d.queue.as_str().starts_with(REPLY_TO) {
                    // A generated reply-to name whose consumer is there exists for clients
                    // (RabbitMQ answers for it: no messages, its one consumer); any other
                    // name under the prefix does not. Passive or not, as RabbitMQ matches it.
                    if vhost.reply_queue(d.queue.as_str()).is_some() {
                        self.reply_declare_ok(d.queue.as_str(), 0, 1, d.nowait);
                        return Ok(());
                    }
                    if !d.passive {
                        vhost.existing_queue(d.queue.as_str(), s.connection_id)?;
                    }
                }
                let (q, messages, consumers) = if d.passive {
                    // Unlike the other methods, a passive declare does not use the
                    // "last declared queue" shortcut for an empty name.
                    let q = vhost.existing_queue(d.queue.as_str(), s.connection_id)?;
                    // As in RabbitMQ, a passive declare is a use: `x-expires` counts anew.
                    q.touch();
                    let (m, c) = declare_counts(&q)?;
                    (q, m, c)
                } else {
                    let name = if d.queue.as_str().is_empty() {
                        generated_name("amq.gen")
                    } else {
                        d.queue.as_str().to_owned()
                    };
                    if name.starts_with("amq.") && !d.queue.as_str().is_empty() {
                        return Err(access_refused(format!(
                            "queue name '{name}' contains reserved prefix 'amq.*'"
                        )));
                    }
                    s.check("queue", &name, Access::Configure)?;
                    let exists = vhost.queue(&name).is_some();
                    for (kind, resource, access) in dead_letter_checks(&name, exists, &d.arguments)
                    {
                        s.check(kind, &resource, access)?;
                    }
                    let (q, created) = vhost.declare_queue(
                        QueueSpec {
                            name,
                            // RabbitMQ never makes an exclusive queue durable.
                            durable: d.durable && !d.exclusive,
                            exclusive: d.exclusive,
                            auto_delete: d.auto_delete,
                            arguments: d.arguments,
                        },
                        s.connection_id,
                    )?;
                    if created && q.owner().is_some() {
                        s.exclusive_queues.push(q.clone());
                    }
                    let (m, c) = declare_counts(&q)?;
                    (q, m, c)
                };
                self.last_queue = Some(q.name().to_owned());
                self.reply_declare_ok(q.name(), messages, consumers, d.nowait);
            }
            M::Bind(b) => {
                let queue = self.queue_name(b.queue.as_str())?;
                // The spec's shortcut: an empty key with an empty queue name means the
                // last declared queue's name.
                let key = if b.routing_key.as_str().is_empty() && b.queue.as_str().is_empty() {
                    queue.clone()
                } else {
                    b.routing_key.as_str().to_owned()
                };
                binding_permitted(s, "queue", &queue, b.exchange.as_str())?;
                vhost.bind(
                    b.exchange.as_str(),
                    &queue,
                    DestinationKind::Queue,
                    &key,
                    &b.arguments,
                    s.connection_id,
                )?;
                if !b.nowait {
                    self.reply(AMQPClass::Queue(M::BindOk(queue::BindOk {})));
                }
            }
            M::Unbind(b) => {
                let queue = self.queue_name(b.queue.as_str())?;
                binding_permitted(s, "queue", &queue, b.exchange.as_str())?;
                vhost.unbind(
                    b.exchange.as_str(),
                    &queue,
                    DestinationKind::Queue,
                    b.routing_key.as_str(),
                    &b.arguments,
                    s.connection_id,
                )?;
                self.reply(AMQPClass::Queue(M::UnbindOk(queue::UnbindOk {})));
            }
            M::Purge(p) => {
                let name = self.queue_name(p.queue.as_str())?;
                s.check("queue", &name, Access::Read)?;
                let q = vhost.existing_queue(&name, s.connection_id)?;
                let count = q.purge().map_err(|_| home_down(&q))?;
                if !p.nowait {
                    self.reply(AMQPClass::Queue(M::PurgeOk(queue::PurgeOk {
                        message_count: count,
                    })));
                }
            }
            M::Delete(d) => {
                let name = self.queue_name(d.queue.as_str())?;
                s.check("queue", &name, Access::Configure)?;
                let count = vhost.delete_queue(&name, d.if_unused, d.if_empty, s.connection_id)?;
                s.exclusive_queues.retain(|q| !q.is_deleted());
                if !d.nowait {
                    self.reply(AMQPClass::Queue(M::DeleteOk(queue::DeleteOk {
                        message_count: count,
                    })));
                }
            }
            other => return Err(unexpected_reply_method(AMQPClass::Queue(other))),
        }
        Ok(())
    }

    fn reply_declare_ok(&self, name: &str, messages: u32, consumers: u32, nowait: bool) {
        if !nowait {
            self.reply(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(
                queue::DeclareOk {
                    queue: name.into(),
                    message_count: messages,
                    consumer_count: consumers,
                },
            )));
        }
    }

    fn basic_method(&mut self, s: &mut Session, m: basic::AMQPMethod) -> AmqpResult<()> {
        use basic::AMQPMethod as M;
        match m {
            M::Qos(q) => {
                // amq-protocol drops prefetch_size; the connection refuses a non-zero one
                // (540, as RabbitMQ) from the raw frame before it gets here.
                if q.global {
                    let before = self.shared.prefetch_global();
                    self.shared.set_prefetch_global(q.prefetch_count.into());
                    if before != 0
                        && (q.prefetch_count == 0 || u32::from(q.prefetch_count) > before)
                    {
                        self.wake_consumed_queues();
                    }
                } else {
                    self.consumer_prefetch = q.prefetch_count.into();
                    self.shared
                        .mirror
                        .prefetch_count
                        .store(self.consumer_prefetch, Ordering::Relaxed);
                    // RabbitMQ 3.10 also lifts the channel-wide limit here (its limiter's
                    // `unlimit_prefetch`); clients see that behaviour, so Warren keeps it.
                    if self.shared.prefetch_global() != 0 {
                        self.shared.set_prefetch_global(0);
                        self.wake_consumed_queues();
                    }
                }
                self.reply(AMQPClass::Basic(M::QosOk(basic::QosOk {})));
            }
            M::Consume(c) => self.consume(s, c)?,
            M::Cancel(c) => {
                let tag = c.consumer_tag.as_str();
                if let Some(entry) = self.shared.remove_consumer(tag) {
                    self.drop_consumer(s, entry);
                }
                if !c.nowait {
                    self.reply(AMQPClass::Basic(M::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag,
                    })));
                }
            }
            M::Get(g) => {
                let name = self.queue_name(g.queue.as_str())?;
                s.check("queue", &name, Access::Read)?;
                let q = s.vhost.existing_queue(&name, s.connection_id)?;
                match q.get(g.no_ack).map_err(|_| home_down(&q))? {
                    Some((msg, remaining)) => self.shared.deliver_get(&q, msg, remaining, g.no_ack),
                    None => {
                        MessageStats::bump(&self.shared.stats.get_empty);
                        self.reply(AMQPClass::Basic(M::GetEmpty(basic::GetEmpty {})))
                    }
                }
            }
            M::Ack(a) => self.settle(a.delivery_tag, a.multiple, Settle::Ack)?,
            M::Reject(r) => {
                self.settle(r.delivery_tag, false, Settle::Reject { requeue: r.requeue })?
            }
            M::Nack(n) => self.settle(
                n.delivery_tag,
                n.multiple,
                Settle::Reject { requeue: n.requeue },
            )?,
            M::Recover(r) => {
                if !r.requeue {
                    return Err(AmqpError::new(NOT_IMPLEMENTED, "requeue=false"));
                }
                // recover-ok goes out before the redeliveries, as RabbitMQ sends them: clients
                // (lapin) drop what they had prefetched when recover-ok arrives.
                self.reply(AMQPClass::Basic(M::RecoverOk(basic::RecoverOk {})));
                self.recover(true)?;
            }
            M::RecoverAsync(r) => self.recover(r.requeue)?,
            other => return Err(unexpected_reply_method(AMQPClass::Basic(other))),
        }
        Ok(())
    }

    fn consume(&mut self, s: &mut Session, c: basic::Consume) -> AmqpResult<()> {
        let tag: Arc<str> = if c.consumer_tag.as_str().is_empty() {
            generated_name("amq.ctag").into()
        } else {
            c.consumer_tag.as_str().into()
        };
        if self.shared.has_consumer(&tag) {
            return Err(AmqpError::new(
                NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        let queue = if c.queue.as_str() == REPLY_TO {
            if !c.no_ack {
                return Err(precondition_failed("reply consumer cannot acknowledge"));
            }
            if self.reply_to.is_some() {
                return Err(precondition_failed("reply consumer already set"));
            }
            let key = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 18]>());
            let q = s.vhost.hidden_queue(
                QueueSpec {
                    name: format!("{REPLY_TO}.{key}"),
                    durable: false,
                    exclusive: true,
                    auto_delete: false,
                    arguments: FieldTable::default(),
                },
                Some(s.connection_id),
            );
            s.vhost.add_reply_queue(&key, q.clone());
            self.reply_to = Some((key, q.clone()));
            q
        } else {
            let name = self.queue_name(c.queue.as_str())?;
            s.check("queue", &name, Access::Read)?;
            s.vhost.existing_queue(&name, s.connection_id)?
        };
        let priority = match c.arguments.inner().get("x-priority") {
            None => 0,
            Some(_) => match int_arg(&c.arguments, "x-priority") {
                Some(p) if i32::try_from(p).is_ok() => p as i32,
                _ => {
                    let got = c
                        .arguments
                        .inner()
                        .get("x-priority")
                        .map_or("void", crate::broker::headers::type_name);
                    return Err(precondition_failed(format!(
                        "invalid arg 'x-priority' for {}: \"expected integer, got {got}\"",
                        describe("queue", queue.name(), &s.vhost.name)
                    )));
                }
            },
        };
        let consumer = Arc::new(
            Consumer::new(
                tag.clone(),
                c.no_ack,
                c.exclusive,
                priority,
                if c.no_ack { 0 } else { self.consumer_prefetch },
                self.shared.clone(),
                c.arguments,
            )
            .on_connection(s.connection_id),
        );
        self.shared.add_consumer(ChannelConsumer {
            queue: queue.clone(),
            consumer: consumer.clone(),
        });
        let out = self.shared.out().clone();
        let id = self.id();
        let nowait = c.nowait;
        let added = queue.add_consumer(consumer, || {
            if !nowait {
                out.method(
                    id,
                    AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                        consumer_tag: tag.as_ref().into(),
                    })),
                );
            }
        });
        if let Err(why) = added {
            self.shared.remove_consumer(&tag);
            return Err(match why {
                ConsumeRefused::ExclusiveInUse => access_refused(format!(
                    "{} in exclusive use",
                    describe("queue", queue.name(), &s.vhost.name)
                )),
                ConsumeRefused::Deleted => not_found(format!(
                    "no {}",
                    describe("queue", queue.name(), &s.vhost.name)
                )),
                ConsumeRefused::HomeDown => home_down(&queue),
            });
        }
        Ok(())
    }

    /// Forgets a consumer removed from this channel: takes it off its queue, deletes an
    /// auto-delete queue it leaves empty, and ends direct reply-to if it was the reply consumer.
    fn drop_consumer(&mut self, s: &Session, entry: ChannelConsumer) {
        if entry.queue.remove_consumer(&entry.consumer) {
            s.vhost.remove_queue(&entry.queue);
        }
        if let Some((key, q)) = &self.reply_to
            && *q == entry.queue
        {
            s.vhost.remove_reply_queue(key);
            q.delete(false, false).ok();
            self.reply_to = None;
        }
    }

    /// Settles deliveries named by an ack, nack or reject.
    pub(super) fn settle(&mut self, tag: u64, multiple: bool, how: Settle) -> AmqpResult<()> {
        // In a transaction they are settled, and leave the prefetch, at commit.
        let taken = self
            .shared
            .take_unacked(tag, multiple, self.tx.is_none())
            .map_err(|UnknownTag(t)| precondition_failed(format!("unknown delivery tag {t}")))?;
        if let Some(tx) = &mut self.tx {
            self.shared
                .mirror
                .acks_uncommitted
                .fetch_add(taken.len() as u64, Ordering::Relaxed);
            tx.settles.push((how, taken));
            return Ok(());
        }
        self.apply_settle(how, taken, true);
        Ok(())
    }

    /// Settles deliveries taken from the unacknowledged ones; `released` when taking them
    /// already took them off the channel-wide prefetch.
    pub(super) fn apply_settle(
        &mut self,
        how: Settle,
        taken: Vec<(u64, Delivered)>,
        released: bool,
    ) {
        if !released {
            self.shared.released(&taken);
        }
        if how == Settle::Ack {
            self.shared
                .stats
                .ack
                .fetch_add(taken.len() as u64, Ordering::Relaxed);
        }
        for run in runs_by_queue(taken) {
            let q = run[0].queue.clone();
            match how {
                Settle::Ack => q.settle(&run, true),
                Settle::Reject { requeue: false } => q.settle(&run, false),
                Settle::Reject { requeue: true } => q.requeue(run),
            }
        }
        if self.shared.prefetch_global() != 0 {
            self.wake_consumed_queues();
        }
    }

    fn recover(&mut self, requeue: bool) -> AmqpResult<()> {
        if !requeue {
            return Err(AmqpError::new(NOT_IMPLEMENTED, "requeue=false"));
        }
        let taken = self.shared.take_unacked(0, true, true).unwrap_or_default();
        self.apply_settle(Settle::Reject { requeue: true }, taken, true);
        Ok(())
    }

    fn wake_consumed_queues(&self) {
        for q in self.shared.consumed_queues() {
            q.dispatch();
        }
    }

    fn tx_method(&mut self, s: &mut Session, m: tx::AMQPMethod) -> AmqpResult<()> {
        use tx::AMQPMethod as M;
        match m {
            M::Select(_) => {
                if self.confirms.is_some() {
                    return Err(precondition_failed("cannot switch from confirm to tx mode"));
                }
                if self.tx.is_none() {
                    self.tx = Some(Transaction::default());
                    self.shared
                        .mirror
                        .transactional
                        .store(true, Ordering::Relaxed);
                }
                self.reply(AMQPClass::Tx(M::SelectOk(tx::SelectOk {})));
            }
            M::Commit(_) => {
                let tx = self
                    .tx
                    .replace(Transaction::default())
                    .ok_or_else(|| precondition_failed("channel is not transactional"))?;
                self.clear_uncommitted();
                let ticket = self.commit(s, tx);
                // commit-ok promises the messages are on disk: it may have to wait, and
                // then so does every later commit's, which the client would otherwise take
                // for the earlier one's.
                if self.commits_waiting.is_empty() && ticket.is_done(s.progress()) {
                    self.reply(AMQPClass::Tx(M::CommitOk(tx::CommitOk {})));
                } else {
                    self.commits_waiting.push_back(ticket);
                }
            }
            M::Rollback(_) => {
                let tx = self
                    .tx
                    .replace(Transaction::default())
                    .ok_or_else(|| precondition_failed("channel is not transactional"))?;
                self.clear_uncommitted();
                let restored = tx
                    .settles
                    .into_iter()
                    .flat_map(|(_, taken)| taken)
                    .collect();
                self.shared.restore_unacked(restored);
                self.reply(AMQPClass::Tx(M::RollbackOk(tx::RollbackOk {})));
            }
            other => return Err(unexpected_reply_method(AMQPClass::Tx(other))),
        }
        Ok(())
    }

    fn clear_uncommitted(&self) {
        self.shared.mirror.uncommitted.store(0, Ordering::Relaxed);
        self.shared
            .mirror
            .acks_uncommitted
            .store(0, Ordering::Relaxed);
    }

    /// Ends the channel: cancels its consumers (deleting auto-delete queues they leave empty)
    /// and requeues every delivery it had not settled, in the original order.
    pub fn close(&mut self, s: &Session) {
        let (consumers, unacked) = self.shared.shut();
        for entry in consumers {
            self.drop_consumer(s, entry);
        }
        if let Some((key, q)) = self.reply_to.take() {
            s.vhost.remove_reply_queue(&key);
            q.delete(false, false).ok();
        }
        let mut pending = unacked;
        if let Some(tx) = self.tx.take() {
            pending.extend(tx.settles.into_iter().flat_map(|(_, taken)| taken));
        }
        pending.sort_by_key(|(tag, _)| *tag);
        for run in runs_by_queue(pending) {
            let q = run[0].queue.clone();
            q.requeue(run);
        }
        self.content = ContentState::Idle;
    }
}

/// Drops line feeds and carriage returns from a name, as RabbitMQ does for the exchange and
/// queue names of declare (passive too), delete, bind and unbind; never for those of
/// `basic.publish`, `basic.get`, `basic.consume` or `queue.purge`.
pub fn strip_cr_lf(name: &mut ShortString) {
    if name.as_str().contains(['\n', '\r']) {
        *name = name.as_str().replace(['\n', '\r'], "").into();
    }
}

/// RabbitMQ's checks for binding and unbinding, in its order: write on the destination,
/// neither side the default exchange, read on the source exchange.
fn binding_permitted(s: &Session, kind: &str, destination: &str, source: &str) -> AmqpResult<()> {
    s.check(kind, destination, Access::Write)?;
    if source.is_empty() || (kind == "exchange" && destination.is_empty()) {
        return Err(access_refused(
            "operation not permitted on the default exchange",
        ));
    }
    s.check("exchange", source, Access::Read)
}

/// Splits settled deliveries into runs per queue, keeping each queue's order.
fn runs_by_queue(taken: Vec<(u64, Delivered)>) -> Vec<Vec<Delivered>> {
    let mut runs: Vec<Vec<Delivered>> = Vec::new();
    for (_, d) in taken {
        match runs.iter_mut().find(|r| r[0].queue == d.queue) {
            Some(run) => run.push(d),
            None => runs.push(vec![d]),
        }
    }
    runs
}

/// A method a client may not send on a channel (one only the server sends, or a connection
/// method): RabbitMQ's 503.
fn unexpected_reply_method(_method: AMQPClass) -> AmqpError {
    AmqpError::new(COMMAND_INVALID, "unimplemented method")
}
