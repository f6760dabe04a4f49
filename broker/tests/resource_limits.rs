//! Resources the broker must keep bounded whatever clients do: publishers blocked by an alarm
//! still go away when their clients do or when they are closed from outside; the disk alarm
//! keeps up with a fast publisher; a disk that cannot be written does not keep the broker from
//! stopping; a consumer that never acks cannot pull a backlog from disk into memory.
mod common;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, basic, connection, queue};
use amq_protocol::types::FieldTable;
use common::TestBroker;
use common::http::Api;
use common::raw::{Raw, encode};
use std::time::Duration;
use tokio::io::AsyncReadExt;

// The broker binary's allocator, whose statistics the memory alarm reads.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// What the broker binary's memory probe reads: bytes in pages holding live allocations.
fn active() -> Option<u64> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    tikv_jemalloc_ctl::stats::active::read()
        .ok()
        .map(|bytes| bytes as u64)
}

fn declare(name: &str) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
        queue: name.into(),
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
        arguments: FieldTable::default(),
    }))
}

fn publish_frames(channel: u16, routing_key: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = encode(&AMQPFrame::Method(
        channel,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: routing_key.into(),
            mandatory: false,
            immediate: false,
        })),
    ));
    let mut header = vec![2u8];
    header.extend_from_slice(&channel.to_be_bytes());
    header.extend_from_slice(&14u32.to_be_bytes());
    header.extend_from_slice(&[0, 60, 0, 0]);
    header.extend_from_slice(&(body.len() as u64).to_be_bytes());
    header.extend_from_slice(&[0, 0, 0xCE]);
    bytes.extend_from_slice(&header);
    bytes.push(3);
    bytes.extend_from_slice(&channel.to_be_bytes());
    bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
    bytes.extend_from_slice(body);
    bytes.push(0xCE);
    bytes
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A raw publisher on queue `q` that published once, and was then told `connection.blocked`
/// on its second publish. The memory alarm must already be on.
async fn blocked_publisher(broker: &TestBroker, q: &str) -> Raw {
    let mut raw = Raw::open(broker).await;
    raw.send(&publish_frames(1, q, b"blocked")).await;
    let (ch, m) = common::within(5, raw.method()).await.expect("blocked");
    assert_eq!(ch, 0);
    assert!(
        matches!(m, AMQPClass::Connection(connection::AMQPMethod::Blocked(_))),
        "expected connection.blocked, got {m:?}"
    );
    raw
}

async fn connection_names(api: &Api) -> Vec<String> {
    api.json("/api/connections")
        .await
        .as_array()
        .expect("a list")
        .iter()
        .map(|c| c["name"].as_str().expect("a name").to_owned())
        .collect()
}

#[tokio::test]
async fn blocked_publishers_that_drop_their_sockets_are_cleaned_up() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let api = Api::new(&broker);
    let q = common::unique("blocked-gone");
    let mut first = Raw::open(&broker).await;
    first.send_method(1, declare(&q)).await;
    first.method().await.expect("declare-ok");
    drop(first);
    broker.broker().alarms.set_memory_limit(1);
    let mut publishers = Vec::new();
    for _ in 0..6 {
        publishers.push(blocked_publisher(&broker, &q).await);
    }
    common::eventually("six blocked connections", || async {
        connection_names(&api).await.len() == 6
    })
    .await;
    // Some publishers go on publishing while blocked (far more than the broker reads ahead)
    // before they give up; the others give up at once.
    let body = vec![0u8; 32 * 1024];
    for raw in publishers.iter_mut().take(3) {
        for _ in 0..16 {
            let frames = publish_frames(1, &q, &body);
            let sent = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::io::AsyncWriteExt::write_all(&mut raw.socket, &frames),
            )
            .await;
            if sent.is_err() {
                break;
            }
        }
    }
    // One half-closes: it must see the broker close its side, i.e. the socket was let go.
    let mut half = publishers.pop().expect("a publisher");
    tokio::io::AsyncWriteExt::shutdown(&mut half.socket)
        .await
        .expect("half-closes");
    drop(publishers);
    common::eventually(
        "blocked connections whose clients left are gone",
        || async { connection_names(&api).await.is_empty() },
    )
    .await;
    assert_eq!(broker.broker().connections.count(), 0);
    let mut rest = Vec::new();
    let read = common::within(5, half.socket.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the broker closed the socket: {read:?}");
    broker.broker().alarms.set_memory_limit(0);
}

