"""`quickloris bench loss`: memory-efficient linear + loss (issue #3, challenge part E), on one GPU.

Parts (`--parts`, default all):
* memory: peak memory over inputs (max_memory_allocated after a reset, minus what was allocated before) and
  fwd+bwd time (CUDA events, warm-up, median) of the naive path `F.cross_entropy((X @ W.T).float(), y)` vs
  `chunked_linear_loss` (recompute and grad_in_forward schedules), bf16, H 4096, V 128256, `--tokens`, with W
  trainable and frozen (QLoRA's lm_head); plus a memory-budget sweep at `--sweep-tokens`.
* spec: the specification's `test_comparison` (batch 4, seq 512, hidden 1024, vocab 32000, fp32), its
  NaiveLinear vs `MemoryEfficientLinear.apply(X, linear, labels, transformation_function[, chunk_size])`.
* train60 and grpo run `quickloris.bench.loss_models`:
  train60: a random-init Llama-3.2-1B-shaped model, NF4 double-quant (bitsandbytes) + LoRA r=16 on
  q,k,v,o,gate,up,down, trained `--steps` steps on the same data from the same LoRA init with HF's loss and
  with `enable_chunked_loss` (both schedules): per-step losses, max relative difference, peak memory, time.
* grpo: one GRPO step on a small random-init Llama + LoRA, log-probs chunked vs from full logits: loss and
  LoRA gradients compared (fp32 and bf16).
Without CUDA it prints why and measures nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

PARTS = ("memory", "spec", "train60", "grpo")


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--tokens", type=_ints, default=[4096, 8192, 16384, 32768], help="memory: token counts")
    parser.add_argument("--hidden", type=int, default=4096, help="memory: hidden size")
    parser.add_argument("--vocab", type=int, default=128256, help="memory: vocabulary size")
    parser.add_argument("--reps", type=int, default=5, help="memory: timed repetitions (median)")
    parser.add_argument("--sweep-tokens", type=int, default=16384, help="memory: tokens of the budget sweep")
    parser.add_argument("--budgets-mib", type=_ints, default=[256, 512, 2048, 4096],
                        help="memory: chunk memory budgets to sweep, MiB (the default 1024 is always measured)")
    parser.add_argument("--steps", type=int, default=60, help="train60: optimizer steps per run")
    parser.add_argument("--batch", type=int, default=2, help="train60: sequences per step")
    parser.add_argument("--seq", type=int, default=1024, help="train60: tokens per sequence")


# --- helpers -------------------------------------------------------------------------------------------------

def _peak_over_base(fn: Callable[[], Any]) -> float:
    """GB allocated at peak while `fn` runs, beyond what was allocated before it."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def _median_ms(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _oom_safe(fn: Callable[[], Any]) -> Any:
    import torch

    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"


# --- part: memory ----------------------------------------------------------------------------------------------

