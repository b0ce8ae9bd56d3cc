#!/usr/bin/env bash
# Runs the seeded random-fault tests of tests/faults.rs again and again, each run with its own
# seed, to look for the rare interleaving one CI run does not hit:
#   restarts_at_random_...   leader and follower restarted at random while a broker writes
#                            (held records, the leader's record); about 30 s a seed
#   leadership_moved_...     handoffs, kills and stops of a 3-node cluster under load (needs
#                            etcd, as cargo test does); about 20 s a seed
#   promotions_by_hand_...   the leader killed and a follower's dir led by `ferry lead`, again
#                            and again, while a broker writes; about 20 s a seed
#   an_embedding_broker_...  a broker embedding the leader (mmap'd preallocated segments) killed
#                            or stopped at random, and its followers too; about 25 s a seed
# usage: tools/soak.sh [SEEDS] [FIRST_SEED] [TEST_FILTER]   (defaults: 20, 1, all four tests)
# Each run's output goes to target/soak/<test>-<seed>.log; it prints one line per seed and exits
# non-zero if any failed, naming the seeds (FERRY_FAULT_SEED=N cargo test --release --test
# faults TEST replays one).
set -euo pipefail
cd "$(dirname "$0")/.."
seeds="${1:-20}"
first="${2:-1}"
filters=("${3:-restarts_at_random}")
[ -n "${3:-}" ] || filters+=(leadership_moved promotions_by_hand an_embedding_broker)

bin="$(cargo test --release --locked --test faults --no-run --message-format=json 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*faults-[^"]*\)".*/\1/p' | tail -1)"
[ -x "$bin" ] || { echo "soak: cannot build the faults test" >&2; exit 1; }
mkdir -p target/soak
failed=()
for filter in "${filters[@]}"; do
  for ((seed = first; seed < first + seeds; seed++)); do
    log="target/soak/$filter-$seed.log"
    start=$SECONDS
    if FERRY_FAULT_SEED=$seed timeout 600 "$bin" "$filter" --nocapture >"$log" 2>&1; then
      echo "soak: $filter seed $seed passed in $((SECONDS - start)) s"
    else
      echo "soak: $filter seed $seed FAILED in $((SECONDS - start)) s: $log"
      failed+=("$filter:$seed")
    fi
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "soak: failed: ${failed[*]}" >&2
  exit 1
fi
echo "soak: all passed"
