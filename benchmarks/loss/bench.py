"""`quickloris bench loss`: memory-efficient linear + loss (issue #3, challenge part E), on one GPU.

Parts (`--parts`, default all):
* memory: peak memory over inputs (max_memory_allocated after a reset, minus what was allocated before) and
  fwd+bwd time (CUDA events, warm-up, median) of the naive path `F.cross_entropy((X @ W.T).float(), y)` vs
  `chunked_linear_loss` (schedules: recompute and grad_in_forward over row chunks; with W trainable also
  vocab_blocked, `quickloris.ops.vocab_blocked_ce`, the default there), bf16, H 4096, V 128256, `--tokens`, with W
  trainable and frozen (QLoRA's lm_head); plus a memory-budget sweep at `--sweep-tokens`. `--methods` / `--heads`
  narrow it (vocab_blocked_torch: that schedule with its PyTorch formulas instead of the Triton kernels).
* spec: the specification's `test_comparison` (batch 4, seq 512, hidden 1024, vocab 32000, fp32), its
  NaiveLinear vs `MemoryEfficientLinear.apply(X, linear, labels, transformation_function[, chunk_size])`.
* train60 and grpo run `benchmarks.loss.models`:
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
from collections.abc import Callable
from typing import Any

PARTS = ("memory", "spec", "train60", "grpo")
#: memory part's methods; vocab_blocked_torch: the vocabulary-blocked schedule with its PyTorch softmax formulas
#: (what it was before the Triton kernels of `quickloris.kernels.ce_kernel`), for A/B on one GPU.
METHODS = ("naive", "recompute", "grad_in_forward", "vocab_blocked", "vocab_blocked_torch")


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--tokens", type=_ints, default=[4096, 8192, 16384, 32768], help="memory: token counts")
    parser.add_argument("--hidden", type=int, default=4096, help="memory: hidden size")
    parser.add_argument("--vocab", type=int, default=128256, help="memory: vocabulary size")
    parser.add_argument("--reps", type=int, default=5, help="memory: timed repetitions (median)")
    parser.add_argument("--sweep-tokens", type=int, default=16384, help="memory: tokens of the budget sweep")
    parser.add_argument(
        "--budgets-mib",
        type=_ints,
        default=[256, 512, 2048, 4096],
        help="memory: chunk memory budgets to sweep, MiB (the default 1024 is always measured)",
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"memory: comma-separated subset of {','.join(METHODS)}"
    )
    parser.add_argument(
        "--heads", default="trainable,frozen", help="memory: lm_head weights to measure, 'trainable', 'frozen' or both"
    )
    parser.add_argument("--steps", type=int, default=60, help="train60: optimizer steps per run")
    parser.add_argument("--batch", type=int, default=2, help="train60: sequences per step")
    parser.add_argument("--seq", type=int, default=1024, help="train60: tokens per sequence")


# --- helpers -------------------------------------------------------------------------------------------------


def _peak_over_base(fn: Callable[[], Any], device: str = "cuda") -> float | None:
    """GB allocated at peak while `fn` runs, beyond what was allocated before it (None off CUDA)."""
    import torch

    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 1e9


def _median_ms(fn: Callable[[], Any], reps: int, warmup: int = 2, device: str = "cuda") -> float:
    """Median of `reps` timed calls after `warmup` untimed ones (CUDA events; wall clock off CUDA)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _less(a: Any, b: Any) -> str:
    """'x% less' of two GB numbers, or '?' when either is missing (no CUDA, out of memory)."""
    return f"{1 - a / b:.0%}" if isinstance(a, float) and isinstance(b, float) and b > 0 else "?"


def _oom_safe(fn: Callable[[], Any]) -> Any:
    import torch

    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"


# --- part: memory ----------------------------------------------------------------------------------------------


