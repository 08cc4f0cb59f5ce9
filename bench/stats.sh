#!/usr/bin/env bash
# Usage statistics and exports at scale, on SQLite: seeds a fleet of 1,000 devices on 1,000
# machines in 50 outlets with N events over D days (through the rollup code the ingest path
# uses), then prints the latency of the stats queries and a full CSV export's rows/s and peak
# memory. The seeded database is kept and reused by later runs with the same N and D.
#
#   bench/stats.sh [events] [days]         (defaults: 10000000 365)
#   OZONE_BENCH_DB=/path/file.db bench/stats.sh …
set -euo pipefail
cd "$(dirname "$0")/.."

events=${1:-10000000}
days=${2:-365}
db=${OZONE_BENCH_DB:-target/bench-stats-$events-$days.db}

cargo bench --bench stats --no-run --quiet
step() { cargo bench --quiet --bench stats -- "$@" --db "$db"; }
if [ ! -f "$db" ]; then
    rm -f "$db.partial"*
    cargo bench --quiet --bench stats -- seed --events "$events" --days "$days" --db "$db.partial"
    mv "$db.partial" "$db"
    rm -f "$db.partial"-*
fi
step query
step export
