#!/usr/bin/env bash
# Durable event ingest, measured: the release server on a fresh SQLite file, loaded by
# `ozone-sim ingest` over keep-alive connections, once with group commit (the default) and once
# committing every event alone (OZONE_INGEST_BATCH_MAX=1), in the same run.
#
#   bench/ingest.sh [connections] [devices] [seconds]      (defaults: 64 64 10)
set -euo pipefail
cd "$(dirname "$0")/.."

connections=${1:-64}
devices=${2:-64}
seconds=${3:-10}
port=${OZONE_BENCH_PORT:-18765}

cargo build --release --quiet -p ozone -p firmware-compat
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

run() {
    local label=$1 batch=$2
    rm -f "$work"/bench.db*
    OZONE_INGEST_BATCH_MAX=$batch OZONE_LOG=warn ./target/release/ozone \
        --database-url "sqlite://$work/bench.db?mode=rwc" --http-addr "127.0.0.1:$port" &
    server=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.1
    done
    local result
    trap 'kill "$server" 2>/dev/null' RETURN
    result=$(./target/release/ozone-sim ingest --url "http://127.0.0.1:$port" \
        --connections "$connections" --devices "$devices" --duration "$seconds" --warmup 2 --json)
    kill -TERM "$server"
    wait "$server" || true
    echo "$label $result"
}

group=$(run group-commit 1024)
single=$(run commit-per-event 1)
echo "$group"
echo "$single"
rps() { sed -E 's/.*"rps":([0-9.]+).*/\1/' <<<"$1"; }
awk -v g="$(rps "$group")" -v s="$(rps "$single")" \
    'BEGIN { printf "group commit: %.0f events/s, commit per event: %.0f events/s, ratio %.1fx\n", g, s, g / s }'
