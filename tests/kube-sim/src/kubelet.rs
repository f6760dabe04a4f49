//! The controllers and the kubelet of the simulated cluster: StatefulSets make pods and volume
//! claims; each pod of a `warren-broker` image runs as a real process on 127.0.0.1 with its own
//! ports and directories, is restarted when it exits, reports readiness from its readiness
//! probe, and is stopped with SIGTERM (SIGKILL after the grace period) when deleted.

use crate::store::{
    Filter, Part, PatchKind, ResourceType, Store, deleting, name_of, namespace_of, now, uid_of,
};
use base64::Engine;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// How the kubelet runs pods.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// The program run for containers whose image names `warren-broker`.
    pub broker_binary: PathBuf,
    /// Where pod directories and volumes live.
    pub dir: PathBuf,
    /// How often readiness probes run (Kubernetes' periodSeconds is scaled down to this).
    pub probe_period: Duration,
    /// The longest a deleted pod gets between SIGTERM and SIGKILL.
    pub max_grace: Duration,
}

/// One running pod.
#[derive(Debug)]
pub struct PodRuntime {
    pub uid: String,
    /// Container port → the local port standing in for it.
    pub ports: HashMap<i32, u16>,
    /// Port name → container port.
    pub port_names: HashMap<String, i32>,
    child: Option<Child>,
    launch: Launch,
    restarts: i64,
    restart_at: Option<Instant>,
    ready: Arc<AtomicBool>,
    prober: Option<JoinHandle<()>>,
    terminating: bool,
    started_at: String,
}

