//! Acceptance: RabbitMQ's own CLI, `rabbitmqadmin` v2, manages a live `warren-broker`
//! process. `./test.sh` installs the tool (`cargo install rabbitmqadmin`) and names it in
//! `WARREN_RABBITMQADMIN`; without that variable these tests say so and pass.
//!
//! The CLI prints tables; with `--table-style markdown` they have a header row, so the tests
//! read columns by name. After each change they also check the broker's state through the
//! HTTP API (with `rabbitmq_http_client`), so a command that "succeeds" without doing
//! anything is caught.

use rabbitmq_http_client::api::Client;
use rabbitmq_http_client::error::Error as ClientError;
use rabbitmq_http_client::password_hashing::{base64_encoded_salted_password_hash_sha256, salt};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::rc::Rc;
use warren_e2e::BrokerProcess;

/// The `rabbitmqadmin` binary from `WARREN_RABBITMQADMIN`, or `None` (loudly) when unset.
fn rabbitmqadmin() -> Option<PathBuf> {
    match std::env::var_os("WARREN_RABBITMQADMIN") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "WARREN_RABBITMQADMIN={} does not exist",
                path.display()
            );
            Some(path)
        }
        None => {
            eprintln!(
                "SKIPPED: WARREN_RABBITMQADMIN is not set, so rabbitmqadmin v2 is not run \
                 against Warren. ./test.sh installs it and sets the variable."
            );
            None
        }
    }
}

/// One `rabbitmqadmin` pointed at one broker (and one vhost), with an empty home so no
/// `~/.rabbitmqadmin.conf` is read.
#[derive(Clone)]
struct Admin {
    bin: PathBuf,
    port: String,
    vhost: Option<String>,
    home: Rc<tempfile::TempDir>,
}

/// What a failed command printed and its exit code.
#[derive(Debug)]
struct Failure {
    code: Option<i32>,
    output: String,
}

impl Admin {
    fn new(bin: &Path, broker: &BrokerProcess) -> Self {
        Self {
            bin: bin.to_path_buf(),
            port: broker.management_addr.port().to_string(),
            vhost: None,
            home: Rc::new(tempfile::tempdir().expect("home directory")),
        }
    }

    /// The same tool with `--vhost`.
    fn in_vhost(&self, vhost: &str) -> Self {
        Self {
            vhost: Some(vhost.to_owned()),
            ..self.clone()
        }
    }

    /// Runs `words` (split at spaces) followed by `tail` (values with spaces, JSON, "").
    fn try_run(&self, words: &str, tail: &[&str]) -> Result<String, Failure> {
        let mut cmd = Command::new(&self.bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RABBITMQADMIN_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("HOME", self.home.path())
            .args(["--host", "127.0.0.1", "--port", &self.port])
            .args(["--username", "guest", "--password", "guest"])
            .args(["--table-style", "markdown"]);
        if let Some(v) = &self.vhost {
            cmd.args(["--vhost", v]);
        }
        let out = cmd
            .args(words.split_whitespace())
            .args(tail)
            .output()
            .expect("run rabbitmqadmin");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(Failure {
                code: out.status.code(),
                output: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
            })
        }
    }

    /// Runs a command that must succeed; returns what it printed.
    fn run_with(&self, words: &str, tail: &[&str]) -> String {
        self.try_run(words, tail)
            .unwrap_or_else(|f| panic!("rabbitmqadmin {words} {tail:?} failed: {f:?}"))
    }

    fn run(&self, words: &str) -> String {
        self.run_with(words, &[])
    }

    /// Runs a command that must fail; returns what it printed.
    fn fails(&self, words: &str) -> String {
        match self.try_run(words, &[]) {
            Ok(out) => panic!("rabbitmqadmin {words} succeeded but should fail:\n{out}"),
            Err(f) => {
                assert_ne!(f.code, Some(0));
                f.output
            }
        }
    }

    /// Runs a listing command and reads its table.
    fn table(&self, words: &str) -> Table {
        Table::parse(&self.run(words))
    }
}

