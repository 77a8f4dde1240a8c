#!/usr/bin/env bash
# Cluster benchmark: join throughput of three nodes against one, the extra latency of a
# join carried to another node, and what carrying costs the node in front. Every node runs
# on core 0 (three nodes share the one core a single node has), the load generator on
# core 1; PostgreSQL and Redis are the machine's own (a fresh database and key prefix per
# run). One run, ratios within it (the machine is noisy).
#
#   benches/cluster.sh                      # 5000 joins per round, concurrency 100
#   JOINS=2000 benches/cluster.sh           # quicker
#
# Server CPU per join is measured from /proc over the whole load run (its space and key
# creation included, the same in every run).
source "$(dirname "$0")/lib.sh"

JOINS=${JOINS:-5000}
CONC=${CONC:-100}
SPACES=${SPACES:-1000}
MSGS=${MSGS:-10}
REDIS=${REDIS:-redis://127.0.0.1:6379}
PG=${PG:-postgres://postgres@127.0.0.1:5432}
CSV="$OUT/cluster-$STAMP.csv"
NODES=()

cleanup_cluster() {
  for pid in "${NODES[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${NODES[@]}"; do wait "$pid" 2>/dev/null || true; done
  NODES=()
}
trap 'cleanup_cluster; stop_server; rm -rf "$WORK"' EXIT

# fresh_db NAME: a database of its own; prints its URL.
fresh_db() {
  local name="sg_bench_$1_$$"
  psql "$PG/test" -qc "DROP DATABASE IF EXISTS $name" -c "CREATE DATABASE $name" >/dev/null
  echo "$PG/$name"
}

# start_node NAME DB CLUSTER [extra flags…]: a cluster node on core 0; sets NODE_URL and
# NODE_PID.
start_node() {
  local name=$1 db=$2 cluster=$3
  shift 3
  taskset -c 0 "$BIN/spacegate" serve --listen 127.0.0.1:0 --database-url "$db" \
    --redis-url "$REDIS" --cluster "$cluster" --node-id "$name" --join-rate-per-ip 0 \
    --log warn "$@" >"$WORK/out-$name" 2>"$WORK/err-$name" &
  NODE_PID=$!
  NODES+=("$NODE_PID")
  for _ in $(seq 100); do grep -q listening "$WORK/out-$name" && break; sleep 0.1; done
  NODE_URL=$(sed -n 's/^spacegate: listening on //p' "$WORK/out-$name")
  if [ -z "$NODE_URL" ]; then
    echo "node $name did not start:" >&2
    cat "$WORK/err-$name" >&2
    exit 1
  fi
}

cpu_of() { # total utime+stime seconds of the given pids
  python3 - "$@" <<'PY'
import os, sys
hz = os.sysconf("SC_CLK_TCK")
total = 0
for pid in sys.argv[1:]:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    total += int(fields[11]) + int(fields[12])
print(total / hz)
PY
}

token_for() { # DB: exports MUX_TOKEN_ID/SECRET made with the CLI
  local json
  json=$("$BIN/spacegate" tokens create --database-url "$1" --json)
  MUX_TOKEN_ID=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["id"])' "$json")
  MUX_TOKEN_SECRET=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["secret"])' "$json")
  export MUX_TOKEN_ID MUX_TOKEN_SECRET
}

# run NAME PIDS… -- LOAD ARGS…: one load run; prints and records a JSON line with the
# server CPU per join over PIDS.
run() {
  local name=$1; shift
  local pids=()
  while [ "$1" != -- ]; do pids+=("$1"); shift; done
  shift
  local before after
  before=$(cpu_of "${pids[@]}")
  "$BIN/spacegate-load" join --pin-cpus 1 "$@" >"$WORK/$name.json"
  after=$(cpu_of "${pids[@]}")
  python3 - "$WORK/$name.json" "$name" "$before" "$after" <<'PY' | tee -a "$WORK/lines"
import json, sys
path, name, before, after = sys.argv[1:]
line = json.loads(open(path).read().strip().splitlines()[-1])
joins = line.get("joins", 0)
cpu = float(after) - float(before)
line.update(run=name, server_cpu_seconds=round(cpu, 3),
            server_cpu_us_per_join=round(cpu * 1e6 / max(joins, 1), 1))
print(json.dumps(line, sort_keys=True))
PY
}

echo "== one node (cluster mode: PostgreSQL + Redis)"
DB=$(fresh_db one)
start_node one "$DB" "bench-one-$$"
token_for "$DB"
run one "$NODE_PID" -- --url "$NODE_URL" --concurrency "$CONC" --joins "$JOINS" --spaces "$SPACES"
cleanup_cluster

