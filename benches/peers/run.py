#!/usr/bin/env python3
"""The runs of benches/peers.sh (which sets up the stack, the peers and the binaries).

One backlog of EVENTS events (sluice-loadgen's visit reports through ingest, batches of
100, a 6-partition topic) is drained by each contender in turn, from the start of the
topic with a consumer group of its own. A run alternates the collector and its peer (the
first run starts with the collector, the second with the peer, and so on).

Each contender's progress is counted the same way while it runs: lines appended to its
files, rows in its table, or, for Redis, the collector's written-events counter. From those
counts: the steady rate (first event to last), the whole-run rate (process start to last
event), the start-up time (process start to first event), and the process's CPU seconds
and peak RSS at the last event. Afterwards every event is checked to be in the sink
exactly once.
"""

import datetime
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

# Long enough that both contenders spend most of a run in their steady state (the JVM's
# warm-up is over early in the steady window, not halfway through it).
EVENTS = int(os.environ.get("EVENTS", "2000000"))
RUNS = int(os.environ.get("RUNS", "3"))
SCENARIOS = os.environ.get("SCENARIOS", "file postgres redis").split()
BIN = os.environ["SLUICE_BIN"]
BROKERS = os.environ["SLUICE_KAFKA_BROKERS"]
REDIS_URL = os.environ["SLUICE_REDIS_URL"]
DATABASE_URL = os.environ["SLUICE_DATABASE_URL"]
CONNECT_LIB = os.environ["CONNECT_LIB"]
CONNECT_PLUGINS = os.environ["CONNECT_PLUGINS"]
# Flags added to every collector run, to try settings other than the shipped defaults.
COLLECTOR_ARGS = os.environ.get("COLLECTOR_ARGS", "").split()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STALL_SECONDS = 120
TICK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[peers] {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A contender's process, with its CPU seconds and peak RSS read from /proc."""

    def __init__(self, argv, log_path, env=None):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.started = time.monotonic()
        self.p = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def alive(self):
        return self.p.poll() is None

    def cpu_seconds(self):
        with open(f"/proc/{self.p.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK

    def peak_rss_mib(self):
        with open(f"/proc/{self.p.pid}/status") as f:
            m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        return int(m.group(1)) / 1024

    def stop(self):
        if self.alive():
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()

    def tail(self):
        with open(self.log_path, "rb") as f:
            return f.read()[-3000:].decode(errors="replace")


class LineCounter:
    """Counts the lines appended to the files under a path, reading only what is new."""

    def __init__(self, path):
        self.path = path
        self.read = {}
        self.lines = 0

    def files(self):
        if os.path.isfile(self.path):
            return [self.path]
        out = []
        for d, _, names in os.walk(self.path):
            out.extend(os.path.join(d, n) for n in names)
        return out

    def __call__(self):
        for path in self.files():
            at = self.read.get(path, 0)
            try:
                size = os.path.getsize(path)
            except FileNotFoundError:
                continue
            if size > at:
                with open(path, "rb") as f:
                    f.seek(at)
                    chunk = f.read(size - at)
                self.lines += chunk.count(b"\n")
                self.read[path] = at + len(chunk)
        return self.lines


class Psql:
    """One psql session kept open for the counts."""

    def __init__(self):
        self.p = subprocess.Popen(
            ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=0", DATABASE_URL],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )

    def one(self, sql):
        self.p.stdin.write(sql.rstrip(";") + ";\n\\echo __end\n")
        self.p.stdin.flush()
        rows = []
        for line in self.p.stdout:
            line = line.rstrip("\n")
            if line == "__end":
                return rows[-1] if rows else ""
            rows.append(line)
        raise RuntimeError("psql ended")

    def count(self, table):
        v = self.one(f"SELECT count(*) FROM {table}")
        return int(v) if v.isdigit() else 0

    def close(self):
        self.p.stdin.close()
        self.p.wait()


def metric_counter(port, name):
    def count():
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            return 0
        return int(sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} ([\d.e+]+)$", text, re.M)))
    return count


def watch(proc, count, interval):
    """Polls `count` until it reaches EVENTS; returns the timings."""
    first_at = first = None
    last_change = time.monotonic()
    seen = 0
    while True:
        n = count()
        now = time.monotonic()
        if n > seen:
            seen, last_change = n, now
            if first_at is None:
                first_at, first = now, n
        if n >= EVENTS:
            cpu, rss = proc.cpu_seconds(), proc.peak_rss_mib()
            steady = (n - first) / (now - first_at) if now > first_at else float("nan")
            return {
                "events": n,
                "startup_s": first_at - proc.started,
                "steady_s": now - first_at,
                "steady_eps": steady,
                "whole_eps": n / (now - proc.started),
                "cpu_s": cpu,
                "rss_mib": rss,
            }
        if not proc.alive():
            raise RuntimeError(f"the process ended at {n} of {EVENTS} events:\n{proc.tail()}")
        if now - last_change > STALL_SECONDS:
            raise RuntimeError(f"no progress for {STALL_SECONDS} s at {n} of {EVENTS} events:\n{proc.tail()}")
        time.sleep(interval)


def check_ids(ids):
    ids = list(ids)
    unique = len(set(ids))
    return {"lines": len(ids), "missing": EVENTS - unique, "duplicated": len(ids) - unique}


def file_ids(path):
    paths = LineCounter(path).files()
    for p in sorted(paths):
        with open(p, "rb") as f:
            for line in f:
                yield json.loads(line)["id"]


class Bench:
    def __init__(self, work):
        self.work = work
        self.tag = f"peers{int(time.time())}"
        self.stream = self.tag
        self.settings = os.path.join(work, "pipeline.yaml")
        with open(self.settings, "w") as f:
            f.write(f"streams:\n  - name: {self.stream}\n    partitions: 6\n")
        self.seq = 0

    def name(self, what):
        self.seq += 1
        return f"{self.tag}_{what}_{self.seq}"

    def fill(self):
        port, mport = free_port(), free_port()
        ingest = Proc([f"{BIN}/sluice-ingest", "--listen", f"127.0.0.1:{port}", "--metrics-listen",
                       f"127.0.0.1:{mport}", "--settings", self.settings, "--create-topics",
                       "--read-events", "false", "--key-prefix", self.tag],
                      os.path.join(self.work, "ingest.log"))
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{mport}/readyz", timeout=1)
                    break
                except OSError:
                    if time.monotonic() > deadline or not ingest.alive():
                        raise RuntimeError(f"ingest did not become ready:\n{ingest.tail()}")
                    time.sleep(0.2)
            out = subprocess.run(
                [f"{BIN}/sluice-loadgen", "--target", f"http://127.0.0.1:{port}", "--stream", self.stream,
                 "--protocol", "http-batch", "--batch-size", "100", "--requests", str(EVENTS // 100),
                 "--concurrency", "16", "--duration", "900", "--status-interval", "0", "--json"],
                check=True, capture_output=True, text=True).stdout
        finally:
            ingest.stop()
        report = json.loads(out)
        if report["events_acknowledged"] != EVENTS:
            raise RuntimeError(f"the backlog has {report['events_acknowledged']} of {EVENTS} events")
        return report

    def collector(self, sink, group, *extra):
        mport = free_port()
        argv = [f"{BIN}/sluice-collector", "--settings", self.settings, "--streams", self.stream,
                "--group", group, "--sink", sink, "--key-prefix", group,
                "--metrics-listen", f"127.0.0.1:{mport}", *extra, *COLLECTOR_ARGS]
        return Proc(argv, os.path.join(self.work, f"{group}.log")), mport

    def connect(self, name, connector):
        worker = os.path.join(self.work, f"{name}.worker.properties")
        with open(worker, "w") as f:
            f.write("\n".join([
                f"bootstrap.servers={BROKERS}",
                "key.converter=org.apache.kafka.connect.storage.StringConverter",
                "value.converter=org.apache.kafka.connect.storage.StringConverter",
                f"offset.storage.file.filename={self.work}/{name}.offsets",
                f"listeners=http://127.0.0.1:{free_port()}",
                f"plugin.path={CONNECT_PLUGINS}",
            ]) + "\n")
        props = os.path.join(self.work, f"{name}.connector.properties")
        with open(props, "w") as f:
            f.write("\n".join(f"{k}={v}" for k, v in {"name": name, "tasks.max": "1",
                                                      "topics": self.stream, **connector}.items()) + "\n")
        # The JVM options of Kafka's own start scripts (kafka-run-class.sh, connect-standalone.sh).
        argv = ["java", "-Xms256M", "-Xmx2G", "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={ROOT}/benches/peers/log4j2.properties",
                "-cp", f"{CONNECT_LIB}/*", "org.apache.kafka.connect.cli.ConnectStandalone", worker, props]
        return Proc(argv, os.path.join(self.work, f"{name}.log"))

    # Each contender: start, watch, stop, verify. Returns the figures.

    def sluice_file(self):
        group = self.name("file")
        out = os.path.join(self.work, group)
        proc, _ = self.collector("file", group, "--record-directory", out)
        try:
            r = watch(proc, LineCounter(out), 0.02)
        finally:
            proc.stop()
        r.update(check_ids(file_ids(out)))
        subprocess.run(["rm", "-rf", out], check=True)
        return r

    def connect_file(self):
        name = self.name("connect_file")
        out = os.path.join(self.work, f"{name}.txt")
        proc = self.connect(name, {"connector.class": "org.apache.kafka.connect.file.FileStreamSinkConnector",
                                   "file": out})
        try:
            r = watch(proc, LineCounter(out), 0.02)
        finally:
            proc.stop()
        r.update(check_ids(file_ids(out)))
        os.remove(out)
        return r

    def watch_table(self, proc, table, id_expr):
        """Rows of `table` while `proc` writes them; then every event checked, once."""
        psql = Psql()
        try:
            r = watch(proc, lambda: psql.count(table), 0.1)
        finally:
            proc.stop()
        total = int(psql.one(f"SELECT count(*) FROM {table}"))
        unique = int(psql.one(f"SELECT count(DISTINCT {id_expr}) FROM {table}"))
        psql.one(f"DROP TABLE IF EXISTS {table}")
        psql.close()
        r.update({"lines": total, "missing": EVENTS - unique, "duplicated": total - unique})
        return r

    def sluice_postgres(self):
        group = self.name("pg")
        proc, _ = self.collector("postgres", group, "--table", group)
        return self.watch_table(proc, group, "id")

    def debezium_postgres(self):
        name = self.name("debezium")
        url = urllib.parse.urlparse(DATABASE_URL)
        proc = self.connect(name, {
            "connector.class": "io.debezium.connector.jdbc.JdbcSinkConnector",
            "connection.url": f"jdbc:postgresql://{url.hostname}:{url.port}{url.path}",
            "connection.username": url.username or "",
            "connection.password": url.password or "",
            "insert.mode": "upsert",
            "primary.key.mode": "kafka",
            "schema.evolution": "basic",
            "collection.name.format": name,
            # The events are schemaless JSON; the sink needs a struct: the whole event
            # becomes the text column `payload`.
            "transforms": "hoist",
            "transforms.hoist.type": "org.apache.kafka.connect.transforms.HoistField$Value",
            "transforms.hoist.field": "payload",
        })
        return self.watch_table(proc, name, "payload::jsonb->>'id'")

    def sluice_redis(self):
        group = self.name("redis")
        proc, mport = self.collector("redis", group)
        try:
            r = watch(proc, metric_counter(mport, "sluice_collector_events_written_total"), 0.05)
        finally:
            proc.stop()
        r.update(self.redis_ids(group))
        return r

    def redis_ids(self, prefix):
        """Every event's record is in Redis: its key exists (read in pipelined batches)."""
        port = urllib.parse.urlparse(REDIS_URL).port
        keys = subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern", f"{prefix}:{self.stream}:*"],
                              capture_output=True, text=True, check=True).stdout.split()
        subprocess.run(["sh", "-c", f"redis-cli -p {port} --scan --pattern '{prefix}:*' | "
                        f"xargs -r -n 1000 redis-cli -p {port} unlink >/dev/null"], check=True)
        return {"lines": len(keys), "missing": max(0, EVENTS - len(keys)), "duplicated": 0}

    def redis_benchmark(self):
        port = urllib.parse.urlparse(REDIS_URL).port
        out = subprocess.run(["redis-benchmark", "-p", str(port), "-P", "16", "-t", "set", "-n", "1000000", "--csv"],
                             capture_output=True, text=True, check=True).stdout
        rate = float(re.search(r'^"SET","([\d.]+)"', out, re.M).group(1))
        return {"events": 1000000, "steady_eps": rate, "lines": 1000000, "missing": 0, "duplicated": 0}


SCENARIO = {
    "file": ("Kafka → files", "sluice_file", "Kafka Connect FileStreamSink", "connect_file", 1.2),
    "postgres": ("Kafka → PostgreSQL", "sluice_postgres", "Kafka Connect + Debezium JDBC sink", "debezium_postgres", 2.0),
    "redis": ("Kafka → Redis", "sluice_redis", "redis-benchmark -P 16 SET (ceiling)", "redis_benchmark", 0.3),
}


def fmt(x, digits=0):
    return "–" if x is None or x != x else f"{x:,.{digits}f}"


def spread(values, digits=0):
    values = sorted(v for v in values if v is not None)
    if not values:
        return "–"
    mid = statistics.median(values)
    return f"{fmt(mid, digits)} ({fmt(values[0], digits)}–{fmt(values[-1], digits)})"


def main():
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    when = datetime.datetime.now(datetime.timezone.utc)
    raw = [f"# benches/peers.sh, {when:%Y-%m-%d %H:%M} UTC, commit {commit}{' (with local changes)' if dirty else ''}",
           f"", f"{os.cpu_count()} cores ({cpu}); EVENTS={EVENTS} RUNS={RUNS}; Kafka Connect {os.environ['KAFKA_VERSION']}, "
           f"Debezium JDBC {os.environ['DEBEZIUM_VERSION']}"
           + (f"; collector flags added: {' '.join(COLLECTOR_ARGS)}" if COLLECTOR_ARGS else ""), ""]
    with tempfile.TemporaryDirectory(prefix="sluice-peers-") as work:
        bench = Bench(work)
        log(f"filling {bench.stream} with {EVENTS} events through ingest")
        fill = bench.fill()
        raw.append(f"backlog: {EVENTS} events through ingest in {fill['seconds']:.1f} s, stream {bench.stream}")
        results = {}
        for scenario in SCENARIOS:
            title, ours, peer_name, peer, target = SCENARIO[scenario]
            results[scenario] = {"sluice": [], "peer": []}
            for i in range(RUNS):
                order = [("sluice", ours), ("peer", peer)]
                if i % 2:
                    order.reverse()
                for who, method in order:
                    if os.environ.get("ONLY", who) != who:
                        continue
                    log(f"{title}, run {i + 1}: {who}")
                    r = getattr(bench, method)()
                    results[scenario][who].append(r)
                    raw.append(f"{scenario} run {i + 1} {who}: {json.dumps(r, sort_keys=True)}")
                    log(f"  {fmt(r['steady_eps'])} events/s steady, {r['missing']} missing, {r['duplicated']} duplicated")
    head = ("| path | contender | steady events/s | whole run events/s | start-up s | CPU s | peak RSS MiB | "
            "missing / duplicated | Sluice / peer (target) |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    for scenario, r in results.items():
        title, _, peer_name, _, target = SCENARIO[scenario]
        ratios = [s["steady_eps"] / p["steady_eps"] for s, p in zip(r["sluice"], r["peer"])]
        for who, label in (("sluice", "sluice-collector (defaults)"), ("peer", peer_name)):
            runs = r[who]
            if not runs:
                continue
            lost = f"{sum(x['missing'] for x in runs)} / {sum(x['duplicated'] for x in runs)}"
            ratio = f"**{spread(ratios, 2)}** (≥ {target})" if who == "sluice" else ""
            rows.append(f"| {title} | {label} | {spread([x['steady_eps'] for x in runs])} | "
                        f"{spread([x.get('whole_eps') for x in runs])} | {spread([x.get('startup_s') for x in runs], 1)} | "
                        f"{spread([x.get('cpu_s') for x in runs], 1)} | {spread([x.get('rss_mib') for x in runs])} | "
                        f"{lost} | {ratio} |")
    table = head + "\n" + "\n".join(rows)
    print(table)
    raw += ["", table, ""]
    out_dir = os.path.join(ROOT, "docs", "bench-results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"peers-{when:%Y-%m-%d-%H%M}-{commit}.md")
    with open(path, "w") as f:
        f.write("\n".join(raw))
    log(f"raw output in {os.path.relpath(path, ROOT)}")
    # benches/run.sh puts the table into docs/benchmarks.md beside its own scenarios.
    if os.environ.get("PEERS_TABLE"):
        with open(os.environ["PEERS_TABLE"], "w") as f:
            f.write(f"{EVENTS:,} events, {RUNS} runs each.\n\n" + table
                    + f"\n\nRaw output of every run: [{os.path.basename(path)}](bench-results/{os.path.basename(path)}).\n")


if __name__ == "__main__":
    main()
