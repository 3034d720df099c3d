#!/usr/bin/env bash
# Installs Ragline with its development extras into ./.venv and runs the test suite.
#
# Locally the suite leaves out the tests marked slow (the kill -9 crash suite on four stores, the Ray
# cluster and Ray Serve tests, the watch and server processes: ~20 more minutes on 2 cores); CI
# (CI=true) runs them all, as does RAGLINE_SLOW_TESTS=1. Arguments go to pytest (e.g. `-m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
marks=(-m "not slow")
if [[ "${CI:-}" == "true" || "${RAGLINE_SLOW_TESTS:-}" == "1" ]]; then
  marks=()
fi
exec .venv/bin/python -m pytest -q "${marks[@]}" "$@"