#[tokio::test]
async fn a_forced_close_reaches_a_blocked_publisher_with_connection_forced() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let api = Api::new(&broker);
    let q = common::unique("blocked-forced");
    broker.broker().alarms.set_memory_limit(1);
    let mut raw = blocked_publisher(&broker, &q).await;
    let names = connection_names(&api).await;
    assert_eq!(names.len(), 1);
    api.delete(&format!("/api/connections/{}", urlencode(&names[0])))
        .await
        .status(204);
    let close = common::within(5, raw.expect_connection_close()).await;
    assert_eq!(close.code, 320);
    assert_eq!(
        close.text,
        "CONNECTION_FORCED - Closed via management plugin"
    );
    common::eventually("the forced connection is gone", || async {
        connection_names(&api).await.is_empty()
    })
    .await;
    broker.broker().alarms.set_memory_limit(0);
}

/// A vhost that goes drops its connections at once, blocked publishers among them: no
/// close-ok is waited for.
#[tokio::test]
async fn deleting_its_vhost_drops_a_blocked_publisher_at_once() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let api = Api::new(&broker);
    let vhost = common::unique("blocked-vhost");
    api.put(&format!("/api/vhosts/{vhost}"), "{}")
        .await
        .status(201);
    api.put(
        &format!("/api/permissions/{vhost}/guest"),
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )
    .await
    .status(204);
    broker.broker().alarms.set_memory_limit(1);
    let mut raw = Raw::open_in(&broker, &vhost).await;
    raw.send(&publish_frames(1, "q", b"blocked")).await;
    let (_, m) = common::within(5, raw.method()).await.expect("blocked");
    assert!(
        matches!(m, AMQPClass::Connection(connection::AMQPMethod::Blocked(_))),
        "expected connection.blocked, got {m:?}"
    );
    // Answered once the vhost's connections are gone: within the 3 s the broker would give
    // the client to answer its close, had it not dropped the socket at once.
    common::within(2, api.delete(&format!("/api/vhosts/{vhost}")))
        .await
        .status(204);
    let (ch, close) = common::within(5, raw.method())
        .await
        .expect("connection.close");
    let AMQPClass::Connection(connection::AMQPMethod::Close(close)) = close else {
        panic!("expected connection.close, got {close:?}");
    };
    assert_eq!((ch, close.reply_code), (0, 320));
    assert_eq!(
        close.reply_text.as_str(),
        format!("CONNECTION_FORCED - vhost '{vhost}' is down")
    );
    assert!(
        common::within(5, raw.frame()).await.is_none(),
        "the socket is closed without waiting for close-ok"
    );
    broker.broker().alarms.set_memory_limit(0);
}

/// After close-ok the broker answers further closes only while its answers are read: a
/// client that sends closes and never reads is still read (until the linger ends), so its
/// writes go through instead of leaving a connection that waits for ever on a full socket.
#[tokio::test]
async fn closes_sent_after_close_ok_by_a_client_that_never_reads_are_not_all_answered() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let mut raw = Raw::open(&broker).await;
    let close = encode(&AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "".into(),
            class_id: 0,
            method_id: 0,
        })),
    ));
    raw.send(&close).await;
    // Far more answers (64 bytes each, as the output counts them) than the output holds
    // before it is backed up (8 MiB), with the sockets' buffers on top.
    let batch: Vec<u8> = close.repeat(16 * 1024);
    let sent = common::within(20, async {
        for _ in 0..48 {
            raw.send(&batch).await;
        }
    })
    .await;
    let () = sent;
}

