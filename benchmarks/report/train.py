"""Report layout of `quickloris bench train` (train-*.json), of benchmarks/train/probe_speed.py (probe_speed-*) and of
the tool-calling notebook's run (tools-cpu-*, written by examples/tool_calling.ipynb)."""

from __future__ import annotations

from typing import Any

from benchmarks.report.markdown import cell_text, columns, num, percent, ratio, table

_SHAPES = {"1b": "Llama-3.2-1B shape", "8b": "Llama-3.1-8B shape"}


def what(kind: str, r: dict[str, Any]) -> str:
    if kind == "tools-cpu":
        return f"tool calling: SmolLM2 --task tools, {num(r.get('steps'))} steps of {num(r.get('batch_size'))}"
    if kind == "probe_speed":
        return "probe_speed: " + ", ".join(k for k in r if not k.endswith("_seconds"))
    opts = [f"attention {r['attention']}"] if r.get("attention") else []
    for part in ("1b", "8b"):
        if r.get(f"in_graph_{part}") not in (None, False):
            keep = r[f"in_graph_{part}"]
            opts.append(f"in-graph checkpoint {part}" + (f" keep {keep}" if isinstance(keep, str) and keep else ""))
        if r.get(f"skip_last_{part}"):
            opts.append(f"skip-last {part} {r[f'skip_last_{part}']}")
    if r.get("compile_mode") not in (None, "default"):
        opts.append(f"compile mode {r['compile_mode']}")
    if r.get("mlp_chunks") not in (None, 1):
        opts.append(f"mlp chunks {r['mlp_chunks']}")
    fam = r.get("families")
    if isinstance(fam, dict) and "error" not in fam:
        opts.append(
            "families "
            + ", ".join(f"{n} {f.get('batch')}x{f.get('seq')}" for n, f in fam.items() if isinstance(f, dict))
        )
    flags = [f for f in ("quick", "tiny") if r.get(f)]
    return f"bench train: {', '.join(r.get('parts', []))}" + (f" ({'; '.join(opts + flags)})" if opts or flags else "")


def protocol(kind: str, r: dict[str, Any]) -> str:
    if kind == "tools-cpu":
        return (
            "examples/tool_calling.ipynb (built and executed by examples/tool_calling_notebook.py) on the CPU: "
            f"`quickloris train --task tools --batch-size {num(r.get('batch_size'))} --max-steps "
            f"{num(r.get('steps'))} --num-eval {num(r.get('num_eval'))}` on the embedded SmolLM2-135M-Instruct "
            "(NF4 + LoRA r=16 on every linear, quickloris' ChatML tool template), held-out problems scored before and "
            "after (the tool call: name and arguments as JSON values; the final answer after the reference call and "
            "its result: exact first line), then `quickloris export gguf --quant q8_0` and `quickloris eval --gguf` "
            "(llama.cpp) on the same problems, and a tool loop with llama-cpp-python's `create_chat_completion` on the "
            "file. train_minutes: the whole `quickloris train` call (loading and both evaluations included)."
        )
    if kind == "probe_speed":
        return (
            "`benchmarks/train/probe_speed.py` (diagnostics, not the headline benchmark). attention: forward + "
            "backward of each SDPA backend and FlexAttention at the 1B (4 x 2048) and 8B (1 x 8192) shapes "
            "(ms, TFLOP/s). 1b / 8b: the compiled quickloris stack of `quickloris bench train` in variants "
            "(k last layers un-checkpointed, attention backend, checkpoint mode), tokens/s = median over steps "
            "3..N, peak = `max_memory_allocated`. profile: one 1B step under torch.profiler, CUDA kernel time "
            "grouped. saved: what autograd saves per decoder layer under each checkpoint mode."
        )
    steps = r.get("steps")
    return (
        f"`quickloris bench train`: random-init Llama shapes, bf16, NF4 double quant (the same bytes for every "
        f"stack), LoRA r=16 alpha=32 on q,k,v,o,gate,up,down with the same initialisation, AdamW lr "
        f"{num(r.get('lr'))}, gradient checkpointing; {num(steps)} steps per stack, tokens/s = median over "
        f"steps 3..{num(steps)}; peak = `max_memory_allocated` after a reset once the model is built (weights "
        "included). Stacks: `hf_eager` / `hf_compiled` (HF + PEFT + bitsandbytes, transformers' checkpointing; "
        "compiled: each decoder layer `torch.compile`d), `ql_eager` / `ql_compiled` (quickloris; compiled: "
        f"layers, final norm and loss chunk, dynamic shapes; attention `{r.get('attention', 'sdpa')}`). counts: "
        "60 steps of random lengths from a cleared dynamo cache, graphs and graph breaks counted, per-step "
        "losses vs eager. maxlen: the longest 1 x S of the 8B shape that trains one step (doubling, then "
        "bisection)."
    ) + (_FAMILIES if "families" in (r.get("parts") or []) else "")


