#!/usr/bin/env bash
# What a data dir of many files costs a `ferry lead` with no follower, where nothing else would:
# its start, and its checkpoints of the leader's record (every 10 s). FILES files of 4 KiB in
# one directory. First its start, twice:
#   fresh    no leader's record: how long from the launch until it logs `listening on` (its
#            watcher started) and until its first record is written, and the CPU seconds of
#            the process by then;
#   resumed  the same, the record of the graceful stop of the run before in place;
#            each line also says how long that graceful stop (SIGTERM, the record written) took.
# Then, each leader started and its first record written, over SECONDS (0: only the above):
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
# Seconds from $1 (date +%s.%N) to the first line of log $2 that contains $3.
since() {
  python3 - "$1" "$2" "$3" <<'PY'
import sys, datetime
t0, log, what = float(sys.argv[1]), sys.argv[2], sys.argv[3]
for line in open(log):
    if what in line:
        stamp = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
        print(f"{stamp.timestamp() - t0:.3f}")
        break
PY
}

start() { # what: fresh or resumed
  local what=$1 pid t0 t1 t2 cpu
  [ "$what" = fresh ] && rm -f "$base/l/.ferry/leader"
  t0=$(date +%s.%N)
  "$ferry" lead --data-dir "$base/l" --listen 127.0.0.1:0 --secret-file "$base/secret" \
    2>"$base/lead.log" &
  pid=$!
  for _ in $(seq 6000); do
    grep -qs "recorded instance" "$base/lead.log" && break
    sleep 0.01
  done
  cpu=$(ticks "/proc/$pid/stat")
  t1=$(date +%s.%N)
  kill "$pid" # a graceful stop: it writes the record the resumed start takes
  wait "$pid" 2>/dev/null || true
  t2=$(date +%s.%N) # now, not in the line below, where the two `since` run before it
  echo "many-files-cost: $files files, start $what: listening $(since "$t0" "$base/lead.log" \
    "listening on") s, first record $(since "$t0" "$base/lead.log" "recorded instance") s after \
the launch; $(echo "scale=2; $cpu / $hz" | bc) CPU s by then (leader process); then stopped \
$(echo "scale=3; ($t2 - $t1) / 1" | bc) s after SIGTERM"
}

echo "many-files-cost: $ferry"
start fresh
start resumed
[ "$seconds" = 0 ] && exit 0
run idle
run busy
