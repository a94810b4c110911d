#!/usr/bin/env bash
# Installs everything torchtpu needs to build and test, from pinned versions.
# Downloads are cached under ~/.cache (and cargo's own ~/.cargo), never inside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi
cargo fetch --locked

# Python side: a venv of our own, so the pinned versions never fight the system's.
VENV="${TORCHTPU_VENV:-$HOME/.cache/torchtpu/venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --cache-dir "$HOME/.cache/pip" -r requirements.txt

# The torchtpu Python package (our PyO3 extension + the torch ops), built from this checkout.
bash scripts/python-package.sh
