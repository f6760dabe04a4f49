//! The outgoing side of a connection: one task per connection drains a queue of frames to send,
//! encodes everything that is waiting into one buffer and writes it with one syscall, so a burst
//! of deliveries costs a handful of writes. It also sends heartbeats when the link is idle.
//!
//! Flow control: bytes waiting here are counted. Above a high-water mark, queues stop handing
//! messages to this connection's consumers (they register to be woken) and the reader stops
//! reading from the socket; both resume once the writer has drained below the low-water mark.
//! A client that stops reading therefore costs bounded memory.

use super::codec;
use crate::broker::connections::Traffic;
use crate::broker::message::Message;
use crate::broker::queue_ref::{QueueRef, WeakQueueRef};
use amq_protocol::protocol::AMQPClass;
use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

/// Above this many bytes waiting, deliveries to this connection pause.
const HIGH_WATER: usize = 4 * 1024 * 1024;
/// Deliveries resume below this.
const LOW_WATER: usize = 1024 * 1024;
/// A write is issued once this much is encoded, even if more frames are waiting.
const MAX_BATCH: usize = 256 * 1024;
/// What a frame without a message body is counted as.
const METHOD_COST: usize = 64;

/// Something to send.
#[derive(Debug)]
pub enum Outbound {
    Method(u16, AMQPClass),
    Deliver {
        channel: u16,
        consumer_tag: Arc<str>,
        delivery_tag: u64,
        redelivered: bool,
        message: Arc<Message>,
    },
    GetOk {
        channel: u16,
        delivery_tag: u64,
        redelivered: bool,
        message_count: u32,
        message: Arc<Message>,
    },
    Return {
        channel: u16,
        reply_code: u16,
        reply_text: &'static str,
        message: Arc<Message>,
    },
    /// Publisher confirms.
    Ack {
        channel: u16,
        delivery_tag: u64,
        multiple: bool,
    },
    Nack {
        channel: u16,
        delivery_tag: u64,
        multiple: bool,
    },
    /// Already encoded bytes (the protocol header sent back on a version mismatch).
    Raw(Bytes),
    /// Flush what is queued, then close the socket.
    Close,
}

impl Outbound {
    fn cost(&self) -> usize {
        match self {
            Self::Deliver { message, .. }
            | Self::GetOk { message, .. }
            | Self::Return { message, .. } => METHOD_COST + message.size(),
            Self::Raw(b) => b.len(),
            _ => METHOD_COST,
        }
    }
}

/// The handle every part of the broker uses to send on a connection.
#[derive(Debug)]
pub struct ConnectionOutput {
    tx: mpsc::UnboundedSender<Outbound>,
    pending: AtomicUsize,
    frame_max: AtomicU32,
    /// Queues that paused delivering here, to be woken when the backlog drains.
    waiting_queues: Mutex<Vec<WeakQueueRef>>,
    /// Signalled when the backlog drains below the low-water mark.
    drained: Notify,
}

impl ConnectionOutput {
    pub fn new(frame_max: u32) -> (Arc<Self>, mpsc::UnboundedReceiver<Outbound>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                tx,
                pending: AtomicUsize::new(0),
                frame_max: AtomicU32::new(frame_max),
                waiting_queues: Mutex::new(Vec::new()),
                drained: Notify::new(),
            }),
            rx,
        )
    }

    pub fn send(&self, item: Outbound) {
        self.pending.fetch_add(item.cost(), Ordering::Relaxed);
        // A closed receiver means the connection is going away; nothing left to tell.
        let _ = self.tx.send(item);
    }

    pub fn method(&self, channel: u16, method: AMQPClass) {
        self.send(Outbound::Method(channel, method));
    }

    /// Whether the writer has stopped (the socket failed, or the connection is closing).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub fn set_frame_max(&self, frame_max: u32) {
        self.frame_max.store(frame_max, Ordering::Relaxed);
    }

    pub fn backlog(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Whether the reader should stop reading until the backlog drains.
    pub fn is_backed_up(&self) -> bool {
        self.backlog() >= 2 * HIGH_WATER
    }

    /// Called by a channel before it takes a delivery: returns true (and remembers the queue,
    /// to wake it later) when the connection has too much waiting already.
    pub fn defer_delivery(&self, queue: &QueueRef) -> bool {
        if self.backlog() < HIGH_WATER {
            return false;
        }
        let mut waiting = self.waiting_queues.lock();
        // Checked again under the lock the writer takes after draining: no lost wake-up.
        if self.backlog() < HIGH_WATER {
            return false;
        }
        if !waiting.iter().any(|w| w.is(queue)) {
            waiting.push(queue.downgrade());
        }
        true
    }

    /// Resolves once the backlog is below the low-water mark.
    pub async fn wait_drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.backlog() < LOW_WATER {
                return;
            }
            notified.await;
        }
    }

    fn written(&self, cost: usize) {
        let left = self.pending.fetch_sub(cost, Ordering::Relaxed) - cost;
        if left < LOW_WATER {
            self.drained.notify_waiters();
            let waiting = std::mem::take(&mut *self.waiting_queues.lock());
            for q in waiting.iter().filter_map(WeakQueueRef::upgrade) {
                q.dispatch();
            }
        }
    }
}