impl PodRuntime {
    fn new(uid: &str, launch: Launch) -> Self {
        Self {
            uid: uid.to_owned(),
            ports: HashMap::new(),
            port_names: HashMap::new(),
            child: None,
            launch,
            restarts: 0,
            restart_at: None,
            ready: Arc::new(AtomicBool::new(false)),
            prober: None,
            terminating: false,
            started_at: String::new(),
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }
}

impl Drop for PodRuntime {
    fn drop(&mut self) {
        if let Some(p) = self.prober.take() {
            p.abort();
        }
        if let Some(c) = self.child.as_mut() {
            let _ = c.start_kill();
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Launch {
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    dir: PathBuf,
    probe: Option<(u16, String)>,
    /// The preStop hook's arguments (its program is the broker binary too).
    pre_stop: Option<Vec<String>>,
}

/// Files of a volume: name and content.
type Files = Vec<(String, Vec<u8>)>;

/// The pods the kubelet runs, by (namespace, name).
pub type Pods = Arc<Mutex<HashMap<(String, String), PodRuntime>>>;

fn types(store: &Store) -> (ResourceType, ResourceType, ResourceType) {
    (
        store
            .resource_type("apps", "v1", "statefulsets")
            .expect("built in"),
        store.resource_type("", "v1", "pods").expect("built in"),
        store
            .resource_type("", "v1", "persistentvolumeclaims")
            .expect("built in"),
    )
}

fn short_hash(v: &Value) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:010x}", h & 0xff_ffff_ffff)
}

fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Whether a pod counts as a ready endpoint.
pub fn serving(pod: &Value) -> bool {
    pod_ready(pod) && !deleting(pod)
}

fn owned_by(obj: &Value, uid: &str) -> bool {
    obj["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|o| o["uid"] == uid)
}

fn controller_ref(owner: &Value) -> Value {
    json!({
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": name_of(owner),
        "uid": uid_of(owner),
        "controller": true,
        "blockOwnerDeletion": true,
    })
}

/// The StatefulSet controller: pods `<name>-<ordinal>` and their claims, removal from the
/// highest ordinal, rolling updates one pod at a time, and the status counts.
pub fn reconcile_stateful_sets(store: &Store) {
    let (sts_rt, pod_rt, pvc_rt) = types(store);
    let (sets, _) = store.list(&sts_rt, &Filter::default());
    for sts in sets.iter().filter(|s| !deleting(s)) {
        let (ns, name, uid) = (namespace_of(sts), name_of(sts), uid_of(sts));
        let spec = &sts["spec"];
        let replicas = spec["replicas"].as_i64().unwrap_or(1).max(0);
        let template = &spec["template"];
        let revision = format!("{name}-{}", short_hash(template));
        let claims: Vec<Value> = spec["volumeClaimTemplates"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let retention = &spec["persistentVolumeClaimRetentionPolicy"];
        let delete_claims_with_set = retention["whenDeleted"] == "Delete";
        let delete_claims_on_scale = retention["whenScaled"] == "Delete";
        let filter = Filter {
            namespace: Some(ns.to_owned()),
            ..Filter::default()
        };
        let pods: Vec<Value> = store
            .list(&pod_rt, &filter)
            .0
            .into_iter()
            .filter(|p| owned_by(p, uid))
            .collect();
        let ordinal = |p: &Value| -> Option<i64> {
            name_of(p)
                .strip_prefix(name)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|o| o.parse().ok())
        };
        for i in 0..replicas {
            let pod_name = format!("{name}-{i}");
            for claim in &claims {
                let claim_name = format!("{}-{pod_name}", name_of(claim));
                if store.get(&pvc_rt, ns, &claim_name).is_err() {
                    let mut meta =
                        json!({"name": claim_name, "labels": claim["metadata"]["labels"]});
                    if delete_claims_with_set {
                        meta["ownerReferences"] = json!([controller_ref(sts)]);
                    }
                    let pvc = json!({"metadata": meta, "spec": claim["spec"]});
                    if store.create(&pvc_rt, ns, strip(pvc)).is_ok() {
                        let _ = store.patch(
                            &pvc_rt,
                            ns,
                            &claim_name,
                            Part::Status,
                            PatchKind::Merge,
                            json!({"status": {"phase": "Bound", "accessModes": claim["spec"]["accessModes"]}}),
                        );
                    }
                }
            }
            if !pods.iter().any(|p| name_of(p) == pod_name) {
                let mut meta = template["metadata"].clone();
                if !meta.is_object() {
                    meta = json!({});
                }
                meta["name"] = json!(pod_name);
                if !meta["labels"].is_object() {
                    meta["labels"] = json!({});
                }
                meta["labels"]["statefulset.kubernetes.io/pod-name"] = json!(pod_name);
                meta["labels"]["controller-revision-hash"] = json!(revision);
                meta["labels"]["apps.kubernetes.io/pod-index"] = json!(i.to_string());
                meta["ownerReferences"] = json!([controller_ref(sts)]);
                let mut pod_spec = template["spec"].clone();
                pod_spec["hostname"] = json!(pod_name);
                if let Some(svc) = spec["serviceName"].as_str() {
                    pod_spec["subdomain"] = json!(svc);
                }
                let mut volumes = pod_spec["volumes"].as_array().cloned().unwrap_or_default();
                for claim in &claims {
                    volumes.push(json!({
                        "name": name_of(claim),
                        "persistentVolumeClaim": {"claimName": format!("{}-{pod_name}", name_of(claim))},
                    }));
                }
                pod_spec["volumes"] = json!(volumes);
                let _ = store.create(&pod_rt, ns, json!({"metadata": meta, "spec": pod_spec}));
            }
        }
        for pod in &pods {
            let Some(i) = ordinal(pod) else { continue };
            if i >= replicas && !deleting(pod) {
                let _ = store.delete(&pod_rt, ns, name_of(pod));
                if delete_claims_on_scale {
                    for claim in &claims {
                        let _ = store.delete(
                            &pvc_rt,
                            ns,
                            &format!("{}-{}", name_of(claim), name_of(pod)),
                        );
                    }
                }
            }
        }
        let live: Vec<&Value> = pods
            .iter()
            .filter(|p| ordinal(p).is_some_and(|i| i < replicas))
            .collect();
        let current =
            |p: &Value| p["metadata"]["labels"]["controller-revision-hash"] == revision.as_str();
        // Rolling update: one outdated pod at a time, highest ordinal first, once all are ready.
        if live.len() as i64 == replicas
            && live.iter().all(|p| serving(p))
            && let Some(old) = live
                .iter()
                .filter(|p| !current(p))
                .max_by_key(|p| ordinal(p).unwrap_or(0))
        {
            let _ = store.delete(&pod_rt, ns, name_of(old));
        }
        let ready = live.iter().filter(|p| serving(p)).count();
        let updated = live.iter().filter(|p| current(p)).count();
        let status = json!({
            "observedGeneration": sts["metadata"]["generation"],
            "replicas": pods.len(),
            "readyReplicas": ready,
            "availableReplicas": ready,
            "currentReplicas": updated,
            "updatedReplicas": updated,
            "currentRevision": revision,
            "updateRevision": revision,
        });
        let _ = store.patch(
            &sts_rt,
            ns,
            name,
            Part::Status,
            PatchKind::Merge,
            json!({"status": status}),
        );
    }
}

fn strip(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.retain(|_, x| !x.is_null());
        for x in o.values_mut() {
            if let Some(inner) = x.as_object_mut() {
                inner.retain(|_, y| !y.is_null());
            }
        }
    }
    v
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn decode(v: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_default())
        .unwrap_or_default()
}

/// `$(NAME)` references to earlier variables, as Kubernetes expands them.
fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = text.to_owned();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

/// Everything a pod needs before its process starts: its directories and volumes, its ports,
/// its environment and arguments, every path and listen address mapped to its local stand-in.
fn prepare(
    store: &Store,
    config: &KubeletConfig,
    pod: &Value,
    running: &HashMap<(String, String), PodRuntime>,
) -> Result<(Launch, PodRuntime), String> {
    let ns = namespace_of(pod);
    let name = name_of(pod);
    let spec = &pod["spec"];
    let container = &spec["containers"][0];
    let image = container["image"].as_str().unwrap_or_default();
    if !image.contains("warren-broker") {
        return Err(format!(
            "kube-sim runs only warren-broker images, not {image:?}"
        ));
    }
    let dir = config
        .dir
        .join("pods")
        .join(ns)
        .join(format!("{name}-{}", &uid_of(pod)[..8]));
    let get = |plural: &str, obj: &str| {
        let rt = store.resource_type("", "v1", plural).expect("built in");
        store
            .get(&rt, ns, obj)
            .map_err(|_| format!("{plural} {obj:?} not found"))
    };
    // Volumes: name → (host directory, files to write).
    let mut volumes: HashMap<String, (PathBuf, Files)> = HashMap::new();
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let vname = v["name"].as_str().unwrap_or_default().to_owned();
        let here = dir.join("volumes").join(&vname);
        let entry = if let Some(cm) = v["configMap"]["name"].as_str() {
            let cm = get("configmaps", cm)?;
            let files = cm["data"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().unwrap_or_default().as_bytes().to_vec(),
                    )
                })
                .collect();
            (here, files)
        } else if let Some(secret) = v["secret"]["secretName"].as_str() {
            let s = get("secrets", secret)?;
            let files = s["data"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.clone(), decode(v)))
                .collect();
            (here, files)
        } else if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            get("persistentvolumeclaims", claim)?;
            (config.dir.join("volumes").join(ns).join(claim), Vec::new())
        } else {
            (here, Vec::new())
        };
        volumes.insert(vname, entry);
    }
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let vname = m["name"].as_str().unwrap_or_default();
        let (host, _) = volumes
            .get(vname)
            .ok_or_else(|| format!("volume mount {vname:?} names no volume"))?;
        let host = match m["subPath"].as_str() {
            Some(sub) => host.join(sub),
            None => host.clone(),
        };
        mounts.push((m["mountPath"].as_str().unwrap_or_default().to_owned(), host));
    }
    mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
    let mut ports = HashMap::new();
    let mut port_names = HashMap::new();
    for p in container["ports"].as_array().into_iter().flatten() {
        let cp = p["containerPort"].as_i64().unwrap_or(0) as i32;
        ports.insert(cp, free_port().map_err(|e| format!("no free port: {e}"))?);
        if let Some(n) = p["name"].as_str() {
            port_names.insert(n.to_owned(), cp);
        }
    }
    let rewrite = |text: &str| -> String {
        let mut out = text.to_owned();
        for (path, host) in &mounts {
            out = out.replace(path.as_str(), &host.to_string_lossy());
        }
        for (cp, hp) in &ports {
            for any in ["0.0.0.0", "[::]"] {
                out = out.replace(&format!("{any}:{cp}"), &format!("127.0.0.1:{hp}"));
            }
        }
        out
    };
    // A broker's peers file names pods by their DNS names (`<pod>.<svc>.<ns>.svc[:port]`),
    // which resolve to nothing here: each becomes the local stand-in of that pod's port, as
    // far as the pod runs now (a pod started later dials the ones before it).
    let peer = |line: &str| -> String {
        let (host, port) = match line.rsplit_once(':') {
            Some((h, p)) if p.parse::<i32>().is_ok() => (h, p.parse::<i32>().unwrap_or(0)),
            _ => (line, 25672),
        };
        let parts: Vec<&str> = host.trim_end_matches('.').split('.').collect();
        let local = match parts.as_slice() {
            [p, _svc, n, "svc", ..] if *p == name && *n == ns => ports.get(&port).copied(),
            [p, _svc, n, "svc", ..] => running
                .get(&((*n).to_owned(), (*p).to_owned()))
                .and_then(|rt| rt.ports.get(&port).copied()),
            _ => None,
        };
        local.map_or_else(|| line.to_owned(), |hp| format!("127.0.0.1:{hp}"))
    };
    for (host, files) in volumes.values() {
        std::fs::create_dir_all(host).map_err(|e| format!("{}: {e}", host.display()))?;
        for (file, bytes) in files {
            let content = match std::str::from_utf8(bytes) {
                Ok(text) if file == "peers" => text
                    .lines()
                    .map(|l| peer(l.trim()) + "\n")
                    .collect::<String>()
                    .into_bytes(),
                Ok(text) => rewrite(text).into_bytes(),
                Err(_) => bytes.clone(),
            };
            std::fs::write(host.join(file), content).map_err(|e| format!("{file}: {e}"))?;
        }
    }
    let mut env: Vec<(String, String)> = Vec::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let key = e["name"].as_str().unwrap_or_default().to_owned();
        let from = &e["valueFrom"];
        let value = if let Some(v) = e["value"].as_str() {
            expand(v, &env)
        } else if let Some(path) = from["fieldRef"]["fieldPath"].as_str() {
            match path {
                "metadata.name" => name.to_owned(),
                "metadata.namespace" => ns.to_owned(),
                "metadata.uid" => uid_of(pod).to_owned(),
                "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                "spec.nodeName" => "kube-sim".into(),
                other => return Err(format!("fieldRef {other} is not supported by kube-sim")),
            }
        } else if let Some(sel) = from["secretKeyRef"].as_object() {
            let s = get("secrets", sel["name"].as_str().unwrap_or_default())?;
            let k = sel["key"].as_str().unwrap_or_default();
            String::from_utf8_lossy(&decode(&s["data"][k])).into_owned()
        } else if let Some(sel) = from["configMapKeyRef"].as_object() {
            let cm = get("configmaps", sel["name"].as_str().unwrap_or_default())?;
            cm["data"][sel["key"].as_str().unwrap_or_default()]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        } else {
            String::new()
        };
        env.push((key, rewrite(&value)));
    }
    let args: Vec<String> = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| rewrite(&expand(a.as_str().unwrap_or_default(), &env)))
        .collect();
    let probe = container["readinessProbe"]["httpGet"]
        .as_object()
        .and_then(|g| {
            let cp = match &g["port"] {
                Value::String(n) => *port_names.get(n)?,
                Value::Number(n) => n.as_i64()? as i32,
                _ => return None,
            };
            Some((
                *ports.get(&cp)?,
                g["path"].as_str().unwrap_or("/").to_owned(),
            ))
        });
    let pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        .as_array()
        .and_then(|cmd| {
            let (program, rest) = cmd.split_first()?;
            if !program.as_str()?.ends_with("warren-broker") {
                tracing::warn!(pod = %name, "kube-sim runs only warren-broker preStop hooks");
                return None;
            }
            Some(
                rest.iter()
                    .map(|a| rewrite(&expand(a.as_str().unwrap_or_default(), &env)))
                    .collect(),
            )
        });
    let launch = Launch {
        program: config.broker_binary.clone(),
        args,
        env,
        dir: dir.clone(),
        probe,
        pre_stop,
    };
    let mut runtime = PodRuntime::new(uid_of(pod), launch.clone());
    runtime.ports = ports;
    runtime.port_names = port_names;
    Ok((launch, runtime))
}

