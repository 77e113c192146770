#!/usr/bin/env bash
# The learner's GPU readiness check (benchmarks/gpu_check.py): one CUDA GPU,
# torch with CUDA, no vLLM, no network. Prints one JSON object; exit 0 when
# every check passed, 1 when one failed, 2 without a CUDA device, 124 past
# the 10-minute limit. `scripts/gpu_check.sh --device cpu --small` is the
# same run on a small model on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
# Nothing may be downloaded: the model and tokenizer are built locally.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec timeout 600 "$PY" -m benchmarks.gpu_check "$@"
