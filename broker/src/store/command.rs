//! Changes to the durable definitions as values: each [`Command`] says what changed (a queue
//! declared, a user deleted, ...) with everything needed to make the change, and [`apply`]
//! makes it. Applying is deterministic and idempotent, and a command's effect never depends
//! on the state it meets beyond the objects it names, so replaying commands over a state that
//! already holds some of them (a snapshot taken after part of the log) gives the same state as
//! applying them once. Commands are written as JSON objects tagged by `op`, with RabbitMQ's
//! field names; no I/O happens here.

use super::model::{
    BindingDefinition, Definitions, ExchangeDefinition, PermissionDefinition, PolicyDefinition,
    QueueDefinition, UserDefinition,
};
use amq_protocol::types::FieldTable;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One change to the durable definitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Creates a vhost or sets its description, tags and default queue type; its limits,
    /// policies and topology are kept.
    PutVhost {
        name: String,
        description: String,
        tags: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default_queue_type: Option<String>,
    },
    /// Removes a vhost with everything in it, and every user's permissions in it.
    DeleteVhost {
        name: String,
    },
    /// Sets one limit of a vhost (`max-connections`, `max-queues`, ...).
    SetVhostLimit {
        vhost: String,
        name: String,
        value: i64,
    },
    ClearVhostLimit {
        vhost: String,
        name: String,
    },
    /// Creates or replaces a user.
    PutUser {
        name: String,
        /// RabbitMQ's `rabbit_password_hashing_sha256` format.
        password_hash: String,
        tags: Vec<String>,
    },
    /// Removes a user and its permissions.
    DeleteUser {
        name: String,
    },
    SetPermission {
        user: String,
        vhost: String,
        configure: String,
        write: String,
        read: String,
    },
    ClearPermission {
        user: String,
        vhost: String,
    },
    /// Creates or replaces a durable exchange.
    DeclareExchange {
        vhost: String,
        name: String,
        #[serde(rename = "type")]
        kind: String,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    },
    /// Removes an exchange and the bindings from and to it.
    DeleteExchange {
        vhost: String,
        name: String,
    },
    /// Creates or replaces a durable queue.
    DeclareQueue {
        vhost: String,
        name: String,
        auto_delete: bool,
        arguments: FieldTable,
        /// The node that holds its messages (none: the node that applies it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node: Option<String>,
    },
    /// Removes a queue and the bindings to it.
    DeleteQueue {
        vhost: String,
        name: String,
    },
    Bind {
        vhost: String,
        source: String,
        destination: String,
        /// `queue` or `exchange`.
        destination_type: String,
        routing_key: String,
        arguments: FieldTable,
    },
    Unbind {
        vhost: String,
        source: String,
        destination: String,
        destination_type: String,
        routing_key: String,
        arguments: FieldTable,
    },
    PutPolicy {
        vhost: String,
        name: String,
        pattern: String,
        #[serde(rename = "apply-to")]
        apply_to: String,
        priority: i64,
        definition: serde_json::Map<String, serde_json::Value>,
    },
    DeletePolicy {
        vhost: String,
        name: String,
    },
    PutOperatorPolicy {
        vhost: String,
        name: String,
        pattern: String,
        #[serde(rename = "apply-to")]
        apply_to: String,
        priority: i64,
        definition: serde_json::Map<String, serde_json::Value>,
    },
    DeleteOperatorPolicy {
        vhost: String,
        name: String,
    },
    /// RabbitMQ's `cluster_name` global parameter.
    SetClusterName {
        name: String,
    },
}

