#!/usr/bin/env bash
# Durable event ingest, measured: the release server on a fresh SQLite file, loaded by
# `ozone-sim ingest` over keep-alive connections, once with group commit (the default) and once
# committing every event alone (OZONE_INGEST_BATCH_MAX=1), in the same run.
#
#   bench/ingest.sh [connections] [devices] [seconds]      (defaults: 64 64 10)
#   OZONE_BENCH_ASSIGNED=1 bench/ingest.sh …
#       the devices are first assigned to machines spread over 8 outlets, so every event is
#       attributed to a machine and an outlet, as in a deployed fleet
#   OZONE_BENCH_CLIENT=wrk bench/ingest.sh [connections] _ [seconds]
#       the same with wrk (Debian package `wrk`) and bench/events.lua: one device, two threads
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
    local prefix_args=()
    if [ "${OZONE_BENCH_ASSIGNED:-}" = 1 ]; then
        for i in $(seq 0 $((devices - 1))); do
            ./target/release/ozone --database-url "sqlite://$work/bench.db?mode=rwc" \
                device assign "$(printf '02:42:45:4E:%02X:%02X' $((i >> 8)) $((i & 255)))" \
                --machine "M-$i" --outlet "Outlet $((i % 8))" >/dev/null
        done
        prefix_args=(--mac-prefix 02:42:45:4E)
    fi
    if [ "${OZONE_BENCH_CLIENT:-}" = wrk ]; then
        local handshake
        handshake=$(curl -sf -X POST "http://127.0.0.1:$port/api/handshake/" \
            -H 'Content-Type: application/json' -d '{"mac": "02:00:00:00:be:01"}')
        result=$(TOKEN=$(sed -E 's/.*"token":"([0-9a-f]+)".*/\1/' <<<"$handshake") \
            DEVICE_ID="02:00:00:00:BE:01" \
            wrk -t2 -c"$connections" -d"${seconds}s" --latency -s bench/events.lua \
            "http://127.0.0.1:$port" | tr '\n' ' ')
        result=$(sed -E 's/.*Requests\/sec: *([0-9.]+).*/{"rps":\1}/' <<<"$result")" $(grep -oE 'p50 [0-9.]+ ms, p99 [0-9.]+ ms|non-2xx: [0-9]+' <<<"$result" | tr '\n' ' ')"
    else
        result=$(./target/release/ozone-sim ingest --url "http://127.0.0.1:$port" \
            --connections "$connections" --devices "$devices" --duration "$seconds" \
            --warmup 2 --json "${prefix_args[@]}")
    fi
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