fn spawn(launch: &Launch) -> std::io::Result<Child> {
    std::fs::create_dir_all(&launch.dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(launch.dir.join("container.log"))?;
    let mut cmd = Command::new(&launch.program);
    cmd.args(&launch.args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &launch.dir)
        .envs(launch.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&launch.dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true);
    cmd.spawn()
}

fn prober(
    probe: Option<(u16, String)>,
    period: Duration,
    ready: Arc<AtomicBool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("a plain HTTP client");
        loop {
            let ok = match &probe {
                // No readiness probe: ready once running.
                None => true,
                Some((port, path)) => client
                    .get(format!("http://127.0.0.1:{port}{path}"))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success() || r.status().is_redirection()),
            };
            ready.store(ok, Ordering::SeqCst);
            tokio::time::sleep(period).await;
        }
    })
}

fn write_pod_status(store: &Store, pod: &Value, rt: &PodRuntime, waiting: Option<&str>) {
    let pod_rt = store.resource_type("", "v1", "pods").expect("built in");
    let running = rt.child.is_some();
    let ready = running && rt.ready.load(Ordering::SeqCst);
    let flag = |b: bool| if b { "True" } else { "False" };
    let container = pod["spec"]["containers"][0]["name"].clone();
    let state = match waiting {
        Some(why) => json!({"waiting": {"reason": "ContainerCreating", "message": why}}),
        None if running => json!({"running": {"startedAt": rt.started_at}}),
        None => json!({"waiting": {"reason": "CrashLoopBackOff"}}),
    };
    let status = json!({
        "phase": if waiting.is_some() { "Pending" } else { "Running" },
        "podIP": "127.0.0.1",
        "hostIP": "127.0.0.1",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": flag(ready)},
            {"type": "Ready", "status": flag(ready)},
        ],
        "containerStatuses": [{
            "name": container,
            "image": pod["spec"]["containers"][0]["image"],
            "imageID": "",
            "ready": ready,
            "started": running,
            "restartCount": rt.restarts,
            "state": state,
        }],
    });
    let _ = store.patch(
        &pod_rt,
        namespace_of(pod),
        name_of(pod),
        Part::Status,
        PatchKind::Merge,
        json!({"status": status}),
    );
}

