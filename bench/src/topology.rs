//! Declaring, inspecting and deleting the exchange and queues of a run.
//!
//! Topology is set up once, on a dedicated setup connection, before any
//! producer or consumer starts, so declaration cost never lands in the
//! measured interval; the same channel later reads queue depths (backlog
//! mode, drain detection) and deletes what this run declared.

use crate::cli::{Config, ExchangeType, HEADERS_ROUTING_HEADER};
use lapin::Channel;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};

/// What `setup` declared, hence what `cleanup` deletes.
#[derive(Debug, Default)]
pub struct Declared {
    pub exchange: Option<String>,
    pub queues: Vec<String>,
}

/// Binding arguments for a queue (headers exchanges match on the queue name).
pub fn binding_arguments(cfg: &Config, queue: &str) -> FieldTable {
    let mut t = FieldTable::default();
    if cfg.exchange_type == ExchangeType::Headers {
        t.insert("x-match".into(), AMQPValue::LongString("all".into()));
        t.insert(
            HEADERS_ROUTING_HEADER.into(),
            AMQPValue::LongString(queue.into()),
        );
    }
    t
}

/// Message headers producer traffic carries (headers exchanges only).
pub fn publish_headers(cfg: &Config, queue: &str) -> Option<FieldTable> {
    (cfg.exchange_type == ExchangeType::Headers).then(|| {
        let mut t = FieldTable::default();
        t.insert(
            HEADERS_ROUTING_HEADER.into(),
            AMQPValue::LongString(queue.into()),
        );
        t
    })
}

/// Declares the exchange, queues and bindings. Returns warnings to print
/// (e.g. a queue that already held messages) alongside what was declared.
pub async fn setup(cfg: &Config, ch: &Channel) -> Result<(Declared, Vec<String>), String> {
    let mut declared = Declared::default();
    let mut warnings = Vec::new();
    if cfg.declare_exchange {
        let (kind, arguments) = match cfg.delay {
            Some(_) => {
                let mut t = FieldTable::default();
                t.insert(
                    "x-delayed-type".into(),
                    AMQPValue::LongString(cfg.exchange_type.as_str().into()),
                );
                (lapin::ExchangeKind::Custom("x-delayed-message".into()), t)
            }
            None => (cfg.exchange_type.kind(), FieldTable::default()),
        };
        ch.exchange_declare(
            ShortString::from(cfg.exchange.as_str()),
            kind,
            ExchangeDeclareOptions {
                durable: cfg.persistent && cfg.delay.is_some(),
                ..ExchangeDeclareOptions::default()
            },
            arguments,
        )
        .await
        .map_err(|e| {
            format!(
                "declaring exchange {:?} ({}) failed: {e} (does it exist with another type? pick another --exchange)",
                cfg.exchange,
                cfg.exchange_type.as_str()
            )
        })?;
        declared.exchange = Some(cfg.exchange.clone());
    }
    if !cfg.declare_queues {
        return Ok((declared, warnings));
    }
    for q in cfg.distinct_queues() {
        let opts = QueueDeclareOptions {
            durable: cfg.persistent,
            ..QueueDeclareOptions::default()
        };
        let queue = ch
            .queue_declare(q.as_str().into(), opts, cfg.queue_arguments.clone())
            .await
            .map_err(|e| {
                format!(
                    "declaring queue {q:?} failed: {e} (it may exist with other durability or arguments: delete it or use --predeclared)"
                )
            })?;
        declared.queues.push(q.clone());
        if queue.message_count() > 0 {
            warnings.push(format!(
                "queue {q} already holds {} messages",
                queue.message_count()
            ));
        }
        if !cfg.exchange.is_empty() {
            ch.queue_bind(
                q.as_str().into(),
                cfg.exchange.as_str().into(),
                cfg.binding_key_for(&q).into(),
                QueueBindOptions::default(),
                binding_arguments(cfg, &q),
            )
            .await
            .map_err(|e| format!("binding queue {q:?} to {:?} failed: {e}", cfg.exchange))?;
        }
    }
    Ok((declared, warnings))
}

/// Messages ready in `queues` (passive declares).
pub async fn depth(ch: &Channel, queues: &[String]) -> Result<u64, String> {
    let mut total = 0u64;
    for q in queues {
        let opts = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let queue = ch
            .queue_declare(q.as_str().into(), opts, FieldTable::default())
            .await
            .map_err(|e| format!("reading depth of queue {q:?} failed: {e}"))?;
        total += u64::from(queue.message_count());
    }
    Ok(total)
}

/// Deletes what `setup` declared. Failures are returned as warnings.
pub async fn cleanup(ch: &Channel, declared: &Declared) -> Vec<String> {
    let mut warnings = Vec::new();
    for q in &declared.queues {
        if let Err(e) = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            warnings.push(format!("deleting queue {q:?} failed: {e}"));
        }
    }
    if let Some(x) = &declared.exchange
        && let Err(e) = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
    {
        warnings.push(format!("deleting exchange {x:?} failed: {e}"));
    }
    warnings
}
