//! kube-sim's API server through HTTP, as the operator (kube-rs) talks to it: watches (resume
//! from a resourceVersion, 410 Expired, timeoutSeconds, bookmarks), field selectors, the status
//! and scale subresources, server-side apply, and a Secret's stringData. Each test runs its own
//! server on 127.0.0.1 with an ephemeral port; every wait is bounded.

use kube_sim::api::router_with;
use kube_sim::store::Store;
use reqwest::{Client, Method, Response, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// How long a test waits for any one thing.
const PATIENCE: Duration = Duration::from_secs(10);

/// A fake API server on an ephemeral port, stopped when dropped.
struct Server {
    base: String,
    http: Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const CONFIG_MAPS: &str = "/api/v1/namespaces/ns/configmaps";
const WIDGETS: &str = "/apis/example.com/v1/namespaces/ns/widgets";

async fn server_with(store: Store) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Bookmarks after 200 ms of quiet rather than 10 s, so a test sees one quickly.
    let router = router_with(Arc::new(store), Duration::from_millis(200));
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Server {
        base: format!("http://{addr}"),
        http: Client::builder()
            .no_proxy()
            .timeout(PATIENCE)
            .build()
            .unwrap(),
        task,
    }
}

async fn server() -> Server {
    server_with(Store::default()).await
}

impl Server {
    async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.header("content-type", content_type).body(b.to_string());
        }
        let r = req.send().await.unwrap();
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(Method::GET, path, "", None).await
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let (status, obj) = self
            .send(Method::POST, path, "application/json", Some(body))
            .await;
        assert_eq!(status, StatusCode::CREATED, "{obj}");
        obj
    }

    async fn merge(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.send(
            Method::PATCH,
            path,
            "application/merge-patch+json",
            Some(body),
        )
        .await
    }

    async fn delete(&self, path: &str) {
        let (status, obj) = self.send(Method::DELETE, path, "", None).await;
        assert_eq!(status, StatusCode::OK, "{obj}");
    }

    async fn config_map(&self, name: &str, value: &str) -> Value {
        self.post(
            CONFIG_MAPS,
            json!({"metadata": {"name": name}, "data": {"k": value}}),
        )
        .await
    }

    async fn watch(&self, path_and_query: &str) -> Watch {
        let r = self
            .http
            .get(format!("{}{path_and_query}", self.base))
            // The whole watch may last longer than one request's timeout.
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .unwrap();
        Watch {
            response: r,
            buffer: Vec::new(),
        }
    }

    /// A CRD of kind Widget with the status and scale subresources.
    async fn widgets(&self) {
        self.post(
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            json!({
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": "widgets.example.com"},
                "spec": {
                    "group": "example.com",
                    "names": {"plural": "widgets", "kind": "Widget"},
                    "scope": "Namespaced",
                    "versions": [{
                        "name": "v1", "served": true, "storage": true,
                        "subresources": {
                            "status": {},
                            "scale": {
                                "specReplicasPath": ".spec.replicas",
                                "statusReplicasPath": ".status.replicas",
                                "labelSelectorPath": ".status.selector",
                            },
                        },
                    }],
                },
            }),
        )
        .await;
    }
}

/// A watch's newline-delimited events, read as they come.
struct Watch {
    response: Response,
    buffer: Vec<u8>,
}

impl Watch {
    /// The next event; None once the server ends the watch. Fails the test after PATIENCE.
    async fn next(&mut self) -> Option<Value> {
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Some(i) = self.buffer.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.buffer.drain(..=i).collect();
                    return Some(serde_json::from_slice(&line).unwrap());
                }
                match self.response.chunk().await.unwrap() {
                    Some(bytes) => self.buffer.extend_from_slice(&bytes),
                    None => {
                        assert!(self.buffer.is_empty(), "a partial event at the end");
                        return None;
                    }
                }
            }
        })
        .await
        .expect("an event (or the end of the watch) in time")
    }

    /// The next event that is not a bookmark, as (type, name).
    async fn change(&mut self) -> (String, String) {
        loop {
            let e = self.next().await.expect("an event");
            if e["type"] != "BOOKMARK" {
                return (
                    e["type"].as_str().unwrap().to_owned(),
                    e["object"]["metadata"]["name"].as_str().unwrap().to_owned(),
                );
            }
        }
    }
}

