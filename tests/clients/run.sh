#!/usr/bin/env bash
# Cross-client test suites: stock pika (Python) and amqplib (Node) against a
# RabbitMQ-compatible broker.
#
#   tests/clients/run.sh AMQP_URL
#   e.g. tests/clients/run.sh 'amqp://guest:guest@127.0.0.1:5672/%2f'
#   tests/clients/run.sh --cluster URL1 URL2 URL3
#     the cluster suites (python/cluster, node/test/cluster) against three
#     nodes of one cluster: queues used through nodes other than their home.
#
# Dependencies are installed once into a cache directory
# (${WARREN_CLIENT_CACHE:-$HOME/.cache/warren-clients}) and reused while
# requirements.txt / package-lock.json are unchanged. Needs python3 (with the
# venv module), node >= 20 and npm. Exits non-zero if any test fails.
set -uo pipefail

usage() {
  echo "usage: $0 AMQP_URL   (e.g. amqp://guest:guest@127.0.0.1:5672/%2f)" >&2
  echo "       $0 --cluster URL1 URL2 URL3" >&2
  exit 2
}
cluster=0
if [ "${1:-}" = "--cluster" ]; then
  [ $# -eq 4 ] || usage
  cluster=1
  shift
  AMQP_URLS="$*"
  AMQP_URL=$1
else
  [ $# -eq 1 ] && [ -n "$1" ] || usage
  AMQP_URL=$1
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${WARREN_CLIENT_CACHE:-$HOME/.cache/warren-clients}
mkdir -p "$cache" || { echo "cannot create cache dir $cache" >&2; exit 2; }

for tool in python3 node npm; do
  command -v "$tool" >/dev/null || { echo "run.sh: '$tool' is required but not installed" >&2; exit 2; }
done
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "run.sh: node >= 20 is required (found $(node --version))" >&2
  exit 2
fi

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }

# Serialise dependency setup between concurrent runs sharing one cache.
exec 9>"$cache/.lock"
command -v flock >/dev/null && flock 9

# --- Python venv ----------------------------------------------------------
venv=$cache/venv
py_key="$(python3 -c 'import sys; print(sys.version)' | tr -d '\n')|$(hash_of "$here/python/requirements.txt")"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.warren-key" 2>/dev/null)" != "$py_key" ]; then
  echo "== setting up Python venv in $venv"
  rm -rf "$venv"
  if ! python3 -m venv "$venv"; then
    echo "run.sh: 'python3 -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
    exit 2
  fi
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$here/python/requirements.txt" \
    || { echo "run.sh: pip install failed" >&2; rm -rf "$venv"; exit 2; }
  echo "$py_key" >"$venv/.warren-key"
fi

# --- Node modules ---------------------------------------------------------
nodedir=$cache/node
node_key="node$node_major|$(hash_of "$here/node/package.json" "$here/node/package-lock.json")"
if [ ! -d "$nodedir/node_modules" ] || [ "$(cat "$nodedir/.warren-key" 2>/dev/null)" != "$node_key" ]; then
  echo "== installing node modules in $nodedir"
  rm -rf "$nodedir"
  mkdir -p "$nodedir"
  cp "$here/node/package.json" "$here/node/package-lock.json" "$nodedir/"
  (cd "$nodedir" && npm ci --no-audit --no-fund --loglevel=error) \
    || { echo "run.sh: npm ci failed" >&2; rm -rf "$nodedir"; exit 2; }
  echo "$node_key" >"$nodedir/.warren-key"
fi

exec 9>&-

# --- Run ------------------------------------------------------------------
export AMQP_URL
if [ $cluster -eq 1 ]; then
  export AMQP_URLS
  echo
  echo "== Python (pika) cluster suite"
  (cd "$here/python" && PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m pytest -v -p no:cacheprovider cluster)
  py_rc=$?
  echo
  echo "== Node (amqplib) cluster suite"
  (cd "$here/node" && NODE_PATH="$nodedir/node_modules" node --test --test-reporter=spec test/cluster/*.test.js)
  node_rc=$?
  echo "== cluster client suites: python $py_rc, node $node_rc"
  [ $py_rc -eq 0 ] && [ $node_rc -eq 0 ]
  exit
fi
safe_url=$(printf '%s' "$AMQP_URL" | sed -E 's#(://[^:/@]*:)[^@]*@#\1***@#')

echo
echo "== Python (pika) suite against $safe_url"
(cd "$here/python" && PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m pytest -v -p no:cacheprovider --ignore=cluster)
py_rc=$?

echo
echo "== Node (amqplib) suite against $safe_url"
(cd "$here/node" && NODE_PATH="$nodedir/node_modules" node --test --test-reporter=spec test/*.test.js)
node_rc=$?

echo
status() { [ "$1" -eq 0 ] && echo passed || echo "FAILED (exit $1)"; }
echo "== client suites: python $(status $py_rc), node $(status $node_rc)"
[ $py_rc -eq 0 ] && [ $node_rc -eq 0 ]
