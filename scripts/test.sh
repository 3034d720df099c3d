#!/usr/bin/env bash
# Installs Ragline with its development extras into ./.venv and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/python -m pytest -q "$@"
