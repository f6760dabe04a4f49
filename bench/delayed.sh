#!/usr/bin/env bash
# Delayed messages at scale: N persistent delayed messages (x-delayed-message exchange,
# confirmed) whose delays are spread uniformly over SPREAD seconds, consumed as they come due.
# Reports the broker's resident memory over the run (idle, while scheduling, while delivering)
# and the delivery-time error (arrival minus due time) from warren-perf's consumer latency.
#
#   bench/delayed.sh [--messages N] [--spread SECONDS] [--rate R] [--size BYTES]
#                    [--port P] [--out FILE] [--no-build] [--keep-tmp]
#
# Options:
#   --messages N      delayed messages to schedule (default 1000000)
#   --spread SECONDS  delays are drawn uniformly from 0..SPREAD seconds (default 3600)
#   --rate R          publishing rate, msgs/s (default 2000: publishing as fast as possible
#                     would add the client's own queueing to the measured error)
#   --size BYTES      message body size (default 100)
#   --port P          Warren's AMQP port (default 5682; P+1 serves /metrics)
#   --out FILE        write the markdown report there (default: stdout)
#   --no-build        use the binaries already in $CARGO_TARGET_DIR/release
#   --keep-tmp        keep the temp dir (broker log, samples, raw JSON)
#
# RabbitMQ's delayed-message plugin is not part of Debian's rabbitmq-server and cannot be
# fetched from a package registry, so there is no side-by-side baseline: the report compares
# the broker's memory with N messages scheduled against the same broker idle.
# Environment: CARGO_TARGET_DIR (default /tmp/target-bench). Loopback only.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/tmp/target-bench}
PERF=$CARGO_TARGET_DIR/release/warren-perf
WARREN=$CARGO_TARGET_DIR/release/warren-broker

MESSAGES=1000000
SPREAD=3600
RATE=2000
SIZE=100
PORT=5682
OUT=-
BUILD=1
KEEP_TMP=0

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "delayed.sh: $*" >&2; exit 2; }
log() { echo "[delayed $(date +%H:%M:%S)] $*" >&2; }
number() { [[ $1 =~ ^[0-9]{1,10}$ ]] && [ "$1" -ge 1 ] || die "$2 must be a positive integer"; }

while [ $# -gt 0 ]; do
  case $1 in
    --messages) MESSAGES=${2:?}; number "$MESSAGES" --messages; shift 2 ;;
    --spread) SPREAD=${2:?}; number "$SPREAD" --spread; shift 2 ;;
    --rate) RATE=${2:?}; number "$RATE" --rate; shift 2 ;;
    --size) SIZE=${2:?}; number "$SIZE" --size; shift 2 ;;
    --port) PORT=${2:?}; number "$PORT" --port; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    --no-build) BUILD=0; shift ;;
    --keep-tmp) KEEP_TMP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[ "$SIZE" -ge 16 ] || die "--size must be at least 16 (timestamp and delay)"

