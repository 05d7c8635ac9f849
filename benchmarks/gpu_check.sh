#!/usr/bin/env bash
# Does the recipe work on this GPU? One command, under 9 minutes on an H100 or H200: the steps and
# their limits are in benchmarks/gpu_check.py. Prints "no CUDA device" and exits 0 where there is none
# (GPU_CHECK_DEVICE=cpu runs it on the CPU instead, as a dry run with the 2-layer stand-in).
#
# A GPU machine without network may lack packages the check needs (bitsandbytes, dagster, duckdb,
# bert_score, ...): benchmarks/gpu_wheels.py downloads them here, for its Python, into
# benchmarks/gpu_wheels/part-N (each part small enough to travel with one run); this script installs
# whatever parts it finds, offline and without dependencies (the machine's torch and transformers stay).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
if [ "${GPU_CHECK_DEVICE:-cuda}" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "no CUDA device"
  exit 0
fi
shopt -s nullglob
wheels=(benchmarks/gpu_wheels/part-*/*.whl)
if [ "${GPU_CHECK_DEVICE:-cuda}" = cuda ] && [ ${#wheels[@]} -gt 0 ]; then
  echo "installing ${#wheels[@]} carried wheels (offline, no dependencies)" >&2
  "$PYTHON" -m pip install --quiet --no-index --no-deps --disable-pip-version-check "${wheels[@]}" || echo "some carried wheels did not install" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
exec "$PYTHON" -m benchmarks.gpu_check "$@"