#[tokio::test]
async fn a_blocked_publisher_that_falls_silent_misses_its_heartbeats() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let mut raw = Raw::connect(&broker).await;
    raw.send(common::raw::HEADER).await;
    raw.method().await.expect("connection.start");
    raw.start_ok("guest", "guest", true).await;
    raw.method().await.expect("connection.tune");
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 16,
            frame_max: 131_072,
            heartbeat: 1,
        })),
    )
    .await;
    raw.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    )
    .await;
    raw.method().await.expect("connection.open-ok");
    raw.open_channel(1).await;
    broker.broker().alarms.set_memory_limit(1);
    let q = common::unique("blocked-silent");
    raw.send(&publish_frames(1, &q, b"blocked")).await;
    let (_, m) = raw.method().await.expect("connection.blocked");
    assert!(matches!(
        m,
        AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
    ));
    // No heartbeats from here on, and the socket stays open: after two intervals the broker
    // gives up on the client.
    assert_eq!(broker.broker().connections.count(), 1);
    common::eventually("the silent blocked connection is closed", || async {
        broker.broker().connections.count() == 0
    })
    .await;
    broker.broker().alarms.set_memory_limit(0);
}

/// A store whose every write fails, as on a full disk.
struct FullDisk;

impl warren_broker::store::flusher::Flushable for FullDisk {
    fn write_pending(&self) -> std::io::Result<Vec<std::sync::Arc<std::fs::File>>> {
        Err(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "No space left on device",
        ))
    }
    fn after_sync(&self) {}
    fn failed(&self) {}
}

#[tokio::test]
async fn shutdown_finishes_when_the_last_flush_cannot_write() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    let full: std::sync::Arc<dyn warren_broker::store::flusher::Flushable> =
        std::sync::Arc::new(FullDisk);
    let flusher = broker
        .broker()
        .storage
        .flusher()
        .expect("a broker with a data directory")
        .clone();
    flusher.register(std::sync::Arc::downgrade(&full));
    flusher.hurry();
    common::eventually("the flusher fails to write", || async {
        flusher
            .stats
            .errors
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    })
    .await;
    // The failed data waits to be written again when the broker is asked to stop: one last
    // try, and the broker stops without it, well within the grace period of each step.
    common::within(4, broker.stop()).await;
    drop(full);
}

/// A store whose write hangs until it is released, as on a disk that stopped answering.
struct HungDisk {
    entered: std::sync::Mutex<Option<std::sync::mpsc::Sender<()>>>,
    release: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl warren_broker::store::flusher::Flushable for HungDisk {
    fn write_pending(&self) -> std::io::Result<Vec<std::sync::Arc<std::fs::File>>> {
        if let Some(entered) = self.entered.lock().unwrap().take() {
            let _ = entered.send(());
        }
        // Bounded, so that a failing test cannot leave the thread behind for ever.
        let _ = self
            .release
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(60));
        Ok(Vec::new())
    }
    fn after_sync(&self) {}
    fn failed(&self) {}
}

/// The whole of a process's end, runtime included: a write that hangs must not hold it.
#[test]
fn a_write_that_hangs_does_not_keep_the_broker_from_stopping() {
    if std::env::var("WARREN_TEST_AMQP_URL").is_ok_and(|u| !u.is_empty()) {
        return;
    }
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    let hung: std::sync::Arc<dyn warren_broker::store::flusher::Flushable> =
        std::sync::Arc::new(HungDisk {
            entered: std::sync::Mutex::new(Some(entered_tx)),
            release: std::sync::Mutex::new(release_rx),
        });
    let (stopped_tx, stopped) = std::sync::mpsc::channel();
    let store = hung.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let broker = TestBroker::start().await;
            let flusher = broker
                .broker()
                .storage
                .flusher()
                .expect("a broker with a data directory")
                .clone();
            flusher.register(std::sync::Arc::downgrade(&store));
            flusher.hurry();
            let _ =
                tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(5)))
                    .await;
            broker.stop().await;
        });
        // As when `main` returns: the runtime goes, and with it whatever it still waits for.
        drop(runtime);
        let _ = stopped_tx.send(());
    });
    let result = stopped.recv_timeout(Duration::from_secs(15));
    let _ = release.send(());
    drop(hung);
    assert!(
        result.is_ok(),
        "the broker and its runtime stopped within the grace period"
    );
}

