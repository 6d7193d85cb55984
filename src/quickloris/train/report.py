"""What a run leaves for a human: the loss-curve PNG and metrics.json (both written atomically).

The plot shows the loss of every optimizer step (the token-weighted mean over the step's trained tokens) and its
exponential moving average (``m_s = 0.9·m_{s-1} + 0.1·loss_s``, bias-corrected by ``1 - 0.9^s`` so the first
steps are not pulled towards 0), with the before/after exact-match accuracies in the title when there are any.
matplotlib's Agg backend renders without a display; the figure is drawn into memory and written in one rename.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from typing import Any

from quickloris.utils.atomic import atomic_open, atomic_write_json


def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average; NaN entries (steps without trained tokens) are skipped."""
    out, m, n = [], 0.0, 0
    for v in values:
        if not math.isnan(v):
            m, n = beta * m + (1 - beta) * v, n + 1
        out.append(m / (1 - beta ** n) if n else float("nan"))
    return out


def accuracy_title(evals: dict[str, Any]) -> str:
    parts = [f"{name} {100 * r['accuracy']:.1f}%" for name, r in evals.items() if r and "accuracy" in r]
    return ("exact match: " + ", ".join(parts)) if parts else ""


def plot_loss(history: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str = "",
              evals: dict[str, Any] | None = None) -> None:
    """Write the loss curve of `history` (records with ``step`` and ``loss``) as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # a Figure without pyplot: no global state, no display needed

    steps = [r["step"] for r in history]
    losses = [r["loss"] for r in history]
    fig = Figure(figsize=(7, 4), dpi=120)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="loss per step")
    ax.plot(steps, smooth(losses), color="#08519c", linewidth=2, label="moving average")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (trained tokens)")
    finite = [v for v in losses if not math.isnan(v)]
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
    finite = [r["loss"] for r in history if not math.isnan(r["loss"])]
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


def write_metrics(path: str | os.PathLike, history: Sequence[dict[str, Any]], elapsed: float,
                  evals: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """metrics.json: the summary, the evaluations and one record per step. Returns what was written."""
    metrics = {"summary": summarize(history, elapsed), "eval": evals, **(extra or {}), "steps": list(history)}
    atomic_write_json(path, metrics)
    return metrics
