#!/usr/bin/env bash
# The test command the README gives: format, lints, then every unit, property and integration
# test (the integration tests start real `ferry` processes on 127.0.0.1, on both I/O engines, and
# a real etcd-server for the cluster tests).
# Installs what it needs when missing: protoc (etcd-client's build), etcd-server and iproute2
# (Debian); tools/fuzz.sh, run last, installs a C++ compiler for libFuzzer if there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/install-missing.sh
# ip(8) for the partition test's network namespaces (it skips, saying so, without root);
# unshare(1) for the inotify-limit tests, which give a leader a user namespace of its own.
install_missing protoc:protobuf-compiler etcd:etcd-server ip:iproute2 unshare:util-linux
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
# A short fuzzing run: builds the targets in fuzz/ (a separate workspace) and runs each for 20 s
# on a copy of its seed corpus; fails on any crash. tools/fuzz.sh SECONDS for a longer run.
./tools/fuzz.sh 20
