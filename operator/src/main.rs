//! `warren-operator`: reconciles Warren's custom resources into brokers on Kubernetes.
//!
//! Not built yet: this skeleton reserves the package and binary name. The operator is the
//! subject of its own issue (CRDs, reconcilers, autoscaler, Helm chart).

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--version") => {
            println!("warren-operator {}", env!("CARGO_PKG_VERSION"));
            std::process::ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "warren-operator {}: not implemented yet",
                env!("CARGO_PKG_VERSION")
            );
            std::process::ExitCode::from(2)
        }
    }
}
