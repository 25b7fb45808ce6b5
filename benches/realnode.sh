#!/usr/bin/env bash
# Collectors in real pods on the real node (scripts/realnode): how fast one backlog drains
# with 1, 2, 3 and 6 collector replicas, and how quickly the HorizontalPodAutoscaler
# follows the lag.
#
#   benches/realnode.sh            (EVENTS=1000000 to change the backlog)
#
# For each replica count: a pipeline like manifests/examples/kv-store.yaml (one stream of
# 6 partitions into the pipeline's managed Redis) without its collector; EVENTS events
# posted through ingest's NodePort by sluice-loadgen (batches of 1,000, acknowledged by
# Kafka); then the collector is added with that many replicas, and the lag that the
# operator serves through the apiserver is sampled until it is 0. The drain rate is the
# backlog divided by the time from all replicas Ready to lag 0 (so it includes the group's
# join; the pods' start is reported apart). Then the same backlog with the example's autoscaling (at most 6
# replicas, lagPerReplica 500, the default scale-down window of 120 s): the time from the
# collector's arrival, with the lag already far over the target, to each change of the
# Deployment's replicas and to those replicas being Ready, and back down.
#
# The broker, the node's control plane, ingest, the collectors, Redis and this script share
# the machine's cores; the figures say how the parts scale on it, not what more machines do.
# Prints Markdown tables and writes them, with the date, commit and machine, into
# docs/benchmarks.md (section "Collectors on the real node"). Leaves the node, the stack and
# the chart running.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
events="${EVENTS:-1000000}"
batch=1000

log() { printf '[bench] %s\n' "$*" >&2; }
now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
seconds_since() { local s; s="$(since "$1")"; echo "${s%.*}"; }

scripts/setup >/dev/null
eval "$(scripts/realnode up)"
export SLUICE_STACK_KAFKA_POD_LISTENER
eval "$(scripts/stack up 2>/dev/null)"
log "building the release binaries and the images"
cargo build --workspace --bins --locked --release -q
scripts/realnode images
scripts/realnode chart
eval "$(scripts/k8s env)"
export KUBECONFIG="$SLUICE_REALNODE_KUBECONFIG"
loadgen="${CARGO_TARGET_DIR:-$root/target}/release/sluice-loadgen"
ns=sluice-bench
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply --server-side -f - >/dev/null
kubectl label namespace "$ns" --overwrite pod-security.kubernetes.io/enforce=restricted >/dev/null

lag() { # pipeline -> the collector's lag, or nothing
  kubectl get --raw "/apis/external.metrics.k8s.io/v1beta1/namespaces/$ns/sluice_consumer_lag?labelSelector=pipeline%3D$1%2Ccollector%3Dto-redis" 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["items"][0]["value"])' 2>/dev/null || true
}

# pipeline NAME STREAM: the pipeline without its collector, Ready, its ingest on a NodePort;
# prints the ingest URL.
pipeline() {
  local name=$1 stream=$2
  kubectl apply --server-side -n "$ns" -f - >/dev/null <<EOF
apiVersion: sluice.dev/v1alpha1
kind: PipelineConfig
metadata: {name: $name}
spec:
  kafka: {bootstrapServers: "$SLUICE_STACK_KAFKA_POD_BROKERS"}
  redis: {mode: Managed, replicas: 1}
  streams:
    - {name: $stream, topic: {partitions: 6, replicationFactor: 1}, key: /id}
  topicDeletionPolicy: Delete
---
apiVersion: v1
kind: Service
metadata: {name: $name-ingest-nodeport}
spec:
  type: NodePort
  selector: {app.kubernetes.io/instance: $name, app.kubernetes.io/component: ingest}
  ports: [{name: http, port: 8080, targetPort: http}]
EOF
  kubectl wait -n "$ns" --for=condition=Ready "pipelineconfig/$name" --timeout=300s >/dev/null
  echo "http://$SLUICE_REALNODE_NODEPORT_HOST:$(kubectl get svc -n "$ns" "$name-ingest-nodeport" -o jsonpath='{.spec.ports[0].nodePort}')"
}

backlog() { # url stream: posts until Kafka acknowledged all the events
  local acked=0 got tries=0
  while [ "$acked" -lt "$events" ]; do
    [ "$tries" -lt 20 ] || { log "ingest at $1 does not take events"; exit 1; }
    tries=$((tries + 1))
    got="$("$loadgen" --target "$1" --allow-remote --stream "$2" --protocol http-batch --batch-size "$batch" \
      --requests $(((events - acked) / batch)) --concurrency 4 --json 2>/dev/null |
      python3 -c 'import json,sys; print(json.load(sys.stdin)["events_acknowledged"])')"
    acked=$((acked + got))
    [ "$acked" -ge "$events" ] || sleep 1
  done
}

