//! `warren-operator`: reconciles Warren's custom resources into brokers on Kubernetes.
//!
//! `warren-operator crd` prints every CustomResourceDefinition as YAML;
//! `warren-operator crd --write DIR` writes one file per CRD into DIR (how `crds/` and
//! `charts/warren/crds/` are made).
//! `warren-operator run` runs the controllers against the cluster of the in-cluster config or
//! kubeconfig, with `/metrics`, `/healthz` and `/readyz` on `--metrics-listen`.

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tokio::sync::watch;
use warren_operator::crd;
use warren_operator::process::{OperatorMetrics, probe_router, run_controllers};
use warren_operator::resources::Defaults;

#[derive(Debug, Parser)]
#[command(version, about = "Warren's Kubernetes operator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (or write one file each into a directory).
    Crd {
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
    /// Run the controllers against the cluster.
    Run {
        /// Take a Lease before reconciling, so two replicas are safe (not built yet: with it
        /// the operator says so and runs as the only replica).
        #[arg(long)]
        leader_elect: bool,
        /// Where `/metrics`, `/healthz` and `/readyz` are served.
        #[arg(
            long,
            env = "WARREN_OPERATOR_METRICS_LISTEN",
            default_value = "0.0.0.0:8080"
        )]
        metrics_listen: SocketAddr,
        /// The broker image of Instances that name none.
        #[arg(
            long,
            env = "WARREN_BROKER_IMAGE",
            default_value = "ghcr.io/warren-mq/warren-broker:0.1.0"
        )]
        broker_image: String,
        /// An Instance's management API, with `{instance}` and `{namespace}` (default: its
        /// client Service, `http://{instance}.{namespace}.svc:15672`).
        #[arg(long, env = "WARREN_BROKER_URL")]
        broker_url: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { write: None } => {
            for c in crd::all() {
                print!("---\n{}", crd::to_yaml(&c));
            }
            ExitCode::SUCCESS
        }
        Command::Crd { write: Some(dir) } => {
            if let Err(e) = std::fs::create_dir_all(&dir) {
                eprintln!("warren-operator: cannot create {}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
            for c in crd::all() {
                let path = dir.join(crd::file_name(&c));
                if let Err(e) = std::fs::write(&path, crd::to_yaml(&c)) {
                    eprintln!("warren-operator: cannot write {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("{}", path.display());
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            leader_elect,
            metrics_listen,
            broker_image,
            broker_url,
        } => {
            tracing_subscriber::fmt()
                .json()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("warren-operator: cannot start: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(run(
                leader_elect,
                metrics_listen,
                Defaults { broker_image },
                broker_url,
            ))
        }
    }
}

async fn run(
    leader_elect: bool,
    metrics_listen: SocketAddr,
    defaults: Defaults,
    broker_url: Option<String>,
) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-operator: cannot reach the Kubernetes API: {e}");
            return ExitCode::FAILURE;
        }
    };
    if leader_elect {
        tracing::warn!("leader election is not built yet: run a single operator replica");
    }
    let listener = match tokio::net::TcpListener::bind(metrics_listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("warren-operator: cannot listen on {metrics_listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let metrics = Arc::new(OperatorMetrics::default());
    let (ready_tx, ready_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(
        axum::serve(listener, probe_router(metrics.clone(), ready_rx))
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|s| *s).await;
            })
            .into_future(),
    );
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping");
        let _ = stop_tx.send(true);
    });
    tracing::info!(%metrics_listen, "warren-operator started");
    let _ = ready_tx.send(true);
    run_controllers(client, defaults, broker_url, metrics, stop_rx).await;
    let _ = server.await;
    ExitCode::SUCCESS
}
