//! The Prometheus endpoints against a live broker: RabbitMQ's family names, types and labels,
//! node sums that agree with the per-object figures, counters that never go down, and output
//! that `promtool check metrics` accepts.

mod common;

use common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};

/// One scrape, parsed: the type of each family and the value of each sample (name plus its
/// labels as written, e.g. `rabbitmq_queue_messages_ready{vhost="/",queue="q"}`).
#[derive(Debug)]
struct Scrape {
    content_type: String,
    text: String,
    types: BTreeMap<String, String>,
    helps: BTreeMap<String, String>,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    fn value(&self, sample: &str) -> f64 {
        *self
            .samples
            .get(sample)
            .unwrap_or_else(|| panic!("no sample {sample} in\n{}", self.text))
    }

    /// Samples of one family, by their label part.
    fn family(&self, name: &str) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter_map(|(k, v)| {
                let labels = k.strip_prefix(name)?;
                (labels.is_empty() || labels.starts_with('{')).then(|| (labels.to_owned(), *v))
            })
            .collect()
    }
}

fn parse(content_type: String, text: String) -> Scrape {
    let mut types = BTreeMap::new();
    let mut helps = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "family {name} typed twice"
            );
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("# HELP name text");
            helps.insert(name.to_owned(), help.to_owned());
        } else if !line.is_empty() {
            let (sample, value) = line.rsplit_once(' ').expect("sample value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            assert!(
                samples.insert(sample.to_owned(), value).is_none(),
                "sample {sample} twice"
            );
        }
    }
    Scrape {
        content_type,
        text,
        types,
        helps,
        samples,
    }
}

async fn scrape(b: &TestBroker, path: &str) -> Scrape {
    let url = format!("http://{}{path}", b.running().prometheus_addr);
    let r = reqwest::get(&url).await.expect("scrape");
    assert_eq!(r.status(), 200, "{url}");
    let content_type = r.headers()["content-type"].to_str().unwrap().to_owned();
    parse(content_type, r.text().await.unwrap())
}