add_collector() { # name stream spec-fields (JSON)
  kubectl patch pipelineconfig -n "$ns" "$1" --type merge -p \
    "{\"spec\":{\"collectors\":[{\"name\":\"to-redis\",\"streams\":[\"$2\"],\"sink\":{\"redis\":{}},$3}]}}" >/dev/null
}

remove() {
  kubectl delete pipelineconfig -n "$ns" "$1" --wait=true --timeout=120s >/dev/null
  kubectl delete service -n "$ns" "$1-ingest-nodeport" --ignore-not-found >/dev/null
}

rows=()
base_rate=""
for replicas in 1 2 3 6; do
  name="drain-$replicas-$(date +%s)"
  stream="drain$replicas$(date +%s)"
  url="$(pipeline "$name" "$stream")"
  log "$replicas replicas: posting $events events"
  backlog "$url" "$stream"
  added="$(now)"
  add_collector "$name" "$stream" "\"replicas\":$replicas"
  ready="" zero=""
  while [ -z "$zero" ]; do
    if [ -z "$ready" ] &&
      [ "$(kubectl get deploy -n "$ns" "$name-collector-to-redis" -o jsonpath='{.status.readyReplicas}' 2>/dev/null)" = "$replicas" ]; then
      ready="$(now)"
    fi
    [ -n "$ready" ] && [ "$(lag "$name")" = 0 ] && zero="$(now)"
    [ "$(seconds_since "$added")" -lt 600 ] || { log "no drain within 600 s"; exit 1; }
    sleep 0.2
  done
  start_s="$(python3 -c "print(f'{$ready - $added:.1f}')")"
  drain_s="$(python3 -c "print(f'{$zero - $ready:.1f}')")"
  rate="$(python3 -c "print(round($events / max($zero - $ready, 0.1)))")"
  [ -n "$base_rate" ] || base_rate="$rate"
  ratio="$(python3 -c "print(f'{$rate / $base_rate:.2f}')")"
  rows+=("| $replicas | $events | $start_s | $drain_s | $rate | $ratio |")
  log "${rows[-1]}"
  remove "$name"
done

log "autoscaling: posting $events events"
name="scale-$(date +%s)"
stream="scale$(date +%s)"
url="$(pipeline "$name" "$stream")"
backlog "$url" "$stream"
added="$(now)"
add_collector "$name" "$stream" '"autoscale":{"minReplicas":1,"maxReplicas":6,"lagPerReplica":500}'
steps=()
last="" drained=""
deployment="$name-collector-to-redis"
while :; do
  state="$(kubectl get deploy -n "$ns" "$deployment" -o jsonpath='{.spec.replicas} {.status.readyReplicas}' 2>/dev/null || true)"
  spec="${state%% *}" ready="${state#* }"
  [ -n "$ready" ] && [ "$ready" != "$state" ] || ready=0
  l="$(lag "$name")"
  [ "$l" = 0 ] && [ -z "$drained" ] && { drained="$(since "$added")"; steps+=("| $drained | lag 0 | $spec | $ready |"); }
  if [ -n "$spec" ] && [ "$spec $ready" != "$last" ]; then
    steps+=("| $(since "$added") | ${l:-?} | $spec | $ready |")
    last="$spec $ready"
  fi
  [ -n "$drained" ] && [ "$spec" = 1 ] && [ "$ready" = 1 ] && break
  [ "$(seconds_since "$added")" -lt 900 ] || { log "no scale-down within 900 s"; break; }
  sleep 0.5
done
remove "$name"

cores="$(nproc)"
table="$(
  echo "A backlog of $events events (sluice-loadgen's visit reports) on a 6-partition topic, drained into the pipeline's managed Redis by a fixed number of collector pods:"
  echo
  echo "| replicas | events | pods start s | join + drain s | events/s | vs 1 replica |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "The same backlog with autoscaling (lagPerReplica 500, at most 6, scale-down window 120 s), from the collector's arrival:"
  echo
  echo "| s | lag | replicas wanted | ready |"
  echo "|---|---|---|---|"
  printf '%s\n' "${steps[@]}"
)"
echo "$table"

doc=docs/benchmarks.md
section="## Collectors on the real node"
header="$section

\`benches/realnode.sh\`, $(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD), on a machine with $cores cores shared by
the broker, the node's control plane, ingest, every collector pod, Redis and the load
client: the figures show how collectors scale on this machine, and more replicas than cores
mostly share the same two cores.
"
python3 - "$doc" "$section" "$header" "$table" <<'EOF'
import sys
path, section, header, table = sys.argv[1:]
text = open(path).read() if __import__("os").path.exists(path) else ""
block = header + "\n" + table + "\n"
if section in text:
    start = text.index(section)
    rest = text[start + len(section):]
    end = rest.find("\n## ")
    text = text[:start] + block + (rest[end + 1:] if end >= 0 else "")
else:
    text = text.rstrip("\n") + "\n\n" + block
open(path, "w").write(text)
EOF
log "written to $doc"
