#!/usr/bin/env bash
# The main job: tunes causal flash attention (1x8x2048x128, f32) on the CPU through PJRT,
# prints every candidate with its time and plots them as a heatmap (flash.svg). Installs what
# it needs on first use (scripts/deps.sh). Arguments are passed on to `torchtpu tune`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo run --locked --quiet -- tune flash_attention --device cpu --plot flash.svg "$@"
