//! `warren-operator`: reconciles Warren's custom resources into brokers on Kubernetes.
//!
//! `warren-operator crd` prints every CustomResourceDefinition as YAML;
//! `warren-operator crd --write DIR` writes one file per CRD into DIR (how `crds/` and
//! `charts/warren/crds/` are made).

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use warren_operator::crd;

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
        /// Take a Lease before reconciling, so two replicas are safe.
        #[arg(long)]
        leader_elect: bool,
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
        Command::Run { leader_elect: _ } => {
            eprintln!(
                "warren-operator {}: the controllers are not built yet (see issue 6)",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::from(2)
        }
    }
}
