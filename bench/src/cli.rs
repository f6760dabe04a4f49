//! Command-line surface of warren-perf.
//!
//! The flags mirror RabbitMQ PerfTest's long options (and its short ones where
//! they exist) so one scenario can be written the same way for both brokers.
//! Every default and cross-flag rule is resolved here, in pure code that the
//! unit tests cover, so the run code only ever sees one validated [`Config`].

use clap::{Parser, ValueEnum};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde::Serialize;

pub const DEFAULT_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Queue used when neither `--queue` nor `--queue-pattern` is given.
pub const DEFAULT_QUEUE: &str = "warren-perf";
/// Queue pattern used by `--fanout-queues` when no pattern is given.
pub const DEFAULT_FANOUT_PATTERN: &str = "warren-perf-fanout-%d";
/// Header that carries the target queue name when the exchange type is `headers`.
pub const HEADERS_ROUTING_HEADER: &str = "perf-queue";
/// The body starts with an 8-byte send timestamp; nothing smaller can be timed.
pub const MIN_SIZE: usize = 8;
/// With delays, the body also carries the 8-byte delay after the timestamp.
pub const MIN_DELAYED_SIZE: usize = 16;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "warren-perf",
    version,
    about = "PerfTest-style AMQP 0-9-1 load generator (lapin client)",
    long_about = None
)]
pub struct Args {
    /// AMQP URI of the broker.
    #[arg(long, env = "WARREN_PERF_URI", default_value = DEFAULT_URI)]
    pub uri: String,

    /// Number of producers (one connection and channel each).
    #[arg(long, short = 'x', default_value_t = 1)]
    pub producers: usize,

    /// Number of consumers (one connection and channel each).
    /// Default 1, or one per queue with --fanout-queues.
    #[arg(long, short = 'y')]
    pub consumers: Option<usize>,

    /// Single queue to use (default: warren-perf).
    #[arg(long, short = 'u', conflicts_with = "queue_pattern")]
    pub queue: Option<String>,

    /// Queue name pattern; `%d` is replaced by each number of the range.
    #[arg(long)]
    pub queue_pattern: Option<String>,

    /// First number of the --queue-pattern range.
    #[arg(long, default_value_t = 1)]
    pub queue_pattern_from: u32,

    /// Last number (inclusive) of the --queue-pattern range.
    #[arg(long)]
    pub queue_pattern_to: Option<u32>,

    /// Exchange to publish to. Defaults to an exchange named after --type
    /// ("direct", "topic", ...). "" is the default exchange; "amq.*" and ""
    /// are never declared.
    #[arg(long, short = 'e')]
    pub exchange: Option<String>,

    /// Exchange type.
    #[arg(long = "type", short = 't', value_enum, default_value_t = ExchangeType::Direct)]
    pub exchange_type: ExchangeType,

    /// Routing key for publishing and binding. Default: the target queue name.
    #[arg(long, short = 'k')]
    pub routing_key: Option<String>,

    /// Binding key, when it must differ from the routing key (topic patterns).
    #[arg(long)]
    pub binding_key: Option<String>,

    /// Message body size in bytes (the first 8 carry the send timestamp).
    #[arg(long, short = 's', default_value_t = 12)]
    pub size: usize,

    /// Publishing rate limit per producer, msgs/s (0 = unlimited).
    #[arg(long, short = 'r', default_value_t = 0.0)]
    pub rate: f64,

    /// Publisher confirms: max outstanding unconfirmed messages per producer
    /// (0 = no confirms).
    #[arg(long, short = 'c', default_value_t = 0)]
    pub confirm: usize,

    /// Persistent messages (delivery_mode 2) and durable queues.
    #[arg(long)]
    pub persistent: bool,

    /// Publish with the mandatory flag (unroutable messages are returned and counted).
    #[arg(long)]
    pub mandatory: bool,

    /// Consume with auto-ack (no-ack) instead of manual acks.
    #[arg(long, short = 'a')]
    pub autoack: bool,

    /// Manual ack: ack with multiple=true once every N messages.
    #[arg(long, short = 'A', default_value_t = 1)]
    pub multi_ack_every: u32,

