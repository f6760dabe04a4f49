//! The cost of a Prometheus scrape with 10,000 queues: rendering `/metrics` (node sums) and
//! `/metrics/per-object` (one sample per queue and family) from a broker with 10,000 queues in
//! the default vhost. This is the work a scrape does on the broker
//! (a blocking task walks every queue and channel and encodes the text), without the socket.
//!
//! `cargo bench -p warren-broker --bench metrics`

use amq_protocol::types::FieldTable;
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;
use warren_broker::Config;
use warren_broker::broker::Broker;
use warren_broker::broker::queue::QueueSpec;
use warren_broker::http::AppState;
use warren_broker::http::metrics::render;
use warren_broker::http::sampler::Sampler;

const QUEUES: usize = 10_000;

fn state(dir: &std::path::Path) -> AppState {
    let config = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    let cluster = warren_broker::cluster::Cluster::new(&config).expect("cluster secret");
    let broker = Broker::open(config).expect("broker opens");
    let vhost = broker.vhost("/").expect("the default vhost");
    for i in 0..QUEUES {
        vhost
            .declare_queue(
                QueueSpec {
                    name: format!("scrape.queue.{i:05}"),
                    durable: false,
                    exclusive: false,
                    auto_delete: false,
                    arguments: FieldTable::default(),
                },
                0,
            )
            .expect("declare");
    }
    AppState {
        broker,
        sampler: Arc::new(Sampler::default()),
        listeners: Arc::new(Vec::new()),
        stopping: tokio::sync::watch::channel(false).1,
        heavy_lists: Arc::new(tokio::sync::Semaphore::new(
            warren_broker::http::HEAVY_LISTS,
        )),
        list_wait: Duration::from_secs(60),
        heavy_scrapes: Arc::new(tokio::sync::Semaphore::new(
            warren_broker::http::HEAVY_SCRAPES,
        )),
        imports: Arc::new(tokio::sync::Mutex::new(())),
        cluster,
    }
}

fn scrape(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary data directory");
    let state = state(dir.path());
    let mut g = c.benchmark_group("scrape_10k_queues");
    g.sample_size(20).measurement_time(Duration::from_secs(10));
    for (name, per_object) in [("aggregated", false), ("per_object", true)] {
        let size = render(&state, per_object).expect("renders").len();
        eprintln!("{name}: {size} bytes");
        g.bench_function(name, |b| {
            b.iter(|| black_box(render(&state, per_object).expect("renders")))
        });
    }
    g.finish();
}

criterion_group!(benches, scrape);
criterion_main!(benches);
