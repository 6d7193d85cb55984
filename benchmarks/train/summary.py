"""What `quickloris bench train` prints: each part's headline as it ends, and the summary table at the end."""

from __future__ import annotations

from typing import Any

from benchmarks.train.families import summary_lines


def _brief_runs(runs: dict[str, Any]) -> dict[str, Any]:
    return {s: {k: v for k, v in r.items() if k not in ("losses", "step_s")} for s, r in runs.items()}


def headline(part: str, res: Any) -> Any:
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