impl Command {
    /// What the command does, for an error saying it could not be done ("declare queue 'q'
    /// in vhost '/'").
    pub fn what(&self) -> String {
        let object =
            |kind: &str, name: &str, vhost: &str| format!("{kind} '{name}' in vhost '{vhost}'");
        match self {
            Command::PutVhost { name, .. } => format!("create or update vhost '{name}'"),
            Command::DeleteVhost { name } => format!("delete vhost '{name}'"),
            Command::SetVhostLimit { vhost, name, .. }
            | Command::ClearVhostLimit { vhost, name } => {
                format!("change limit '{name}' of vhost '{vhost}'")
            }
            Command::PutUser { name, .. } => format!("create or update user '{name}'"),
            Command::DeleteUser { name } => format!("delete user '{name}'"),
            Command::SetPermission { user, vhost, .. }
            | Command::ClearPermission { user, vhost } => {
                format!("change the permissions of user '{user}' in vhost '{vhost}'")
            }
            Command::DeclareExchange { vhost, name, .. } => {
                format!("declare {}", object("exchange", name, vhost))
            }
            Command::DeleteExchange { vhost, name } => {
                format!("delete {}", object("exchange", name, vhost))
            }
            Command::DeclareQueue { vhost, name, .. } => {
                format!("declare {}", object("queue", name, vhost))
            }
            Command::DeleteQueue { vhost, name } => {
                format!("delete {}", object("queue", name, vhost))
            }
            Command::Bind { vhost, source, .. } | Command::Unbind { vhost, source, .. } => {
                format!(
                    "change the bindings of {}",
                    object("exchange", source, vhost)
                )
            }
            Command::PutPolicy { vhost, name, .. }
            | Command::DeletePolicy { vhost, name }
            | Command::PutOperatorPolicy { vhost, name, .. }
            | Command::DeleteOperatorPolicy { vhost, name } => {
                format!("change {}", object("policy", name, vhost))
            }
            Command::SetClusterName { .. } => "rename the cluster".into(),
        }
    }
}

/// The commands that make `defs` from nothing: how definitions kept outside the cluster's
/// log (an earlier version's files) enter it.
pub fn commands_of(defs: &Definitions) -> Vec<Command> {
    let mut out = Vec::new();
    for (name, u) in &defs.users {
        out.push(Command::PutUser {
            name: name.clone(),
            password_hash: u.password_hash.clone(),
            tags: u.tags.clone(),
        });
    }
    for (name, v) in &defs.vhosts {
        out.push(Command::PutVhost {
            name: name.clone(),
            description: v.description.clone(),
            tags: v.tags.clone(),
            default_queue_type: v.default_queue_type.clone(),
        });
        for (limit, value) in &v.limits {
            out.push(Command::SetVhostLimit {
                vhost: name.clone(),
                name: limit.clone(),
                value: *value,
            });
        }
        for (x, d) in &v.exchanges {
            out.push(Command::DeclareExchange {
                vhost: name.clone(),
                name: x.clone(),
                kind: d.kind.clone(),
                auto_delete: d.auto_delete,
                internal: d.internal,
                arguments: d.arguments.clone(),
            });
        }
        for (q, d) in &v.queues {
            out.push(Command::DeclareQueue {
                vhost: name.clone(),
                name: q.clone(),
                auto_delete: d.auto_delete,
                arguments: d.arguments.clone(),
                node: d.node.clone(),
            });
        }
        for b in v.bindings.iter() {
            out.push(Command::Bind {
                vhost: name.clone(),
                source: b.source.clone(),
                destination: b.destination.clone(),
                destination_type: b.destination_type.clone(),
                routing_key: b.routing_key.clone(),
                arguments: b.arguments.clone(),
            });
        }
        for (operator, policies) in [(false, &v.policies), (true, &v.operator_policies)] {
            for (p, d) in policies {
                let (vhost, name, pattern, apply_to, priority, definition) = (
                    name.clone(),
                    p.clone(),
                    d.pattern.clone(),
                    d.apply_to.clone(),
                    d.priority,
                    d.definition.clone(),
                );
                out.push(if operator {
                    Command::PutOperatorPolicy {
                        vhost,
                        name,
                        pattern,
                        apply_to,
                        priority,
                        definition,
                    }
                } else {
                    Command::PutPolicy {
                        vhost,
                        name,
                        pattern,
                        apply_to,
                        priority,
                        definition,
                    }
                });
            }
        }
    }
    for p in &defs.permissions {
        out.push(Command::SetPermission {
            user: p.user.clone(),
            vhost: p.vhost.clone(),
            configure: p.configure.clone(),
            write: p.write.clone(),
            read: p.read.clone(),
        });
    }
    if let Some(name) = &defs.cluster_name {
        out.push(Command::SetClusterName { name: name.clone() });
    }
    out
}

