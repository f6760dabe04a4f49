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

/// A node of a test cluster: its own data directory, the shared peers file.
fn node(dir: &Path, name: &str, peers: &Path, extra: &[&str]) -> BrokerProcess {
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
    // Alone until the peers file names the others: a cluster of one each.
    rt.block_on(until_nodes(
        &http,
        &[&n1],
        &[("warren@n1", true)],
        Duration::from_secs(5),
    ));
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
    let rt = runtime();
    let http = reqwest::Client::new();
    rt.block_on(until_nodes(
        &http,
        &[&n1, &n2],
        &[("warren@n1", true), ("warren@n2", true)],
        Duration::from_secs(20),
    ));
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
    // Refused both ways, and kept out of every list, for as long as it tries.
    std::thread::sleep(Duration::from_secs(2));
    rt.block_on(until_nodes(
        &http,
        &[&n1, &n2],
        &[("warren@n1", true), ("warren@n2", true)],
        Duration::from_secs(1),
    ));
    rt.block_on(until_nodes(
        &http,
        &[&stranger],
        &[("warren@stranger", true)],
        Duration::from_secs(1),
    ));
    rt.block_on(until_nodes(
        &http,
        &[&other],
        &[("warren@other", true)],
        Duration::from_secs(1),
    ));
}
