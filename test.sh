#!/usr/bin/env bash
# Runs every test of the project. Installs what the tests need (Python and Node client
# packages) by itself, into ${WARREN_CLIENT_CACHE:-$HOME/.cache/warren-clients}.
#
#   ./test.sh            # everything: lint, unit, integration, cross-client, end-to-end
#   ./test.sh --quick    # skip lint (fmt, clippy)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

quick=0
[ "${1:-}" = "--quick" ] && quick=1

step() { printf '\n== %s\n' "$*"; }

if [ $quick -eq 0 ]; then
  step "cargo fmt --check"
  cargo fmt --all --check
  step "cargo clippy (warnings are errors)"
  cargo clippy --workspace --all-targets --quiet -- -D warnings
fi

step "build binaries (end-to-end tests run them as processes)"
cargo build --workspace --bins --quiet

step "cargo test"
# The frame decoder's property test runs a bounded number of cases by default.
PROPTEST_CASES=${PROPTEST_CASES:-512} cargo test --workspace --no-fail-fast 2>&1 | tee /tmp/warren-test-$$.log
status=${PIPESTATUS[0]}
passed=$(grep -Eo 'test result: [a-z]+\. [0-9]+ passed; [0-9]+ failed' /tmp/warren-test-$$.log | awk '{p+=$4; f+=$6} END {print p+0, f+0}')
rm -f /tmp/warren-test-$$.log
read -r p f <<<"$passed"
echo
echo "cargo test: $p passed, $f failed"
exit "$status"