def part_memory(args: argparse.Namespace, device: str = "cuda") -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from quickloris import chunked_linear_loss
    from quickloris.ops.chunked_linear import DEFAULT_MEMORY_BUDGET, choose_chunk_size
    from quickloris.ops.vocab_blocked_ce import VocabBlockedCE

    methods = [m for m in args.methods.split(",") if m]
    heads = [h for h in args.heads.split(",") if h]
    if set(methods) - set(METHODS) or not methods:
        raise ValueError(f"--methods: choose from {','.join(METHODS)}, got {args.methods!r}")
    if set(heads) - {"trainable", "frozen"} or not heads:
        raise ValueError(f"--heads: choose from trainable,frozen, got {args.heads!r}")
    w_grads = [h == "trainable" for h in ("trainable", "frozen") if h in heads]
    H, V = args.hidden, args.vocab
    gen = torch.Generator(device=device).manual_seed(0)
    W0 = torch.randn(V, H, device=device, dtype=torch.bfloat16, generator=gen) * H**-0.5
    # First use allocates cuBLAS workspaces: do it before any peak is measured.
    x = torch.randn(256, H, device=device, dtype=torch.bfloat16, requires_grad=True)
    y0 = torch.zeros(256, dtype=torch.long, device=device)
    chunked_linear_loss(x, W0, y0, chunk_size=128).backward()
    F.cross_entropy((x @ W0.T).float(), y0).backward()
    del x, y0

    def case(N: int, w_grad: bool, method: str, budget: int | None = None) -> dict[str, Any]:
        g = torch.Generator(device=device).manual_seed(N)  # every method sees the same inputs: losses comparable
        X = torch.randn(N, H, device=device, dtype=torch.bfloat16, generator=g).requires_grad_()
        W = W0.detach().requires_grad_(w_grad)
        y = torch.randint(0, V, (N,), device=device, generator=g)

        def step():
            X.grad = W.grad = None
            if method == "naive":
                loss = F.cross_entropy((X @ W.T).float(), y)
            elif method == "vocab_blocked_torch":  # chunked_linear_loss's call of it, with the PyTorch formulas
                rows = choose_chunk_size(N, V, memory_budget=budget)
                total = VocabBlockedCE.apply(
                    X, W, None, y, -100, rows, budget or DEFAULT_MEMORY_BUDGET, "auto", "torch"
                )
                loss = total / N
            else:
                loss = chunked_linear_loss(
                    X,
                    W,
                    y,
                    memory_budget=budget,
                    grad_in_forward=method == "grad_in_forward",
                    vocab_blocked=method == "vocab_blocked",
                )
            loss.backward()
            return loss

        row: dict[str, Any] = {"tokens": N, "w_grad": w_grad, "method": method}
        if method != "naive":
            row["chunk_rows"] = choose_chunk_size(N, V, memory_budget=budget)
            row["budget_mib"] = (budget or (1 << 30)) >> 20
        row["peak_gb"] = _oom_safe(lambda: _peak_over_base(step, device))
        if row["peak_gb"] != "out of memory":
            row["loss"] = float(step().detach())
            row["ms"] = _oom_safe(lambda: _median_ms(step, args.reps, device=device))
        X.grad = W.grad = None
        return row

    def methods_for(w_grad: bool, with_naive: bool = True) -> list[str]:
        return [m for m in methods if (with_naive or m != "naive") and (w_grad or not m.startswith("vocab_blocked"))]

    rows = []
    for N in args.tokens:
        for w_grad in w_grads:
            for method in methods_for(w_grad):
                rows.append(case(N, w_grad, method))
                print(_fmt_memory_row(rows[-1], rows), flush=True)
    sweep = []
    for mib in args.budgets_mib:
        for w_grad in w_grads:
            for method in methods_for(w_grad, with_naive=False):
                sweep.append(case(args.sweep_tokens, w_grad, method, mib << 20))
                print("sweep " + _fmt_memory_row(sweep[-1], rows), flush=True)
    return {"hidden": H, "vocab": V, "dtype": "bfloat16", "rows": rows, "budget_sweep": sweep}


