#!/usr/bin/env bash
# Runs ON the device machine, in the repo root, with `.device/` carried (scripts/device/prepare.sh).
# Usage: bash scripts/device/run.sh STEP [STEP ...]
#   gpu-tests[:PATHS]  pytest -m "gpu or multigpu" over tests/ (or comma-separated PATHS)
#   bench-AREA         quickloris bench AREA (dequant, loss, train, fsdp: benchmarks/AREA/bench.py); options from
#                      $QUICKLORIS_BENCH_ARGS_<AREA> (this step's command line, e.g. QUICKLORIS_BENCH_ARGS_LOSS) or
#                      $QUICKLORIS_BENCH_TRAIN_ARGS / $QUICKLORIS_BENCH_FSDP_ARGS (read by those benches)
#   py:FILE            any python script (e.g. py:benchmarks/train/probe_speed.py)
#   sh:FILE            any bash script, with OUT exported (e.g. sh:scripts/device/fsdp_launchers.sh: the FSDP2 launches
#                      of a 2-GPU machine - quickloris train --fsdp, accelerate launch, the multigpu test - in one go)
#   torchrun:FILE      FILE under torchrun, one process per GPU, with --out $OUT/<FILE's name> and the options in
#                      $QUICKLORIS_TORCHRUN_ARGS (e.g. torchrun:examples/fsdp_two_gpus.py)
#   notebook           execute examples/fsdp_two_gpus.ipynb in place (all cells; 2 GPUs: its ranks run on them) and
#                      return it in $OUT; needs .device/notebook-wheels (QUICKLORIS_DEVICE_NOTEBOOK=1 make device-prepare)
# Results and logs go to $OUT (returned to the caller; benchmarks also write $OUT/reports/<topic>_<gpu>_<yyyymm>.md);
# keep it to <= 8 files.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/quickloris-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps .device/wheels/*.whl 2>&1 | grep -v "^WARNING" || true
# Unsloth (bench train's `unsloth` stack) goes into a folder of its own: it pins trl and datasets versions that
# the other stacks must not see; benchmarks/train/unsloth_stack.py puts the folder on its child's PYTHONPATH.
if ls .device/unsloth-wheels/*.whl >/dev/null 2>&1; then
  export QUICKLORIS_UNSLOTH_SITE=/tmp/quickloris-unsloth-site
  [ -d "$QUICKLORIS_UNSLOTH_SITE" ] || python3 -m pip install -q --no-index --no-deps --target "$QUICKLORIS_UNSLOTH_SITE" \
    .device/unsloth-wheels/*.whl .device/wheels/bitsandbytes-*.whl .device/wheels/dill-*.whl \
    .device/wheels/multiprocess-*.whl 2>&1 | grep -v "^WARNING" || true
fi
# src/: the library; the repository root: the `benchmarks` package (part of the source tree, not of the wheel)
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export QUICKLORIS_COMMIT="$(cat .device/commit.txt 2>/dev/null || echo unknown)"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
LOG="$OUT/device.log"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "gpus", torch.cuda.device_count())'
} 2>&1 | tee -a "$LOG"
status=0
for step in "$@"; do
  echo "=== $step ===" | tee -a "$LOG"
  start=$(date +%s)
  case "$step" in
    gpu-tests*)    paths=${step#gpu-tests}; paths=${paths#:}; paths=${paths//,/ }
                   python3 -m pytest -q -rs -m "gpu or multigpu" ${paths:-tests} -p no:cacheprovider 2>&1 | tee -a "$LOG"; rc=${PIPESTATUS[0]} ;;
    bench-*)       area=${step#bench-}; var="QUICKLORIS_BENCH_ARGS_$(echo "$area" | tr a-z A-Z)"
                   python3 -m quickloris bench "$area" --out "$OUT" ${!var:-} 2>&1 | tee -a "$LOG"; rc=${PIPESTATUS[0]} ;;
    py:*)          python3 "${step#py:}" --out "$OUT" 2>&1 | tee -a "$LOG"; rc=${PIPESTATUS[0]} ;;
    sh:*)          OUT="$OUT" bash "${step#sh:}" 2>&1 | tee -a "$LOG"; rc=${PIPESTATUS[0]} ;;
    torchrun:*)    f=${step#torchrun:}; n=$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')
                   python3 -m torch.distributed.run --standalone --nproc-per-node="$n" "$f" --out "$OUT/$(basename "$f" .py)" \
                     ${QUICKLORIS_TORCHRUN_ARGS:-} 2>&1 | tee -a "$LOG"; rc=${PIPESTATUS[0]} ;;
    notebook)      python3 -m pip install -q --no-index --find-links .device/notebook-wheels nbclient nbformat ipykernel 2>&1 \
                     | grep -v "^WARNING"
                   python3 examples/fsdp_notebook.py --all 2>&1 | tee -a "$LOG"; rc=${PIPESTATUS[0]}
                   cp examples/fsdp_two_gpus.ipynb "$OUT/" ;;
    *)             echo "unknown step $step" | tee -a "$LOG"; rc=2 ;;
  esac
  echo "=== $step: exit $rc in $(( $(date +%s) - start )) s ===" | tee -a "$LOG"
  [ "$rc" = 0 ] || status=$rc
done
exit $status
