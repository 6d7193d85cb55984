"""`quickloris bench AREA`: benchmarks that record their results with provenance.

The benchmarks are part of the source tree, not of the installed package: each area is the module
`benchmarks.AREA.bench` of the checkout this quickloris runs from (``<root>/src/quickloris`` next to
``<root>/benchmarks``: an editable install or ``PYTHONPATH=src``), exposing `add_arguments(parser)` and
`run(args) -> int`. Every area also gets `--out DIR` (default: benchmarks/results/); each writes its JSON under
``<out>/<area>/`` and the month's readable report (`benchmarks.report`) beside the results.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from types import ModuleType

# area -> one-line help (kept here so that `quickloris bench -h` needs no checkout)
BENCHES: dict[str, str] = {
    "dequant": "NF4 dequantization vs Unsloth / bitsandbytes / PEFT (challenge part A)",
    "loss": "chunked linear + loss vs full logits: memory, time, 60-step QLoRA, GRPO (part E)",
    "train": "QLoRA training tokens/s + memory vs HF+PEFT+bitsandbytes, compile counts, max context",
    "fsdp": "QLoRA with FSDP2 on 2 GPUs vs 1: loss parity, scaling, memory with/without offload",
    "vision": "vision-language QLoRA: a learning check on a visual task, Qwen2-VL-2B speed (packed / padded) vs HF",
}

NOT_IN_WHEEL = (
    "the benchmarks ship with the source tree (benchmarks/ in a clone of the repository), not with the "
    "installed package: run it from a checkout installed with `pip install -e .`"
)


class BenchmarksUnavailable(RuntimeError):
    """No `benchmarks` package belongs to the quickloris being run (an installed wheel), or another one shadows it."""


def checkout_root(here: Path | None = None) -> Path | None:
    """The source checkout quickloris runs from, if it holds the benchmarks package; None for an installed wheel.
    `here`: this file's path (``<root>/src/quickloris/cli/bench.py`` in a checkout)."""
    here = (here or Path(__file__)).resolve()
    root = here.parents[3]
    if here.parents[2].name != "src" or not (root / "benchmarks" / "__init__.py").is_file():
        return None
    return root


def load_area(area: str) -> ModuleType:
    """`benchmarks.<area>.bench` from this quickloris' checkout (raises BenchmarksUnavailable without one)."""
    root = checkout_root()
    if root is None:
        raise BenchmarksUnavailable(NOT_IN_WHEEL)
    if str(root) not in sys.path:
        sys.path.append(str(root))  # appended: nothing the interpreter already resolves changes
    module = importlib.import_module(f"benchmarks.{area}.bench")
    origin = Path(module.__file__ or "").resolve()
    if root not in origin.parents:
        raise BenchmarksUnavailable(
            f"`benchmarks` resolves to {origin.parent.parent}, not to this checkout's "
            f"{root / 'benchmarks'}: another package of that name comes first on sys.path"
        )
    return module


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark and record its results (source checkouts only)",
        description="areas: "
        + "; ".join(f"{name}: {help_text}" for name, help_text in BENCHES.items())
        + ". The benchmarks live in the source tree's benchmarks/ folder, not in the installed package.",
    )
    parser.add_argument("area", choices=sorted(BENCHES), metavar="AREA", help=", ".join(sorted(BENCHES)))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the area's options (see: quickloris bench AREA -h)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    """Only the chosen area's module is imported, so one benchmark's dependencies never break another's."""
    try:
        module = load_area(args.area)
    except BenchmarksUnavailable as e:
        print(f"quickloris bench: {e}")
        return 2
    parser = argparse.ArgumentParser(prog=f"quickloris bench {args.area}", description=BENCHES[args.area])
    parser.add_argument(
        "--out",
        default=None,
        help="results folder (default: benchmarks/results/; the report goes "
        "to benchmarks/reports/, or to <out>/reports/ when --out is given)",
    )
    module.add_arguments(parser)
    return module.run(parser.parse_args(args.options))
