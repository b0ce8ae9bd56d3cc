#!/usr/bin/env bash
# The test command the README gives: format, lints, then every unit, property and integration
# test (the integration tests start real `ferry` processes on 127.0.0.1, on both I/O engines, and
# a real etcd-server for the cluster tests).
# Installs what it needs when missing: protoc (etcd-client's build), etcd-server and iproute2
# (Debian); tools/fuzz.sh, run last, installs a C++ compiler for libFuzzer if there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v protoc >/dev/null || missing+=(protobuf-compiler)
command -v etcd >/dev/null || missing+=(etcd-server)
# ip(8) for the partition test's network namespaces (it skips, saying so, without root).
command -v ip >/dev/null || missing+=(iproute2)
# unshare(1) for the inotify-limit tests, which give a leader a user namespace of its own.
command -v unshare >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian starts etcd as a service on install; the tests run their own.
  $sudo systemctl disable --now etcd >/dev/null 2>&1 || true
fi
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
# A short fuzzing run: builds the targets in fuzz/ (a separate workspace) and runs each for 20 s
# on a copy of its seed corpus; fails on any crash. tools/fuzz.sh SECONDS for a longer run.
./tools/fuzz.sh 20