async fn declare(ch: &Channel, name: &str) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn publish_confirmed(ch: &Channel, queue: &str, n: usize) {
    for _ in 0..n {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"hello",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

#[tokio::test]
async fn metrics_use_rabbitmqs_families_types_and_content_type() {
    let b = TestBroker::start().await;
    let m = scrape(&b, "/metrics").await;
    assert_eq!(m.content_type, "text/plain; version=0.0.4");
    for (family, kind) in [
        ("rabbitmq_build_info", "gauge"),
        ("rabbitmq_identity_info", "gauge"),
        ("rabbitmq_connections", "gauge"),
        ("rabbitmq_channels", "gauge"),
        ("rabbitmq_queues", "gauge"),
        ("rabbitmq_consumers", "gauge"),
        ("rabbitmq_connections_opened_total", "counter"),
        ("rabbitmq_queues_declared_total", "counter"),
        ("rabbitmq_queue_messages_ready", "gauge"),
        ("rabbitmq_queue_messages_unacked", "gauge"),
        ("rabbitmq_queue_messages", "gauge"),
        ("rabbitmq_queue_messages_published_total", "counter"),
        ("rabbitmq_queue_messages_delivered_total", "counter"),
        ("rabbitmq_queue_messages_acked_total", "counter"),
        ("rabbitmq_global_messages_received_total", "counter"),
        ("rabbitmq_global_messages_routed_total", "counter"),
        ("rabbitmq_global_messages_delivered_total", "counter"),
        ("rabbitmq_global_messages_confirmed_total", "counter"),
        ("rabbitmq_process_resident_memory_bytes", "gauge"),
        ("rabbitmq_process_open_fds", "gauge"),
        ("rabbitmq_process_max_fds", "gauge"),
        ("rabbitmq_disk_space_available_bytes", "gauge"),
        ("rabbitmq_alarms_memory_used_watermark", "gauge"),
        ("rabbitmq_alarms_free_disk_space_watermark", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert_eq!(
            m.types.get(family).map(String::as_str),
            Some(kind),
            "family {family}"
        );
        assert!(m.helps.contains_key(family), "help of {family}");
    }
    for (family, kind) in &m.types {
        assert!(
            kind == "gauge" || kind == "counter",
            "{family} is {kind}: RabbitMQ's plugin exposes gauges and counters"
        );
        assert_eq!(
            family.ends_with("_total"),
            kind == "counter",
            "{family}: counters and only counters end in _total"
        );
    }
    let build = m.family("rabbitmq_build_info");
    let (labels, value) = build.iter().next().unwrap();
    assert_eq!(*value, 1.0);
    assert!(labels.contains("rabbitmq_version=\"3.10.8\""), "{labels}");
    assert!(m.value("rabbitmq_process_resident_memory_bytes") > 1e6);
    assert!(m.value("rabbitmq_process_open_fds") > 0.0);
    assert!(m.value("rabbitmq_disk_space_available_bytes") > 0.0);
    assert_eq!(m.value("rabbitmq_alarms_memory_used_watermark"), 0.0);
    // The per-queue-type global families list every queue type, as RabbitMQ does.
    let delivered = m.family("rabbitmq_global_messages_delivered_total");
    assert_eq!(delivered.len(), 3, "{delivered:?}");
    // No authentication, like RabbitMQ's plugin; unknown registries are 404.
    let url = format!("http://{}/metrics/nope", b.running().prometheus_addr);
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 404);
}

#[tokio::test]
async fn per_object_metrics_label_queues_channels_and_sum_to_the_node_totals() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let admin = conn.create_channel().await.unwrap();
    declare(&admin, "m.one").await;
    declare(&admin, "m.two").await;
    let pubs = conn.create_channel().await.unwrap();
    pubs.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish_confirmed(&pubs, "m.one", 5).await;
    publish_confirmed(&pubs, "m.two", 2).await;
    let sub = conn.create_channel().await.unwrap();
    sub.basic_qos(3, BasicQosOptions::default()).await.unwrap();
    let mut consumer = consume(&sub, "m.one", BasicConsumeOptions::default()).await;
    let first = next_delivery(&mut consumer).await;
    first.ack(BasicAckOptions::default()).await.unwrap();
    // Four left on m.one: three delivered unacknowledged (the prefetch), one ready.
    eventually("m.one settles at 1 ready, 3 unacked", || async {
        let m = scrape(&b, "/metrics/per-object").await;
        m.samples
            .get("rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"m.one\"}")
            == Some(&1.0)
            && m.samples
                .get("rabbitmq_queue_messages_unacked{vhost=\"/\",queue=\"m.one\"}")
                == Some(&3.0)
            && m.samples
                .get("rabbitmq_queue_messages_acked_total{vhost=\"/\",queue=\"m.one\"}")
                == Some(&1.0)
    })
    .await;
    let per = scrape(&b, "/metrics/per-object").await;
    let q = |family: &str, queue: &str| {
        per.value(&format!("{family}{{vhost=\"/\",queue=\"{queue}\"}}"))
    };
    assert_eq!(q("rabbitmq_queue_messages", "m.one"), 4.0);
    assert_eq!(q("rabbitmq_queue_consumers", "m.one"), 1.0);
    assert_eq!(q("rabbitmq_queue_messages_published_total", "m.one"), 5.0);
    assert_eq!(q("rabbitmq_queue_messages_delivered_total", "m.one"), 4.0);
    assert_eq!(q("rabbitmq_queue_messages_ready", "m.two"), 2.0);
    assert_eq!(q("rabbitmq_queue_consumers", "m.two"), 0.0);
    assert_eq!(q("rabbitmq_queue_messages_ready_bytes", "m.two"), 10.0);
    assert_eq!(q("rabbitmq_queue_messages_ready_bytes", "m.one"), 5.0);
    assert_eq!(q("rabbitmq_queue_messages_unacked_bytes", "m.one"), 15.0);
    assert_eq!(q("rabbitmq_queue_messages_bytes", "m.one"), 20.0);
    // Channels are labelled by connection name and number; the publisher's counters are its own.
    let published = per.family("rabbitmq_channel_messages_published_total");
    assert_eq!(published.len(), 3, "{published:?}");
    let (label, _) = published.iter().find(|(_, v)| **v == 7.0).unwrap();
    assert!(
        label.contains("channel=\"127.0.0.1:") && label.contains(" (2)\""),
        "{label}"
    );
    assert!(label.contains("vhost=\"/\""), "{label}");
    let prefetch = per.family("rabbitmq_channel_prefetch");
    assert_eq!(prefetch.values().sum::<f64>(), 0.0);
    assert_eq!(
        per.family("rabbitmq_consumer_prefetch")
            .values()
            .sum::<f64>(),
        3.0
    );
    // The node's figures are the sums of the objects'.
    let node = scrape(&b, "/metrics").await;
    for family in [
        "rabbitmq_queue_messages_ready",
        "rabbitmq_queue_messages_unacked",
        "rabbitmq_queue_messages_published_total",
        "rabbitmq_queue_messages_delivered_total",
        "rabbitmq_queue_messages_acked_total",
        "rabbitmq_channel_messages_published_total",
        "rabbitmq_channel_consumers",
    ] {
        let sum: f64 = per.family(family).values().sum();
        assert_eq!(node.value(family), sum, "{family}");
        assert_eq!(node.family(family).len(), 1, "{family} is one sample");
    }
    assert_eq!(node.value("rabbitmq_queues"), 2.0);
    assert_eq!(node.value("rabbitmq_connections"), 1.0);
    assert_eq!(node.value("rabbitmq_channels"), 3.0);
    assert_eq!(node.value("rabbitmq_consumers"), 1.0);
    assert_eq!(
        node.value("rabbitmq_global_messages_received_total{protocol=\"amqp091\"}"),
        7.0
    );
    assert_eq!(
        node.value("rabbitmq_global_messages_confirmed_total{protocol=\"amqp091\"}"),
        7.0
    );
    assert_eq!(
        node.value("rabbitmq_global_messages_routed_total{protocol=\"amqp091\"}"),
        7.0
    );
    assert_eq!(
        node.value(
            "rabbitmq_global_messages_delivered_consume_manual_ack_total{protocol=\"amqp091\",queue_type=\"rabbit_classic_queue\"}"
        ),
        4.0
    );
    // Connections are labelled too, and their traffic counted.
    let incoming = per.family("rabbitmq_connection_incoming_bytes_total");
    assert_eq!(incoming.len(), 1);
    assert!(*incoming.values().next().unwrap() > 100.0);
}

#[tokio::test]
async fn node_counters_never_go_down_as_channels_connections_and_queues_close() {
    let b = TestBroker::start().await;
    let mut last: BTreeMap<String, f64> = BTreeMap::new();
    let mut check = async |stage: &str| {
        let m = scrape(&b, "/metrics").await;
        for (sample, value) in &m.samples {
            let family = sample.split('{').next().unwrap();
            if m.types.get(family).map(String::as_str) != Some("counter") {
                continue;
            }
            if let Some(before) = last.get(sample) {
                assert!(
                    value >= before,
                    "{sample} went down from {before} to {value} after {stage}"
                );
            }
            last.insert(sample.clone(), *value);
        }
        m
    };
    check("start").await;
    for round in 0..3 {
        let conn = b.connect().await;
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let queue = format!("mono.{round}");
        declare(&ch, &queue).await;
        publish_confirmed(&ch, &queue, 10).await;
        let got = ch
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .unwrap();
        got.ack(BasicAckOptions::default()).await.unwrap();
        let during = check("traffic").await;
        assert!(during.value("rabbitmq_queue_messages_acked_total") >= (round + 1) as f64);
        ch.close(200, "bye".into()).await.unwrap();
        check("a channel closed").await;
        let other = conn.create_channel().await.unwrap();
        other
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        check("a queue deleted").await;
        conn.close(200, "bye".into()).await.unwrap();
        let after = check("a connection closed").await;
        assert_eq!(after.value("rabbitmq_connections"), 0.0);
        assert_eq!(after.value("rabbitmq_queues"), 0.0);
    }
    // Deleting a vhost takes its queues out of the sums and puts their counters in the
    // retired ones in one step.
    let api = format!("http://{}", b.running().management_addr);
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str, body: &str| {
        http.request(method, format!("{api}{path}"))
            .basic_auth("guest", Some("guest"))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    use reqwest::Method;
    for (method, path, body) in [
        (Method::PUT, "/api/vhosts/mono", "{}"),
        (
            Method::PUT,
            "/api/permissions/mono/guest",
            r#"{"configure":".*","write":".*","read":".*"}"#,
        ),
        (Method::PUT, "/api/queues/mono/q", "{}"),
        (
            Method::POST,
            "/api/exchanges/mono/amq.default/publish",
            r#"{"properties":{},"routing_key":"q","payload":"x","payload_encoding":"string"}"#,
        ),
    ] {
        let r = call(method, path, body).await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    let before = check("a publish in another vhost").await;
    assert_eq!(
        before.value("rabbitmq_queue_messages_published_total"),
        31.0
    );
    let r = call(Method::DELETE, "/api/vhosts/mono", "").await.unwrap();
    assert_eq!(r.status(), 204);
    check("a vhost deleted").await;
    assert_eq!(last["rabbitmq_queue_messages_published_total"], 31.0);
    assert_eq!(last["rabbitmq_queue_messages_acked_total"], 3.0);
    assert_eq!(last["rabbitmq_connections_opened_total"], 3.0);
    assert_eq!(last["rabbitmq_connections_closed_total"], 3.0);
    assert_eq!(last["rabbitmq_queues_deleted_total"], 4.0);
    assert!(last["rabbitmq_connection_incoming_bytes_total"] > 0.0);
}

/// promtool from Prometheus, as test.sh installs it (`WARREN_PROMTOOL`), or from the PATH.
fn promtool() -> Option<String> {
    if let Ok(p) = std::env::var("WARREN_PROMTOOL")
        && !p.is_empty()
    {
        return Some(p);
    }
    Command::new("promtool")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()
        .filter(|s| s.success())
        .map(|_| "promtool".to_owned())
}

#[tokio::test]
async fn promtool_accepts_both_endpoints_with_objects_present() {
    let Some(promtool) = promtool() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "promtool is missing: ./test.sh installs it"
        );
        eprintln!("SKIPPED: promtool is not installed (./test.sh installs it)");
        return;
    };
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare(&ch, "promtool \"quoted\" \\ name").await;
    publish_confirmed(&ch, "promtool \"quoted\" \\ name", 3).await;
    let _consumer = consume(
        &ch,
        "promtool \"quoted\" \\ name",
        BasicConsumeOptions::default(),
    )
    .await;
    for path in ["/metrics", "/metrics/per-object", ALL_DETAILED] {
        let m = scrape(&b, path).await;
        if path.ends_with("per-object") {
            // Label values are escaped as the text format requires.
            assert!(
                m.text
                    .contains("queue=\"promtool \\\"quoted\\\" \\\\ name\""),
                "{}",
                m.text
            );
        }
        let mut child = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run promtool");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(m.text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool on {path}: {said}");
        assert!(
            said.trim().is_empty(),
            "promtool on {path} found problems: {said}"
        );
    }
}

