"""What a run leaves for a human: the loss-curve PNG and metrics.json (both written atomically).

The plot shows the loss of every optimizer step (the token-weighted mean over the step's trained tokens) and its
exponential moving average (``m_s = 0.9·m_{s-1} + 0.1·loss_s``, bias-corrected by ``1 - 0.9^s`` so the first
steps are not pulled towards 0), with the before/after exact-match accuracies in the title when there are any.
A step without a finite loss (no trained tokens, or a diverged step) is a gap in both curves, not a plateau.
matplotlib's Agg backend renders without a display; the figure is drawn into memory and written in one rename.
metrics.json is strict JSON: a value that is not finite is written as null.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

from quickloris.utils.atomic import atomic_open, atomic_write_json


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def jsonable(obj: Any) -> Any:
    """`obj` with every float that is not finite (NaN, inf) replaced by None, so that it is valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def smooth(values: Sequence[float | None], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average over the finite entries; NaN where an entry is not finite (steps
    without trained tokens, a diverged step), so the plot shows a gap there."""
    out, m, n = [], 0.0, 0
    for v in values:
        if _finite(v):
            m, n = beta * m + (1 - beta) * v, n + 1
        out.append(m / (1 - beta**n) if n and _finite(v) else float("nan"))
    return out


def accuracy_title(evals: dict[str, Any]) -> str:
    parts = [
        f"{name} {100 * r['accuracy']:.1f}%" + (f" (macro-F1 {100 * r['macro_f1']:.1f}%)" if "macro_f1" in r else "")
        for name, r in evals.items()
        if r and "accuracy" in r
    ]
    kind = "accuracy" if any(r and "macro_f1" in r for r in evals.values()) else "exact match"
    kind = "tool call" if any(r and "call_accuracy" in r for r in evals.values()) else kind
    return (f"{kind}: " + ", ".join(parts)) if parts else ""


def plot_loss(
    history: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "",
    evals: dict[str, Any] | None = None,
    diverged_at: int | None = None,
) -> None:
    """Write the loss curve of `history` (records with ``step`` and ``loss``) as a PNG at `path`; `diverged_at`:
    the step where training stopped on a non-finite value (marked by a red line)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, no display needed

    steps = [r["step"] for r in history]
    losses = [r["loss"] if _finite(r["loss"]) else float("nan") for r in history]
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="loss per step")
    ax.plot(steps, smooth(losses), color="#08519c", linewidth=2, label="moving average")
    if diverged_at is not None:
        ax.axvline(diverged_at, color="#cb181d", linestyle=":", linewidth=1.5, label=f"diverged (step {diverged_at})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (trained tokens)")
    finite = [v for v in losses if _finite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    subtitle = accuracy_title(evals or {})
    ax.set_title(title + ("\n" + subtitle if subtitle else ""), fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())


def summarize(history: Sequence[dict[str, Any]], elapsed: float) -> dict[str, Any]:
    """Totals of a run: steps, tokens, throughput, first/last loss (means of up to 10 steps), peak memory."""
    if not history:
        return {"steps": 0}
    finite = [r["loss"] for r in history if _finite(r["loss"])]
    k = max(1, min(10, len(finite) // 4)) if finite else 0
    tokens = sum(r["tokens"] for r in history)
    return {
        "steps": history[-1]["step"],
        "tokens": tokens,
        "trained_tokens": sum(r["trained_tokens"] for r in history),
        "train_seconds": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1) if elapsed > 0 else None,
        "loss_first": sum(finite[:k]) / k if k else None,
        "loss_last": sum(finite[-k:]) / k if k else None,
        "loss_window": k,
        "peak_memory_gib": max(r["memory_gib"] for r in history),
    }


def write_metrics(
    path: str | os.PathLike,
    history: Sequence[dict[str, Any]],
    elapsed: float,
    evals: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """metrics.json: the summary, the evaluations and one record per step. Returns what was written."""
    metrics = jsonable({"summary": summarize(history, elapsed), "eval": evals, **(extra or {}), "steps": list(history)})
    atomic_write_json(path, metrics)
    return metrics
