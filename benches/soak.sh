#!/usr/bin/env bash
# Soak (issue 10, goal 4): $CONNECTIONS idle joined connections held for $SOAK_SECS on a
# release server pinned to core 0 (generator on core 1), with a churn measurement at
# concurrency 100 before the ramp and again after everyone left.
#
#   PASS/FAIL: every connection joined and none dropped while held; server RSS at the end
#   within 2 % of RSS right after the ramp; the idle server's CPU ≤ 2 % of a core; a join
#   after the soak costs ≤ 1.15 × what it cost before.
#
# Writes benches/out/soak-<timestamp>.csv: the churn rounds, the hold, a sample of server
# RSS and CPU share every $SAMPLE_SECS, the soak summary and the release.
#
#   benches/soak.sh                                   # 19 000 for 600 s
#   CONNECTIONS=500 SOAK_SECS=30 JOINS=300 benches/soak.sh
source "$(dirname "$0")/lib.sh"

CONNECTIONS=${CONNECTIONS:-19000}
SOAK_SECS=${SOAK_SECS:-600}
SAMPLE_SECS=${SAMPLE_SECS:-10}
SPACES=${SPACES:-1000}
JOINS=${JOINS:-5000}
RAMP=${RAMP:-200}
MAX_PARTICIPANTS=${MAX_PARTICIPANTS:-1000}

need_fds $(( CONNECTIONS + 200 ))
CSV="$OUT/soak-$STAMP.csv"
start_server soak --max-participants "$MAX_PARTICIPANTS"
load scale --url "$URL" --server-pid "$SERVER" --label soak --csv "$CSV" \
  --spaces "$SPACES" --populations "0,$CONNECTIONS" --concurrency 100 --joins "$JOINS" \
  --ramp-concurrency "$RAMP" --churn-only-idle --hold-secs "$SOAK_SECS" \
  --sample-secs "$SAMPLE_SECS"
stop_server

python3 benches/report.py soak --csv "$CSV" --connections "$CONNECTIONS"
echo "wrote $CSV"