/// A markdown table as `rabbitmqadmin --table-style markdown` prints it. A cell with several
/// lines (arguments, properties) continues on rows whose first cell is empty; those are
/// folded into the row above.
#[derive(Debug)]
struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn parse(text: &str) -> Self {
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with('|'))
            .collect();
        let cells = |line: &str| -> Vec<String> {
            line.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        };
        let sep = lines
            .iter()
            .position(|l| l.starts_with("|-"))
            .unwrap_or_else(|| panic!("no table in:\n{text}"));
        let header = cells(lines[sep - 1]);
        let mut rows: Vec<Vec<String>> = Vec::new();
        for line in &lines[sep + 1..] {
            let row = cells(line);
            let filled = row.iter().filter(|c| !c.is_empty()).count();
            if filled == 0 {
                continue;
            }
            let continues = row[0].is_empty() && filled * 2 < row.len();
            match rows.last_mut() {
                Some(prev) if continues => {
                    for (p, c) in prev.iter_mut().zip(row) {
                        if !c.is_empty() {
                            p.push('\n');
                            p.push_str(&c);
                        }
                    }
                }
                _ => rows.push(row),
            }
        }
        Self { header, rows }
    }

    fn records(&self) -> Vec<HashMap<String, String>> {
        self.rows
            .iter()
            .map(|r| self.header.iter().cloned().zip(r.iter().cloned()).collect())
            .collect()
    }

    /// The rows whose `column` is `value`.
    fn where_(&self, column: &str, value: &str) -> Vec<HashMap<String, String>> {
        assert!(
            self.header.iter().any(|h| h == column),
            "no column {column} in {:?}",
            self.header
        );
        self.records()
            .into_iter()
            .filter(|r| r[column] == value)
            .collect()
    }

    /// The one row whose `column` is `value`.
    fn one(&self, column: &str, value: &str) -> HashMap<String, String> {
        let mut found = self.where_(column, value);
        assert_eq!(found.len(), 1, "one row with {column}={value} in {self:#?}");
        found.remove(0)
    }

    fn column(&self, column: &str) -> Vec<String> {
        self.records()
            .into_iter()
            .map(|r| r[column].clone())
            .collect()
    }
}

type Api = Client<String, String, String>;

fn api_as(broker: &BrokerProcess, user: &str, password: &str) -> Api {
    Client::new(
        format!("http://{}/api", broker.management_addr),
        user.to_owned(),
        password.to_owned(),
    )
}

fn api(broker: &BrokerProcess) -> Api {
    api_as(broker, "guest", "guest")
}

fn not_found<T: std::fmt::Debug>(r: Result<T, rabbitmq_http_client::error::HttpClientError>) {
    assert!(
        matches!(r, Err(ClientError::NotFound)),
        "expected 404: {r:?}"
    );
}

#[tokio::test]
async fn show_overview_and_list_nodes_describe_warren() {
    let Some(bin) = rabbitmqadmin() else { return };
    let broker = BrokerProcess::start();
    let admin = Admin::new(&bin, &broker);

    let overview = admin.table("show overview");
    let value = |key: &str| {
        let row = overview.rows.iter().find(|r| r[0] == key);
        row.unwrap_or_else(|| panic!("{key} in {overview:#?}"))[1].clone()
    };
    assert_eq!(value("Product name"), "Warren");
    assert_eq!(value("RabbitMQ version"), "3.10.8");
    assert_eq!(value("Queues and streams (total)"), "0");

    let node = api(&broker).overview().await.expect("overview").node;
    let nodes = admin.table("list nodes");
    let row = nodes.one("name", &node);
    assert_eq!(row["being_drained"], "false");
    assert_eq!(row["os_pid"], broker.pid().to_string());
    assert!(
        row["enabled_plugins"].contains("rabbitmq_management"),
        "{row:?}"
    );

    // Listings of what Warren has none of answer empty, not 404.
    for listing in [
        "list user_limits",
        "list vhost_limits",
        "list policies",
        "list feature_flags",
    ] {
        let t = admin.table(listing);
        assert!(t.rows.is_empty(), "{listing}: {t:?}");
    }

    assert!(admin.run("health_check local_alarms").contains("passed"));
}