TMP=$(mktemp -d /tmp/warren-delayed.XXXXXX)
BROKER_PID=
SAMPLER_PID=
cleanup() {
  [ -n "$SAMPLER_PID" ] && kill "$SAMPLER_PID" 2>/dev/null || true
  if [ -n "$BROKER_PID" ]; then
    kill "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
  fi
  if [ "$KEEP_TMP" = 1 ]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT INT TERM

if [ "$BUILD" = 1 ]; then
  log "building release binaries into $CARGO_TARGET_DIR"
  (cd "$REPO" && cargo build --release --quiet -p warren-broker -p warren-perf)
fi
[ -x "$WARREN" ] && [ -x "$PERF" ] || die "binaries missing in $CARGO_TARGET_DIR/release"

METRICS_PORT=$((PORT + 1))
"$WARREN" --data-dir "$TMP/data" --amqp-listen "127.0.0.1:$PORT" \
  --management-listen 127.0.0.1:0 --prometheus-listen "127.0.0.1:$METRICS_PORT" --cluster-listen 127.0.0.1:0 \
  >"$TMP/broker.log" 2>&1 &
BROKER_PID=$!
for _ in $(seq 100); do
  grep -q "AMQP listener started" "$TMP/broker.log" 2>/dev/null && break
  kill -0 "$BROKER_PID" 2>/dev/null || die "warren-broker exited: $(tail -5 "$TMP/broker.log")"
  sleep 0.1
done
grep -q "AMQP listener started" "$TMP/broker.log" || die "warren-broker did not start"

# Samples every 10 s: seconds since start, resident KiB, data dir KiB, messages waiting.
START=$(date +%s)
(
  echo "t_s,rss_kib,disk_kib,waiting"
  while kill -0 "$BROKER_PID" 2>/dev/null; do
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$BROKER_PID/status" 2>/dev/null || echo 0)
    disk=$(du -sk "$TMP/data" 2>/dev/null | cut -f1)
    waiting=$(curl -s "http://127.0.0.1:$METRICS_PORT/metrics" \
      | awk '/^warren_delayed_messages / {print $2}')
    echo "$(( $(date +%s) - START )),${rss:-0},${disk:-0},${waiting:-0}"
    sleep 10
  done
) >"$TMP/samples.csv" &
SAMPLER_PID=$!
sleep 2

PUBLISH_S=$(( (MESSAGES + RATE - 1) / RATE ))
RUN_S=$(( PUBLISH_S + SPREAD + 120 ))
log "scheduling $MESSAGES messages at $RATE msg/s (about ${PUBLISH_S}s), delays over ${SPREAD}s; run up to ${RUN_S}s"
"$PERF" --uri "amqp://guest:guest@127.0.0.1:$PORT/%2f" --json --id DELAYED \
  -x 1 -y 1 --persistent -c 1000 -a --size "$SIZE" --rate "$RATE" \
  --delay-max $((SPREAD * 1000)) --pmessages "$MESSAGES" --cmessages "$MESSAGES" \
  --time "$RUN_S" >"$TMP/perf.json" 2>"$TMP/perf.err" || die "warren-perf failed: $(tail -5 "$TMP/perf.err")"
sleep 11
kill "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=

report=$(python3 - "$TMP/perf.json" "$TMP/samples.csv" "$MESSAGES" "$SPREAD" "$RATE" "$SIZE" <<'EOF'
import csv, json, sys
perf, samples, n, spread, rate, size = sys.argv[1:7]
summary = None
for line in open(perf):
    try:
        obj = json.loads(line)
    except ValueError:
        continue
    if obj.get("type") == "summary":
        summary = obj
rows = [r for r in csv.DictReader(open(samples))]
rss = [(int(r["t_s"]), int(r["rss_kib"]), int(r["disk_kib"]), float(r["waiting"] or 0)) for r in rows]
publish_end = summary["publish_duration_s"] if summary else 0
def mib(k): return f"{k / 1024:.1f} MiB"
idle = rss[0][1] if rss else 0
during_publish = max((k for t, k, _, _ in rss if t <= publish_end + 2), default=0)
peak = max((k for _, k, _, _ in rss), default=0)
last = rss[-1][1] if rss else 0
peak_waiting = max((w for *_, w in rss), default=0)
peak_disk = max((d for _, _, d, _ in rss), default=0)
lat = (summary or {}).get("latency_us") or {}
print(f"## Delayed messages: {int(n):,} scheduled over {int(spread):,} s\n")
print(f"Persistent {size}-byte messages, confirmed, published at {int(rate):,} msg/s through a durable "
      f"x-delayed-message exchange (direct) with x-delay uniform in 0..{int(spread) * 1000} ms; "
      "one consumer (auto-ack) on the bound durable queue.\n")
if summary:
    print(f"- published: {summary['sent_total']:,} ({summary['confirmed_total']:,} confirmed, "
          f"{summary['nacked_total']:,} nacked) in {summary['publish_duration_s']:.0f} s")
    print(f"- received: {summary['received_total']:,} of {int(n):,} in {summary['duration_s']:.0f} s (ended by {summary['ended_by']})")
    print(f"- delivery-time error (arrival minus due time), µs: median {lat.get('median')}, "
          f"95th {lat.get('p95')}, 99th {lat.get('p99')}, max {lat.get('max')}")
    if summary.get("errors"):
        print(f"- errors: {summary['errors']}")
print(f"- most messages waiting at once: {int(peak_waiting):,}; data directory at most {mib(peak_disk)}")
print(f"- broker resident memory: idle {mib(idle)}; peak while scheduling {mib(during_publish)}; "
      f"peak over the run {mib(peak)} ({peak / max(idle, 1):.1f}× idle); at the end {mib(last)}")
print("\n| t (s) | resident | data dir | waiting |\n| ---: | ---: | ---: | ---: |")
step = max(1, len(rss) // 24)
for i, (t, k, d, w) in enumerate(rss):
    if i % step == 0 or i == len(rss) - 1:
        print(f"| {t} | {mib(k)} | {mib(d)} | {int(w):,} |")
EOF
)
if [ "$OUT" = - ]; then echo "$report"; else echo "$report" >"$OUT"; log "report written to $OUT"; fi
