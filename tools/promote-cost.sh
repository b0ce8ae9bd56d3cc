#!/usr/bin/env bash
# What promoting a follower by hand costs the other follower, over loopback, without etcd:
# `ferry lead` on a data dir holding TOTAL_MIB in segments of SEGMENT_KIB (8 MiB by default),
# two `ferry follow`ers b and c in sync; then the leader is killed (SIGKILL), b's follower is
# stopped (SIGTERM) and `ferry lead` started on b's dir, and c's follower is started again
# against it. Prints how long after b's `ferry lead` started c's inventory was done and its
# initial sync received, and its inventory line: how many files it held and how many bytes it
# hashed; then b's own steps (forking the instance it followed, resuming it, listening).
# FERRY_BIN= a build before a leader's start forked the instance its dir followed (session 51,
# 2026-12-07) shows every file hashed on both sides.
# With CHAIN=1, a third follower d stops with b and c; once c is in sync with b, b is killed too,
# c's follower stopped and `ferry lead` started on c's dir, and d, which missed both failovers,
# started against it: the same report for d and c. FERRY_BIN= a build before fork chains
# (session 52, 2026-12-07) shows d hashing every file.
#
# usage: [DIR=/var/tmp] [FERRY_BIN=...] [SEGMENT_KIB=8192] [CHAIN=1] tools/promote-cost.sh
#        [TOTAL_MIB] (TOTAL_MIB 1024 by default)
# Needs a release build (cargo build --release).
set -euo pipefail
tool=promote-cost
source "$(dirname "$0")/cost-lib.sh"
total_mib=${1:-1024}
segment_kib=${SEGMENT_KIB:-8192}
segments=$((total_mib * 1024 / segment_kib))
root=$(cd "$(dirname "$0")/.." && pwd)
ferry="${FERRY_BIN:-$root/target/release/ferry}"
[ -x "$ferry" ] || { echo "build first: cargo build --release" >&2; exit 1; }

work=$(mktemp -d "${DIR:-/var/tmp}/ferry-promote.XXXXXX")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

secret_in "$work"
mkdir -p "$work/b" "$work/c" "$work/d"
segments_in "$work/a/queues" "$segments" "$segment_kib"

lead() { # name
  "$ferry" lead --data-dir "$work/$1" --listen 127.0.0.1:0 --secret-file "$work/secret" \
    >"$work/$1.lead.log" 2>&1 &
  pids+=($!)
  lead_pid=$!
  wait_for "listening leader on $1" 60 grep -q "listening on " "$work/$1.lead.log"
  leader_addr=$(grep -o "listening on [0-9.:]*" "$work/$1.lead.log" | head -1 | cut -d' ' -f3)
}
follow() { # name log
  "$ferry" follow --data-dir "$work/$1" --leader "$leader_addr" --secret-file "$work/secret" \
    >"$work/$2" 2>&1 &
  pids+=($!)
  follow_pid=$!
}
synced() { grep -q "initial sync received" "$work/$1"; }

lead a
killed_leader=$lead_pid
follow b b.log
b_pid=$follow_pid
follow c c.log
c_pid=$follow_pid
d_pid=
if [ "${CHAIN:-}" = 1 ]; then
  follow d d.log
  d_pid=$follow_pid
  wait_for "initial sync on d" 300 synced d.log
fi
wait_for "initial sync on b" 300 synced b.log
wait_for "initial sync on c" 300 synced c.log
# b's copies settle before b stops following (a leader started on b's dir vouches only for the
# files a second older than b's stop; an operator takes longer than that).
sleep 1.5
kill -KILL "$killed_leader"
kill -TERM "$b_pid" "$c_pid" $d_pid
wait "$killed_leader" "$b_pid" "$c_pid" $d_pid 2>/dev/null || true

echo "promote-cost: $total_mib MiB in $segments segments of $segment_kib KiB, $ferry"
started=$(date +%s.%N)
lead b
follow c c.again.log
c_pid=$follow_pid
wait_for "initial sync on c" 300 synced c.again.log
inventory_report "$started" c "\`ferry lead\` on b" <"$work/c.again.log"
echo "  b's steps:"
grep -h "forking instance\|resuming instance\|listening on" "$work/b.lead.log" |
  steps_report "$started" || true
[ "${CHAIN:-}" = 1 ] || exit 0

# b dies too: c is led by hand, and d, which missed both failovers, follows it.
sleep 1.5
kill -KILL "$lead_pid"
kill -TERM "$c_pid"
wait "$lead_pid" "$c_pid" 2>/dev/null || true
started=$(date +%s.%N)
lead c
follow d d.again.log
wait_for "initial sync on d" 300 synced d.again.log
inventory_report "$started" d "\`ferry lead\` on c" <"$work/d.again.log"
echo "  c's steps:"
grep -h "forking instance\|resuming instance\|listening on" "$work/c.lead.log" |
  steps_report "$started" || true
