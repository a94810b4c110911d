#!/usr/bin/env bash
# Runs every test: the Rust workspace's, the README's quick start, and the Python package's.
set -euo pipefail
cd "$(dirname "$0")/.."
# What the tests need, installed on first use (idempotent: quick once done).
bash scripts/deps.sh
# Formatting is part of the code (rustfmt.toml): a change that is not rustfmt-clean fails here.
cargo fmt --all --check
(cd examples/user-ops && cargo fmt --all --check)
# Both lock files record the workspace's dependencies: a stale one fails here, not 20 minutes in.
cargo metadata --locked --format-version 1 > /dev/null
cargo metadata --locked --format-version 1 --manifest-path examples/user-ops/Cargo.toml > /dev/null
# And so is clippy (clippy.toml): a warning fails the run.
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The README's quick start, run as written.
cargo run --locked --quiet --example quickstart > /dev/null
# The Python package, rebuilt from this checkout, and its tests (from the repository root,
# so `import torchtpu` finds the installed package rather than the python/torchtpu sources).
VENV="${TORCHTPU_VENV:-$HOME/.cache/torchtpu/venv}"
bash scripts/python-package.sh
"$VENV/bin/python" -m pytest -q -p no:cacheprovider python/tests
# A user's own ops in a crate of its own (examples/user-ops): built, then tested from Rust and Python.
bash scripts/user-ops.sh
