"""Where a packed VLM step spends its time, beside a padded one (a diagnosis for `quickloris bench vision`).

The same Qwen2-VL-2B-shaped quickloris model (compiled regions unless ``--eager``) and rows as the bench's speed
part; after warm-up steps, one padded and
one packed step run under ``torch.profiler``. Printed per layout: wall time, GPU busy time (sum of kernel times:
wall >> busy means the host is the bottleneck), peak memory, and the top operators by self GPU time and by self CPU
time. Also the padded / packed batch shapes (positions processed). On the device:

    bash scripts/device/run.sh py:benchmarks/vision/profile_step.py

``--tiny`` runs toy sizes on the CPU (a smoke run: no GPU times).
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.vision import bench


def _table(prof, key: str, n: int) -> str:
    return prof.key_averages().table(sort_by=key, row_limit=n, max_name_column_width=70)


def main(args) -> int:
    from torch.profiler import ProfilerActivity, profile

    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel.compile import CompileConfig
    from quickloris.parallel.compose import CheckpointConfig, build_training_model

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    vocab = 512 if args.tiny else bench.QWEN2_VL_2B["text"]["vocab_size"]
    tok = bench.tokenizer(["lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"], 400)
    torch.manual_seed(args.seed)
    model = bench.qwen2_vl(bench.TINY if args.tiny else bench.QWEN2_VL_2B, tok, vocab, dtype, device)
    proc = bench.processing(model, tok, 28 * 28 * 256)
    n = args.warmup + 1
    examples = bench._speed_examples(args, proc, tok, n * args.speed_batch)
    model = build_training_model(
        model,
        QLoRAConfig(r=16, lora_alpha=32, attention="sdpa" if args.tiny else "flex"),
        checkpointing=CheckpointConfig(gradient_checkpointing=True),
        compile=None if args.tiny or args.eager else CompileConfig(),
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    groups = [examples[s * args.speed_batch : (s + 1) * args.speed_batch] for s in range(n)]
    lines = []
    for layout, pack in (("padded", None), ("packed", args.speed_pack)):
        steps = bench.step_batches(proc, groups, pack, args.speed_batch)
        shapes = [tuple(b["input_ids"].shape) for b in steps[-1]]
        for s in steps[:-1]:
            bench.train_step(model, s, opt, device, dtype)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=acts, record_shapes=False) as prof:
            t0 = time.perf_counter()
            bench.train_step(model, steps[-1], opt, device, dtype)
            wall = time.perf_counter() - t0
        # kernel time alone: key_averages() lists each kernel under its own name and again under the operator
        # that launched it (a sum over it counts kernels twice)
        busy = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        tokens = sum(len(e) for e in groups[-1])
        lines += [
            f"==== {layout}: batches {shapes} ({sum(a * b for a, b in shapes)} positions, {tokens} tokens) ====",
            f"wall {wall:.3f} s, GPU busy {busy:.3f} s, peak {peak:.2f} GiB, {tokens / wall:.0f} tokens/s",
            "-- by self GPU time --",
            _table(prof, "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total", args.rows),
            "-- by self CPU time --",
            _table(prof, "self_cpu_time_total", args.rows),
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(os.path.join(args.out, "vision-profile.txt"), "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    bench.add_arguments(parser)
    parser.add_argument("--warmup", type=int, default=3, help="steps of each layout before the profiled one")
    parser.add_argument("--eager", action="store_true", help="no regional compile (the bench's stacks until 15276c4)")
    parser.add_argument("--rows", type=int, default=25, help="operators listed per table")
    parser.add_argument("--out", default=None)
    raise SystemExit(main(parser.parse_args()))