/// Makes the change `command` describes. Returns whether anything changed.
pub fn apply(defs: &mut Definitions, command: &Command) -> bool {
    match command {
        Command::PutVhost {
            name,
            description,
            tags,
            default_queue_type,
        } => {
            let existed = defs.vhosts.contains_key(name);
            let v = defs.vhosts.entry(name.clone()).or_default();
            let same = v.description == *description
                && v.tags == *tags
                && v.default_queue_type == *default_queue_type;
            if !same {
                v.description.clone_from(description);
                v.tags.clone_from(tags);
                v.default_queue_type.clone_from(default_queue_type);
            }
            !existed || !same
        }
        Command::DeleteVhost { name } => {
            let removed = defs.vhosts.remove(name).is_some();
            let before = defs.permissions.len();
            defs.permissions.retain(|p| p.vhost != *name);
            removed || defs.permissions.len() != before
        }
        Command::SetVhostLimit { vhost, name, value } => {
            let v = defs.vhosts.entry(vhost.clone()).or_default();
            v.limits.insert(name.clone(), *value) != Some(*value)
        }
        Command::ClearVhostLimit { vhost, name } => defs
            .vhosts
            .get_mut(vhost)
            .is_some_and(|v| v.limits.remove(name).is_some()),
        Command::PutUser {
            name,
            password_hash,
            tags,
        } => {
            let user = UserDefinition {
                password_hash: password_hash.clone(),
                tags: tags.clone(),
            };
            defs.users.insert(name.clone(), user.clone()) != Some(user)
        }
        Command::DeleteUser { name } => {
            let removed = defs.users.remove(name).is_some();
            let before = defs.permissions.len();
            defs.permissions.retain(|p| p.user != *name);
            removed || defs.permissions.len() != before
        }
        Command::SetPermission {
            user,
            vhost,
            configure,
            write,
            read,
        } => {
            let def = PermissionDefinition {
                user: user.clone(),
                vhost: vhost.clone(),
                configure: configure.clone(),
                write: write.clone(),
                read: read.clone(),
            };
            // Replaced where it stands, so that setting it again does not reorder the list.
            match defs
                .permissions
                .iter_mut()
                .find(|p| p.user == *user && p.vhost == *vhost)
            {
                Some(p) if *p == def => false,
                Some(p) => {
                    *p = def;
                    true
                }
                None => {
                    defs.permissions.push(def);
                    true
                }
            }
        }
        Command::ClearPermission { user, vhost } => {
            let before = defs.permissions.len();
            defs.permissions
                .retain(|p| !(p.user == *user && p.vhost == *vhost));
            defs.permissions.len() != before
        }
        Command::DeclareExchange {
            vhost,
            name,
            kind,
            auto_delete,
            internal,
            arguments,
        } => {
            let def = ExchangeDefinition {
                kind: kind.clone(),
                auto_delete: *auto_delete,
                internal: *internal,
                arguments: arguments.clone(),
            };
            let v = defs.vhosts.entry(vhost.clone()).or_default();
            v.exchanges.insert(name.clone(), def.clone()) != Some(def)
        }
        Command::DeleteExchange { vhost, name } => defs.vhosts.get_mut(vhost).is_some_and(|v| {
            let removed = v.exchanges.remove(name).is_some();
            let unbound = v.bindings.remove_where(|b| {
                b.source == *name || (b.destination_type == "exchange" && b.destination == *name)
            });
            removed || unbound > 0
        }),
        Command::DeclareQueue {
            vhost,
            name,
            auto_delete,
            arguments,
            node,
        } => {
            let def = QueueDefinition {
                auto_delete: *auto_delete,
                arguments: arguments.clone(),
                node: node.clone(),
            };
            let v = defs.vhosts.entry(vhost.clone()).or_default();
            v.queues.insert(name.clone(), def.clone()) != Some(def)
        }
        Command::DeleteQueue { vhost, name } => defs.vhosts.get_mut(vhost).is_some_and(|v| {
            let removed = v.queues.remove(name).is_some();
            let unbound = v
                .bindings
                .remove_where(|b| b.destination_type == "queue" && b.destination == *name);
            removed || unbound > 0
        }),
        Command::Bind {
            vhost,
            source,
            destination,
            destination_type,
            routing_key,
            arguments,
        } => {
            let binding = binding(
                source,
                destination,
                destination_type,
                routing_key,
                arguments,
            );
            defs.vhosts
                .entry(vhost.clone())
                .or_default()
                .bindings
                .insert(binding)
        }
        Command::Unbind {
            vhost,
            source,
            destination,
            destination_type,
            routing_key,
            arguments,
        } => {
            let binding = binding(
                source,
                destination,
                destination_type,
                routing_key,
                arguments,
            );
            defs.vhosts
                .get_mut(vhost)
                .is_some_and(|v| v.bindings.remove(&binding))
        }
        Command::PutPolicy {
            vhost,
            name,
            pattern,
            apply_to,
            priority,
            definition,
        } => put_policy(
            &mut defs.vhosts.entry(vhost.clone()).or_default().policies,
            name,
            PolicyDefinition {
                pattern: pattern.clone(),
                apply_to: apply_to.clone(),
                priority: *priority,
                definition: definition.clone(),
            },
        ),
        Command::DeletePolicy { vhost, name } => defs
            .vhosts
            .get_mut(vhost)
            .is_some_and(|v| v.policies.remove(name).is_some()),
        Command::PutOperatorPolicy {
            vhost,
            name,
            pattern,
            apply_to,
            priority,
            definition,
        } => put_policy(
            &mut defs
                .vhosts
                .entry(vhost.clone())
                .or_default()
                .operator_policies,
            name,
            PolicyDefinition {
                pattern: pattern.clone(),
                apply_to: apply_to.clone(),
                priority: *priority,
                definition: definition.clone(),
            },
        ),
        Command::DeleteOperatorPolicy { vhost, name } => defs
            .vhosts
            .get_mut(vhost)
            .is_some_and(|v| v.operator_policies.remove(name).is_some()),
        Command::SetClusterName { name } => {
            defs.cluster_name.replace(name.clone()).as_ref() != Some(name)
        }
    }
}

