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

Here: the order of the parts and the record. Beside it: `benchmarks.train.options` (the options and their checks),
`benchmarks.train.stacks` (a stack built and run at its lengths), `benchmarks.train.maxlen` and
`benchmarks.train.summary` (the headlines and the closing table).
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from benchmarks.train.families import failed, part_families
from benchmarks.train.maxlen import longest_fitting, part_maxlen  # noqa: F401 - longest_fitting re-exported
from benchmarks.train.options import add_arguments, checked_parts  # noqa: F401 - add_arguments: the area's parser
from benchmarks.train.stacks import build_stack, stack_runs
from benchmarks.train.summary import headline, summary


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
            maxlen=(32, 256, 32, args.maxlen_steps),
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
            args.maxlen_steps,
        ),
    )


def part_counts(tm, base, env, args, vocab: int) -> dict[str, Any]:
    import torch

    from quickloris.parallel.compile import compile_stats, reset_compile_stats

    lo, hi = env["counts_range"]
    g = torch.Generator().manual_seed(3)
    lengths = [int(torch.randint(lo, hi + 1, (1,), generator=g)) for _ in range(args.counts_steps)]
    batches = [torch.randint(0, vocab, (1, n), generator=g) for n in lengths]
    eager = build_stack(tm, "ql_eager", base, env, args, None)
    init = tm.lora_init_of(eager)
    want = tm.train_run(eager, batches, device=env["device"], lr=args.lr)
    torch._dynamo.reset()  # count every graph this run needs, not ones cached by the earlier parts
    reset_compile_stats()
    del eager
    compiled = build_stack(tm, "ql_compiled", base, env, args, init, in_graph=args.in_graph_1b)
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


def run(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.report import after_record
    from benchmarks.train import models as tm
    from quickloris.utils.provenance import record

    parts = checked_parts(args)
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
        "compile_mode": args.compile_mode,
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
                results[part] = stack_runs(
                    tm,
                    base_for("1b"),
                    env,
                    args,
                    [(s, [env["seq_1b"]], env["batch_1b"]) for s in args.stacks],
                    vocab,
                    args.skip_last_1b,
                    args.in_graph_1b,
                    keep_going=True,  # a stack that fails keeps the others' numbers (the baseline's too)
                )
            elif part == "counts":
                results[part] = part_counts(tm, base_for("1b"), env, args, env["shape_1b"]["vocab_size"])
            elif part == "8b":
                seqs = env["seqs_8b"]
                plan = [(s, seqs if s in ("hf_eager", "ql_compiled") else seqs[:1], 1) for s in args.stacks_8b]
                results[part] = stack_runs(
                    tm,
                    base_for("8b"),
                    env,
                    args,
                    plan,
                    env["shape_8b"]["vocab_size"],
                    args.skip_last_8b,
                    args.in_graph_8b,
                    keep_going=True,
                )
            elif part == "maxlen":
                results[part] = part_maxlen(tm, base_for("8b"), env, args, env["shape_8b"]["vocab_size"])
            elif part == "families":
                drop_bases()
                results[part] = part_families(tm, env, args, stack_runs)
        except Exception as e:  # keep the other parts' numbers; the error is part of the record
            results[part] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {part} failed: {results[part]['error']}", flush=True)
        results[f"{part}_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"  [{part}] {json.dumps(headline(part, results.get(part)), default=str)}", flush=True)
    path = record("train", "train", results, args.out)
    print(summary(results))
    after_record(path)
    return (
        0
        if not any(isinstance(results.get(p), dict) and "error" in results[p] for p in parts)
        and not failed(results.get("families"))
        and not any(_stack_failed(results.get(p)) for p in ("1b", "8b"))
        else 1
    )


def _stack_failed(res: Any) -> bool:
    """Whether a 1b / 8b part's record ({batch x seq: {stack: run}}) holds a stack's error."""
    return isinstance(res, dict) and any(
        isinstance(runs, dict) and any(isinstance(r, dict) and "error" in r for r in runs.values())
        for runs in res.values()
    )
