#!/usr/bin/env bash
# Installs everything torchtpu needs from pinned versions (scripts/deps.sh), and the torchtpu
# Python package built from this checkout: for using torchtpu from Python. The README's two
# commands (scripts/main-job.sh, scripts/test.sh) install what they need themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
bash scripts/python-package.sh
