#!/usr/bin/env bash
# Durable event ingest and empty command polls on SQLite and on PostgreSQL (one replica, then
# two replicas sharing the load), in one run, with the same load: `ozone-sim` over keep-alive
# connections against assigned devices spread over 8 outlets.
#
#   bench/backends.sh [postgres-admin-url] [connections] [devices] [seconds]
#       defaults: postgres://postgres:postgres@127.0.0.1:5432/postgres 64 200 10
#   OZONE_BENCH_ROUNDS=n (default 3): the three backends are measured in turn, n rounds, each
#   on a fresh copy of one prepared database, so that a noisy moment of a shared machine
#   weighs on one round and not on one backend. Without a reachable PostgreSQL only SQLite is
#   measured.
#
# Each line: round, backend, load, events or polls per second, latency p50/p99/max (ms); then
# per load the median over the rounds of each backend's rate, p99, and rate against SQLite's
# in the same round.
set -euo pipefail
cd "$(dirname "$0")/.."

admin=${1:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
connections=${2:-64}
devices=${3:-200}
seconds=${4:-10}
port=${OZONE_BENCH_PORT:-18765}
rounds=${OZONE_BENCH_ROUNDS:-3}
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

line() { # round backend kind json...
    python3 - "$work/results" "$@" <<'PY'
import json, sys
results, round_, backend, kind = sys.argv[1:5]
runs = [json.loads(a) for a in sys.argv[5:]]
rps = sum(r["rps"] for r in runs)
lat = lambda k: max(r["latency_ms"][k] for r in runs)
errors = sum(r["non_200"] + r["errors"] for r in runs)
label = f"{round_}  {backend} {kind}"
print(f"{label:<38} {rps:>9.0f}/s  p50 {lat('p50'):7.2f}  p99 {lat('p99'):7.2f}  max {lat('max'):7.2f} ms  failed {errors}")
with open(results, "a") as out:
    out.write(json.dumps({"round": round_, "backend": backend, "kind": kind, "rps": rps, "p99": lat("p99")}) + "\n")
PY
}

summary() {
    python3 - "$work/results" <<'PY'
import json, statistics, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
rate = {(r["round"], r["backend"], r["kind"]): r["rps"] for r in rows}
n = len({r["round"] for r in rows})
print(f"median of {n} round{'s' if n > 1 else ''}:")
for kind in dict.fromkeys(r["kind"] for r in rows):
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind and r["backend"] == backend]
        ratios = [r["rps"] / rate[(r["round"], "sqlite", kind)] for r in mine
                  if rate.get((r["round"], "sqlite", kind))]
        line = (f"  {backend + ' ' + kind:<36} {statistics.median(r['rps'] for r in mine):>9.0f}/s"
                f"  p99 {statistics.median(r['p99'] for r in mine):7.2f} ms")
        if backend != "sqlite" and ratios:
            line += (f"  {statistics.median(ratios):.2f}x SQLite"
                     f" (rounds: {' '.join(f'{x:.2f}' for x in ratios)})")
        print(line)
PY
}

# One server per url; the connections and the devices are split between them, each device
# talking to one replica as a deployed device does (replica k uses the MAC prefix
# ${prefixes[k]}).
prefixes=("$prefix" 02:42:45:4F)
measure() { # round backend url...
    local round=$1 label=$2
    shift 2
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
        line "$round" "$label" "$kind" "${outs[@]}"
    done
    stop_all
}

# One prepared database per backend; each run gets a fresh copy of it.
assign_all "sqlite://$work/template.db?mode=rwc"
postgres=
admin_sql() { PGOPTIONS="-c client_min_messages=warning" psql -q "$admin" "$@"; }
if admin_sql -c "SELECT 1" >/dev/null 2>&1; then
    postgres=1
    template="ozone_bench_$$_template" db="ozone_bench_$$"
    dropped() {
        admin_sql -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" \
            -c "DROP DATABASE IF EXISTS $template WITH (FORCE)"
    }
    trap 'cleanup; dropped' EXIT
    admin_sql -c "DROP DATABASE IF EXISTS $template" -c "CREATE DATABASE $template"
    assign_all "${admin%/*}/$template"
    assign_all "${admin%/*}/$template" "${prefixes[1]}" $((devices / 2))
    pg="${admin%/*}/$db"
    fresh_pg() {
        admin_sql -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db TEMPLATE $template"
    }
else
    echo "PostgreSQL at $admin does not answer: measured SQLite only" >&2
fi

for round in $(seq "$rounds"); do
    rm -f "$work"/bench.db*
    for file in "$work"/template.db*; do cp "$file" "$work/bench${file##*/template}"; done
    measure "$round" "sqlite" "sqlite://$work/bench.db?mode=rwc"
    if [ -n "$postgres" ]; then
        fresh_pg
        measure "$round" "postgres, 1 replica" "$pg"
        fresh_pg
        measure "$round" "postgres, 2 replicas" "$pg" "$pg"
    fi
done
summary
