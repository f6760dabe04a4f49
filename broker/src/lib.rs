//! Warren's broker: a RabbitMQ-compatible AMQP 0-9-1 server.
//!
//! Modules follow the path of a message:
//! - [`amqp`]: the wire. Frames, the connection handshake, channels, content assembly,
//!   publisher confirms and transactions; one writer task per connection batches output.
//! - [`broker`]: routing and queues, with no I/O. Vhosts hold exchanges (data, not tasks),
//!   bindings and queues; queues hand messages to consumers' channels.
//! - [`store`]: everything on disk (today the durable definitions).
//! - [`cluster`]: the nodes of a cluster finding each other, and the links between them.
//! - [`auth`]: users and SASL.
//! - [`config`]: settings from defaults, file, environment and flags.
//! - [`http`]: the management API and Prometheus metrics (axum), and TLS.
//! - [`server`]: listeners and orderly shutdown.
#![deny(unsafe_code)]
#![deny(missing_debug_implementations)]

pub mod alarms;
pub mod amqp;
pub mod auth;
pub mod broker;
pub mod cluster;
pub mod config;
pub mod drain;
pub mod error;
pub mod http;
pub mod server;
pub mod store;

pub use config::Config;
pub use server::{RunningBroker, StartError, start, start_with};