echo "== three nodes, joins spread over them (as a load balancer would)"
DB=$(fresh_db three)
start_node a "$DB" "bench-three-$$"; A_URL=$NODE_URL; A_PID=$NODE_PID
start_node b "$DB" "bench-three-$$"; B_URL=$NODE_URL; B_PID=$NODE_PID
start_node c "$DB" "bench-three-$$"; C_URL=$NODE_URL; C_PID=$NODE_PID
token_for "$DB"
run three "$A_PID" "$B_PID" "$C_PID" -- --url "$A_URL" --via "$A_URL,$B_URL,$C_URL" \
  --concurrency "$CONC" --joins "$JOINS" --spaces "$SPACES"

cleanup_cluster

echo "== local against carried: every space hosted on a (one resident each), joins through a, then through b"
# Two fresh nodes whose loads stay as published at start (both 0; the lease, and with it
# the publication, is renewed every 200 s): every space's first join, through a, keeps
# its home on a (a tie stays with the node asked), so joins through b are all carried.
DB=$(fresh_db pair)
start_node a "$DB" "bench-pair-$$" --node-lease-ms 600000; A_URL=$NODE_URL; A_PID=$NODE_PID
start_node b "$DB" "bench-pair-$$" --node-lease-ms 600000; B_URL=$NODE_URL; B_PID=$NODE_PID
token_for "$DB"
run local "$A_PID" "$B_PID" -- --url "$A_URL" --hold-per-space \
  --concurrency "$CONC" --joins "$JOINS" --spaces "$SPACES"
run carried "$A_PID" "$B_PID" -- --url "$A_URL" --via "$B_URL" --hold-per-space \
  --concurrency "$CONC" --joins "$JOINS" --spaces "$SPACES"
echo "== the same with $MSGS custom events per join (each awaits its echo): the cost of a carried message"
run local-msgs "$A_PID" "$B_PID" -- --url "$A_URL" --hold-per-space --messages "$MSGS" \
  --concurrency "$CONC" --joins "$JOINS" --spaces "$SPACES"
run carried-msgs "$A_PID" "$B_PID" -- --url "$A_URL" --via "$B_URL" --hold-per-space \
  --messages "$MSGS" --concurrency "$CONC" --joins "$JOINS" --spaces "$SPACES"
cleanup_cluster
for db in one three pair; do psql "$PG/test" -qc "DROP DATABASE IF EXISTS sg_bench_${db}_$$ WITH (FORCE)" >/dev/null || true; done

python3 - "$WORK/lines" "$CSV" <<'PY'
import csv, json, sys
rows = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows[r["run"]] = r
keys = ["run", "joins", "joins_per_sec", "p50_ms", "p99_ms", "server_cpu_us_per_join", "failed"]
with open(sys.argv[2], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(keys)
    for r in rows.values():
        w.writerow([r.get(k) for k in keys])
one, three = rows["one"], rows["three"]
local, carried = rows["local"], rows["carried"]
print()
print(f"three nodes ÷ one node, joins/s: {three['joins_per_sec'] / one['joins_per_sec']:.2f} "
      f"({three['joins_per_sec']} vs {one['joins_per_sec']}; all nodes on one core)")
print(f"server CPU per join: one node {one['server_cpu_us_per_join']} µs, three nodes {three['server_cpu_us_per_join']} µs")
print(f"carried join latency: p50 {carried['p50_ms']} ms vs {local['p50_ms']} ms local (+{carried['p50_ms'] - local['p50_ms']:.2f}), "
      f"p99 {carried['p99_ms']} ms vs {local['p99_ms']} ms (+{carried['p99_ms'] - local['p99_ms']:.2f})")
print(f"server CPU per join (both nodes): carried {carried['server_cpu_us_per_join']} µs, local {local['server_cpu_us_per_join']} µs: "
      f"carrying costs {carried['server_cpu_us_per_join'] - local['server_cpu_us_per_join']:.1f} µs per join")
lm, cm = rows["local-msgs"], rows["carried-msgs"]
n = lm.get("messages") or 1
per_local = (lm["server_cpu_us_per_join"] - local["server_cpu_us_per_join"]) / n
per_carried = (cm["server_cpu_us_per_join"] - carried["server_cpu_us_per_join"]) / n
print(f"a custom event and its echo: {per_local:.1f} µs of server CPU hosted here, {per_carried:.1f} µs carried "
      f"(carrying a message costs {per_carried - per_local:.1f} µs)")
PY
echo "csv: $CSV"
