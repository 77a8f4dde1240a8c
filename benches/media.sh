#!/usr/bin/env bash
# SFU forwarding benchmark: the release server pinned to core 0, one webrtc-rs publisher and
# N webrtc-rs subscribers (spacegate-load media) on core 1, over loopback.
# Prints one JSON line per N from one run (the machine is noisy: compare within a run):
#   forwarded RTP packets/s, server CPU µs per forwarded packet (/proc utime+stime), the
#   packets/s one server core could forward at that cost, delivery ratio, and server RSS
#   per peer connection.
#
#   benches/media.sh                      # N = 1 10 50, 20 s each, 300 video packets/s
#   SUBS="10" SECS=10 VIDEO_PPS=60 FRAME_BYTES=6000 benches/media.sh   # 60 fps, ~5 packets/frame
set -euo pipefail
cd "$(dirname "$0")/.."
SUBS=${SUBS:-"1 10 50"}
SECS=${SECS:-20}
VIDEO_PPS=${VIDEO_PPS:-300}
FRAME_BYTES=${FRAME_BYTES:-1000}

cargo build --release --quiet --bin spacegate --bin spacegate-load
BIN=target/release
WORK=$(mktemp -d)
trap 'kill "$SERVER" 2>/dev/null || true; rm -rf "$WORK"' EXIT

for N in $SUBS; do
  # A fresh server per N, so RSS per peer connection is not blurred by the previous run.
  taskset -c 0 "$BIN/spacegate" serve --listen 127.0.0.1:0 --data-dir "$WORK/data-$N" \
    --log warn >"$WORK/out" 2>"$WORK/err" &
  SERVER=$!
  for _ in $(seq 100); do grep -q listening "$WORK/out" && break; sleep 0.1; done
  URL=$(sed -n 's/^spacegate: listening on //p' "$WORK/out")
  export MUX_TOKEN_ID=$(sed -n 's/^ *MUX_TOKEN_ID=//p' "$WORK/out")
  export MUX_TOKEN_SECRET=$(sed -n 's/^ *MUX_TOKEN_SECRET=//p' "$WORK/out")
  taskset -c 1 "$BIN/spacegate-load" media --url "$URL" --subscribers "$N" --secs "$SECS" \
    --video-pps "$VIDEO_PPS" --frame-bytes "$FRAME_BYTES" --server-pid "$SERVER"
  kill "$SERVER"; wait "$SERVER" 2>/dev/null || true
done
