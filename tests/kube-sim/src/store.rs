//! The object store: every object as JSON, one resourceVersion counter for all of them, the
//! history of changes that watches replay, finalizers and deletion, and garbage collection by
//! owner reference.

use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::broadcast;

/// How many changes are kept for watches that resume from a resourceVersion; older ones get
/// 410 Gone, as from a real API server, and the client lists again.
pub const HISTORY: usize = 50_000;

/// A kind of object the server serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
    /// Has a status subresource: writes to the object keep its status, writes to `/status`
    /// change only the status.
    pub status: bool,
    pub scale: Option<ScalePaths>,
}

/// Where a scale subresource reads and writes its numbers (`.spec.replicas`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScalePaths {
    pub spec_replicas: String,
    pub status_replicas: Option<String>,
    pub label_selector: Option<String>,
}

impl ResourceType {
    fn builtin(
        group: &str,
        version: &str,
        plural: &str,
        kind: &str,
        namespaced: bool,
        status: bool,
    ) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced,
            status,
            scale: None,
        }
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The key of the type in the store: `group/plural`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.group, self.plural)
    }
}

/// The types a fresh server knows; CustomResourceDefinitions add theirs when created.
fn builtin_types() -> Vec<ResourceType> {
    let mut statefulsets =
        ResourceType::builtin("apps", "v1", "statefulsets", "StatefulSet", true, true);
    statefulsets.scale = Some(ScalePaths {
        spec_replicas: ".spec.replicas".into(),
        status_replicas: Some(".status.replicas".into()),
        label_selector: None,
    });
    vec![
        ResourceType::builtin("", "v1", "namespaces", "Namespace", false, true),
        ResourceType::builtin("", "v1", "configmaps", "ConfigMap", true, false),
        ResourceType::builtin("", "v1", "secrets", "Secret", true, false),
        ResourceType::builtin("", "v1", "services", "Service", true, true),
        ResourceType::builtin("", "v1", "pods", "Pod", true, true),
        ResourceType::builtin(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            true,
            true,
        ),
        ResourceType::builtin("", "v1", "serviceaccounts", "ServiceAccount", true, false),
        ResourceType::builtin("", "v1", "events", "Event", true, false),
        statefulsets,
        ResourceType::builtin("apps", "v1", "deployments", "Deployment", true, true),
        ResourceType::builtin(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
            true,
        ),
        ResourceType::builtin("coordination.k8s.io", "v1", "leases", "Lease", true, false),
        ResourceType::builtin("events.k8s.io", "v1", "events", "Event", true, false),
        ResourceType::builtin(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            true,
        ),
    ]
}

/// An API error, answered as a `Status` object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
        }
    }

    pub fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{}.{} \"{name}\" not found", rt.plural, rt.group),
        )
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    pub fn to_status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

pub type Result<T> = std::result::Result<T, ApiError>;

/// One change, as a watch sends it.
#[derive(Debug, Clone)]
pub struct Event {
    pub rv: u64,
    pub resource: String,
    pub namespace: String,
    pub kind: &'static str,
    pub object: Value,
}

/// Which part of an object a write may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Main,
    Status,
}

/// How a PATCH body is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchKind {
    /// JSON merge patch (RFC 7386); strategic merge patches are treated as this too.
    Merge,
    /// JSON patch (RFC 6902).
    Json,
    /// Server-side apply, treated as a merge that creates the object when it is missing.
    Apply,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    resource: String,
    namespace: String,
    name: String,
}

#[derive(Debug)]
struct Inner {
    rv: u64,
    types: Vec<ResourceType>,
    objects: BTreeMap<Key, Value>,
    history: std::collections::VecDeque<Arc<Event>>,
}

/// The state of the fake API server.
#[derive(Debug)]
pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<Event>>,
    /// How many changes watches may resume from ([`HISTORY`] unless a test says otherwise).
    history: usize,
}

impl Default for Store {
    fn default() -> Self {
        Self::with_history(HISTORY)
    }
}

