//! Crash safety with real processes: a publisher sends persistent messages with confirms and a
//! consumer acks them while the broker is killed with SIGKILL at random moments, round after
//! round, and restarted on the same data directory. Every confirmed message must be consumed
//! in the end. Messages seen twice (acked, but the ack was not on disk yet) are counted and
//! reported, not failed.

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
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
                    "".into(),
                    QUEUE.into(),
                    BasicPublishOptions::default(),
                    &id.to_be_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
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
        || ch.basic_qos(100, BasicQosOptions::default()).await.is_err()
    {
        return;
    }
    let Ok(mut consumer) = ch
        .basic_consume(
            QUEUE.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
    else {
        return;
    };
    loop {
        let next = if until_idle {
            match tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
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
    let lost: Vec<u64> = confirmed
        .iter()
        .filter(|id| !received.contains_key(id))
        .copied()
        .collect();
    let duplicates = received.values().filter(|n| **n > 1).count();
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