#[tokio::test]
async fn probes_answer_without_credentials_on_the_metrics_port() {
    let b = TestBroker::start().await;
    for path in ["/health/live", "/health/ready"] {
        let url = format!("http://{}{path}", b.running().prometheus_addr);
        let r = reqwest::get(&url).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(r.headers()["content-type"], "application/json");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body, serde_json::json!({"status": "ok"}), "{path}");
    }
}

/// Every family `/metrics/detailed` serves.
const ALL_DETAILED: &str = "/metrics/detailed?family=queue_coarse_metrics&family=queue_consumer_count&family=queue_metrics&family=connection_churn_metrics&family=node_coarse_metrics&family=node_metrics&family=channel_metrics&family=connection_coarse_metrics&family=connection_metrics&family=vhost_status&family=exchange_names&family=exchange_bindings";

#[tokio::test]
async fn detailed_metrics_serve_the_families_asked_for_limited_to_the_vhosts_named() {
    let b = TestBroker::start().await;
    let api = common::http::Api::new(&b);
    api.put("/api/vhosts/detail%20vh", "{}").await.status(201);
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare(&ch, "in-default").await;
    publish_confirmed(&ch, "in-default", 2).await;
    let other = TestBroker::connect_uri(&b.uri_with_vhost("detail vh")).await;
    let och = other.create_channel().await.unwrap();
    declare(&och, "in-other").await;
    let _consumer = consume(&och, "in-other", BasicConsumeOptions::default()).await;

    // As the example ServiceMonitor of RabbitMQ scrapes it.
    let m = scrape(
        &b,
        "/metrics/detailed?vhost=detail%20vh&family=queue_coarse_metrics&family=queue_consumer_count",
    )
    .await;
    assert_eq!(m.content_type, "text/plain; version=0.0.4");
    let other_q = "{vhost=\"detail vh\",queue=\"in-other\"}";
    assert_eq!(
        m.value(&format!("rabbitmq_detailed_queue_messages_ready{other_q}")),
        0.0
    );
    assert_eq!(
        m.value(&format!("rabbitmq_detailed_queue_messages{other_q}")),
        0.0
    );
    assert_eq!(
        m.value(&format!("rabbitmq_detailed_queue_consumers{other_q}")),
        1.0
    );
    assert_eq!(m.types["rabbitmq_detailed_queue_messages_unacked"], "gauge");
    assert!(!m.text.contains("in-default"), "{}", m.text);
    // Only the families asked for, with the identity families first.
    assert!(
        m.samples
            .keys()
            .any(|k| k.starts_with("rabbitmq_identity_info"))
    );
    assert!(!m.types.contains_key("rabbitmq_queue_messages_ready"));
    assert!(!m.types.contains_key("rabbitmq_detailed_queue_messages_ram"));

    // Without vhost=, every vhost's queues.
    let m = scrape(
        &b,
        "/metrics/detailed?family=queue_coarse_metrics&family=queue_metrics",
    )
    .await;
    assert_eq!(
        m.value("rabbitmq_detailed_queue_messages_ready{vhost=\"/\",queue=\"in-default\"}"),
        2.0
    );
    assert_eq!(
        m.value(
            "rabbitmq_detailed_queue_consumer_capacity{vhost=\"detail vh\",queue=\"in-other\"}"
        ),
        1.0
    );
    // The other families, named as RabbitMQ names them.
    let m = scrape(&b, ALL_DETAILED).await;
    assert_eq!(
        m.value("rabbitmq_cluster_vhost_status{vhost=\"detail vh\"}"),
        1.0
    );
    assert_eq!(
        m.value(
            "rabbitmq_cluster_exchange_name{vhost=\"/\",exchange=\"amq.direct\",type=\"direct\"}"
        ),
        1.0
    );
    assert!(!m.text.contains("exchange=\"\""), "no default exchange");
    assert_eq!(
        m.types["rabbitmq_detailed_queues_declared_total"],
        "counter"
    );
    assert_eq!(m.family("rabbitmq_detailed_connection_channels").len(), 2);
    assert_eq!(m.family("rabbitmq_detailed_channel_consumers").len(), 2);
    assert!(m.value("rabbitmq_detailed_process_open_fds") > 0.0);
    // No family asked for: the identity families alone; an unknown one is ignored.
    let m = scrape(&b, "/metrics/detailed?family=no_such_family").await;
    assert_eq!(m.types.len(), 2, "{}", m.text);
}