/// The time now, as Kubernetes writes timestamps (RFC 3339, whole seconds).
pub fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn uid() -> String {
    use rand::Rng;
    let b: [u8; 16] = rand::rng().random();
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn meta(obj: &Value) -> &Value {
    &obj["metadata"]
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

/// The name of an object.
pub fn name_of(obj: &Value) -> &str {
    meta(obj)["name"].as_str().unwrap_or_default()
}

/// The namespace of an object ("" for cluster-scoped ones).
pub fn namespace_of(obj: &Value) -> &str {
    meta(obj)["namespace"].as_str().unwrap_or_default()
}

/// The uid of an object.
pub fn uid_of(obj: &Value) -> &str {
    meta(obj)["uid"].as_str().unwrap_or_default()
}

/// Whether the object is being deleted.
pub fn deleting(obj: &Value) -> bool {
    !meta(obj)["deletionTimestamp"].is_null()
}

fn finalizers(obj: &Value) -> usize {
    meta(obj)["finalizers"].as_array().map_or(0, Vec::len)
}

/// Everything but the metadata and the status: what `generation` counts changes of.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
        o.remove("apiVersion");
        o.remove("kind");
    }
    v
}

/// A label selector (`a=b,c!=d,e,!f,g in (h,i),j notin (k)`).
#[derive(Debug, Clone, Default)]
pub struct Selector {
    terms: Vec<Term>,
}

#[derive(Debug, Clone)]
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

impl Selector {
    pub fn parse(text: &str) -> Result<Self> {
        let mut terms = Vec::new();
        let mut depth = 0;
        let mut start = 0;
        let mut parts = Vec::new();
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                ',' if depth == 0 => {
                    parts.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        parts.push(&text[start..]);
        for p in parts.into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            let set = |rest: &str| -> Result<Vec<String>> {
                let rest = rest.trim();
                let inner = rest
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| ApiError::bad_request(format!("bad selector term {p:?}")))?;
                Ok(inner.split(',').map(|s| s.trim().to_owned()).collect())
            };
            let term = if let Some((k, v)) = p.split_once("!=") {
                Term::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                Term::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, rest)) = p.split_once(" notin ") {
                Term::NotIn(k.trim().into(), set(rest)?)
            } else if let Some((k, rest)) = p.split_once(" in ") {
                Term::In(k.trim().into(), set(rest)?)
            } else if let Some(k) = p.strip_prefix('!') {
                Term::Absent(k.trim().into())
            } else {
                Term::Exists(p.into())
            };
            terms.push(term);
        }
        Ok(Self { terms })
    }

    /// A selector matching every label of `labels`.
    pub fn from_labels(labels: &Map<String, Value>) -> Self {
        Self {
            terms: labels
                .iter()
                .map(|(k, v)| Term::Eq(k.clone(), v.as_str().unwrap_or_default().into()))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => get(k) == Some(v.as_str()),
            Term::Ne(k, v) => get(k) != Some(v.as_str()),
            Term::Exists(k) => get(k).is_some(),
            Term::Absent(k) => get(k).is_none(),
            Term::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Term::NotIn(k, vs) => get(k).is_none_or(|x| vs.iter().all(|v| v != x)),
        })
    }
}

/// What a list or watch selects: namespace, labels and the fields `metadata.name` and
/// `metadata.namespace`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: Selector,
    pub fields: Vec<(String, String, bool)>,
}

impl Filter {
    pub fn parse_fields(text: &str) -> Result<Vec<(String, String, bool)>> {
        let mut out = Vec::new();
        for p in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v, eq) = if let Some((k, v)) = p.split_once("!=") {
                (k, v, false)
            } else if let Some((k, v)) = p.split_once("==").or_else(|| p.split_once('=')) {
                (k, v, true)
            } else {
                return Err(ApiError::bad_request(format!("bad field selector {p:?}")));
            };
            if k != "metadata.name" && k != "metadata.namespace" {
                return Err(ApiError::bad_request(format!(
                    "field selector {k:?} is not supported by kube-sim"
                )));
            }
            out.push((k.to_owned(), v.to_owned(), eq));
        }
        Ok(out)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.namespace
            && namespace_of(obj) != ns
        {
            return false;
        }
        self.labels.matches(&meta(obj)["labels"])
            && self.fields.iter().all(|(k, v, eq)| {
                let actual = if k == "metadata.name" {
                    name_of(obj)
                } else {
                    namespace_of(obj)
                };
                (actual == v) == *eq
            })
    }
}

