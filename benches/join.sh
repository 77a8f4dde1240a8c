#!/usr/bin/env bash
# Join-gateway benchmark: the release server pinned to core 0, the load generator on core 1.
# Prints, from one run (the machine is noisy, so compare ratios, not absolute numbers):
#   - openssl speed rsa2048 verify/s on this machine (the RSA limit of a join)
#   - joins/s, p50/p99 join latency at concurrency 10, 100, 1000
#   - joins/s per server core ÷ openssl verify/s, and server CPU µs per join (/proc)
#   - user-space memory per idle joined connection, holding $HOLD connections
#
#   benches/join.sh                 # JOINS=5000 HOLD=15000 by default
set -euo pipefail
cd "$(dirname "$0")/.."
JOINS=${JOINS:-5000}
HOLD=${HOLD:-15000}

cargo build --release --quiet --bin spacegate --bin spacegate-load
BIN=target/release
WORK=$(mktemp -d)
trap 'kill "$SERVER" 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n 20000 2>/dev/null || true

taskset -c 0 "$BIN/spacegate" serve --listen 127.0.0.1:0 --data-dir "$WORK/data" \
  --max-participants 1000 --log warn >"$WORK/out" 2>"$WORK/err" &
SERVER=$!
for _ in $(seq 100); do grep -q listening "$WORK/out" && break; sleep 0.1; done
URL=$(sed -n 's/^spacegate: listening on //p' "$WORK/out")
export MUX_TOKEN_ID=$(sed -n 's/^ *MUX_TOKEN_ID=//p' "$WORK/out")
export MUX_TOKEN_SECRET=$(sed -n 's/^ *MUX_TOKEN_SECRET=//p' "$WORK/out")

OPENSSL=$(openssl speed -seconds 3 rsa2048 2>/dev/null | awk '/^rsa 2048 bits/ {print $NF}')
echo "{\"openssl_rsa2048_verify_per_sec\": $OPENSSL}"

for C in 10 100 1000; do
  SPACES=$(( (C + 499) / 500 ))
  # --server-pid: the generator reads the server's CPU time (/proc) around the timed part
  # only, not around key creation and token signing.
  line=$(taskset -c 1 "$BIN/spacegate-load" join --url "$URL" --concurrency "$C" --joins "$JOINS" \
    --spaces "$SPACES" --server-pid "$SERVER")
  python3 - "$line" "$OPENSSL" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); openssl = float(sys.argv[2])
us = r.get("server_cpu_us_per_join")
if us:
    # One server core spends `us` µs per join, so it can do 1e6/us joins per second.
    r["joins_per_server_core_sec"] = round(1e6 / us, 1)
    r["ratio_to_openssl_verify"] = round(1e6 / us / openssl, 3)
print(json.dumps(r))
PY
done

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$SERVER/status"; }
base=$(rss_kb)
taskset -c 1 "$BIN/spacegate-load" hold --url "$URL" --connections "$HOLD" --spaces $(( (HOLD + 99) / 100 )) \
  --hold-secs 20 >"$WORK/hold" &
LOAD=$!
for _ in $(seq 600); do grep -q holding "$WORK/hold" 2>/dev/null && break; sleep 0.5; done
sleep 3
held=$(rss_kb)
joined=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["joined"])' "$WORK/hold")
echo "{\"idle_connections\": $joined, \"server_rss_before_kb\": $base, \"server_rss_holding_kb\": $held, \"bytes_per_idle_connection\": $(( (held - base) * 1024 / (joined > 0 ? joined : 1) ))}"
wait "$LOAD"
