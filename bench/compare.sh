#!/usr/bin/env bash
# Warren and RabbitMQ 3.10 side by side: scenarios S1-S6 of bench/README.md with warren-perf.
#
#   bench/compare.sh [--scenarios S1,S4] [--time SECONDS] [--rounds N] [--s6-messages N]
#                    [--out FILE] [--rabbit-port P] [--warren-port P] [--no-build] [--keep-tmp]
#
# It installs Debian's rabbitmq-server if missing and starts a private RabbitMQ node
# (warren-bench@localhost, 127.0.0.1 only, own HOME, cookie and state under a temp dir, no
# plugins; AMQP on --rabbit-port, default 5680, Erlang distribution on that port + 20000). It
# builds and starts warren-broker (--warren-port, default 5681, fresh data dir). Then, for each
# scenario, it runs warren-perf --json against RabbitMQ and Warren in turn, --rounds times
# (A B A B ...), checks between runs that nothing the run declared was left behind (deleting
# it if it was), and writes a markdown report: per scenario, the median of the key figures for
# each broker and the ratio Warren/RabbitMQ, every run, and the exact command lines. Both
# brokers are stopped at the end, also on failure or Ctrl-C. Loopback only.
#
# Options:
#   --scenarios LIST   comma-separated subset of S1..S6 and P10 (default: S1..S6). P10 is S2
#                      with 10 publishers on the one queue. For S2 and P10 the brokers'
#                      fsync/fdatasync calls are counted with `perf stat` when it is available.
#   --time SECONDS     length of each S1-S5 run (default 20)
#   --rounds N         runs per scenario and broker (default 3)
#   --s6-messages N    messages published in S6 (default 1000000)
#   --out FILE         write the markdown report there (default: stdout)
#   --rabbit-port P    RabbitMQ's AMQP port (default 5680)
#   --warren-port P    Warren's AMQP port (default 5681)
#   --pause SECONDS    pause between runs (default 2)
#   --no-build         use the binaries already in $CARGO_TARGET_DIR/release
#   --keep-tmp         keep the temp dir (logs, raw JSON of every run)
#
# Environment: CARGO_TARGET_DIR (default /tmp/target-bench).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/target-bench}
PERF=$CARGO_TARGET_DIR/release/warren-perf
WARREN=$CARGO_TARGET_DIR/release/warren-broker
RMQ_BIN=/usr/lib/rabbitmq/bin
RMQ_NODE=warren-bench@localhost

SCENARIOS=S1,S2,S3,S4,S5,S6
TIME=20
ROUNDS=3
S6_MESSAGES=1000000
OUT=-
RPORT=5680
WPORT=5681
PAUSE=2
BUILD=1
KEEP_TMP=0

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "compare.sh: $*" >&2; exit 2; }
log() { echo "[compare $(date +%H:%M:%S)] $*" >&2; }
in_range() { [[ $1 =~ ^[0-9]{1,10}$ ]] && [ "$1" -ge "$2" ] && [ "$1" -le "$3" ]; }

while [ $# -gt 0 ]; do
  case $1 in
    --scenarios) SCENARIOS=${2:?}; shift 2 ;;
    --time) TIME=${2:?}; shift 2 ;;
    --rounds) ROUNDS=${2:?}; shift 2 ;;
    --s6-messages) S6_MESSAGES=${2:?}; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    --rabbit-port) RPORT=${2:?}; shift 2 ;;
    --warren-port) WPORT=${2:?}; shift 2 ;;
    --pause) PAUSE=${2:?}; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep-tmp) KEEP_TMP=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

