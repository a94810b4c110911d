#!/usr/bin/env bash
# Installs what building, running and testing torchtpu need, from pinned versions: the Rust
# crates (Cargo.lock) and a venv with the pinned Python packages (requirements.txt: libtpu,
# the PJRT CPU plugin, torch, maturin, pytest, jaxlib for tests), and TorchTPU in a folder of
# its own for its bridge test (requirements-torch-tpu.txt). Idempotent and quick once done: the venv
# remembers the requirements it holds, so a later call installs nothing unless they changed.
# Downloads are cached under ~/.cache (and cargo's own ~/.cargo), never inside the repo.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "deps: cargo not found; install Rust (https://rustup.rs) first" >&2
    exit 1
fi
cargo fetch --locked --quiet

# Python side: a venv of our own, so the pinned versions never fight the system's.
VENV="${TORCHTPU_VENV:-$HOME/.cache/torchtpu/venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
STAMP="$VENV/.torchtpu-requirements.sha256"
WANT="$(sha256sum requirements.txt | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --cache-dir "$HOME/.cache/pip" -r requirements.txt
    echo "$WANT" > "$STAMP"
fi

# TorchTPU for the bridge test, in a folder of its own (see requirements-torch-tpu.txt):
# reinstalled whole when its pins change.
# Keyed by the pins and the venv's Python (the folder holds compiled extensions); installed
# next to the folder and moved into place, so a failed install leaves the old one whole, and
# only a folder this script made (it has the stamp) is ever replaced.
TORCH_TPU="${TORCHTPU_TORCH_TPU:-$HOME/.cache/torchtpu/torch-tpu}"
TORCH_TPU_STAMP="$TORCH_TPU/.torchtpu-requirements.sha256"
WANT_TORCH_TPU="$( (cat requirements-torch-tpu.txt; "$VENV/bin/python" -VV) | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$TORCH_TPU_STAMP" 2>/dev/null || true)" != "$WANT_TORCH_TPU" ]; then
    if [ -e "$TORCH_TPU" ] && [ ! -f "$TORCH_TPU_STAMP" ]; then
        echo "deps: $TORCH_TPU exists but was not made by this script; move it or set TORCHTPU_TORCH_TPU" >&2
        exit 1
    fi
    rm -rf "$TORCH_TPU.new"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --cache-dir "$HOME/.cache/pip" --no-deps --target "$TORCH_TPU.new" -r requirements-torch-tpu.txt
    echo "$WANT_TORCH_TPU" > "$TORCH_TPU.new/.torchtpu-requirements.sha256"
    rm -rf "$TORCH_TPU"
    mv "$TORCH_TPU.new" "$TORCH_TPU"
fi
