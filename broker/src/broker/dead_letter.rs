//! Dead-lettering as RabbitMQ does it: the message a queue gives up on (rejected without
//! requeue, expired, dropped by a length limit, past its delivery limit) is republished to the
//! queue's dead-letter exchange with the `x-death` history in its headers, the `x-first-death-*`
//! headers, no `expiration`, and the dead-letter routing key or its original ones. A message
//! that would go round a cycle of queues with no rejection in it is dropped instead.

use super::headers::text;
use super::message::{Message, ShortStr};
use crate::amqp::codec;
use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use bytes::Bytes;
use std::collections::HashMap;
use std::collections::hash_map::Entry;

/// Why a message was dead-lettered (the `reason` of its `x-death` entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathReason {
    Rejected,
    Expired,
    Maxlen,
    DeliveryLimit,
}

impl DeathReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rejected => "rejected",
            Self::Expired => "expired",
            Self::Maxlen => "maxlen",
            Self::DeliveryLimit => "delivery_limit",
        }
    }
}

/// Where a queue's dead letters go (`x-dead-letter-exchange`, `x-dead-letter-routing-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterTarget {
    pub exchange: String,
    pub routing_key: Option<String>,
}

/// A dead-lettered message, ready to route.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub message: Message,
    /// The routing keys to route it with.
    pub keys: Vec<Bytes>,
    pub headers: FieldTable,
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The `CC` keys of a headers table.
fn cc_keys(headers: &FieldTable) -> Vec<String> {
    match headers.inner().get("CC") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().iter().filter_map(text).collect(),
        Some(v) => text(v).into_iter().collect(),
        None => Vec::new(),
    }
}

