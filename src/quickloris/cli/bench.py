"""`quickloris bench AREA`: benchmarks that record their results with provenance.

Each area is a module in `quickloris.bench` exposing `add_arguments(parser)` and `run(args) -> int`.
Every module also gets `--out DIR` (default: benchmarks/results/).
"""

from __future__ import annotations

import argparse
import importlib

# area -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "dequant": ("quickloris.bench.dequant", "NF4 dequantization vs Unsloth / bitsandbytes / PEFT (challenge part A)"),
    "loss": ("quickloris.bench.loss", "chunked linear + loss vs full logits: memory, time, 60-step QLoRA, GRPO (part E)"),
    "train": ("quickloris.bench.train", "QLoRA training tokens/s + memory vs HF+PEFT+bitsandbytes, compile counts, max context"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark and record its results")
    areas = parser.add_subparsers(dest="area", metavar="AREA", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        sub = areas.add_parser(name, help=help_text)
        sub.add_argument("--out", default=None, help="results folder (default: benchmarks/results/)")
        module = importlib.import_module(module_name)
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)
