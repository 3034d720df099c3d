#!/usr/bin/env bash
# Creates ./.venv (Python 3.11) and installs Ragline with the given extras, e.g. `local,serve`.
# Safe to re-run: an up-to-date environment installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-local,serve}"
python_bin="$(command -v python3.11 || command -v python3)"
"$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "Ragline needs Python 3.11 (found $("$python_bin" --version))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
