//! Crash safety with real processes: a publisher sends persistent messages with confirms and a
//! consumer acks them while the broker is killed with SIGKILL at random moments, round after
//! round, and restarted on the same data directory. Every confirmed message must be consumed
//! in the end. Messages seen twice (acked, but the ack was not on disk yet) are counted and
//! reported, not failed. The same again for persistent delayed messages (`x-delayed-message`),
//! whose backlog spills to disk between the kills.

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use warren_e2e::BrokerProcess;

const QUEUE: &str = "crash-test";
const ROUNDS: usize = 6;

async fn connect(uri: &str) -> Option<Connection> {
    tokio::time::timeout(
        Duration::from_secs(5),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await
    .ok()?
    .ok()
}

/// Publishes ids from `next` on, recording each one the broker confirms, until the
/// connection dies.
async fn publish(uri: String, next: Arc<Mutex<u64>>, confirmed: Arc<Mutex<HashSet<u64>>>) {
    let Some(conn) = connect(&uri).await else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    if ch
        .queue_declare(QUEUE.into(), durable, FieldTable::default())
        .await
        .is_err()
        || ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .is_err()
    {
        return;
    }
    let persistent = |_| BasicProperties::default().with_delivery_mode(2);
    publish_ids(&ch, "", QUEUE, persistent, next, confirmed).await;
}

/// Publishes ids from `next` on to `exchange` with `key`, each with the properties `props`
/// gives it, at most 64 unconfirmed, recording each id the broker confirms, until the
/// connection dies.
async fn publish_ids(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    props: impl Fn(u64) -> BasicProperties,
    next: Arc<Mutex<u64>>,
    confirmed: Arc<Mutex<HashSet<u64>>>,
) {
    let mut outstanding = FuturesUnordered::new();
    loop {
        while outstanding.len() < 64 {
            let id = {
                let mut n = next.lock().unwrap();
                *n += 1;
                *n
            };
            let sent = ch
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    &id.to_be_bytes(),
                    props(id),
                )
                .await;
            let Ok(confirm) = sent else { return };
            outstanding.push(async move { (id, confirm.await) });
        }
        match outstanding.next().await {
            Some((id, Ok(Confirmation::Ack(_)))) => {
                confirmed.lock().unwrap().insert(id);
            }
            Some((_, Ok(_))) => {}
            Some((_, Err(_))) | None => return,
        }
    }
}

/// Consumes and acks, recording every id received, until the connection dies or, with
/// `until_idle`, nothing arrives for a while.
async fn consume(uri: String, received: Arc<Mutex<HashMap<u64, u32>>>, until_idle: bool) {
    let idle = until_idle.then_some(Duration::from_secs(2));
    consume_from(uri, QUEUE, received, idle).await
}

/// [`consume`] from `queue`, until nothing arrives for `idle` if given.
async fn consume_from(
    uri: String,
    queue: &str,
    received: Arc<Mutex<HashMap<u64, u32>>>,
    idle: Option<Duration>,
) {
    let Some(conn) = connect(&uri).await else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    if ch
        .queue_declare(queue.into(), durable, FieldTable::default())
        .await
        .is_err()
        || ch.basic_qos(100, BasicQosOptions::default()).await.is_err()
    {
        return;
    }
    let Ok(mut consumer) = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    else {
        return;
    };
    loop {
        let next = if let Some(idle) = idle {
            match tokio::time::timeout(idle, consumer.next()).await {
                Ok(n) => n,
                Err(_) => return,
            }
        } else {
            consumer.next().await
        };
        let Some(Ok(delivery)) = next else { return };
        let id = u64::from_be_bytes(delivery.data[..8].try_into().expect("8-byte id"));
        *received.lock().unwrap().entry(id).or_default() += 1;
        if ch
            .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// The confirmed ids never received, and how many ids were received more than once.
fn tally(confirmed: &HashSet<u64>, received: &HashMap<u64, u32>) -> (Vec<u64>, usize) {
    let lost = confirmed
        .iter()
        .filter(|id| !received.contains_key(id))
        .copied()
        .collect();
    (lost, received.values().filter(|n| **n > 1).count())
}

#[test]
fn every_confirmed_message_survives_repeated_sigkill() {
    let data = tempfile::tempdir().expect("data dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let next = Arc::new(Mutex::new(0u64));
    let confirmed = Arc::new(Mutex::new(HashSet::new()));
    let received = Arc::new(Mutex::new(HashMap::new()));
    let mut rng = rand::rng();
    for _ in 0..ROUNDS {
        let broker = BrokerProcess::start_in(data.path(), &[]);
        let uri = broker.uri();
        let publisher = rt.spawn(publish(uri.clone(), next.clone(), confirmed.clone()));
        let consumer = rt.spawn(consume(uri, received.clone(), false));
        std::thread::sleep(Duration::from_millis(rng.random_range(300..900)));
        broker.kill();
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(10), publisher).await;
            let _ = tokio::time::timeout(Duration::from_secs(10), consumer).await;
        });
    }
    let broker = BrokerProcess::start_in(data.path(), &[]);
    rt.block_on(consume(broker.uri(), received.clone(), true));
    let confirmed = confirmed.lock().unwrap();
    let received = received.lock().unwrap();
    let (lost, duplicates) = tally(&confirmed, &received);
    println!(
        "crash test: {} rounds, {} confirmed, {} received, {} lost, {} received more than once",
        ROUNDS,
        confirmed.len(),
        received.len(),
        lost.len(),
        duplicates
    );
    assert!(confirmed.len() > 100, "the publisher made progress");
    assert!(
        lost.is_empty(),
        "confirmed messages lost: {:?}",
        &lost[..lost.len().min(20)]
    );
}