#[tokio::test]
async fn the_disk_alarm_blocks_a_fast_publisher_before_it_fills_the_room_left() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    use lapin::BasicProperties;
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    const MIB: u64 = 1024 * 1024;
    // The limit leaves this much room above free space as it is now; free space is what the
    // stores write taken from a disk of its own, whatever else the machine writes or frees.
    const ROOM: u64 = 16 * MIB;
    const FREE: u64 = 1024 * MIB;
    let alarms = broker.broker().alarms.clone();
    let counted = std::sync::Arc::downgrade(&alarms);
    let base = FREE + alarms.written();
    alarms.set_free_disk_probe(Box::new(move || {
        Some(base.saturating_sub(counted.upgrade()?.written()))
    }));
    alarms.set_disk_free_limit(FREE - ROOM);
    assert!(!alarms.state().disk, "room is left");
    let conn = broker.connect().await;
    let ch = common::within(5, conn.create_channel())
        .await
        .expect("channel");
    let q = common::unique("disk-filler");
    common::within(
        5,
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare");
    common::within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let body = vec![7u8; 256 * 1024];
    let mut published = 0u64;
    // Persistent messages, each confirmed (so on disk) before the next, until the alarm.
    while !alarms.state().disk && published < 8 * ROOM {
        let confirm = common::within(
            5,
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            ),
        )
        .await
        .expect("publish");
        if tokio::time::timeout(Duration::from_secs(3), confirm)
            .await
            .is_err()
        {
            assert!(alarms.state().disk, "a confirm stalled without an alarm");
            break;
        }
        published += body.len() as u64;
    }
    assert!(alarms.state().disk, "the disk alarm fired");
    // The room, give or take the last checks' steps.
    assert!(
        published <= ROOM + 8 * MIB,
        "the alarm fired only after {} MiB were written into {} MiB of room",
        published / MIB,
        ROOM / MIB
    );
    alarms.set_disk_free_limit(0);
    let _ = common::within(5, conn.close(200, "bye".into())).await;
}