def _naive_of(row: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next(
        (r for r in rows if r["method"] == "naive" and r["tokens"] == row["tokens"] and r["w_grad"] == row["w_grad"]),
        None,
    )


def _fmt_memory_row(row: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    text = (
        f"N={row['tokens']:>6} W {'trainable' if row['w_grad'] else 'frozen   '} {row['method']:<15} "
        f"chunk={row.get('chunk_rows', '-'):>5} peak={row['peak_gb']} GB"
    )
    naive = _naive_of(row, rows)
    if isinstance(row.get("ms"), float):
        text += f"  {row['ms']:.1f} ms"
        if naive is not None and naive is not row and isinstance(naive.get("ms"), float):
            text += f"  ({_less(row['peak_gb'], naive['peak_gb'])} less memory, {row['ms'] / naive['ms']:.2f}x time)"
    return text


# --- part: spec ------------------------------------------------------------------------------------------------


def part_spec(
    args: argparse.Namespace, device: str = "cuda", sizes=(4, 512, 1024, 32000), chunks=(None, 512, 128)
) -> dict[str, Any]:
    """The specification's test_comparison (`sizes` = batch, seq, hidden, vocab), its NaiveLinear and
    transformation_function, at several chunk sizes."""
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

    close = lambda a, b: bool(torch.allclose(a, b, rtol=1e-3, atol=1e-5))  # noqa: E731 - the spec's check

    def one(chunk: int | None) -> dict[str, Any]:
        torch.manual_seed(42)
        B, S, Hd, Vs = sizes
        X = torch.randn(B, S, Hd, device=device, dtype=torch.float32, requires_grad=True)
        labels = torch.randint(0, Vs, (B, S), device=device)
        lin_naive = nn.Linear(Hd, Vs, bias=False).to(device)
        lin_eff = nn.Linear(Hd, Vs, bias=False).to(device)
        lin_eff.weight.data.copy_(lin_naive.weight.data)
        out: dict[str, Any] = {}

        def naive():
            out["naive"] = NaiveLinear.apply(X, lin_naive, labels, transformation_function)
            out["naive"].backward()

        naive_peak = _peak_over_base(naive, device)
        X_eff = X.detach().clone().requires_grad_(True)

        def efficient():
            out["eff"] = MemoryEfficientLinear.apply(X_eff, lin_eff, labels, transformation_function, chunk)
            out["eff"].backward()

        eff_peak = _peak_over_base(efficient, device)
        # Plain autograd through transformation_function: the true gradients. The spec's NaiveLinear returns
        # X.grad after `loss.backward(dY)` has already accumulated it into the leaf X, so its dX is twice that.
        X_ref = X.detach().clone().requires_grad_(True)
        lin_ref = nn.Linear(Hd, Vs, bias=False).to(device)
        lin_ref.weight.data.copy_(lin_naive.weight.data)
        ref = transformation_function(X_ref, lin_ref, labels)
        ref.backward()
        return {
            "chunk_size": chunk or "auto",
            "naive_loss": out["naive"].item(),
            "eff_loss": out["eff"].item(),
            "loss_close": close(out["naive"].detach().cpu(), out["eff"].detach().cpu()),
            "grad_X_close": close(X.grad, X_eff.grad),
            "grad_W_close": close(lin_naive.weight.grad, lin_eff.weight.grad),
            "autograd_loss_close": close(ref.detach(), out["eff"].detach()),
            "autograd_grad_X_close": close(X_ref.grad, X_eff.grad),
            "autograd_grad_W_close": close(lin_ref.weight.grad, lin_eff.weight.grad),
            "spec_naive_dX_over_autograd_dX": (X.grad.norm() / X_ref.grad.norm()).item(),
            "naive_peak_gb": naive_peak,
            "eff_peak_gb": eff_peak,
            "memory_saved": _less(eff_peak, naive_peak),
        }

    results = []
    for chunk in chunks:
        row = one(chunk)
        results.append(row)
        print(
            f"spec chunk={row['chunk_size']}: loss {row['naive_loss']:.4f} vs {row['eff_loss']:.4f}; spec checks "
            f"loss/dX/dW {row['loss_close']}/{row['grad_X_close']}/{row['grad_W_close']}; vs plain autograd "
            f"{row['autograd_loss_close']}/{row['autograd_grad_X_close']}/{row['autograd_grad_W_close']} (spec "
            f"NaiveLinear dX = {row['spec_naive_dX_over_autograd_dX']:.3f} x autograd's); peak "
            f"{row['naive_peak_gb']} GB -> {row['eff_peak_gb']} GB ({row['memory_saved']} saved)",
            flush=True,
        )
        if device == "cuda":
            torch.cuda.empty_cache()
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
    from benchmarks.loss.models import LLAMA_1B, SMALL_LLAMA, grpo_compare, train_compare
    from benchmarks.report import after_record
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
            results[part] = train_compare(
                LLAMA_1B,
                steps=args.steps,
                batch=args.batch,
                seq=args.seq,
                device="cuda",
                dtype=torch.bfloat16,
                quantize=True,
            )
        elif part == "grpo":
            results[part] = [
                grpo_compare(SMALL_LLAMA, device="cuda", dtype=dt) for dt in (torch.float32, torch.bfloat16)
            ]
        results[f"{part}_seconds"] = round(time.perf_counter() - t0, 1)
        torch.cuda.empty_cache()
    path = record("loss", "loss", results, args.out)
    print(summary(results))
    after_record(path)
    return 0


def _gb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GB"


def _cell(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    peak, ms, n = r["peak_gb"], r.get("ms"), _naive_of(r, rows)
    text = f"{peak:.2f}" if isinstance(peak, float) else str(peak)
    if n is not None and n is not r:
        text += f" (-{_less(peak, n['peak_gb'])})"
    if isinstance(ms, float):
        text += f" {ms:.1f}ms"
        if n is not None and n is not r and isinstance(n.get("ms"), float):
            text += f" ({ms / n['ms']:.2f}x)"
    return text


def summary(results: dict[str, Any]) -> str:
    """A compact table of the headline numbers."""
    lines = ["", "=== quickloris bench loss: summary ==="]
    mem = results.get("memory")
    if mem:
        lines.append(
            f"memory (H {mem['hidden']}, V {mem['vocab']}, bf16): peak GB over inputs (% less than naive), "
            "fwd+bwd ms (x naive)"
        )
        shown = [m for m in METHODS if any(r["method"] == m for r in mem["rows"])]
        lines.append(f"{'tokens':>6} {'W':<9} " + " ".join(f"{m:>{16 if m == 'naive' else 26}}" for m in shown))
        for N in sorted({r["tokens"] for r in mem["rows"]}):
            for w_grad in (True, False):
                cells = {
                    r["method"]: _cell(r, mem["rows"]) for r in mem["rows"] if (r["tokens"], r["w_grad"]) == (N, w_grad)
                }
                if cells:
                    lines.append(
                        f"{N:>6} {'trainable' if w_grad else 'frozen':<9} "
                        + " ".join(f"{cells.get(m, '-'):>{16 if m == 'naive' else 26}}" for m in shown)
                    )
        for r in mem.get("budget_sweep", []):
            lines.append(
                f"  budget {r['budget_mib']:>5} MiB ({r['chunk_rows']} rows) N={r['tokens']} "
                f"{'trainable' if r['w_grad'] else 'frozen'} {r['method']}: {_cell(r, mem['rows'])}"
            )
    for row in (results.get("spec") or {}).get("rows", []):
        lines.append(
            f"spec test_comparison chunk={row['chunk_size']}: close loss/dX/dW vs spec NaiveLinear "
            f"{row['loss_close']}/{row['grad_X_close']}/{row['grad_W_close']}, vs autograd "
            f"{row['autograd_loss_close']}/{row['autograd_grad_X_close']}/{row['autograd_grad_W_close']}, "
            f"memory saved {row['memory_saved']}"
        )
    tr = results.get("train60")
    if tr:
        for mode in ("chunked", "chunked_grad_in_forward"):
            if mode in tr:
                lines.append(
                    f"train60 {mode}: max rel loss diff vs HF {tr[mode]['max_rel_diff_vs_hf']:.2e} "
                    f"(within 1e-3: {tr[mode]['within_1e-3']}), peak {_gb(tr[mode]['peak_gb'])} vs HF "
                    f"{_gb(tr['hf']['peak_gb'])}, {tr[mode]['median_step_s'] * 1e3:.0f} vs "
                    f"{tr['hf']['median_step_s'] * 1e3:.0f} ms/step"
                )
    for g in results.get("grpo") or []:
        lines.append(
            f"grpo {g['dtype']}: loss rel diff {g['loss_rel_diff']:.1e}, LoRA grad rel diff "
            f"{g['lora_grad_rel_diff']:.1e} (cosine {g['lora_grad_cosine']:.6f}), peak naive "
            f"{_gb(g['peak_gb']['naive'])} vs chunked {_gb(g['peak_gb']['chunked'])}"
        )
    return "\n".join(lines)
