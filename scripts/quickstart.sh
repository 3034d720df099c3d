#!/usr/bin/env bash
# The main job on the embedded defaults: install, index the bundled samples,
# show the cited passages for a sample question, answer it with the local
# model, then serve the API.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh local,llm,serve
. .venv/bin/activate
ragline --config samples/ragline.yaml ingest
question="$(head -n 1 samples/questions.txt)"
echo; echo "Q: $question"
ragline --config samples/ragline.yaml search "$question" -k 3
echo
ragline --config samples/ragline.yaml ask "$question"
echo; echo "Serving on http://127.0.0.1:8000 (POST /v1/search, /v1/query, /v1/query/stream; GET /healthz, /readyz); Ctrl-C to stop."
exec ragline --config samples/ragline.yaml serve
