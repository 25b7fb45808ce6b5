#!/usr/bin/env bash
# Sluice's collector beside the tools a user would pick instead: the same topic, the same
# machine, the same run, each scenario RUNS times alternating with its peer.
#
#   benches/peers.sh          (EVENTS=2000000 RUNS=3 SCENARIOS="file postgres redis";
#                              COLLECTOR_ARGS="--batch-size 2000" to try other settings)
#
#   file      collector --sink file (shipped defaults)   vs Kafka Connect FileStreamSink
#   postgres  collector --sink postgres                   vs Kafka Connect + Debezium JDBC sink
#   redis     collector --sink redis                      vs redis-benchmark -P 16 SET (ceiling)
#
# The peers come from Maven Central like the broker (cached under .cache/connect). Prints a
# Markdown table (median and spread of the runs) and keeps the raw output of every run in
# docs/bench-results/peers-<date>-<time>-<commit>.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup >/dev/null
eval "$(scripts/stack up 2>/dev/null)"
kafka_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' benches/peers/pom.xml)"
debezium_version=3.6.0.Final
connect_lib="$root/.cache/connect/$kafka_version/lib"
plugins="$root/.cache/connect/plugins"
if [ ! -f "$connect_lib/.complete" ]; then
  echo "[peers] resolving Kafka Connect $kafka_version from Maven Central" >&2
  rm -rf "$connect_lib.tmp" && mkdir -p "$connect_lib.tmp"
  mvn -q -B -f benches/peers/pom.xml \
    org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
    -Dstyle.color=never -DoutputDirectory="$connect_lib.tmp" -DincludeScope=runtime >&2
  touch "$connect_lib.tmp/.complete"
  rm -rf "$connect_lib" && mv "$connect_lib.tmp" "$connect_lib"
fi
if [ ! -f "$plugins/.complete-$debezium_version" ]; then
  echo "[peers] resolving the Debezium JDBC sink $debezium_version plugin from Maven Central" >&2
  rm -rf "$plugins" && mkdir -p "$plugins"
  mvn -q -B org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy \
    -Dstyle.color=never -Dartifact="io.debezium:debezium-connector-jdbc:$debezium_version:tar.gz:plugin" \
    -DoutputDirectory="$plugins" >&2
  tar -xzf "$plugins"/debezium-connector-jdbc-*-plugin.tar.gz -C "$plugins"
  rm "$plugins"/*.tar.gz
  touch "$plugins/.complete-$debezium_version"
fi
command -v redis-benchmark >/dev/null || { echo "redis-benchmark not found: run scripts/setup" >&2; exit 1; }

# SLUICE_BIN=<dir> runs binaries built elsewhere (another commit, for a before/after).
if [ -z "${SLUICE_BIN:-}" ]; then
  echo "[peers] building release binaries" >&2
  cargo build --release --locked --bins -q
fi
export SLUICE_BIN="${SLUICE_BIN:-${CARGO_TARGET_DIR:-$root/target}/release}"
export CONNECT_LIB="$connect_lib" CONNECT_PLUGINS="$plugins" KAFKA_VERSION="$kafka_version" DEBEZIUM_VERSION="$debezium_version"
exec python3 benches/peers/run.py "$@"
