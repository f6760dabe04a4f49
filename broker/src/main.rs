//! `warren-broker`: runs the broker until SIGINT or SIGTERM, then shuts down in order.

use clap::Parser;
use tracing_subscriber::EnvFilter;
use warren_broker::config::{Command, Config, Flags};

// jemalloc, for its statistics: the memory alarm reads the memory in use from it, where resident
// memory would keep counting what was freed and not given back.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes in pages holding live allocations, as jemalloc last counted them (its statistics
/// are refreshed by advancing its epoch): what the heap really takes, fragmentation included,
/// and still less once the data is freed, unlike resident memory.
fn active() -> Option<u64> {
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    tikv_jemalloc_ctl::stats::active::read()
        .ok()
        .map(|bytes| bytes as u64)
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    warren_broker::alarms::set_memory_probe(active);
    let flags = Flags::parse();
    let command = flags.command;
    let config = match Config::load(flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-broker: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if command == Some(Command::Drain) {
        return match warren_broker::drain::run(&config).await {
            Ok(drained) => {
                println!("warren-broker drain: {drained}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("warren-broker drain: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let filter = EnvFilter::try_from_default_env()
        // Raft's own progress is told at debug: at info it would fill the log.
        .unwrap_or_else(|_| EnvFilter::new("info,openraft=warn"));
    if config.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        // Logs go to stdout; colour codes only help a person watching a terminal, and would
        // litter a file, a pipe or a log collector with escape sequences.
        use std::io::IsTerminal;
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stdout().is_terminal())
            .init();
    }
    // Handlers first: a SIGTERM that arrives while the broker starts still stops it in order.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
    tracing::info!(version = env!("CARGO_PKG_VERSION"), data_dir = %config.data_dir.display(), "starting warren-broker");
    let running = match warren_broker::start(config).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return std::process::ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = interrupt.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    running.shutdown().await;
    std::process::ExitCode::SUCCESS
}
