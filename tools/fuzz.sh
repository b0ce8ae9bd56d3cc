#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ on a stable toolchain and runs each one for
# SECONDS_PER_TARGET seconds (default 60) on a copy of its seed corpus in fuzz/corpus/<target>/.
# Exits non-zero if any target crashes, hangs (10 s for one input) or runs out of memory; the
# input that did it is saved as fuzz/artifacts/<target>/crash-... (or timeout-, oom-).
# Reproduce one with: tools/fuzz.sh --run TARGET FILE
#
# Stable Rust has no -Zsanitizer, so this is cargo-fuzz's `--sanitizer none` build done by hand:
# the sanitizer-coverage pass and the options cargo-fuzz gives it, with --target so build
# scripts and proc macros are left uninstrumented. libfuzzer-sys compiles libFuzzer with a C++
# compiler; ferry's build needs protoc (etcd-client). Both are installed with apt-get if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(frame_decode leader_handshake follower_handshake session_pair)

source tools/install-missing.sh
install_missing c++:g++ protoc:protobuf-compiler

triple="$(rustc -vV | sed -n 's/^host: //p')"
target_dir="${CARGO_TARGET_DIR:-fuzz/target}"
bin_dir="$target_dir/$triple/release"

build() {
  local start=$SECONDS
  RUSTFLAGS="--cfg fuzzing \
    -Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    -Cllvm-args=-sanitizer-coverage-stack-depth" \
    cargo build --locked --release --manifest-path fuzz/Cargo.toml --target "$triple" \
    "${targets[@]/#/--bin=}"
  echo "fuzz: built ${#targets[@]} targets in $((SECONDS - start)) s" >&2
}

if [ "${1:-}" = "--run" ]; then
  [ $# -eq 3 ] || { echo "usage: tools/fuzz.sh --run TARGET FILE" >&2; exit 2; }
  build
  exec "$bin_dir/$2" "$3"
fi

seconds="${1:-60}"
# libFuzzer takes -max_total_time=0 as "no limit".
[[ "$seconds" =~ ^[1-9][0-9]*$ ]] || { echo "usage: tools/fuzz.sh [SECONDS_PER_TARGET >= 1]" >&2; exit 2; }
cargo fmt --check --manifest-path fuzz/Cargo.toml
# The harness is code that can be wrong too: the same lints as the main crate (uninstrumented,
# into its own target dir, so the instrumented build below is not invalidated).
CARGO_TARGET_DIR="$target_dir/clippy" \
  cargo clippy --locked --manifest-path fuzz/Cargo.toml --all-targets -- -D warnings
build

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=()
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "fuzz/artifacts/$t"
  cp fuzz/corpus/"$t"/* "$work/$t/"
  log="$work/$t.log"
  status=0
  "$bin_dir/$t" "$work/$t" -max_total_time="$seconds" -timeout=10 -max_len=12000 \
    -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$t/" >"$log" 2>&1 || status=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
  cov="$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -n 1 | sed -E 's/.*cov: ([0-9]+) ft: ([0-9]+).*/cov \1, ft \2/')"
  corpus="$(find "$work/$t" -type f | wc -l)"
  if [ "$status" -ne 0 ]; then
    echo "fuzz: $t FAILED (exit $status) after ${execs:-?} execs" >&2
    grep -E -A 30 'panicked|ERROR: libFuzzer|SUMMARY' "$log" | head -n 60 >&2 || tail -n 40 "$log" >&2
    failed+=("$t")
  else
    echo "fuzz: $t: ${execs:-?} execs in ${seconds} s, ${cov:-no coverage line}, corpus $corpus inputs"
  fi
done
echo "fuzz: $((${#targets[@]} - ${#failed[@]})) passed, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: failing targets: ${failed[*]}; inputs in fuzz/artifacts/" >&2
  exit 1
fi
