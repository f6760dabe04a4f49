//! Wire codec micro-benchmarks.
//!
//! * `decode_publish`: a buffer holding 100 published messages (`basic.publish` method frame,
//!   content header, one body frame each), cut and decoded the way the connection does it:
//!   `next_frame`, then `is_publish` + `decode_publish` for the method, `decode_content_header`
//!   for the header, and the body payload kept as a zero-copy `Bytes`. `16B_frames_only` runs
//!   only `next_frame` over the 16 B stream, to show what the framing alone costs.
//! * `decode_ack`: 100 `basic.ack` frames through `next_frame` + `decode_method` (the generic
//!   `amq-protocol` parser) and through `decode_ack` (the hand-written decoder every consumer
//!   ack now takes).
//! * `encode_deliver`: 100 deliveries (`encode_deliver` + `encode_content`) into a reused buffer,
//!   as the connection's writer does; `encode_deliver_generic` encodes the same `basic.deliver`
//!   method through `encode_method` (the `amq-protocol` generator) for comparison.
//!
//! Throughput is in messages (frames for `decode_ack`).
//!
//! `cargo bench -p warren-broker --bench codec`

use amq_protocol::protocol::{AMQPClass, BasicProperties, basic};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Duration;
use warren_broker::amqp::codec::{
    self, FRAME_BODY, FRAME_HEADER, FRAME_METHOD, decode_content_header, decode_method,
    decode_publish, encode_content, encode_deliver, encode_method, encode_properties, is_publish,
    next_frame,
};

/// RabbitMQ's default frame_max, which Warren negotiates too.
const FRAME_MAX: u32 = 131_072;
/// Messages per iteration.
const BATCH: usize = 100;
const CHANNEL: u16 = 1;
/// A server-generated consumer tag is `amq.ctag-` and 22 characters.
const CONSUMER_TAG: &[u8] = b"amq.ctag-6HyB1ng0CkBRXqOmS6ZY5Q";
const ROUTING_KEY: &str = "perf-s1";

/// What lapin sends with default properties: no flags set.
fn no_properties() -> Bytes {
    encode_properties(&BasicProperties::default())
}

/// A more typical application message: content type, persistent, two headers.
fn some_properties() -> Bytes {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-trace-id"),
        AMQPValue::LongString(LongString::from("4bf92f3577b34da6a3ce929d0e0e4736")),
    );
    headers.insert(ShortString::from("attempt"), AMQPValue::LongInt(1));
    encode_properties(
        &BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers),
    )
}

/// The bytes a client sends for `BATCH` publishes of `body` to the default exchange.
fn publish_wire(body: &[u8], properties: &[u8]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for _ in 0..BATCH {
        encode_method(
            &mut out,
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: ROUTING_KEY.into(),
                mandatory: false,
                immediate: false,
            })),
        );
        encode_content(&mut out, CHANNEL, properties, body, FRAME_MAX);
    }
    out.to_vec()
}

