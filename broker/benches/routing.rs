//! Routing micro-benchmarks: one routing key against 10,000 bindings.
//!
//! Topic bindings are drawn (with a fixed seed) from keys shaped `region.service.event.detail`
//! (8 regions, 40 services, 25 events, 5 details), bound to 1,000 queues:
//! 60% literal keys, 25% with one or two `*` words, 15% with `#` (`a.#`, `a.b.#`, `#.c.d`,
//! `a.#.d`, `*.b.#`). Routing goes through `Exchange::route` (read lock, trie walk, one `Arc`
//! clone per matching binding) into a reused vector, as the channel does, and through a bare
//! `TopicTrie<u32>` to separate the trie walk from the rest.
//!
//! Direct: 10,000 distinct keys over 1,000 queues; one key routed (hit and miss).
//!
//! `bind_10k`: building a topic exchange with those 10,000 bindings (`Exchange::bind`).
//!
//! `cargo bench -p warren-broker --bench routing`

use amq_protocol::types::FieldTable;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use warren_broker::broker::exchange::{Binding, Destination, Exchange, ExchangeKind, ExchangeSpec};
use warren_broker::broker::queue::{Queue, QueueSpec};
use warren_broker::broker::queue_ref::QueueRef;
use warren_broker::broker::topic::TopicTrie;

const BINDINGS: usize = 10_000;
const QUEUES: usize = 1_000;

const REGIONS: usize = 8;
const SERVICES: usize = 40;
const EVENTS: usize = 25;
const DETAILS: usize = 5;

fn region(i: usize) -> String {
    format!("region{i}")
}
fn service(i: usize) -> String {
    format!("svc{i}")
}
fn event(i: usize) -> String {
    format!("ev{i}")
}
fn detail(i: usize) -> String {
    format!("d{i}")
}

/// 10,000 topic binding keys (with repeats, as real topologies have), fixed seed.
fn topic_patterns() -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(0x5741_5252_454e);
    let mut out = Vec::with_capacity(BINDINGS);
    for _ in 0..BINDINGS {
        let r = region(rng.random_range(0..REGIONS));
        let s = service(rng.random_range(0..SERVICES));
        let e = event(rng.random_range(0..EVENTS));
        let d = detail(rng.random_range(0..DETAILS));
        let roll = rng.random_range(0..100);
        let pattern = match roll {
            0..60 => format!("{r}.{s}.{e}.{d}"),
            60..70 => format!("{r}.{s}.{e}.*"),
            70..78 => format!("{r}.*.{e}.{d}"),
            78..85 => format!("*.{s}.*.{d}"),
            85..89 => format!("{r}.{s}.#"),
            89..92 => format!("#.{e}.{d}"),
            92..95 => format!("{r}.#.{d}"),
            95..98 => format!("*.{s}.#"),
            _ => format!("{r}.#"),
        };
        out.push(pattern);
    }
    out
}

fn queues() -> Vec<QueueRef> {
    (0..QUEUES)
        .map(|i| {
            QueueRef::from(Queue::in_memory(
                QueueSpec {
                    name: format!("q{i}"),
                    durable: false,
                    exclusive: false,
                    auto_delete: false,
                    arguments: FieldTable::default(),
                },
                "/".into(),
                None,
            ))
        })
        .collect()
}

fn exchange(kind: ExchangeKind) -> Arc<Exchange> {
    Exchange::new(ExchangeSpec {
        name: format!("bench.{}", kind.as_str()),
        kind,
        durable: false,
        auto_delete: false,
        internal: false,
        arguments: FieldTable::default(),
    })
}

fn bind_all(x: &Exchange, keys: &[String], queues: &[QueueRef]) {
    for (i, key) in keys.iter().enumerate() {
        x.bind(Binding {
            destination: Destination::Queue(queues[i % queues.len()].clone()),
            routing_key: key.clone(),
            arguments: FieldTable::default(),
        });
    }
}

fn matches(x: &Exchange, key: &[u8]) -> usize {
    let mut out = Vec::new();
    x.route(key, None, &mut out);
    out.len()
}

fn topic(c: &mut Criterion) {
    let patterns = topic_patterns();
    let queues = queues();
    let x = exchange(ExchangeKind::Topic);
    bind_all(&x, &patterns, &queues);
    let mut trie = TopicTrie::default();
    for (i, p) in patterns.iter().enumerate() {
        trie.insert(p.as_bytes(), (i % QUEUES) as u32);
    }

    // A key that patterns of every shape match; one that only wildcard patterns match; one
    // that shares only its first word with other patterns (so only `region3.#` matches); one
    // that matches nothing.
    let keys: [(&str, &[u8]); 4] = [
        ("hit", b"region3.svc17.ev4.d2"),
        ("wildcards_only", b"region3.svc17.ev4.unknown"),
        ("first_word_only", b"region3.nosuchservice.none.none.none"),
        ("miss", b"elsewhere.nosuchservice.none.none"),
    ];
    for (_, key) in &keys {
        eprintln!(
            "routing/topic: key {:?} matches {} bindings",
            String::from_utf8_lossy(key),
            matches(&x, key)
        );
    }

    let mut group = c.benchmark_group("routing/topic_10k");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .throughput(Throughput::Elements(1));
    for (name, key) in keys {
        let mut out = Vec::with_capacity(64);
        group.bench_function(format!("exchange/{name}"), |b| {
            b.iter(|| {
                out.clear();
                x.route(black_box(key), None, &mut out);
                black_box(out.len())
            })
        });
        group.bench_function(format!("trie/{name}"), |b| {
            b.iter(|| {
                let mut n = 0u32;
                trie.route(black_box(key), &mut |d| n = n.wrapping_add(*d));
                black_box(n)
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("routing/bind");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .throughput(Throughput::Elements(BINDINGS as u64));
    group.bench_function("topic_10k", |b| {
        b.iter_batched(
            || exchange(ExchangeKind::Topic),
            |x| {
                bind_all(&x, &patterns, &queues);
                x
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn direct(c: &mut Criterion) {
    let queues = queues();
    let keys: Vec<String> = (0..BINDINGS)
        .map(|i| {
            format!(
                "{}.{}.{}",
                region(i % REGIONS),
                service(i / REGIONS % SERVICES),
                i
            )
        })
        .collect();
    let x = exchange(ExchangeKind::Direct);
    bind_all(&x, &keys, &queues);
    let hit = keys[4321].clone().into_bytes();
    assert_eq!(matches(&x, &hit), 1);

    let mut group = c.benchmark_group("routing/direct_10k");
    group
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(4);
    group.bench_function("hit", |b| {
        b.iter(|| {
            out.clear();
            x.route(black_box(&hit), None, &mut out);
            black_box(out.len())
        })
    });
    group.bench_function("miss", |b| {
        b.iter(|| {
            out.clear();
            x.route(black_box(b"region1.svc2.nosuchkey"), None, &mut out);
            black_box(out.len())
        })
    });
    group.finish();
}

criterion_group!(benches, topic, direct);
criterion_main!(benches);