    /// Consumer prefetch (basic.qos); 0 = unlimited.
    #[arg(long, short = 'q', default_value_t = 0)]
    pub qos: u16,

    /// Run time in seconds (fractions allowed).
    #[arg(long, short = 'z')]
    pub time: Option<f64>,

    /// Messages to publish per producer, then that producer stops.
    #[arg(long, short = 'C')]
    pub pmessages: Option<u64>,

    /// Messages to consume per consumer, then that consumer stops.
    #[arg(long, short = 'D')]
    pub cmessages: Option<u64>,

    /// Emit the start line, per-second lines and the summary as JSON lines.
    #[arg(long)]
    pub json: bool,

    /// Queue arguments as key=value, comma separated or repeated
    /// (e.g. x-max-length=100000,x-queue-type=classic). Integers and
    /// true/false are typed; anything else is a string.
    #[arg(long, value_delimiter = ',')]
    pub queue_args: Vec<String>,

    /// Fan-out scenario: a fanout exchange bound to N queues
    /// (warren-perf-fanout-1..N unless --queue-pattern), one consumer each.
    #[arg(long)]
    pub fanout_queues: Option<u32>,

    /// Exchange and queues already exist: declare, bind and delete nothing.
    #[arg(long, short = 'p')]
    pub predeclared: bool,

    /// Backlog mode: publish --pmessages per producer with no consumer
    /// subscribed, then start the consumers and drain the queues.
    #[arg(long, alias = "no-consume-until-published")]
    pub drain_after_publish: bool,

    /// Keep the queues and exchange this run declared.
    #[arg(long)]
    pub keep: bool,

    /// Max publishes (and acks) handed to the client but not yet written to
    /// the socket, per producer (consumer). 1 = await each write (slow:
    /// one hand-off to lapin's I/O thread per message).
    #[arg(long, default_value_t = 64)]
    pub publish_window: usize,

    /// Delayed messages: publish through an `x-delayed-message` exchange (routing as
    /// --type) with an `x-delay` header drawn uniformly from --delay-min..=--delay-max
    /// milliseconds. Consumer latency is then measured from each message's due time: the
    /// delivery-time error.
    #[arg(long)]
    pub delay_max: Option<u64>,

    /// Shortest `x-delay`, milliseconds (with --delay-max).
    #[arg(long, default_value_t = 0, requires = "delay_max")]
    pub delay_min: u64,

    /// Label carried in every output line (e.g. S1).
    #[arg(long, default_value = "warren-perf")]
    pub id: String,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Topic => "topic",
            ExchangeType::Headers => "headers",
        }
    }

    pub fn kind(self) -> lapin::ExchangeKind {
        match self {
            ExchangeType::Direct => lapin::ExchangeKind::Direct,
            ExchangeType::Fanout => lapin::ExchangeKind::Fanout,
            ExchangeType::Topic => lapin::ExchangeKind::Topic,
            ExchangeType::Headers => lapin::ExchangeKind::Headers,
        }
    }
}

/// The validated run description.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    #[serde(skip)]
    pub uri: String,
    /// The URI with its password masked, for output.
    pub uri_display: String,
    pub producers: usize,
    pub consumers: usize,
    pub queues: Vec<String>,
    pub exchange: String,
    pub exchange_type: ExchangeType,
    pub declare_exchange: bool,
    pub declare_queues: bool,
    pub routing_key: Option<String>,
    pub binding_key: Option<String>,
    pub size: usize,
    pub rate: f64,
    pub confirm: usize,
    pub persistent: bool,
    pub mandatory: bool,
    pub autoack: bool,
    pub multi_ack_every: u32,
    pub qos: u16,
    pub time: Option<f64>,
    pub pmessages: Option<u64>,
    pub cmessages: Option<u64>,
    #[serde(skip)]
    pub json: bool,
    pub queue_args: Vec<String>,
    #[serde(skip)]
    pub queue_arguments: FieldTable,
    pub drain_after_publish: bool,
    pub keep: bool,
    pub publish_window: usize,
    /// `x-delay` range in milliseconds (delayed-message mode).
    pub delay: Option<(u64, u64)>,
    pub id: String,
}

