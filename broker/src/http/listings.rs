//! What this node answers to other nodes' cluster-wide listings: its own queues (not those
//! whose home is elsewhere), client connections, their channels and consumers, and itself.

use super::AppState;
use super::gather::{Ask, Kind};
use super::peers::{channel_items_of, connection_object, consumer_objects};
use super::topology::queue_object;
use crate::broker::queue_ref::QueueRef;
use serde_json::Value;

/// This node's own objects of a kind.
pub fn own(state: &AppState, ask: &Ask) -> Vec<Value> {
    let vhost = ask.vhost.as_deref();
    match ask.kind {
        Kind::Queues => {
            let mut out = Vec::new();
            for v in state.broker.vhosts() {
                if vhost.is_some_and(|n| n != &*v.name) {
                    continue;
                }
                let queues = match &ask.name {
                    Some(name) => v.queue(name).into_iter().collect(),
                    None => v.queues(),
                };
                for q in queues {
                    if matches!(q, QueueRef::Local(_)) {
                        out.push(queue_object(state, &v.name, &q, ask.name.is_some()));
                    }
                }
            }
            out
        }
        Kind::Connections => state
            .broker
            .connections
            .list()
            .iter()
            .filter(|c| vhost.is_none_or(|v| v == c.vhost))
            .map(|c| connection_object(state, c, false))
            .collect(),
        Kind::Channels => {
            let conns: Vec<_> = state
                .broker
                .connections
                .list()
                .into_iter()
                .filter(|c| vhost.is_none_or(|v| v == c.vhost))
                .collect();
            channel_items_of(state, &conns)
        }
        Kind::Consumers => consumer_objects(state, vhost),
        Kind::Node => vec![super::overview::node_object(state)],
        Kind::Totals => vec![super::overview::own_totals(state)],
    }
}