/// The properties without `expiration` (a dead letter does not expire again for it).
fn without_expiration(p: &BasicProperties) -> BasicProperties {
    let mut out = BasicProperties::default();
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        out = out.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        out = out.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        out = out.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

/// The entries of an `x-death` header, newest first.
fn deaths(headers: &FieldTable) -> Vec<FieldTable> {
    match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a
            .as_slice()
            .iter()
            .filter_map(|v| match v {
                AMQPValue::FieldTable(t) => Some(t.clone()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn field(t: &FieldTable, key: &str) -> Option<String> {
    t.inner().get(key).and_then(text)
}

fn count_of(t: &FieldTable) -> Option<i64> {
    t.inner().get("count").and_then(super::headers::integer)
}

/// One entry per queue and reason. RabbitMQ before 3.5 (and clients that copied its headers)
/// wrote an entry per death, without counts: as RabbitMQ 3.10 does, the first entry of each
/// queue and reason stands for them all, counting them when it has no count of its own, and
/// the groups come in the reverse order of their first entries. Also returns where the entry
/// for `queue` and `reason` is. One pass over the entries: the header comes from clients, and
/// may hold thousands of them.
fn grouped(
    history: Vec<FieldTable>,
    queue: &str,
    reason: &str,
) -> (Vec<FieldTable>, Option<usize>) {
    let wanted = (Some(queue.to_owned()), Some(reason.to_owned()));
    let key = |d: &FieldTable| (field(d, "queue"), field(d, "reason"));
    if history.len() < 2 {
        let at = history.iter().position(|d| key(d) == wanted);
        return (history, at);
    }
    // Each group's first entry (its index in `out`) and size.
    let mut groups: HashMap<(Option<String>, Option<String>), (usize, usize)> =
        HashMap::with_capacity(history.len());
    let mut out: Vec<FieldTable> = Vec::new();
    for d in history {
        match groups.entry(key(&d)) {
            Entry::Occupied(mut g) => g.get_mut().1 += 1,
            Entry::Vacant(g) => {
                g.insert((out.len(), 1));
                out.push(d);
            }
        }
    }
    for &(first, n) in groups.values() {
        let d = &mut out[first];
        if count_of(d).is_none() {
            d.insert(
                ShortString::from("count"),
                AMQPValue::LongLongInt(i64::try_from(n).unwrap_or(i64::MAX)),
            );
        }
    }
    let last = out.len() - 1;
    out.reverse();
    let at = groups.get(&wanted).map(|&(first, _)| last - first);
    (out, at)
}

/// The message `queue` gives up on for `reason`, as it goes to `target`'s exchange.
pub fn dead_letter(
    message: &Message,
    queue: &str,
    reason: DeathReason,
    target: &DeadLetterTarget,
    now_ms: u64,
) -> DeadLetter {
    let props = codec::decode_properties(&message.properties).unwrap_or_default();
    let mut headers = props.headers().clone().unwrap_or_default();
    let mut original_keys = vec![message.routing_key.to_str_lossy().into_owned()];
    original_keys.extend(cc_keys(&headers));
    let keys: Vec<Bytes> = match &target.routing_key {
        Some(k) => {
            // A dead-letter routing key replaces the original keys, CC included.
            let mut kept = FieldTable::default();
            for (k, v) in headers.inner() {
                if k.as_str() != "CC" {
                    kept.insert(k.clone(), v.clone());
                }
            }
            headers = kept;
            vec![Bytes::from(k.clone().into_bytes())]
        }
        None => original_keys
            .iter()
            .map(|k| Bytes::from(k.clone().into_bytes()))
            .collect(),
    };
    let exchange = message.exchange.to_str_lossy().into_owned();
    let mut entry = FieldTable::default();
    entry.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
    entry.insert(ShortString::from("reason"), long(reason.as_str()));
    entry.insert(ShortString::from("queue"), long(queue));
    entry.insert(
        ShortString::from("time"),
        AMQPValue::Timestamp(now_ms / 1000),
    );
    entry.insert(ShortString::from("exchange"), long(&exchange));
    entry.insert(
        ShortString::from("routing-keys"),
        AMQPValue::FieldArray(FieldArray::from(
            original_keys.iter().map(|k| long(k)).collect::<Vec<_>>(),
        )),
    );
    if let Some(e) = props.expiration() {
        entry.insert(ShortString::from("original-expiration"), long(e.as_str()));
    }
    let (mut history, found) = grouped(deaths(&headers), queue, reason.as_str());
    // The same queue and reason again: that entry, as it was but for its count one up, moved
    // to the front (RabbitMQ keeps the first death's time, exchange and routing keys).
    if let Some(at) = found {
        entry = history.remove(at);
        // The count may come from a client: it stops at the largest one.
        let count = count_of(&entry).unwrap_or(0);
        entry.insert(
            ShortString::from("count"),
            AMQPValue::LongLongInt(count.saturating_add(1)),
        );
    }
    history.insert(0, entry);
    headers.insert(
        ShortString::from("x-death"),
        AMQPValue::FieldArray(FieldArray::from(
            history
                .into_iter()
                .map(AMQPValue::FieldTable)
                .collect::<Vec<_>>(),
        )),
    );
    for (key, value) in [
        ("x-first-death-reason", reason.as_str()),
        ("x-first-death-queue", queue),
        ("x-first-death-exchange", exchange.as_str()),
    ] {
        if !headers.inner().contains_key(key) {
            headers.insert(ShortString::from(key), long(value));
        }
    }
    let props = without_expiration(&props).with_headers(headers.clone());
    let routing_key = keys
        .first()
        .cloned()
        .map(ShortStr::from_bytes)
        .unwrap_or_default();
    DeadLetter {
        message: Message {
            exchange: ShortStr::from(target.exchange.as_str()),
            routing_key,
            properties: codec::encode_properties(&props),
            body: message.body.clone(),
            persistent: message.persistent,
            arrived_ms: now_ms,
            expires_at_ms: None,
        },
        keys,
        headers,
    }
}

/// Whether sending a dead letter with these headers (its new death included) to `queue`
/// closes a cycle with no rejection in it, which RabbitMQ breaks by dropping the message.
pub fn is_cycle(headers: &FieldTable, queue: &str) -> bool {
    let history = deaths(headers);
    let Some(at) = history
        .iter()
        .position(|d| field(d, "queue").as_deref() == Some(queue))
    else {
        return false;
    };
    history[..=at]
        .iter()
        .all(|d| field(d, "reason").as_deref() != Some("rejected"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(props: BasicProperties) -> Message {
        Message {
            exchange: "orders".into(),
            routing_key: "eu".into(),
            properties: codec::encode_properties(&props),
            body: Bytes::from_static(b"body"),
            persistent: true,
            arrived_ms: 1,
            expires_at_ms: Some(2),
        }
    }

    fn target(key: Option<&str>) -> DeadLetterTarget {
        DeadLetterTarget {
            exchange: "dlx".into(),
            routing_key: key.map(Into::into),
        }
    }

    fn x_death(d: &DeadLetter) -> Vec<FieldTable> {
        deaths(&d.headers)
    }

    #[test]
    fn a_dead_letter_carries_its_history_and_loses_its_expiration() {
        let mut cc = FieldTable::default();
        cc.insert(
            "CC".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![long("us")])),
        );
        let props = BasicProperties::default()
            .with_expiration("5000".into())
            .with_headers(cc)
            .with_message_id("m1".into());
        let d = dead_letter(
            &message(props),
            "q1",
            DeathReason::Expired,
            &target(None),
            7_000,
        );
        assert_eq!(d.keys, vec![Bytes::from("eu"), Bytes::from("us")]);
        assert_eq!(d.message.exchange.as_bytes(), b"dlx");
        assert_eq!(d.message.expires_at_ms, None);
        let back = codec::decode_properties(&d.message.properties).unwrap();
        assert_eq!(back.expiration(), &None);
        assert_eq!(back.message_id().as_ref().map(|s| s.as_str()), Some("m1"));
        let history = x_death(&d);
        assert_eq!(history.len(), 1);
        let e = &history[0];
        assert_eq!(field(e, "reason").as_deref(), Some("expired"));
        assert_eq!(field(e, "queue").as_deref(), Some("q1"));
        assert_eq!(field(e, "exchange").as_deref(), Some("orders"));
        assert_eq!(field(e, "original-expiration").as_deref(), Some("5000"));
        assert_eq!(e.inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(e.inner().get("time"), Some(&AMQPValue::Timestamp(7)));
        assert_eq!(
            field(&d.headers, "x-first-death-reason").as_deref(),
            Some("expired")
        );
        // A second death in the same queue for the same reason counts; another adds an entry.
        let again = dead_letter(
            &d.message,
            "q1",
            DeathReason::Expired,
            &target(Some("k")),
            8_000,
        );
        assert_eq!(again.keys, vec![Bytes::from("k")]);
        assert!(!again.headers.inner().contains_key("CC"));
        let h = x_death(&again);
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].inner().get("count"), Some(&AMQPValue::LongLongInt(2)));
        let third = dead_letter(
            &again.message,
            "q2",
            DeathReason::Rejected,
            &target(None),
            9_000,
        );
        let h = x_death(&third);
        assert_eq!(h.len(), 2);
        assert_eq!(field(&h[0], "queue").as_deref(), Some("q2"));
        assert_eq!(
            field(&third.headers, "x-first-death-queue").as_deref(),
            Some("q1")
        );
    }

    #[test]
    fn per_death_entries_of_older_brokers_are_grouped_by_queue_and_reason() {
        let old = |q: &str, count: Option<i64>| {
            let mut t = FieldTable::default();
            t.insert("queue".into(), long(q));
            t.insert("reason".into(), long("expired"));
            if let Some(n) = count {
                t.insert("count".into(), AMQPValue::LongLongInt(n));
            }
            AMQPValue::FieldTable(t)
        };
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                old("a", None),
                old("b", Some(7)),
                old("a", None),
                old("c", None),
                old("b", None),
                old("a", None),
            ])),
        );
        let m = message(BasicProperties::default().with_headers(headers));
        let d = dead_letter(&m, "b", DeathReason::Expired, &target(None), 1000);
        let summary: Vec<(String, i64)> = x_death(&d)
            .iter()
            .map(|e| (field(e, "queue").unwrap(), count_of(e).unwrap()))
            .collect();
        // b's first entry keeps its own count and takes this death; a counts its three
        // entries; the rest in the reverse order of first appearance.
        assert_eq!(summary, [("b".into(), 8), ("c".into(), 1), ("a".into(), 3)]);
    }

    #[test]
    fn a_header_of_thousands_of_distinct_entries_is_merged_in_one_pass() {
        let entry = |q: String| {
            let mut t = FieldTable::default();
            t.insert("queue".into(), long(&q));
            t.insert("reason".into(), long("rejected"));
            AMQPValue::FieldTable(t)
        };
        // 7,000 distinct queues, the last one twice: each a group of its own but that one.
        let mut entries: Vec<AMQPValue> = (0..7_000).map(|i| entry(format!("q{i}"))).collect();
        entries.push(entry("q6999".into()));
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::FieldArray(entries.into()));
        let m = message(BasicProperties::default().with_headers(headers));
        let d = dead_letter(&m, "q3", DeathReason::Rejected, &target(None), 1000);
        let history = x_death(&d);
        assert_eq!(history.len(), 7_000);
        let summary = |e: &FieldTable| (field(e, "queue").unwrap(), count_of(e).unwrap());
        assert_eq!(summary(&history[0]), ("q3".into(), 2));
        assert_eq!(summary(&history[1]), ("q6999".into(), 2));
        assert_eq!(summary(&history[6_999]), ("q0".into(), 1));
    }

    #[test]
    fn a_count_at_the_largest_integer_stays_there() {
        let mut t = FieldTable::default();
        t.insert("queue".into(), long("q"));
        t.insert("reason".into(), long("expired"));
        t.insert("count".into(), AMQPValue::LongLongInt(i64::MAX));
        for others in [0, 1] {
            let mut entries = vec![AMQPValue::FieldTable(t.clone())];
            // Alone, and among others (grouped).
            entries.extend((0..others).map(|_| AMQPValue::FieldTable(FieldTable::default())));
            let mut headers = FieldTable::default();
            headers.insert("x-death".into(), AMQPValue::FieldArray(entries.into()));
            let m = message(BasicProperties::default().with_headers(headers));
            let d = dead_letter(&m, "q", DeathReason::Expired, &target(None), 1000);
            assert_eq!(count_of(&x_death(&d)[0]), Some(i64::MAX));
        }
    }

    #[test]
    fn cycles_without_a_rejection_are_detected() {
        let m = message(BasicProperties::default());
        let d1 = dead_letter(&m, "a", DeathReason::Expired, &target(None), 1000);
        assert!(
            is_cycle(&d1.headers, "a"),
            "a queue dead-lettering to itself"
        );
        assert!(!is_cycle(&d1.headers, "b"));
        let d2 = dead_letter(&d1.message, "b", DeathReason::Maxlen, &target(None), 1000);
        assert!(is_cycle(&d2.headers, "a"), "a -> b -> a, all automatic");
        let r = dead_letter(&d1.message, "b", DeathReason::Rejected, &target(None), 1000);
        assert!(
            !is_cycle(&r.headers, "a"),
            "a rejection in the cycle breaks it"
        );
    }
}
