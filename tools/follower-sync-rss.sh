#!/usr/bin/env bash
# A follower's peak RSS (and time, CPU) for a full sync of many small files: `ferry lead` of
# FILES files of 4 KiB in one directory, and `ferry follow --once` into an empty dir under
# /usr/bin/time, ROUNDS times. With OLD= a second build, each round runs it first, then this
# one (interleaved, as the machine is noisy): e.g. the build before a change to what a
# follower keeps per file.
#
# usage: [FERRY_BIN=target/release/ferry] [OLD=path/to/ferry] [DIR=/var/tmp]
#        tools/follower-sync-rss.sh [FILES] [ROUNDS]   (defaults: 100000 files, 2 rounds)
# Needs a release build (cargo build --release), python3 and /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
tool=follower-sync-rss
source tools/cost-lib.sh
new=${FERRY_BIN:-target/release/ferry}
[ -x "$new" ] || { echo "build first: cargo build --release" >&2; exit 1; }
files=${1:-100000}
rounds=${2:-2}
base=$(mktemp -d "${DIR:-/var/tmp}/ferry-rss.XXXXXX")
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$base"' EXIT
mkdir -p "$base/l/q"
python3 - "$base/l/q" "$files" <<'PY'
import os, sys
d, n = sys.argv[1], int(sys.argv[2])
b = os.urandom(4096)
for i in range(n):
    with open(f"{d}/f{i:06}", "wb") as f:
        f.write(b)
PY
secret_in "$base"
builds=()
[ -n "${OLD:-}" ] && builds+=("old=$OLD")
builds+=("this=$new")
for ((r = 1; r <= rounds; r++)); do
  for named in "${builds[@]}"; do
    name=${named%%=*} bin=${named#*=}
    rm -rf "$base/f" && mkdir "$base/f"
    "$bin" lead --data-dir "$base/l" --listen 127.0.0.1:0 --secret-file "$base/secret" \
      >"$base/lead.log" 2>&1 &
    lead=$!
    wait_for "listening leader" 60 grep -q 'listening on' "$base/lead.log"
    addr=$(grep -o 'listening on [0-9.:]*' "$base/lead.log" | head -1 | cut -d' ' -f3)
    /usr/bin/time -f "$name round $r: follower peak RSS %M KiB, %e s, %U user + %S system CPU s" \
      "$bin" follow --once --data-dir "$base/f" --leader "$addr" --secret-file "$base/secret" \
      2>&1 >/dev/null | tail -1
    kill "$lead" && wait "$lead" 2>/dev/null || true
  done
done
