"""One rank of `quickloris bench fsdp` (started by torchrun from `benchmarks.fsdp.bench`; see that module).

Every rank builds the same random-init base directly in NF4 on its GPU, layer by layer (`train_models.build_base`:
an 8B model never exists in 16-bit), then parks it in pinned CPU memory so that no phase's peak includes it. Each
phase builds the QLoRA stack over those tensors (LoRA initialised from one seed: identical everywhere), trains,
and frees it:

* ``single``   rank 0 alone, no FSDP: each step accumulates the step's G = world-size micro-batches (1 x seq each)
               normalised by their total target count; the other ranks wait.
* ``offload``  FSDP2 over all ranks, bf16 mixed precision + CPU offload + activation checkpointing, rank r takes
               micro-batch r of each step: the same global batches; per-step losses and final LoRA weights are
               compared with ``single``.
* ``sharded``  the same without CPU offload (peak memory without offload; tokens/s for scaling vs ``single``).
* ``compiled`` ``offload`` plus the regional torch.compile (first step: compile time; graph breaks counted).

Rank 0 writes the results as JSON to ``--result``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch
from torch import nn

PHASES = ("single", "offload", "sharded", "compiled")
# Shardable tiny shapes (every NF4 weight splits over 2 ranks on whole 16384-value groups), for CPU smoke runs.
TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    tie_word_embeddings=False,
)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fsdp.worker")
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--phases", default=",".join(PHASES))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--timing-steps", type=int, default=12)
    p.add_argument("--compile-steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--vocab-subset", type=int, default=512)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--profile-steps",
        type=int,
        default=0,
        help="profile this many extra steps of the sharded "
        "phase (torch.profiler; the top kernels and CPU ops go into the results)",
    )
    p.add_argument("--result", required=True)
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _park(t: torch.Tensor) -> torch.Tensor:
    cpu = t.to("cpu")
    return cpu.pin_memory() if torch.cuda.is_available() else cpu


def build_parked_base(shape: dict, device: torch.device):
    """`train_models.build_base` on `device`, then every tensor moved to (pinned) CPU memory."""
    from benchmarks.train.models import build_base

    base = build_base(shape, device=device.type)
    for name in list(base.nf4):
        base.nf4[name] = _park(base.nf4[name])
    for name in list(base.dense):
        base.dense[name] = _park(base.dense[name])
    _release(device)
    return base


def skeleton(base) -> nn.Module:
    """A Llama over the base's (CPU) tensors: no weight is copied; `prepare_model` wraps the NF4 ones."""
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(base.config)
    for name, nf4 in base.nf4.items():
        parent, child = name.rsplit(".", 1)
        holder = nn.Linear(nf4.shape[1], nf4.shape[0], bias=False, device="meta")
        holder.weight = nn.Parameter(nf4, requires_grad=False)
        setattr(model.get_submodule(parent), child, holder)
    model.load_state_dict(base.dense, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    return model


def make_batches(steps: int, per_step: int, seq: int, subset: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """batches[step][k]: [1, seq] token ids from the first `subset` ids of the vocabulary (a LoRA learns that)."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, subset, (1, seq), generator=g) for _ in range(per_step)] for _ in range(steps)]


def _profile_tables(prof, steps: int) -> dict[str, Any]:
    """The profiled steps' top GPU kernels and CPU ops, per step (milliseconds)."""
    events = prof.key_averages()
    gpu_key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"

    def top(key: str, n: int) -> list[dict[str, Any]]:
        rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:n]
        return [
            {
                "name": e.key[:120],
                "ms_per_step": round(getattr(e, key) / 1e3 / steps, 3),
                "calls_per_step": e.count / steps,
            }
            for e in rows
        ]

    return {
        "steps": steps,
        "gpu_total_ms_per_step": round(sum(getattr(e, gpu_key) for e in events) / 1e3 / steps, 1),
        "top_gpu": top(gpu_key, 25),
        "top_cpu_self": top("self_cpu_time_total", 15),
    }


def train(
    model: nn.Module,
    steps: list[list[torch.Tensor]],
    *,
    device: torch.device,
    lr: float,
    distributed: bool,
    profile: int = 0,
) -> dict[str, Any]:
    """AdamW steps over this process' micro-batches; loss normalised by the step's global target count.

    ``profile`` > 0: that many more steps (the first batches again) under torch.profiler, not in the timings."""
    from quickloris.parallel import fsdp

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() / 2**30 if device.type == "cuda" else None
    losses, times = [], []
    profiled: dict[str, Any] | None = None
    if profile > 0:
        steps = list(steps) + list(steps[:profile])
    for index, micro in enumerate(steps):
        if profile > 0 and index == len(steps) - profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            prof = torch_profile(activities=activities)
            prof.__enter__()
        _sync(device)
        t0 = time.perf_counter()
        ids = [m.to(device, non_blocking=True) for m in micro]
        n = fsdp.global_num_items(ids) if distributed else sum(fsdp.count_targets(i) for i in ids)
        scale = fsdp.gradient_scale() if distributed else 1.0
        total = torch.zeros((), device=device)
        for x in ids:
            loss = model(input_ids=x, labels=x, num_items_in_batch=n).loss
            (loss * scale).backward()
            total += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(fsdp.all_reduce_sum(total)) if distributed else float(total))
        _sync(device)
        times.append(time.perf_counter() - t0)
    if profile > 0:
        prof.__exit__(None, None, None)
        profiled = _profile_tables(prof, profile)
        profiled["step_s"] = times[-profile:]
        losses, times = losses[:-profile], times[:-profile]
    timed = times[2:] or times
    tokens = sum(m.numel() for m in steps[0])
    out = {
        "losses": losses,
        "step_s": times,
        "tokens_per_step_per_gpu": tokens,
        "tokens_per_s_per_gpu": tokens / statistics.median(timed),
        "first_step_s": times[0],
        "resident_gib": resident,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.type == "cuda" else None,
    }
    if profiled is not None:
        out["profile"] = profiled
    del opt
    return out