#[tokio::test]
async fn vhosts_are_declared_listed_and_deleted() {
    let Some(bin) = rabbitmqadmin() else { return };
    let broker = BrokerProcess::start();
    let admin = Admin::new(&bin, &broker);
    let rc = api(&broker);

    admin.run_with(
        "declare vhost --name billing --description",
        &["invoices and payments"],
    );
    let v = rc.get_vhost("billing").await.expect("declared");
    assert_eq!(v.description.as_deref(), Some("invoices and payments"));

    let vhosts = admin.table("list vhosts");
    let billing = vhosts.one("name", "billing");
    assert_eq!(billing["description"], "invoices and payments");
    assert_eq!(vhosts.where_("name", "/").len(), 1);

    admin.run("delete vhost --name billing");
    not_found(rc.get_vhost("billing").await);
    assert!(
        admin
            .table("list vhosts")
            .where_("name", "billing")
            .is_empty()
    );
    let out = admin.fails("delete vhost --name billing");
    assert!(out.contains("404"), "{out}");
    admin.run("delete vhost --name billing --idempotently");
}

#[tokio::test]
async fn users_and_permissions_are_declared_listed_and_deleted() {
    let Some(bin) = rabbitmqadmin() else { return };
    let broker = BrokerProcess::start();
    let admin = Admin::new(&bin, &broker);
    let rc = api(&broker);
    admin.run("declare vhost --name team");

    // With a password (the CLI salts and hashes it) and with a ready-made hash.
    admin.run("declare user --name erin --password erin-pw --tags management,policymaker");
    let hash = base64_encoded_salted_password_hash_sha256(&salt(), "frank-pw");
    admin.run_with(
        "declare user --name frank --tags monitoring --password-hash",
        &[&hash],
    );
    let me = api_as(&broker, "erin", "erin-pw")
        .current_user()
        .await
        .expect("erin logs in with her password");
    let mut tags = me.tags.0;
    tags.sort();
    assert_eq!(tags, vec!["management", "policymaker"]);
    api_as(&broker, "frank", "frank-pw")
        .current_user()
        .await
        .expect("frank logs in with the password behind his hash");

    let users = admin.table("list users");
    assert_eq!(users.one("name", "frank")["password_hash"], hash);
    assert!(users.one("name", "erin")["tags"].contains("policymaker"));
    assert!(users.one("name", "guest")["tags"].contains("administrator"));

    let team = admin.in_vhost("team");
    team.run(r"declare permissions --username erin --configure ^erin-.* --read .* --write ^amq\.default$");
    let p = rc.get_permissions("team", "erin").await.expect("granted");
    assert_eq!(
        (p.configure.as_str(), p.write.as_str(), p.read.as_str()),
        ("^erin-.*", r"^amq\.default$", ".*")
    );
    let listed = admin.table("list permissions");
    let erin = listed.one("user", "erin");
    assert_eq!(erin["vhost"], "team");
    assert_eq!(erin["configure"], "^erin-.*");
    assert_eq!(erin["write"], r"^amq\.default$");

    team.run("delete permissions --username erin");
    not_found(rc.get_permissions("team", "erin").await);
    assert!(
        admin
            .table("list permissions")
            .where_("user", "erin")
            .is_empty()
    );

    admin.run("delete user --name erin");
    admin.run("delete user --name frank");
    not_found(rc.get_user("erin").await);
    assert_eq!(admin.table("list users").column("name"), vec!["guest"]);
    let out = admin.fails("delete user --name erin");
    assert!(out.contains("404"), "{out}");
}

