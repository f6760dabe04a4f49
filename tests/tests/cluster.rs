//! Brokers that form one cluster: real `warren-broker` processes on loopback that find each
//! other through a shared peers file, prove the cluster secret to each other, refuse nodes
//! of another secret or cluster name, and notice a node that is killed and comes back.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use warren_e2e::BrokerProcess;

const SECRET: &str = "correct-horse-battery-staple";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A node of a test cluster: its own data directory, the shared peers file. Until the test
/// writes the real list, the file names an address where nothing answers, so that no node
/// forms a cluster of its own before it knows the others.
fn node(dir: &Path, name: &str, peers: &Path, extra: &[&str]) -> BrokerProcess {
    if !peers.exists() {
        std::fs::write(peers, "127.0.0.1:1\n").expect("write peers");
    }
    let data = dir.join(name);
    let mut args = vec![
        "--node-name",
        name,
        "--peers-file",
        peers.to_str().expect("UTF-8 path"),
    ];
    args.extend_from_slice(extra);
    BrokerProcess::start_in(&data, &args)
}

fn write_peers(path: &Path, nodes: &[&BrokerProcess]) {
    let text: String = nodes
        .iter()
        .map(|n| format!("{}\n", n.cluster_addr))
        .collect();
    // Written whole and renamed, as a ConfigMap update lands: never read half-written.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write peers");
    std::fs::rename(&tmp, path).expect("rename peers");
}

