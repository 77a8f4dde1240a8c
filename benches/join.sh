#!/usr/bin/env bash
# One node at full scale (issue 10): the release server pinned to core 0, the load generator
# on core 1, openssl's RSA-2048 verify rate measured on core 0 in the same run.
#
#   Goal 1  server CPU per join (concurrency 100) with 0, 1 000, 15 000 participants held
#           over 1 000 spaces and after they left: max ≤ 1.15 × min
#   Goal 2  joins/s per server core ≥ 0.30 × openssl verify/s (population 0, every join
#           activates a space and every leave idles it); p99 latency at concurrency
#           10 / 100 / 1000 ≤ 5 / 30 / 100 ms; per-stage µs when the server exposes metrics
#   Goal 3  server RSS per idle joined connection ≤ 4 KiB, at 15 and at 100 per space
#   TLS     (issue 11) the population-0 churn over TLS, with an ECDSA P-256 and an RSA-2048
#           certificate (TLS=0 skips it)
#
# Writes benches/out/join-<timestamp>.csv (every measurement) and .svg (chart).
#
#   benches/join.sh                                             # full size
#   POPULATIONS="0 300" SPACES=30 JOINS=300 benches/join.sh     # a quick check
source "$(dirname "$0")/lib.sh"

POPULATIONS=${POPULATIONS:-"0 1000 15000"}
SPACES=${SPACES:-1000}
JOINS=${JOINS:-5000}
CONCURRENCIES=${CONCURRENCIES:-"10 100 1000"}
# Goal 3's second density: the largest population again, this many per space.
DENSE_PER_SPACE=${DENSE_PER_SPACE:-100}
RAMP=${RAMP:-200}
# Room for the densest space plus the churn that joins it.
MAX_PARTICIPANTS=${MAX_PARTICIPANTS:-1000}
OPENSSL_SECS=${OPENSSL_SECS:-3}

CSV="$OUT/join-$STAMP.csv"
SVG="$OUT/join-$STAMP.svg"
PEAK=$(echo "$POPULATIONS" | tr ' ' '\n' | sort -n | tail -1)
need_fds $(( PEAK + $(echo "$CONCURRENCIES" | tr ' ' '\n' | sort -n | tail -1) + 100 ))

# On the server's core, with nothing else running there: the RSA limit of a join.
OPENSSL=$(taskset -c 0 openssl speed -seconds "$OPENSSL_SECS" rsa2048 2>/dev/null | awk '/^rsa 2048 bits/ {print $NF}')
echo "{\"openssl_rsa2048_verify_per_sec\": $OPENSSL}"

# Goals 1 and 2 (and goal 3 at $PEAK / $SPACES per space): one server, one generator,
# every phase in order. The churn has $SPACES spaces of its own, empty in every phase
# (each join activates one, each leave idles it), apart from the held population's: goal
# 1 is about what the node holds, not about the room a join lands in (that fan-out is
# measured separately below).
start_server population --max-participants "$MAX_PARTICIPANTS"
load scale --url "$URL" --server-pid "$SERVER" --label population --csv "$CSV" \
  --spaces "$SPACES" --churn-spaces "$SPACES" --populations "$(csv_list $POPULATIONS)" \
  --concurrency "$(csv_list $CONCURRENCIES)" --joins "$JOINS" --ramp-concurrency "$RAMP" \
  ${METRICS_URL:+--metrics-url "$METRICS_URL"}
stop_server

# Goal 3 at $DENSE_PER_SPACE per space, on a fresh server (a server that already held and
# released a population reuses that memory and would look cheaper). The same churn first,
# so the allocator is as warm as in the run above when the hold starts.
if [ "$PEAK" -gt 0 ]; then
  start_server dense --max-participants "$MAX_PARTICIPANTS"
  load scale --url "$URL" --server-pid "$SERVER" --label dense --csv "$CSV" \
    --spaces $(( (PEAK + DENSE_PER_SPACE - 1) / DENSE_PER_SPACE )) --populations "0,$PEAK" \
    --concurrency "$(csv_list $CONCURRENCIES)" --joins "$JOINS" --ramp-concurrency "$RAMP" \
    --churn-only-idle --no-release-phase
  stop_server
fi

# Not a goal, for the record: the same churn landing in the populated spaces (15 per
# space), so each join and leave is told to the room; what that fan-out costs per frame.
if [ "$PEAK" -gt 0 ]; then
  start_server rooms --max-participants "$MAX_PARTICIPANTS"
  load scale --url "$URL" --server-pid "$SERVER" --label rooms --csv "$CSV" \
    --spaces "$SPACES" --populations "0,$PEAK" --concurrency 100 --joins "$JOINS" \
    --ramp-concurrency "$RAMP" --no-release-phase
  stop_server
fi

# Issue 11: the same churn over TLS (population 0, c=$TLS_CONCURRENCY), once with an ECDSA
# P-256 certificate and once with an RSA-2048 one: each join is a new TLS connection, so
# the handshake's signature (P-256 sign vs RSA-2048 sign) joins the JWT's RSA verify.
TLS_CONCURRENCY=${TLS_CONCURRENCY:-100}
if [ "${TLS:-1}" = "1" ]; then
  for kind in ec rsa; do
    certs="$WORK/tls-$kind"
    mkdir -p "$certs"
    if [ "$kind" = ec ]; then keyopt=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1); else keyopt=(-newkey rsa:2048); fi
    # A CA and a server certificate it signs (a self-signed server certificate with CA:TRUE
    # is refused as an end entity by rustls).
    openssl req -x509 "${keyopt[@]}" -nodes -keyout "$certs/ca-key.pem" -out "$certs/ca.pem" \
      -days 2 -subj /CN=spacegate-bench-ca 2>/dev/null
    openssl req "${keyopt[@]}" -nodes -keyout "$certs/key.pem" -out "$certs/req.pem" \
      -subj /CN=localhost 2>/dev/null
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >"$certs/ext"
    openssl x509 -req -in "$certs/req.pem" -CA "$certs/ca.pem" -CAkey "$certs/ca-key.pem" \
      -CAcreateserial -out "$certs/cert.pem" -days 2 -extfile "$certs/ext" 2>/dev/null
    start_server "tls-$kind" --max-participants "$MAX_PARTICIPANTS" \
      --tls-cert "$certs/cert.pem" --tls-key "$certs/key.pem"
    SPACEGATE_CA_FILE="$certs/ca.pem" load scale --url "$URL" --server-pid "$SERVER" \
      --label "tls-$kind" --csv "$CSV" --spaces "$SPACES" --churn-spaces "$SPACES" \
      --populations 0 --concurrency "$TLS_CONCURRENCY" --joins "$JOINS" --no-release-phase
    stop_server
  done
fi

python3 benches/report.py join --csv "$CSV" --svg "$SVG" --openssl "$OPENSSL"
echo "wrote $CSV and $SVG"
