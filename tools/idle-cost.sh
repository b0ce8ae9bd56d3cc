#!/usr/bin/env bash
# What connections that never authenticate (port scanners, TCP health checks, a peer stuck in
# its handshake) cost a serving leader, as a ratio to the same run without them: `ferry lead`
# (fallback engine) with one follower at `written`, an application appending 1 KiB records at
# about 10 MB/s for 8 s, once with no stranger connected and once with N connections that
# send nothing (held open for the whole 8 s, under HANDSHAKE_TIMEOUT_MS). Prints the leader's
# CPU seconds over the 8 s of each, and their ratio.
#
# usage: [FERRY_BIN=target/release/ferry] [DIR=/dev/shm] tools/idle-cost.sh [N] [ROUNDS]
#   (default 500 connections, 2 rounds, interleaved)
# Needs a release build (cargo build --release) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ferry=${FERRY_BIN:-target/release/ferry}
n=${1:-500}
rounds=${2:-2}
base=$(mktemp -d "${DIR:-/dev/shm}/ferry-idle.XXXXXX")
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$base"' EXIT
head -c 32 /dev/urandom | base64 > "$base/secret" && chmod 600 "$base/secret"

# One run with $1 strangers: prints the leader's CPU seconds over the 8 s of appends.
run() {
  local strangers=$1 leader follower port
  rm -rf "$base/l" "$base/f"
  mkdir -p "$base/l"
  "$ferry" lead --data-dir "$base/l" --listen 127.0.0.1:0 --secret-file "$base/secret" \
    --io-engine fallback 2> "$base/lead.log" &
  leader=$!
  for _ in $(seq 100); do
    port=$(grep -o 'listening on 127.0.0.1:[0-9]*' "$base/lead.log" | cut -d: -f2 || true)
    [ -n "$port" ] && break
    sleep 0.05
  done
  "$ferry" follow --data-dir "$base/f" --leader "127.0.0.1:$port" --secret-file "$base/secret" \
    --durability written --io-engine fallback 2> "$base/follow.log" &
  follower=$!
  python3 - "$strangers" "$leader" "$port" "$base/l/seg" <<'PY'
import os, socket, sys, time
strangers, leader, port, seg = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
held = [socket.create_connection(("127.0.0.1", port)) for _ in range(strangers)]
time.sleep(1)
def cpu_s():
    fields = open(f"/proc/{leader}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
before = cpu_s()
end = time.time() + 8
with open(seg, "ab") as f:
    while time.time() < end:
        f.write(b"x" * 1024 * 100)
        f.flush()
        time.sleep(0.01)
print(f"{cpu_s() - before:.2f}")
PY
  kill "$follower" "$leader"
  wait "$follower" "$leader" 2>/dev/null || true
}

for round in $(seq "$rounds"); do
  without=$(run 0)
  with=$(run "$n")
  echo "round $round: leader CPU s over 8 s: no stranger $without, $n strangers $with" \
    "($(python3 -c "print(f'{$with / $without:.2f}x')"))"
done
