# Shared by tools/handoff-cost.sh, tools/promote-cost.sh and tools/follower-sync-rss.sh
# (sourced): a leader's dir of random segments, a secret, waiting for a log line, and the
# reports read from the nodes' logs. Set $tool (the name messages begin with) before sourcing.

secret_in() { # dir: a random shared secret in DIR/secret
  head -c 32 /dev/urandom | base64 >"$1/secret"
  chmod 600 "$1/secret"
}

segments_in() { # dir count kib: COUNT random segments of KIB KiB, and a state.json naming them
  mkdir -p "$1"
  python3 - "$1" "$2" "$3" <<'PY'
import os, sys
out, n, kib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for i in range(1, n + 1):
    with open(f"{out}/seg.{i}", "wb") as f:
        f.write(os.urandom(kib * 1024))
PY
  printf '{"segments": %d}\n' "$2" >"$1/state.json"
}

wait_for() { # what seconds command...: until the command succeeds, or exits naming WHAT
  local what=$1 deadline=$((SECONDS + $2))
  shift 2
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "$tool: no $what within the time" >&2; exit 1; }
    sleep 0.05
  done
}

# The python that reads a log line's time (its first field, UTC).
log_time_py='
import sys, datetime
def at(line):
    stamp = line.split()[0].rstrip("Z")
    return datetime.datetime.fromisoformat(stamp).replace(tzinfo=datetime.timezone.utc).timestamp()
'

inventory_report() { # started name what < log: when NAME's inventory was done and its sync received
  python3 -c "$log_time_py"'
started = float(sys.argv[1])
inventory = received = None
for line in sys.stdin:
    if inventory is None and "INFO inventory: " in line and "looked at" not in line:
        inventory = line
    if received is None and "initial sync received" in line:
        received = line
print("  %s: inventory done %.2f s and initial sync received %.2f s after the %s began" %
      (sys.argv[2], at(inventory) - started, at(received) - started, sys.argv[3]))
print("    " + inventory.split("INFO ", 1)[1].strip())
' "$@"
}

steps_report() { # started < lines: each line logged since STARTED, with its time after it
  python3 -c "$log_time_py"'
started = float(sys.argv[1])
for line in sys.stdin:
    if at(line) >= started:
        print("  %.3f s: %s" % (at(line) - started, line.split(None, 2)[2].strip()[:150]))
' "$@"
}
