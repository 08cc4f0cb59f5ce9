#!/usr/bin/env bash
# Two builds of the server measured in one run with the same load, on SQLite: durable event
# ingest and empty command polls by `ozone-sim` over keep-alive connections against assigned
# devices spread over 8 outlets. For before/after figures of a change:
#
#   git worktree add /tmp/before <commit> && (cd /tmp/before && cargo build --release -p ozone)
#   bench/compare.sh /tmp/before/target/release/ozone [connections] [devices] [seconds]
#
# The second binary is this checkout's release build. Each line: build, load, requests per
# second, latency p50/p99/max (ms).
set -euo pipefail
cd "$(dirname "$0")/.."

before=${1:?path to the ozone binary to compare against}
connections=${2:-64}
devices=${3:-200}
seconds=${4:-10}
port=${OZONE_BENCH_PORT:-18775}
prefix=02:42:45:4E

cargo build --release --quiet -p ozone -p firmware-compat
after=./target/release/ozone
sim=./target/release/ozone-sim
work=$(mktemp -d)
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
export OZONE_LOG=warn OZONE_LIMIT_HANDSHAKES_PER_ADDR=0 OZONE_LIMIT_HANDSHAKES_PER_MAC=0 \
    OZONE_MQTT_ADDR=""

measure() { # label binary
    local label=$1 bin=$2 db="sqlite://$work/$1.db?mode=rwc"
    "$bin" --database-url "$db" migrate >/dev/null
    for i in $(seq 0 $((devices - 1))); do
        "$bin" --database-url "$db" device assign \
            "$(printf "$prefix:%02X:%02X" $((i >> 8)) $((i & 255)))" \
            --machine "M-$i" --outlet "Outlet $((i % 8))" >/dev/null
    done
    "$bin" --database-url "$db" --http-addr "127.0.0.1:$port" &
    server=$!
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
        sleep 0.05
    done
    for kind in ingest poll; do
        "$sim" "$kind" --url "http://127.0.0.1:$port" --connections "$connections" \
            --devices "$devices" --duration "$seconds" --warmup 2 --json --mac-prefix "$prefix" |
            python3 -c '
import json, sys
r, label = json.load(sys.stdin), sys.argv[1]
l, failed = r["latency_ms"], r["non_200"] + r["errors"]
print("%-22s %9.0f/s  p50 %7.2f  p99 %7.2f  max %7.2f ms  failed %d"
      % (label, r["rps"], l["p50"], l["p99"], l["max"], failed))
' "$label $kind"
    done
    kill -TERM "$server"
    wait "$server" 2>/dev/null || true
    server=
}

measure before "$before"
measure after "$after"
