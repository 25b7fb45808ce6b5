#!/usr/bin/env bash
# Collector load run: one collector's throughput into Redis and into PostgreSQL, and the
# end-to-end latency from ingest's acknowledgement to the record being readable, beside
# `redis-benchmark -P 16` SET on the same Redis in the same run.
#
#   benches/collector.sh         (EVENTS=200000 to change the backlog)
#
# Starts the local stack if needed, builds the release binaries, fills a fresh 6-partition
# topic through ingest (batches of 100), then lets one collector drain it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
events="${EVENTS:-200000}"

scripts/setup >/dev/null
eval "$(scripts/stack up 2>/dev/null)"
cargo build --release --locked --bins -q
bin="${CARGO_TARGET_DIR:-$root/target}/release"
redis_port="${SLUICE_REDIS_URL##*:}"

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

run_id="b$(date +%s)"
cat >"$work/pipeline.yaml" <<YAML
streams:
  - name: ${run_id}
    partitions: 6
  - name: ${run_id}-e2e
    partitions: 6
YAML
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); hport=$(free_port)
base="http://127.0.0.1:$port"
health="http://127.0.0.1:$hport"
SLUICE_LOG=warn "$bin/sluice-ingest" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$hport" --settings "$work/pipeline.yaml" \
  --create-topics --read-events false --key-prefix "$run_id" >"$work/ingest.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do curl -fsS "$health/readyz" >/dev/null 2>&1 && break; sleep 0.2; done

echo "date $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD), $(nproc) cores, $events events"

# Ceiling: Redis SET with 16 commands per round trip.
ceiling=$(redis-benchmark -p "$redis_port" -P 16 -t set -n 1000000 --csv 2>/dev/null | sed -n 's/^"SET","\([0-9.]*\)".*/\1/p')

# Backlog through ingest.
python3 - "$base" "$run_id" "$events" <<'PY'
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
base, stream, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def post(start):
    body = json.dumps([{"id": f"ev-{i}", "userId": f"user-{i % 1000}", "page": "/p", "n": i} for i in range(start, min(start + 100, n))]).encode()
    req = urllib.request.Request(f"{base}/v1/streams/{stream}/events", data=body, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req) as r:
        assert r.status == 202, r.status
with ThreadPoolExecutor(8) as pool:
    list(pool.map(post, range(0, n, 100)))
PY

drain() { # sink label extra-args...
  local sink=$1 label=$2; shift 2
  local mport; mport=$(free_port)
  local start end
  start=$(date +%s.%N)
  SLUICE_LOG=warn "$bin/sluice-collector" --settings "$work/pipeline.yaml" --streams "$run_id" \
    --group "$run_id-$sink" --sink "$sink" --key-prefix "$run_id" --batch-size 2000 --concurrent-count 6 \
    --metrics-listen "127.0.0.1:$mport" "$@" >"$work/collector-$sink.log" 2>&1 &
  local pid=$!
  pids+=($pid)
  while true; do
    written=$(curl -fsS "http://127.0.0.1:$mport/metrics" 2>/dev/null | sed -n 's/^sluice_collector_events_written_total{[^}]*} \([0-9]*\)$/\1/p' | paste -sd+ | bc 2>/dev/null || echo 0)
    [ "${written:-0}" -ge "$events" ] && break
    kill -0 "$pid" 2>/dev/null || { echo "collector ($sink) exited; see its log" >&2; cat "$work/collector-$sink.log" >&2; exit 1; }
    sleep 0.2
  done
  end=$(date +%s.%N)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  python3 -c "print(f'$label\t{$events/($end-$start):.0f}')"
}

redis_rate=$(drain redis "collector -> Redis")
pg_table="bench_${run_id}"
pg_rate=$(drain postgres "collector -> PostgreSQL" --table "$pg_table")
psql "$SLUICE_DATABASE_URL" -qc "DROP TABLE IF EXISTS $pg_table" >/dev/null

# End-to-end latency: from ingest's 202 to the record readable through GET.
mport=$(free_port)
SLUICE_LOG=warn "$bin/sluice-collector" --settings "$work/pipeline.yaml" --streams "$run_id-e2e" \
  --group "$run_id-e2e" --key-prefix "$run_id" --metrics-listen "127.0.0.1:$mport" >"$work/collector-e2e.log" 2>&1 &
pids+=($!)
sleep 1
latency=$(python3 - "$base" "$run_id-e2e" <<'PY'
import json, sys, time, urllib.request, urllib.error
base, stream = sys.argv[1], sys.argv[2]
samples = []
for i in range(500):
    body = json.dumps({"id": f"lat-{i}", "n": i}).encode()
    req = urllib.request.Request(f"{base}/v1/streams/{stream}/events", data=body, headers={"content-type": "application/json"})
    urllib.request.urlopen(req).read()
    acked = time.perf_counter()
    while True:
        try:
            urllib.request.urlopen(f"{base}/v1/streams/{stream}/records/lat-{i}").read()
            break
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise
    samples.append((time.perf_counter() - acked) * 1000)
samples.sort()
print(f"{samples[len(samples)//2]:.2f}\t{samples[int(len(samples)*0.99)]:.2f}")
PY
)

printf 'what\tevents/s\n%s\n%s\nredis-benchmark -P 16 SET (ceiling)\t%.0f\n' "$redis_rate" "$pg_rate" "$ceiling" | column -t -s $'\t'
r=$(echo "$redis_rate" | cut -f2)
python3 -c "print(f'collector into Redis / redis-benchmark SET = {float($r)/float($ceiling):.2f}')"
echo "end-to-end, ingest 202 -> readable via GET (500 sequential events): p50 $(echo "$latency" | cut -f1) ms, p99 $(echo "$latency" | cut -f2) ms"