[[ $TIME =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--time must be a number of seconds"
in_range "$ROUNDS" 1 1000 || die "--rounds must be 1..1000"
in_range "$S6_MESSAGES" 1 1000000000 || die "--s6-messages must be >= 1"
in_range "$RPORT" 1 45535 || die "--rabbit-port must be 1..45535 (the distribution port is +20000)"
in_range "$WPORT" 1 65535 || die "--warren-port must be 1..65535"
[[ $PAUSE =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--pause must be a number of seconds"
[ "$RPORT" != "$WPORT" ] || die "the two brokers need different ports"
IFS=, read -r -a SCEN <<<"$SCENARIOS"
[ ${#SCEN[@]} -ge 1 ] || die "--scenarios is empty"
for s in "${SCEN[@]}"; do
  case $s in S1 | S2 | S3 | S4 | S5 | S6 | P10) ;; *) die "unknown scenario $s (S1..S6, P10)" ;; esac
done
RDIST=$((RPORT + 20000))
command -v python3 >/dev/null || die "python3 is needed (bench/compare.py)"

# ---------------------------------------------------------------------------------------------
# Scenarios: the command lines of bench/README.md, with --json. $URI is the broker under test.

scenario_args() {
  case $1 in
    S1) echo "--id S1 --queue perf-s1 --producers 1 --consumers 1 --size 16 --autoack --time $TIME" ;;
    S2) echo "--id S2 --queue perf-s2 --producers 1 --consumers 1 --size 1024 --persistent --confirm 256 --qos 200 --time $TIME" ;;
    S3) echo "--id S3 --queue perf-s3 --producers 1 --consumers 1 --size 1024 --rate 10000 --autoack --time $TIME" ;;
    S4) echo "--id S4 --producers 10 --consumers 10 --queue-pattern perf-s4-%d --queue-pattern-from 1 --queue-pattern-to 10 --type topic --exchange perf-topic --size 256 --qos 200 --multi-ack-every 20 --time $TIME" ;;
    S5) echo "--id S5 --fanout-queues 20 --producers 1 --size 1024 --qos 200 --multi-ack-every 20 --time $TIME" ;;
    S6) echo "--id S6 --queue perf-s6 --producers 1 --consumers 1 --size 16 --pmessages $S6_MESSAGES --drain-after-publish --qos 500 --multi-ack-every 100" ;;
    P10) echo "--id P10 --queue perf-p10 --producers 10 --consumers 1 --size 1024 --persistent --confirm 256 --qos 200 --time $TIME" ;;
  esac
}

# Counts the broker's fsync/fdatasync calls during a run, where perf can (S2, P10).
PERF_STAT=0
if command -v perf >/dev/null 2>&1 &&
  perf stat -e syscalls:sys_enter_fdatasync -a -x, true >/dev/null 2>&1; then
  PERF_STAT=1
fi
count_syncs() { # scenario broker-pid output -> the pid of the counter, or nothing
  case $1 in S2 | P10) ;; *) return 0 ;; esac
  [ "$PERF_STAT" = 1 ] && [ -n "$2" ] || return 0
  perf stat -x, -o "$3" -e syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync -p "$2" \
    >/dev/null 2>&1 &
  echo $!
}

# What a scenario declares (warren-perf deletes it at the end; we check that it did).
scenario_leftover_args() {
  local i
  case $1 in
    S1 | S2 | S3 | S6 | P10) echo "--queue perf-$(echo "$1" | tr SP sp) --exchange direct" ;;
    S4) for i in $(seq 1 10); do printf -- '--queue perf-s4-%d ' "$i"; done; echo "--exchange perf-topic" ;;
    S5) for i in $(seq 1 20); do printf -- '--queue warren-perf-fanout-%d ' "$i"; done; echo "--exchange fanout" ;;
  esac
}

# Longest a run may take before it is interrupted (S6 has no --time).
run_limit() {
  case $1 in
    S6) echo $((600 + S6_MESSAGES / 1000)) ;;
    *) awk -v t="$TIME" 'BEGIN { printf "%d", t + 120 }' ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Clean-up: on any exit, stop what we started (by pid / node name only).

WORK=$(mktemp -d /tmp/warren-compare.XXXXXX)
RMQ_BASE=$WORK/rabbitmq
WARREN_PID=
PERF_PID=
RMQ_STARTED=0
EPMD_WAS_UP=0
FAILED=0

rmq_env() {
  export HOME=$RMQ_BASE/home RABBITMQ_NODENAME=$RMQ_NODE RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT=$RPORT RABBITMQ_DIST_PORT=$RDIST \
    RABBITMQ_MNESIA_BASE=$RMQ_BASE/mnesia RABBITMQ_LOG_BASE=$RMQ_BASE/log \
    RABBITMQ_CONFIG_FILE=$RMQ_BASE/rabbitmq.conf RABBITMQ_ENABLED_PLUGINS_FILE=$RMQ_BASE/enabled_plugins \
    RABBITMQ_CONF_ENV_FILE=$RMQ_BASE/rabbitmq-env.conf RABBITMQ_PID_FILE=$RMQ_BASE/rabbitmq.pid \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}
# rabbitmqctl against our node, in a subshell: HOME and RABBITMQ_* never leak into cargo.
rmqctl() { (rmq_env && "$RMQ_BIN/rabbitmqctl" -n "$RMQ_NODE" "$@"); }

stop_perf() {
  if [ -n "$PERF_PID" ] && kill -0 "$PERF_PID" 2>/dev/null; then
    kill -INT "$PERF_PID" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$PERF_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$PERF_PID" 2>/dev/null || true
  fi
  PERF_PID=
}

stop_warren() {
  if [ -n "$WARREN_PID" ] && kill -0 "$WARREN_PID" 2>/dev/null; then
    log "stopping warren-broker (pid $WARREN_PID)"
    kill -TERM "$WARREN_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$WARREN_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$WARREN_PID" 2>/dev/null || true
    wait "$WARREN_PID" 2>/dev/null || true
  fi
  WARREN_PID=
}

