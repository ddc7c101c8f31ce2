#!/usr/bin/env bash
# Install everything and run the main job on the bundled example, then verify the output.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-out/example}
.venv/bin/kimia-curate run --config configs/local.yaml --input examples/audio --output "$OUT"
.venv/bin/kimia-curate inspect "$OUT"
