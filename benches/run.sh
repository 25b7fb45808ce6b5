#!/usr/bin/env bash
# The benchmark suite: every standard scenario against a release build, each figure beside
# a ceiling measured in the same run on the same machine, and the ratio.
#
#   benches/run.sh             (DURATION=10 CLIENTS=64 RUNS=3 to change the runs)
#
# Scenarios (sluice-loadgen drives all but the ceilings):
#   HTTP single event, WebSocket, TCP lines   vs a bare rdkafka producer, 1 record per request
#   HTTP batches of 100                       vs the bare producer, 100 records per request
#   HTTP single event at 4 x CLIENTS          vs the bare producer at 4 x CLIENTS (cores busy)
#                                             (RUNS rounds, each ceiling first; median, range)
#   every request rate                        vs wrk on GET /healthz
#   end to end into Redis (50,000 events, ingest -> Kafka -> collector -> Redis, verified
#   by id)                                    vs redis-benchmark -P 16 SET on the same Redis
#   POST /v1/work?ms=100 at 10, 100 and 1,000 clients vs the bound clients / 0.1 s
#   open loop at OPEN_RATE events/s (default 5000): HTTP single event vs the bare producer,
#                                             latency from each request's due time
#   collectors beside their peers (benches/peers.sh; PEERS=0 leaves them out)
#
# Beside each producer ceiling and the rows compared with it: the CPU the load client, ingest
# and the broker used per acknowledged event.
#
# Prints Markdown tables and writes them, with the date, commit and machine, to
# docs/benchmarks.md and to the performance section of README.md (one run for both); the
# raw output of every scenario goes to docs/bench-results/. Starts the local stack if
# needed; stops what it started itself.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
duration="${DURATION:-10}"
clients="${CLIENTS:-64}"
# The single-event rows again at four times the clients, where the cores are busy.
saturated=$(( clients * 4 ))
runs="${RUNS:-3}"
open_rate="${OPEN_RATE:-5000}"

scripts/setup >/dev/null
if ! command -v wrk >/dev/null; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd=sudo
  $sudo_cmd apt-get install -y -q wrk >/dev/null
fi
eval "$(scripts/stack up 2>/dev/null)"
echo "[bench] building release binaries" >&2
cargo build --release --locked --bins -q
bin="${CARGO_TARGET_DIR:-$root/target}/release"

work="$(mktemp -d)"
tag="bench$(date +%s)"
cat >"$work/pipeline.yaml" <<YAML
streams:
  - name: $tag
    partitions: 6
  - name: $tag-e2e
    partitions: 6
YAML
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(free_port); tcp_port=$(free_port); health_port=$(free_port)
base="http://127.0.0.1:$http_port"
health="http://127.0.0.1:$health_port"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
# The services run with their shipped settings, log level included.
"$bin/sluice-ingest" --listen "127.0.0.1:$http_port" --metrics-listen "127.0.0.1:$health_port" --settings "$work/pipeline.yaml" \
  --tcp-write-listen "127.0.0.1:$tcp_port" --tcp-stream "$tag" --create-topics \
  --read-events false --key-prefix "$tag" >"$work/ingest.log" 2>&1 &
ingest_pid=$!
pids+=($!)
for _ in $(seq 1 100); do curl -fsS "$health/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fsS "$health/readyz" >/dev/null || { cat "$work/ingest.log" >&2; exit 1; }

# The CPU seconds a process has used so far (user + system), or -1 when it is not ours to see.
kafka_pid="$(cat "${SLUICE_STACK_DIR:-$root/.stack}/kafka/kafka.pid" 2>/dev/null || true)"
cpu_seconds() {
  if [ -n "$1" ] && [ -r "/proc/$1/stat" ]; then
    awk -v hz="$(getconf CLK_TCK)" '{sub(/^.*\) /, ""); print ($12 + $13) / hz}' "/proc/$1/stat"
  else
    echo -1
  fi
}

