#!/usr/bin/env bash
# What a follower's restart costs once it holds everything, over loopback, all in one run, so
# the figures compare as ratios (these machines are shared and noisy):
#   1. `ferry follow --once` into an empty dir: a full copy (the baseline);
#   2. again, every file already there: a restart right after a sync;
#   3. again;
#   4. a `ferry follow` that stays up while the leader's dir grows by as much again (new
#      segments, shipped as they are written), killed with SIGKILL once it holds them all, then
#      `ferry follow --once`: a restart after streaming, what the held record is for;
#   5. `ferry lead` stopped with SIGTERM and started again, then `ferry follow --once`: the
#      leader resumes its instance from its record (.ferry/leader);
#   6. `ferry lead` stopped with SIGTERM while the application goes on appending: 1 MiB to each
#      of 16 segments while it is down (16 queues' active segments), then started again and
#      `ferry follow --once`: the resumed leader cannot vouch for those 16, so they are hashed on
#      both sides and only their new MiB travels (BIRTHS; before it, each went whole);
#   7. `ferry lead` killed with SIGKILL and started again, then `ferry follow --once`: it
#      resumes from its last checkpoint (here the one it wrote as it started, in step 6), so
#      only the files changed within a second before that are hashed; before checkpoints, a
#      new instance, and both sides hashed everything (what every leader restart cost before
#      the record; FERRY_BIN= an older build to see it).
# Each line gives the wall time and the CPU seconds the leader and the follower used (in 4,
# the restart's only); 5 to 7 also how long the old leader took to stop and the new one to
# listen, and what the leader planned to send.
#
# usage: [DIR=/var/tmp] [ENGINE=uring|fallback] tools/restart-cost.sh [TOTAL_MIB]
#   (default 1024: 128 segments of 8 MiB)
# Needs a release build (cargo build --release).
set -euo pipefail
total_mib=${1:-1024}
segment_mib=8
root=$(cd "$(dirname "$0")/.." && pwd)
ferry="${FERRY_BIN:-$root/target/release/ferry}"
[ -x "$ferry" ] || { echo "build first: cargo build --release" >&2; exit 1; }

