# Shared by the benchmark scripts (sourced, not run): build, start and stop a release server
# pinned to core 0, and where results go. The load generator runs beside it on core 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo build --release --quiet --bin spacegate --bin spacegate-load
BIN="${CARGO_TARGET_DIR:-target}/release"
OUT=benches/out
mkdir -p "$OUT"
STAMP=$(date +%Y%m%d-%H%M%S)
WORK=$(mktemp -d)
SERVER=
trap 'stop_server; rm -rf "$WORK"' EXIT
# Every held connection is one fd in the generator and one in the server.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# need_fds N: stop early, with the reason, when N descriptors per process are not available.
need_fds() {
  if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$1" ]; then
    echo "need $1 file descriptors per process, the limit is $(ulimit -n) (raise ulimit -n)" >&2
    exit 1
  fi
}

# Whether this build of the server has the Prometheus listener (it is being added).
HAS_METRICS=
if "$BIN/spacegate" serve --help 2>/dev/null | grep -q -- '--metrics-listen'; then
  HAS_METRICS=1
fi

# start_server NAME [extra serve flags…]: a fresh server (own data dir) on core 0; sets
# SERVER (pid), URL, METRICS_URL (empty without a metrics listener) and exports the
# access token the first start prints.
start_server() {
  local name=$1 port
  shift
  local extra=()
  METRICS_URL=
  if [ -n "$HAS_METRICS" ]; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    extra+=(--metrics-listen "127.0.0.1:$port")
    METRICS_URL="http://127.0.0.1:$port/metrics"
  fi
  # The load generator is one machine joining thousands of times a second: the per-address
  # join rate (meant for strangers) would refuse it.
  if "$BIN/spacegate" serve --help 2>/dev/null | grep -q -- '--join-rate-per-ip'; then
    extra+=(--join-rate-per-ip 0)
  fi
  taskset -c 0 "$BIN/spacegate" serve --listen 127.0.0.1:0 --data-dir "$WORK/data-$name" \
    --log warn "${extra[@]}" "$@" >"$WORK/out-$name" 2>"$WORK/err-$name" &
  SERVER=$!
  for _ in $(seq 100); do grep -q listening "$WORK/out-$name" && break; sleep 0.1; done
  URL=$(sed -n 's/^spacegate: listening on //p' "$WORK/out-$name")
  if [ -z "$URL" ]; then
    echo "the server did not start:" >&2
    cat "$WORK/err-$name" >&2
    exit 1
  fi
  MUX_TOKEN_ID=$(sed -n 's/^ *MUX_TOKEN_ID=//p' "$WORK/out-$name")
  MUX_TOKEN_SECRET=$(sed -n 's/^ *MUX_TOKEN_SECRET=//p' "$WORK/out-$name")
  export MUX_TOKEN_ID MUX_TOKEN_SECRET
}

stop_server() {
  if [ -n "$SERVER" ]; then
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    SERVER=
  fi
}

# The generator signs its tokens on every core, then moves itself to core 1 (--pin-cpus),
# away from the server on core 0.
load() {
  "$BIN/spacegate-load" "$@" --pin-cpus 1
}

# "0 1000 15000" → "0,1000,15000"
csv_list() { echo "$*" | tr -s ' ' ',' | sed 's/^,//; s/,$//'; }