fn encode(item: Outbound, out: &mut BytesMut, frame_max: u32) -> bool {
    match item {
        Outbound::Method(channel, method) => codec::encode_method(out, channel, method),
        Outbound::Deliver {
            channel,
            consumer_tag,
            delivery_tag,
            redelivered,
            message,
        } => {
            codec::encode_deliver(
                out,
                channel,
                consumer_tag.as_bytes(),
                delivery_tag,
                redelivered,
                message.exchange.as_bytes(),
                message.routing_key.as_bytes(),
            );
            codec::encode_content(out, channel, &message.properties, &message.body, frame_max);
        }
        Outbound::GetOk {
            channel,
            delivery_tag,
            redelivered,
            message_count,
            message,
        } => {
            codec::encode_get_ok(
                out,
                channel,
                delivery_tag,
                redelivered,
                message.exchange.as_bytes(),
                message.routing_key.as_bytes(),
                message_count,
            );
            codec::encode_content(out, channel, &message.properties, &message.body, frame_max);
        }
        Outbound::Return {
            channel,
            reply_code,
            reply_text,
            message,
        } => {
            codec::encode_return(
                out,
                channel,
                reply_code,
                reply_text.as_bytes(),
                message.exchange.as_bytes(),
                message.routing_key.as_bytes(),
            );
            codec::encode_content(out, channel, &message.properties, &message.body, frame_max);
        }
        Outbound::Ack {
            channel,
            delivery_tag,
            multiple,
        } => codec::encode_ack(out, channel, delivery_tag, multiple),
        Outbound::Nack {
            channel,
            delivery_tag,
            multiple,
        } => codec::encode_nack(out, channel, delivery_tag, multiple),
        Outbound::Raw(bytes) => out.extend_from_slice(&bytes),
        Outbound::Close => return false,
    }
    true
}

/// Runs until `Outbound::Close`, the socket fails, or every sender is gone.
/// `heartbeat` is read each time the link goes idle, so it can be set after tuning.
pub async fn run_writer<W: AsyncWrite + Unpin>(
    mut socket: W,
    output: Arc<ConnectionOutput>,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    heartbeat: Arc<AtomicU32>,
    traffic: Arc<Traffic>,
) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut last_write = Instant::now();
    let idle_check = tokio::time::sleep(Duration::from_secs(1));
    tokio::pin!(idle_check);
    loop {
        let first = tokio::select! {
            item = rx.recv() => match item {
                Some(item) => item,
                None => break,
            },
            () = &mut idle_check => {
                // Like RabbitMQ, send a heartbeat after half an interval without output.
                let interval = heartbeat.load(Ordering::Relaxed);
                let now = Instant::now();
                let half = Duration::from_millis(u64::from(interval) * 500);
                if interval > 0 && now.duration_since(last_write) >= half {
                    codec::encode_heartbeat(&mut buf);
                    if socket.write_all(&buf).await.is_err() {
                        break;
                    }
                    traffic.sent(buf.len());
                    buf.clear();
                    last_write = now;
                }
                let step = if interval > 0 { half.min(Duration::from_secs(1)) } else { Duration::from_secs(1) };
                idle_check.as_mut().reset(now + step.max(Duration::from_millis(100)));
                continue;
            }
        };
        let frame_max = output.frame_max.load(Ordering::Relaxed);
        let mut cost = first.cost();
        let mut open = encode(first, &mut buf, frame_max);
        while open && buf.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(item) => {
                    cost += item.cost();
                    open = encode(item, &mut buf, frame_max);
                }
                Err(_) => break,
            }
        }
        if !buf.is_empty() {
            if socket.write_all(&buf).await.is_err() {
                break;
            }
            traffic.sent(buf.len());
            buf.clear();
            if buf.capacity() > 4 * MAX_BATCH {
                buf = BytesMut::with_capacity(64 * 1024);
            }
            last_write = Instant::now();
        }
        output.written(cost);
        if !open {
            break;
        }
    }
    let _ = socket.flush().await;
    let _ = socket.shutdown().await;
    // Nothing more will be written: release whatever is still counted.
    rx.close();
    while let Ok(item) = rx.try_recv() {
        output.written(item.cost());
    }
}
