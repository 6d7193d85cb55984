"""Where the QLoRA training step's time goes, and what trading memory back for speed buys (device diagnostics).

    python -m benchmarks.train.probe_speed --out DIR --parts attention,1b,profile,8b    # in the repository root
    bash scripts/device/run.sh py:benchmarks/train/probe_speed.py   # parts from $QUICKLORIS_PROBE_PARTS

Parts:
* ``attention``: causal GQA attention forward + backward at the benchmark's shapes (1B: 4 x 2048, 32/8 heads of
  64; 8B: 1 x 8192, 32/8 heads of 128) through each SDPA backend (flash, cuDNN, memory-efficient) and flex.
* ``1b`` / ``8b``: `quickloris bench train`'s compiled quickloris stack in variants k:attention:checkpoint (the last
  k decoder layers left un-checkpointed; the attention backend; the checkpoint traced into the compiled layer or
  transformers' eager wrapper around it), from $QUICKLORIS_PROBE_1B / _8B: tokens/s and peak memory, HF compiled
  beside it (1B).
* ``profile``: CUDA kernel time of two 1B steps, grouped (GEMM, attention, NF4 dequant, Inductor-fused, other).
* ``peakmem``: the blocks alive at the peak of one 8B step at 1 x $QUICKLORIS_PROBE_PEAKMEM_SEQ (offloaded
  checkpoints, tiled MLP), by size and allocating frames: what limits the longest context.
* ``saved``: what a 1B-shaped decoder layer keeps for backward per checkpoint mode ($QUICKLORIS_PROBE_SAVED:
  attention:eager|none|graph[+attention][+linears]); also on the CPU (``--saved-device cpu --saved-tokens 1x512``).
Writes ``<out>/probe_speed-<stamp>.json`` with provenance. Diagnostics, not the headline benchmark.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from pathlib import Path

import torch


def timed(fn, reps: int = 10, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_attention() -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    out = {}
    flex = torch.compile(flex_attention, dynamic=False)
    for name, (b, s, h, kv, d) in {"1b_4x2048": (4, 2048, 32, 8, 64), "8b_1x8192": (1, 8192, 32, 8, 128)}.items():
        q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, kv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, kv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
        flops = 4 * b * h * s * s * d / 2 * 3.5  # causal; backward = 2.5 x forward
        res = {}
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            for gqa in (True, False):

                def step(backend=backend, gqa=gqa):
                    kk, vv = (k, v) if gqa else (k.repeat_interleave(h // kv, 1), v.repeat_interleave(h // kv, 1))
                    with sdpa_kernel(getattr(SDPBackend, backend)):
                        o = F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                    o.backward(g)

                key = f"{backend.lower()}{'_gqa' if gqa else '_expanded'}"
                try:
                    t = timed(step)
                    res[key] = {"ms": round(t * 1e3, 3), "tflops": round(flops / t / 1e12, 1)}
                except Exception as e:  # a backend that does not take this input
                    res[key] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        bm = create_block_mask(lambda b_, h_, q_, k_: k_ <= q_, None, None, s, s, device="cuda")

        def fstep():
            flex(q, k, v, block_mask=bm, enable_gqa=True).backward(g)

        try:
            t = timed(fstep)
            res["flex_gqa"] = {"ms": round(t * 1e3, 3), "tflops": round(flops / t / 1e12, 1)}
        except Exception as e:
            res["flex_gqa"] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        out[name] = res
        print(name, res, flush=True)
    return out


def _in_graph(mode: str) -> dict:
    """A checkpoint mode: eager (transformers' wrapper), none, or graph[+attention][+linears] (in-graph, keeping
    those besides the layer input)."""
    kind, *keep = mode.split("+")
    return {"checkpoint_in_graph": kind == "graph", "checkpoint_keep": keep}


def part_train(
    tm, key: str, shape: dict, batch: int, seq: int, variants: list[tuple[int, str, str]], steps: int, hf: bool
) -> dict:
    base = tm.build_base(shape, device="cuda")
    vocab = shape["vocab_size"]
    res = {}
    init = None
    for k, attention, mode in variants:
        torch._dynamo.reset()
        model = tm.ql_stack(base, device="cuda", compiled=True, attention=attention, skip_last=k, **_in_graph(mode))
        if init is None:
            init = tm.lora_init_of(model)
        tm.apply_lora_init(init, model)
        try:
            run = tm.train_run(model, tm.make_batches(steps, batch, seq, vocab), device="cuda")
            run = {k_: run[k_] for k_ in ("tokens_per_s", "peak_gib", "losses", "first_step_s")}
        except Exception as e:  # out of memory, or a backend that refuses the input
            run = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        res[f"ql_compiled_skip{k}_{attention}_{mode}"] = run
        print(key, attention, mode, k, {a: b for a, b in run.items() if a != "losses"}, flush=True)
        del model
        tm.release("cuda")
    if hf:
        torch._dynamo.reset()
        model = tm.hf_stack(base, device="cuda", compiled=True)
        tm.apply_lora_init(init, model)
        run = tm.train_run(model, tm.make_batches(steps, batch, seq, vocab), device="cuda")
        res["hf_compiled"] = {k_: run[k_] for k_ in ("tokens_per_s", "peak_gib", "losses", "first_step_s")}
        print(key, "hf_compiled", res["hf_compiled"]["tokens_per_s"], res["hf_compiled"]["peak_gib"], flush=True)
        del model
    del base
    tm.release("cuda")
    return res


GROUPS = [  # first match wins: cuDNN's attention kernels carry "sm90_" too (they were counted as GEMMs before)
    ("attention", r"flash|fmha|cudnn|attention|sdpa"),
    ("gemm", r"gemm|cutlass|nvjet|xmma|sm90_|ampere_|cublas"),
    ("nf4_dequant", r"dequant|nf4"),
    ("inductor_triton", r"^triton_"),
    ("copy/elementwise", r"elementwise|copy|fill"),
    ("reduce", r"reduce"),
]


def idle_gaps(spans: list[tuple[float, float, str]], top: int = 12) -> dict:
    """Where the GPU ran no kernel: `spans` are kernels' (start, end, name) in microseconds, in any order. The busy
    time is the union of the spans (kernels of two streams overlap); a gap is a stretch between the first start and
    the last end covered by none. Returns the idle total and the `top` longest gaps with the kernels either side
    (which step phase leaves the GPU waiting on the host)."""
    spans = sorted(spans)
    gaps, idle, end, last = [], 0.0, None, ""
    for start, stop, name in spans:
        if end is not None and start > end:
            idle += start - end
            gaps.append((start - end, last, name))
        if end is None or stop > end:
            end, last = stop, name
    gaps.sort(key=lambda g: -g[0])
    return {
        "idle_us": round(idle, 1),
        "gaps": len(gaps),
        "gaps_over_20us": sum(1 for g in gaps if g[0] > 20),
        "idle_in_gaps_over_20us": round(sum(g[0] for g in gaps if g[0] > 20), 1),
        "longest": [{"us": round(us, 1), "after": a[:80], "before": b[:80]} for us, a, b in gaps[:top]],
    }


def part_profile(tm, attention: str, steps: int = 2) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.loss.models import LLAMA_1B

    base = tm.build_base(LLAMA_1B, device="cuda")
    torch._dynamo.reset()
    model = tm.ql_stack(base, device="cuda", compiled=True, attention=attention)
    batches = tm.make_batches(3 + steps, 4, 2048, LLAMA_1B["vocab_size"])
    tm.train_run(model, batches[:3], device="cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for ids in batches[3:]:
            loss = model(input_ids=ids.cuda(), labels=ids.cuda()).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0

    def kernel(e) -> bool:
        # GPU-side user annotations (record_function ranges: "Optimizer.step#AdamW.step", compiled regions) show
        # as CUDA events too; they span kernels and the gaps between them, so they are neither kernel time nor busy
        return e.device_type == torch.autograd.DeviceType.CUDA and not getattr(e, "is_user_annotation", False)

    kernels = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and kernel(e):
            kernels[e.key] = (kernels.get(e.key, (0, 0))[0] + t, kernels.get(e.key, (0, 0))[1] + e.count)
    groups: dict[str, float] = {}
    for name, (t, _) in kernels.items():
        g = next((g for g, pat in GROUPS if re.search(pat, name, re.I)), "other")
        groups[g] = groups.get(g, 0.0) + t / 1e3 / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:40]
    spans = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if kernel(e) and e.time_range.end > e.time_range.start
    ]
    idle = idle_gaps(spans)
    idle["idle_ms_per_step"] = round(idle["idle_us"] / 1e3 / steps, 2)
    res = {
        "wall_ms_per_step": round(wall * 1e3 / steps, 1),
        "kernel_ms_per_step": round(sum(t for t, _ in kernels.values()) / 1e3 / steps, 1),
        "groups_ms_per_step": {g: round(t, 1) for g, t in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_kernels": [
            {"name": n[:160], "ms_per_step": round(t / 1e3 / steps, 2), "calls_per_step": c // steps}
            for n, (t, c) in top
        ],
        "idle": idle,  # under the profiler: host-side gaps are longer than in the bench
    }
    print("idle", {k: v for k, v in idle.items() if k != "longest"}, flush=True)
    for g in idle["longest"]:
        print(f"  gap {g['us']:9.1f} us after {g['after'][:50]} before {g['before'][:50]}")
    print(res["wall_ms_per_step"], res["kernel_ms_per_step"], res["groups_ms_per_step"], flush=True)
    for row in res["top_kernels"][:25]:
        print(f"  {row['ms_per_step']:8.2f} ms {row['calls_per_step']:5d}x {row['name'][:110]}")
    del model, base, opt
    tm.release("cuda")
    return res


def part_saved(tm, modes: list[str], device: str = "cuda", batch: int = 4, seq: int = 2048) -> dict:
    """What one 1B-shaped decoder layer saves for backward (batch x seq tokens, 2 layers), per checkpoint mode. On
    the CPU too (`--device cpu`, with fewer tokens): which tensors the partitioner keeps does not depend on the
    device, only their sizes on the token count."""
    from benchmarks.loss.models import LLAMA_1B

    base = tm.build_base(dict(LLAMA_1B, num_hidden_layers=2), device=device)
    ids = torch.randint(0, LLAMA_1B["vocab_size"], (batch, seq), device=device)
    res = {}
    for mode in modes:  # attention:checkpoint, checkpoint in graph / eager / none
        attention, ckpt = mode.split(":")
        torch._dynamo.reset()
        model = tm.ql_stack(
            base,
            device=device,
            compiled=True,
            attention=attention,
            skip_last=2 if ckpt == "none" else 0,
            **_in_graph(ckpt),
        )
        for _ in range(2):  # compile, then measure
            seen: dict[str, list] = {}

            def pack(t):
                key = f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                seen.setdefault(key, [0, t.numel() * t.element_size()])[0] += 1
                return t

            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model.model(input_ids=ids).last_hidden_state
            out.float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
        rows = sorted(((k, c, b) for k, (c, b) in seen.items()), key=lambda r: -r[1] * r[2])
        res[mode] = {
            "saved_mib": round(sum(c * b for _, c, b in rows) / 2**20, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            "largest": [f"{c}x {k} ({c * b / 2**20:.1f} MiB)" for k, c, b in rows[:14]],
        }
        print(mode, res[mode], flush=True)
        del model, out
        tm.release(device)
    return {"device": device, "tokens": [batch, seq], "modes": res}


def peak_blocks(trace: list[dict], base: int, unit: int, top: int = 30) -> dict:
    """Replays a memory-history trace (alloc +, free_completed -) from `base` allocated bytes to its peak, and groups
    the blocks alive there by size and allocating Python frames (the first three outside torch's own files)."""
    live: dict[int, dict] = {}
    now = best = base
    best_live: list[dict] = []
    for ev in trace:
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            now += ev["size"]
            if now > best:
                best, best_live = now, list(live.values())
        elif ev["action"] == "free_completed" and ev["addr"] in live:
            now -= live.pop(ev["addr"])["size"]
    groups: dict[tuple, list[int]] = {}
    for ev in best_live:
        frames = [f for f in ev.get("frames", []) if "/torch/" not in f["filename"] or "_inductor" in f["filename"]]
        where = " < ".join(f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']}:{f['name']}" for f in frames[:3])
        g = groups.setdefault((ev["size"], where), [0, 0])
        g[0] += 1
        g[1] += ev["size"]
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "peak_gib": round(best / 2**30, 2),
        "before_gib": round(base / 2**30, 2),
        "unit_bytes": unit,
        "blocks": [
            {"gib": round(t / 2**30, 3), "count": c, "size_units": round(size / unit, 3), "where": where}
            for (size, where), (c, t) in rows
        ],
    }


def part_peakmem(tm, seq: int, mlp_chunks: int) -> dict:
    """What is alive at the peak of one 8B step at 1 x `seq` (compiled, offloaded checkpoints, tiled MLP), after a
    warm-up step at the same length: blocks grouped by size (in units of one seq x hidden bf16 tensor) and where
    they were allocated."""
    vocab = tm.LLAMA_8B["vocab_size"]
    base = tm.build_base(tm.LLAMA_8B, device="cuda")
    torch._dynamo.reset()
    model = tm.ql_stack(base, device="cuda", compiled=True, offload=True, mlp_chunks=mlp_chunks)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    warm = tm.one_step(model, opt, seq, vocab, device="cuda")
    print("peakmem: warm-up step", warm[2], flush=True)  # the SystemError seen once: before or after this line
    tm.release("cuda")
    before = torch.cuda.memory_allocated()
    # With Python frames of allocations and frees the step failed on the device (23145f1 and 1479863: "SystemError:
    # <built-in method apply of FunctionMeta object> returned NULL without setting an exception"); the allocations'
    # frames alone worked there (benchmarks/diag/tiled_mlp_peak.py, an offloaded compiled 8B-shaped step), and peak
    # attribution needs no more; the last resort is sizes only.
    frames = "python"
    for context in ("all", "alloc", None):
        torch.cuda.memory._record_memory_history(max_entries=500_000, context=context, stacks="python")
        try:
            ok, peak, note, _ = tm.one_step(model, opt, seq, vocab, device="cuda")
            break
        except SystemError as e:
            kept = "allocations only" if context == "all" else "none"  # what the next try records
            frames = f"{kept} ({type(e).__name__} with {context}: {str(e)[:120]})"
        finally:
            snap = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
    else:
        raise RuntimeError(f"peakmem: the recorded step failed with and without frames: {frames}")
    res = {"seq": seq, "mlp_chunks": mlp_chunks, "warm_step": warm[3], "fits": ok, "peak_gib": peak, "note": note}
    res["frames"] = frames
    res |= peak_blocks(snap["device_traces"][0], before, seq * tm.LLAMA_8B["hidden_size"] * 2)
    print(res["peak_gib"], res["note"], flush=True)
    for row in res["blocks"]:
        print(f"  {row['gib']:7.3f} GiB {row['count']:4d} x {row['size_units']:7.3f} units  {row['where'][:150]}")
    del model, base, opt
    tm.release("cuda")
    return res


def main() -> None:
    from benchmarks.loss.models import LLAMA_1B
    from benchmarks.report import after_record
    from benchmarks.train import models as tm
    from quickloris.utils.atomic import atomic_write_json
    from quickloris.utils.provenance import environment

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--parts", default=os.environ.get("QUICKLORIS_PROBE_PARTS", "attention,1b,profile,8b"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument(
        "--variants-1b",
        default=os.environ.get(
            "QUICKLORIS_PROBE_1B",
            "0:sdpa_cudnn:eager,0:sdpa_cudnn:graph,0:sdpa_cudnn:graph+attention,"
            "0:sdpa_cudnn:graph+linears,0:sdpa_cudnn:graph+attention+linears",
        ),
        help="k:attention:checkpoint: k last layers un-checkpointed, attention backend, checkpoint in the "
        "compiled graph (graph, graph+linears, graph+attention+linears: what it keeps besides the "
        "layer input) or transformers' eager wrapper around it (eager)",
    )
    p.add_argument(
        "--variants-8b",
        default=os.environ.get(
            "QUICKLORIS_PROBE_8B",
            "2:sdpa_cudnn:eager,2:sdpa_cudnn:graph,1:sdpa_cudnn:graph+attention,0:sdpa_cudnn:graph+attention",
        ),
    )
    p.add_argument("--profile-attention", default=os.environ.get("QUICKLORIS_PROBE_PROFILE_ATTN", "sdpa_cudnn"))
    p.add_argument("--saved-device", default="cuda", help="saved part: cuda, or cpu (the same tensors, smaller)")
    p.add_argument("--saved-tokens", default="4x2048", help="saved part: batch x sequence length")
    p.add_argument("--peakmem-seq", type=int, default=int(os.environ.get("QUICKLORIS_PROBE_PEAKMEM_SEQ", 65536)))
    p.add_argument("--peakmem-mlp-chunks", type=int, default=8)
    args = p.parse_args()
    results: dict = {}
    env = environment()
    stamp = env["date_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")
    path = os.path.join(args.out or "benchmarks/results", "train", f"probe_speed-{stamp}.json")

    def variants(text):
        return [(int(k), a, m) for k, a, m in (v.split(":") for v in text.split(","))]

    for part in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            if part == "attention":
                results[part] = part_attention()
            elif part == "1b":
                results[part] = part_train(tm, part, LLAMA_1B, 4, 2048, variants(args.variants_1b), args.steps, True)
            elif part == "8b":
                results[part] = part_train(
                    tm, part, tm.LLAMA_8B, 1, 8192, variants(args.variants_8b), args.steps, False
                )
            elif part == "saved":
                results[part] = part_saved(
                    tm,
                    os.environ.get(
                        "QUICKLORIS_PROBE_SAVED",
                        "sdpa_cudnn:eager,sdpa_cudnn:graph,"
                        "sdpa_cudnn:graph+attention,sdpa_cudnn:graph+linears,"
                        "sdpa_cudnn:none",
                    ).split(","),
                    args.saved_device,
                    *map(int, args.saved_tokens.split("x")),
                )
            elif part == "profile":
                results[part] = part_profile(tm, args.profile_attention)
            elif part == "peakmem":
                results[part] = part_peakmem(tm, args.peakmem_seq, args.peakmem_mlp_chunks)
        except Exception as e:
            results[part] = {"error": f"{type(e).__name__}: {e}"}
            print(part, "failed:", results[part]["error"], flush=True)
        results[f"{part}_seconds"] = round(time.perf_counter() - t0, 1)
        print(f"--- {part}: {results[f'{part}_seconds']} s", flush=True)
        atomic_write_json(path, {"environment": env, "results": results})  # after each part: a timeout keeps it
        print("wrote", path, flush=True)
    after_record(Path(path))


if __name__ == "__main__":
    main()
