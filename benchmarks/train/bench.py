"""`quickloris bench train`: QLoRA training throughput and memory, quickloris vs HF + PEFT + bitsandbytes.

Same config for every stack: random-init Llama shapes, bf16, NF4 double quant (the *same* bytes, shared), LoRA
r=16 alpha=32 on q,k,v,o,gate,up,down with the same initialisation, AdamW lr 1e-4, non-reentrant gradient
checkpointing, SDPA, ``model.train()``; peak memory is ``max_memory_allocated`` after a reset taken once the
model is built (weights included); tokens/s is the median over steps 3..N. Stacks (`benchmarks.train.models`):
``hf_eager``, ``hf_compiled`` (each decoder layer torch.compiled, static shapes), ``ql_eager``, ``ql_compiled``
(regional compile: layers, final norm, loss chunk; dynamic shapes), ``ql_offload`` (``ql_compiled`` with the
checkpointed layer inputs in pinned CPU memory: the longest contexts; GPU only), ``unsloth`` (Unsloth itself, in its
own process: `benchmarks.train.unsloth_stack`).

Parts (``--parts``; default ``1b,counts,8b``; options can also come from $QUICKLORIS_BENCH_TRAIN_ARGS, e.g.
``QUICKLORIS_BENCH_TRAIN_ARGS="--parts maxlen" bash scripts/device/run.sh bench-train``):
* ``1b``: Llama-3.2-1B shape, 4 x 2048, the four stacks; per-step losses compared with ``hf_eager``.
* ``counts``: ``ql_compiled`` from a cleared dynamo cache, 60 steps (``--counts-steps``) of batch 1 with lengths
  drawn uniformly from 64..2048: graph breaks and graphs compiled (dynamo's counters), and per-step losses
  against ``ql_eager`` on the same batches.
* ``8b``: Llama-3.1-8B shape, 1 x 8192 with ``--stacks-8b`` (default ``ql_compiled,hf_eager,hf_compiled``),
  1 x 16384 with ``hf_eager`` and ``ql_compiled``.
* ``maxlen``: the longest 1 x S that trains (one optimizer step) for the 8B shape, ``hf_eager`` and
  ``ql_compiled``: S doubles from ``--maxlen-start`` until out of memory (or ``--maxlen-cap``), then bisects to
  ``--maxlen-resolution`` tokens.
* ``families``: other families' real shapes (`benchmarks.train.families`: ``--family-shapes``, default
  Gemma-3-1B 4 x 2048 and Phi-3-mini-4k 2 x 2048), the stacks of ``--family-stacks`` (default all four), LoRA on
  every decoder linear under the family's names (Phi-3: the fused ``qkv_proj``, ``gate_up_proj``), the quickloris
  stacks on ``--family-attention`` (default flex); ``--family-steps`` steps (default 5: 2 warm-up, 3 timed) on
  the same batches, per-step losses compared with ``hf_eager``. One base at a time, each stack's model freed
  before the next; a stack or shape that fails (out of memory, say) records its error and the rest still run.

``--quick`` trims steps and lengths (a smoke run); ``--tiny`` runs everything on a tiny model on CPU (aot_eager
compile backend; the families part in fp32): the tests use it. ``--seed`` draws other base weights and batches.
Without CUDA (and without --tiny) it prints why and measures nothing. Results:
``quickloris.utils.provenance.record("train", ...)`` under ``--out``; each part's numbers are also printed as it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from typing import Any

from benchmarks.train.families import (
    DEFAULT_FAMILY_SHAPES,
    FAMILY_SHAPES,
    failed,
    parse_shapes,
    part_families,
    summary_lines,
)
from benchmarks.train.unsloth_stack import run_unsloth

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


def _setup(args) -> dict[str, Any]:
    from benchmarks.train import models as tm

    if args.tiny:
        return dict(
            device="cpu",
            backend="aot_eager",
            shape_1b=tm.TINY,
            shape_8b=tm.TINY,
            batch_1b=2,
            seq_1b=64,
            seqs_8b=[48, 96],
            counts_range=(8, 96),
            maxlen=(32, 256, 32),
        )
    if args.quick:
        args.steps = min(args.steps, 5)
        args.counts_steps = min(args.counts_steps, 20)
    return dict(
        device="cuda",
        backend="inductor",
        shape_1b=tm.LLAMA_1B,
        shape_8b=tm.LLAMA_8B,
        batch_1b=4,
        seq_1b=2048,
        seqs_8b=args.seqs_8b[:1] if args.quick else args.seqs_8b,
        counts_range=(64, 2048),
        maxlen=(
            args.maxlen_start,
            min(args.maxlen_cap, 65536) if args.quick else args.maxlen_cap,
            args.maxlen_resolution * (2 if args.quick else 1),
        ),
    )


def _build(
    tm,
    stack: str,
    base,
    env,
    args,
    lora_init,
    skip_last: int = 0,
    in_graph: str | None = None,
    attention: str | None = None,
):
    """`in_graph`: None (transformers' eager checkpoint) or the in-graph checkpoint's keep list, comma-separated;
    `attention`: the ql stacks' (default ``--attention``)."""
    compiled = stack.endswith("compiled") or stack == "ql_offload"
    if stack.startswith("hf"):
        model = tm.hf_stack(base, device=env["device"], compiled=compiled, compile_backend=env["backend"])
    else:
        model = tm.ql_stack(
            base,
            device=env["device"],
            compiled=compiled,
            compile_backend=env["backend"],
            attention=attention or args.attention,
            skip_last=skip_last,
            offload=stack == "ql_offload",
            mlp_chunks=args.mlp_chunks,
            checkpoint_in_graph=in_graph is not None,
            checkpoint_keep=[k for k in (in_graph or "").split(",") if k],
        )
    if lora_init is not None:
        tm.apply_lora_init(lora_init, model)
    return model


def _compare(runs: dict[str, dict], ref: str = "hf_eager") -> None:
    runs = {name: run for name, run in runs.items() if "error" not in run}  # a stack that failed has no numbers
    for run in runs.values():
        if ref in runs:
            base_loss = runs[ref]["losses"]
            run["max_rel_loss_diff_vs_" + ref] = max(abs(a - b) / abs(b) for a, b in zip(run["losses"], base_loss))
        for other in ("hf_eager", "hf_compiled", "unsloth"):
            o = runs.get(other)
            if o and o is not run:
                run[f"speedup_vs_{other}"] = run["tokens_per_s"] / o["tokens_per_s"]
                if run["peak_gib"] and o["peak_gib"]:
                    run[f"memory_vs_{other}"] = run["peak_gib"] / o["peak_gib"]


def _stack_runs(
    tm,
    base,
    env,
    args,
    plan: list[tuple[str, list[int], int]],
    vocab: int,
    skip_last: int = 0,
    in_graph: str | None = None,
    attention: str | None = None,
    keep_going: bool = False,
) -> dict[str, Any]:
    """plan: (stack, lengths, batch). One model per stack, run at each length; LoRA init shared by all stacks.
    `keep_going`: a stack that raises gets ``{"error": ...}`` at its lengths and the next stack runs."""
    from quickloris.parallel.compile import compile_seconds, compile_stats, reset_compile_stats

    out: dict[str, Any] = {}
    lora_init = None
    for stack, seqs, batch in sorted(plan, key=lambda p: not p[0].startswith("ql")):  # ql first: it sets the init
        t0 = time.perf_counter()
        model = None
        if stack == "unsloth":
            _unsloth_runs(base, env, args, seqs, batch, out)
            continue
        try:
            model = _build(tm, stack, base, env, args, lora_init, skip_last, in_graph, attention)
            if lora_init is None and stack.startswith("ql"):
                lora_init = tm.lora_init_of(model)
            build_s = time.perf_counter() - t0
            for seq in seqs:
                reset_compile_stats()
                run = tm.train_run(
                    model,
                    tm.make_batches(args.steps, batch, seq, vocab, seed=args.seed + 1),
                    device=env["device"],
                    lr=args.lr,
                )
                run.update(
                    build_s=build_s,
                    compile=compile_stats() if stack.endswith("compiled") else None,
                    compile_s=compile_seconds() if stack.endswith("compiled") else None,
                    attention=model.config._attn_implementation,
                )  # what ran (transformers' registry name)
                out.setdefault(f"{batch}x{seq}", {})[stack] = run
                print(
                    f"  {stack:12s} {batch}x{seq}: {run['tokens_per_s']:,.0f} tok/s, peak "
                    f"{run['peak_gib'] or 0:.2f} GiB, first step {run['first_step_s']:.1f} s, losses "
                    f"{[round(x, 4) for x in run['losses'][:3]]}",
                    flush=True,
                )
        except Exception as e:
            if not keep_going:
                raise
            traceback.print_exc(file=sys.stdout)  # the log keeps where it failed; the record keeps the message
            for seq in seqs:
                out.setdefault(f"{batch}x{seq}", {}).setdefault(stack, {"error": f"{type(e).__name__}: {e}"})
            print(f"  {stack:12s} failed: {type(e).__name__}: {e}", flush=True)
        del model
        tm.release(env["device"])
    for runs in out.values():
        _compare(runs)
    return out


def _unsloth_runs(base, env, args, seqs: list[int], batch: int, out: dict[str, Any]) -> None:
    """The ``unsloth`` stack (`benchmarks.train.unsloth_stack`: its own process) at `seqs` into `out`."""
    if env["device"] != "cuda":
        res: dict[str, Any] = {"error": "Unsloth runs on CUDA only"}
    else:
        res = run_unsloth(base, env, args, plan=[(seqs, batch)])
    for seq in seqs:
        run = res.get(f"{batch}x{seq}", {"error": res.get("error", "no result")})
        if "error" not in run:
            run["versions"] = res.get("versions")
        out.setdefault(f"{batch}x{seq}", {})["unsloth"] = run
        if "error" in run:
            print(f"  {'unsloth':12s} {batch}x{seq} failed: {run['error']}", flush=True)


def part_counts(tm, base, env, args, vocab: int) -> dict[str, Any]:
    import torch

    from quickloris.parallel.compile import compile_stats, reset_compile_stats

    lo, hi = env["counts_range"]
    g = torch.Generator().manual_seed(3)
    lengths = [int(torch.randint(lo, hi + 1, (1,), generator=g)) for _ in range(args.counts_steps)]
    batches = [torch.randint(0, vocab, (1, n), generator=g) for n in lengths]
    eager = _build(tm, "ql_eager", base, env, args, None)
    init = tm.lora_init_of(eager)
    want = tm.train_run(eager, batches, device=env["device"], lr=args.lr)
    torch._dynamo.reset()  # count every graph this run needs, not ones cached by the earlier parts
    reset_compile_stats()
    del eager
    compiled = _build(tm, "ql_compiled", base, env, args, init, in_graph=args.in_graph_1b)
    got = tm.train_run(compiled, batches, device=env["device"], lr=args.lr)
    rel = [abs(a - b) / abs(b) for a, b in zip(got["losses"], want["losses"])]
    out = {
        "steps": len(lengths),
        "lengths": [min(lengths), max(lengths)],
        "compile": compile_stats(),
        "checkpoint_in_graph": args.in_graph_1b,
        "max_rel_loss_diff_vs_eager": max(rel),
        "losses_compiled": got["losses"],
        "losses_eager": want["losses"],
        "compiled_total_s": sum(got["step_s"]),
        "eager_total_s": sum(want["step_s"]),
    }
    print(f"  counts: {out['compile']}, max rel loss diff vs eager {out['max_rel_loss_diff_vs_eager']:.2e}", flush=True)
    del compiled
    tm.release(env["device"])
    return out


def longest_fitting(fits, start: int, cap: int, resolution: int) -> tuple[int, int | None]:
    """(longest length that fits, first length that did not or None): doubling from `start` up to `cap`,
    then bisecting the gap down to `resolution` (multiples of it)."""
    good, bad, seq = 0, None, start
    while seq <= cap:
        if not fits(seq):
            bad = seq
            break
        good, seq = seq, seq * 2
    while bad is not None and bad - good > resolution:
        mid = (good + bad) // 2 // resolution * resolution
        if mid <= good:
            break
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, bad


def _maxlen_of(tm, model, stack: str, env, args, vocab: int) -> dict[str, Any]:
    import torch

    start, cap, resolution = env["maxlen"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    trials: list[dict[str, Any]] = []

    def fits(seq: int) -> bool:
        ok, peak, note, step_s = tm.one_step(model, opt, seq, vocab, device=env["device"])
        trials.append({"seq": seq, "fits": ok, "peak_gib": peak, "step_s": step_s, "note": note})
        print(
            f"  {stack:12s} 1x{seq}: {'ok' if ok else 'OOM'} {note}" + (f", peak {peak:.1f} GiB" if peak else ""),
            flush=True,
        )
        return ok

    good, bad = longest_fitting(fits, start, cap, resolution)
    return {"longest": good, "first_oom": bad, "capped": bad is None, "cap": cap, "trials": trials}


def part_maxlen(tm, base, env, args, vocab: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if env["device"].startswith("cuda"):
        tm.cap_gpu_memory(args.maxlen_gpu_gib)
    for stack in args.maxlen_stacks:
        if stack == "unsloth":
            res = run_unsloth(base, env, args, maxlen=env["maxlen"])
            out[stack] = res.get("maxlen", res) | {"cap": env["maxlen"][1], "versions": res.get("versions")}
        else:
            model = _build(tm, stack, base, env, args, None)
            out[stack] = _maxlen_of(tm, model, stack, env, args, vocab)
            del model
        out[stack]["gpu_gib_cap"] = args.maxlen_gpu_gib
        tm.release(env["device"])
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.report import after_record
    from benchmarks.train import models as tm
    from quickloris.utils.provenance import record

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
    if "families" in parts:
        parse_shapes(args.family_shapes)  # a typo is reported before anything is built
        if args.family_steps < 3:
            raise ValueError(f"--family-steps: {args.family_steps}; at least 3 (tokens/s is the median of steps 3..N)")
    if not args.tiny and not torch.cuda.is_available():
        print("quickloris bench train needs a CUDA GPU (see docs/device.md); nothing was measured.")
        return 2
    env = _setup(args)
    results: dict[str, Any] = {
        "parts": parts,
        "steps": args.steps,
        "lr": args.lr,
        "attention": args.attention,
        "skip_last_1b": args.skip_last_1b,
        "skip_last_8b": args.skip_last_8b,
        "mlp_chunks": args.mlp_chunks,
        "in_graph_1b": args.in_graph_1b,
        "in_graph_8b": args.in_graph_8b,
        "quick": args.quick,
        "tiny": args.tiny,
        "device": env["device"],
        "seed": args.seed,
    }
    bases: dict[str, Any] = {}

    def drop_bases() -> None:
        for other in list(bases):
            del bases[other]  # one base at a time: the other's weights would count in this one's peaks
        tm.release(env["device"])

    def base_for(key: str):
        if key not in bases:
            drop_bases()
            t0 = time.perf_counter()
            bases[key] = tm.build_base(env[f"shape_{key}"], device=env["device"], seed=args.seed)
            results[f"build_{key}_s"] = round(time.perf_counter() - t0, 1)
        return bases[key]

    for part in parts:
        t0 = time.perf_counter()
        print(f"--- {part} ---", flush=True)
        try:
            if part == "1b":
                vocab = env["shape_1b"]["vocab_size"]
                results[part] = _stack_runs(
                    tm,
                    base_for("1b"),
                    env,
                    args,
                    [(s, [env["seq_1b"]], env["batch_1b"]) for s in args.stacks],
                    vocab,
                    args.skip_last_1b,
                    args.in_graph_1b,
                )
            elif part == "counts":
                results[part] = part_counts(tm, base_for("1b"), env, args, env["shape_1b"]["vocab_size"])
            elif part == "8b":
                seqs = env["seqs_8b"]
                plan = [(s, seqs if s in ("hf_eager", "ql_compiled") else seqs[:1], 1) for s in args.stacks_8b]
                results[part] = _stack_runs(
                    tm,
                    base_for("8b"),
                    env,
                    args,
                    plan,
                    env["shape_8b"]["vocab_size"],
                    args.skip_last_8b,
                    args.in_graph_8b,
                )
            elif part == "maxlen":
                results[part] = part_maxlen(tm, base_for("8b"), env, args, env["shape_8b"]["vocab_size"])
            elif part == "families":
                drop_bases()
                results[part] = part_families(tm, env, args, _stack_runs)
        except Exception as e:  # keep the other parts' numbers; the error is part of the record
            results[part] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {part} failed: {results[part]['error']}", flush=True)
        results[f"{part}_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"  [{part}] {json.dumps(_headline(part, results.get(part)), default=str)}", flush=True)
    path = record("train", "train", results, args.out)
    print(summary(results))
    after_record(path)
    return (
        0
        if not any(isinstance(results.get(p), dict) and "error" in results[p] for p in parts)
        and not failed(results.get("families"))
        else 1
    )


def _brief_runs(runs: dict[str, Any]) -> dict[str, Any]:
    return {s: {k: v for k, v in r.items() if k not in ("losses", "step_s")} for s, r in runs.items()}


def _headline(part: str, res: Any) -> Any:
    if part == "families" and isinstance(res, dict) and "error" not in res:
        return {
            name: {k: (_brief_runs(v) if k == "runs" else v) for k, v in r.items() if k != "config"}
            for name, r in res.items()
        }
    if not isinstance(res, dict) or "error" in res or part not in ("1b", "8b"):
        return (
            res
            if part != "counts" or not isinstance(res, dict)
            else {k: v for k, v in res.items() if not k.startswith("losses")}
        )
    return {shape: _brief_runs(runs) for shape, runs in res.items()}


def _table(label: str, res: dict[str, dict[str, Any]]) -> list[str]:
    """Rows of the summary table for {batch x seq: {stack: run}}."""
    lines = [
        f"{label:<14} {'stack':<12} {'tok/s':>9} {'x hf_eager':>10} {'x hf_comp':>9} {'x unsloth':>9} {'peak GiB':>9} "
        f"{'/hf_eager':>9} {'/hf_comp':>8} {'/unsloth':>8} {'loss diff':>9}  compile"
    ]
    for bs, runs in res.items():
        for name, r in runs.items():
            if "error" in r:
                lines.append(f"  {bs:<12} {name:<12} failed: {r['error']}")
                continue
            f = lambda k, fmt: format(r[k], fmt) if isinstance(r.get(k), float) else "-"  # noqa: E731
            comp = r.get("compile")
            lines.append(
                f"  {bs:<12} {name:<12} {r['tokens_per_s']:>9,.0f} {f('speedup_vs_hf_eager', '.2f'):>10} "
                f"{f('speedup_vs_hf_compiled', '.2f'):>9} "
                f"{f('speedup_vs_unsloth', '.2f'):>9} {f('peak_gib', '.2f'):>9} "
                f"{f('memory_vs_hf_eager', '.0%'):>9} {f('memory_vs_hf_compiled', '.0%'):>8} "
                f"{f('memory_vs_unsloth', '.0%'):>8} "
                f"{f('max_rel_loss_diff_vs_hf_eager', '.1e'):>9}  "
                + (f"{comp['unique_graphs']} graphs, {comp['graph_breaks']} breaks" if comp else "")
                + (f", {comp['trace_restarts']} trace restarts" if comp and "trace_restarts" in comp else "")
            )
    return lines


def summary(results: dict[str, Any]) -> str:
    """The compact table: tokens/s and peak memory per stack, ratios to the baselines, compile counts, maxlen."""
    lines = ["", "=== quickloris bench train: summary ==="]
    for part, shape in (("1b", "Llama-3.2-1B"), ("8b", "Llama-3.1-8B")):
        res = results.get(part)
        if not isinstance(res, dict) or "error" in res:
            if res:
                lines.append(f"{shape}: {res.get('error')}")
            continue
        lines += _table(shape, res)
    lines += summary_lines(results.get("families"), _table)
    c = results.get("counts")
    if isinstance(c, dict) and "compile" in c:
        lines.append(
            f"compile counts, {c['steps']} steps of lengths {c['lengths'][0]}..{c['lengths'][1]}: "
            f"{c['compile']['unique_graphs']} graphs, {c['compile']['graph_breaks']} graph breaks; per-step "
            f"loss vs eager: max rel diff {c['max_rel_loss_diff_vs_eager']:.1e}"
        )
    m = results.get("maxlen")
    if isinstance(m, dict) and "error" not in m:
        for stack, r in m.items():
            if "longest" not in r:
                lines.append(f"longest 8B context, {stack}: failed: {r.get('error')}")
                continue
            ok = [t for t in r["trials"] if t["fits"]]
            at = max(ok, key=lambda t: t["seq"]) if ok else None
            lines.append(
                f"longest 8B context, {stack}: {r['longest']:,} tokens"
                + (" (cap reached)" if r["first_oom"] is None else f" (out of memory at {r['first_oom']:,})")
                + (f", {at['peak_gib']:.1f} GiB" if at and at.get("peak_gib") else "")
                + (f", {at['step_s']:.1f} s a step there" if at and at.get("step_s") else "")
            )
    return "\n".join(lines)