_FAMILIES = (
    " families: other families' real shapes (`benchmarks/train/families.py`: the public config of the "
    "named checkpoint, random init), LoRA on every decoder linear under the family's names (Phi-3: the fused "
    "qkv_proj, gate_up_proj), the four stacks on one shared NF4 base per shape (HF stacks: transformers' "
    "SDPA; quickloris: the attention named per shape), the same LoRA init and batches, the part's own step "
    "count (tokens/s = median over steps 3..N)."
)


STACK_COLUMNS = [
    "stack",
    "tokens/s",
    "x hf_eager",
    "x hf_compiled",
    "x unsloth",
    "peak GiB",
    "of hf_eager's",
    "of hf_compiled's",
    "of unsloth's",
    "max rel loss diff vs hf_eager",
    "first step s",
    "compile",
]


def _stack_rows(runs: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for stack, s in runs.items():
        if "error" in s:  # a stack that failed (out of memory, say): its error in place of the numbers
            rows.append([stack, cell_text(f"failed: {s['error']}")] + [None] * (len(STACK_COLUMNS) - 2))
            continue
        comp = s.get("compile") or {}
        rows.append(
            [
                stack,
                s.get("tokens_per_s"),
                ratio(s.get("speedup_vs_hf_eager")),
                ratio(s.get("speedup_vs_hf_compiled")),
                ratio(s.get("speedup_vs_unsloth")),
                s.get("peak_gib"),
                percent(s.get("memory_vs_hf_eager")),
                percent(s.get("memory_vs_hf_compiled")),
                percent(s.get("memory_vs_unsloth")),
                s.get("max_rel_loss_diff_vs_hf_eager"),
                s.get("first_step_s"),
                f"{comp.get('unique_graphs')} graphs, {comp.get('graph_breaks')} breaks"
                + (f", {comp['trace_restarts']} trace restarts" if "trace_restarts" in comp else "")
                if comp
                else "-",
            ]
        )
    return rows


def headline(kind: str, r: dict[str, Any]) -> list[str]:
    if kind == "tools-cpu":
        rows = [
            [label, f"{num(x['call_correct'])} / {num(x['total'])}", f"{num(x['answer_correct'])} / {num(x['total'])}"]
            for label, x in (("before", r["before"]), ("after", r["after"]), ("exported Q8_0", r["exported_q8_0"]))
        ]
        return table(["model", "tool call", "final answer"], rows)
    if kind == "probe_speed":
        return _probe(r)
    out: list[str] = []
    for part in ("1b", "8b"):
        res = r.get(part)
        if not isinstance(res, dict):
            continue
        if "error" in res:
            out += [f"{_SHAPES[part]}: failed: `{res['error']}`", ""]
            continue
        for shape, runs in res.items():
            out += [f"{_SHAPES[part]}, batch x tokens {shape}:", ""]
            out += table(
                STACK_COLUMNS,
                _stack_rows(runs),
            )
    out += _families(r.get("families"))
    c = r.get("counts")
    if isinstance(c, dict) and "compile" in c:
        out += ["Compile counts:", ""]
        out += table(
            [
                "steps",
                "lengths",
                "graphs",
                "graph breaks",
                "max rel loss diff vs eager",
                "compiled total s",
                "eager total s",
            ],
            [
                [
                    c["steps"],
                    f"{c['lengths'][0]}..{c['lengths'][1]}",
                    c["compile"].get("unique_graphs"),
                    c["compile"].get("graph_breaks"),
                    c.get("max_rel_loss_diff_vs_eager"),
                    c.get("compiled_total_s"),
                    c.get("eager_total_s"),
                ]
            ],
        )
    m = r.get("maxlen")
    if isinstance(m, dict) and "error" not in m:
        out += ["Longest 8B-shape context that trains (batch 1):", ""]
        out += table(
            [
                "stack",
                "longest tokens",
                "first out of memory",
                "cap reached",
                "peak GiB at longest",
                "step s at longest",
                "trials (tokens: fits)",
            ],
            [
                [
                    stack,
                    x["longest"],
                    x["first_oom"],
                    x["capped"],
                    next((t["peak_gib"] for t in x["trials"] if t["seq"] == x["longest"] and t["fits"]), None),
                    next((t.get("step_s") for t in x["trials"] if t["seq"] == x["longest"] and t["fits"]), None),
                    ", ".join(f"{t['seq']}: {'ok' if t['fits'] else 'OOM'}" for t in x["trials"]),
                ]
                for stack, x in m.items()
                if "longest" in x
            ],
        )
    return out


def _families(fam: Any) -> list[str]:
    """The families part: per shape, its source checkpoint and the stacks' table (or the error)."""
    if not isinstance(fam, dict):
        return []
    if "error" in fam:
        return [f"Families: failed: `{fam['error']}`", ""]
    out: list[str] = []
    for name, f in fam.items():
        head = (
            f"{name} shape ({f.get('architecture')}, config of {f.get('source')}, {num(f.get('params'))} "
            f"parameters), {f.get('dtype')}, batch x tokens {f.get('batch')}x{f.get('seq')}, "
            f"{num(f.get('steps'))} steps, LoRA on {', '.join(f.get('lora_targets') or [])}, attention: ql "
            f"{f.get('ql_attention')}, hf {f.get('hf_attention')}"
        )
        if "error" in f:
            out += [f"{head}: failed: `{cell_text(f['error'])}`", ""]
            continue
        out += [head + ":", ""]
        out += table(
            STACK_COLUMNS,
            _stack_rows(f.get("runs") or {}),
        )
    return out


def _probe(r: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for shape, kernels in (r.get("attention") or {}).items():
        if isinstance(kernels, dict) and "error" not in kernels:
            out += [f"attention, {shape} (forward + backward):", ""]
            out += columns(
                kernels, "kernel", [("ms", "ms", None), ("TFLOP/s", "tflops", None), ("error", "error", None)]
            )
    for part in ("1b", "8b"):
        variants = r.get(part)
        if isinstance(variants, dict) and "error" not in variants:
            out += [f"{_SHAPES[part]} variants:", ""]
            out += columns(
                variants,
                "variant",
                [
                    ("tokens/s", "tokens_per_s", None),
                    ("peak GiB", "peak_gib", None),
                    ("first step s", "first_step_s", None),
                ],
            )
    prof = r.get("profile")
    if isinstance(prof, dict) and "groups_ms_per_step" in prof:
        out += [
            f"profile: {num(prof.get('wall_ms_per_step'))} ms wall, {num(prof.get('kernel_ms_per_step'))} ms "
            "of CUDA kernels per step; kernel time by group (ms per step):",
            "",
        ]
        out += table(list(prof["groups_ms_per_step"]), [list(prof["groups_ms_per_step"].values())])
    saved = r.get("saved")
    if isinstance(saved, dict) and "error" not in saved:
        modes = saved.get("modes", saved)
        where = f" ({saved['device']}, tokens {saved['tokens'][0]} x {saved['tokens'][1]})" if "device" in saved else ""
        out += [f"saved for backward per decoder layer{where}:", ""]
        out += columns(
            modes, "attention:checkpoint", [("saved MiB", "saved_mib", None), ("peak GiB", "peak_gib", None)]
        )
    return out