/// One pass of the kubelet over every pod: start what should run, restart what exited,
/// report readiness, stop and remove what was deleted.
pub fn sync_pods(store: &Arc<Store>, config: &KubeletConfig, pods: &Pods) {
    let pod_rt = store.resource_type("", "v1", "pods").expect("built in");
    let (all, _) = store.list(&pod_rt, &Filter::default());
    let mut running = pods.lock().unwrap_or_else(|e| e.into_inner());
    // Processes of pods that are gone, or replaced by a new pod of the same name.
    running.retain(|(ns, name), rt| {
        rt.terminating
            || all
                .iter()
                .any(|p| namespace_of(p) == ns && name_of(p) == name && uid_of(p) == rt.uid)
    });
    for pod in &all {
        let key = (namespace_of(pod).to_owned(), name_of(pod).to_owned());
        if deleting(pod) {
            match running.get_mut(&key) {
                Some(rt) if rt.terminating => {}
                Some(rt) => {
                    rt.terminating = true;
                    let child = rt.child.take();
                    if let Some(p) = rt.prober.take() {
                        p.abort();
                    }
                    let grace = pod["spec"]["terminationGracePeriodSeconds"]
                        .as_u64()
                        .map_or(Duration::from_secs(30), Duration::from_secs)
                        .min(config.max_grace);
                    let (store, pods, rt_type) = (store.clone(), pods.clone(), pod_rt.clone());
                    let launch = rt.launch.clone();
                    tokio::spawn(async move {
                        if let Some(child) = child {
                            terminate(child, &launch, grace).await;
                        }
                        pods.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                        store.remove(&rt_type, &key.0, &key.1);
                    });
                }
                None => store.remove(&pod_rt, &key.0, &key.1),
            }
            continue;
        }
        if !running.contains_key(&key) {
            match prepare(store, config, pod, &running) {
                Ok((_, rt)) => {
                    running.insert(key.clone(), rt);
                }
                Err(why) => {
                    let rt = PodRuntime::new(uid_of(pod), Launch::default());
                    write_pod_status(store, pod, &rt, Some(&why));
                    continue;
                }
            }
        }
        let rt = running.get_mut(&key).expect("inserted above");
        if let Some(child) = rt.child.as_mut()
            && let Ok(Some(exit)) = child.try_wait()
        {
            tracing::info!(pod = %key.1, %exit, "container exited; restarting");
            rt.child = None;
            rt.ready.store(false, Ordering::SeqCst);
            rt.restarts += 1;
            let backoff = Duration::from_millis(500 << rt.restarts.min(5));
            rt.restart_at = Some(Instant::now() + backoff);
        }
        if rt.child.is_none() && rt.restart_at.is_none_or(|t| Instant::now() >= t) {
            match spawn(&rt.launch) {
                Ok(child) => {
                    rt.child = Some(child);
                    rt.restart_at = None;
                    rt.started_at = now();
                    if rt.prober.is_none() {
                        rt.prober = Some(prober(
                            rt.launch.probe.clone(),
                            config.probe_period,
                            rt.ready.clone(),
                        ));
                    }
                }
                Err(e) => {
                    rt.restarts += 1;
                    rt.restart_at = Some(Instant::now() + Duration::from_secs(2));
                    tracing::warn!(pod = %key.1, error = %e, "cannot start the container");
                }
            }
        }
        write_pod_status(store, pod, rt, None);
    }
}

