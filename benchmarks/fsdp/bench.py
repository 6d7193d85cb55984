"""`quickloris bench fsdp`: QLoRA with FSDP2 on 2 GPUs vs 1 GPU (Llama-3.1-8B shape), one command.

It launches ``torchrun --standalone --nproc-per-node G`` of `benchmarks.fsdp.worker` (G = ``--gpus``, 2) and
turns what rank 0 reports into one JSON record (`quickloris.utils.provenance.record("fsdp", ...)`) plus a PNG of
the loss curves, both under ``<out>/fsdp/``. Phases (all on the same global batches: G sequences of 1 x ``--seq``
tokens per step, token ids drawn from a 512-id subset of the vocabulary so the LoRA has something to learn; AdamW,
LoRA r=16 alpha=32 on q,k,v,o,gate,up,down; bf16 compute; activation checkpointing everywhere):

* ``single``: one GPU, no FSDP, gradient accumulation over the step's G micro-batches (``--steps`` steps).
* ``offload``: G GPUs, FSDP2 with bf16 mixed precision (fp32 reduce) + CPU offload + checkpointing, all at once,
  ``--steps`` steps: per-step losses vs ``single`` (goal: within 1e-3 relative), final LoRA weights vs ``single``,
  per-GPU peak memory with offload.
* ``sharded``: the same without CPU offload, ``--timing-steps`` steps: per-GPU peak memory without offload,
  tokens/s per GPU; scaling efficiency = its tokens/s per GPU / ``single``'s tokens/s (goal >= 90 %).
* ``compiled``: ``offload`` + regional torch.compile, ``--compile-steps`` steps: tokens/s with compile (vs
  ``offload`` without), compile time (first step), graph breaks.

Tokens/s: median over steps 3..N of (tokens this GPU processed) / (step wall time); peak memory:
``max_memory_allocated`` over the training steps, the maximum over ranks. Options may also come from
$QUICKLORIS_BENCH_FSDP_ARGS (device runs: ``scripts/device/run.sh bench-fsdp``). ``--tiny --device cpu``: a tiny
shardable model on 2 gloo ranks (the CPU test); not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The ranks import `benchmarks.fsdp.worker` from this checkout, whatever their working directory.
_CHECKOUT = str(Path(__file__).resolve().parents[2])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", type=int, default=2, help="ranks of the FSDP phases (default 2)")
    parser.add_argument("--shape", default="llama-3.1-8b", help="model shape: llama-3.1-8b, llama-3.2-1b, tiny")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (one sequence per GPU per step)")
    parser.add_argument("--steps", type=int, default=60, help="steps of the single and offload phases (loss parity)")
    parser.add_argument("--timing-steps", type=int, default=12, help="steps of the sharded (no offload) phase")
    parser.add_argument("--compile-steps", type=int, default=12, help="steps of the compiled phase (0: skip it)")
    parser.add_argument(
        "--lr",
        type=float,
        default=2e-4,
        help="AdamW learning rate (QLoRA's for 7-13B models; "
        "5e-4 on this random-token data makes the loss spike and the runs amplify rounding)",
    )
    parser.add_argument(
        "--reshard-after-forward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="FSDP2: free each layer's gathered weights after its forward (and gather them again "
        "for backward); --no-reshard-after-forward gathers once per step (more memory, half the "
        "all-gathers: for slow links)",
    )
    parser.add_argument(
        "--profile-steps",
        type=int,
        default=2,
        help="extra steps of the sharded phase under torch.profiler (top kernels / CPU ops in the record; 0: none)",
    )
    parser.add_argument("--phases", default="single,offload,sharded,compiled", help="comma-separated phases")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo ranks (with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny model, short steps (the CPU test); not a measurement")
    parser.add_argument(
        "--timeout",
        type=float,
        default=480.0,
        help="seconds before the ranks are stopped (the "
        "phases finished by then are recorded): below the device's 10-minute limit per command",
    )
    extra = os.environ.get("QUICKLORIS_BENCH_FSDP_ARGS")
    if extra:  # device runs pass options through the environment
        ns, unknown = parser.parse_known_args(shlex.split(extra))
        if unknown:
            raise ValueError(f"QUICKLORIS_BENCH_FSDP_ARGS: unknown options {unknown}")
        given = {a.dest for a in parser._actions if any(o in shlex.split(extra) for o in a.option_strings)}
        parser.set_defaults(**{k: v for k, v in vars(ns).items() if k in given})


def worker_command(args: argparse.Namespace, result: str) -> list[str]:
    shape, seq, backend = args.shape, args.seq, "inductor"
    steps, timing, comp = args.steps, args.timing_steps, args.compile_steps
    if args.tiny:
        shape, seq, backend = "tiny", min(seq, 64), "aot_eager"
        steps, timing, comp = min(steps, 4), min(timing, 3), min(comp, 2)
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.gpus}",
        "-m",
        "benchmarks.fsdp.worker",
        "--shape",
        shape,
        "--device",
        args.device,
        "--seq",
        str(seq),
        "--steps",
        str(steps),
        "--timing-steps",
        str(timing),
        "--compile-steps",
        str(comp),
        "--lr",
        str(args.lr),
        "--phases",
        args.phases,
        "--backend",
        backend,
        "--result",
        result,
        "--profile-steps",
        str(0 if args.tiny else args.profile_steps),
    ] + ([] if args.reshard_after_forward else ["--no-reshard-after-forward"])


def derive(results: dict[str, Any]) -> dict[str, Any]:
    """Parity, scaling efficiency, memory and compile ratios from the phases (the headline numbers)."""
    ph = results.get("phases", {})
    single, off, sharded, comp = (ph.get(k) for k in ("single", "offload", "sharded", "compiled"))
    out: dict[str, Any] = {}
    if single and off:
        n = min(len(single["losses"]), len(off["losses"]))
        rel = [abs(a - b) / abs(b) for a, b in zip(off["losses"][:n], single["losses"][:n])]
        out["loss_parity"] = {
            "steps": n,
            "max_rel_diff": max(rel),
            "goal": 1e-3,
            "ok": max(rel) <= 1e-3,
            "first_loss": single["losses"][0],
            "last_loss_single": single["losses"][n - 1],
            "last_loss_fsdp": off["losses"][n - 1],
            "lora_vs_single": off.get("lora_vs_single"),
        }
    if single and sharded:
        eff = sharded["tokens_per_s_per_gpu"] / single["tokens_per_s_per_gpu"]
        out["scaling_efficiency"] = {
            "value": eff,
            "goal": 0.9,
            "ok": eff >= 0.9,
            "tokens_per_s_1gpu": single["tokens_per_s_per_gpu"],
            "tokens_per_s_per_gpu_fsdp": sharded["tokens_per_s_per_gpu"],
        }
    mem = {k: ph[k]["peak_gib"] for k in ("single", "offload", "sharded", "compiled") if k in ph}
    if mem:
        out["peak_gib_per_gpu"] = mem
    if off and comp:
        out["compile"] = {
            "speedup_vs_eager_offload": comp["tokens_per_s_per_gpu"] / off["tokens_per_s_per_gpu"],
            "first_step_s": comp["first_step_s"],
            **(comp.get("compile") or {}),
        }
    return out


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Per-step loss, one GPU vs G GPUs (FSDP2, offload + checkpointing + bf16), and their relative difference."""
    ph = results.get("phases", {})
    if "single" not in ph or "offload" not in ph:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quickloris.utils.atomic import atomic_open

    a, b = ph["single"]["losses"], ph["offload"]["losses"]
    n = min(len(a), len(b))
    steps = list(range(1, n + 1))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[3, 2])
    top.plot(steps, a[:n], label="1 GPU (no FSDP, gradient accumulation)", lw=2.2, color="tab:blue")
    top.plot(
        steps,
        b[:n],
        "--",
        label=f"{results['world_size']} GPUs (FSDP2: CPU offload + checkpointing + bf16)",
        lw=1.6,
        color="tab:orange",
    )
    top.set_ylabel("loss (token mean over the global batch)")
    top.set_title(f"QLoRA {results['shape']}, {results['global_batch_tokens']} tokens / step: loss parity")
    top.legend()
    rel = [max(abs(x - y) / abs(y), 1e-12) for x, y in zip(b[:n], a[:n])]
    bottom.semilogy(steps, rel, color="tab:red", label="|loss G GPUs - loss 1 GPU| / loss 1 GPU (equal: 1e-12)")
    bottom.axhline(1e-3, color="gray", ls=":", label="goal 1e-3")
    bottom.set_xlabel("step")
    bottom.set_ylabel("relative difference")
    bottom.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return path


