"""Building the stacks of `quickloris bench train` and running them at their lengths (`stack_runs`), with each
stack's ratios to the baselines measured in the same run."""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any

from benchmarks.train.unsloth_stack import run_unsloth


def build_stack(
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
            compile_mode=args.compile_mode,
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


def stack_runs(
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
    from quickloris.parallel.compile import (
        CompileConfig,
        compile_seconds,
        compile_stats,
        reset_compile_stats,
        uses_cuda_graphs,
    )

    out: dict[str, Any] = {}
    lora_init = None
    for stack, seqs, batch in sorted(plan, key=lambda p: not p[0].startswith("ql")):  # ql first: it sets the init
        t0 = time.perf_counter()
        model = None
        if stack == "unsloth":
            _unsloth_runs(base, env, args, seqs, batch, out)
            continue
        if uses_cuda_graphs(CompileConfig(mode=getattr(args, "compile_mode", None))):
            import torch

            # a fresh CUDA graph tree: the last stack's recordings hold its memory pool (which would count in this
            # stack's peak) and its parameters' addresses (this stack's calls would re-record under them)
            torch._dynamo.reset()
        try:
            model = build_stack(tm, stack, base, env, args, lora_init, skip_last, in_graph, attention)
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
