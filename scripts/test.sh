#!/usr/bin/env bash
# Install everything and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
rc=0
.venv/bin/python -m pytest tests "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  # pytest's 5 means "no tests collected": a suite that ran nothing has not passed.
  echo "scripts/test.sh: pytest collected no tests (exit 5); failing" >&2
  exit 1
fi
exit "$rc"
