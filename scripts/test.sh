#!/usr/bin/env bash
# Set up .venv with the test dependencies, then lint and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
# Debian's chromium for the browser test (idempotent; playwright never downloads a browser).
bash scripts/install-browser.sh || echo "warning: could not install chromium; the browser test will be skipped" >&2
# Debian's PostgreSQL for the shared-queue tests (they start and stop their own throwaway server).
bash scripts/install-postgres.sh || echo "warning: could not install PostgreSQL; the shared-queue tests will be skipped" >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check src tests bench
.venv/bin/ruff format --check src tests bench
.venv/bin/python -m pytest "$@"