def _max_over_ranks(value: float | None, device: torch.device) -> float | None:
    import torch.distributed as dist

    if value is None:
        return None
    t = torch.tensor(value, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def lora_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a)
    den = sum(float(b[k].double().pow(2).sum()) for k in a)
    return {"max_abs": max(float((a[k] - b[k]).abs().max()) for k in a), "rel_fro": (num / den) ** 0.5}


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from benchmarks.train.models import LLAMA_8B, SHAPES
    from quickloris.models.adapters import adapter_state_dict
    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel import fsdp
    from quickloris.parallel.compile import CompileConfig, compile_stats, reset_compile_stats
    from quickloris.parallel.compose import CheckpointConfig, build_training_model
    from quickloris.utils.atomic import atomic_write_json

    args = parse(argv)
    phases = [p for p in args.phases.split(",") if p]
    if set(phases) - set(PHASES):
        raise ValueError(f"--phases: unknown {sorted(set(phases) - set(PHASES))}; choose from {','.join(PHASES)}")
    ctx = fsdp.init_distributed(args.device)
    shape = {**SHAPES, "tiny": TINY, "llama-3.1-8b": LLAMA_8B}[args.shape]
    t0 = time.perf_counter()
    base = build_parked_base(shape, ctx.device)
    checksum = torch.tensor(
        [float(sum(int(t.packed[:4096].sum()) for t in base.nf4.values()))], dtype=torch.float64, device=ctx.device
    )
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if float(low) != float(high):
        raise RuntimeError("the ranks built different NF4 bases (different GPU models?): no parity run is possible")
    G = ctx.world_size
    batches = make_batches(args.steps, G, args.seq, args.vocab_subset)
    results: dict[str, Any] = {
        "world_size": G,
        "shape": args.shape,
        "seq": args.seq,
        "lr": args.lr,
        "reshard_after_forward": args.reshard_after_forward,
        "global_batch_tokens": G * args.seq,
        "build_s": round(time.perf_counter() - t0, 1),
        "phases": {},
    }
    qcfg = QLoRAConfig(r=16, lora_alpha=32, quantize=False)
    ckpt = CheckpointConfig()
    single_lora = None

    def log(msg: str) -> None:
        if ctx.is_main:
            print(msg, flush=True)

    log(f"base built in {results['build_s']} s on {G} rank(s); phases {phases}")
    for phase in phases:
        t0 = time.perf_counter()
        torch.manual_seed(1234)  # the same LoRA initialisation in every phase and on every rank
        if phase == "single":
            if ctx.is_main:  # built on the CPU like the sharded phases: the same LoRA initialisation (CPU RNG)
                model = build_training_model(skeleton(base), qcfg, checkpointing=ckpt).to(ctx.device)
                run = train(
                    model, [[m for m in step] for step in batches], device=ctx.device, lr=args.lr, distributed=False
                )
                single_lora = adapter_state_dict(model)
                run["world_size"] = 1
                results["phases"][phase] = run
                del model
            _release(ctx.device)
            dist.barrier()
        else:
            sharding = fsdp.FSDPConfig(
                cpu_offload=phase in ("offload", "compiled"), reshard_after_forward=args.reshard_after_forward
            )
            compile_cfg = CompileConfig(backend=args.backend) if phase == "compiled" else None
            n = {"offload": args.steps, "sharded": args.timing_steps, "compiled": args.compile_steps}[phase]
            if n <= 0:
                continue
            reset_compile_stats()
            model = build_training_model(
                skeleton(base), qcfg, checkpointing=ckpt, sharding=sharding, mesh=ctx.mesh, compile=compile_cfg
            )
            run = train(
                model,
                [[step[ctx.rank]] for step in batches[:n]],
                device=ctx.device,
                lr=args.lr,
                distributed=True,
                profile=args.profile_steps if phase == "sharded" else 0,
            )
            run["peak_gib"] = _max_over_ranks(run["peak_gib"], ctx.device)
            run["peak_reserved_gib"] = _max_over_ranks(run["peak_reserved_gib"], ctx.device)
            run["resident_gib"] = _max_over_ranks(run["resident_gib"], ctx.device)
            run["world_size"] = G
            run["fsdp"] = fsdp.sharding_summary(model)
            if compile_cfg is not None:
                run["compile"] = compile_stats()
            if phase == "offload":
                lora = fsdp.gather_adapter_state_dict(model)
                if single_lora is not None:
                    run["lora_vs_single"] = lora_diff(lora, single_lora)
            if ctx.is_main:
                results["phases"][phase] = run
            del model
            _release(ctx.device)
        results["phases"].get(phase, {})["phase_s"] = round(time.perf_counter() - t0, 1)
        if phase in results["phases"]:
            r = results["phases"][phase]
            log(
                f"[{phase}] {r['tokens_per_s_per_gpu']:,.0f} tok/s/GPU, peak {r['peak_gib'] or 0:.2f} GiB, first step "
                f"{r['first_step_s']:.1f} s, {r['phase_s']} s, losses {[round(x, 4) for x in r['losses'][:3]]}"
            )
        if ctx.is_main:  # after every phase: a run stopped by a time limit keeps the phases it finished
            atomic_write_json(args.result, results)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
