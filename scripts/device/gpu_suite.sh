#!/usr/bin/env bash
# The GPU test suite (pytest -m "gpu or multigpu") in parallel shards on one machine: the tests are dominated by
# torch.compile's CPU time, and the device has 16 cores; one GPU holds every shard's tiny models at once.
# Usage (on the device, through run.sh): bash scripts/device/run.sh sh:scripts/device/gpu_suite.sh
#   GPU_SUITE_SHARDS  comma-separated groups of test paths separated by ';' (default: four groups below)
# Writes $OUT/gpu-tests.log: one section per shard (its pytest output) and a last line per shard with its exit status.
set -uo pipefail
OUT=${OUT:-/tmp/quickloris-out}
mkdir -p "$OUT"
default="tests/kernels,tests/quant,tests/ops,tests/tensor,tests/nn,tests/bench;tests/export,tests/cli,tests/train,tests/data;tests/models;tests/parallel"
IFS=';' read -r -a shards <<< "${GPU_SUITE_SHARDS:-$default}"
pids=()
for i in "${!shards[@]}"; do
  paths=${shards[$i]//,/ }
  ( start=$(date +%s)
    python3 -m pytest -q -rs -m "gpu or multigpu" $paths -p no:cacheprovider > "$OUT/.shard-$i.log" 2>&1
    rc=$?
    [ "$rc" = 5 ] && rc=0  # pytest: no test selected in these paths
    echo "=== shard $i ($paths): exit $rc in $(( $(date +%s) - start )) s ===" >> "$OUT/.shard-$i.log"
    exit $rc ) &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
{ echo "# GPU suite, commit ${QUICKLORIS_COMMIT:-unknown}, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  for i in "${!shards[@]}"; do cat "$OUT/.shard-$i.log"; rm -f "$OUT/.shard-$i.log"; done
} > "$OUT/gpu-tests.log"
grep "^=== shard\|passed\|failed\|error" "$OUT/gpu-tests.log" | tail -20
exit $status
