#!/usr/bin/env bash
# The test command the README gives: format, lints, then every unit, property and integration
# test (the integration tests start real `ferry` processes on 127.0.0.1, on both I/O engines).
# Installs nothing today: the core engine needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked
