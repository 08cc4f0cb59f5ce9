#!/usr/bin/env bash
# Durable event ingest and empty command polls on SQLite and on PostgreSQL (one replica, then
# two replicas sharing the load), in one run, with the same load: `ozone-sim` over keep-alive
# connections against assigned devices spread over 8 outlets.
#
#   bench/backends.sh [postgres-admin-url] [connections] [devices] [seconds]
#       defaults: postgres://postgres:postgres@127.0.0.1:5432/postgres 64 200 10
#   A fresh database is made on that server for each run and dropped after it. Without a
#   reachable PostgreSQL only SQLite is measured.
#
# Each line: backend, load, events or polls per second, latency p50/p99/max (ms).
set -euo pipefail
cd "$(dirname "$0")/.."

admin=${1:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
connections=${2:-64}
devices=${3:-200}
seconds=${4:-10}
port=${OZONE_BENCH_PORT:-18765}
prefix=02:42:45:4E

cargo build --release --quiet -p ozone -p firmware-compat
ozone=./target/release/ozone
sim=./target/release/ozone-sim
work=$(mktemp -d)
servers=()
cleanup() {
    for pid in "${servers[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# Limits sized for a fleet behind one address: the load generator is one client.
export OZONE_LOG=warn OZONE_LIMIT_HANDSHAKES_PER_ADDR=0 OZONE_LIMIT_HANDSHAKES_PER_MAC=0 \
    OZONE_MQTT_ADDR=""

start() { # url port
    "$ozone" --database-url "$1" --http-addr "127.0.0.1:$2" &
    servers+=($!)
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then return; fi
        sleep 0.05
    done
    echo "server on port $2 did not start" >&2
    exit 1
}

stop_all() {
    for pid in "${servers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${servers[@]}"; do wait "$pid" 2>/dev/null || true; done
    servers=()
}

assign_all() { # url [prefix [count]]
    "$ozone" --database-url "$1" migrate >/dev/null
    local pre=${2:-$prefix} count=${3:-$devices}
    for i in $(seq 0 $((count - 1))); do
        "$ozone" --database-url "$1" device assign \
            "$(printf "$pre:%02X:%02X" $((i >> 8)) $((i & 255)))" \
            --machine "M-$pre-$i" --outlet "Outlet $((i % 8))" >/dev/null
    done
}

line() { # label json...
    local label=$1
    shift
    python3 - "$label" "$@" <<'PY'
import json, sys
label, runs = sys.argv[1], [json.loads(a) for a in sys.argv[2:]]
rps = sum(r["rps"] for r in runs)
lat = lambda k: max(r["latency_ms"][k] for r in runs)
errors = sum(r["non_200"] + r["errors"] for r in runs)
print(f"{label:<34} {rps:>9.0f}/s  p50 {lat('p50'):7.2f}  p99 {lat('p99'):7.2f}  max {lat('max'):7.2f} ms  failed {errors}")
PY
}

# One server per url; the connections and the devices are split between them, each device
# talking to one replica as a deployed device does (replica k uses the MAC prefix
# ${prefixes[k]}).
prefixes=("$prefix" 02:42:45:4F)
measure() { # label url...
    local label=$1
    shift
    local urls=("$@") n=$#
    local per=$((connections / n)) share=$((devices / n)) p=$port
    for url in "${urls[@]}"; do start "$url" "$p"; p=$((p + 1)); done
    for kind in ingest poll; do
        local outs=() pids=() p=$port k=0
        for _ in "${urls[@]}"; do
            "$sim" "$kind" --url "http://127.0.0.1:$p" --connections "$per" --devices "$share" \
                --duration "$seconds" --warmup 2 --json --mac-prefix "${prefixes[k]}" >"$work/out.$p" &
            k=$((k + 1))
            pids+=($!)
            p=$((p + 1))
        done
        for pid in "${pids[@]}"; do wait "$pid"; done
        p=$port
        for _ in "${urls[@]}"; do outs+=("$(cat "$work/out.$p")"); p=$((p + 1)); done
        line "$label $kind" "${outs[@]}"
    done
    stop_all
}

sqlite="sqlite://$work/bench.db?mode=rwc"
assign_all "$sqlite"
measure "sqlite" "$sqlite"

if psql -q "$admin" -c "SELECT 1" >/dev/null 2>&1; then
    db="ozone_bench_$$"
    psql -q "$admin" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db"
    pg="${admin%/*}/$db"
    assign_all "$pg"
    assign_all "$pg" "${prefixes[1]}" $((devices / 2))
    measure "postgres, 1 replica" "$pg"
    measure "postgres, 2 replicas" "$pg" "$pg"
    psql -q "$admin" -c "DROP DATABASE $db"
else
    echo "PostgreSQL at $admin does not answer: measured SQLite only" >&2
fi
