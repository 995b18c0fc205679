#!/usr/bin/env bash
# The GPU part of issue #5 as one prepared run on the lent GPU machine (see docs/benchmarks.md):
# correctness of capture's GPU path first, then the suite. Writes into $OUT (default: ./gpu-out).
# Expects .gpu/whl (peer wheels for Python 3.12) and .gpu/method_acts.safetensors (real activations for
# the methods, saved on the CPU with `run.py --method-activations`), both optional.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
cp docs/benchmarks.md "$OUT/benchmarks.md"
acts=()
[ -f .gpu/method_acts.safetensors ] && acts=(--method-activations .gpu/method_acts.safetensors)
timeout "${SUITE_TIMEOUT:-480}" python3 benchmarks/run.py --device cuda "${acts[@]}" --out "$OUT/benchmarks.md" \
  --json "$OUT/gpu.json" 2>&1 | tee "$OUT/run_log.txt"
timeout 90 python3 benchmarks/hook_overhead.py 2>&1 | tee "$OUT/hook_overhead.txt"
