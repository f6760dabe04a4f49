//! The durable definitions as a RabbitMQ definitions document: the format of
//! `GET /api/definitions` and `rabbitmqctl export_definitions`, so that the snapshot on disk
//! reads as one and RabbitMQ's tools can import it.
//!
//! Two things have no place in RabbitMQ's format; they go under names its import passes
//! over: a queue's home node (`node`, as `/api/queues` names it), and the types of arguments
//! that plain JSON loses (`argument_types`, only where there are such arguments: a `short`
//! reads back as a `short`, not a `long`).

use super::field_json::{typed_table, typed_table_json};
use super::model::{
    BindingDefinition, Definitions, ExchangeDefinition, PermissionDefinition, PolicyDefinition,
    QueueDefinition, UserDefinition, VhostDefinitions,
};
use amq_protocol::types::FieldTable;
use serde_json::{Map, Value, json};

/// The RabbitMQ release whose management API and definitions Warren answers as.
pub const RABBITMQ_VERSION: &str = "3.10.8";

/// The key under which a definitions snapshot holds the state of the cluster's metadata
/// group (its last entry and membership) beside the definitions.
pub const SNAPSHOT_GROUP_KEY: &str = "warren_metadata";

/// RabbitMQ's name for the password hashing Warren uses.
pub const SHA256: &str = "rabbit_password_hashing_sha256";

/// The fields that open every definitions document.
pub fn header() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("rabbit_version".into(), json!(RABBITMQ_VERSION));
    m.insert("rabbitmq_version".into(), json!(RABBITMQ_VERSION));
    m.insert("product_name".into(), json!("Warren"));
    m.insert("product_version".into(), json!(env!("CARGO_PKG_VERSION")));
    m
}

/// `arguments`, with `argument_types` when plain JSON would lose some.
fn with_arguments(mut o: Value, arguments: &FieldTable) -> Value {
    let (plain, types) = typed_table_json(arguments);
    o["arguments"] = plain;
    if let Some(types) = types {
        o["argument_types"] = types;
    }
    o
}

fn policy_value(p: &PolicyDefinition) -> Value {
    json!({
        "pattern": p.pattern,
        "apply-to": p.apply_to,
        "priority": p.priority,
        "definition": p.definition,
    })
}

/// A vhost as a definitions document lists it (its metadata both on its own and, as RabbitMQ
/// 3.10 writes it, under `metadata`).
pub fn vhost_object(
    name: &str,
    description: &str,
    tags: &[String],
    default_queue_type: Option<&str>,
) -> Value {
    let mut o = json!({
        "name": name,
        "description": description,
        "tags": tags,
        "metadata": {"description": description, "tags": tags},
    });
    if let Some(t) = default_queue_type {
        o["default_queue_type"] = json!(t);
        o["metadata"]["default_queue_type"] = json!(t);
    }
    o
}

/// The definitions as a document.
pub fn to_document(d: &Definitions) -> Map<String, Value> {
    let mut out = header();
    let users = d.users.iter().map(|(name, u)| {
        json!({
            "name": name,
            "password_hash": u.password_hash,
            "hashing_algorithm": SHA256,
            "tags": u.tags,
            "limits": {},
        })
    });
    out.insert("users".into(), users.collect());
    let vhosts = d.vhosts.iter().map(|(name, v)| {
        vhost_object(
            name,
            &v.description,
            &v.tags,
            v.default_queue_type.as_deref(),
        )
    });
    out.insert("vhosts".into(), vhosts.collect());
    let permissions = d.permissions.iter().map(|p| {
        json!({"user": p.user, "vhost": p.vhost, "configure": p.configure, "write": p.write, "read": p.read})
    });
    out.insert("permissions".into(), permissions.collect());
    out.insert("topic_permissions".into(), json!([]));
    let mut parameters = Vec::new();
    let (mut policies, mut queues, mut exchanges, mut bindings) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (vhost, v) in &d.vhosts {
        if !v.limits.is_empty() {
            parameters.push(json!({"vhost": vhost, "component": "vhost-limits", "name": "limits", "value": v.limits}));
        }
        for (name, p) in &v.operator_policies {
            parameters.push(json!({"vhost": vhost, "component": "operator_policy", "name": name, "value": policy_value(p)}));
        }
        for (name, p) in &v.policies {
            let mut o = policy_value(p);
            o["vhost"] = json!(vhost);
            o["name"] = json!(name);
            policies.push(o);
        }
        for (name, q) in &v.queues {
            let mut o = json!({"name": name, "vhost": vhost, "durable": true, "auto_delete": q.auto_delete});
            if let Some(node) = &q.node {
                o["node"] = json!(node);
            }
            queues.push(with_arguments(o, &q.arguments));
        }
        for (name, x) in &v.exchanges {
            let o = json!({"name": name, "vhost": vhost, "type": x.kind, "durable": true, "auto_delete": x.auto_delete, "internal": x.internal});
            exchanges.push(with_arguments(o, &x.arguments));
        }
        for b in &v.bindings {
            let o = json!({"source": b.source, "vhost": vhost, "destination": b.destination, "destination_type": b.destination_type, "routing_key": b.routing_key});
            bindings.push(with_arguments(o, &b.arguments));
        }
    }
    out.insert("parameters".into(), parameters.into());
    let cluster_name = d
        .cluster_name
        .iter()
        .map(|name| json!({"name": "cluster_name", "value": name}));
    out.insert("global_parameters".into(), cluster_name.collect());
    out.insert("policies".into(), policies.into());
    out.insert("queues".into(), queues.into());
    out.insert("exchanges".into(), exchanges.into());
    out.insert("bindings".into(), bindings.into());
    out
}

