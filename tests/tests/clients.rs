//! Stock clients other than lapin, unchanged, against a real broker process: the pika (Python)
//! and amqplib (Node) suites in tests/clients/.

use std::process::Command;
use warren_e2e::{BrokerProcess, workspace_root};

#[test]
fn pika_and_amqplib_suites_pass_against_warren() {
    let broker = BrokerProcess::start();
    let script = workspace_root().join("tests/clients/run.sh");
    let status = Command::new("bash")
        .arg(&script)
        .arg(broker.uri())
        .status()
        .expect("run tests/clients/run.sh");
    assert!(status.success(), "client suites failed: {status}");
}
