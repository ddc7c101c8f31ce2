#!/usr/bin/env bash
# Install everything and run the main job on the bundled example, verify the output, and
# export it as Kimi-Audio fine-tuning data (OUT.kimi-audio/data.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
OUT=${1:-out/example}
.venv/bin/kimia-curate run --config configs/local.yaml --input examples/audio --output "$OUT"
.venv/bin/kimia-curate inspect "$OUT"
# Exits 1 if no record could be written, 2 if the tokens came from another tokenizer.
.venv/bin/kimia-curate export kimi-audio "$OUT" "$OUT.kimi-audio" --config configs/local.yaml
