//! `kube-sim`: runs the simulated cluster until interrupted, for trying the operator by hand.
//! It is a test harness, not Kubernetes (see README.md).

use clap::Parser;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(about = "A fake Kubernetes API server and kubelet for Warren's tests (not Kubernetes)")]
struct Cli {
    /// The warren-broker binary every broker pod runs.
    #[arg(long, default_value = "target/debug/warren-broker")]
    broker_binary: PathBuf,
    /// Where pods, logs and volumes go (default: a new temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let dir = match cli.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("kube-sim-{}", std::process::id())),
    };
    let sim = kube_sim::KubeSim::start(kube_sim::Config {
        broker_binary: std::path::absolute(&cli.broker_binary)?,
        dir: dir.clone(),
    })
    .await?;
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(&kubeconfig, sim.kubeconfig())?;
    println!("kube-sim API server: {}", sim.api_url());
    println!("export KUBECONFIG={}", kubeconfig.display());
    println!(
        "export HTTP_PROXY={} NO_PROXY=127.0.0.1,localhost",
        sim.proxy_url()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
