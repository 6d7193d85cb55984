#!/usr/bin/env bash
# A/B of `quickloris bench train` between this tree and an older commit's, in one call on one GPU (a regression hunt:
# timings compare only within one run). Here, before the call:
#   rm -rf .device/old && mkdir -p .device/old && git archive <COMMIT> src benchmarks | tar -x -C .device/old
#   echo <COMMIT> > .device/old/commit.txt
# On the device (through run.sh, which installs the wheels): bash scripts/device/run.sh sh:scripts/device/ab_train.sh
#   AB_ARGS  bench train options for both (default: --parts 1b --stacks ql_compiled --steps 8)
#   AB_ROUNDS  how many times each side runs, alternating (default 2: A B A B)
# Writes $OUT/ab/{new,old}-<round>/train/*.json and prints each side's tokens/s line.
set -uo pipefail
OUT=${OUT:-/tmp/quickloris-out}
ARGS=${AB_ARGS:---parts 1b --stacks ql_compiled --steps 8}
[ -d .device/old/src ] || { echo "ab_train.sh: no .device/old/src (see the header)"; exit 2; }
for round in $(seq 1 "${AB_ROUNDS:-2}"); do
  for side in new old; do
    if [ "$side" = new ]; then root=$PWD; commit=${QUICKLORIS_COMMIT:-unknown}; else root=$PWD/.device/old; commit=$(cat .device/old/commit.txt 2>/dev/null || echo old); fi
    echo "--- $side ($commit), round $round ---"
    ( cd "$root" && QUICKLORIS_COMMIT=$commit PYTHONPATH=$root/src:$root python3 -m quickloris bench train $ARGS \
        --out "$OUT/ab/$side-$round" 2>&1 | grep -E "tok/s|Error|error" )
  done
done
