"""Diagnostic: what is alive at the peak of a compiled, checkpointed training step of a 2-layer model with 8B
layer shapes (hidden 4096, intermediate 14336, 32/8 heads) at 1 x --seq tokens, the MLP whole and in 8 chunks.
Writes tiled_mlp_peak.json (with provenance) and the Inductor output code of the layer graphs (code.tgz) to
--out: ``bash scripts/device/run.sh py:benchmarks/diag/tiled_mlp_peak.py``."""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import sys
import tarfile

import torch

sys.path.insert(0, os.getcwd())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--seq", type=int, default=int(os.environ.get("QUICKLORIS_TILED_SEQ", 32768)))
    args = p.parse_args()
    from benchmarks.train.probe_speed import peak_blocks
    from quickloris.models.prepare import QLoRAConfig
    from quickloris.parallel.compile import CompileConfig
    from quickloris.parallel.compose import CheckpointConfig, build_training_model
    from tests.tiny import tiny_model

    V, H, INTER = 1024, 4096, 14336
    if not torch.cuda.is_available():  # a smoke run of the script itself
        H, INTER = 256, 896
    base = tiny_model(vocab_size=V, hidden=H, inter=INTER, layers=2, heads=32, kv_heads=8, seed=0)
    base = base.to(torch.bfloat16) if torch.cuda.is_available() else base
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(0, V, (1, args.seq), device=dev)
    from quickloris.utils.provenance import environment

    res: dict = {"environment": environment(), "seq": args.seq, "unit_bytes": args.seq * H * 2}
    for offload in (False, True) if dev == "cuda" else (False,):
        for n in (1, 8):
            torch._dynamo.reset()
            model = build_training_model(
                copy.deepcopy(base).to(dev),
                QLoRAConfig(r=16),
                checkpointing=CheckpointConfig(gradient_checkpointing=True, mlp_chunks=n, offload=offload),
                compile=CompileConfig(),
            )
            for _ in range(2):
                model(input_ids=ids, labels=ids).loss.backward()
                model.zero_grad(set_to_none=True)
            if dev == "cpu":
                res[f"offload{int(offload)}_chunks{n}"] = "ran"
                continue
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            record = n == 8
            if record:
                torch.cuda.memory._record_memory_history(max_entries=200_000, context="alloc", stacks="python")
            try:
                model(input_ids=ids, labels=ids).loss.backward()
                torch.cuda.synchronize()
            finally:
                if record:
                    snap = torch.cuda.memory._snapshot()
                    torch.cuda.memory._record_memory_history(enabled=None)
            key = f"offload{int(offload)}_chunks{n}"
            row = {"peak_above_before_gib": round((torch.cuda.max_memory_allocated() - before) / 2**30, 3)}
            if record:
                row |= peak_blocks(snap["device_traces"][0], before, res["unit_bytes"], top=25)
            res[key] = row
            print(key, json.dumps(row)[:3000], flush=True)
            del model
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "tiled_mlp_peak.json"), "w") as f:
        json.dump(res, f, indent=1)
    with tarfile.open(os.path.join(args.out, "code.tgz"), "w:gz") as tar:
        for path in glob.glob("/tmp/torchinductor_*/**/*.py", recursive=True):
            tar.add(path, arcname=path.replace("/", "_"))


if __name__ == "__main__":
    main()