#[tokio::test]
async fn exchanges_queues_and_bindings_route_messages_published_and_got_with_the_cli() {
    let Some(bin) = rabbitmqadmin() else { return };
    let broker = BrokerProcess::start();
    let rc = api(&broker);
    Admin::new(&bin, &broker).run("declare vhost --name shop");
    let shop = Admin::new(&bin, &broker).in_vhost("shop");
    let queue_length = |name: &'static str| {
        let rc = &rc;
        async move {
            let q = rc.get_queue_info("shop", name).await.expect("queue");
            q.message_count
        }
    };

    // Exchanges.
    shop.run("declare exchange --name orders --type topic --durable true");
    shop.run("declare exchange --name audit --type fanout --durable false --auto-delete false");
    let x = rc
        .get_exchange_info("shop", "orders")
        .await
        .expect("orders");
    assert_eq!(x.exchange_type, "topic");
    assert!(x.durable);
    let exchanges = shop.table("list exchanges");
    assert_eq!(exchanges.one("name", "orders")["exchange_type"], "topic");
    assert_eq!(exchanges.one("name", "audit")["durable"], "false");
    assert_eq!(exchanges.one("name", "amq.topic")["vhost"], "shop");

    // A classic durable queue with arguments, and a second one.
    shop.run_with(
        "declare queue --name new-orders --type classic --durable true --arguments",
        &[r#"{"x-max-length": 100, "x-message-ttl": 60000}"#],
    );
    shop.run("declare queue --name audit-log --durable true");
    let q = rc
        .get_queue_info("shop", "new-orders")
        .await
        .expect("queue");
    assert!(q.durable);
    assert_eq!(q.arguments.get("x-max-length"), Some(&json!(100)));
    assert_eq!(q.arguments.get("x-message-ttl"), Some(&json!(60000)));
    let queues = shop.table("list queues");
    let row = queues.one("name", "new-orders");
    assert_eq!(row["queue_type"], "classic");
    assert_eq!(row["durable"], "true");
    assert!(row["arguments"].contains("x-max-length: 100"), "{row:?}");
    assert_eq!(queues.column("name").len(), 2);
    // Paged, as RabbitMQ pages queue lists.
    let page = shop.table("list queues --page 2 --page-size 1");
    assert_eq!(page.column("name"), vec!["new-orders"]);

    // Bindings: exchange to queue, exchange to exchange, and on to a queue.
    shop.run("declare binding --source orders --destination-type queue --destination new-orders --routing-key order.created");
    shop.run("declare binding --source orders --destination-type exchange --destination audit --routing-key order.#");
    shop.run_with(
        "declare binding --source audit --destination-type queue --destination audit-log --routing-key",
        &[""],
    );
    let from_orders = rc
        .list_exchange_bindings_with_source("shop", "orders")
        .await
        .expect("bindings");
    assert_eq!(from_orders.len(), 2, "{from_orders:?}");
    let bindings = shop.table("list bindings");
    let e2e = bindings.one("destination", "audit");
    assert_eq!(e2e["source"], "orders");
    assert_eq!(e2e["destination_type"], "exchange");
    assert_eq!(e2e["routing_key"], "order.#");
    let to_queue = bindings
        .where_("destination", "new-orders")
        .into_iter()
        .find(|b| b["source"] == "orders")
        .expect("orders -> new-orders");
    assert_eq!(to_queue["routing_key"], "order.created");

    // Publish through the exchanges; get the messages back.
    let out = shop.run_with(
        "publish message --exchange orders --routing-key order.created --payload",
        &[
            "order 42",
            "--properties",
            r#"{"content_type": "text/plain", "delivery_mode": 2, "headers": {"shop": "eu"}}"#,
        ],
    );
    assert!(out.contains("routed successfully"), "{out}");
    let out = shop
        .run("publish message --exchange orders --routing-key order.cancelled --payload order-43");
    assert!(out.contains("routed successfully"), "{out}");
    let out =
        shop.run("publish message --exchange orders --routing-key invoice.sent --payload nobody");
    assert!(out.contains("NOT routed"), "{out}");
    assert_eq!(queue_length("new-orders").await, 1);
    assert_eq!(queue_length("audit-log").await, 2);
    let shown =
        shop.table("queues show --name audit-log --columns name,message_count,message_bytes");
    let row = shown.one("name", "audit-log");
    assert_eq!(row["message_count"], "2");
    assert_eq!(row["message_bytes"], "16");

    let got = shop.table("get messages --queue new-orders --count 5 --ack-mode ack_requeue_false");
    let msg = got.one("payload", "order 42");
    assert_eq!(msg["exchange"], "orders");
    assert_eq!(msg["routing_key"], "order.created");
    assert_eq!(msg["payload_bytes"], "8");
    assert_eq!(msg["message_count"], "0");
    assert!(
        msg["properties"].contains(r#"content_type: "text/plain""#),
        "{msg:?}"
    );
    assert!(msg["properties"].contains("shop"), "{msg:?}");
    assert_eq!(queue_length("new-orders").await, 0);
    // Requeued: still there afterwards.
    let peek = shop.table("get messages --queue audit-log --count 1 --ack-mode ack_requeue_true");
    assert_eq!(peek.column("payload"), vec!["order 42"]);
    assert_eq!(queue_length("audit-log").await, 2);

    shop.run("purge queue --name audit-log");
    assert_eq!(queue_length("audit-log").await, 0);

    // Unbind, and routing stops.
    shop.run("delete binding --source orders --destination-type exchange --destination audit --routing-key order.#");
    shop.run("delete binding --source orders --destination-type queue --destination new-orders --routing-key order.created");
    let from_orders = rc
        .list_exchange_bindings_with_source("shop", "orders")
        .await
        .expect("bindings");
    assert!(from_orders.is_empty(), "{from_orders:?}");
    let out =
        shop.run("publish message --exchange orders --routing-key order.created --payload late");
    assert!(out.contains("NOT routed"), "{out}");

    // Delete queues and exchanges.
    shop.run("delete queue --name new-orders");
    shop.run("delete queue --name audit-log");
    shop.run("delete exchange --name orders");
    shop.run("delete exchange --name audit");
    not_found(rc.get_queue_info("shop", "new-orders").await);
    not_found(rc.get_exchange_info("shop", "orders").await);
    assert!(shop.table("list queues").rows.is_empty());
    assert!(
        shop.table("list exchanges")
            .where_("name", "orders")
            .is_empty()
    );
    let out = shop.fails("delete queue --name new-orders");
    assert!(out.contains("404"), "{out}");
    shop.run("delete queue --name new-orders --idempotently");
}

/// A vhost with a user, a permission, two exchanges, a queue and two bindings, declared with
/// the CLI.
fn populate(admin: &Admin, vhost: &str) {
    admin.run(&format!("declare vhost --name {vhost} --description moved"));
    admin.run("declare user --name gina --password gina-pw --tags monitoring");
    let v = admin.in_vhost(vhost);
    v.run_with(
        "declare permissions --username gina --read .* --configure",
        &["", "--write", ""],
    );
    v.run("declare exchange --name events --type topic --durable true");
    v.run("declare exchange --name copies --type fanout --durable true");
    v.run_with(
        "declare queue --name orders --durable true --arguments",
        &[r#"{"x-max-length": 10}"#],
    );
    v.run("declare binding --source events --destination-type queue --destination orders --routing-key order.#");
    v.run("declare binding --source events --destination-type exchange --destination copies --routing-key #");
}
/// The vhost's exchanges, queues and bindings as (kind, name-ish) pairs, for comparing.
fn topology_of(doc: &Value, vhost: Option<&str>) -> Vec<String> {
    let in_vhost = |o: &&Value| vhost.is_none_or(|v| o["vhost"] == v);
    let list = |key: &str| doc[key].as_array().cloned().unwrap_or_default();
    let mut out = Vec::new();
    for x in list("exchanges").iter().filter(in_vhost) {
        out.push(format!(
            "exchange {} {} {}",
            x["name"], x["type"], x["durable"]
        ));
    }
    for q in list("queues").iter().filter(in_vhost) {
        out.push(format!(
            "queue {} {} {}",
            q["name"], q["durable"], q["arguments"]
        ));
    }
    for b in list("bindings").iter().filter(in_vhost) {
        out.push(format!(
            "binding {} -> {} {} {}",
            b["source"], b["destination_type"], b["destination"], b["routing_key"]
        ));
    }
    out.sort();
    out
}

async fn assert_imported(target: &BrokerProcess, vhost: &str) {
    let rc = api(target);
    let q = rc.get_queue_info(vhost, "orders").await.expect("queue");
    assert!(q.durable);
    assert_eq!(q.arguments.get("x-max-length"), Some(&json!(10)));
    assert_eq!(
        rc.get_exchange_info(vhost, "events")
            .await
            .expect("exchange")
            .exchange_type,
        "topic"
    );
    let routed = rc
        .publish_message(vhost, "events", "order.new", "x", Map::new())
        .await
        .expect("publish");
    assert!(routed.routed, "the imported bindings route");
    assert_eq!(
        rc.get_queue_info(vhost, "orders")
            .await
            .expect("q")
            .message_count,
        1
    );
}

#[tokio::test]
async fn definitions_exported_to_a_file_import_into_a_fresh_broker() {
    let Some(bin) = rabbitmqadmin() else { return };
    let source = BrokerProcess::start();
    let admin = Admin::new(&bin, &source);
    populate(&admin, "shop");

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("definitions.json");
    let file_arg = file.to_str().expect("utf-8 path");
    admin.run_with("definitions export --file", &[file_arg]);
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("JSON");
    assert_eq!(doc["rabbitmq_version"], "3.10.8");
    let users = doc["users"].as_array().expect("users");
    assert!(users.iter().any(|u| u["name"] == "gina"), "{users:?}");
    assert!(
        doc["vhosts"]
            .as_array()
            .expect("vhosts")
            .iter()
            .any(|v| v["name"] == "shop")
    );
    assert!(
        doc["permissions"]
            .as_array()
            .expect("permissions")
            .iter()
            .any(|p| p["user"] == "gina" && p["vhost"] == "shop" && p["read"] == ".*")
    );
    let exported = topology_of(&doc, Some("shop"));
    assert_eq!(exported.len(), 5, "{exported:#?}");

    // `--stdout` prints the same document.
    let printed: Value =
        serde_json::from_str(&admin.run("definitions export --stdout")).expect("JSON");
    assert_eq!(topology_of(&printed, Some("shop")), exported);

    let target = BrokerProcess::start();
    let to = Admin::new(&bin, &target);
    to.run_with("definitions import --file", &[file_arg]);
    let v = api(&target).get_vhost("shop").await.expect("vhost");
    assert_eq!(v.description.as_deref(), Some("moved"));
    let p = api(&target)
        .get_permissions("shop", "gina")
        .await
        .expect("permissions");
    assert_eq!((p.configure.as_str(), p.read.as_str()), ("", ".*"));
    api_as(&target, "gina", "gina-pw")
        .current_user()
        .await
        .expect("gina's password hash moved with her");
    let text = api(&target)
        .export_cluster_wide_definitions_as_string()
        .await
        .expect("export target");
    let reexported: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(topology_of(&reexported, Some("shop")), exported);
    assert_imported(&target, "shop").await;

    // Importing the same document again changes nothing.
    to.run_with("definitions import --file", &[file_arg]);
}

#[tokio::test]
async fn vhost_definitions_export_and_import_into_another_vhost() {
    let Some(bin) = rabbitmqadmin() else { return };
    let broker = BrokerProcess::start();
    let admin = Admin::new(&bin, &broker);
    populate(&admin, "blue");

    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("blue.json");
    let file_arg = file.to_str().expect("utf-8 path");
    admin
        .in_vhost("blue")
        .run_with("definitions export_from_vhost --file", &[file_arg]);
    let doc: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("JSON");
    assert!(
        doc.get("users").is_none(),
        "a vhost's definitions have no users"
    );
    let exported = topology_of(&doc, None);
    assert_eq!(exported.len(), 5, "{exported:#?}");

    admin.run("declare vhost --name green");
    let green_admin = admin.in_vhost("green");
    green_admin.run_with("definitions import_into_vhost --file", &[file_arg]);
    let green: Value = serde_json::from_str(
        &api(&broker)
            .export_vhost_definitions_as_string("green")
            .await
            .expect("export green"),
    )
    .expect("JSON");
    assert_eq!(topology_of(&green, None), exported);
    assert_imported(&broker, "green").await;
    let queues = green_admin.table("list queues");
    assert_eq!(queues.one("name", "orders")["vhost"], "green");
}

#[tokio::test]
async fn consumers_are_listed_with_their_delivery_timeout() {
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{Connection, ConnectionProperties};
    let Some(bin) = rabbitmqadmin() else { return };
    let broker = BrokerProcess::start();
    let admin = Admin::new(&bin, &broker);
    let conn = Connection::connect(&broker.uri(), ConnectionProperties::default())
        .await
        .expect("AMQP connection");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "jobs".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("queue");
    let _consumer = ch
        .basic_consume(
            "jobs".into(),
            "jobs-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let consumers = admin.table("list consumers");
    let row = consumers.one("consumer_tag", "jobs-worker");
    assert_eq!(row["queue"], "jobs");
    assert_eq!(row["manual_ack"], "true");
    assert_eq!(row["delivery_ack_timeout"], "1800000");
}
