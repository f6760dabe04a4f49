//! TLS: AMQPS and HTTPS with certificates made here by rcgen (a CA, a server certificate for
//! 127.0.0.1 and localhost signed by it, a client certificate signed by it, and a second CA the
//! broker does not trust with a client certificate of its own), served from PEM files in a
//! temporary directory. Real clients do the talking: lapin over rustls for AMQPS, reqwest over
//! rustls for HTTPS; a bare tokio-rustls client checks the wire where the exact alert matters.

mod common;

use common::http::Api;
use common::*;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use warren_broker::config::{Config, ConfigError, Flags, Settings};

// --------------------------------------------------------------------------- certificates

/// A certificate and its private key, as PEM.
#[derive(Clone)]
struct Identity {
    cert: String,
    key: String,
}

/// The test's public key infrastructure, written where the broker reads it.
struct Pki {
    dir: tempfile::TempDir,
    /// The CA the broker trusts (and its server certificate is signed by).
    ca: String,
    /// A client certificate signed by `ca`.
    client: Identity,
    /// A CA the broker knows nothing of.
    rogue_ca: String,
    /// A client certificate signed by `rogue_ca`.
    rogue_client: Identity,
}

fn new_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA")
}

fn new_leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
) -> Identity {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("leaf parameters");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, ca).expect("leaf certificate");
    Identity {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = new_ca("Warren test CA");
        let server = new_leaf(
            &ca,
            &["127.0.0.1", "localhost"],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = new_leaf(&ca, &[], "tls-client", ExtendedKeyUsagePurpose::ClientAuth);
        let rogue = new_ca("Rogue CA");
        let rogue_client = new_leaf(
            &rogue,
            &[],
            "rogue-client",
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let pki = Self {
            dir,
            ca: ca.pem(),
            client,
            rogue_ca: rogue.pem(),
            rogue_client,
        };
        pki.write("ca.pem", &pki.ca);
        pki.write("server.pem", &server.cert);
        pki.write("server.key", &server.key);
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).expect("write PEM file");
        path
    }

    /// The server's certificate and key (no client certificates asked for).
    fn serve(&self, c: &mut Config) {
        c.tls_cert_file = Some(self.path("server.pem"));
        c.tls_key_file = Some(self.path("server.key"));
    }

    /// AMQPS and HTTPS on ephemeral ports.
    fn listen(&self, c: &mut Config) {
        self.serve(c);
        c.amqps_listen = Some("127.0.0.1:0".parse().unwrap());
        c.management_tls_listen = Some("127.0.0.1:0".parse().unwrap());
    }

    /// AMQPS and HTTPS that require a client certificate signed by the CA.
    fn listen_verifying_peers(&self, c: &mut Config) {
        self.listen(c);
        c.tls_ca_file = Some(self.path("ca.pem"));
        c.tls_verify_peer = true;
    }
}

async fn tls_broker(pki: &Pki, tune: impl FnOnce(&Pki, &mut Config)) -> TestBroker {
    TestBroker::start_with(|c| tune(pki, c)).await
}

fn amqps_addr(b: &TestBroker) -> SocketAddr {
    b.running().amqps_addr.expect("an AMQPS listener")
}

fn https_addr(b: &TestBroker) -> SocketAddr {
    b.running()
        .management_tls_addr
        .expect("an HTTPS management listener")
}

/// An error and every error below it, on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

// --------------------------------------------------------------------------- clients

/// lapin over rustls, trusting `ca`, presenting `identity` if given.
async fn amqps_connect(
    addr: SocketAddr,
    ca: &str,
    identity: Option<&Identity>,
) -> lapin::Result<Connection> {
    let tls = OwnedTLSConfig {
        identity: identity.map(|id| OwnedIdentity::PKCS8 {
            pem: id.cert.clone().into_bytes(),
            key: id.key.clone().into_bytes(),
        }),
        cert_chain: Some(ca.to_owned()),
    };
    within(
        10,
        Connection::connect_with_config(
            &format!("amqps://guest:guest@127.0.0.1:{}/%2f", addr.port()),
            ConnectionProperties::default(),
            tls,
            lapin::runtime::default_runtime()?,
        ),
    )
    .await
}