work=$(mktemp -d "${DIR:-/var/tmp}/ferry-restart.XXXXXX")
lead_pid=
cleanup() { [ -n "$lead_pid" ] && kill "$lead_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/src/queues" "$work/dst"
for i in $(seq 1 $((total_mib / segment_mib))); do
  head -c $((segment_mib * 1024 * 1024)) /dev/urandom > "$work/src/queues/$(printf %08d "$i").seg"
done
echo tools-shared-secret > "$work/secret" && chmod 600 "$work/secret"

# Starts `ferry lead` and waits until it listens (its log from line $1); sets listen_s to how
# long that took.
start_leader() {
  local t0 t1
  t0=$(date +%s.%N)
  "$ferry" lead ${ENGINE:+--io-engine $ENGINE} --data-dir "$work/src" --listen 127.0.0.1:18741 \
    --secret-file "$work/secret" 2>> "$work/lead.log" &
  lead_pid=$!
  until grep -q "listening on" <(tail -n +"$1" "$work/lead.log" 2>/dev/null); do
    kill -0 "$lead_pid" 2>/dev/null || { tail -n 3 "$work/lead.log" >&2; exit 1; }
    sleep 0.01
  done
  t1=$(date +%s.%N)
  listen_s=$(awk -v t1="$t1" -v t0="$t0" 'BEGIN { printf "%.3f", t1 - t0 }')
}
# Stops the leader with signal $1, runs $2 (if given) while it is down, and starts another;
# restart_note says how long each took.
restart_leader() {
  local lines t0 t1 stop_s
  lines=$(($(wc -l < "$work/lead.log") + 1))
  t0=$(date +%s.%N)
  kill "-$1" "$lead_pid"; wait "$lead_pid" 2>/dev/null || true
  t1=$(date +%s.%N)
  stop_s=$(awk -v t1="$t1" -v t0="$t0" 'BEGIN { printf "%.3f", t1 - t0 }')
  [ -z "${2:-}" ] || "$2"
  lead_log_from=$lines
  # (After SIGKILL on io_uring the old listening socket outlives the process by about 30 ms;
  # the new leader waits for it, LISTEN_RETRY_MS, and that wait is in listen_s.)
  start_leader "$lines"
  restart_note="   (the old leader stopped in $stop_s s, the new one listened after $listen_s s)"
}
: > "$work/lead.log"
start_leader 1

ticks=$(getconf CLK_TCK)
# CPU seconds (user + system) of process $1, or of the children reaped so far with "self".
cpu_s() {
  if [ "$1" = self ]; then
    awk -v t="$ticks" '{ print ($16 + $17) / t }' /proc/$$/stat
  else
    awk -v t="$ticks" '{ print ($14 + $15) / t }' "/proc/$1/stat"
  fi
}

run() {
  local lead0 self0 t0 t1
  lead0=$(cpu_s "$lead_pid"); self0=$(cpu_s self); t0=$(date +%s.%N)
  "$ferry" follow --once --data-dir "$work/dst" --leader 127.0.0.1:18741 \
    --secret-file "$work/secret" --durability written ${ENGINE:+--io-engine $ENGINE} \
    > /dev/null 2>> "$work/follow.log"
  t1=$(date +%s.%N)
  awk -v what="$1" -v t1="$t1" -v t0="$t0" -v l="$(cpu_s "$lead_pid")" -v l0="$lead0" \
    -v f="$(cpu_s self)" -v f0="$self0" \
    'BEGIN { printf "%-44s %6.3f s wall, leader %5.2f CPU s, follower %5.2f CPU s\n", what, t1 - t0, l - l0, f - f0 }'
}

echo "$total_mib MiB in $((total_mib / segment_mib)) files under $work"
run "1. full copy into an empty dir"
run "2. restart right after the copy"
run "3. restart again"

# Bytes of the files under $1, ferry's state left out.
bytes_under() { find "$1" -path "$1/.ferry" -prune -o -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }'; }
"$ferry" follow --data-dir "$work/dst" --leader 127.0.0.1:18741 --secret-file "$work/secret" \
  --durability written ${ENGINE:+--io-engine $ENGINE} 2>> "$work/follow.log" &
follow_pid=$!
for i in $(seq 1 $((total_mib / segment_mib))); do
  head -c $((segment_mib * 1024 * 1024)) /dev/urandom > "$work/src/queues/s$(printf %08d "$i").seg"
done
want=$(bytes_under "$work/src")
until [ "$(bytes_under "$work/dst")" = "$want" ]; do sleep 0.1; done
# The follower notes what it holds at a MARK at most once a second (HELD_CHECKPOINT_INTERVAL_MS).
sleep 1.5
kill -9 "$follow_pid"; wait "$follow_pid" 2>/dev/null || true
run "4. restart after streaming $total_mib MiB more, killed"

# What the leader's last initial sync planned (from its log since the restart).
planned() {
  tail -n +"$lead_log_from" "$work/lead.log" | grep -o 'initial sync started.*' | tail -n 1 |
    sed 's/^initial sync started, /   (the leader planned /; s/; its inventory: /: /; s/$/)/' || true
}
# The application appending while the leader is down: 1 MiB to each of 16 segments.
append_while_down() {
  for i in $(seq 1 16); do
    head -c $((1024 * 1024)) /dev/urandom >> "$work/src/queues/s$(printf %08d "$i").seg"
  done
}

restart_leader TERM
run "5. leader stopped (SIGTERM), started again"
echo "$restart_note"
planned
restart_leader TERM append_while_down
run "6. ... and 16 MiB appended while it was down"
echo "$restart_note"
planned
restart_leader KILL
run "7. leader killed (SIGKILL), started again"
echo "$restart_note"
planned