impl Config {
    pub fn from_args(a: Args) -> Result<Config, String> {
        if a.size < MIN_SIZE {
            return Err(format!(
                "--size must be at least {MIN_SIZE} bytes (the send timestamp)"
            ));
        }
        if !a.rate.is_finite() || a.rate < 0.0 {
            return Err("--rate must be a number >= 0".into());
        }
        if let Some(t) = a.time
            && (!t.is_finite() || t <= 0.0)
        {
            return Err("--time must be > 0 seconds".into());
        }
        if a.multi_ack_every == 0 {
            return Err("--multi-ack-every must be >= 1".into());
        }
        if a.publish_window == 0 {
            return Err("--publish-window must be >= 1".into());
        }
        let delay = a.delay_max.map(|max| (a.delay_min, max));
        if let Some((min, max)) = delay {
            if min > max {
                return Err("--delay-min must not exceed --delay-max".into());
            }
            if a.size < MIN_DELAYED_SIZE {
                return Err(format!(
                    "--size must be at least {MIN_DELAYED_SIZE} bytes with delays (timestamp and delay)"
                ));
            }
        }

        let exchange_type = if a.fanout_queues.is_some() {
            if a.exchange_type != ExchangeType::Direct && a.exchange_type != ExchangeType::Fanout {
                return Err("--fanout-queues implies --type fanout".into());
            }
            ExchangeType::Fanout
        } else {
            a.exchange_type
        };

        let queues = match (&a.queue, &a.queue_pattern, a.fanout_queues) {
            (Some(_), _, Some(_)) => {
                return Err(
                    "--fanout-queues needs several queues: use --queue-pattern, not --queue".into(),
                );
            }
            (Some(q), _, None) => vec![q.clone()],
            (None, Some(p), _) => {
                let to = match (a.queue_pattern_to, a.fanout_queues) {
                    (Some(to), _) => to,
                    (None, Some(n)) => a.queue_pattern_from + n.saturating_sub(1),
                    (None, None) => {
                        return Err("--queue-pattern needs --queue-pattern-to".into());
                    }
                };
                expand_pattern(p, a.queue_pattern_from, to)?
            }
            (None, None, Some(n)) => {
                if n == 0 {
                    return Err("--fanout-queues must be >= 1".into());
                }
                expand_pattern(DEFAULT_FANOUT_PATTERN, 1, n)?
            }
            (None, None, None) => vec![DEFAULT_QUEUE.to_string()],
        };
        if let Some(n) = a.fanout_queues
            && queues.len() != n as usize
        {
            return Err(format!(
                "--fanout-queues {n} but the queue pattern gives {} queues",
                queues.len()
            ));
        }

        let consumers = a.consumers.unwrap_or(match a.fanout_queues {
            Some(_) => queues.len(),
            None => 1,
        });
        if a.producers == 0 && consumers == 0 {
            return Err("nothing to do: --producers and --consumers are both 0".into());
        }

        let exchange = a.exchange.clone().unwrap_or_else(|| match delay {
            Some(_) => format!("delayed-{}", exchange_type.as_str()),
            None => exchange_type.as_str().to_string(),
        });
        if delay.is_some() && (exchange.is_empty() || exchange.starts_with("amq.")) {
            return Err(
                "delays need a delayed exchange of the run's own, not \"\" or amq.*".into(),
            );
        }
        if exchange.is_empty() && exchange_type != ExchangeType::Direct {
            return Err("the default exchange (\"\") is direct; pick another --exchange".into());
        }
        let declare_exchange =
            !a.predeclared && !exchange.is_empty() && !exchange.starts_with("amq.");

        if !a.autoack && a.qos > 0 && a.multi_ack_every > u32::from(a.qos) {
            return Err(format!(
                "--multi-ack-every {} exceeds --qos {}: consumers would stall",
                a.multi_ack_every, a.qos
            ));
        }
        if a.drain_after_publish {
            if a.pmessages.is_none() {
                return Err("--drain-after-publish needs --pmessages".into());
            }
            if a.producers == 0 || consumers == 0 {
                return Err("--drain-after-publish needs producers and consumers".into());
            }
        }

        let mut queue_arguments = FieldTable::default();
        for raw in &a.queue_args {
            let (k, v) = parse_queue_arg(raw)?;
            queue_arguments.insert(ShortString::from(k), v);
        }

        Ok(Config {
            uri_display: redact_uri(&a.uri),
            uri: a.uri,
            producers: a.producers,
            consumers,
            queues,
            exchange,
            exchange_type,
            declare_exchange,
            declare_queues: !a.predeclared,
            routing_key: a.routing_key,
            binding_key: a.binding_key,
            size: a.size,
            rate: a.rate,
            confirm: a.confirm,
            persistent: a.persistent,
            mandatory: a.mandatory,
            autoack: a.autoack,
            multi_ack_every: a.multi_ack_every,
            qos: a.qos,
            time: a.time,
            pmessages: a.pmessages,
            cmessages: a.cmessages,
            json: a.json,
            queue_args: a.queue_args,
            queue_arguments,
            drain_after_publish: a.drain_after_publish,
            keep: a.keep,
            publish_window: a.publish_window,
            delay,
            id: a.id,
        })
    }

