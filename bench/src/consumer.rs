//! A consumer: one connection, one channel, one basic.consume. Each delivery's
//! body starts with the producer's send timestamp, from which the end-to-end
//! latency is recorded; manual acks are sent per message or, with
//! `--multi-ack-every N`, as one multiple=true ack per N messages.
//!
//! Subscribing is separate from connecting so that, in backlog mode, the
//! connection exists before publishing starts while basic.consume waits until
//! the queues are full.

use crate::control::{self, Event, Events, Pipeline, Signal};
use crate::stats::{Counters, Latency};
use futures::{FutureExt, StreamExt};
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long pending acks may take to flush when the consumer ends.
const ACK_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

pub struct ConsumerSpec {
    pub id: usize,
    pub uri: String,
    pub queue: String,
    pub autoack: bool,
    pub multi_ack_every: u32,
    pub qos: u16,
    pub cmessages: Option<u64>,
    pub window: usize,
    /// Delayed messages: latency counts from the due time (send time plus the delay the
    /// body carries after the timestamp).
    pub delayed: bool,
}

pub struct ConsumerCtx {
    pub counters: Arc<Counters>,
    pub latency: Arc<Latency>,
    /// Set when basic.consume may be sent.
    pub go: Signal,
    pub stop: Signal,
    pub events: Events,
}

/// Latency from the 8-byte big-endian send timestamp at the start of `body`.
pub fn latency_ns(body: &[u8], now_ns: u64) -> Option<u64> {
    let ts: [u8; 8] = body.get(..8)?.try_into().ok()?;
    Some(now_ns.saturating_sub(u64::from_be_bytes(ts)))
}

/// A delayed message's delivery-time error: how long after its due time (the send timestamp
/// plus the delay in milliseconds that follows it in `body`) it arrived; 0 if early.
pub fn due_error_ns(body: &[u8], now_ns: u64) -> Option<u64> {
    let ts: [u8; 8] = body.get(..8)?.try_into().ok()?;
    let delay: [u8; 8] = body.get(8..16)?.try_into().ok()?;
    let due = u64::from_be_bytes(ts).saturating_add(u64::from_be_bytes(delay) * 1_000_000);
    Some(now_ns.saturating_sub(due))
}

pub async fn run(spec: ConsumerSpec, ctx: ConsumerCtx) -> Result<(), String> {
    let conn = control::connect(&spec.uri, &format!("warren-perf-consumer-{}", spec.id)).await?;
    let result = consume(&conn, &spec, &ctx).await;
    control::close(&conn).await;
    result
}

/// basic.ack straight on the channel. `Acker::ack` hands every ack to a
/// separately spawned task, so two acks in flight may reach the wire out of
/// order, which a multiple=true ack cannot survive ("unknown delivery tag").
/// The channel method queues its frame on first poll, in order.
fn ack(
    channel: &Channel,
    delivery_tag: u64,
    multiple: bool,
) -> futures::future::BoxFuture<'static, lapin::Result<()>> {
    let channel = channel.clone();
    async move {
        channel
            .basic_ack(delivery_tag, BasicAckOptions { multiple })
            .await
    }
    .boxed()
}

async fn consume(
    conn: &lapin::Connection,
    spec: &ConsumerSpec,
    ctx: &ConsumerCtx,
) -> Result<(), String> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| format!("opening channel failed: {e}"))?;
    if spec.qos > 0 {
        channel
            .basic_qos(spec.qos, BasicQosOptions::default())
            .await
            .map_err(|e| format!("basic.qos failed: {e}"))?;
    }
    let _ = ctx.events.send(Event::Ready);
    tokio::select! {
        _ = ctx.go.wait() => {}
        _ = ctx.stop.wait() => return Ok(()),
    }

    let consumer = channel
        .basic_consume(
            spec.queue.as_str().into(),
            format!("warren-perf-{}", spec.id).into(),
            BasicConsumeOptions {
                no_ack: spec.autoack,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("basic.consume on {:?} failed: {e}", spec.queue))?;
    let _ = ctx.events.send(Event::Subscribed);

    let (mut deliveries, abort) = futures::stream::abortable(consumer);
    ctx.stop.abort_on_set(abort);

    let every = u64::from(spec.multi_ack_every.max(1));
    let multiple = every > 1;
    let mut acks: Pipeline<()> = Pipeline::new(spec.window);
    let mut acked: Vec<()> = Vec::new();
    let mut unacked: u64 = 0;
    let mut last_tag: Option<u64> = None;
    let mut received: u64 = 0;
    let mut reached_count = false;

    while let Some(delivery) = deliveries.next().await {
        let delivery = delivery.map_err(|e| format!("delivery failed: {e}"))?;
        let now = control::now_ns();
        let measured = if spec.delayed {
            due_error_ns(&delivery.data, now)
        } else {
            latency_ns(&delivery.data, now)
        };
        if let Some(lat) = measured {
            ctx.latency.record_ns(lat);
        }
        Counters::add(&ctx.counters.received, 1);
        ctx.counters.last_receive_ns.store(now, Ordering::Relaxed);
        received += 1;
        reached_count = spec.cmessages.is_some_and(|n| received >= n);

        if !spec.autoack {
            unacked += 1;
            if unacked >= every || reached_count {
                let fut = ack(&channel, delivery.delivery_tag, multiple);
                let mut res = acks.push(fut, &mut acked).await;
                while res.is_ok() && acks.is_full() {
                    res = acks.next().await.unwrap_or(Ok(()));
                }
                if let Err(e) = res {
                    if ctx.stop.is_set() {
                        break;
                    }
                    return Err(format!("ack failed: {e}"));
                }
                acked.clear();
                unacked = 0;
                last_tag = None;
            } else {
                last_tag = Some(delivery.delivery_tag);
            }
        }
        if reached_count {
            break;
        }
    }

    if !reached_count && !ctx.stop.is_set() {
        return Err(format!(
            "delivery stream from {:?} ended unexpectedly (consumer cancelled by the broker?)",
            spec.queue
        ));
    }
    // Ack what is still pending; errors no longer matter once stopping.
    let flush = async {
        if let Some(tag) = last_tag.take() {
            acks.push(ack(&channel, tag, true), &mut acked).await?;
        }
        while let Some(r) = acks.next().await {
            r?;
        }
        Ok::<(), lapin::Error>(())
    };
    match tokio::time::timeout(ACK_FLUSH_TIMEOUT, flush).await {
        Ok(Err(e)) if !ctx.stop.is_set() => Err(format!("ack failed: {e}")),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_from_body_timestamp() {
        let mut body = vec![0u8; 16];
        body[..8].copy_from_slice(&1_000u64.to_be_bytes());
        assert_eq!(latency_ns(&body, 1_500), Some(500));
        // A clock that went backwards gives 0, not a wrapped value.
        assert_eq!(latency_ns(&body, 10), Some(0));
        // Foreign messages too short to carry a timestamp are skipped.
        assert_eq!(latency_ns(&[1, 2, 3], 10), None);
    }

    #[test]
    fn due_error_counts_from_send_time_plus_delay() {
        let mut body = vec![0u8; 16];
        body[..8].copy_from_slice(&1_000_000u64.to_be_bytes());
        body[8..].copy_from_slice(&5u64.to_be_bytes());
        // Due at 6 ms; arrived at 6.5 ms.
        assert_eq!(due_error_ns(&body, 6_500_000), Some(500_000));
        assert_eq!(due_error_ns(&body, 2_000_000), Some(0));
        assert_eq!(due_error_ns(&body[..8], 2_000_000), None);
    }
}
