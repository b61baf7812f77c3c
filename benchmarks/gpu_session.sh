#!/usr/bin/env bash
# Everything a GPU session checks, in one command (run on the device machine from the
# repository root; outputs land in $OUT, default /tmp/gpu_out):
#   1. benchmarks/gpu.py      - Triton check + GPU benchmark + issue-5 GPU targets
#   2. pytest on CUDA         - tests/test_cuda.py, test_triton_op.py, test_compile.py, test_examples.py;
#                               test_cuda.py again with --shape-only-min-numel 0
#   3. OpInfo sweep on CUDA   - tests/opinfo_harness.py --device cuda (time-budgeted; shape-only
#                               pointwise tracing from any size unless GPU_OPINFO_SHAPE_ONLY says)
# expecttest (needed by PyTorch's op_db) is not on the GPU image: copy it to .whl/site
# (git-ignored) and carry .whl. Each step has its own timeout; a failing step does
# not stop the next one.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/src:$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

timeout "${GPU_BENCH_S:-150}" $PY benchmarks/gpu.py --out "$OUT/gpu_results.md" 2>&1 | tee "$OUT/gpu_log.txt"
echo "gpu.py exit: ${PIPESTATUS[0]}"

# (test_examples' --cpu-smoke run of gpu.py is a CPU check that CI already runs; it is
# slow on a fresh machine, whose Inductor C++ cache is cold.)
timeout "${GPU_TEST_S:-200}" $PY -m pytest -q -p no:cacheprovider --durations 8 tests/test_cuda.py \
  tests/test_triton_op.py tests/test_compile.py tests/test_examples.py \
  --deselect tests/test_examples.py::test_gpu_benchmark_cpu_smoke 2>&1 | tee "$OUT/pytest_cuda.txt" | tail -30
echo "pytest exit: ${PIPESTATUS[0]}"
# The CUDA tests again with pointwise tangent arithmetic recorded shape-only from any size
# (tracing's _pointwise_shape_only path on every CUDA workload).
timeout "${GPU_TEST0_S:-120}" $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
  --shape-only-min-numel 0 2>&1 | tee "$OUT/pytest_cuda_shape_only.txt" | tail -5
echo "pytest (shape-only from 0) exit: ${PIPESTATUS[0]}"

# GPU_OPINFO_DTYPES / GPU_OPINFO_LIMIT choose the sweep's dtypes and samples per op.
# OPINFO_FROM resumes a sweep that an earlier session's budget cut short.
timeout "${GPU_OPINFO_S:-100}" $PY tests/opinfo_harness.py --device cuda \
  --dtypes "${GPU_OPINFO_DTYPES:-float64,float32}" --limit "${GPU_OPINFO_LIMIT:-4}" --shape-only-min-numel "${GPU_OPINFO_SHAPE_ONLY:-0}" --budget-s "${GPU_OPINFO_BUDGET_S:-75}" ${OPINFO_FROM:+--skip-until "$OPINFO_FROM"} \
  > "$OUT/opinfo_cuda.txt" 2>&1
echo "opinfo exit: $?"
tail -4 "$OUT/opinfo_cuda.txt"