/// `/api/nodes` of `broker`: node name → running.
async fn nodes(http: &reqwest::Client, broker: &BrokerProcess) -> BTreeMap<String, bool> {
    let url = format!("http://{}/api/nodes", broker.management_addr);
    let Ok(resp) = http
        .get(url)
        .basic_auth("guest", Some("guest"))
        .send()
        .await
    else {
        return BTreeMap::new();
    };
    let list: serde_json::Value = resp.json().await.unwrap_or_default();
    list.as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["name"].as_str().unwrap_or_default().to_owned(),
                n["running"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

/// Waits until every broker's `/api/nodes` is `expected`; fails with what each last showed.
async fn until_nodes(
    http: &reqwest::Client,
    brokers: &[&BrokerProcess],
    expected: &[(&str, bool)],
    within: Duration,
) {
    let expected: BTreeMap<String, bool> = expected
        .iter()
        .map(|(n, r)| ((*n).to_owned(), *r))
        .collect();
    let deadline = Instant::now() + within;
    loop {
        let mut seen = Vec::new();
        for b in brokers {
            seen.push(nodes(http, b).await);
        }
        if seen.iter().all(|s| *s == expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {expected:?} on every node, saw {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Collects log lines of `broker` until one has every word of `words`, within `within`.
fn until_logged(broker: &BrokerProcess, words: &[&str], within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        for line in broker.drain_log() {
            if words.iter().all(|w| line.contains(w)) {
                return line;
            }
            seen.push(line);
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {words:?}; saw:\n{}",
            seen.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn three_nodes_find_each_other_and_see_a_killed_node_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let peers = dir.path().join("peers");
    let secret = ["--cluster-secret", SECRET, "--cluster-name", "shop"];
    let n1 = node(dir.path(), "warren@n1", &peers, &secret);
    let n2 = node(dir.path(), "warren@n2", &peers, &secret);
    let n3 = node(dir.path(), "warren@n3", &peers, &secret);
    let rt = runtime();
    let http = reqwest::Client::new();
    // The same list for every node, its own address included, as the operator writes it.
    write_peers(&peers, &[&n1, &n2, &n3]);
    let all = [
        ("warren@n1", true),
        ("warren@n2", true),
        ("warren@n3", true),
    ];
    rt.block_on(until_nodes(
        &http,
        &[&n1, &n2, &n3],
        &all,
        Duration::from_secs(20),
    ));
    until_logged(
        &n1,
        &["cluster link up", "warren@n2"],
        Duration::from_secs(5),
    );

    // SIGKILL: the others notice the silence.
    let data3 = n3.data_dir.clone();
    n3.kill();
    rt.block_on(until_nodes(
        &http,
        &[&n1, &n2],
        &[
            ("warren@n1", true),
            ("warren@n2", true),
            ("warren@n3", false),
        ],
        Duration::from_secs(15),
    ));
    until_logged(
        &n1,
        &["cluster link down", "warren@n3"],
        Duration::from_secs(5),
    );

    // Back on new ports with its data: found again once the peers file says where.
    let mut args = vec![
        "--node-name",
        "warren@n3",
        "--peers-file",
        peers.to_str().unwrap(),
    ];
    args.extend_from_slice(&secret);
    let n3 = BrokerProcess::start_in(&data3, &args);
    write_peers(&peers, &[&n1, &n2, &n3]);
    rt.block_on(until_nodes(
        &http,
        &[&n1, &n2, &n3],
        &all,
        Duration::from_secs(20),
    ));
}

#[test]
fn nodes_of_another_secret_or_cluster_name_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let peers = dir.path().join("peers");
    let good = ["--cluster-secret", SECRET, "--cluster-name", "shop"];
    let n1 = node(dir.path(), "warren@n1", &peers, &good);
    let n2 = node(dir.path(), "warren@n2", &peers, &good);
    let stranger = node(
        dir.path(),
        "warren@stranger",
        &peers,
        &["--cluster-secret", "guessed", "--cluster-name", "shop"],
    );
    let other = node(
        dir.path(),
        "warren@other",
        &peers,
        &["--cluster-secret", SECRET, "--cluster-name", "billing"],
    );
    write_peers(&peers, &[&n1, &n2, &stranger, &other]);
    until_logged(
        &n1,
        &["cluster link up", "warren@n2"],
        Duration::from_secs(20),
    );
    until_logged(
        &n1,
        &["refusing a cluster peer", "secret"],
        Duration::from_secs(20),
    );
    until_logged(
        &stranger,
        &["refusing a cluster peer", "secret"],
        Duration::from_secs(20),
    );
    until_logged(
        &n1,
        &["refusing a cluster peer", "billing"],
        Duration::from_secs(20),
    );
    // Refused both ways for as long as they try: no link to either ever comes up.
    std::thread::sleep(Duration::from_secs(2));
    for line in n1.drain_log().into_iter().chain(n2.drain_log()) {
        assert!(
            !(line.contains("cluster link up")
                && (line.contains("stranger") || line.contains("warren@other"))),
            "{line}"
        );
    }
    drop(other);
}

/// Management API calls as the default user.
struct Api {
    http: reqwest::Client,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        broker: std::net::SocketAddr,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let url = format!("http://{broker}/api/{path}");
        let mut req = self
            .http
            .request(method, url)
            .basic_auth("guest", Some("guest"))
            .timeout(Duration::from_secs(30));
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                (status, resp.json().await.unwrap_or_default())
            }
            Err(e) => panic!("{path}: {e}"),
        }
    }

    async fn put(&self, broker: std::net::SocketAddr, path: &str, body: serde_json::Value) -> u16 {
        self.call(reqwest::Method::PUT, broker, path, Some(body))
            .await
            .0
    }

    async fn status(&self, broker: std::net::SocketAddr, path: &str) -> u16 {
        self.call(reqwest::Method::GET, broker, path, None).await.0
    }

    /// Whether every one of `brokers` sees the same leader and `voters` voters.
    async fn settled(&self, brokers: &[std::net::SocketAddr], voters: usize) -> bool {
        let mut leaders = std::collections::BTreeSet::new();
        for b in brokers {
            let (_, overview) = self.call(reqwest::Method::GET, *b, "overview", None).await;
            let m = &overview["cluster_metadata"];
            if m["voters"].as_array().map_or(0, Vec::len) != voters {
                return false;
            }
            match m["leader"].as_str() {
                Some(l) => leaders.insert(l.to_owned()),
                None => return false,
            };
        }
        leaders.len() == 1
    }

    /// The metadata leader as `broker` sees it.
    async fn leader(&self, broker: std::net::SocketAddr) -> Option<String> {
        let (_, overview) = self
            .call(reqwest::Method::GET, broker, "overview", None)
            .await;
        overview["cluster_metadata"]["leader"]
            .as_str()
            .map(str::to_owned)
    }
}

/// Waits until `f` holds, or fails saying `what` did not happen within `within`.
async fn until<F, Fut>(what: &str, within: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn declarations_reach_every_node_survive_the_metadata_leader_and_are_refused_by_a_minority() {
    let dir = tempfile::tempdir().unwrap();
    let peers = dir.path().join("peers");
    let secret = ["--cluster-secret", SECRET];
    let names = ["warren@n1", "warren@n2", "warren@n3"];
    let mut nodes: Vec<Option<BrokerProcess>> = names
        .iter()
        .map(|n| Some(node(dir.path(), n, &peers, &secret)))
        .collect();
    {
        let all: Vec<&BrokerProcess> = nodes.iter().flatten().collect();
        write_peers(&peers, &all);
    }
    let rt = runtime();
    let api = Api {
        http: reqwest::Client::new(),
    };
    rt.block_on(async {
        let at = |nodes: &[Option<BrokerProcess>], i: usize| -> std::net::SocketAddr {
            nodes[i].as_ref().expect("running").management_addr
        };
        // The cluster forms: every node has the default user and one leader.
        for i in 0..3 {
            let n = at(&nodes, i);
            until("the cluster to form", Duration::from_secs(30), || async {
                api.leader(n).await.is_some()
            })
            .await;
        }
        // Declared on n1: a user, a durable exchange and queue, a binding between them.
        let n1 = at(&nodes, 0);
        assert_eq!(
            api.put(
                n1,
                "users/app",
                serde_json::json!({"password": "secret", "tags": ""})
            )
            .await,
            201
        );
        assert_eq!(
            api.put(
                n1,
                "exchanges/%2F/orders",
                serde_json::json!({"type": "topic", "durable": true})
            )
            .await,
            201
        );
        let started = Instant::now();
        assert_eq!(
            api.put(n1, "queues/%2F/q", serde_json::json!({"durable": true}))
                .await,
            201
        );
        let declare_took = started.elapsed();
        assert!(
            api.call(
                reqwest::Method::POST,
                n1,
                "bindings/%2F/e/orders/q/q",
                Some(serde_json::json!({"routing_key": "eu.#"}))
            )
            .await
            .0 < 300
        );
        eprintln!("a durable queue declared on a 3-node cluster in {declare_took:?}");
        // Every node has them, as soon as they are answered on n1 (n1's own view) and within
        // the time to apply on the others.
        for i in 0..3 {
            let n = at(&nodes, i);
            until(
                "the declarations on every node",
                Duration::from_secs(10),
                || async {
                    api.status(n, "users/app").await == 200
                        && api.status(n, "exchanges/%2F/orders").await == 200
                        && api.status(n, "queues/%2F/q").await == 200
                        && api
                            .call(reqwest::Method::GET, n, "bindings/%2F/e/orders/q/q", None)
                            .await
                            .1
                            .as_array()
                            .is_some_and(|b| b.len() == 1)
                },
            )
            .await;
        }

        // SIGKILL of the metadata leader: the other two elect another and go on.
        let leader = api.leader(n1).await.expect("a leader");
        let gone = names
            .iter()
            .position(|n| *n == leader)
            .expect("a known node");
        let killed_data = nodes[gone].as_ref().unwrap().data_dir.clone();
        nodes[gone].take().unwrap().kill();
        let killed = Instant::now();
        let rest: Vec<usize> = (0..3).filter(|i| *i != gone).collect();
        let a = at(&nodes, rest[0]);
        let b = at(&nodes, rest[1]);
        until("a new metadata leader", Duration::from_secs(20), || async {
            api.leader(a).await.is_some_and(|l| l != leader)
        })
        .await;
        eprintln!("new metadata leader {:?} after SIGKILL", killed.elapsed());
        until(
            "a declaration after failover",
            Duration::from_secs(20),
            || async {
                // 204: an earlier attempt that timed out was committed after all.
                matches!(
                    api.put(a, "queues/%2F/q2", serde_json::json!({"durable": true}))
                        .await,
                    201 | 204
                )
            },
        )
        .await;
        until(
            "q2 on the other survivor",
            Duration::from_secs(10),
            || async { api.status(b, "queues/%2F/q2").await == 200 },
        )
        .await;

        // One more gone: the node left alone refuses to declare (no majority), and answers
        // so within its wait, never as done.
        let second = rest[1];
        let second_data = nodes[second].as_ref().unwrap().data_dir.clone();
        nodes[second].take().unwrap().kill();
        let refused = api
            .put(a, "queues/%2F/q3", serde_json::json!({"durable": true}))
            .await;
        assert_eq!(refused, 503, "a minority must not declare");
        assert_eq!(api.status(a, "queues/%2F/q3").await, 404);

        // The killed nodes come back with their data: the majority is back, by itself.
        for (i, data) in [(gone, killed_data), (second, second_data)] {
            let mut args = vec!["--node-name", names[i], "--peers-file"];
            let p = peers.to_str().unwrap();
            args.push(p);
            args.extend_from_slice(&secret);
            nodes[i] = Some(BrokerProcess::start_in(&data, &args));
        }
        {
            let all: Vec<&BrokerProcess> = nodes.iter().flatten().collect();
            write_peers(&peers, &all);
        }
        until(
            "a declaration once healed",
            Duration::from_secs(30),
            || async {
                // 204: an earlier attempt that timed out was committed after all.
                matches!(
                    api.put(a, "queues/%2F/q3", serde_json::json!({"durable": true}))
                        .await,
                    201 | 204
                )
            },
        )
        .await;
        for i in 0..3 {
            let n = at(&nodes, i);
            until(
                "every queue on every node",
                Duration::from_secs(20),
                || async {
                    api.status(n, "queues/%2F/q").await == 200
                        && api.status(n, "queues/%2F/q2").await == 200
                        && api.status(n, "queues/%2F/q3").await == 200
                },
            )
            .await;
        }
    });
}

/// A lapin channel on the broker of AMQP URI `uri`.
async fn amqp(uri: &str) -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(uri, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// Ready messages and consumers of `queue` as `queue.declare-ok` (passive) on `ch` says.
async fn passive(ch: &lapin::Channel, queue: &str) -> Result<(u32, u32), lapin::Error> {
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await?;
    Ok((q.message_count(), q.consumer_count()))
}

/// Starts three nodes that list each other and waits until they form one cluster.
fn three_nodes(
    dir: &Path,
    peers: &Path,
    names: &[&str; 3],
    rt: &tokio::runtime::Runtime,
    api: &Api,
) -> Vec<Option<BrokerProcess>> {
    let secret = ["--cluster-secret", SECRET];
    let nodes: Vec<Option<BrokerProcess>> = names
        .iter()
        .map(|n| Some(node(dir, n, peers, &secret)))
        .collect();
    {
        let all: Vec<&BrokerProcess> = nodes.iter().flatten().collect();
        write_peers(peers, &all);
    }
    let at: Vec<std::net::SocketAddr> = nodes.iter().flatten().map(|n| n.management_addr).collect();
    rt.block_on(async {
        // Formed, every node a voter, one leader for all.
        until("the cluster to form", Duration::from_secs(60), || async {
            api.settled(&at, 3).await
        })
        .await;
    });
    nodes
}

#[test]
fn any_node_serves_a_queue_whose_home_is_another_and_its_home_going_down_is_told() {
    use futures::StreamExt;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeleteOptions,
        QueuePurgeOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Confirmation};

    let dir = tempfile::tempdir().unwrap();
    let peers = dir.path().join("peers");
    let names = ["warren@n1", "warren@n2", "warren@n3"];
    let rt = runtime();
    let api = Api {
        http: reqwest::Client::new(),
    };
    let mut nodes = three_nodes(dir.path(), &peers, &names, &rt, &api);
    rt.block_on(async {
        struct At {
            uri: String,
            management_addr: std::net::SocketAddr,
        }
        let n = |nodes: &[Option<BrokerProcess>], i: usize| -> At {
            let b = nodes[i].as_ref().expect("running");
            At {
                uri: b.uri(),
                management_addr: b.management_addr,
            }
        };
        let (n1, n2, n3) = (n(&nodes, 0), n(&nodes, 1), n(&nodes, 2));
        // Declared on n1: its home is n1.
        let (_c1, ch1) = amqp(&n1.uri).await;
        ch1.queue_declare(
            "work".into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare on n1");
        for b in [&n2, &n3] {
            let at = b.management_addr;
            until(
                "the queue on every node",
                Duration::from_secs(10),
                || async { api.status(at, "queues/%2F/work").await == 200 },
            )
            .await;
        }

        // Published with confirms on n3: every message confirmed once n1 has it.
        let (_c3, ch3) = amqp(&n3.uri).await;
        ch3.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut confirms = Vec::new();
        for i in 0..200u32 {
            confirms.push(
                ch3.basic_publish(
                    "".into(),
                    "work".into(),
                    BasicPublishOptions::default(),
                    &i.to_be_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
            );
        }
        for c in confirms {
            assert!(
                matches!(c.await.expect("confirm"), Confirmation::Ack(_)),
                "every publish through n3 is acked"
            );
        }
        assert_eq!(passive(&ch1, "work").await.unwrap(), (200, 0));

        // basic.get on n2, then a nack with requeue: it comes back redelivered, first.
        let (_c2, ch2) = amqp(&n2.uri).await;
        assert_eq!(passive(&ch2, "work").await.unwrap(), (200, 0));
        let got = ch2
            .basic_get("work".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("a message");
        assert_eq!(&got.delivery.data[..], &0u32.to_be_bytes());
        assert!(!got.delivery.redelivered);
        assert_eq!(got.message_count, 199);
        ch2.basic_nack(
            got.delivery.delivery_tag,
            BasicNackOptions {
                requeue: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let again = ch2
            .basic_get("work".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("the message again");
        assert_eq!(&again.delivery.data[..], &0u32.to_be_bytes());
        assert!(
            again.delivery.redelivered,
            "a requeued message is redelivered"
        );
        ch2.basic_ack(again.delivery.delivery_tag, BasicAckOptions::default())
            .await
            .unwrap();

        // A consumer on n2 with a prefetch of 10 takes 150 in order, acking each.
        ch2.basic_qos(10, BasicQosOptions::default()).await.unwrap();
        let mut consumer = ch2
            .basic_consume(
                "work".into(),
                "c2".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        assert_eq!(
            passive(&ch1, "work").await.unwrap().1,
            1,
            "n1 sees the consumer"
        );
        for i in 1..=150u32 {
            let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("a delivery in time")
                .expect("stream open")
                .expect("delivery");
            assert_eq!(&d.data[..], &i.to_be_bytes(), "in publish order");
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
        ch2.basic_cancel("c2".into(), Default::default())
            .await
            .unwrap();
        // What the consumer had prefetched and not acked is back on n1 once its channel
        // closes.
        ch2.close(200, "done".into()).await.unwrap();
        let ch2 = _c2.create_channel().await.unwrap();
        let c = &ch1;
        until("the unacked back", Duration::from_secs(10), || async {
            passive(c, "work").await.unwrap() == (49, 0)
        })
        .await;

        // Purge from n3 says how many went; delete from n2 removes it on n1.
        let purged = ch3
            .queue_purge("work".into(), QueuePurgeOptions::default())
            .await
            .unwrap();
        assert_eq!(purged, 49);
        assert_eq!(passive(&ch1, "work").await.unwrap(), (0, 0));
        ch2.queue_delete("work".into(), QueueDeleteOptions::default())
            .await
            .unwrap();
        let at = n1.management_addr;
        until("the deletion on n1", Duration::from_secs(10), || async {
            api.status(at, "queues/%2F/work").await == 404
        })
        .await;

        // A second queue on n1, with messages and a consumer on n3: n1 killed.
        let (_c1, ch1) = amqp(&n1.uri).await;
        ch1.queue_declare(
            "kept".into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch1.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for i in 0..10u32 {
            let c = ch1
                .basic_publish(
                    "".into(),
                    "kept".into(),
                    BasicPublishOptions::default(),
                    &i.to_be_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
            assert!(matches!(c.await.unwrap(), Confirmation::Ack(_)));
        }
        let at = n3.management_addr;
        until("kept on n3", Duration::from_secs(10), || async {
            api.status(at, "queues/%2F/kept").await == 200
        })
        .await;
        let (_c3b, ch3b) = amqp(&n3.uri).await;
        // A consumer that takes nothing (prefetch 1, never acks): it holds one.
        ch3b.basic_qos(1, BasicQosOptions::default()).await.unwrap();
        let mut held = ch3b
            .basic_consume(
                "kept".into(),
                "held".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), held.next())
            .await
            .expect("a delivery")
            .expect("open")
            .expect("delivery");
        assert_eq!(&first.data[..], &0u32.to_be_bytes());
        drop(ch1);
        nodes[0].take().unwrap().kill();
        // The consumer on n3 is cancelled; a passive declare on n2 says the home is down.
        let ended = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(d) = held.next().await {
                if d.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "the consumer of a queue whose home went is cancelled"
        );
        let (_c2b, ch2b) = amqp(&n2.uri).await;
        let mut refused = None;
        for _ in 0..100 {
            match passive(&ch2b, "kept").await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                Err(e) => {
                    refused = Some(e.to_string());
                    break;
                }
            }
        }
        let refused = refused.expect("a passive declare refused once the home is down");
        assert!(
            refused.contains("404") || refused.contains("NOT_FOUND"),
            "{refused}"
        );
        assert!(
            refused.contains("home node 'warren@n1'")
                && refused.contains("is down or inaccessible"),
            "{refused}"
        );
    });
    // n1 back on its data: its queue has every message (the one held by n3's consumer too).
    let secret = ["--cluster-secret", SECRET];
    let mut args = vec!["--node-name", names[0], "--peers-file"];
    args.push(peers.to_str().unwrap());
    args.extend_from_slice(&secret);
    let data = dir.path().join(names[0]);
    nodes[0] = Some(BrokerProcess::start_in(&data, &args));
    {
        let all: Vec<&BrokerProcess> = nodes.iter().flatten().collect();
        write_peers(&peers, &all);
    }
    rt.block_on(async {
        let n2 = nodes[1].as_ref().unwrap();
        let mut counts = None;
        for _ in 0..300 {
            let (_c, ch) = amqp(&n2.uri()).await;
            if let Ok(c) = passive(&ch, "kept").await {
                counts = Some(c);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            counts,
            Some((10, 0)),
            "the home is back with every durable message"
        );
    });
}

/// pika and amqplib, unchanged: a queue declared on one node, published to with confirms
/// through another, consumed and acked through the third (tests/clients, `--cluster`).
#[test]
fn pika_and_amqplib_use_a_queue_through_nodes_other_than_its_home() {
    let dir = tempfile::tempdir().unwrap();
    let peers = dir.path().join("peers");
    let names = ["warren@c1", "warren@c2", "warren@c3"];
    let rt = runtime();
    let api = Api {
        http: reqwest::Client::new(),
    };
    let nodes = three_nodes(dir.path(), &peers, &names, &rt, &api);
    let script = warren_e2e::workspace_root().join("tests/clients/run.sh");
    let status = std::process::Command::new("bash")
        .arg(&script)
        .arg("--cluster")
        .args(nodes.iter().flatten().map(BrokerProcess::uri))
        .status()
        .expect("run tests/clients/run.sh --cluster");
    assert!(status.success(), "cluster client suites failed: {status}");
}

/// `/api/queues`, `/api/connections`, `/api/channels`, `/api/consumers` and `/api/nodes` list
/// the whole cluster from every node, each object with its node; rabbitmqadmin v2 against
/// node 2 lists node 1's queue.
#[test]
fn management_lists_the_whole_cluster_from_every_node() {
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;

    let dir = tempfile::tempdir().unwrap();
    let peers = dir.path().join("peers");
    let names = ["warren@m1", "warren@m2", "warren@m3"];
    let rt = runtime();
    let api = Api {
        http: reqwest::Client::new(),
    };
    let nodes = three_nodes(dir.path(), &peers, &names, &rt, &api);
    let nodes: Vec<&BrokerProcess> = nodes.iter().flatten().collect();
    rt.block_on(async {
        // A queue on m1 with 3 messages; a consumer of it on m2; a connection on m3.
        let (_c1, ch1) = amqp(&nodes[0].uri()).await;
        ch1.queue_declare(
            "listed".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        for _ in 0..3 {
            ch1.basic_publish(
                "".into(),
                "listed".into(),
                BasicPublishOptions::default(),
                b"x",
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
        }
        let (_c3, ch3) = amqp(&nodes[2].uri()).await;
        // A queue only m3 holds (exclusive: never in the cluster's log).
        ch3.queue_declare(
            "only-m3".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        let m2 = nodes[1].management_addr;
        until("listed on m2", Duration::from_secs(10), || async {
            api.status(m2, "queues/%2F/listed").await == 200
        })
        .await;
        let (_c2, ch2) = amqp(&nodes[1].uri()).await;
        ch2.basic_qos(1, Default::default()).await.unwrap();
        let _consumer = ch2
            .basic_consume(
                "listed".into(),
                "on-m2".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for n in &nodes {
            let at = n.management_addr;
            // The queue once, from its home, with its figures (1 delivered, 2 ready).
            until(
                "the queue once with m1's figures",
                Duration::from_secs(15),
                || async {
                    let (_, list) = api.call(reqwest::Method::GET, at, "queues", None).await;
                    let mine: Vec<&serde_json::Value> = list
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|q| q["name"] == "listed")
                        .collect();
                    mine.len() == 1
                        && mine[0]["node"] == "warren@m1"
                        && mine[0]["consumers"] == 1
                        && mine[0]["messages_ready"] == 2
                },
            )
            .await;
            let (_, q) = api
                .call(reqwest::Method::GET, at, "queues/%2F/listed", None)
                .await;
            assert_eq!(q["node"], "warren@m1", "{q}");
            // The overview's totals are the cluster's: three connections (one per node),
            // each queue once, the consumer on m2 of m1's queue, m1's three messages.
            until("the cluster's totals", Duration::from_secs(15), || async {
                let (_, o) = api.call(reqwest::Method::GET, at, "overview", None).await;
                let totals = &o["object_totals"];
                totals["connections"] == 3
                    && totals["channels"] == 3
                    && totals["queues"] == 2
                    && totals["consumers"] == 1
                    && o["queue_totals"]["messages"] == 3
                    && o["queue_totals"]["messages_unacknowledged"] == 1
            })
            .await;
            // Every node's connections, each named with its node.
            let (_, conns) = api
                .call(reqwest::Method::GET, at, "connections", None)
                .await;
            let mut seen: Vec<String> = conns
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["node"].as_str().map(str::to_owned))
                .collect();
            seen.sort();
            seen.dedup();
            assert_eq!(seen, names, "connections of every node from {at}");
            let (_, channels) = api.call(reqwest::Method::GET, at, "channels", None).await;
            assert!(
                channels.as_array().is_some_and(|c| c.len() >= 3),
                "{channels}"
            );
            let (_, consumers) = api.call(reqwest::Method::GET, at, "consumers", None).await;
            assert!(
                consumers
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["consumer_tag"] == "on-m2" && c["queue"]["name"] == "listed"),
                "the consumer on m2 from {at}: {consumers}"
            );
            let (_, list) = api.call(reqwest::Method::GET, at, "nodes", None).await;
            let reported: Vec<(String, bool, bool)> = list
                .as_array()
                .into_iter()
                .flatten()
                .map(|n| {
                    (
                        n["name"].as_str().unwrap_or_default().to_owned(),
                        n["running"] == true,
                        n["mem_used"].as_u64().unwrap_or(0) > 0,
                    )
                })
                .collect();
            assert_eq!(
                reported,
                names
                    .iter()
                    .map(|n| ((*n).to_owned(), true, true))
                    .collect::<Vec<_>>(),
                "every node running with its own figures, from {at}"
            );
        }
        // Single active consumer across nodes: of two consumers of m1's queue, on m2 and on
        // m3, the first gets everything until it cancels; then the other does.
        let mut sac = FieldTable::default();
        sac.insert(
            "x-single-active-consumer".into(),
            lapin::types::AMQPValue::Boolean(true),
        );
        ch1.queue_declare(
            "one-at-a-time".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            sac,
        )
        .await
        .unwrap();
        until(
            "the queue on m2 and m3",
            Duration::from_secs(10),
            || async {
                api.status(nodes[1].management_addr, "queues/%2F/one-at-a-time")
                    .await
                    == 200
                    && api
                        .status(nodes[2].management_addr, "queues/%2F/one-at-a-time")
                        .await
                        == 200
            },
        )
        .await;
        let (_c2b, first_ch) = amqp(&nodes[1].uri()).await;
        let mut first = first_ch
            .basic_consume(
                "one-at-a-time".into(),
                "first".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let (_c3b, second_ch) = amqp(&nodes[2].uri()).await;
        let mut second = second_ch
            .basic_consume(
                "one-at-a-time".into(),
                "second".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let publish = |body: String| {
            let ch1 = ch1.clone();
            async move {
                ch1.basic_publish(
                    "".into(),
                    "one-at-a-time".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    lapin::BasicProperties::default(),
                )
                .await
                .unwrap();
            }
        };
        for i in 0..5 {
            publish(format!("a{i}")).await;
        }
        for i in 0..5 {
            let d = tokio::time::timeout(Duration::from_secs(10), first.next())
                .await
                .expect("the active consumer gets it")
                .unwrap()
                .unwrap();
            assert_eq!(d.data, format!("a{i}").as_bytes());
        }
        assert!(
            tokio::time::timeout(Duration::from_millis(500), second.next())
                .await
                .is_err(),
            "the waiting consumer got a message"
        );
        first_ch
            .basic_cancel("first".into(), Default::default())
            .await
            .unwrap();
        for i in 0..5 {
            publish(format!("b{i}")).await;
        }
        for i in 0..5 {
            let d = tokio::time::timeout(Duration::from_secs(10), second.next())
                .await
                .expect("the next consumer takes over")
                .unwrap()
                .unwrap();
            assert_eq!(d.data, format!("b{i}").as_bytes());
        }
    });
    // rabbitmqadmin v2 against m2 lists m1's queue.
    if let Some(bin) = std::env::var_os("WARREN_RABBITMQADMIN") {
        let home = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(bin)
            .env("HOME", home.path())
            .args(["--host", "127.0.0.1", "--port"])
            .arg(nodes[1].management_addr.port().to_string())
            .args(["--username", "guest", "--password", "guest"])
            .args(["--table-style", "markdown", "list", "queues"])
            .output()
            .expect("run rabbitmqadmin");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains("listed") && text.contains("warren@m1"),
            "rabbitmqadmin list queues on m2: {text}"
        );
    } else {
        eprintln!(
            "SKIPPED rabbitmqadmin part: WARREN_RABBITMQADMIN is not set (./test.sh sets it)"
        );
    }
}

/// A partition: the metadata leader cut off from the other two by fault-injecting proxies
/// (one per direction between every two nodes) while declarations go on everywhere. The
/// isolated node never answers a declaration as done; the other two elect a leader and go on;
/// once the network heals, the isolated node rejoins by itself, has every declaration the
/// majority answered, and none of those it refused.
#[test]
fn a_partitioned_node_refuses_declarations_and_rejoins_by_itself_when_healed() {
    use warren_e2e::proxy::FaultProxy;

    let dir = tempfile::tempdir().unwrap();
    let names = ["warren@p1", "warren@p2", "warren@p3"];
    let secret = ["--cluster-secret", SECRET];
    let files: Vec<std::path::PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("peers-{i}")))
        .collect();
    let nodes: Vec<BrokerProcess> = (0..3)
        .map(|i| node(dir.path(), names[i], &files[i], &secret))
        .collect();
    // proxies[i][j]: node i's way to node j.
    let proxies: Vec<Vec<Option<FaultProxy>>> = (0..3)
        .map(|i| {
            (0..3)
                .map(|j| (i != j).then(|| FaultProxy::start(nodes[j].cluster_addr)))
                .collect()
        })
        .collect();
    for i in 0..3 {
        let text: String = proxies[i]
            .iter()
            .flatten()
            .map(|p| format!("{}\n", p.addr))
            .collect();
        let tmp = files[i].with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &files[i]).unwrap();
    }
    let rt = runtime();
    let api = Api {
        http: reqwest::Client::new(),
    };
    let at: Vec<std::net::SocketAddr> = nodes.iter().map(|n| n.management_addr).collect();
    rt.block_on(async {
        until("the cluster to form", Duration::from_secs(60), || async {
            api.settled(&at, 3).await
        })
        .await;
        let critical = "health/checks/node-is-quorum-critical";
        assert_eq!(
            api.status(at[0], critical).await,
            200,
            "three of three reachable: no node is critical"
        );
        let leader = api.leader(at[0]).await.expect("a leader");
        let cut = names.iter().position(|n| *n == leader).expect("known");
        let rest: Vec<usize> = (0..3).filter(|i| *i != cut).collect();
        for (i, row) in proxies.iter().enumerate() {
            for (j, p) in row.iter().enumerate() {
                if (i == cut) != (j == cut) {
                    p.as_ref().expect("a proxy between two nodes").cut();
                }
            }
        }
        // The majority elects a leader and answers declarations again.
        let first = format!("majority-{}-0", rest[0]);
        let a = at[rest[0]];
        let cut_at = Instant::now();
        let mut answered = false;
        while !answered && cut_at.elapsed() < Duration::from_secs(30) {
            let status = api
                .put(
                    a,
                    &format!("queues/%2F/{first}"),
                    serde_json::json!({"durable": true}),
                )
                .await;
            // 204: an earlier attempt that timed out was committed after all.
            answered = matches!(status, 201 | 204);
        }
        if !answered {
            dump_logs(&names, &nodes);
            panic!("no declaration on the majority side within 30 s");
        }
        // The majority side: two of three, each of them critical now. The cut-off side lists
        // the members it cannot reach as partitions.
        assert_eq!(api.status(a, critical).await, 503);
        let c = at[cut];
        until(
            "the cut-off node to see its partition",
            Duration::from_secs(20),
            || async {
                let (_, list) = api.call(reqwest::Method::GET, c, "nodes", None).await;
                list.as_array()
                    .into_iter()
                    .flatten()
                    .find(|n| n["name"] == names[cut])
                    .and_then(|n| n["partitions"].as_array().map(Vec::len))
                    == Some(2)
            },
        )
        .await;
        let mut done: Vec<String> = vec![first];
        let mut refused: Vec<String> = Vec::new();
        for k in 1..=6 {
            for &i in &rest {
                let name = format!("majority-{i}-{k}");
                let status = api
                    .put(
                        at[i],
                        &format!("queues/%2F/{name}"),
                        serde_json::json!({"durable": true}),
                    )
                    .await;
                assert_eq!(status, 201, "the majority declares {name}");
                done.push(name);
            }
            if k <= 2 {
                let name = format!("minority-{k}");
                let status = api
                    .put(
                        at[cut],
                        &format!("queues/%2F/{name}"),
                        serde_json::json!({"durable": true}),
                    )
                    .await;
                assert_eq!(status, 503, "the cut-off node must not declare {name}");
                refused.push(name);
            }
        }
        for p in proxies.iter().flatten().flatten() {
            p.heal();
        }
        // Healed: the cut-off node catches up and declares again, by itself.
        let c = at[cut];
        let healed = Instant::now();
        let mut answered = false;
        while !answered && healed.elapsed() < Duration::from_secs(40) {
            let status = api
                .put(
                    c,
                    "queues/%2F/after-heal",
                    serde_json::json!({"durable": true}),
                )
                .await;
            // 204: an earlier attempt that timed out was committed after all.
            answered = matches!(status, 201 | 204);
        }
        if !answered {
            dump_logs(&names, &nodes);
            panic!("no declaration on the healed node within 40 s");
        }
        done.push("after-heal".to_owned());
        until(
            "no partition once healed",
            Duration::from_secs(20),
            || async { api.status(c, critical).await == 200 },
        )
        .await;
        for a in &at {
            for name in &done {
                let path = format!("queues/%2F/{name}");
                until(
                    "every answered declaration on every node",
                    Duration::from_secs(20),
                    || async { api.status(*a, &path).await == 200 },
                )
                .await;
            }
            for name in &refused {
                assert_eq!(
                    api.status(*a, &format!("queues/%2F/{name}")).await,
                    404,
                    "{name} was refused: it must be nowhere"
                );
            }
        }
    });
    drop(proxies);
}

/// Publishes ids with confirms to `queue` through `uri` until `stop`, reconnecting when the
/// connection or channel goes; records the ids the broker acked.
async fn confirmed_publisher(
    uri: String,
    queue: &'static str,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    acked: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::SeqCst) {
        let Ok(conn) =
            lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        if ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .is_err()
        {
            continue;
        }
        while !stop.load(Ordering::SeqCst) {
            let mut waiting = Vec::new();
            for _ in 0..20 {
                let id = next.fetch_add(1, Ordering::SeqCst);
                match ch
                    .basic_publish(
                        "".into(),
                        queue.into(),
                        BasicPublishOptions::default(),
                        &id.to_be_bytes(),
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                {
                    Ok(c) => waiting.push((id, c)),
                    Err(_) => break,
                }
            }
            let mut broken = waiting.is_empty();
            for (id, c) in waiting {
                match c.await {
                    Ok(lapin::Confirmation::Ack(_)) => {
                        acked.lock().unwrap().insert(id);
                    }
                    Ok(_) => {}
                    Err(_) => broken = true,
                }
            }
            if broken {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Consumes and acks `queue` through `uri`, recording every id received, until the
/// consumer is cancelled or its connection goes, or nothing arrives for `idle`.
async fn recording_consumer(
    uri: String,
    queue: &'static str,
    received: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<u64, u32>>>,
    idle: Duration,
) -> bool {
    use futures::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let Ok(conn) = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await
    else {
        return false;
    };
    let Ok(ch) = conn.create_channel().await else {
        return false;
    };
    if ch.basic_qos(50, BasicQosOptions::default()).await.is_err() {
        return false;
    }
    let Ok(mut consumer) = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
    else {
        return false;
    };
    loop {
        let Ok(Some(Ok(d))) = tokio::time::timeout(idle, consumer.next()).await else {
            return true;
        };
        let id = u64::from_be_bytes(d.data[..8].try_into().expect("8-byte id"));
        *received.lock().unwrap().entry(id).or_default() += 1;
        if d.ack(BasicAckOptions::default()).await.is_err() {
            return true;
        }
    }
}

/// Traffic through nodes other than a queue's home while nodes are killed with SIGKILL: the
/// consumer's node (not the home), then the home itself. Every publish the cluster confirmed
/// is consumed in the end: none is lost; unacked deliveries come back.
#[test]
fn confirmed_messages_survive_sigkill_of_a_consumers_node_and_of_the_home() {
    use std::collections::{HashMap, HashSet};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    const QUEUE: &str = "through-others";
    let dir = tempfile::tempdir().unwrap();
    let peers = dir.path().join("peers");
    let names = ["warren@k1", "warren@k2", "warren@k3"];
    let rt = runtime();
    let api = Api {
        http: reqwest::Client::new(),
    };
    let mut nodes = three_nodes(dir.path(), &peers, &names, &rt, &api);
    let uri = |nodes: &[Option<BrokerProcess>], i: usize| nodes[i].as_ref().unwrap().uri();
    let (u1, u2, u3) = (uri(&nodes, 0), uri(&nodes, 1), uri(&nodes, 2));
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let received = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(1));
    rt.block_on(async {
        let (_c, ch) = amqp(&u1).await;
        ch.queue_declare(
            QUEUE.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
        for n in nodes.iter().flatten() {
            let at = n.management_addr;
            until("the queue everywhere", Duration::from_secs(10), || async {
                api.status(at, &format!("queues/%2F/{QUEUE}")).await == 200
            })
            .await;
        }
    });
    // Publisher through k2, consumer through k3.
    let publisher = rt.spawn(confirmed_publisher(
        u2.clone(),
        QUEUE,
        next.clone(),
        acked.clone(),
        stop.clone(),
    ));
    let consumer = rt.spawn(recording_consumer(
        u3,
        QUEUE,
        received.clone(),
        Duration::from_secs(60),
    ));
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(1500)).await });
    // The consumer's node goes: its deliveries not acked go back to the home.
    nodes[2].take().unwrap().kill();
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(15), consumer).await;
    });
    let consumer = rt.spawn(recording_consumer(
        u2.clone(),
        QUEUE,
        received.clone(),
        Duration::from_secs(60),
    ));
    rt.block_on(async { tokio::time::sleep(Duration::from_millis(1500)).await });
    // The home goes: publishes through k2 are nacked meanwhile, the consumer is cancelled.
    let before = acked.lock().unwrap().len();
    nodes[0].take().unwrap().kill();
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(15), consumer).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    });
    let mut args = vec!["--node-name", names[0], "--peers-file"];
    args.push(peers.to_str().unwrap());
    args.extend_from_slice(&["--cluster-secret", SECRET]);
    nodes[0] = Some(BrokerProcess::start_in(&dir.path().join(names[0]), &args));
    {
        let all: Vec<&BrokerProcess> = nodes.iter().flatten().collect();
        write_peers(&peers, &all);
    }
    // The home is back: traffic resumes through k2, then stops, and k2's consumer drains.
    let resumed = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while acked.lock().unwrap().len() <= before + 50 {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        true
    });
    if !resumed {
        rt.block_on(async {
            for n in nodes.iter().flatten() {
                let at = n.management_addr;
                let (_, conns) = api
                    .call(reqwest::Method::GET, at, "connections", None)
                    .await;
                let (_, q) = api
                    .call(
                        reqwest::Method::GET,
                        at,
                        &format!("queues/%2F/{QUEUE}"),
                        None,
                    )
                    .await;
                let (_, o) = api.call(reqwest::Method::GET, at, "overview", None).await;
                let (_, chans) = api.call(reqwest::Method::GET, at, "channels", None).await;
                eprintln!(
                    "channels {:?}",
                    chans
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| (
                            c["node"].clone(),
                            c["messages_unconfirmed"].clone(),
                            c["confirm"].clone(),
                            c["state"].clone()
                        ))
                        .collect::<Vec<_>>()
                );
                eprintln!(
                    "{at}: connections {:?}\nqueue {q}\nmetadata {}",
                    conns
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| (c["node"].clone(), c["name"].clone(), c["state"].clone()))
                        .collect::<Vec<_>>(),
                    o["cluster_metadata"]
                );
            }
        });
        let alive: Vec<BrokerProcess> = nodes.iter_mut().filter_map(Option::take).collect();
        dump_logs(&[names[0], names[1]], &alive);
        panic!("publishes through k2 not confirmed again within 30 s of the home's return");
    }
    stop.store(true, Ordering::SeqCst);
    rt.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(20), publisher).await;
        let received = received.clone();
        let u2 = u2.clone();
        until(
            "the queue drained through k2",
            Duration::from_secs(60),
            || {
                let (received, u2) = (received.clone(), u2.clone());
                async move { recording_consumer(u2, QUEUE, received, Duration::from_secs(3)).await }
            },
        )
        .await;
    });
    let acked = acked.lock().unwrap().clone();
    let received = received.lock().unwrap().clone();
    let lost: Vec<u64> = acked
        .iter()
        .filter(|id| !received.contains_key(id))
        .copied()
        .collect();
    let twice = received.values().filter(|n| **n > 1).count();
    eprintln!(
        "{} confirmed, {} received, {} received more than once (redelivered after a kill)",
        acked.len(),
        received.len(),
        twice
    );
    assert!(
        acked.len() > 100,
        "traffic flowed: {} confirmed",
        acked.len()
    );
    assert!(lost.is_empty(), "confirmed and never consumed: {lost:?}");
}

/// Prints the last log lines of each node that speak of the cluster (a failed test's evidence).
fn dump_logs(names: &[&str], nodes: &[BrokerProcess]) {
    for (n, b) in names.iter().zip(nodes) {
        let lines: Vec<String> = b
            .drain_log()
            .into_iter()
            .filter(|l| l.contains("cluster") || l.contains("WARN") || l.contains("leader"))
            .collect();
        eprintln!(
            "--- {n}:\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
}