#[tokio::test]
async fn messages_published_over_http_are_counted_as_received_and_routed() {
    let b = TestBroker::start().await;
    let api = common::http::Api::new(&b);
    api.put("/api/queues/%2F/http-published", "{}")
        .await
        .status(201);
    let before = scrape(&b, "/metrics").await;
    let global = |m: &Scrape, name: &str| {
        m.value(&format!(
            "rabbitmq_global_messages_{name}_total{{protocol=\"amqp091\"}}"
        ))
    };
    for key in ["http-published", "nowhere"] {
        api.post(
            "/api/exchanges/%2F/amq.default/publish",
            &format!(r#"{{"properties":{{}},"routing_key":"{key}","payload":"x","payload_encoding":"string"}}"#),
        )
        .await
        .status(200);
    }
    let after = scrape(&b, "/metrics").await;
    // As RabbitMQ counts them: published with confirms and `mandatory` by its plugin.
    for (name, added) in [
        ("received", 2.0),
        ("received_confirm", 2.0),
        ("confirmed", 2.0),
        ("routed", 1.0),
        ("unroutable_returned", 1.0),
        ("unroutable_dropped", 0.0),
    ] {
        assert_eq!(
            global(&after, name) - global(&before, name),
            added,
            "{name}"
        );
    }
}

/// A publish a full `reject-publish` queue refuses: RabbitMQ's management plugin is nacked,
/// answers 400 and counts the message received and routed but not confirmed.
#[tokio::test]
async fn a_publish_over_http_refused_by_a_full_queue_is_rejected_and_not_confirmed() {
    let b = TestBroker::start().await;
    let api = common::http::Api::new(&b);
    api.put(
        "/api/queues/%2F/http-full",
        r#"{"durable":true,"arguments":{"x-max-length":1,"x-overflow":"reject-publish"}}"#,
    )
    .await
    .status(201);
    let publish = || {
        api.post(
            "/api/exchanges/%2F/amq.default/publish",
            r#"{"properties":{"delivery_mode":2},"routing_key":"http-full","payload":"x","payload_encoding":"string"}"#,
        )
    };
    let global = |m: &Scrape, name: &str| {
        m.value(&format!(
            "rabbitmq_global_messages_{name}_total{{protocol=\"amqp091\"}}"
        ))
    };
    let before = scrape(&b, "/metrics").await;
    assert_eq!(
        publish().await.status(200).json(),
        serde_json::json!({"routed": true})
    );
    let taken = scrape(&b, "/metrics").await;
    assert_eq!(
        publish().await.error(400, "bad_request"),
        "rejected Unable to publish message. Check queue limits."
    );
    let refused = scrape(&b, "/metrics").await;
    for (name, first, second) in [
        ("received", 1.0, 1.0),
        ("received_confirm", 1.0, 1.0),
        ("routed", 1.0, 1.0),
        ("confirmed", 1.0, 0.0),
        ("unroutable_returned", 0.0, 0.0),
    ] {
        assert_eq!(
            global(&taken, name) - global(&before, name),
            first,
            "{name}"
        );
        assert_eq!(
            global(&refused, name) - global(&taken, name),
            second,
            "{name}"
        );
    }
    let q = api.json("/api/queues/%2F/http-full").await;
    assert_eq!(q["messages"], 1, "{q}");
    // Refused by one target, it is rejected even though another took it.
    api.put("/api/exchanges/%2F/http-fan", r#"{"type":"fanout"}"#)
        .await
        .status(201);
    api.put("/api/queues/%2F/http-room", "{}").await.status(201);
    for q in ["http-full", "http-room"] {
        api.post(&format!("/api/bindings/%2F/e/http-fan/q/{q}"), "{}")
            .await
            .status(201);
    }
    let a = api
        .post(
            "/api/exchanges/%2F/http-fan/publish",
            r#"{"properties":{},"routing_key":"","payload":"x","payload_encoding":"string"}"#,
        )
        .await;
    assert_eq!(
        a.error(400, "bad_request"),
        "rejected Unable to publish message. Check queue limits."
    );
    let q = api.json("/api/queues/%2F/http-room").await;
    assert_eq!(q["messages"], 1, "{q}");
}

/// A delayed message the delayed store cannot take (here its directory cannot be made) is a
/// failure of the broker, not a queue limit: 500 over HTTP, counted received but neither
/// routed nor confirmed; over AMQP the publisher is nacked.
#[tokio::test]
async fn a_delayed_message_that_cannot_be_stored_is_a_server_error_over_http_and_a_nack_over_amqp()
{
    let b = TestBroker::start().await;
    if b.is_external() {
        return;
    }
    let api = common::http::Api::new(&b);
    api.put(
        "/api/exchanges/%2F/http-delayed",
        r#"{"type":"x-delayed-message","arguments":{"x-delayed-type":"fanout"}}"#,
    )
    .await
    .status(201);
    api.put("/api/queues/%2F/http-delayed-q", "{}")
        .await
        .status(201);
    api.post("/api/bindings/%2F/e/http-delayed/q/http-delayed-q", "{}")
        .await
        .status(201);
    // A file where the delayed store's directory would be made.
    std::fs::write(b.data_dir().join("delayed"), b"not a directory").unwrap();
    let global = |m: &Scrape, name: &str| {
        m.value(&format!(
            "rabbitmq_global_messages_{name}_total{{protocol=\"amqp091\"}}"
        ))
    };
    let before = scrape(&b, "/metrics").await;
    let a = api
        .post(
            "/api/exchanges/%2F/http-delayed/publish",
            r#"{"properties":{"headers":{"x-delay":60000}},"routing_key":"","payload":"x","payload_encoding":"string"}"#,
        )
        .await;
    assert_eq!(
        a.error(500, "internal_error"),
        "cannot store the delayed message"
    );
    let after = scrape(&b, "/metrics").await;
    for (name, added) in [
        ("received", 1.0),
        ("received_confirm", 1.0),
        ("routed", 0.0),
        ("unroutable_returned", 0.0),
        ("confirmed", 0.0),
    ] {
        assert_eq!(
            global(&after, name) - global(&before, name),
            added,
            "{name}"
        );
    }

    let conn = b.connect().await;
    let ch = within(5, conn.create_channel()).await.expect("channel");
    within(5, ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let headers = args(&[("x-delay", lapin::types::AMQPValue::LongInt(60_000))]);
    let confirm = within(
        5,
        ch.basic_publish(
            "http-delayed".into(),
            "".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default().with_headers(headers),
        ),
    )
    .await
    .expect("published");
    let confirm = within(5, confirm).await.expect("confirmed");
    assert!(
        matches!(confirm, lapin::Confirmation::Nack(_)),
        "{confirm:?}"
    );
}

/// A persistent message the disk never takes (here the flusher has stopped) is not answered
/// 200 as if it were safe: 503 with the reason, counted received and routed but not
/// confirmed.
#[tokio::test]
async fn a_publish_over_http_not_written_to_disk_is_unavailable_and_not_confirmed() {
    let b = TestBroker::start().await;
    if b.is_external() {
        return;
    }
    let api = common::http::Api::new(&b);
    api.put("/api/queues/%2F/http-unsafe", r#"{"durable":true}"#)
        .await
        .status(201);
    let global = |m: &Scrape, name: &str| {
        m.value(&format!(
            "rabbitmq_global_messages_{name}_total{{protocol=\"amqp091\"}}"
        ))
    };
    b.broker().storage.flusher().expect("a disk").shutdown();
    let before = scrape(&b, "/metrics").await;
    let a = api
        .post(
            "/api/exchanges/%2F/amq.default/publish",
            r#"{"properties":{"delivery_mode":2},"routing_key":"http-unsafe","payload":"x","payload_encoding":"string"}"#,
        )
        .await;
    assert_eq!(
        a.error(503, "service_unavailable"),
        "publish not confirmed: the message cannot be written to disk now"
    );
    let after = scrape(&b, "/metrics").await;
    for (name, added) in [
        ("received", 1.0),
        ("received_confirm", 1.0),
        ("routed", 1.0),
        ("confirmed", 0.0),
    ] {
        assert_eq!(
            global(&after, name) - global(&before, name),
            added,
            "{name}"
        );
    }
}
