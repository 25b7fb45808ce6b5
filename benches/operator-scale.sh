#!/usr/bin/env bash
# The operator with many pipelines: PipelineConfigs applied at once on the test control
# plane (scripts/k8s: a real kube-apiserver, kube-controller-manager and scheduler, kwok
# nodes whose pods become Ready without a kubelet) against the stack's Kafka broker.
#
#   benches/operator-scale.sh            (COUNTS="100 300" IDLE=120 to change the runs)
#   OPERATOR=/path/to/sluice-operator LABEL=before benches/operator-scale.sh
#                                        the same runs with another build of the operator
#
# For each count N: a fresh namespace, a fresh operator process (the release build, all
# namespaces, leader election on, as the chart runs it), then N pipelines in one
# `kubectl apply`. Each pipeline is the kv-store example with the stack's Redis as an
# external one (one stream of 3 partitions, ingest, one Redis collector, autoscalers,
# network policies: 3 topics and 8 children). Measured:
#   - the time from the apply until every pipeline's Ready condition is True;
#   - the operator's CPU seconds (user + system) and peak resident memory until then;
#   - Kafka connections the operator opened (TCP SYNs to the broker's port from the
#     operator's user, counted by an iptables rule: the operator runs as its own user);
#   - then IDLE seconds with nothing changing: reconciles per second (from the operator's
#     own counter), CPU seconds, and Kafka connections opened in that time.
# The pipelines are deleted afterwards (the operator deletes their topics) and the
# operator is stopped. The raw output goes to docs/bench-results/ with the date and commit;
# the table is printed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
counts="${COUNTS:-100 300}"
idle="${IDLE:-120}"
[ "$(id -u)" -eq 0 ] || { echo "needs root (iptables, a user for the operator)" >&2; exit 1; }

log() { printf '[scale] %s\n' "$*" >&2; }
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

scripts/setup >/dev/null
eval "$(scripts/k8s up)"
eval "$(scripts/stack up 2>/dev/null)"
if [ -n "${OPERATOR:-}" ]; then
  built="$OPERATOR"
else
  log "building the operator"
  cargo build --release --locked -q -p sluice-operator
  built="${CARGO_TARGET_DIR:-$root/target}/release/sluice-operator"
fi
kubectl apply --server-side --force-conflicts -f manifests/crd.yaml >/dev/null
kafka_port="${SLUICE_KAFKA_BROKERS##*:}"

work="$(mktemp -d)"
chmod 755 "$work"
# The operator's own user: iptables counts its connections by owner.
uid=65534
kubectl config view --raw --flatten >"$work/kubeconfig"
cp "$built" "$work/sluice-operator"
operator="$work/sluice-operator"
chmod 644 "$work/kubeconfig"
chain=SLUICE_SCALE_BENCH
iptables -N "$chain" 2>/dev/null || iptables -F "$chain"
iptables -A "$chain" -p tcp --dport "$kafka_port" --syn -m owner --uid-owner "$uid" -j RETURN
iptables -C OUTPUT -j "$chain" 2>/dev/null || iptables -I OUTPUT -j "$chain"
syns() { iptables -L "$chain" -v -x -n | awk 'NR==3 {print $1}'; }

