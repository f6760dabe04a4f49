#!/usr/bin/env bash
# Through the home node or through another: a 3-node Warren cluster on loopback, one durable
# queue declared on node 1 (its home), and warren-perf run against node 1 (every operation
# local) and against node 2 (every publish, delivery and ack forwarded over the cluster link),
# alternating, with persistent messages, publisher confirms and manual acks.
#
#   bench/forwarding.sh [--time SECONDS] [--rounds N] [--scenarios 1p1c,10p10c] [--no-build]
#
# Prints, per scenario, the median confirmed and received rates through each node and their
# ratio (through node 2 / through node 1). Ports: AMQP 5691-5693, management 15691-15693,
# cluster 25691-25693, all on 127.0.0.1. The nodes are stopped at the end, also on failure.
# Environment: CARGO_TARGET_DIR (default /tmp/target-bench).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/target-bench}
PERF=$CARGO_TARGET_DIR/release/warren-perf
WARREN=$CARGO_TARGET_DIR/release/warren-broker
TIME=10
ROUNDS=3
SCENARIOS=1p1c,10p10c
BUILD=1
QUEUE=warren-perf-forwarded

while [ $# -gt 0 ]; do
  case $1 in
    --time) TIME=${2:?}; shift 2 ;;
    --rounds) ROUNDS=${2:?}; shift 2 ;;
    --scenarios) SCENARIOS=${2:?}; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "forwarding.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

if [ $BUILD -eq 1 ]; then
  (cd "$REPO" && cargo build --release -q -p warren-broker -p warren-perf)
fi

WORK=$(mktemp -d /tmp/warren-forwarding.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -n "${KEEP_TMP:-}" ] && echo "kept $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT

peers=127.0.0.1:25691,127.0.0.1:25692,127.0.0.1:25693
for i in 1 2 3; do
  "$WARREN" --node-name "warren@bench$i" --data-dir "$WORK/n$i" \
    --amqp-listen "127.0.0.1:569$i" --management-listen "127.0.0.1:1569$i" \
    --prometheus-listen 127.0.0.1:0 --cluster-listen "127.0.0.1:2569$i" \
    --peers "$peers" --cluster-secret forwarding-bench >"$WORK/n$i.log" 2>&1 &
  PIDS+=($!)
done

api() { curl -fsS -u guest:guest "$@"; }
for i in 1 2 3; do
  for _ in $(seq 1 300); do
    if api "http://127.0.0.1:1569$i/api/overview" 2>/dev/null | grep -q '"leader":"'; then break; fi
    sleep 0.1
  done
done
api -X PUT -H 'content-type: application/json' -d '{"durable":true}' \
  "http://127.0.0.1:15691/api/queues/%2F/$QUEUE" >/dev/null
for _ in $(seq 1 100); do
  api "http://127.0.0.1:15692/api/queues/%2F/$QUEUE" >/dev/null 2>&1 && break
  sleep 0.1
done

run() { # node producers consumers out
  "$PERF" --uri "amqp://guest:guest@127.0.0.1:569$1/%2f" --queue "$QUEUE" --exchange "" --predeclared \
    --persistent --confirm 64 --qos 100 -x "$2" -y "$3" --time "$TIME" --json >"$4" 2>"$4.err" || true
}

for sc in ${SCENARIOS//,/ }; do
  p=${sc%%p*}; rest=${sc#*p}; c=${rest%c}
  for r in $(seq 1 "$ROUNDS"); do
    for node in 1 2; do
      run "$node" "$p" "$c" "$WORK/$sc.$node.$r.json"
      # Whatever a run left is dropped before the next.
      api -X DELETE "http://127.0.0.1:15691/api/queues/%2F/$QUEUE/contents" >/dev/null 2>&1 || true
      sleep 1
    done
  done
done

python3 - "$WORK" "$ROUNDS" "$SCENARIOS" <<'PY'
import json, statistics, sys
work, rounds, scenarios = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
def summary(path):
    s = None
    try:
        for line in open(path):
            if line.startswith("{"):
                o = json.loads(line)
                if o.get("type") == "summary":
                    s = o
    except OSError:
        pass
    return s
print("| scenario | figure | through node 1 (home) | through node 2 | node 2 / node 1 |")
print("| --- | --- | ---: | ---: | ---: |")
for sc in scenarios:
    for label, key in (("confirmed msg/s", "confirmed_rate"), ("received msg/s", "received_rate")):
        med = {}
        for node in (1, 2):
            vals = [s[key] for s in (summary(f"{work}/{sc}.{node}.{r}.json") for r in range(1, rounds + 1)) if s and s.get(key) is not None]
            med[node] = statistics.median(vals) if vals else None
        ratio = f"{med[2] / med[1]:.2f}" if med[1] and med[2] is not None else "n/a"
        fmt = lambda v: "n/a" if v is None else f"{v:,.0f}"
        print(f"| {sc} | {label} | {fmt(med[1])} | {fmt(med[2])} | {ratio} |")
PY