const DELAYED_EXCHANGE: &str = "crash-delayed";
const DELAYED_QUEUE: &str = "crash-delayed-q";

/// Publishes persistent delayed messages (0.3 to 2.8 s) with confirms, recording each id the
/// broker confirms, until the connection dies.
async fn publish_delayed(uri: String, next: Arc<Mutex<u64>>, confirmed: Arc<Mutex<HashSet<u64>>>) {
    let Some(conn) = connect(&uri).await else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-delayed-type".into(),
        AMQPValue::LongString("direct".into()),
    );
    let declared = async {
        ch.exchange_declare(
            DELAYED_EXCHANGE.into(),
            ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        )
        .await?;
        ch.queue_declare(
            DELAYED_QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        ch.queue_bind(
            DELAYED_QUEUE.into(),
            DELAYED_EXCHANGE.into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await
    };
    if declared.await.is_err() {
        return;
    }
    let delayed = |id: u64| {
        let mut headers = FieldTable::default();
        let delay = 300 + (id * 7919) % 2500;
        headers.insert("x-delay".into(), AMQPValue::LongLongInt(delay as i64));
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers)
    };
    publish_ids(&ch, DELAYED_EXCHANGE, "k", delayed, next, confirmed).await;
}

#[test]
fn every_confirmed_delayed_message_survives_repeated_sigkill() {
    let data = tempfile::tempdir().expect("data dir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let next = Arc::new(Mutex::new(0u64));
    let confirmed = Arc::new(Mutex::new(HashSet::new()));
    let received = Arc::new(Mutex::new(HashMap::new()));
    let mut rng = rand::rng();
    // A small memory budget, so that the backlog spills to run files between the kills.
    let flags = ["--delayed-memory-bytes", "65536"];
    for _ in 0..4 {
        let broker = BrokerProcess::start_in(data.path(), &flags);
        let uri = broker.uri();
        let publisher = rt.spawn(publish_delayed(
            uri.clone(),
            next.clone(),
            confirmed.clone(),
        ));
        let consumer = rt.spawn(consume_from(uri, DELAYED_QUEUE, received.clone(), None));
        std::thread::sleep(Duration::from_millis(rng.random_range(700..2000)));
        broker.kill();
        rt.block_on(async {
            let _ = tokio::time::timeout(Duration::from_secs(10), publisher).await;
            let _ = tokio::time::timeout(Duration::from_secs(10), consumer).await;
        });
    }
    let broker = BrokerProcess::start_in(data.path(), &flags);
    // Everything is due within 2.8 s of the last publish.
    let idle = Some(Duration::from_secs(5));
    rt.block_on(consume_from(
        broker.uri(),
        DELAYED_QUEUE,
        received.clone(),
        idle,
    ));
    let confirmed = confirmed.lock().unwrap();
    let received = received.lock().unwrap();
    let (lost, duplicates) = tally(&confirmed, &received);
    println!(
        "delayed crash test: {} confirmed, {} received, {} lost, {} received more than once",
        confirmed.len(),
        received.len(),
        lost.len(),
        duplicates
    );
    assert!(confirmed.len() > 100, "the publisher made progress");
    assert!(
        lost.is_empty(),
        "confirmed delayed messages lost: {:?}",
        &lost[..lost.len().min(20)]
    );
    // Delivery is at least once, but a crash repeats only what was delivered in its last
    // moments, not what earlier runs or logs held.
    assert!(
        duplicates * 5 <= received.len(),
        "{duplicates} of {} delivered more than once",
        received.len()
    );
}