#[tokio::test]
async fn a_consumer_with_unlimited_prefetch_that_never_acks_holds_a_bounded_backlog() {
    // A small window: a queue keeps 8 messages (8 KiB) in memory and hands out 16 times
    // that many messages, 4 times that many bytes, unacknowledged (32 of 1 KiB).
    let broker = TestBroker::start_with(|c| {
        c.queue_window_messages = 8;
        c.queue_window_bytes = 8 * 1024;
    })
    .await;
    if broker.is_external() {
        return;
    }
    use futures::StreamExt;
    use lapin::BasicProperties;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
        QueueDeclareOptions,
    };
    const BACKLOG: u64 = 400;
    const IN_FLIGHT: u64 = 32;
    let conn = broker.connect().await;
    let pch = common::within(5, conn.create_channel())
        .await
        .expect("channel");
    let q = common::unique("never-acked");
    common::within(
        5,
        pch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("declare");
    common::within(5, pch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let body = vec![1u8; 1024];
    let mut confirms = Vec::new();
    for _ in 0..BACKLOG {
        confirms.push(
            common::within(
                5,
                pch.basic_publish(
                    "".into(),
                    q.as_str().into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default(),
                ),
            )
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        common::within(5, c).await.expect("confirm");
    }
    let queue = broker
        .broker()
        .vhost("/")
        .expect("vhost")
        .queue(&q)
        .expect("queue");
    assert!(queue.lengths().in_memory <= 8, "the backlog is on disk");
    // No basic.qos: unlimited prefetch. The consumer never acks.
    let cch = common::within(5, conn.create_channel())
        .await
        .expect("channel");
    let mut consumer = common::within(
        5,
        cch.basic_consume(
            q.as_str().into(),
            "hoarder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("consume");
    let mut received = Vec::new();
    while (received.len() as u64) < IN_FLIGHT {
        let d = common::within(5, consumer.next())
            .await
            .expect("a delivery")
            .expect("a delivery");
        received.push(d);
    }
    // Nothing more comes while none is acknowledged.
    let more = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
    assert!(more.is_err(), "a delivery beyond the bound: {more:?}");
    let l = queue.lengths();
    assert_eq!(l.unacked, IN_FLIGHT);
    assert_eq!(l.ready, BACKLOG - IN_FLIGHT);
    assert!(
        l.in_memory <= 8,
        "ready in memory: {} (the window is 8)",
        l.in_memory
    );
    // Acknowledgements let more out, as many as were acknowledged.
    for d in received.drain(..4) {
        common::within(5, d.acker.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    for _ in 0..4 {
        let d = common::within(5, consumer.next())
            .await
            .expect("a delivery")
            .expect("a delivery");
        received.push(d);
    }
    common::eventually("the bound holds after acks", || async {
        queue.lengths().unacked == IN_FLIGHT
    })
    .await;
    // Returned unacknowledged, they go back to memory, no more than were in flight.
    common::within(5, cch.close(200, "bye".into()))
        .await
        .expect("close");
    common::eventually("the deliveries are back", || async {
        queue.lengths().ready == BACKLOG - 4
    })
    .await;
    let l = queue.lengths();
    assert!(
        l.in_memory <= 8 + IN_FLIGHT,
        "ready in memory after the requeue: {}",
        l.in_memory
    );
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test]
async fn the_memory_alarm_clears_once_memory_in_use_falls_back() {
    let broker = TestBroker::start().await;
    if broker.is_external() {
        return;
    }
    warren_broker::alarms::set_memory_probe(active);
    const MIB: u64 = 1024 * 1024;
    let api = Api::new(&broker);
    let alarms = broker.broker().alarms.clone();
    let q = common::unique("memory-alarm");
    let mut raw = Raw::open(&broker).await;
    raw.send_method(1, declare(&q)).await;
    raw.method().await.expect("declare-ok");
    raw.send(&publish_frames(1, &q, b"before")).await;
    raw.send_method(1, declare(&q)).await;
    raw.method().await.expect("declare-ok");
    let base = active().expect("jemalloc statistics");
    alarms.set_memory_limit(base + 96 * MIB);
    assert!(!alarms.state().memory, "below the watermark");
    // Memory in small blocks, as connections and messages take it; one block in 64 outlives
    // the others, so the pages of those freed cannot all be given back.
    let blocks: Vec<Vec<u8>> = (0..192 * 1024).map(|i| vec![i as u8; 1024]).collect();
    alarms.check();
    assert!(alarms.state().memory, "above the watermark");
    let node = &api.json("/api/nodes").await[0];
    assert_eq!(node["mem_alarm"], true);
    assert!(node["mem_used"].as_u64() > node["mem_limit"].as_u64());
    raw.send(&publish_frames(1, &q, b"during")).await;
    let (_, blocked) = common::within(5, raw.method()).await.expect("blocked");
    assert!(
        matches!(
            blocked,
            AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
        ),
        "expected connection.blocked, got {blocked:?}"
    );
    let kept: Vec<Vec<u8>> = blocks.into_iter().step_by(64).collect();
    // The alarm's own timer notices: the publisher is unblocked.
    let (_, unblocked) = common::within(5, raw.method()).await.expect("unblocked");
    assert_eq!(
        unblocked,
        AMQPClass::Connection(connection::AMQPMethod::Unblocked(connection::Unblocked {}))
    );
    let node = &api.json("/api/nodes").await[0];
    assert_eq!(node["mem_alarm"], false);
    assert!(node["mem_used"].as_u64() < node["mem_limit"].as_u64());
    raw.send_method(1, declare(&q)).await;
    let (_, m) = raw.method().await.expect("declare-ok");
    let AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) = m else {
        panic!("expected declare-ok, got {m:?}");
    };
    assert_eq!(
        ok.message_count, 2,
        "the publish held by the alarm went through"
    );
    drop(kept);
}