/// As the kubelet stops a container: the preStop hook (within the grace period), SIGTERM, and
/// SIGKILL once the grace period is over.
async fn terminate(mut child: Child, launch: &Launch, grace: Duration) {
    let deadline = Instant::now() + grace;
    if let Some(args) = &launch.pre_stop {
        let hook = Launch {
            args: args.clone(),
            ..launch.clone()
        };
        match spawn(&hook) {
            Ok(mut h) => match tokio::time::timeout_at(deadline, h.wait()).await {
                Ok(Ok(status)) if !status.success() => {
                    tracing::warn!(%status, "the preStop hook failed");
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::warn!("the preStop hook ran out of the grace period");
                    let _ = h.kill().await;
                }
            },
            Err(e) => tracing::warn!(error = %e, "cannot run the preStop hook"),
        }
    }
    let grace = deadline.saturating_duration_since(Instant::now());
    if let Some(pid) = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32))
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// The directory of a pod's volume claim.
pub fn claim_dir(config: &KubeletConfig, namespace: &str, claim: &str) -> PathBuf {
    config.dir.join("volumes").join(namespace).join(claim)
}

/// Deletes the directories of claims that no longer exist (the provisioner's reclaim).
pub fn reclaim_volumes(store: &Store, config: &KubeletConfig) {
    let pvc_rt = store
        .resource_type("", "v1", "persistentvolumeclaims")
        .expect("built in");
    let root = config.dir.join("volumes");
    let Ok(namespaces) = std::fs::read_dir(&root) else {
        return;
    };
    for ns in namespaces.flatten() {
        let ns_name = ns.file_name().to_string_lossy().into_owned();
        for claim in std::fs::read_dir(ns.path()).into_iter().flatten().flatten() {
            let claim_name = claim.file_name().to_string_lossy().into_owned();
            if store.get(&pvc_rt, &ns_name, &claim_name).is_err() {
                let _ = std::fs::remove_dir_all(claim.path());
            }
        }
    }
}
