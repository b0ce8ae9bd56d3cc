#!/usr/bin/env bash
# What a data dir of many files costs a serving `ferry lead` with no follower, where nothing
# else would: its checkpoints of the leader's record (every 10 s). FILES files of 4 KiB in one
# directory; the leader started, its first record written, then over SECONDS:
#   idle   the CPU seconds of the whole leader process, nothing written;
#   busy   the CPU seconds of its checkpoint thread (ferry-record) while an application appends
#          4 KiB to each of 4 files every 10 ms (the watcher's own work is not counted).
# Each line also gives the checkpoint counters of /metrics at the end (rounds, records written,
# files looked at). FERRY_BIN= another build runs the same, for a comparison: interleave them.
#
# usage: [FERRY_BIN=target/release/ferry] [DIR=/var/tmp] tools/many-files-cost.sh [FILES] [SECONDS]
#        (defaults: 100000 files, 30 s)
# Needs a release build (cargo build --release), python3 and curl.
set -euo pipefail
cd "$(dirname "$0")/.."
ferry=${FERRY_BIN:-target/release/ferry}
[ -x "$ferry" ] || { echo "build first: cargo build --release" >&2; exit 1; }
files=${1:-100000}
seconds=${2:-30}
base=$(mktemp -d "${DIR:-/var/tmp}/ferry-many.XXXXXX")
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$base"' EXIT
head -c 32 /dev/urandom | base64 >"$base/secret" && chmod 600 "$base/secret"
mkdir -p "$base/l/q"
python3 - "$base/l/q" "$files" <<'PY'
import sys
out, n = sys.argv[1], int(sys.argv[2])
block = b"x" * 4096
for i in range(n):
    with open(f"{out}/s.{i}", "wb") as f:
        f.write(block)
PY
sleep 2 # every file settled (LEADER_RECORD_SETTLE_MS), as in a data dir that has served a while

ticks() { awk '{print $14 + $15}' "$1"; } # utime + stime of a /proc stat file, in clock ticks
hz=$(getconf CLK_TCK)

run() { # what: idle or busy
  local what=$1 pid port http thread stat before after counters
  rm -f "$base/l/.ferry/leader"
  "$ferry" lead --data-dir "$base/l" --listen 127.0.0.1:0 --http 127.0.0.1:0 \
    --secret-file "$base/secret" 2>"$base/lead.log" &
  pid=$!
  for _ in $(seq 600); do
    grep -qs "recorded instance" "$base/lead.log" && break
    sleep 0.1
  done
  http=$(grep -o 'metrics on http://[0-9.:]*' "$base/lead.log" | sed 's|metrics on http://||')
  stat=/proc/$pid/stat
  if [ "$what" = busy ]; then
    thread=$(grep -l '^ferry-record$' /proc/$pid/task/*/comm | head -1)
    stat=$(dirname "$thread")/stat
    python3 - "$base/l/q" "$((seconds + 2))" <<'PY' &
import sys, time
out, end = sys.argv[1], time.time() + float(sys.argv[2])
while time.time() < end:
    for k in range(4):
        with open(f"{out}/s.{k}", "ab") as f:
            f.write(b"y" * 4096)
    time.sleep(0.01)
PY
    sleep 1
  fi
  before=$(ticks "$stat")
  sleep "$seconds"
  after=$(ticks "$stat")
  # (none from a build before the counters, 7f39408)
  counters=$(curl -s "http://$http/metrics" | { grep '^ferry_leader_checkpoint' || true; } |
    awk '{printf "%s %s  ", $1, $2}')
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  wait 2>/dev/null || true
  echo "many-files-cost: $files files, $what, $seconds s: $(echo "scale=2; ($after - $before) / $hz" |
    bc) CPU s ($( [ "$what" = busy ] && echo "ferry-record thread" || echo "leader process")); $counters"
}
echo "many-files-cost: $ferry"
run idle
run busy