    /// Queue that producer `i` targets (round-robin over the queues).
    pub fn producer_queue(&self, i: usize) -> &str {
        &self.queues[i % self.queues.len()]
    }

    /// Queue that consumer `j` consumes from (round-robin over the queues).
    pub fn consumer_queue(&self, j: usize) -> &str {
        &self.queues[j % self.queues.len()]
    }

    /// Routing key producer `i` publishes with.
    pub fn producer_routing_key(&self, i: usize) -> String {
        self.routing_key
            .clone()
            .unwrap_or_else(|| self.producer_queue(i).to_string())
    }

    /// Key a queue is bound with.
    pub fn binding_key_for(&self, queue: &str) -> String {
        match self.exchange_type {
            ExchangeType::Fanout | ExchangeType::Headers => String::new(),
            ExchangeType::Direct | ExchangeType::Topic => self
                .binding_key
                .clone()
                .or_else(|| self.routing_key.clone())
                .unwrap_or_else(|| queue.to_string()),
        }
    }

    /// Distinct queues, in order.
    pub fn distinct_queues(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for q in &self.queues {
            if !out.contains(q) {
                out.push(q.clone());
            }
        }
        out
    }

    /// Distinct queues that have at least one consumer.
    pub fn consumed_queues(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for j in 0..self.consumers {
            let q = self.consumer_queue(j);
            if !out.iter().any(|x| x == q) {
                out.push(q.to_string());
            }
        }
        out
    }
}

/// `perf-%d` with 1..=3 gives perf-1, perf-2, perf-3.
pub fn expand_pattern(pattern: &str, from: u32, to: u32) -> Result<Vec<String>, String> {
    if !pattern.contains("%d") {
        return Err(format!("queue pattern {pattern:?} has no %d"));
    }
    if from > to {
        return Err(format!("empty queue pattern range {from}..{to}"));
    }
    Ok((from..=to)
        .map(|n| pattern.replace("%d", &n.to_string()))
        .collect())
}

/// `x-max-length=1000` gives ("x-max-length", LongLongInt(1000)).
pub fn parse_queue_arg(raw: &str) -> Result<(String, AMQPValue), String> {
    let (k, v) = raw
        .split_once('=')
        .ok_or_else(|| format!("queue argument {raw:?} is not key=value"))?;
    let k = k.trim();
    let v = v.trim();
    if k.is_empty() {
        return Err(format!("queue argument {raw:?} has an empty key"));
    }
    let value = if let Ok(n) = v.parse::<i64>() {
        AMQPValue::LongLongInt(n)
    } else if v == "true" || v == "false" {
        AMQPValue::Boolean(v == "true")
    } else {
        AMQPValue::LongString(v.into())
    };
    Ok((k.to_string(), value))
}