/// What a watch gets: the changes it missed, then the live ones.
pub type Subscription = (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>);

impl Store {
    /// A store that keeps only the last `history` changes for watches to resume from (a test
    /// reaches 410 Expired without making 50,000 changes).
    pub fn with_history(history: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                rv: 1,
                types: builtin_types(),
                objects: BTreeMap::new(),
                history: std::collections::VecDeque::new(),
            }),
            events: broadcast::channel(16_384).0,
            history: history.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The type served at `/api[s]/{group}/{version}/{plural}`.
    pub fn resource_type(&self, group: &str, version: &str, plural: &str) -> Option<ResourceType> {
        self.lock()
            .types
            .iter()
            .find(|t| t.group == group && t.version == version && t.plural == plural)
            .cloned()
    }

    /// The type of `kind` in `group` (any version).
    pub fn type_of_kind(&self, group: &str, kind: &str) -> Option<ResourceType> {
        self.lock()
            .types
            .iter()
            .find(|t| t.group == group && t.kind == kind)
            .cloned()
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    pub fn get(&self, rt: &ResourceType, namespace: &str, name: &str) -> Result<Value> {
        let key = Key {
            resource: rt.id(),
            namespace: namespace.into(),
            name: name.into(),
        };
        self.lock()
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    /// Every object of a type that `filter` selects, and the resourceVersion of the list.
    pub fn list(&self, rt: &ResourceType, filter: &Filter) -> (Vec<Value>, u64) {
        let inner = self.lock();
        let id = rt.id();
        let items = inner
            .objects
            .iter()
            .filter(|(k, _)| k.resource == id)
            .map(|(_, v)| v)
            .filter(|v| filter.matches(v))
            .cloned()
            .collect();
        (items, inner.rv)
    }

    /// The changes after `since` (when given) and a receiver of the following ones, taken
    /// together so nothing falls between them.
    pub fn subscribe(&self, since: Option<u64>) -> Result<Subscription> {
        let inner = self.lock();
        let rx = self.events.subscribe();
        let backlog = match since {
            None => Vec::new(),
            Some(rv) => {
                let oldest = inner.history.front().map_or(inner.rv, |e| e.rv);
                if rv + 1 < oldest {
                    return Err(ApiError::new(
                        410,
                        "Expired",
                        format!("too old resource version: {rv} ({oldest})"),
                    ));
                }
                inner
                    .history
                    .iter()
                    .filter(|e| e.rv > rv)
                    .cloned()
                    .collect()
            }
        };
        Ok((backlog, rx))
    }

    fn record(&self, inner: &mut Inner, kind: &'static str, key: &Key, object: Value) {
        let event = Arc::new(Event {
            rv: inner.rv,
            resource: key.resource.clone(),
            namespace: key.namespace.clone(),
            kind,
            object,
        });
        inner.history.push_back(event.clone());
        while inner.history.len() > self.history {
            inner.history.pop_front();
        }
        let _ = self.events.send(event);
    }

    fn key(rt: &ResourceType, namespace: &str, name: &str) -> Key {
        Key {
            resource: rt.id(),
            namespace: if rt.namespaced {
                namespace.into()
            } else {
                String::new()
            },
            name: name.into(),
        }
    }

    /// POST: a new object.
    pub fn create(&self, rt: &ResourceType, namespace: &str, mut obj: Value) -> Result<Value> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body is not an object"));
        }
        let mut name = name_of(&obj).to_owned();
        if name.is_empty() {
            match meta(&obj)["generateName"].as_str() {
                Some(prefix) => {
                    use rand::Rng;
                    let suffix: String = rand::rng()
                        .sample_iter(rand::distr::Alphanumeric)
                        .take(5)
                        .map(|c| char::from(c).to_ascii_lowercase())
                        .collect();
                    name = format!("{prefix}{suffix}");
                }
                None => {
                    return Err(ApiError::new(
                        422,
                        "Invalid",
                        "metadata.name: Required value",
                    ));
                }
            }
        }
        let body_ns = namespace_of(&obj).to_owned();
        if rt.namespaced && !body_ns.is_empty() && body_ns != namespace {
            return Err(ApiError::bad_request(format!(
                "the namespace of the object ({body_ns}) does not match the namespace of the request ({namespace})"
            )));
        }
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        let created = {
            let m = meta_mut(&mut obj);
            m.insert("name".into(), json!(name));
            if rt.namespaced {
                m.insert("namespace".into(), json!(namespace));
            } else {
                m.remove("namespace");
            }
            m.insert("uid".into(), json!(uid()));
            m.insert("creationTimestamp".into(), json!(now()));
            m.insert("generation".into(), json!(1));
            m.remove("deletionTimestamp");
            m.remove("managedFields");
            obj.clone()
        };
        let mut obj = created;
        normalize(rt, &mut obj);
        let key = Self::key(rt, namespace, &name);
        let mut inner = self.lock();
        if inner.objects.contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{}.{} \"{name}\" already exists", rt.plural, rt.group),
            ));
        }
        inner.rv += 1;
        let rv = inner.rv;
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        inner.objects.insert(key.clone(), obj.clone());
        self.record(&mut inner, "ADDED", &key, obj.clone());
        if rt.id() == "apiextensions.k8s.io/customresourcedefinitions" {
            for t in crd_types(&obj) {
                if !inner.types.contains(&t) {
                    inner.types.push(t);
                }
            }
        }
        Ok(obj)
    }

    /// PUT: replaces the object (or its status), refused on a stale resourceVersion.
    pub fn replace(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        part: Part,
        obj: Value,
    ) -> Result<Value> {
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body is not an object"));
        }
        if !name_of(&obj).is_empty() && name_of(&obj) != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({}) does not match the name in the URL ({name})",
                name_of(&obj)
            )));
        }
        let mut inner = self.lock();
        let key = Self::key(rt, namespace, name);
        let old = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        if let Some(rv) = meta(&obj)["resourceVersion"].as_str()
            && !rv.is_empty()
            && rv != meta(&old)["resourceVersion"].as_str().unwrap_or_default()
        {
            return Err(conflict(rt, name));
        }
        self.commit(&mut inner, rt, key, old, obj, part)
    }

    /// PATCH (and server-side apply, which creates a missing object).
    pub fn patch(
        &self,
        rt: &ResourceType,
        namespace: &str,
        name: &str,
        part: Part,
        kind: PatchKind,
        patch: Value,
    ) -> Result<Value> {
        let mut inner = self.lock();
        let key = Self::key(rt, namespace, name);
        let Some(old) = inner.objects.get(&key).cloned() else {
            if kind == PatchKind::Apply && part == Part::Main {
                drop(inner);
                let mut obj = patch;
                strip_nulls(&mut obj);
                return self.create(rt, namespace, obj);
            }
            return Err(ApiError::not_found(rt, name));
        };
        let mut new = old.clone();
        match kind {
            PatchKind::Merge | PatchKind::Apply => {
                if !patch.is_object() {
                    return Err(ApiError::bad_request("a merge patch must be an object"));
                }
                if let Some(rv) = meta(&patch)["resourceVersion"].as_str()
                    && rv != meta(&old)["resourceVersion"].as_str().unwrap_or_default()
                {
                    return Err(conflict(rt, name));
                }
                json_patch::merge(&mut new, &patch);
            }
            PatchKind::Json => {
                // As in Kubernetes, `test` of a missing path against null passes (kube's
                // finalizer helper relies on it).
                let patch = match patch {
                    Value::Array(ops) => Value::Array(
                        ops.into_iter()
                            .filter(|op| {
                                !(op["op"] == "test"
                                    && op["value"].is_null()
                                    && op["path"]
                                        .as_str()
                                        .is_some_and(|p| new.pointer(p).is_none()))
                            })
                            .collect(),
                    ),
                    other => other,
                };
                let ops: json_patch::Patch = serde_json::from_value(patch)
                    .map_err(|e| ApiError::bad_request(format!("bad JSON patch: {e}")))?;
                json_patch::patch(&mut new, &ops).map_err(|e| {
                    ApiError::new(
                        422,
                        "Invalid",
                        format!("the JSON patch does not apply: {e}"),
                    )
                })?;
            }
        }
        // A patch cannot move the object's identity; its resourceVersion is the current one.
        let m = meta_mut(&mut new);
        m.insert("name".into(), json!(name));
        m.insert(
            "resourceVersion".into(),
            meta(&old)["resourceVersion"].clone(),
        );
        self.commit(&mut inner, rt, key, old, new, part)
    }

    fn commit(
        &self,
        inner: &mut Inner,
        rt: &ResourceType,
        key: Key,
        old: Value,
        mut new: Value,
        part: Part,
    ) -> Result<Value> {
        match part {
            Part::Status => {
                let status = new.get("status").cloned();
                new = old.clone();
                match status {
                    Some(s) => new["status"] = s,
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
            Part::Main if rt.status => match old.get("status") {
                Some(s) => new["status"] = s.clone(),
                None => {
                    if let Some(o) = new.as_object_mut() {
                        o.remove("status");
                    }
                }
            },
            Part::Main => {}
        }
        new["apiVersion"] = json!(rt.api_version());
        new["kind"] = json!(rt.kind);
        {
            let old_meta = meta(&old).clone();
            let m = meta_mut(&mut new);
            for kept in [
                "name",
                "namespace",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
                "resourceVersion",
            ] {
                match old_meta.get(kept) {
                    Some(v) => m.insert(kept.into(), v.clone()),
                    None => m.remove(kept),
                };
            }
            m.remove("managedFields");
        }
        normalize(rt, &mut new);
        strip_nulls(&mut new);
        if deleting(&old) {
            // Finalizers may only be removed from an object being deleted.
            let before: HashSet<&str> = meta(&old)["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let added = meta(&new)["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .any(|f| !before.contains(f));
            if added {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "metadata.finalizers: Forbidden: no new finalizers can be added if the object is being deleted",
                ));
            }
        }
        if spec_part(&new) != spec_part(&old) {
            let g = meta(&old)["generation"].as_i64().unwrap_or(1) + 1;
            meta_mut(&mut new).insert("generation".into(), json!(g));
        }
        if new == old {
            // A write that changes nothing is no change: no new resourceVersion, no event.
            return Ok(old);
        }
        inner.rv += 1;
        let rv = inner.rv;
        meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
        if deleting(&new) && finalizers(&new) == 0 && !graceful(rt) {
            inner.objects.remove(&key);
            self.record(inner, "DELETED", &key, new.clone());
            return Ok(new);
        }
        inner.objects.insert(key.clone(), new.clone());
        self.record(inner, "MODIFIED", &key, new.clone());
        Ok(new)
    }

    /// DELETE: gone at once, or marked with a deletionTimestamp while finalizers (or, for a
    /// pod, its kubelet) still have work to do.
    pub fn delete(&self, rt: &ResourceType, namespace: &str, name: &str) -> Result<Value> {
        let mut inner = self.lock();
        let key = Self::key(rt, namespace, name);
        let old = inner
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        if finalizers(&old) > 0 || graceful(rt) {
            if deleting(&old) {
                return Ok(old);
            }
            let mut new = old.clone();
            meta_mut(&mut new).insert("deletionTimestamp".into(), json!(now()));
            inner.rv += 1;
            let rv = inner.rv;
            meta_mut(&mut new).insert("resourceVersion".into(), json!(rv.to_string()));
            inner.objects.insert(key.clone(), new.clone());
            self.record(&mut inner, "MODIFIED", &key, new.clone());
            return Ok(new);
        }
        Ok(Self::remove_locked(self, &mut inner, key, old))
    }

    fn remove_locked(&self, inner: &mut Inner, key: Key, mut old: Value) -> Value {
        inner.objects.remove(&key);
        inner.rv += 1;
        let rv = inner.rv;
        meta_mut(&mut old).insert("resourceVersion".into(), json!(rv.to_string()));
        self.record(inner, "DELETED", &key, old.clone());
        old
    }

    /// Removes an object whatever its finalizers (the kubelet, once a pod's process is gone).
    pub fn remove(&self, rt: &ResourceType, namespace: &str, name: &str) {
        let mut inner = self.lock();
        let key = Self::key(rt, namespace, name);
        if let Some(old) = inner.objects.get(&key).cloned() {
            self.remove_locked(&mut inner, key, old);
        }
    }

    /// Garbage collection: deletes every object none of whose owners exist any more.
    /// Returns how many were deleted.
    pub fn collect_garbage(&self) -> usize {
        let orphans: Vec<(ResourceType, String, String)> = {
            let inner = self.lock();
            let uids: HashSet<&str> = inner.objects.values().map(uid_of).collect();
            inner
                .objects
                .iter()
                .filter(|(_, v)| !deleting(v) || finalizers(v) == 0)
                .filter_map(|(k, v)| {
                    let owners = meta(v)["ownerReferences"].as_array()?;
                    if owners.is_empty()
                        || owners
                            .iter()
                            .any(|o| uids.contains(o["uid"].as_str().unwrap_or_default()))
                    {
                        return None;
                    }
                    let rt = inner.types.iter().find(|t| t.id() == k.resource)?.clone();
                    Some((rt, k.namespace.clone(), k.name.clone()))
                })
                .collect()
        };
        let mut deleted = 0;
        for (rt, ns, name) in orphans {
            if let Ok(obj) = self.get(&rt, &ns, &name)
                && deleting(&obj)
            {
                continue;
            }
            if self.delete(&rt, &ns, &name).is_ok() {
                deleted += 1;
            }
        }
        deleted
    }
}

