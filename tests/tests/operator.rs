//! The operator end to end: the real `warren-operator` binary against kube-sim (a fake API
//! server whose kubelet runs real `warren-broker` processes; a test harness, not Kubernetes).
//! An Instance becomes a running, ready broker; a Vhost made before its Instance is declared as
//! soon as the Instance is ready, however long it had backed off; Vhost, Queue, Exchange and
//! Binding resources become objects in it (seen over HTTP and AMQP); clients publish and consume
//! through the client Service; deletion honours each deletionPolicy; deleting the Instance
//! removes everything it owned. SIGTERM stops the operator cleanly and releases its Lease, so
//! the next operator leads at once.

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Resource};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    ExchangeDeclareOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};
use serde_json::{Value, json};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use warren_e2e::{bin_dir, broker_bin, workspace_root};
use warren_operator::crd::{Binding, Exchange, Instance, Queue, Vhost};

const NS: &str = "shop";
/// Where the operator runs (its POD_NAMESPACE), and so its Lease.
const OPERATOR_NS: &str = "warren-system";

/// The operator process; killed when the test ends, its log printed if the test failed.
struct Operator {
    child: Child,
    log: PathBuf,
    metrics: String,
}

impl Operator {
    /// SIGTERM, then the exit status, which must come within `within`.
    fn terminate(&mut self, within: Duration) -> ExitStatus {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the operator did not exit within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its `/metrics` page.
    async fn metrics_page(&self) -> String {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The value of one series (`name{labels}`) on a metrics page; 0 when absent.
fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("--- operator log (last lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator as pod `name` of namespace warren-system, leader-elected.
fn start_operator(
    dir: &Path,
    kubeconfig: &Path,
    proxy: &str,
    name: &str,
    extra: &[&str],
) -> Operator {
    let operator = bin_dir().join("warren-operator");
    assert!(
        operator.exists(),
        "{} not found: run `cargo build --workspace --bins` first (./test.sh does)",
        operator.display()
    );
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let child = Command::new(operator)
        .args(["run", "--leader-elect", "--metrics-listen", &metrics])
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env("HTTP_PROXY", proxy)
        .env("http_proxy", proxy)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .env("POD_NAMESPACE", OPERATOR_NS)
        .env("POD_NAME", name)
        .env("RUST_LOG", "info,kube=warn")
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("start warren-operator");
    Operator {
        child,
        log,
        metrics,
    }
}

/// Polls `check` until it returns Some, or fails the test naming `what`.
async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn condition<'a>(obj: &'a DynamicObject, kind: &str) -> Option<&'a Value> {
    obj.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

fn is_true(obj: &DynamicObject, kind: &str) -> bool {
    condition(obj, kind).is_some_and(|c| c["status"] == "True")
}

fn dynamic<K: Resource<DynamicType = ()>>(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), NS, &ApiResource::erase::<K>(&()))
}

/// A manifest from `manifests/`, with `edit` applied.
fn manifest(file: &str, edit: impl FnOnce(&mut Value)) -> DynamicObject {
    let text = std::fs::read_to_string(workspace_root().join("manifests").join(file)).unwrap();
    let mut v: Value = serde_yaml::from_str(&text).unwrap();
    edit(&mut v);
    serde_json::from_value(v).unwrap()
}

async fn wait_ready(api: &Api<DynamicObject>, name: &str) -> DynamicObject {
    eventually(
        &format!("{} {name} to be Ready", api.resource_url()),
        Duration::from_secs(60),
        || async {
            let o = api.get_opt(name).await.ok()??;
            is_true(&o, "Ready").then_some(o)
        },
    )
    .await
}

async fn gone<K>(api: &Api<K>, name: &str)
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(
        &format!("{} {name} to be gone", api.resource_url()),
        Duration::from_secs(60),
        || async { matches!(api.get_opt(name).await, Ok(None)).then_some(()) },
    )
    .await;
}

/// The management API of the Instance through its client Service.
struct Management {
    base: String,
    user: String,
    pass: String,
    http: reqwest::Client,
}

impl Management {
    async fn status(&self, path: &str) -> u16 {
        self.http
            .get(format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.pass))
            .send()
            .await
            .map_or(0, |r| r.status().as_u16())
    }

    async fn json(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.pass))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