# Runs sluice-loadgen; its report goes to NAME.json, and the CPU seconds the load client,
# ingest and the broker used meanwhile to NAME.cpu.json.
lg() {
  local name=$1; shift
  echo "[bench] $name" >&2
  local ingest0 broker0
  ingest0=$(cpu_seconds "$ingest_pid"); broker0=$(cpu_seconds "$kafka_pid")
  python3 -c '
import resource, subprocess, sys
with open(sys.argv[1], "w") as out:
    code = subprocess.run(sys.argv[3:], stdout=out).returncode
used = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[2], "w").write(str(used.ru_utime + used.ru_stime))
sys.exit(code)' "$work/$name.json" "$work/$name.client-cpu" \
    "$bin/sluice-loadgen" --target "$base" --tcp-target "127.0.0.1:$tcp_port" \
    --kafka-brokers "$SLUICE_KAFKA_BROKERS" --stream "$tag" --status-interval 0 --json \
    --requests 10000000 --duration "$duration" "$@"
  printf '{"client": %s, "ingest": %s, "ingest_before": %s, "broker": %s, "broker_before": %s}\n' \
    "$(cat "$work/$name.client-cpu")" "$(cpu_seconds "$ingest_pid")" "$ingest0" \
    "$(cpu_seconds "$kafka_pid")" "$broker0" >"$work/$name.cpu.json"
  rm -f "$work/$name.client-cpu"
}

echo "[bench] wrk GET /healthz" >&2
wrk -t 2 -c "$clients" -d "${duration}s" --latency "$health/healthz" >"$work/wrk.txt"
# The broker's own CPU use varies from one 10 s run to the next: each ceiling and what is
# compared with it run in rounds, the ceiling first in each.
for round in $(seq 1 "$runs"); do
  lg "kafka-single.$round" --protocol kafka --batch-size 1 --concurrency "$clients"
  lg "http-single.$round" --protocol http --concurrency "$clients"
  lg "ws-single.$round" --protocol ws --batch-size 1 --concurrency "$clients"
  lg "tcp.$round" --protocol tcp --shape record --concurrency "$clients"
  lg "kafka-batch.$round" --protocol kafka --batch-size 100 --concurrency "$clients"
  lg "http-batch.$round" --protocol http-batch --batch-size 100 --concurrency "$clients"
  lg "kafka-single-saturated.$round" --protocol kafka --batch-size 1 --concurrency "$saturated"
  lg "http-single-saturated.$round" --protocol http --concurrency "$saturated"
done
for c in 10 100 1000; do
  lg "work-$c" --protocol http --path "/v1/work?ms=100" --concurrency "$c"
done
lg kafka-open --protocol kafka --batch-size 1 --rate "$open_rate" --concurrency 512
lg http-open --protocol http --rate "$open_rate" --concurrency 512

echo "[bench] redis-benchmark -P 16 SET" >&2
redis_port="${SLUICE_REDIS_URL##*:}"
redis-benchmark -h 127.0.0.1 -p "$redis_port" -P 16 -t set -n 1000000 -q >"$work/redis.txt" 2>&1
"$bin/sluice-collector" --settings "$work/pipeline.yaml" --streams "$tag-e2e" --group "$tag-e2e" \
  --key-prefix "$tag" --batch-size 2000 --concurrent-count 6 >"$work/collector.log" 2>&1 &
pids+=($!)
echo "[bench] end to end into Redis" >&2
"$bin/sluice-loadgen" --target "$base" --stream "$tag-e2e" --protocol http-batch --batch-size 100 \
  --requests 500 --concurrency 16 --duration 120 --status-interval 0 --json \
  --verify-redis "$SLUICE_REDIS_URL" --verify-key-prefix "$tag" --verify-timeout 120 >"$work/e2e.json"
# Read-your-writes: single events answered once Kafka acknowledged them, then once the
# collector wrote them to Redis, on the same stream with the same collector running.
lg ack-kafka --protocol http --path "/v1/streams/$tag-e2e/events?ack=kafka" --concurrency "$clients"
lg ack-sink --protocol http --path "/v1/streams/$tag-e2e/events?ack=sink" --concurrency "$clients"
curl -fsS "$health/metrics" | grep '^sluice_ingest_sink_acks_total' >"$work/sink-acks.txt" || true
cleanup_services() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; pids=(); }
cleanup_services
if [ "${PEERS:-1}" != 0 ]; then
  PEERS_TABLE="$work/peers.md" benches/peers.sh
fi

mkdir -p docs
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
python3 - "$work" "$clients" "$duration" "$commit" "$open_rate" "$runs" "$saturated" <<'PY'
import json, os, re, statistics, subprocess, sys, datetime
work, clients, duration, commit, open_rate, runs, saturated = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
def load(name):
    with open(os.path.join(work, name + ".json")) as f:
        return json.load(f)