/// Pods go through their kubelet on deletion: it stops the containers, then removes the pod.
fn graceful(rt: &ResourceType) -> bool {
    rt.id() == "/pods"
}

fn conflict(rt: &ResourceType, name: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {}.{} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            rt.plural, rt.group
        ),
    )
}

/// What the API server itself fills in: a Secret's `stringData` moves into `data`, a Service
/// gets a cluster IP.
fn normalize(rt: &ResourceType, obj: &mut Value) {
    use base64::Engine;
    match rt.id().as_str() {
        "/secrets" => {
            if let Some(Value::Object(string_data)) =
                obj.as_object_mut().and_then(|o| o.remove("stringData"))
            {
                if !obj["data"].is_object() {
                    obj["data"] = json!({});
                }
                for (k, v) in string_data {
                    let text = v.as_str().unwrap_or_default();
                    obj["data"][k] =
                        json!(base64::engine::general_purpose::STANDARD.encode(text.as_bytes()));
                }
            }
        }
        "/services" if obj["spec"].is_object() && obj["spec"]["clusterIP"].is_null() => {
            use rand::Rng;
            let (a, b): (u8, u8) = rand::rng().random();
            obj["spec"]["clusterIP"] = json!(format!("10.96.{a}.{}", b.max(1)));
        }
        _ => {}
    }
}