/// Reads the fields of one object of a document, saying which object a missing or wrong
/// field belongs to.
struct Fields<'a> {
    what: &'static str,
    o: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn of(what: &'static str, v: &'a Value) -> Result<Self, String> {
        v.as_object()
            .map(|o| Self { what, o })
            .ok_or_else(|| format!("a {what} is not an object: {v}"))
    }

    fn wrong(&self, key: &str, want: &str) -> String {
        let name = self.o.get("name").and_then(Value::as_str).unwrap_or("");
        format!("{} {name:?}: '{key}' is not {want}", self.what)
    }

    fn str(&self, key: &str) -> Result<&'a str, String> {
        self.o
            .get(key)
            .and_then(Value::as_str)
            .ok_or_else(|| self.wrong(key, "a string"))
    }

    fn string(&self, key: &str) -> Result<String, String> {
        self.str(key).map(str::to_owned)
    }

    fn opt_str(&self, key: &str) -> Option<&'a str> {
        self.o.get(key).and_then(Value::as_str)
    }

    fn bool(&self, key: &str) -> Result<bool, String> {
        match self.o.get(key) {
            None => Ok(false),
            Some(v) => v.as_bool().ok_or_else(|| self.wrong(key, "true or false")),
        }
    }

    fn object(&self, key: &str) -> Result<&'a Map<String, Value>, String> {
        self.o
            .get(key)
            .and_then(Value::as_object)
            .ok_or_else(|| self.wrong(key, "an object"))
    }

    fn arguments(&self) -> Result<FieldTable, String> {
        match self.o.get("arguments") {
            None | Some(Value::Null) => Ok(FieldTable::default()),
            Some(Value::Object(a)) => typed_table(a, self.o.get("argument_types"))
                .map_err(|e| self.wrong("arguments", &format!("a field table ({e})"))),
            Some(_) => Err(self.wrong("arguments", "an object")),
        }
    }

    /// Tags as a list, or as RabbitMQ 3.8 wrote them: one comma-separated string.
    fn tags(&self, key: &str) -> Result<Vec<String>, String> {
        match self.o.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(s
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|t| t.as_str().map(str::to_owned))
                .collect::<Option<_>>()
                .ok_or_else(|| self.wrong(key, "a list of strings")),
            Some(_) => Err(self.wrong(key, "a list of strings")),
        }
    }
}

fn policy_of(f: &Fields) -> Result<PolicyDefinition, String> {
    Ok(PolicyDefinition {
        pattern: f.string("pattern")?,
        apply_to: f.opt_str("apply-to").unwrap_or("all").to_owned(),
        priority: f.o.get("priority").and_then(Value::as_i64).unwrap_or(0),
        definition: f.object("definition")?.clone(),
    })
}

/// The objects under `key`, each with its fields.
fn each<'a>(
    doc: &'a Map<String, Value>,
    key: &str,
    what: &'static str,
) -> Result<Vec<Fields<'a>>, String> {
    match doc.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(|v| Fields::of(what, v)).collect(),
        Some(_) => Err(format!("'{key}' is not a list")),
    }
}

/// The vhost an object names, which the document must have.
fn vhost_of<'d>(d: &'d mut Definitions, f: &Fields) -> Result<&'d mut VhostDefinitions, String> {
    let name = f.str("vhost")?;
    let what = f.opt_str("name").unwrap_or_default();
    d.vhosts
        .get_mut(name)
        .ok_or_else(|| format!("{} {what:?}: no vhost {name:?}", f.what))
}

