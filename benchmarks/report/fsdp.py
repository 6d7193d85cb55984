"""Report layout of the FSDP2 results: `quickloris bench fsdp` (fsdp-*.json), benchmarks/fsdp/link_bandwidth.py,
scripts/device/fsdp_launchers.sh (fsdp_launchers.json) and examples/fsdp_two_gpus.py (*run_summary.json)."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import num, percent, ratio, table


def what(kind: str, r: dict[str, Any]) -> str:
    if kind == "fsdp":
        opts = r.get("options") or {}
        extra = (
            ""
            if opts.get("reshard_after_forward", r.get("reshard_after_forward", True))
            else ", no reshard after forward"
        )
        return f"bench fsdp: {', '.join(r.get('phases', {}))} ({r.get('shape')}, lr {num(r.get('lr'))}{extra})"
    if kind == "link_bandwidth":
        return "NCCL all-gather / reduce-scatter bandwidth"
    if kind == "fsdp_launchers":
        return "launchers: " + ", ".join(r.get("launches", {}))
    if kind.endswith("run_summary"):
        return f"examples/fsdp_two_gpus.py --trainer {r.get('trainer')} on {r.get('world_size')} ranks"
    return kind


def protocol(kind: str, r: dict[str, Any]) -> str:
    if kind == "fsdp":
        return (
            "`quickloris bench fsdp`: torchrun ranks, the same global batches in every phase (one sequence of "
            f"{num(r.get('seq'))} tokens per GPU per step), {r.get('shape')} shape in NF4, LoRA r=16 on all 7 "
            f"projections, AdamW lr {num(r.get('lr'))}, bf16 compute, activation checkpointing. single: one GPU, "
            "no FSDP, gradient accumulation over the step's micro-batches. offload: FSDP2 + bf16 mixed precision "
            "(fp32 reduce) + CPU offload: per-step losses and final LoRA weights vs single. sharded: the same "
            "without offload (scaling = its tokens/s per GPU / single's). compiled: offload + regional "
            "torch.compile. Tokens/s: median over steps 3..N; peak: `max_memory_allocated`, max over ranks."
        )
    if kind == "link_bandwidth":
        return (
            "`benchmarks/fsdp/link_bandwidth.py` under torchrun: NCCL all-gather and reduce-scatter, 5 timed "
            "repetitions after 2 warm-up ones; algorithm bandwidth = bytes of the gathered tensor / time, bus "
            "bandwidth = algbw x (n-1)/n; `nvidia-smi topo -m` recorded."
        )
    if kind == "fsdp_launchers":
        return (
            "`scripts/device/fsdp_launchers.sh`: the FSDP2 launch commands a user types, each on a random-init "
            "Llama folder made on the machine, with its exit status, wall time, nvidia-smi peak memory per GPU "
            "and the run's own summary."
        )
    if kind.endswith("run_summary"):
        return (
            "`examples/fsdp_two_gpus.py` (its `run_summary.json`): a transformers Trainer / TRL SFTTrainer run "
            "on a model sharded with FSDP2, losses and evaluation before / after."
        )
    return ""


def headline(kind: str, r: dict[str, Any]) -> list[str]:
    if kind == "fsdp":
        return _bench(r)
    if kind == "link_bandwidth":
        return table(
            ["op", "dtype", "MiB", "ms", "algbw GB/s", "busbw GB/s"],
            [[x["op"], x["dtype"], x["mib"], x["ms"], x["algbw_gbs"], x["busbw_gbs"]] for x in r["rows"]],
        )
    if kind == "fsdp_launchers":
        return _launchers(r)
    if kind.endswith("run_summary"):
        losses = r.get("losses") or []
        acc = [r.get(k, {}).get("accuracy") for k in ("eval_before", "eval_after")]
        return table(
            [
                "ranks",
                "device",
                "trainer",
                "task",
                "steps",
                "global batch",
                "train s",
                "loss first -> last",
                "accuracy before -> after",
            ],
            [
                [
                    r.get("world_size"),
                    r.get("device"),
                    r.get("trainer"),
                    r.get("task"),
                    r.get("steps"),
                    r.get("global_batch"),
                    r.get("train_s"),
                    f"{num(losses[0])} -> {num(losses[-1])}" if losses else "-",
                    f"{num(acc[0])} -> {num(acc[1])}",
                ]
            ],
        )
    return []


def _bench(r: dict[str, Any]) -> list[str]:
    out = table(
        [
            "phase",
            "GPUs",
            "tokens/s per GPU",
            "peak GiB per GPU",
            "resident GiB",
            "steps",
            "first step s",
            "CPU offload",
            "compile",
        ],
        [
            [
                name,
                p.get("world_size", 1),
                p["tokens_per_s_per_gpu"],
                p.get("peak_gib"),
                p.get("resident_gib"),
                len(p["losses"]),
                p["first_step_s"],
                (p.get("fsdp") or {}).get("config", {}).get("cpu_offload", "-"),
                f"{p['compile']['unique_graphs']} graphs, {p['compile']['graph_breaks']} breaks"
                if p.get("compile")
                else "-",
            ]
            for name, p in r.get("phases", {}).items()
        ],
    )
    d = r.get("derived") or {}
    facts = []
    if "loss_parity" in d:
        lp = d["loss_parity"]
        lora = lp.get("lora_vs_single") or {}
        facts.append(
            f"- Loss parity over {lp['steps']} steps: max relative difference {num(lp['max_rel_diff'])} "
            f"(goal {num(lp['goal'])}: {'met' if lp['ok'] else 'missed'}); loss {num(lp['first_loss'])} -> "
            f"{num(lp['last_loss_single'])} (1 GPU) / {num(lp['last_loss_fsdp'])} (FSDP); final LoRA weights "
            f"vs 1 GPU: relative Frobenius {num(lora.get('rel_fro'))}, max abs {num(lora.get('max_abs'))}."
        )
    if "scaling_efficiency" in d:
        se = d["scaling_efficiency"]
        facts.append(
            f"- Scaling efficiency: {percent(se['value'])} ({num(se['tokens_per_s_per_gpu_fsdp'])} tokens/s "
            f"per GPU vs {num(se['tokens_per_s_1gpu'])} on one; goal {percent(se['goal'])})."
        )
    if "compile" in d:
        c = d["compile"]
        facts.append(
            f"- Compile with offload: {ratio(c.get('speedup_vs_eager_offload'))} the eager offload phase's "
            f"tokens/s, first step {num(c.get('first_step_s'))} s, {c.get('unique_graphs')} graphs, "
            f"{c.get('graph_breaks')} graph breaks."
        )
    prof = (r.get("phases", {}).get("sharded") or {}).get("profile")
    if prof:
        facts.append(
            f"- Sharded phase profile: GPU busy {num(prof['gpu_total_ms_per_step'])} ms per step (all "
            f"streams summed) over {prof['steps']} profiled steps; top kernels and CPU ops below."
        )
    if r.get("incomplete"):
        facts.append(f"- Incomplete: {r['incomplete']}.")
    return out + facts + ([""] if facts else [])


def _launchers(r: dict[str, Any]) -> list[str]:
    rows = []
    for name, x in r.get("launches", {}).items():
        res = x.get("result") or {}
        s = res.get("summary") or {}
        if s:
            detail = (
                f"{s.get('steps')} steps, loss {num(s.get('loss_first'))} -> {num(s.get('loss_last'))}, "
                f"{num(s.get('peak_memory_gib'))} GiB on rank 0"
            )
        elif "trained_line" in res:
            detail = res["trained_line"]
        elif "tests" in res:
            detail = f"{res['tests']} test(s), {res.get('failures')} failures, {res.get('errors')} errors"
        else:
            detail = ""
        peak = (x.get("gpu_memory") or {}).get("peak_used_mib") or {}
        rows.append(
            [
                name,
                f"`{x.get('command', '')}`",
                x.get("exit_status"),
                x.get("timed_out"),
                x.get("wall_s"),
                x.get("limit_s"),
                ", ".join(f"{g} {num(v)}" for g, v in peak.items()),
                detail,
            ]
        )
    model = r.get("model") or {}
    head = (
        [
            f"Model: {model.get('kind', '')}; hidden {num(model.get('hidden_size'))}, "
            f"{num(model.get('num_hidden_layers'))} layers, {num(model.get('parameters'))} parameters; "
            f"{num(model.get('linear_weights_splittable_over_2'))} of {num(model.get('linear_weights'))} linear "
            f"weights split over 2 ranks. All passed: {num(r.get('all_passed'))}.",
            "",
        ]
        if model
        else []
    )
    return head + table(
        ["launch", "command", "exit", "timed out", "wall s", "limit s", "nvidia-smi peak MiB", "result"], rows
    )
