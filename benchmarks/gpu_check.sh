#!/usr/bin/env bash
# The one prepared GPU check, run on the lent machine (device tool) from the repo root:
#   installs the package, runs the GPU tests (again with OFA_TRITON_LAUNCH=direct for the Triton ops),
#   the host-time profile, the launcher sweep, the norm benchmark and the objective (sharpness)
#   benchmark, the OFA training-step benchmark, and writes everything under $OUT.
# One device call runs at most 10 minutes. The default STEPS fit one call (install + native build,
# then timeouts of 120 + 50 + 40 + 140 + 130 s; every step writes its results as it goes, so a step
# cut short still leaves what it measured):
#   STEPS="tests direct profile bench step"   (default)  the issue 13/15/16 targets
#   STEPS="tune objective"                                the launcher sweep and the sharpness bench
#   STEPS=step STEP_TIMEOUT=540                           the whole training-step bench (reference included)
# Knobs: STEPS, TEST_PATHS (default tests), TEST_K (pytest -k),
#        BENCH_SHAPES (default 150x4096,32768x4096,32768x8192; "all" for the whole grid), OBJ_ARMS (e.g. ce,fd1,fd4;
#        default all), TUNE_WIDTHS, TUNE_DTYPES (launcher sweep cells), TEST_TIMEOUT, DIRECT_TIMEOUT,
#        PROFILE_TIMEOUT, TUNE_TIMEOUT, CUDA_ROWS_TIMEOUT, BENCH_TIMEOUT, OBJ_TIMEOUT, STEP_TIMEOUT (seconds), REP_MS (timing window).
# Liger travels as a wheel in .whl/ (benchmarks/RESULTS.md says how it was fetched).
set -uo pipefail
OUT=${OUT:-/tmp/ofa_gpu_check}
STEPS=${STEPS:-tests direct profile bench step}
BENCH_SHAPES=${BENCH_SHAPES:-150x4096,32768x4096,32768x8192}
[[ "$BENCH_SHAPES" == all ]] && BENCH_SHAPES=""
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
# Editable, so the CUDA extension is built into the tree the tests import (ninja, nvcc on the image).
start=$(date +%s)
python3 -m pip install -v --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 \
  || { echo "pip install failed (see install.log); using the source tree"; export PYTHONPATH="$PWD:${PYTHONPATH:-}"; }
echo "install + native build: $(( $(date +%s) - start )) s"; grep "ofa_kernels:" "$OUT/install.log"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv \
  | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
python3 -c "import ofa_kernels; [print(k, v) for k, v in ofa_kernels.backends().items()]" | tee -a "$OUT/gpu.txt"

if [[ " $STEPS " == *" tests "* ]]; then
  echo "== GPU tests"
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
  # The CPU emulation of the CUDA kernels (test_cuda_emulated.py) is CI's: here the kernels run for real.
  OFA_TEST_DEVICE=cuda timeout "${TEST_TIMEOUT:-120}" python3 -m pytest ${TEST_PATHS:-tests} -q -m "not slow" \
    ${TEST_K:+-k "$TEST_K"} --ignore=tests/test_cuda_emulated.py \
    -p no:cacheprovider \
    $XDIST 2>&1 | tee "$OUT/tests.log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -25
fi
if [[ " $STEPS " == *" direct "* ]]; then
  echo "== Triton ops and captured steps through the compiled launcher (OFA_TRITON_LAUNCH=direct)"
  OFA_TEST_DEVICE=cuda OFA_TRITON_LAUNCH=direct timeout "${DIRECT_TIMEOUT:-50}" python3 -m pytest -q -m "not slow" \
    -p no:cacheprovider tests/test_norm_ops.py tests/test_probe_ops.py tests/test_trainer.py tests/test_patch.py \
    2>&1 | tee "$OUT/tests_direct.log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -25
fi
if [[ " $STEPS " == *" profile "* ]]; then
  echo "== host time per call, stage by stage (launch modes jit and direct)"
  timeout "${PROFILE_TIMEOUT:-40}" python3 benchmarks/launch_profile.py --out "$OUT" > "$OUT/profile.log" 2>&1
  echo "profile exit $?"
  cat "$OUT/launch_profile_cuda.md" 2>/dev/null || tail -5 "$OUT/profile.log"
fi
if [[ " $STEPS " == *" tune "* ]]; then
  echo "== launcher sweep"
  # Resumable cell by cell (tune_<arch>.json in $OUT): carry that file back into $OUT to continue a sweep.
  timeout "${TUNE_TIMEOUT:-150}" python3 benchmarks/tune_norm.py --out "$OUT" --widths "${TUNE_WIDTHS:-2048,4096,8192}" \
    --dtypes "${TUNE_DTYPES:-bfloat16,float32}" 2>&1 | tee "$OUT/tune.log" | tail -20
  echo "== CUDA backend: rows per CTA against its occupancy rule"
  timeout "${CUDA_ROWS_TIMEOUT:-45}" python3 benchmarks/tune_norm.py --out "$OUT" --cuda-rows --rep-ms 5 \
    --widths 1024,2048,4096,8192 --dtypes bfloat16,float32 --kernels fwd,bwd 2>&1 | tee "$OUT/tune_cuda_rows.log" | tail -20
fi
if [[ " $STEPS " == *" bench "* ]]; then
  echo "== norm benchmark"
  timeout "${BENCH_TIMEOUT:-140}" python3 benchmarks/bench_norm.py --out "$OUT" --rep-ms "${REP_MS:-30}" \
    ${BENCH_SHAPES:+--shapes "$BENCH_SHAPES"} --write-auto-table > "$OUT/bench.log" 2>&1
  echo "bench exit $?"
  cp ofa_kernels/ops/auto_backends.json "$OUT/" 2>/dev/null && grep "auto backend table" "$OUT/bench.log"
  grep -E "32768x4096 \| bfloat16|150x4096 \| bfloat16| us$|copy" "$OUT/norm_gpu.md" | head -80
fi
if [[ " $STEPS " == *" objective "* ]]; then
  echo "== objective benchmark (Llama-2-7B shape, bf16, 4 x 512)"
  timeout "${OBJ_TIMEOUT:-300}" python3 benchmarks/bench_objective.py --out "$OUT" ${OBJ_ARMS:+--arms "$OBJ_ARMS"} \
    > "$OUT/objective.log" 2>&1
  echo "objective exit $?"
  tail -5 "$OUT/objective.log"
  cat "$OUT/objective_gpu.md" 2>/dev/null
fi
if [[ " $STEPS " == *" step "* ]]; then
  echo "== OFA training step (Llama-2-7B shape, bf16) against the authors-style eager step"
  timeout "${STEP_TIMEOUT:-130}" python3 benchmarks/bench_ofa_step.py --out "$OUT" > "$OUT/ofa_step.log" 2>&1
  echo "step exit $?"
  grep -E "OOM|Error|error" "$OUT/ofa_step.log" | tail -5
  cat "$OUT/ofa_step_gpu.md" 2>/dev/null
fi
