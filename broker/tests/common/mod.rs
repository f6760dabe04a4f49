//! Test harness: a broker started in-process on 127.0.0.1 with an ephemeral port and an empty
//! temporary data directory, stopped when the test ends. Set `WARREN_TEST_AMQP_URL` to run the
//! same tests against another broker (for instance RabbitMQ, to check what it does).
#![allow(dead_code)]

pub mod http;
pub mod raw;

use futures::{Stream, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer, ErrorKind, Event};
use std::pin::Pin;
use std::time::Duration;
use warren_broker::{Config, RunningBroker};

pub struct TestBroker {
    pub uri: String,
    pub addr: std::net::SocketAddr,
    running: Option<RunningBroker>,
    config: Option<Config>,
    _data: Option<tempfile::TempDir>,
}

impl TestBroker {
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// Starts a broker after `tune` has adjusted its configuration.
    pub async fn start_with(tune: impl FnOnce(&mut Config)) -> Self {
        if let Some(uri) = std::env::var("WARREN_TEST_AMQP_URL")
            .ok()
            .filter(|u| !u.is_empty())
        {
            let addr = external_addr(&uri);
            return Self {
                uri,
                addr,
                running: None,
                config: None,
                _data: None,
            };
        }
        let data = tempfile::tempdir().expect("temporary data directory");
        let mut config = Config {
            data_dir: data.path().to_path_buf(),
            amqp_listen: "127.0.0.1:0".parse().unwrap(),
            management_listen: "127.0.0.1:0".parse().unwrap(),
            prometheus_listen: "127.0.0.1:0".parse().unwrap(),
            cluster_listen: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        tune(&mut config);
        let running = warren_broker::start(config.clone())
            .await
            .expect("broker starts");
        let addr = running.amqp_addr;
        Self {
            uri: format!("amqp://guest:guest@{addr}/%2f"),
            addr,
            running: Some(running),
            config: Some(config),
            _data: Some(data),
        }
    }

    /// The running broker's listeners (in-process brokers only).
    pub fn running(&self) -> &RunningBroker {
        self.running.as_ref().expect("an in-process broker")
    }

    /// The in-process broker (tests that look inside it skip external brokers).
    pub fn broker(&self) -> &std::sync::Arc<warren_broker::broker::Broker> {
        &self.running.as_ref().expect("an in-process broker").broker
    }

    /// The data directory of an in-process broker.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.config.as_ref().expect("an in-process broker").data_dir
    }

    pub fn is_external(&self) -> bool {
        self.running.is_none()
    }

    /// The URI with a different virtual host (`vhost` is percent-encoded here).
    pub fn uri_with_vhost(&self, vhost: &str) -> String {
        let base = self
            .uri
            .rsplit_once('/')
            .map(|(b, _)| b)
            .unwrap_or(&self.uri);
        let encoded: String = vhost
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02x}"),
            })
            .collect();
        format!("{base}/{encoded}")
    }

    /// The URI with other credentials.
    pub fn uri_with_credentials(&self, user: &str, pass: &str) -> String {
        let (scheme, rest) = self.uri.split_once("://").expect("uri has a scheme");
        let rest = rest.rsplit_once('@').map(|(_, r)| r).unwrap_or(rest);
        format!("{scheme}://{user}:{pass}@{rest}")
    }

    pub async fn connect(&self) -> Connection {
        Self::connect_uri(&self.uri).await
    }

    /// Connects with `query` (e.g. `channel_max=3`) appended to the URI.
    pub async fn connect_with_query(&self, query: &str) -> Connection {
        let sep = if self.uri.contains('?') { '&' } else { '?' };
        Self::connect_uri(&format!("{}{sep}{query}", self.uri)).await
    }

    pub async fn connect_uri(uri: &str) -> Connection {
        tokio::time::timeout(
            Duration::from_secs(10),
            Connection::connect(uri, ConnectionProperties::default()),
        )
        .await
        .expect("connect in time")
        .expect("connect")
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Stops the in-process broker cleanly and starts a new one on the same data directory
    /// (with a new ephemeral port: reconnect with the new `uri`). Warren only.
    pub async fn restart(self) -> Self {
        self.restart_between(Duration::ZERO, |_| {}).await
    }

    /// As [`TestBroker::restart`], the broker staying down for `pause` (for what happens
    /// while it is down, such as messages expiring).
    pub async fn restart_after(self, pause: Duration) -> Self {
        self.restart_between(pause, |_| {}).await
    }

    /// As [`TestBroker::restart`], running `between` on the data directory while the broker
    /// is stopped.
    pub async fn restart_editing(self, between: impl FnOnce(&std::path::Path)) -> Self {
        self.restart_between(Duration::ZERO, between).await
    }

    async fn restart_between(
        mut self,
        pause: Duration,
        between: impl FnOnce(&std::path::Path),
    ) -> Self {
        let running = self
            .running
            .take()
            .expect("restart needs an in-process broker");
        running.shutdown().await;
        tokio::time::sleep(pause).await;
        between(self.data_dir());
        let config = self.config.clone().expect("in-process broker has a config");
        let running = warren_broker::start(config)
            .await
            .expect("broker restarts on the same data directory");
        let addr = running.amqp_addr;
        self.uri = format!("amqp://guest:guest@{addr}/%2f");
        self.addr = addr;
        self.running = Some(running);
        self
    }
}