/// Reads back what [`to_document`] wrote: the same definitions.
pub fn from_document(doc: &Map<String, Value>) -> Result<Definitions, String> {
    let mut d = Definitions::default();
    for f in each(doc, "users", "user")? {
        let user = UserDefinition {
            password_hash: f.string("password_hash")?,
            tags: f.tags("tags")?,
        };
        d.users.insert(f.string("name")?, user);
    }
    for f in each(doc, "vhosts", "vhost")? {
        let meta = f.o.get("metadata").and_then(Value::as_object);
        let from_meta = |key: &str| meta.and_then(|m| m.get(key));
        let description = f
            .opt_str("description")
            .or_else(|| from_meta("description").and_then(Value::as_str))
            .unwrap_or_default();
        let tags = match f.o.get("tags") {
            Some(_) => f.tags("tags")?,
            None => meta.map_or(Ok(Vec::new()), |m| {
                Fields {
                    what: "vhost",
                    o: m,
                }
                .tags("tags")
            })?,
        };
        let default_queue_type = f
            .opt_str("default_queue_type")
            .or_else(|| from_meta("default_queue_type").and_then(Value::as_str))
            .map(str::to_owned);
        d.vhosts.insert(
            f.string("name")?,
            VhostDefinitions {
                description: description.to_owned(),
                tags,
                default_queue_type,
                ..VhostDefinitions::default()
            },
        );
    }
    for f in each(doc, "parameters", "parameter")? {
        match f.str("component")? {
            "vhost-limits" => {
                let limits = f
                    .object("value")?
                    .iter()
                    .map(|(k, n)| n.as_i64().map(|n| (k.clone(), n)))
                    .collect::<Option<_>>()
                    .ok_or_else(|| f.wrong("value", "limits by name"))?;
                vhost_of(&mut d, &f)?.limits = limits;
            }
            "operator_policy" => {
                let value = f.o.get("value").unwrap_or(&Value::Null);
                let p = policy_of(&Fields::of("operator policy", value)?)?;
                let name = f.string("name")?;
                vhost_of(&mut d, &f)?.operator_policies.insert(name, p);
            }
            other => return Err(format!("unknown parameter component {other:?}")),
        }
    }
    for f in each(doc, "policies", "policy")? {
        let p = policy_of(&f)?;
        let name = f.string("name")?;
        vhost_of(&mut d, &f)?.policies.insert(name, p);
    }
    for f in each(doc, "queues", "queue")? {
        let q = QueueDefinition {
            auto_delete: f.bool("auto_delete")?,
            arguments: f.arguments()?,
            node: f.opt_str("node").map(str::to_owned),
        };
        let name = f.string("name")?;
        vhost_of(&mut d, &f)?.queues.insert(name, q);
    }
    for f in each(doc, "exchanges", "exchange")? {
        let x = ExchangeDefinition {
            kind: f.string("type")?,
            auto_delete: f.bool("auto_delete")?,
            internal: f.bool("internal")?,
            arguments: f.arguments()?,
        };
        let name = f.string("name")?;
        vhost_of(&mut d, &f)?.exchanges.insert(name, x);
    }
    for f in each(doc, "bindings", "binding")? {
        let b = BindingDefinition {
            source: f.string("source")?,
            destination: f.string("destination")?,
            destination_type: f.string("destination_type")?,
            routing_key: f.string("routing_key")?,
            arguments: f.arguments()?,
        };
        vhost_of(&mut d, &f)?.bindings.insert(b);
    }
    for f in each(doc, "permissions", "permission")? {
        d.permissions.push(PermissionDefinition {
            user: f.string("user")?,
            vhost: f.string("vhost")?,
            configure: f.string("configure")?,
            write: f.string("write")?,
            read: f.string("read")?,
        });
    }
    for f in each(doc, "global_parameters", "global parameter")? {
        if f.str("name")? == "cluster_name" {
            d.cluster_name = Some(f.string("value")?);
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::AMQPValue;

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn policy(pattern: &str, key: &str) -> PolicyDefinition {
        let mut definition = Map::new();
        definition.insert(key.into(), json!(100));
        PolicyDefinition {
            pattern: pattern.into(),
            apply_to: "queues".into(),
            priority: 3,
            definition,
        }
    }

    /// Definitions with something in every field.
    fn everything() -> Definitions {
        let mut d = Definitions {
            cluster_name: Some("rabbit@prod".into()),
            ..Definitions::default()
        };
        d.users.insert(
            "ann".into(),
            UserDefinition {
                password_hash: "aGFzaA==".into(),
                tags: vec!["administrator".into(), "monitoring".into()],
            },
        );
        d.permissions.push(PermissionDefinition {
            user: "ann".into(),
            vhost: "v1".into(),
            configure: ".*".into(),
            write: "^w".into(),
            read: "".into(),
        });
        let mut v = VhostDefinitions {
            description: "first".into(),
            tags: vec!["prod".into()],
            default_queue_type: Some("quorum".into()),
            ..VhostDefinitions::default()
        };
        v.limits.insert("max-queues".into(), 10);
        v.limits.insert("max-connections".into(), -1);
        v.policies.insert("ttl".into(), policy("^t", "message-ttl"));
        v.operator_policies
            .insert("cap".into(), policy(".*", "max-length"));
        v.exchanges.insert(
            "x".into(),
            ExchangeDefinition {
                kind: "headers".into(),
                auto_delete: true,
                internal: true,
                arguments: table(&[("alternate-exchange", AMQPValue::LongString("ae".into()))]),
            },
        );
        v.queues.insert(
            "q".into(),
            QueueDefinition {
                auto_delete: false,
                arguments: table(&[
                    ("x-max-priority", AMQPValue::ShortShortUInt(9)),
                    ("x-max-length", AMQPValue::LongLongInt(1000)),
                ]),
                node: Some("warren@n2".into()),
            },
        );
        v.queues.insert(
            "here".into(),
            QueueDefinition {
                auto_delete: true,
                arguments: FieldTable::default(),
                node: None,
            },
        );
        for (dest, kind) in [("q", "queue"), ("here", "queue"), ("x", "exchange")] {
            v.bindings.insert(BindingDefinition {
                source: "x".into(),
                destination: dest.into(),
                destination_type: kind.into(),
                routing_key: format!("to.{dest}"),
                arguments: table(&[
                    ("x-match", AMQPValue::LongString("all".into())),
                    ("id", AMQPValue::LongInt(7)),
                ]),
            });
        }
        d.vhosts.insert("v1".into(), v);
        d.vhosts.insert("/".into(), VhostDefinitions::default());
        d
    }

    #[test]
    fn definitions_read_back_from_their_document_as_they_were() {
        let d = everything();
        let doc = to_document(&d);
        assert_eq!(from_document(&doc).unwrap(), d);
        // Through text too, as the snapshot file holds it.
        let text = serde_json::to_string_pretty(&Value::Object(doc)).unwrap();
        let again: Map<String, Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(from_document(&again).unwrap(), d);
    }

    #[test]
    fn the_document_is_in_rabbitmqs_format() {
        let doc = Value::Object(to_document(&everything()));
        let q = &doc["queues"][0];
        assert_eq!(q["vhost"], "v1");
        assert_eq!(q["durable"], true);
        assert_eq!(doc["queues"][1]["arguments"]["x-max-priority"], 9);
        assert_eq!(
            doc["queues"][1]["argument_types"],
            json!({"x-max-priority": "unsignedbyte"})
        );
        assert_eq!(doc["queues"][1]["node"], "warren@n2");
        assert_eq!(doc["exchanges"][0]["type"], "headers");
        assert!(doc["exchanges"][0].get("argument_types").is_none());
        assert_eq!(doc["users"][0]["hashing_algorithm"], SHA256);
        assert_eq!(doc["global_parameters"][0]["value"], "rabbit@prod");
        let components: Vec<&str> = doc["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["component"].as_str().unwrap())
            .collect();
        assert_eq!(components, ["vhost-limits", "operator_policy"]);
        assert_eq!(doc["policies"][0]["apply-to"], "queues");
        assert_eq!(doc["vhosts"][1]["metadata"]["default_queue_type"], "quorum");
        // No serde enum names of a crate: values are plain JSON.
        let text = doc.to_string();
        for name in ["LongLongInt", "LongString", "ShortShortUInt", "LongInt"] {
            assert!(!text.contains(name), "{name} in {text}");
        }
    }

    #[test]
    fn a_broken_document_says_what_is_wrong() {
        let mut doc = to_document(&everything());
        doc["queues"][0]
            .as_object_mut()
            .unwrap()
            .insert("vhost".into(), json!("nowhere"));
        let e = from_document(&doc).unwrap_err();
        assert!(e.contains("no vhost \"nowhere\""), "{e}");
        let mut doc = to_document(&everything());
        doc["queues"][1]["argument_types"] =
            json!({"x-max-priority": "short", "x-max-length": "byte"});
        let e = from_document(&doc).unwrap_err();
        assert!(
            e.contains("queue \"q\"") && e.contains("x-max-length"),
            "{e}"
        );
    }
}
