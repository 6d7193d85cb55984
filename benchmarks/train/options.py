"""The options of `quickloris bench train` (`benchmarks.train.bench`; also from $QUICKLORIS_BENCH_TRAIN_ARGS) and
their checks, made before anything is built."""

from __future__ import annotations

import argparse
import os
import shlex

from benchmarks.train.families import DEFAULT_FAMILY_SHAPES, FAMILY_SHAPES, parse_shapes

PARTS = ("1b", "counts", "8b", "maxlen", "families")
DEFAULT_PARTS = "1b,counts,8b"


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parts", default=DEFAULT_PARTS, help=f"comma-separated subset of {','.join(PARTS)} (default {DEFAULT_PARTS})"
    )
    parser.add_argument("--steps", type=int, default=8, help="training steps per stack (tokens/s: median of 3..N)")
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    parser.add_argument(
        "--stacks",
        type=_csv,
        default=["ql_eager", "ql_compiled", "hf_eager", "hf_compiled"],
        help="stacks of the 1b part",
    )
    parser.add_argument(
        "--stacks-8b",
        type=_csv,
        default=["ql_compiled", "hf_eager", "hf_compiled"],
        help="stacks of the 8b part at its first length (later lengths: hf_eager, ql_compiled)",
    )
    parser.add_argument(
        "--seqs-8b",
        type=lambda t: [int(x) for x in _csv(t)],
        default=[8192, 16384],
        help="8b: sequence lengths (batch 1); lengths after the first run hf_eager and ql_compiled",
    )
    parser.add_argument("--counts-steps", type=int, default=60, help="counts: steps of random length")
    parser.add_argument("--maxlen-start", type=int, default=8192, help="maxlen: first length tried")
    parser.add_argument("--maxlen-cap", type=int, default=131072, help="maxlen: longest length tried")
    parser.add_argument("--maxlen-resolution", type=int, default=4096, help="maxlen: bisection stops at this gap")
    parser.add_argument(
        "--maxlen-steps",
        type=int,
        default=1,
        help="maxlen: optimizer steps per trial; with 2 or more the last one's seconds are a step at that length "
        "without compiling or allocator growth",
    )
    parser.add_argument(
        "--maxlen-gpu-gib",
        type=float,
        default=None,
        help="maxlen: let each stack's process use at most this many GiB of the GPU (e.g. 79.2, an H100 80GB's "
        "capacity, on an H200); default: the whole GPU",
    )
    parser.add_argument(
        "--maxlen-stacks",
        type=_csv,
        default=["ql_compiled", "unsloth", "hf_eager", "hf_compiled", "ql_eager"],
        help="maxlen: the stacks probed",
    )
    parser.add_argument(
        "--attention",
        choices=["sdpa", "sdpa_cudnn", "flex"],
        default="sdpa",
        help="attention of the ql stacks (the HF stacks use transformers' sdpa)",
    )
    parser.add_argument(
        "--skip-last-1b",
        type=int,
        default=0,
        help="ql stacks, 1B part: leave the last k decoder layers un-checkpointed (memory for speed)",
    )
    parser.add_argument("--skip-last-8b", type=int, default=0, help="the same for the 8B part")
    parser.add_argument(
        "--mlp-chunks",
        type=int,
        default=1,
        help="ql stacks: each decoder MLP over this many checkpointed sequence chunks (CheckpointConfig.mlp_chunks; "
        "longest contexts)",
    )
    parser.add_argument(
        "--in-graph-1b",
        nargs="?",
        const="",
        default=None,
        metavar="KEEP",
        help="ql_compiled, 1B part: checkpoint traced into each compiled layer; KEEP (optional, "
        "comma-separated: attention, linears) is what it keeps besides the layer input",
    )
    parser.add_argument(
        "--in-graph-8b", nargs="?", const="", default=None, metavar="KEEP", help="the same for the 8B part"
    )
    parser.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        default=None,
        help="ql stacks: torch.compile mode of the regions (CompileConfig.mode, e.g. reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--family-shapes",
        default=DEFAULT_FAMILY_SHAPES,
        metavar="NAME[:BxS],...",
        help=f"families: shapes ({','.join(FAMILY_SHAPES)}), each optionally with batch x sequence "
        f"(default {DEFAULT_FAMILY_SHAPES}: "
        + ", ".join(f"{n} {f.batch}x{f.seq}" for n, f in FAMILY_SHAPES.items())
        + ")",
    )
    parser.add_argument(
        "--family-stacks",
        type=_csv,
        default=["ql_eager", "ql_compiled", "hf_eager", "hf_compiled"],
        help="stacks of the families part",
    )
    parser.add_argument(
        "--family-attention",
        choices=["sdpa", "sdpa_cudnn", "flex"],
        default="flex",
        help="attention of the ql stacks in the families part (the HF stacks use transformers' sdpa)",
    )
    parser.add_argument(
        "--family-steps",
        type=int,
        default=5,
        help="training steps per stack in the families part (default 5: 2 warm-up, 3 timed)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random base weights (batches: seed + 1)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and lengths (smoke run)")
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU (tests); not a measurement")
    extra = os.environ.get("QUICKLORIS_BENCH_TRAIN_ARGS")
    if extra:  # device runs (scripts/device/run.sh bench-train) pass options through the environment
        ns, unknown = parser.parse_known_args(shlex.split(extra))
        if unknown:
            raise ValueError(f"QUICKLORIS_BENCH_TRAIN_ARGS: unknown options {unknown}")
        given = {a.dest for a in parser._actions if any(o in shlex.split(extra) for o in a.option_strings)}
        parser.set_defaults(**{k: v for k, v in vars(ns).items() if k in given})


def checked_parts(args: argparse.Namespace) -> list[str]:
    """The parts of ``--parts``, once it, every stack list and the families options have been checked."""
    from benchmarks.train import models as tm

    parts = _csv(args.parts)
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")
    for option, stacks in (
        ("--stacks", args.stacks),
        ("--stacks-8b", args.stacks_8b),
        ("--family-stacks", args.family_stacks),
        ("--maxlen-stacks", args.maxlen_stacks),
    ):
        known = (*tm.STACKS, "ql_offload", "unsloth") if option != "--family-stacks" else tm.STACKS
        bad_stacks = set(stacks) - set(known)
        if bad_stacks or not stacks:
            raise ValueError(f"{option}: unknown {sorted(bad_stacks)}; choose from {','.join(known)}")
    if args.maxlen_steps < 1:
        raise ValueError(f"--maxlen-steps: {args.maxlen_steps}; at least 1")
    if "families" in parts:
        parse_shapes(args.family_shapes)  # a typo is reported before anything is built
        if args.family_steps < 3:
            raise ValueError(f"--family-steps: {args.family_steps}; at least 3 (tokens/s is the median of steps 3..N)")
    return parts
