#!/usr/bin/env bash
# Ingest load run: acknowledged events per second and latency for single events and for
# batches of 100, beside wrk's rate on /healthz measured in the same run as the ceiling.
#
#   benches/ingest.sh            (DURATION=10 CONNECTIONS=64 to change the run)
#
# Starts the local stack if needed, builds the release binaries, starts sluice-ingest on a
# free port with a fresh 6-partition stream, and drives it with wrk (keep-alive on).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
duration="${DURATION:-10}"
connections="${CONNECTIONS:-64}"
threads=2

scripts/setup >/dev/null
command -v wrk >/dev/null || { sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo; $sudo_cmd apt-get install -y -q wrk >/dev/null; }
eval "$(scripts/stack up 2>/dev/null)"
cargo build --release --locked --bins -q
bin="${CARGO_TARGET_DIR:-$root/target}/release"

work="$(mktemp -d)"
stream="bench$(date +%s)"
cat >"$work/pipeline.yaml" <<YAML
streams:
  - name: $stream
    partitions: 6
YAML
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
hport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
health="http://127.0.0.1:$hport"
SLUICE_LOG=warn "$bin/sluice-ingest" --listen "127.0.0.1:$port" --metrics-listen "127.0.0.1:$hport" --settings "$work/pipeline.yaml" \
  --create-topics --read-events false >"$work/ingest.log" 2>&1 &
ingest=$!
trap 'kill $ingest 2>/dev/null; wait $ingest 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do curl -fsS "$health/readyz" >/dev/null 2>&1 && break; sleep 0.2; done

printf '{"userId":"user-1","page":"/products/42","ms":1234}' >"$work/one.json"
python3 - "$work/batch.json" <<'PY'
import json, sys
json.dump([{"userId": f"user-{i}", "page": "/products/42", "ms": i} for i in range(100)], open(sys.argv[1], "w"))
PY
# Both scripts print one RESULT line: requests, errors, seconds, p50 and p99 in ms.
cat >"$work/get.lua" <<'LUA'
done = function(summary, latency, requests)
  local errors = summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
  io.write(string.format("RESULT %d %d %.3f %.3f %.3f\n", summary.requests, errors,
    summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
LUA
{
  cat <<'LUA'
local f = io.open(os.getenv("BODY"), "r")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
LUA
  cat "$work/get.lua"
} >"$work/post.lua"

run() { # name url script body events-per-request
  local out
  out="$(BODY="$4" wrk -t$threads -c"$connections" -d"${duration}s" --latency -s "$3" "$2" | grep '^RESULT')"
  read -r _ requests errors seconds p50 p99 <<<"$out"
  python3 - "$1" "$requests" "$errors" "$seconds" "$p50" "$p99" "$5" <<'PY'
import sys
name, req, err, sec, p50, p99, per = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7])
print(f"{name}\t{req/sec:.0f}\t{req*per/sec:.0f}\t{p50:.2f}\t{p99:.2f}\t{err}")
PY
}

echo "date $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD), $(nproc) cores, wrk -t$threads -c$connections -d${duration}s, keep-alive"
healthz="$(run "GET /healthz (ceiling)" "$health/healthz" "$work/get.lua" /dev/null 0)"
single="$(run "POST 1 event, acked" "$base/v1/streams/$stream/events" "$work/post.lua" "$work/one.json" 1)"
batch="$(run "POST 100 events, acked" "$base/v1/streams/$stream/events" "$work/post.lua" "$work/batch.json" 100)"
printf 'scenario\trequests/s\tevents/s\tp50 ms\tp99 ms\terrors\n%s\n%s\n%s\n' "$healthz" "$single" "$batch" | column -t -s $'\t'
h=$(echo "$healthz" | cut -f2); s=$(echo "$single" | cut -f3)
python3 -c "print(f'single acknowledged events / healthz rate = {float($s)/float($h):.2f}')"