fn rv(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn change(kind: &str, name: &str) -> (String, String) {
    (kind.to_owned(), name.to_owned())
}

#[tokio::test]
async fn a_watch_resumes_after_its_resource_version_missing_nothing() {
    let s = server().await;
    let a = s.config_map("a", "1").await;
    let from = rv(&a);
    // Changes made while nobody watches...
    s.config_map("b", "1").await;
    s.merge(&format!("{CONFIG_MAPS}/a"), json!({"data": {"k": "2"}}))
        .await;
    s.delete(&format!("{CONFIG_MAPS}/b")).await;
    // ...another kind and another namespace, which this watch does not see...
    s.post(
        "/api/v1/namespaces/other/configmaps",
        json!({"metadata": {"name": "elsewhere"}}),
    )
    .await;
    s.post(
        "/api/v1/namespaces/ns/secrets",
        json!({"metadata": {"name": "s"}}),
    )
    .await;
    let mut w = s
        .watch(&format!("{CONFIG_MAPS}?watch=true&resourceVersion={from}"))
        .await;
    // ...come first, in order, and only those after `from` (not a's creation).
    assert_eq!(w.change().await, change("ADDED", "b"));
    assert_eq!(w.change().await, change("MODIFIED", "a"));
    assert_eq!(w.change().await, change("DELETED", "b"));
    // Then the live ones.
    s.config_map("c", "1").await;
    assert_eq!(w.change().await, change("ADDED", "c"));
    // Without a resourceVersion: every object as ADDED first.
    let mut fresh = s.watch(&format!("{CONFIG_MAPS}?watch=true")).await;
    let mut first = vec![fresh.change().await, fresh.change().await];
    first.sort();
    assert_eq!(first, [change("ADDED", "a"), change("ADDED", "c")]);
}

#[tokio::test]
async fn a_resource_version_older_than_the_history_is_410_expired() {
    // Only the last 3 changes are kept.
    let s = server_with(Store::with_history(3)).await;
    let first = s.config_map("a", "0").await;
    let mut last = first.clone();
    for i in 1..=5 {
        last = s
            .merge(
                &format!("{CONFIG_MAPS}/a"),
                json!({"data": {"k": i.to_string()}}),
            )
            .await
            .1;
    }
    let (newest, kept_from) = (rv(&last), rv(&last) - 3);
    let (status, body) = s
        .get(&format!(
            "{CONFIG_MAPS}?watch=true&resourceVersion={}",
            kept_from - 1
        ))
        .await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert_eq!(body["reason"], "Expired");
    assert_eq!(body["code"], 410);
    assert_eq!(
        s.get(&format!(
            "{CONFIG_MAPS}?watch=true&resourceVersion={}",
            rv(&first)
        ))
        .await
        .0,
        StatusCode::GONE
    );
    // From the oldest version still resumable, the three kept changes come, the last one last.
    let mut w = s
        .watch(&format!(
            "{CONFIG_MAPS}?watch=true&resourceVersion={kept_from}&timeoutSeconds=1"
        ))
        .await;
    let mut seen = Vec::new();
    while let Some(e) = w.next().await {
        seen.push(rv(&e["object"]));
    }
    assert_eq!(seen, [newest - 2, newest - 1, newest]);
}

#[tokio::test]
async fn timeout_seconds_ends_the_watch() {
    let s = server().await;
    s.config_map("a", "1").await;
    let started = tokio::time::Instant::now();
    let mut w = s
        .watch(&format!("{CONFIG_MAPS}?watch=true&timeoutSeconds=1"))
        .await;
    assert_eq!(w.change().await, change("ADDED", "a"));
    assert!(w.next().await.is_none(), "the watch ends by itself");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

#[tokio::test]
async fn bookmarks_carry_the_current_version_and_come_only_when_asked() {
    let s = server().await;
    let a = s.config_map("a", "1").await;
    let mut w = s
        .watch(&format!(
            "{CONFIG_MAPS}?watch=true&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds=3",
            rv(&a)
        ))
        .await;
    // A change of another kind moves the version on without an event for this watch.
    let secret = s
        .post(
            "/api/v1/namespaces/ns/secrets",
            json!({"metadata": {"name": "s"}}),
        )
        .await;
    let bookmark = w.next().await.expect("a bookmark while idle");
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "ConfigMap");
    assert_eq!(
        bookmark["object"]["metadata"]["resourceVersion"],
        secret["metadata"]["resourceVersion"]
    );
    // Without allowWatchBookmarks, an idle watch sends nothing until it ends.
    let mut quiet = s
        .watch(&format!(
            "{CONFIG_MAPS}?watch=true&resourceVersion={}&timeoutSeconds=1",
            rv(&secret)
        ))
        .await;
    assert!(quiet.next().await.is_none());
}

#[tokio::test]
async fn field_selectors_pick_by_name_and_namespace_in_lists_and_watches() {
    let s = server().await;
    s.config_map("a", "1").await;
    s.config_map("b", "1").await;
    s.post(
        "/api/v1/namespaces/other/configmaps",
        json!({"metadata": {"name": "a"}}),
    )
    .await;
    let names = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["metadata"]["namespace"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    };
    let (_, by_name) = s
        .get("/api/v1/configmaps?fieldSelector=metadata.name%3Da")
        .await;
    assert_eq!(names(&by_name), ["ns/a", "other/a"]);
    let (_, both) = s
        .get("/api/v1/configmaps?fieldSelector=metadata.name%3Da,metadata.namespace%3Dother")
        .await;
    assert_eq!(names(&both), ["other/a"]);
    let (_, not_a) = s
        .get(&format!("{CONFIG_MAPS}?fieldSelector=metadata.name!%3Da"))
        .await;
    assert_eq!(names(&not_a), ["ns/b"]);
    let (status, body) = s
        .get(&format!("{CONFIG_MAPS}?fieldSelector=spec.nodeName%3Dx"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    // A watch of one name sees only its changes.
    let mut w = s
        .watch(&format!(
            "{CONFIG_MAPS}?watch=true&fieldSelector=metadata.name%3Db"
        ))
        .await;
    assert_eq!(w.change().await, change("ADDED", "b"));
    s.merge(&format!("{CONFIG_MAPS}/a"), json!({"data": {"k": "2"}}))
        .await;
    s.merge(&format!("{CONFIG_MAPS}/b"), json!({"data": {"k": "2"}}))
        .await;
    assert_eq!(w.change().await, change("MODIFIED", "b"));
}

#[tokio::test]
async fn the_status_subresource_keeps_spec_and_status_apart() {
    let s = server().await;
    s.widgets().await;
    let w = s
        .post(
            WIDGETS,
            json!({"apiVersion": "example.com/v1", "kind": "Widget",
                   "metadata": {"name": "w"}, "spec": {"replicas": 1, "size": "s"}}),
        )
        .await;
    assert_eq!(w["metadata"]["generation"], 1);
    let path = format!("{WIDGETS}/w");
    // /status: only the status changes, and the generation stays.
    let (status, after) = s
        .merge(
            &format!("{path}/status"),
            json!({"spec": {"size": "xl"}, "status": {"phase": "Running"}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["status"]["phase"], "Running");
    assert_eq!(after["spec"]["size"], "s");
    assert_eq!(after["metadata"]["generation"], 1);
    // The object: the spec changes and the generation with it; the status is kept.
    let (_, after) = s
        .merge(
            &path,
            json!({"spec": {"size": "m"}, "status": {"phase": "Failed"}}),
        )
        .await;
    assert_eq!(after["spec"]["size"], "m");
    assert_eq!(after["status"]["phase"], "Running");
    assert_eq!(after["metadata"]["generation"], 2);
    // A PUT of the object is the same: its status is ignored.
    let mut replaced = after.clone();
    replaced["spec"]["size"] = json!("l");
    replaced["status"] = json!({"phase": "Gone"});
    let (status, after) = s
        .send(Method::PUT, &path, "application/json", Some(replaced))
        .await;
    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(
        (
            after["spec"]["size"].as_str(),
            after["status"]["phase"].as_str()
        ),
        (Some("l"), Some("Running"))
    );
    assert_eq!(after["metadata"]["generation"], 3);
    // Metadata alone is no spec change.
    let (_, after) = s
        .merge(&path, json!({"metadata": {"labels": {"team": "shop"}}}))
        .await;
    assert_eq!(after["metadata"]["labels"]["team"], "shop");
    assert_eq!(after["metadata"]["generation"], 3);
}

#[tokio::test]
async fn the_scale_subresource_of_a_stateful_set_and_of_a_custom_resource() {
    let s = server().await;
    s.post(
        "/apis/apps/v1/namespaces/ns/statefulsets",
        json!({"metadata": {"name": "db"}, "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": []}},
        }}),
    )
    .await;
    let sts = "/apis/apps/v1/namespaces/ns/statefulsets/db";
    let (status, scale) = s.get(&format!("{sts}/scale")).await;
    assert_eq!(status, StatusCode::OK, "{scale}");
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["spec"]["replicas"], 2);
    assert_eq!(scale["status"]["selector"], "app=db");
    let (status, scale) = s
        .merge(&format!("{sts}/scale"), json!({"spec": {"replicas": 5}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{scale}");
    assert_eq!(scale["spec"]["replicas"], 5);
    assert_eq!(s.get(sts).await.1["spec"]["replicas"], 5);
    let (status, _) = s
        .merge(&format!("{sts}/scale"), json!({"spec": {"replicas": -1}}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);

    // A custom resource: the paths its CRD names.
    s.widgets().await;
    s.post(
        WIDGETS,
        json!({"metadata": {"name": "w"}, "spec": {"replicas": 1}}),
    )
    .await;
    let w = format!("{WIDGETS}/w");
    s.merge(
        &format!("{w}/status"),
        json!({"status": {"replicas": 1, "selector": "app=w"}}),
    )
    .await;
    let (_, scale) = s.get(&format!("{w}/scale")).await;
    assert_eq!(scale["spec"]["replicas"], 1);
    assert_eq!(scale["status"]["replicas"], 1);
    assert_eq!(scale["status"]["selector"], "app=w");
    let (status, scale) = s
        .merge(&format!("{w}/scale"), json!({"spec": {"replicas": 3}}))
        .await;
    assert_eq!(status, StatusCode::OK, "{scale}");
    let widget = s.get(&w).await.1;
    assert_eq!(widget["spec"]["replicas"], 3);
    assert_eq!(widget["metadata"]["generation"], 2);
    // A kind without a scale subresource has none.
    assert_eq!(
        s.get(&format!("{CONFIG_MAPS}/x/scale")).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn server_side_apply_creates_a_missing_object_then_merges() {
    let s = server().await;
    let path = format!("{CONFIG_MAPS}/applied?fieldManager=test&force=true");
    let (status, created) = s
        .send(
            Method::PATCH,
            &path,
            "application/apply-patch+yaml",
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "applied", "namespace": "ns"},
                        "data": {"a": "1"}})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["data"]["a"], "1");
    assert!(created["metadata"]["uid"].is_string());
    let (status, applied) = s
        .send(
            Method::PATCH,
            &path,
            "application/apply-patch+yaml",
            Some(json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "applied", "namespace": "ns"},
                        "data": {"b": "2"}})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{applied}");
    // The same object, changed (kube-sim merges rather than tracking field owners).
    assert_eq!(applied["metadata"]["uid"], created["metadata"]["uid"]);
    assert_eq!(applied["data"]["b"], "2");
    assert!(rv(&applied) > rv(&created));
    // A merge patch does not create.
    let (status, _) = s
        .merge(
            &format!("{CONFIG_MAPS}/missing"),
            json!({"data": {"a": "1"}}),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_secrets_string_data_is_stored_as_base64_data() {
    let s = server().await;
    let created = s
        .post(
            "/api/v1/namespaces/ns/secrets",
            json!({"metadata": {"name": "creds"},
                   "data": {"kept": "a2VwdA=="},
                   "stringData": {"username": "warren", "password": "pa ss"}}),
        )
        .await;
    assert!(created.get("stringData").is_none(), "{created}");
    let (_, got) = s.get("/api/v1/namespaces/ns/secrets/creds").await;
    assert_eq!(
        got["data"],
        json!({"kept": "a2VwdA==", "username": "d2FycmVu", "password": "cGEgc3M="})
    );
    assert!(got.get("stringData").is_none());
    // A patch with stringData too.
    let (_, patched) = s
        .merge(
            "/api/v1/namespaces/ns/secrets/creds",
            json!({"stringData": {"password": "new"}}),
        )
        .await;
    assert_eq!(patched["data"]["password"], "bmV3");
    assert_eq!(patched["data"]["username"], "d2FycmVu");
    assert!(patched.get("stringData").is_none());
}
