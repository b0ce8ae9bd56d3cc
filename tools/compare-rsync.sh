#!/usr/bin/env bash
# Full sync of a directory of FILES files (16 by default) into an empty follower dir over loopback:
# `ferry follow --once` against an rsync daemon, measured in the same run on the same files,
# reported as a ratio (these machines are shared and noisy; absolute figures drift).
#
# usage: [ENGINE=uring|fallback] [REPS=3] [FILES=16] tools/compare-rsync.sh [TOTAL_MIB]
#        (default 2048: 16 files of 128 MiB; FILES=100000 and 400 MiB: 100,000 files of 4 KiB)
# FERRY_BIN= another build runs the same, for a comparison: interleave them. DEST= where the
# copies go (default: beside the source, on the same disk; /dev/shm leaves the disk out).
# Needs a release build (cargo build --release), python3, and rsync (installed with apt-get when
# missing).
set -euo pipefail
total_mib=${1:-2048}
files=${FILES:-16}
root=$(cd "$(dirname "$0")/.." && pwd)
ferry="${FERRY_BIN:-$root/target/release/ferry}"
[ -x "$ferry" ] || { echo "build first: cargo build --release" >&2; exit 1; }
source "$root/tools/install-missing.sh"
install_missing rsync:rsync bc:bc

work=$(mktemp -d /var/tmp/ferry-vs-rsync.XXXXXX)
dst=$work/dst
[ -z "${DEST:-}" ] || dst=$(mktemp -d "$DEST/ferry-vs-rsync-dst.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work" "$dst"; }
trap cleanup EXIT
mkdir -p "$work/src/queues"
python3 - "$work/src/queues" "$files" $((total_mib * 1024 * 1024 / files)) <<'PY'
import os, sys
out, n, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(1, n + 1):
    with open(f"{out}/{i:08d}.seg", "wb") as f:
        f.write(os.urandom(size))
PY
echo tools-shared-secret > "$work/secret" && chmod 600 "$work/secret"
now() { date +%s.%N; }

# rsync daemon serving the same directory.
cat > "$work/rsyncd.conf" <<CONF
use chroot = no
uid = root
gid = root
[src]
  path = $work/src
  read only = yes
CONF
rsync --daemon --no-detach --port 18730 --address 127.0.0.1 --config "$work/rsyncd.conf" &
pids+=($!)

"$ferry" lead ${ENGINE:+--io-engine $ENGINE} --data-dir "$work/src" --listen 127.0.0.1:18731 --secret-file "$work/secret" \
  2> "$work/lead.log" &
pids+=($!)
for _ in $(seq 100); do grep -qs "listening on" "$work/lead.log" && break; sleep 0.1; done
# Warm the leader's page cache the same way for both (the files were just written).
find "$work/src/queues" -type f -exec cat {} + > /dev/null

run_rsync() {
  rm -rf "$dst"; mkdir "$dst"; sync
  local t0; t0=$(now)
  rsync -a --exclude .ferry "rsync://127.0.0.1:18730/src/" "$dst/"
  echo "$(now) - $t0" | bc
}
run_ferry() {
  rm -rf "$dst"; mkdir "$dst"; sync
  local t0; t0=$(now)
  "$ferry" follow --once --data-dir "$dst" --leader 127.0.0.1:18731 --secret-file "$work/secret" \
    --durability "$1" ${ENGINE:+--io-engine $ENGINE} > /dev/null 2>> "$work/follow.log"
  echo "$(now) - $t0" | bc
}

# Interleaved repetitions, best of each: the machine is shared and the disk's writeback of one
# run can slow the next, so single runs mislead.
best() { sort -n | head -1; }
reps=${REPS:-3}
for r in $(seq "$reps"); do
  run_rsync >> "$work/t.rsync"
  run_ferry written >> "$work/t.written"
  run_ferry synced >> "$work/t.synced"
done
rsync_best=$(best < "$work/t.rsync")
written_s=$(best < "$work/t.written")
synced_s=$(best < "$work/t.synced")
printf 'full sync of %d MiB in %d files over loopback, best of %d interleaved runs each\n' "$total_mib" "$files" "$reps"
printf '  rsync daemon:                         %6.2f s\n' "$rsync_best"
printf '  ferry follow --once --durability written: %6.2f s   %.2fx as fast as rsync\n' "$written_s" "$(echo "$rsync_best / $written_s" | bc -l)"
printf '  ferry follow --once --durability synced:  %6.2f s   %.2fx as fast as rsync (fdatasync included)\n' "$synced_s" "$(echo "$rsync_best / $synced_s" | bc -l)"
