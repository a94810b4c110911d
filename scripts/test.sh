#!/usr/bin/env bash
# Runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --locked
# The README's quick start, run as written.
cargo run --locked --quiet --example quickstart > /dev/null