def rounds(name):
    return [load(f"{name}.{i}") for i in range(1, runs + 1)]
def median_run(results):
    # The run with the median rate (the lower middle one for an even count).
    ordered = sorted(results, key=lambda r: r["events_per_second"])
    return ordered[(len(ordered) - 1) // 2]
wrk = open(os.path.join(work, "wrk.txt")).read()
healthz = float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1))
def wrk_ms(pct):
    m = re.search(r"\s%s%%\s+([\d.]+)(us|ms|s)" % pct, wrk)
    v, unit = float(m.group(1)), m.group(2)
    return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v
redis_txt = open(os.path.join(work, "redis.txt")).read()
redis_set = float(re.search(r"SET:\s+([\d.]+)\s+requests per second", redis_txt).group(1))
rows = []
def fmt(x): return f"{x:,.0f}"
def row(scenario, c, r, ceiling_name, ceiling, value):
    rows.append(f"| {scenario} | {c} | {fmt(r['throughput'])} | {fmt(r['events_per_second'])} | "
                f"{r['latency_ms']['p50']:.2f} | {r['latency_ms']['p99']:.2f} | "
                f"{ceiling_name} {fmt(ceiling)} | {value / ceiling:.2f} |")
rows.append(f"| `GET /healthz` (wrk, ceiling) | {clients} | {fmt(healthz)} | – | {wrk_ms(50):.2f} | {wrk_ms(99):.2f} | – | – |")
def spread(values):
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})" if len(values) > 1 else fmt(values[0])
def ceiling_row(label, results, clients=clients):
    m = median_run(results)
    rows.append(f"| {label} (ceiling) | {clients} | {fmt(m['throughput'])} | {spread([r['events_per_second'] for r in results])} | {m['latency_ms']['p50']:.2f} | {m['latency_ms']['p99']:.2f} | – | – |")
def rounds_row(label, results, ceilings, clients=clients):
    # Median and range of the rounds; the ratio of the medians, and the range of the
    # rounds' own ratios (each beside the ceiling of its round).
    m = median_run(results)
    rates = [r["events_per_second"] for r in results]
    ceiling = statistics.median(c["events_per_second"] for c in ceilings)
    ratios = [r["events_per_second"] / c["events_per_second"] for r, c in zip(results, ceilings)]
    ratio = f"{statistics.median(rates) / ceiling:.2f}" + (f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else "")
    rows.append(f"| {label} | {clients} | {fmt(m['throughput'])} | {spread(rates)} | "
                f"{m['latency_ms']['p50']:.2f} | {m['latency_ms']['p99']:.2f} | producer {fmt(ceiling)} | {ratio} |")
ks, kb = rounds("kafka-single"), rounds("kafka-batch")
ceiling_row("bare rdkafka producer, 1 record", ks)
for name, label in [("http-single", "HTTP `POST`, 1 event"), ("ws-single", "WebSocket, 1 event per message"), ("tcp", "TCP write port, 1 line")]:
    rounds_row(label, rounds(name), ks)
ceiling_row("bare rdkafka producer, 100 records", kb)
rounds_row("HTTP `POST`, batch of 100", rounds("http-batch"), kb)
kss = rounds("kafka-single-saturated")
ceiling_row("bare rdkafka producer, 1 record, saturated", kss, saturated)
rounds_row("HTTP `POST`, 1 event, saturated", rounds("http-single-saturated"), kss, saturated)
e2e = load("e2e")
v = e2e["verification"][0]
e2e_rate = v["checked"] / (e2e["seconds"] + v["seconds"])
rows.append(f"| end to end into Redis, {v['checked']:,} events ({v['missing']} missing, {v['duplicated']} duplicated) | 16 | – | {fmt(e2e_rate)} | {e2e['latency_ms']['p50']:.2f} | {e2e['latency_ms']['p99']:.2f} | redis-benchmark -P 16 SET {fmt(redis_set)} | {e2e_rate / redis_set:.2f} |")
ak, ask = load("ack-kafka"), load("ack-sink")
acks = {m.group(1): int(float(m.group(2))) for m in re.finditer(r'outcome="([a-z-]+)"[^}]*\}\s+([\d.e+]+)', open(os.path.join(work, "sink-acks.txt")).read())}
rows.append(f"| HTTP `POST`, 1 event, `ack=kafka`, collector running (baseline) | {clients} | {fmt(ak['throughput'])} | {fmt(ak['events_per_second'])} | {ak['latency_ms']['p50']:.2f} | {ak['latency_ms']['p99']:.2f} | – | – |")
row(f"HTTP `POST`, 1 event, `ack=sink` into Redis ({acks.get('written', 0):,} written, {acks.get('pending', 0)} pending)", clients, ask, "ack=kafka", ak["events_per_second"], ask["events_per_second"])
for c in (10, 100, 1000):
    r = load(f"work-{c}")
    bound = c / 0.1
    row(f"`POST /v1/work?ms=100`", c, r, "bound", bound, r["throughput"])
