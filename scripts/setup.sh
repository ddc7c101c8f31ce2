#!/usr/bin/env bash
# Shared set-up for scripts/example.sh and scripts/test.sh: system packages, a venv, the project.
# Idempotent: a second run reuses the venv and installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"kimia-curate needs Python 3.11, found {sys.version.split()[0]}"'

# System packages: espeak-ng (test speech, TTS round-trip), sox, ffmpeg (mp3/odd formats,
# torchcodec), chromium (the audit report is checked in a real browser).
need=()
for pair in espeak-ng:espeak-ng sox:sox ffmpeg:ffmpeg chromium:chromium; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    echo "installing system packages: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "warning: cannot install ${need[*]} (no root, no sudo); tests that need them will be skipped" >&2
  fi
fi

VENV=${KIMIA_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# Pinned torch/torchaudio/torchcodec come from pyproject.toml; plain pip, no index tricks.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e ".[test]"