/// Declares a queue, publishes to it and consumes the message back: the connection carries
/// AMQP both ways.
async fn round_trip(conn: &Connection) {
    let ch = within(5, conn.create_channel()).await.expect("channel");
    let queue = exclusive_queue(&ch, "").await;
    within(5, ch.confirm_select(Default::default()))
        .await
        .expect("confirm.select");
    let confirm = within(
        5,
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            b"over tls",
            BasicProperties::default(),
        ),
    )
    .await
    .expect("basic.publish");
    assert!(within(5, confirm).await.expect("confirm").is_ack());
    let mut consumer = consume(
        &ch,
        &queue,
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await;
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.data, b"over tls");
    // Closed here rather than on drop, so a connection.close that follows does not race it.
    within(5, ch.close(200, "OK".into()))
        .await
        .expect("channel.close");
}

/// reqwest over rustls, trusting only `ca`, presenting `identity` if given.
fn https_client(ca: &str, identity: Option<&Identity>) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.as_bytes()).expect("CA PEM"))
        .timeout(Duration::from_secs(10));
    if let Some(id) = identity {
        let pem = format!("{}{}", id.cert, id.key);
        builder = builder.identity(reqwest::Identity::from_pem(pem.as_bytes()).expect("identity"));
    }
    builder.build().expect("HTTPS client")
}

