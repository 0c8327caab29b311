#!/usr/bin/env bash
# Create or update the virtual environment .venv at the repo root. Idempotent and quick when nothing changed.
# Usage: bash scripts/setup.sh [extra]   (extra: "test" adds the test and server dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
spec="."
[ -n "$extra" ] && spec=".[$extra]"
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
  .venv/bin/python -m pip install --quiet --upgrade pip
fi
stamp=".venv/.ember-setup-$(cat pyproject.toml | sha256sum | cut -c1-16)-${extra:-base}"
if [ ! -f "$stamp" ]; then
  # torch first, pinned exactly, so that nothing else pulls a different (multi-GB) build.
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
  .venv/bin/python -m pip install --quiet -e "$spec"
  touch "$stamp"
fi
# tcmalloc, which the `ember` command runs under when present (optional: faster, same images).
bash scripts/install-tcmalloc.sh 2>/dev/null \
  || echo "note: could not install libtcmalloc-minimal4 (needs root or sudo); ember runs without it, slower" >&2
