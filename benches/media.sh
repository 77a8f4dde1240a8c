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
  media_run "idle-$IDLE_N" "$IDLE_N" --idle "$IDLE" --idle-spaces "$IDLE_SPACES"
  python3 benches/report.py media "$WORK/subs-$IDLE_N.json" "$WORK/idle-$IDLE_N.json"
fi
