#!/usr/bin/env bash
# The GPU part of issue #5 as one prepared run on the lent GPU machine (see "Running the GPU part" in
# docs/benchmarks.md): correctness of capture's GPU path first (and no host sync in hooks), then the 1B
# shape's generate comparison, then the suite, then a profile of host time inside real passes of the 135M
# shape with timed comparisons of copy paths and of generate capture (host_profile.py; hook_overhead.py,
# the cost of one hook call in a tight loop, is run by hand). Writes into $OUT (default: ./gpu-out).
# Time. On an H100 (2026-11-27, run 4, with nnsight and steering-vectors) the check took ~25 s (it checks
# both copy paths since then: ~10 s more) and the suite 325 s with 5 forward rounds (9 since then, and one
# more forward case, bare_sync: ~25 s more by estimate, not measured). The 1B generate comparison is an
# estimate too (~60 s: 4 ways x 9 generates of ~1-1.5 s, and the model's start). The limits add up to
# 565 s (check 50, 1B generate 75, suite 380, 135M profile 60) plus ~15 s of setup: run it with the device
# tool's timeout_s=590.
# What survives a limit: host_profile prints its timed comparisons (generate first) before its profiles,
# which the 1B step's limit may cut; on a GPU the suite times the models first and the methods last, and
# writes its results after each model, so a suite cut off by its limit keeps every model it finished.
# Expects .gpu/whl (peer wheels for Python 3.12) and .gpu/method_acts.safetensors (real activations for
# the methods, saved on the CPU with `run.py --method-activations`), both optional. To prepare them here
# (`.gpu/` is ignored; carry it with the run):
#   mkdir -p .gpu
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .gpu/whl nnsight==0.8.1 steering-vectors==0.12.2 greenlet pydantic pydantic-core annotated-types \
#     typing-inspection typing-extensions websocket-client zstandard
#   .venv/bin/python -c "import sys; sys.path.insert(0, 'benchmarks'); import run, torch; \
#     run._method_activations(run.parse_args(['--method-activations', '.gpu/method_acts.safetensors']), torch.device('cpu'))"
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
git describe --always --dirty --abbrev=7 --exclude='*' 2>&1 | tee "$OUT/commit.txt"
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 50 python3 benchmarks/gpu_check.py 2>&1 | tee "$OUT/gpu_check.txt"
# The 1B shape's generate with capture against plain generate, the suite's workload (16 x 512 prompt
# tokens, 64 new tokens) and its 8 rounds, before anything else loads the host: the one GPU target whose
# ratio at the current join (a2ab25c and after) no run has measured. Only its first table is needed.
timeout 75 python3 benchmarks/host_profile.py --model llama-1b-shape --cases gen_plain,gen_tl \
  --new-tokens 64 --rounds 8 2>&1 | grep -v "^USDT" | tee "$OUT/host_profile_1b.txt"
cp docs/benchmarks.md "$OUT/benchmarks.md"
acts=()
[ -f .gpu/method_acts.safetensors ] && acts=(--method-activations .gpu/method_acts.safetensors)
timeout "${SUITE_TIMEOUT:-380}" python3 benchmarks/run.py --device cuda "${acts[@]}" --out "$OUT/benchmarks.md" \
  --json "$OUT/gpu.json" 2>&1 | tee "$OUT/run_log.txt"
timeout 60 python3 benchmarks/host_profile.py --new-tokens 16 --rounds 8 2>&1 | grep -v "^USDT" \
  | tee "$OUT/host_profile.txt"