fn external_addr(uri: &str) -> std::net::SocketAddr {
    let rest = uri.split("://").nth(1).unwrap_or(uri);
    let host = rest.rsplit('@').next().unwrap_or(rest);
    let host = host.split('/').next().unwrap_or(host);
    use std::net::ToSocketAddrs;
    host.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .expect("WARREN_TEST_AMQP_URL has a host:port")
}

/// A table of arguments or headers.
pub fn args(pairs: &[(&str, lapin::types::AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// A long string value.
pub fn text(s: &str) -> lapin::types::AMQPValue {
    lapin::types::AMQPValue::LongString(lapin::types::LongString::from(s.as_bytes().to_vec()))
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    let n: u64 = rand::random();
    format!("{prefix}-{n:016x}")
}

/// Awaits a future with a deadline, so a broken broker fails a test instead of hanging it.
pub async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("timed out")
}

/// The reply code and text of an AMQP error (channel or connection close sent by the server).
pub fn amqp_error(err: &lapin::Error) -> Option<(u16, String)> {
    match err.kind() {
        ErrorKind::ProtocolError(e) => Some((e.get_id(), e.get_message().to_string())),
        _ => None,
    }
}

/// Asserts that `result` failed with this exact AMQP reply code and text.
#[track_caller]
pub fn assert_amqp_error<T: std::fmt::Debug>(result: lapin::Result<T>, code: u16, text: &str) {
    match result {
        Ok(v) => panic!("expected AMQP error {code} {text:?}, got Ok({v:?})"),
        Err(e) => match amqp_error(&e) {
            Some((c, t)) => assert_eq!((c, t.as_str()), (code, text), "AMQP error"),
            None => panic!("expected AMQP error {code} {text:?}, got {e:?}"),
        },
    }
}

/// The errors a connection reports (channels closed by the server, then the connection itself):
/// subscribe before doing what should fail, then await [`Errors::next`].
pub struct Errors(Pin<Box<dyn Stream<Item = Event> + Send>>);

pub fn errors(conn: &Connection) -> Errors {
    Errors(Box::pin(conn.events_listener()))
}

impl Errors {
    /// The next AMQP error (reply code and text), within 5 seconds.
    pub async fn next(&mut self) -> (u16, String) {
        let deadline = Duration::from_secs(5);
        tokio::time::timeout(deadline, async {
            loop {
                match self.0.next().await {
                    Some(Event::Error(e)) => {
                        if let Some(err) = amqp_error(&e) {
                            return err;
                        }
                    }
                    Some(_) => {}
                    None => panic!("connection events ended without an AMQP error"),
                }
            }
        })
        .await
        .expect("timed out waiting for the server to close the channel or connection")
    }

    /// Asserts that no AMQP error arrives within `ms` milliseconds.
    pub async fn none_within(&mut self, ms: u64) {
        let got = tokio::time::timeout(Duration::from_millis(ms), async {
            loop {
                match self.0.next().await {
                    Some(Event::Error(e)) => {
                        if let Some(err) = amqp_error(&e) {
                            return err;
                        }
                    }
                    Some(_) => {}
                    None => std::future::pending::<()>().await,
                }
            }
        })
        .await;
        if let Ok(err) = got {
            panic!("unexpected AMQP error {err:?}");
        }
    }
}

/// The next delivery of `consumer`, within 5 seconds.
pub async fn next_delivery(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(5), consumer.next())
        .await
        .expect("no delivery within 5 seconds")
        .expect("consumer ended")
        .expect("delivery")
}

/// Asserts that `consumer` receives nothing within `ms` milliseconds.
pub async fn no_delivery(consumer: &mut Consumer, ms: u64) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(ms), consumer.next()).await {
        match item {
            Some(Ok(d)) => panic!(
                "unexpected delivery {:?} (tag {})",
                String::from_utf8_lossy(&d.data),
                d.delivery_tag
            ),
            other => panic!("unexpected consumer event {other:?}"),
        }
    }
}

