#!/usr/bin/env bash
# The GPU test suite (pytest -m "gpu or multigpu" over tests/) spread over pytest-xdist workers on one machine: the
# tests are dominated by torch.compile's CPU time, the device has 16 cores, and one GPU holds every worker's tiny
# models at once. Usage (on the device, through run.sh): bash scripts/device/run.sh sh:scripts/device/gpu_suite.sh
#   GPU_SUITE_WORKERS  xdist workers (default 8)
#   GPU_SUITE_PATHS    test paths (default tests)
# Writes $OUT/gpu-tests.log: commit, GPU, versions, then pytest's output (-rs: every skip with its reason).
set -uo pipefail
# llama-cpp-python and the C++ extension are not built on the device (runs use the source tree): tests needing them
# skip with the reason in the log instead of failing (CI, where `make test` builds both, fails them).
export QUICKLORIS_TEST_ALLOW_MISSING=1
OUT=${OUT:-/tmp/quickloris-out}
mkdir -p "$OUT"
LOG="$OUT/gpu-tests.log"
{ echo "# GPU suite, commit ${QUICKLORIS_COMMIT:-unknown}, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
} > "$LOG" 2>&1
# The C++ extension, built with the image's cmake, ninja and nanobind into the source tree the run imports.
if ! python3 -c "import quickloris._native" 2>/dev/null; then
  nb=$(python3 -m nanobind --cmake_dir 2>/dev/null)
  if ( cmake -S . -B /tmp/ql-native -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v python3)" \
         -Dnanobind_DIR="$nb" && cmake --build /tmp/ql-native -j 16 && cp /tmp/ql-native/_native*.so src/quickloris/ \
       ) > "$OUT/.native-build.log" 2>&1; then
    echo "built quickloris._native here" >> "$LOG"
  else
    echo "could not build quickloris._native here (tests/export left out):" >> "$LOG"; tail -5 "$OUT/.native-build.log" >> "$LOG"
  fi
  rm -f "$OUT/.native-build.log"
fi
start=$(date +%s)
python3 -m pytest -q -rs -m "gpu or multigpu" -n "${GPU_SUITE_WORKERS:-8}" --dist load -p no:cacheprovider \
  ${GPU_SUITE_PATHS:-tests} >> "$LOG" 2>&1
rc=$?
# The kernel tests that follow the device (DEVICE = cuda when one is present) are unmarked, so the run above skips
# them: run them here too (their inductor compile of quickloris.dequantize_nf4 is only exercised on a GPU).
if [ -z "${GPU_SUITE_PATHS:-}" ]; then
  python3 -m pytest -q -rs -m "not gpu and not multigpu and not slow" -p no:cacheprovider \
    tests/kernels/test_nf4_dequant.py tests/kernels/test_nf4_launch.py >> "$LOG" 2>&1 || rc=1
fi
echo "=== GPU suite: exit $rc in $(( $(date +%s) - start )) s ===" >> "$LOG"
grep -E "^(FAILED|ERROR)|passed|failed|^=== GPU" "$LOG" | tail -30
exit $rc