fn put_policy(
    policies: &mut BTreeMap<String, PolicyDefinition>,
    name: &str,
    policy: PolicyDefinition,
) -> bool {
    if policies.get(name) == Some(&policy) {
        return false;
    }
    policies.insert(name.to_owned(), policy);
    true
}

fn binding(
    source: &str,
    destination: &str,
    destination_type: &str,
    routing_key: &str,
    arguments: &FieldTable,
) -> BindingDefinition {
    BindingDefinition {
        source: source.to_owned(),
        destination: destination.to_owned(),
        destination_type: destination_type.to_owned(),
        routing_key: routing_key.to_owned(),
        arguments: arguments.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::types::AMQPValue;

    fn args(n: i32) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("x-max-length".into(), AMQPValue::LongInt(n));
        t
    }

    fn bind(source: &str, destination: &str, destination_type: &str, key: &str) -> Command {
        Command::Bind {
            vhost: "v".into(),
            source: source.into(),
            destination: destination.into(),
            destination_type: destination_type.into(),
            routing_key: key.into(),
            arguments: args(1),
        }
    }

    fn policy(put: bool, operator: bool, name: &str) -> Command {
        let mut definition = serde_json::Map::new();
        definition.insert("max-length".into(), serde_json::json!(10));
        let (vhost, name) = ("v".to_owned(), name.to_owned());
        let (pattern, apply_to, priority) = ("^q".to_owned(), "queues".to_owned(), 3);
        match (put, operator) {
            (true, false) => Command::PutPolicy {
                vhost,
                name,
                pattern,
                apply_to,
                priority,
                definition,
            },
            (true, true) => Command::PutOperatorPolicy {
                vhost,
                name,
                pattern,
                apply_to,
                priority,
                definition,
            },
            (false, false) => Command::DeletePolicy { vhost, name },
            (false, true) => Command::DeleteOperatorPolicy { vhost, name },
        }
    }

    /// Every kind of command, in an order where each finds something to change.
    fn every_command() -> Vec<Command> {
        vec![
            Command::SetClusterName {
                name: "rabbit@here".into(),
            },
            Command::PutVhost {
                name: "v".into(),
                description: "test".into(),
                tags: vec!["a".into()],
                default_queue_type: Some("quorum".into()),
            },
            Command::SetVhostLimit {
                vhost: "v".into(),
                name: "max-queues".into(),
                value: 10,
            },
            Command::PutUser {
                name: "u".into(),
                password_hash: "hash".into(),
                tags: vec!["administrator".into()],
            },
            Command::SetPermission {
                user: "u".into(),
                vhost: "v".into(),
                configure: ".*".into(),
                write: ".*".into(),
                read: "".into(),
            },
            Command::DeclareExchange {
                vhost: "v".into(),
                name: "x".into(),
                kind: "topic".into(),
                auto_delete: false,
                internal: false,
                arguments: args(2),
            },
            Command::DeclareExchange {
                vhost: "v".into(),
                name: "y".into(),
                kind: "fanout".into(),
                auto_delete: true,
                internal: true,
                arguments: FieldTable::default(),
            },
            Command::DeclareQueue {
                vhost: "v".into(),
                name: "q".into(),
                auto_delete: false,
                arguments: args(5),
                node: None,
            },
            Command::DeclareQueue {
                vhost: "v".into(),
                name: "r".into(),
                auto_delete: false,
                arguments: FieldTable::default(),
                node: None,
            },
            bind("x", "q", "queue", "a.#"),
            bind("x", "r", "queue", "b"),
            bind("x", "y", "exchange", "c"),
            bind("y", "r", "queue", ""),
            policy(true, false, "p"),
            policy(true, true, "o"),
            Command::Unbind {
                vhost: "v".into(),
                source: "x".into(),
                destination: "r".into(),
                destination_type: "queue".into(),
                routing_key: "b".into(),
                arguments: args(1),
            },
            // Takes the binding x -> q with it.
            Command::DeleteQueue {
                vhost: "v".into(),
                name: "q".into(),
            },
            // Takes x -> y and y -> r with it.
            Command::DeleteExchange {
                vhost: "v".into(),
                name: "y".into(),
            },
            policy(false, false, "p"),
            policy(false, true, "o"),
            Command::ClearVhostLimit {
                vhost: "v".into(),
                name: "max-queues".into(),
            },
            Command::ClearPermission {
                user: "u".into(),
                vhost: "v".into(),
            },
            Command::SetPermission {
                user: "u".into(),
                vhost: "v".into(),
                configure: "".into(),
                write: "".into(),
                read: ".*".into(),
            },
            Command::DeleteUser { name: "u".into() },
            Command::DeleteVhost { name: "v".into() },
        ]
    }

    fn applied(start: &Definitions, commands: &[Command]) -> Definitions {
        let mut defs = start.clone();
        for c in commands {
            apply(&mut defs, c);
        }
        defs
    }

    #[test]
    fn the_commands_of_definitions_make_them_from_nothing() {
        let defs = applied(
            &Definitions::default(),
            &every_command()[..every_command().len() - 2],
        );
        assert!(!defs.vhosts.is_empty() && !defs.users.is_empty());
        assert_eq!(applied(&Definitions::default(), &commands_of(&defs)), defs);
    }

    #[test]
    fn every_command_changes_once_and_is_idempotent() {
        let mut defs = Definitions::default();
        for c in every_command() {
            assert!(apply(&mut defs, &c), "no change: {c:?}");
            let once = defs.clone();
            assert!(!apply(&mut defs, &c), "changed again: {c:?}");
            assert_eq!(defs, once, "applying twice differs from once: {c:?}");
        }
    }

    #[test]
    fn deleting_a_queue_or_an_exchange_drops_its_bindings() {
        let all = every_command();
        let at = |op: &str| {
            all.iter()
                .position(|c| serde_json::to_value(c).unwrap()["op"] == op)
                .unwrap()
        };
        let before_delete = applied(&Definitions::default(), &all[..at("delete_queue")]);
        assert_eq!(before_delete.vhosts["v"].bindings.len(), 3);
        let after = applied(&Definitions::default(), &all[..=at("delete_exchange")]);
        let v = &after.vhosts["v"];
        assert!(v.bindings.is_empty(), "{:?}", v.bindings);
        assert!(!v.queues.contains_key("q") && v.queues.contains_key("r"));
        assert!(!v.exchanges.contains_key("y") && v.exchanges.contains_key("x"));
        let end = applied(&Definitions::default(), &all);
        assert!(end.vhosts.is_empty() && end.users.is_empty() && end.permissions.is_empty());
    }

    /// A snapshot taken after part or all of the log and the log then replayed over it (a
    /// crash before the log was emptied) gives the state of applying everything once.
    #[test]
    fn replaying_over_a_later_state_gives_the_same_state() {
        let all = every_command();
        for end in 0..=all.len() {
            let log = &all[..end];
            let once = applied(&Definitions::default(), log);
            assert_eq!(
                applied(&once, log),
                once,
                "log of {end} replayed over its result"
            );
            for taken in 0..=end {
                let snapshot = applied(&Definitions::default(), &log[..taken]);
                assert_eq!(applied(&snapshot, log), once, "{taken} of {end}");
            }
        }
    }

    #[test]
    fn commands_read_back_as_written() {
        for c in every_command() {
            let text = serde_json::to_string(&c).unwrap();
            let back: Command = serde_json::from_str(&text).unwrap();
            assert_eq!(back, c, "{text}");
        }
    }

    #[test]
    fn commands_are_json_with_rabbitmq_field_names() {
        let all = every_command();
        let json = |op: &str| {
            all.iter()
                .map(|c| serde_json::to_value(c).unwrap())
                .find(|v| v["op"] == op)
                .unwrap()
        };
        assert_eq!(
            json("declare_queue"),
            serde_json::json!({
                "op": "declare_queue", "vhost": "v", "name": "q", "auto_delete": false,
                "arguments": serde_json::to_value(args(5)).unwrap(),
            })
        );
        let x = json("declare_exchange");
        assert_eq!(
            (x["type"].as_str(), x["internal"].as_bool()),
            (Some("topic"), Some(false))
        );
        let b = json("bind");
        assert_eq!(b["destination_type"], "queue");
        assert_eq!(b["routing_key"], "a.#");
        assert_eq!(json("put_policy")["apply-to"], "queues");
        assert_eq!(json("put_user")["password_hash"], "hash");
        assert_eq!(json("set_cluster_name")["name"], "rabbit@here");
        let unknown = r#"{"op":"delete_queue","vhost":"v","name":"q","extra":1}"#;
        assert!(serde_json::from_str::<Command>(unknown).is_err());
    }
}
