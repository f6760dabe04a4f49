//! `warren-operator`: reconciles Warren's custom resources into brokers on Kubernetes.
//!
//! `warren-operator crd` prints every CustomResourceDefinition as YAML;
//! `warren-operator crd --write DIR` writes one file per CRD into DIR (how `crds/` and
//! `charts/warren/crds/` are made).
//! `warren-operator run` runs the controllers against the cluster of the in-cluster config or
//! kubeconfig, with `/metrics`, `/healthz` and `/readyz` on `--metrics-listen`. SIGTERM (or
//! Ctrl-C) stops it gracefully: the controllers finish the reconciles under way, a leader
//! releases its Lease so another replica takes over at once, and the process exits 0.

use clap::{Parser, Subcommand};
use k8s_openapi::jiff::Timestamp;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use warren_operator::crd;
use warren_operator::lease::LeaseLock;
use warren_operator::process::{OperatorMetrics, probe_router, run_controllers};
use warren_operator::resources::Defaults;
use warren_operator::scaling::autoscaler::{Autoscaler, DEFAULT_METRICS_URL};

fn positive_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 3600]")),
    }
}

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
        /// Take the Lease `warren-operator` (in `POD_NAMESPACE`, as `POD_NAME`) before
        /// reconciling, so two replicas are safe.
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
        /// Each broker's Prometheus metrics, read by the autoscaler, with `{pod}`, `{instance}`
        /// and `{namespace}`.
        #[arg(
            long,
            env = "WARREN_BROKER_METRICS_URL",
            default_value = DEFAULT_METRICS_URL
        )]
        broker_metrics_url: String,
        /// Seconds between two rounds of the autoscaler for an Instance.
        #[arg(
            long,
            env = "WARREN_AUTOSCALE_INTERVAL",
            default_value_t = 15.0,
            value_parser = positive_seconds
        )]
        autoscale_interval: f64,
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
            broker_metrics_url,
            autoscale_interval,
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
            let autoscaler = Autoscaler::new(
                Duration::from_secs_f64(autoscale_interval),
                &broker_metrics_url,
            );
            runtime.block_on(run(
                leader_elect,
                metrics_listen,
                Defaults { broker_image },
                broker_url,
                autoscaler,
            ))
        }
    }
}

async fn run(
    leader_elect: bool,
    metrics_listen: SocketAddr,
    defaults: Defaults,
    broker_url: Option<String>,
    autoscaler: Autoscaler,
) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-operator: cannot reach the Kubernetes API: {e}");
            return ExitCode::FAILURE;
        }
    };
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
    let stop_tx = Arc::new(stop_tx);
    let mut server_stop = stop_rx.clone();
    let server = tokio::spawn(
        axum::serve(listener, probe_router(metrics.clone(), ready_rx))
            .with_graceful_shutdown(async move {
                let _ = server_stop.wait_for(|s| *s).await;
            })
            .into_future(),
    );
    let on_signal = stop_tx.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::info!("stopping");
        let _ = on_signal.send(true);
    });
    tracing::info!(%metrics_listen, "warren-operator started");
    // Ready means able to serve: leading, or standing by to take over. Were a follower never
    // ready, a rolling update (new pod ready before the old one goes) could never finish.
    let _ = ready_tx.send(true);
    let lost = Arc::new(AtomicBool::new(false));
    let mut leading = None;
    if leader_elect {
        let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into());
        let identity = std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("warren-operator-{}", std::process::id()));
        let lock = LeaseLock::new(
            kube::Api::namespaced(client.clone(), &namespace),
            "warren-operator",
            &identity,
            Duration::from_secs(15),
        );
        let mut stopping = stop_rx.clone();
        loop {
            match lock.try_acquire(Timestamp::now()).await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read or take the Lease"),
            }
            tokio::select! {
                _ = stopping.wait_for(|s| *s) => {
                    let _ = server.await;
                    return ExitCode::SUCCESS;
                }
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
        tracing::info!(%namespace, %identity, "leading: holding Lease warren-operator");
        let (lost_flag, stop, renewing) = (lost.clone(), stop_tx.clone(), lock.clone());
        let renewer = tokio::spawn(async move {
            let mut failures = 0;
            loop {
                tokio::time::sleep(renewing.renew_every()).await;
                match renewing.try_acquire(Timestamp::now()).await {
                    Ok(true) => failures = 0,
                    Ok(false) => failures = 2,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the Lease");
                        failures += 1;
                    }
                }
                // Two missed renewals leave a third of the Lease: stop before anyone may
                // take over, and let Kubernetes restart this replica as a follower.
                if failures >= 2 {
                    tracing::error!("lost the Lease: stopping");
                    lost_flag.store(true, Ordering::SeqCst);
                    let _ = stop.send(true);
                    return;
                }
            }
        });
        leading = Some((lock, renewer));
    }
    // Returns once every controller has stopped, in-flight reconciles finished.
    run_controllers(client, defaults, broker_url, autoscaler, metrics, stop_rx).await;
    if let Some((lock, renewer)) = leading {
        // No renewal may race the release (it would take the Lease back).
        renewer.abort();
        let _ = renewer.await;
        if !lost.load(Ordering::SeqCst) {
            release(&lock).await;
        }
    }
    let _ = server.await;
    if lost.load(Ordering::SeqCst) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Gives the Lease up after a graceful stop, so the next replica leads at once rather than in
/// up to 15 s. Bounded: an API server that does not answer does not hold the shutdown (the
/// Lease then expires as usual).
async fn release(lock: &LeaseLock) {
    match tokio::time::timeout(Duration::from_secs(5), lock.release(Timestamp::now())).await {
        Ok(Ok(true)) => tracing::info!("released Lease warren-operator"),
        Ok(Ok(false)) => tracing::info!("Lease warren-operator is not ours: nothing to release"),
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the Lease: it will expire"),
        Err(_) => tracing::warn!("releasing the Lease timed out: it will expire"),
    }
}