/// Merge patches use null for "remove"; stored objects hold no nulls.
fn strip_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(strip_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// The types a CustomResourceDefinition serves (one per version).
fn crd_types(crd: &Value) -> Vec<ResourceType> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec["names"]["plural"].as_str().unwrap_or_default();
    let kind = spec["names"]["kind"].as_str().unwrap_or_default();
    let namespaced = spec["scope"].as_str() != Some("Cluster");
    spec["versions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let sub = &v["subresources"];
            let scale = sub["scale"].as_object().map(|s| ScalePaths {
                spec_replicas: s["specReplicasPath"]
                    .as_str()
                    .unwrap_or(".spec.replicas")
                    .into(),
                status_replicas: s["statusReplicasPath"].as_str().map(Into::into),
                label_selector: s["labelSelectorPath"].as_str().map(Into::into),
            });
            ResourceType {
                group: group.into(),
                version: v["name"].as_str().unwrap_or_default().into(),
                plural: plural.into(),
                kind: kind.into(),
                namespaced,
                status: sub.get("status").is_some(),
                scale,
            }
        })
        .collect()
}

/// Reads `.a.b.c` from an object.
pub fn at_path<'a>(obj: &'a Value, path: &str) -> &'a Value {
    path.trim_start_matches('.')
        .split('.')
        .fold(obj, |v, seg| v.get(seg).unwrap_or(&Value::Null))
}