pid=""
stop_operator() {
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=""
}
cleanup() {
  stop_operator
  iptables -D OUTPUT -j "$chain" 2>/dev/null || true
  iptables -F "$chain" 2>/dev/null || true
  iptables -X "$chain" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_seconds() { # user + system time of the operator
  python3 -c "import os,sys; f=open(f'/proc/{sys.argv[1]}/stat').read().rsplit(')',1)[1].split(); print(f'{(int(f[11])+int(f[12]))/os.sysconf(\"SC_CLK_TCK\"):.1f}')" "$pid"
}
peak_rss_mib() { awk '/^VmHWM/ {printf "%.0f", $2/1024}' "/proc/$pid/status"; }
reconciles() { # the operator's reconcile counter, every result
  curl -fsS "http://127.0.0.1:$metrics_port/metrics" | awk '/^sluice_operator_reconciles_total/ {s += $2} END {print s + 0}'
}
ready_count() {
  kubectl get pcfg -n "$ns" -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null | grep -c True || true
}

commit="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- operator/src services/core/src || echo '+changes')"
label="${LABEL:-$commit}"
rows=()
for n in $counts; do
  ns="sluice-scale-$n-$(date +%s)"
  # Room for every pod: ingest and a collector per pipeline, 110 pods a node.
  scripts/k8s nodes $(( (2 * n) / 100 + 2 )) 2>/dev/null
  kubectl create namespace "$ns" >/dev/null
  metrics_port="$(free_port)"
  log "N=$n: starting the operator"
  setpriv --reuid="$uid" --regid="$uid" --clear-groups env KUBECONFIG="$work/kubeconfig" HOME="$work" \
    SLUICE_LOG=warn "$operator" --metrics-listen "127.0.0.1:$metrics_port" \
    --external-metrics-listen "127.0.0.1:$(free_port)" --lease-namespace "$ns" \
    --lease-name "sluice-scale-bench" >"$work/operator-$n.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$metrics_port/readyz" >/dev/null 2>&1 && break; sleep 0.2; done
  python3 - "$n" "$SLUICE_KAFKA_BROKERS" "$SLUICE_REDIS_URL" >"$work/pipelines.yaml" <<'PY'
import sys
n, brokers, redis = int(sys.argv[1]), sys.argv[2], sys.argv[3]
for i in range(n):
    print(f"""---
apiVersion: sluice.dev/v1alpha1
kind: PipelineConfig
metadata: {{name: p{i:04d}}}
spec:
  kafka: {{bootstrapServers: "{brokers}"}}
  redis: {{mode: External, url: "{redis}"}}
  streams:
    - name: items
      topic: {{partitions: 3, replicationFactor: 1}}
      key: /id
  ingest:
    replicas: {{min: 1, max: 2}}
  collectors:
    - name: to-redis
      streams: [items]
      sink:
        redis: {{ttl: 24h}}
      autoscale: {{minReplicas: 1, maxReplicas: 2, lagPerReplica: 500}}""")
PY
  syn0="$(syns)"
  t0="$(now)"
  kubectl apply --server-side -n "$ns" -f "$work/pipelines.yaml" >/dev/null
  log "N=$n: applied; waiting for every pipeline to be Ready"
  ready=0
  deadline=$((SECONDS + 1800))
  while [ "$SECONDS" -lt "$deadline" ]; do
    ready="$(ready_count)"
    [ "$ready" -ge "$n" ] && break
    sleep 1
  done
  [ "$ready" -ge "$n" ] || { log "N=$n: only $ready Ready after 30 min"; tail -20 "$work/operator-$n.log" >&2; exit 1; }
  to_ready="$(elapsed "$t0")"
  cpu_ready="$(cpu_seconds)"
  rss_ready="$(peak_rss_mib)"
  syn_ready=$(( $(syns) - syn0 ))
  log "N=$n: all Ready in ${to_ready} s; idle for ${idle} s"
  r0="$(reconciles)"; c0="$(cpu_seconds)"; s0="$(syns)"
  sleep "$idle"
  r1="$(reconciles)"; c1="$(cpu_seconds)"; s1="$(syns)"
  idle_rate="$(python3 -c "print(f'{($r1 - $r0) / $idle:.2f}')")"
  idle_cpu="$(python3 -c "print(f'{$c1 - $c0:.1f}')")"
  idle_syn=$((s1 - s0))
  rss_peak="$(peak_rss_mib)"
  rows+=("| $n | $to_ready | $cpu_ready | $rss_peak | $syn_ready | $idle_rate | $idle_cpu | $idle_syn |")
  log "N=$n: deleting the pipelines"
  kubectl delete pcfg --all -n "$ns" --wait=true --timeout=15m >/dev/null || log "N=$n: pipelines not deleted in 15 min"
  stop_operator
  kubectl delete namespace "$ns" --wait=false >/dev/null
done

out="docs/bench-results/operator-scale-$(date -u +%Y-%m-%d)-$label.md"
mkdir -p docs/bench-results
{
  echo "Operator at scale ($label): $(date -u +%Y-%m-%dT%H:%MZ), tree at $commit, operator $built, $(nproc) cores, idle window ${idle} s"
  echo
  echo "| pipelines | s until all Ready | CPU s until Ready | peak RSS MiB | Kafka connections until Ready | reconciles/s idle | CPU s idle | Kafka connections idle |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee "$out"
log "written to $out"