/// Masks the password of an AMQP URI: amqp://user:secret@h/ -> amqp://user:***@h/.
pub fn redact_uri(uri: &str) -> String {
    let Some(scheme_end) = uri.find("://") else {
        return uri.to_string();
    };
    let rest = &uri[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return uri.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &uri[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut full = vec!["warren-perf"];
        full.extend_from_slice(args);
        let a = Args::try_parse_from(full).map_err(|e| e.to_string())?;
        Config::from_args(a)
    }

    #[test]
    fn defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.uri, DEFAULT_URI);
        assert_eq!(c.producers, 1);
        assert_eq!(c.consumers, 1);
        assert_eq!(c.queues, vec![DEFAULT_QUEUE]);
        assert_eq!(c.exchange, "direct");
        assert!(c.declare_exchange);
        assert_eq!(c.size, 12);
        assert_eq!(c.confirm, 0);
        assert_eq!(c.producer_routing_key(0), DEFAULT_QUEUE);
        assert_eq!(c.binding_key_for(DEFAULT_QUEUE), DEFAULT_QUEUE);
    }

    #[test]
    fn short_flags_like_perftest() {
        let c = parse(&[
            "-x", "2", "-y", "3", "-u", "q", "-s", "1024", "-r", "100", "-c", "50", "-a", "-q",
            "10", "-z", "5", "-C", "7", "-D", "9",
        ])
        .unwrap();
        assert_eq!((c.producers, c.consumers), (2, 3));
        assert_eq!(c.queues, vec!["q"]);
        assert_eq!(c.size, 1024);
        assert_eq!(c.rate, 100.0);
        assert_eq!(c.confirm, 50);
        assert!(c.autoack);
        assert_eq!(c.qos, 10);
        assert_eq!(c.time, Some(5.0));
        assert_eq!(c.pmessages, Some(7));
        assert_eq!(c.cmessages, Some(9));
    }

    #[test]
    fn queue_pattern_round_robin() {
        let c = parse(&[
            "--producers",
            "10",
            "--consumers",
            "10",
            "--queue-pattern",
            "perf-%d",
            "--queue-pattern-from",
            "1",
            "--queue-pattern-to",
            "10",
            "--type",
            "topic",
        ])
        .unwrap();
        assert_eq!(c.queues.len(), 10);
        assert_eq!(c.queues[0], "perf-1");
        assert_eq!(c.queues[9], "perf-10");
        assert_eq!(c.producer_queue(3), "perf-4");
        assert_eq!(c.consumer_queue(12), "perf-3");
        assert_eq!(c.exchange, "topic");
        assert_eq!(c.binding_key_for("perf-4"), "perf-4");
        assert_eq!(c.consumed_queues().len(), 10);
    }

    #[test]
    fn pattern_needs_range_end() {
        assert!(parse(&["--queue-pattern", "p-%d"]).is_err());
        assert!(parse(&["--queue-pattern", "p", "--queue-pattern-to", "3"]).is_err());
        assert!(
            parse(&[
                "--queue-pattern",
                "p-%d",
                "--queue-pattern-from",
                "5",
                "--queue-pattern-to",
                "3"
            ])
            .is_err()
        );
        assert!(parse(&["--queue", "a", "--queue-pattern", "p-%d"]).is_err());
    }

    #[test]
    fn fanout_queues_builds_the_scenario() {
        let c = parse(&["--fanout-queues", "20"]).unwrap();
        assert_eq!(c.exchange_type, ExchangeType::Fanout);
        assert_eq!(c.exchange, "fanout");
        assert_eq!(c.queues.len(), 20);
        assert_eq!(c.queues[19], "warren-perf-fanout-20");
        assert_eq!(c.consumers, 20);
        assert_eq!(c.producers, 1);
        assert_eq!(c.binding_key_for("x"), "");

        let c = parse(&["--fanout-queues", "3", "--queue-pattern", "f-%d", "-y", "1"]).unwrap();
        assert_eq!(c.queues, vec!["f-1", "f-2", "f-3"]);
        assert_eq!(c.consumers, 1);
        assert_eq!(c.consumed_queues(), vec!["f-1"]);

        assert!(parse(&["--fanout-queues", "3", "--queue", "q"]).is_err());
        assert!(parse(&["--fanout-queues", "3", "--type", "topic"]).is_err());
    }

    #[test]
    fn predeclared_and_amq_exchanges_are_not_declared() {
        assert!(!parse(&["-e", "amq.direct"]).unwrap().declare_exchange);
        assert!(!parse(&["-e", ""]).unwrap().declare_exchange);
        let c = parse(&["--predeclared"]).unwrap();
        assert!(!c.declare_exchange);
        assert!(!c.declare_queues);
        assert!(parse(&["-e", "", "-t", "topic"]).is_err());
    }

    #[test]
    fn routing_and_binding_keys() {
        let c = parse(&["-t", "topic", "-k", "a.b", "--binding-key", "a.#"]).unwrap();
        assert_eq!(c.producer_routing_key(0), "a.b");
        assert_eq!(c.binding_key_for("q"), "a.#");
        let c = parse(&["-k", "rk"]).unwrap();
        assert_eq!(c.binding_key_for("q"), "rk");
        let c = parse(&["-t", "headers"]).unwrap();
        assert_eq!(c.binding_key_for("q"), "");
    }

    #[test]
    fn validation() {
        assert!(parse(&["--size", "7"]).is_err());
        assert!(parse(&["--size", "8"]).is_ok());
        assert!(parse(&["--rate", "-1"]).is_err());
        assert!(parse(&["--time", "0"]).is_err());
        assert!(parse(&["--multi-ack-every", "0"]).is_err());
        assert!(parse(&["--qos", "10", "--multi-ack-every", "20"]).is_err());
        assert!(parse(&["--qos", "10", "--multi-ack-every", "20", "--autoack"]).is_ok());
        assert!(parse(&["-x", "0", "-y", "0"]).is_err());
        assert!(parse(&["--drain-after-publish"]).is_err());
        assert!(parse(&["--drain-after-publish", "-C", "10"]).is_ok());
        assert!(parse(&["--no-consume-until-published", "-C", "10"]).is_ok());
        assert!(parse(&["--type", "nope"]).is_err());
    }

    #[test]
    fn queue_args() {
        assert_eq!(
            parse_queue_arg("x-max-length=1000").unwrap(),
            ("x-max-length".to_string(), AMQPValue::LongLongInt(1000))
        );
        assert_eq!(
            parse_queue_arg("x-single-active-consumer=true").unwrap(),
            (
                "x-single-active-consumer".to_string(),
                AMQPValue::Boolean(true)
            )
        );
        assert_eq!(
            parse_queue_arg("x-queue-type = quorum").unwrap(),
            (
                "x-queue-type".to_string(),
                AMQPValue::LongString("quorum".into())
            )
        );
        assert!(parse_queue_arg("novalue").is_err());
        assert!(parse_queue_arg("=1").is_err());
        let c = parse(&["--queue-args", "x-max-length=5,x-overflow=reject-publish"]).unwrap();
        assert_eq!(c.queue_arguments.inner().len(), 2);
    }

    #[test]
    fn uri_redaction() {
        assert_eq!(
            redact_uri("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            redact_uri("amqp://127.0.0.1:5672/%2f"),
            "amqp://127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_uri("amqp://u@h/v"), "amqp://u@h/v");
        assert_eq!(redact_uri("garbage"), "garbage");
    }

    #[test]
    fn delays_need_room_for_the_delay_and_a_delayed_exchange() {
        let c = parse(&["--delay-max", "1000", "--delay-min", "10", "--size", "16"]).unwrap();
        assert_eq!(c.delay, Some((10, 1000)));
        assert_eq!(c.exchange, "delayed-direct");
        assert!(
            parse(&["--delay-max", "1000"])
                .unwrap_err()
                .contains("16 bytes")
        );
        assert!(
            parse(&["--delay-max", "5", "--delay-min", "6", "--size", "16"])
                .unwrap_err()
                .contains("--delay-min")
        );
        assert!(
            parse(&[
                "--delay-max",
                "5",
                "--size",
                "16",
                "--exchange",
                "amq.direct"
            ])
            .unwrap_err()
            .contains("delayed exchange")
        );
        assert!(
            parse(&["--delay-min", "5"]).is_err(),
            "--delay-min needs --delay-max"
        );
        assert_eq!(parse(&[]).unwrap().delay, None);
    }
}