/// Cuts and decodes every frame in `buf` as the connection would; returns the messages seen.
fn decode_publishes(buf: &mut BytesMut) -> usize {
    let mut messages = 0;
    while let Some(frame) = next_frame(buf, FRAME_MAX).expect("valid frames") {
        match frame.kind {
            FRAME_METHOD => {
                assert!(is_publish(&frame.payload));
                black_box(decode_publish(&frame.payload).expect("basic.publish"));
            }
            FRAME_HEADER => {
                black_box(decode_content_header(&frame.payload).expect("content header"));
            }
            FRAME_BODY => {
                black_box(frame.payload);
                messages += 1;
            }
            kind => panic!("unexpected frame type {kind}"),
        }
    }
    messages
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec/decode_publish");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .throughput(Throughput::Elements(BATCH as u64));
    let cases = [
        ("16B", vec![0x5a; 16], no_properties()),
        ("1KB", vec![0x5a; 1024], no_properties()),
        ("1KB+props", vec![0x5a; 1024], some_properties()),
    ];
    for (name, body, props) in &cases {
        let wire = publish_wire(body, props);
        group.bench_function(*name, |b| {
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    let n = decode_publishes(&mut buf);
                    debug_assert_eq!(n, BATCH);
                    buf
                },
                BatchSize::SmallInput,
            )
        });
    }
    // Only `next_frame` over the 16 B stream: the share of the framing in the figures above.
    let wire = publish_wire(&cases[0].1, &cases[0].2);
    group.bench_function("16B_frames_only", |b| {
        b.iter_batched(
            || BytesMut::from(&wire[..]),
            |mut buf| {
                while let Some(frame) = next_frame(&mut buf, FRAME_MAX).expect("valid frames") {
                    black_box(frame);
                }
                buf
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();

    let mut group = c.benchmark_group("codec/decode_ack");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .throughput(Throughput::Elements(BATCH as u64));
    let mut wire = BytesMut::new();
    for tag in 1..=BATCH as u64 {
        encode_method(
            &mut wire,
            CHANNEL,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: tag,
                multiple: false,
            })),
        );
    }
    let wire = wire.to_vec();
    group.bench_function("basic.ack", |b| {
        b.iter_batched(
            || BytesMut::from(&wire[..]),
            |mut buf| {
                while let Some(frame) = next_frame(&mut buf, FRAME_MAX).expect("valid frames") {
                    black_box(decode_method(&frame.payload).expect("basic.ack"));
                }
                buf
            },
            BatchSize::SmallInput,
        )
    });
    // What the connection does now: the hand-written decoder.
    group.bench_function("basic.ack_by_hand", |b| {
        b.iter_batched(
            || BytesMut::from(&wire[..]),
            |mut buf| {
                while let Some(frame) = next_frame(&mut buf, FRAME_MAX).expect("valid frames") {
                    black_box(codec::decode_ack(&frame.payload).expect("basic.ack"));
                }
                buf
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec/encode_deliver");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .throughput(Throughput::Elements(BATCH as u64));
    let props = no_properties();
    for (name, size) in [("16B", 16), ("1KB", 1024)] {
        let body = Bytes::from(vec![0x5a; size]);
        let mut out = BytesMut::with_capacity(BATCH * (size + 128));
        group.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                for tag in 1..=BATCH as u64 {
                    encode_deliver(
                        &mut out,
                        CHANNEL,
                        CONSUMER_TAG,
                        tag,
                        false,
                        b"",
                        ROUTING_KEY.as_bytes(),
                    );
                    encode_content(&mut out, CHANNEL, &props, &body, FRAME_MAX);
                }
                black_box(out.len())
            })
        });
    }
    // The same method frame through the generated codec, to show what the hand-written
    // encoder saves (content frames excluded).
    let mut out = BytesMut::with_capacity(BATCH * 128);
    let tag = ShortString::from(std::str::from_utf8(CONSUMER_TAG).expect("ascii"));
    group.bench_function("method_only_generic", |b| {
        b.iter(|| {
            out.clear();
            for delivery_tag in 1..=BATCH as u64 {
                codec::encode_method(
                    &mut out,
                    CHANNEL,
                    AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                        consumer_tag: tag.clone(),
                        delivery_tag,
                        redelivered: false,
                        exchange: "".into(),
                        routing_key: ROUTING_KEY.into(),
                    })),
                );
            }
            black_box(out.len())
        })
    });
    group.bench_function("method_only_by_hand", |b| {
        b.iter(|| {
            out.clear();
            for delivery_tag in 1..=BATCH as u64 {
                encode_deliver(
                    &mut out,
                    CHANNEL,
                    CONSUMER_TAG,
                    delivery_tag,
                    false,
                    b"",
                    ROUTING_KEY.as_bytes(),
                );
            }
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group!(benches, decode, encode);
criterion_main!(benches);
