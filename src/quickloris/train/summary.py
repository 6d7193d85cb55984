"""The closing lines of `quickloris train` (`quickloris.train.run.run_train`): loss, scores, where the files are."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from quickloris.train.runtime import cpu_cores, load_average


def print_summary(
    echo: Callable[[str], None], metrics: dict[str, Any], out: Path, adapter_dir: Path, device: torch.device
) -> None:
    """The loss at the start and end, the scores before / after, the files written and the run's wall time."""
    s = metrics["summary"]
    if s.get("loss_first") is not None:
        echo(
            f"loss: {s['loss_first']:.4f} -> {s['loss_last']:.4f} (mean of the first / last {s['loss_window']} "
            f"steps), {s['steps']} steps in {s['train_seconds']:.0f} s, {s['tokens_per_s']:.0f} tokens/s, "
            f"peak memory {s['peak_memory_gib']:.2f} GiB"
        )
    ev = metrics["eval"]
    if ev and all("macro_f1" in v for v in ev.values()):
        echo(
            "accuracy / macro-F1: "
            + ", ".join(
                f"{k} {100 * v['accuracy']:.1f}% / {100 * v['macro_f1']:.1f}% ({v['correct']}/{v['total']})"
                for k, v in ev.items()
            )
        )
    elif ev and all("call_accuracy" in v for v in ev.values()):
        echo(
            "tool call / final answer: "
            + ", ".join(
                f"{k} {100 * v['call_accuracy']:.1f}% / {100 * v['answer_accuracy']:.1f}% ({v['call_correct']} / "
                f"{v['answer_correct']} of {v['total']})"
                for k, v in ev.items()
            )
        )
    elif ev:
        echo(
            "exact match: "
            + ", ".join(f"{k} {100 * v['accuracy']:.1f}% ({v['correct']}/{v['total']})" for k, v in ev.items())
        )
    echo(f"adapter (PEFT format): {adapter_dir}")
    echo(f"loss plot: {out / 'loss.png'}   metrics: {out / 'metrics.json'}   config: {out / 'config.json'}")
    load = load_average()
    echo(
        f"done in {metrics['wall_seconds']:.0f} s"
        + (
            f" (load average now {load:.2f} on {cpu_cores()} cores)"
            if device.type == "cpu" and load is not None
            else ""
        )
    )