async fn get_overview(
    client: &reqwest::Client,
    addr: SocketAddr,
) -> reqwest::Result<reqwest::Response> {
    client
        .get(format!("https://127.0.0.1:{}/api/overview", addr.port()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
}

/// A bare rustls client configuration, trusting `ca`, presenting `identity` if given.
fn raw_connector(ca: &str, identity: Option<&Identity>) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let config = match identity {
        Some(id) => {
            let certs = CertificateDer::pem_slice_iter(id.cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("client certificate PEM");
            let key = PrivateKeyDer::from_pem_slice(id.key.as_bytes()).expect("client key PEM");
            builder
                .with_client_auth_cert(certs, key)
                .expect("client identity")
        }
        None => builder.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(config))
}

/// The first frame's type, channel, class and method.
type FrameHead = (u8, u16, u16, u16);

/// Over a bare TLS connection: sends the AMQP 0-9-1 protocol header and reads the first frame
/// back. Errors say where it failed (`handshake: …` or `read: …`) and why.
async fn amqp_hello(addr: SocketAddr, connector: &TlsConnector) -> Result<FrameHead, String> {
    within(10, async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let name = ServerName::IpAddress(addr.ip().into());
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {}", chain(&e)))?;
        tls.write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .map_err(|e| format!("write: {}", chain(&e)))?;
        let mut head = [0u8; 7];
        tls.read_exact(&mut head)
            .await
            .map_err(|e| format!("read: {}", chain(&e)))?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        tls.read_exact(&mut payload)
            .await
            .map_err(|e| format!("read: {}", chain(&e)))?;
        assert_eq!(payload[size], 0xCE, "frame end");
        Ok((
            head[0],
            u16::from_be_bytes([head[1], head[2]]),
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        ))
    })
    .await
}

/// Connection.Start on channel 0, in a method frame.
const CONNECTION_START: FrameHead = (1, 0, 10, 10);

/// Asserts that a bare TLS client was refused with this alert (or client-side error) name.
#[track_caller]
fn assert_refused(result: Result<FrameHead, String>, why: &str) {
    match result {
        Ok(frame) => panic!("expected a refusal ({why}), got frame {frame:?}"),
        Err(e) => assert!(e.contains(why), "expected {why:?} in {e:?}"),
    }
}

// --------------------------------------------------------------------------- AMQPS

#[tokio::test]
async fn amqps_carries_amqp_for_a_client_that_trusts_the_ca() {
    let pki = Pki::new();
    let b = tls_broker(&pki, Pki::listen).await;
    let addr = amqps_addr(&b);
    assert_ne!(addr.port(), 0);
    assert_ne!(addr, b.addr, "AMQPS has a listener of its own");

    assert_eq!(
        amqp_hello(addr, &raw_connector(&pki.ca, None)).await,
        Ok(CONNECTION_START)
    );

    let conn = amqps_connect(addr, &pki.ca, None)
        .await
        .expect("AMQPS connection");
    round_trip(&conn).await;

    // The management API tells TLS connections apart, with RabbitMQ's field names.
    let api = Api::new(&b);
    let connections = api.json("/api/connections").await;
    let list = connections.as_array().expect("a list");
    assert_eq!(list.len(), 1, "{connections}");
    let c = &list[0];
    assert_eq!(c["ssl"], true, "{c}");
    assert_eq!(c["ssl_protocol"], "tlsv1.3", "{c}");
    assert_eq!(c["port"], addr.port(), "{c}");
    assert!(
        c["ssl_cipher"].as_str().is_some_and(|s| !s.is_empty()),
        "{c}"
    );
    within(5, conn.close(200, "OK".into()))
        .await
        .expect("close");
}

#[tokio::test]
async fn plain_amqp_keeps_working_beside_amqps() {
    let pki = Pki::new();
    let b = tls_broker(&pki, Pki::listen).await;
    let plain = b.connect().await;
    round_trip(&plain).await;
    let api = Api::new(&b);
    let connections = api.json("/api/connections").await;
    assert_eq!(connections[0]["ssl"], false, "{connections}");
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_ca_fails_the_handshake_and_the_broker_keeps_serving() {
    let pki = Pki::new();
    let b = tls_broker(&pki, Pki::listen).await;
    let addr = amqps_addr(&b);

    assert_refused(
        amqp_hello(addr, &raw_connector(&pki.rogue_ca, None)).await,
        "UnknownIssuer",
    );
    let refused = amqps_connect(addr, &pki.rogue_ca, None).await;
    assert!(refused.is_err(), "lapin trusting another CA connected");

    // Plain AMQP, and AMQPS for a client that trusts the CA, carry on.
    round_trip(&b.connect().await).await;
    let conn = amqps_connect(addr, &pki.ca, None)
        .await
        .expect("AMQPS connection after a failed handshake");
    round_trip(&conn).await;
}

#[tokio::test]
async fn plain_amqp_sent_to_the_amqps_port_is_dropped() {
    let pki = Pki::new();
    let b = tls_broker(&pki, Pki::listen).await;
    let addr = amqps_addr(&b);
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(b"AMQP\x00\x00\x09\x01").await.expect("write");
    // No Connection.Start: at most a TLS alert (record type 21), then the connection closes.
    let mut answer = Vec::new();
    let _ = within(5, tcp.read_to_end(&mut answer)).await;
    assert!(
        answer.is_empty() || answer[0] == 21,
        "unexpected answer {answer:?}"
    );
    assert_eq!(
        amqp_hello(addr, &raw_connector(&pki.ca, None)).await,
        Ok(CONNECTION_START)
    );
}

#[tokio::test]
async fn a_stalled_handshake_holds_up_no_one_and_is_dropped_after_the_handshake_timeout() {
    let pki = Pki::new();
    let b = tls_broker(&pki, |p, c| {
        p.listen(c);
        c.handshake_timeout = 3;
    })
    .await;
    let addr = amqps_addr(&b);
    // A client that connects and never says a word…
    let mut stalled = TcpStream::connect(addr).await.expect("connect");
    // …does not keep the next one waiting: its handshake completes while the stalled one is
    // still open,
    assert_eq!(
        amqp_hello(addr, &raw_connector(&pki.ca, None)).await,
        Ok(CONNECTION_START)
    );
    let mut buf = [0u8; 16];
    assert!(
        matches!(stalled.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the stalled connection was closed before the next client was served"
    );
    // and it is closed once the handshake timeout has passed.
    let read = within(10, stalled.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "stalled connection not closed: {read:?}"
    );
}

// --------------------------------------------------------------------------- HTTPS

#[tokio::test]
async fn https_management_answers_with_basic_auth() {
    let pki = Pki::new();
    let b = tls_broker(&pki, Pki::listen).await;
    let addr = https_addr(&b);
    assert_ne!(addr, b.running().management_addr);

    let client = https_client(&pki.ca, None);
    let resp = get_overview(&client, addr).await.expect("HTTPS request");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap()),
        Some("application/json")
    );
    let overview: Value = resp.json().await.expect("JSON body");
    // Both TLS listeners are listed as RabbitMQ names them.
    let listeners = overview["listeners"].as_array().expect("listeners");
    let port_of = |protocol: &str| {
        listeners
            .iter()
            .find(|l| l["protocol"] == protocol)
            .map(|l| l["port"].as_u64().unwrap())
    };
    assert_eq!(
        port_of("amqp/ssl"),
        Some(u64::from(amqps_addr(&b).port())),
        "{overview}"
    );
    assert_eq!(port_of("https"), Some(u64::from(addr.port())), "{overview}");

    // Credentials are checked over HTTPS as over HTTP.
    let resp = client
        .get(format!("https://127.0.0.1:{}/api/overview", addr.port()))
        .basic_auth("guest", Some("wrong"))
        .send()
        .await
        .expect("HTTPS request");
    assert_eq!(resp.status(), 401);

    // The plain listener still answers.
    Api::new(&b).json("/api/overview").await;
}

#[tokio::test]
async fn https_handshakes_count_against_the_connection_cap_and_time_out_like_idle_requests() {
    let pki = Pki::new();
    let b = tls_broker(&pki, |p, c| {
        p.listen(c);
        c.http_max_connections = 1;
        c.http_idle_timeout_ms = 1000;
        c.handshake_timeout = 60;
    })
    .await;
    let addr = https_addr(&b);
    let connector = raw_connector(&pki.ca, None);
    let name = ServerName::IpAddress(addr.ip().into());
    // A client that connects and never starts its handshake takes the only place...
    let mut stalled = TcpStream::connect(addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // ...so another client's handshake is not answered while it is open...
    let waiting = TcpStream::connect(addr).await.expect("connect");
    assert!(
        tokio::time::timeout(
            Duration::from_millis(300),
            connector.connect(name.clone(), waiting)
        )
        .await
        .is_err(),
        "a handshake past the cap was answered"
    );
    // ...until the stalled one is closed, after the idle timeout rather than the AMQP
    // handshake timeout...
    let mut buf = [0u8; 16];
    let read = within(5, stalled.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "stalled connection not closed: {read:?}"
    );
    // ...and then a client is served.
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut tls = within(5, connector.connect(name, tcp))
        .await
        .expect("handshake once a place is free");
    tls.write_all(
        format!(
            "GET /api/whoami HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let _ = within(5, tls.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn https_refuses_a_client_that_does_not_trust_the_ca() {
    let pki = Pki::new();
    let b = tls_broker(&pki, Pki::listen).await;
    let addr = https_addr(&b);
    let err = get_overview(&https_client(&pki.rogue_ca, None), addr)
        .await
        .expect_err("a client trusting another CA got an answer");
    assert!(chain(&err).contains("UnknownIssuer"), "{}", chain(&err));
    let resp = get_overview(&https_client(&pki.ca, None), addr)
        .await
        .expect("HTTPS request after a failed handshake");
    assert_eq!(resp.status(), 200);
}

// --------------------------------------------------------------------------- client certificates

#[tokio::test]
async fn with_verify_peer_a_client_certificate_signed_by_the_ca_is_accepted() {
    let pki = Pki::new();
    let b = tls_broker(&pki, Pki::listen_verifying_peers).await;

    assert_eq!(
        amqp_hello(amqps_addr(&b), &raw_connector(&pki.ca, Some(&pki.client))).await,
        Ok(CONNECTION_START)
    );
    let conn = amqps_connect(amqps_addr(&b), &pki.ca, Some(&pki.client))
        .await
        .expect("AMQPS connection with a client certificate");
    round_trip(&conn).await;

    let resp = get_overview(&https_client(&pki.ca, Some(&pki.client)), https_addr(&b))
        .await
        .expect("HTTPS request with a client certificate");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn with_verify_peer_a_client_without_a_certificate_is_refused() {
    let pki = Pki::new();
    let b = tls_broker(&pki, Pki::listen_verifying_peers).await;

    assert_refused(
        amqp_hello(amqps_addr(&b), &raw_connector(&pki.ca, None)).await,
        "CertificateRequired",
    );
    assert!(
        amqps_connect(amqps_addr(&b), &pki.ca, None).await.is_err(),
        "lapin without a client certificate connected"
    );
    let err = get_overview(&https_client(&pki.ca, None), https_addr(&b))
        .await
        .expect_err("an HTTPS client without a certificate got an answer");
    assert!(
        chain(&err).contains("CertificateRequired"),
        "{}",
        chain(&err)
    );

    // Refusals leave the listeners serving.
    let conn = amqps_connect(amqps_addr(&b), &pki.ca, Some(&pki.client))
        .await
        .expect("AMQPS connection after refusals");
    round_trip(&conn).await;
}

#[tokio::test]
async fn with_verify_peer_a_client_certificate_from_another_ca_is_refused() {
    let pki = Pki::new();
    let b = tls_broker(&pki, Pki::listen_verifying_peers).await;

    assert_refused(
        amqp_hello(
            amqps_addr(&b),
            &raw_connector(&pki.ca, Some(&pki.rogue_client)),
        )
        .await,
        "UnknownCA",
    );
    assert!(
        amqps_connect(amqps_addr(&b), &pki.ca, Some(&pki.rogue_client))
            .await
            .is_err(),
        "lapin with a certificate from another CA connected"
    );
    let err = get_overview(
        &https_client(&pki.ca, Some(&pki.rogue_client)),
        https_addr(&b),
    )
    .await
    .expect_err("an HTTPS client with a certificate from another CA got an answer");
    assert!(chain(&err).contains("UnknownCA"), "{}", chain(&err));
}

#[tokio::test]
async fn with_a_ca_file_but_no_verify_peer_client_certificates_are_optional_but_checked() {
    let pki = Pki::new();
    let b = tls_broker(&pki, |p, c| {
        p.listen(c);
        c.tls_ca_file = Some(p.path("ca.pem"));
    })
    .await;
    let addr = amqps_addr(&b);
    assert_eq!(
        amqp_hello(addr, &raw_connector(&pki.ca, None)).await,
        Ok(CONNECTION_START)
    );
    assert_eq!(
        amqp_hello(addr, &raw_connector(&pki.ca, Some(&pki.client))).await,
        Ok(CONNECTION_START)
    );
    assert_refused(
        amqp_hello(addr, &raw_connector(&pki.ca, Some(&pki.rogue_client))).await,
        "UnknownCA",
    );
}

// --------------------------------------------------------------------------- configuration

/// A configuration for a broker that is expected not to start.
fn config_in(data: &Path, pki: &Pki) -> Config {
    let mut c = Config {
        data_dir: data.to_path_buf(),
        amqp_listen: "127.0.0.1:0".parse().unwrap(),
        management_listen: "127.0.0.1:0".parse().unwrap(),
        prometheus_listen: "127.0.0.1:0".parse().unwrap(),
        cluster_listen: "127.0.0.1:0".parse().unwrap(),
        ..Config::default()
    };
    pki.listen(&mut c);
    c
}

/// Starts a broker that must fail, and returns its error message.
async fn start_error(config: Config) -> String {
    config
        .validate()
        .expect("the configuration itself is valid");
    match within(10, warren_broker::start(config)).await {
        Ok(running) => {
            running.shutdown().await;
            panic!("the broker started")
        }
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_missing_certificate_file_stops_start_with_an_error_naming_it() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut c = config_in(data.path(), &pki);
    let missing = pki.path("no-such-cert.pem");
    c.tls_cert_file = Some(missing.clone());
    let err = start_error(c).await;
    assert!(err.contains(&missing.display().to_string()), "{err}");
    // Nothing was written to the data directory of a broker that could not start.
    assert_eq!(std::fs::read_dir(data.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn a_certificate_file_without_certificates_stops_start_with_an_error_naming_it() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut c = config_in(data.path(), &pki);
    let garbage = pki.write("garbage-cert.pem", "this is not a certificate\n");
    c.tls_cert_file = Some(garbage.clone());
    let err = start_error(c).await;
    assert!(err.contains(&garbage.display().to_string()), "{err}");
}

#[tokio::test]
async fn a_key_file_without_a_key_stops_start_with_an_error_naming_it() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "garbage.key",
            "-----BEGIN PRIVATE KEY-----\nnot base64 at all!\n-----END PRIVATE KEY-----\n",
        ),
        ("empty.key", ""),
        ("cert-as.key", pki.client.cert.as_str()),
    ] {
        let mut c = config_in(data.path(), &pki);
        let key = pki.write(name, text);
        c.tls_key_file = Some(key.clone());
        let err = start_error(c).await;
        assert!(err.contains(&key.display().to_string()), "{name}: {err}");
    }
    let mut c = config_in(data.path(), &pki);
    let missing = pki.path("no-such.key");
    c.tls_key_file = Some(missing.clone());
    let err = start_error(c).await;
    assert!(err.contains(&missing.display().to_string()), "{err}");
}

#[tokio::test]
async fn a_key_that_does_not_match_the_certificate_stops_start_with_an_error_naming_both() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let mut c = config_in(data.path(), &pki);
    // A well-formed key, but the client certificate's, not the server's.
    let other = pki.write("other.key", &pki.client.key);
    c.tls_key_file = Some(other.clone());
    let err = start_error(c).await;
    assert!(err.contains(&other.display().to_string()), "{err}");
    assert!(
        err.contains(&pki.path("server.pem").display().to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn a_missing_or_empty_ca_file_stops_start_with_an_error_naming_it() {
    let pki = Pki::new();
    let data = tempfile::tempdir().unwrap();
    let missing = pki.path("no-such-ca.pem");
    let empty = pki.write("empty-ca.pem", "");
    for ca in [missing, empty] {
        let mut c = config_in(data.path(), &pki);
        c.tls_ca_file = Some(ca.clone());
        c.tls_verify_peer = true;
        let err = start_error(c).await;
        assert!(err.contains(&ca.display().to_string()), "{err}");
    }
}

#[test]
fn tls_listeners_without_certificate_and_key_are_refused_by_validation() {
    let addr: SocketAddr = "127.0.0.1:5671".parse().unwrap();
    let invalid = |c: Config| match c.validate() {
        Err(ConfigError::Invalid(why)) => why,
        other => panic!("expected an invalid configuration, got {other:?}"),
    };
    for (amqps, https) in [(Some(addr), None), (None, Some(addr))] {
        let why = invalid(Config {
            amqps_listen: amqps,
            management_tls_listen: https,
            ..Config::default()
        });
        assert!(why.contains("tls_cert_file"), "{why}");
        let why = invalid(Config {
            amqps_listen: amqps,
            management_tls_listen: https,
            tls_cert_file: Some("server.pem".into()),
            ..Config::default()
        });
        assert!(why.contains("tls_key_file"), "{why}");
    }
    let why = invalid(Config {
        tls_verify_peer: true,
        ..Config::default()
    });
    assert!(why.contains("tls_ca_file"), "{why}");

    // The same through flags (and so the environment), as the binary loads them.
    let err = Config::load(Flags {
        settings: Settings {
            amqps_listen: Some(addr),
            ..Settings::default()
        },
        ..Flags::default()
    })
    .expect_err("AMQPS without a certificate");
    assert!(matches!(err, ConfigError::Invalid(_)), "{err}");

    // Certificate and key alone, without a TLS listener, are fine.
    Config {
        tls_cert_file: Some("server.pem".into()),
        tls_key_file: Some("server.key".into()),
        ..Config::default()
    }
    .validate()
    .expect("certificate files without TLS listeners");
}

#[tokio::test]
async fn start_refuses_tls_listeners_without_certificate_and_key() {
    // `start` takes a Config that may not have been validated: it must refuse, not panic.
    let data = tempfile::tempdir().unwrap();
    let c = Config {
        data_dir: data.path().to_path_buf(),
        amqp_listen: "127.0.0.1:0".parse().unwrap(),
        management_listen: "127.0.0.1:0".parse().unwrap(),
        prometheus_listen: "127.0.0.1:0".parse().unwrap(),
        cluster_listen: "127.0.0.1:0".parse().unwrap(),
        amqps_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    };
    match within(10, warren_broker::start(c)).await {
        Ok(r) => {
            r.shutdown().await;
            panic!("started without a certificate");
        }
        Err(e) => assert!(e.to_string().contains("tls_cert_file"), "{e}"),
    }
}
