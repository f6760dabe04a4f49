#!/usr/bin/env bash
# A Prometheus scrape with 10,000 queues, Warren and RabbitMQ 3.10 side by side.
#
#   bench/scrape.sh [--queues N] [--scrapes K] [--rabbit-port P] [--warren-port P] [--no-build]
#
# Starts a private RabbitMQ node (warren-scrape@localhost, 127.0.0.1 only, own HOME, cookie
# and state under a temp dir, with the rabbitmq_management and rabbitmq_prometheus plugins;
# AMQP on --rabbit-port (default 5690), management on +10000, Prometheus on +10020, Erlang
# distribution on +20000) and a release warren-broker (AMQP on --warren-port, default 5691,
# management on +10000, Prometheus on +10020, fresh data dir). bench/scrape.py then declares
# the queues in each broker through its management API and times /metrics and
# /metrics/per-object. Prints one JSON line per broker. Both brokers are stopped at the end,
# also on failure or Ctrl-C. Loopback only. CARGO_TARGET_DIR defaults to /tmp/target-bench.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/target-bench}
WARREN=$CARGO_TARGET_DIR/release/warren-broker
RMQ_BIN=/usr/lib/rabbitmq/bin
RMQ_NODE=warren-scrape@localhost
QUEUES=10000
SCRAPES=10
RPORT=5690
WPORT=5691
BUILD=1

die() { echo "scrape.sh: $*" >&2; exit 2; }
log() { echo "[scrape $(date +%H:%M:%S)] $*" >&2; }
while [ $# -gt 0 ]; do
  case $1 in
    --queues) QUEUES=${2:?}; shift 2 ;;
    --scrapes) SCRAPES=${2:?}; shift 2 ;;
    --rabbit-port) RPORT=${2:?}; shift 2 ;;
    --warren-port) WPORT=${2:?}; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h | --help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
done
for p in "$RPORT" "$WPORT"; do
  [[ $p =~ ^[0-9]+$ ]] && [ "$p" -ge 1024 ] && [ "$p" -le 45535 ] || die "ports must be 1024..45535"
done
[ "$RPORT" != "$WPORT" ] || die "the two brokers need different ports"

WORK=$(mktemp -d /tmp/warren-scrape.XXXXXX)
RMQ_BASE=$WORK/rabbitmq
WARREN_PID=
RMQ_STARTED=0
rmq_env() {
  export HOME=$RMQ_BASE/home RABBITMQ_NODENAME=$RMQ_NODE RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT=$RPORT RABBITMQ_DIST_PORT=$((RPORT + 20000)) \
    RABBITMQ_MNESIA_BASE=$RMQ_BASE/mnesia RABBITMQ_LOG_BASE=$RMQ_BASE/log \
    RABBITMQ_CONFIG_FILE=$RMQ_BASE/rabbitmq.conf RABBITMQ_ENABLED_PLUGINS_FILE=$RMQ_BASE/enabled_plugins \
    RABBITMQ_CONF_ENV_FILE=$RMQ_BASE/rabbitmq-env.conf RABBITMQ_PID_FILE=$RMQ_BASE/rabbitmq.pid \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}
rmqctl() { (rmq_env && "$RMQ_BIN/rabbitmqctl" -n "$RMQ_NODE" "$@"); }
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$WARREN_PID" ]; then
    kill -TERM "$WARREN_PID" 2>/dev/null || true
    wait "$WARREN_PID" 2>/dev/null || true
  fi
  if [ "$RMQ_STARTED" = 1 ]; then
    local pid
    pid=$(cat "$RMQ_BASE/rabbitmq.pid" 2>/dev/null || true)
    rmqctl stop "$RMQ_BASE/rabbitmq.pid" >/dev/null 2>&1 || true
    if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  fi
  if [ "$rc" = 0 ]; then rm -rf "$WORK"; else log "logs kept in $WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [ "$BUILD" = 1 ]; then
  log "building warren-broker (release)"
  (cd "$REPO" && cargo build --release -q -p warren-broker)
fi
[ -x "$WARREN" ] || die "$WARREN not found"
if [ ! -x "$RMQ_BIN/rabbitmq-server" ]; then
  log "installing rabbitmq-server from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >/dev/null
fi

mkdir -p "$RMQ_BASE/home" "$RMQ_BASE/mnesia" "$RMQ_BASE/log"
chmod 700 "$RMQ_BASE/home"
head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RMQ_BASE/home/.erlang.cookie"
chmod 400 "$RMQ_BASE/home/.erlang.cookie"
: >"$RMQ_BASE/rabbitmq-env.conf"
echo '[rabbitmq_management,rabbitmq_prometheus].' >"$RMQ_BASE/enabled_plugins"
printf 'listeners.tcp.1 = 127.0.0.1:%s\nmanagement.tcp.ip = 127.0.0.1\nmanagement.tcp.port = %s\nprometheus.tcp.ip = 127.0.0.1\nprometheus.tcp.port = %s\n' \
  "$RPORT" $((RPORT + 10000)) $((RPORT + 10020)) >"$RMQ_BASE/rabbitmq.conf"
log "starting RabbitMQ node $RMQ_NODE on 127.0.0.1:$RPORT"
RMQ_STARTED=1
(rmq_env && "$RMQ_BIN/rabbitmq-server" -detached)
rmqctl wait "$RMQ_BASE/rabbitmq.pid" --timeout 120 >/dev/null

log "starting warren-broker on 127.0.0.1:$WPORT"
"$WARREN" --amqp-listen "127.0.0.1:$WPORT" --management-listen "127.0.0.1:$((WPORT + 10000))" \
  --prometheus-listen "127.0.0.1:$((WPORT + 10020))" --cluster-listen 127.0.0.1:0 --data-dir "$WORK/warren-data" >"$WORK/warren.log" 2>&1 &
WARREN_PID=$!
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$((WPORT + 10000))") 2>/dev/null && break
  sleep 0.1
done

for b in rabbitmq:$RPORT warren:$WPORT; do
  name=${b%%:*} port=${b##*:}
  log "$name: $QUEUES queues, $SCRAPES scrapes of each endpoint"
  python3 "$HERE/scrape.py" --api "http://127.0.0.1:$((port + 10000))" \
    --metrics "http://127.0.0.1:$((port + 10020))" --queues "$QUEUES" --scrapes "$SCRAPES" --label "$name"
done
