"""How fast the GPUs of this machine exchange bytes through NCCL (the link FSDP2's all-gathers use).

    torchrun --standalone --nproc-per-node 2 -m benchmarks.fsdp.link_bandwidth --out DIR    # in the repository root
    bash scripts/device/run.sh torchrun:benchmarks/fsdp/link_bandwidth.py     # on the device

All-gather and reduce-scatter of 16 MiB .. 1 GiB (uint8 / fp32), 5 timed repetitions after 2 warm-up ones;
algorithm bandwidth = bytes of the gathered tensor / time, bus bandwidth = algbw x (n-1)/n (nccl-tests' definition).
Also records `nvidia-smi topo -m`. Rank 0 writes `<out>/link_bandwidth-<stamp>.json` with provenance.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import torch
import torch.distributed as dist


def timed(fn, reps: int = 5) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    from benchmarks.report import after_record
    from quickloris.utils.provenance import record

    p = argparse.ArgumentParser()
    p.add_argument("--out", default="link-bandwidth")
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl")
    rows = []
    for mib in (16, 128, 1024):
        n = mib * 2**20
        for op, dtype in (("all_gather", torch.uint8), ("reduce_scatter", torch.float32)):
            elem = torch.tensor([], dtype=dtype).element_size()
            full = torch.empty(n // elem, dtype=dtype, device="cuda")
            part = torch.ones(n // elem // world, dtype=dtype, device="cuda")
            if op == "all_gather":
                fn = lambda: dist.all_gather_into_tensor(full, part)  # noqa: E731
            else:
                fn = lambda: dist.reduce_scatter_tensor(part, full)  # noqa: E731
            s = timed(fn)
            rows.append(
                {
                    "op": op,
                    "dtype": str(dtype).split(".")[1],
                    "mib": mib,
                    "ms": round(s * 1e3, 3),
                    "algbw_gbs": round(n / s / 1e9, 1),
                    "busbw_gbs": round(n / s / 1e9 * (world - 1) / world, 1),
                }
            )
            if rank == 0:
                print(rows[-1], flush=True)
    if rank == 0:
        try:
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            topo = f"nvidia-smi topo -m failed: {exc}"
        print(topo)
        path = record(
            "fsdp",
            "link_bandwidth",
            {
                "world_size": world,
                "rows": rows,
                "nvidia_smi_topo": topo,
                "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL")},
            },
            os.path.dirname(os.path.abspath(args.out)),
        )
        after_record(path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
