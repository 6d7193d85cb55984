"""Report layout of `quickloris bench dequant` (dequant-*.json)."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import num, percent, ratio, table

_FNS = (
    "quickloris",
    "unsloth_fast_dequantize",
    "bnb_dequantize_4bit",
    "peft_dequantize_module_weight",
    "quickloris_plain_twin",
)


def what(kind: str, r: dict[str, Any]) -> str:
    h = r.get("harness")
    if isinstance(h, dict):  # one process per implementation (from 2026-12-06)
        med = h.get("median_seconds") or {}
        text = "bench dequant" + (
            f": harness median quickloris {num(med['quickloris'])} s" if "quickloris" in med else ""
        )
        if "speedup_vs_unsloth" in h:
            text += f", {ratio(h['speedup_vs_unsloth'])} vs Unsloth's real fast_dequantize"
        if "quickloris_fraction_of_floor" in h:
            text += f", {percent(h['quickloris_fraction_of_floor']['median'])} of the harness floor"
        return text
    med = r.get("harness_median_seconds") or {}
    text = "bench dequant" + (f": harness median quickloris {num(med['quickloris'])} s" if "quickloris" in med else "")
    if "speedup_vs_unsloth" in r:
        text += f", {ratio(r['speedup_vs_unsloth'])} vs Unsloth's"
    return text


def protocol(kind: str, r: dict[str, Any]) -> str:
    h = r.get("harness")
    if isinstance(h, dict):
        runs = h.get("runs") or {}
        n = max((len(v.get("seconds", [])) for v in runs.values()), default=0)
        return (
            "`quickloris bench dequant`. Harness: the challenge's `test_dequantize` (three MLP configs of "
            "bitsandbytes `Linear4bit` NF4 double-quant weights, each matrix dequantized with a synchronize after "
            f"it, {h.get('iters')} iterations, correctness checks against bitsandbytes' `dequantize_4bit` in the "
            "warm-up), wall-clock seconds, each implementation in a process of its own (Unsloth's real "
            f"`unsloth.kernels.utils.fast_dequantize`), rounds in turn, {n} runs each, median reported; "
            "`torch_empty_floor` times the harness with `torch.empty` in place of a dequantization; floor = that "
            "+ the bytes every dequantization must move at the measured copy bandwidth; `one_launch_floor` adds one "
            "empty kernel launched from C++ per matrix (`torch.cuda._sleep(0)`: the launch and its completion, which "
            "any one-kernel implementation pays). Per matrix (quickloris, "
            "bitsandbytes and PEFT in the main process): CUDA-event median of `triton.testing.do_bench` rotating "
            "over 4 weights; GB/s over the bytes that must move and the fraction of the copy bandwidth. Unsloth "
            "per matrix: "
            f"{r.get('unsloth_source', 'not recorded')}."
        )
    reps = len(next(iter((r.get("harness_seconds") or {"": []}).values())))
    return (
        "`quickloris bench dequant`, one process. Harness: the challenge's `test_dequantize` (three MLP configs "
        "of bitsandbytes `Linear4bit` NF4 double-quant weights, each matrix dequantized with a synchronize after "
        f"it, its own correctness checks in the warm-up), wall-clock seconds per function, {reps} interleaved "
        "repeats, median reported; `torch_empty_floor` times the harness with `torch.empty` in place of a "
        "dequantization. Per matrix: CUDA-event median of `triton.testing.do_bench` rotating over 4 weights "
        "(no launch hits a warm L2); GB/s over the bytes that must move (packed n/2 + absmax n/64 + absmax2 + "
        "output) and the fraction of the measured device-to-device copy bandwidth. Unsloth: "
        f"{r.get('unsloth_source', 'not recorded')}."
    )


def headline(kind: str, r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    med, reps = r.get("harness_median_seconds"), r.get("harness_seconds") or {}
    h = r.get("harness")
    if isinstance(h, dict):
        med = h.get("median_seconds")
        reps = {k: v.get("seconds", []) for k, v in (h.get("runs") or {}).items()}
        errors = {k: v["errors"][0] for k, v in (h.get("runs") or {}).items() if v.get("errors")}
    if med:
        base = med.get("quickloris")
        out += ["Challenge harness (seconds, all configs):", ""]
        out += table(
            ["function", "median s", "x quickloris' time", "repeats s"],
            [
                [k, v, ratio(v / base) if base else "-", ", ".join(num(x) for x in reps.get(k, []))]
                for k, v in med.items()
            ],
        )
        if isinstance(h, dict):
            f = h.get("quickloris_fraction_of_floor")
            if f:
                parts = h["floor_parts"]
                out += [
                    f"Harness floor {num(h['floor_seconds'])} s (Python + synchronisation "
                    f"{num(parts['python_and_sync_s'])} s + bytes at copy bandwidth "
                    f"{num(parts['bytes_at_copy_bandwidth_s'])} s): quickloris at {percent(f['median'])} of it "
                    f"(median; best {percent(f['best'])}, worst {percent(f['worst'])}).",
                    "",
                ]
            out += [f"{k}: failed: `{v}`" for k, v in errors.items()] + ([""] if errors else [])
    rows = r.get("per_matrix") or []
    if rows:
        fns = [f for f in _FNS if any(f in row for row in rows)]
        out += [
            f"Per matrix, device time in us (copy bandwidth {num(r.get('copy_bandwidth_TBps'))} TB/s; floor = "
            "bytes / copy bandwidth; quickloris' fraction of it in brackets):",
            "",
        ]
        out += table(
            ["shape", "dtype", "bytes", "floor us", *fns],
            [
                [
                    f"{row['shape'][0]}x{row['shape'][1]}",
                    row["dtype"],
                    row["bytes"],
                    row["floor_us"],
                    *(
                        num(row[f]["us"])
                        + (f" ({percent(row[f].get('fraction_of_copy_bw'))})" if f == "quickloris" else "")
                        if f in row
                        else "-"
                        for f in fns
                    ),
                ]
                for row in rows
            ],
        )
    host = r.get("host_us_per_call_4096x1024")
    if host:
        out += ["Host time per call, 4096x1024, no synchronisation (us):", ""]
        out += table(list(host), [list(host.values())])
    facts = []
    if "eager_direct_launch" in r:
        facts.append(f"- Eager direct launch (skips Triton's argument binding): {r['eager_direct_launch']}.")
    wf = r.get("write_only_floor_14336x4096_bf16")
    if wf:
        facts.append(
            f"- Writing the 14336x4096 bf16 output alone (`fill_`): {num(wf['us'])} us = {num(wf['TBps'])} TB/s."
        )
    corr = r.get("correctness")
    if corr:
        exact = corr.get("bit_exact_vs_bitsandbytes", [])
        facts.append(
            f"- Kernel launches per call: {corr.get('kernel_launches_per_call')} "
            f"({', '.join(corr.get('kernels', []))}); bit-exact vs bitsandbytes' CUDA dequantization: "
            + "; ".join(
                f"{e['shape'][0]}x{e['shape'][1]} {e['dtype']} inline PTX "
                f"{num(e['inline_ptx_bit_exact'])}, plain twin {num(e['plain_twin_bit_exact'])}"
                for e in exact
            )
            + "."
        )
    sweep = r.get("config_sweep_14336x4096_bf16")
    if sweep:
        best = min(sweep, key=lambda x: x["us"])
        facts.append(
            f"- Launch-config sweep ({len(sweep)} configs, 14336x4096 bf16): fastest "
            + ", ".join(f"{k} {num(v)}" for k, v in best.items() if k != "us")
            + f": {num(best['us'])} us (every config in the values below)."
        )
    return out + facts + ([""] if facts else [])
