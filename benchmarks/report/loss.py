"""Report layout of `quickloris bench loss` (loss-*.json)."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import num, percent, ratio, table

_METHODS = ("naive", "recompute", "grad_in_forward")


def what(kind: str, r: dict[str, Any]) -> str:
    return "bench loss: " + ", ".join(r.get("parts", []))


def protocol(kind: str, r: dict[str, Any]) -> str:
    mem, tr = r.get("memory") or {}, r.get("train60") or {}
    return (
        "`quickloris bench loss`, one GPU. memory: peak memory over the inputs (`max_memory_allocated` after a "
        "reset, minus what was allocated before) and forward + backward time (CUDA events, median) of the naive "
        "`F.cross_entropy((X @ W.T).float(), y)` vs `chunked_linear_loss` (recompute and grad_in_forward "
        f"schedules), {mem.get('dtype', 'bf16')}, H {num(mem.get('hidden'))}, V {num(mem.get('vocab'))}, W "
        "trainable and frozen; plus a sweep of the chunk memory budget. spec: the challenge's `test_comparison` "
        "(NaiveLinear vs `MemoryEfficientLinear`). train60: a random-init Llama-3.2-1B-shaped model, NF4 + LoRA "
        f"r=16 on all 7 projections, {num(tr.get('steps'))} steps of {num(tr.get('batch'))} x "
        f"{num(tr.get('seq'))} tokens from the same LoRA init with HF's loss and with `enable_chunked_loss`. "
        "grpo: one GRPO step on a small Llama + LoRA, log-probs chunked vs from full logits."
    )


def _mem_cell(r: dict[str, Any], naive: dict[str, Any] | None) -> str:
    text = f"{num(r['peak_gb'])} GB"
    if naive is not None and naive is not r and r["peak_gb"] is not None and naive["peak_gb"]:
        text += f" ({percent(1 - r['peak_gb'] / naive['peak_gb'])} less)"
    if r.get("ms") is not None:
        text += f", {num(r['ms'])} ms"
        if naive is not None and naive is not r and naive.get("ms"):
            text += f" ({ratio(r['ms'] / naive['ms'])})"
    return text


def headline(kind: str, r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    mem = r.get("memory")
    if isinstance(mem, dict) and "rows" in mem:
        rows = mem["rows"]
        methods = [m for m in (*_METHODS, "vocab_blocked") if any(x["method"] == m for x in rows)]
        out += ["Peak GB over the inputs (less than naive), forward + backward ms (x naive):", ""]
        body = []
        for n in sorted({x["tokens"] for x in rows}):
            for w_grad in (True, False):
                by = {x["method"]: x for x in rows if x["tokens"] == n and x["w_grad"] == w_grad}
                if by:
                    body.append(
                        [
                            n,
                            "trainable" if w_grad else "frozen",
                            *(_mem_cell(by[m], by.get("naive")) if m in by else "-" for m in methods),
                        ]
                    )
        out += table(["tokens", "W", *methods], body)
        sweep = mem.get("budget_sweep") or []
        if sweep:
            out += ["Chunk memory budget sweep:", ""]
            out += table(
                ["budget MiB", "chunk rows", "tokens", "W", "method", "peak GB", "ms"],
                [
                    [
                        x["budget_mib"],
                        x["chunk_rows"],
                        x["tokens"],
                        "trainable" if x["w_grad"] else "frozen",
                        x["method"],
                        x["peak_gb"],
                        x.get("ms"),
                    ]
                    for x in sweep
                ],
            )
    spec = (r.get("spec") or {}).get("rows")
    if spec:
        out += ["Challenge `test_comparison`:", ""]
        out += table(
            [
                "chunk size",
                "loss / dX / dW close to NaiveLinear",
                "close to autograd",
                "naive peak GB",
                "chunked peak GB",
                "memory saved",
            ],
            [
                [
                    str(x["chunk_size"]),
                    f"{num(x['loss_close'])} / {num(x['grad_X_close'])} / {num(x['grad_W_close'])}",
                    f"{num(x['autograd_loss_close'])} / "
                    f"{num(x['autograd_grad_X_close'])} / {num(x['autograd_grad_W_close'])}",
                    x["naive_peak_gb"],
                    x["eff_peak_gb"],
                    x["memory_saved"],
                ]
                for x in spec
            ],
        )
    tr = r.get("train60")
    if isinstance(tr, dict) and "hf" in tr:
        out += [f"QLoRA training, {num(tr.get('steps'))} steps:", ""]
        out += table(
            ["loss", "median step ms", "peak GB", "max rel loss diff vs HF", "within 1e-3"],
            [
                [k, v["median_step_s"] * 1e3, v["peak_gb"], v.get("max_rel_diff_vs_hf"), v.get("within_1e-3")]
                for k, v in tr.items()
                if isinstance(v, dict)
            ],
        )
    grpo = r.get("grpo")
    if isinstance(grpo, list) and grpo:
        out += ["GRPO step, chunked vs full logits:", ""]
        out += table(
            [
                "dtype",
                "loss rel diff",
                "LoRA grad rel diff",
                "grad cosine",
                "peak GB naive",
                "peak GB chunked",
                "step s naive",
                "step s chunked",
            ],
            [
                [
                    g["dtype"],
                    g["loss_rel_diff"],
                    g["lora_grad_rel_diff"],
                    g["lora_grad_cosine"],
                    g["peak_gb"]["naive"],
                    g["peak_gb"]["chunked"],
                    g["step_s"]["naive"],
                    g["step_s"]["chunked"],
                ]
                for g in grpo
            ],
        )
    return out
