#!/usr/bin/env bash
# Instructions per event, counted by valgrind's callgrind (stable on a shared machine,
# unlike time): the collector's per-record path and ingest's single-event path.
#
#   benches/profile.sh                 both
#   benches/profile.sh collector       EVENTS (default 20000) drained from a 6-partition
#                                      topic into files (shipped defaults) by one collector
#   benches/profile.sh ingest          REQUESTS (default 10000) single events posted over
#                                      HTTP by 16 clients, each acknowledged by Kafka
#   benches/profile.sh ingest-batch    REQUESTS / 10 batches of 100 events, the same way
#
# Figures are for the whole process, start-up and shutdown included, divided by the events;
# the functions that cost most (inclusive) follow. The callgrind files stay in
# target/profile/ for callgrind_annotate or KCachegrind.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
what="${1:-all}"
events="${EVENTS:-20000}"
requests="${REQUESTS:-10000}"

scripts/setup >/dev/null
command -v valgrind >/dev/null || { sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo; $sudo_cmd apt-get install -y -q valgrind >/dev/null; }
eval "$(scripts/stack up 2>/dev/null)"
# SLUICE_BIN=<dir> profiles binaries built elsewhere (another commit, for a before/after).
if [ -z "${SLUICE_BIN:-}" ]; then
  cargo build --release --locked --bins -q
fi
bin="${SLUICE_BIN:-${CARGO_TARGET_DIR:-$root/target}/release}"
out="${CARGO_TARGET_DIR:-$root/target}/profile"
mkdir -p "$out"

work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() { for _ in $(seq 1 600); do curl -fsS "$1/readyz" >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }
metric() { curl -fsS "$1/metrics" 2>/dev/null | sed -n "s/^$2{[^}]*} \\([0-9.e+]*\\)\$/\\1/p" | python3 -c 'import sys; print(int(sum(float(l) for l in sys.stdin)))'; }

tag="prof$(date +%s)"
cat >"$work/pipeline.yaml" <<YAML
streams:
  - name: $tag
    partitions: 6
YAML
port=$(free_port); hport=$(free_port)
ingest_argv=("$bin/sluice-ingest" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$hport"
  --settings "$work/pipeline.yaml" --create-topics --read-events false --key-prefix "$tag")

report() { # name callgrind-file count unit
  local total
  total=$(sed -n 's/^summary: \([0-9]*\).*/\1/p' "$2")
  python3 -c "print(f'$1: {$total:,} instructions for $3 $4: {$total/$3:,.0f} per ${4%s}')"
  # The functions that cost most, inclusive, without the runtime's own frames.
  callgrind_annotate --inclusive=yes "$2" >"$2.txt" 2>/dev/null || true
  sed -n '/file:function/,$p' "$2.txt" | grep -E '^ *[0-9,]+ \(' |
    grep -vE 'tokio::runtime|std::sys|std::thread|core::ops::function|pthread_create|start_thread|__rust|futures_util|clone3|\?\?\?:0x' |
    sed -E 's/ \[[^]]*\]$//; s/\?\?\?://' | awk 'NR <= 25' | cut -c1-150
  echo
}

echo "date $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD), binaries $bin, $(nproc) cores"
if [ "$what" = all ] || [ "$what" = collector ]; then
  "${ingest_argv[@]}" >"$work/ingest.log" 2>&1 &
  pids+=($!)
  wait_ready "http://127.0.0.1:$hport" || { cat "$work/ingest.log" >&2; exit 1; }
  "$bin/sluice-loadgen" --target "http://127.0.0.1:$port" --stream "$tag" --protocol http-batch \
    --batch-size 100 --requests $((events / 100)) --concurrency 8 --status-interval 0 >/dev/null
  mport=$(free_port)
  valgrind --tool=callgrind --callgrind-out-file="$out/collector.%p.callgrind" \
    "$bin/sluice-collector" --settings "$work/pipeline.yaml" --streams "$tag" --group "$tag" \
    --sink file --record-directory "$work/records" --metrics-listen "127.0.0.1:$mport" \
    >"$work/collector.log" 2>&1 &
  collector=$!
  pids+=($collector)
  wait_ready "http://127.0.0.1:$mport" || { cat "$work/collector.log" >&2; exit 1; }
  until [ "$(metric "http://127.0.0.1:$mport" sluice_collector_events_written_total)" -ge "$events" ]; do
    kill -0 "$collector" || { cat "$work/collector.log" >&2; exit 1; }
    sleep 0.5
  done
  kill -TERM "$collector"; wait "$collector" || true
  file=$(ls -t "$out"/collector.*.callgrind | head -1)
  report "collector, Kafka -> files" "$file" "$events" events
fi
profile_ingest() { # name events loadgen-arguments...
  local name="$1" count="$2"
  shift 2
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
  valgrind --tool=callgrind --callgrind-out-file="$out/ingest.%p.callgrind" \
    "${ingest_argv[@]}" >"$work/ingest-cg.log" 2>&1 &
  ingest=$!
  pids+=($ingest)
  wait_ready "http://127.0.0.1:$hport" || { cat "$work/ingest-cg.log" >&2; exit 1; }
  "$bin/sluice-loadgen" --target "http://127.0.0.1:$port" --stream "$tag" "$@" \
    --concurrency 16 --duration 600 --status-interval 0 >/dev/null
  kill -TERM "$ingest"; wait "$ingest" || true
  file=$(ls -t "$out"/ingest.*.callgrind | head -1)
  report "$name" "$file" "$count" events
}
if [ "$what" = all ] || [ "$what" = ingest ]; then
  profile_ingest "ingest, HTTP single event acknowledged" "$requests" --protocol http \
    --requests "$requests"
fi
if [ "$what" = all ] || [ "$what" = ingest-batch ]; then
  profile_ingest "ingest, HTTP batches of 100 acknowledged" "$((requests * 10))" \
    --protocol http-batch --batch-size 100 --requests "$((requests / 10))"
fi