def part_memory(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from quickloris import chunked_linear_loss
    from quickloris.ops.chunked_linear import choose_chunk_size

    H, V = args.hidden, args.vocab
    gen = torch.Generator(device="cuda").manual_seed(0)
    W0 = torch.randn(V, H, device="cuda", dtype=torch.bfloat16, generator=gen) * H ** -0.5
    # First use allocates cuBLAS workspaces: do it before any peak is measured.
    x = torch.randn(256, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    chunked_linear_loss(x, W0, torch.zeros(256, dtype=torch.long, device="cuda"), chunk_size=128).backward()
    F.cross_entropy((x @ W0.T).float(), torch.zeros(256, dtype=torch.long, device="cuda")).backward()
    del x

    def case(N: int, w_grad: bool, method: str, budget: int | None = None) -> dict[str, Any]:
        X = torch.randn(N, H, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        W = W0.detach().requires_grad_(w_grad)
        y = torch.randint(0, V, (N,), device="cuda", generator=gen)

        def step():
            X.grad = W.grad = None
            if method == "naive":
                loss = F.cross_entropy((X @ W.T).float(), y)
            else:
                loss = chunked_linear_loss(X, W, y, memory_budget=budget, grad_in_forward=method == "grad_in_forward")
            loss.backward()
            return loss

        row: dict[str, Any] = {"tokens": N, "w_grad": w_grad, "method": method}
        if method != "naive":
            row["chunk_rows"] = choose_chunk_size(N, V, memory_budget=budget)
            row["budget_mib"] = (budget or (1 << 30)) >> 20
        row["peak_gb"] = _oom_safe(lambda: _peak_over_base(step))
        if not isinstance(row["peak_gb"], str):
            row["loss"] = float(step())
            row["ms"] = _oom_safe(lambda: _median_ms(step, args.reps))
        X.grad = W.grad = None
        return row

    rows = []
    for N in args.tokens:
        for w_grad in (True, False):
            for method in ("naive", "recompute", "grad_in_forward"):
                rows.append(case(N, w_grad, method))
                print(_fmt_memory_row(rows[-1], rows), flush=True)
    sweep = []
    for mib in args.budgets_mib:
        for w_grad in (True, False):
            for method in ("recompute", "grad_in_forward"):
                sweep.append(case(args.sweep_tokens, w_grad, method, mib << 20))
                print("sweep " + _fmt_memory_row(sweep[-1], rows), flush=True)
    return {"hidden": H, "vocab": V, "dtype": "bfloat16", "rows": rows, "budget_sweep": sweep}


def _naive_of(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == "naive" and r["tokens"] == row["tokens"]
                 and r["w_grad"] == row["w_grad"]), None)


def _fmt_memory_row(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    text = (f"N={row['tokens']:>6} W {'trainable' if row['w_grad'] else 'frozen   '} {row['method']:<15} "
            f"chunk={row.get('chunk_rows', '-'):>5} peak={row['peak_gb']}")
    naive = _naive_of(row, rows)
    if isinstance(row.get("ms"), float):
        text += f" GB  {row['ms']:.1f} ms"
        if naive is not row and naive and isinstance(naive.get("ms"), float):
            text += f"  ({1 - row['peak_gb'] / naive['peak_gb']:.1%} less memory, {row['ms'] / naive['ms']:.2f}x time)"
    return text


# --- part: spec ------------------------------------------------------------------------------------------------

def part_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The specification's test_comparison, with its NaiveLinear and transformation_function."""
    import torch
    from torch import nn

    from quickloris import MemoryEfficientLinear

    def transformation_function(batch, linear, labels):
        x = linear(batch).float()
        return nn.CrossEntropyLoss(reduction="sum")(x.view(-1, x.shape[-1]), labels.view(-1))

    class NaiveLinear(torch.autograd.Function):  # the specification's reference, unchanged in behaviour
        @staticmethod
        def forward(ctx, X, linear, labels, forward_function):
            with torch.no_grad():
                loss = forward_function(X, linear, labels)
            ctx.save_for_backward(X, labels)
            ctx.linear, ctx.forward_function = linear, forward_function
            return loss

        @staticmethod
        def backward(ctx, dY):
            X, labels = ctx.saved_tensors
            with torch.enable_grad():
                X.requires_grad = True
                ctx.linear.weight.requires_grad = True
                loss = ctx.forward_function(X, ctx.linear, labels)
            loss.backward(dY)
            return X.grad, None, None, None

    device = torch.device("cuda:0")
    results = []
    for chunk in (None, 512, 128):
        torch.manual_seed(42)
        B, S, Hd, Vs = 4, 512, 1024, 32000
        X = torch.randn(B, S, Hd, device=device, dtype=torch.float32, requires_grad=True)
        labels = torch.randint(0, Vs, (B, S), device=device)
        lin_naive = nn.Linear(Hd, Vs, bias=False).to(device)
        lin_eff = nn.Linear(Hd, Vs, bias=False).to(device)
        lin_eff.weight.data.copy_(lin_naive.weight.data)
        holder: dict[str, Any] = {}

        def naive():
            holder["naive"] = NaiveLinear.apply(X, lin_naive, labels, transformation_function)
            holder["naive"].backward()

        naive_peak = _peak_over_base(naive)
        X_eff = X.detach().clone().requires_grad_(True)

        def efficient():
            holder["eff"] = MemoryEfficientLinear.apply(X_eff, lin_eff, labels, transformation_function, chunk)
            holder["eff"].backward()

        eff_peak = _peak_over_base(efficient)
        close = lambda a, b: bool(torch.allclose(a, b, rtol=1e-3, atol=1e-5))  # noqa: E731 - the spec's check
        row = {"chunk_size": chunk or "auto", "naive_loss": holder["naive"].item(), "eff_loss": holder["eff"].item(),
               "loss_close": close(holder["naive"].detach().cpu(), holder["eff"].detach().cpu()),
               "grad_X_close": close(X.grad, X_eff.grad),
               "grad_W_close": close(lin_naive.weight.grad, lin_eff.weight.grad),
               "naive_peak_mb": naive_peak * 1e3, "eff_peak_mb": eff_peak * 1e3,
               "memory_saved": 1 - eff_peak / naive_peak}
        results.append(row)
        print(f"spec chunk={row['chunk_size']}: loss {row['naive_loss']:.4f} vs {row['eff_loss']:.4f}, close: loss "
              f"{row['loss_close']} dX {row['grad_X_close']} dW {row['grad_W_close']}; peak {naive_peak * 1e3:.0f} MB"
              f" -> {eff_peak * 1e3:.0f} MB ({row['memory_saved']:.0%} saved)", flush=True)
    return {"rows": results}


# --- entry point -----------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    import torch

    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"--parts: unknown {sorted(unknown)}; choose from {','.join(PARTS)}")
    if not torch.cuda.is_available():
        print("quickloris bench loss needs a CUDA GPU (see docs/device.md); nothing was measured.")
        return 2
    from quickloris.bench.loss_models import LLAMA_1B, SMALL_LLAMA, grpo_compare, train_compare
    from quickloris.utils.provenance import record

    results: dict[str, Any] = {"parts": parts}
    for part in parts:
        t0 = time.perf_counter()
        print(f"--- {part} ---", flush=True)
        if part == "memory":
            results[part] = part_memory(args)
        elif part == "spec":
            results[part] = part_spec(args)
        elif part == "train60":
            results[part] = train_compare(LLAMA_1B, steps=args.steps, batch=args.batch, seq=args.seq, device="cuda",
                                          dtype=torch.bfloat16, quantize=True)
        elif part == "grpo":
            results[part] = [grpo_compare(SMALL_LLAMA, device="cuda", dtype=dt)
                             for dt in (torch.float32, torch.bfloat16)]
        results[f"{part}_seconds"] = round(time.perf_counter() - t0, 1)
        torch.cuda.empty_cache()
    path = record("loss", "loss", results, args.out)
    print(summary(results))
    print(f"wrote {path}")
    return 0


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GB"


def summary(results: dict[str, Any]) -> str:
    """A compact table of the headline numbers."""
    lines = ["", "=== quickloris bench loss: summary ==="]
    mem = results.get("memory")
    if mem:
        lines.append(f"memory (H {mem['hidden']}, V {mem['vocab']}, bf16; peak GB over inputs, fwd+bwd ms)")
        lines.append(f"{'tokens':>6} {'W':<9} {'naive':>14} {'recompute':>22} {'grad_in_forward':>22}")
        for N in sorted({r["tokens"] for r in mem["rows"]}):
            for w_grad in (True, False):
                cells = []
                for method in ("naive", "recompute", "grad_in_forward"):
                    r = next(r for r in mem["rows"] if (r["tokens"], r["w_grad"], r["method"]) == (N, w_grad, method))
                    n = _naive_of(r, mem["rows"])
                    if not isinstance(r.get("ms"), float):
                        cells.append(f"{str(r['peak_gb']):>14}")
                    elif method == "naive":
                        cells.append(f"{r['peak_gb']:6.2f} {r['ms']:6.1f}ms")
                    elif n and isinstance(n.get("ms"), float):
                        cells.append(f"{r['peak_gb']:5.2f} (-{1 - r['peak_gb'] / n['peak_gb']:.0%}) "
                                     f"{r['ms'] / n['ms']:.2f}x")
                    else:
                        cells.append(f"{r['peak_gb']:5.2f} {r['ms']:6.1f}ms")
                lines.append(f"{N:>6} {'trainable' if w_grad else 'frozen':<9} {cells[0]:>14} {cells[1]:>22} "
                             f"{cells[2]:>22}")
    for row in (results.get("spec") or {}).get("rows", []):
        lines.append(f"spec test_comparison chunk={row['chunk_size']}: close loss/dX/dW = {row['loss_close']}/"
                     f"{row['grad_X_close']}/{row['grad_W_close']}, memory saved {row['memory_saved']:.0%}")
    tr = results.get("train60")
    if tr:
        for mode in ("chunked", "chunked_grad_in_forward"):
            if mode in tr:
                lines.append(f"train60 {mode}: max rel loss diff vs HF {tr[mode]['max_rel_diff_vs_hf']:.2e} "
                             f"(within 1e-3: {tr[mode]['within_1e-3']}), peak {_gb(tr[mode]['peak_gb'])} vs HF "
                             f"{_gb(tr['hf']['peak_gb'])}, {tr[mode]['median_step_s'] * 1e3:.0f} vs "
                             f"{tr['hf']['median_step_s'] * 1e3:.0f} ms/step")
    for g in results.get("grpo") or []:
        lines.append(f"grpo {g['dtype']}: loss rel diff {g['loss_rel_diff']:.1e}, LoRA grad rel diff "
                     f"{g['lora_grad_rel_diff']:.1e} (cosine {g['lora_grad_cosine']:.6f}), peak naive "
                     f"{_gb(g['peak_gb']['naive'])} vs chunked {_gb(g['peak_gb']['chunked'])}")
    return "\n".join(lines)
