#!/usr/bin/env bash
# Builds and tests examples/user-ops, a user's own kernels as ops in a crate of its own: its
# Rust tests and command line, then its Python extension (maturin) and pytest suite, against
# the torchtpu package of this checkout (install it first: scripts/python-package.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TORCHTPU_VENV:-$HOME/.cache/torchtpu/venv}"
# One target directory with the main workspace: the dependencies it shares are built once.
export CARGO_TARGET_DIR="$PWD/target"
MANIFEST=examples/user-ops/Cargo.toml
cargo test --locked --manifest-path "$MANIFEST"
WHEELS="target/wheels-user-ops"
rm -f "$WHEELS"/user_ops-*.whl
"$VENV/bin/maturin" build --release --locked --quiet -i "$VENV/bin/python" -m "$MANIFEST" -o "$WHEELS"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEELS"/user_ops-*.whl
"$VENV/bin/python" -m pytest -q -p no:cacheprovider examples/user-ops/tests