ko, ho = load("kafka-open"), load("http-open")
rows.append(f"| bare rdkafka producer, 1 record, open loop at {open_rate:,.0f}/s (ceiling) | ≤ 512 | {fmt(ko['throughput'])} | {fmt(ko['events_per_second'])} | {ko['latency_ms']['p50']:.2f} | {ko['latency_ms']['p99']:.2f} | – | – |")
row(f"HTTP `POST`, 1 event, open loop at {open_rate:,.0f}/s", "≤ 512", ho, "producer", ko["events_per_second"], ho["events_per_second"])
head = ("| scenario | clients | requests/s | events/s | p50 ms | p99 ms | ceiling (same run) | ratio |\n"
        "|---|---|---|---|---|---|---|---|")
table = head + "\n" + "\n".join(rows)
# Where the CPU went: microseconds of CPU per acknowledged event for the load client,
# ingest and the broker (median of the rounds), in the rows compared with the producer.
def cpu_per_event(name, who):
    per = []
    for i in range(1, runs + 1):
        r, c = load(f"{name}.{i}"), load(f"{name}.{i}.cpu")
        used = c[who] - c.get(f"{who}_before", 0) if who != "client" else c[who]
        if c[who] < 0 or not r["events_acknowledged"]:
            return None
        per.append(used * 1e6 / r["events_acknowledged"])
    return statistics.median(per)
cpu_rows = []
for name, label in [("kafka-single", "bare rdkafka producer, 1 record"), ("http-single", "HTTP `POST`, 1 event"),
                    ("ws-single", "WebSocket, 1 event per message"), ("tcp", "TCP write port, 1 line"),
                    ("kafka-batch", "bare rdkafka producer, 100 records"), ("http-batch", "HTTP `POST`, batch of 100"),
                    ("kafka-single-saturated", "bare rdkafka producer, 1 record, saturated"),
                    ("http-single-saturated", "HTTP `POST`, 1 event, saturated")]:
    # The bare producer's rows have no ingest in the path.
    whose = ("client", "broker") if name.startswith("kafka") else ("client", "ingest", "broker")
    figures = {who: cpu_per_event(name, who) for who in whose}
    cells = ["–" if figures.get(who) is None else f"{figures[who]:.1f}" for who in ("client", "ingest", "broker")]
    total = "–" if None in figures.values() else f"{sum(figures.values()):.1f}"
    cpu_rows.append(f"| {label} | {' | '.join(cells)} | {total} |")
cpu_table = ("| scenario | load client | ingest | broker | all three |\n|---|---|---|---|---|\n"
             + "\n".join(cpu_rows))
named = [f"{n}.{i}" for n in ["http-single", "ws-single", "tcp", "http-batch", "http-single-saturated"] for i in range(1, runs + 1)]
errors = {n: load(n)["errors"] for n in named + ["e2e", "ack-kafka", "ack-sink", "work-10", "work-100", "work-1000", "http-open"] if load(n)["errors"]}
cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True, text=True).stdout.strip()
when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
print(table)
print()
print(cpu_table)
if errors:
    print("\nerrors:", json.dumps(errors))
