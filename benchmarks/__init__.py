"""quickloris' benchmarks: part of the source tree, not of the installed wheel.

`quickloris bench AREA` (src/quickloris/cli/bench.py) imports `benchmarks.AREA.bench` from the checkout the
library itself runs from (an editable install or `PYTHONPATH=src`); each area module exposes
`add_arguments(parser)` and `run(args) -> int`. Layout, one folder per topic:

    dequant/  loss/  train/  fsdp/      the `quickloris bench` areas (bench.py) and their helpers; probe scripts
    gguf_quantize.py  diag/             standalone scripts (run from the repository root, `python -m benchmarks....`
                                        or by path)
    results/<topic>/*.json              what the runs recorded (GPU, versions, commit, date: utils/provenance.py)
    reports/<topic>_<gpu>_<yyyymm>.md   readable reports generated from those files (`python -m benchmarks.report`)
"""
