#!/usr/bin/env bash
# The MQTT channel, measured on this machine (load generator included), in one run:
#   1. durable MQTT ingest: events/s acknowledged on events/ack after their commit;
#   2. command push latency p50/p99, creation to receipt, with N devices connected;
#   3. the server's RSS with 10,000 idle device connections: at start, after the fleet's
#      handshakes, as it connected and after a keep-alive round; the cost per connection;
#   4. raw QoS 1 publish rate of the same client load through Ozone's edge and through
#      Mosquitto 2 (started here on a free port), and their ratio.
#
#   bench/mqtt.sh [devices] [seconds]      (defaults: 1000 10)
#   OZONE_BENCH_IDLE=10000                 idle connections for the RSS figure
#   OZONE_BENCH_IDLE_KEEP_ALIVE=20         their keep-alive, seconds
set -euo pipefail
cd "$(dirname "$0")/.."

devices=${1:-1000}
seconds=${2:-10}
idle=${OZONE_BENCH_IDLE:-10000}
idle_keep_alive=${OZONE_BENCH_IDLE_KEEP_ALIVE:-20}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
http_port=$(free_port)
mqtt_port=$(free_port)

cargo build --release --quiet -p ozone -p firmware-compat
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
# Enough descriptors for the idle fleet on both ends.
ulimit -n "$(ulimit -Hn)"

# The whole simulated fleet comes from one address: no handshake limits.
start_ozone() {
    rm -f "$work"/bench.db*
    OZONE_LOG=warn OZONE_LIMIT_HANDSHAKES_PER_ADDR=0 OZONE_LIMIT_HANDSHAKES_PER_MAC=0 \
        ./target/release/ozone --database-url "sqlite://$work/bench.db?mode=rwc" \
        --http-addr "127.0.0.1:$http_port" --mqtt-addr "127.0.0.1:$mqtt_port" &
    server=$!
    pids+=("$server")
    for _ in $(seq 200); do
        curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1 && return
        sleep 0.1
    done
    echo "ozone did not start" >&2
    exit 1
}
stop_ozone() { kill -TERM "$server"; wait "$server" || true; }
rss_mb() { awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
sim() { ./target/release/ozone-sim mqtt --url "http://127.0.0.1:$http_port" "$@"; }

echo "== durable MQTT ingest ($devices devices, ${seconds}s)"
start_ozone
ingest=$(sim --mqtt "127.0.0.1:$mqtt_port" --mode ingest --devices "$devices" \
    --duration "$seconds" --window 8 --json)
echo "$ingest"
stop_ozone

echo "== idle connections ($idle)"
# The server's RSS at start (empty database), after the fleet's HTTP handshakes (devices
# created, tokens issued), as the last of the fleet has connected over MQTT, and after a
# keep-alive round of the idle fleet (every device has pinged once; what the connect burst
# left behind has been given back by then). The last is the figure held against the target;
# the cost per connection is the difference to the handshakes' figure.
start_ozone
start_rss=$(rss_mb "$server")
sim --mqtt "127.0.0.1:$mqtt_port" --mode idle --devices "$idle" --keep-alive "$idle_keep_alive" \
    --pause-after-handshakes 3 --duration $((idle_keep_alive * 2 + 30)) >/dev/null 2>"$work/idle.err" &
simpid=$!
pids+=("$simpid")
for _ in $(seq 1200); do
    grep -q 'handshakes done' "$work/idle.err" && break
    sleep 0.1
done
sleep 1
handshakes_rss=$(rss_mb "$server")
for _ in $(seq 1200); do
    n=$(ss -Htn state established "( sport = :$mqtt_port )" | wc -l)
    [ "$n" -ge "$idle" ] && break
    sleep 0.1
done
sleep 1
connected_rss=$(rss_mb "$server")
sleep $((idle_keep_alive + 5))
n=$(ss -Htn state established "( sport = :$mqtt_port )" | wc -l)
idle_rss=$(rss_mb "$server")
per_conn=$(awk -v a="$idle_rss" -v b="$handshakes_rss" -v n="$n" 'BEGIN { printf "%.1f", (a - b) * 1024 / n }')
echo "{\"idle_connections\":$n,\"keep_alive_s\":$idle_keep_alive,\"rss_mb_start\":$start_rss,\"rss_mb_after_handshakes\":$handshakes_rss,\"rss_mb_connected\":$connected_rss,\"rss_mb_idle\":$idle_rss,\"kb_per_connection\":$per_conn}"
kill "$simpid" 2>/dev/null || true
wait "$simpid" || true
stop_ozone

echo "== raw QoS 1 publish rate, same load ($devices clients, ${seconds}s)"
start_ozone
ozone_raw=$(sim --mqtt "127.0.0.1:$mqtt_port" --mode raw --devices "$devices" \
    --duration "$seconds" --window 8 --json)
stop_ozone
mosq_port=$(free_port)
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 0\npersistence false\n' \
    "$mosq_port" >"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >/dev/null 2>&1 &
mosq=$!
pids+=("$mosq")
for _ in $(seq 50); do
    (exec 3<>"/dev/tcp/127.0.0.1/$mosq_port") 2>/dev/null && break
    sleep 0.1
done
mosq_raw=$(sim --mqtt "127.0.0.1:$mosq_port" --mode raw --anonymous --devices "$devices" \
    --duration "$seconds" --window 8 --json)
kill "$mosq"
echo "ozone $ozone_raw"
echo "mosquitto $mosq_raw"

echo "== command push latency ($devices devices connected)"
OZONE_BENCH_DEVICES=$devices cargo test --release --quiet --test api -- --ignored --nocapture \
    command_push_latency 2>/dev/null | grep 'command push'

rate() { sed -E 's/.*"rate":([0-9.]+).*/\1/' <<<"$1"; }
echo
echo "durable MQTT ingest: $(rate "$ingest") events/s"
echo "idle: $n connections in ${idle_rss} MB RSS after a keep-alive round (${connected_rss} MB as they connected; ${start_rss} MB at start, ${handshakes_rss} MB after the handshakes; ${per_conn} KB per connection)"
awk -v o="$(rate "$ozone_raw")" -v m="$(rate "$mosq_raw")" \
    'BEGIN { printf "raw QoS 1 publishes/s: ozone edge %.0f, mosquitto %.0f, ratio %.2f\n", o, m, o / m }'
