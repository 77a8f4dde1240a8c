#!/usr/bin/env bash
# SFU forwarding benchmark: the release server pinned to core 0, one webrtc-rs publisher and
# N webrtc-rs subscribers (spacegate-load media) on core 1, over loopback.
# Prints one JSON line per N from one run (the machine is noisy: compare within a run):
#   forwarded RTP packets/s, server CPU µs per forwarded packet (/proc utime+stime), the
#   packets/s one server core could forward at that cost, delivery ratio, and server RSS
#   per peer connection.
# Then N=$IDLE_N again with $IDLE signaling-only participants held in other spaces, and the
# ratio of CPU per forwarded packet with them to without them (goal ≤ 1.15: the media plane
# does not pay for the idle population).
#
#   benches/media.sh                      # N = 1 10 50, 20 s each, 300 video packets/s
#   SUBS="10" SECS=10 VIDEO_PPS=60 FRAME_BYTES=6000 benches/media.sh   # 60 fps, ~5 packets/frame
#   SUBS=2 SECS=5 IDLE=200 IDLE_N=2 benches/media.sh                    # a quick check
source "$(dirname "$0")/lib.sh"

SUBS=${SUBS:-"1 10 50"}
SECS=${SECS:-20}
VIDEO_PPS=${VIDEO_PPS:-300}
FRAME_BYTES=${FRAME_BYTES:-1000}
IDLE=${IDLE:-5000}
IDLE_N=${IDLE_N:-10}
# 15 per space by default, as in the join benchmark.
IDLE_SPACES=${IDLE_SPACES:-$(( (IDLE + 14) / 15 ))}
need_fds $(( IDLE + 200 ))

# media_run NAME N [extra flags…]: a fresh server per run, so RSS per peer connection is
# not blurred by the previous one; the JSON line is printed and kept in $WORK/NAME.json.
media_run() {
  local name=$1 n=$2
  shift 2
  start_server "$name"
  load media --url "$URL" --subscribers "$n" --secs "$SECS" --video-pps "$VIDEO_PPS" \
    --frame-bytes "$FRAME_BYTES" --server-pid "$SERVER" "$@" | tee "$WORK/$name.json"
  stop_server
}

for N in $SUBS; do
  media_run "subs-$N" "$N"
done

if [ "$IDLE" -gt 0 ]; then
  # The plain N=$IDLE_N run from the loop is the reference when there was one.
  [ -s "$WORK/subs-$IDLE_N.json" ] || media_run "subs-$IDLE_N" "$IDLE_N"
  # The idle population is held by a generator process of its own, as idle clients are
  # other machines: held inside the process of the media clients (`media --idle`), it
  # changed how that process's threads sleep, and on loopback the server pays for waking
  # them on every datagram (perf: 55 % of the media thread in `sock_def_readable` under
  # `sendto`), so the figure partly measured the generator (1.41× and 1.7× held inside;
  # 0.91× and 1.25× held apart, on a machine where the reference itself moved 32–65 µs).
  start_server "idle-$IDLE_N"
  "$BIN/spacegate-load" hold --url "$URL" --connections "$IDLE" --spaces "$IDLE_SPACES" \
    --hold-secs $(( SECS * 10 + 120 )) --ramp-concurrency 200 --pin-cpus 1 >"$WORK/idle-hold.log" 2>&1 &
  HOLDER=$!
  for _ in $(seq 300); do grep -q '"state":"holding"' "$WORK/idle-hold.log" && break; sleep 1; done
  if ! grep -q '"state":"holding"' "$WORK/idle-hold.log"; then
    echo "the idle population was not held:" >&2
    cat "$WORK/idle-hold.log" >&2
    exit 1
  fi
  load media --url "$URL" --subscribers "$IDLE_N" --secs "$SECS" --video-pps "$VIDEO_PPS" \
    --frame-bytes "$FRAME_BYTES" --server-pid "$SERVER" >"$WORK/idle-media.json"
  # Still held at the end: the media run's participants have left by now.
  CONNECTED=
  if [ -n "$METRICS_URL" ]; then
    CONNECTED=$(python3 -c 'import sys, urllib.request
for line in urllib.request.urlopen(sys.argv[1]).read().decode().splitlines():
    if line.startswith("spacegate_connected_participants "):
        print(int(float(line.split()[1])))' "$METRICS_URL" || true)
  fi
  kill "$HOLDER" 2>/dev/null || true
  wait "$HOLDER" 2>/dev/null || true
  stop_server
  python3 - "$WORK/idle-media.json" "$IDLE" "$IDLE_SPACES" "${CONNECTED:-}" >"$WORK/idle-$IDLE_N.json" <<'PY'
import json, sys
path, idle, spaces, connected = sys.argv[1:]
line = json.loads(open(path).readline())
line.update(idle_participants=int(idle), idle_spaces=int(spaces), idle_process="separate")
if connected:
    line["idle_held_at_end"] = int(connected)
print(json.dumps(line, sort_keys=True))
PY
  cat "$WORK/idle-$IDLE_N.json"
  python3 benches/report.py media "$WORK/subs-$IDLE_N.json" "$WORK/idle-$IDLE_N.json"
fi