/// A simulated cluster with the CRDs installed and the operator running. Dropped in field
/// order: the operator first, then the cluster (killing every broker), then its directory.
struct Cluster {
    operator: Operator,
    sim: kube_sim::KubeSim,
    client: Client,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Another operator replica, as pod `name`.
    fn another_operator(&self, name: &str) -> Operator {
        start_operator(
            self.dir.path(),
            &self.dir.path().join("kubeconfig"),
            &self.sim.proxy_url(),
            name,
            &[],
        )
    }
}

async fn cluster(operator_args: &[&str]) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let sim = kube_sim::KubeSim::start(kube_sim::Config {
        broker_binary: broker_bin(),
        dir: dir.path().join("cluster"),
    })
    .await
    .unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, sim.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::from_yaml(&sim.kubeconfig()).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let client = Client::try_from(config).unwrap();
    // The CRDs as `kubectl apply -f crds/` would install them.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for entry in std::fs::read_dir(workspace_root().join("crds")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    let operator = start_operator(
        dir.path(),
        &kubeconfig,
        &sim.proxy_url(),
        "warren-operator-0",
        operator_args,
    );
    Cluster {
        operator,
        sim,
        client,
        dir,
    }
}

/// The default user of an Instance, from its Secret.
async fn credentials(client: &Client, secret: &str) -> (String, String) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret = secrets.get(secret).await.unwrap();
    let field = |k: &str| String::from_utf8(secret.data.as_ref().unwrap()[k].0.clone()).unwrap();
    (field("username"), field("password"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_and_its_topology_run_in_a_simulated_cluster() {
    // Bound in this order so a failure drops the operator (printing its log) first.
    let Cluster {
        dir: _dir,
        client,
        sim,
        operator,
    } = cluster(&[]).await;

    // A Vhost made before its Instance waits for it, backing off longer after each failure.
    let vhosts = dynamic::<Vhost>(&client);
    vhosts
        .create(&PostParams::default(), &manifest("vhost.yaml", |_| {}))
        .await
        .unwrap();
    let waiting = eventually(
        "the Vhost to wait for its Instance",
        Duration::from_secs(30),
        || async {
            let v = vhosts.get("orders").await.ok()?;
            let ready = condition(&v, "Ready")?.clone();
            (ready["reason"] == "InstanceMissing").then_some(ready)
        },
    )
    .await;
    assert_eq!(waiting["status"], "False", "{waiting}");
    // Each change of the resource is another failed attempt: by the seventh the next retry is
    // 5 minutes away (5 s doubling, capped at 300 s).
    let missing =
        "warren_operator_resource_not_ready_total{kind=\"Vhost\",reason=\"InstanceMissing\"}";
    for nudge in 0.. {
        let before = metric(&operator.metrics_page().await, missing);
        if before >= 7.0 {
            break;
        }
        vhosts
            .patch(
                "orders",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"annotations": {"e2e/nudge": nudge.to_string()}}}),
                ),
            )
            .await
            .unwrap();
        eventually(
            "the nudged Vhost to be reconciled",
            Duration::from_secs(10),
            || async { (metric(&operator.metrics_page().await, missing) > before).then_some(()) },
        )
        .await;
    }

    // An Instance becomes a StatefulSet, a running broker, and Ready.
    let instances = dynamic::<Instance>(&client);
    let instance = manifest("instance.yaml", |v| {
        v["spec"]["replicas"] = json!(1);
        v["spec"]["autoscaling"]["enabled"] = json!(false);
    });
    instances
        .create(&PostParams::default(), &instance)
        .await
        .unwrap();
    let ready = wait_ready(&instances, "demo").await;
    // The Instance turning ready wakes the Vhost: declared long before its 5-minute retry.
    eventually(
        "the early Vhost to be Ready soon after its Instance",
        Duration::from_secs(30),
        || async { is_true(&vhosts.get("orders").await.ok()?, "Ready").then_some(()) },
    )
    .await;
    assert_eq!(ready.data["status"]["readyReplicas"], 1, "{:?}", ready.data);
    assert!(is_true(&ready, "Reconciled"));
    assert_eq!(
        ready.data["status"]["endpoints"]["amqp"],
        "amqp://demo.shop.svc:5672"
    );
    let procs = sim.processes();
    assert_eq!(procs.len(), 1, "{procs:?}");
    assert_eq!((procs[0].0.as_str(), procs[0].1.as_str()), (NS, "demo-0"));
    let uid = ready.metadata.uid.clone().unwrap();
    let owned_by_instance = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == uid && o.controller == Some(true))
    };
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), NS);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), NS);
    assert!(owned_by_instance(&sts.get("demo").await.unwrap().metadata));
    let config_map = cms.get("demo-config").await.unwrap();
    assert!(owned_by_instance(&config_map.metadata));
    assert!(owned_by_instance(
        &services.get("demo").await.unwrap().metadata
    ));
    assert!(owned_by_instance(
        &services.get("demo-nodes").await.unwrap().metadata
    ));
    assert!(owned_by_instance(&pdbs.get("demo").await.unwrap().metadata));
    let secret = secrets.get("demo-default-user").await.unwrap();
    assert!(owned_by_instance(&secret.metadata));
    let field = |k: &str| String::from_utf8(secret.data.as_ref().unwrap()[k].0.clone()).unwrap();
    let (user, pass) = (field("username"), field("password"));
    assert!(pvcs.get("data-demo-0").await.is_ok());

    // The management API through the client Service's DNS name (the operator uses the same
    // name, through the harness's proxy), and AMQP through the Service's address.
    let http = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(sim.proxy_url()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mgmt = Management {
        base: "http://demo.shop.svc:15672".into(),
        user: user.clone(),
        pass: pass.clone(),
        http,
    };
    let whoami = mgmt.json("/api/whoami").await;
    assert_eq!(whoami["name"], user.as_str());

    // Exchange, Queue and Binding from the example manifests (the Vhost is there already).
    let exchanges = dynamic::<Exchange>(&client);
    let queues = dynamic::<Queue>(&client);
    let bindings = dynamic::<Binding>(&client);
    exchanges
        .create(&PostParams::default(), &manifest("exchange.yaml", |_| {}))
        .await
        .unwrap();
    // An exchange and a binding that are kept in the broker when their resources go.
    let archive = manifest("exchange.yaml", |v| {
        v["metadata"]["name"] = json!("archive");
        v["spec"]["name"] = json!("archive");
        v["spec"]["type"] = json!("fanout");
        v["spec"]["deletionPolicy"] = json!("retain");
    });
    exchanges
        .create(&PostParams::default(), &archive)
        .await
        .unwrap();
    let queue = manifest("queue.yaml", |v| v["spec"]["type"] = json!("classic"));
    queues.create(&PostParams::default(), &queue).await.unwrap();
    // A second queue that is kept in the broker when its resource goes.
    let kept = manifest("queue.yaml", |v| {
        v["metadata"]["name"] = json!("audit");
        v["spec"]["name"] = json!("audit");
        v["spec"]["type"] = json!("classic");
        v["spec"]["deletionPolicy"] = json!("retain");
    });
    queues.create(&PostParams::default(), &kept).await.unwrap();
    bindings
        .create(&PostParams::default(), &manifest("binding.yaml", |_| {}))
        .await
        .unwrap();
    let archived = manifest("binding.yaml", |v| {
        v["metadata"]["name"] = json!("audit-archive");
        v["spec"]["source"] = json!("archive");
        v["spec"]["destination"] = json!("audit");
        v["spec"]["routingKey"] = json!("");
        v["spec"]["deletionPolicy"] = json!("retain");
    });
    bindings
        .create(&PostParams::default(), &archived)
        .await
        .unwrap();
    wait_ready(&vhosts, "orders").await;
    wait_ready(&exchanges, "orders").await;
    wait_ready(&exchanges, "archive").await;
    wait_ready(&queues, "orders-created").await;
    wait_ready(&queues, "audit").await;
    wait_ready(&bindings, "orders-created").await;
    wait_ready(&bindings, "audit-archive").await;
    assert_eq!(mgmt.status("/api/vhosts/orders").await, 200);
    let limits = mgmt.json("/api/vhost-limits/orders").await;
    assert_eq!(limits[0]["value"]["max-connections"], 1000, "{limits}");
    let ex = mgmt.json("/api/exchanges/orders/orders").await;
    assert_eq!(
        (ex["type"].as_str(), ex["durable"].as_bool()),
        (Some("topic"), Some(true))
    );
    let q = mgmt.json("/api/queues/orders/orders.created").await;
    assert_eq!(q["arguments"]["x-max-length"], 100_000, "{q}");
    let b = mgmt
        .json("/api/bindings/orders/e/orders/q/orders.created")
        .await;
    assert_eq!(b[0]["routing_key"], "order.created.#", "{b}");
    let b = mgmt.json("/api/bindings/orders/e/archive/q/audit").await;
    assert_eq!(b.as_array().map(Vec::len), Some(1), "{b}");

    // Over AMQP too: each declared object answers a passive declare in vhost `orders`.
    let amqp = sim
        .service_addr(NS, "demo", 5672)
        .expect("the Service's AMQP port");
    let uri = format!("amqp://{user}:{pass}@{amqp}/orders");
    let conn = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    for q in ["orders.created", "audit"] {
        assert_eq!(passive_queue(&conn, q).await, Ok(()), "queue {q}");
    }
    assert_eq!(
        passive_exchange(&conn, "orders", ExchangeKind::Topic).await,
        Ok(())
    );
    assert_eq!(
        passive_exchange(&conn, "archive", ExchangeKind::Fanout).await,
        Ok(())
    );

    // Publish and consume over AMQP through the client Service.
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "orders".into(),
        "order.created.eu".into(),
        BasicPublishOptions::default(),
        b"order 1",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut consumer = ch
        .basic_consume(
            "orders.created".into(),
            "e2e".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a delivery in time")
        .unwrap()
        .unwrap();
    assert_eq!(delivery.data, b"order 1");
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    conn.close(200, "done".into()).await.unwrap();

    // Changes made by hand to owned objects are repaired.
    cms.patch(
        "demo-config",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"warren.toml": "# edited by hand\n"}})),
    )
    .await
    .unwrap();
    services
        .delete("demo", &DeleteParams::default())
        .await
        .unwrap();
    let original = config_map.data.clone();
    eventually(
        "the ConfigMap to be repaired",
        Duration::from_secs(30),
        || async { (cms.get("demo-config").await.ok()?.data == original).then_some(()) },
    )
    .await;
    eventually(
        "the client Service to be recreated",
        Duration::from_secs(30),
        || async { services.get_opt("demo").await.ok()?.map(|_| ()) },
    )
    .await;

    // `kubectl scale`: the scale subresource of the Instance drives the brokers.
    instances
        .patch_scale(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 3}})),
        )
        .await
        .unwrap();
    eventually("three ready brokers", Duration::from_secs(90), || async {
        let i = instances.get("demo").await.ok()?;
        (i.data["status"]["readyReplicas"] == 3 && is_true(&i, "Ready")).then_some(())
    })
    .await;
    assert_eq!(sim.processes().len(), 3);
    // The three brokers are one cluster: the new ones joined the metadata group, with the
    // Instance's user (made through the first) and its topology, on every broker.
    for pod in ["demo-0", "demo-1", "demo-2"] {
        let broker = Management {
            base: format!("http://{pod}.demo-nodes.shop.svc:15672"),
            user: user.clone(),
            pass: pass.clone(),
            http: mgmt.http.clone(),
        };
        eventually(
            &format!("{pod} to be in the cluster with the topology"),
            Duration::from_secs(60),
            || async {
                if broker.status("/api/overview").await != 200 {
                    return None;
                }
                let o = broker.json("/api/overview").await;
                let voters = o["cluster_metadata"]["voters"].as_array()?.len();
                (voters == 3
                    && broker.status("/api/queues/orders/orders.created").await == 200
                    && broker.status("/api/exchanges/orders/orders").await == 200)
                    .then_some(())
            },
        )
        .await;
    }
    // The Instance's status shows the cluster: its members, all up, and the leader.
    let shown = eventually(
        "the cluster in the Instance's status",
        Duration::from_secs(60),
        || async {
            let i = instances.get("demo").await.ok()?;
            let c = i.data["status"]["cluster"].clone();
            (c["up"] == "3/3" && c["metadataLeader"].is_string()).then_some(c)
        },
    )
    .await;
    let members: Vec<&str> = shown["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(members.len(), 3, "{shown}");
    assert!(
        members.contains(&shown["metadataLeader"].as_str().unwrap_or_default()),
        "{shown}"
    );
    // Clients that connect through the client Service, whichever broker answers each, all
    // use the same queue: each publishes one message with a confirm, and every message is
    // then consumed through the Service again.
    let service = sim
        .service_addr(NS, "demo", 5672)
        .expect("the Service's AMQP port");
    let through_service = format!("amqp://{user}:{pass}@{service}/orders");
    // Each broker's count of connections opened, to tell which ones the clients reached.
    let opened = || async {
        let mut counts = Vec::new();
        for pod in ["demo-0", "demo-1", "demo-2"] {
            let addr = sim
                .resolve(&format!("{pod}.demo-nodes.shop.svc"), 15692)
                .expect("the broker's metrics port");
            let page = reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap()
                .get(format!("http://{addr}/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            counts.push(metric(&page, "rabbitmq_connections_opened_total"));
        }
        counts
    };
    let opened_before = opened().await;
    const CLIENTS: usize = 12;
    for i in 0..CLIENTS {
        let conn = Connection::connect(&through_service, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        ch.queue_declare(
            "shared".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        let confirm = ch
            .basic_publish(
                "".into(),
                "shared".into(),
                BasicPublishOptions::default(),
                format!("from client {i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "client {i}: {confirm:?}");
        conn.close(200, "done".into()).await.unwrap();
    }
    let reached = opened()
        .await
        .iter()
        .zip(&opened_before)
        .filter(|(after, before)| after > before)
        .count();
    assert!(
        reached >= 2,
        "the clients all reached one broker through the Service: {opened_before:?}"
    );
    let mut received = std::collections::BTreeSet::new();
    for _ in 0..CLIENTS * 3 {
        if received.len() == CLIENTS {
            break;
        }
        let conn = Connection::connect(&through_service, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        if let Some(m) = ch
            .basic_get("shared".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            received.insert(String::from_utf8_lossy(&m.delivery.data).into_owned());
        }
        conn.close(200, "done".into()).await.unwrap();
    }
    assert_eq!(
        received,
        (0..CLIENTS)
            .map(|i| format!("from client {i}"))
            .collect::<std::collections::BTreeSet<_>>(),
        "every message, whichever broker each client reached"
    );
    let conn = Connection::connect(&through_service, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete("shared".into(), Default::default())
        .await
        .unwrap();
    conn.close(200, "done".into()).await.unwrap();
    let scale = instances.get_scale("demo").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(3));
    // A client of the broker that goes is told by its preStop drain, before SIGTERM.
    let leaving = sim
        .resolve("demo-1.demo-nodes.shop.svc", 5672)
        .expect("the second broker's address");
    let leaving = Connection::connect(
        &format!("amqp://{user}:{pass}@{leaving}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let mut events = leaving.events_listener();
    // A durable queue whose home is demo-1: the scale-down waits for it, and says why.
    let pinned = leaving.create_channel().await.unwrap();
    pinned
        .queue_declare(
            "pinned".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    instances
        .patch_scale(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 1}})),
        )
        .await
        .unwrap();
    let refused = eventually(
        "the scale-down refused while demo-1 is a queue's home",
        Duration::from_secs(30),
        || async {
            let i = instances.get("demo").await.ok()?;
            let scaling = condition(&i, "Scaling")?.clone();
            (scaling["reason"] == "ScaleDownRefused").then_some(scaling)
        },
    )
    .await;
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("demo-1 is the home of 1 queue(s)") && message.contains("'pinned'"),
        "{message}"
    );
    let warnings: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), NS);
    eventually("a Warning Event", Duration::from_secs(30), || async {
        let list = warnings.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("ScaleDownRefused")
                    && e.type_.as_deref() == Some("Warning")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("demo")
            })
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        sts.get("demo").await.unwrap().spec.unwrap().replicas,
        Some(3),
        "no broker leaves while one that would go is a queue's home"
    );
    // Deleted: the scale-down goes on by itself.
    pinned
        .queue_delete("pinned".into(), Default::default())
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(e) = events.next().await {
            if let lapin::Event::Error(e) = e
                && let lapin::ErrorKind::ProtocolError(e) = e.kind()
            {
                return Some((e.get_id(), e.get_message().to_string()));
            }
        }
        None
    })
    .await
    .expect("the client is closed in time");
    let (code, text) = closed.expect("an AMQP close");
    assert_eq!(code, 320, "{text}");
    assert!(text.contains("maintenance mode"), "{text}");
    gone(&pods, "demo-2").await;
    gone(&pods, "demo-1").await;
    eventually("one broker process", Duration::from_secs(30), || async {
        (sim.processes().len() == 1).then_some(())
    })
    .await;
    // It left the metadata group as it drained: the one left is a majority by itself.
    let voters = mgmt.json("/api/overview").await["cluster_metadata"]["voters"].clone();
    assert_eq!(voters.as_array().map(Vec::len), Some(1), "{voters}");
    assert!(
        pvcs.get("data-demo-1").await.is_ok(),
        "scaling down keeps the volume"
    );
    eventually(
        "the Instance's status to show a cluster of one",
        Duration::from_secs(60),
        || async {
            let i = instances.get("demo").await.ok()?;
            (i.data["status"]["cluster"]["up"] == "1/1").then_some(())
        },
    )
    .await;

    // Deletion: `delete` removes the object from the broker, `retain` keeps it. Bindings
    // first, while their exchange and queue exist: deleting either would take the binding
    // with it and prove nothing about the Binding's own policy. (The client Service was
    // made again above: its local address is a new one.)
    let amqp = sim
        .service_addr(NS, "demo", 5672)
        .expect("the Service's AMQP port");
    let amqp = Connection::connect(
        &format!("amqp://{user}:{pass}@{amqp}/orders"),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    bindings
        .delete("orders-created", &DeleteParams::default())
        .await
        .unwrap();
    gone(&bindings, "orders-created").await;
    let b = mgmt
        .json("/api/bindings/orders/e/orders/q/orders.created")
        .await;
    assert_eq!(b, json!([]), "the binding is gone from the broker");
    bindings
        .delete("audit-archive", &DeleteParams::default())
        .await
        .unwrap();
    gone(&bindings, "audit-archive").await;
    let retained_binding = || async {
        let b = mgmt.json("/api/bindings/orders/e/archive/q/audit").await;
        assert_eq!(b.as_array().map(Vec::len), Some(1), "retained: {b}");
    };
    retained_binding().await;
    queues
        .delete("orders-created", &DeleteParams::default())
        .await
        .unwrap();
    gone(&queues, "orders-created").await;
    assert_eq!(mgmt.status("/api/queues/orders/orders.created").await, 404);
    assert_eq!(passive_queue(&amqp, "orders.created").await, Err(404));
    queues
        .delete("audit", &DeleteParams::default())
        .await
        .unwrap();
    gone(&queues, "audit").await;
    assert_eq!(mgmt.status("/api/queues/orders/audit").await, 200);
    assert_eq!(passive_queue(&amqp, "audit").await, Ok(()));
    exchanges
        .delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    gone(&exchanges, "orders").await;
    assert_eq!(mgmt.status("/api/exchanges/orders/orders").await, 404);
    assert_eq!(
        passive_exchange(&amqp, "orders", ExchangeKind::Topic).await,
        Err(404)
    );
    exchanges
        .delete("archive", &DeleteParams::default())
        .await
        .unwrap();
    gone(&exchanges, "archive").await;
    assert_eq!(mgmt.status("/api/exchanges/orders/archive").await, 200);
    assert_eq!(
        passive_exchange(&amqp, "archive", ExchangeKind::Fanout).await,
        Ok(())
    );
    retained_binding().await;
    amqp.close(200, "done".into()).await.unwrap();
    vhosts
        .delete("orders", &DeleteParams::default())
        .await
        .unwrap();
    gone(&vhosts, "orders").await;
    assert_eq!(
        mgmt.status("/api/vhosts/orders").await,
        200,
        "the vhost is retained"
    );

    // The operator counted its work.
    let page = operator.metrics_page().await;
    assert!(
        page.contains("warren_operator_reconciliations_total{kind=\"Instance\"}"),
        "{page}"
    );
    assert!(metric(&page, missing) >= 7.0, "{page}");

    // Deleting the Instance removes everything it owned, and its brokers stop.
    instances
        .delete("demo", &DeleteParams::default())
        .await
        .unwrap();
    gone(&instances, "demo").await;
    gone(&sts, "demo").await;
    gone(&cms, "demo-config").await;
    gone(&services, "demo").await;
    gone(&services, "demo-nodes").await;
    gone(&secrets, "demo-default-user").await;
    gone(&pdbs, "demo").await;
    gone(&pods, "demo-0").await;
    gone(&pvcs, "data-demo-0").await;
    gone(&pvcs, "data-demo-1").await;
    gone(&pvcs, "data-demo-2").await;
    eventually(
        "every broker process to stop",
        Duration::from_secs(30),
        || async { sim.processes().is_empty().then_some(()) },
    )
    .await;
    drop(operator);
    drop(sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_autoscaler_follows_the_backlog_and_drains_a_broker_before_it_goes() {
    let c = cluster(&["--autoscale-interval", "0.5"]).await;
    let instances = dynamic::<Instance>(&c.client);
    let sts: Api<StatefulSet> = Api::namespaced(c.client.clone(), NS);
    let instance: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "Instance",
        "metadata": {"name": "busy", "namespace": NS},
        "spec": {
            "replicas": 1,
            "storage": {"size": "1Gi"},
            "autoscaling": {
                "enabled": true,
                "minReplicas": 1,
                "maxReplicas": 3,
                "targets": {"messagesReadyPerReplica": 100},
                "scaleUpStabilizationSeconds": 0,
                "scaleDownStabilizationSeconds": 2,
            },
        },
    }))
    .unwrap();
    instances
        .create(&PostParams::default(), &instance)
        .await
        .unwrap();
    wait_ready(&instances, "busy").await;
    let (user, pass) = credentials(&c.client, "busy-default-user").await;
    let broker = |n: u32| {
        let addr = c
            .sim
            .resolve(&format!("busy-{n}.busy-nodes.{NS}.svc"), 5672)
            .expect("the broker's pod address");
        format!("amqp://{user}:{pass}@{addr}/%2f")
    };

    // 250 ready messages on the first broker: 100 per broker wants 3.
    let first = Connection::connect(&broker(0), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = first.create_channel().await.unwrap();
    ch.queue_declare(
        "backlog".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for i in 0..250 {
        ch.basic_publish(
            "".into(),
            "backlog".into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    eventually("three ready brokers", Duration::from_secs(60), || async {
        let i = instances.get("busy").await.ok()?;
        let s = &i.data["status"];
        (s["desiredReplicas"] == 3 && s["readyReplicas"] == 3 && is_true(&i, "Ready")).then_some(())
    })
    .await;
    assert_eq!(c.sim.processes().len(), 3);

    // The backlog is gone, but the last broker holds a message: it stays until that is consumed.
    let last = Connection::connect(&broker(2), ConnectionProperties::default())
        .await
        .unwrap();
    let last_ch = last.create_channel().await.unwrap();
    last_ch
        .queue_declare(
            "stuck".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    last_ch
        .basic_publish(
            "".into(),
            "stuck".into(),
            BasicPublishOptions::default(),
            b"last",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    ch.queue_purge("backlog".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    let draining = eventually(
        "the scale-down to wait for busy-2",
        Duration::from_secs(30),
        || async {
            let i = instances.get("busy").await.ok()?;
            let scaling = condition(&i, "Scaling")?.clone();
            (scaling["reason"] == "Draining").then_some(scaling)
        },
    )
    .await;
    let message = draining["message"].as_str().unwrap();
    assert!(
        message.contains("busy-2 still holds 1 messages"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        sts.get("busy").await.unwrap().spec.unwrap().replicas,
        Some(3),
        "no broker leaves while the last one holds a message"
    );
    assert_eq!(c.sim.processes().len(), 3);

    // Consumed: the brokers leave, highest ordinal first, down to what the load wants.
    let got = last_ch
        .basic_get("stuck".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the message on busy-2");
    assert_eq!(got.delivery.data, b"last");
    eventually("one broker left", Duration::from_secs(60), || async {
        let i = instances.get("busy").await.ok()?;
        let s = &i.data["status"];
        let stable = condition(&i, "Scaling")?["reason"] == "Stable";
        (s["desiredReplicas"] == 1 && s["replicas"] == 1 && stable && c.sim.processes().len() == 1)
            .then_some(())
    })
    .await;
    assert_eq!(c.sim.processes()[0].1, "busy-0");
    let remaining = ch
        .queue_declare(
            "backlog".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(remaining.message_count(), 0);
}

/// A passive declare of queue `name` on a fresh channel: Ok when it exists, else the reply code.
async fn passive_queue(conn: &Connection, name: &str) -> Result<(), u16> {
    let ch = conn.create_channel().await.unwrap();
    let result = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|_| ());
    settle(ch, result).await
}

/// A passive declare of exchange `name`, as [`passive_queue`].
async fn passive_exchange(conn: &Connection, name: &str, kind: ExchangeKind) -> Result<(), u16> {
    let ch = conn.create_channel().await.unwrap();
    let result = ch
        .exchange_declare(
            name.into(),
            kind,
            ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await;
    settle(ch, result).await
}

/// The reply code of a refused declare (the broker closed the channel), or closes the channel.
async fn settle(ch: lapin::Channel, result: lapin::Result<()>) -> Result<(), u16> {
    match result {
        Ok(()) => {
            ch.close(200, "checked".into()).await.unwrap();
            Ok(())
        }
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(e) => Err(e.get_id()),
            _ => panic!("not a refusal from the broker: {e}"),
        },
    }
}

/// The holder of the operator's Lease (`None` when there is no Lease, `""` once released).
async fn lease_holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), OPERATOR_NS);
    let lease = leases.get_opt("warren-operator").await.ok()??;
    Some(lease.spec?.holder_identity.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_operator_releases_its_lease_and_the_next_one_leads_at_once() {
    let mut c = cluster(&[]).await;
    eventually(
        "the first operator to lead",
        Duration::from_secs(30),
        || async { (lease_holder(&c.client).await? == "warren-operator-0").then_some(()) },
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(c.client.clone(), OPERATOR_NS);
    let held = leases.get("warren-operator").await.unwrap().spec.unwrap();
    assert_eq!(held.lease_duration_seconds, Some(15));
    let instances = dynamic::<Instance>(&c.client);
    let instance: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "Instance",
        "metadata": {"name": "solo", "namespace": NS},
        "spec": {"replicas": 1, "storage": {"size": "1Gi"}},
    }))
    .unwrap();
    instances
        .create(&PostParams::default(), &instance)
        .await
        .unwrap();
    wait_ready(&instances, "solo").await;

    // SIGTERM: a clean exit, in time, and the Lease given up rather than left to expire.
    let status = c.operator.terminate(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status:?}");
    let released = leases.get("warren-operator").await.unwrap().spec.unwrap();
    assert_eq!(released.holder_identity.as_deref().unwrap_or(""), "");
    assert_eq!(released.lease_duration_seconds, Some(1));
    assert_eq!(released.lease_transitions, held.lease_transitions);

    // The next operator leads at once, not after the 15 s the Lease would have lasted.
    let started = Instant::now();
    let next = c.another_operator("warren-operator-1");
    eventually(
        "the second operator to lead",
        Duration::from_secs(15),
        || async { (lease_holder(&c.client).await? == "warren-operator-1").then_some(()) },
    )
    .await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "took the Lease after {took:?}"
    );
    // And it reconciles: a new Queue becomes Ready.
    let queues = dynamic::<Queue>(&c.client);
    let queue: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "warren.dev/v1alpha1",
        "kind": "Queue",
        "metadata": {"name": "after-handover", "namespace": NS},
        "spec": {"instanceRef": {"name": "solo"}, "name": "after-handover", "type": "classic"},
    }))
    .unwrap();
    queues.create(&PostParams::default(), &queue).await.unwrap();
    eventually(
        "the new leader to declare the Queue",
        Duration::from_secs(30),
        || async { is_true(&queues.get("after-handover").await.ok()?, "Ready").then_some(()) },
    )
    .await;
    drop(next);
}