peers = open(os.path.join(work, "peers.md")).read() if os.path.exists(os.path.join(work, "peers.md")) else ""
stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
# The raw output of every scenario.
os.makedirs("docs/bench-results", exist_ok=True)
raw_name = f"run-{stamp}-{commit}.md"
with open(os.path.join("docs/bench-results", raw_name), "w") as f:
    f.write(f"# benches/run.sh, {when}, commit {commit}, {os.cpu_count()} cores ({cpu})\n\n")
    for name in sorted(n[:-5] for n in os.listdir(work) if n.endswith(".json")):
        f.write(f"## {name}\n\n```json\n{json.dumps(load(name), indent=1, sort_keys=True)}\n```\n\n")
    f.write(f"## wrk GET /healthz\n\n```\n{wrk}```\n\n## redis-benchmark\n\n```\n{redis_txt}```\n")
run_line = f"Run: {when}, commit `{commit}`, {os.cpu_count()} cores ({cpu})."
peers_section = f"""
## Collectors beside their peers

`benches/peers.sh` (part of this run): one backlog of events (sluice-loadgen's visit
reports, ~220 bytes, a 6-partition topic) drained from the start by each contender with a
group of its own, three runs alternating the collector (shipped defaults) and its peer:
Kafka Connect's FileStreamSink, the Debezium JDBC sink in Kafka Connect (upsert on the
record's Kafka coordinates, the event in one text column), and for Redis the ceiling
`redis-benchmark -P 16` SET on the same Redis. Steady rate: first event in the sink to the
last; whole run: process start to the last event. Median of the runs, range in brackets;
every event was checked to be in the sink exactly once.

{peers}""" if peers else ""
# Sections other scripts write (the real node, the operator at scale) are kept; this
# script's own are replaced.
own = {"Collectors beside their peers", "Micro-benchmarks (criterion)"}
path = "docs/benchmarks.md"
kept = ""
if os.path.exists(path):
    old = open(path).read()
    for section in old.split("\n## ")[1:]:
        if section.split("\n", 1)[0].strip() not in own:
            kept += "\n## " + section
with open(path, "w") as f:
    f.write(f"""# Benchmarks

Produced by `benches/run.sh` (release build, every service with its shipped settings: log
level `info`, no trace exporter; the broker, Redis, the services and the load client share
the machine). Every figure stands beside a ceiling measured in the same run:
the request-level ceiling is `wrk` on `GET /healthz`; acknowledged events are compared with
a bare rdkafka producer configured as ingest's (idempotent, `acks=all`, `linger.ms=1`, snappy)
writing the records ingest writes (each event in its envelope, unkeyed on a stream without a
key pointer) to the same broker, at {clients} clients and again at {saturated} (at {clients} a closed loop's rate is
set by its round trip; at {saturated} HTTP's is set by the CPU each event costs, the cores
being busy); the end-to-end drain into Redis with `redis-benchmark -P 16` SET on the
same Redis; `ack=sink` (answered once the collector wrote the event to Redis) with
`ack=kafka` on the same stream while the same collector runs; the compute endpoint with its
bound, clients ÷ 0.1 s. Latencies are from sluice-loadgen's HDR histogram: closed loop,
{duration} s per scenario (the producer ceilings and the rows beside them: {runs} rounds, each
ceiling first; median and range, the ratio of the medians and the range of each round's
own ratio), except the open-loop rows, whose latency counts from each
request's due time at a fixed rate (no coordinated omission). Raw output:
[{raw_name}](bench-results/{raw_name}).

{run_line}

{table}
""" + (f"\nErrors during the run: `{json.dumps(errors)}`\n" if errors else "") + """
Read the ratios, not the absolute numbers: on a shared two-core machine every scenario
competes with the broker for the same cores. Where that CPU goes, in microseconds of CPU
per acknowledged event (user and system time of each process over the scenario, median of
the rounds; the broker's is all its work meanwhile, its log included):

""" + cpu_table + "\n" + peers_section + kept)
# The README's performance figures come from this run too.
readme = open("README.md").read()
begin, end = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
if begin in readme and end in readme:
    block = (f"{begin}\n{run_line} From [`docs/benchmarks.md`](docs/benchmarks.md):\n\n{table}\n\n"
             f"Microseconds of CPU per acknowledged event (median of the rounds):\n\n{cpu_table}\n") + (f"\n{peers}".replace("](bench-results/", "](docs/bench-results/") if peers else "") + f"{end}"
    readme = readme[:readme.index(begin)] + block + readme[readme.index(end) + len(end):]
    open("README.md", "w").write(readme)
PY
echo "[bench] written to docs/benchmarks.md and README.md" >&2