def summary(results: dict[str, Any]) -> str:
    lines = ["", "=== quickloris bench fsdp: summary ==="]
    for name, r in results.get("phases", {}).items():
        lines.append(
            f"  {name:9s} {r.get('world_size', 1)} GPU(s): {r['tokens_per_s_per_gpu']:>9,.0f} tok/s/GPU, peak "
            f"{(r.get('peak_gib') or 0):6.2f} GiB/GPU, {len(r['losses'])} steps, first step "
            f"{r['first_step_s']:.1f} s" + (f", compile {r['compile']}" if r.get("compile") else "")
        )
    for k, v in results.get("derived", {}).items():
        lines.append(f"  {k}: {json.dumps(v, default=str)}")
    prof = results.get("phases", {}).get("sharded", {}).get("profile")
    if prof:
        lines.append(
            f"  sharded profile: GPU busy {prof['gpu_total_ms_per_step']} ms per step of "
            f"{1e3 * sum(prof['step_s']) / len(prof['step_s']):.0f} ms (all streams summed); top kernels:"
        )
        lines += [f"    {r['ms_per_step']:8.2f} ms x{r['calls_per_step']:g}  {r['name']}" for r in prof["top_gpu"][:10]]
        lines += [
            f"    cpu {r['ms_per_step']:8.2f} ms x{r['calls_per_step']:g}  {r['name']}"
            for r in prof["top_cpu_self"][:6]
        ]
    if results.get("incomplete"):
        lines.append(f"  INCOMPLETE: {results['incomplete']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    from benchmarks.report import after_record
    from quickloris.utils.provenance import record

    if args.device == "cuda" and not torch.cuda.is_available():
        print("quickloris bench fsdp needs CUDA GPUs (or --tiny --device cpu); nothing was measured.")
        return 2
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        print(
            f"quickloris bench fsdp: --gpus {args.gpus} but {torch.cuda.device_count()} GPU(s) here; nothing was "
            "measured."
        )
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = worker_command(args, result)
        print(" ".join(cmd), flush=True)
        env = dict(
            os.environ,
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
            PYTHONPATH=os.pathsep.join(filter(None, (_CHECKOUT, os.environ.get("PYTHONPATH")))),
        )
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: stoppable with its ranks
        try:
            rc = proc.wait(timeout=args.timeout)
            problem = None if rc == 0 else f"the ranks failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            problem = f"stopped after {args.timeout:.0f} s (--timeout)"
        if problem:
            print(f"quickloris bench fsdp: {problem}", flush=True)
        if not os.path.exists(result):
            return 1
        with open(result, encoding="utf-8") as f:
            results = json.load(f)
    results.update(
        total_s=round(time.perf_counter() - t0, 1),
        tiny=args.tiny,
        device=args.device,
        options={k: v for k, v in vars(args).items() if k not in ("func",)},
    )
    if problem:
        results["incomplete"] = problem  # the phases listed are complete; the others did not finish
    results["derived"] = derive(results)
    path = record("fsdp", "fsdp", results, args.out)
    png = plot(results, path.with_suffix(".png"))
    print(summary(results))
    if png:
        print(f"wrote {png}")
    after_record(path)
    return 1 if problem else 0