/// Declares an exclusive queue named `name` (server-named if empty) and returns its name.
pub async fn exclusive_queue(ch: &Channel, name: &str) -> String {
    let q = within(
        5,
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("queue.declare");
    q.name().to_string()
}

/// Starts a consumer with a server-generated tag.
pub async fn consume(ch: &Channel, queue: &str, options: BasicConsumeOptions) -> Consumer {
    within(
        5,
        ch.basic_consume(queue.into(), "".into(), options, FieldTable::default()),
    )
    .await
    .expect("basic.consume")
}

/// Number of ready messages in `queue`, through a passive declare.
pub async fn ready_count(ch: &Channel, queue: &str) -> u32 {
    within(
        5,
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await
    .expect("passive queue.declare")
    .message_count()
}

/// Whether `queue` exists, through a passive declare on a fresh channel.
pub async fn queue_exists(conn: &Connection, queue: &str) -> bool {
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let res = within(
        5,
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    match res {
        Ok(_) => {
            let _ = ch.close(200, "OK".into()).await;
            true
        }
        Err(e) => {
            let expected = format!("NOT_FOUND - no queue '{queue}' in vhost '/'");
            assert_eq!(amqp_error(&e), Some((404, expected)), "passive declare");
            false
        }
    }
}

/// Whether `exchange` exists, through a passive declare on a fresh channel.
pub async fn exchange_exists(conn: &Connection, exchange: &str) -> bool {
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let res = within(
        5,
        ch.exchange_declare(
            exchange.into(),
            lapin::ExchangeKind::Direct,
            lapin::options::ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await;
    match res {
        Ok(()) => {
            let _ = ch.close(200, "OK".into()).await;
            true
        }
        Err(e) => {
            let expected = format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'");
            assert_eq!(amqp_error(&e), Some((404, expected)), "passive declare");
            false
        }
    }
}

/// Publishes `body` through the default exchange to `queue` (no confirm).
pub async fn publish_to(ch: &Channel, queue: &str, body: &[u8]) {
    within(
        5,
        ch.basic_publish(
            "".into(),
            queue.into(),
            Default::default(),
            body,
            Default::default(),
        ),
    )
    .await
    .expect("basic.publish");
}

/// Publishes `body` to `queue` from a fresh confirm channel and waits for the broker's ack, so
/// the message is enqueued when this returns.
pub async fn publish_confirmed_to(conn: &Connection, queue: &str, body: &[u8]) {
    let ch = within(5, conn.create_channel()).await.expect("channel");
    within(5, ch.confirm_select(Default::default()))
        .await
        .expect("confirm.select");
    let confirm = within(
        5,
        ch.basic_publish(
            "".into(),
            queue.into(),
            Default::default(),
            body,
            Default::default(),
        ),
    )
    .await
    .expect("basic.publish");
    let c = within(5, confirm).await.expect("confirm");
    assert!(c.is_ack(), "publish confirmed: {c:?}");
    let _ = ch.close(200, "OK".into()).await;
}

/// Polls until `cond` holds, for at most 5 seconds.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
