"""Report layout of `quickloris bench vision` (benchmarks/vision/bench.py; vision/*.json)."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import num, table


def what(kind: str, r: dict[str, Any]) -> str:
    parts = [p for p in ("learn", "speed") if p in r]
    return f"bench vision ({', '.join(parts)}; {'tiny, CPU' if kind.endswith('tiny') else 'device'})"


def protocol(kind: str, r: dict[str, Any]) -> str:
    out = []
    if "learn" in r:
        learn = r["learn"]
        out.append(
            f"Learning check: a random-init Qwen2-VL ({learn.get('shape')} shape) trained with quickloris (NF4 + LoRA "
            f"r=16 on the language model and the vision tower) on the embedded `{learn.get('task')}` task for "
            f"{num(learn.get('steps'))} steps of {num(learn.get('batch'))} pictures (lr {num(learn.get('lr'))}, "
            f"warm-up then cosine); held-out exact match by greedy generation on {num(learn.get('heldout'))} pictures "
            f"never trained on, before and after (chance {num(learn.get('chance'))})."
        )
    if "speed" in r:
        stacks = (r["speed"] or {}).get("stacks", {})
        peers = "HF + PEFT + bitsandbytes" + (
            " and Unsloth's FastVisionModel (its own process)" if "unsloth" in stacks else ""
        )
        out.append(
            f"Speed: Qwen2-VL-shaped QLoRA steps on batches mixing image and text-only rows "
            f"({num(r['speed'].get('batch'))} rows of {r['speed'].get('lengths')} text tokens, every other with one "
            f"image), quickloris padded / packed vs {peers}; tokens/s of real tokens (median of "
            f"{num(next(iter(stacks.values()), {}).get('timed_steps'))} timed steps), peak memory."
        )
    return " ".join(out)


def headline(kind: str, r: dict[str, Any]) -> list[str]:
    rows = []
    if "learn" in r:
        learn = r["learn"]
        rows.append(["learn: exact match before", learn["before"]["accuracy"]])
        rows.append(["learn: exact match after", learn["after"]["accuracy"]])
        rows.append(["learn: loss first / last", f"{num(learn.get('loss_first'))} / {num(learn.get('loss_last'))}"])
    for stack, s in (r.get("speed") or {}).get("stacks", {}).items():
        rows.append(
            [f"speed {stack}: tokens/s, peak GiB", f"{num(s.get('tokens_per_s'))}, {num(s.get('peak_memory_gib'))}"]
        )
    return table(["what", "value"], rows) + [""] if rows else []
