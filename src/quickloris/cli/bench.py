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
    "fsdp": ("quickloris.bench.fsdp", "QLoRA with FSDP2 on 2 GPUs vs 1: loss parity, scaling, memory with/without offload"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="run a benchmark and record its results",
        description="areas: " + "; ".join(f"{name}: {help_text}" for name, (_, help_text) in BENCHES.items()))
    parser.add_argument("area", choices=sorted(BENCHES), metavar="AREA", help=", ".join(sorted(BENCHES)))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the area's options (see: quickloris bench AREA -h)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    """Only the chosen area's module is imported, so one benchmark's dependencies never break another's."""
    module_name, help_text = BENCHES[args.area]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"quickloris bench {args.area}", description=help_text)
    parser.add_argument("--out", default=None, help="results folder (default: benchmarks/results/)")
    module.add_arguments(parser)
    return module.run(parser.parse_args(args.options))
