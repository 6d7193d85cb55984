#!/usr/bin/env bash
# Prepares `.device/`, the one folder every device run carries (see docs/device.md):
#   .device/wheels/   what the device image lacks, as wheels for its Python 3.12:
#                     bitsandbytes trimmed to its CUDA 13.0 library, trl, datasets (+dill, multiprocess), gguf
#   .device/unsloth-wheels/  Unsloth and what it pins (trl <= 1.15, datasets < 5), installed on the device into a
#                     folder of its own (run.sh: $QUICKLORIS_UNSLOTH_SITE) for the `unsloth` stack of bench train;
#                     its wheel trimmed of `studio/` (a web UI, 26 of its 29 MiB, that training never imports)
#   .device/commit.txt the commit being measured (the device copy has no .git)
#   .device/notebook-wheels/  only with QUICKLORIS_DEVICE_NOTEBOOK=1: Jupyter's kernel and executor (run.sh notebook)
# Stays far under the 64 MiB carry limit (about 8 MiB).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
D=.device
rm -rf "$D"
mkdir -p "$D/wheels" "$D/download"

"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform any \
  -d "$D/download" bitsandbytes==0.50.2 trl==1.16.0 datasets==5.2.0 'dill<0.4.2' 'multiprocess<0.70.20' gguf==0.19.0

# bitsandbytes ships one native library per CUDA/ROCm/XPU version (~120 MiB in all); the device runs
# torch 2.11+cu130, so keep only the CUDA 13.0 and CPU libraries and rewrite the wheel's RECORD.
"$PY" scripts/device/trim_wheels.py "$D/download" "$D/wheels" bitsandbytes "bitsandbytes/libbitsandbytes_*" \
  _cuda130.so,_cpu.so
rm -rf "$D/download"

# Unsloth, the peer `quickloris bench train` compares with (benchmarks/train/unsloth_stack.py), with the versions
# of trl and datasets it accepts; bitsandbytes, dill and multiprocess come from wheels/ above.
mkdir -p "$D/unsloth-download" "$D/unsloth-wheels"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any \
  -d "$D/unsloth-download" unsloth==2026.10.9 unsloth_zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 cut_cross_entropy==25.1.1
"$PY" scripts/device/trim_wheels.py "$D/unsloth-download" "$D/unsloth-wheels" unsloth studio/
rm -rf "$D/unsloth-download"

# Optional (QUICKLORIS_DEVICE_NOTEBOOK=1): what executing a notebook there needs (nbclient, nbformat, ipykernel and
# their dependencies, ~15 MiB), for run.sh's `notebook` step; the image's own packages are not carried again.
if [ "${QUICKLORIS_DEVICE_NOTEBOOK:-0}" = 1 ]; then
  mkdir -p "$D/notebook-wheels"
  "$PY" -m pip download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$D/notebook-wheels" nbclient nbformat ipykernel
  for have in packaging psutil pygments python_dateutil typing_extensions attrs six; do
    rm -f "$D/notebook-wheels/$have"-*.whl
  done
  ls "$D/notebook-wheels" | wc -l | xargs echo "notebook wheels:"
fi

commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit-dirty"
echo "$commit" > "$D/commit.txt"
du -sh "$D"
echo "commit: $commit"
