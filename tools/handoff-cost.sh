#!/usr/bin/env bash
# What a handoff costs the other nodes, over loopback: etcd and three `ferry node`s on 127.0.0.1,
# the first one's data dir holding TOTAL_MIB in segments of SEGMENT_KIB (8 MiB by default; make
# it small for many files), every node in sync; then `ferry handoff` to the second. Prints, for the third node and for the old
# leader (which follows the new one), how long after the handoff began its inventory was done
# and its initial sync received (it acks again), and its inventory line: how many files it held
# and how many bytes it hashed. FERRY_BIN= an older build (before the target went on with the
# instance, c4ed672) shows what it was: every file hashed on both sides. Then the steps of the
# handoff that look at every file, each with its time after the handoff began: the old leader
# passing the instance on, the target taking it and resuming it.
# With FAILOVER=1, the leader is killed with SIGKILL instead (a failover: either other node may
# be elected); the times are from the kill, for the node that is not elected, and the steps are
# the new leader's (forking the instance, resuming it); then the killed leader is started again
# and its own inventory is reported, from its restart. FERRY_BIN= a build before the fork
# (session 50, 2026-12-07) shows every file hashed on both sides.
#
# usage: [DIR=/var/tmp] [FERRY_BIN=...] [SEGMENT_KIB=8192] [FAILOVER=1] tools/handoff-cost.sh [TOTAL_MIB]
#        (TOTAL_MIB 1024 by default)
# Needs a release build (cargo build --release) and etcd (apt-get install etcd-server).
set -euo pipefail
tool=handoff-cost
source "$(dirname "$0")/cost-lib.sh"
total_mib=${1:-1024}
segment_kib=${SEGMENT_KIB:-8192}
segments=$((total_mib * 1024 / segment_kib))
root=$(cd "$(dirname "$0")/.." && pwd)
ferry="${FERRY_BIN:-$root/target/release/ferry}"
[ -x "$ferry" ] || { echo "build first: cargo build --release" >&2; exit 1; }
command -v etcd >/dev/null || { echo "needs etcd (apt-get install etcd-server)" >&2; exit 1; }

work=$(mktemp -d "${DIR:-/var/tmp}/ferry-handoff.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
etcd_port=$(port)
peer_port=$(port)
etcd_url="http://127.0.0.1:$etcd_port"
etcd --name handoff-cost --data-dir "$work/etcd" \
  --listen-client-urls "$etcd_url" --advertise-client-urls "$etcd_url" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "handoff-cost=http://127.0.0.1:$peer_port" >"$work/etcd.log" 2>&1 &
pids+=($!)

secret_in "$work"
mkdir -p "$work/b" "$work/c"
segments_in "$work/a/queues" "$segments" "$segment_kib"

declare -A addr
node() { # name
  local p
  p=$(port)
  addr[$1]="127.0.0.1:$p"
  "$ferry" node --data-dir "$work/$1" --etcd "$etcd_url" --listen "127.0.0.1:$p" \
    --advertise "127.0.0.1:$p" --secret-file "$work/secret" >"$work/$1.log" 2>&1 &
  pids+=($!)
}
node a
wait_for "leader" 30 grep -q "elected leader" "$work/a.log"
node b
node c
in_sync() {
  "$ferry" cluster status --etcd "$etcd_url" --json |
    python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if len(s["isr"] or []) == 3 else 1)'
}
wait_for "in-sync replica set of three" 300 in_sync

mark_c=$(wc -l <"$work/c.log")
mark_b=$(wc -l <"$work/b.log")
mark_a=$(wc -l <"$work/a.log")
started=$(date +%s.%N)
if [ "${FAILOVER:-0}" = 1 ]; then
  kill -KILL "${pids[1]}"
  echo "handoff-cost: failover (SIGKILL of the leader), $total_mib MiB in $segments segments of" \
    "$segment_kib KiB, $ferry"
else
  "$ferry" handoff --etcd "$etcd_url" --to "${addr[b]}"
  echo "handoff-cost: $total_mib MiB in $segments segments of $segment_kib KiB, $ferry"
fi
report() { # name log-mark
  local log="$work/$1.log"
  wait_for "initial sync on $1" 300 sh -c "tail -n +$(($2 + 1)) '$log' | grep -q 'initial sync received'"
  tail -n +$(($2 + 1)) "$log" | inventory_report "$started" "$1" "$what"
}
if [ "${FAILOVER:-0}" = 1 ]; then
  what=failover
  # Whichever of b and c is elected, the other follows it.
  wait_for "a new leader" 60 grep -q "elected leader" "$work/b.log" "$work/c.log"
  if grep -q "elected leader" "$work/b.log"; then
    new=b follower=c mark=$mark_c
  else
    new=c follower=b mark=$mark_b
  fi
  report "$follower" "$mark"
  # The killed leader, started again (its log begins anew), follows the new one.
  killed=$started
  started=$(date +%s.%N) what="restart of the killed leader"
  node a
  report a 0
  started=$killed # the new leader's steps, from the kill
  steps="forking instance\|resuming instance\|elected leader"
  logs=("$work/$new.log")
else
  what=handoff
  report c "$mark_c"
  report a "$mark_a"
  steps="resigning\|going on with instance\|resuming instance\|passed instance\|elected leader"
  logs=("$work/a.log" "$work/b.log")
fi
cat "${logs[@]}" | grep -h "$steps" | steps_report "$started" || true
