//! The CRD YAML checked in under `crds/` and `charts/warren/crds/` is what the Rust types
//! generate: a change to a type without regenerating fails here.

use std::path::{Path, PathBuf};
use warren_operator::crd;

fn root() -> PathBuf {
    // From the environment of this run, not compile time: a test binary built in another
    // checkout sharing the build cache would otherwise read that checkout's files.
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from)
        .parent()
        .expect("operator/ sits in the workspace root")
        .to_path_buf()
}

fn check_dir(dir: &Path) {
    let regenerate = format!(
        "regenerate with: cargo run -p warren-operator -- crd --write {}",
        dir.strip_prefix(root()).unwrap_or(dir).display()
    );
    let mut expected: Vec<String> = Vec::new();
    for c in crd::all() {
        let name = crd::file_name(&c);
        let path = dir.join(&name);
        let on_disk = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; {regenerate}", path.display()));
        assert!(
            on_disk == crd::to_yaml(&c),
            "{} differs from the types in operator/src/crd/; {regenerate}",
            path.display()
        );
        expected.push(name);
    }
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    expected.sort();
    assert_eq!(
        found,
        expected,
        "{}: files that no type generates",
        dir.display()
    );
}

#[test]
fn checked_in_crds_match_the_types() {
    check_dir(&root().join("crds"));
}

#[test]
fn the_charts_crds_match_the_types() {
    check_dir(&root().join("charts/warren/crds"));
}
