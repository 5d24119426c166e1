#!/usr/bin/env bash
# The GPU machine's run for cuda_bindings (issue #6), from the repository root, in under 6 minutes:
# install the carried cffi/pycparser wheels, build tests/gpu/workload.cu, run tests/gpu, run
# bench/cuda_bench.py. Everything lands in $OUT (7 files): smi.txt build.log gpu_tests.log
# gpu_report.jsonl bench.log cuda_bench.json cuda_bench.md.
# Needs .whl/cffi-*.whl and .whl/pycparser-*.whl (carry .whl); nvcc, python3 with torch, pytest.
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/kyb-out}
mkdir -p "$OUT"
elapsed() { echo $(( $(date +%s) - START )); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/cffi-*.whl .whl/pycparser-*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

{ nvidia-smi --query-gpu=name,uuid,driver_version,memory.used,memory.total,persistence_mode \
    --format=csv; nvidia-smi --query-compute-apps=pid,used_memory --format=csv; uname -r;
  python3 -c "import sys, cffi, cuda_bindings; print(sys.version.split()[0], 'cffi', cffi.__version__, cuda_bindings.__file__)"
  python3 -m cuda_bindings devices; } > "$OUT/smi.txt" 2>&1
cat "$OUT/smi.txt"

BUILD=/tmp/kyb-build
mkdir -p "$BUILD"
if ! timeout 120 nvcc -O2 -arch=sm_90 -cudart static -o "$BUILD/workload" tests/gpu/workload.cu \
    > "$OUT/build.log" 2>&1; then
  cat "$OUT/build.log"; echo "workload build failed"; exit 1
fi
echo "built workload in $(elapsed)s"

export KYBERNATE_WORKLOAD=$BUILD/workload
export KYB_GPU_REPORT=$OUT/gpu_report.jsonl
export KYB_WORKLOAD_PIDS=/tmp/kyb-workload-pids
: > "$KYB_GPU_REPORT"; : > "$KYB_WORKLOAD_PIDS"

timeout 170 python3 -m pytest -q -rA -p no:cacheprovider tests/gpu/test_gpu_cuda.py > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests rc=$? at $(elapsed)s"
grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu_tests.log" | tail -25

LEFT=$(( 340 - $(elapsed) ))
if [ "$LEFT" -gt 40 ]; then
  timeout "$LEFT" python3 bench/cuda_bench.py --out "$OUT" --workload "$BUILD/workload" \
    --budget-s $(( LEFT - 25 )) > "$OUT/bench.log" 2>&1
  echo "bench rc=$? at $(elapsed)s"
  cat "$OUT/cuda_bench.md" 2>/dev/null || tail -20 "$OUT/bench.log"
else
  echo "no time left for the bench ($LEFT s)"
fi

# Workloads a cut-short run may have left behind: only the pids we started, only if still ours.
while read -r pid; do
  if [ -n "$pid" ] && grep -qa workload "/proc/$pid/cmdline" 2>/dev/null; then kill -9 "$pid"; fi
done < "$KYB_WORKLOAD_PIDS"
echo "done in $(elapsed)s"