/// Writes `.a.b.c` into an object, making the objects on the way.
pub fn set_path(obj: &mut Value, path: &str, value: Value) {
    let segs: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    let mut cur = obj;
    for (i, seg) in segs.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        let m = cur.as_object_mut().expect("made an object");
        if i + 1 == segs.len() {
            m.insert((*seg).to_owned(), value);
            return;
        }
        cur = m.entry((*seg).to_owned()).or_insert_with(|| json!({}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm_type(store: &Store) -> ResourceType {
        store.resource_type("", "v1", "configmaps").unwrap()
    }

    #[test]
    fn writes_bump_versions_and_no_op_writes_do_not() {
        let s = Store::default();
        let rt = cm_type(&s);
        let a = s
            .create(
                &rt,
                "ns",
                json!({"metadata": {"name": "a"}, "data": {"k": "v"}}),
            )
            .unwrap();
        let rv = a["metadata"]["resourceVersion"].clone();
        let same = s
            .patch(
                &rt,
                "ns",
                "a",
                Part::Main,
                PatchKind::Merge,
                json!({"data": {"k": "v"}}),
            )
            .unwrap();
        assert_eq!(same["metadata"]["resourceVersion"], rv);
        let changed = s
            .patch(
                &rt,
                "ns",
                "a",
                Part::Main,
                PatchKind::Merge,
                json!({"data": {"k": "w"}}),
            )
            .unwrap();
        assert_ne!(changed["metadata"]["resourceVersion"], rv);
        assert_eq!(changed["metadata"]["generation"], 2);
        let stale = s.replace(&rt, "ns", "a", Part::Main, a).unwrap_err();
        assert_eq!(stale.code, 409);
    }

    #[test]
    fn finalizers_hold_deletion_and_owners_collect_their_objects() {
        let s = Store::default();
        let rt = cm_type(&s);
        let owner = s
            .create(
                &rt,
                "ns",
                json!({"metadata": {"name": "owner", "finalizers": ["x/y"]}}),
            )
            .unwrap();
        s.create(
            &rt,
            "ns",
            json!({"metadata": {"name": "owned", "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid_of(&owner)}
            ]}}),
        )
        .unwrap();
        let marked = s.delete(&rt, "ns", "owner").unwrap();
        assert!(deleting(&marked));
        assert_eq!(s.collect_garbage(), 0);
        s.patch(
            &rt,
            "ns",
            "owner",
            Part::Main,
            PatchKind::Json,
            json!([{"op": "remove", "path": "/metadata/finalizers"}]),
        )
        .unwrap();
        assert_eq!(s.get(&rt, "ns", "owner").unwrap_err().code, 404);
        assert_eq!(s.collect_garbage(), 1);
        assert_eq!(s.get(&rt, "ns", "owned").unwrap_err().code, 404);
    }

    #[test]
    fn selectors() {
        let sel = Selector::parse("app=warren,tier in (a,b),!gone,env!=prod").unwrap();
        assert!(sel.matches(&json!({"app": "warren", "tier": "a"})));
        assert!(!sel.matches(&json!({"app": "warren", "tier": "c"})));
        assert!(!sel.matches(&json!({"app": "warren", "tier": "a", "gone": "1"})));
        assert!(!sel.matches(&json!({"app": "warren", "tier": "a", "env": "prod"})));
    }
}