stop_rabbit() {
  [ "$RMQ_STARTED" = 1 ] || return 0
  RMQ_STARTED=0
  log "stopping RabbitMQ node $RMQ_NODE"
  local pid=
  [ -f "$RMQ_BASE/rabbitmq.pid" ] && pid=$(cat "$RMQ_BASE/rabbitmq.pid" 2>/dev/null || true)
  (rmq_env && timeout 60 "$RMQ_BIN/rabbitmqctl" -n "$RMQ_NODE" stop "$RMQ_BASE/rabbitmq.pid") >/dev/null 2>&1 || true
  if [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    sleep 2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  # epmd is shared: stop it only if we started it and no node is registered any more.
  if [ "$EPMD_WAS_UP" = 0 ] && ! epmd -names 2>/dev/null | grep -q '^name '; then
    epmd -kill >/dev/null 2>&1 || true
  fi
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_perf
  stop_warren
  stop_rabbit
  if [ "$KEEP_TMP" = 1 ] || { [ "$rc" != 0 ] || [ "$FAILED" != 0 ]; } && [ -n "$(ls -A "$WORK")" ]; then
    log "logs and raw results kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Start-up.

port_in_use() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
wait_port() { # port timeout_s pid
  local i
  for i in $(seq 1 $(($2 * 10))); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then return 1; fi
    sleep 0.1
  done
  return 1
}

for p in "$RPORT" "$RDIST" "$WPORT"; do
  port_in_use "$p" && die "port $p is in use on this machine: pick others (--rabbit-port, --warren-port)"
done
if epmd -names 2>/dev/null | grep -q "^name ${RMQ_NODE%@*} "; then
  die "an Erlang node named $RMQ_NODE is already registered with epmd"
fi

if [ "$BUILD" = 1 ]; then
  log "building warren-broker and warren-perf (release, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  (cd "$REPO" && cargo build --release -q -p warren-broker -p warren-perf)
fi
[ -x "$PERF" ] || die "$PERF not found (build it or drop --no-build)"
[ -x "$WARREN" ] || die "$WARREN not found (build it or drop --no-build)"

if [ ! -x "$RMQ_BIN/rabbitmq-server" ]; then
  log "installing rabbitmq-server from Debian"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q rabbitmq-server >/dev/null
fi
# The package may have started its own service: it is not ours, leave it alone.

epmd -names >/dev/null 2>&1 && EPMD_WAS_UP=1
mkdir -p "$RMQ_BASE/home" "$RMQ_BASE/mnesia" "$RMQ_BASE/log"
chmod 700 "$RMQ_BASE/home"
head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$RMQ_BASE/home/.erlang.cookie"
chmod 400 "$RMQ_BASE/home/.erlang.cookie"
: >"$RMQ_BASE/rabbitmq-env.conf"
echo '[].' >"$RMQ_BASE/enabled_plugins"
printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users.guest = true\n' "$RPORT" >"$RMQ_BASE/rabbitmq.conf"
log "starting RabbitMQ node $RMQ_NODE on 127.0.0.1:$RPORT (distribution port $RDIST, state in $RMQ_BASE)"
RMQ_STARTED=1
(rmq_env && "$RMQ_BIN/rabbitmq-server" -detached)
rmqctl wait "$RMQ_BASE/rabbitmq.pid" --timeout 120 >/dev/null
wait_port "$RPORT" 60 || die "RabbitMQ does not listen on $RPORT (logs in $RMQ_BASE/log)"

log "starting warren-broker on 127.0.0.1:$WPORT"
"$WARREN" --amqp-listen "127.0.0.1:$WPORT" --management-listen 127.0.0.1:0 --prometheus-listen 127.0.0.1:0 --cluster-listen 127.0.0.1:0 --data-dir "$WORK/warren-data" >"$WORK/warren.log" 2>&1 &
WARREN_PID=$!
wait_port "$WPORT" 30 "$WARREN_PID" || die "warren-broker did not start (see $WORK/warren.log)"

# ---------------------------------------------------------------------------------------------
# Facts for the report.

NPROC=$(nproc)
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
MEM=$(awk '/^MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo)
MACHINE="$NPROC CPUs ($CPU_MODEL), $MEM RAM, Linux $(uname -r); shared with other work"
RMQ_VERSION=$(rmqctl version 2>/dev/null | tail -1 || true)
RMQ_PKG=$(dpkg-query -W -f '${Version}' rabbitmq-server 2>/dev/null || echo unknown)
ERL_PKG=$(dpkg-query -W -f '${Version}' erlang-base 2>/dev/null || echo unknown)
RABBIT_DESC="${RMQ_VERSION:-?} (Debian rabbitmq-server $RMQ_PKG, erlang-base $ERL_PKG), default settings, no plugins"
WARREN_REV=$(git -C "$REPO" describe --always --dirty --tags 2>/dev/null || echo unknown)
WARREN_DATE=$(git -C "$REPO" log -1 --format=%cI 2>/dev/null || echo unknown)
WARREN_DESC="git $WARREN_REV (commit date $WARREN_DATE), cargo build --release; warren-perf from the same tree"
DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# ---------------------------------------------------------------------------------------------
# The runs.

RUNS=$WORK/runs
mkdir -p "$RUNS"
NOTES=()

check_leftovers() { # scenario broker port
  local out rc=0
  # shellcheck disable=SC2046 # the names are plain words
  out=$(python3 "$HERE/compare.py" cleanup --port "$3" $(scenario_leftover_args "$1")) || rc=$?
  if [ "$rc" = 3 ]; then
    log "$1 on $2 left things behind: $out"
    NOTES+=("$1 on $2: warren-perf left things behind, deleted before the next run: ${out//$'\n'/; }")
  elif [ "$rc" != 0 ]; then
    log "$1 on $2: the leftover check failed"
    NOTES+=("$1 on $2: the leftover check failed")
  fi
  if [ "$2" = rabbitmq ]; then
    # Anything at all in the node (the names above are only what this scenario declares).
    local q
    while IFS= read -r q; do
      [ -n "$q" ] || continue
      log "RabbitMQ still has queue $q: deleting it"
      NOTES+=("$1 on rabbitmq: queue $q was still there, deleted")
      rmqctl delete_queue "$q" >/dev/null 2>&1 || true
    done < <(rmqctl list_queues -q --no-table-headers name 2>/dev/null || true)
  fi
}

run_one() { # scenario broker round
  local sc=$1 broker=$2 round=$3 port base rc=0 args
  case $broker in rabbitmq) port=$RPORT ;; warren) port=$WPORT ;; esac
  base=$RUNS/$sc.$broker.$round
  args=$(scenario_args "$sc")
  log "$sc round $round/$ROUNDS on $broker"
  local bpid= counter=
  case $broker in
    rabbitmq) bpid=$(cat "$RMQ_BASE/rabbitmq.pid" 2>/dev/null || true) ;;
    warren) bpid=$WARREN_PID ;;
  esac
  counter=$(count_syncs "$sc" "$bpid" "$base.syncs")
  # shellcheck disable=SC2086 # scenario_args is a list of plain words
  timeout -s INT -k 30 "$(run_limit "$sc")" \
    "$PERF" --uri "amqp://guest:guest@127.0.0.1:$port/%2f" --json $args >"$base.json" 2>"$base.err" &
  PERF_PID=$!
  wait "$PERF_PID" || rc=$?
  PERF_PID=
  if [ -n "$counter" ]; then
    kill -INT "$counter" 2>/dev/null || true
    wait "$counter" 2>/dev/null || true
  fi
  echo "$rc" >"$base.rc"
  if [ "$rc" != 0 ]; then
    FAILED=1
    log "$sc on $broker (round $round) failed with status $rc: $(tail -3 "$base.err" | tr '\n' ' ')"
    NOTES+=("$sc on $broker, round $round: warren-perf exited with status $rc ($(tail -1 "$base.err"))")
  fi
  if [ "$broker" = warren ] && ! kill -0 "$WARREN_PID" 2>/dev/null; then
    die "warren-broker died during $sc (see $WORK/warren.log)"
  fi
  check_leftovers "$sc" "$broker" "$port"
  sleep "$PAUSE"
}

COMMANDS=()
for sc in "${SCEN[@]}"; do
  COMMANDS+=(--command "$sc \$P --uri \$URI --json $(scenario_args "$sc")")
  for round in $(seq 1 "$ROUNDS"); do
    run_one "$sc" rabbitmq "$round"
    run_one "$sc" warren "$round"
  done
done

NOTE_ARGS=()
for n in "${NOTES[@]+"${NOTES[@]}"}"; do NOTE_ARGS+=(--note "$n"); done
python3 "$HERE/compare.py" report --runs "$RUNS" --out "$OUT" \
  --rounds "$ROUNDS" --time "$TIME" --s6-messages "$S6_MESSAGES" --date "$DATE" \
  --machine "$MACHINE" --rabbitmq "$RABBIT_DESC" --warren "$WARREN_DESC" --perf "$PERF" \
  "${COMMANDS[@]}" "${NOTE_ARGS[@]+"${NOTE_ARGS[@]}"}"
[ "$OUT" = - ] || log "report written to $OUT"
[ "$FAILED" = 0 ] || { log "some runs failed (see the notes in the report)"; exit 1; }
