#!/usr/bin/env bash
# Builds the torchtpu Python package (python/) from this checkout with maturin and installs it
# into the setup venv. Run by the setup command, and by the test command so the Python tests
# always see the working tree's Rust code.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TORCHTPU_VENV:-$HOME/.cache/torchtpu/venv}"
WHEELS="target/wheels"
rm -f "$WHEELS"/torchtpu-*.whl
"$VENV/bin/maturin" build --release --locked --quiet -i "$VENV/bin/python" -m python/Cargo.toml -o "$WHEELS"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps "$WHEELS"/torchtpu-*.whl
